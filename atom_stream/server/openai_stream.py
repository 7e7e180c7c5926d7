"""SSE bodies of /v1/chat/completions and /v1/completions, byte for byte as vLLM sends them.

Chat (`object: "chat.completion.chunk"`, dumped like pydantic's exclude_unset):

    data: {"id":..,"object":..,"created":..,"model":..,"choices":[{"index":0,"delta":
          {"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}     role chunk
    data: {..."choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,
          "finish_reason":null}]}                                                     content
    data: {..."choices":[{"index":0,"delta":{"content":"lo"},"logprobs":null,
          "finish_reason":"length","stop_reason":null}]}                  last text + finish
    data: {..."choices":[],"usage":{"prompt_tokens":..,"total_tokens":..,
          "completion_tokens":..}}                            with stream_options.include_usage
    data: [DONE]

Completions use `object: "text_completion"`, `choices[{index,text,logprobs,finish_reason,
stop_reason}]` and a top-level `"usage":null` on every chunk (exclude_unset=False); no role chunk.
With `continuous_usage_stats` every chunk carries the running usage. As in vLLM, every delta that
carries tokens is sent, also when its text is empty (a partial UTF-8 character, text held back
for a stop string); only deltas without tokens are skipped. An error after the 200 goes out as
`data: {"error": {...}}` followed by `data: [DONE]`.

Hot path: a content chunk without logprobs or running usage is `prefix + json(text) + suffix`,
where prefix/suffix are cut once per choice from the msgspec encoding of the same chunk Struct,
so the bytes are the Struct's by construction and each token costs one string encode. The tail of
a stream (finish chunk, usage chunk, [DONE]) leaves in a single write (`FinalChunk`).

With a reasoning / tool-call parser (chat_parsing.py) a chat request's text goes through one
parser per choice: deltas carry `reasoning_content` / `content` / `tool_calls`, steps that add
nothing visible are skipped (vLLM), and the finish chunk carries what the parsers still held
(`{}` when nothing) with finish_reason "tool_calls" after tool calls.

vLLM extras carried by StreamContext: `return_token_ids` (completions: `prompt_token_ids` on a
choice's first chunk and `token_ids` on each; chat: `prompt_token_ids` on the role chunks and
`token_ids` on the choices; the fast path is off), `details` (`--enable-prompt-tokens-details`:
the usage chunk carries `prompt_tokens_details.cached_tokens`, 0 too; `final_usage` builds the
usage of streamed and non-streamed answers alike), `echo_only` (completions echo with
max_tokens 0: the echo chunk is the prompt alone). `prompt_logprobs_json` formats prompt logprobs
as vLLM's `list[dict[int, Logprob] | None]`, with the engine's rank of every prompt token.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from msgspec import UNSET

from atom_stream.detokenizer import decode_token
from atom_stream.errors import ServerShuttingDownError
from atom_stream.protocol import (
    ChatCompletionChunk,
    ChatLogprobs,
    ChatLogprobToken,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionStreamChoice,
    CompletionUsageChunk,
    DeltaMessage,
    PromptLogprob,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
)
from atom_stream.server.choices import iterate
from atom_stream.server.responses import FinalChunk, HTTPError

DONE = b"data: [DONE]\n\n"
CHAT_OBJECT = "chat.completion.chunk"
COMPLETION_OBJECT = "text_completion"
_ENC = msgspec.json.Encoder()
_MARK = "\x00"
_MARK_JSON = b'"\\u0000"'
_MIN_LOGPROB = -9999.0  # OpenAI's floor; JSON has no -inf


class StreamContext:
    __slots__ = ("_strs", "as_ids", "created", "details", "echo_only", "logprobs", "model",
                 "return_token_ids", "rid", "tokenizer")

    def __init__(self, rid: str, created: int, model: str, tokenizer: Any, logprobs: int | None,
                 as_ids: bool = False, *, return_token_ids: bool = False, details: bool = False,
                 echo_only: bool = False):
        self.return_token_ids = return_token_ids
        self.details = details  # --enable-prompt-tokens-details
        self.echo_only = echo_only
        self.rid = rid
        self.created = created
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.as_ids = as_ids  # return_tokens_as_token_ids
        self._strs: dict[int, str] = {}

    def token_str(self, tid: int) -> str:
        """A token's text as vLLM reports it in logprobs: the token decoded on its own (" hello",
        not the vocabulary's "Ġhello"; a partial UTF-8 sequence decodes to U+FFFD), specials
        as their text; "token_id:{id}" with return_tokens_as_token_ids. Its "bytes" are this
        string's UTF-8."""
        s = self._strs.get(tid)
        if s is None and self.as_ids:
            s = self._strs[tid] = f"token_id:{tid}"
        if s is None:
            s = self._strs[tid] = decode_token(self.tokenizer, tid)
        return s


def sse(obj: Any) -> bytes:
    return b"data: " + _ENC.encode(obj) + b"\n\n"


def _cut(chunk: Any) -> tuple[bytes, bytes]:
    pre, mark, post = _ENC.encode(chunk).rpartition(_MARK_JSON)
    assert mark, "template marker not found"
    return b"data: " + pre, post + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    return b"data: " + HTTPError.from_exception(exc).body() + b"\n\n"


def _clamp(x: float) -> float:
    return max(_MIN_LOGPROB, x)


def _sampled_first(tid: int, sampled: float, tops: list, k: int) -> list:
    """A position's (token, logprob) entries in vLLM's order: the sampled token first (its
    sampler puts it first), then the top k without it."""
    return [(tid, sampled)] + [(t, v) for t, v in tops[:k] if t != tid]


def chat_logprobs(ctx: StreamContext, token_ids: list[int], logprobs: list | None
                  ) -> ChatLogprobs:
    k = ctx.logprobs or 0
    content = []
    for tid, lp in zip(token_ids, logprobs or ()):
        sampled, tops = lp
        s = ctx.token_str(tid)
        top = []
        # vLLM: the first top_logprobs entries of that order (the sampled token leads, so a
        # sampled token outside the top k displaces the k-th)
        for t, v in _sampled_first(tid, sampled, tops, k)[:k]:
            ts = ctx.token_str(t)
            top.append(TopLogprob(ts, _clamp(v), list(ts.encode())))
        content.append(ChatLogprobToken(s, _clamp(sampled), list(s.encode()), top))
    return ChatLogprobs(content)


def prompt_logprobs_json(tokenizer: Any, prompt_ids: list[int] | None, plps: list | None,
                         ranks: list[int] | None = None) -> list:
    """Engine prompt logprobs (`(logprob, [(id, logprob), ...top-k])` for prompt positions
    1..n-1) and their `ranks` (RequestOutput.prompt_logprob_ranks, aligned with `plps`: the
    prompt token's rank in the vocabulary) -> vLLM's response `prompt_logprobs`: None for the
    first token, then per position a dict keyed by token id, the prompt token first with its
    rank, then the top-k with ranks 1..k (vLLM v1's LogprobsProcessor._make_logprob_dict: ranks
    `[sampled_token_rank, 1..k]`; a prompt token inside the top-k keeps its first place and
    takes the top-k entry). -inf is -9999.0 (vLLM's clamp_prompt_logprobs). Without `ranks`
    (an engine that gives none) a prompt token outside the top-k has rank null."""
    cache: dict[int, str] = {}

    def entry(tid: int, lp: float, rank: int | None) -> PromptLogprob:
        s = cache.get(tid)
        if s is None:
            s = cache[tid] = decode_token(tokenizer, tid)
        return PromptLogprob(-9999.0 if lp == float("-inf") else lp, rank, s)

    out: list = []
    padded = pad_prompt_logprobs(plps, prompt_ids)
    ranks_at = pad_prompt_logprobs(ranks, prompt_ids) if ranks is not None else None
    for k, (tid, lp) in enumerate(zip(prompt_ids or (), padded)):
        if lp is None:
            out.append(None)
            continue
        chosen, tops = lp
        rank = ranks_at[k] if ranks_at is not None else None
        if rank is None:
            rank = next((r for r, (t, _) in enumerate(tops, 1) if t == tid), None)
        d = {tid: entry(tid, chosen, rank)}
        for r, (t, v) in enumerate(tops, 1):
            d[t] = entry(t, v, r)
        out.append(d)
    return out


def final_usage(ctx: StreamContext, choices: list, usages: list) -> UsageInfo:
    """The final `usage` of a response, streamed (the usage chunk) or not, from each choice's
    final engine Usage (`usages[k]` for `choices[k]`; None where a choice has none): prompt
    tokens once per prompt (n choices share one), completion tokens summed over the choices.
    `prompt_tokens_details` only with --enable-prompt-tokens-details (vLLM), and then always,
    `cached_tokens: 0` included: vLLM main tests `num_cached_tokens is not None` (PR #44383,
    fixing issue #44377; completion/serving.py and chat_completion/serving.py's
    _make_prompt_tokens_details), and a v1 RequestOutput always has an int there. Releases
    before that fix tested truthiness and left out a zero count. The count is the cached
    tokens of the LAST prompt (vLLM's non-streamed `last_final_res.num_cached_tokens`), which
    vLLM counts once per prompt, not per choice, from the child that completes the output. Our
    n choices are separate engine requests whose counts can differ (on a cold cache choice 0
    writes the prompt's blocks and the others hit them in the same step), so the prompt's
    count is the largest of its choices', in both paths alike."""
    by_prompt: dict[int, Any] = {}
    cached: dict[int, int] = {}
    for c, u in zip(choices, usages):
        if u is not None:
            by_prompt.setdefault(c.prompt_key, u)  # choices come in index order: the first
            cached[c.prompt_key] = max(cached.get(c.prompt_key, 0), u.cached_tokens)
    prompt = sum(u.prompt_tokens for u in by_prompt.values())
    completion = sum(u.completion_tokens for u in usages if u is not None)
    usage = UsageInfo(prompt, prompt + completion, completion)
    if ctx.details and by_prompt:
        usage.prompt_tokens_details = PromptTokensDetails(cached[max(by_prompt)])
    return usage


def pad_prompt_logprobs(plps: list | None, prompt_ids: list[int] | None) -> list:
    """Prompt logprobs (or their ranks) aligned with the prompt ids (the first position has
    none)."""
    n = len(prompt_ids or ())
    plps = list(plps or ())
    return [None] * (n - len(plps)) + plps[-n:] if n else []


def completion_logprobs(ctx: StreamContext, token_ids: list[int], logprobs: list,
                        offset: int) -> CompletionLogprobs:
    k = ctx.logprobs or 0
    out = CompletionLogprobs([], [], [], [])
    for tid, lp in zip(token_ids, logprobs):
        s = ctx.token_str(tid)
        out.tokens.append(s)
        out.text_offset.append(offset)
        offset += len(s)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        sampled, tops = lp
        out.token_logprobs.append(_clamp(sampled))
        top: dict[str, float] = {}
        for t, v in _sampled_first(tid, sampled, tops, k):  # vLLM: up to k + 1 entries
            top[ctx.token_str(t)] = _clamp(v)  # as its dict comprehension: a repeated string
            # keeps its first place and takes the later value
        out.top_logprobs.append(top)
    return out


async def chat_stream(ctx: StreamContext, choices: list, echo: str, include_usage: bool,
                      continuous: bool, role: str = "assistant",
                      parser: Callable[[], Any] | None = None) -> AsyncIterator[bytes]:
    """`parser`: a factory of chat_parsing.OutputParser (one per choice) when the request is
    parsed for reasoning / tool calls: each step's text goes through it; a step it turns into
    nothing sends no chunk (unless its logprobs or token ids must go out: an empty delta)."""

    rid, created, model = ctx.rid, ctx.created, ctx.model
    n = len(choices)
    pids = choices[0].first.prompt_token_ids or []
    prompt_tokens = len(pids)
    completion = [0] * n
    rti = ctx.return_token_ids
    parsers = [parser() for _ in range(n)] if parser is not None else None
    fast = ctx.logprobs is None and not continuous and not rti and parsers is None
    templates: dict[int, tuple[bytes, bytes]] = {}
    finals: list[Any] = [None] * n  # each choice's final engine Usage (final_usage)

    def usage(i: int) -> Any:
        if not continuous:
            return UNSET
        return UsageInfo(prompt_tokens, prompt_tokens + completion[i], completion[i])

    def chunk(i: int, delta: DeltaMessage, lp: Any = None, finish: Any = None,
              stop: Any = UNSET, ids: Any = UNSET) -> bytes:
        return sse(ChatCompletionChunk(rid, CHAT_OBJECT, created, model,
                                       [ChatStreamChoice(i, delta, lp, finish, stop, ids)],
                                       usage(i)))

    def role_chunk(i: int) -> bytes:
        if not rti:
            return chunk(i, DeltaMessage(role=role, content=""))
        # vLLM: prompt_token_ids on the role chunks ("the first chunk ever")
        return sse(ChatCompletionChunk(rid, CHAT_OBJECT, created, model,
                                       [ChatStreamChoice(i, DeltaMessage(role=role, content=""))],
                                       usage(i), prompt_token_ids=list(pids)))

    tail: list[bytes] = []
    try:
        # vLLM: every choice's role chunk, then every choice's echo chunk
        head = [role_chunk(c.index) for c in choices]
        if echo:
            head += [chunk(c.index, DeltaMessage(content=echo)) for c in choices]
        yield b"".join(head)
        finished = 0
        async with contextlib.aclosing(iterate(choices)) as stream:
            async for i, out in stream:
                completion[i] += len(out.token_ids)
                if out.finish_reason is None:
                    if fast:
                        if out.text or out.token_ids:  # vLLM: a chunk per step with tokens
                            t = templates.get(i)
                            if t is None:
                                t = templates[i] = _cut(ChatCompletionChunk(
                                    rid, CHAT_OBJECT, created, model,
                                    [ChatStreamChoice(i, DeltaMessage(content=_MARK))]))
                            yield t[0] + _ENC.encode(out.text) + t[1]
                    elif out.text or out.token_ids:
                        delta = (DeltaMessage(content=out.text) if parsers is None
                                 else parsers[i].feed(out.text))
                        if delta is None:
                            if not out.token_ids or (ctx.logprobs is None and not rti):
                                continue
                            delta = DeltaMessage()
                        lp = (chat_logprobs(ctx, out.token_ids, out.engine_logprobs)
                              if ctx.logprobs is not None else None)
                        yield chunk(i, delta, lp, ids=list(out.token_ids) if rti else UNSET)
                    continue
                if out.finish_reason == "abort":
                    raise ServerShuttingDownError()
                finals[i] = out.usage
                lp = (chat_logprobs(ctx, out.token_ids, out.engine_logprobs)
                      if ctx.logprobs is not None else None)
                reason = out.finish_reason
                if parsers is None:
                    delta = DeltaMessage(content=out.text)
                else:  # the last text and whatever the parsers still hold
                    delta = parsers[i].finish(out.text) or DeltaMessage()
                    reason = parsers[i].finish_reason(reason)
                last = chunk(i, delta, lp, reason, out.stop_reason,
                             list(out.token_ids) if rti else UNSET)
                finished += 1
                if finished == n:
                    tail.append(last)
                else:
                    yield last
    except Exception as e:  # noqa: BLE001 - after the 200: an error event, then [DONE]
        yield FinalChunk(b"".join(tail) + error_event(e) + DONE)
        return
    if include_usage:
        tail.append(sse(ChatCompletionChunk(rid, CHAT_OBJECT, created, model, [],
                                            final_usage(ctx, choices, finals))))
    tail.append(DONE)
    yield FinalChunk(b"".join(tail))


async def completion_stream(ctx: StreamContext, choices: list, echo: bool, include_usage: bool,
                            continuous: bool) -> AsyncIterator[bytes]:

    rid, created, model = ctx.rid, ctx.created, ctx.model
    n = len(choices)
    prompt_tokens = [len(c.first.prompt_token_ids or ()) for c in choices]
    completion = [0] * n
    text_len = [0] * n  # text_offset of the next chunk's first token
    echoed = [not echo] * n
    rti = ctx.return_token_ids
    sent_prompt_ids = [not rti] * n
    fast = ctx.logprobs is None and not continuous and not rti
    templates: dict[int, tuple[bytes, bytes]] = {}
    finals: list[Any] = [None] * n  # each choice's final engine Usage (final_usage)

    def chunk(i: int, text: str, ids: list[int], lps: list | None, finish: Any = None,
              stop: Any = None, out: Any = None) -> bytes:
        lp = None
        if ctx.logprobs is not None:
            lp = completion_logprobs(ctx, ids, lps or [None] * len(ids), text_len[i])
        use = None
        if continuous:
            use = UsageInfo(prompt_tokens[i], prompt_tokens[i] + completion[i], completion[i])
        choice = CompletionStreamChoice(i, text, lp, finish, stop)
        if rti and out is not None:  # vLLM: prompt ids on the first chunk, delta ids on each
            if not sent_prompt_ids[i]:
                sent_prompt_ids[i] = True
                choice.prompt_token_ids = list(out.prompt_token_ids or ())
            choice.token_ids = list(out.token_ids)
        return sse(CompletionChunk(rid, COMPLETION_OBJECT, created, model, [choice], use))

    tail: list[bytes] = []
    try:
        finished = 0
        async with contextlib.aclosing(iterate(choices)) as stream:
            async for i, out in stream:
                completion[i] += len(out.token_ids)
                text, ids, lps = out.text, out.token_ids, out.engine_logprobs
                if not echoed[i]:
                    echoed[i] = True
                    # vLLM: with return_token_ids the echoed prompt text is ""; with
                    # max_tokens 0 (echo_only) the chunk is the prompt alone
                    ptext = "" if rti else (choices[i].prompt_text or "")
                    pids = out.prompt_token_ids or []
                    plps = pad_prompt_logprobs(out.engine_prompt_logprobs, pids)
                    if ctx.echo_only:
                        text, ids, lps = ptext, pids, plps
                    else:
                        text, ids = ptext + text, pids + ids
                        lps = plps + (lps or [None] * len(out.token_ids))
                elif out.finish_reason is None and fast:
                    if text or ids:  # vLLM sends "" when a token adds no text yet
                        t = templates.get(i)
                        if t is None:
                            t = templates[i] = _cut(CompletionChunk(
                                rid, COMPLETION_OBJECT, created, model,
                                [CompletionStreamChoice(i, _MARK)]))
                        yield t[0] + _ENC.encode(text) + t[1]
                    continue
                if out.finish_reason is None:
                    if text or ids:
                        yield chunk(i, text, ids, lps, out=out)
                        # vLLM's previous_text_lens: the output's text only, so offsets after
                        # the echo chunk do not count the echoed prompt
                        text_len[i] += len(out.text)
                    continue
                if out.finish_reason == "abort":
                    raise ServerShuttingDownError()
                finals[i] = out.usage
                last = chunk(i, text, ids, lps, out.finish_reason, out.stop_reason, out)
                finished += 1
                if finished == n:
                    tail.append(last)
                else:
                    yield last
    except Exception as e:  # noqa: BLE001
        yield FinalChunk(b"".join(tail) + error_event(e) + DONE)
        return
    if include_usage:
        tail.append(sse(CompletionUsageChunk(rid, COMPLETION_OBJECT, created, model, [],
                                             final_usage(ctx, choices, finals))))
    tail.append(DONE)
    yield FinalChunk(b"".join(tail))


def completion_choice(ctx: StreamContext, index: int, prompt_text: str | None, r: Any,
                      echo: bool, prompt_logprobs: int | None) -> CompletionChoice:
    """One non-streamed /v1/completions choice from a collected result, as vLLM's
    request_output_to_completion_response builds it: echo prepends the prompt ("" with
    return_token_ids); echo with max_tokens 0 (ctx.echo_only) shows the prompt alone (text, ids
    and logprobs) while token_ids / finish_reason / usage stay the one token run internally;
    prompt_logprobs whenever the engine computed them (asked for, or echo with logprobs)."""
    text, ids, lps = "".join(r.text), r.token_ids, r.logprobs
    if echo:
        ptext = "" if ctx.return_token_ids else (prompt_text or "")
        pids = r.prompt_ids or []
        plps = pad_prompt_logprobs(r.prompt_logprobs, pids)
        if ctx.echo_only:
            text, ids, lps = ptext, pids, plps
        else:
            text, ids, lps = ptext + text, pids + ids, plps + lps
    lp = completion_logprobs(ctx, ids, lps, 0) if ctx.logprobs is not None else None
    choice = CompletionChoice(index, text, lp, r.finish_reason, r.stop_reason)
    if prompt_logprobs is not None:
        choice.prompt_logprobs = prompt_logprobs_json(ctx.tokenizer, r.prompt_ids,
                                                      r.prompt_logprobs,
                                                      r.prompt_logprob_ranks)
    if ctx.return_token_ids:
        choice.token_ids = list(r.token_ids)
        choice.prompt_token_ids = list(r.prompt_ids or ())
    return choice


def add_prompt_extras(ctx: StreamContext, resp: Any, r: Any, prompt_logprobs: int | None
                      ) -> None:
    """Chat (vLLM's ChatCompletionResponse): prompt_logprobs and, with return_token_ids,
    prompt_token_ids sit on the response, not on the choices."""
    if prompt_logprobs is not None:
        resp.prompt_logprobs = prompt_logprobs_json(ctx.tokenizer, r.prompt_ids,
                                                    r.prompt_logprobs, r.prompt_logprob_ranks)
    if ctx.return_token_ids:
        resp.prompt_token_ids = list(r.prompt_ids or ())
