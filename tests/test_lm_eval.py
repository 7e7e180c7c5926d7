"""lm_eval end to end against the real server (demo model), with the usage guide's model_args.

    lm_eval --model local-completions --model_args model=<served>,base_url=<url>/v1/completions,
        num_concurrent=8,max_retries=3,tokenized_requests=False,tokenizer=<local dir> ...

No downloads: the tasks are tests/data/lm_eval_tasks (YAML + JSONL, run from that folder), and
the tokenizer lm_eval loads is a Hugging Face copy of the demo byte-level tokenizer written here
(same ids as atom_stream's demo tokenizer, checked below). One lm_eval run serves both tests:
the generate_until task always, the multiple_choice (loglikelihood) task when the server answers
/v1/completions with echo=true + logprobs=1 + max_tokens=1 the way lm_eval parses it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from live_server import REPO, live_server, offline_env

TASKS_DIR = os.path.join(REPO, "tests", "data", "lm_eval_tasks")
SPECIALS = ["<|bos|>", "<|eos|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
            "<|im_middle|>", "<|im_end|>"] + [f"<|reserved_{i}|>" for i in range(263, 320)]
PROBE_PROMPT = "Question: What is 2 + 2?\nAnswer: 4"


def write_demo_hf_tokenizer(path: str) -> None:
    """A PreTrainedTokenizerFast with the demo ids: byte b -> id b, specials 256..319."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0],
                                   eos_token=SPECIALS[1], additional_special_tokens=SPECIALS[2:])
    fast.save_pretrained(path)


def echo_logprobs_supported(url: str, model: str) -> str | None:
    """None if /v1/completions echoes prompt logprobs as lm_eval needs, else the reason."""
    body = {"model": model, "prompt": PROBE_PROMPT, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60, trust_env=False)
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:300]}"
    lp = (r.json()["choices"][0].get("logprobs") or {})
    n = len(PROBE_PROMPT.encode()) + 1  # byte-level prompt + the one generated token
    if len(lp.get("token_logprobs") or []) != n or len(lp.get("top_logprobs") or []) != n:
        return f"logprobs do not cover prompt+1 = {n} tokens: {str(lp)[:300]}"
    return None


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    tok_dir = str(tmp / "demo_tokenizer")
    write_demo_hf_tokenizer(tok_dir)
    with live_server() as (url, model):
        unsupported = echo_logprobs_supported(url, model)
        tasks = ["atom_stream_tiny_gen"] + ([] if unsupported else ["atom_stream_tiny_mc"])
        exe = shutil.which("lm_eval") or shutil.which("lm_eval", path=os.path.dirname(
            sys.executable))
        cmd = [exe, "--model", "local-completions", "--model_args",
               (f"model={model},base_url={url}/v1/completions,num_concurrent=8,max_retries=3,"
                f"tokenized_requests=False,tokenizer={tok_dir}"),
               "--include_path", ".", "--tasks", ",".join(tasks),
               "--output_path", str(tmp / "out"), "--log_samples"]
        proc = subprocess.run(cmd, check=False, cwd=TASKS_DIR, capture_output=True, text=True, timeout=240,
                              env=offline_env(HF_HOME=str(tmp / "hf_home")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = glob.glob(str(tmp / "out" / "**" / "results_*.json"), recursive=True)
    assert len(results) == 1, proc.stderr[-3000:]
    with open(results[0], encoding="utf-8") as f:
        res = json.load(f)
    samples = {}
    for task in tasks:
        (path,) = glob.glob(str(tmp / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        with open(path, encoding="utf-8") as f:
            samples[task] = [json.loads(line) for line in f]
    return {"results": res["results"], "samples": samples, "unsupported": unsupported,
            "tok_dir": tok_dir}


def test_local_hf_tokenizer_matches_the_demo_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from atom_stream.tokenizer import load_tokenizer

    write_demo_hf_tokenizer(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    demo = load_tokenizer(None)
    text = "Question: héllo wörld 12?\nAnswer: ✓"
    assert hf(text, add_special_tokens=False).input_ids == list(demo.encode(text))
    assert (len(hf), hf.eos_token_id, hf.bos_token_id) == (320, 257, 256)


def test_lm_eval_generate_until_end_to_end(lm_eval_run):
    res = lm_eval_run["results"]["atom_stream_tiny_gen"]
    assert 0.0 <= res["exact_match,none"] <= 1.0
    samples = lm_eval_run["samples"]["atom_stream_tiny_gen"]
    assert len(samples) == 8
    for s in samples:
        (resp,) = s["resps"][0]
        # a real answer came back: not lm_eval's placeholder for a failed/null response, and cut
        # at the task's stop strings
        assert isinstance(resp, str) and "LMEVAL_MODEL_NONE" not in resp and "\n" not in resp


def test_lm_eval_loglikelihood_end_to_end(lm_eval_run):
    if lm_eval_run["unsupported"]:
        pytest.skip("server lacks echo + prompt logprobs on /v1/completions: "
                    + lm_eval_run["unsupported"])
    res = lm_eval_run["results"]["atom_stream_tiny_mc"]
    assert 0.0 <= res["acc,none"] <= 1.0
    samples = lm_eval_run["samples"]["atom_stream_tiny_mc"]
    assert len(samples) == 4
    for s in samples:
        for (loglik, is_greedy) in (r[0] for r in s["resps"]):
            assert math.isfinite(float(loglik)) and float(loglik) < 0.0
