"""Review 25: the usage guide's benchmark command as ATOM runs it.

- Open files: ATOM's benchmark and server raise RLIMIT_NOFILE's soft limit first (set_ulimit);
  with the usual soft limit of 1024, the guide's high concurrencies otherwise fail requests with
  `Too many open files` on the client (and dropped connections on the server).
- Warm-up: ATOM never stops the run on a failed warm-up request; its failures are counted in the
  main run (the first random prompt may be the one that does not fit the server's context).
- Backends: ATOM's `--backend` names for the OpenAI completions client (sglang, lmdeploy,
  scalellm) are accepted.
- vLLM's `bench serve` flags: --input-len/--output-len, --temperature/--top-p/--top-k/--min-p.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
from live_server import REPO, offline_env
from serving_helpers import ENGINE_KWARGS, running_server

from atom_stream.benchmarks import benchmark_serving as bs
from atom_stream.benchmarks.backend_request_func import (
    ASYNC_REQUEST_FUNCS,
    RequestFuncOutput,
    async_request_openai_completions,
)
from atom_stream.entrypoints import openai_server
from atom_stream.entrypoints.limits import raise_fd_limit

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def url():
    with running_server(dict(ENGINE_KWARGS, max_model_len=MAX_MODEL_LEN,
                             max_num_seqs=128)) as srv:
        yield srv.url


@pytest.fixture
def low_soft_limit():
    """This process's soft open-file limit lowered to 100 for one test (restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 100:
        pytest.skip("hard open-file limit too low to test raising the soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _bench_argv(url: str, *extra: str) -> list[str]:
    return ["--model", "demo", "--base-url", url, "--dataset-name", "random",
            "--disable-tqdm", "--ignore-eos", *extra]


def test_raise_fd_limit_raises_the_soft_limit_up_to_the_hard_one(low_soft_limit):
    hard = low_soft_limit
    want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    assert raise_fd_limit(4096) == want
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want
    assert raise_fd_limit(200) == want  # never lowered


def test_atom_entry_point_raises_the_open_file_limit_before_serving(low_soft_limit,
                                                                    monkeypatch):
    seen = {}

    def fake_serve(argv, prog, atom_ports):
        seen["soft"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        seen["atom_ports"] = atom_ports
        return 0

    monkeypatch.setattr(openai_server, "serve", fake_serve)
    assert openai_server.main(["--model", "demo"]) == 0
    assert seen["atom_ports"] and seen["soft"] > 100


def test_high_concurrency_under_a_low_soft_limit_does_not_run_out_of_sockets(url, tmp_path):
    """The guide's command at 150 concurrent clients, started with a soft limit of 100."""
    def lower_soft_limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard))

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip("hard open-file limit too low")
    argv = _bench_argv(url, "--random-input-len", "4", "--random-output-len", "2",
                       "--num-prompts", "150", "--max-concurrency", "150", "--num-warmups",
                       "0", "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
                       "--result-filename", "c150.json")
    proc = subprocess.run([sys.executable, "-m", "atom_stream.benchmarks.benchmark_serving",
                           *argv], cwd=REPO, env=offline_env(), capture_output=True, text=True,
                          timeout=120, preexec_fn=lower_soft_limit, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "c150.json").read_text())
    assert (res["completed"], res["failed"]) == (150, 0), [e for e in res["errors"] if e][:1]


def test_failed_warm_up_does_not_stop_the_run(url, tmp_path, capsys):
    """Seed 0 draws a first prompt of 61 ids + 7 output tokens > max_model_len 64: the warm-up
    request (the first prompt) fails, the run goes on and counts each request."""
    res = bs.main(_bench_argv(
        url, "--random-input-len", "70", "--random-output-len", "8", "--random-range-ratio",
        "0.7", "--num-prompts", "10", "--max-concurrency", "3", "--seed", "0", "--save-result",
        "--save-detailed", "--result-dir", str(tmp_path), "--result-filename", "w.json"))
    out = capsys.readouterr().out
    assert "warm-up request(s) failed" in out and "Serving Benchmark Result" in out
    saved = json.loads((tmp_path / "w.json").read_text())
    assert saved["completed"] == res["completed"] and saved["failed"] == res["failed"]
    assert res["completed"] + res["failed"] == 10 and res["completed"] > 0 < res["failed"]
    for n_in, n_out, err in zip(saved["input_lens"], saved["output_lens"], saved["errors"]):
        assert bool(err) == (n_out == 0)  # output lengths are drawn in [5, 8]
        if n_in + 8 <= MAX_MODEL_LEN:
            assert not err
        if n_in + 5 > MAX_MODEL_LEN:
            assert "HTTP 400" in err
    assert saved["total_output_tokens"] == sum(saved["output_lens"])


@pytest.mark.parametrize("backend", ["sglang", "lmdeploy", "scalellm"])
def test_atom_completion_backend_names_are_accepted(backend):
    args = bs.parse_args(["--model", "m", "--backend", backend, "--dataset-name", "random"])
    assert args.backend == backend
    assert ASYNC_REQUEST_FUNCS[backend] is async_request_openai_completions


def test_vllm_bench_serve_length_and_sampling_flags_reach_each_request(monkeypatch, tmp_path):
    """vLLM's `bench serve` spellings: --input-len/--output-len are the random ISL/OSL, and
    --temperature/--top-p/--top-k/--min-p are sent with every request (only when given)."""
    seen: list = []

    async def fake(inp, session, pbar=None):
        seen.append(inp)
        n = inp.output_len
        return RequestFuncOutput(success=True, ttft=0.01, latency=0.01 + 0.002 * (n - 1),
                                 output_tokens=n, itl=[0.002] * (n - 1),
                                 prompt_len=inp.prompt_len)

    monkeypatch.setitem(ASYNC_REQUEST_FUNCS, "vllm", fake)
    res = bs.main(["--model", "demo", "--port", "9", "--input-len", "12", "--output-len", "5",
                   "--num-prompts", "3", "--num-warmups", "0", "--disable-tqdm",
                   "--temperature", "0.7", "--top-p", "0.9", "--top-k", "4", "--min-p",
                   "0.05", "--percentile-metrics", "tpot"])
    assert [(i.prompt_len, i.output_len) for i in seen] == [(12, 5)] * 3
    assert all(i.extra_body == {"temperature": 0.7, "top_p": 0.9, "top_k": 4, "min_p": 0.05}
               for i in seen)
    assert res["total_input_tokens"] == 36 and res["total_output_tokens"] == 15
    assert res["mean_tpot_ms"] == pytest.approx(2.0)
    seen.clear()
    bs.main(["--model", "demo", "--port", "9", "--input-len", "4", "--output-len", "2",
             "--num-prompts", "1", "--num-warmups", "0", "--disable-tqdm"])
    assert seen[0].extra_body is None  # nothing given: the payload's greedy defaults


def test_hub_id_model_loads_the_tokenizer_from_the_hugging_face_cache(tmp_path):
    """The BF16 server is started with `--model moonshotai/Kimi-K2.5` (a hub id); the benchmark's
    `--model` names the same id and must find the same tokenizer (the cached snapshot, offline),
    as the server does, instead of failing to load one."""
    from tokenizer_fixtures import write_kimi_tokenizer

    snap = tmp_path / "models--acme--kimi-tiny" / "snapshots" / ("c" * 40)
    write_kimi_tokenizer(str(snap))
    (tmp_path / "models--acme--kimi-tiny" / "refs").mkdir()
    (tmp_path / "models--acme--kimi-tiny" / "refs" / "main").write_text("c" * 40)
    code = ("from atom_stream.benchmarks.datasets import get_tokenizer\n"
            "from atom_stream.tokenizer import load_tokenizer\n"
            "t = get_tokenizer('acme/kimi-tiny', trust_remote_code=True)\n"
            f"ref = load_tokenizer({str(snap)!r}, trust_remote_code=True)\n"
            "print(type(t).__name__, t.vocab_size == ref.vocab_size,"
            " t.encode('hello world') == ref.encode('hello world'))\n")
    env = offline_env(HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["KimiTokenizer", "True", "True"], r.stdout
