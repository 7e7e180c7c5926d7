"""Prefix caching as vLLM users see it.

- `POST /reset_prefix_cache` (vLLM) answers 200 with an empty body; afterwards no request hits a
  block computed before the call (`usage.prompt_tokens_details.cached_tokens` 0 again). Blocks
  that running requests hold stay theirs (vLLM refuses the reset while any are in use).
- Requests admitted in the same step share a prefix at once (vLLM caches a block's hash when it
  allocates it): `LLM.generate` of prompts with a common system prompt reports
  `num_cached_tokens` for all but the first, with the same outputs as without caching; only
  blocks the step writes in full are shared, and a failed step leaves none registered.
"""

from __future__ import annotations

import httpx
import pytest
from engine_fakes import FakeKVRunner
from serving_helpers import running_server

from atom_stream import LLM, EngineConfig, SamplingParams
from atom_stream.engine.block_manager import BlockManager
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.sequence import Sequence
from atom_stream.tokenizer import load_tokenizer

BS = 4
KEY = "sk-review25"


def _seq(tokens: list[int], rid: str) -> Sequence:
    return Sequence(rid, tokens, SamplingParams(), max_tokens=8)


def _compute(bm: BlockManager, s: Sequence, n: int) -> None:
    assert bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.register_computed(s)


def test_reset_forgets_blocks_in_use_without_dropping_them():
    bm = BlockManager(8, BS)
    done = _seq([3, 1, 4, 1, 5, 9, 2, 6, 5], "done")
    _compute(bm, done, 9)
    bm.free(done)  # 2 cached blocks
    live = _seq([7, 7, 7, 7, 8, 8, 8, 8, 9], "live")
    _compute(bm, live, 9)  # 3 blocks in use, 2 of them registered
    table = list(live.block_table)
    assert bm.reset_prefix_cache() == 2
    assert live.block_table == table and bm.num_used == 3  # nothing in use moved or freed
    bm.check_invariants([live])
    # no hit on a block computed before the reset, held or not
    assert bm.find_prefix(_seq(list(live.token_ids), "again")) == []
    assert bm.find_prefix(_seq(list(done.token_ids), "done2")) == []
    bm.free(live)  # unhashed: plain free blocks, not cached ones
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8
    bm.check_invariants([])


@pytest.fixture(scope="module")
def srv():
    with running_server({"block_size": 16, "num_kv_blocks": 64},
                        enable_prompt_tokens_details=True, api_keys=[KEY]) as s:
        yield s


def _cached(c: httpx.Client, prompt: list[int]) -> int:
    r = c.post("/v1/completions", json={"model": "demo", "prompt": prompt, "max_tokens": 2,
                                        "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_reset_prefix_cache_route(srv):
    prompt = [(i * 13) % 300 + 7 for i in range(50)]  # 3 full blocks of 16 + 2
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=srv.url, timeout=60, headers=auth) as c:
        _cached(c, prompt)
        assert _cached(c, prompt) == 48
        r = c.post("/reset_prefix_cache")
        assert r.status_code == 200 and r.content == b""
        assert srv.wait_idle()["cached_blocks"] == 0
        assert _cached(c, prompt) == 0  # cold again
        assert _cached(c, prompt) == 48
        assert c.get("/reset_prefix_cache").status_code == 405
    s = srv.wait_idle()
    assert s["used_blocks"] == 0 and s["kv_usage"] == 0.0


def test_reset_prefix_cache_needs_the_api_key(srv):
    prompt = [(i * 29) % 300 + 3 for i in range(40)]
    ok = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=srv.url, timeout=60, headers=ok) as c:
        _cached(c, prompt)
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/reset_prefix_cache")
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        r = c.post("/reset_prefix_cache", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert c.post("/reset_prefix_cache", headers=ok).status_code == 200


# ------------------------------------------------------------------ same-step sharing
SYSTEM = [(i * 11) % 300 + 3 for i in range(96)]  # 6 full blocks of 16


def test_same_step_admissions_share_the_system_prompt():
    prompts = [{"prompt_token_ids": SYSTEM + [10 + i] * (1 + i)} for i in range(4)]
    kw = {"model": "demo", "device": "cpu", "dtype": "float32", "block_size": 16,
          "num_kv_blocks": 96, "seed": 0}
    with LLM(**kw) as warm, LLM(enable_prefix_caching=False, **kw) as cold:
        cached = []
        for params in (SamplingParams(max_tokens=6, temperature=0),
                       SamplingParams(max_tokens=6, temperature=0.9, seed=5)):
            got = warm.generate(prompts, params)
            want = cold.generate(prompts, params)
            assert [o.outputs[0].token_ids for o in got] == \
                [o.outputs[0].token_ids for o in want]
            assert [o.num_cached_tokens for o in want] == [0] * 4
            cached.append([o.num_cached_tokens for o in got])
        # the first call: one writer, three same-step readers; the second: all warm
        assert cached == [[0, 96, 96, 96], [96] * 4]
        warm.engine.block_manager.check_invariants()
        assert warm.engine.stats()["prefix_cache_hits"] == 96 * 7


def test_only_blocks_written_in_full_this_step_are_shared():
    bm = BlockManager(16, BS)
    a = _seq(list(range(1, 14)), "a")  # 13 tokens: blocks 0..2 full
    assert bm.allocate(a, 6)
    a.num_computed_tokens = 6  # an earlier step wrote 1.5 blocks (not collected yet)
    bm.begin_step()
    assert bm.allocate(a, 7)
    bm.add_pending(a, 7)  # block 1 was half written before: only block 2 is offered
    b = _seq(list(range(1, 14)) + [50], "b")
    assert bm.find_prefix(b) == []  # the chain breaks at block 0 (neither cached nor pending)
    bm.end_step()
    a.num_computed_tokens = 13
    bm.register_computed(a)
    assert bm.find_prefix(b) == a.block_table[:3]


def test_a_failed_step_leaves_no_shared_block_registered():
    runner = FakeKVRunner(64, 16)
    eng = LLMEngine(EngineConfig(model="demo", block_size=16), runner=runner,
                    tokenizer=load_tokenizer(None))
    p = SamplingParams(max_tokens=3, temperature=0)
    eng.add_request("w", SYSTEM + [1], p)
    eng.add_request("r", SYSTEM + [2], p)
    batch = eng.schedule()
    assert batch.seqs[1].num_cached_tokens == 96  # the reader shares the writer's blocks
    eng.fail(batch, RuntimeError("injected"))
    assert eng.block_manager.num_cached_blocks == 0  # nothing unwritten was registered
    eng.add_request("c", SYSTEM + [3], p)
    while eng.has_unfinished_requests():
        outs = eng.step()
    assert outs[-1].usage.cached_tokens == 0 and runner.corruptions == 0
    eng.block_manager.check_invariants([])


async def test_in_process_reset_prefix_cache():
    """vLLM's LLM.reset_prefix_cache / AsyncLLM.reset_prefix_cache: True, and the next request
    with a cached prompt hits nothing (then hits again once recomputed)."""
    from atom_stream import AsyncEngine

    kw = {"model": "demo", "device": "cpu", "dtype": "float32", "block_size": 16,
          "num_kv_blocks": 64}
    prompt = {"prompt_token_ids": SYSTEM + [7]}
    params = SamplingParams(max_tokens=2, temperature=0)
    with LLM(**kw) as llm:
        assert llm.generate([prompt], params)[0].num_cached_tokens == 0
        assert llm.generate([prompt], params)[0].num_cached_tokens == 96
        assert llm.reset_prefix_cache() is True
        assert llm.generate([prompt], params)[0].num_cached_tokens == 0
        llm.engine.block_manager.check_invariants()
    async with AsyncEngine(EngineConfig(**kw)) as engine:
        async def cached() -> int:
            outs = [o async for o in engine.generate(SYSTEM + [7], params)]
            return outs[-1].usage.cached_tokens
        assert [await cached(), await cached()] == [0, 96]
        assert await engine.reset_prefix_cache() is True
        assert await cached() == 0


def test_n_choices_report_the_prompt_hits_of_their_siblings(srv):
    """n=2 on a cold prompt: choice 0 writes its full blocks, choice 1 hits them in the same
    step; the usage reports the prompt's count as the largest of its choices' (vLLM reports
    the child that completes the output), not choice 0's 0."""
    prompt = [(i * 17) % 300 + 5 for i in range(40)]  # 2 full blocks of 16 + 8
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=srv.url, timeout=60, headers=auth) as c:
        r = c.post("/v1/completions", json={"model": "demo", "prompt": prompt, "n": 2,
                                            "max_tokens": 2, "temperature": 0.8, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
