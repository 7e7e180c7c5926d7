"""Review s23 of the serving benchmark (against ATOM's / vLLM's benchmark_serving) and of the
Kimi chat format (against K2.5's chat_template.jinja). Server-free, CPU, seconds.

Sources: ATOM atom/benchmarks/benchmark_serving.py (`--use-chat-template` in
sample_random_requests, the "Accept length:" / "Acceptance rate (%):" rows); vLLM
vllm/benchmarks/serve.py (the "Maximum request concurrency:" row only with max_concurrency, the
"Request rate configured (RPS):" row only for a finite rate).
"""

from __future__ import annotations

import numpy as np
import pytest

from atom_stream.benchmarks import benchmark_serving as bs
from atom_stream.benchmarks.datasets import encode, sample_random_requests
from atom_stream.tokenizer import load_tokenizer

USER = "<|im_user|>user<|im_middle|>"
GEN = "<|im_end|><|im_assistant|>assistant<|im_middle|>"


# ------------------------------------------------------------------ benchmark: --use-chat-template
def test_use_chat_template_flag_is_accepted():
    args = bs.parse_args(["--model", "demo", "--use-chat-template"])
    assert args.use_chat_template is True
    assert bs.parse_args(["--model", "demo"]).use_chat_template is False


@pytest.mark.parametrize("as_text", [True, False])
def test_use_chat_template_wraps_prompts_and_counts_the_template_in_isl(as_text):
    tok = load_tokenizer(None)  # demo: the template around "a" is 19 tokens -> 18 taken off
    chat_len = len(encode(tok, tok.apply_chat_template([{"role": "user", "content": "a"}]))) - 1
    assert chat_len == 18
    np.random.seed(0)
    reqs = sample_random_requests(prefix_len=0, input_len=40, output_len=8, num_prompts=6,
                                  range_ratio=1.0, tokenizer=tok, as_text=as_text,
                                  use_chat_template=True, verbose=False)
    for r in reqs:
        assert r.prompt.startswith(USER) and r.prompt.endswith(GEN)
        assert r.prompt_len == len(r.prompt_token_ids)
        assert r.prompt_token_ids[0] == 258 and r.prompt_token_ids[-1] == 261  # specials
    # ATOM: the content is drawn for ISL - 18 (same RNG calls), so each prompt is the plain
    # ISL-22 prompt plus the template's 18 tokens
    np.random.seed(0)
    plain = sample_random_requests(prefix_len=0, input_len=22, output_len=8, num_prompts=6,
                                   range_ratio=1.0, tokenizer=tok, as_text=as_text,
                                   verbose=False)
    assert [r.prompt_len for r in reqs] == [p.prompt_len + chat_len for p in plain]
    assert [r.prompt for r in reqs] == [USER + p.prompt + GEN for p in plain]
    pre, post = encode(tok, USER), encode(tok, GEN)
    for r, p in zip(reqs, plain):
        # text: the wrapped text re-encoded (ATOM); ids: the drawn ids sent as drawn
        content = r.prompt_token_ids[len(pre):len(r.prompt_token_ids) - len(post)]
        assert r.prompt_token_ids == (encode(tok, r.prompt) if as_text
                                      else pre + p.prompt_token_ids + post)
        assert content == (encode(tok, p.prompt) if as_text else p.prompt_token_ids)


# ------------------------------------------------------------------ benchmark: summary rows
METRICS = {"completed": 3, "failed": 1, "total_input_tokens": 30, "total_output_tokens": 12,
           "request_throughput": 1.0, "request_goodput": 0.5, "output_throughput": 4.0,
           "total_token_throughput": 14.0, "concurrency": 2.0,
           **{f"{k}_{n}_ms": 1.0 for k in ("mean", "median", "std")
              for n in ("ttft", "tpot", "itl", "e2el")},
           **{f"percentiles_{n}_ms": [(99.0, 2.0)] for n in ("ttft", "tpot", "itl", "e2el")}}


def summary_rows(text: str) -> dict[str, str]:
    return {line[:40].strip(): line[41:].strip() for line in text.splitlines()
            if len(line) > 41 and line[40] == " " and not line.startswith(("=", "-"))}


def test_summary_rows_follow_vllm_for_concurrency_and_rate():
    text, _ = bs.format_summary(METRICS, 3.0, None, ["ttft"], False)
    rows = summary_rows(text)
    assert "Maximum request concurrency:" not in rows  # vLLM: only with --max-concurrency
    assert "Request rate configured (RPS):" not in rows  # vLLM: only for a finite rate
    assert rows["Failed requests:"] == "1"
    text, _ = bs.format_summary(METRICS, 3.0, 4, ["ttft"], False, request_rate=20.0)
    rows = summary_rows(text)
    assert rows["Maximum request concurrency:"] == "4"
    assert rows["Request rate configured (RPS):"] == "20.00"
    order = [ln[:40].strip() for ln in text.splitlines()]
    assert order.index("Request rate configured (RPS):") < order.index("Benchmark duration (s):")


def test_summary_prints_atoms_speculative_decoding_rows():
    spec = {"enabled": True, "average_tokens_per_forward": 2.5, "acceptance_rate": 0.75}
    rows = summary_rows(bs.format_summary(METRICS, 3.0, 4, ["ttft"], False, spec=spec)[0])
    assert rows["Accept length:"] == "2.50"
    assert rows["Acceptance rate (%):"] == "75.00"
    rows = summary_rows(bs.format_summary(METRICS, 3.0, 4, ["ttft"], False)[0])
    assert "Accept length:" not in rows and "Acceptance rate (%):" not in rows
