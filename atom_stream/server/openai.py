"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, ...

Request path (both completion routes): read the body under `--max-body-bytes` (413) -> msgspec
decode into the request Struct (type errors -> 400 naming the JSON path) -> model name check
(404) -> SamplingParams (400 naming the parameter) -> `engine.generate(...)` once per choice
(n > 1 and batched completion prompts fan out into child requests `<id>-<k>`; a child's seed is
`seed + k`, as vLLM) -> the first delta of every choice is awaited before answering, so errors the
engine raises before its first yield (prompt too long -> 400 `input_tokens`, overload -> 503 +
Retry-After, bad token ids -> 400) become proper HTTP errors instead of stream events.

Streaming answers are produced by `openai_stream.py` (vLLM's SSE bytes); non-streaming answers
are collected here while a watcher cancels the work if the client disconnects (the engine stream
is closed, which aborts the request and frees its blocks).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from atom_stream.engine.outputs import RequestOutput
from atom_stream.errors import GenerationError
from atom_stream.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    ModelPermission,
    PromptTokensDetails,
    ResponseMessage,
    UsageInfo,
    validation_param,
)
from atom_stream.sampling_params import SamplingParams, SamplingParamsError
from atom_stream.server import openai_stream
from atom_stream.server.responses import (
    VALIDATION_TYPE,
    ClientGone,
    HTTPError,
    SSEResponse,
    json_response,
    read_body,
    until_disconnect,
)

_DECODERS = {
    cls: msgspec.json.Decoder(cls)
    for cls in (ChatCompletionRequest, CompletionRequest)
}
_OFFLOOP_CHARS = 2048  # tokenize longer texts in a thread (never block the loop)
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "prompt_logprobs")


def _invalid(message: str, param: str | None = None) -> HTTPError:
    """A request-schema error (vLLM's RequestValidationError: 400, type "Bad Request")."""
    return HTTPError(400, message, param, type=VALIDATION_TYPE)


def decode_request(cls: type, body: bytes) -> Any:
    if not body:
        raise _invalid("the request body is empty; expected a JSON object")
    try:
        return _DECODERS[cls].decode(body)
    except msgspec.ValidationError as e:
        raise _invalid(f"invalid request: {e}", validation_param(e)) from None
    except msgspec.DecodeError as e:
        raise _invalid(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # issue 10 fuzzing: deeply nested arrays in Any fields were a 500
        raise _invalid("the request body is nested too deeply") from None


def refuse_structured_output(req: Any) -> None:
    """Structured output (response_format json_object / json_schema, guided_*) is not served:
    a clear 400 rather than unconstrained text under a 200."""
    rf = req.response_format
    if rf is not None and rf.get("type", "text") != "text":
        raise HTTPError(400, f"response_format {rf.get('type')!r} is not supported: this "
                        "server has no structured-output decoding; use type 'text'",
                        "response_format")
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(req, name) is not None:
            raise HTTPError(400, f"{name} is not supported: this server has no "
                            "structured-output decoding", name)


def chat_tools_kwargs(req: ChatCompletionRequest) -> dict[str, Any]:
    """The request's tools for the chat template ({"tools": [...]}, or {}); tool_choice other
    than "none" needs tool-call parsing, which this server does not do: a 400."""
    choice = req.tool_choice
    if choice is not None and choice != "none":
        what = choice if isinstance(choice, str) else "named"
        raise HTTPError(400, f"tool_choice {what!r} is not supported: this server does not "
                        "parse tool calls (tool_choice 'none' renders the tools into the prompt)",
                        "tool_choice")
    return {"tools": req.tools} if req.tools else {}


def stream_usage(opts: Any) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a request's stream_options as vLLM applies
    them: usage only when the object is given (include_usage then defaults to true), and
    per-chunk usage only together with include_usage."""
    if opts is None:
        return False, False
    include = bool(opts.include_usage)
    return include, include and bool(opts.continuous_usage_stats)


def messages_to_dicts(messages: list[ChatMessage], param: str = "messages") -> list[dict]:
    """ChatMessage Structs -> the plain dicts chat templates take (text parts joined)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type == "text" and part.text is None:
                    raise HTTPError(400, "a content part of type 'text' needs a 'text' string",
                                    f"{param}[{i}].content")
                if part.type != "text":
                    raise HTTPError(400, f"content part type {part.type!r} is not supported; "
                                    "this server serves text only", f"{param}[{i}].content")
                texts.append(part.text)
            content = "\n".join(texts)  # vLLM's "string" content format
        d = msgspec.to_builtins(m)
        d["content"] = content if content is not None else ""
        out.append(d)
    if not out:
        raise HTTPError(400, "messages must not be empty", param)
    return out


def build_sampling_params(req: ChatCompletionRequest | CompletionRequest, chat: bool
                          ) -> SamplingParams:
    """Request fields -> SamplingParams; errors name the request's field, not ours."""
    kw: dict[str, Any] = {"n": req.n, "ignore_eos": req.ignore_eos, "min_tokens": req.min_tokens,
                          "skip_special_tokens": req.skip_special_tokens,
                          "include_stop_str_in_output": req.include_stop_str_in_output}
    renames: dict[str, str] = {}
    for name in _SAMPLING_FIELDS:
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.stop is not None:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if req.stop_token_ids:
        kw["stop_token_ids"] = list(req.stop_token_ids)
    if req.logit_bias:
        kw["logit_bias"] = dict(req.logit_bias)
    if req.allowed_token_ids is not None:
        kw["allowed_token_ids"] = list(req.allowed_token_ids)
    if req.bad_words:
        kw["bad_words"] = list(req.bad_words)
    if req.cache_salt is not None:
        kw["cache_salt"] = req.cache_salt
    refuse_structured_output(req)
    if chat:
        if req.max_completion_tokens is not None:
            kw["max_tokens"] = req.max_completion_tokens
            renames["max_tokens"] = "max_completion_tokens"
        else:
            kw["max_tokens"] = req.max_tokens
        if req.logprobs:
            kw["logprobs"] = req.top_logprobs or 0
            renames["logprobs"] = "top_logprobs"
        elif req.top_logprobs:
            raise _invalid("top_logprobs requires logprobs to be true", "top_logprobs")
    else:
        kw["max_tokens"] = req.max_tokens
        if req.logprobs is not None:
            kw["logprobs"] = req.logprobs
            if req.echo and req.prompt_logprobs is None:
                kw["prompt_logprobs"] = req.logprobs
    if req.stream_options is not None and not req.stream:
        raise _invalid("stream_options can only be set when stream is true", "stream_options")
    if req.stream and req.prompt_logprobs is not None:
        raise _invalid("prompt_logprobs is not supported when stream is true",
                       "prompt_logprobs")
    try:
        return SamplingParams(**kw)
    except SamplingParamsError as e:
        param = renames.get(e.param, e.param)
        raise HTTPError(400, str(e).replace(f"{e.param}:", f"{param}:", 1), param) from None


def completion_prompts(prompt: str | list[Any]) -> list[str | list[int]]:
    """str | [int] | [str] | [[int]] -> a list of engine prompts (a batch of one or more)."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(is_ids(p) for p in prompt):
        return list(prompt)
    raise HTTPError(400, "prompt must be a string, a list of strings, a list of token ids or a "
                    "list of token-id lists (non-empty)", "prompt")


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
    logprobs: list = field(default_factory=list)
    prompt_ids: list[int] | None = None
    prompt_logprobs: list | None = None
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


class OpenAIServing:
    """The route handlers; `state` is the app's ServerState (engine, config, metrics)."""

    def __init__(self, state: Any):
        self.state = state

    # ---------------------------------------------------------------- helpers
    @property
    def engine(self) -> Any:
        return self.state.engine

    def _model(self, requested: str | None) -> str:
        names = self.state.model_names
        if requested and requested not in names:
            raise HTTPError(404, f"The model `{requested}` does not exist.", "model")
        return names[0]

    def _error(self, route: str, exc: BaseException) -> Response:
        err = HTTPError.from_exception(exc)
        self.state.metrics.request(route, err.status)
        return err.response()

    async def _offloop(self, fn: Any, size: int) -> Any:
        if size > _OFFLOOP_CHARS:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        return fn()

    async def _start(self, prompts: list[Any], params: SamplingParams, rid: str,
                     template_kwargs: dict | None, add_special_tokens: bool = True,
                     chat_options: dict | None = None) -> list[Choice]:
        """Submit every child request and await each one's first delta (errors surface here)."""
        engine = self.engine
        n = params.n
        total = len(prompts) * n
        cap = getattr(engine, "max_live_requests", None)
        if cap is not None and total > cap:
            # could never all be admitted: refuse before queueing any (it would crowd out
            # other clients' requests until its own 503)
            raise HTTPError(400, f"{len(prompts)} prompt(s) x n={n} = {total} requests exceed "
                            f"what the server holds at once ({cap}: max_num_seqs + "
                            f"max_waiting_requests)", "n" if n > 1 else "prompt")
        gens = []
        for p_idx, prompt in enumerate(prompts):
            for i in range(n):
                child = params.child(i) if n > 1 else params
                child_id = rid if total == 1 else f"{rid}-{p_idx * n + i}"
                gens.append(engine.generate(prompt, child, child_id,
                                            chat_template_kwargs=template_kwargs,
                                            strict_max_tokens=True,
                                            add_special_tokens=add_special_tokens,
                                            **(chat_options or {})))
        if total == 1:
            firsts: list[Any] = [await _first(gens[0])]
        else:
            firsts = list(await asyncio.gather(*(_first(g) for g in gens),
                                               return_exceptions=True))
        failed = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failed is not None:
            for g in gens:
                await g.aclose()
            raise failed
        return [Choice(k, f, g, k // n) for k, (f, g) in enumerate(zip(firsts, gens))]

    async def _collect(self, choices: list[Choice]) -> list[Collected]:
        results = [Collected() for _ in choices]
        try:
            async for i, out in iterate(choices):
                r = results[i]
                r.text.append(out.text)
                r.token_ids.extend(out.token_ids)
                if out.logprobs:
                    r.logprobs.extend(out.logprobs)
                if out.prompt_token_ids is not None:
                    r.prompt_ids = out.prompt_token_ids
                if out.prompt_logprobs is not None:
                    r.prompt_logprobs = out.prompt_logprobs
                if out.finish_reason is not None:
                    if out.finish_reason == "abort":
                        raise GenerationError("the request was aborted (server shutting down)")
                    r.finish_reason, r.stop_reason, r.usage = (out.finish_reason,
                                                               out.stop_reason, out.usage)
        finally:
            await close_choices(choices)
        return results

    @staticmethod
    def _usage(choices: list[Choice], results: list[Collected]) -> UsageInfo:
        first = {c.prompt_key: r.usage for c, r in zip(choices, results) if r.usage}
        prompt_tokens = sum(u.prompt_tokens for u in first.values())
        completion = sum(r.usage.completion_tokens for r in results if r.usage)
        usage = UsageInfo(prompt_tokens, prompt_tokens + completion, completion)
        cached = sum(u.cached_tokens for u in first.values())
        if cached:
            usage.prompt_tokens_details = PromptTokensDetails(cached)
        return usage

    # ---------------------------------------------------------------- chat
    async def chat_completions(self, request: Request) -> Response:
        route = "/v1/chat/completions"
        choices: list[Choice] = []
        try:
            req = decode_request(ChatCompletionRequest, await read_body(
                request, self.state.config.max_body_bytes))
            model = self._model(req.model)
            params = build_sampling_params(req, chat=True)
            messages = messages_to_dicts(req.messages)
            kwargs = {**self.state.config.default_chat_template_kwargs,
                      **(req.chat_template_kwargs or {}), **chat_tools_kwargs(req)} or None
            if req.continue_final_message and req.add_generation_prompt:
                raise HTTPError(400, "Cannot set both `continue_final_message` and "
                                "`add_generation_prompt` to True.", type=VALIDATION_TYPE)
            rid = f"chatcmpl-{req.request_id or uuid.uuid4().hex}"  # vLLM's prefixing
            # the engine renders the template off the loop (always, whatever the size)
            choices = await self._start([messages], params, rid, kwargs, chat_options={
                "add_generation_prompt": req.add_generation_prompt,
                "continue_final_message": req.continue_final_message})
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return self._error(route, e)
        self.state.metrics.request(route, 200)
        # vLLM's get_chat_request_role: the last message's role without a generation prompt
        role = "assistant" if req.add_generation_prompt else messages[-1]["role"]
        echo = ""
        if req.echo and messages[-1].get("role") == role:
            echo = messages[-1]["content"]
        ctx = openai_stream.StreamContext(rid, int(time.time()), model, self.engine.tokenizer,
                                          params.logprobs, req.return_tokens_as_token_ids)
        if req.stream:
            opts = req.stream_options
            return self._sse(openai_stream.chat_stream(
                ctx, choices, echo, *stream_usage(opts), role=role))
        results = await self._collect_or_error(request, route, choices)
        if isinstance(results, Response):
            return results
        out = []
        for i, r in enumerate(results):
            lp = (openai_stream.chat_logprobs(ctx, r.token_ids, r.logprobs)
                  if params.logprobs is not None else None)
            out.append(ChatChoice(i, ResponseMessage(role, echo + "".join(r.text)), lp,
                                  r.finish_reason, r.stop_reason))
        return json_response(ChatCompletionResponse(rid, "chat.completion", ctx.created, model,
                                                    out, self._usage(choices, results)))

    def _sse(self, frames) -> SSEResponse:
        return SSEResponse(frames, on_disconnect=self.state.metrics.http_disconnects.inc,
                           gauge=self.state.metrics.sse_streams)

    async def _collect_or_error(self, request: Request, route: str, choices):
        """Await every choice's final output; a client that left gets 499, an error its body."""
        try:
            return await until_disconnect(request, self._collect(choices))
        except ClientGone:
            self.state.metrics.http_disconnects.inc()
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001
            return self._error(route, e)

    # ---------------------------------------------------------------- completions
    async def completions(self, request: Request) -> Response:
        route = "/v1/completions"
        try:
            req = decode_request(CompletionRequest, await read_body(
                request, self.state.config.max_body_bytes))
            model = self._model(req.model)
            if req.suffix:
                raise HTTPError(400, "suffix is not supported", "suffix")
            params = build_sampling_params(req, chat=False)
            prompts = completion_prompts(req.prompt)
            rid = f"cmpl-{req.request_id or uuid.uuid4().hex}"
            choices = await self._start(prompts, params, rid, None, req.add_special_tokens)
        except Exception as e:  # noqa: BLE001
            return self._error(route, e)
        self.state.metrics.request(route, 200)
        tok = self.engine.tokenizer
        if req.echo:  # each token-id prompt decoded once (n choices share it), long ones off-loop
            texts: dict[int, str] = {}
            for c in choices:
                k = c.index // params.n
                if k not in texts:
                    p = prompts[k]
                    texts[k] = p if isinstance(p, str) else await self._offloop(
                        lambda p=p: tok.decode(p, skip_special_tokens=False), 4 * len(p))
                c.prompt_text = texts[k]
        ctx = openai_stream.StreamContext(rid, int(time.time()), model, tok, params.logprobs,
                                          req.return_tokens_as_token_ids)
        if req.stream:
            opts = req.stream_options
            return self._sse(openai_stream.completion_stream(
                ctx, choices, req.echo, *stream_usage(opts)))
        results = await self._collect_or_error(request, route, choices)
        if isinstance(results, Response):
            return results
        out = []
        for c, r in zip(choices, results):
            text = "".join(r.text)
            ids, lps = r.token_ids, r.logprobs
            if req.echo:
                text = (c.prompt_text or "") + text
                ids = (r.prompt_ids or []) + ids
                lps = openai_stream.pad_prompt_logprobs(r.prompt_logprobs, r.prompt_ids) + lps
            lp = (openai_stream.completion_logprobs(ctx, ids, lps, 0)
                  if params.logprobs is not None else None)
            out.append(CompletionChoice(c.index, text, lp, r.finish_reason, r.stop_reason))
        return json_response(CompletionResponse(rid, "text_completion", ctx.created, model, out,
                                                self._usage(choices, results)))

    # ---------------------------------------------------------------- small routes
    async def models(self, request: Request) -> Response:
        engine = self.engine
        root = self.state.engine_config.model or "demo"
        cards = [ModelCard(id=name, created=self.state.started, root=root,
                           max_model_len=engine.max_model_len, permission=[ModelPermission(
                               f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}",
                               self.state.started)])
                 for name in self.state.model_names]
        return json_response(ModelList(cards))


async def _first(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        raise GenerationError("the engine ended the request without output") from None
