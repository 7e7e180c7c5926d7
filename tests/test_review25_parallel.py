"""Review 25, parallel modes on the CPU (gloo): data parallelism (DPEngine, `-dp N`) and expert
parallelism (`enable_expert_parallel`, EP group = TP group) as a vLLM user runs them.

- DP replicas draw unseeded sampling noise from different generators (seed + replica index):
  two concurrent sampled requests, or an `n=2` request's two choices, are not identical copies;
  seeded requests still give a single engine's tokens on any replica.
- DPEngine.generate takes vLLM's `data_parallel_rank` (that replica; out of range: 400).
- DPEngine refuses a non-string request id as AsyncEngine does; its shutdown waits for every
  replica even when one fails; its admission check answers EngineDeadError once every replica
  is dead.
- EP: an MXFP4 checkpoint at TP=2 with EP gives the TP=1 greedy tokens; an expert count the EP
  size does not divide is a ConfigError naming n_routed_experts before any rank is spawned.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import quant_writers as qw
import torch
from serving_helpers import running_server

from atom_stream import AsyncEngine, EngineConfig, SamplingParams
from atom_stream.config import ConfigError
from atom_stream.engine.dp import DPEngine
from atom_stream.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError


def _config(**kw) -> EngineConfig:
    return EngineConfig(model="demo", device="cpu", dtype="float32", num_kv_blocks=64,
                        block_size=16, max_model_len=256, **kw)


async def _tokens(engine, prompt, params, rid) -> list[int]:
    return [t async for out in engine.generate(prompt, params, request_id=rid)
            for t in out.token_ids]


# ---------------------------------------------------------------- data parallel
async def test_dp_replicas_sample_unseeded_requests_independently():
    """Before: every replica's sampler had config.seed, so two concurrent temperature-1
    requests placed on replicas 0 and 1 drew the same noise and came out identical."""
    hot = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=11)
    prompt = [9, 41, 77, 3]
    async with AsyncEngine(_config()) as single:
        want_seeded = await _tokens(single, prompt, seeded, "s")
    async with DPEngine(_config(data_parallel_size=2)) as engine:
        a, b = await asyncio.gather(_tokens(engine, prompt, hot, "a"),
                                    _tokens(engine, prompt, hot, "b"))
        assert [r["finished"]["length"] for r in engine.stats()["replicas"]] == [1, 1]
        assert a != b
        # a request's own seed: the same tokens on either replica as on one engine
        c, d = await asyncio.gather(_tokens(engine, prompt, seeded, "c"),
                                    _tokens(engine, prompt, seeded, "d"))
    assert c == d == want_seeded


def test_dp_server_n2_choices_differ():
    """The OpenAI server fans `n=2` out into two requests, one per replica: before, both
    choices were the same text."""
    with running_server({"data_parallel_size": 2, "num_kv_blocks": 64}) as srv:
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60, trust_env=False,
                       json={"prompt": "data parallel", "max_tokens": 16, "n": 2,
                             "temperature": 1.0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert len(choices) == 2 and choices[0]["text"] != choices[1]["text"]
        stats = srv.wait_idle()
        assert [p["finished"]["length"] for p in stats["replicas"]] == [1, 1]


async def test_dp_request_id_type_and_dead_replicas():
    p = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    async with DPEngine(_config(data_parallel_size=2, max_num_seqs=2,
                                max_waiting_requests=1)) as engine:
        # AsyncEngine's answer; before: TypeError (unhashable list) from the id lookup
        with pytest.raises(InvalidRequestError, match="request_id"):
            await engine.generate([1, 2], p, request_id=["x"]).__anext__()
        assert engine.outstanding == [0, 0]
        with pytest.raises(EngineOverloadedError):
            engine.check_room(engine.max_live_requests + 1)
        for r in engine.replicas:
            r._dead = RuntimeError("injected")
        try:
            with pytest.raises(EngineDeadError), engine.reserve(1):
                pass
        finally:
            for r in engine.replicas:
                r._dead = None


async def test_dp_data_parallel_rank_places_the_request():
    """vLLM's AsyncLLM.generate(..., data_parallel_rank=i): before, a TypeError (the keyword
    reached AsyncEngine.generate)."""
    p = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    async with DPEngine(_config(data_parallel_size=2)) as engine:
        for rid in ("x", "y"):
            outs = [o async for o in engine.generate([3, 4], p, rid, data_parallel_rank=1)]
            assert outs[-1].finish_reason == "length"
        assert [r["finished"]["length"] for r in engine.stats()["replicas"]] == [0, 2]
        for bad in (2, -1, "1"):
            with pytest.raises(InvalidRequestError, match="data_parallel_rank"):
                await engine.generate([3], p, data_parallel_rank=bad).__anext__()
        assert engine.outstanding == [0, 0]


async def test_dp_shutdown_waits_for_every_replica_when_one_fails():
    """Before: replica 0's shutdown error returned at once while replica 1 was still shutting
    down (its step thread left to a task nobody awaited)."""
    engine = await DPEngine(_config(data_parallel_size=2)).start()
    r0, r1 = engine.replicas
    real0, real1 = r0.shutdown, r1.shutdown
    done = []

    async def fails(**kw):
        raise RuntimeError("replica 0 shutdown failed")

    async def slow(**kw):
        await asyncio.sleep(0.05)
        await real1(**kw)
        done.append(True)

    r0.shutdown, r1.shutdown = fails, slow
    try:
        with pytest.raises(RuntimeError, match="replica 0"):
            await engine.shutdown()
        assert done == [True]
    finally:
        await real0()
        await real1()


# ---------------------------------------------------------------- expert parallel
@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ep_mx")
    qw.make_tiny_hf(str(root / "src"), "kimi", seed=6, moe_intermediate_size=64)
    qw.write_quantized(str(root / "src"), str(root / "mx"), "mxfp4")
    return str(root / "mx")


def _llm_tokens(path: str, **extra) -> list[list[int]]:
    from atom_stream.llm import LLM

    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 15)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(path, device="cpu", dtype="float32", num_kv_blocks=32, block_size=8,
             max_model_len=64, skip_tokenizer_init=True, **extra) as llm:
        return [o.token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                  sampling_params=params)]


def test_ep2_mxfp4_matches_single_rank(mxfp4):
    """MXFP4 routed experts under EP (4 of 8 per rank at the full intermediate size; shared
    experts TP-split, 32 per rank) through the engine's TP workers: the TP=1 tokens."""
    assert _llm_tokens(mxfp4, tensor_parallel_size=2, enable_expert_parallel=True) == \
        _llm_tokens(mxfp4)


def test_ep_expert_count_not_divisible_is_a_startup_error(tmp_path):
    path = str(tmp_path / "six")
    qw.make_tiny_hf(path, "kimi", seed=1, n_routed_experts=6)
    with pytest.raises(ConfigError, match=r"n_routed_experts \(6\).*divisible by.*4"):
        _llm_tokens(path, tensor_parallel_size=4, enable_expert_parallel=True)


def test_llm_with_data_parallel_warns_it_runs_one_engine(caplog):
    """LLM(data_parallel_size=2) runs one engine (DP is the server's DPEngine) and says so;
    AsyncEngine.generate takes vLLM's data_parallel_rank, 0 or None only."""
    import logging

    from atom_stream import LLM, AsyncEngine, EngineConfig, SamplingParams
    from atom_stream.errors import InvalidRequestError

    with caplog.at_level(logging.WARNING), LLM(model="demo", device="cpu",
                                               data_parallel_size=2, num_kv_blocks=32) as llm:
        out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))
    assert len(out[0].token_ids) == 2
    assert "LLM runs one engine: data_parallel_size=2 is ignored" in caplog.text

    async def run():
        params = SamplingParams(temperature=0, max_tokens=2)
        async with AsyncEngine(EngineConfig(device="cpu", num_kv_blocks=32)) as engine:
            outs = [o async for o in engine.generate([1, 2], params, data_parallel_rank=0)]
            assert outs[-1].finish_reason == "length"
            with pytest.raises(InvalidRequestError, match="data_parallel_rank"):
                async for _ in engine.generate([1, 2], params, data_parallel_rank=1):
                    pass

    asyncio.run(run())
