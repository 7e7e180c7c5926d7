"""bad_words (vLLM's SamplingParams.bad_words): tokenization as vLLM's update_from_tokenizer,
the per-step ban as vLLM's apply_bad_words (output tokens only, in the sampler after
allowed_token_ids and before min_tokens / logit_bias / penalties), the engine and LLM APIs on the
demo model (greedy outputs lose the word; other requests in the batch keep their tokens), and the
HTTP field on /v1/chat/completions and /v1/completions with 400s naming `bad_words`.

Demo tokenizer: byte-level, so "au" is [97, 117] and " au" is [32, 97, 117] (a different length:
vLLM's rule keeps only the bare form).
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from engine_fakes import FakeKVRunner
from serving_helpers import running_server

from atom_stream import LLM, EngineConfig, SamplingParams
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.outputs import RequestOutput
from atom_stream.engine.sequence import Sequence
from atom_stream.errors import InvalidRequestError
from atom_stream.layers.sampler import (
    Sampler,
    SamplingMetadata,
    bad_word_bans,
    needs_host_tokens,
)
from atom_stream.sampling_params import (
    MAX_BAD_WORDS_TOTAL_TOKENS,
    MAX_NUM_BAD_WORDS,
    SamplingParamsError,
    tokenize_bad_words,
)
from atom_stream.tokenizer import load_tokenizer

V = 320  # demo vocab
A, U = 97, 117  # "a", "u"


def demo_encode(text: str) -> list[int]:
    return load_tokenizer(None).encode(text, add_special_tokens=False)


def with_ids(params: SamplingParams, vocab: int = V) -> SamplingParams:
    """params as the engine hands them to the sampler (tokenized with the demo tokenizer)."""
    params._bad_words_token_ids = tokenize_bad_words(params.bad_words, demo_encode, vocab)
    return params


def seq(params: SamplingParams, prompt=(1, 2, 3), output=(), rid="r") -> Sequence:
    s = Sequence(rid, list(prompt), params, max_tokens=1000, eos_token_ids=(257, 262))
    s.token_ids.extend(output)
    return s


# ------------------------------------------------------------------ tokenization (vLLM's rules)

class WordTokenizer:
    """A word-level tokenizer whose leading-space forms are chosen per test."""

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def __call__(self, text: str) -> list[int]:
        return list(self.table[text])


def test_byte_level_keeps_only_the_bare_form():
    assert tokenize_bad_words(["au"], demo_encode, V) == [[A, U]]
    # words are left-stripped first (vLLM: prefix + bad_word.lstrip())
    assert tokenize_bad_words(["  au"], demo_encode, V) == [[A, U]]
    assert tokenize_bad_words(["u"], demo_encode, V) == [[U]]
    # special names tokenize to their ids, as an HF tokenizer's added tokens do
    assert tokenize_bad_words(["<|im_end|>"], demo_encode, V) == [[262]]


def test_space_form_kept_only_when_a_different_token_of_the_same_length():
    enc = WordTokenizer({"foo": [5], " foo": [6],             # new word token: kept
                         "bar": [7], " bar": [7],             # same first id: dropped
                         "baz qux": [8, 9], " baz qux": [10, 9],  # same length, differs: kept
                         "zap": [11], " zap": [12, 11]})      # longer: dropped
    assert tokenize_bad_words(["foo", "bar", "baz qux", "zap"], enc, 100) == [
        [5], [6], [7], [8, 9], [10, 9], [11]]


def test_tokenization_errors_name_bad_words():
    with pytest.raises(SamplingParamsError) as e:
        tokenize_bad_words([" "], demo_encode, V)  # lstrip -> "" -> no tokens
    assert e.value.param == "bad_words"
    # the space form may tokenize to nothing: the bare form is still enforced
    assert tokenize_bad_words(["x"], WordTokenizer({"x": [3], " x": []}), 10) == [[3]]
    with pytest.raises(SamplingParamsError, match="vocabulary size is 100"):
        tokenize_bad_words(["au"], demo_encode, 100)
    long = [f"{i:03d}abcdefg" for i in range(MAX_BAD_WORDS_TOTAL_TOKENS // 10 + 1)]  # 10 ids
    assert len(tokenize_bad_words(long[:-1], demo_encode, V)) == len(long) - 1
    with pytest.raises(SamplingParamsError, match="total bad word tokens"):
        tokenize_bad_words(long, demo_encode, V)
    two_each = WordTokenizer({w: ids for i in range(MAX_NUM_BAD_WORDS)
                              for w, ids in ((f"w{i}", [i]), (f" w{i}", [1000 + i]))})
    with pytest.raises(SamplingParamsError, match="too many bad words after tokenization"):
        tokenize_bad_words([f"w{i}" for i in range(65)], two_each, 2000)
    assert len(tokenize_bad_words([f"w{i}" for i in range(64)], two_each, 2000)) == 128


@pytest.mark.parametrize("bad", ["au", [""], ["a", 1], ("a",), [None],
                                 [f"w{i}" for i in range(MAX_NUM_BAD_WORDS + 1)]])
def test_params_validation(bad):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(bad_words=bad)
    assert e.value.param == "bad_words"


def test_params_normalization():
    assert SamplingParams(bad_words=None).bad_words == []
    assert SamplingParams(bad_words=["b", "a", "b"]).bad_words == ["b", "a"]  # vLLM dedups
    assert SamplingParams().bad_words_token_ids is None
    # only the engine sets the token ids: a constructor (or a WebSocket params dict) cannot
    assert SamplingParams(bad_words=["a"], _bad_words_token_ids=[[1]]).bad_words_token_ids is None
    c = SamplingParams(bad_words=["a"], n=2, seed=1, temperature=1.0).child(1)
    assert c.bad_words == ["a"] and c.seed == 2


# ------------------------------------------------------------------------- sampler (per step)

def test_bans_follow_output_tokens_only():
    words = [[A, U], [5], [1, 2, 3]]
    prompt = [9, 1, 2]
    assert bad_word_bans(prompt, 0, words) == [5]  # the prompt never completes a prefix
    assert bad_word_bans(prompt + [A], 1, words) == [U, 5]
    assert bad_word_bans(prompt + [A, 4], 2, words) == [5]
    assert bad_word_bans(prompt + [3, 1, 2], 3, words) == [5, 3]
    assert bad_word_bans([9, 1] + [2], 1, words) == [5]  # 1 is prompt: not a match


def test_sampler_bans_in_context_and_is_row_local():
    logits = torch.zeros(4, V)
    logits[:, U] = 5.0  # the argmax of every row
    logits[:, 66] = 4.0
    g = {"temperature": 0.0, "max_tokens": 8}
    rows = [seq(with_ids(SamplingParams(bad_words=["au"], **g)), output=[A]),  # banned
            seq(with_ids(SamplingParams(bad_words=["au"], **g)), output=[66]),  # no context
            seq(with_ids(SamplingParams(bad_words=["au"], **g)), prompt=[1, A]),  # prompt: no
            seq(SamplingParams(**g), output=[A])]  # no bad words
    md = SamplingMetadata.from_sequences(rows, V, "cpu")
    assert Sampler()(logits, md).token_ids.tolist() == [66, U, U, U]
    assert md.bad_pos.tolist() == [U]  # row 0 only


def test_single_token_word_always_banned_random_rows_too():
    logits = torch.full((1, V), -5.0)
    logits[0, U] = 10.0  # p(U) ~ 1 - 319 e^-15 without the ban
    for seed in range(20):
        kw = {"temperature": 1.0, "seed": seed, "max_tokens": 8}
        for out in ([], [A], [U, U]):
            banned = SamplingMetadata.from_sequences(
                [seq(with_ids(SamplingParams(bad_words=["u"], **kw)), output=out)], V, "cpu")
            free = SamplingMetadata.from_sequences([seq(SamplingParams(**kw), output=out)],
                                                   V, "cpu")
            assert Sampler()(logits, banned).token_ids.item() != U
            assert Sampler()(logits, free).token_ids.item() == U


def test_ban_holds_against_allowed_ids_and_bias():
    """vLLM's order is allowed_token_ids, bad words, then min_tokens / logit_bias / penalties;
    as every step before the penalties writes -inf or adds, only the outcome is observable: an
    allowed id can still be banned and a +100 bias cannot lift a ban."""
    logits = torch.zeros(1, V)
    p = with_ids(SamplingParams(temperature=0.0, bad_words=["u"], allowed_token_ids=[U, 66],
                                logit_bias={U: 100.0}, min_tokens=0))
    md = SamplingMetadata.from_sequences([seq(p)], V, "cpu")
    assert Sampler()(logits, md).token_ids.item() == 66


def test_no_bad_words_no_work():
    p = SamplingParams(temperature=0.0)
    md = SamplingMetadata.from_sequences([seq(p, output=[A])], V, "cpu")
    assert md.bad_pos is None and md.no_penalties
    assert not needs_host_tokens(p)
    assert not needs_host_tokens(with_ids(SamplingParams(bad_words=["u", "<|im_end|>"])))
    assert needs_host_tokens(with_ids(SamplingParams(bad_words=["u", "au"])))


# ----------------------------------------------------------------------- engine (demo model)

def demo_engine(**kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model="demo", device="cpu", dtype="float32", **kw),
                     tokenizer=load_tokenizer(None))


def run(engine: LLMEngine, reqs) -> dict[str, list[int]]:
    for rid, ids, p in reqs:
        engine.add_request(rid, ids, p)
    merged: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            merged.setdefault(o.request_id, RequestOutput(o.request_id)).merge(o)
    return {k: v.token_ids for k, v in merged.items()}


def has_run(ids: list[int], word: list[int]) -> int:
    """The first index where `word` occurs in ids, or -1."""
    k = len(word)
    return next((i for i in range(len(ids) - k + 1) if ids[i:i + k] == word), -1)


CAT = demo_encode("The cat sat on")  # greedy: [276, 198, 97, 117, 117, 97, ...] ("auua")
GREEDY = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_greedy_output_loses_the_word(async_scheduling):
    eng = demo_engine(async_scheduling=async_scheduling)
    base = run(eng, [("b", CAT, SamplingParams(**GREEDY))])["b"]
    j = has_run(base, [A, U])
    assert j >= 0, base  # the precondition: the unbanned output contains "au"
    got = run(eng, [("w", CAT, SamplingParams(bad_words=["au"], **GREEDY))])["w"]
    assert has_run(got, [A, U]) < 0, got
    assert got[:j + 1] == base[:j + 1] and got[j + 1] != U  # only the completing token changed
    one = run(eng, [("u", CAT, SamplingParams(bad_words=["u"], **GREEDY))])["u"]
    assert U in base and U not in one, one  # a one-token word: never generated


def test_multi_token_word_banned_only_in_context():
    """"au" bans "u" right after an output "a" only: "u" elsewhere, and "u" as the first token
    after a prompt ending in "a", stay allowed."""
    eng = demo_engine()
    got = run(eng, [("w", CAT, SamplingParams(bad_words=["au"], **GREEDY))])["w"]
    assert has_run(got, [A, U]) < 0
    prompt = CAT + [A]
    first = run(eng, [("p", prompt, SamplingParams(**GREEDY))])["p"]
    again = run(eng, [("q", prompt, SamplingParams(bad_words=["au"], **GREEDY))])["q"]
    assert first == again  # the prompt's trailing "a" is no context (vLLM: outputs only)


def test_batch_invariance_with_and_without_bad_words():
    prompts = [demo_encode(t) for t in ("Hello there", "The cat sat on", "abc", "xyz", "Hi")]
    plain = {f"p{i}": run(demo_engine(), [(f"p{i}", ids, SamplingParams(**GREEDY))])[f"p{i}"]
             for i, ids in enumerate(prompts)}
    mixed = [(f"p{i}", ids, SamplingParams(**GREEDY)) for i, ids in enumerate(prompts)]
    banned = [(f"b{i}", ids, SamplingParams(bad_words=["au", "u", "ja"], **GREEDY))
              for i, ids in enumerate(prompts)]
    reqs = [r for pair in zip(mixed, banned) for r in pair]
    got = run(demo_engine(), reqs)
    for rid, toks in plain.items():
        assert got[rid] == toks, rid
    assert got["b1"] != plain["p1"]  # the bad words did act on their own rows


def test_engine_copies_params_and_refuses_without_tokenizer():
    eng = LLMEngine(EngineConfig(model="demo"), runner=FakeKVRunner(),
                    tokenizer=load_tokenizer(None))
    p = SamplingParams(bad_words=["au"], max_tokens=2)
    s = eng.add_request("r", CAT, p)
    assert s.params.bad_words_token_ids == [[A, U]]
    assert p.bad_words_token_ids is None  # the caller's object is untouched (vLLM clones)
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("s", CAT, SamplingParams(bad_words=["\t"]))
    assert e.value.param == "bad_words"
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request("d", CAT, {"bad_words": [""]})
    assert e.value.param == "bad_words"
    bare = LLMEngine(EngineConfig(model="demo"), runner=FakeKVRunner(), skip_tokenizer_init=True)
    with pytest.raises(InvalidRequestError) as e:
        bare.add_request("r", CAT, SamplingParams(bad_words=["au"]))
    assert e.value.param == "bad_words"


def test_llm_generate_accepts_bad_words():
    llm = LLM(model="demo", device="cpu", dtype="float32", num_kv_blocks=32)
    base, banned = (llm.generate(prompt_token_ids=[CAT], sampling_params=SamplingParams(
        **GREEDY, **kw))[0].token_ids for kw in ({}, {"bad_words": ["au"]}))
    assert has_run(base, [A, U]) >= 0 and has_run(banned, [A, U]) < 0


# ----------------------------------------------------------------------------------- HTTP

@pytest.fixture(scope="module")
def http():
    with running_server() as s, httpx.Client(base_url=s.url, timeout=60) as c:
        yield c


def _text(r: httpx.Response, chat: bool) -> str:
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["message"]["content"] if chat else c["text"]


@pytest.mark.parametrize("route, body, word", [
    ("/v1/completions", {"prompt": "The cat sat on"}, "au"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, "ja"),
])
def test_http_field_on_both_endpoints(http, route, body, word):
    """vLLM serves bad_words on chat (ChatCompletionRequest) and completions (PR #46793)."""
    chat = "messages" in body
    body = {**body, "max_tokens": 16, "temperature": 0}
    before = _text(http.post(route, json=body), chat)
    assert word in before, before  # the precondition
    after = _text(http.post(route, json={**body, "bad_words": [word]}), chat)
    assert word not in after and after != before, after
    r = http.post(route, json={**body, "bad_words": [word], "stream": True})
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.split("\n\n")
              if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") if chat
                       else c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == after


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("bad", ["au", None, [""], [1], ["   "], [{"a": 1}],
                                 [f"w{i}" for i in range(MAX_NUM_BAD_WORDS + 1)]])
def test_http_bad_input_is_a_400_naming_the_field(http, route, bad):
    body = {"max_tokens": 2, "bad_words": bad}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if "chat" in route
                else {"prompt": "hi"})
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    # schema errors name the JSON path (bad_words[0]), as every field's do here
    assert r.json()["error"]["param"].startswith("bad_words"), r.text
