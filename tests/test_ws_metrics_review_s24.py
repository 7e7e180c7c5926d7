"""Session-24 review of /v1/ws, the Python SDK and the Prometheus metrics: one test per finding,
plus the metrics arithmetic for a known sequence of HTTP and WebSocket requests.

- A `params` value of null was a 400 error frame over the WebSocket (`temperature: null`, `stop:
  null`, ... and the SDK's `temperature=None`) while HTTP reads null as the default; an integral
  float (`max_tokens: 3.0`) likewise, and `n: 1`. Now the frame's params are read as HTTP reads
  them (n other than 1 is still a 400: one choice per request id).
- The checkpoint's generation_config.json sampling defaults applied over HTTP only: the same
  request over the WebSocket sampled with other parameters (and ignored the max_tokens cap).
- SDK: a server frame of an unknown type failed every open stream ("bad frame") instead of
  being skipped, and an undecodable frame left the socket open (its requests ran on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import httpx
import msgspec
import pytest
from atom_stream_client import AsyncClient, ConnectionClosedError
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import running_server
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

JSON, MSGPACK = "atom-stream.v1.json", "atom-stream.v1.msgpack"


@pytest.fixture(scope="module")
def srv():
    with running_server() as s:
        yield s


def _enc(proto: str, obj: dict) -> bytes | str:
    return msgspec.msgpack.encode(obj) if proto == MSGPACK else msgspec.json.encode(obj).decode()


def _dec(raw: bytes | str) -> dict:
    return msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else msgspec.json.decode(raw)


async def _generate(ws, proto: str, frame: dict) -> tuple[list[int], str, dict]:
    """Send one generate frame; its token ids, text and last (done / error) frame."""
    await ws.send(_enc(proto, {"type": "generate", **frame}))
    ids: list[int] = []
    text = ""
    while True:
        f = _dec(await asyncio.wait_for(ws.recv(), 30))
        assert f["id"] == frame["id"], f
        if f["type"] != "delta":
            return ids, text, f
        ids += f["token_ids"]
        text += f["text"]


async def _http(srv, body: dict) -> dict:
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as h:
        r = await h.post("/v1/completions", json={**body, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()


def _usage(body: dict) -> dict:
    return {k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


# --------------------------------------------------------------------------- params as HTTP
@pytest.mark.parametrize("proto", [JSON, MSGPACK])
async def test_null_params_are_defaults_as_over_http(srv, proto):
    params = {"max_tokens": 3.0, "temperature": 0, "top_p": None, "top_k": None, "min_p": None,
              "seed": None, "stop": None, "stop_token_ids": None, "logprobs": None,
              "ignore_eos": True}
    http = await _http(srv, {"prompt": "Null is default", **params})
    async with connect(srv.ws_url, subprotocols=[proto]) as ws:
        ids, text, done = await _generate(ws, proto, {"id": "n", "prompt": "Null is default",
                                                      "params": params})
    assert done["type"] == "done", done
    assert ids == http["choices"][0]["token_ids"] and text == http["choices"][0]["text"]
    assert done["usage"] == _usage(http) and done["usage"]["completion_tokens"] == 3


async def test_n_one_is_accepted_other_n_refused(srv):
    """`n: 1` (what OpenAI-style clients send along) was "unknown parameter 'n'"."""
    async with connect(srv.ws_url, subprotocols=[JSON]) as ws:
        _, _, done = await _generate(ws, JSON, {"id": "n1", "prompt": "one",
                                                "params": {"n": 1, "max_tokens": 2}})
        assert done["type"] == "done", done
        _, _, err = await _generate(ws, JSON, {"id": "n2", "prompt": "two",
                                               "params": {"n": 2, "max_tokens": 2}})
        assert (err["type"], err["code"], err["param"]) == ("error", 400, "params.n"), err


async def test_sdk_none_params_are_defaults(srv):
    async with AsyncClient(srv.ws_url) as client:
        r = await client.complete("sdk", max_tokens=2, temperature=None, stop=None)
    assert r.finish_reason in ("length", "stop") and r.usage.completion_tokens <= 2


async def test_generation_config_defaults_apply_as_over_http(srv):
    """The server's generation_config.json defaults (greedy, max_tokens cap 4) reach a WS
    request that leaves those fields out, exactly as the same HTTP request gets them."""
    state = srv.state
    saved = state.default_sampling
    state.default_sampling = {"temperature": 0.0, "max_tokens": 4}
    try:
        http = await _http(srv, {"prompt": "Defaults", "ignore_eos": True})
        async with connect(srv.ws_url, subprotocols=[JSON]) as ws:
            ids, _, done = await _generate(ws, JSON, {
                "id": "d", "prompt": "Defaults", "params": {"ignore_eos": True}})
            assert done["usage"] == _usage(http) and done["usage"]["completion_tokens"] == 4
            assert ids == http["choices"][0]["token_ids"]  # greedy, from the defaults
            # the frame's own values win; max_tokens is capped by the default
            ids2, _, done2 = await _generate(ws, JSON, {
                "id": "e", "prompt": "Defaults", "params": {"ignore_eos": True,
                                                            "max_tokens": 2}})
            assert ids2 == ids[:2] and done2["usage"]["completion_tokens"] == 2
            _, _, done3 = await _generate(ws, JSON, {
                "id": "f", "prompt": "Defaults", "params": {"ignore_eos": True,
                                                            "max_tokens": 100}})
            assert done3["usage"]["completion_tokens"] == 4
    finally:
        state.default_sampling = saved


# --------------------------------------------------------------------------- SDK robustness
async def _fake_server(frames_for: Callable[[str], list[dict]], seen_close: asyncio.Event):
    """A stand-in server that answers a generate frame with `frames_for(id)`."""

    async def handler(ws):
        with contextlib.suppress(ConnectionClosed):  # the client's close shows up here
            async for raw in ws:
                f = json.loads(raw)
                if f["type"] == "generate":
                    for out in frames_for(f["id"]):
                        await ws.send(json.dumps(out))
        seen_close.set()

    return serve(handler, "127.0.0.1", 0, subprotocols=[JSON])


def _done(rid: str) -> dict:
    return {"type": "done", "id": rid, "finish_reason": "length",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


async def test_sdk_skips_unknown_frame_types():
    closed = asyncio.Event()

    def frames(rid: str) -> list[dict]:
        return [{"type": "delta", "id": rid, "text": "a", "token_ids": [1], "new_field": 1},
                {"type": "stats", "id": None, "running": 3},  # a newer server's frame
                _done(rid)]

    async with await _fake_server(frames, closed) as server:
        port = server.sockets[0].getsockname()[1]
        async with AsyncClient(f"ws://127.0.0.1:{port}/v1/ws", protocol="json") as client:
            r = await client.complete("x")
            assert (r.text, r.token_ids, r.finish_reason) == ("a", [1], "length")
            assert (await client.complete("y")).finish_reason == "length"  # same socket


async def test_sdk_closes_the_socket_on_a_bad_frame():
    closed = asyncio.Event()

    def frames(rid: str) -> list[dict]:
        return [{"type": "delta", "id": rid, "text": 5, "token_ids": []}]  # text not a str

    async with await _fake_server(frames, closed) as server:
        port = server.sockets[0].getsockname()[1]
        client = AsyncClient(f"ws://127.0.0.1:{port}/v1/ws", protocol="json")
        with pytest.raises(ConnectionClosedError, match="bad frame"):
            await client.complete("x")
        await asyncio.wait_for(closed.wait(), 5)  # the server saw the socket close
        await client.close()


# --------------------------------------------------------------------------- metrics
def _scrape(srv) -> dict[str, float]:
    """Every sample of /metrics by name and labels (model_name / engine dropped)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text):
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k not in ("model_name", "engine")}
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(labels.items()))
            out[key] = s.value
    return out


async def test_metrics_count_http_and_ws_requests(srv):
    """Known HTTP + WS requests (length, stop, abort): token counters equal the usage sums,
    request_success_total counts each by finished_reason, TTFT one per request with a token,
    e2e one per completed request, ITL one per later token; gauges back to 0 when idle."""
    srv.wait_idle()
    before = _scrape(srv)
    greedy = await _http(srv, {"prompt": "Metrics", "max_tokens": 4, "temperature": 0,
                               "ignore_eos": True})
    usages = [_usage(greedy)]
    async with connect(srv.ws_url, subprotocols=[MSGPACK]) as ws:
        _, _, done = await _generate(ws, MSGPACK, {"id": "len", "prompt_token_ids": [3, 4, 5],
                                                   "params": {"max_tokens": 5,
                                                              "ignore_eos": True}})
        usages.append(done["usage"])
        stop_id = greedy["choices"][0]["token_ids"][1]
        _, _, done = await _generate(ws, MSGPACK, {"id": "stop", "prompt": "Metrics", "params": {
            "max_tokens": 4, "temperature": 0, "stop_token_ids": [stop_id]}})
        assert done["finish_reason"] == "stop", done
        usages.append(done["usage"])
        await ws.send(_enc(MSGPACK, {"type": "generate", "id": "ab", "prompt": "abort me",
                                     "params": {"max_tokens": 3000, "ignore_eos": True}}))
        assert _dec(await ws.recv())["type"] == "delta"
        await ws.send(_enc(MSGPACK, {"type": "cancel", "id": "ab"}))
        while (f := _dec(await asyncio.wait_for(ws.recv(), 30)))["type"] == "delta":
            pass
        assert f["finish_reason"] == "abort", f
        usages.append(f["usage"])
    srv.wait_idle()
    for _ in range(100):  # the connection gauge drops once the server's handler has returned
        after = _scrape(srv)
        if after["atom_stream:websocket_connections"] == 0.0:
            break
        await asyncio.sleep(0.05)

    def inc(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    p = "atom_stream:"
    assert inc(p + "prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert inc(p + "generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert inc(p + "request_success_total,finished_reason=length") == 2
    assert inc(p + "request_success_total,finished_reason=stop") == 1
    assert inc(p + "request_success_total,finished_reason=abort") == 1
    assert inc(p + "time_to_first_token_seconds_count") == 4
    assert inc(p + "e2e_request_latency_seconds_count") == 3  # aborts are not latencies
    gaps = sum(u["completion_tokens"] - 1 for u in usages)
    assert inc(p + "inter_token_latency_seconds_count") == gaps
    assert inc(p + "time_to_first_token_seconds_bucket,le=+Inf") == 4
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                  "websocket_connections", "streams_open,interface=websocket"):
        assert after[p + gauge] == 0.0, gauge
