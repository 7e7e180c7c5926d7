"""The engine-core guarantees on the GPU (`pytest -m gpu` on the device; issue 7 "everything of
the engine-core issue still holds"): batch invariance under preemption and chunked prefill with
decode graphs, aborts mid-stream free every block and leave the other streams' tokens unchanged,
and prefix-cache hits give the cold run's tokens. Demo model in float32 on CUDA."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from test_engine_core import mixed_requests as requests
from test_engine_core import run as run_all

from atom_stream import EngineConfig, SamplingParams
from atom_stream.engine.async_engine import AsyncEngine
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.outputs import RequestOutput

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a GPU", allow_module_level=True)


def gpu_engine(**kw) -> LLMEngine:
    kw.setdefault("max_model_len", 512)
    return LLMEngine(EngineConfig(model="demo", device="cuda", dtype="float32", **kw))


def run(engine: LLMEngine, reqs) -> dict[str, RequestOutput]:
    """Submit all, step to completion, check no block leaked; {id: merged output}."""
    return run_all(engine, reqs)[0]


def test_batch_invariance_with_graphs_preemption_and_chunked_prefill():
    reqs = requests(48, 0)
    alone = gpu_engine(num_kv_blocks=64, enable_prefix_caching=False, max_num_seqs=8)
    expected = {rid: run(alone, [(rid, ids, p)])[rid].token_ids for rid, ids, p in reqs}
    crowd = gpu_engine(num_kv_blocks=24, max_num_batched_tokens=64, max_num_seqs=32,
                       max_model_len=384)  # the pool's 24 x 16 tokens
    assert crowd.runner.graphs is not None
    got = run(crowd, reqs)
    assert crowd.stats()["num_preemptions"] > 0
    for rid, _, p in reqs:
        assert got[rid].token_ids == expected[rid], rid
        assert len(got[rid].token_ids) == p.max_tokens


def test_prefix_cache_hit_gives_the_cold_tokens():
    rng = random.Random(1)
    prefix = [rng.randrange(256) for _ in range(200)]
    b = prefix + [rng.randrange(256) for _ in range(13)]
    p = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    want = run(gpu_engine(num_kv_blocks=64, enable_prefix_caching=False), [("b", b, p)])
    warm = gpu_engine(num_kv_blocks=64)
    run(warm, [("a", prefix + [1, 2, 3], p)])
    out = run(warm, [("b", b, p)])["b"]
    assert out.usage.cached_tokens == 192
    assert out.token_ids == want["b"].token_ids


def test_aborts_mid_stream_leave_others_unchanged_and_no_blocks():
    reqs = requests(24, 2, max_len=60)
    for _, _, p in reqs:
        p.max_tokens = 40
    solo = gpu_engine(num_kv_blocks=128)
    expected = {rid: run(solo, [(rid, ids, p)])[rid].token_ids for rid, ids, p in reqs[::2]}

    async def main():
        async with AsyncEngine(EngineConfig(model="demo", device="cuda", dtype="float32",
                                            num_kv_blocks=128, max_model_len=512)) as eng:
            async def consume(rid, ids, p, abort_after):
                toks = []
                async for o in eng.generate(ids, p, request_id=rid):
                    toks += o.token_ids
                    if abort_after is not None and len(toks) >= abort_after:
                        await eng.abort(rid)
                return rid, toks, o.finish_reason

            results = await asyncio.gather(*(
                consume(rid, ids, p, None if i % 2 == 0 else 3 + i)
                for i, (rid, ids, p) in enumerate(reqs)))
            for _ in range(100):
                if eng.stats()["used_blocks"] == 0:
                    break
                await asyncio.sleep(0.01)
            return results, eng.stats()

    results, stats = asyncio.run(main())
    assert stats["used_blocks"] == 0
    for rid, toks, reason in results:
        if rid in expected:
            assert toks == expected[rid] and reason == "length", rid
        else:
            assert reason == "abort" and len(toks) < 40, rid
