"""Scheduler: decodes first, chunked prefill under the token budget, FCFS admission,
max_num_seqs, preemption of the newest by recompute, bounded waiting queue."""

from __future__ import annotations

import pytest

from atom_stream.engine.block_manager import BlockManager
from atom_stream.engine.scheduler import Scheduler
from atom_stream.engine.sequence import Sequence, SequenceStatus
from atom_stream.errors import EngineOverloadedError
from atom_stream.sampling_params import SamplingParams

BS = 4


def make(num_blocks=64, max_seqs=8, budget=32, max_waiting=100, caching=True):
    bm = BlockManager(num_blocks, BS, caching)
    return bm, Scheduler(bm, max_seqs, budget, max_waiting)


def seq(rid, n, base=0, max_tokens=100):
    return Sequence(rid, [(base + i) % 200 for i in range(n)], SamplingParams(), max_tokens)


def advance(sched, batch, token=7):
    """The engine's update: computed += n, append a token where sampled, register blocks."""
    for s, n, smp in zip(batch.seqs, batch.num_new_tokens, batch.sample):
        s.num_computed_tokens += n
        sched.bm.register_computed(s)
        if smp:
            s.token_ids.append(token)


def live(sched):
    return list(sched.running) + list(sched.waiting)


def test_chunked_prefill_under_token_budget():
    bm, sched = make(budget=32)
    a = seq("a", 100)
    sched.add(a)
    chunks = []
    while a.num_output_tokens == 0:
        b = sched.schedule()
        chunks.append((b.num_new_tokens[0], b.sample[0]))
        advance(sched, b)
        bm.check_invariants(live(sched))
    assert chunks == [(32, False), (32, False), (32, False), (4, True)]
    b = sched.schedule()
    assert b.num_new_tokens == [1] and b.num_decodes == 1 and b.sample == [True]


def test_decodes_first_then_prefill_chunks_then_admissions():
    bm, sched = make(budget=20)
    a, b = seq("a", 3), seq("b", 50, base=50)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()  # a whole (3), b's first chunk (17)
    assert [s.request_id for s in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [3, 17] and batch.sample == [True, False]
    assert batch.num_decodes == 0
    advance(sched, batch)
    c = seq("c", 5, base=120)
    sched.add(c)
    batch = sched.schedule()  # decode a, continue b (19), c waits: budget spent
    assert [s.request_id for s in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [1, 19] and batch.num_decodes == 1
    advance(sched, batch)
    batch = sched.schedule()  # decode a, b's last 14, then c admitted (5)
    assert [s.request_id for s in batch.seqs] == ["a", "b", "c"]
    assert batch.num_new_tokens == [1, 14, 5] and batch.sample == [True, True, True]
    assert sum(batch.num_new_tokens) <= 20
    bm.check_invariants(live(sched))


def test_max_num_seqs_and_fcfs():
    bm, sched = make(max_seqs=3, budget=1000)
    seqs = [seq(str(i), 4, base=10 * i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["0", "1", "2"]
    assert [s.request_id for s in sched.waiting] == ["3", "4"]
    advance(sched, batch)
    sched.finish(seqs[1])
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["0", "2", "3"]
    assert batch.num_decodes == 2
    bm.check_invariants(live(sched))


def test_preemption_takes_newest_puts_it_first_and_resumes():
    # 3 blocks of 4 tokens; three 4-token prompts fill them; every decode then needs a block
    bm, sched = make(num_blocks=3, budget=64)
    seqs = [seq(str(i), 4, base=20 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    advance(sched, sched.schedule())
    assert bm.num_free_blocks == 0
    batch = sched.schedule()
    # "0" needs a block: the newest ("2") goes; "1" needs one too: the newest is "1" itself
    assert [s.request_id for s in batch.preempted] == ["2", "1"]
    assert [s.request_id for s in batch.seqs] == ["0"]
    assert [s.request_id for s in sched.waiting] == ["1", "2"]  # oldest victim first
    assert sched.num_preemptions == 2
    victim = seqs[2]
    assert victim.status == SequenceStatus.WAITING and victim.block_table == []
    assert victim.num_computed_tokens == 0 and victim.num_preemptions == 1
    bm.check_invariants(live(sched))
    advance(sched, batch)
    sched.finish(seqs[0])
    batch = sched.schedule()
    # "1" resumes: prompt + its output re-prefilled; its own full block is a prefix hit
    one = seqs[1]
    assert [s.request_id for s in batch.seqs] == ["1"]
    assert one.num_computed_tokens == 4 and batch.num_new_tokens == [1] and batch.sample == [True]
    assert one.num_cached_tokens == 0  # resumes are not counted as prompt cache hits
    bm.check_invariants(live(sched))


def test_preempting_an_already_scheduled_decode_removes_it_from_the_batch():
    # "old" is mid-prefill; "new" decodes (scheduled first). old's chunk needs new's blocks.
    bm, sched = make(num_blocks=5, budget=8)
    old = seq("old", 20)
    sched.add(old)
    advance(sched, sched.schedule())  # old: 8 computed, 2 blocks
    new = seq("new", 3, base=90)
    sched.running.append(new)  # admitted after old (newest)
    new.status = SequenceStatus.RUNNING
    assert bm.allocate(new, 3)
    new.num_computed_tokens = 3  # prefilled; 1 pending token -> a decode
    new.token_ids.append(5)
    assert bm.allocate(seq("hog", 8), 8)  # the rest of the pool is taken
    assert bm.num_free_blocks == 0
    batch = sched.schedule()
    # the decode of "new" fits in its block; old's prefill needs a block -> new is preempted
    assert [s.request_id for s in batch.preempted] == ["new"]
    assert [s.request_id for s in batch.seqs] == ["old"]
    assert batch.num_new_tokens == [4]  # shrunk to the freed block, not a second preemption
    assert batch.num_decodes == 0
    assert new.block_table == [] and sched.waiting[0] is new


def test_admission_rolls_back_prefix_match_when_pool_is_short():
    bm, sched = make(num_blocks=4, budget=64)
    a = seq("a", 8)
    sched.add(a)
    advance(sched, sched.schedule())
    sched.finish(a)  # 2 blocks cached
    hog = seq("hog", 8, base=100)
    assert bm.allocate(hog, 8)  # the 2 plain free blocks
    b = seq("b", 16)  # shares a's 8 tokens, needs 2 more blocks -> cannot be admitted
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [] and b.block_table == [] and b.num_computed_tokens == 0
    assert bm.num_cached_blocks == 2
    bm.check_invariants([hog, b])
    bm.free(hog)
    batch = sched.schedule()
    assert batch.seqs == [b] and b.num_cached_tokens == 8 and batch.num_new_tokens == [8]
    assert bm.prefix_hits == 8


def test_no_admission_in_a_step_that_preempted():
    _, sched = make(num_blocks=4, budget=64)
    a, b = seq("a", 8), seq("b", 4, base=50)
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())  # a: 2 blocks (+out), b: 1 block (+out) => 3 used
    c = seq("c", 1, base=150)
    sched.add(c)
    batch = sched.schedule()  # a needs a 3rd block (1 free), b needs a 2nd: b preempted
    assert [s.request_id for s in batch.preempted] == ["b"]
    assert c in sched.waiting and c.block_table == []


def test_waiting_queue_is_bounded():
    """max_waiting requests may WAIT beyond those the next step can start (free running slots):
    an idle engine with 2 slots takes 2 + 3, deterministically, before any step."""
    _, sched = make(max_seqs=2, max_waiting=3)
    for i in range(5):
        sched.add(seq(str(i), 4, base=10 * i))
    with pytest.raises(EngineOverloadedError):
        sched.add(seq("x", 4))
    assert sched.num_waiting == 5
    advance(sched, sched.schedule())  # two start running: 3 left waiting, no slot free
    assert sched.num_running == 2 and sched.num_waiting == 3
    with pytest.raises(EngineOverloadedError):
        sched.add(seq("y", 4))


def test_finish_and_abort_free_blocks_at_once():
    bm, sched = make()
    a, b = seq("a", 10), seq("b", 10, base=40)
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())
    used = bm.num_used
    sched.finish(a, "abort")
    assert bm.num_used == used - 3 and a.finish_reason == "abort"
    assert sched.num_running == 1
    c = seq("c", 4)
    sched.add(c)
    sched.finish(c, "abort")  # from the waiting queue
    assert sched.num_waiting == 0
    bm.check_invariants(live(sched))
