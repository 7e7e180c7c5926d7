"""Session-23 review of /v1/ws and the Python SDK: each test reproduces one finding.

- The auth deadline (`ws_auth_timeout_s`) runs from the handshake: frames sent before the `auth`
  frame do not restart it (they did: one frame per timeout kept an unauthenticated socket open).
- An oversized frame's `error` frame carries the request id for every valid id: JSON ids with
  escapes (`"`, `\\`, `\\u00fc`), ids longer than 255 UTF-8 bytes (msgpack str16), not only plain
  ASCII ones (the error went out with id null and an SDK stream waited for ever).
- Unknown top-level fields of a client frame (`max_tokens` next to `prompt` instead of under
  `params`) get a 400 error frame naming the field, as unknown `params` keys do; they were
  silently ignored (the request ran with default parameters).
- SDK: after `close()` a request raises ConnectionClosedError instead of silently opening a
  new socket nobody closes; after a dropped connection the next request reconnects; `ws_url`
  maps `http://host:port/` and the OpenAI-style base `http://host:port/v1` to `.../v1/ws`.

Servers run on ports 8250-8299 (the review's port range).
"""

from __future__ import annotations

import asyncio
import json
import time

import msgspec
import pytest
import websockets
from atom_stream_client import AsyncClient, BadRequestError, ConnectionClosedError
from atom_stream_client.client import ws_url
from serving_helpers import running_server
from websockets.asyncio.client import connect

from atom_stream.server.ws_frames import sniff_id as _sniff_id

JSON, MSGPACK = "atom-stream.v1.json", "atom-stream.v1.msgpack"
FRAME_LIMIT = 16 << 10
AUTH_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def srv():
    with running_server(api_keys=["k-one"], ws_max_frame_bytes=FRAME_LIMIT,
                        ws_auth_timeout_s=AUTH_TIMEOUT) as s:
        yield s


AUTH = {"Authorization": "Bearer k-one"}


def _enc(proto: str, obj: dict) -> bytes | str:
    return msgspec.msgpack.encode(obj) if proto == MSGPACK else msgspec.json.encode(obj).decode()


def _dec(raw: bytes | str) -> dict:
    return msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else msgspec.json.decode(raw)


async def _until_final(ws, rid: str, timeout: float = 30) -> list[dict]:
    frames = []
    while True:
        f = _dec(await asyncio.wait_for(ws.recv(), timeout))
        frames.append(f)
        if f.get("id") == rid and f["type"] in ("done", "error"):
            return frames


# ----------------------------------------------------------------------------- auth deadline
async def test_auth_deadline_is_not_restarted_by_frames(srv):
    """No auth within ws_auth_timeout_s of the handshake closes (1008), however many frames
    the client sends meanwhile (each gets a 401 error frame)."""
    async with connect(srv.ws_url, subprotocols=[JSON]) as ws:
        start = time.monotonic()
        closed = None
        errors = 0
        while time.monotonic() - start < 4 * AUTH_TIMEOUT:
            try:
                await ws.send(_enc(JSON, {"type": "generate", "id": "x", "prompt": "hi"}))
                while True:  # read what is there for 0.3 s (less than the timeout)
                    f = _dec(await asyncio.wait_for(ws.recv(), 0.3))
                    errors += f["type"] == "error" and f["code"] == 401
            except TimeoutError:
                continue
            except websockets.exceptions.ConnectionClosed as e:
                closed = e
                break
        elapsed = time.monotonic() - start
    assert closed is not None, "the unauthenticated socket stayed open past the deadline"
    assert closed.rcvd is not None and closed.rcvd.code == 1008
    assert elapsed < AUTH_TIMEOUT + 1.0
    assert errors >= 1


# ----------------------------------------------------------------------------- oversized ids
ODD_IDS = ['q"uote', "back\\slash", "ü" * 200, "😀" * 256, "tab\there"]


def test_sniff_id_unit():
    for rid in ODD_IDS + ["plain", "i" * 256]:
        big = {"type": "generate", "id": rid, "prompt": "x" * 5000}
        assert _sniff_id(msgspec.json.encode(big)) == rid
        assert _sniff_id(msgspec.json.encode(big).decode()) == rid
        assert _sniff_id(msgspec.msgpack.encode(big)) == rid
        # ensure_ascii JSON (Python's json module): \\uXXXX escapes, surrogate pairs
        assert _sniff_id(json.dumps(big)) == rid
    assert _sniff_id(b'{"type":"generate","prompt":"' + b"x" * 5000 + b'","id":"late"}') is None
    assert _sniff_id('{"id": "bad\\escape"}') is None  # invalid JSON escape: no id


@pytest.mark.parametrize("proto", [JSON, MSGPACK])
async def test_oversized_frame_error_carries_odd_ids(srv, proto):
    async with connect(srv.ws_url, subprotocols=[proto], additional_headers=AUTH,
                       max_size=None) as ws:
        for rid in ODD_IDS:
            await ws.send(_enc(proto, {"type": "generate", "id": rid,
                                       "prompt": "x" * (FRAME_LIMIT + 10)}))
            f = _dec(await asyncio.wait_for(ws.recv(), 10))
            assert (f["type"], f["code"], f["id"]) == ("error", 413, rid)
        await ws.send(_enc(proto, {"type": "generate", "id": "after", "prompt": "hi",
                                   "params": {"max_tokens": 2}}))
        assert (await _until_final(ws, "after"))[-1]["type"] == "done"


async def test_sdk_oversized_frame_with_odd_id_raises(srv):
    """The SDK's stream gets its 413 instead of waiting for ever."""
    async with AsyncClient(srv.url, api_key="k-one", protocol="json") as client:
        with pytest.raises(BadRequestError) as e:
            await asyncio.wait_for(
                client.complete("x" * (FRAME_LIMIT + 10), id='q"1', max_tokens=1), 10)
        assert e.value.code == 413 and e.value.request_id == 'q"1'


# ----------------------------------------------------------------------------- unknown fields
@pytest.mark.parametrize("proto", [JSON, MSGPACK])
async def test_top_level_sampling_params_are_errors_other_fields_ignored(srv, proto):
    async with connect(srv.ws_url, subprotocols=[proto], additional_headers=AUTH) as ws:
        await ws.send(_enc(proto, {"type": "generate", "id": "t", "prompt": "hi", "model": "m",
                                   "max_tokens": 3, "temperature": 0}))
        f = _dec(await asyncio.wait_for(ws.recv(), 10))
        assert (f["type"], f["id"], f["code"]) == ("error", "t", 400)
        assert f["param"] in ("max_tokens", "temperature") and "params" in f["message"]
        # an unknown field that is no sampling parameter is ignored, on every frame type
        await ws.send(_enc(proto, {"type": "cancel", "id": "nothing-live", "why": 1}))
        await ws.send(_enc(proto, {"type": "generate", "id": "t", "prompt": "hi", "model": "m",
                                   "stream": True, "params": {"max_tokens": 3}}))
        frames = await _until_final(ws, "t")
        assert all(f["type"] != "error" for f in frames), frames
        assert frames[-1]["usage"]["completion_tokens"] == 3


# ----------------------------------------------------------------------------- SDK
def test_ws_url_forms():
    assert ws_url("http://h:1") == "ws://h:1/v1/ws"
    assert ws_url("http://h:1/") == "ws://h:1/v1/ws"
    assert ws_url("https://h:1/v1") == "wss://h:1/v1/ws"
    assert ws_url("http://h:1/v1/") == "ws://h:1/v1/ws"
    assert ws_url("ws://h:1/v1/ws") == "ws://h:1/v1/ws"
    assert ws_url("ws://h:1/custom/path") == "ws://h:1/custom/path"


async def test_sdk_closed_client_does_not_reconnect_silently(srv):
    client = AsyncClient(srv.url, api_key="k-one")
    async with client:
        assert (await client.complete("hi", max_tokens=1)).usage.completion_tokens == 1
    with pytest.raises(ConnectionClosedError):
        await client.complete("hi", max_tokens=1)
    assert client._ws is None and client._reader is None  # no socket was opened
    await client.connect()  # an explicit connect re-opens
    try:
        assert (await client.complete("hi", max_tokens=1)).finish_reason == "length"
    finally:
        await client.close()


async def test_sdk_reconnects_after_a_dropped_connection(srv):
    async with AsyncClient(srv.url, api_key="k-one") as client:
        stream = client.generate("go", max_tokens=400, ignore_eos=True)
        it = stream.__aiter__()
        await it.__anext__()
        first = client._ws
        # an unmasked client frame: the server's WebSocket layer fails the connection (1002;
        # tests/test_fuzz_ws.py has the frame past the protocol cap, 1009)
        first.transport.write(b"\x81\x05hello")
        with pytest.raises(ConnectionClosedError):
            while True:
                await asyncio.wait_for(it.__anext__(), 10)
        done = await client.complete("hi", max_tokens=2)  # a new socket
        assert done.usage.completion_tokens == 2 and client._ws is not first


# ----------------------------------------------------------------------------- SSE helper
def test_iter_sse_parses_events():
    from atom_stream_client import iter_sse

    body = [b": keepalive\n", b"\n", b'data: {"a": 1}\n', b"\n", b"event: x\n",
            b'data: {"b":\n', b"data: 2}\n", b"\n", b"data: [DONE]\n", b"\n",
            b'data: {"after": 1}\n', b"\n"]
    assert list(iter_sse(body)) == [{"a": 1}, {"b": 2}]
    assert list(iter_sse(['data: {"c": 3}'])) == [{"c": 3}]  # no trailing blank line
    err = [b'data: {"x": 0}\n', b"\n",
           b'data: {"error": {"message": "m", "type": "t", "param": "p", "code": 400}}\n', b"\n"]
    with pytest.raises(BadRequestError) as e:
        list(iter_sse(err))
    assert (e.value.code, e.value.message, e.value.param) == (400, "m", "p")


def test_stream_sse_against_the_server(srv):
    import httpx
    from atom_stream_client import AuthenticationError, stream_sse

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
            "temperature": 0, "ignore_eos": True}
    chunks = list(stream_sse(srv.url, "/v1/chat/completions", body, api_key="k-one"))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"])
    full = httpx.post(srv.url + "/v1/chat/completions", json=body,
                      headers=AUTH, timeout=60).json()
    assert text == full["choices"][0]["message"]["content"]
    with pytest.raises(BadRequestError) as e:
        list(stream_sse(srv.url, "/v1/completions", {"prompt": "x", "temperature": 9},
                        api_key="k-one"))
    assert e.value.code == 400 and e.value.param == "temperature"
    with pytest.raises(AuthenticationError):
        list(stream_sse(srv.url, "/v1/completions", {"prompt": "x"}))


def test_stream_sse_early_close_aborts(srv):
    from atom_stream_client import stream_sse

    before = srv.stats()["finished"]["abort"]
    gen = stream_sse(srv.url, "/v1/completions", {"prompt": "go", "max_tokens": 400,
                                                   "ignore_eos": True}, api_key="k-one")
    next(gen)
    gen.close()
    deadline = time.monotonic() + 10
    while srv.stats()["finished"]["abort"] < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    s = srv.wait_idle()
    assert s["finished"]["abort"] == before + 1 and s["used_blocks"] == 0
