"""OpenAI's Responses API (/v1/responses; server/responses_api.py): the input conversion, the
exact output items and event sequence over a scripted engine (reasoning, text, function calls,
incomplete, errors), the store (retrieve, delete, previous_response_id, its bound), and the
`openai` SDK's `client.responses` against the demo model (streamed = non-streamed, a dropped
stream frees its request)."""
# ruff: noqa: F811 - the `on` / `off` fixtures imported from test_tool_calls are test arguments

from __future__ import annotations

import json

import httpx
import openai
import pytest
from test_review30_diff import _capture_prompts
from test_tool_calls import KIMI_OUT, TOOLS, chunks, off, on  # noqa: F401 - fixtures

from atom_stream.server.openai import decode_request
from atom_stream.server.responses import HTTPError
from atom_stream.server.responses_api import ResponseStore
from atom_stream.server.responses_protocol import (
    ResponsesRequest,
    input_messages,
    to_chat_request,
)

R_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": "does it",
            "parameters": t["function"].get("parameters") or {"type": "object"}}
           for t in TOOLS]


def convert(**body):
    req = decode_request(ResponsesRequest, json.dumps({"input": "hi", **body}).encode())
    messages, convo = input_messages(req, [])
    return to_chat_request(req, messages), convo


def sse_events(text: str) -> list[dict]:
    """`event: <type>\\ndata: <json>` records -> data dicts; types and sequence numbers
    checked."""
    out = []
    for record in filter(None, text.split("\n\n")):
        head, data = record.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == head.removeprefix("event: ")
        assert payload["sequence_number"] == len(out)
        out.append(payload)
    return out


# ---------------------------------------------------------------- conversion
def test_input_items_convert_to_chat_messages():
    chat, convo = convert(instructions="Be brief.", input=[
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Weather?"}, {"type": "input_text", "text": "Paris"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "need a tool"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": "noon"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny at noon."}]},
        {"role": "user", "content": "Thanks"}],
        tools=R_TOOLS, tool_choice={"type": "function", "name": "get_time"},
        max_output_tokens=9, temperature=0.5, top_p=0.8, top_k=4, seed=3,
        parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}})
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "system", "user", "assistant", "tool", "tool", "assistant", "user"]
    assert chat.messages[0].content == "Be brief." and chat.messages[1].content == "Use tools."
    assert [p.text for p in chat.messages[2].content] == ["Weather?", "Paris"]
    calls = chat.messages[3]
    assert calls.reasoning_content == "need a tool"
    assert [c["id"] for c in calls.tool_calls] == ["call_1", "call_2"]
    assert calls.tool_calls[0]["function"] == {"name": "get_weather",
                                               "arguments": '{"city": "Paris"}'}
    assert (chat.messages[4].tool_call_id, chat.messages[4].content) == ("call_1", "sunny")
    assert [m.role for m in convo] == roles[1:]  # instructions are not stored
    assert chat.tools[0] == {"type": "function", "function": {
        "name": "get_weather", "parameters": R_TOOLS[0]["parameters"],
        "description": "does it"}}
    assert chat.tool_choice == {"type": "function", "function": {"name": "get_time"}}
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.top_k, chat.seed) == (
        9, 0.5, 0.8, 4, 3)
    assert chat.parallel_tool_calls is False
    assert convert(ignore_eos=True)[0].ignore_eos is True  # vLLM's extra, for benchmarks
    assert chat.response_format == {"type": "json_schema", "json_schema": {
        "name": "w", "schema": {"type": "object"}}}


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "web_search_call"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input[0]"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format"),
    ({"background": True}, "background"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_refused_inputs_name_their_field(body, param):
    with pytest.raises(HTTPError) as e:
        convert(**body)
    assert e.value.status == 400 and e.value.param == param


def test_store_is_bounded_lru():
    store = ResponseStore(size=2)
    store.put("a", {}, [])
    store.put("b", {}, [])
    assert store.get("a") is not None  # a is now the most recent
    store.put("c", {}, [])
    assert store.get("b") is None and store.get("a") is not None
    assert store.pop("a") and not store.pop("a")


# ---------------------------------------------------------------- answers (scripted engine)
def test_non_streamed_response_items(on):
    c, engine = on
    engine.script = ["Weather", " needed.", "</think>", *chunks(KIMI_OUT, 5)]
    r = c.post("/v1/responses", json={"model": "demo", "input": "Weather?", "tools": R_TOOLS,
                                      "metadata": {"k": "v"}})
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["id"].startswith("resp_") and resp["object"] == "response"
    assert resp["status"] == "completed" and resp["incomplete_details"] is None
    assert resp["metadata"] == {"k": "v"} and resp["model"] == "demo"
    reasoning, message, call0, call1 = resp["output"]
    assert reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Weather needed."}]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert [p["text"] for p in message["content"]] == ["Let me check."]
    assert (call0["type"], call0["name"], call0["call_id"]) == (
        "function_call", "get_weather", "functions.get_weather:0")
    assert json.loads(call0["arguments"]) == {"city": "Paris"} and call1["name"] == "get_time"
    n = len(engine.script)
    assert resp["usage"] == {"input_tokens": 3, "input_tokens_details": {
                                 "cached_tokens": 0, "cache_write_tokens": 0},
                             "output_tokens": n, "output_tokens_details": {
                                 "reasoning_tokens": 0}, "total_tokens": 3 + n}
    got = c.get(f"/v1/responses/{resp['id']}")
    assert got.status_code == 200 and got.json() == resp


def test_streamed_events_rebuild_the_response(on):
    c, engine = on
    engine.script = ["Weather", " needed.", "</think>", *chunks(KIMI_OUT, 5)]
    r = c.post("/v1/responses", json={"model": "demo", "input": "Weather?", "tools": R_TOOLS,
                                      "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = sse_events(r.text)
    assert [e["type"] for e in ev[:2]] == ["response.created", "response.in_progress"]
    assert ev[0]["response"]["status"] == "in_progress" and ev[0]["response"]["output"] == []
    final = ev[-1]
    assert final["type"] == "response.completed"
    items: list[dict] = []
    texts: dict[int, str] = {}
    for e in ev[2:-1]:
        kind = e["type"]
        if kind == "response.output_item.added":
            assert e["output_index"] == len(items)
            items.append(e["item"])
            texts[e["output_index"]] = ""
        elif kind.endswith(".delta"):
            assert e["item_id"] == items[e["output_index"]]["id"]
            texts[e["output_index"]] += e["delta"]
        elif kind == "response.output_item.done":
            assert e["item"]["id"] == items[e["output_index"]]["id"]
            items[e["output_index"]] = e["item"]
        elif kind in ("response.output_text.done", "response.reasoning_text.done"):
            assert e["text"] == texts[e["output_index"]]
        elif kind == "response.function_call_arguments.done":
            assert e["arguments"] == texts[e["output_index"]]
    assert items == final["response"]["output"]
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call",
                                          "function_call"]
    assert texts[1] == "Let me check." and json.loads(texts[2]) == {"city": "Paris"}
    assert final["response"]["usage"]["output_tokens"] == len(engine.script)


def test_incomplete_and_errors(off):
    c, engine = off
    engine.script, engine.finish = ["Hel", "lo"], "length"
    try:
        resp = c.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2}).json()
        assert resp["status"] == "incomplete"
        assert resp["incomplete_details"] == {"reason": "max_output_tokens"}
        assert resp["output"][0]["content"][0]["text"] == "Hello"
        ev = sse_events(c.post("/v1/responses", json={"input": "hi", "stream": True}).text)
        assert ev[-1]["type"] == "response.incomplete"
        engine.finish = "abort"  # the server aborts it (shutdown): an error event ends it
        ev = sse_events(c.post("/v1/responses", json={"input": "hi", "stream": True}).text)
        assert ev[-1]["type"] == "error" and ev[-1]["message"]
    finally:
        engine.finish = "stop"
    for body, status, param in [
            ({"model": "nope", "input": "hi"}, 404, "model"),
            ({"input": "hi", "previous_response_id": "resp_missing"}, 404,
             "previous_response_id"),
            ({"input": [{"type": "input_file"}]}, 400, "input[0]"),
            ({"instructions": "x"}, 400, None)]:
        r = c.post("/v1/responses", json=body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == status
        if param:
            assert r.json()["error"]["param"] == param
    assert c.get("/v1/responses/resp_missing").status_code == 404
    assert c.delete("/v1/responses/resp_missing").status_code == 404


def test_previous_response_id_continues_the_conversation(off):
    c, engine = off
    engine.script = ["Paris", " is nice."]
    first = c.post("/v1/responses", json={"input": "Where?", "instructions": "Be brief."})
    rid = first.json()["id"]
    engine.script = ["Yes."]
    unstored = c.post("/v1/responses", json={"input": "Sure?", "previous_response_id": rid,
                                             "store": False}).json()
    assert c.get(f"/v1/responses/{unstored['id']}").status_code == 404  # store: false
    second = c.post("/v1/responses", json={"input": "Sure?", "previous_response_id": rid})
    assert second.status_code == 200
    assert c.get(f"/v1/responses/{second.json()['id']}").json()["previous_response_id"] == rid
    r = c.delete(f"/v1/responses/{rid}")
    assert r.json() == {"id": rid, "object": "response", "deleted": True}
    assert c.post("/v1/responses", json={"input": "x", "previous_response_id": rid}
                  ).status_code == 404


def test_previous_response_id_renders_the_history(off):
    """What the template gets: the stored conversation (input + the answer), then the new
    input; the first request's instructions are not carried over."""
    c, engine = off
    engine.script = ["Paris."]
    rid = c.post("/v1/responses", json={"input": "Where?", "instructions": "Be brief."}
                 ).json()["id"]
    seen, undo = _capture_prompts(engine)
    try:
        engine.script = ["Yes."]
        r = c.post("/v1/responses", json={"input": "Sure?", "previous_response_id": rid})
        assert r.status_code == 200
    finally:
        undo()
    (messages,) = seen
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Where?"), ("assistant", "Paris."), ("user", "Sure?")]


# ---------------------------------------------------------------- the SDK on the demo model
def _sdk(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="EMPTY", max_retries=0, timeout=60)


def test_sdk_create_stream_retrieve(srv):
    client = _sdk(srv)
    kw = {"model": "demo", "input": "Tell me a story.", "instructions": "You are terse.",
          "max_output_tokens": 24, "temperature": 0.0}
    resp = client.responses.create(**kw)
    assert resp.status in ("completed", "incomplete") and resp.object == "response"
    text = resp.output_text
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    # the last event: response.completed, or response.incomplete when max_output_tokens cut it
    # (OpenAI's events; the SDK's get_final_response() waits for a completed one only)
    assert events[-1].type == f"response.{resp.status}"
    final = events[-1].response
    assert deltas == text == final.output_text  # greedy: the same tokens streamed or not
    assert final.usage.output_tokens == resp.usage.output_tokens
    assert final.usage.input_tokens == resp.usage.input_tokens > 0
    got = client.responses.retrieve(resp.id)
    assert got.output_text == text
    more = client.responses.create(model="demo", input="Again.", max_output_tokens=4,
                                   previous_response_id=resp.id)
    assert more.usage.input_tokens > resp.usage.input_tokens  # the history is in the prompt
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)


def test_dropped_stream_frees_its_request(srv):
    with httpx.stream("POST", f"{srv.url}/v1/responses", timeout=60, json={
            "input": "go on", "max_output_tokens": 900, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if "output_text.delta" in line:
                break  # leave mid-answer
    stats = srv.wait_idle()
    assert (stats["num_running"], stats["num_waiting"], stats["used_blocks"]) == (0, 0, 0)


def test_text_delta_hot_path_writes_the_generic_bytes():
    """ItemStream's hot path (more text for the open message) writes exactly event()'s bytes
    with the next sequence number, and the message's done text holds every piece."""
    import random

    import msgspec

    from atom_stream.protocol import DeltaMessage
    from atom_stream.server.responses_api import ItemStream

    rng = random.Random()
    items = ItemStream()
    items.feed(DeltaMessage(content="start"))
    texts = ["start"]
    for _ in range(50):
        text = "".join(rng.choice('ab"\\\n\t\u00e9\u2028\U0001f600<>/ ') for _ in range(6))
        seq = items.seq
        got = items.feed(DeltaMessage(content=text))
        texts.append(text)
        assert got == b"event: response.output_text.delta\ndata: " + msgspec.json.encode({
            "type": "response.output_text.delta", "sequence_number": seq,
            "item_id": items._item["id"], "output_index": 0, "content_index": 0,
            "logprobs": [], "delta": text}) + b"\n\n"
    items.close()
    assert items.items[0]["content"][0]["text"] == "".join(texts)
