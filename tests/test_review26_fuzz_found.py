"""Regressions found by the HTTP fuzzer (tests/test_fuzz_http.py, review session 26).

One demo-model server for the module (conftest's `srv` / `http` fixtures).
"""

from __future__ import annotations

import pytest

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
UNEXPECTED = "Found unexpected chat template kwargs from request: {'tokenize'}"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("value", [True, False, None])
def test_chat_template_kwargs_tokenize_is_refused(http, stream, value):
    """`tokenize` in chat_template_kwargs is apply_chat_template's argument, not a template
    variable: vLLM's resolve_chat_template_kwargs refuses the key (400, param null); it was a
    500 (the rendered prompt came back as ids and was encoded again)."""
    r = http.post(CHAT, json={"messages": HI, "max_tokens": 1, "stream": stream,
                              "chat_template_kwargs": {"tokenize": value}})
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["message"] == UNEXPECTED and err["param"] is None and err["code"] == 400, err


def test_tokenize_route_refuses_tokenize_template_kwarg(http):
    r = http.post("/tokenize", json={"messages": HI, "chat_template_kwargs": {"tokenize": True}})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["message"] == UNEXPECTED
    # other template kwargs still render
    r = http.post("/tokenize", json={"messages": HI, "chat_template_kwargs": {"thinking": True}})
    assert r.status_code == 200 and r.json()["count"] > 0, r.text[:300]


@pytest.mark.parametrize("value", [True, False])
def test_tokenize_add_special_tokens_template_kwarg_matches_chat(http, value):
    """An `add_special_tokens` template kwarg on /tokenize was a 400 with Python's
    "functools.partial() got multiple values for keyword argument" message; it now sets the
    flag as the chat route does, so /tokenize counts what the chat route's usage counts."""
    kw = {"add_special_tokens": value}
    r = http.post("/tokenize", json={"messages": HI, "chat_template_kwargs": kw})
    assert r.status_code == 200, r.text[:300]
    c = http.post(CHAT, json={"messages": HI, "max_tokens": 1, "chat_template_kwargs": kw})
    assert c.status_code == 200, c.text[:300]
    assert r.json()["count"] == c.json()["usage"]["prompt_tokens"]
