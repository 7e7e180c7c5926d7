"""Session-11 review mends (server): one chat-option resolver, one tokenizer path, one usage
builder.

- continue_final_message + add_generation_prompt both true (as given, or after
  chat_template_kwargs override them) is ONE error everywhere: vLLM's check_generation_prompt
  message, 400, type "Bad Request" (vLLM's RequestValidationError), param null; the same body
  from /v1/chat/completions and /tokenize, and ChatOptionsError from the engine.
- truncate_prompt_tokens tokenizes with the engine's own path (tokenize_prompt).
- usage is built once (openai_stream.final_usage): with n > 1 and
  --enable-prompt-tokens-details, streamed and non-streamed answers report the same usage,
  cached_tokens included (the prompt's first choice; our choices are separate engine requests);
  a cold prompt reports `cached_tokens: 0` (vLLM main: `num_cached_tokens is not None`).
- prompt_logprobs carry the engine's rank of every prompt token (RequestOutput.
  prompt_logprob_ranks), also outside the top k (null there before).
- DPEngine.tokenize_prompt passes through to a replica; truncate_prompt_tokens calls the
  engine's method.

The server runs with a 16-token step budget, so a cold prompt's second choice is admitted after
the first has computed blocks and gets cached tokens the first has not: the choice taken for
cached_tokens shows.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import msgspec
import pytest
from serving_helpers import running_server

from atom_stream.engine.outputs import Usage
from atom_stream.engine.prompts import BOTH_CHAT_OPTIONS, ChatOptionsError
from atom_stream.sampling_params import SamplingParams
from atom_stream.server.openai_stream import StreamContext, final_usage
from atom_stream.server.responses import VALIDATION_TYPE

CONT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
BOTH_BODY = {"error": {"message": BOTH_CHAT_OPTIONS, "type": VALIDATION_TYPE, "param": None,
                       "code": 400}}
SAMPLED = {"model": "demo", "temperature": 1.0, "seed": 7, "max_tokens": 2, "n": 2}


@pytest.fixture(scope="module")
def srv():
    # max_num_seqs within the step budget (EngineConfig refuses more, as vLLM)
    with running_server({"max_num_batched_tokens": 16, "max_num_seqs": 16},
                        enable_prompt_tokens_details=True) as s:
        yield s


@pytest.mark.parametrize("options", [
    {"add_generation_prompt": True, "continue_final_message": True},
    {"continue_final_message": True},  # add_generation_prompt defaults to true
    # chat_template_kwargs override the fields (vLLM updates the template kwargs last)
    {"add_generation_prompt": False, "continue_final_message": True,
     "chat_template_kwargs": {"add_generation_prompt": True}},
    {"chat_template_kwargs": {"continue_final_message": True}},
])
def test_both_chat_options_are_one_error_on_both_routes(http, options):
    chat = http.post("/v1/chat/completions", json={"messages": CONT, "max_tokens": 1, **options})
    tok = http.post("/tokenize", json={"messages": CONT, **options})
    trunc = http.post("/v1/chat/completions", json={"messages": CONT, "max_tokens": 1,
                                                    "truncate_prompt_tokens": 4, **options})
    for r in (chat, tok, trunc):
        assert r.status_code == 400, r.text
        assert r.json() == BOTH_BODY


def test_engine_raises_the_same_error(srv):
    async def first(**kw):
        async for out in srv.engine.generate(CONT, SamplingParams(max_tokens=1), **kw):
            return out

    for kw in ({"continue_final_message": True},
               {"add_generation_prompt": False,
                "chat_template_kwargs": {"continue_final_message": True,
                                         "add_generation_prompt": True}}):
        with pytest.raises(ChatOptionsError) as e:
            srv.call(first(**kw))
        assert (e.value.status, e.value.message, e.value.param) == (400, BOTH_CHAT_OPTIONS, None)


def test_truncation_tokenizes_as_the_engine_and_tokenize(http, srv):
    """The chat options resolved from chat_template_kwargs reach the truncation's rendering;
    AsyncEngine.tokenize_prompt is the engine's public tokenizer path."""
    opts = {"add_generation_prompt": False, "chat_template_kwargs": {
        "continue_final_message": True}}
    full = http.post("/tokenize", json={"messages": CONT, **opts}).json()["tokens"]
    assert srv.call(srv.engine.tokenize_prompt(
        CONT, add_generation_prompt=False, continue_final_message=True)) == full
    r = http.post("/v1/chat/completions", json={
        "messages": CONT, "max_tokens": 1, "temperature": 0, "truncate_prompt_tokens": 5,
        "return_token_ids": True, **opts})
    assert r.status_code == 200, r.text
    assert r.json()["prompt_token_ids"] == full[-5:]
    # an empty text prompt is the engine's 400 with or without truncation
    plain = http.post("/v1/completions", json={"prompt": "", "max_tokens": 1})
    cut = http.post("/v1/completions", json={"prompt": "", "max_tokens": 1,
                                             "truncate_prompt_tokens": 3})
    assert plain.status_code == cut.status_code == 400
    assert plain.json() == cut.json()


def _streamed_usage(http, path: str, body: dict) -> dict:
    r = http.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    frames = r.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    return json.loads(frames[-3][len("data: "):])["usage"]


@pytest.mark.parametrize("path,field,make", [
    ("/v1/chat/completions", "messages", lambda c: [{"role": "user", "content": c * 40}]),
    ("/v1/completions", "prompt", lambda c: c * 40),
])
def test_n2_usage_is_the_same_streamed_and_not(http, path, field, make):
    # two cold prompts of one length: the same cache state for each request's choices
    plain = http.post(path, json={**SAMPLED, field: make("p")})
    assert plain.status_code == 200, plain.text
    streamed = _streamed_usage(http, path, {**SAMPLED, field: make("s")})
    assert plain.json()["usage"] == streamed
    assert set(streamed["prompt_tokens_details"]) == {"cached_tokens"}


def test_final_usage_takes_the_largest_cached_count_of_the_last_prompt():
    ctx = StreamContext("r", 0, "m", None, None, details=True)
    choices = [SimpleNamespace(prompt_key=k // 2) for k in range(4)]  # 2 prompts x n=2
    usages = [Usage(10, 3, 13, 0), Usage(10, 2, 12, 8), Usage(7, 1, 8, 4), Usage(7, 5, 12, 6)]
    u = final_usage(ctx, choices, usages)
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (17, 11, 28)
    # the last prompt's choices cached 4 and 6: its siblings may hit what choice 0 wrote
    assert u.prompt_tokens_details.cached_tokens == 6
    plain = final_usage(StreamContext("r", 0, "m", None, None), choices, usages)
    assert plain.prompt_tokens_details is msgspec.UNSET  # vLLM's default: no details


def test_zero_cached_tokens_are_reported_streamed_and_not(http):
    """vLLM main (PR #44383): with --enable-prompt-tokens-details a request without cache hits
    has `prompt_tokens_details: {"cached_tokens": 0}`, not a missing field."""
    for path, field, value in (("/v1/completions", "prompt", "cold zq"),
                               ("/v1/chat/completions", "messages",
                                [{"role": "user", "content": "cold qz"}])):
        # a salt of its own for each request: the chat template's prefix is cached otherwise
        body = {"model": "demo", "temperature": 0, "max_tokens": 1, field: value}
        plain = http.post(path, json={**body, "cache_salt": f"{path}-plain"})
        assert plain.status_code == 200, plain.text
        streamed = _streamed_usage(http, path, {**body, "cache_salt": f"{path}-stream"})
        for u in (plain.json()["usage"], streamed):
            assert u["prompt_tokens_details"] == {"cached_tokens": 0}, u


def test_prompt_logprob_ranks_outside_the_top_k_are_the_engines(http, srv):
    ids = [201, 7, 150, 33, 99, 12, 240, 61, 5, 180]  # one chunk (the step budget is 16)
    k = 1

    async def engine_ranks():
        async for out in srv.engine.generate(ids, SamplingParams(max_tokens=1,
                                                                 prompt_logprobs=k)):
            return out.prompt_logprob_ranks

    want = srv.call(engine_ranks())
    r = http.post("/v1/completions", json={"model": "demo", "prompt": ids, "max_tokens": 1,
                                           "temperature": 0, "prompt_logprobs": k})
    assert r.status_code == 200, r.text
    plps = r.json()["choices"][0]["prompt_logprobs"]
    assert plps[0] is None and len(plps) == len(ids)
    outside = 0
    for p in range(1, len(ids)):
        entry = plps[p]
        first = next(iter(entry))  # vLLM: the prompt token first, then the top k
        assert int(first) == ids[p]
        rank = entry[first]["rank"]
        assert rank == want[p - 1], (p, rank, want)
        tops = [int(t) for t in list(entry)[1:]]
        if ids[p] not in tops:
            outside += 1
            assert isinstance(rank, int) and rank > k
    assert outside >= len(ids) // 2  # mostly the case that was null before
    # chat: the same ranks on the response's prompt_logprobs (no null rank anywhere)
    r = http.post("/v1/chat/completions", json={
        "model": "demo", "messages": [{"role": "user", "content": "rank me"}],
        "max_tokens": 1, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    chat = r.json()["prompt_logprobs"]
    assert chat[0] is None and all(
        len(e) == 1 and isinstance(next(iter(e.values()))["rank"], int) for e in chat[1:])


class _Tok:
    def encode(self, text, add_special_tokens=True):
        return [1] * add_special_tokens + list(text.encode())

    def encode_chat(self, messages, add_generation_prompt=True, continue_final_message=False,
                    **kw):
        return [len(messages), int(add_generation_prompt), int(continue_final_message),
                *sorted(kw.values())]


async def test_dp_engine_tokenize_prompt_passes_through_to_a_replica():
    from atom_stream.config import EngineConfig
    from atom_stream.engine.dp import DPEngine
    from atom_stream.server.openai_params import truncate_prompts

    dp = DPEngine(EngineConfig(model="demo", device="cpu", data_parallel_size=2))
    for i, rep in enumerate(dp.replicas):  # not started: a stand-in core per replica
        rep._core = SimpleNamespace(tokenizer=_Tok() if i == 0 else None, max_model_len=64)
    assert await dp.tokenize_prompt("ab", add_special_tokens=False) == [97, 98]
    assert await dp.tokenize_prompt([5, 6]) == [5, 6]
    assert await dp.tokenize_prompt(CONT, {"x": 9}, add_generation_prompt=False,
                                    continue_final_message=True) == [2, 0, 1, 9]
    with pytest.raises(ChatOptionsError):
        await dp.tokenize_prompt(CONT, continue_final_message=True)
    # truncate_prompt_tokens goes through the engine's method (DP included)
    req = SimpleNamespace(truncate_prompt_tokens=2, add_special_tokens=True)
    assert await truncate_prompts(dp, ["abc", [1, 2, 3]], req, 4) == [[98, 99], [2, 3]]
    assert await truncate_prompts(dp, [CONT], req, 4, chat_kwargs={"x": 7},
                                  chat_options={"add_generation_prompt": False,
                                                "continue_final_message": True}) == [[1, 7]]
