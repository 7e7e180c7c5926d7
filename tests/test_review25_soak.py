"""Bounded memory under mixed traffic (DESIGN: "Memory is bounded everywhere"), on a live server.

Batches of bench/soak.py's mix (SSE and JSON chat/completions with n=2, logprobs, stop strings,
tool parsing on and off, user and header request ids, SSE disconnects, WebSocket requests with
cancels and early closes over JSON and MessagePack, 400s, /tokenize, /metrics ...) run against
one server; after each batch the server goes idle and every per-request structure of the engine
and the front end must be back to its idle size, and no object type of the server's packages may
grow from one batch to the next (a leak of one object per request grows by a batch's size).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random

import pytest
from serving_helpers import running_server

from atom_stream.server import websocket as wsmod

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_soak():
    path = os.path.join(os.path.dirname(HERE), "bench", "soak.py")
    spec = importlib.util.spec_from_file_location("bench_soak", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


soak = _load_soak()
WS_LIMIT = 4  # live requests per WebSocket connection (small: the bound is reached quickly)


@pytest.fixture(scope="module")
def srv():
    with running_server(soak.ENGINE_KWARGS, ws_max_requests=WS_LIMIT,
                        **soak.SERVER_KWARGS) as s:
        yield s


def _batch(srv, seed: int) -> dict:
    """One batch of the soak mix; the server then idle with its block rows swept."""
    s = soak.Soak(srv, random.Random(seed))
    before = sum(srv.stats()["finished"].values())
    asyncio.run(soak.run_mix(srv, s, workers=8, steps=8))
    after = srv.wait_idle(30)
    soak.flush_block_rows(srv)
    return {"count": s.count, "admitted": s.engine_admitted,
            "finished": sum(after["finished"].values()) - before}


def test_mixed_traffic_leaves_no_per_request_state_and_no_growing_objects(srv):
    _batch(srv, 0)  # warm-up: lazy caches, first compiles, pooled connections
    counts, probes = [], []
    for seed in (1, 2):
        b = _batch(srv, seed)
        failed = {k: v for k, v in b["count"].items() if k.startswith("failed")}
        assert not failed, b["count"]
        assert b["finished"] == b["admitted"], b  # every admitted engine request ended
        probes.append(soak.memory_probe(srv))
        counts.append(soak.object_counts())
    for probe in probes:
        assert not soak.idle_violations(probe), probe
        assert probe["block_rows.entries"] <= 1, probe  # swept: only the flush request's row
        assert probe["metrics.request_children"] <= 16, probe  # (route, status) pairs
    grown = [(k, n) for k, n in soak.growers(counts[0], counts[1]) if n > 8]
    assert not grown, grown


def test_ws_unsent_output_of_finished_requests_is_bounded(srv):
    """A client that keeps sending generate frames and reads nothing: every send stalls, and
    each finished request's output waits in the connection's outbox. Reading must pause once
    ws_max_requests outputs wait (as it does for error frames), so the outbox stays bounded
    instead of holding one finished request per frame read."""
    frames = 12 * WS_LIMIT

    async def go() -> tuple[int, int]:
        fed = 0
        stalled = asyncio.Event()  # never set: the peer reads nothing

        async def receive() -> dict:
            nonlocal fed
            if fed >= frames:
                await stalled.wait()
            while len(conn.live) >= WS_LIMIT:  # a client that keeps within the limit
                await asyncio.sleep(0.01)
            fed += 1
            return {"type": "websocket.receive",
                    "text": f'{{"type": "generate", "id": "g{fed}", "prompt": "hi", '
                            f'"params": {{"max_tokens": 1}}}}'}

        async def send(message: dict) -> None:
            await stalled.wait()

        conn = wsmod._Connection(srv.state, {"extensions": {}}, receive, send, binary=False)
        task = asyncio.create_task(conn.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        last, still = None, 0
        while loop.time() < deadline and fed < frames and len(conn.outbox) <= 2 * WS_LIMIT:
            await asyncio.sleep(0.05)
            now = (fed, len(conn.outbox))
            still, last = (still + 1 if now == last else 0), now
            if still >= 20 and not conn.live:  # 1 s without progress: reading has stopped
                break
        out = (fed, len(conn.outbox))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return out

    fed, queued = srv.call(go())
    assert queued <= 2 * WS_LIMIT + 1, (fed, queued)
    assert srv.wait_idle()["num_streams"] == 0
