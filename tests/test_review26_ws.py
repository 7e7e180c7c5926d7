"""Session-26 review of /v1/ws: a client that sends and reads nothing (reading paused).

- While reading is paused (ws_max_requests finished requests' output waits unsent), the socket is
  still received from: a disconnect (the client's close frame) ends the connection and aborts
  its live requests at once (it waited for the client's own close timeout, e.g. 20 s), and a
  `cancel` frame is acted on at once; other frames are held in order (ReadAhead, bounded) and
  served once reading resumes.
- A peer that misses the keepalive pong while its socket's buffers are full is dropped and its
  requests aborted (uvicorn's close waited for the buffer to drain: the socket and its requests
  lived on).
- A text frame that is not valid UTF-8 gets an `error` frame (with its id) and the connection
  and its other requests go on, as for any malformed frame (uvicorn closed it with 1007 and
  logged an ERROR traceback).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from serving_helpers import running_server
from websockets.asyncio.client import connect

from atom_stream.server import websocket as wsmod
from atom_stream.server.ws_frames import ReadAhead
from atom_stream.server.ws_protocol import BatchingWebSocketProtocol

WS_LIMIT = 3
JSON = "atom-stream.v1.json"


def _gen(rid: str, max_tokens: int, **extra) -> dict:
    params = {"max_tokens": max_tokens, "ignore_eos": True, **extra}
    return {"type": "websocket.receive",
            "text": json.dumps({"type": "generate", "id": rid, "prompt": "read nothing",
                                "params": params})}


def _cancel(rid: str) -> dict:
    return {"type": "websocket.receive", "text": json.dumps({"type": "cancel", "id": rid})}


@pytest.fixture(scope="module")
def srv():
    with running_server({"max_model_len": 4096}, ws_max_requests=WS_LIMIT) as s:
        yield s


class _Stalled:
    """A connection driven in-process: `script` (called per receive) feeds it; its client reads
    nothing (every send waits for `unstall`); `sent` keeps what went out after."""

    def __init__(self, srv, script):
        self.unstall = asyncio.Event()
        self.sent: list[dict] = []
        self.fed = 0
        self.script = script
        self.conn = wsmod._Connection(srv.state, {"extensions": {}}, self.receive, self.send,
                                      binary=False)

    async def receive(self) -> dict:
        self.fed += 1
        return await self.script(self)

    async def send(self, message: dict) -> None:
        await self.unstall.wait()
        if message["type"] == "websocket.send":
            self.sent.append(json.loads(message["text"]))

    @property
    def paused(self) -> bool:
        return not self.conn.room.is_set()

    async def until_slot(self) -> None:
        """Until a live slot is free (a short request finished)."""
        while len(self.conn.live) >= WS_LIMIT:
            await asyncio.sleep(0.005)


async def _feed_until_paused(st: _Stalled) -> dict | None:
    """Frames 1..: the long request L, then short ones, each once a slot is free (no 429). The
    writer stalls on its first batch, so reading pauses once WS_LIMIT short requests' output
    waits, with L live. Then None (the caller's turn): only a receive made while paused gets
    the caller's frame (one that began before gets a no-op cancel)."""
    if st.fed == 1:
        return _gen("L", 3000)
    if st.paused:
        return None
    await st.until_slot()
    if st.paused:
        return _cancel("no-such-id")
    return _gen(f"s{st.fed}", 4)


async def _run(st: _Stalled, until, timeout: float = 20) -> bool:
    """Run the connection (its client still reading nothing) until `until()` holds (True) or
    `timeout` (False); then end it."""
    task = asyncio.create_task(st.conn.run())
    await _wait(until, timeout)
    ok = until()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return ok


async def _wait(until, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not until() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


def test_close_while_reading_is_paused_aborts_the_live_requests_at_once(srv):
    async def go() -> tuple[bool, float, list]:
        said_close = []

        async def script(st: _Stalled) -> dict:
            frame = await _feed_until_paused(st)
            if frame is not None:
                return frame
            lives.extend(st.conn.live.values())
            said_close.append(time.monotonic())
            return {"type": "websocket.disconnect", "code": 1000}

        lives: list = []
        st = _Stalled(srv, script)
        task = asyncio.create_task(st.conn.run())
        await _wait(task.done, 30)
        ended = task.done()
        took = time.monotonic() - said_close[0] if said_close else -1.0
        st.unstall.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return ended, took, [lv.id for lv in lives]

    ended, took, lives = srv.call(go(), timeout=60)
    assert ended and 0 <= took < 5, (ended, took)
    assert "L" in lives  # the long request was live when the client closed
    s = srv.wait_idle()
    assert (s["num_streams"], s["used_blocks"]) == (0, 0)


def test_cancel_while_reading_is_paused_is_acted_on(srv):
    async def go() -> object:
        async def script(st: _Stalled) -> dict:
            frame = await _feed_until_paused(st)
            if frame is not None:
                return frame
            if st.fed == marks.setdefault("cancel", st.fed):
                marks["live"] = st.conn.live["L"]
                return _cancel("L")
            await asyncio.Event().wait()  # nothing more from this client

        marks: dict = {}
        st = _Stalled(srv, script)
        await _run(st, lambda: "live" in marks and marks["live"].task.done())
        live = marks.get("live")
        return getattr(live.done, "finish_reason", None) if live is not None else None

    assert srv.call(go(), timeout=60) == "abort"
    assert srv.wait_idle()["num_streams"] == 0


def test_frames_read_while_paused_are_bounded_then_served_in_order(srv):
    """A flood of generate frames while paused: at most ReadAhead.MAX_FRAMES (+1) are read and
    none starts; once the client reads again every one is served, in order: the first
    WS_LIMIT run (done), the others get 429 (the live limit; nothing ends in between)."""

    async def go() -> tuple[int, int, list[str], dict]:
        async def script(st: _Stalled) -> dict:
            frame = await _feed_until_paused(st)
            if frame is not None:
                return frame
            marks.setdefault("first", st.fed)
            if st.fed == marks["first"]:
                return _cancel("L")  # acted on at once: L ends, its slot frees
            return _gen(f"f{st.fed - marks['first']:03d}", 1)

        marks: dict = {}
        st = _Stalled(srv, script)
        task = asyncio.create_task(st.conn.run())
        await _wait(lambda: "first" in marks and not st.conn.live, 20)
        await asyncio.sleep(0.5)  # the flood has had time to run into the bound
        read, started = st.fed - marks.get("first", st.fed), len(st.conn.live)
        held = [f"f{i:03d}" for i in range(1, read + 1)]
        st.unstall.set()

        def answered() -> dict:
            return {f["id"]: (f["type"], f.get("code")) for f in st.sent
                    if f["type"] in ("done", "error")}
        await _wait(lambda: set(held) <= set(answered()), 20)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return read, started, held, answered()

    read, started, held, answered = srv.call(go(), timeout=60)
    assert 0 < read <= ReadAhead.MAX_FRAMES + 1 and started == 0, (read, started)
    assert [answered.get(i) for i in held] == (
        [("done", None)] * WS_LIMIT + [("error", 429)] * (len(held) - WS_LIMIT))
    assert srv.wait_idle()["num_streams"] == 0


def test_peer_that_misses_the_keepalive_is_dropped(monkeypatch):
    """A client that reads nothing (its socket buffers full) misses the pong: the server
    drops it and aborts its requests, instead of keeping both for as long as the client
    keeps the TCP connection open."""
    monkeypatch.setattr(BatchingWebSocketProtocol, "KEEPALIVE_ABORT_S", 0.5)
    with running_server({"max_model_len": 4096}, ws_ping_interval=0.5,
                        ws_ping_timeout=0.5) as srv:
        async def held() -> int:
            return len([p for p in srv.server.server_state.connections
                        if isinstance(p, BatchingWebSocketProtocol)])

        async def shrink() -> None:  # the server's socket buffer fills at once
            for p in srv.server.server_state.connections:
                if isinstance(p, BatchingWebSocketProtocol):
                    p.transport.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                    p.transport.set_write_buffer_limits(high=4096)

        async def go() -> tuple[int, dict, int]:
            async with connect(srv.ws_url, subprotocols=[JSON], max_queue=1,
                               ping_interval=None, close_timeout=1) as ws:
                ws.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                srv.call(shrink())
                await ws.send(_gen("long", 4000, logprobs=20)["text"])
                deadline = time.monotonic() + 10
                while srv.call(held()) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                return srv.call(held()), srv.wait_idle(5), int(time.monotonic() > deadline)

        n, stats, timed_out = asyncio.run(go())
    assert (n, timed_out) == (0, 0)
    assert (stats["num_streams"], stats["used_blocks"]) == (0, 0)


async def test_text_frame_that_is_not_utf8_gets_an_error_frame(srv):
    async with connect(srv.ws_url, subprotocols=[JSON]) as ws:
        await ws.send(_gen("before", 40)["text"])
        await ws.send(b'{"type": "generate", "id": "bad\xc3", "prompt": "\xff"}', text=True)
        await ws.send(b'{"type": "generate", "id": "bad2", "prompt": "\xc3\x28"}', text=True)
        await ws.send(_gen("after", 3)["text"])
        finals: dict[str, dict] = {}
        while len(finals) < 4:
            f = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if f["type"] != "delta":
                finals[f["id"]] = f
    assert finals[None]["code"] == 400  # no valid id in the first one (it is not UTF-8)
    assert (finals["bad2"]["type"], finals["bad2"]["code"]) == ("error", 400)
    assert finals["before"]["finish_reason"] == "length"
    assert finals["after"]["usage"]["completion_tokens"] == 3


async def test_params_null_is_the_defaults(srv):
    """`"params": null` (JSON clients that send every key) is read as omitted params."""
    async with connect(srv.ws_url, subprotocols=[JSON]) as ws:
        for rid, params in (("null", None), ("omitted", "-")):
            frame = {"type": "generate", "id": rid, "prompt": "null params", "extra": 1}
            if params != "-":
                frame["params"] = params
            await ws.send(json.dumps(frame))
        finals: dict[str, dict] = {}
        while len(finals) < 2:
            f = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if f["type"] != "delta":
                finals[f["id"]] = f
    assert finals["null"]["type"] == finals["omitted"]["type"] == "done", finals["null"]
    assert finals["null"]["usage"]["prompt_tokens"] == finals["omitted"]["usage"]["prompt_tokens"]


def test_logprobs_false_means_none_over_the_socket():
    """`"logprobs": false` in a generate frame's params is "off" (in-process, vLLM's
    SamplingParams reads False as 0, the sampled token's logprob)."""
    from atom_stream.server.ws_frames import sampling_kwargs
    kw = sampling_kwargs({"logprobs": False, "prompt_logprobs": False, "max_tokens": 3}, {})
    assert "logprobs" not in kw and "prompt_logprobs" not in kw and kw["max_tokens"] == 3
    assert sampling_kwargs({"logprobs": 2}, {})["logprobs"] == 2
