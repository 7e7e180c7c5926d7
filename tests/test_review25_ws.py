"""Session-25 review of the WebSocket SDK (clients/python) against a real server (conftest `srv`).

- A stream left early (break / aclose) keeps its id until the server's done for the cancel: a
  new request with the same `id=` gets its own tokens, never a "duplicate id" error nor the old
  request's frames.
- `complete()` keeps the per-token logprobs the deltas carried.
- `chat()` passes the chat route's `add_generation_prompt` / `continue_final_message`, with the
  prompt the HTTP chat route renders for the same options.
"""

from __future__ import annotations

import httpx
from atom_stream_client import AsyncClient, Client

CHAT = [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "bl"}]


async def test_sdk_reuses_an_id_right_after_leaving_a_stream(srv):
    async with AsyncClient(srv.ws_url) as client:
        short = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
        want = await client.complete("fresh reuse", **short)
        for _ in range(3):
            it = client.generate("long one", id="same", max_tokens=200,
                                 ignore_eos=True).__aiter__()
            await it.__anext__()
            await it.aclose()  # cancel sent; the server still holds "same" until its done
            got = await client.complete("fresh reuse", id="same", **short)
            assert (got.token_ids, got.finish_reason) == (want.token_ids, "length")
            async for _ in client.generate("long two", id="same", max_tokens=200,
                                           ignore_eos=True):
                break  # closed later by the loop's async-generator finalizer
            got = await client.complete("fresh reuse", id="same", **short)
            assert got.token_ids == want.token_ids and got.usage.completion_tokens == 5
    assert srv.wait_idle()["used_blocks"] == 0


def test_sync_client_reuses_an_id_after_break(srv):
    with Client(srv.ws_url, protocol="json") as client:
        for _ in range(2):
            for _ in client.generate("sync long", id="s", max_tokens=200, ignore_eos=True):
                break
            got = client.complete("sync short", id="s", max_tokens=3, ignore_eos=True)
            assert got.usage.completion_tokens == 3


async def test_sdk_complete_keeps_logprobs(srv):
    async with AsyncClient(srv.ws_url, protocol="json") as client:
        deltas = [d async for d in client.generate("lp", max_tokens=4, temperature=0,
                                                     logprobs=2)]
        got = await client.complete("lp", max_tokens=4, temperature=0, logprobs=2)
        plain = await client.complete("lp", max_tokens=4, temperature=0)
    assert got.logprobs == [lp for d in deltas for lp in d.logprobs]
    assert len(got.logprobs) == 4 and all(len(lp[1]) == 2 for lp in got.logprobs)
    assert plain.logprobs is None


async def test_sdk_chat_options_match_the_http_chat_route(srv):
    body = {"model": "demo", "messages": CHAT, "max_tokens": 1}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        cont = http.post("/v1/chat/completions", json={
            **body, "continue_final_message": True, "add_generation_prompt": False}).json()
        default = http.post("/v1/chat/completions", json=body).json()
    async with AsyncClient(srv.ws_url) as client:
        got = await client.chat(CHAT, max_tokens=1, continue_final_message=True,
                                add_generation_prompt=False).collect()
        plain = await client.chat(CHAT, max_tokens=1).collect()
    assert got.usage.prompt_tokens == cont["usage"]["prompt_tokens"]
    assert plain.usage.prompt_tokens == default["usage"]["prompt_tokens"]
    assert got.usage.prompt_tokens != plain.usage.prompt_tokens
