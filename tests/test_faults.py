"""Fault tolerance through the real server (issue 10, "faults").

- 1,000 random client disconnects mid-stream (SSE and WebSocket, ~100 at a time, tiny outputs)
  leave zero used KV blocks and zero live streams.
- A client that never reads (WebSocket and SSE) does not slow the others, and what the server
  buffers for it stays bounded (its deltas merge: it gets fewer, larger frames).
- An exception injected into one model step fails only that step's requests; the engine
  recovers and serves the next request (health 200).
- SIGTERM on a subprocess server drains in-flight requests up to --shutdown-timeout, then the
  process exits cleanly with status 0 (lifespan shutdown complete; server/app.py turns uvicorn's
  re-raised SIGTERM into exit 0); a request longer than the timeout is cut off, not waited for.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest
from live_server import REPO, free_port, offline_env
from serving_helpers import running_server
from websockets.asyncio.client import connect as aconnect

JSON = "atom-stream.v1.json"


@pytest.fixture(scope="module")
def srv():
    with running_server({"max_model_len": 512, "max_num_seqs": 64}) as s:
        yield s


def test_thousand_random_disconnects_leave_zero_blocks(srv):
    rng = random.Random(10)
    body = {"prompt": "tell me a story", "max_tokens": 24, "ignore_eos": True, "stream": True}
    counts = {"sse": 0, "ws": 0}

    async def sse(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            n = rng.randint(0, 3)  # vanish after 0..3 chunks (0: before the first token)
            async for _ in resp.aiter_raw():
                if n == 0:
                    break
                n -= 1
        counts["sse"] += 1  # leaving the block closes the connection mid-stream

    async def ws() -> None:
        async with aconnect(srv.ws_url, subprotocols=[JSON]) as sock:
            for k in range(rng.randint(1, 3)):
                await sock.send(json.dumps({"type": "generate", "id": f"r{k}", "prompt": "hi",
                                            "params": {"max_tokens": 24, "ignore_eos": True}}))
            await sock.recv()
        counts["ws"] += 1

    async def main() -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as client:
            for _ in range(10):
                jobs = [sse(client) if rng.random() < 0.7 else ws() for _ in range(100)]
                await asyncio.gather(*jobs)

    asyncio.run(main())
    assert counts["sse"] + counts["ws"] == 1000
    s = srv.wait_idle(30)
    assert s["used_blocks"] == 0 and s["num_running"] == 0 and s["num_streams"] == 0, s
    assert not s["is_dead"]


def _timed_completion(url: str) -> float:
    t = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 16,
                                                  "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return time.monotonic() - t


def _stalled_socket(port: int, request: bytes) -> socket.socket:
    """A raw client with a tiny receive buffer that sends `request` and then reads nothing (the
    kernel cannot soak up the output, so the server has to hold or merge it)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def _ws_frame(payload: bytes) -> bytes:
    """One masked client text frame (RFC 6455; payload < 64 KiB)."""
    mask = os.urandom(4)
    head = bytes([0x81]) + (bytes([0x80 | len(payload)]) if len(payload) < 126
                            else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _drain(sock: socket.socket, until: bytes, count: int = 1) -> bytes:
    sock.settimeout(30)
    got = b""
    while got.count(until) < count and len(got) < 100 << 20:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    sock.close()
    return got


def test_reader_that_never_reads_does_not_slow_others(srv):
    base = sorted(_timed_completion(srv.url) for _ in range(3))[1]
    n_ws, tokens = 8, 300  # prompt 200 + 300 fits max_model_len 512
    params = {"max_tokens": tokens, "ignore_eos": True, "logprobs": 20}
    upgrade = (b"GET /v1/ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade"
               b"\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13"
               b"\r\nsec-websocket-protocol: atom-stream.v1.json\r\n\r\n")
    frames = b"".join(_ws_frame(json.dumps(
        {"type": "generate", "id": f"s{k}", "prompt": "x" * 200, "params": params}).encode())
        for k in range(n_ws))
    ws = _stalled_socket(srv.port, upgrade)
    ws.settimeout(10)
    assert ws.recv(4096).startswith(b"HTTP/1.1 101")  # the handshake answer only
    ws.sendall(frames)
    payload = json.dumps({"prompt": "x" * 200, "stream": True, **params}).encode()
    sse = _stalled_socket(srv.port, b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
                          b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                          % (len(payload), payload))
    time.sleep(0.5)
    during = sorted(_timed_completion(srv.url) for _ in range(3))[1]
    # the stalled clients' requests still finish in the engine (nothing waits for a reader)
    deadline = time.monotonic() + 90
    while srv.stats()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.stats()["num_running"] == 0
    # 9 stalled long requests share the batch; waiting on a reader would add whole seconds
    assert during < 4 * base + 1.0, (base, during)
    # bounded: the server holds at most uvicorn's write high-water mark (64 KiB) per socket
    # beyond what the kernel takes (tcp_wmem max, 4 MiB here); everything else waits merged in
    # the request's one output slot. ~1.4 MB of output fits the kernel here, so frame merging
    # itself is not visible in this test (see test_server_websocket's slow-reader test).
    got = _drain(ws, b'"type":"done"', n_ws)
    assert got.count(b'"completion_tokens":%d' % tokens) == n_ws, got[-500:]
    got = _drain(sse, b"data: [DONE]")
    assert b"data: [DONE]" in got and b'"completion_tokens"' not in got[:100]
    s = srv.wait_idle()
    assert s["used_blocks"] == 0 and s["num_streams"] == 0, s


def test_injected_step_exception_fails_only_that_step(srv):
    core = srv.engine.core
    real_execute, real_launch = core.execute, core.launch
    armed = threading.Event()

    def fault():
        if armed.is_set():
            armed.clear()
            raise RuntimeError("injected GPU fault")

    def flaky_execute(batch):  # the synchronous loop
        fault()
        return real_execute(batch)

    def flaky_launch(batch, prev=None):  # the async-scheduling loop
        fault()
        return real_launch(batch, prev)

    core.execute, core.launch = flaky_execute, flaky_launch
    try:
        # a long request runs first; the fault hits a step it is part of
        with httpx.Client(base_url=srv.url, timeout=60) as c, c.stream(
                "POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 200,
                                                 "ignore_eos": True, "stream": True}) as resp:
            assert resp.status_code == 200
            it = resp.iter_lines()
            next(it)
            armed.set()
            rest = "\n".join(it)
        assert '"error"' in rest and rest.rstrip().endswith("data: [DONE]"), rest[-300:]
        assert "Traceback" not in rest
        # the engine recovered: new requests succeed, health is 200
        assert _timed_completion(srv.url) > 0
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        core.execute, core.launch = real_execute, real_launch
    s = srv.wait_idle()
    assert s["used_blocks"] == 0 and not s["is_dead"], s


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-3000:]


def _start_subprocess_server(*args: str):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "atom_stream.cli", "serve", "--port",
                             str(port), *args], cwd=REPO, env=offline_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, _tail(log.name)
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log.name
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, _tail(log.name)
        time.sleep(0.2)


def test_sigterm_drains_then_exits(tmp_path):
    proc, url, log = _start_subprocess_server("--shutdown-timeout", "8", "--max-model-len",
                                              "4096", "--num-kv-blocks", "1024")
    results: dict[str, object] = {}
    started = {"short": threading.Event(), "long": threading.Event()}
    # the first request pays a one-off warm-up (seconds on CPU); keep it out of the drain window
    httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=120)

    def stream(name: str, max_tokens: int) -> None:
        chunks: list[str] = []
        try:
            with httpx.Client(timeout=60) as c, c.stream(
                    "POST", url + "/v1/completions", json={
                        "prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True,
                        "stream": True}) as r:
                for chunk in r.iter_text():
                    chunks.append(chunk)
                    started[name].set()
        except httpx.HTTPError:  # the long one is cut off by the shutdown
            chunks.append("<cut>")
        results[name] = "".join(chunks)

    try:
        # 12 tokens: the short one must finish inside the 8 s drain even on a loaded CI
        # machine (40 tokens once ran out of it beside a second test run: cut before [DONE])
        short = threading.Thread(target=stream, args=("short", 12))
        long = threading.Thread(target=stream, args=("long", 4000))
        short.start()
        long.start()
        # SIGTERM only once both are streaming (in flight, not still connecting)
        assert started["short"].wait(60) and started["long"].wait(60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=40)
        took = time.monotonic() - t0
        short.join(10)
        long.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with open(log) as f:
        text = f.read()
    # exit status 0 after a complete shutdown (server/app.py: not uvicorn's re-raised SIGTERM)
    assert rc == 0, (rc, text[-600:])
    assert "Application shutdown complete" in text and "Finished server process" in text
    # the short request was drained to completion, the long one was cut off at the timeout
    assert results["short"].endswith("data: [DONE]\n\n")
    assert '"finish_reason":"length"' in results["short"]
    assert '"finish_reason":"length"' not in results.get("long", "")
    assert took < 2 * 8 + 15, took  # uvicorn's graceful timeout, then the engine drain


def test_load_300_streams_admitted_up_to_limits_rest_refused():
    """The CI-sized version of bench/load.py: 300 concurrent streams (150 SSE, 150 WebSocket)
    against max_num_seqs 16 + max_waiting_requests 64: exactly the limits are admitted, the
    rest refused with 429/503 quickly, none hang or fail, and nothing is left in use."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from load import run_load

    with running_server({"max_num_seqs": 16, "max_waiting_requests": 64,
                         "max_model_len": 256}) as s:
        r = asyncio.run(run_load(s.url, 300, max_tokens=8, ws_per_socket=10, deadline=120))
        idle = s.wait_idle(30)
    a = r["all"]
    assert a["failed"] == 0 and a["hung"] == 0 and r["num_client_errors"] == 0, r
    assert a["admitted"] + a["refused"] == 300, r
    # a burst: every stream arrives before the first finishes, so admission == the limits
    assert 16 + 64 <= a["admitted"] < 300 and a["refused"] > 0, a
    assert set(a["statuses"]) <= {200, 429, 503}, a
    assert a["refusal_max_s"] < 30, a  # refused quickly, not after queueing
    assert a["tokens"] == 8 * a["admitted"]
    assert idle["used_blocks"] == 0 and idle["num_streams"] == 0, idle
    print(f"\n[load-300] admitted {a['admitted']} refused {a['refused']} "
          f"itl p99 {a['itl_p99_ms']:.1f} ms")
