"""Data parallelism (DPEngine, dp=2) on the demo model, CPU: 20 concurrent greedy requests give a
single engine's tokens and split 10/10 over the replicas; abort (explicit and by closing the
stream) works and frees the replica; metrics carry an engine label; dp=2 x tp=2 (private process
groups per replica) gives the same tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import generate_latest

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.engine.dp import DPEngine, make_async_engine
from atom_stream.errors import InvalidRequestError


def _config(**kw) -> EngineConfig:
    return EngineConfig(model="demo", device="cpu", dtype="float32", num_kv_blocks=96,
                        block_size=16, max_model_len=256, **kw)


PROMPTS = [torch.randint(0, 256, (4 + 3 * (i % 7),),
                         generator=torch.Generator().manual_seed(i)).tolist() for i in range(20)]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


async def _run_all(engine, prompts) -> list[list[int]]:
    async def one(i, prompt):
        toks = []
        async for out in engine.generate(prompt, PARAMS, request_id=f"r{i}"):
            toks += out.token_ids
        return toks

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


@pytest.fixture(scope="module")
def want():
    async def run():
        async with AsyncEngine(_config()) as engine:
            return await _run_all(engine, PROMPTS)

    return asyncio.run(run())


def test_make_async_engine_picks_the_class():
    assert type(make_async_engine(_config())) is AsyncEngine
    assert type(make_async_engine(_config(data_parallel_size=2))) is DPEngine


async def test_dp2_concurrent_requests_match_single_engine_and_split_load(want):
    async with DPEngine(_config(data_parallel_size=2)) as engine:
        got = await _run_all(engine, PROMPTS)
        assert got == want
        stats = engine.stats()
        per = [r["finished"]["length"] for r in stats["replicas"]]
        assert per == [10, 10]  # least outstanding, ties round robin: alternate
        assert stats["finished"]["length"] == 20 and stats["outstanding"] == [0, 0]
        assert stats["generation_tokens"] == 20 * 12
        text = generate_latest(engine.metrics.registry).decode()
        assert 'engine="0"' in text and 'engine="1"' in text
        assert "atom_stream:request_success_total" in text
        assert not engine.is_dead and engine.max_model_len == 256


async def test_dp2_least_outstanding_and_abort():
    async with DPEngine(_config(data_parallel_size=2)) as engine:
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        a = engine.generate([1, 2, 3], long, request_id="a")  # replica 0
        first = await a.__anext__()
        assert first.token_ids and engine.outstanding == [1, 0]
        b = engine.generate([4, 5], long, request_id="b")  # replica 1
        await b.__anext__()
        assert engine.outstanding == [1, 1]
        with pytest.raises(InvalidRequestError):
            await engine.generate([7], long, request_id="a").__anext__()
        # explicit abort: the stream ends with finish_reason "abort"
        await engine.abort("a")
        last = None
        async for out in a:
            last = out
        assert last.finish_reason == "abort" and engine.outstanding == [0, 1]
        # the freed replica 0 is now the least loaded
        c = engine.generate([8, 9], long, request_id="c")
        await c.__anext__()
        assert engine.outstanding == [1, 1]
        # an iterable of ids (vLLM's AsyncLLM.abort), each on its own replica; unknown ignored
        await engine.abort(["c", "nope"])
        async for out in c:
            last = out
        assert last.finish_reason == "abort" and engine.outstanding == [0, 1]
        # closing a stream (client went away) aborts its request on its replica at once
        await b.aclose()
        assert engine.outstanding == [0, 0]
        for _ in range(100):
            s = engine.stats()
            if s["num_running"] == 0 and s["used_blocks"] == 0:
                break
            await asyncio.sleep(0.01)
        assert s["num_running"] == 0 and s["used_blocks"] == 0
        assert s["finished"]["abort"] == 3


async def test_dp2_tp2_private_groups_match_single_engine(want):
    """Two TP=2 replicas in one process: each has its own worker and private process group."""
    async with DPEngine(_config(data_parallel_size=2, tensor_parallel_size=2)) as engine:
        got = await _run_all(engine, PROMPTS[:4])
        assert [r["finished"]["length"] for r in engine.stats()["replicas"]] == [2, 2]
    assert got == want[:4]


async def test_dp2_chat_options_reach_the_replica():
    """The OpenAI server passes AsyncEngine.generate's chat options on every chat request: a
    DP engine forwards them (a TypeError before)."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The"}]
    p = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    async with DPEngine(_config(data_parallel_size=2)) as engine:
        outs = [o async for o in engine.generate(msgs, p, add_generation_prompt=False,
                                                 continue_final_message=True)]
    assert outs[-1].finish_reason == "length"
    # the prompt ends inside the assistant message: no end-of-turn token after "The"
    assert outs[0].prompt_token_ids[-3:] == list(b"The")


async def test_dp2_reserve_holds_places_across_replicas():
    """DPEngine.reserve (the HTTP routes hold their places while they tokenize): past the
    replicas' summed bound a reservation is a 503 before any tokenizing, and the places come
    back when the block ends."""
    from atom_stream.errors import EngineOverloadedError
    async with DPEngine(_config(data_parallel_size=2, max_num_seqs=2,
                                max_waiting_requests=1)) as engine:
        cap = engine.max_live_requests
        assert cap == 6
        with engine.reserve(cap - 1):
            with pytest.raises(EngineOverloadedError), engine.reserve(2):
                pass
            with engine.reserve(1):
                pass
        with engine.reserve(cap):  # all free again
            pass
