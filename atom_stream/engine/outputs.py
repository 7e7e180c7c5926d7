"""RequestOutput: one delta of a request's stream (what generate() yields and LLM returns).

A delta carries the tokens sampled since the previous delta (`token_ids`), the text they made
visible (`text`; stop strings are held back until ruled out and trimmed when matched), and on the
final delta `finish_reason` ("stop" | "length" | "abort" | "error"), `stop_reason` (the matched
stop string or stop token id; None for EOS) and `usage`. The first delta of a request carries
`prompt_token_ids`. Logprobs, when asked for, come in two forms:
- `logprobs` / `prompt_logprobs` (properties, the in-process API): vLLM's shapes. `logprobs` has
  one `dict[int, Logprob]` per token of `token_ids`; `prompt_logprobs` is `[None, dict, ...]`,
  one per prompt position (the first has none). A position's dict is ordered as vLLM's
  (vllm/logprobs.py append_logprobs_for_next_position): the sampled (prompt) token first, then
  the top-k in rank order; a sampled token inside the top-k keeps its first place and takes the
  top-k entry (rank and value), so a dict has k or k + 1 entries. Ranks are vLLM's: top-k
  entries 1..k, the sampled token its rank in the vocabulary (`logprob_ranks` /
  `prompt_logprob_ranks` when the runner gives them; else its top-k place, and k + 1 (the
  least it can be) when outside the top-k: vLLM V1's rank before it counted ranks).
  `decoded_token` is the token decoded on its own (vLLM's convert_ids_list_to_tokens; a
  partial UTF-8 sequence stays U+FFFD: vLLM's later byte-fallback repair is not done; None
  without a tokenizer). Built lazily, on first access, from the engine form, and cached.
- `engine_logprobs` / `engine_prompt_logprobs` (struct fields, encoded under the names
  `logprobs` / `prompt_logprobs`; what the servers read, so no cost when unread): one
  `(sampled_logprob, [(token_id, logprob), ...top-k])` per token, and one `(logprob, [(id,
  logprob), ...top-k])` per prompt position 1..n-1.
`cumulative_logprob` (vLLM's CompletionOutput field) is then the sum of the request's
sampled-token logprobs so far, the `sampled_logprob`s of every delta up to this one added in
order (a running total, as vLLM's in every output kind; 0.0 before any token), and None when
logprobs were not asked for. `prompt_logprob_ranks` is the prompt token's rank at each
position 1..n-1: vLLM's Logprob.rank, the number of vocab entries whose logprob is >= the
token's (1 + those strictly greater, when nothing ties with it); `logprob_ranks` the same for
the sampled tokens, aligned with `engine_logprobs` (None: the runner gives none). The prompt
logprobs come on the first delta.
`error` is the message of a failed step (finish_reason "error").

`merge(later)` folds a later delta into this one in place; the per-request output slot uses it when
the consumer reads slower than the engine produces, so a slow reader gets coalesced chunks and
memory stays bounded by the request's own length.

n > 1 (the engine core runs one choice per request; LLM.generate and AsyncEngine.generate fan
out, see engine/parallel_sampling.py for the streamed form): each prompt's n child requests
come back gathered into one `MultiChoiceOutput`, a RequestOutput whose `outputs` are the
n `CompletionOutput`s (vLLM's CompletionOutput: a child's whole output plus `index` 0..n-1) and
whose own `token_ids`, `text`, `finish_reason`, `stop_reason`, logprobs, `cumulative_logprob`
and `error` are those of choice 0 (vLLM's RequestOutput has none; DESIGN.md requires them on
every output). Its `prompt_token_ids` / prompt logprobs / `prompt_logprob_ranks` belong to the
prompt and `usage` to the whole request: the prompt counted once, completion tokens summed over
the choices (the OpenAI `usage` of n choices).
A one-choice output is its own only choice (`outputs == [self]`, `index == 0`).

`prompt` (vLLM's RequestOutput.prompt, read by vLLM's quickstart: `output.prompt`): the prompt
text of an `LLM.generate` output given as text (a str or {"prompt": str}), of an `LLM.chat`
output the rendered conversation; None for token-id prompts and for stream deltas. It is kept
outside the struct's fields (`set_prompt`), so the encoded layout is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec


@dataclass(slots=True)
class Logprob:
    """vLLM's Logprob (vllm/logprobs.py): one token's entry in a position's logprobs dict.
    `logprob`: its log-probability under the raw model distribution; `rank`: its 1-based rank
    in the vocabulary; `decoded_token`: the token decoded on its own (None without a
    tokenizer)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def _decoder(tokenizer: Any) -> Any:
    """`tid -> decoded_token` for one build (a token repeated across positions is decoded
    once); always None without a tokenizer."""
    if tokenizer is None:
        return lambda tid: None
    from atom_stream.detokenizer import decode_token

    cache: dict[int, str] = {}

    def decode(tid: int) -> str:
        s = cache.get(tid)
        if s is None:
            s = cache[tid] = decode_token(tokenizer, tid)
        return s

    return decode


def position_logprobs(tid: int, logprob: float, tops: list, rank: int | None,
                      decode: Any) -> dict[int, Logprob]:
    """One position's vLLM dict: token `tid` (sampled, or the prompt token) with `logprob` and
    its vocabulary `rank` first, then `tops` ([(id, logprob)], best first) with ranks 1..k. A
    `tid` inside the top-k keeps its first place and takes its top-k entry (vLLM's dict
    comprehension over the same sequence). `rank` None: k + 1 (overwritten when in the top-k)."""
    d = {tid: Logprob(logprob, len(tops) + 1 if rank is None else rank, decode(tid))}
    for r, (t, v) in enumerate(tops, 1):
        d[t] = Logprob(v, r, decode(t))
    return d


class Usage(msgspec.Struct, gc=False):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class RequestOutput(msgspec.Struct, dict=True):  # __dict__: prompt, logprob caches; never encoded
    request_id: str
    token_ids: list[int] = msgspec.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    usage: Usage | None = None
    engine_logprobs: list | None = msgspec.field(default=None, name="logprobs")
    error: str | None = None
    prompt_token_ids: list[int] | None = None
    engine_prompt_logprobs: list | None = msgspec.field(default=None, name="prompt_logprobs")
    prompt_logprob_ranks: list[int] | None = None
    cumulative_logprob: float | None = None
    logprob_ranks: list[int] | None = None

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

    def set_tokenizer(self, tokenizer: Any) -> RequestOutput:
        """The tokenizer that fills `Logprob.decoded_token` (the engine sets it on outputs
        that carry logprobs; None: no decoded tokens); returns self."""
        self.__dict__["_tokenizer"] = tokenizer
        return self

    def share_logprobs_with(self, other: RequestOutput) -> RequestOutput:
        """Let this output (a copy of `other` whose `engine_logprobs` is a prefix of
        `other`'s) reuse the Logprob dicts built for `other`'s lineage, and take its tokenizer
        and num_cached_tokens (attributes a struct copy drops); returns self. `other` must
        only grow by `merge` afterwards."""
        d, od = self.__dict__, other.__dict__
        if "_tokenizer" in od:
            d["_tokenizer"] = od["_tokenizer"]
        if "_num_cached" in od:  # not logprobs, but lost by the same struct copy
            d["_num_cached"] = od["_num_cached"]
        if other.engine_logprobs is not None:
            d["_lp_pool"] = od.setdefault("_lp_pool", [])
        return self

    @property
    def logprobs(self) -> list[dict[int, Logprob] | None] | None:
        """vLLM's CompletionOutput.logprobs (see the module docstring): one dict per token of
        `token_ids`; None when logprobs were not asked for. Built on first access and cached
        (an output grown by `merge` builds only the new positions)."""
        raw = self.engine_logprobs
        if raw is None:
            return None
        d = self.__dict__
        own = d.get("_lp")
        if own is None:
            own = d["_lp"] = []
        n = len(raw)
        if len(own) < n:
            pool = d.get("_lp_pool")  # shared with the CUMULATIVE copies of one request
            if pool is None:
                pool = d["_lp_pool"] = []
            if len(pool) < n:
                decode = _decoder(d.get("_tokenizer"))
                ranks, ids = self.logprob_ranks or (), self.token_ids
                for j in range(len(pool), n):
                    e = raw[j]
                    pool.append(None if e is None else position_logprobs(
                        ids[j], e[0], e[1], ranks[j] if j < len(ranks) else None, decode))
            own.extend(pool[len(own):n])
        return own

    @property
    def prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        """vLLM's RequestOutput.prompt_logprobs: `[None, dict, ...]`, one per prompt position
        (the first has none); None when not asked for (or on deltas after the first). Built on
        first access and cached."""
        raw = self.engine_prompt_logprobs
        if raw is None:
            return None
        d = self.__dict__
        built = d.get("_plp")
        if built is not None and built[0] is raw:
            return built[1]
        ids = self.prompt_token_ids or []
        m = len(ids)
        lps = raw[-m:] if m else []  # aligned with the last prompt positions (as the servers')
        ranks = self.prompt_logprob_ranks
        ranks = ranks[-m:] if ranks is not None and m and len(ranks) == len(raw) else None
        decode = _decoder(d.get("_tokenizer"))
        out: list = [None] * (m - len(lps))
        for j, (tid, e) in enumerate(zip(ids[m - len(lps):], lps)):
            out.append(None if e is None else position_logprobs(
                tid, e[0], e[1], None if ranks is None else ranks[j], decode))
        d["_plp"] = (raw, out)
        return out

    @property
    def num_cached_tokens(self) -> int | None:
        """vLLM's RequestOutput.num_cached_tokens: the prompt tokens served from the prefix
        cache. As vLLM's, it is on every output of a request once its prompt was scheduled:
        `usage.cached_tokens` on the final output, the count the engine set at admission
        (`set_num_cached_tokens`) on the others; None on an output that has neither."""
        if self.usage is not None:
            return self.usage.cached_tokens
        return self.__dict__.get("_num_cached")

    def set_num_cached_tokens(self, n: int) -> RequestOutput:
        """Attach the request's prefix-cache hit count to a non-final delta (kept outside the
        struct's fields, as `prompt`: the encoded layout is unchanged); returns self."""
        self.__dict__["_num_cached"] = n
        return self

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM-style alias: `out.outputs[0].text` / `.token_ids` / `.finish_reason`."""
        return [self]

    # vLLM's RequestOutput / CompletionOutput fields this engine has no use for, always None
    # here as there with their features off (no stats logger, no LoRA, decoder-only, no KV
    # connector): properties, so the encoded layout is unchanged
    @property
    def metrics(self) -> None:
        return None

    @property
    def lora_request(self) -> None:
        return None

    @property
    def encoder_prompt(self) -> None:
        return None

    @property
    def encoder_prompt_token_ids(self) -> None:
        return None

    @property
    def kv_transfer_params(self) -> None:
        return None

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
        if later.engine_logprobs:
            if self.engine_logprobs is None:
                self.engine_logprobs = []
            self.engine_logprobs.extend(later.engine_logprobs)
            if later.logprob_ranks is not None:
                if self.logprob_ranks is None:
                    self.logprob_ranks = []
                self.logprob_ranks.extend(later.logprob_ranks)
            self._take_tokenizer(later)
        if self.prompt_token_ids is None:
            self.prompt_token_ids = later.prompt_token_ids
        if "_num_cached" in later.__dict__:
            self.__dict__.setdefault("_num_cached", later.__dict__["_num_cached"])
        if self.engine_prompt_logprobs is None and later.engine_prompt_logprobs is not None:
            self.engine_prompt_logprobs = later.engine_prompt_logprobs
            self.prompt_logprob_ranks = later.prompt_logprob_ranks
            self._take_tokenizer(later)
        if later.cumulative_logprob is not None:  # a running total: the later one holds all
            self.cumulative_logprob = later.cumulative_logprob
        if later.finish_reason is not None:
            self.finish_reason = later.finish_reason
            self.stop_reason = later.stop_reason
            self.usage = later.usage
            self.error = later.error
        return self

    def _take_tokenizer(self, later: RequestOutput) -> None:
        """Keep `later`'s tokenizer (for decoded_token) when this output has none."""
        tok = later.__dict__.get("_tokenizer")
        if tok is not None:
            self.__dict__.setdefault("_tokenizer", tok)


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
        outs = [CompletionOutput(**msgspec.structs.asdict(c), index=k).share_logprobs_with(c)
                for k, c in enumerate(choices)]
        first, src = outs[0], outs[last]
        usage = combined_usage(outs, src)
        prompt_ids = next((c.prompt_token_ids for c in (src, *outs)
                           if c.prompt_token_ids is not None), None)
        return cls(request_id=request_id, token_ids=first.token_ids, text=first.text,
                   finish_reason=first.finish_reason, stop_reason=first.stop_reason,
                   usage=usage, engine_logprobs=first.engine_logprobs, error=first.error,
                   prompt_token_ids=prompt_ids,
                   engine_prompt_logprobs=src.engine_prompt_logprobs,
                   prompt_logprob_ranks=src.prompt_logprob_ranks,
                   cumulative_logprob=first.cumulative_logprob,
                   logprob_ranks=first.logprob_ranks, choices=outs).share_logprobs_with(first)


def combined_usage(finals: list[RequestOutput], src: RequestOutput) -> Usage | None:
    """The usage of an n > 1 request from its choices' final outputs: the prompt counted once
    (and its cached tokens) from `src` (the choice that finished last), completion tokens
    summed over the choices (the OpenAI `usage` of n choices); None when none has usage."""
    usages = [c.usage for c in finals if c.usage is not None]
    if not usages:
        return None
    base = src.usage or usages[-1]
    completion = sum(u.completion_tokens for u in usages)
    return Usage(base.prompt_tokens, completion, base.prompt_tokens + completion,
                 base.cached_tokens)
