"""RequestOutput: one delta of a request's stream (what generate() yields and LLM returns).

A delta carries the tokens sampled since the previous delta (`token_ids`), the text they made
visible (`text`; stop strings are held back until ruled out and trimmed when matched), and on the
final delta `finish_reason` ("stop" | "length" | "abort" | "error"), `stop_reason` (the matched
stop string or stop token id; None for EOS) and `usage`. The first delta of a request carries
`prompt_token_ids`. `logprobs`, when asked for, is aligned with `token_ids`: one
`(sampled_logprob, [(token_id, logprob), ...top-k])` per token. `error` is the message of a
failed step (finish_reason "error").

`merge(later)` folds a later delta into this one in place; the per-request output slot uses it when
the consumer reads slower than the engine produces, so a slow reader gets coalesced chunks and
memory stays bounded by the request's own length.
"""

from __future__ import annotations

import msgspec


class Usage(msgspec.Struct, gc=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class RequestOutput(msgspec.Struct):
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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM-style alias: `out.outputs[0].text` / `.token_ids` / `.finish_reason`."""
        return [self]

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
        if later.finish_reason is not None:
            self.finish_reason = later.finish_reason
            self.stop_reason = later.stop_reason
            self.usage = later.usage
            self.error = later.error
        return self
