"""The /v1/ws protocol (DESIGN.md) against a real uvicorn server, plus API-key auth of HTTP and WS.

Raw `websockets` clients speak the frames directly: both subprotocols, multiplexing, cancel,
error frames for malformed / unknown / oversized frames, duplicate ids and bad parameters while the
connection and its other requests go on, closing the socket aborts every request (KV blocks back
to zero), a slow reader gets merged delta frames, keepalive pings, and auth by header or frame.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time

import httpx
import msgspec
import pytest
import websockets
from serving_helpers import running_server
from websockets.asyncio.client import connect

JSON, MSGPACK = "atom-stream.v1.json", "atom-stream.v1.msgpack"
FRAME_LIMIT = 64 << 10


@pytest.fixture(scope="module")
def srv():
    with running_server(ws_max_frame_bytes=FRAME_LIMIT) as s:
        yield s


@pytest.fixture(scope="module")
def auth_srv():
    with running_server(api_keys=["key-one", "key-two"], ws_ping_interval=0.3,
                        ws_ping_timeout=0.3, ws_auth_timeout_s=5.0) as s:
        yield s


class Conn:
    """A raw protocol client: encode/decode per subprotocol, collect frames by id."""

    def __init__(self, ws, proto: str):
        self.ws = ws
        self.binary = proto == MSGPACK
        self.frames: list[dict] = []

    async def send(self, obj: dict) -> None:
        if self.binary:
            await self.ws.send(msgspec.msgpack.encode(obj))
        else:
            await self.ws.send(msgspec.json.encode(obj).decode())

    async def recv(self, timeout: float = 60) -> dict:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, bytes if self.binary else str)
        frame = (msgspec.msgpack.decode(raw) if self.binary else msgspec.json.decode(raw))
        self.frames.append(frame)
        return frame

    async def until(self, pred, timeout: float = 60) -> dict:
        while True:
            f = await self.recv(timeout)
            if pred(f):
                return f

    def of(self, rid: str) -> list[dict]:
        return [f for f in self.frames if f.get("id") == rid]


def text_of(frames: list[dict]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "delta")


@pytest.mark.parametrize("proto", [JSON, MSGPACK])
async def test_generate_both_subprotocols(srv, proto):
    http = (await asyncio.to_thread(httpx.post, srv.url + "/v1/completions", json={
        "prompt": "Hello", "max_tokens": 5, "temperature": 0})).json()
    async with connect(srv.ws_url, subprotocols=[proto]) as ws:
        assert ws.subprotocol == proto
        c = Conn(ws, proto)
        await c.send({"type": "generate", "id": "g1", "prompt": "Hello",
                      "params": {"max_tokens": 5, "temperature": 0}})
        done = await c.until(lambda f: f["type"] == "done")
        assert done == {"type": "done", "id": "g1", "finish_reason": "length",
                        "usage": {"prompt_tokens": 5, "completion_tokens": 5,
                                  "total_tokens": 10}}
        deltas = [f for f in c.frames if f["type"] == "delta"]
        assert all(set(f) == {"type", "id", "text", "token_ids"} for f in deltas)
        assert sum(len(f["token_ids"]) for f in deltas) == 5
        assert text_of(c.frames) == http["choices"][0]["text"]


async def test_multiplex_cancel_and_prompt_forms(srv):
    async with connect(srv.ws_url, subprotocols=[JSON]) as ws:
        c = Conn(ws, JSON)
        await c.send({"type": "generate", "id": "long", "prompt": "x",
                      "params": {"max_tokens": 3000, "ignore_eos": True}})
        await c.send({"type": "generate", "id": "ids", "prompt_token_ids": [1, 2, 3],
                      "params": {"max_tokens": 3, "temperature": 0, "logprobs": 1}})
        await c.send({"type": "generate", "id": "chat",
                      "messages": [{"role": "user", "content": "hi"}],
                      "params": {"max_tokens": 3, "temperature": 0}})
        await c.until(lambda f: f["id"] == "long" and f["type"] == "delta")
        await c.send({"type": "cancel", "id": "long"})
        await c.send({"type": "cancel", "id": "no-such-request"})  # ignored
        finished = set()
        while len(finished) < 3:
            f = await c.recv()
            if f["type"] == "done":
                finished.add(f["id"])
            assert f["type"] != "error", f
        dones = {f["id"]: f for f in c.frames if f["type"] == "done"}
        assert dones["long"]["finish_reason"] == "abort"
        assert dones["ids"]["finish_reason"] == "length"
        assert dones["chat"]["usage"]["prompt_tokens"] > 2
        lps = [lp for f in c.of("ids") if f["type"] == "delta" for lp in f["logprobs"]]
        assert len(lps) == 3 and all(len(lp[1]) == 1 and lp[0] <= 0 for lp in lps)
    assert srv.wait_idle()["used_blocks"] == 0


async def test_bad_frames_get_error_frames_and_connection_goes_on(srv):
    async with connect(srv.ws_url, subprotocols=[JSON], max_size=None) as ws:
        c = Conn(ws, JSON)
        await c.send({"type": "generate", "id": "live", "prompt": "x",
                      "params": {"max_tokens": 3000, "ignore_eos": True}})
        await c.until(lambda f: f["id"] == "live")

        async def expect(payload, rid, code, param=None):
            await (ws.send(payload) if isinstance(payload, str) else c.send(payload))
            f = await c.until(lambda f: f["type"] == "error")
            assert (f["id"], f["code"]) == (rid, code), f
            assert f.get("param") == param, f
            assert f["message"]

        await expect("not json at all", None, 400)
        await expect({"type": "bogus", "id": "b"}, "b", 400, "type")
        await expect({"type": "generate", "prompt": "no id"}, None, 400)
        await expect({"type": "generate", "id": "big", "prompt": "y" * FRAME_LIMIT}, "big",
                     413)
        await expect({"type": "generate", "id": "live", "prompt": "dup"}, "live", 400, "id")
        await expect({"type": "generate", "id": "p1", "prompt": "z",
                      "params": {"temperature": -1}}, "p1", 400, "params.temperature")
        await expect({"type": "generate", "id": "p2", "prompt": "z",
                      "params": {"bogus": 1}}, "p2", 400, "params.bogus")
        await expect({"type": "generate", "id": "p8", "messages": []}, "p8", 400, "messages")
        await expect({"type": "generate", "id": "p9", "messages": [
            {"role": "user", "content": [{"type": "image_url"}]}]}, "p9", 400,
            "messages[0].content")
        await expect({"type": "generate", "id": "p3", "prompt": "z", "messages": []}, "p3",
                     400, "prompt")
        await expect({"type": "generate", "id": "p4", "prompt": "q" * 5000}, "p4", 400,
                     "input_tokens")
        await expect({"type": "generate", "id": "p5", "prompt_token_ids": [99999]}, "p5", 400,
                     "prompt_token_ids")
        # a string where a boolean belongs ("false" would be truthy: EOS ignored)
        await expect({"type": "generate", "id": "p6", "prompt": "z",
                      "params": {"ignore_eos": "false"}}, "p6", 400, "params.ignore_eos")
        await expect({"type": "generate", "id": "p7", "prompt": "z",
                      "params": {"prompt_logprobs": 1}}, "p7", 400, "params.prompt_logprobs")
        # the limit counts UTF-8 bytes: 3 bytes per character here, under the limit in chars
        await expect({"type": "generate", "id": "wide", "prompt": "€" * (FRAME_LIMIT // 2)},
                     "wide", 413)
        await ws.send(msgspec.json.encode({"type": "generate", "id": "bin", "prompt": "z"}))
        f = await c.until(lambda f: f["type"] == "error")
        assert f["code"] == 400 and "text JSON frames" in f["message"], f
        # the live request kept streaming through all of that; it and a new one finish
        await c.send({"type": "cancel", "id": "live"})
        await c.send({"type": "generate", "id": "after", "prompt": "ok",
                      "params": {"max_tokens": 2}})
        while not all(any(f["type"] == "done" for f in c.of(r)) for r in ("live", "after")):
            f = await c.recv()
            assert f["type"] != "error", f
        assert c.of("live")[-1]["finish_reason"] == "abort"
        assert c.of("after")[-1]["finish_reason"] == "length"
    async with connect(srv.ws_url, subprotocols=[MSGPACK]) as ws:
        c = Conn(ws, MSGPACK)
        await ws.send("text on a msgpack connection")
        f = msgspec.msgpack.decode(await ws.recv())
        assert f["type"] == "error" and f["code"] == 400
        await c.send({"type": "generate", "id": "live", "prompt": "x",
                      "params": {"max_tokens": 3000, "ignore_eos": True}})
        await c.until(lambda f: f["id"] == "live")
        # a MessagePack string that is not UTF-8 (prompt, then a cancel's id): error frames,
        # the live request goes on
        await ws.send(b"\x83\xa4type\xa8generate\xa2id\xa3bad\xa6prompt\xa5a\xed\xa0\x80b")
        f = await c.until(lambda f: f["type"] == "error")
        assert f["code"] == 400 and "malformed" in f["message"], f
        await ws.send(b"\x82\xa4type\xa6cancel\xa2id\xa3\xff\xfe\xfd")
        f = await c.until(lambda f: f["type"] == "error")
        assert f["code"] == 400, f
        # an error the engine raises names the frame's field: params.allowed_token_ids
        await c.send({"type": "generate", "id": "a", "prompt": "z",
                      "params": {"allowed_token_ids": [10 ** 6]}})
        f = await c.until(lambda f: f["type"] == "error")
        assert (f["id"], f.get("param")) == ("a", "params.allowed_token_ids"), f
        await c.send({"type": "cancel", "id": "live"})
        await c.send({"type": "generate", "id": "m", "prompt": "ok", "params": {"max_tokens": 1}})
        while not all(any(f["type"] == "done" for f in c.of(r)) for r in ("live", "m")):
            await c.recv()
        assert c.of("live")[-1]["finish_reason"] == "abort"
    assert srv.wait_idle()["used_blocks"] == 0


@pytest.mark.parametrize("proto", [JSON, MSGPACK])
async def test_max_tokens_past_the_context_is_the_http_400(srv, proto):
    """The reviewer's item 8: a max_tokens that does not fit was silently capped over the WS
    (4095 tokens, then done/length) while HTTP refuses it. Now the error frame carries HTTP's
    status and message; a max_tokens that just fits still streams."""
    room = srv.engine.max_model_len - 1  # "x" is one token
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as h:
        http = await h.post("/v1/completions",
                            json={"prompt": "x", "max_tokens": room + 1, "ignore_eos": True})
    assert http.status_code == 400 and http.json()["error"]["param"] == "max_tokens"
    async with connect(srv.ws_url, subprotocols=[proto]) as ws:
        c = Conn(ws, proto)
        for rid, max_tokens in (("over", room + 1), ("huge", 100000)):
            await c.send({"type": "generate", "id": rid, "prompt": "x",
                          "params": {"max_tokens": max_tokens, "ignore_eos": True}})
            f = await c.until(lambda f, rid=rid: f["id"] == rid)
            assert f["type"] == "error", f
            assert (f["code"], f.get("param")) == (400, "params.max_tokens"), f
        assert c.of("over")[-1]["message"] == http.json()["error"]["message"]
        await c.send({"type": "generate", "id": "fits", "prompt": "x",
                      "params": {"max_tokens": room, "ignore_eos": True}})
        f = await c.until(lambda f: f["id"] == "fits")
        assert f["type"] == "delta", f
        await c.send({"type": "cancel", "id": "fits"})
        done = await c.until(lambda f: f["id"] == "fits" and f["type"] != "delta")
        assert done["type"] == "done" and done["finish_reason"] == "abort", done
    assert srv.wait_idle()["used_blocks"] == 0


async def test_unknown_subprotocol_refused(srv):
    with pytest.raises(websockets.exceptions.InvalidStatus):
        async with connect(srv.ws_url, subprotocols=["chat.v9"]):
            pass


async def test_closing_socket_aborts_all_requests(srv):
    before = srv.stats()["finished"]["abort"]
    async with connect(srv.ws_url, subprotocols=[MSGPACK]) as ws:
        c = Conn(ws, MSGPACK)
        for i in range(5):
            await c.send({"type": "generate", "id": f"r{i}", "prompt": "go",
                          "params": {"max_tokens": 3000, "ignore_eos": True}})
        seen: set[str] = set()
        while len(seen) < 5:
            seen.add((await c.recv())["id"])
        assert srv.stats()["used_blocks"] > 0
    deadline = time.monotonic() + 20
    while srv.stats()["finished"]["abort"] < before + 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    s = srv.wait_idle()
    assert s["finished"]["abort"] == before + 5
    assert s["used_blocks"] == 0 and s["kv_usage"] == 0.0


def test_slow_reader_gets_merged_deltas(srv):
    """The writer stalls (a client that does not read): deltas merge, one entry per request."""
    from atom_stream.server.websocket import WebSocketEndpoint

    async def scenario() -> tuple[list[dict], int]:
        inbox: asyncio.Queue = asyncio.Queue()
        gate = asyncio.Event()
        sent: list[dict] = []

        async def send(message: dict) -> None:
            if message["type"] == "websocket.send":
                await gate.wait()
                sent.append(msgspec.json.decode(message["text"]))

        async def receive() -> dict:
            return await inbox.get()

        scope = {"type": "websocket", "path": "/v1/ws", "headers": [],
                 "subprotocols": [JSON]}
        inbox.put_nowait({"type": "websocket.connect"})
        for i in range(4):
            inbox.put_nowait({"type": "websocket.receive", "text": msgspec.json.encode(
                {"type": "generate", "id": f"s{i}", "prompt": "slow",
                 "params": {"max_tokens": 24, "ignore_eos": True}}).decode()})
        engine = srv.engine
        before = engine.stats()["finished"]["length"]
        task = asyncio.ensure_future(WebSocketEndpoint(srv.state)(scope, receive, send))
        while engine.stats()["finished"]["length"] < before + 4:
            await asyncio.sleep(0.02)
        gate.set()  # the client starts reading: everything pending goes out merged
        while sum(f["type"] == "done" for f in sent) < 4:
            await asyncio.sleep(0.01)
        inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await task
        return sent, 24

    frames, n = srv.call(scenario())
    for i in range(4):
        mine = [f for f in frames if f["id"] == f"s{i}"]
        deltas = [f for f in mine if f["type"] == "delta"]
        assert sum(len(f["token_ids"]) for f in deltas) == n
        assert len(deltas) <= 2  # at most the one stalled frame + one merged frame
        assert mine[-1]["type"] == "done" and mine[-1]["usage"]["completion_tokens"] == n


# ------------------------------------------------------------------------------- auth
def test_api_key_guards_http(auth_srv):
    url = auth_srv.url
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}
                     ).status_code == 401
    assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 401
    for key in ("key-one", "key-two"):
        r = httpx.get(url + "/v1/models", headers={"Authorization": f"bearer {key}"})
        assert r.status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # exempt
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                   headers={"Authorization": "Bearer key-two"})
    assert r.status_code == 200


async def test_api_key_guards_websocket(auth_srv):
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        async with connect(auth_srv.ws_url, subprotocols=[JSON],
                           additional_headers={"Authorization": "Bearer wrong"}):
            pass
    assert e.value.response.status_code == 401
    gen = {"type": "generate", "id": "a", "prompt": "x", "params": {"max_tokens": 1}}
    async with connect(auth_srv.ws_url, subprotocols=[JSON],
                       additional_headers={"Authorization": "Bearer key-one"}) as ws:
        c = Conn(ws, JSON)
        await c.send(gen)
        assert (await c.until(lambda f: f["type"] != "delta"))["type"] == "done"
    async with connect(auth_srv.ws_url, subprotocols=[MSGPACK]) as ws:  # no header
        c = Conn(ws, MSGPACK)
        await c.send(gen)
        f = await c.recv()
        assert (f["type"], f["id"], f["code"]) == ("error", "a", 401)
        await c.send({"type": "auth", "api_key": "key-two"})
        await c.send(gen)
        assert (await c.until(lambda f: f["type"] != "delta"))["type"] == "done"
    async with connect(auth_srv.ws_url, subprotocols=[JSON]) as ws:
        c = Conn(ws, JSON)
        await c.send({"type": "auth", "api_key": "bad"})
        f = await c.recv()
        assert (f["type"], f["code"]) == ("error", 401)
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            await c.recv(10)
        assert closed.value.rcvd.code == 1008


def test_keepalive_pings_and_dead_peer_timeout(auth_srv):
    """The server pings; a peer that never answers is dropped after ping_timeout."""
    s = socket.create_connection(("127.0.0.1", auth_srv.port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Protocol: {JSON}\r\nAuthorization: Bearer key-one\r\n\r\n"
               ).encode())
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    assert data.startswith(b"HTTP/1.1 101")
    rest = data.split(b"\r\n\r\n", 1)[1]
    start = time.monotonic()
    while True:  # read until the server closes: we never answer its pings
        chunk = s.recv(4096)
        if not chunk:
            break
        rest += chunk
    s.close()
    assert rest[:1] == b"\x89"  # FIN + ping opcode
    assert b"\x88" in rest  # then a close frame (keepalive ping timeout)
    assert time.monotonic() - start < 5
