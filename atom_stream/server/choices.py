"""The child streams of one OpenAI request (n choices, or one per prompt of a batch) and how
they are read together.

- `Choice`: one child stream, its first delta already awaited (so refusals surface before any
  byte of the response is sent).
- `Collected`: a whole (non-streamed) child's text, ids, logprobs and end.
- `iterate(choices)`: (choice index, delta) from every child until all have finished; with
  several children one pending delta per child merges what the consumer has not read yet, so
  memory stays bounded by the children's own output. Closing it closes every child (aborting
  the unfinished).
- `close_choices(choices)`: close every child stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from atom_stream.engine.outputs import RequestOutput


@dataclass
class Choice:
    """One child stream: its first delta (already awaited) and the rest of the generator."""

    index: int
    first: RequestOutput
    gen: AsyncIterator[RequestOutput]
    prompt_key: int = 0  # which prompt of a batch (n choices share one)
    prompt_text: str | None = None


@dataclass
class Collected:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # RequestOutput.engine_logprobs, merged
    prompt_ids: list[int] | None = None
    prompt_logprobs: list | None = None  # RequestOutput.engine_prompt_logprobs
    prompt_logprob_ranks: list[int] | None = None  # aligned with prompt_logprobs
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: Any = None


async def iterate(choices: list[Choice]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (choice index, delta) from every choice until all have finished."""
    if len(choices) == 1:
        c = choices[0]
        try:
            yield c.index, c.first
            if c.first.finish_reason is None:
                async for out in c.gen:
                    yield c.index, out
        finally:
            await c.gen.aclose()  # type: ignore[attr-defined]  # aborts if unfinished
        return
    # one pending (merged) delta per choice, not a queue of every delta: a client that reads
    # slower than the engine produces gets coalesced chunks and memory stays bounded by the
    # choices' own lengths (as the single-choice path's output slot does)
    pending: dict[int, Any] = {}
    wake = asyncio.Event()

    def put(i: int, item: Any) -> None:
        cur = pending.get(i)
        if cur is None or isinstance(item, BaseException):
            pending[i] = item
        elif not isinstance(cur, BaseException):
            cur.merge(item)
        wake.set()

    async def pump(c: Choice) -> None:
        try:
            put(c.index, c.first)
            if c.first.finish_reason is None:
                async for out in c.gen:
                    put(c.index, out)
        except Exception as e:  # noqa: BLE001 - surfaced to the consumer
            put(c.index, e)

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pump(c)) for c in choices]
    remaining = len(choices)
    try:
        while remaining:
            if not pending:
                wake.clear()
                await wake.wait()
                continue
            items = list(pending.items())
            pending.clear()
            for i, item in items:
                if isinstance(item, BaseException):
                    raise item
                yield i, item
                if item.finish_reason is not None:
                    remaining -= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their generators are closed


async def close_choices(choices: list[Choice]) -> None:
    """Close every child stream (a request still running is aborted by its generator)."""
    for c in choices:
        try:
            await c.gen.aclose()  # type: ignore[attr-defined]
        except RuntimeError:  # still running in a task being cancelled; it closes itself
            pass
