"""Per-request output plumbing of AsyncEngine / DPEngine.

- `OutputSlot`: a request's pending output, one RequestOutput that later deltas MERGE into
  (vLLM's RequestOutputCollector): memory stays bounded and the engine never waits for a reader.
- `OutputShaper`: a delta stream as its `output_kind` asks (CUMULATIVE copies, FINAL_ONLY).
- `hold_places(engine, n)`: the `reserve(n)` context of AsyncEngine and DPEngine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import msgspec

from atom_stream.engine.outputs import RequestOutput
from atom_stream.sampling_params import RequestOutputKind


class OutputSlot:
    """One request's pending output: a single RequestOutput that later deltas merge into."""

    __slots__ = ("exc", "out", "waiter")

    def __init__(self) -> None:
        self.out: RequestOutput | None = None
        self.exc: BaseException | None = None
        self.waiter: asyncio.Future | None = None

    def put(self, out: RequestOutput) -> None:
        if self.out is None:
            self.out = out
        else:
            self.out.merge(out)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        self.exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> RequestOutput:
        while self.out is None:
            if self.exc is not None:
                raise self.exc
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        out, self.out = self.out, None
        return out


@contextlib.contextmanager
def hold_places(engine: Any, n: int) -> Iterator[None]:
    """`reserve(n)` of AsyncEngine and DPEngine: `engine.check_room(n)`, then n places counted
    in `engine._reserved` while the block runs."""
    engine.check_room(n)
    engine._reserved += n
    try:
        yield
    finally:
        engine._reserved -= n


class OutputShaper:
    """Turns a request's delta stream into what its `output_kind` asks for (vLLM's
    RequestOutputKind; DELTA streams, the default, take no shaper): CUMULATIVE yields a fresh
    copy of everything so far (later deltas never change an output already handed out);
    FINAL_ONLY yields only the whole request, with its final delta."""

    __slots__ = ("acc", "kind")

    def __init__(self, kind: RequestOutputKind):
        self.kind = kind
        self.acc: RequestOutput | None = None

    def shape(self, out: RequestOutput) -> RequestOutput | None:
        """The output to yield for delta `out` (None: yield nothing now)."""
        if self.acc is None:
            self.acc = out  # never handed out itself: copies (CUMULATIVE) or at the end
        else:
            self.acc.merge(out)
        acc = self.acc
        if self.kind == RequestOutputKind.FINAL_ONLY:
            return acc if acc.finish_reason is not None else None
        lps, ranks = acc.engine_logprobs, acc.logprob_ranks
        out = msgspec.structs.replace(
            acc, token_ids=list(acc.token_ids),
            engine_logprobs=None if lps is None else list(lps),
            logprob_ranks=None if ranks is None else list(ranks))
        # the copy reuses the Logprob dicts built for the others (no rebuild per output)
        return out.share_logprobs_with(acc) if acc.__dict__ else out
