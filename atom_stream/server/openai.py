"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (/tokenize and
/detokenize: tokenization.py; a request's n child streams: choices.py).

Request path (both completion routes): read the body under `--max-body-bytes` (413) -> msgspec
decode into the request Struct (type errors -> 400 naming the JSON path) -> model name check
(404) -> SamplingParams (400 naming the parameter) -> `engine.generate(...)` once per choice
(n > 1 and batched completion prompts fan out into child requests `<id>-<k>`; a child's seed is
`seed + k`, as vLLM; every prompt is tokenized once and checked against max_model_len before any
child is submitted) -> the first delta of every choice is awaited before answering, so errors the
engine raises before its first yield (prompt too long -> 400 `input_tokens`, overload -> 503 +
Retry-After, bad token ids -> 400) become proper HTTP errors instead of stream events. That wait
(tokenizing, queueing, prefill) is raced against the client's disconnect, as vLLM's
`with_cancellation`: a client that leaves while its request is queued aborts it at once.

Chat answers are split into reasoning / content / tool calls when the server runs vLLM's
`--reasoning-parser` / `--enable-auto-tool-choice --tool-call-parser` (chat_parsing.py).
Streaming answers are produced by `openai_stream.py` (vLLM's SSE bytes); non-streaming answers
are collected here while a watcher cancels the work if the client disconnects (the engine stream
is closed, which aborts the request and frees its blocks). A request still running when the
server aborts it at shutdown is a 503 ServiceUnavailableError (errors.ServerShuttingDownError;
a stream: its error event, then [DONE]), as the WebSocket's error frame for the same event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from atom_stream.engine.outputs import RequestOutput
from atom_stream.engine.prompts import (
    need_tokenizer,
    resolve_chat_options,
    resolve_content_format,
)
from atom_stream.errors import (
    GenerationError,
    PromptTooLongError,
    ServerShuttingDownError,
)
from atom_stream.protocol import (
    THINKING_TYPES,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    ModelPermission,
    ResponseMessage,
    validation_param,
)
from atom_stream.sampling_params import SamplingParams
from atom_stream.server import openai_stream
from atom_stream.server.chat_parsing import ChatParsing, ParsePlan, continued_text
from atom_stream.server.choices import (
    Choice,
    Collected,
    close_choices,
    iterate,
)
from atom_stream.server.forced_tools import force_tool_schema, forced_tools
from atom_stream.server.openai_params import (
    _invalid,
    build_sampling_params,
    completion_prompts,
    echo_without_generation,
    messages_to_dicts,
    truncate_prompts,
)
from atom_stream.server.request_ids import base_request_id, engine_request_id
from atom_stream.server.responses import (
    ClientGone,
    HTTPError,
    SSEResponse,
    json_response,
    read_body,
    until_disconnect,
)

# strict=False: pydantic's lax mode, as vLLM's request models validate (an integral float or a
# numeric string for an int, a numeric string for a float, "true" / 1 for a bool)
_DECODERS = {
    cls: msgspec.json.Decoder(cls, strict=False)
    for cls in (ChatCompletionRequest, CompletionRequest)
}
_OFFLOOP_CHARS = 2048  # tokenize longer texts in a thread (never block the loop)


def decode_request(cls: type, body: bytes) -> Any:
    """body -> cls (a msgspec Struct; its decoder made once, lax like pydantic's default mode):
    schema errors are 400s naming the JSON path."""
    if not body:
        raise _invalid("the request body is empty; expected a JSON object")
    dec = _DECODERS.get(cls)
    if dec is None:
        dec = _DECODERS[cls] = msgspec.json.Decoder(cls, strict=False)
    try:
        return dec.decode(body)
    except msgspec.ValidationError as e:
        raise _invalid(f"invalid request: {e}", validation_param(e)) from None
    except msgspec.DecodeError as e:
        raise _invalid(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # issue 10 fuzzing: deeply nested arrays in Any fields were a 500
        raise _invalid("the request body is nested too deeply") from None


def template_fields(req: ChatCompletionRequest) -> dict[str, Any]:
    """The chat template variables a request sets with its own fields: vLLM's
    `reasoning_effort`, and ATOM's `thinking` (passed into the template as ATOM does; the
    switch's {"type": "enabled" | "adaptive" | "disabled"} form as the bool the K2.5 and
    DeepSeek templates read)."""
    out: dict[str, Any] = {}
    if req.reasoning_effort is not None:
        out["reasoning_effort"] = req.reasoning_effort
    thinking = req.thinking
    if isinstance(thinking, dict) and isinstance(thinking.get("type"), str):
        thinking = THINKING_TYPES.get(thinking["type"], thinking)
    if thinking is not None:
        out["thinking"] = thinking
    return out


def stream_usage(opts: Any) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a request's stream_options as current vLLM
    applies them: usage only when include_usage is true (absent or `{}`: none, vLLM PR #36379),
    and per-chunk usage only together with include_usage."""
    if opts is None:
        return False, False
    include = opts.include_usage is True
    return include, include and opts.continuous_usage_stats is True


class OpenChat(NamedTuple):
    """A chat request started by OpenAIServing.open_chat: the model name it answers with, its
    sampling params, how its output is parsed (None: not at all), its response id, its started
    choices (their first deltas awaited) and its messages as the template got them."""

    model: str
    params: SamplingParams
    plan: ParsePlan | None
    rid: str
    choices: list[Choice]
    messages: list[dict]


class OpenAIServing:
    """The route handlers; `state` is the app's ServerState (engine, config, metrics)."""

    def __init__(self, state: Any):
        self.state = state
        # --enable-auto-tool-choice / --tool-call-parser / --reasoning-parser
        self.parsing = ChatParsing.from_config(state.config)

    # ---------------------------------------------------------------- helpers
    @property
    def engine(self) -> Any:
        return self.state.engine

    def _model(self, requested: str | None) -> str:
        """The model name a response carries: the requested one when it is one of the served
        names (vLLM's _get_model_name), else the first; an unknown name is a 404."""
        names = self.state.model_names
        if requested and requested not in names:
            raise HTTPError(404, f"The model `{requested}` does not exist.", "model")
        return requested or names[0]

    def _error(self, route: str, exc: BaseException) -> Response:
        err = HTTPError.from_exception(exc)
        self.state.metrics.request(route, err.status)
        return err.response()

    async def _offloop(self, fn: Any, size: int | None) -> Any:
        """fn() in the default thread pool when `size` (characters / ids of the input) is large
        or None (always: its cost is not known from its input's size), else here."""
        if size is None or size > _OFFLOOP_CHARS:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        return fn()

    async def _start(self, prompts: list[Any], params: SamplingParams, rid: str,
                     template_kwargs: dict | None, add_special_tokens: bool = True,
                     chat_options: dict | None = None) -> list[Choice]:
        """Submit every child request and await each one's first delta (errors surface here).
        vLLM's order (its renderer, then the engine): every prompt is tokenized once (its n
        children share the ids) and checked against max_model_len before any child is
        submitted, so a batch with one prompt too long registers nothing."""
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
        # a flood past the bound: 503 before any tokenizing, the places held while this one
        # tokenizes (AsyncEngine.reserve / DPEngine.reserve)
        reserve = getattr(engine, "reserve", None)
        token_ids = []
        with reserve(total) if reserve is not None else contextlib.nullcontext():
            for prompt in prompts:  # the engine's own path: long text and chat off the loop
                ids = await engine.tokenize_prompt(prompt, template_kwargs,
                                                   add_special_tokens=add_special_tokens,
                                                   **(chat_options or {}))
                if len(ids) >= engine.max_model_len:
                    raise PromptTooLongError(len(ids), engine.max_model_len)
                token_ids.append(ids)
        gens = []
        for p_idx, ids in enumerate(token_ids):
            for i in range(n):
                child = params.child(i) if n > 1 else params
                child_id = rid if total == 1 else f"{rid}-{p_idx * n + i}"
                gens.append(engine.generate(ids, child, engine_request_id(child_id),
                                            strict_max_tokens=True))
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
                if out.engine_logprobs:
                    r.logprobs.extend(out.engine_logprobs)
                if out.prompt_token_ids is not None:
                    r.prompt_ids = out.prompt_token_ids
                if out.engine_prompt_logprobs is not None:
                    r.prompt_logprobs = out.engine_prompt_logprobs
                    r.prompt_logprob_ranks = out.prompt_logprob_ranks
                if out.finish_reason is not None:
                    if out.finish_reason == "abort":
                        raise ServerShuttingDownError()
                    r.finish_reason, r.stop_reason, r.usage = (out.finish_reason,
                                                               out.stop_reason, out.usage)
        finally:
            await close_choices(choices)
        return results

    @property
    def _details(self) -> bool:
        return bool(getattr(self.state.config, "enable_prompt_tokens_details", False))

    def _context(self, rid: str, model: str, params: SamplingParams, req: Any,
                 echo_only: bool = False) -> openai_stream.StreamContext:
        return openai_stream.StreamContext(
            rid, int(time.time()), model, self.engine.tokenizer, params.logprobs,
            bool(req.return_tokens_as_token_ids), return_token_ids=bool(req.return_token_ids),
            details=self._details, echo_only=echo_only)

    # ---------------------------------------------------------------- chat
    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[dict], dict | None, dict]:
        """A chat request's template inputs: (messages as dicts, the template kwargs or None,
        the add_generation_prompt / continue_final_message options)."""
        messages = messages_to_dicts(
            req.messages, content_format=resolve_content_format(
                self.engine.tokenizer, self.state.config.chat_template_content_format))
        tools_kwargs = {"tools": req.tools} if req.tools else {}
        # vLLM's order: the request's tools (and its template fields), then its
        # chat_template_kwargs over them
        kwargs = {**self.state.config.default_chat_template_kwargs, **tools_kwargs,
                  **template_fields(req), **(req.chat_template_kwargs or {})}
        # the options as the template gets them (chat_template_kwargs override the request's
        # fields); both true is a 400 here, before any work
        agp, cfm, kwargs = resolve_chat_options(kwargs, req.add_generation_prompt,
                                                req.continue_final_message)
        return messages, kwargs or None, {"add_generation_prompt": agp,
                                          "continue_final_message": cfm}

    async def open_chat(self, request: Request, req: ChatCompletionRequest) -> OpenChat:
        """A decoded chat request -> its started choices (every check, the template and the
        first delta of each choice done; errors raise: HTTPError and the engine's, ClientGone
        when the client leaves first). Shared by /v1/chat/completions, Anthropic's
        /v1/messages (anthropic.py) and /v1/responses (responses_api.py), which convert their
        requests into this one."""
        model = self._model(req.model)
        params = build_sampling_params(req, chat=True, defaults=self.state.default_sampling)
        messages, kwargs, opts = self.chat_prompt(req)
        # tool_choice as vLLM checks it (chat_parsing.py): "auto" needs
        # --enable-auto-tool-choice --tool-call-parser; "required" / named are forced
        parse_tools = self.parsing.tool_choice(req)
        forced = forced_tools(req)
        if forced is not None:
            params = force_tool_schema(params, forced)
        plan = self.parsing.plan(parse_tools, kwargs, self.engine.tokenizer,
                                 req.parallel_tool_calls, req.include_reasoning,
                                 continued_text(messages, opts["continue_final_message"]),
                                 forced)
        if plan is not None and plan.keep_specials:
            params.skip_special_tokens = False  # the parsers read the marker tokens
        if (params.structured_outputs is not None and plan is not None
                and plan.reasoning is not None and plan.thinking):
            # vLLM's reasoning-aware structured outputs: the grammar binds the content
            params._structured_after = plan.reasoning.end
        rid = f"chatcmpl-{base_request_id(request.headers, req.request_id)}"  # as vLLM
        # the engine renders the template off the loop (always, whatever the size); with
        # truncate_prompt_tokens it is rendered here and the ids are cut
        prompts = await truncate_prompts(self.engine, [messages], req, params.max_tokens,
                                         chat_kwargs=kwargs, chat_options=opts)
        choices = await until_disconnect(request, self._start(
            prompts, params, rid, kwargs, chat_options=opts))
        return OpenChat(model, params, plan, rid, choices, messages)

    async def chat_completions(self, request: Request) -> Response:
        route = "/v1/chat/completions"
        try:
            req = decode_request(ChatCompletionRequest, await read_body(
                request, self.state.config.max_body_bytes))
            chat = await self.open_chat(request, req)
        except ClientGone:
            return self._gone()
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return self._error(route, e)
        self.state.metrics.request(route, 200)
        model, params, plan, rid, choices, messages = (
            chat.model, chat.params, chat.plan, chat.rid, chat.choices, chat.messages)
        # vLLM's get_chat_request_role: the last message's role without a generation prompt
        role = "assistant" if req.add_generation_prompt else messages[-1]["role"]
        echo = ""
        if req.echo and messages[-1].get("role") == role:
            echo = messages[-1]["content"]
            if isinstance(echo, list):  # "openai" content format: vLLM joins the parts
                echo = "\n".join(p["text"] for p in echo)
        ctx = self._context(rid, model, params, req)
        if req.stream:
            opts = req.stream_options
            return self._sse(openai_stream.chat_stream(
                ctx, choices, echo, *stream_usage(opts), role=role,
                parser=plan.parser if plan is not None else None))
        results = await self._collect_or_error(request, route, choices)
        if isinstance(results, Response):
            return results
        out = []
        for i, r in enumerate(results):
            lp = (openai_stream.chat_logprobs(ctx, r.token_ids, r.logprobs)
                  if params.logprobs is not None else None)
            message, finish = self._message(plan, role, echo, "".join(r.text), r.finish_reason)
            out.append(ChatChoice(i, message, lp, finish, r.stop_reason))
            if ctx.return_token_ids:
                out[-1].token_ids = r.token_ids
        usage = openai_stream.final_usage(ctx, choices, [r.usage for r in results])
        resp = ChatCompletionResponse(id=rid, created=ctx.created, model=model, choices=out,
                                      usage=usage.for_body())
        openai_stream.add_prompt_extras(ctx, resp, results[0], params.prompt_logprobs)
        return json_response(resp)

    def _message(self, plan: ParsePlan | None, role: str, echo: str, text: str,
                 finish: str | None) -> tuple[ResponseMessage, str | None]:
        """A non-streamed choice's message and finish_reason (parsed when the request is).
        The message carries every field of vLLM's ChatMessage whether or not a parser ran."""
        if plan is not None:
            return plan.message(role, echo, text, finish)
        return ResponseMessage(role=role, content=echo + text), finish

    def _sse(self, frames) -> SSEResponse:
        return SSEResponse(frames, on_disconnect=self.state.metrics.http_disconnects.inc,
                           gauge=self.state.metrics.sse_streams)

    async def _collect_or_error(self, request: Request, route: str, choices):
        """Await every choice's final output; a client that left gets 499, an error its body."""
        try:
            return await until_disconnect(request, self._collect(choices))
        except ClientGone:
            return self._gone()
        except Exception as e:  # noqa: BLE001
            return self._error(route, e)

    def _gone(self) -> Response:
        """The answer to a client that left (499, which nobody reads); its requests are
        already aborted (until_disconnect cancelled the work holding their streams)."""
        self.state.metrics.http_disconnects.inc()
        return Response(status_code=499)

    # ---------------------------------------------------------------- completions
    async def completions(self, request: Request) -> Response:
        route = "/v1/completions"
        try:
            req = decode_request(CompletionRequest, await read_body(
                request, self.state.config.max_body_bytes))
            model = self._model(req.model)
            if req.suffix:
                raise HTTPError(400, "suffix is not supported", "suffix")
            params = build_sampling_params(req, chat=False,
                                           defaults=self.state.default_sampling)
            self._refuse_token_text_without_tokenizer(req, params)
            prompts = await truncate_prompts(self.engine, completion_prompts(req.prompt), req,
                                             params.max_tokens)
            rid = f"cmpl-{base_request_id(request.headers, req.request_id)}"
            choices = await until_disconnect(request, self._start(
                prompts, params, rid, None, req.add_special_tokens))
        except ClientGone:
            return self._gone()
        except Exception as e:  # noqa: BLE001
            return self._error(route, e)
        if req.echo:
            try:
                await self._echo_texts(choices, prompts, params.n)
            except Exception as e:  # noqa: BLE001 - the started choices must not stay live
                for c in choices:
                    await c.gen.aclose()
                return self._error(route, e)
        self.state.metrics.request(route, 200)
        ctx = self._context(rid, model, params, req, echo_only=echo_without_generation(req))
        if req.stream:
            opts = req.stream_options
            return self._sse(openai_stream.completion_stream(
                ctx, choices, req.echo, *stream_usage(opts)))
        results = await self._collect_or_error(request, route, choices)
        if isinstance(results, Response):
            return results
        out = [openai_stream.completion_choice(ctx, c.index, c.prompt_text, r, req.echo,
                                               params.prompt_logprobs)
               for c, r in zip(choices, results)]
        usage = openai_stream.final_usage(ctx, choices, [r.usage for r in results])
        return json_response(CompletionResponse(id=rid, created=ctx.created, model=model,
                                                choices=out, usage=usage.for_body()))

    def _refuse_token_text_without_tokenizer(self, req: CompletionRequest,
                                             params: SamplingParams) -> None:
        """A model served without a tokenizer (a checkpoint directory with no tokenizer file:
        token-id prompts only, engine/engine_setup.py): the completion fields whose answer
        needs token text are a 400 naming the field, as vLLM's ValueError ("Unable to get
        tokenizer because skip_tokenizer_init is True"). Logprobs reported as "token_id:N"
        (`return_tokens_as_token_ids`) need no text and are served."""
        if self.engine.tokenizer is not None:
            return
        if req.echo:
            field = "echo"
        elif params.prompt_logprobs is not None:
            field = "prompt_logprobs"
        elif params.logprobs is not None and not req.return_tokens_as_token_ids:
            field = "logprobs"
        else:
            return
        need_tokenizer(self.engine.tokenizer, field)

    async def _echo_texts(self, choices: list[Choice], prompts: list, n: int) -> None:
        """Each choice's echoed prompt text: a token-id prompt decoded once (n choices share
        it), long ones off the loop. Ids past the tokenizer's vocabulary (a padded model vocab,
        DeepSeek-V3) decode to "", as a Hugging Face fast tokenizer does."""
        tok = self.engine.tokenizer
        texts: dict[int, str] = {}
        for c in choices:
            k = c.index // n
            if k not in texts:
                p = prompts[k]
                texts[k] = p if isinstance(p, str) else await self._offloop(
                    lambda p=p: tok.decode([t for t in p if 0 <= t < tok.vocab_size],
                                           skip_special_tokens=False), 4 * len(p))
            c.prompt_text = texts[k]

    # ---------------------------------------------------------------- small routes
    def _card(self, name: str) -> ModelCard:
        root = self.state.engine_config.model or "demo"
        return ModelCard(id=name, created=self.state.started, root=root,
                         max_model_len=self.engine.max_model_len, permission=[ModelPermission(
                             f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}",
                             self.state.started)])

    async def models(self, request: Request) -> Response:
        """GET /v1/models: a card per served model name."""
        return json_response(ModelList(data=[self._card(n) for n in self.state.model_names]))

    async def retrieve_model(self, request: Request) -> Response:
        """GET /v1/models/{model:path} (the OpenAI SDK's models.retrieve; SGLang serves it): the
        served name's card, as /v1/models lists it; another name is vLLM's 404 (param "model").
        The route: Route("/v1/models/{model:path}", serving.retrieve_model, methods=["GET"])."""
        name = request.path_params["model"]
        if name not in self.state.model_names:
            return HTTPError(404, f"The model `{name}` does not exist.", "model").response()
        return json_response(self._card(name))


async def _first(gen: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        raise GenerationError("the engine ended the request without output") from None
