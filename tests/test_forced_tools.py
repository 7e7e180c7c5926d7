"""tool_choice "required" / a named function (server/forced_tools.py): the schemas the answer is
forced into, the answers shaped as tool calls over a scripted engine (known text, streamed and
not, after reasoning), and on the demo model, where only the structured-output mask makes the
random weights write valid calls."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from test_tool_calls import CHAT, ScriptedChat, _client, events

from atom_stream.server.forced_tools import ForcedToolStream, forced_tools
from atom_stream.server.responses import HTTPError
from atom_stream.structured.dfa import RegexDFA
from atom_stream.structured.json_schema import schema_to_regex

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time"}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _req(choice, tools=TOOLS, parallel=None):
    return SimpleNamespace(tool_choice=choice, tools=tools, parallel_tool_calls=parallel)


def test_schemas():
    named = forced_tools(_req(NAMED))
    assert named.kind == "named" and named.schema == WEATHER and named.name == "get_weather"
    req = forced_tools(_req("required"))
    assert req.schema["type"] == "array" and req.schema["minItems"] == 1
    assert "maxItems" not in req.schema
    names = [b["properties"]["name"]["enum"] for b in req.schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert forced_tools(_req("required", parallel=False)).schema["maxItems"] == 1
    assert forced_tools(_req("auto")) is None and forced_tools(_req("none")) is None
    defs = [{"type": "function", "function": {"name": f"f{i}", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}},
        "$defs": {"P": {"type": "integer" if i else "string"}}}}} for i in range(2)]
    with pytest.raises(HTTPError):  # one name, two schemas
        forced_tools(_req("required", tools=defs))
    merged = forced_tools(_req("required", tools=defs[:1]))
    assert merged.schema["$defs"] == {"P": {"type": "string"}}


@pytest.fixture(scope="module")
def scripted():
    engine = ScriptedChat()
    with _client(engine, reasoning_parser="kimi_k2") as c:
        yield c, engine


def test_named_answer_is_one_call_with_the_content_as_arguments(scripted):
    c, engine = scripted
    engine.script = ["<think>", "plan", "</think>", '{"city":', ' "Oslo", "days": 2}']
    body = {"messages": CHAT, "tools": TOOLS, "tool_choice": NAMED}
    r = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert r["finish_reason"] == "stop"
    msg = r["message"]
    assert msg["content"] == "" and msg["reasoning_content"] == "plan"
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"] == {"name": "get_weather",
                                "arguments": '{"city": "Oslo", "days": 2}'}
    params = engine.seen[-1][0]
    assert params.structured_outputs.json == WEATHER
    assert params._structured_after == "</think>"  # the grammar binds the content only
    ev = events(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
    deltas = [e["choices"][0]["delta"] for e in ev]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city":'}
    assert calls[0]["id"].startswith("chatcmpl-tool-") and calls[0]["index"] == 0
    assert calls[1] == {"index": 0, "function": {"arguments": ' "Oslo", "days": 2}'}}
    assert ev[-1]["choices"][0]["finish_reason"] == "stop"


def test_required_answer_is_the_array_of_calls(scripted):
    c, engine = scripted
    engine.script = ["<think></think>", '[{"name": "get_weather", "parameters": {"city": "Ri',
                     'o", "days": 1}}, {"name": "get_time", ', '"parameters": {}}]']
    body = {"messages": CHAT, "tools": TOOLS, "tool_choice": "required"}
    r = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert r["finish_reason"] == "tool_calls" and r["message"]["content"] == ""
    assert [(t["function"]["name"], json.loads(t["function"]["arguments"]))
            for t in r["message"]["tool_calls"]] == [
        ("get_weather", {"city": "Rio", "days": 1}), ("get_time", {})]
    ev = events(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
    calls = [t for e in ev for t in e["choices"][0]["delta"].get("tool_calls", [])]
    assert [(t["index"], t["function"]["name"]) for t in calls] == [
        (0, "get_weather"), (1, "get_time")]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rio", "days": 1}
    assert ev[-1]["choices"][0]["finish_reason"] == "tool_calls"
    engine.finish = "length"  # cut: no complete call; the text stays content
    engine.script = ["</think>", '[{"name": "get_weather", "para']
    r = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    streamed = events(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
    engine.finish = "stop"
    assert r["finish_reason"] == "length" and r["message"]["tool_calls"] == []
    assert r["message"]["content"] == '[{"name": "get_weather", "para'
    # streamed, the same answer: the cut text as content at the end, no tool call
    deltas = [e["choices"][0]["delta"] for e in streamed]
    assert "".join(d.get("content", "") for d in deltas) == r["message"]["content"]
    assert not any("tool_calls" in d for d in deltas)
    assert streamed[-1]["choices"][0]["finish_reason"] == "length"


def test_required_stream_scanner_handles_strings_and_nesting():
    stream = ForcedToolStream(forced_tools(_req("required")))
    text = '[{"name": "get_weather", "parameters": {"city": "a]}\\"[{", "days": [1]}} ,\n' \
           '{"name": "get_time", "parameters": {}}]'
    got = []
    for i in range(0, len(text), 3):
        got += stream.feed(text[i:i + 3])[1]
    assert [d.function.name for d in got] == ["get_weather", "get_time"]
    assert json.loads(got[0].function.arguments) == {"city": 'a]}"[{', "days": [1]}


def test_combined_with_another_constraint_is_400(scripted):
    c, _ = scripted
    r = c.post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "tool_choice": "required",
        "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_demo_model_writes_valid_forced_calls(http, seed):
    r = http.post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "tool_choice": NAMED, "seed": seed,
        "max_tokens": 80})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    text = call["function"]["arguments"]
    if choice["finish_reason"] == "stop":
        args = json.loads(text)
        assert set(args) == {"city", "days"} and 1 <= args["days"] <= 7
        assert len(args["city"]) <= 8
    else:  # cut by max_tokens (the random weights may write whitespace for long): a prefix
        dfa = RegexDFA(schema_to_regex(WEATHER))
        assert choice["finish_reason"] == "length" and dfa.walk(dfa.start, text.encode())
    r = http.post("/v1/chat/completions", json={
        "messages": CHAT, "tools": TOOLS, "tool_choice": "required", "seed": seed,
        "max_tokens": 150, "parallel_tool_calls": False})
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "tool_calls":
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] in ("get_weather", "get_time")
        json.loads(call["function"]["arguments"])
    else:  # the random model may ramble inside a string until max_tokens
        assert choice["finish_reason"] == "length"
