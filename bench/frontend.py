"""Front-end benchmark: delivered tokens/s and server CPU µs per delivered token through SSE and
the WebSocket protocol, at 1, 64 and 512 concurrent streams on the demo model (CPU).

    python bench/frontend.py [--concurrency 1 64 512] [--max-tokens 64] [--repeats 3]

Two server subprocesses (each with its own demo engine; idle when not measured) and this
process as the load generator. Modes:
- `engine`: no network per token; the bare server's `POST /engine_only` runs N concurrent
  consumers of `engine.generate()` in-process: the engine's own cost, subtracted below.
- `bare`:   a bare starlette app: one route, `StreamingResponse` over `engine.generate()`,
  encoding the same chunk dicts (role, content, finish, usage, [DONE]) per delta.
- `sse`:    atom-stream's server, POST /v1/chat/completions, stream + include_usage.
- `ws-json`, `ws-msgpack`: atom-stream's server, /v1/ws, all streams on one socket.
- `anthropic`, `responses` (not run unless named in --modes): atom-stream's server, POST
  /v1/messages / POST /v1/responses streamed (the same messages, 64 tokens).

Every mode streams the same chat request (64 ignore_eos tokens, greedy). Runs are interleaved
(repeat x concurrency x mode) so background load hits all modes alike; the median run (by loop
CPU per token) of `--repeats` is reported. CPU is read from /proc/<pid>/task/*/schedstat for the measured server:
`cpu` = all threads (loop + model step thread), `loop` = the event-loop thread only (front end +
scheduler + detokenizer). Servers run with OMP_NUM_THREADS=1 (see SERVER_ENV). `fe` = front-end
µs per token = loop µs/token minus the engine mode's loop µs/token at the same concurrency.
Delivered tokens are the `completion_tokens` of the usage chunk / `done` frame of every stream.
Writes bench/results/frontend.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
import uuid

import msgspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
MESSAGES = [{"role": "user", "content": "benchmark the front end"}]
ENGINE_KWARGS = {"model": "demo", "device": "cpu", "num_kv_blocks": 8192,
                 "max_num_seqs": 512, "max_num_batched_tokens": 16384}
REQUESTS = {1: 16, 64: 192, 512: 1024}  # requests per concurrency level (tokens = x max_tokens)
# one torch thread: on 2 cores (server + load generator) OpenMP spin-waiting on a contended core
# costs more than a second thread gains for this tiny model
SERVER_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- server side
def cpu_times(pid: int) -> tuple[float, float]:
    """(all threads, main/loop thread) CPU seconds of a process: the on-CPU nanoseconds of
    /proc/<pid>/task/<tid>/schedstat (ns resolution; /proc/<pid>/stat ticks are 10 ms)."""
    def read(tid: str) -> float:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                return int(f.read().split()[0]) / 1e9
        except (FileNotFoundError, ProcessLookupError):  # a thread that just exited
            return 0.0

    tids = os.listdir(f"/proc/{pid}/task")
    return sum(read(t) for t in tids), read(str(pid))


def bare_app(engine):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from atom_stream.sampling_params import SamplingParams

    enc = msgspec.json.encode

    async def chat(request: Request):
        body = await request.json()
        params = SamplingParams(max_tokens=body["max_tokens"], temperature=0, ignore_eos=True)
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), "demo"

        def chunk(choices, usage=None):
            d = {"id": rid, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return b"data: " + enc(d) + b"\n\n"

        async def stream():
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
            async for out in engine.generate(body["messages"], params):
                if out.finish_reason is None:
                    yield chunk([{"index": 0, "delta": {"content": out.text}, "logprobs": None,
                                  "finish_reason": None}])
                else:
                    u = out.usage
                    yield chunk([{"index": 0, "delta": {"content": out.text},
                                  "logprobs": None, "finish_reason": out.finish_reason,
                                  "stop_reason": out.stop_reason}])
                    yield chunk([], {"prompt_tokens": u.prompt_tokens,
                                     "total_tokens": u.total_tokens,
                                     "completion_tokens": u.completion_tokens})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def serve(mode: str, port: int) -> None:
    import uvicorn

    from atom_stream.config import EngineConfig
    from atom_stream.server.app import ServerConfig, build_app, uvicorn_config

    cfg = ServerConfig(port=port, log_level="warning", access_log=False, timeout_keep_alive=600)
    if mode == "ours":
        app = build_app(EngineConfig(**ENGINE_KWARGS), cfg)
    else:
        import contextlib

        from starlette.applications import Starlette

        from atom_stream.engine.async_engine import AsyncEngine

        @contextlib.asynccontextmanager
        async def lifespan(app):
            async with AsyncEngine(EngineConfig(**ENGINE_KWARGS)) as engine:
                app.router.routes.extend(bare_app(engine).router.routes)
                app.router.routes.extend(engine_only_app(engine).router.routes)
                yield

        app = Starlette(lifespan=lifespan)
    uvicorn.Server(uvicorn_config(app, cfg)).run()


def engine_only_app(engine):
    """POST /engine_only {"c", "n", "max_tokens"}: n requests, c in flight, consumed in-process
    (no network per token): the engine's own cost at that concurrency."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from atom_stream.sampling_params import SamplingParams

    async def run(request: Request):
        body = await request.json()
        params = SamplingParams(max_tokens=body["max_tokens"], temperature=0, ignore_eos=True)
        todo = list(range(body["n"]))

        async def worker() -> int:
            total = 0
            while todo:
                todo.pop()
                async for out in engine.generate(MESSAGES, params):
                    if out.finish_reason is not None:
                        total += out.usage.completion_tokens
            return total

        tokens = sum(await asyncio.gather(*(worker() for _ in range(body["c"]))))
        return JSONResponse({"tokens": tokens})

    return Starlette(routes=[Route("/engine_only", run, methods=["POST"])])


# ----------------------------------------------------------------------------- load side
async def run_level(c: int, n_requests: int, one, pid: int) -> dict:
    """Run n_requests with c in flight; returns tokens, wall time and server CPU."""
    queue = list(range(n_requests))

    async def worker() -> int:
        total = 0
        while queue:
            queue.pop()
            total += await one()
        return total

    cpu0, loop0 = cpu_times(pid)
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(worker() for _ in range(c))))
    wall = time.perf_counter() - t0
    cpu1, loop1 = cpu_times(pid)
    return {"concurrency": c, "requests": n_requests, "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "cpu_us_per_tok": (cpu1 - cpu0) / tokens * 1e6,
            "loop_us_per_tok": (loop1 - loop0) / tokens * 1e6,
            "cpu_util": (cpu1 - cpu0) / wall}


_USAGE = re.compile(rb'"completion_tokens":(\d+)')


# the SSE routes measured: path, the request's own fields, the last event's markers, its count
SSE_ROUTES = {
    "sse": (b"/v1/chat/completions", {"messages": MESSAGES, "max_tokens": None,
                                      "stream_options": {"include_usage": True}},
            (b"data: [DONE]",), _USAGE),
    "anthropic": (b"/v1/messages", {"messages": MESSAGES, "max_tokens": None},
                  (b"message_stop",), re.compile(rb'"output_tokens":(\d+)')),
    "responses": (b"/v1/responses", {"input": MESSAGES, "max_output_tokens": None},
                  (b"response.completed", b"response.incomplete"),
                  re.compile(rb'"output_tokens":(\d+)')),
}


class SSEClient:
    """Raw HTTP/1.1 keep-alive client (the client's CPU must not be the bottleneck); `route`:
    a key of SSE_ROUTES (chat completions, Anthropic's messages, OpenAI's responses)."""

    def __init__(self, port: int, max_tokens: int, route: str = "sse"):
        path, fields, self.marker, self.usage = SSE_ROUTES[route]
        fields = {k: (max_tokens if v is None else v) for k, v in fields.items()}
        body = msgspec.json.encode({"model": "demo", "temperature": 0, "ignore_eos": True,
                                    "stream": True, **fields})
        self.request = (b"POST %s HTTP/1.1\r\nhost: bench\r\n"
                        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
                        % (path, len(body)) + body)
        self.port = port
        self.conns: list = []

    async def one(self) -> int:
        if self.conns:
            reader, writer = self.conns.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(self.request)
        buf = bytearray()
        while not buf.endswith(b"\r\n0\r\n\r\n"):
            data = await reader.read(1 << 16)
            if not data:
                if buf:
                    raise ConnectionError("server closed the stream")
                writer.close()  # an idle keep-alive connection the server closed: reconnect
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(self.request)
                continue
            buf += data
        self.conns.append((reader, writer))
        tail = bytes(buf[-3000:])
        assert any(m in tail for m in self.marker), tail
        return int(self.usage.findall(tail)[-1])


class WSClient:
    """A lean raw WebSocket client (one socket, all streams multiplexed): it parses frame
    headers itself and decodes only `done` frames, so it costs about what the SSE client costs
    per token and does not starve the server of the second core."""

    def __init__(self, port: int, max_tokens: int, binary: bool):
        self.port = port
        self.binary = binary
        self.max_tokens = max_tokens
        self.pending: dict[str, asyncio.Future] = {}
        self.ids = iter(range(10 ** 9))
        self.encode = msgspec.msgpack.encode if binary else msgspec.json.encode
        self.decode = msgspec.msgpack.decode if binary else msgspec.json.decode
        self.done_prefix = b"\xa4type\xa4done" if binary else b'{"type":"done"'

    async def connect(self) -> None:
        proto = b"atom-stream.v1.msgpack" if self.binary else b"atom-stream.v1.json"
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: " + proto +
                          b"\r\n\r\n")
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.task = asyncio.ensure_future(self.read())

    def send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)  # client frames are masked; an all-zero key leaves the payload as is
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        self.writer.write(head + b"\x00\x00\x00\x00" + payload)

    async def read(self) -> None:
        buf = b""
        pending, prefix, plen = self.pending, self.done_prefix, len(self.done_prefix)
        start = 1 if self.binary else 0  # msgpack: skip the fixmap header byte
        while True:
            data = await self.reader.read(1 << 18)
            if not data:
                return
            buf += data
            i, end = 0, len(buf)
            while end - i >= 2:
                b1 = buf[i + 1] & 0x7F
                hdr = 2
                if b1 == 126:
                    if end - i < 4:
                        break
                    b1, hdr = int.from_bytes(buf[i + 2:i + 4], "big"), 4
                elif b1 == 127:
                    if end - i < 10:
                        break
                    b1, hdr = int.from_bytes(buf[i + 2:i + 10], "big"), 10
                if end - i < hdr + b1:
                    break
                opcode = buf[i] & 0x0F
                p0 = i + hdr
                if buf[p0 + start:p0 + start + plen] == prefix:
                    f = self.decode(buf[p0:p0 + b1])
                    pending.pop(f["id"]).set_result(f["usage"]["completion_tokens"])
                elif opcode == 9:
                    self.send_frame(10, buf[p0:p0 + b1])
                elif opcode == 8:
                    return
                i = p0 + b1
            buf = buf[i:]

    async def one(self) -> int:
        rid = str(next(self.ids))
        fut = self.pending[rid] = asyncio.get_running_loop().create_future()
        frame = {"type": "generate", "id": rid, "messages": MESSAGES,
                 "params": {"max_tokens": self.max_tokens, "temperature": 0,
                            "ignore_eos": True}}
        self.send_frame(2 if self.binary else 1, self.encode(frame))
        return await fut


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(mode: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--port", str(port)],
                            cwd=ROOT, env=SERVER_ENV)
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{mode} server did not start")
            time.sleep(0.2)


class EngineOnlyClient:
    def __init__(self, port: int, max_tokens: int):
        self.sse = SSEClient(port, max_tokens)
        self.max_tokens = max_tokens

    async def level(self, c: int, n: int) -> int:
        body = msgspec.json.encode({"c": c, "n": n, "max_tokens": self.max_tokens})
        reader, writer = await asyncio.open_connection("127.0.0.1", self.sse.port)
        writer.write(b"POST /engine_only HTTP/1.1\r\nhost: bench\r\ncontent-type: "
                     b"application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
                     % len(body) + body)
        raw = await reader.read()
        writer.close()
        return int(re.findall(rb'"tokens":(\d+)', raw)[-1])


async def measure(mode: str, client, c: int, pid: int) -> dict:
    if mode != "engine":
        return await run_level(c, REQUESTS[c], client.one, pid)
    cpu0, loop0 = cpu_times(pid)
    t0 = time.perf_counter()
    tokens = await client.level(c, REQUESTS[c])
    wall = time.perf_counter() - t0
    cpu1, loop1 = cpu_times(pid)
    return {"concurrency": c, "requests": REQUESTS[c], "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "cpu_us_per_tok": (cpu1 - cpu0) / tokens * 1e6,
            "loop_us_per_tok": (loop1 - loop0) / tokens * 1e6, "cpu_util": (cpu1 - cpu0) / wall}


async def bench(args: argparse.Namespace, servers: dict) -> dict[str, list]:
    """Every (repeat, concurrency, mode) in turn, so that background load hits every mode alike;
    per (mode, concurrency) the run with the median CPU per token is kept."""
    clients = {}
    for mode in args.modes:
        server = "bare" if mode in ("bare", "engine") else "ours"
        port = servers[server][1]
        if mode == "engine":
            clients[mode] = EngineOnlyClient(port, args.max_tokens)
        elif mode in ("bare", "sse"):
            clients[mode] = SSEClient(port, args.max_tokens)
        elif mode in SSE_ROUTES:
            clients[mode] = SSEClient(port, args.max_tokens, mode)
        else:
            clients[mode] = WSClient(port, args.max_tokens, binary=(mode == "ws-msgpack"))
            await clients[mode].connect()
        if mode != "engine":
            await asyncio.gather(*(clients[mode].one() for _ in range(64)))  # warm-up
    runs: dict[tuple[str, int], list] = {}
    for rep in range(args.repeats):
        for c in args.concurrency:
            for mode in args.modes:
                pid = servers["bare" if mode in ("bare", "engine") else "ours"][0].pid
                r = await measure(mode, clients[mode], c, pid)
                runs.setdefault((mode, c), []).append(r)
                print(f"  [{rep}] {mode:10s} c={c:3d}: {r['tok_s']:8.0f} tok/s  "
                      f"{r['cpu_us_per_tok']:8.1f} us/tok cpu  {r['loop_us_per_tok']:6.1f} "
                      "us/tok loop", flush=True)
    results: dict[str, list] = {}
    for mode in args.modes:
        for c in args.concurrency:
            rs = sorted(runs[(mode, c)], key=lambda x: x["loop_us_per_tok"])
            best = dict(rs[len(rs) // 2])
            best["repeats"] = len(rs)
            best["loop_us_per_tok_all"] = [round(x["loop_us_per_tok"], 1) for x in rs]
            results.setdefault(mode, []).append(best)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", choices=["ours", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["engine", "bare", "sse", "ws-json",
                                                    "ws-msgpack"])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "frontend.json"))
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.port)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    servers = {name: start_server(name) for name in ("ours", "bare")}
    try:
        results = asyncio.run(bench(args, servers))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    report(results, args)


def report(results: dict[str, list], args: argparse.Namespace) -> None:
    base = {x["concurrency"]: x for x in results.get("engine", [])}
    for rows in results.values():
        for x in rows:
            e = base.get(x["concurrency"])
            x["fe_us_per_tok"] = (x["loop_us_per_tok"] - e["loop_us_per_tok"]) if e else None
    print("\nmode        conc   tok/s   cpu us/tok  loop us/tok  front-end us/tok")
    for mode, rows in results.items():
        for x in rows:
            fe = x["fe_us_per_tok"]
            print(f"{mode:10s} {x['concurrency']:5d} {x['tok_s']:8.0f} {x['cpu_us_per_tok']:11.1f} "
                  f"{x['loop_us_per_tok']:12.1f} {'' if fe is None else f'{fe:16.1f}'}")
    ratios = {}
    for c in args.concurrency:
        row = {m: next((x for x in results.get(m, []) if x["concurrency"] == c), None)
               for m in ("bare", "sse", "ws-json", "ws-msgpack")}
        if row["sse"] and row["bare"]:
            ratios[f"sse_vs_bare_cpu_c{c}"] = row["sse"]["cpu_us_per_tok"] / row["bare"][
                "cpu_us_per_tok"]
            if row["bare"]["fe_us_per_tok"]:
                ratios[f"sse_vs_bare_fe_c{c}"] = row["sse"]["fe_us_per_tok"] / row["bare"][
                    "fe_us_per_tok"]
        for api in ("anthropic", "responses"):
            other = next((x for x in results.get(api, []) if x["concurrency"] == c), None)
            if row["sse"] and other and row["sse"]["fe_us_per_tok"]:
                ratios[f"{api}_vs_sse_fe_c{c}"] = (other["fe_us_per_tok"]
                                                   / row["sse"]["fe_us_per_tok"])
        for ws in ("ws-json", "ws-msgpack"):
            if row["sse"] and row[ws]:
                ratios[f"{ws}_tok_per_cpu_s_vs_sse_c{c}"] = row["sse"]["cpu_us_per_tok"] / row[
                    ws]["cpu_us_per_tok"]
                if row[ws]["fe_us_per_tok"]:
                    ratios[f"{ws}_fe_tok_per_cpu_s_vs_sse_c{c}"] = (
                        row["sse"]["fe_us_per_tok"] / row[ws]["fe_us_per_tok"])
    print("\n" + "\n".join(f"{k:42s} {v:6.2f}" for k, v in ratios.items()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": f"CPU {os.cpu_count()} cores "
                   f"({platform.processor() or platform.machine()})",
                   "command": "python bench/frontend.py " + " ".join(sys.argv[1:]),
                   "max_tokens": args.max_tokens, "engine": ENGINE_KWARGS,
                   "results": results, "ratios": ratios}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
