"""The serving benchmark: ATOM's command line against a live demo server, vLLM's metric maths,
ATOM's random dataset, the WebSocket backend's parity with SSE, failure counting, and plot.py.

Live tests share one real server (`python -m atom_stream.entrypoints.openai_server`, demo model,
CPU) for the module; the command line of the usage guide runs in a subprocess exactly as written
(small ISL/OSL), the rest call `main(argv)` in process.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from live_server import REPO, free_port, live_server, offline_env

from atom_stream.benchmarks import benchmark_serving as bs
from atom_stream.benchmarks.backend_request_func import RequestFuncOutput
from atom_stream.benchmarks.datasets import SampleRequest, sample_random_requests

ISL, OSL, RATIO, N, CONC = 32, 16, 0.8, 8, 4
PCT_KEYS = [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
            for s in ("mean", "median", "std", "p99")]
TOP_KEYS = ["date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate",
            "burstiness", "max_concurrency", "duration", "completed", "total_input_tokens",
            "total_output_tokens", "request_throughput", "request_goodput:", "request_goodput",
            "output_throughput", "total_token_throughput", "concurrency"]


def usage_guide_argv(model: str, base_url: str, result_dir: str, name: str) -> list[str]:
    """The usage guide's benchmark command, verbatim apart from the shell variables."""
    cmd = (f'--model={model} --backend=vllm --base-url={base_url} '
           f'--trust-remote-code --dataset-name=random '
           f'--random-input-len={ISL} --random-output-len={OSL} '
           f'--random-range-ratio {RATIO} '
           f'--num-prompts={CONC * 2} '
           f'--max-concurrency={CONC} '
           f'--request-rate=inf --ignore-eos '
           f'--save-result --result-dir={result_dir} --result-filename={name}.json '
           f'--percentile-metrics="ttft,tpot,itl,e2el"')
    return shlex.split(cmd)


class DemoTokenizer:
    """The demo tokenizer's shape (bytes 0..255, specials 256..319) for server-free tests."""

    vocab_size = 320
    all_special_ids = tuple(range(256, 320))

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# Without a server
# ---------------------------------------------------------------------------------------------


def test_parser_accepts_the_usage_guide_command_line_unchanged():
    args = bs.parse_args(usage_guide_argv("/models/Kimi-K2.5", "http://localhost:8000", "res",
                                          "r") + ["--metric-percentiles", "50,90,99.9"])
    assert (args.backend, args.dataset_name, args.random_range_ratio) == ("vllm", "random", 0.8)
    assert args.request_rate == float("inf") and args.ignore_eos and args.trust_remote_code
    assert args.percentile_metrics_list == ["ttft", "tpot", "itl", "e2el"]
    assert args.metric_percentiles_list == [50.0, 90.0, 99.9]
    assert (args.seed, args.num_warmups, args.burstiness) == (0, 1, 1.0)
    with pytest.raises(SystemExit):
        bs.parse_args(["--model", "m", "--percentile-metrics", "ttft,latency"])


def test_random_dataset_is_atoms_sampling_with_exact_token_ids():
    np.random.seed(7)
    reqs = sample_random_requests(prefix_len=0, input_len=40, output_len=20, num_prompts=64,
                                  range_ratio=0.8, tokenizer=DemoTokenizer(), verbose=False)
    # the same draws, made the way ATOM's sample_random_requests makes them
    np.random.seed(7)
    in_lens = np.random.randint(int(40 * 0.8), 40 + 1, size=64)
    out_lens = np.random.randint(int(20 * 0.8), 20 + 1, size=64)
    offsets = np.random.randint(0, 320, size=64)
    for i, r in enumerate(reqs):
        assert r.prompt_len == len(r.prompt_token_ids) == in_lens[i]
        assert r.expected_output_len == out_lens[i]
        assert r.prompt_token_ids[0] == (offsets[i] + i) % 256  # specials are skipped
        assert max(r.prompt_token_ids) < 256
    assert {r.prompt_len for r in reqs} <= set(range(32, 41))
    assert len({r.prompt_len for r in reqs}) > 3  # really random, not fixed


def test_calculate_metrics_follows_vllm():
    reqs = [SampleRequest("", [1] * 10, 10, 4), SampleRequest("", [1] * 20, 20, 4),
            SampleRequest("", [1] * 5, 5, 4)]
    outs = [
        RequestFuncOutput(success=True, ttft=0.1, latency=0.4, output_tokens=4,
                          itl=[0.1, 0.1, 0.1]),
        RequestFuncOutput(success=True, ttft=0.2, latency=0.2, output_tokens=1, itl=[]),
        RequestFuncOutput(success=False, error="boom"),
    ]
    m, lens = bs.calculate_metrics(reqs, outs, 2.0, DemoTokenizer(), ["ttft", "tpot"],
                                   [50.0, 99.0], {"ttft": 150.0})
    assert lens == [4, 1, 0]
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 5)
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(2.5)
    assert m["total_token_throughput"] == pytest.approx(17.5)
    assert m["concurrency"] == pytest.approx((0.4 + 0.2) / 2.0)
    assert m["request_goodput"] == pytest.approx(0.5)  # only the 100 ms TTFT meets 150 ms
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # (0.4-0.1)/3; 1-token output excluded
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["percentiles_ttft_ms"][0] == (50.0, pytest.approx(150.0))
    assert m["mean_itl_ms"] == pytest.approx(100.0)
    text, keys = bs.format_summary(m, 2.0, 4, ["ttft", "tpot"], goodput=True)
    assert text.splitlines()[0] == "============ Serving Benchmark Result ============"
    assert "Request goodput (req/s):" in text and "P99 TPOT (ms):" in text
    assert set(keys) == {f"{s}_{n}_ms" for n in ("ttft", "tpot")
                         for s in ("mean", "median", "std", "p50", "p99")}


def test_unreachable_server_counts_every_request_as_failed(tmp_path):
    port = free_port()  # nothing listens there
    for backend in ("vllm", "atom-ws"):
        with pytest.warns(UserWarning, match="All requests failed"):
            res = bs.main(["--model", "demo", "--backend", backend, "--port", str(port),
                           "--dataset-name", "random", "--random-input-len", "8",
                           "--random-output-len", "4", "--num-prompts", "3", "--num-warmups",
                           "0", "--disable-tqdm", "--save-result", "--save-detailed",
                           "--result-dir", str(tmp_path), "--result-filename", f"{backend}.json"])
        assert (res["completed"], res["failed"], res["total_output_tokens"]) == (0, 3, 0)
        saved = json.loads((tmp_path / f"{backend}.json").read_text())
        assert all(saved["errors"]) and saved["output_lens"] == [0, 0, 0]


def test_plot_writes_a_png_with_both_transports(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import plot

    paths = []
    for backend, scale in (("vllm", 1.0), ("atom-ws", 1.1)):
        for c in (1, 4):
            r = {"backend": backend, "max_concurrency": c, "num_prompts": 10,
                 "output_throughput": 100.0 * c * scale}
            for k in ("ttft", "tpot", "itl"):
                r[f"median_{k}_ms"], r[f"p99_{k}_ms"] = 10.0 * c, 20.0 * c
            paths.append(tmp_path / f"{backend}-{c}.json")
            paths[-1].write_text(json.dumps(r))
    (tmp_path / "other.json").write_text("{}")
    series = plot.load_results([str(p) for p in paths] + [str(tmp_path / "other.json")])
    assert sorted(series) == ["SSE (vllm)", "WebSocket"]
    out = plot.main([*map(str, paths), "-o", str(tmp_path / "fig.png")])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Against the real server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with live_server() as (url, model):
        yield url, model


def test_usage_guide_command_line_against_live_server(server, tmp_path):
    url, model = server
    argv = usage_guide_argv(model, url, str(tmp_path), "guide")
    proc = subprocess.run([sys.executable, "-m", "atom_stream.benchmarks.benchmark_serving",
                           *argv], check=False, cwd=REPO, env=offline_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "============ Serving Benchmark Result ============" in proc.stdout
    res = json.loads((tmp_path / "guide.json").read_text())
    for key in TOP_KEYS + PCT_KEYS:
        assert key in res, key
    n = CONC * 2
    assert (res["completed"], res["num_prompts"], res["max_concurrency"]) == (n, n, CONC)
    assert res["backend"] == "vllm" and res["request_rate"] == "inf"
    assert n * int(ISL * RATIO) <= res["total_input_tokens"] <= n * ISL
    assert n * int(OSL * RATIO) <= res["total_output_tokens"] <= n * OSL
    assert res["p99_e2el_ms"] >= res["median_e2el_ms"] > res["median_ttft_ms"] > 0
    assert res["mean_tpot_ms"] > 0 and res["mean_itl_ms"] > 0
    assert "input_lens" not in res  # only with --save-detailed


def _run(url: str, model: str, backend: str, out_dir, *extra: str) -> dict:
    bs.main(["--model", model, "--backend", backend, "--base-url", url,
             "--dataset-name", "random", "--random-input-len", str(ISL),
             "--random-output-len", str(OSL), "--random-range-ratio", str(RATIO),
             "--num-prompts", str(N), "--max-concurrency", str(CONC), "--ignore-eos",
             "--seed", "3", "--num-warmups", "0", "--disable-tqdm", "--save-result",
             "--save-detailed", "--metric-percentiles", "50,99",
             "--result-dir", str(out_dir), "--result-filename", f"{backend}.json", *extra])
    return json.loads((out_dir / f"{backend}.json").read_text())


def test_websocket_backend_matches_sse_token_counts(server, tmp_path):
    url, model = server
    sse = _run(url, model, "vllm", tmp_path)
    ws = _run(url, model, "atom-ws", tmp_path)
    wsm = _run(url, model, "atom-ws", tmp_path / "mp", "--ws-encoding", "msgpack",
               "--ws-connections", "1")
    for res in (sse, ws, wsm):
        assert (res["completed"], res["failed"]) == (N, 0), res["errors"]
        assert all(int(ISL * RATIO) <= n <= ISL for n in res["input_lens"])
        assert all(int(OSL * RATIO) <= n <= OSL for n in res["output_lens"])
        # the server counted exactly the prompt ids we sent (input length exact in tokens)
        assert res["server_prompt_lens"] == res["input_lens"]
        assert all(len(itl) >= 1 for itl in res["itls"]) and "p50_itl_ms" in res
    for res in (ws, wsm):
        assert res["input_lens"] == sse["input_lens"]
        assert res["output_lens"] == sse["output_lens"]
        assert res["total_input_tokens"] == sse["total_input_tokens"]
        assert res["total_output_tokens"] == sse["total_output_tokens"]
