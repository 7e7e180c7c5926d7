"""Review 29, structured outputs: objects with an empty `properties` (a function without
parameters) take no keys, and a forced "required" answer cut short keeps the calls it
completed (non-streamed as streamed)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from test_tool_calls import CHAT, ScriptedChat, _client, events

from atom_stream.server.forced_tools import forced_tools
from atom_stream.structured.json_schema import schema_to_regex

NO_ARGS = {"type": "object", "properties": {}}  # OpenAI's / LangChain's no-parameter form
TOOLS = [{"type": "function", "function": {"name": "ping", "parameters": NO_ARGS}},
         {"type": "function", "function": {"name": "stamp"}},  # no parameters at all
         {"type": "function", "function": {"name": "lookup", "parameters": {
             "type": "object", "properties": {"key": {"type": "string"}},
             "required": ["key"]}}}]


def _full(schema) -> re.Pattern:
    return re.compile(schema_to_regex(schema))


def test_empty_properties_object_takes_no_keys():
    rx = _full(NO_ARGS)
    assert rx.fullmatch("{}") and rx.fullmatch("{ \n\t}")
    assert not rx.fullmatch('{"a": 1}') and not rx.fullmatch('{"": null}')
    nested = _full({"type": "object", "properties": {"opts": NO_ARGS}, "required": ["opts"]})
    assert nested.fullmatch('{"opts": {}}') and not nested.fullmatch('{"opts": {"x": 1}}')
    # no `properties` keyword, or additionalProperties allowing them: any object, as before
    assert _full({"type": "object"}).fullmatch('{"a": 1}')
    assert _full({**NO_ARGS, "additionalProperties": True}).fullmatch('{"a": 1}')
    assert _full({**NO_ARGS, "additionalProperties": {"type": "integer"}}).fullmatch(
        '{"a": 1}')
    assert not _full({**NO_ARGS, "additionalProperties": {"type": "integer"}}).fullmatch(
        '{"a": "x"}')


@pytest.mark.parametrize("name", ["ping", "stamp"])
def test_named_tool_without_parameters_is_called_with_no_arguments(http, name):
    for seed in (0, 1, 2):
        r = http.post("/v1/chat/completions", json={
            "messages": CHAT, "tools": TOOLS, "seed": seed, "max_tokens": 48,
            "tool_choice": {"type": "function", "function": {"name": name}}})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == name
        assert choice["finish_reason"] == "stop"
        assert json.loads(call["function"]["arguments"]) == {}


CUT = ['[{"name": "lookup", "parameters": {"key": "a]}"}}, {"name": "ping", ',
       '"parameters": {}},', ' {"name": "lookup", "param']


def test_required_cut_short_keeps_the_completed_calls():
    forced = forced_tools(SimpleNamespace(tool_choice="required", tools=TOOLS,
                                          parallel_tool_calls=None))
    calls = forced.calls("".join(CUT))
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("lookup", {"key": "a]}"}), ("ping", {})]
    assert forced.calls('[{"name": "lookup", "para') == []  # nothing complete: no call
    assert forced.finish_reason("length", True) == "length"


@pytest.fixture(scope="module")
def scripted():
    engine = ScriptedChat()
    with _client(engine) as c:
        yield c, engine


def test_required_cut_short_answer_matches_its_stream(scripted):
    c, engine = scripted
    engine.script, engine.finish = list(CUT), "length"
    body = {"messages": CHAT, "tools": TOOLS, "tool_choice": "required"}
    try:
        whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]
        ev = events(c.post("/v1/chat/completions", json={**body, "stream": True}).text)
    finally:
        engine.finish = "stop"
    assert whole["finish_reason"] == "length" and whole["message"]["content"] == ""
    got = [(t["function"]["name"], t["function"]["arguments"])
           for t in whole["message"]["tool_calls"]]
    streamed = [(t["function"]["name"], t["function"]["arguments"])
                for e in ev for t in e["choices"][0]["delta"].get("tool_calls", [])]
    assert got == streamed == [("lookup", '{"key": "a]}"}'), ("ping", "{}")]
    assert ev[-1]["choices"][0]["finish_reason"] == "length"


def test_required_keeps_definitions_and_root_refs_of_the_tools():
    # draft-07 `definitions` (pydantic v1, zod-to-json-schema) and refs to the parameters' own
    # root ("#/properties/...", "#"): the "required" array schema must still resolve them
    p = {"type": "object", "definitions": {"A": {"type": "integer"}}, "required": ["a", "b"],
         "properties": {"a": {"$ref": "#/definitions/A"}, "b": {"$ref": "#/properties/a"},
                        "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}}}
    q = {"type": "object", "$defs": {"B": {"type": "boolean"}}, "required": ["p"],
         "properties": {"p": {"$ref": "#/$defs/B"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": p}},
             {"type": "function", "function": {"name": "g", "parameters": q}}]
    forced = forced_tools(SimpleNamespace(tool_choice="required", tools=tools,
                                          parallel_tool_calls=None))
    rx = re.compile(schema_to_regex(forced.schema, whitespace=" ?"))
    assert rx.fullmatch('[{"name": "f", "parameters": {"a": 1, "b": 2, "kids": [{"a": 3, '
                        '"b": 4}]}}, {"name": "g", "parameters": {"p": true}}]')
    assert not rx.fullmatch('[{"name": "f", "parameters": {"a": 1, "b": true}}]')
    assert not rx.fullmatch('[{"name": "g", "parameters": {"p": 1}}]')
    assert p["properties"]["b"] == {"$ref": "#/properties/a"}  # the request is not modified
