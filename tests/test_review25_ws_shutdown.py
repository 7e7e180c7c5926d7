"""Graceful shutdown of /v1/ws sockets (server/ws_protocol.py: BatchingWebSocketProtocol.shutdown).

A real `atom_stream.cli serve` subprocess gets SIGTERM while one socket has requests in flight and
another is idle. Before the fix uvicorn closed both at once with 1012 and the live requests got no
last frame. Now: the idle socket closes at once with 1001; on the busy one a short request streams
to its `done` frame, a client `cancel` still ends with done/"abort", a new `generate` gets a 503
error frame, a request longer than --shutdown-timeout ends with a 503 error frame (as its SSE
twin ends with an error event), then the socket closes with 1001; the process exits 0.
Without run_server's deadline abort (a server from uvicorn_config alone) the socket's own drain
aborts its requests at the same deadline. Also: a refused handshake (no ASGI scope) no longer
raises AttributeError in handle_connect.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

import httpx
import uvicorn
from serving_helpers import running_server
from test_faults import _start_subprocess_server
from uvicorn.server import ServerState
from websockets.asyncio.client import connect

from atom_stream.server.ws_protocol import BatchingWebSocketProtocol

SHUTDOWN_TIMEOUT = 8.0  # the deadline abort fires 2 s before it (ws_protocol.shutdown_abort_delay)
SHORT = 10  # tokens: done inside the 6 s drain even at ~0.6 s a token (a loaded CPU)


def _gen(rid: str, max_tokens: int) -> str:
    return json.dumps({"type": "generate", "id": rid, "prompt": "hi",
                       "params": {"max_tokens": max_tokens, "ignore_eos": True}})


def _bad_handshake(port: int) -> bytes:
    """An upgrade request without Sec-WebSocket-Key: refused (400) before any ASGI scope."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
        return s.recv(4096)


async def _drive(proc, ws_url: str) -> dict:
    """SIGTERM with requests in flight; returns what each socket saw."""
    proto = ["atom-stream.v1.json"]
    async with connect(ws_url, subprotocols=proto) as busy, \
            connect(ws_url, subprotocols=proto) as idle:
        for rid, n in (("short", SHORT), ("long", 4000), ("cancelled", 4000)):
            await busy.send(_gen(rid, n))
        frames: list[dict] = []
        while {f["id"] for f in frames} != {"short", "long", "cancelled"}:
            frames.append(json.loads(await asyncio.wait_for(busy.recv(), 60)))
        assert all(f["type"] == "delta" for f in frames), frames
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(idle.wait_closed(), 5)
        idle_s = time.monotonic() - t0
        # the idle socket is closed, so the shutdown has begun: this one must be refused
        await busy.send(_gen("late", 4))
        await busy.send(json.dumps({"type": "cancel", "id": "cancelled"}))
        async for message in busy:  # ends without an exception only on a normal close
            frames.append(json.loads(message))
        return {"frames": frames, "idle_s": idle_s, "idle_code": idle.close_code,
                "busy_code": busy.close_code, "busy_reason": busy.close_reason,
                "drain_s": time.monotonic() - t0}


def test_sigterm_drains_websocket_requests_then_closes_1001():
    proc, url, log = _start_subprocess_server(
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--max-model-len", "4096",
        "--num-kv-blocks", "1024")
    try:
        httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=120)
        assert b" 400 " in _bad_handshake(int(url.rsplit(":", 1)[1]))
        seen = asyncio.run(_drive(proc, url.replace("http", "ws", 1) + "/v1/ws"))
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with open(log) as f:
        text = f.read()
    assert rc == 0, (rc, text[-600:])
    assert "Traceback" not in text and "Cancel " not in text, text[-2000:]
    assert seen["idle_code"] == 1001 and seen["idle_s"] < 2.0, seen
    assert seen["busy_code"] == 1001 and seen["busy_reason"] == "server shutting down", seen
    assert seen["drain_s"] < SHUTDOWN_TIMEOUT + 2, seen
    by_id: dict[str, list[dict]] = {}
    for f in seen["frames"]:
        by_id.setdefault(f["id"], []).append(f)
    short = by_id["short"]
    got = {k: sum(len(f.get("token_ids", ())) for f in v) for k, v in by_id.items()}
    assert short[-1]["type"] == "done" and short[-1]["finish_reason"] == "length", (
        short[-1], got, seen["drain_s"])  # an error here: < SHORT tokens in the drain window
    assert short[-1]["usage"]["completion_tokens"] == SHORT
    assert sum(len(f["token_ids"]) for f in short if f["type"] == "delta") == SHORT
    assert by_id["late"] == [{"type": "error", "id": "late", "code": 503,
                              "message": "server shutting down: no new requests are accepted"}]
    cancelled = by_id["cancelled"][-1]
    assert cancelled["type"] == "done" and cancelled["finish_reason"] == "abort", cancelled
    long = by_id["long"]
    assert [f["type"] for f in long[:-1]] == ["delta"] * (len(long) - 1)
    assert long[-1] == {"type": "error", "id": "long", "code": 503,
                        "message": "the request was aborted (server shutting down)"}, long[-1]
    assert sum(len(f["token_ids"]) for f in long[:-1]) > SHORT  # it streamed on during the drain


class _Transport:
    def __init__(self) -> None:
        self.out = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default=None):
        return default


def test_refused_handshake_gets_400_without_error():
    """handle_connect added its extensions to a scope a refused handshake never gets."""
    async def app(scope, receive, send):
        raise AssertionError("no app call for a refused handshake")

    async def main() -> _Transport:
        config = uvicorn.Config(app)
        config.load()
        proto = BatchingWebSocketProtocol(config, ServerState(), {})
        transport = _Transport()
        proto.connection_made(transport)
        proto.data_received(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n")
        proto.shutdown()  # uvicorn's shutdown on a refused socket: no error either
        return transport

    transport = asyncio.run(main())
    assert transport.out.startswith(b"HTTP/1.1 400 ") and transport.closed


def test_drain_aborts_at_deadline_without_run_server():
    """A server built by uvicorn_config alone (no _abort_before_deadline timer): the socket's
    drain aborts its request before uvicorn's graceful timeout, with the 503 error frame."""
    async def drive(srv) -> tuple[list[dict], int | None, float]:
        async with connect(srv.ws_url, subprotocols=["atom-stream.v1.json"]) as ws:
            await ws.send(_gen("endless", 4000))
            frames = [json.loads(await asyncio.wait_for(ws.recv(), 60))]
            t0 = time.monotonic()
            threading.Thread(target=srv.stop, daemon=True).start()
            async for message in ws:
                frames.append(json.loads(message))
            return frames, ws.close_code, time.monotonic() - t0

    with running_server({"max_model_len": 4096}, shutdown_timeout=2.0) as srv:
        frames, code, took = asyncio.run(drive(srv))
    assert frames[-1] == {"type": "error", "id": "endless", "code": 503,
                          "message": "the request was aborted (server shutting down)"}, frames[-1]
    assert code == 1001 and 1.0 < took < 2.0, (code, took)
