"""BlockManager: exact accounting, ref counts, chained-hash prefix caching, LRU eviction."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from atom_stream.engine.block_manager import BlockManager, hash_block
from atom_stream.engine.sequence import Sequence
from atom_stream.sampling_params import SamplingParams

BS = 4


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(), max_tokens=16)


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """What one engine step does for `s`: allocate, 'compute' n tokens, register full blocks."""
    assert bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.register_computed(s)


def test_allocate_free_accounting():
    bm = BlockManager(8, BS)
    a, b = seq(list(range(10)), "a"), seq(list(range(5)), "b")
    assert bm.blocks_needed(a, 10) == 3
    assert bm.allocate(a, 10) and len(a.block_table) == 3
    assert bm.allocate(b, 5) and len(b.block_table) == 2
    bm.check_invariants([a, b])
    assert bm.num_used == 5 and bm.num_free_blocks == 3 and bm.usage == 5 / 8
    c = seq(list(range(20)), "c")
    assert not bm.allocate(c, 20)  # 5 blocks > 3 free: no partial allocation
    assert c.block_table == [] and bm.num_free_blocks == 3
    bm.check_invariants([a, b, c])
    bm.free(a)
    bm.free(b)
    bm.check_invariants([a, b, c])
    assert bm.num_used == 0 and bm.num_free_blocks == 8
    assert len(set(a.block_table + b.block_table)) == 0


def test_decode_growth_allocates_only_at_block_boundaries():
    bm = BlockManager(8, BS)
    s = seq([1, 2, 3])
    compute(bm, s, 3)
    assert len(s.block_table) == 1
    s.token_ids.append(9)
    assert bm.blocks_needed(s, 1) == 0  # position 3 still in block 0
    compute(bm, s, 1)
    s.token_ids.append(10)
    assert bm.blocks_needed(s, 1) == 1
    compute(bm, s, 1)
    assert len(s.block_table) == 2
    bm.check_invariants([s])


def test_prefix_hit_shares_blocks_and_leaves_last_token():
    bm = BlockManager(16, BS)
    prompt = list(range(100, 112))  # exactly 3 full blocks
    a = seq(prompt, "a")
    compute(bm, a, 12)
    assert a.num_registered_blocks == 3
    b = seq(prompt, "b")  # identical prompt: at most 2 blocks reusable (last token computed)
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    bm.check_invariants([a, b])
    c = seq(prompt + [7, 7], "c")  # longer: all 3 blocks hit
    assert bm.match_prefix(c) == 12 and c.block_table == a.block_table
    d = seq(list(range(100, 104)) + [0] * 8, "d")  # diverges in block 1: only block 0
    assert bm.match_prefix(d) == 4
    bm.check_invariants([a, b, c, d])
    for s in (a, b, c, d):
        bm.free(s)
    bm.check_invariants([])
    assert bm.num_used == 0 and bm.num_cached_blocks == 3


def test_freed_cached_blocks_are_reused_after_plain_free_blocks_lru_order():
    bm = BlockManager(6, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")  # 2 full blocks + 1 partial
    compute(bm, a, 9)
    old = list(a.block_table)
    bm.free(a)
    assert bm.num_cached_blocks == 2  # the partial block went back as plain free
    bm.check_invariants([])
    b = seq(list(range(50, 66)), "b")  # 4 blocks: takes the 4 plain free blocks first
    assert bm.allocate(b, 16)
    assert not set(b.block_table) & set(old[:2])
    assert bm.num_cached_blocks == 2
    c = seq(list(range(70, 74)), "c")  # now a cached block must be evicted: the tail first
    assert bm.allocate(c, 4)
    assert c.block_table == [old[1]]
    assert bm.num_cached_blocks == 1
    e = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "e")  # block 0 still cached, block 1 evicted
    assert bm.match_prefix(e) == 4 and e.block_table == [old[0]]
    bm.check_invariants([b, c, e])


def test_duplicate_content_is_not_registered_twice():
    bm = BlockManager(8, BS)
    a, b = seq([5] * 8, "a"), seq([5] * 8, "b")  # computed concurrently: no hit for b
    compute(bm, a, 8)
    compute(bm, b, 8)
    assert a.block_table != b.block_table
    bm.check_invariants([a, b])
    bm.free(b)  # b's blocks are unhashed duplicates: plain free
    assert bm.num_cached_blocks == 0
    bm.free(a)
    # a's blocks are registered: both hashes ([5]*4 chained) differ, both cached
    assert bm.num_cached_blocks == 2
    bm.check_invariants([])


def test_allocate_with_prefix_is_all_or_nothing_and_keeps_lru_order():
    bm = BlockManager(4, BS)
    cached = seq(list(range(8)) + [0], "c")
    compute(bm, cached, 9)
    table = list(cached.block_table)
    bm.free(cached)  # 2 cached blocks (the tail one released first), 2 plain free
    lru = list(bm._cached)
    assert lru == table[1::-1]
    s = seq(list(range(8)) + list(range(50, 60)), "s")  # hits 2 blocks, needs 3 more
    prefix = bm.find_prefix(s)
    assert prefix == table[:2] and s.block_table == []
    assert not bm.allocate(s, 10, prefix)  # 3 new + 2 evictable hits > 4 allocatable
    assert s.block_table == [] and s.num_computed_tokens == 0 and list(bm._cached) == lru
    assert bm.allocate(s, 8, prefix)  # 2 new blocks fit beside the 2 hits
    assert s.block_table[:2] == prefix and s.num_computed_tokens == 8
    assert s.num_registered_blocks == 2 and bm.num_cached_blocks == 0
    bm.check_invariants([s])


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq(list(range(12)), "a")
    compute(bm, a, 12)
    bm.free(a)
    assert bm.num_cached_blocks == 0
    b = seq(list(range(12)), "b")
    assert bm.match_prefix(b) == 0
    bm.check_invariants([])


def test_hash_is_stable_and_chained():
    h0 = hash_block(b"", [1, 2, 3, 4])
    assert h0 == hash_block(b"", [1, 2, 3, 4]) and len(h0) == 16
    assert h0.hex() == hash_block(b"", [1, 2, 3, 4]).hex()
    assert hash_block(h0, [5, 6, 7, 8]) != hash_block(b"", [5, 6, 7, 8])
    assert hash_block(b"", [1, 2, 3, 4]) != hash_block(b"", [1, 2, 3, 5])


def test_cache_salt_separates_prefixes():
    """vLLM: cache_salt joins the first block's hash, so only requests with the same salt share."""

    def salted(salt, rid):
        return Sequence(rid, list(range(9)), SamplingParams(cache_salt=salt), max_tokens=4)

    bm = BlockManager(16, BS)
    a = salted("tenant-a", "a")
    compute(bm, a, 9)
    assert bm.match_prefix(salted("tenant-b", "b")) == 0
    assert bm.match_prefix(seq(list(range(9)), "plain")) == 0  # unsalted: another chain too
    same = salted("tenant-a", "a2")
    assert bm.match_prefix(same) == 8 and same.block_table == a.block_table[:2]
    plain = seq(list(range(9)), "p")
    compute(bm, plain, 9)  # an unsalted copy is registered on its own chain
    assert bm.match_prefix(salted(None, "n")) == 8  # no salt == unsalted
    bm.check_invariants()


def test_reset_prefix_cache():
    bm = BlockManager(8, BS)
    a = seq(list(range(8)), "a")
    compute(bm, a, 8)
    bm.free(a)
    assert bm.reset_prefix_cache() == 2
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8
    bm.check_invariants([])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(1, 9)),
                min_size=1, max_size=60))
def test_random_operations_keep_exact_accounting(ops):
    """Random allocate / compute / match / free on 6 sequences over a tiny shared vocabulary."""
    bm = BlockManager(10, BS)
    seqs = [seq([i % 3] * 30, str(i)) for i in range(6)]
    for op, k, n in ops:
        s = seqs[k]
        if op == 0 and not s.block_table:
            bm.match_prefix(s)
        elif op == 1:
            n = min(n, s.num_tokens - s.num_computed_tokens)
            if n and bm.allocate(s, n):
                s.num_computed_tokens += n
                bm.register_computed(s)
        elif op == 4 and not s.block_table:
            # the scheduler's admission: lookup, then hits + new blocks all or nothing
            before = (list(bm._cached), list(bm._free), list(bm.ref_counts))
            prefix = bm.find_prefix(s)
            n = min(n, s.num_tokens - len(prefix) * BS)
            if not bm.allocate(s, n, prefix):
                assert (list(bm._cached), list(bm._free), list(bm.ref_counts)) == before
                assert s.block_table == [] and s.num_computed_tokens == 0
            else:
                assert s.block_table[:len(prefix)] == prefix
                s.num_computed_tokens += n
                bm.register_computed(s)
        elif op == 2:
            bm.free(s)
            s.num_computed_tokens = 0
        else:
            # allocate without computing (a step that then failed): succeeds iff it fits
            fits = bm.blocks_needed(s, n) <= bm.num_free_blocks
            assert bm.allocate(s, n) == fits
        bm.check_invariants(seqs)
        assert bm.num_used + bm.num_free_blocks == bm.num_blocks
    for s in seqs:
        bm.free(s)
    bm.check_invariants(seqs)
    assert bm.num_used == 0
