"""The non-streamed chat message and choice shapes, as vLLM (about v0.10) dumps them.

vLLM's ChatMessage (vllm/entrypoints/openai/protocol.py) is dumped with model_dump(), so every
field is present in declaration order: role, content, refusal, annotations, audio,
function_call, tool_calls ([] when none), reasoning_content (null when none). That holds with
and without tool / reasoning parsers, for n > 1, echo and continue_final_message. Streamed
deltas stay exclude_unset. The completions choice is CompletionResponseChoice (index, text,
logprobs, finish_reason, stop_reason, prompt_logprobs). The official openai SDK parses both.
"""

from __future__ import annotations

import json

from openai.types import Completion
from openai.types.chat import ChatCompletion
from test_tool_calls import (  # noqa: F401 - on: the parser server fixture
    CHAT,
    KIMI_OUT,
    MESSAGE_NULLS,
    TOOLS,
    ScriptedChat,
    _client,
    chunks,
    on,
)

MESSAGE_KEYS = ["role", "content", "refusal", "annotations", "audio", "function_call",
                "tool_calls", "reasoning_content"]
CHOICE_KEYS = ["index", "message", "logprobs", "finish_reason", "stop_reason"]
NULLS = MESSAGE_NULLS


def _check(body: dict, sdk: bool = True) -> list[dict]:
    """Every choice has vLLM's choice and message keys in order; the SDK parses the body
    (`sdk`: not for a "user" role, which the SDK's strict validation refuses, as for vLLM)."""
    if sdk:
        ChatCompletion.model_validate(body)
    for choice in body["choices"]:
        assert list(choice) == CHOICE_KEYS, choice
        assert list(choice["message"]) == MESSAGE_KEYS, choice["message"]
        assert {k: choice["message"][k] for k in NULLS} == NULLS
    return [c["message"] for c in body["choices"]]


# ------------------------------------------------------------------ no parsers (demo engine)
def test_plain_message_has_every_vllm_field(http):
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Name a colour"}], "max_tokens": 3,
        "seed": 7, "n": 2})
    assert r.status_code == 200, r.text
    msgs = _check(r.json())
    assert len(msgs) == 2
    for msg in msgs:
        assert msg["role"] == "assistant" and isinstance(msg["content"], str)
        assert msg["tool_calls"] == [] and msg["reasoning_content"] is None


def test_echo_and_continue_final_message_keep_the_shape(http):
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Count"},
                     {"role": "assistant", "content": "One, two,"}],
        "add_generation_prompt": False, "continue_final_message": True, "echo": True,
        "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    (msg,) = _check(r.json())
    assert msg["content"].startswith("One, two,") and msg["tool_calls"] == []
    # no generation prompt: the role is the last message's (vLLM's get_chat_request_role)
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Say"}], "add_generation_prompt": False,
        "echo": True, "max_tokens": 2, "temperature": 0})
    (msg,) = _check(r.json(), sdk=False)
    assert msg["role"] == "user" and msg["content"].startswith("Say")


def test_stream_deltas_stay_exclude_unset(http):
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 3,
        "temperature": 0, "stream": True})
    events = [json.loads(p[6:]) for p in r.text.split("\n\n") if p.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(set(d) <= {"content"} for d in deltas[1:]), deltas


def test_completion_choice_fields(http):
    r = http.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 2,
                                           "temperature": 0})
    body = r.json()
    Completion.model_validate(body)
    assert list(body["choices"][0]) == ["index", "text", "logprobs", "finish_reason",
                                        "stop_reason", "prompt_logprobs"]


# --------------------------------------------------------------- parsers (scripted engine)
def test_tool_calls_and_reasoning_in_vllm_order(on):  # noqa: F811 - the imported fixture
    c, engine = on
    engine.script = ["Checking", "</think>", *chunks(KIMI_OUT, 7)]
    r = c.post("/v1/chat/completions", json={"messages": CHAT, "tools": TOOLS, "n": 2})
    assert r.status_code == 200, r.text
    for msg in _check(r.json()):
        assert msg["reasoning_content"] == "Checking" and msg["content"] == "Let me check."
        assert [t["function"]["name"] for t in msg["tool_calls"]] == ["get_weather", "get_time"]
    sdk = ChatCompletion.model_validate(r.json()).choices[0].message
    assert sdk.tool_calls[0].function.arguments == '{"city": "Paris"}'


def test_parsers_without_a_call_keep_the_shape(on):  # noqa: F811
    c, engine = on
    engine.script = ["Plain", " answer"]
    r = c.post("/v1/chat/completions", json={
        "messages": CHAT, "chat_template_kwargs": {"thinking": False}})
    (msg,) = _check(r.json())
    assert msg == {"role": "assistant", "content": "Plain answer", **NULLS, "tool_calls": [],
                   "reasoning_content": None}


def test_no_parser_flags_scripted_engine_shape():
    engine = ScriptedChat()
    engine.script = ["<think>x</think>", KIMI_OUT]
    with _client(engine) as c:
        r = c.post("/v1/chat/completions", json={"messages": CHAT})
    (msg,) = _check(r.json())
    assert msg["content"] == "<think>x</think>" + KIMI_OUT
    assert msg["tool_calls"] == [] and msg["reasoning_content"] is None
