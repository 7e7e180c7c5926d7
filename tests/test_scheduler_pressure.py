"""Scheduler + block manager + prefix cache under pressure, against vLLM v1's behaviour
(vllm/v1/core/sched/scheduler.py, kv_cache_manager.py, block_pool.py): preemption by recompute
gives the same greedy tokens and leaks no block; budgets hold every step; prefix-cache hit
accounting (skipped lookups are not counted), LRU order untouched by a failed admission, hits on
a running request's prompt + output; aborts in every phase free blocks; max_model_len caps."""

from __future__ import annotations

import random

import pytest
from engine_fakes import FakeKVRunner

from atom_stream import EngineConfig, SamplingParams
from atom_stream.engine.block_manager import BlockManager
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.outputs import RequestOutput
from atom_stream.engine.scheduler import Scheduler
from atom_stream.engine.sequence import Sequence
from atom_stream.errors import MaxTokensTooLargeError, PromptTooLongError
from atom_stream.tokenizer import load_tokenizer

TOK = load_tokenizer(None)
GREEDY = {"temperature": 0.0, "ignore_eos": True}


def fake(num_kv_blocks=16, block_size=4, pipelined=False, **kw) -> LLMEngine:
    runner = FakeKVRunner(num_kv_blocks, block_size, pipelined=pipelined)
    return LLMEngine(EngineConfig(model="demo", block_size=block_size,
                                  async_scheduling=pipelined, **kw),
                     runner=runner, tokenizer=TOK)


def demo(**kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model="demo", device="cpu", dtype="float32", **kw),
                     tokenizer=TOK)


def checked_schedule(eng: LLMEngine):
    """Wrap the scheduler so every batch is checked against the budgets."""
    sched = eng.scheduler
    orig = sched.schedule

    def schedule():
        b = orig()
        assert b.num_tokens <= sched.max_num_batched_tokens, b.num_new_tokens
        assert len(b.seqs) <= sched.max_num_seqs
        assert sched.num_running <= sched.max_num_seqs
        assert all(n > 0 for n in b.num_new_tokens)
        return b

    sched.schedule = schedule


def drain(eng: LLMEngine, pipelined: bool = False) -> dict[str, RequestOutput]:
    merged: dict[str, RequestOutput] = {}
    step = eng.pipeline.step if pipelined else eng.step
    n = 0
    while eng.has_unfinished_requests():
        n += 1
        assert n < 20_000
        for o in step():
            merged.setdefault(o.request_id, RequestOutput(o.request_id)).merge(o)
        eng.block_manager.check_invariants([r.seq for r in eng.requests.values()])
    bm = eng.block_manager
    bm.check_invariants([])
    assert bm.num_used == 0 and bm.num_free_blocks == bm.num_blocks  # no leak
    return merged


# ---------------------------------------------------------------- KV pressure
@pytest.mark.parametrize("pipelined", [False, True])
def test_pressure_same_greedy_tokens_budgets_hold_no_leak(pipelined):
    rng = random.Random(7)
    base = [rng.randrange(250) for _ in range(40)]
    reqs = []
    for i in range(30):
        plen = rng.randint(1, 40)
        prompt = base[:plen] if i % 2 else [rng.randrange(250) for _ in range(plen)]
        reqs.append((f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 20), **GREEDY)))
    eng = fake(num_kv_blocks=16, block_size=4, pipelined=pipelined, max_num_seqs=6,
               max_num_batched_tokens=12)
    checked_schedule(eng)
    for rid, p, sp in reqs:
        eng.add_request(rid, p, sp)
    got = drain(eng, pipelined)
    assert eng.scheduler.num_preemptions > 0
    assert eng.runner.corruptions == 0
    for rid, p, sp in reqs:
        assert got[rid].token_ids == eng.runner.reference(p, sp.max_tokens), rid
        assert got[rid].finish_reason == "length"


def test_demo_model_preempted_requests_resume_with_identical_tokens():
    rng = random.Random(3)
    reqs = [(f"d{i}", [rng.randrange(256) for _ in range(rng.randint(20, 60))],
             SamplingParams(max_tokens=12, **GREEDY)) for i in range(8)]
    roomy = demo(num_kv_blocks=64, block_size=16, enable_prefix_caching=False)
    for rid, p, sp in reqs:
        roomy.add_request(rid, p, sp)
    want = {k: v.token_ids for k, v in drain(roomy).items()}
    tight = demo(num_kv_blocks=6, block_size=16, max_num_batched_tokens=32, max_num_seqs=8)
    checked_schedule(tight)
    for rid, p, sp in reqs:
        tight.add_request(rid, p, sp)
    got = drain(tight)
    assert tight.scheduler.num_preemptions > 0
    assert {k: v.token_ids for k, v in got.items()} == want


def test_preemption_victim_is_the_newest_running_request():
    # vLLM (scheduler.py, Scheduler.schedule, FCFS): `preempted_req = self.running.pop()`
    eng = fake(num_kv_blocks=3, block_size=4, max_num_batched_tokens=64)
    for i in range(3):
        eng.add_request(f"p{i}", [10 * i + j for j in range(4)],
                        SamplingParams(max_tokens=6, **GREEDY))
    eng.step()  # three 4-token prompts fill the pool; each now needs a 2nd block
    batch = eng.schedule()
    assert [s.request_id for s in batch.preempted] == ["p2", "p1"]
    assert [s.request_id for s in eng.scheduler.waiting] == ["p1", "p2"]


def test_prompt_that_can_never_fit_the_pool_is_refused_others_unaffected():
    eng = fake(num_kv_blocks=4, block_size=4)  # max_model_len becomes the pool: 16 tokens
    eng.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=4, **GREEDY))
    with pytest.raises(PromptTooLongError, match="16"):
        eng.add_request("big", list(range(17)), SamplingParams(max_tokens=1))
    assert "big" not in eng.requests
    assert drain(eng)["ok"].token_ids == eng.runner.reference([1, 2, 3], 4)


# ---------------------------------------------------------------- budgets / chunking
def test_long_prompt_is_chunked_and_interleaved_with_decodes():
    eng = fake(num_kv_blocks=64, block_size=4, max_num_batched_tokens=8, max_num_seqs=2)
    checked_schedule(eng)
    eng.add_request("d", [1, 2, 3], SamplingParams(max_tokens=20, **GREEDY))
    eng.step()  # d prefilled, now decoding
    eng.add_request("long", list(range(50)), SamplingParams(max_tokens=2, **GREEDY))
    eng.add_request("third", [9, 9], SamplingParams(max_tokens=2, **GREEDY))
    shapes = []
    while "long" in eng.requests and eng.requests["long"].seq.num_output_tokens == 0:
        b = eng.schedule()
        shapes.append([(s.request_id, n) for s, n in zip(b.seqs, b.num_new_tokens)])
        eng.postprocess(b, eng.execute(b))
    # the decode runs every step, the 50-token prompt in 7-token chunks; "third" waits for a
    # slot (max_num_seqs=2)
    assert all(sh[0] == ("d", 1) for sh in shapes)
    assert [n for sh in shapes for rid, n in sh if rid == "long"] == [7] * 7 + [1]
    assert all(rid != "third" for sh in shapes for rid, _ in sh)
    drain(eng)


# ---------------------------------------------------------------- aborts
@pytest.mark.parametrize("pipelined", [False, True])
def test_abort_in_every_phase_frees_blocks(pipelined):
    eng = fake(num_kv_blocks=32, block_size=4, pipelined=pipelined, max_num_batched_tokens=8)
    step = eng.pipeline.step if pipelined else eng.step
    bm = eng.block_manager
    eng.add_request("pf", list(range(40)), SamplingParams(max_tokens=5, **GREEDY))
    step()
    assert 0 < eng.requests["pf"].seq.num_computed_tokens < 40  # mid-prefill
    assert eng.abort("pf").finish_reason == "abort"
    assert eng.abort("pf") is None  # double abort: nothing, no error
    eng.add_request("dc", [5, 6, 7], SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(4):
        step()
    assert eng.requests["dc"].seq.num_output_tokens > 0  # decoding
    assert eng.abort("dc").finish_reason == "abort"
    eng.add_request("done", [1], SamplingParams(max_tokens=1, **GREEDY))
    drain(eng, pipelined)
    assert eng.abort("done") is None  # after finish: nothing, no error
    assert bm.num_used == 0 and bm.num_free_blocks == bm.num_blocks


# ---------------------------------------------------------------- max_model_len
def test_max_tokens_capped_to_the_context_left_unless_strict():
    eng = fake(num_kv_blocks=64, block_size=4, max_model_len=32)
    seq = eng.add_request("a", list(range(20)), SamplingParams(**GREEDY))  # max_tokens unset
    assert seq.max_tokens == 12
    seq = eng.add_request("b", list(range(20)), SamplingParams(max_tokens=100, **GREEDY))
    assert seq.max_tokens == 12
    with pytest.raises(MaxTokensTooLargeError):
        eng.add_request("c", list(range(20)), SamplingParams(max_tokens=100),
                        strict_max_tokens=True)
    with pytest.raises(PromptTooLongError):
        eng.add_request("d", list(range(40)), SamplingParams())
    got = drain(eng)
    assert len(got["a"].token_ids) == 12 and got["a"].finish_reason == "length"
    assert got["a"].usage.total_tokens == 32


# ---------------------------------------------------------------- prefix cache
def test_full_prompt_hit_recomputes_the_last_block_and_counts_usage():
    # vLLM (kv_cache_manager.py, get_computed_blocks): max_cache_hit_length = num_tokens - 1
    eng = fake(num_kv_blocks=32, block_size=4)
    prompt = list(range(100, 116))  # 4 full blocks
    sp = SamplingParams(max_tokens=3, **GREEDY)
    eng.add_request("a", prompt, sp)
    drain(eng)
    eng.add_request("b", prompt, sp)
    out = drain(eng)["b"]
    assert out.usage.cached_tokens == 12  # 3 of 4 blocks: the last one is recomputed
    assert out.token_ids == eng.runner.reference(prompt, 3)
    st = eng.stats()
    assert st["prefix_cache_queries"] == 32 and st["prefix_cache_hits"] == 12


def test_hit_on_a_prefix_of_a_running_requests_prompt_plus_output():
    eng = fake(num_kv_blocks=32, block_size=4)
    eng.add_request("a", list(range(10)), SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(12):
        eng.step()
    a = eng.requests["a"].seq
    assert a.num_computed_tokens >= 20  # prompt 10 + generated tokens: 5 full blocks
    b_prompt = list(a.token_ids[:21])
    eng.add_request("b", b_prompt, SamplingParams(max_tokens=3, **GREEDY))
    first = [o.token_ids for o in eng.step() if o.request_id == "b"]
    b = eng.requests["b"].seq
    assert b.num_cached_tokens == 20 and b.block_table[:5] == a.block_table[:5]
    got = drain(eng)
    assert first[0] + got["b"].token_ids == eng.runner.reference(b_prompt, 3)
    assert got["b"].usage.cached_tokens == 20
    assert eng.runner.corruptions == 0


def test_prompt_logprobs_requests_are_not_counted_as_cache_queries():
    # vLLM (kv_cache_manager.py, record_prefix_cache_stats): "Don't count a request that
    # skipped the cache lookup" (prompt_logprobs set, or caching off)
    eng = fake(num_kv_blocks=32, block_size=4)
    prompt = list(range(50, 66))
    eng.add_request("a", prompt, SamplingParams(max_tokens=1, **GREEDY))
    drain(eng)
    eng.add_request("b", prompt, SamplingParams(max_tokens=1, prompt_logprobs=1, **GREEDY))
    assert drain(eng)["b"].usage.cached_tokens == 0
    st = eng.stats()
    assert st["prefix_cache_queries"] == 16 and st["prefix_cache_hits"] == 0
    eng.add_request("c", prompt, SamplingParams(max_tokens=1, **GREEDY))
    drain(eng)
    st = eng.stats()
    assert st["prefix_cache_queries"] == 32 and st["prefix_cache_hits"] == 12
    assert st["prefix_cache_hit_rate"] == pytest.approx(12 / 32)


def test_caching_disabled_counts_no_queries():
    eng = fake(num_kv_blocks=32, block_size=4, enable_prefix_caching=False)
    eng.add_request("a", list(range(16)), SamplingParams(max_tokens=1, **GREEDY))
    drain(eng)
    assert eng.stats()["prefix_cache_queries"] == 0


def _seq(rid, tokens):
    return Sequence(rid, tokens, SamplingParams(), max_tokens=8)


def _cache(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Compute `tokens` as one sequence, free it: its full blocks become cached."""
    s = _seq("tmp", tokens)
    assert bm.allocate(s, len(tokens))
    s.num_computed_tokens = len(tokens)
    bm.register_computed(s)
    table = list(s.block_table)
    bm.free(s)
    return table


def test_failed_admission_does_not_refresh_the_lru_order():
    # vLLM: get_computed_blocks only looks up; blocks are touched (taken out of the free queue)
    # in allocate_slots after the capacity check, so a request that cannot be admitted leaves
    # the eviction order as it was (block_pool.py: touch / free_blocks)
    bm = BlockManager(5, 4)
    sched = Scheduler(bm, 8, 64, 100)
    old = _cache(bm, [1, 2, 3, 4])  # released first: least recently used
    new = _cache(bm, [9, 9, 9, 9])
    hog = _seq("hog", list(range(20, 32)))
    assert bm.allocate(hog, 12)  # 3 plain free blocks taken: only the 2 cached ones left
    w = _seq("w", [1, 2, 3, 4] + list(range(40, 52)))  # hits `old`, needs 3 more: no room
    sched.add(w)
    assert sched.schedule().seqs == [] and w.block_table == []
    x = _seq("x", [7, 7, 7])
    assert bm.allocate(x, 3)
    assert x.block_table == old  # the LRU cached block is evicted, as without the attempt
    y = _seq("y", [9, 9, 9, 9, 0])
    assert bm.match_prefix(y) == 4 and y.block_table == new  # the newer one survived
    bm.check_invariants([hog, x, y])


def test_shared_blocks_are_not_freed_while_another_request_uses_them():
    bm = BlockManager(8, 4)
    a = _seq("a", list(range(9)))
    assert bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.register_computed(a)
    b = _seq("b", list(range(9)) + [1, 2])
    assert bm.match_prefix(b) == 8 and b.block_table == a.block_table[:2]
    bm.free(a)
    assert all(bm.ref_counts[x] == 1 for x in b.block_table)
    assert bm.num_cached_blocks == 0  # still in use by b: neither free nor evictable
    filler = _seq("f", list(range(100, 124)))
    assert bm.allocate(filler, 24)  # takes every free block, none of b's
    assert not set(filler.block_table) & set(b.block_table)
    bm.check_invariants([b, filler])


def test_chained_hashes_differ_for_equal_blocks_after_different_prefixes():
    bm = BlockManager(16, 4)
    _cache(bm, [1, 1, 1, 1, 5, 5, 5, 5])
    # block 1 has the same tokens as the cached block 1, but a different parent
    s = _seq("s", [2, 2, 2, 2, 5, 5, 5, 5, 0])
    assert bm.match_prefix(s) == 0
    t = _seq("t", [1, 1, 1, 1, 5, 5, 5, 5, 0])
    assert bm.match_prefix(t) == 8
