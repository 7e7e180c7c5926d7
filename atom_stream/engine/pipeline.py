"""Async scheduling for the engine core: at most one launched, uncollected step, so the CPU runs
one step behind the device (DESIGN.md "Process model").

One pipelined step (`Pipeline.step` synchronously; AsyncEngine._run awaits the two runner calls
in its worker thread and does the rest on the loop thread):

    [drain]   if the in-flight step N must reach the host first: collect + postprocess N
    schedule N+1           state: N committed, N's sampled tokens are PLACEHOLDERs
    launch N+1 (prev=N)    decode inputs that are N's tokens are gathered on the device
    commit N+1             `launched`: advance num_computed_tokens, append N+1's placeholders
    collect N, postprocess N   overwrite N's placeholders, stop checks, deltas

Rules:
- commit: each scheduled seq gets num_computed_tokens += n (and num_uncollected += n); a sampled
  seq gets a PLACEHOLDER. If that token is its last by count (max_tokens / max_model_len),
  `final_token_pending` is set and the scheduler never schedules it again (no wasted slot).
- waste: a seq that stops on EOS / stop_token_ids / a stop string at postprocess N may already be
  in the launched N+1. Its token_ids are cut after the stop token (the placeholder dropped), the
  request finishes and frees its blocks at once, and N+1's row for it is discarded: the wasted
  token is never seen (same outputs, usage and finish reasons as the sync path).
- drain (that step runs synchronously): before scheduling N+1, N is collected first when N
  computed prompt logprobs (a preemption while those are in flight would corrupt their
  bookkeeping). Sampling that reads N's token VALUE does not drain: the presence / frequency /
  repetition penalties read it on the device (SamplingMetadata's `ph_pos`); a structured-output
  grammar or a multi-token bad word (`sampler.needs_host_tokens`) waits for N's host copy
  inside launch N+1, after N+1's forward is enqueued. min_tokens needs only the count and seeds
  only the output index; both count placeholders.
- prefix cache: postprocess registers only blocks computed by collected steps
  (num_computed_tokens - num_uncollected), so a failed launched step never leaves its blocks
  in the cache.
- preemption of a seq with a placeholder: blocks freed, back to waiting; postprocess N still
  writes its token (as the sync path, which appended it before preempting); it is not readmitted
  while it holds a placeholder (the scheduler checks).
- aborts and failures drop placeholders (usage counts host-known tokens) and free blocks at once,
  although the launched step may still write those blocks. That is harmless: on a GPU every later
  step is enqueued on the same stream, so a block reused by step N+2 is written after N+1 is done
  with it; on the CPU the forward runs inside `launch`, which has returned before the loop frees
  anything (aborts are deferred while `launch` runs, since it reads the sequences).
- failures: an exception from launch N+1 fails N+1's requests (N is collected first, so they
  get N's token, then the error); one from collect N fails N's requests (their rows in N+1 are
  discarded). After a failed launch nothing is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atom_stream.engine.sequence import PLACEHOLDER, ScheduledBatch, StepOutput

if TYPE_CHECKING:
    from atom_stream.engine.llm_engine import LLMEngine
    from atom_stream.engine.outputs import RequestOutput


@dataclass
class InFlight:
    """A launched, committed, uncollected step. `drain`: collect it before scheduling again."""

    batch: ScheduledBatch
    handle: Any
    drain: bool


class Pipeline:
    """The in-flight step of one LLMEngine (used only when `engine.async_scheduling`)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.inflight: InFlight | None = None

    def take(self) -> InFlight | None:
        inflight, self.inflight = self.inflight, None
        return inflight

    def must_drain(self) -> bool:
        return self.inflight is not None and self.inflight.drain

    def launched(self, batch: ScheduledBatch, handle: Any) -> None:
        """Commit `batch` (runner.launch returned `handle` for it); it becomes the in-flight
        step. The previous one must have been taken already."""
        assert self.inflight is None, "two steps in flight"
        max_len = self.engine.max_model_len
        drain = False
        nd = batch.num_decodes
        for i, (seq, n, sample) in enumerate(zip(batch.seqs, batch.num_new_tokens,
                                                 batch.sample)):
            seq.num_computed_tokens += n
            seq.num_uncollected += n
            if i >= nd and seq.params.prompt_logprobs is not None:
                drain = True
            if not sample:
                continue
            seq.token_ids.append(PLACEHOLDER)
            seq.num_placeholders += 1
            if seq.num_output_tokens >= seq.max_tokens or len(seq.token_ids) >= max_len:
                seq.final_token_pending = True
        self.inflight = InFlight(batch, handle, drain)

    def finish(self, inflight: InFlight, out: StepOutput | BaseException) -> list[RequestOutput]:
        """Postprocess a collected step, or fail its requests if collecting raised `out`."""
        if isinstance(out, BaseException):
            return self.engine.fail(inflight.batch, out)
        return self.engine.postprocess(inflight.batch, out, committed=True)

    def collect(self, inflight: InFlight) -> list[RequestOutput]:
        """Collect (blocking) and postprocess `inflight`."""
        try:
            out = self.engine.collect(inflight.handle)
        except Exception as e:  # noqa: BLE001 - fails that step's requests only
            return self.finish(inflight, e)
        return self.finish(inflight, out)

    def drain(self) -> list[RequestOutput]:
        """Collect and postprocess the in-flight step, if any."""
        inflight = self.take()
        return [] if inflight is None else self.collect(inflight)

    def step(self) -> list[RequestOutput]:
        """One pipelined step, synchronously (see the module docstring): returns the outputs of
        the PREVIOUS step (and failures). Drive it while `engine.has_unfinished_requests()`."""
        eng = self.engine
        outputs: list[RequestOutput] = []
        if self.must_drain():
            outputs += self.drain()
        prev = self.take()
        batch = eng.schedule()
        error: Exception | None = None
        if batch.seqs:
            try:
                handle = eng.launch(batch, prev.handle if prev is not None else None)
            except Exception as e:  # noqa: BLE001 - fails this batch's requests only
                error = e
            else:
                self.launched(batch, handle)
        if prev is not None:
            outputs += self.collect(prev)
        if error is not None:
            outputs += eng.fail(batch, error)
        if not batch.seqs and prev is None:
            eng.record_idle_step()
        return outputs
