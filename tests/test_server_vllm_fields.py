"""vLLM request fields the OpenAI routes act on (demo model, CPU, real uvicorn server).

- `/v1/completions` `echo: true` + `max_tokens: 0` (vLLM's echo_without_generation: runs one
  token internally, shows only the prompt, with prompt logprobs when `logprobs` is set);
- `prompt_logprobs` in vLLM's shape (`[None, {token_id: {logprob, rank, decoded_token}}, ...]`,
  on the completion choice / on the chat response);
- `truncate_prompt_tokens` (the last N prompt tokens; -1; vLLM's errors), `return_token_ids`
  (placement as vLLM, streamed and not), request `chat_template` refused with vLLM's message,
  `use_beam_search` refused naming the field;
- `usage.prompt_tokens_details` only with --enable-prompt-tokens-details, then in the streamed
  usage chunk too.
"""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from serving_helpers import running_server

CHAT = [{"role": "user", "content": "Hello there"}]
GREEDY = {"model": "demo", "temperature": 0}


@pytest.fixture(scope="module")
def http_details():
    """--enable-prompt-tokens-details; set on the live config until ServerConfig has it."""
    from atom_stream.server.app import ServerConfig

    has = any(f.name == "enable_prompt_tokens_details" for f in dataclasses.fields(ServerConfig))
    with running_server(**({"enable_prompt_tokens_details": True} if has else {})) as s:
        if not has:
            s.state.config.enable_prompt_tokens_details = True
        with httpx.Client(base_url=s.url, timeout=60) as c:
            yield c


def events(raw: str) -> list[dict]:
    assert raw.endswith("data: [DONE]\n\n")
    return [json.loads(p[len("data: "):]) for p in raw.split("\n\n")[:-2]]


def post(http, path, **body):
    r = http.post(path, json={**GREEDY, **body})
    assert r.status_code == 200, r.text
    return r


def err(http, path, **body):
    r = http.post(path, json={**GREEDY, **body})
    assert r.status_code == 400, r.text
    return r.json()["error"]


# ------------------------------------------------------------------ echo with max_tokens 0
def test_echo_without_generation_returns_the_prompt_and_its_logprobs(http):
    body = {"prompt": "Hi there", "max_tokens": 0, "echo": True, "logprobs": 2}
    out = post(http, "/v1/completions", **body).json()
    c, usage = out["choices"][0], out["usage"]
    assert c["text"] == "Hi there"
    lp = c["logprobs"]
    assert lp["tokens"] == list("Hi there") and lp["text_offset"] == list(range(8))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in lp["token_logprobs"][1:])
    assert all(1 <= len(t) <= 3 for t in lp["top_logprobs"][1:])  # vLLM: up to logprobs + 1
    # vLLM: the one internal token's finish_reason and usage (completion_tokens counts it)
    assert c["finish_reason"] in ("length", "stop")
    assert usage["prompt_tokens"] == 8 and usage["completion_tokens"] == 1
    assert len(c["prompt_logprobs"]) == 8 and c["prompt_logprobs"][0] is None
    # without logprobs: the prompt text only
    plain = post(http, "/v1/completions", prompt="Hi there", max_tokens=0, echo=True).json()
    assert plain["choices"][0]["text"] == "Hi there" and plain["choices"][0]["logprobs"] is None
    # streamed: one chunk, the prompt alone, with the same logprobs
    ev = events(post(http, "/v1/completions", stream=True, **body).text)
    assert len(ev) == 1
    sc = ev[0]["choices"][0]
    assert sc["text"] == "Hi there" and sc["finish_reason"] == c["finish_reason"]
    assert sc["logprobs"] == lp
    # max_tokens 0 without echo is still refused
    assert err(http, "/v1/completions", prompt="Hi", max_tokens=0)["param"] == "max_tokens"


# ------------------------------------------------------------------ prompt_logprobs
def check_prompt_logprobs(plps, prompt_ids, k):
    assert len(plps) == len(prompt_ids) and plps[0] is None
    for tid, pos in zip(prompt_ids[1:], plps[1:]):
        keys = list(pos)
        assert keys[0] == str(tid)  # the prompt token first, then the top k
        assert len(keys) in (k, k + 1)
        for v in pos.values():
            assert set(v) == {"logprob", "rank", "decoded_token"} and v["logprob"] <= 0
        tops = [v for key, v in pos.items() if v["rank"] is not None and
                (key != str(tid) or len(keys) == k)]
        assert [v["rank"] for v in tops] == list(range(1, k + 1))
        assert [v["logprob"] for v in tops] == sorted((v["logprob"] for v in tops),
                                                      reverse=True)
        assert pos[str(tid)]["decoded_token"] == chr(tid)


def test_prompt_logprobs_in_vllm_shape(http):
    out = post(http, "/v1/completions", prompt="Hello", max_tokens=1, prompt_logprobs=2,
               return_token_ids=True).json()
    c = out["choices"][0]
    assert c["prompt_token_ids"] == [ord(ch) for ch in "Hello"]
    check_prompt_logprobs(c["prompt_logprobs"], c["prompt_token_ids"], 2)
    # not asked for: null (vLLM dumps the field)
    assert post(http, "/v1/completions", prompt="Hello", max_tokens=1
                ).json()["choices"][0]["prompt_logprobs"] is None
    # chat: on the response, not on the choice
    chat = post(http, "/v1/chat/completions", messages=CHAT, max_tokens=1, prompt_logprobs=1,
                return_token_ids=True).json()
    assert "prompt_logprobs" not in chat["choices"][0]
    plps = chat["prompt_logprobs"]
    assert len(plps) == chat["usage"]["prompt_tokens"] == len(chat["prompt_token_ids"])
    assert plps[0] is None and all(next(iter(p)) == str(t)
                                   for p, t in zip(plps[1:], chat["prompt_token_ids"][1:]))


# ------------------------------------------------------------------ truncate_prompt_tokens
def test_truncate_prompt_tokens_keeps_the_last_tokens(http, srv):
    out = post(http, "/v1/completions", prompt="abcdefgh", max_tokens=1, echo=True,
               truncate_prompt_tokens=3).json()
    assert out["choices"][0]["text"].startswith("fgh") and out["usage"]["prompt_tokens"] == 3
    ids = post(http, "/v1/completions", prompt=[1, 2, 3, 4, 5], max_tokens=1,
               truncate_prompt_tokens=2, return_token_ids=True).json()
    assert ids["choices"][0]["prompt_token_ids"] == [4, 5]
    chat = post(http, "/v1/chat/completions", messages=CHAT, max_tokens=1,
                truncate_prompt_tokens=5, return_token_ids=True).json()
    full = post(http, "/v1/chat/completions", messages=CHAT, max_tokens=1,
                return_token_ids=True).json()
    assert chat["usage"]["prompt_tokens"] == 5
    assert chat["prompt_token_ids"] == full["prompt_token_ids"][-5:]
    # -1: as many as fit beside max_tokens (a prompt longer than the context is served)
    max_len = srv.engine.max_model_len
    long = post(http, "/v1/completions", prompt="a" * (max_len + 100), max_tokens=2,
                truncate_prompt_tokens=-1).json()
    assert long["usage"]["prompt_tokens"] == max_len - 2
    e = err(http, "/v1/completions", prompt="a", max_tokens=1,
            truncate_prompt_tokens=max_len + 1)
    assert e["message"] == (f"truncate_prompt_tokens value ({max_len + 1}) is greater than "
                            f"max_model_len ({max_len}). Please, select a smaller truncation "
                            "size.") and e["param"] == "truncate_prompt_tokens"
    for bad in (0, -2):
        assert err(http, "/v1/chat/completions", messages=CHAT,
                   truncate_prompt_tokens=bad)["param"] == "truncate_prompt_tokens"


# ------------------------------------------------------------------ return_token_ids
def test_return_token_ids_placement(http):
    body = {"prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "return_token_ids": True}
    c = post(http, "/v1/completions", **body).json()["choices"][0]
    assert c["prompt_token_ids"] == [72, 105] and len(c["token_ids"]) == 4
    ev = events(post(http, "/v1/completions", stream=True, **body).text)
    chs = [e["choices"][0] for e in ev]
    assert chs[0]["prompt_token_ids"] == [72, 105]
    assert all("prompt_token_ids" not in ch for ch in chs[1:])
    assert [t for ch in chs for t in ch["token_ids"]] == c["token_ids"]
    # echo with return_token_ids: vLLM echoes "" as the prompt text
    echo = post(http, "/v1/completions", echo=True, **body).json()["choices"][0]
    assert echo["text"] == c["text"]
    # off: no such keys
    plain = post(http, "/v1/completions", prompt="Hi", max_tokens=1).json()["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain
    # chat: token_ids on the choice, prompt_token_ids on the response / the role chunk
    chat = post(http, "/v1/chat/completions", messages=CHAT, max_tokens=3, ignore_eos=True,
                return_token_ids=True).json()
    assert len(chat["choices"][0]["token_ids"]) == 3 and chat["prompt_token_ids"]
    ev = events(post(http, "/v1/chat/completions", messages=CHAT, max_tokens=3,
                     ignore_eos=True, return_token_ids=True, stream=True).text)
    assert ev[0]["prompt_token_ids"] == chat["prompt_token_ids"]
    assert [t for e in ev[1:] for t in e["choices"][0]["token_ids"]] == \
        chat["choices"][0]["token_ids"]


# ------------------------------------------------------------------ refused fields
def test_request_chat_template_and_beam_search_are_refused(http):
    msg = ("Chat template is passed with request, but --trust-request-chat-template is not "
           "set. Refused request with untrusted chat template.")
    for extra in ({"chat_template": "{{ messages[0]['content'] }}"},
                  {"chat_template_kwargs": {"chat_template": "x"}}):
        e = err(http, "/v1/chat/completions", messages=CHAT, max_tokens=1, **extra)
        assert e["message"] == msg and e["param"] is None
    for path, body in (("/v1/completions", {"prompt": "a"}),
                       ("/v1/chat/completions", {"messages": CHAT})):
        e = err(http, path, max_tokens=2, use_beam_search=True, **body)
        assert e["param"] == "use_beam_search"
    post(http, "/v1/completions", prompt="a", max_tokens=1, use_beam_search=False)


# ------------------------------------------------------------------ prompt_tokens_details
def usage_pair(http, path, body):
    """(non-streamed usage, streamed usage chunk's usage) for the same request."""
    u = post(http, path, **body).json()["usage"]
    ev = events(post(http, path, stream=True, stream_options={"include_usage": True},
                     **body).text)
    return u, ev[-1]["usage"]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "y" * 100, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z" * 100}],
                              "max_tokens": 2}),
])
def test_prompt_tokens_details_only_when_enabled_and_also_streamed(http, http_details,
                                                                   path, body):
    for _ in range(2):  # vLLM's default: off
        plain, streamed = usage_pair(http, path, body)
        assert plain["prompt_tokens_details"] is None  # a whole body: model_dump, null kept
        assert "prompt_tokens_details" not in streamed  # a chunk: exclude_unset
    usage_pair(http_details, path, body)  # fills the prefix cache
    plain, streamed = usage_pair(http_details, path, body)
    for u in (plain, streamed):
        assert u["prompt_tokens_details"]["cached_tokens"] > 0, u
