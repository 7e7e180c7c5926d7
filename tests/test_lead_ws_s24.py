"""WebSocket limits from the session-24 security review, on a live server: a client that floods
bad frames and reads nothing has at most _MAX_PENDING_ERRORS error frames queued (the server
stops reading it), and a refused handshake (401) logs no ERROR line."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest
from serving_helpers import running_server
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from atom_stream.server import websocket as wsmod

KEY = "sk-ws-s24"
JSON = "atom-stream.v1.json"


@pytest.fixture(scope="module")
def srv():
    with running_server({"max_model_len": 128}, api_keys=[KEY]) as s:
        yield s


def _connections() -> list:
    return [o for o in gc.get_objects() if isinstance(o, wsmod._Connection)]


def test_error_flood_without_reading_is_bounded(srv):
    async def flood() -> int:
        peak = 0
        hdr = {"Authorization": f"Bearer {KEY}"}
        async with connect(srv.ws_url, subprotocols=[JSON], additional_headers=hdr,
                           max_queue=1) as ws:
            async def send_forever() -> None:
                while True:
                    await ws.send("x" * 2000)  # malformed: one error frame each

            task = asyncio.create_task(send_forever())
            t_end = time.monotonic() + 3
            while time.monotonic() < t_end:
                await asyncio.sleep(0.05)
                peak = max([peak, *(len(c.errors) for c in _connections())])
            task.cancel()
            with pytest.raises((asyncio.CancelledError, Exception)):
                await task
        return peak

    peak = asyncio.run(flood())
    assert 0 < peak <= wsmod._MAX_PENDING_ERRORS
    assert srv.wait_idle()["num_streams"] == 0

    async def normal() -> dict:  # the server still serves on a new connection
        hdr = {"Authorization": f"Bearer {KEY}"}
        async with connect(srv.ws_url, subprotocols=[JSON], additional_headers=hdr) as ws:
            await ws.send('{"type": "generate", "id": "a", "prompt": "hi", '
                          '"params": {"max_tokens": 2}}')
            while True:
                import json
                f = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if f["type"] != "delta":
                    return f
    assert asyncio.run(normal())["type"] == "done"


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
