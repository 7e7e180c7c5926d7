"""Soak (issue 10): a bounded random mix of requests, aborts and disconnects against one server;
it must end with zero used KV blocks and every request accounted for, and (with --memory) with
no structure, object count or RSS that grows with the number of requests served.

    python bench/soak.py [--seconds 180] [--workers 32] [--seed 0] [--memory --phases 4]

The server is the real app + uvicorn (tests/serving_helpers.py: demo model, CPU, in a thread of
this process, so the engine's own counters can be read exactly), with tight limits
(--max-num-seqs 16, --max-waiting-requests 32) so refusals happen too, and vLLM's tool-call and
reasoning parsers on (kimi_k2). `--workers` client tasks loop until the time is up, each step
picking one of:
  sse-ok      streamed completion/chat, read to [DONE] (max_tokens 1..24)
  json-ok     non-streamed completion/chat
  sse-drop    streamed, the client disconnects after 0..3 chunks
  ws-mix      a socket (JSON or MessagePack) with 1..4 requests (ids reused across sockets, some
              with logprobs); some are cancelled, and the socket may be closed early (once every
              request on it got its first frame, so each one's admission is known)
  bad         an invalid body (400, never admitted)
  aux         /tokenize, /detokenize, /metrics or /v1/models
HTTP bodies vary: n=2, logprobs / top_logprobs, stop strings, tools with tool_choice "auto"
(parsed) or "none" (not parsed), echo, a fixed X-Request-Id header or a user `request_id`.
Accounting: every request the client sent is exactly one of completed / cancelled / dropped /
refused (429/503) / invalid (400) / failed (anything else, must be 0); the engine's finished-request
counter must grow by exactly the engine requests admitted (n per HTTP request), and at the end
used KV blocks, running, waiting and live streams are all 0. Writes bench/results/soak.json.

--memory: `--phases` phases of `--seconds` each; after each one the server is let go idle and
probed (`memory_probe`: the per-request structures of the engine and the front end, which must be
back to their idle sizes, and bounded caches against their bounds), RSS and the counts of objects
by type (`object_counts`) are taken, and the biggest growers against the previous phase are listed
(a leak grows every phase; the first phase is the warm-up). `LagTicker` records the event loop's
worst delay per phase (DESIGN: nothing blocks the event loop). Writes
bench/results/soak_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import random
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import httpx
import msgspec
from serving_helpers import running_server
from websockets.asyncio.client import connect

CHAT = [{"role": "user", "content": "hello there"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ENGINE_KWARGS = {"max_num_seqs": 16, "max_waiting_requests": 32, "max_model_len": 512}
SERVER_KWARGS = {"enable_auto_tool_choice": True, "tool_call_parser": "kimi_k2",
                 "reasoning_parser": "kimi_k2"}
# object types counted by object_counts (client objects of this process are left out)
COUNTED_MODULES = ("atom_stream", "uvicorn", "starlette", "websockets", "asyncio", "_asyncio",
                   "uvloop", "msgspec")


class Soak:
    def __init__(self, srv: Any, rng: random.Random):
        self.srv = srv
        self.rng = rng
        self.count: collections.Counter = collections.Counter()
        self.engine_admitted = 0  # engine requests admitted (n of each admitted HTTP request)

    def _body(self, stream: bool) -> tuple[str, dict, dict]:
        """(route, body, headers) of a random completion or chat request."""
        r = self.rng
        mt = r.randint(1, 24)
        headers = {"X-Request-Id": "soak-fixed-id"} if r.random() < 0.2 else {}
        if r.random() < 0.4:
            body = {"prompt": "x" * r.randint(1, 300), "max_tokens": mt, "stream": stream,
                    "ignore_eos": r.random() < 0.5}
            if r.random() < 0.3:
                body.update(logprobs=2, echo=r.random() < 0.5)
            if r.random() < 0.2:
                body["request_id"] = f"user-{r.randrange(4)}"  # reused by concurrent requests
            return "/v1/completions", body, headers
        body = {"messages": CHAT, "max_tokens": mt, "stream": stream}
        x = r.random()
        if x < 0.2:
            body.update(n=2, logprobs=True, top_logprobs=2)
        elif x < 0.4:
            body["stop"] = ["a", "e", "zz"]
        elif x < 0.55:
            body.update(tools=TOOLS, tool_choice="auto")  # parsed
        elif x < 0.65:
            body.update(tools=TOOLS, tool_choice="none")  # rendered, not parsed
        if stream and r.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
        return "/v1/chat/completions", body, headers

    def _status(self, status: int, n: int = 1) -> bool:
        """Count a non-200 answer; True when the request was admitted (200)."""
        if status == 200:
            self.engine_admitted += n
            return True
        self.count["refused" if status in (429, 503) else
                   "invalid" if status == 400 else f"failed-{status}"] += 1
        return False

    async def sse(self, client: httpx.AsyncClient, drop: bool) -> None:
        route, body, headers = self._body(stream=True)
        async with client.stream("POST", route, json=body, headers=headers) as resp:
            if not self._status(resp.status_code, body.get("n", 1)):
                await resp.aread()
                return
            left = self.rng.randint(0, 3) if drop else -1
            raw = b""
            async for chunk in resp.aiter_raw():
                raw += chunk
                if left == 0:
                    self.count["dropped"] += 1
                    return  # leaving the block closes the connection mid-stream
                left -= 1
        ok = raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw
        self.count["completed" if ok else "failed-stream"] += 1

    async def json_ok(self, client: httpx.AsyncClient) -> None:
        route, body, headers = self._body(stream=False)
        r = await client.post(route, json=body, headers=headers)
        if self._status(r.status_code, body.get("n", 1)):
            self.count["completed" if r.json()["choices"] else "failed-json"] += 1

    async def bad(self, client: httpx.AsyncClient) -> None:
        x = self.rng.random()
        if x < 0.4:
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
        elif x < 0.7:
            r = await client.post("/v1/chat/completions", content=b'{"messages": [',
                                  headers={"content-type": "application/json"})
        else:  # "auto" without tools
            r = await client.post("/v1/chat/completions",
                                  json={"messages": CHAT, "tool_choice": "auto"})
        self._status(r.status_code)

    async def aux(self, client: httpx.AsyncClient) -> None:
        x = self.rng.random()
        if x < 0.3:
            r = await client.post("/tokenize", json={"messages": CHAT})
        elif x < 0.5:
            r = await client.post("/detokenize", json={"tokens": [104, 105]})
        elif x < 0.8:
            r = await client.get("/metrics")
        else:
            r = await client.get("/v1/models")
        self.count["aux" if r.status_code == 200 else f"failed-aux{r.status_code}"] += 1

    async def ws_mix(self) -> None:
        n = self.rng.randint(1, 4)
        close_early = self.rng.random() < 0.4
        binary = self.rng.random() < 0.3
        proto = "atom-stream.v1.msgpack" if binary else "atom-stream.v1.json"
        enc = msgspec.msgpack.encode if binary else json.dumps
        dec = msgspec.msgpack.decode if binary else json.loads
        ids = [f"q{i}" for i in range(n)]  # the same ids on every socket
        cancel = {i for i in ids if self.rng.random() < 0.3}
        state: dict[str, str] = {}  # id -> "live" | final category
        async with connect(self.srv.ws_url, subprotocols=[proto]) as ws:
            for i in ids:
                params = {"max_tokens": self.rng.randint(1, 24), "ignore_eos": True}
                if self.rng.random() < 0.3:
                    params["logprobs"] = 2
                frame = {"type": "generate", "id": i, "params": params}
                frame.update({"messages": CHAT} if self.rng.random() < 0.5 else
                             {"prompt": "hello"})
                await ws.send(enc(frame))
            while len(state) < n or any(v == "live" for v in state.values()):
                f = dec(await asyncio.wait_for(ws.recv(), 60))
                i = f.get("id")
                if f["type"] == "delta":
                    if i not in state:
                        state[i] = "live"
                        self.engine_admitted += 1
                        if i in cancel:
                            await ws.send(enc({"type": "cancel", "id": i}))
                elif f["type"] == "done":
                    if i not in state:
                        self.engine_admitted += 1  # a done with no delta first (cancelled)
                    state[i] = "cancelled" if f["finish_reason"] == "abort" else "completed"
                else:
                    state[i] = ("refused" if f["code"] in (429, 503) else f"failed-ws{f['code']}")
                if close_early and len(state) == n:
                    break  # every request got its first frame: close with some still live
        for v in state.values():
            self.count["dropped" if v == "live" else v] += 1

    async def step(self, client: httpx.AsyncClient) -> None:
        x = self.rng.random()
        try:
            if x < 0.3:
                await self.sse(client, drop=False)
            elif x < 0.45:
                await self.json_ok(client)
            elif x < 0.6:
                await self.sse(client, drop=True)
            elif x < 0.85:
                await self.ws_mix()
            elif x < 0.92:
                await self.bad(client)
            else:
                await self.aux(client)
        except Exception as e:  # noqa: BLE001 - counted, never hidden
            self.count[f"failed-{type(e).__name__}"] += 1

    async def worker(self, client: httpx.AsyncClient, until: float, steps: int | None = None
                     ) -> None:
        """Run steps until `until` (monotonic), or `steps` of them when given."""
        done = 0
        while (time.monotonic() < until) if steps is None else done < steps:
            await self.step(client)
            done += 1


async def run_mix(srv: Any, soak: Soak, workers: int, *, seconds: float | None = None,
                  steps: int | None = None) -> None:
    """`workers` concurrent workers for `seconds`, or `steps` steps each."""
    until = time.monotonic() + (seconds or 0.0)
    limits = httpx.Limits(max_connections=workers * 2)
    async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits,
                                 trust_env=False) as client:
        await asyncio.gather(*(soak.worker(client, until, steps) for _ in range(workers)))


# ---------------------------------------------------------------------- memory probes
def _gauge_values(registry: Any) -> dict[str, float]:
    return {f"{s.name}{{{s.labels.get('interface', '')}}}": s.value
            for m in registry.collect() if m.type == "gauge" for s in m.samples}


def memory_probe(srv: Any) -> dict[str, Any]:
    """The sizes of every per-request structure of the engine and the front end (read on the
    serving loop). At idle all of them are 0, and the bounded caches are within their bounds."""
    async def read() -> dict[str, Any]:
        eng = srv.engine
        core = eng.core
        sched = core.scheduler
        bm = sched.bm
        rows = getattr(core.runner, "_block_rows", None)
        gauges = _gauge_values(srv.state.metrics.registry)
        return {
            "engine.slots": len(eng._slots), "engine.tokenizing": len(eng._tokenizing),
            "engine.reserved": eng._reserved, "engine.pending_aborts": len(eng._pending_aborts),
            "core.requests": len(core.requests), "scheduler.waiting": len(sched.waiting),
            "scheduler.running": len(sched.running), "blocks.used": bm.num_used,
            "blocks.cached": len(bm._cached), "blocks.hashed": len(bm._hash_to_block),
            "blocks.total": bm.num_blocks,
            "block_rows.entries": 0 if rows is None else len(rows.entries),
            "metrics.request_children": len(srv.state.metrics._children),
            "ws.connections": gauges.get("atom_stream:websocket_connections{}", 0.0),
            "streams.sse": gauges.get("atom_stream:streams_open{sse}", 0.0),
            "streams.websocket": gauges.get("atom_stream:streams_open{websocket}", 0.0),
            "loop.tasks": len(asyncio.all_tasks()),
        }
    return srv.call(read())


def idle_violations(probe: dict[str, Any]) -> list[str]:
    """The probe's entries that are not at their idle size (or past their bound)."""
    bad = [k for k in ("engine.slots", "engine.tokenizing", "engine.reserved",
                       "engine.pending_aborts", "core.requests", "scheduler.waiting",
                       "scheduler.running", "blocks.used", "ws.connections", "streams.sse",
                       "streams.websocket") if probe[k]]
    if probe["blocks.hashed"] > probe["blocks.total"]:
        bad.append("blocks.hashed")
    return bad


def flush_block_rows(srv: Any, steps: int = 40) -> None:
    """Run one request for `steps` (> BlockTableRows.SWEEP) decode steps: the runner's sweep
    then drops the rows of every finished sequence (it keeps the last SWEEP steps' rows until
    the next gather, so at idle their count depends on when traffic stopped)."""
    with httpx.Client(base_url=srv.url, timeout=120, trust_env=False) as c:
        c.post("/v1/completions", json={"prompt": "flush", "max_tokens": steps,
                                        "ignore_eos": True}).raise_for_status()
    srv.wait_idle(30)


def object_counts(modules: tuple[str, ...] = COUNTED_MODULES) -> collections.Counter:
    """Live objects by type, for types defined in `modules` (after a full collection)."""
    gc.collect()
    out: collections.Counter = collections.Counter()
    for o in gc.get_objects():
        t = type(o)
        mod = getattr(t, "__module__", None) or ""
        if isinstance(mod, str) and mod.split(".", 1)[0] in modules:
            out[f"{mod}.{t.__qualname__}"] += 1
    return out


def growers(before: collections.Counter, after: collections.Counter, top: int = 15
            ) -> list[tuple[str, int]]:
    diff = [(k, after[k] - before.get(k, 0)) for k in after]
    return sorted((d for d in diff if d[1] > 0), key=lambda d: -d[1])[:top]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class LagTicker:
    """A task on the serving loop that sleeps `period` s and records the worst extra delay:
    how long the loop was busy with something else (or starved of the GIL)."""

    def __init__(self, srv: Any, period: float = 0.005):
        self.period = period
        self.worst = 0.0
        self._task = asyncio.run_coroutine_threadsafe(self._tick(), srv.state.loop)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.period)
            self.worst = max(self.worst, loop.time() - t - self.period)

    def take(self) -> float:
        """The worst delay (ms) since the last take."""
        worst, self.worst = self.worst, 0.0
        return worst * 1000

    def stop(self) -> None:
        self._task.cancel()


# ---------------------------------------------------------------------- runs
async def soak(srv: Any, seconds: float, workers: int, seed: int) -> dict[str, Any]:
    s = Soak(srv, random.Random(seed))
    before = srv.stats()
    t0 = time.monotonic()
    await run_mix(srv, s, workers, seconds=seconds)
    wall = time.monotonic() - t0
    after = await asyncio.to_thread(srv.wait_idle, 30)
    finished = sum(after["finished"].values()) - sum(before["finished"].values())
    admitted = s.count["completed"] + s.count["cancelled"] + s.count["dropped"]
    failed = sum(v for k, v in s.count.items() if k.startswith("failed"))
    return {
        "seconds": wall, "workers": workers, "seed": seed, "requests": sum(s.count.values()),
        "by_outcome": dict(sorted(s.count.items())), "admitted": admitted,
        "engine_admitted": s.engine_admitted, "engine_finished": finished,
        "engine_finished_by_reason": {k: v - before["finished"].get(k, 0)
                                      for k, v in after["finished"].items()},
        "failed": failed, "used_blocks_after": after["used_blocks"],
        "running_after": after["num_running"], "waiting_after": after["num_waiting"],
        "streams_after": after["num_streams"], "engine_dead": after["is_dead"],
        "ok": (failed == 0 and finished == s.engine_admitted and after["used_blocks"] == 0
               and after["num_running"] == 0 and after["num_waiting"] == 0
               and after["num_streams"] == 0 and not after["is_dead"]),
    }


def memory_soak(srv: Any, phases: int, seconds: float, workers: int, seed: int
                ) -> dict[str, Any]:
    """Phase 0 warms up; every later phase must leave the probe idle and grow no object type
    by more than `slack` (a leak of one object per request grows by hundreds per phase)."""
    lag = LagTicker(srv)
    rows, prev = [], None
    try:
        for p in range(phases):
            r = asyncio.run(soak(srv, seconds, workers, seed + p))
            flush_block_rows(srv)
            probe = memory_probe(srv)
            counts = object_counts()
            rows.append({"phase": p, "requests": r["requests"], "ok": r["ok"],
                         "failed": r["failed"], "rss_mb": round(rss_mb(), 1),
                         "loop_lag_max_ms": round(lag.take(), 1), "probe": probe,
                         "not_idle": idle_violations(probe), "objects": sum(counts.values()),
                         "growers": growers(prev, counts) if prev is not None else []})
            print(json.dumps(rows[-1]), flush=True)
            prev = counts
    finally:
        lag.stop()
    slack = 50  # rows[0] has no growers: each later row's are against the phase before it
    return {"phases": rows, "ok": all(x["ok"] and not x["not_idle"] for x in rows) and all(
        g < slack for x in rows[1:] for _, g in x["growers"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action="store_true", help="phases with memory probes")
    p.add_argument("--phases", type=int, default=4)
    args = p.parse_args()
    with running_server(ENGINE_KWARGS, **SERVER_KWARGS) as srv:
        if args.memory:
            r = memory_soak(srv, args.phases, args.seconds, args.workers, args.seed)
        else:
            r = asyncio.run(soak(srv, args.seconds, args.workers, args.seed))
    print(json.dumps(r, indent=2))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    name = "soak_memory.json" if args.memory else "soak.json"
    with open(os.path.join(HERE, "results", name), "w") as f:
        json.dump(r, f, indent=2)
    sys.exit(0 if r["ok"] else 1)


if __name__ == "__main__":
    main()
