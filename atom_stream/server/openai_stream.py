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
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from msgspec import UNSET

from atom_stream.errors import GenerationError
from atom_stream.protocol import (
    ChatCompletionChunk,
    ChatLogprobs,
    ChatLogprobToken,
    ChatStreamChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionStreamChoice,
    CompletionUsageChunk,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)
from atom_stream.server.responses import FinalChunk, HTTPError

DONE = b"data: [DONE]\n\n"
CHAT_OBJECT = "chat.completion.chunk"
COMPLETION_OBJECT = "text_completion"
_ENC = msgspec.json.Encoder()
_MARK = "\x00"
_MARK_JSON = b'"\\u0000"'
_MIN_LOGPROB = -9999.0  # OpenAI's floor; JSON has no -inf


class StreamContext:
    __slots__ = ("_strs", "as_ids", "created", "logprobs", "model", "rid", "tokenizer")

    def __init__(self, rid: str, created: int, model: str, tokenizer: Any, logprobs: int | None,
                 as_ids: bool = False):
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
            s = self.tokenizer.decode([tid], skip_special_tokens=False)
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates cannot go into JSON
                s = s.encode("utf-8", "replace").decode("utf-8")
            self._strs[tid] = s
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


def pad_prompt_logprobs(plps: list | None, prompt_ids: list[int] | None) -> list:
    """Prompt logprobs aligned with the prompt ids (the first position has none)."""
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
                      continuous: bool, role: str = "assistant") -> AsyncIterator[bytes]:
    from atom_stream.server.openai import iterate  # circular: openai imports this module

    rid, created, model = ctx.rid, ctx.created, ctx.model
    n = len(choices)
    prompt_tokens = len(choices[0].first.prompt_token_ids or ())
    completion = [0] * n
    fast = ctx.logprobs is None and not continuous
    templates: dict[int, tuple[bytes, bytes]] = {}

    def usage(i: int) -> Any:
        if not continuous:
            return UNSET
        return UsageInfo(prompt_tokens, prompt_tokens + completion[i], completion[i])

    def chunk(i: int, delta: DeltaMessage, lp: Any = None, finish: Any = None,
              stop: Any = UNSET) -> bytes:
        return sse(ChatCompletionChunk(rid, CHAT_OBJECT, created, model,
                                       [ChatStreamChoice(i, delta, lp, finish, stop)], usage(i)))

    tail: list[bytes] = []
    try:
        # vLLM: every choice's role chunk, then every choice's echo chunk
        head = [chunk(c.index, DeltaMessage(role=role, content="")) for c in choices]
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
                        lp = (chat_logprobs(ctx, out.token_ids, out.logprobs)
                              if ctx.logprobs is not None else None)
                        yield chunk(i, DeltaMessage(content=out.text), lp)
                    continue
                if out.finish_reason == "abort":
                    raise GenerationError("the request was aborted (server shutting down)")
                lp = (chat_logprobs(ctx, out.token_ids, out.logprobs)
                      if ctx.logprobs is not None else None)
                last = chunk(i, DeltaMessage(content=out.text), lp, out.finish_reason,
                             out.stop_reason)
                finished += 1
                if finished == n:
                    tail.append(last)
                else:
                    yield last
    except Exception as e:  # noqa: BLE001 - after the 200: an error event, then [DONE]
        yield FinalChunk(b"".join(tail) + error_event(e) + DONE)
        return
    if include_usage:
        total = sum(completion)
        tail.append(sse(ChatCompletionChunk(rid, CHAT_OBJECT, created, model, [],
                                            UsageInfo(prompt_tokens, prompt_tokens + total,
                                                      total))))
    tail.append(DONE)
    yield FinalChunk(b"".join(tail))


async def completion_stream(ctx: StreamContext, choices: list, echo: bool, include_usage: bool,
                            continuous: bool) -> AsyncIterator[bytes]:
    from atom_stream.server.openai import iterate

    rid, created, model = ctx.rid, ctx.created, ctx.model
    n = len(choices)
    prompt_tokens = [len(c.first.prompt_token_ids or ()) for c in choices]
    completion = [0] * n
    text_len = [0] * n  # text_offset of the next chunk's first token
    echoed = [not echo] * n
    fast = ctx.logprobs is None and not continuous
    templates: dict[int, tuple[bytes, bytes]] = {}

    def chunk(i: int, text: str, ids: list[int], lps: list | None, finish: Any = None,
              stop: Any = None) -> bytes:
        lp = None
        if ctx.logprobs is not None:
            lp = completion_logprobs(ctx, ids, lps or [None] * len(ids), text_len[i])
        use = None
        if continuous:
            use = UsageInfo(prompt_tokens[i], prompt_tokens[i] + completion[i], completion[i])
        return sse(CompletionChunk(rid, COMPLETION_OBJECT, created, model,
                                   [CompletionStreamChoice(i, text, lp, finish, stop)], use))

    tail: list[bytes] = []
    try:
        finished = 0
        async with contextlib.aclosing(iterate(choices)) as stream:
            async for i, out in stream:
                completion[i] += len(out.token_ids)
                text, ids, lps = out.text, out.token_ids, out.logprobs
                if not echoed[i]:
                    echoed[i] = True
                    c = choices[i]
                    text = (c.prompt_text or "") + text
                    pids = out.prompt_token_ids or []
                    ids = pids + ids
                    lps = pad_prompt_logprobs(out.prompt_logprobs, pids) + (
                        lps or [None] * len(out.token_ids))
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
                        yield chunk(i, text, ids, lps)
                        # vLLM's previous_text_lens: the output's text only, so offsets after
                        # the echo chunk do not count the echoed prompt
                        text_len[i] += len(out.text)
                    continue
                if out.finish_reason == "abort":
                    raise GenerationError("the request was aborted (server shutting down)")
                last = chunk(i, text, ids, lps, out.finish_reason, out.stop_reason)
                finished += 1
                if finished == n:
                    tail.append(last)
                else:
                    yield last
    except Exception as e:  # noqa: BLE001
        yield FinalChunk(b"".join(tail) + error_event(e) + DONE)
        return
    if include_usage:
        p = _prompt_total(choices, prompt_tokens)
        total = sum(completion)
        tail.append(sse(CompletionUsageChunk(rid, COMPLETION_OBJECT, created, model, [],
                                             UsageInfo(p, p + total, total))))
    tail.append(DONE)
    yield FinalChunk(b"".join(tail))


def _prompt_total(choices: list, prompt_tokens: list[int]) -> int:
    """Prompt tokens counted once per distinct prompt (n choices share one prompt)."""
    seen = {c.prompt_key: p for c, p in zip(choices, prompt_tokens)}
    return sum(seen.values())
