"""Review 26, the in-process API as vLLM's LLM / AsyncLLM users call it:
RequestOutput.num_cached_tokens on every output of a request (not only the final one),
SamplingParams(logprobs=False) read as 0 (vLLM: a bool is an int), a DP replica's "full"
refusal moved to another replica with room, and LLM.generate over a generator of prompts."""

from __future__ import annotations

import random

import pytest
from test_dp import _config
from test_review25_engine import collect, fake_engine, greedy

from atom_stream import SamplingParams
from atom_stream.engine.dp import DPEngine
from atom_stream.engine.outputs import RequestOutput, Usage
from atom_stream.errors import EngineOverloadedError
from atom_stream.sampling_params import RequestOutputKind

# ---------------------------------------------------------------- num_cached_tokens


async def test_num_cached_tokens_on_every_delta_output():
    prompt = list(range(90, 131))  # 41 tokens: two full blocks of 16 reusable
    async with fake_engine() as engine:
        cold = await collect(engine.generate(prompt, greedy(4)))
        warm = await collect(engine.generate(prompt, greedy(4)))
        cum = await collect(engine.generate(
            prompt, greedy(3, output_kind=RequestOutputKind.CUMULATIVE)))
    assert len(cold) == len(warm) == 4
    assert [o.num_cached_tokens for o in cold] == [0] * 4  # vLLM: set on every output
    assert [o.num_cached_tokens for o in warm] == [32] * 4
    assert [o.num_cached_tokens for o in cum] == [32] * 3


def test_num_cached_tokens_survives_merge_and_prefers_usage():
    a = RequestOutput("r", [1]).set_num_cached_tokens(16)
    b = RequestOutput("r", [2]).set_num_cached_tokens(16)
    assert RequestOutput("r", [3]).merge(a).num_cached_tokens == 16  # a slow reader's slot
    assert a.merge(b).num_cached_tokens == 16
    final = RequestOutput("r", [4], finish_reason="length", usage=Usage(5, 3, 8, 0))
    assert a.merge(final).num_cached_tokens == 0  # the final usage's count is the answer
    assert RequestOutput("r").num_cached_tokens is None


# ---------------------------------------------------------------- logprobs=False


def test_logprobs_false_is_zero_like_vllm():
    p = SamplingParams(logprobs=False, prompt_logprobs=False)
    assert p.logprobs == 0 and p.prompt_logprobs == 0
    assert type(p.logprobs) is int and type(p.prompt_logprobs) is int
    t = SamplingParams(logprobs=True)
    assert t.logprobs == 1 and type(t.logprobs) is int
    assert SamplingParams().logprobs is None  # not asked for: none


async def test_logprobs_false_streams_the_sampled_token_logprob():
    async with fake_engine() as engine:
        outs = await collect(engine.generate([3, 4, 5], greedy(3, logprobs=False)))
    assert [len(o.logprobs) for o in outs] == [1, 1, 1]
    assert all(list(o.logprobs[0]) == o.token_ids for o in outs)


# ---------------------------------------------------------------- DP: a full replica


async def test_dp_full_replica_hands_the_request_to_one_with_room():
    p = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    async with DPEngine(_config(data_parallel_size=2, max_num_seqs=1,
                                max_waiting_requests=1)) as engine:
        r0, r1 = engine.replicas
        # replica 0 is full by its own count (as with an abort it has not applied yet),
        # while the DP counts say both are empty: placement picks it first
        with r0.reserve(r0.max_live_requests):
            outs = [o async for o in engine.generate([1, 2, 3], p, request_id="moved")]
            assert outs[-1].finish_reason == "length" and len(outs) == 3
            assert engine.outstanding == [0, 0] and not engine._owner
            assert r1.stats()["finished"].get("length") == 1
            # an explicit data_parallel_rank is never moved
            with pytest.raises(EngineOverloadedError):
                await engine.generate([1], p, data_parallel_rank=0).__anext__()
            assert engine.outstanding == [0, 0] and not engine._owner
            # no replica with room: the refusal is the caller's
            with r1.reserve(r1.max_live_requests):
                for _ in range(2):
                    with pytest.raises(EngineOverloadedError):
                        await engine.generate([1], p).__anext__()
                assert engine.outstanding == [0, 0] and not engine._owner
        assert r0.stats()["finished"]["length"] == 0


# ---------------------------------------------------------------- LLM.generate prompt forms


def test_llm_generate_takes_a_generator_of_prompts(llm):
    p = SamplingParams(temperature=0.0, max_tokens=2)
    want = llm.generate(["ab", "cd"], p)
    got = llm.generate((s for s in ["ab", "cd"]), p)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.prompt for o in got] == ["ab", "cd"]
    assert llm.llm_engine is llm.engine  # vLLM's attribute name


async def test_async_engine_takes_a_tuple_of_token_ids():
    """LLM.generate takes a tuple of ids; AsyncEngine.generate refused one before."""
    from atom_stream import AsyncEngine
    from atom_stream.config import EngineConfig
    ids = tuple(random.Random().randrange(5, 250) for _ in range(6))
    async with AsyncEngine(EngineConfig(num_kv_blocks=64)) as engine:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        got = [t async for o in engine.generate(ids, params) for t in o.token_ids]
        want = [t async for o in engine.generate(list(ids), params) for t in o.token_ids]
    assert len(got) == 3 and got == want
