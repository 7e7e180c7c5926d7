"""/v1/responses against the `openai` SDK's own types and against malformed bodies: every
Response body and streamed event validates as the SDK's pydantic models (strict, not the
SDK's lenient construct), malformed but JSON-valid items / tools / formats are 400s naming
their field, and the shapes real clients send back (the SDK's output items, with `id`,
`status`, `encrypted_content`) are still accepted. Scripted engine (test_tool_calls)."""
# ruff: noqa: F811 - the `on` / `off` fixtures imported from test_tool_calls are test arguments

from __future__ import annotations

import json
import typing

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from test_tool_calls import KIMI_OUT, chunks, off, on  # noqa: F401 - fixtures

TOOLS = [{"type": "function", "name": "get_weather", "description": "weather",
          "parameters": {"type": "object"}},
         {"type": "function", "name": "get_time", "parameters": None, "strict": True}]
SCRIPT = ["Need", " a tool.", "</think>", *chunks(KIMI_OUT, 6)]


def _event_models() -> dict[str, typing.Any]:
    """event type -> the SDK's model of that event."""
    union = typing.get_args(typing.get_args(ResponseStreamEvent)[0])
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in union}


def _sse(text: str) -> list[dict]:
    return [json.loads(rec.split("\n")[1].removeprefix("data: "))
            for rec in filter(None, text.split("\n\n"))]


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_bodies_and_events_validate_as_the_sdk_models(on, finish):
    c, engine = on
    engine.script, engine.finish = SCRIPT, finish
    try:
        body = c.post("/v1/responses", json={"model": "demo", "input": "Weather?",
                                             "tools": TOOLS, "metadata": {"k": "v"}}).json()
        events = _sse(c.post("/v1/responses", json={"input": "Weather?", "tools": TOOLS,
                                                    "stream": True}).text)
    finally:
        engine.finish = "stop"
    resp = Response.model_validate(body)
    assert [o.type for o in resp.output] == ["reasoning", "message", "function_call",
                                             "function_call"]
    assert resp.usage.input_tokens_details.cache_write_tokens == 0
    assert resp.status == ("completed" if finish == "stop" else "incomplete")
    models = _event_models()
    for event in events:
        models[event["type"]].model_validate(event)
    assert events[-1]["type"] == f"response.{resp.status}"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"role": ["user"], "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": {}, "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "reasoning", "content": 7}, {"role": "user", "content": "x"}]},
     "input[0].content"),
    ({"input": [{"type": "reasoning", "content": [{"type": "reasoning_text", "text": 5}]},
                {"role": "user", "content": "x"}]}, "input[0].content[0]"),
    ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": [1]}]},
                {"role": "user", "content": "x"}]}, "input[0].summary[0]"),
    ({"input": [{"role": "user", "content": "x"}, {"type": "function_call_output",
                "call_id": "c", "output": [{"type": "input_text", "text": 4}]}]},
     "input[1].output[0]"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": "x"}]},
     "tools[0].parameters"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": []}]},
     "tools[0].parameters"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "description": 3}]},
     "tools[0].description"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
     "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": []}}},
     "text.format.schema"),
    ({"input": "x", "text": {"format": "json_object"}}, "text.format"),
    ({"input": []}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
])
def test_malformed_bodies_are_400s_naming_the_field(on, body, param):
    c, engine = on
    engine.script = ["ok"]
    r = c.post("/v1/responses", json={"model": "demo", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_sdks_own_shapes_are_accepted(on):
    """What the SDK / Agents SDK send back: output items with id / status, a reasoning item
    with encrypted_content null and content null, tool output parts, tools with parameters
    null and strict; an empty input with instructions."""
    c, engine = on
    engine.script = SCRIPT
    first = c.post("/v1/responses", json={"input": "Weather?", "tools": TOOLS}).json()
    calls = [o for o in first["output"] if o["type"] == "function_call"]
    items = [{"type": "message", "id": "msg_0", "status": "completed", "role": "user",
              "content": [{"type": "input_text", "text": "Weather?"}]},
             {"type": "reasoning", "id": "rs_0", "summary": [], "encrypted_content": None,
              "content": None},
             *first["output"],
             *({"type": "function_call_output", "call_id": o["call_id"], "id": "fco_0",
                "status": "completed", "output": [{"type": "input_text", "text": "sunny"}]}
               for o in calls)]
    engine.script = ["</think>", "Sunny."]
    r = c.post("/v1/responses", json={"input": items, "tools": TOOLS})
    assert r.status_code == 200, r.text
    assert r.json()["output"][-1]["content"][0]["text"] == "Sunny."
    r = c.post("/v1/responses", json={"input": [], "instructions": "Say hi."})
    assert r.status_code == 200, r.text


def test_store_null_is_the_default_stored(off):
    c, engine = off
    engine.script = ["Hi."]
    body = c.post("/v1/responses", json={"input": "x", "store": None}).json()
    assert body["store"] is True
    assert c.get(f"/v1/responses/{body['id']}").status_code == 200
