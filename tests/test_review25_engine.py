"""Review 25, engine core and in-process APIs as a vLLM user calls them: AsyncLLM-style
`generate(prompt=..., sampling_params=..., request_id=...)`, `SamplingParams.output_kind`
(RequestOutputKind DELTA / CUMULATIVE / FINAL_ONLY), `abort` of several ids at once, and
RequestOutput.num_cached_tokens. The engine runs FakeKVRunner (tests/engine_fakes.py), whose
sampled tokens depend on the KV read back through the block tables."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from engine_fakes import FakeKVRunner

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.errors import InvalidRequestError
from atom_stream.sampling_params import RequestOutputKind
from atom_stream.tokenizer import load_tokenizer


def fake_engine(num_kv_blocks: int = 64, delay: float = 0.0, **kw) -> AsyncEngine:
    runner = FakeKVRunner(num_kv_blocks, 16, delay=delay)
    return AsyncEngine(EngineConfig(model="demo", **kw), runner=runner,
                       tokenizer=load_tokenizer(None))


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


async def collect(agen) -> list:
    return [o async for o in agen]


def pool_is_full(engine: AsyncEngine) -> bool:
    core = engine.core
    return (core.block_manager.num_used == 0 and not core.requests and not engine._slots
            and core.block_manager.num_free_blocks == core.block_manager.num_blocks)


async def test_generate_takes_vllm_keyword_sampling_params():
    prompt = [11, 12, 13, 14, 15]
    async with fake_engine() as engine:
        # vLLM's examples/offline_inference/async_llm_streaming.py calls it this way
        outs = await collect(engine.generate(prompt=prompt, sampling_params=greedy(6),
                                             request_id="kw-1"))
        ref = engine.core.runner.reference(prompt, 6)
        assert [t for o in outs for t in o.token_ids] == ref
        assert outs[-1].finish_reason == "length" and outs[-1].request_id == "kw-1"
        with pytest.raises(InvalidRequestError, match="sampling_params"):
            await collect(engine.generate(prompt, greedy(2), sampling_params=greedy(2)))
        assert pool_is_full(engine)


def test_output_kind_values_and_errors():
    assert SamplingParams().output_kind is RequestOutputKind.DELTA
    assert SamplingParams(output_kind=2).output_kind is RequestOutputKind.FINAL_ONLY
    assert SamplingParams(output_kind=RequestOutputKind.CUMULATIVE).output_kind == 0
    for bad in (3, -1, True, "delta", None):
        with pytest.raises(ValueError, match="output_kind"):
            SamplingParams(output_kind=bad)
    params = SamplingParams()
    params.output_kind = 2  # set after construction: re-validated where the engine takes it
    params.validate()
    params.output_kind = 7
    with pytest.raises(ValueError, match="output_kind"):
        params.validate()


async def test_output_kinds_shape_the_stream():
    prompt = [21, 22, 23, 24, 25, 26, 27]
    async with fake_engine(delay=0.001) as engine:
        ref = engine.core.runner.reference(prompt, 9)
        deltas = await collect(engine.generate(
            prompt, greedy(9, logprobs=1, output_kind=RequestOutputKind.DELTA)))
        assert [t for o in deltas for t in o.token_ids] == ref

        cum = await collect(engine.generate(
            prompt, greedy(9, logprobs=1, output_kind=RequestOutputKind.CUMULATIVE)))
        assert len(cum) >= 2
        for a, b in itertools.pairwise(cum):
            assert b.token_ids[:len(a.token_ids)] == a.token_ids  # each one extends the last
            assert len(b.token_ids) > len(a.token_ids)
        assert cum[-1].token_ids == ref and len(cum[-1].logprobs) == 9
        assert cum[0].prompt_token_ids == prompt and cum[0].finish_reason is None
        assert cum[0].token_ids == ref[:len(cum[0].token_ids)]  # not changed by later merges
        assert cum[-1].finish_reason == "length" and cum[-1].usage.completion_tokens == 9

        final = await collect(engine.generate(
            prompt, greedy(9, logprobs=1, output_kind=RequestOutputKind.FINAL_ONLY)))
        assert len(final) == 1
        (out,) = final
        assert out.token_ids == ref and out.finish_reason == "length"
        assert out.prompt_token_ids == prompt and len(out.logprobs) == 9
        assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 9
        assert pool_is_full(engine)


async def test_final_only_stream_aborted_ends_with_its_abort_output():
    async with fake_engine(delay=0.002) as engine:
        agen = engine.generate([5] * 20, greedy(2000, output_kind=RequestOutputKind.FINAL_ONLY),
                               request_id="fo")
        task = asyncio.create_task(collect(agen))
        while not engine.core.requests or not engine.core.requests["fo"].seq.num_output_tokens:
            await asyncio.sleep(0.002)
        await engine.abort("fo")
        (out,) = await task
        assert out.finish_reason == "abort" and out.token_ids  # what it made before the abort
        assert out.usage.completion_tokens == len(out.token_ids)
        assert pool_is_full(engine)


async def test_abort_takes_an_iterable_of_ids():
    async with fake_engine(delay=0.002) as engine:
        tasks = {rid: asyncio.create_task(collect(engine.generate([7, 8, 9], greedy(40),
                                                                  request_id=rid)))
                 for rid in ("a", "b", "c")}
        while len(engine.core.requests) < 3:
            await asyncio.sleep(0.002)
        await engine.abort(["a", "b", "missing"])  # vLLM: abort(request_id | Iterable[str])
        await engine.abort(iter(()))
        assert (await tasks["a"])[-1].finish_reason == "abort"
        assert (await tasks["b"])[-1].finish_reason == "abort"
        assert (await tasks["c"])[-1].finish_reason == "length"
        assert pool_is_full(engine)


async def test_num_cached_tokens_like_vllm():
    prompt = list(range(40, 80))  # 40 tokens: two full blocks of 16 can be reused
    async with fake_engine() as engine:
        first = await collect(engine.generate(prompt, greedy(3)))
        again = await collect(engine.generate(prompt, greedy(3)))
        # vLLM: the count is on every output of the request, not only the final one
        assert all(o.num_cached_tokens == 0 for o in first)
        assert first[-1].num_cached_tokens == 0
        assert again[-1].num_cached_tokens == 32 == again[-1].usage.cached_tokens
