"""Session 24 review of the OpenAI HTTP API (demo model, real uvicorn server on a free port).

- Fields the OpenAI API declares nullable (and vLLM's request models type `Optional[...]` with a
  default) accept an explicit null meaning "the default": `n`, `stream`, `echo`, chat
  `logprobs`, `return_tokens_as_token_ids`. Clients that dump every field of their own request
  models send them; they were 400s ("Expected `int`, got `null`"). Fields vLLM types plainly
  (`bad_words`, `ignore_eos`) stay 400s on null, and `max_tokens: null` keeps its own meaning
  (fill the context) rather than the default 16.
"""

from __future__ import annotations

import json

import pytest

CHAT = [{"role": "user", "content": "Hello there"}]
ROUTES = [("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "Hi"})]


def events(raw: str) -> list[dict]:
    assert raw.endswith("data: [DONE]\n\n")
    return [json.loads(p[len("data: "):]) for p in raw.split("\n\n") if p.startswith("data: {")]


@pytest.mark.parametrize("path,body", ROUTES)
def test_nullable_openai_fields_take_their_defaults(http, path, body):
    base = {**body, "max_tokens": 2, "ignore_eos": True}
    nulls = {"n": None, "stream": None, "echo": None, "return_tokens_as_token_ids": None}
    if "messages" in body:
        nulls["logprobs"] = None
    r = http.post(path, json={**base, **nulls})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["choices"]) == 1 and out["usage"]["completion_tokens"] == 2
    choice = out["choices"][0]
    assert choice["logprobs"] is None
    if "prompt" in body:
        assert not choice["text"].startswith("Hi")  # echo null: no echo
    # one null next to a real error: the error is still reported, naming its field
    r = http.post(path, json={**base, "n": None, "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
    # a null stream next to stream_options: not streaming, so a non-empty object is refused
    r = http.post(path, json={**base, "stream": None, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    # streaming with a null n still streams one choice
    r = http.post(path, json={**base, "stream": True, "n": None})
    assert r.status_code == 200, r.text
    assert {c["index"] for e in events(r.text) for c in e["choices"]} == {0}


def test_openai_sdk_explicit_none_is_sent_as_null_and_accepted(srv):
    """The official SDK sends an explicit `None` as JSON null (only NOT_GIVEN is left out)."""
    import openai

    oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    raw = oai.chat.completions.with_raw_response.create(
        model="demo", messages=CHAT, max_tokens=2, n=None, logprobs=None, stream=None)
    assert b'"n":null' in raw.http_request.content
    assert raw.parse().choices[0].finish_reason == "length"
    c = oai.completions.create(model="demo", prompt="Hi", max_tokens=2, n=None, echo=None,
                               stream=None)
    assert c.usage.completion_tokens == 2 and len(c.choices) == 1


@pytest.mark.parametrize("path,body", ROUTES)
def test_null_is_not_a_default_everywhere(http, path, body):
    for field in ("bad_words", "ignore_eos"):  # vLLM: plain types, null is a 400
        r = http.post(path, json={**body, "max_tokens": 2, field: None})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    # max_tokens null fills the context (not the completions default of 16), also when another
    # field's null had to be dropped first
    r = http.post(path, json={**body, "max_tokens": None, "n": None, "min_tokens": 20,
                              "stop_token_ids": list(range(300))})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 20


def test_empty_body_request_id_gets_a_random_id(http):
    """vLLM's _base_request_id: `default = default or random_uuid()`, so `"request_id": ""` is a
    random id (it was the bare prefix "cmpl-"); an empty X-Request-Id header still wins."""
    import re

    from atom_stream.server.request_ids import base_request_id

    assert re.fullmatch(r"[0-9a-f]{32}", base_request_id({}, ""))
    for path, body, prefix in (("/v1/completions", {"prompt": "x"}, "cmpl-"),
                               ("/v1/chat/completions", {"messages": CHAT}, "chatcmpl-")):
        r = http.post(path, json={**body, "max_tokens": 1, "request_id": ""})
        assert r.status_code == 200, r.text
        assert re.fullmatch(prefix + r"[0-9a-f]{32}", r.json()["id"]), r.json()["id"]
