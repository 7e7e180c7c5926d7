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
