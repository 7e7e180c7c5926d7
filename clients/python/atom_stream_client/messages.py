"""Typed frames of the atom-stream WebSocket protocol (`/v1/ws`, DESIGN.md), as msgspec Structs.

Client -> server: `Generate`, `Cancel`, `Auth`. Server -> client: `Delta` (new text and token ids
of one request; several tokens when the client reads slowly), `Done` (finish_reason, usage),
`Error` (id or None, code = the HTTP status the same problem gets over HTTP, message).
The same Structs encode to JSON (`atom-stream.v1.json`) and MessagePack (`atom-stream.v1.msgpack`).
"""

from __future__ import annotations

from typing import Any

import msgspec

JSON = "atom-stream.v1.json"
MSGPACK = "atom-stream.v1.msgpack"


class Generate(msgspec.Struct, tag_field="type", tag="generate", omit_defaults=True,
               kw_only=True):
    id: str  # first after the tag, so a server can find it even in an oversized frame
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    params: dict[str, Any] = {}
    chat_template_kwargs: dict[str, Any] | None = None
    # messages only, as the chat route's fields (sent only when not the default)
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class Cancel(msgspec.Struct, tag_field="type", tag="cancel"):
    id: str


class Auth(msgspec.Struct, tag_field="type", tag="auth"):
    api_key: str


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Delta(msgspec.Struct, tag_field="type", tag="delta"):
    id: str
    text: str
    token_ids: list[int]
    # one [logprob, [[token_id, logprob], ...]] per token, when params.logprobs was set
    logprobs: list[Any] | None = None


class Done(msgspec.Struct, tag_field="type", tag="done"):
    id: str
    finish_reason: str
    usage: Usage
    stop_reason: int | str | None = None


class Error(msgspec.Struct, tag_field="type", tag="error"):
    id: str | None
    code: int
    message: str
    param: str | None = None


ServerFrame = Delta | Done | Error


class Completion(msgspec.Struct):
    """A whole result (`AsyncClient.complete`); `logprobs` as in `Delta`, all tokens'."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    stop_reason: int | str | None = None
    logprobs: list[Any] | None = None
