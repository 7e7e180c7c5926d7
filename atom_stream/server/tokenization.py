"""POST /tokenize and /detokenize, as vLLM's OpenAIServingTokenization (v0.10 protocol.py
bodies): `prompt` or chat `messages` (rendered as the chat route renders them) -> token ids
(and token strings when asked); token ids -> text. Errors are OpenAI error bodies (400); the
work runs off the event loop."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from atom_stream.engine.prompts import (
    need_tokenizer,
    resolve_chat_options,
    resolve_content_format,
)
from atom_stream.errors import InvalidRequestError
from atom_stream.protocol import ChatMessage
from atom_stream.server.openai import OpenAIServing, decode_request, messages_to_dicts
from atom_stream.server.openai_params import refuse_template_kwargs
from atom_stream.server.responses import json_response, read_body


class TokenizeBody(msgspec.Struct, kw_only=True):
    """vLLM's TokenizeCompletionRequest | TokenizeChatRequest in one Struct (v0.10
    protocol.py): `prompt` (add_special_tokens default true) or `messages` (add_special_tokens
    default false: the template holds the specials; add_generation_prompt default true,
    continue_final_message, chat_template_kwargs, tools for the template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template: str | None = None  # refused, as on the chat route (untrusted template)


class DetokenizeBody(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


class TokenizeResult(msgspec.Struct):
    """vLLM's TokenizeResponse.model_dump(): token_strs is null unless asked for."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResult(msgspec.Struct):
    prompt: str


class Tokenization(OpenAIServing):
    """POST /tokenize and /detokenize as vLLM's OpenAIServingTokenization: errors are 400s;
    rendering, tokenizing, token strings and decoding run in the default thread pool (chat
    always, text when long), never on the event loop. OpenAIServing's helpers (body decoding,
    model check, error bodies, off-loop work)."""

    async def _body(self, request: Request, cls: type) -> Any:
        req = decode_request(cls, await read_body(request, self.state.config.max_body_bytes))
        self._model(req.model)
        return req

    async def tokenize(self, request: Request) -> Response:
        try:
            req = await self._body(request, TokenizeBody)
            engine = self.state.engine
            tok = need_tokenizer(engine.tokenizer,
                                 "messages" if req.messages is not None else "prompt")
            if req.messages is not None:
                refuse_template_kwargs(req.chat_template, req.chat_template_kwargs)
                # the chat route's options and error (chat_template_kwargs override the fields)
                # (a template's own error keeps param null here, as vLLM's /tokenize)
                agp, cfm, kwargs = resolve_chat_options(
                    {**self.state.config.default_chat_template_kwargs,
                     **({"tools": req.tools} if req.tools else {}),
                     **(req.chat_template_kwargs or {})},
                    req.add_generation_prompt, req.continue_final_message)
                # a template kwarg of that name sets the flag, as on the chat route (the
                # engine's encode_chat_prompt), instead of a duplicate-keyword TypeError
                kwargs["add_special_tokens"] = bool(kwargs.get("add_special_tokens",
                                                               req.add_special_tokens))
                fn = functools.partial(tok.encode_chat, messages_to_dicts(
                    req.messages, content_format=resolve_content_format(
                        tok, self.state.config.chat_template_content_format)),
                                       add_generation_prompt=agp, continue_final_message=cfm,
                                       **kwargs)
                size = None  # rendering reads tools and kwargs too: always off the loop
            elif req.prompt is not None:
                add = True if req.add_special_tokens is None else req.add_special_tokens
                fn = functools.partial(tok.encode, req.prompt, add_special_tokens=add)
                size = len(req.prompt)
            else:
                raise InvalidRequestError("either `prompt` or `messages` is required", "prompt")
            strs = bool(req.return_token_strs)

            def work() -> tuple[list[int], list[str] | None]:
                ids = list(fn())
                return ids, ([tok.id_to_str(t) for t in ids] if strs else None)

            ids, token_strs = await self._offloop(work, size)
            result = TokenizeResult(len(ids), engine.max_model_len, ids, token_strs)
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return self._error("/tokenize", e)
        return json_response(result)

    async def detokenize(self, request: Request) -> Response:
        try:
            req = await self._body(request, DetokenizeBody)
            engine = self.state.engine
            vocab = engine.model_config.vocab_size
            bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"token id {bad} is not in [0, {vocab})", "tokens")
            # vLLM: tokenizer.decode(ids), HF's default keeps special tokens; ids the model has
            # past the tokenizer's vocabulary (a padded vocab) decode to "", as HF's fast does
            tok = need_tokenizer(engine.tokenizer, "tokens")
            fn = functools.partial(tok.decode, [t for t in req.tokens if t < tok.vocab_size],
                                   skip_special_tokens=False)
            result = DetokenizeResult(await self._offloop(fn, len(req.tokens)))
        except Exception as e:  # noqa: BLE001
            return self._error("/detokenize", e)
        return json_response(result)
