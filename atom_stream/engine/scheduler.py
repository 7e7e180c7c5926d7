"""Continuous-batching scheduler: chunked prefill mixed with decodes, preemption by recompute.

Each `schedule()` builds one `ScheduledBatch` under two budgets, `max_num_batched_tokens` (tokens
in the step) and `max_num_seqs` (running sequences):

1. running sequences with one pending token (decodes), oldest first: 1 token each, so streaming
   never starves behind long prompts;
2. running sequences still in their prompt (chunked prefill), oldest first: as many tokens as the
   budget and the pool allow;
3. waiting sequences, FCFS (preempted ones sit at the front): a prefix-cache lookup (which also
   sees the blocks this batch writes in full: vLLM's same-step hits), then the first chunk of
   their prompt, taken with the hit blocks all or nothing, while the budgets and
   the pool allow. Nothing is admitted in a step that had to preempt. As vLLM, the hit-rate
   counts a request once, at its first admission, and only if it looked the cache up (not with
   prompt_logprobs or caching off); a resumed (preempted) request is not counted.

When a running sequence needs a block and the pool is empty, the NEWEST running sequence is
preempted by recompute: its blocks are freed, `num_computed_tokens = 0`, it goes back to the
front of the waiting queue (its prompt + outputs so far are re-prefilled later; seeded sampling
depends on (seed, output index) so it continues identically). A victim that was already placed in
this step's batch is taken out of it again. The oldest running sequence always progresses
because the engine caps a request's length at the pool's capacity, so there is no livelock.

The scheduler never touches a sequence while a batch is executing: the engine core applies
`finish`/`abort` between steps.

Async scheduling (engine/pipeline.py): the previous step is committed but not yet collected, so
a decode's input may be a placeholder (its value is still on the device); it is scheduled and
allocated like any decode. A sequence whose uncollected token is its last by count
(`final_token_pending`: max_tokens / max_model_len) is never scheduled again, and a waiting
sequence that still holds a placeholder (preempted right after being launched) is not admitted
until the engine has written that token.

The waiting queue (`WaitingQueue`) removes any sequence in O(1): a burst of aborts of queued
requests (clients disconnecting from a full queue) costs linear time on the loop thread, not
quadratic (a deque's remove scanned the queue: 20,000 aborts newest-first took ~1.8 s).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from atom_stream.engine.block_manager import BlockManager
from atom_stream.engine.sequence import ScheduledBatch, Sequence, SequenceStatus
from atom_stream.errors import EngineOverloadedError

_WAITING = SequenceStatus.WAITING
_RUNNING = SequenceStatus.RUNNING
_FINISHED = SequenceStatus.FINISHED


class WaitingQueue:
    """FCFS queue of sequences with a deque's surface (append, appendleft, popleft, [i], len,
    iteration in order, `in`) where `remove` is O(1) too: an OrderedDict keyed by the
    Sequence (identity hash) in queue order. A sequence is in it at most once."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: OrderedDict[Sequence, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._q)

    def __bool__(self) -> bool:
        return bool(self._q)

    def __iter__(self):
        return iter(self._q)

    def __contains__(self, seq: object) -> bool:
        return seq in self._q

    def __getitem__(self, i: int) -> Sequence:
        """The i-th sequence from the front (O(1) for 0, O(i) otherwise)."""
        n = len(self._q)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("waiting queue index out of range")
        return next(iter(self._q)) if i == 0 else next(itertools.islice(self._q, i, None))

    def append(self, seq: Sequence) -> None:
        self._q[seq] = None

    def appendleft(self, seq: Sequence) -> None:
        self._q[seq] = None
        self._q.move_to_end(seq, last=False)

    def popleft(self) -> Sequence:
        return self._q.popitem(last=False)[0]

    def remove(self, seq: Sequence) -> bool:
        """Take `seq` out wherever it is; False if it was not queued."""
        return self._q.pop(seq, 0) is None


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting_requests: int,
    ):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting_requests = max_waiting_requests
        self.waiting = WaitingQueue()
        self.running: list[Sequence] = []  # admission order: oldest first
        self.num_preemptions = 0
        self._running_dirty = False  # finished sequences still listed in `running`

    # ------------------------------------------------------------------ queues
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        if self._running_dirty:
            self._compact()
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    def add(self, seq: Sequence) -> None:
        """Queue a request, or refuse it (EngineOverloadedError) when max_waiting_requests would
        WAIT: the requests that the next step can start (free running slots, up to
        max_num_seqs) do not count against the queue. So a burst into an idle engine admits
        max_num_seqs + max_waiting_requests whether or not a step ran in between (counting
        every queued request made the admitted number depend on that race)."""
        free = max(0, self.max_num_seqs - self.num_running)
        if len(self.waiting) >= self.max_waiting_requests + free:
            raise EngineOverloadedError(
                f"the waiting queue is full ({self.max_waiting_requests} requests); retry later")
        seq.status = _WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """End a sequence (finished, aborted or failed) and free its blocks at once."""
        if seq.status == _FINISHED:
            return
        if seq.status == _WAITING:
            self.waiting.remove(seq)  # O(1): mass aborts of queued requests stay linear
        else:
            self._running_dirty = True  # removed from `running` lazily, in one pass
        self.bm.free(seq)
        seq.status = _FINISHED
        if reason is not None and seq.finish_reason is None:
            seq.finish_reason = reason

    def _compact(self) -> None:
        self.running = [s for s in self.running if s.status == _RUNNING]
        self._running_dirty = False

    def _preempt(self, victim: Sequence) -> None:
        self.bm.free(victim)
        victim.num_computed_tokens = 0
        victim.status = _WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch:
        """One step's batch. While it is built, the blocks its prefill chunks write in full are
        shareable by the requests it admits (BlockManager.add_pending; vLLM caches blocks at
        allocation, so requests admitted together with a common prefix hit it at once)."""
        self.bm.begin_step()
        try:
            return self._schedule()
        finally:
            self.bm.end_step()

    def _schedule(self) -> ScheduledBatch:
        if self._running_dirty:
            self._compact()
        bm = self.bm
        bs = bm.block_size
        running = self.running
        budget = self.max_num_batched_tokens
        scheduled: dict[Sequence, int] = {}  # insertion order = batch order (decodes first)
        preempted: list[Sequence] = []
        state = [budget, 0]  # [token budget, number of decodes], shared with _make_room

        # 1. decodes (the hot path: 256 of them per step, one block every block_size steps)
        has_prefill = False
        i = 0
        while i < len(running) and state[0] > 0:
            seq = running[i]
            i += 1
            nc = seq.num_computed_tokens
            if len(seq.token_ids) - nc != 1:
                has_prefill = True
                continue
            if seq.final_token_pending:  # finishes when its step is collected: no wasted slot
                continue
            if (nc >= len(seq.block_table) * bs and not bm.allocate(seq, 1)
                    and not self._make_room(seq, scheduled, preempted, state, lambda b: 1)):
                continue
            scheduled[seq] = 1
            state[0] -= 1
            state[1] += 1

        # 2. running prefills (chunked), shrunk to what the pool holds before preempting
        if has_prefill:
            i = 0
            while i < len(running) and state[0] > 0:
                seq = running[i]
                i += 1
                pending = len(seq.token_ids) - seq.num_computed_tokens
                if pending <= 1:
                    continue

                def chunk(b: int, seq: Sequence = seq, pending: int = pending) -> int:
                    return min(pending, b, max(bm.max_new_tokens(seq), 1))

                n = chunk(state[0])
                if not bm.allocate(seq, n):
                    n = self._make_room(seq, scheduled, preempted, state, chunk)
                    if not n:
                        continue
                scheduled[seq] = n
                state[0] -= n
                bm.add_pending(seq, n)  # read only by admissions (none if anything preempted)

        # 3. admissions, FCFS, only in a step that did not have to preempt
        budget = state[0]
        if not preempted:
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < self.max_num_seqs:
                seq = waiting[0]
                if seq.num_placeholders:  # its prompt+outputs are not all on the host yet
                    break
                first_admission = seq.num_preemptions == 0
                # prompt logprobs need every position computed: no lookup, and (vLLM:
                # record_prefix_cache_stats) a request that skipped the lookup is not counted
                lookup = bm.enable_prefix_caching and seq.params.prompt_logprobs is None
                prefix = bm.find_prefix(seq) if lookup else []
                cached = len(prefix) * bs
                n = min(len(seq.token_ids) - seq.num_computed_tokens - cached, budget)
                if not bm.allocate(seq, n, prefix):  # all or nothing: the LRU is untouched
                    break
                waiting.popleft()
                if first_admission:  # vLLM counts resumed requests apart (preempted_*)
                    seq.num_cached_tokens = cached
                    if lookup:
                        bm.record_query(seq.num_tokens, cached)
                seq.status = _RUNNING
                running.append(seq)
                scheduled[seq] = n
                budget -= n
                bm.add_pending(seq, n)  # later admissions of this step may share its blocks

        batch = ScheduledBatch(preempted=preempted)
        nd = state[1]
        batch.seqs = seqs = list(scheduled)
        batch.num_new_tokens = nums = list(scheduled.values())
        batch.sample = [True] * nd + [s.num_computed_tokens + n == len(s.token_ids)
                                      for s, n in zip(seqs[nd:], nums[nd:])]
        batch.num_decodes = nd
        return batch

    def _make_room(self, seq: Sequence, scheduled: dict[Sequence, int],
                   preempted: list[Sequence], state: list[int], chunk) -> int:
        """Preempt the newest running sequences until `seq` gets blocks for `chunk(budget)`
        tokens; returns that many. A victim already in this step's batch is taken out (its
        budget returned). 0 when `seq` itself was the newest and got preempted."""
        while True:
            victim = self.running.pop()
            if victim in scheduled:
                if len(victim.token_ids) - victim.num_computed_tokens == 1:
                    state[1] -= 1  # it was a decode
                state[0] += scheduled.pop(victim)
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return 0
            n = chunk(state[0])
            if self.bm.allocate(seq, n):
                return n
