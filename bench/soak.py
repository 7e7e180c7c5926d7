"""Soak (issue 10): a bounded random mix of requests, aborts and disconnects against one server;
it must end with zero used KV blocks and every request accounted for.

    python bench/soak.py [--seconds 180] [--workers 32] [--seed 0]

The server is the real app + uvicorn (tests/serving_helpers.py: demo model, CPU, in a thread of
this process, so the engine's own counters can be read exactly), with tight limits
(--max-num-seqs 16, --max-waiting-requests 32) so refusals happen too. `--workers` client tasks
loop until the time is up, each step picking one of:
  sse-ok      streamed completion/chat, read to [DONE] (max_tokens 1..24)
  json-ok     non-streamed completion/chat
  sse-drop    streamed, the client disconnects after 0..3 chunks
  ws-mix      a socket with 1..4 requests; some are cancelled, and the socket may be closed early
              (once every request on it got its first frame, so each one's admission is known)
  bad         an invalid body (400, never admitted)
Accounting: every request the client sent is exactly one of completed / cancelled / dropped /
refused (429/503) / invalid (400) / failed (anything else, must be 0); the engine's finished-request
counter must grow by exactly completed + cancelled + dropped (the admitted ones), and at the end
used KV blocks, running, waiting and live streams are all 0. Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import httpx
from serving_helpers import running_server
from websockets.asyncio.client import connect

CHAT = [{"role": "user", "content": "hello there"}]


class Soak:
    def __init__(self, srv: Any, rng: random.Random):
        self.srv = srv
        self.rng = rng
        self.count: collections.Counter = collections.Counter()

    def _body(self, stream: bool) -> tuple[str, dict]:
        mt = self.rng.randint(1, 24)
        if self.rng.random() < 0.5:
            return "/v1/completions", {"prompt": "x" * self.rng.randint(1, 300),
                                       "max_tokens": mt, "stream": stream,
                                       "ignore_eos": self.rng.random() < 0.5}
        return "/v1/chat/completions", {"messages": CHAT, "max_tokens": mt, "stream": stream}

    def _status(self, status: int) -> bool:
        """Count a non-200 answer; True when the request was admitted (200)."""
        if status == 200:
            return True
        self.count["refused" if status in (429, 503) else
                   "invalid" if status == 400 else f"failed-{status}"] += 1
        return False

    async def sse(self, client: httpx.AsyncClient, drop: bool) -> None:
        route, body = self._body(stream=True)
        async with client.stream("POST", route, json=body) as resp:
            if not self._status(resp.status_code):
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
        route, body = self._body(stream=False)
        r = await client.post(route, json=body)
        if self._status(r.status_code):
            self.count["completed" if r.json()["choices"] else "failed-json"] += 1

    async def bad(self, client: httpx.AsyncClient) -> None:
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
        self._status(r.status_code)

    async def ws_mix(self) -> None:
        n = self.rng.randint(1, 4)
        close_early = self.rng.random() < 0.4
        ids = [f"q{i}" for i in range(n)]
        cancel = {i for i in ids if self.rng.random() < 0.3}
        state: dict[str, str] = {}  # id -> "live" | final category
        async with connect(self.srv.ws_url, subprotocols=["atom-stream.v1.json"]) as ws:
            for i in ids:
                await ws.send(json.dumps({"type": "generate", "id": i, "prompt": "hello",
                                          "params": {"max_tokens": self.rng.randint(1, 24),
                                                     "ignore_eos": True}}))
            while len(state) < n or any(v == "live" for v in state.values()):
                f = json.loads(await asyncio.wait_for(ws.recv(), 60))
                i = f.get("id")
                if f["type"] == "delta":
                    if i not in state:
                        state[i] = "live"
                        if i in cancel:
                            await ws.send(json.dumps({"type": "cancel", "id": i}))
                elif f["type"] == "done":
                    state[i] = "cancelled" if f["finish_reason"] == "abort" else "completed"
                else:
                    state[i] = ("refused" if f["code"] in (429, 503) else f"failed-ws{f['code']}")
                if close_early and len(state) == n:
                    break  # every request got its first frame: close with some still live
        for v in state.values():
            self.count["dropped" if v == "live" else v] += 1

    async def worker(self, client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            x = self.rng.random()
            try:
                if x < 0.35:
                    await self.sse(client, drop=False)
                elif x < 0.5:
                    await self.json_ok(client)
                elif x < 0.7:
                    await self.sse(client, drop=True)
                elif x < 0.95:
                    await self.ws_mix()
                else:
                    await self.bad(client)
            except Exception as e:  # noqa: BLE001 - counted, never hidden
                self.count[f"failed-{type(e).__name__}"] += 1


async def soak(srv: Any, seconds: float, workers: int, seed: int) -> dict[str, Any]:
    s = Soak(srv, random.Random(seed))
    before = srv.stats()
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=workers * 2)
    async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(s.worker(client, t0 + seconds) for _ in range(workers)))
    wall = time.monotonic() - t0
    after = await asyncio.to_thread(srv.wait_idle, 30)
    finished = sum(after["finished"].values()) - sum(before["finished"].values())
    admitted = s.count["completed"] + s.count["cancelled"] + s.count["dropped"]
    failed = sum(v for k, v in s.count.items() if k.startswith("failed"))
    return {
        "seconds": wall, "workers": workers, "seed": seed, "requests": sum(s.count.values()),
        "by_outcome": dict(sorted(s.count.items())), "admitted": admitted,
        "engine_finished": finished,
        "engine_finished_by_reason": {k: v - before["finished"].get(k, 0)
                                      for k, v in after["finished"].items()},
        "failed": failed, "used_blocks_after": after["used_blocks"],
        "running_after": after["num_running"], "waiting_after": after["num_waiting"],
        "streams_after": after["num_streams"], "engine_dead": after["is_dead"],
        "ok": (failed == 0 and finished == admitted and after["used_blocks"] == 0
               and after["num_running"] == 0 and after["num_waiting"] == 0
               and after["num_streams"] == 0 and not after["is_dead"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with running_server({"max_num_seqs": 16, "max_waiting_requests": 32,
                         "max_model_len": 512}) as srv:
        r = asyncio.run(soak(srv, args.seconds, args.workers, args.seed))
    print(json.dumps(r, indent=2))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "soak.json"), "w") as f:
        json.dump(r, f, indent=2)
    sys.exit(0 if r["ok"] else 1)


if __name__ == "__main__":
    main()
