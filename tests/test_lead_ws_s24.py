"""WebSocket limits from the session-24 security review, on a live server: a client that floods
bad frames and reads nothing has at most ws_io.MAX_PENDING_ERRORS error frames queued (the
server stops reading it ReadAhead.MAX_FRAMES frames after that), and a refused handshake (401)
logs no ERROR line."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from serving_helpers import running_server
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from atom_stream.server import websocket as wsmod
from atom_stream.server.ws_frames import ReadAhead
from atom_stream.server.ws_io import MAX_PENDING_ERRORS

KEY = "sk-ws-s24"
JSON = "atom-stream.v1.json"


@pytest.fixture(scope="module")
def srv():
    with running_server({"max_model_len": 128}, api_keys=[KEY]) as s:
        yield s


def test_error_queue_is_bounded_while_the_writer_is_blocked(srv):
    """A client that sends bad frames and reads nothing: every send stalls, so the error frames
    queue up; at MAX_PENDING_ERRORS queued the connection holds at most ReadAhead.MAX_FRAMES
    more frames unprocessed, then stops reading (TCP then pushes back
    on the client) instead of queueing one per frame without end. At most one more batch sits
    in the stalled writer's send."""
    limit = MAX_PENDING_ERRORS

    async def go() -> tuple[int, int]:
        fed = 0

        async def receive() -> dict:
            nonlocal fed
            fed += 1
            if fed > 5 * limit:
                return {"type": "websocket.disconnect"}
            return {"type": "websocket.receive", "text": "x"}  # malformed: an error frame

        stalled = asyncio.Event()  # never set: the peer reads nothing

        async def send(message: dict) -> None:
            await stalled.wait()

        conn = wsmod._Connection(srv.state, {"extensions": {}}, receive, send, binary=False)
        task = asyncio.create_task(conn.run())
        # wait for the flood to reach the bound (seconds on a loaded 2-core CI host), then a
        # little longer: reading must have stopped there
        deadline = asyncio.get_running_loop().time() + 20
        while len(conn.errors) < limit - 1 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        out = (fed, len(conn.errors))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return out

    fed, queued = srv.call(go())
    assert queued <= limit and fed <= 2 * limit + 2 + ReadAhead.MAX_FRAMES, (fed, queued)
    assert queued >= limit - 1  # the flood did reach the bound


def test_error_flood_over_a_socket_leaves_the_server_serving(srv):
    async def flood_then_serve() -> dict:
        hdr = {"Authorization": f"Bearer {KEY}"}
        # close_timeout: the server's close reply waits behind error frames this client never
        # reads, so the client's own close handshake would wait out its default 10 s
        async with connect(srv.ws_url, subprotocols=[JSON], additional_headers=hdr,
                           max_queue=1, close_timeout=1) as ws:
            async def send_forever() -> None:
                while True:
                    await ws.send("x" * 2000)

            task = asyncio.create_task(send_forever())
            await asyncio.sleep(1.5)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with connect(srv.ws_url, subprotocols=[JSON], additional_headers=hdr) as ws:
            await ws.send('{"type": "generate", "id": "a", "prompt": "hi", '
                          '"params": {"max_tokens": 2}}')
            while True:
                f = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if f["type"] != "delta":
                    return f

    assert asyncio.run(flood_then_serve())["type"] == "done"
    assert srv.wait_idle()["num_streams"] == 0


def test_refused_handshake_logs_no_error(srv):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.ERROR)
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn", "atom_stream")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        async def refused() -> int:
            with pytest.raises(InvalidStatus) as e:
                async with connect(srv.ws_url, subprotocols=[JSON],
                                   additional_headers={"Authorization": "Bearer wrong"}):
                    pass
            return e.value.response.status_code
        assert asyncio.run(refused()) == 401
        time.sleep(0.3)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage()
                                                                    for r in records]
