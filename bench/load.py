"""Load benchmark (issue 10): thousands of concurrent SSE and WebSocket streams against a server
with bounded limits; admitted up to the limits, the rest refused quickly (429/503), none hang.

    python bench/load.py [--streams 2000] [--max-num-seqs 64] [--max-waiting-requests 256]
                         [--max-tokens 32] [--ws-per-socket 10] [--deadline 300]

Starts `python -m atom_stream.cli serve` (demo model, CPU) as a subprocess, then opens every
stream at once: half SSE (`POST /v1/completions`, stream, include_usage; one TCP connection
each, raw asyncio streams so the load generator stays cheap) and half WebSocket requests
(`--ws-per-socket` requests multiplexed per socket). Per stream: admitted (completed with usage),
refused (HTTP 429/503 or a 429/503 error frame; time to refusal), failed (anything else) or hung
(not finished by --deadline). Inter-token latency: gaps between successive content events of one
stream divided by the tokens they carried (merged deltas count per token). Server RSS is sampled
from /proc/<pid>/status (VmRSS) every 100 ms: idle, peak, and after the run.
Prints a table and writes bench/results/load.json. `run_load(url, ...)` is importable (the CI
test drives a smaller run through it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
REFUSED = (429, 503)


def rss_bytes(pid: int) -> int:
    try:  # psutil is not a dependency; /proc is enough on Linux
        import psutil  # type: ignore[import-not-found]

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    return 0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


class Result:
    __slots__ = ("gaps", "kind", "outcome", "status", "t_end", "tokens")

    def __init__(self, kind: str):
        self.kind = kind
        self.outcome = "hung"
        self.status = 0
        self.t_end = 0.0
        self.tokens = 0
        self.gaps: list[float] = []


async def sse_stream(host: str, port: int, body: bytes, res: Result, t0: float) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: %s\r\nconnection: close\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (host.encode(), len(body), body))
        status_line = await reader.readline()
        res.status = int(status_line.split()[1])
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if res.status != 200:
            await reader.read()
            res.outcome = "refused" if res.status in REFUSED else "failed"
            res.t_end = time.monotonic() - t0
            return
        last = None
        buf = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            now = time.monotonic()
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                at = event.find(b"data: ")
                if at < 0:
                    continue
                data = event[at + 6:]
                if data == b"[DONE]":
                    res.outcome = "admitted" if res.outcome == "usage" else "failed"
                    continue
                obj = json.loads(data)
                if obj.get("error"):
                    res.outcome = "failed"
                    continue
                if obj.get("usage"):
                    res.tokens = obj["usage"]["completion_tokens"]
                    res.outcome = "usage"
                for ch in obj.get("choices") or ():
                    if ch.get("text"):
                        if last is not None:
                            res.gaps.append(now - last)
                        last = now
        if res.outcome == "usage":
            res.outcome = "failed"
    finally:
        res.t_end = time.monotonic() - t0
        writer.close()


async def ws_socket(url: str, n: int, params: dict, results: list[Result], t0: float) -> None:
    from websockets.asyncio.client import connect

    pending = {f"r{i}": r for i, r in enumerate(results)}
    last: dict[str, float] = {}
    async with connect(url, subprotocols=["atom-stream.v1.json"], max_size=None,
                       open_timeout=120, ping_interval=None) as ws:
        for rid in pending:
            await ws.send(json.dumps({"type": "generate", "id": rid, "prompt": "hello there",
                                      "params": params}))
        while pending:
            f = json.loads(await ws.recv())
            now = time.monotonic()
            r = pending.get(f.get("id"))
            if r is None:
                continue
            if f["type"] == "delta":
                if f.get("token_ids"):
                    if f["id"] in last:
                        r.gaps.append((now - last[f["id"]]) / len(f["token_ids"]))
                    last[f["id"]] = now
                continue
            r.t_end = now - t0
            if f["type"] == "done":
                r.outcome = "admitted" if f["finish_reason"] == "length" else "failed"
                r.tokens = f["usage"]["completion_tokens"]
            else:
                r.status = f["code"]
                r.outcome = "refused" if f["code"] in REFUSED else "failed"
            del pending[f["id"]]


async def run_load(url: str, streams: int, *, max_tokens: int = 32, ws_per_socket: int = 10,
                   deadline: float = 300.0, pid: int | None = None) -> dict[str, Any]:
    """Open `streams` streams at once (half SSE, half WebSocket); returns the summary dict."""
    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    ws_url = f"ws://{host}:{port}/v1/ws"
    n_sse = streams // 2
    n_ws = streams - n_sse
    body = json.dumps({"prompt": "hello there", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    params = {"max_tokens": max_tokens, "ignore_eos": True}
    pid = pid or os.getpid()
    rss = {"idle": rss_bytes(pid), "peak": 0}
    sse_res = [Result("sse") for _ in range(n_sse)]
    ws_res = [Result("ws") for _ in range(n_ws)]
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            rss["peak"] = max(rss["peak"], rss_bytes(pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    jobs = [sse_stream(host, port, body, r, t0) for r in sse_res]
    jobs += [ws_socket(ws_url, len(ws_res[i:i + ws_per_socket]), params,
                       ws_res[i:i + ws_per_socket], t0)
             for i in range(0, n_ws, ws_per_socket)]
    tasks = [asyncio.create_task(j) for j in jobs]
    done, not_done = await asyncio.wait(tasks, timeout=deadline)
    for t in not_done:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    errors = [repr(t.exception()) for t in done if not t.cancelled() and t.exception()]
    wall = time.monotonic() - t0
    stop.set()
    await sampler
    await asyncio.sleep(1.0)
    rss["after"] = rss_bytes(pid)
    everything = sse_res + ws_res
    summary: dict[str, Any] = {"streams": streams, "max_tokens": max_tokens, "wall_s": wall,
                               "client_errors": errors[:5], "num_client_errors": len(errors)}
    for kind, rs in (("sse", sse_res), ("ws", ws_res), ("all", everything)):
        outcomes = {k: sum(r.outcome == k for r in rs) for k in
                    ("admitted", "refused", "failed", "hung")}
        gaps = [g for r in rs for g in r.gaps]
        refusal = [r.t_end for r in rs if r.outcome == "refused"]
        summary[kind] = {
            **outcomes, "statuses": sorted({r.status for r in rs if r.status}),
            "tokens": sum(r.tokens for r in rs if r.outcome == "admitted"),
            "itl_p50_ms": pct(gaps, 50) * 1e3, "itl_p99_ms": pct(gaps, 99) * 1e3,
            "refusal_p99_s": pct(refusal, 99), "refusal_max_s": max(refusal, default=0.0),
        }
    summary["rss_mib"] = {k: v / 2**20 for k, v in rss.items()}
    return summary


def print_table(s: dict[str, Any]) -> None:
    print(f"\n{s['streams']} streams x {s['max_tokens']} tokens, wall {s['wall_s']:.1f}s")
    hdr = (f"{'kind':5} {'admitted':>8} {'refused':>8} {'failed':>6} {'hung':>5} {'tokens':>7} "
           f"{'itl p50 ms':>10} {'itl p99 ms':>10} {'refuse p99 s':>12}")
    print(hdr)
    print("-" * len(hdr))
    for kind in ("sse", "ws", "all"):
        k = s[kind]
        print(f"{kind:5} {k['admitted']:>8} {k['refused']:>8} {k['failed']:>6} {k['hung']:>5} "
              f"{k['tokens']:>7} {k['itl_p50_ms']:>10.1f} {k['itl_p99_ms']:>10.1f} "
              f"{k['refusal_p99_s']:>12.3f}")
    r = s["rss_mib"]
    print(f"server RSS MiB: idle {r['idle']:.0f}, peak {r['peak']:.0f}, after {r['after']:.0f}")


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "atom_stream.cli", "serve", "--port", str(port),
           "--max-num-seqs", str(args.max_num_seqs), "--max-waiting-requests",
           str(args.max_waiting_requests), "--num-kv-blocks", "4096",
           "--disable-uvicorn-access-log", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    t = time.monotonic()
    while time.monotonic() - t < 180:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-waiting-requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ws-per-socket", type=int, default=10)
    p.add_argument("--deadline", type=float, default=300.0)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    proc, url = start_server(args)
    try:
        s = asyncio.run(run_load(url, args.streams, max_tokens=args.max_tokens,
                                 ws_per_socket=args.ws_per_socket, deadline=args.deadline,
                                 pid=proc.pid))
        import httpx

        stats_ok = httpx.get(url + "/health", timeout=10).status_code == 200
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(60)
    s["server_healthy_after"] = stats_ok
    s["kv_usage_after"] = next((float(line.split()[-1]) for line in metrics.splitlines()
                                if line.startswith("atom_stream:kv_cache_usage_perc")), None)
    s["limits"] = {"max_num_seqs": args.max_num_seqs,
                   "max_waiting_requests": args.max_waiting_requests}
    s["machine"] = f"CPU, {os.cpu_count()} cores ({platform.machine()})"
    print_table(s)
    print(f"healthy after: {stats_ok}, kv usage after: {s['kv_usage_after']}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "load.json"), "w") as f:
        json.dump(s, f, indent=2)


if __name__ == "__main__":
    main()
