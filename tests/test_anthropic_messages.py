"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens; server/anthropic.py): the
request conversion, the exact answer and event shapes over a scripted engine (reasoning, text,
tool calls, stop reasons, errors), and the `anthropic` SDK against the demo model (streamed =
non-streamed, stop sequences, count_tokens = the rendered prompt, a dropped stream frees its
request, x-api-key auth)."""
# ruff: noqa: F811 - the `on` / `off` fixtures imported from test_tool_calls are test arguments

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from serving_helpers import running_server
from test_tool_calls import KIMI_OUT, TOOLS, chunks, off, on  # noqa: F401 - fixtures

from atom_stream.server.anthropic_protocol import MessagesRequest, to_chat_request
from atom_stream.server.openai import decode_request
from atom_stream.server.responses import HTTPError

A_TOOLS = [{"name": t["function"]["name"], "description": "what it does",
            "input_schema": t["function"].get("parameters", {"type": "object"})}
           for t in TOOLS]
USER = [{"role": "user", "content": "Weather in Paris?"}]
KEY = "sk-anthropic-test"


def convert(**body):
    body = {"model": "demo", "max_tokens": 16, "messages": USER, **body}
    return to_chat_request(decode_request(MessagesRequest, json.dumps(body).encode()))


def sse_events(text: str) -> list[tuple[str, dict]]:
    """`event: <type>\\ndata: <json>` records -> [(type, data)]; each data's type matches."""
    out = []
    for record in text.split("\n\n"):
        if not record:
            continue
        head, data = record.split("\n")
        kind = head.removeprefix("event: ")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == kind
        out.append((kind, payload))
    return out


# ---------------------------------------------------------------- conversion
def test_history_converts_to_chat_messages():
    chat = convert(system=[{"type": "text", "text": "x-anthropic-billing-header: cc=1"},
                           {"type": "text", "text": "Be brief."},
                           {"type": "text", "text": "Use tools."}],
                   messages=[
                       {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                                    {"type": "text", "text": "In Paris."}]},
                       {"role": "assistant", "content": [
                           {"type": "thinking", "thinking": "need a tool", "signature": "s"},
                           {"type": "redacted_thinking", "data": "opaque"},
                           {"type": "text", "text": "Checking."},
                           {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                            "input": {"city": "Paris"}}]},
                       {"role": "user", "content": [
                           {"type": "tool_result", "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "sunny"},
                                        {"type": "text", "text": "21C"}]},
                           {"type": "text", "text": "And tomorrow?"}]},
                       {"role": "system", "content": "Answer in French."}],
                   tools=A_TOOLS, tool_choice={"type": "any", "disable_parallel_tool_use": True},
                   stop_sequences=["END"], temperature=0.3, top_p=0.9, top_k=5,
                   thinking={"type": "disabled"})
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert chat.messages[0].content == "Be brief.\nUse tools.\nAnswer in French."
    assert [p.text for p in chat.messages[1].content] == ["Weather?", "In Paris."]
    asst = chat.messages[2]
    assert asst.reasoning_content == "need a tool"
    assert [p.text for p in asst.content] == ["Checking."]
    (call,) = asst.tool_calls
    assert call["id"] == "toolu_1" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert chat.messages[3].tool_call_id == "toolu_1"
    assert chat.messages[3].content == "sunny\n21C"
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert [t["function"]["name"] for t in chat.tools] == ["get_weather", "get_time"]
    assert chat.tools[1]["function"]["parameters"] == {"type": "object"}
    assert (chat.stop, chat.temperature, chat.top_p, chat.top_k, chat.max_tokens) == (
        ["END"], 0.3, 0.9, 5, 16)
    assert chat.chat_template_kwargs == {"thinking": False}
    extras = convert(ignore_eos=True, seed=5)  # vLLM's extras, as benchmarks send them
    assert (extras.ignore_eos, extras.seed) == (True, 5)


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "get_time"}, {"type": "function",
                                            "function": {"name": "get_time"}})])
def test_tool_choice_mapping(choice, expected):
    assert convert(tools=A_TOOLS, tool_choice=choice).tool_choice == expected


def test_thinking_and_output_format():
    chat = convert(thinking={"type": "enabled", "budget_tokens": 1024},
                   chat_template_kwargs={"x": 1},
                   output_config={"format": {"type": "json_schema",
                                             "schema": {"type": "object"}}})
    assert chat.chat_template_kwargs == {"x": 1, "thinking": True}
    assert chat.response_format == {"type": "json_schema", "json_schema": {
        "name": "output", "schema": {"type": "object"}}}
    # an explicit template kwarg wins over `thinking`
    chat = convert(thinking={"type": "enabled"}, chat_template_kwargs={"thinking": False})
    assert chat.chat_template_kwargs == {"thinking": False}


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]}]},
     "messages[0].content[0]"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
    ({"thinking": {"type": "maybe"}}, "thinking"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_use", "name": "f", "input": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t",
         "content": [{"type": "image", "source": {}}]}]}]}, "messages[0].content[0].content[0]"),
])
def test_refused_inputs_name_their_field(body, param):
    with pytest.raises(HTTPError) as e:
        convert(**body)
    assert e.value.status == 400 and e.value.param == param


# ---------------------------------------------------------------- answers (scripted engine)
# `on`: the kimi_k2 tool-call and reasoning parsers; `off`: none (test_tool_calls' fixtures)
def body(**kw):
    return {"model": "demo", "max_tokens": 64, "messages": USER, **kw}


def test_non_streamed_answer_with_reasoning_and_tool_calls(on):
    c, engine = on
    engine.script = ["Weather", " needed.", "</think>", *chunks(KIMI_OUT, 5)]
    r = c.post("/v1/messages", json=body(tools=A_TOOLS))
    assert r.status_code == 200, r.text
    msg = r.json()
    assert list(msg) == ["id", "type", "role", "model", "content", "stop_reason",
                         "stop_sequence", "usage"]
    assert msg["id"].startswith("msg_") and msg["type"] == "message"
    assert (msg["role"], msg["model"]) == ("assistant", "demo")
    thinking, text, call0, call1 = msg["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "Weather needed."
    assert thinking["signature"]
    assert text == {"type": "text", "text": "Let me check."}
    assert call0 == {"type": "tool_use", "id": "functions.get_weather:0",
                     "name": "get_weather", "input": {"city": "Paris"}}
    assert call1["name"] == "get_time" and call1["input"] == {}
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("tool_use", None)
    n = len(engine.script)
    assert msg["usage"] == {"input_tokens": 3, "output_tokens": n}
    params, _ = engine.seen[-1]
    assert params.max_tokens == 64


def test_streamed_answer_events(on):
    c, engine = on
    engine.script = ["Weather", " needed.", "</think>", *chunks(KIMI_OUT, 5)]
    r = c.post("/v1/messages", json=body(tools=A_TOOLS, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = sse_events(r.text)
    kinds = [k for k, _ in ev]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta",
                                                                     "message_stop"]
    start = ev[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": 3, "output_tokens": 0}
    # rebuild the blocks from the events: each block opens, takes deltas, closes, in order
    blocks: list[dict] = []
    open_index = None
    for kind, data in ev[2:-2]:
        if kind == "content_block_start":
            assert open_index is None and data["index"] == len(blocks)
            blocks.append(dict(data["content_block"]))
            open_index = data["index"]
        elif kind == "content_block_delta":
            assert data["index"] == open_index
            d, b = data["delta"], blocks[open_index]
            if d["type"] == "text_delta":
                b["text"] += d["text"]
            elif d["type"] == "thinking_delta":
                b["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                b["signature"] = d["signature"]
            else:
                assert d["type"] == "input_json_delta"
                b["json"] = b.get("json", "") + d["partial_json"]
        else:
            assert kind == "content_block_stop" and data["index"] == open_index
            open_index = None
    assert open_index is None
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use", "tool_use"]
    assert blocks[0]["thinking"] == "Weather needed." and blocks[0]["signature"]
    assert blocks[1]["text"] == "Let me check."
    assert (blocks[2]["id"], blocks[2]["name"]) == ("functions.get_weather:0", "get_weather")
    assert json.loads(blocks[2]["json"]) == {"city": "Paris"}
    assert json.loads(blocks[3]["json"]) == {} and blocks[3]["name"] == "get_time"
    delta = ev[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"] == {"input_tokens": 3, "output_tokens": len(engine.script)}


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_is_a_tool_use_block(off, stream):
    """tool_choice {type: tool} (forced by structured outputs, no tool parser needed): the
    answer is that tool's call, stop_reason tool_use, as Anthropic answers a forced tool."""
    c, engine = off
    engine.script = ['{"city":', ' "Oslo"}']
    r = c.post("/v1/messages", json=body(tools=A_TOOLS, stream=stream, tool_choice={
        "type": "tool", "name": "get_weather"}))
    assert r.status_code == 200, r.text
    assert engine.seen[-1][0].structured_outputs is not None
    if not stream:
        msg = r.json()
        (block,) = msg["content"]
        assert block["type"] == "tool_use" and block["name"] == "get_weather"
        assert block["input"] == {"city": "Oslo"} and block["id"]
        assert msg["stop_reason"] == "tool_use"
        return
    ev = sse_events(r.text)
    starts = [d["content_block"] for k, d in ev if k == "content_block_start"]
    assert [b["type"] for b in starts] == ["tool_use"] and starts[0]["name"] == "get_weather"
    args = "".join(d["delta"]["partial_json"] for k, d in ev if k == "content_block_delta")
    assert json.loads(args) == {"city": "Oslo"}
    assert ev[-2][1]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize(("finish", "stop", "reason", "sequence"), [
    ("stop", None, "end_turn", None), ("stop", 7, "end_turn", None),
    ("stop", "END", "stop_sequence", "END"), ("length", None, "max_tokens", None)])
def test_stop_reasons(off, finish, stop, reason, sequence):
    c, engine = off
    engine.script, engine.finish = ["Hel", "lo"], finish
    scripted = engine.generate

    async def generate(prompt, params, request_id=None, **kwargs):
        async for out in scripted(prompt, params, request_id, **kwargs):
            if out.finish_reason is not None:
                out.stop_reason = stop  # a stop token id, a stop string, or none
            yield out

    engine.generate = generate
    try:
        msg = c.post("/v1/messages", json=body(stop_sequences=["END"])).json()
        assert engine.seen[-1][0].stop == ["END"]
        assert msg["content"] == [{"type": "text", "text": "Hello"}]
        assert (msg["stop_reason"], msg["stop_sequence"]) == (reason, sequence)
        ev = sse_events(c.post("/v1/messages", json=body(stream=True)).text)
        assert ev[-2][1]["delta"] == {"stop_reason": reason, "stop_sequence": sequence}
        texts = [d["delta"]["text"] for k, d in ev if k == "content_block_delta"]
        assert "".join(texts) == "Hello"
    finally:
        engine.finish = "stop"
        del engine.generate


def test_abort_at_shutdown_is_an_overloaded_error(off):
    """A request the server aborts (shutdown) mid-answer: streamed, the blocks so far then an
    `error` event (overloaded_error, the chat route's 503); non-streamed, a 503 body."""
    c, engine = off
    engine.script, engine.finish = ["Hel", "lo"], "abort"
    try:
        ev = sse_events(c.post("/v1/messages", json=body(stream=True)).text)
        assert [k for k, _ in ev][-1] == "error"
        assert ev[-1][1]["error"]["type"] == "overloaded_error"
        assert "message_stop" not in [k for k, _ in ev]
        r = c.post("/v1/messages", json=body())
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
    finally:
        engine.finish = "stop"


def test_errors_are_anthropic_bodies(off):
    c, _ = off
    cases = [
        ({"model": "demo", "messages": USER}, 400, "invalid_request_error"),  # no max_tokens
        (body(model="claude-sonnet"), 404, "not_found_error"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
         400, "invalid_request_error"),
        (body(tools=A_TOOLS), 400, "invalid_request_error"),  # auto tools without the flags
    ]
    for payload, status, kind in cases:
        r = c.post("/v1/messages", json=payload)
        assert r.status_code == status, r.text
        err = r.json()
        assert list(err) == ["type", "error"] and err["type"] == "error"
        assert err["error"]["type"] == kind and err["error"]["message"]
    r = c.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = c.post("/v1/messages/count_tokens", json={"model": "nope", "messages": USER})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_count_tokens_renders_like_the_request(off):
    c, engine = off
    r = c.post("/v1/messages/count_tokens", json={
        "model": "demo", "messages": USER, "system": "Be brief.",
        "thinking": {"type": "enabled"}})
    assert r.status_code == 200 and r.json() == {"input_tokens": 3}
    kwargs, opts = engine.rendered[-1]
    assert kwargs == {"thinking": True}
    assert opts["add_generation_prompt"] is True


# ---------------------------------------------------------------- the SDK on the demo model
@pytest.fixture(scope="module")
def keyed():
    with running_server({"num_kv_blocks": 64}, api_keys=[KEY]) as s:
        yield s


def _sdk(server, key=KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=60)


def test_sdk_create_stream_and_count(keyed):
    client = _sdk(keyed)
    kw = {"model": "demo", "max_tokens": 24, "extra_body": {"temperature": 0.0},
          "messages": [{"role": "user", "content": "Tell me a story."}],
          "system": "You are terse."}
    msg = client.messages.create(**kw)
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "demo"
    assert msg.stop_reason in ("end_turn", "max_tokens")
    text = "".join(b.text for b in msg.content if b.type == "text")
    with client.messages.stream(**kw) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text  # greedy: the same tokens streamed or not
    assert final.usage.output_tokens == msg.usage.output_tokens
    assert final.stop_reason == msg.stop_reason
    counted = client.messages.count_tokens(model="demo", messages=kw["messages"],
                                           system=kw["system"])  # no temperature there
    assert counted.input_tokens == msg.usage.input_tokens > 0
    tok = httpx.post(f"{keyed.url}/tokenize", json={
        "messages": [{"role": "system", "content": "You are terse."}, *kw["messages"]]})
    assert tok.json()["count"] == counted.input_tokens
    # a stop sequence cut out of the greedy text itself (3 printable ASCII characters past
    # its start), which then ends at the first place it occurs
    k = next(k for k in range(1, len(text) - 2) if text[k:k + 3].isascii()
             and text[k:k + 3].isprintable() and text[:k].isprintable())
    seq = text[k:k + 3]
    cut = client.messages.create(**kw, stop_sequences=[seq])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == seq
    assert "".join(b.text for b in cut.content) == text[:text.find(seq)]


def test_sdk_auth_and_errors(keyed):
    with pytest.raises(anthropic.AuthenticationError) as e:
        _sdk(keyed, key="wrong").messages.create(model="demo", max_tokens=4,
                                                 messages=USER)
    assert e.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(f"{keyed.url}/v1/messages", json=body(max_tokens=4),
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    with pytest.raises(anthropic.NotFoundError):
        _sdk(keyed).messages.create(model="claude-3", max_tokens=4, messages=USER)
    with pytest.raises(anthropic.BadRequestError):
        _sdk(keyed).messages.create(model="demo", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])


def test_x_api_key_wins_beside_another_authorization(keyed):
    """The SDK given both api_key and auth_token (Claude Code with both variables set) sends a
    valid x-api-key beside an Authorization header: served. GET on the route: Anthropic's
    405 body."""
    r = httpx.post(f"{keyed.url}/v1/messages", json=body(max_tokens=2), headers={
        "x-api-key": KEY, "Authorization": "Bearer something-else"})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{keyed.url}/v1/messages", json=body(max_tokens=2), headers={
        "x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{keyed.url}/v1/messages", headers={"x-api-key": KEY})
    assert r.status_code == 405 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_dropped_stream_frees_its_request(keyed):
    with httpx.stream("POST", f"{keyed.url}/v1/messages", headers={"x-api-key": KEY},
                      json=body(max_tokens=900, stream=True, temperature=1.0,
                                messages=[{"role": "user", "content": "go on"}]),
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if "content_block_delta" in line:
                break  # leave mid-answer
    stats = keyed.wait_idle()
    assert (stats["num_running"], stats["num_waiting"], stats["used_blocks"]) == (0, 0, 0)
    # the server goes on serving
    msg = _sdk(keyed).messages.create(model="demo", max_tokens=3, messages=USER)
    assert msg.usage.output_tokens <= 3


def test_text_delta_hot_path_writes_the_generic_bytes():
    """BlockStream's hot path (more text for the open text block) writes exactly the bytes of
    the generic event encoding, for fresh random texts (quotes, escapes, non-ASCII)."""
    import random

    from atom_stream.protocol import DeltaMessage
    from atom_stream.server.anthropic import BlockStream, event

    rng = random.Random()
    blocks = BlockStream()
    blocks.feed(DeltaMessage(content="start"))
    for _ in range(50):
        text = "".join(rng.choice('ab"\\\n\t\u00e9\u2028\U0001f600<>/ ') for _ in range(6))
        assert blocks.feed(DeltaMessage(content=text)) == event("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": text}})
    assert blocks.feed(DeltaMessage(content="")) == b""
