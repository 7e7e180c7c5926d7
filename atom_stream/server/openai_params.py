"""Request -> engine inputs for the OpenAI routes: SamplingParams, prompts, messages, and the
vLLM request fields that change what is sent to the engine.

- `build_sampling_params(req, chat)`: request fields -> SamplingParams; a 400 names the request's
  field (`max_completion_tokens`, `top_logprobs`), not ours. `/v1/completions` with `echo: true`
  and `max_tokens: 0` runs with max_tokens 1 (vLLM's echo_without_generation); the handlers show
  only the prompt.
- `structured_outputs(req)`: response_format / guided_* / structured_outputs -> the
  SamplingParams' structured_outputs fields (atom_stream.structured compiles them).
- `refuse_unsupported(req, chat)`: fields vLLM acts on that this server does not serve are a 400
  naming them (never silently ignored): `use_beam_search: true`, `best_of` > n
  (`check_best_of`), a non-zero `priority` (`check_priority`; FCFS only); a request
  `chat_template`
  (top-level or in `chat_template_kwargs`) gets vLLM's refusal, as vLLM without
  `--trust-request-chat-template` (its default); so does a `tokenize` template kwarg
  (`refuse_template_kwargs`).
- `truncation_size(value, max_model_len, max_tokens)`: vLLM's `truncate_prompt_tokens` checks
  and size (keep the LAST n prompt tokens, sampling_params.keep_last; -1 = as many as fit).
- `completion_prompts(prompt)`: str | [int] | [str] | [[int]] -> a list of engine prompts.
- `messages_to_dicts(messages)`: ChatMessage Structs -> the dicts chat templates take.
"""

from __future__ import annotations

from typing import Any

import msgspec

from atom_stream.engine.prompts import TEXT_PART_FIELD, refuse_request_template
from atom_stream.errors import priority_error
from atom_stream.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from atom_stream.sampling_params import (
    SamplingParams,
    SamplingParamsError,
    keep_last,
    truncation_length,
)
from atom_stream.server.responses import VALIDATION_TYPE, HTTPError

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "prompt_logprobs")
# the constraints of vLLM's StructuredOutputsParams (its other keys are options)
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _invalid(message: str, param: str | None = None) -> HTTPError:
    """A request-schema error (vLLM's RequestValidationError: 400, type "Bad Request")."""
    return HTTPError(400, message, param, type=VALIDATION_TYPE)


def echo_without_generation(req: Any) -> bool:
    """vLLM's `echo_without_generation = self.echo and self.max_tokens == 0` (completions)."""
    return bool(getattr(req, "echo", False)) and req.max_tokens == 0


def structured_outputs(req: Any) -> dict | None:
    """The request's structured-output constraint as StructuredOutputsParams fields (None:
    unconstrained), from vLLM's three spellings: `structured_outputs` ({"json" | "regex" |
    "choice" | "json_object" | ...: value, options}), the older `guided_json` /
    `guided_regex` / `guided_choice` / `guided_grammar` (+ `guided_whitespace_pattern`), and
    OpenAI's `response_format` (`json_object`; `json_schema` with its `schema`; `text`: none).
    More than one constraint is a 400 (SamplingParams names it); so is a `response_format` of
    another type."""
    so = dict(req.structured_outputs or {})
    guided = {k: getattr(req, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")}
    given = [k for k, v in guided.items() if v is not None]
    if len(given) > 1:
        raise _invalid("You can only use one kind of guided decoding ('guided_json', "
                       "'guided_regex', 'guided_choice' or 'guided_grammar').",
                       f"guided_{given[1]}")
    so.update({k: guided[k] for k in given})
    if req.guided_whitespace_pattern is not None:
        so.setdefault("whitespace_pattern", req.guided_whitespace_pattern)
    rf = req.response_format
    kind = rf.get("type", "text") if rf is not None else "text"
    if kind == "json_object":
        so["json_object"] = True
    elif kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise _invalid("response_format json_schema needs a 'json_schema' object with "
                           "its 'schema'", "response_format")
        so["json"] = js.get("schema", {})
    elif kind != "text":
        raise _invalid(f"response_format type {kind!r} is not supported; use 'text', "
                       "'json_object' or 'json_schema'", "response_format")
    if not any(so.get(k) not in (None, False) for k in _STRUCTURED_KEYS):
        if req.structured_outputs:  # vLLM's StructuredOutputsParams refuses options alone
            raise _invalid("You must use one kind of structured outputs constraint but none "
                           f"are specified: {req.structured_outputs!r}", "structured_outputs")
        return None
    return so


def messages_to_dicts(messages: list[ChatMessage], param: str = "messages",
                      content_format: str = "string") -> list[dict]:
    """ChatMessage Structs -> the plain dicts chat templates take, content as `content_format`
    reads it (engine/prompts.resolve_content_format picks it from the chat template): "string"
    joins a list's text parts with "\n" (vLLM's string format), "openai" gives every content as
    text parts. A part that is not text-like is a 400 naming its message's content."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        texts: list[str] | None = None
        if isinstance(content, list):
            texts = []
            for part in content:
                field = TEXT_PART_FIELD.get(part.type)
                if field is None:
                    raise HTTPError(400, f"content part type {part.type!r} is not supported; "
                                    "this server serves text only", f"{param}[{i}].content")
                text = getattr(part, field)
                if text is None and part.type == "text":
                    raise HTTPError(400, "a content part of type 'text' needs a 'text' string",
                                    f"{param}[{i}].content")
                if text is not None:
                    texts.append(text)
        elif content_format == "openai":
            texts = [] if content is None else [content]
        d = msgspec.to_builtins(m)
        if texts is None:
            d["content"] = content if content is not None else ""
        elif content_format == "openai":
            d["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            d["content"] = "\n".join(texts)
        out.append(d)
    if not out:
        raise HTTPError(400, "messages must not be empty", param)
    return out


def cap_max_tokens(max_tokens: Any, defaults: dict) -> Any:
    """vLLM's get_max_tokens: the checkpoint's max_new_tokens (`defaults["max_tokens"]`, see
    build_sampling_params) caps a request's max_tokens, and is it where the request gives none
    (None). A value that is not an integer is returned as given (SamplingParams refuses it)."""
    cap = defaults.get("max_tokens")
    if cap is None or max_tokens is None:
        return cap if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        return max_tokens
    return min(max_tokens, cap)


def build_sampling_params(req: ChatCompletionRequest | CompletionRequest, chat: bool,
                          defaults: dict | None = None) -> SamplingParams:
    """Request fields -> SamplingParams; errors name the request's field, not ours. `defaults`:
    the model's generation_config sampling defaults (sampling_params.model_sampling_defaults),
    taken where the request leaves a field out, `max_tokens` as a cap (vLLM's
    get_diff_sampling_param / get_max_tokens)."""
    defaults = defaults or {}
    kw: dict[str, Any] = {"n": 1 if req.n is None else req.n, "ignore_eos": req.ignore_eos,
                          "min_tokens": req.min_tokens,
                          "skip_special_tokens": req.skip_special_tokens,
                          "include_stop_str_in_output": req.include_stop_str_in_output}
    renames: dict[str, str] = {}
    for name in _SAMPLING_FIELDS:
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
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
    so = structured_outputs(req)
    if so is not None:
        kw["structured_outputs"] = so
    refuse_unsupported(req, chat)
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
        # vLLM (completion/protocol.py, to_sampling_params): echo_without_generation = echo and
        # max_tokens == 0 -> runs with max_tokens 1; the response shows the prompt only
        kw["max_tokens"] = 1 if echo_without_generation(req) else req.max_tokens
        if req.logprobs is not None:
            kw["logprobs"] = req.logprobs
            if req.echo and req.prompt_logprobs is None:
                kw["prompt_logprobs"] = req.logprobs
    kw["max_tokens"] = cap_max_tokens(kw.get("max_tokens"), defaults)
    # vLLM's validators: only a non-empty stream_options object needs stream
    # (`if data.get("stream_options") and not data.get("stream")`), and only prompt_logprobs
    # > 0 (or -1) is refused with stream (check_logprobs); 0 is computed and not streamed
    if req.stream_options is not None and not req.stream and not req.stream_options.empty:
        raise _invalid("stream_options can only be set when stream is true", "stream_options")
    if req.stream and req.prompt_logprobs is not None and req.prompt_logprobs != 0:
        raise _invalid("prompt_logprobs is not supported when stream is true",
                       "prompt_logprobs")
    try:
        return SamplingParams(**kw)
    except SamplingParamsError as e:
        param = renames.get(e.param, e.param)
        text = str(e).replace(f"{e.param}:", f"{param}:", 1)
        if "max_tokens" in renames:  # a message quoting max_tokens names the client's field
            text = text.replace("max_tokens=", f"{renames['max_tokens']}=")
        raise HTTPError(400, text, param) from None


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


def refuse_unsupported(req: Any, chat: bool) -> None:
    """vLLM fields this server cannot honour: a 400 naming them instead of a silent 200."""
    check_best_of(req.best_of, 1 if req.n is None else req.n)
    check_priority(req.priority)
    if req.use_beam_search:
        # vLLM runs beam search (completion/protocol.py to_beam_search_params); not built here
        raise HTTPError(400, "use_beam_search is not supported: this server has no beam "
                        "search; use n sampled choices instead", "use_beam_search")
    if chat:  # vLLM: create_error_response(...) -> 400 BadRequestError, param None
        refuse_template_kwargs(req.chat_template, req.chat_template_kwargs)


def refuse_template_kwargs(chat_template: str | None, chat_template_kwargs: Any) -> None:
    """A request's own chat template is refused (refuse_request_template), and so is a
    `tokenize` key in its chat_template_kwargs: an argument of apply_chat_template, not a
    template variable, that would turn the rendered prompt into ids. vLLM's
    resolve_chat_template_kwargs raises "Found unexpected chat template kwargs from request:
    {'tokenize'}" (a ValueError: 400, param null)."""
    refuse_request_template(chat_template, chat_template_kwargs)
    if isinstance(chat_template_kwargs, dict) and "tokenize" in chat_template_kwargs:
        raise HTTPError(400, "Found unexpected chat template kwargs from request: "
                        "{'tokenize'}")


def check_priority(priority: int | None) -> None:
    """vLLM's `priority` under its default --scheduling-policy fcfs: 0 (null: the default) is
    served, anything else is refused with vLLM's message (a 400 naming priority)."""
    if priority:
        raise HTTPError(400, priority_error(priority), "priority")


def check_best_of(best_of: Any, n: Any) -> None:
    """best_of (OpenAI's completions field; vLLM V0's sampling option): None or 1 <= best_of
    <= n is served as n samples (LangChain and ATOM's benchmark send best_of 1, with any n);
    best_of > n asks for ranking candidates server-side, which is not built (vLLM V1 refuses it
    too): a 400 naming best_of, never fewer-than-asked candidates under a 200."""
    if best_of is None or not isinstance(n, int):
        return  # a bad n is SamplingParams' 400
    if best_of < 1:
        raise HTTPError(400, f"best_of must be at least 1, got {best_of}", "best_of")
    if best_of > max(n, 1):
        raise HTTPError(400, f"best_of > n is not supported (best_of={best_of}, n={n}): this "
                        "server does not rank candidates; ask for n choices instead", "best_of")


def truncation_size(value: int | None, max_model_len: int, max_tokens: int | None
                    ) -> int | None:
    """vLLM's truncate_prompt_tokens checks: None = no truncation; -1 = the most prompt tokens
    that leave room for max_tokens (vLLM's renderer: max_model_len - max_tokens); a value
    above max_model_len is refused with `_validate_truncation_size`'s message; 0 and values
    below -1 are refused (SamplingParams: ">= 1 or -1")."""
    if value is None:
        return None
    if value == 0 or value < -1:
        raise _invalid(f"truncate_prompt_tokens must be an integer >= 1 or -1, got {value}",
                       "truncate_prompt_tokens")
    if value == -1:
        return truncation_length(value, max_model_len, max_tokens)
    if value > max_model_len:
        raise HTTPError(400, f"truncate_prompt_tokens value ({value}) is greater than "
                        f"max_model_len ({max_model_len}). Please, select a smaller "
                        "truncation size.", "truncate_prompt_tokens")
    return value


async def truncate_prompts(engine: Any, prompts: list[Any], req: Any, max_tokens: int | None,
                           chat_kwargs: dict | None = None, chat_options: dict | None = None
                           ) -> list[Any]:
    """Apply `truncate_prompt_tokens` (None: the prompts unchanged). Each prompt is tokenized
    as the engine would (`engine.tokenize_prompt`, the engine's own path: text with the request's
    add_special_tokens, chat messages rendered off the loop with `chat_options` and
    `chat_kwargs`, token ids as given), then cut to its last N ids (vLLM's renderer truncates
    after tokenizing: `tokens[-max_length:]`)."""
    size = truncation_size(req.truncate_prompt_tokens, engine.max_model_len, max_tokens)
    if size is None:
        return prompts
    out = []
    for p in prompts:
        # the engine's own method (AsyncEngine or DPEngine); chat requests have no
        # add_special_tokens (unused for messages)
        ids = await engine.tokenize_prompt(
            p, chat_kwargs, add_special_tokens=getattr(req, "add_special_tokens", True),
            **(chat_options or {}))
        out.append(keep_last(list(ids), size))
    return out
