"""Review of the same-step prefix sharing (block_manager.add_pending, scheduler.schedule).

Async scheduling: a block that a running prefill writes in full in step N+1 depends (through
attention, at every layer past the first) on that request's earlier KV, which step N, still in
flight, may not have produced: when collecting N fails, N's requests fail, but a request admitted
in N+1 that shared such a block read it and would register it. Only writers with no uncollected
step offer their blocks (a chain can reach such a writer's block only through a duplicate of its
earlier blocks registered by another request, so nothing else is lost).
"""

from __future__ import annotations

from engine_fakes import FakeKVRunner

from atom_stream import EngineConfig, SamplingParams
from atom_stream.engine.llm_engine import LLMEngine
from atom_stream.engine.sequence import Sequence
from atom_stream.tokenizer import load_tokenizer

S = [(i * 7) % 200 + 3 for i in range(12)]  # 3 blocks of 4


def test_no_same_step_hit_on_a_writer_with_an_uncollected_step():
    runner = FakeKVRunner(64, 4, pipelined=True)
    eng = LLMEngine(EngineConfig(model="demo", block_size=4, max_num_batched_tokens=9,
                                 async_scheduling=True), runner=runner,
                    tokenizer=load_tokenizer(None))
    collects = [0]

    def fail_second_collect(handle) -> bool:  # step 2: x's decode and w's first chunk
        collects[0] += 1
        return collects[0] == 2

    runner.fail_collect_if = fail_second_collect
    p = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    pipe = eng.pipeline
    eng.add_request("x", S[:8] + [100], p)  # step 1: x's prompt (blocks 0, 1)
    outs = pipe.step()
    eng.add_request("w", S + [101], p)  # step 2: w computes blocks 0, 1 itself (x uncollected)
    outs += pipe.step()
    assert eng.requests["w"].seq.num_computed_tokens == 8
    probe = Sequence("probe", S + [9], p, max_tokens=2)
    assert len(eng.block_manager.find_prefix(probe)) == 2  # x's blocks 0, 1: registered now
    eng.add_request("c", S + [102, 102], p)  # step 3: w writes block 2; c is admitted
    outs += pipe.step()
    c = eng.requests["c"].seq
    # block 2 of w attends to w's blocks 0, 1 of step 2, which is not collected yet
    assert c.num_cached_tokens == 8, c.num_cached_tokens
    while eng.has_unfinished_requests():
        outs += pipe.step()
    outs += pipe.drain()
    final = {o.request_id: o for o in outs if o.finish_reason is not None}
    assert final["w"].finish_reason == "error" and final["x"].finish_reason == "error"
    assert final["c"].finish_reason == "length" and runner.corruptions == 0
    eng.block_manager.check_invariants([])
