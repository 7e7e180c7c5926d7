"""Serving benchmark, command-line compatible with ATOM's and vLLM's `benchmark_serving`.

    python -m atom_stream.benchmarks.benchmark_serving --model=<path|demo> --backend=vllm \
        --base-url=http://localhost:8000 --trust-remote-code --dataset-name=random \
        --random-input-len=1024 --random-output-len=1024 --random-range-ratio 0.8 \
        --num-prompts=640 --max-concurrency=64 --request-rate=inf --ignore-eos \
        --save-result --result-dir=res --result-filename=run.json \
        --percentile-metrics="ttft,tpot,itl,e2el"

As ATOM's script, it raises the open-file soft limit first (a socket per in-flight request) and
a failed warm-up request does not stop the run (the main run counts failures). vLLM's `bench
serve` spellings work too: `--input-len`/`--output-len` (random ISL/OSL), `--temperature`,
`--top-p`, `--top-k`, `--min-p` (sent with every request when given).

`--backend atom-ws` measures our WebSocket /v1/ws instead of SSE (see backend_request_func.py for
the protocol use and the connection policy). `main(argv=None)` is the entry point that
`atom-stream bench` delegates to.

Metrics are vLLM's `calculate_metrics` (ATOM copies it): per successful request
TTFT, TPOT = (E2EL - TTFT) / (output_len - 1) when output_len > 1, ITL = every inter-chunk gap,
E2EL; throughputs over the wall-clock duration of the main run (warm-up excluded);
concurrency = sum(E2EL) / duration. The result JSON has ATOM's keys (including its stray
"request_goodput:" key), plus "request_goodput" and "failed".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import warnings
from datetime import datetime
from typing import Any

import aiohttp
import numpy as np

from atom_stream.benchmarks.backend_request_func import (
    ASYNC_REQUEST_FUNCS,
    DEFAULT_ENDPOINTS,
    RequestFuncInput,
    RequestFuncOutput,
    Session,
)
from atom_stream.benchmarks.datasets import (
    SampleRequest,
    encode,
    get_tokenizer,
    sample_random_requests,
)
from atom_stream.entrypoints.limits import raise_fd_limit

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}
DETAILED_FIELDS = ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors",
                   "server_prompt_lens")


def calculate_metrics(requests: list[SampleRequest], outputs: list[RequestFuncOutput],
                      dur_s: float, tokenizer, percentile_metrics: list[str],
                      percentiles: list[float], goodput: dict[str, float]):
    """vLLM's calculate_metrics. Returns (metrics dict, per-request output lengths)."""
    actual_output_lens: list[int] = []
    total_input = completed = good = 0
    itls: list[float] = []
    tpots: list[float] = []
    all_tpots: list[float] = []
    ttfts: list[float] = []
    e2els: list[float] = []
    for req, out in zip(requests, outputs):
        if not out.success:
            actual_output_lens.append(0)
            continue
        output_len = out.output_tokens
        if output_len is None:  # no usage from the server: count tokens of the text
            output_len = len(encode(tokenizer, out.generated_text)) if out.generated_text else 0
        actual_output_lens.append(output_len)
        total_input += req.prompt_len
        tpot = 0.0
        if output_len > 1:
            tpot = (out.latency - out.ttft) / (output_len - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)  # output_len <= 1 counts as TPOT 0 for goodput
        itls += out.itl
        ttfts.append(out.ttft)
        e2els.append(out.latency)
        completed += 1

    if goodput:
        series = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
        slos = [(series[k], v / 1000.0) for k, v in goodput.items()]
        for i in range(completed):
            if all(values[i] <= slo for values, slo in slos):
                good += 1
    if completed == 0:
        warnings.warn("All requests failed. This is likely due to a misconfiguration "
                      "on the benchmark arguments.", stacklevel=2)

    total_output = sum(actual_output_lens)
    m: dict[str, Any] = {
        "completed": completed,
        "failed": len(outputs) - completed,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": completed / dur_s,
        "request_goodput": good / dur_s,
        "output_throughput": total_output / dur_s,
        "total_token_throughput": (total_input + total_output) / dur_s,
        "concurrency": sum(e2els) / dur_s,
    }
    data = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    for name, values in data.items():
        # `values or 0`: vLLM reports 0 for an empty series (e.g. TPOT when every output is 1)
        arr = values or 0
        m[f"mean_{name}_ms"] = float(np.mean(arr)) * 1000
        m[f"median_{name}_ms"] = float(np.median(arr)) * 1000
        m[f"std_{name}_ms"] = float(np.std(arr)) * 1000
        m[f"percentiles_{name}_ms"] = [(p, float(np.percentile(arr, p)) * 1000)
                                       for p in percentiles]
    return m, actual_output_lens


def percentile_key(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def format_summary(m: dict[str, Any], duration: float, max_concurrency: int | None,
                   percentile_metrics: list[str], goodput: bool,
                   request_rate: float = float("inf"),
                   spec: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """vLLM/ATOM's printed table; also returns the latency keys for the result JSON.
    Rows as vLLM's serve.py: "Failed requests:" always, "Maximum request concurrency:" only with
    --max-concurrency, "Request rate configured (RPS):" only for a finite --request-rate; then
    ATOM's "Concurrency:" and, with speculative-decoding stats (`spec`, /debug/mtp_stats),
    "Accept length:" / "Acceptance rate (%):"."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value, fmt: str = "<10") -> None:
        lines.append(("{:<40} {:" + fmt + "}").format(label, value))

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    if request_rate != float("inf"):
        row("Request rate configured (RPS):", request_rate, "<10.2f")
    row("Benchmark duration (s):", duration, "<10.2f")
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"], "<10.2f")
    if goodput:
        row("Request goodput (req/s):", m["request_goodput"], "<10.2f")
    row("Output token throughput (tok/s):", m["output_throughput"], "<10.2f")
    row("Total Token throughput (tok/s):", m["total_token_throughput"], "<10.2f")
    row("Concurrency:", m["concurrency"], "<10.2f")
    accept_length = spec.get("average_tokens_per_forward") if spec else None
    acceptance_rate = spec.get("acceptance_rate") if spec else None
    if accept_length:  # ATOM prints these two as it does: truthy / not None
        row("Accept length:", accept_length, "<10.2f")
    if acceptance_rate is not None:
        row("Acceptance rate (%):", acceptance_rate * 100, "<10.2f")
    keys: dict[str, Any] = {}
    for name in PERCENTILE_METRICS:
        if name not in percentile_metrics:
            continue
        short, header = METRIC_TITLES[name]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", m[f"mean_{name}_ms"], "<10.2f")
        row(f"Median {short} (ms):", m[f"median_{name}_ms"], "<10.2f")
        for k in ("mean", "median", "std"):
            keys[f"{k}_{name}_ms"] = m[f"{k}_{name}_ms"]
        for p, value in m[f"percentiles_{name}_ms"]:
            row(f"P{percentile_key(p)} {short} (ms):", value, "<10.2f")
            keys[f"p{percentile_key(p)}_{name}_ms"] = value
    lines.append("=" * 50)
    return "\n".join(lines), keys


async def _mtp_stats(session: Session, base_url: str) -> dict | None:
    """ATOM reads speculative-decoding stats from /debug/mtp_stats; absent -> None."""
    try:
        async with session.http.get(f"{base_url}/debug/mtp_stats",
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
            stats = await resp.json() if resp.status == 200 else None
    except Exception:  # noqa: BLE001 - optional endpoint
        return None
    return stats if isinstance(stats, dict) and stats.get("enabled") else None


async def _arrivals(requests: list[SampleRequest], rate: float, burstiness: float):
    """Yields requests at `rate`/s: gamma(shape=burstiness) gaps (Poisson at 1); inf: at once."""
    if burstiness <= 0:
        raise ValueError(f"A positive burstiness factor is expected, but given {burstiness}.")
    theta = 1.0 / (rate * burstiness)
    for req in requests:
        yield req
        if rate == float("inf"):
            continue
        await asyncio.sleep(np.random.gamma(shape=burstiness, scale=theta))


async def benchmark(args: argparse.Namespace, *, api_url: str, base_url: str, tokenizer,
                    requests: list[SampleRequest], goodput: dict[str, float]) -> dict[str, Any]:
    from tqdm.asyncio import tqdm

    request_func = ASYNC_REQUEST_FUNCS[args.backend]
    max_conc = args.max_concurrency
    slots = max_conc or len(requests)
    session = Session(max_connections=max(slots, args.num_warmups, 1),
                      ws_connections=args.ws_connections or max_conc or 1,
                      ws_encoding=args.ws_encoding)
    send_ids = args.backend != "openai-chat" and not args.prompt_as_text
    sampling = sampling_overrides(args)

    def make_input(req: SampleRequest) -> RequestFuncInput:
        return RequestFuncInput(
            prompt=req.prompt_token_ids if send_ids else req.prompt, api_url=api_url,
            prompt_len=req.prompt_len, output_len=req.expected_output_len, model=args.model,
            model_name=args.served_model_name, best_of=args.best_of, logprobs=args.logprobs,
            ignore_eos=args.ignore_eos, extra_body=sampling or None)

    sem = asyncio.Semaphore(max_conc) if max_conc else None

    async def limited(inp: RequestFuncInput, pbar) -> RequestFuncOutput:
        if sem is None:
            return await request_func(inp, session, pbar)
        async with sem:
            return await request_func(inp, session, pbar)

    try:
        if args.num_warmups > 0:
            print(f"Warming up with {args.num_warmups} requests...")
            test_input = make_input(requests[0])
            warm = await asyncio.gather(*(limited(test_input, None)
                                          for _ in range(args.num_warmups)))
            _report_warmup(warm)
        if args.profile:
            (await session.http.post(f"{base_url}/start_profile")).release()
        distribution = "Poisson process" if args.burstiness == 1.0 else "Gamma distribution"
        print(f"Traffic request rate: {args.request_rate}")
        print(f"Burstiness factor: {args.burstiness} ({distribution})")
        print(f"Maximum request concurrency: {max_conc}")
        print("Starting main benchmark run...")
        pbar = None if args.disable_tqdm else tqdm(total=len(requests))
        start = time.perf_counter()
        tasks = []
        async for req in _arrivals(requests, args.request_rate, args.burstiness):
            tasks.append(asyncio.create_task(limited(make_input(req), pbar)))
        outputs: list[RequestFuncOutput] = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if pbar is not None:
            pbar.close()
        if args.profile:
            (await session.http.post(f"{base_url}/stop_profile")).release()
        spec = await _mtp_stats(session, base_url)
    finally:
        await session.aclose()

    m, output_lens = calculate_metrics(
        requests, outputs, duration, tokenizer, args.percentile_metrics_list,
        args.metric_percentiles_list, goodput)
    text, latency_keys = format_summary(m, duration, max_conc, args.percentile_metrics_list,
                                        bool(goodput), args.request_rate, spec)
    print(text)
    _report_failures_and_lengths(requests, outputs, send_ids)
    return {
        "duration": duration,
        "completed": m["completed"],
        "failed": m["failed"],
        "total_input_tokens": m["total_input_tokens"],
        "total_output_tokens": m["total_output_tokens"],
        "request_throughput": m["request_throughput"],
        "request_goodput:": m["request_goodput"] if goodput else None,  # ATOM's key, colon kept
        "request_goodput": m["request_goodput"] if goodput else None,
        "output_throughput": m["output_throughput"],
        "total_token_throughput": m["total_token_throughput"],
        "concurrency": m["concurrency"],
        "accept_length": spec.get("average_tokens_per_forward") if spec else None,
        "acceptance_rate": spec.get("acceptance_rate") if spec else None,
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": output_lens,
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
        "server_prompt_lens": [o.server_prompt_tokens for o in outputs],
        **latency_keys,
    }


def _report_warmup(warm: list[RequestFuncOutput]) -> None:
    """ATOM's warm-up never stops the run: a failed warm-up request (e.g. the first prompt is
    longer than the server's context) is reported and the main run goes on; its own failures
    are counted there."""
    failed = [o for o in warm if not o.success]
    if failed:
        print(f"WARNING: {len(failed)} of {len(warm)} warm-up request(s) failed; the main run "
              f"goes on. First error:\n{failed[0].error[:2000]}")
    print("Warmup completed.")


def _report_failures_and_lengths(requests, outputs, exact_ids: bool) -> None:
    errors = [o.error for o in outputs if not o.success]
    if errors:
        print(f"{len(errors)} request(s) failed; first error:\n{errors[0][:2000]}")
    if exact_ids:  # the server must count exactly the ids we sent
        bad = [(r.prompt_len, o.server_prompt_tokens) for r, o in zip(requests, outputs)
               if o.success and o.server_prompt_tokens not in (None, r.prompt_len)]
        if bad:
            print(f"WARNING: {len(bad)} request(s) where usage.prompt_tokens != prompt length "
                  f"sent (sent, server): {bad[:5]}")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags. As vLLM's benchmark (its FlexibleArgumentParser) every long flag
    is accepted in kebab-case and snake_case (`--random_input_len` == `--random-input-len`)."""
    from atom_stream.cli import FlexibleArgumentParser

    p = FlexibleArgumentParser(description="Benchmark the online serving throughput "
                                           "(ATOM/vLLM compatible; SSE and WebSocket).",
                               allow_abbrev=True)  # argparse's default, as before
    a = p.add_argument
    a("--backend", default="vllm", choices=list(ASYNC_REQUEST_FUNCS))
    a("--base-url", default=None, help="Server base URL (else http://HOST:PORT).")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a("--endpoint", default="/v1/completions",
      help="API path; openai-chat and atom-ws default to /v1/chat/completions and /v1/ws.")
    a("--dataset-name", default="random", choices=["random"])
    a("--dataset-path", default=None, help="Accepted for compatibility; unused (random only).")
    a("--max-concurrency", type=int, default=None)
    a("--model", required=True, help="Model path or served name ('demo' = embedded model).")
    a("--served-model-name", default=None, help="The 'model' field sent (default: --model).")
    a("--tokenizer", default=None, help="Tokenizer path (default: --model).")
    a("--tokenizer-mode", default="auto", help="Accepted for compatibility; unused.")
    a("--best-of", type=int, default=1)
    a("--num-prompts", type=int, default=1000)
    a("--logprobs", type=int, default=None)
    a("--request-rate", type=float, default=float("inf"))
    a("--burstiness", type=float, default=1.0)
    a("--seed", type=int, default=0)
    a("--trust-remote-code", action="store_true")
    a("--disable-tqdm", action="store_true")
    a("--profile", action="store_true", help="POST /start_profile and /stop_profile around it.")
    a("--save-result", action="store_true")
    a("--save-detailed", action="store_true",
      help="Keep per-request input_lens, output_lens, ttfts, itls, generated_texts, errors.")
    a("--metadata", metavar="KEY=VALUE", nargs="*")
    a("--result-dir", default=None)
    a("--result-filename", default=None)
    a("--ignore-eos", action="store_true")
    a("--percentile-metrics", default="ttft,tpot,itl")
    a("--metric-percentiles", default="99")
    a("--goodput", nargs="+", default=None, metavar="KEY:MS")
    a("--num-warmups", type=int, default=1)
    a("--random-input-len", "--input-len", type=int, default=1024,
      help="ISL (vLLM's `bench serve` spelling: --input-len).")
    a("--random-output-len", "--output-len", type=int, default=128,
      help="OSL (vLLM's `bench serve` spelling: --output-len).")
    a("--random-range-ratio", type=float, default=1.0)
    a("--random-prefix-len", type=int, default=0)
    a("--use-chat-template", action="store_true",
      help="Wrap each prompt in the chat template (one user turn + generation prompt); the "
           "template's tokens count towards --random-input-len (ATOM's flag).")
    a("--prompt-as-text", action="store_true",
      help="Send decoded text instead of token ids (ATOM's way; length may drift).")
    # vLLM's sampling flags: sent only when given; temperature stays 0 (greedy) otherwise
    a("--temperature", type=float, default=None)
    a("--top-p", type=float, default=None)
    a("--top-k", type=int, default=None)
    a("--min-p", type=float, default=None)
    a("--ws-connections", type=int, default=None,
      help="atom-ws: sockets in the pool (default: --max-concurrency, else 1 multiplexed).")
    a("--ws-encoding", default="json", choices=["json", "msgpack"])
    return p


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's --temperature/--top-p/--top-k/--min-p: the ones given, merged into each request
    (over the payload's temperature 0)."""
    names = ("temperature", "top_p", "top_k", "min_p")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for pair in pairs or []:
        try:
            name, value = pair.split(":")
            out[name] = float(value)
        except ValueError as e:
            raise SystemExit(f"--goodput: expected KEY:MS pairs, got {pair!r}") from e
        if name not in ("ttft", "tpot", "e2el") or out[name] < 0:
            raise SystemExit(f"--goodput: invalid SLO {pair!r} (ttft|tpot|e2el, ms >= 0)")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    metrics = [x.strip() for x in args.percentile_metrics.split(",") if x.strip()]
    unknown = [x for x in metrics if x not in PERCENTILE_METRICS]
    if unknown:
        parser.error(f"--percentile-metrics: unknown {unknown}; allowed {PERCENTILE_METRICS}")
    args.percentile_metrics_list = metrics
    try:
        args.metric_percentiles_list = [float(x) for x in args.metric_percentiles.split(",")]
    except ValueError:
        parser.error(f"--metric-percentiles: expected numbers, got {args.metric_percentiles!r}")
    if any(not 0 <= x <= 100 for x in args.metric_percentiles_list):
        parser.error("--metric-percentiles: each must be in [0, 100]")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be >= 1")
    if args.num_prompts < 1:
        parser.error("--num-prompts must be >= 1")
    return args


def _loop_factory():
    """uvloop when installed (the server uses it too): less client overhead per chunk."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (also written with --save-result)."""
    args = parse_args(argv)
    raise_fd_limit()  # one socket per in-flight request (ATOM's set_ulimit)
    print(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    goodput = _parse_goodput(args.goodput)
    endpoint = args.endpoint
    if endpoint == "/v1/completions" and args.backend in DEFAULT_ENDPOINTS:
        endpoint = DEFAULT_ENDPOINTS[args.backend]
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    api_url = base_url + endpoint
    if args.backend == "atom-ws":
        api_url = "ws" + api_url.removeprefix("http")  # http->ws, https->wss
    tokenizer_id = args.tokenizer if args.tokenizer is not None else args.model
    tokenizer = get_tokenizer(args.model, args.tokenizer,
                              trust_remote_code=args.trust_remote_code)
    requests = sample_random_requests(
        prefix_len=args.random_prefix_len, input_len=args.random_input_len,
        output_len=args.random_output_len, num_prompts=args.num_prompts,
        range_ratio=args.random_range_ratio, tokenizer=tokenizer,
        as_text=args.backend == "openai-chat" or args.prompt_as_text,
        use_chat_template=args.use_chat_template)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        result = runner.run(benchmark(args, api_url=api_url, base_url=base_url,
                                      tokenizer=tokenizer, requests=requests, goodput=goodput))
    if args.save_result:
        _save(args, result, tokenizer_id)
    return result


def _save(args: argparse.Namespace, result: dict[str, Any], tokenizer_id: str) -> str:
    now = datetime.now().strftime("%Y%m%d-%H%M%S")
    out: dict[str, Any] = {"date": now, "backend": args.backend, "model_id": args.model,
                           "tokenizer_id": tokenizer_id, "best_of": args.best_of,
                           "num_prompts": args.num_prompts}
    for item in args.metadata or []:
        if "=" not in item:
            raise SystemExit("Invalid metadata format. Please use KEY=VALUE format.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    out["request_rate"] = args.request_rate if args.request_rate < float("inf") else "inf"
    out["burstiness"] = args.burstiness
    out["max_concurrency"] = args.max_concurrency
    out.update(result)
    if not args.save_detailed:
        for name in DETAILED_FIELDS:
            out.pop(name, None)
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    base_model = args.model.rstrip("/").split("/")[-1]
    name = args.result_filename or (
        f"{args.backend}-{args.request_rate}qps{conc}-{base_model}-{now}.json")
    if args.result_dir:
        os.makedirs(args.result_dir, exist_ok=True)
        name = os.path.join(args.result_dir, name)
    with open(name, "w", encoding="utf-8") as f:
        json.dump(out, f)
    print(f"Saved results to {name}")
    return name


if __name__ == "__main__":
    main()
