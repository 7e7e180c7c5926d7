"""n > 1 through AsyncEngine.generate: one request fanned out into n child requests (vLLM's
ParentRequest, vllm/v1/engine/parallel_sampling.py), streamed back as one.

    async for out in engine.generate(prompt, SamplingParams(n=3, temperature=0.8)):
        choice = out.outputs[0]            # the one choice this output carries
        print(choice.index, choice.text)

The prompt is tokenized once; child i runs as request `f"{i}_{request_id}"` with
`params.child(i)` (n = 1; seed + i when seeded). What comes out, by `params.output_kind`:
- DELTA / CUMULATIVE (vLLM's streaming): one output per child output, in the order the engine
  makes them: a MultiChoiceOutput with `request_id` the parent's and `outputs` ==
  [CompletionOutput(index=i)] (that child's delta, or its whole output so far, with its own
  finish_reason when it ends). The top-level `token_ids`, `text`, logprobs are that choice's; the
  top-level `finish_reason` / `stop_reason` / `usage` stay None until the output that ends the
  last choice: it carries that choice's finish and the whole request's usage (the prompt
  counted once, completion tokens summed over the n choices). So `finished` is True only on
  the last output, as vLLM's. As vLLM's, every output carries the request's
  `prompt_token_ids`, `num_cached_tokens` (the child's, once its prompt was scheduled) and
  `prompt` (the text prompt `fan_out` was given; None for token ids).
- FINAL_ONLY: one MultiChoiceOutput at the end with all n choices (what LLM.generate returns).

`abort(request_id)` aborts every child; breaking out of the loop closes them all (their blocks
freed as for one request). A child's error (GenerationError, or a refusal raised by its first
step such as PromptTooLongError) is raised from the parent's iterator after the others are
closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from atom_stream.engine.outputs import (
    CompletionOutput,
    MultiChoiceOutput,
    RequestOutput,
    Usage,
    combined_usage,
)
from atom_stream.errors import InvalidRequestError
from atom_stream.sampling_params import RequestOutputKind, SamplingParams


def child_id(index: int, request_id: str) -> str:
    """Child `index`'s engine request id (vLLM's `f"{index}_{parent_id}"`)."""
    return f"{index}_{request_id}"


class ParentRequests:
    """An AsyncEngine's live n > 1 requests: parent id -> its children's ids (`kids`), child
    id -> parent id, and the parents aborted (a child not started yet then never starts)."""

    def __init__(self) -> None:
        self.kids: dict[str, list[str]] = {}
        self.parent_of: dict[str, str] = {}
        self.aborted: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.kids or self.parent_of or self.aborted)

    def register(self, request_id: str, n: int) -> list[str]:
        kids = [child_id(i, request_id) for i in range(n)]
        self.kids[request_id] = kids
        self.parent_of.update(dict.fromkeys(kids, request_id))
        return kids

    def release(self, request_id: str, kids: list[str]) -> None:
        """Forget `request_id` (registered with the list `kids`); a no-op when done already,
        also when a new request has reused the id since."""
        if self.kids.get(request_id) is not kids:
            return
        del self.kids[request_id]
        for kid in kids:
            self.parent_of.pop(kid, None)
        self.aborted.discard(request_id)

    def abort(self, request_id: str) -> list[str]:
        """Mark `request_id` aborted when it is an n > 1 request; its children's ids (else
        [])."""
        kids = self.kids.get(request_id)
        if kids is None:
            return []
        self.aborted.add(request_id)
        return kids

    def abort_all(self) -> None:
        self.aborted.update(self.kids)

    def child_aborted(self, request_id: str) -> bool:
        """Whether `request_id` is a child of an aborted parent."""
        return self.parent_of.get(request_id) in self.aborted


async def fan_out(engine: Any, ids: list[int], params: SamplingParams, request_id: str,
                  strict_max_tokens: bool,
                  prompt: str | None = None) -> AsyncIterator[RequestOutput]:
    """AsyncEngine.generate's n > 1 stream (generate_n), its children registered in
    `engine._parents` until its final output is handed over. Closed or cancelled before that,
    it returns once the children's aborts are applied (their ids and KV blocks free, as
    `await engine.abort(request_id)`). `prompt`: the text prompt, set as every output's
    `prompt` (vLLM's RequestOutput.prompt)."""
    parents: ParentRequests = engine._parents
    if request_id in parents.kids or request_id in engine._slots:
        raise InvalidRequestError(f"request id {request_id!r} is already live", "request_id")
    kids = parents.register(request_id, params.n)
    ended = False
    try:
        async with contextlib.aclosing(
                generate_n(engine, ids, params, request_id, strict_max_tokens)) as outs:
            async for out in outs:
                out.set_prompt(prompt)
                if out.finished:  # the id is free once the final output is handed over
                    ended = True
                    parents.release(request_id, kids)
                yield out
    finally:
        parents.release(request_id, kids)
        if not ended and engine._pending_aborts:  # closed children aborted mid-step
            await engine._wait_aborts_applied()


def _as_choice(parent_id: str, index: int, out: RequestOutput, prompt_ids: list[int],
               final_usage: Usage | None) -> MultiChoiceOutput:
    """One child's output as the parent's streamed output (see the module docstring);
    `prompt_ids`: the request's prompt (on every output, as vLLM's); `final_usage`: set only
    on the output that ends the last choice."""
    choice = CompletionOutput(**msgspec.structs.asdict(out), index=index).share_logprobs_with(out)
    last = final_usage is not None
    parent = MultiChoiceOutput(
        request_id=parent_id, token_ids=out.token_ids, text=out.text,
        finish_reason=out.finish_reason if last else None,
        stop_reason=out.stop_reason if last else None, usage=final_usage,
        engine_logprobs=out.engine_logprobs, prompt_token_ids=prompt_ids,
        engine_prompt_logprobs=out.engine_prompt_logprobs,
        prompt_logprob_ranks=out.prompt_logprob_ranks,
        cumulative_logprob=out.cumulative_logprob, logprob_ranks=out.logprob_ranks,
        choices=[choice]).share_logprobs_with(out)
    cached = out.num_cached_tokens  # a child's final output has it in usage, not as an extra
    if not last and cached is not None:
        parent.set_num_cached_tokens(cached)
    return parent


async def generate_n(engine: Any, ids: list[int], params: SamplingParams, request_id: str,
                     strict_max_tokens: bool) -> AsyncIterator[RequestOutput]:
    """The parent stream of an n > 1 request whose prompt is already the token ids `ids` and
    whose `params` are checked (AsyncEngine.generate does both; `fan_out` registers
    `request_id` and its children)."""
    n = params.n
    gens = [engine.generate(ids, params.child(i), child_id(i, request_id),
                            strict_max_tokens=strict_max_tokens) for i in range(n)]
    pending: dict[asyncio.Future, int] = {
        asyncio.ensure_future(anext(g)): i for i, g in enumerate(gens)}
    final_only = params.output_kind == RequestOutputKind.FINAL_ONLY
    finals: dict[int, RequestOutput] = {}  # each choice's final output
    last_done = 0  # the choice that finished last
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=pending.__getitem__):  # the same order every run
                i = pending.pop(fut)
                try:
                    out = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(gens[i]))] = i
                if out.finish_reason is not None:
                    finals[i], last_done = out, i
                if final_only:
                    continue
                last = len(finals) == n and out.finish_reason is not None
                yield _as_choice(request_id, i, out, ids,
                                 combined_usage([finals[k] for k in range(n)], out)
                                 if last else None)
        if final_only:
            yield MultiChoiceOutput.gather(request_id, [finals[k] for k in range(n)],
                                           last=last_done)
    finally:
        for fut in pending:
            fut.cancel()
        if pending:  # let each cancelled step leave its generator before closing it
            await asyncio.gather(*pending, return_exceptions=True)
        for g in gens:
            await g.aclose()
