"""RequestOutput: one delta of a request's stream (what generate() yields and LLM returns).

A delta carries the tokens sampled since the previous delta (`token_ids`), the text they made
visible (`text`; stop strings are held back until ruled out and trimmed when matched), and on the
final delta `finish_reason` ("stop" | "length" | "abort" | "error"), `stop_reason` (the matched
stop string or stop token id; None for EOS) and `usage`. The first delta of a request carries
`prompt_token_ids`. `logprobs`, when asked for, is aligned with `token_ids`: one
`(sampled_logprob, [(token_id, logprob), ...top-k])` per token; `cumulative_logprob` (vLLM's
CompletionOutput field) is then the sum of the request's sampled-token logprobs so far, the
`sampled_logprob`s of every delta up to this one added in order (a running total, as vLLM's in
every output kind; 0.0 before any token), and None when logprobs were not asked for.
`prompt_logprobs` (asked for with `prompt_logprobs=k`) has one `(logprob, [(id, logprob),
...top-k])` per prompt position 1..n-1 and `prompt_logprob_ranks` the prompt token's rank there,
aligned with it: vLLM's Logprob.rank, the number of vocab entries whose logprob is >= the
token's (1 + those strictly greater, when nothing ties with it); both come on the first delta.
`error` is the message of a failed step (finish_reason "error").

`merge(later)` folds a later delta into this one in place; the per-request output slot uses it when
the consumer reads slower than the engine produces, so a slow reader gets coalesced chunks and
memory stays bounded by the request's own length.

n > 1 (`LLM.generate` only; the engine core runs one choice per request): each prompt's n child
requests come back gathered into one `MultiChoiceOutput`, a RequestOutput whose `outputs` are the
n `CompletionOutput`s (vLLM's CompletionOutput: a child's whole output plus `index` 0..n-1) and
whose own `token_ids`, `text`, `finish_reason`, `stop_reason`, `logprobs`, `cumulative_logprob`
and `error` are those of choice 0 (vLLM's RequestOutput has none; DESIGN.md requires them on
every output). Its `prompt_token_ids` / `prompt_logprobs` / `prompt_logprob_ranks` belong to the
prompt and `usage` to the whole request: the prompt counted once, completion tokens summed over
the choices (the OpenAI `usage` of n choices).
A one-choice output is its own only choice (`outputs == [self]`, `index == 0`).

`prompt` (vLLM's RequestOutput.prompt, read by vLLM's quickstart: `output.prompt`): the prompt
text of an `LLM.generate` output given as text (a str or {"prompt": str}), of an `LLM.chat`
output the rendered conversation; None for token-id prompts and for stream deltas. It is kept
outside the struct's fields (`set_prompt`), so the encoded layout is unchanged.
"""

from __future__ import annotations

import msgspec


class Usage(msgspec.Struct, gc=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class RequestOutput(msgspec.Struct, dict=True):  # __dict__: `prompt`, never encoded
    request_id: str
    token_ids: list[int] = msgspec.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: Usage | None = None
    logprobs: list | None = None
    error: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list | None = None
    prompt_logprob_ranks: list[int] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt(self) -> str | None:
        """vLLM's RequestOutput.prompt (see the module docstring); not a struct field."""
        return self.__dict__.get("_prompt")

    def set_prompt(self, prompt: str | None) -> RequestOutput:
        """Attach the prompt text (LLM.generate / chat); returns self."""
        self.__dict__["_prompt"] = prompt
        return self

    @property
    def num_cached_tokens(self) -> int | None:
        """vLLM's RequestOutput.num_cached_tokens: the prompt tokens served from the prefix
        cache (`usage.cached_tokens`); None until the final output carries the usage."""
        return None if self.usage is None else self.usage.cached_tokens

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM-style alias: `out.outputs[0].text` / `.token_ids` / `.finish_reason`."""
        return [self]

    @property
    def index(self) -> int:
        """vLLM's CompletionOutput.index: a one-choice output is choice 0 (a property, so the
        msgspec layout the server and WebSocket encode is unchanged)."""
        return 0

    def merge(self, later: RequestOutput) -> RequestOutput:
        """Append a later delta of the same request (in place); returns self."""
        if later.token_ids:
            self.token_ids.extend(later.token_ids)
        if later.text:
            # the attribute dropped first: `text` is then the string's only reference and
            # CPython grows it in place (`self.text += ...` copied the whole text every merge:
            # quadratic for a long stream behind a stalled reader)
            text, self.text = self.text, ""
            text += later.text
            self.text = text
        if later.logprobs:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(later.logprobs)
        if self.prompt_token_ids is None:
            self.prompt_token_ids = later.prompt_token_ids
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
            self.prompt_logprob_ranks = later.prompt_logprob_ranks
        if later.cumulative_logprob is not None:  # a running total: the later one holds all
            self.cumulative_logprob = later.cumulative_logprob
        if later.finish_reason is not None:
            self.finish_reason = later.finish_reason
            self.stop_reason = later.stop_reason
            self.usage = later.usage
            self.error = later.error
        return self


class CompletionOutput(RequestOutput):
    """Choice `index` of an n > 1 request (vLLM's CompletionOutput): the whole output of its
    child request, whose engine id (`request_id`) is vLLM's `f"{index}_{parent_id}"`. Unlike
    vLLM's `finished()` method, `finished` is the property every RequestOutput has."""

    index: int = 0


class MultiChoiceOutput(RequestOutput):
    """One prompt's n > 1 choices gathered (vLLM's aggregated RequestOutput): see the module
    docstring for what the top-level fields mean. Built whole by `gather`; not a stream delta."""

    choices: list[CompletionOutput] = msgspec.field(default_factory=list)

    @property
    def outputs(self) -> list[CompletionOutput]:  # type: ignore[override]
        """The n choices, in index order (vLLM's `RequestOutput.outputs`)."""
        return self.choices

    def merge(self, later: RequestOutput) -> RequestOutput:
        raise TypeError("a MultiChoiceOutput is gathered whole from its finished choices; "
                        "merge the deltas of each choice instead")

    @classmethod
    def gather(cls, request_id: str, choices: list[RequestOutput],
               last: int) -> MultiChoiceOutput:
        """`choices[k]`: choice k's whole (merged) output; `last`: the index of the choice that
        finished last. As vLLM's ParentRequest / OutputProcessor, the prompt-level fields
        (prompt_logprobs, the cached-token count) come from the child whose finish completed
        the request; its prompt_logprobs equal every other child's (same prompt, same model)."""
        outs = [CompletionOutput(**msgspec.structs.asdict(c), index=k)
                for k, c in enumerate(choices)]
        first, src = outs[0], outs[last]
        usage = None
        usages = [c.usage for c in outs if c.usage is not None]
        if usages:
            base = src.usage or usages[-1]
            completion = sum(u.completion_tokens for u in usages)
            usage = Usage(base.prompt_tokens, completion, base.prompt_tokens + completion,
                          base.cached_tokens)
        prompt_ids = next((c.prompt_token_ids for c in (src, *outs)
                           if c.prompt_token_ids is not None), None)
        return cls(request_id=request_id, token_ids=first.token_ids, text=first.text,
                   finish_reason=first.finish_reason, stop_reason=first.stop_reason,
                   usage=usage, logprobs=first.logprobs, error=first.error,
                   prompt_token_ids=prompt_ids, prompt_logprobs=src.prompt_logprobs,
                   prompt_logprob_ranks=src.prompt_logprob_ranks,
                   cumulative_logprob=first.cumulative_logprob, choices=outs)
