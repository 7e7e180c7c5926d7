"""The Python SDK (clients/python, package atom_stream_client) against a real uvicorn server.

50 requests multiplexed on one socket with 10 cancelled by `break`: the other 40 get their done
frames and the 10 are aborted server-side, on both subprotocols; typed errors; chat; the sync
wrapper; the API key; the package stands alone (imports nothing of the server, depends only on
websockets + msgspec).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import tomllib

import httpx
import pytest
from atom_stream_client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConnectionClosedError,
    Delta,
)
from serving_helpers import free_port, running_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDK_DIR = os.path.join(ROOT, "clients", "python")


@pytest.fixture(scope="module")
def keyed():
    with running_server(api_keys=["sdk-key"]) as s:
        yield s


@pytest.mark.parametrize("protocol", ["msgpack", "json"])
async def test_fifty_multiplexed_with_ten_cancels(srv, protocol):
    before = srv.stats()["finished"]
    async with AsyncClient(srv.ws_url, protocol=protocol) as client:
        ws = client._ws

        async def run(i: int):
            cancel = i % 5 == 0  # 10 of 50
            stream = client.generate(f"request {i}", max_tokens=2000 if cancel else 6,
                                     ignore_eos=True, temperature=0)
            got = []
            async for delta in stream:
                assert isinstance(delta, Delta) and delta.id == stream.id
                got.append(delta)
                if cancel:
                    break  # leaves the stream: the SDK sends a cancel frame
            return i, stream, got

        results = await asyncio.gather(*(run(i) for i in range(50)))
        assert client._ws is ws  # one socket throughout
        done = [(i, s, g) for i, s, g in results if i % 5]
        cancelled = [(i, s, g) for i, s, g in results if i % 5 == 0]
        assert len(done) == 40 and len(cancelled) == 10
        for _, stream, got in done:
            assert stream.done is not None and stream.finish_reason == "length"
            assert stream.usage.completion_tokens == 6
            assert sum(len(d.token_ids) for d in got) == 6
        for _, stream, got in cancelled:
            assert stream.done is None and len(got) == 1
    deadline = time.monotonic() + 20
    while (srv.stats()["finished"]["abort"] < before["abort"] + 10
           and time.monotonic() < deadline):
        await asyncio.sleep(0.05)
    after = srv.wait_idle()
    assert after["finished"]["abort"] == before["abort"] + 10
    assert after["finished"]["length"] == before["length"] + 40
    assert after["used_blocks"] == 0


async def test_chat_complete_cancel_and_errors(srv):
    async with AsyncClient(srv.url) as client:  # http://host:port -> ws://host:port/v1/ws
        text = "".join([d.text async for d in client.chat(
            [{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)])
        http = (await asyncio.to_thread(httpx.post, srv.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0})).json()
        assert text == http["choices"][0]["message"]["content"]
        result = await client.complete(prompt_token_ids=[65, 66], max_tokens=3, temperature=0)
        assert result.finish_reason == "length" and len(result.token_ids) == 3
        assert result.usage.prompt_tokens == 2
        stream = client.generate("x", max_tokens=3000, ignore_eos=True)
        async for _ in stream:
            await stream.cancel()
        assert stream.finish_reason == "abort"
        with pytest.raises(BadRequestError) as e:
            await client.complete("x", temperature=-1)
        assert e.value.param == "params.temperature" and e.value.code == 400
        with pytest.raises(BadRequestError) as e:
            await client.complete("y" * 5000)
        assert e.value.param == "input_tokens"
        with pytest.raises(ValueError):
            client.generate("a", messages=[])
        assert (await client.complete("still fine", max_tokens=1)).finish_reason == "length"
    port = free_port()
    with pytest.raises(ConnectionClosedError):
        async with AsyncClient(f"ws://127.0.0.1:{port}/v1/ws", open_timeout=2):
            pass


async def test_api_key(keyed):
    with pytest.raises(AuthenticationError):
        async with AsyncClient(keyed.ws_url, api_key="wrong"):
            pass
    async with AsyncClient(keyed.ws_url, api_key="sdk-key") as client:
        assert (await client.complete("k", max_tokens=1)).usage.completion_tokens == 1
    async with AsyncClient(keyed.ws_url) as client:  # no key: the server refuses the request
        with pytest.raises(AuthenticationError):
            await client.complete("k", max_tokens=1)


def test_sync_client(srv):
    with Client(srv.ws_url, protocol="json") as client:
        deltas = list(client.generate("sync", max_tokens=3, temperature=0))
        assert sum(len(d.token_ids) for d in deltas) == 3
        assert client.complete("sync", max_tokens=3, temperature=0).text == "".join(
            d.text for d in deltas)
        before = srv.stats()["finished"]["abort"]
        for _ in client.generate("stop early", max_tokens=3000, ignore_eos=True):
            break  # closing the generator cancels the request
        deadline = time.monotonic() + 20
        while srv.stats()["finished"]["abort"] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.stats()["finished"]["abort"] == before + 1
        assert len(list(client.chat([{"role": "user", "content": "x"}], max_tokens=2))) >= 1
    assert srv.wait_idle()["used_blocks"] == 0


def test_sdk_stands_alone():
    with open(os.path.join(SDK_DIR, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    deps = sorted(d.split(">")[0].split("=")[0].strip() for d in project["dependencies"])
    assert project["name"] == "atom-stream-client" and deps == ["msgspec", "websockets"]
    code = ("import sys, atom_stream_client\n"
            "assert not any(m == 'atom_stream' or m.startswith('atom_stream.') "
            "for m in sys.modules), 'imports the server'\n"
            "assert 'torch' not in sys.modules and 'starlette' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": SDK_DIR}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd="/")
