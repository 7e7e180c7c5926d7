"""Review of the Anthropic Messages API (/v1/messages, server/anthropic*.py): Claude Code's
tool-search `tool_reference` blocks are accepted, a final assistant message is a prefill the
answer continues (Anthropic's contract), and count_tokens counts its successes in /metrics."""
# ruff: noqa: F811 - the `off` fixture imported from test_tool_calls is a test argument

from __future__ import annotations

import json

import httpx
import pytest
from serving_helpers import running_server
from test_tool_calls import off  # noqa: F401 - fixture

from atom_stream.server.anthropic_protocol import MessagesRequest, to_chat_request
from atom_stream.server.openai import decode_request

SEARCH = [{"role": "user", "content": "Find a tool for the calendar."},
          {"role": "assistant", "content": [
              {"type": "tool_use", "id": "toolu_7", "name": "ToolSearch",
               "input": {"query": "calendar"}}]},
          {"role": "user", "content": [
              {"type": "tool_result", "tool_use_id": "toolu_7", "content": [
                  {"type": "tool_reference", "tool_name": "mcp__cal__list"},
                  {"type": "text", "text": "1 match"}]},
              {"type": "tool_reference", "tool_name": "mcp__cal__list"},
              {"type": "text", "text": "Use it."}]}]
PREFILL = [{"role": "user", "content": "Name a colour."},
           {"role": "assistant", "content": [{"type": "text", "text": "The colour is"}]}]


def convert(**body):
    body = {"model": "demo", "max_tokens": 8, **body}
    return to_chat_request(decode_request(MessagesRequest, json.dumps(body).encode()))


def test_tool_reference_blocks_are_accepted(off):
    """Claude Code's tool search answers with tool_reference items in a tool_result (vLLM
    accepts them): the tool message names the tool; a top-level one is skipped."""
    chat = convert(messages=SEARCH)
    assert [m.role for m in chat.messages] == ["user", "assistant", "tool", "user"]
    assert chat.messages[2].content == "mcp__cal__list\n1 match"
    assert [p.text for p in chat.messages[3].content] == ["Use it."]
    c, engine = off
    engine.script = ["ok"]
    r = c.post("/v1/messages", json={"model": "demo", "max_tokens": 8, "messages": SEARCH})
    assert r.status_code == 200, r.text
    r = c.post("/v1/messages/count_tokens", json={"model": "demo", "messages": SEARCH})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("messages", "kwargs", "prefill"), [
    (PREFILL, None, True),
    ([PREFILL[0], {"role": "assistant", "content": "The colour is"}], None, True),
    # a template option set by the client wins
    (PREFILL, {"add_generation_prompt": True}, False),
    # an assistant turn that ends in a tool call, or has no text, is not a prefill
    ([PREFILL[0], {"role": "assistant", "content": [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}], None, False),
    ([PREFILL[0], {"role": "assistant", "content": ""}], None, False),
    # the request's last message is the user's (an empty one), not the assistant's
    ([*PREFILL, {"role": "user", "content": []}], None, False),
])
def test_prefill_conversion(messages, kwargs, prefill):
    chat = convert(messages=messages, chat_template_kwargs=kwargs)
    assert (chat.continue_final_message, chat.add_generation_prompt) == (prefill, not prefill)


def test_final_assistant_message_is_a_prefill(off):
    """Anthropic: "If the final message uses the assistant role, the response content will
    continue immediately from the content in that message" (continued, not answered anew)."""
    c, engine = off
    engine.script = [" blue", "."]
    for stream in (False, True):
        r = c.post("/v1/messages", json={"model": "demo", "max_tokens": 8, "stream": stream,
                                         "messages": PREFILL})
        assert r.status_code == 200, r.text
        assert engine.rendered[-1][1]["continue_final_message"] is True
        assert engine.rendered[-1][1]["add_generation_prompt"] is False
    msg = c.post("/v1/messages", json={"model": "demo", "max_tokens": 8,
                                       "messages": PREFILL}).json()
    assert msg["content"] == [{"type": "text", "text": " blue."}]  # the continuation only
    r = c.post("/v1/messages/count_tokens", json={"model": "demo", "messages": PREFILL})
    assert r.status_code == 200
    assert engine.rendered[-1][1]["continue_final_message"] is True
    # only an assistant message: no conversation left after conversion -> 400, not 500
    r = c.post("/v1/messages", json={"model": "demo", "max_tokens": 8,
                                     "messages": [{"role": "assistant", "content": []}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def _count_metric(text: str) -> float:
    key = 'route="/v1/messages/count_tokens",status="200"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("atom_stream:http_requests_total{") and key in line)


def test_count_tokens_success_is_counted(off):
    c, _ = off
    metrics = c.app.state.server.metrics  # the route counters (the scripted engine has none)
    before = _count_metric(metrics.render(None).decode())
    r = c.post("/v1/messages/count_tokens", json={"model": "demo", "messages": PREFILL})
    assert r.status_code == 200
    assert _count_metric(metrics.render(None).decode()) == before + 1


def test_prefill_prompt_on_the_demo_model():
    """The prompt ends in the prefill text: count_tokens = usage.input_tokens = /tokenize with
    continue_final_message (fewer ids than the prompt with a generation prompt after it)."""
    with running_server({"num_kv_blocks": 32}) as s:
        counted = httpx.post(f"{s.url}/v1/messages/count_tokens", json={
            "model": "demo", "messages": PREFILL}).json()["input_tokens"]
        msg = httpx.post(f"{s.url}/v1/messages", timeout=60, json={
            "model": "demo", "max_tokens": 2, "messages": PREFILL}).json()
        flat = [{"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "The colour is"}]
        cont = httpx.post(f"{s.url}/tokenize", json={
            "messages": flat, "add_generation_prompt": False,
            "continue_final_message": True}).json()
        anew = httpx.post(f"{s.url}/tokenize", json={"messages": flat}).json()
        assert counted == msg["usage"]["input_tokens"] == cont["count"] < anew["count"]
        ids = cont["tokens"]
        text = httpx.post(f"{s.url}/detokenize", json={"tokens": ids}).json()["prompt"]
        assert text.endswith("The colour is")


def test_count_tokens_refuses_a_request_template_as_messages_does(off):
    """chat_template_kwargs carrying a template (or `tokenize`): the same 400 on both routes."""
    c, _ = off
    for kwargs in ({"chat_template": "{{ messages }}"}, {"tokenize": True}):
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                "chat_template_kwargs": kwargs}
        r = c.post("/v1/messages/count_tokens", json=body)
        assert r.status_code == 400, r.text
        assert c.post("/v1/messages", json={**body, "max_tokens": 4}).status_code == 400
