"""Review 25, OpenAI routes over raw HTTP (demo model, CPU; the conftest `http` server):
non-streamed bodies carry vLLM's null OpenAI fields in its order; best_of above n and newer
vLLM's `structured_outputs` constraints that cannot be served are 400s naming the field, not
silently dropped."""

from __future__ import annotations

import pytest

CHAT = [{"role": "user", "content": "Review twenty-five"}]
ROUTES = [("/v1/chat/completions", {"messages": CHAT}),
          ("/v1/completions", {"prompt": "Review twenty-five"})]


def test_non_streamed_bodies_carry_vllm_null_fields_in_order(http):
    # vLLM dumps ChatCompletionResponse / CompletionResponse whole (model_dump): the OpenAI
    # fields service_tier and system_fingerprint are null, between choices and usage
    chat = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier",
                          "system_fingerprint", "usage", "prompt_logprobs",
                          "kv_transfer_params"]
    assert body["kv_transfer_params"] is None
    assert body["service_tier"] is None and body["system_fingerprint"] is None
    cmpl = http.post("/v1/completions", json={"prompt": "Review", "max_tokens": 2, "n": 2,
                                              "seed": 25})
    assert cmpl.status_code == 200, cmpl.text
    body = cmpl.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier",
                          "system_fingerprint", "usage", "kv_transfer_params"]
    assert list(body["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens",
                                   "prompt_tokens_details"]
    assert body["object"] == "text_completion" and body["system_fingerprint"] is None
    assert [c["index"] for c in body["choices"]] == [0, 1]


@pytest.mark.parametrize("path,base", ROUTES)
def test_best_of_up_to_n_is_served_above_n_is_400(http, path, base):
    for extra, choices in (({"best_of": 1}, 1), ({"best_of": 1, "n": 2}, 2),
                           ({"best_of": 2, "n": 2}, 2), ({"best_of": None}, 1)):
        r = http.post(path, json={**base, "max_tokens": 1, **extra})
        assert r.status_code == 200, (extra, r.text)
        assert len(r.json()["choices"]) == choices
    for extra in ({"best_of": 2}, {"best_of": 3, "n": 2}, {"best_of": 0}):
        r = http.post(path, json={**base, "max_tokens": 1, **extra})
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] == "best_of" and err["code"] == 400 and "best_of" in err["message"]


@pytest.mark.parametrize("path,base", ROUTES)
def test_structured_outputs_constraint_is_served_or_400(http, path, base):
    for so in ({"choice": ["yes", "no"]}, {"regex": "a+"}):
        r = http.post(path, json={**base, "max_tokens": 8, "structured_outputs": so})
        assert r.status_code == 200, (so, r.text)
    for so in ({"grammar": "root ::= 'a'"}, {"regex": "(?=a)"}, {"choice": "a"},
               {"choice": ["a"], "regex": "a"}):
        r = http.post(path, json={**base, "max_tokens": 1, "structured_outputs": so})
        assert r.status_code == 400, (so, r.text)
        assert r.json()["error"]["param"] == "structured_outputs"
    # options without a constraint: vLLM's StructuredOutputsParams refuses them; null is none
    r = http.post(path, json={**base, "max_tokens": 1, "structured_outputs": {"backend": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"
    r = http.post(path, json={**base, "max_tokens": 1, "structured_outputs": None})
    assert r.status_code == 200, r.text
