"""Paged latent-KV block manager with chained-hash prefix caching.

The KV pool holds `num_blocks` blocks of `block_size` token slots. A sequence owns an ordered
`block_table`; token position p lives in slot `block_table[p // block_size] * block_size +
p % block_size`. Every block is in exactly one of three states:

- used:    ref count > 0 (held by one or more running sequences; shared prefix blocks count once);
- free:    ref count 0 and no content hash (plain free stack);
- cached:  ref count 0 but still holding the KV of a hashed full block (LRU, evictable).

`num_used + num_free + num_cached == num_blocks` always (`check_invariants`). Allocation takes a
plain free block first and evicts the least recently released cached block last; both are O(1)
(a list used as a stack and an OrderedDict used as an LRU queue).

Prefix caching: the content hash of full block i is blake2b(hash of block i-1 || token ids of block
i) (128 bits, stable across processes), so equal hashes imply equal prefixes. Only FULL blocks whose
KV has been computed are registered (`register_computed`). `find_prefix` looks up the longest chain
of registered blocks for a fresh sequence, always leaving at least the last known token to compute
(vLLM: max_cache_hit_length = num_tokens - 1), so the step that finishes the prefill has logits to
sample from; `allocate(seq, n, prefix)` takes those blocks and the new ones all or nothing, so a
request that cannot be admitted leaves the LRU order as it was (vLLM checks capacity before it
touches hit blocks). A sequence never writes into a matched block: matching stops at a block
boundary and new tokens go to new blocks.

Sharing within one step (vLLM caches a block's hash when it ALLOCATES it for scheduled tokens,
so a request admitted in the same step as another with the same prefix already hits it): while
the scheduler builds a batch, `add_pending` offers the unregistered full blocks that the batch
writes in full (their KV is stored for the whole batch before any attention reads the cache),
and `find_prefix` continues its chain through them. They are only known during that
`schedule()` call (`begin_step` / `end_step`): a request that shares one is in the same batch as
its writer, so a failed step fails both, and nothing outside the batch ever reads a block whose
KV is not computed yet. A writer with an uncollected step (async scheduling) offers nothing: its
blocks' KV depends on that step's, whose failure would fail the writer but not the reader. The
global registration still happens when the KV has been computed.

Eviction differs from vLLM's on purpose: vLLM keeps ONE LRU queue of every free block
(block_pool.py: get_new_blocks pops its head, evicting whatever hash it holds), while this pool
hands out never-hashed free blocks before evicting any cached one, so cached prefixes survive
longer (hit rates can be higher than vLLM's on the same traffic); among cached blocks the order is
the same LRU (a sequence's tail released first, evicted first).
"""

from __future__ import annotations

import array
import hashlib
from collections import OrderedDict

from atom_stream.engine.sequence import Sequence


def hash_block(prev: bytes, tokens: list[int]) -> bytes:
    """Chained content hash of one full block (stable: no process-dependent hash seed)."""
    return hashlib.blake2b(prev + array.array("q", tokens).tobytes(), digest_size=16).digest()


def salt_root(cache_salt: str | None) -> bytes:
    """The parent hash of block 0: empty, or a digest of the request's `cache_salt` (vLLM:
    kv_cache_utils.generate_block_hash_extra_keys adds cache_salt to the FIRST block's keys
    only; every later block inherits it through the chain), so requests with different salts
    never share a block."""
    if not cache_salt:
        return b""
    return hashlib.blake2b(b"cache_salt\0" + cache_salt.encode(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # stack: pop() hands out low ids first (keeps early tests' block ids readable)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; LRU first
        self._hash_to_block: dict[bytes, int] = {}
        self.num_used = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens served from cached blocks
        self._pending: dict[bytes, int] | None = None  # this step's shareable blocks (or None)

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (plain free + evictable cached)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def record_query(self, num_tokens: int, num_hits: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hits

    # ------------------------------------------------------------------ block primitives
    def _take(self) -> int:
        if self._free:
            bid = self._free.pop()
        else:
            bid, _ = self._cached.popitem(last=False)  # evict the least recently released
            h = self.block_hash[bid]
            if self._hash_to_block.get(h) == bid:
                del self._hash_to_block[h]
            self.block_hash[bid] = None
        self.ref_counts[bid] = 1
        self.num_used += 1
        return bid

    def _release(self, bid: int) -> None:
        rc = self.ref_counts[bid] - 1
        self.ref_counts[bid] = rc
        if rc == 0:
            self.num_used -= 1
            if self.block_hash[bid] is not None:
                self._cached[bid] = None  # most recently released: evicted last
            else:
                self._free.append(bid)

    # ------------------------------------------------------------------ sequences
    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def max_new_tokens(self, seq: Sequence) -> int:
        """How many more tokens of `seq` fit in its table plus every allocatable block."""
        capacity = (len(seq.block_table) + self.num_free_blocks) * self.block_size
        return capacity - seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        """Grow `seq.block_table` to cover `num_new_tokens` more tokens; False (and no change)
        if the pool cannot. `prefix`: cached blocks from `find_prefix` for an EMPTY table, taken
        together with the new blocks, all or nothing (they become the table's head and count as
        computed). A failed call leaves the LRU order untouched, as vLLM, whose allocate_slots
        checks capacity (evictable hit blocks included) before it touches the hit blocks."""
        # a prefix is whole blocks: the new tokens need the same blocks after it as from an
        # empty table (computed before _share fills the table)
        need = self.blocks_needed(seq, num_new_tokens)
        evictable = sum(1 for bid in prefix if self.ref_counts[bid] == 0)  # hits now free
        if need + evictable > self.num_free_blocks:
            return False
        if prefix:
            self._share(seq, prefix)
        table = seq.block_table
        for _ in range(need):
            table.append(self._take())
        return True

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references. Tail blocks are released first so that, among one
        sequence's cached blocks, the prefix head is evicted last."""
        table = seq.block_table
        for bid in reversed(table):
            self._release(bid)
        table.clear()
        seq.table_epoch += 1  # the runner's persistent table copy resyncs this row
        seq.num_registered_blocks = 0

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The sequence's chained hashes for its first `num_blocks` full blocks (memoized)."""
        hashes = seq.block_hashes
        bs = self.block_size
        toks = seq.token_ids
        while len(hashes) < num_blocks:
            i = len(hashes)
            # getattr: tests drive the block manager with bare params stand-ins
            prev = hashes[-1] if i else salt_root(getattr(seq.params, "cache_salt", None))
            hashes.append(hash_block(prev, toks[i * bs:(i + 1) * bs]))
        return hashes

    def find_prefix(self, seq: Sequence) -> list[int]:
        """The longest chain of cached blocks for the head of an empty table (a lookup only:
        nothing is referenced or reordered). Leaves at least the last token to compute (vLLM:
        max_cache_hit_length = num_tokens - 1), so the step that ends the prefill samples."""
        if (not self.enable_prefix_caching or seq.block_table
                or not (self._hash_to_block or self._pending)):
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        if limit <= 0:
            return []
        lookup = self._hash_to_block
        pending = self._pending or {}
        found = []
        for h in self._hashes(seq, limit):
            bid = lookup.get(h)
            if bid is None:
                bid = pending.get(h)  # written in full by this step's batch
                if bid is None:
                    break
            found.append(bid)
        return found

    def begin_step(self) -> None:
        """A batch is being built: `add_pending` blocks are shareable until `end_step`."""
        self._pending = {} if self.enable_prefix_caching else None

    def end_step(self) -> None:
        self._pending = None

    def add_pending(self, seq: Sequence, num_new_tokens: int) -> None:
        """`seq` computes its next `num_new_tokens` in the batch being built: offer the full
        blocks that this step writes in FULL (none of their tokens computed before) and that are
        not registered yet. Not while `seq` has an uncollected step (async scheduling): past the
        first layer these blocks' KV depends on its earlier KV, which that step may still fail
        to produce (its failure fails `seq`, not a reader admitted in this step)."""
        pending = self._pending
        if pending is None or seq.num_uncollected:
            return
        bs = self.block_size
        first = -(-seq.num_computed_tokens // bs)
        full = (seq.num_computed_tokens + num_new_tokens) // bs
        if full <= first:
            return
        hashes = self._hashes(seq, full)
        table = seq.block_table
        lookup = self._hash_to_block
        for i in range(first, full):
            h = hashes[i]
            if h not in lookup and h not in pending:
                pending[h] = table[i]

    def _share(self, seq: Sequence, prefix: list[int]) -> None:
        """Reference `prefix` (cached blocks) as the head of the empty table of `seq`."""
        table = seq.block_table
        registered = 0  # the leading blocks known to the cache (the rest: this step's pending)
        for bid in prefix:
            if self.ref_counts[bid] == 0:
                del self._cached[bid]
                self.num_used += 1
            self.ref_counts[bid] += 1
            if registered == len(table) and self.block_hash[bid] is not None:
                registered += 1
            table.append(bid)
        # a pending block is registered by its writer once computed, or by `seq` if the writer
        # ended first (register_computed skips blocks that already carry a hash)
        seq.num_registered_blocks = registered
        seq.num_computed_tokens = len(table) * self.block_size

    def match_prefix(self, seq: Sequence) -> int:
        """Map cached blocks into an empty table at once; set and return num_computed_tokens.
        (The scheduler uses `find_prefix` + `allocate(..., prefix)` instead, all or nothing.)"""
        prefix = self.find_prefix(seq)
        if not prefix:
            return 0
        self._share(seq, prefix)
        return seq.num_computed_tokens

    def register_computed(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache."""
        full = seq.num_computed_tokens // self.block_size
        start = seq.num_registered_blocks
        if full <= start or not self.enable_prefix_caching:
            return
        hashes = self._hashes(seq, full)
        table = seq.block_table
        lookup = self._hash_to_block
        for i in range(start, full):
            bid = table[i]
            h = hashes[i]
            if self.block_hash[bid] is None and h not in lookup:
                # a duplicate of a block cached elsewhere stays unhashed and is freed plainly
                lookup[h] = bid
                self.block_hash[bid] = h
        seq.num_registered_blocks = full

    def reset_prefix_cache(self) -> int:
        """Forget every registered prefix (vLLM's reset_prefix_cache): no later lookup hits a
        block computed before the call. Cached (unreferenced) blocks become plain free blocks;
        blocks that running sequences hold stay theirs (nothing in use is dropped or moved) and
        only lose their hash, so they are freed plainly when released. (vLLM refuses the
        reset while any block is in use, unless it may preempt the running requests.) Returns
        how many cached blocks were freed."""
        n = len(self._cached)
        while self._cached:
            bid, _ = self._cached.popitem(last=False)
            self.block_hash[bid] = None
            self._free.append(bid)
        for bid in self._hash_to_block.values():  # the rest are in use
            self.block_hash[bid] = None
        self._hash_to_block.clear()
        return n

    # ------------------------------------------------------------------ checks
    def check_invariants(self, seqs: list[Sequence] | None = None) -> None:
        """Recompute the accounting from scratch and assert it (tests call this a lot).

        `seqs`: every live sequence holding blocks; then ref counts must equal table counts."""
        used = sum(1 for rc in self.ref_counts if rc > 0)
        assert used == self.num_used, (used, self.num_used)
        assert used + len(self._free) + len(self._cached) == self.num_blocks
        assert len(set(self._free)) == len(self._free)
        for bid in self._free:
            assert self.ref_counts[bid] == 0 and self.block_hash[bid] is None, bid
        for bid in self._cached:
            assert self.ref_counts[bid] == 0 and self.block_hash[bid] is not None, bid
        for h, bid in self._hash_to_block.items():
            assert self.block_hash[bid] == h, bid
        hashed = sum(1 for h in self.block_hash if h is not None)
        assert hashed == len(self._hash_to_block), (hashed, len(self._hash_to_block))
        if seqs is not None:
            refs = [0] * self.num_blocks
            for s in seqs:
                for bid in s.block_table:
                    refs[bid] += 1
            assert refs == self.ref_counts, "ref counts disagree with block tables"
