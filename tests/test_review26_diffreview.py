"""Review 26 of the session's diff (b74c97d..HEAD), black-box: a checkpoint directory without
tokenizer files is now served with token-id prompts only (engine_setup.checkpoint_lacks_tokenizer);
the completion fields that need token text must then be a 400 naming the field (vLLM: "Unable to
get tokenizer because skip_tokenizer_init is True", a ValueError -> 400), never a 500 from a
None tokenizer. Logprobs as "token_id:N" (return_tokens_as_token_ids) need no tokenizer."""

from __future__ import annotations

import httpx
import pytest
from hf_checkpoints import write_hf_checkpoint
from serving_helpers import running_server


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("diffreview26-no-tokenizer"))
    write_hf_checkpoint(path, "kimi", seed=261)
    with running_server({"model": path, "device": "cpu", "dtype": "float32",
                         "num_kv_blocks": 64, "max_num_seqs": 8}) as s:
        yield s


def _post(http: httpx.Client, body: dict) -> httpx.Response:
    return http.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, **body})


def test_token_id_prompt_is_served_without_a_tokenizer(http):
    r = _post(http, {})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field,body", [
    ("logprobs", {"logprobs": 1}),
    ("echo", {"echo": True}),
    ("prompt_logprobs", {"prompt_logprobs": 1}),
])
def test_fields_needing_token_text_are_a_400_naming_them(http, field, body, stream):
    r = _post(http, {**body, "stream": stream} if stream else body)
    if stream and field == "prompt_logprobs":  # refused with stream anyway (vLLM's check)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
        return
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and "tokenizer" in err["message"], err


def test_logprobs_as_token_ids_need_no_tokenizer(http):
    r = _post(http, {"logprobs": 1, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 2 and all(t.startswith("token_id:") for t in lp["tokens"])
    # the engine keeps serving after the refusals above
    assert _post(http, {}).status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": "hello"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ("/detokenize", {"tokens": [5, 6]}, "tokens"),
])
def test_tokenize_routes_without_a_tokenizer_are_a_400(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text  # was a 500 (None has no encode / decode)
    err = r.json()["error"]
    assert err["param"] == param and "tokenizer" in err["message"], err
