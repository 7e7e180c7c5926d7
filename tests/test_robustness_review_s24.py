"""Robustness review (session 24): bad input and failure isolation in AsyncEngine / LLMEngine.

- A request's id and stream are released when its final delta is handed out: a caller that
  reads the final delta with `__anext__` and keeps the (suspended) generator does not keep the
  id "live" nor the stream counted (it did until the generator was resumed or collected).
- A request id that is not a string is refused (vLLM's add_request raises TypeError), in
  AsyncEngine.generate and LLMEngine.add_request, leaving nothing registered.
- A flood past max_num_seqs + max_waiting_requests is refused BEFORE tokenizing: the requests
  still being tokenized count against the bound (each refused one used to be tokenized and
  hold its token list first: unbounded work and memory under a burst of chat requests).
After each case no KV block, core request or stream is left and a greedy request still gives
its alone-run tokens.
"""

from __future__ import annotations

import asyncio

import pytest
from engine_fakes import FakeKVRunner, slow_chat_renders

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.errors import EngineOverloadedError, InvalidRequestError
from atom_stream.tokenizer import load_tokenizer

PROMPT = [5, 6, 7, 8]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def engine(runner: FakeKVRunner, tok=None, **kw) -> AsyncEngine:
    return AsyncEngine(EngineConfig(model="demo", **kw), runner=runner,
                       tokenizer=tok if tok is not None else load_tokenizer(None))


async def tokens(eng: AsyncEngine, prompt, params, rid=None) -> list[int]:
    return [t async for o in eng.generate(prompt, params, rid) for t in o.token_ids]


def assert_clean(eng: AsyncEngine) -> None:
    s = eng.stats()
    assert (s["used_blocks"], s["num_running"], s["num_waiting"], s["num_streams"]) == (0,) * 4
    assert not eng.core.requests and not eng._slots and not eng._tokenizing
    eng.core.block_manager.check_invariants([])


async def test_final_delta_releases_the_id_and_the_stream():
    runner = FakeKVRunner(8, 16, delay=0.001)
    async with engine(runner) as eng:
        agen = eng.generate(PROMPT, greedy(3), "same")
        got: list[int] = []
        while True:  # the final delta read, the generator kept (suspended after its yield)
            out = await agen.__anext__()
            got += out.token_ids
            if out.finish_reason is not None:
                break
        assert out.finish_reason == "length" and got == runner.reference(PROMPT, 3,
                                                                         ignore_eos=True)
        assert_clean(eng)
        # the id is free again while the old generator is still held
        assert await tokens(eng, PROMPT, greedy(3), "same") == got
        with pytest.raises(StopAsyncIteration):
            await agen.__anext__()
        assert_clean(eng)


async def test_a_request_id_that_is_not_a_string_is_refused():
    runner = FakeKVRunner(8, 16, delay=0.001)
    async with engine(runner) as eng:
        for rid in (123, b"ab", ("a",)):
            with pytest.raises(InvalidRequestError) as e:
                await eng.generate(PROMPT, greedy(2), rid).__anext__()
            assert e.value.param == "request_id"
            with pytest.raises(InvalidRequestError) as e:
                eng.core.add_request(rid, PROMPT, greedy(2))
            assert e.value.param == "request_id"
            assert_clean(eng)
        assert await tokens(eng, PROMPT, greedy(4)) == runner.reference(PROMPT, 4,
                                                                       ignore_eos=True)


def test_llm_engine_refuses_a_non_string_id_before_anything():
    eng = LLMEngine(EngineConfig(model="demo"), runner=FakeKVRunner(8, 16),
                    tokenizer=load_tokenizer(None))
    with pytest.raises(InvalidRequestError):
        eng.add_request(7, PROMPT, greedy(2))
    assert not eng.requests and eng.scheduler.num_waiting == 0


async def test_a_flood_past_the_live_bound_is_refused_before_tokenizing():
    tok = load_tokenizer(None)
    calls = slow_chat_renders(tok, 0.05)
    runner = FakeKVRunner(32, 16, delay=0.001)
    async with engine(runner, tok, max_num_seqs=2, max_waiting_requests=2) as eng:
        assert eng.max_live_requests == 4
        msgs = [{"role": "user", "content": "hello"}]
        gens = [eng.generate(msgs, greedy(3)) for _ in range(12)]
        firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
        refused = [f for f in firsts if isinstance(f, EngineOverloadedError)]
        assert len(refused) == 8 and "waiting queue is full" in str(refused[0])
        assert len(calls) == 4  # only the admitted ones were tokenized
        for g, f in zip(gens, firsts):
            if not isinstance(f, BaseException):
                assert [o async for o in g][-1].finish_reason == "length"
        assert_clean(eng)
        eng.check_room(4)  # the front ends' pre-check: 4 more fit, 5 do not
        with pytest.raises(EngineOverloadedError):
            eng.check_room(5)
        # the bound is free again
        ids = await eng.tokenize_prompt(msgs)
        assert await tokens(eng, msgs, greedy(3)) == runner.reference(ids, 3, ignore_eos=True)
        assert_clean(eng)


async def test_vllm_dict_prompts_are_taken_and_bad_ones_refused_clearly():
    """vLLM's AsyncLLM.generate takes TokensPrompt / TextPrompt dicts (LLM.generate here did
    already); a dict without either form is a 400 naming `prompt`, nothing registered."""
    runner = FakeKVRunner(8, 16, delay=0.001)
    async with engine(runner) as eng:
        want = runner.reference(PROMPT, 3, ignore_eos=True)
        assert await tokens(eng, {"prompt_token_ids": PROMPT}, greedy(3)) == want
        text_ids = await eng.tokenize_prompt("hi there")
        assert await tokens(eng, {"prompt": "hi there"}, greedy(3)) == runner.reference(
            text_ids, 3, ignore_eos=True)
        for bad in ({}, {"prompt": 5}, {"prompt_token_ids": "abc"}, {"prompt_token_ids": []},
                    {"prompt_token_ids": [1, 999]}, {"messages": [{"role": "user"}]}):
            with pytest.raises(InvalidRequestError) as e:
                await eng.generate(bad, greedy(2)).__anext__()
            assert e.value.param == "prompt", bad
            assert_clean(eng)
