"""Request admission is all or nothing, in vLLM's order of validation.

vLLM (v1 AsyncLLM.add_request -> InputProcessor.process_inputs): the params are validated first
(`_validate_params`), then the prompt is tokenized and checked (`_validate_model_inputs`: empty,
out of vocabulary, longer than max_model_len), and only then is anything registered; n > 1 fans
out into child requests after every check passed. Its OpenAI server renders (tokenizes and
length-checks) every prompt once before it submits any request.

Here: AsyncEngine.generate checks the params before tokenizing (a bad request costs no
tokenization) and a refused request (too long with n > 1, a duplicate live id, bad params)
leaves no slot, no core request and no KV block, while a live request runs on untouched; the
OpenAI routes tokenize each prompt once (its n children share the ids) and refuse a batch with
a too-long prompt before any child request exists. Without a tokenizer, bad_words / stop are
refused (vLLM would silently not enforce them).
"""

from __future__ import annotations

import asyncio
import types

import pytest
from engine_fakes import FakeKVRunner

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.errors import InvalidRequestError, PromptTooLongError
from atom_stream.server.openai import OpenAIServing
from atom_stream.tokenizer import load_tokenizer

LIMIT = 64  # max_model_len: a 4-block pool of 16-token blocks


def counting_tokenizer():
    """The demo tokenizer, counting its encode calls (text prompts and bad words)."""
    tok = load_tokenizer(None)
    calls: list[str] = []
    encode = tok.encode

    def counted(text, *a, **kw):
        calls.append(text)
        return encode(text, *a, **kw)

    tok.encode = counted
    return tok, calls


def engine(tok=None, runner=None) -> AsyncEngine:
    runner = runner or FakeKVRunner(4, 16, delay=0.002)
    return AsyncEngine(EngineConfig(model="demo"), runner=runner,
                       tokenizer=tok if tok is not None else load_tokenizer(None))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def snapshot(eng: AsyncEngine) -> tuple:
    s = eng.stats()
    return (sorted(eng.core.requests), sorted(eng._slots), s["used_blocks"], s["num_running"],
            s["num_waiting"], s["prompt_tokens"], s["finished"])


REFUSED = [  # (request_id, prompt, params): each refused for one reason or more
    (None, [1] * LIMIT, SamplingParams(n=2, temperature=1.0, max_tokens=4)),
    ("live", [1] * LIMIT, greedy(4)),
    ("live", [1, 2], SamplingParams(n=2, temperature=1.0)),
    (None, [1] * LIMIT, greedy(4)),
    (None, "x" * (4 * LIMIT), greedy(4)),
    (None, [1] * LIMIT, {"temperature": -1}),
    (None, [1] * LIMIT, SamplingParams(max_tokens=4, logit_bias={999: 1.0})),
    (None, [1] * LIMIT, SamplingParams(max_tokens=4, bad_words=["\t"])),
    (None, [1, 999], greedy(4)),
]


async def test_refused_requests_leave_nothing_registered_and_others_run_on():
    runner = FakeKVRunner(4, 16, delay=0.002)
    async with engine(runner=runner) as eng:
        assert eng.max_model_len == LIMIT
        live = eng.generate([5, 6, 7], greedy(30), request_id="live")
        tokens = list((await live.__anext__()).token_ids)
        before = snapshot(eng)
        for rid, prompt, params in REFUSED:
            with pytest.raises(InvalidRequestError):  # PromptTooLongError is one
                await eng.generate(prompt, params, request_id=rid).__anext__()
            assert snapshot(eng) == before, (rid, params)  # nothing registered or allocated
        async for out in live:
            tokens.extend(out.token_ids)
        assert tokens == runner.reference([5, 6, 7], 30, ignore_eos=True)
        # the control: a prompt one token shorter is admitted (max_tokens capped to 1)
        outs = [o async for o in eng.generate([1] * (LIMIT - 1), SamplingParams(max_tokens=4))]
        assert outs[-1].finish_reason == "length" and outs[-1].usage.completion_tokens == 1
        assert eng.stats()["used_blocks"] == 0 and not eng.core.requests and not eng._slots


@pytest.mark.parametrize("params, param", [
    (SamplingParams(max_tokens=4, logit_bias={999: 1.0}), "logit_bias"),
    (SamplingParams(max_tokens=4, allowed_token_ids=[1, 400]), "allowed_token_ids"),
    ({"temperature": -1}, "temperature"),
    ({"n": 0, "temperature": 1.0}, "n"),
])
async def test_params_are_checked_before_the_prompt(params, param):
    """vLLM's process_inputs order: bad params are the answer even for a too-long prompt, and
    a bad request's text prompt is never tokenized."""
    tok, calls = counting_tokenizer()
    async with engine(tok) as eng:
        for prompt in ([1] * LIMIT, "x" * (4 * LIMIT), "hello"):
            with pytest.raises(InvalidRequestError) as e:
                await eng.generate(prompt, params).__anext__()
            assert e.value.param == param and not isinstance(e.value, PromptTooLongError)
        assert calls == []
        assert not eng.core.requests and not eng._slots


async def test_checked_params_are_run_as_checked():
    """generate checks the params once (bad words tokenized once, on a copy); the request
    runs with that copy, the caller's object untouched."""
    tok, calls = counting_tokenizer()
    async with engine(tok) as eng:
        p = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0, bad_words=["au"])
        agen = eng.generate([1, 2, 3], p, request_id="r")
        await agen.__anext__()
        assert calls == ["au", " au"]  # vLLM's two forms of the word, encoded once each
        seq = eng.core.requests["r"].seq
        assert seq.params.bad_words_token_ids == [[97, 117]] and p.bad_words_token_ids is None
        await agen.aclose()


async def test_without_a_tokenizer_text_params_are_refused_not_ignored():
    """skip_tokenizer_init: vLLM skips update_from_tokenizer, so its bad_words (and stop
    strings) are silently not enforced; here they are a 400 naming the field (as vLLM refuses
    structured outputs without a tokenizer), checked before the prompt."""
    async with AsyncEngine(EngineConfig(model="demo"), runner=FakeKVRunner(4, 16),
                           skip_tokenizer_init=True) as eng:
        for params, param in ((SamplingParams(bad_words=["au"]), "bad_words"),
                              (SamplingParams(stop=["x"]), "stop")):
            for prompt in ([1, 2, 3], [1] * LIMIT):
                with pytest.raises(InvalidRequestError) as e:
                    await eng.generate(prompt, params).__anext__()
                assert e.value.param == param
        assert not eng.core.requests and not eng._slots
        outs = [o async for o in eng.generate([1, 2, 3], greedy(2))]
        assert sum(len(o.token_ids) for o in outs) == 2 and "".join(o.text for o in outs) == ""


# ------------------------------------------------------------------ the OpenAI routes

def serving(eng: AsyncEngine) -> OpenAIServing:
    return OpenAIServing(types.SimpleNamespace(config=types.SimpleNamespace(), engine=eng))


def counting_adds(eng: AsyncEngine) -> list[str]:
    added: list[str] = []
    add = eng.core.add_request

    def counted(request_id, *a, **kw):
        added.append(request_id)
        return add(request_id, *a, **kw)

    eng.core.add_request = counted
    return added


async def test_a_batch_with_a_too_long_prompt_submits_no_child():
    async with engine() as eng:
        added = counting_adds(eng)
        srv = serving(eng)
        params = SamplingParams(n=2, temperature=1.0, max_tokens=4)
        for prompts in ([[1, 2], [1] * LIMIT], ["hi", "x" * (4 * LIMIT)]):
            with pytest.raises(PromptTooLongError):
                await srv._start(prompts, params, "cmpl-t", None)
        await asyncio.sleep(0.02)
        assert added == [] and not any(eng.stats()["finished"].values())  # none admitted
        assert eng.stats()["used_blocks"] == 0 and not eng.core.requests and not eng._slots


async def test_each_prompt_is_tokenized_once_for_its_n_choices():
    tok, calls = counting_tokenizer()
    async with engine(tok) as eng:
        added = counting_adds(eng)
        params = SamplingParams(n=3, temperature=1.0, max_tokens=2, ignore_eos=True)
        choices = await serving(eng)._start(["ab", "cd"], params, "cmpl-t", None)
        assert sorted(calls) == ["ab", "cd"] and len(added) == 6
        results = await serving(eng)._collect(choices)
        assert [len(r.token_ids) for r in results] == [2] * 6
        assert [c.index for c in choices] == list(range(6))
        seqs_prompts = {tuple(r.prompt_ids) for r in results}
        assert seqs_prompts == {tuple(tok.encode("ab")), tuple(tok.encode("cd"))}
