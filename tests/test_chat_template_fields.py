"""Request fields that become chat template variables (server/openai.py template_fields): vLLM's
`reasoning_effort` and ATOM's `thinking` on /v1/chat/completions (chat_template_kwargs win over
them), and what the reasoning parser then makes of the answer; the Responses API's
`reasoning.effort` and Anthropic's `output_config.effort` reach the template the same way."""
# ruff: noqa: F811 - the `on` fixture imported from test_tool_calls is a test argument

from __future__ import annotations

import pytest
from test_tool_calls import CHAT, on  # noqa: F401 - fixture


def _chat(c, **body):
    return c.post("/v1/chat/completions", json={"messages": CHAT, **body})


@pytest.mark.parametrize("thinking", [False, {"type": "disabled"}])
def test_thinking_off_makes_the_answer_content(on, thinking):
    c, engine = on
    engine.script = ["Hel", "lo"]
    msg = _chat(c, thinking=thinking).json()["choices"][0]["message"]
    assert engine.rendered[-1][0] == {"thinking": False}
    # K2.5 thinks by default: with thinking off the answer is content, not reasoning
    assert (msg["content"], msg["reasoning_content"]) == ("Hello", None)
    msg = _chat(c).json()["choices"][0]["message"]
    assert (msg["content"], msg["reasoning_content"]) == (None, "Hello")


def test_fields_and_kwargs_order(on):
    c, engine = on
    engine.script = ["ok"]
    r = _chat(c, reasoning_effort="high", thinking=True,
              chat_template_kwargs={"thinking": False, "x": 1})
    assert r.status_code == 200, r.text
    assert engine.rendered[-1][0] == {"reasoning_effort": "high", "thinking": False, "x": 1}
    for value in ({"type": "sometimes"}, "yes"):  # other values reach the template as given
        assert _chat(c, thinking=value).status_code == 200
        assert engine.rendered[-1][0] == {"thinking": value}


def test_other_routes_pass_the_effort(on):
    c, engine = on
    engine.script = ["ok"]
    r = c.post("/v1/responses", json={"input": "hi", "reasoning": {"effort": "low"}})
    assert r.status_code == 200, r.text
    assert engine.rendered[-1][0] == {"reasoning_effort": "low"}
    r = c.post("/v1/messages", json={"model": "demo", "max_tokens": 4, "messages": CHAT,
                                     "output_config": {"effort": "medium"}})
    assert r.status_code == 200, r.text
    assert engine.rendered[-1][0] == {"reasoning_effort": "medium"}
    r = c.post("/v1/responses", json={"input": "hi", "reasoning": {"effort": 3}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning.effort"


def test_content_format_flag():
    """vLLM's --chat-template-content-format: "openai" hands the template every message's
    content as text parts, "string" as one string (the demo template's own format); anything
    else is a start-up error."""
    from test_cli import parse
    from test_review30_diff import _capture_prompts
    from test_tool_calls import ScriptedChat, _client

    from atom_stream.server.app import ServerConfig

    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    for fmt, expected in (("openai", parts), ("string", "a\nb"), ("auto", "a\nb")):
        engine = ScriptedChat()
        with _client(engine, chat_template_content_format=fmt) as c:
            seen, undo = _capture_prompts(engine)
            r = c.post("/v1/chat/completions", json={"messages": [
                {"role": "user", "content": parts}]})
            undo()
        assert r.status_code == 200, r.text
        assert seen[-1][0]["content"] == expected
    with pytest.raises(ValueError, match="content_format"):
        ServerConfig(chat_template_content_format="jinja")
    _, server = parse("--chat-template-content-format openai")
    assert server.chat_template_content_format == "openai"
