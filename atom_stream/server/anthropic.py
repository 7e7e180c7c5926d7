"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens (ATOM's and vLLM's
`/v1/messages`; Claude Code and the `anthropic` SDK talk to it).

A request is converted into a chat completion request (anthropic_protocol.to_chat_request) and
started by the chat route's own code (OpenAIServing.open_chat): the same template, checks,
tool-call and reasoning parsers (--enable-auto-tool-choice --tool-call-parser,
--reasoning-parser), structured outputs and engine. The answer is Anthropic's:

- Non-streamed: `{"id": "msg_...", "type": "message", "role": "assistant", "model",
  "content": [thinking?, text?, tool_use...], "stop_reason", "stop_sequence", "usage":
  {"input_tokens", "output_tokens"}}`. A thinking block carries a random `signature` (vLLM's:
  nothing here verifies one). A tool call's `input` is its arguments parsed as a JSON object
  ({} when the model wrote something else).
- Streamed (`text/event-stream`, each event `event: <type>\ndata: <json>\n\n`):
  message_start (input_tokens, output_tokens 0), ping, then per content block
  content_block_start / content_block_delta (text_delta, thinking_delta, input_json_delta) /
  content_block_stop (a thinking block's signature_delta before its stop), then message_delta
  (stop_reason, stop_sequence, usage) and message_stop. Blocks are opened in the order the
  parsers emit reasoning, text and tool calls; a switch of kind closes the open block.
- stop_reason: "end_turn" (end of turn), "stop_sequence" with `stop_sequence` set to the
  string that matched (vLLM reports end_turn there), "max_tokens" (cut by max_tokens), "tool_use"
  (the answer made tool calls).
- Errors: `{"type": "error", "error": {"type", "message"}}` with Anthropic's type for the HTTP
  status (invalid_request_error 400, authentication_error 401, not_found_error 404,
  request_too_large 413, rate_limit_error 429, api_error 500, overloaded_error 503; the status
  codes are the chat route's). An error after the 200 is an `event: error` with that body.
- count_tokens: `{"input_tokens": N}`, the prompt the same request would run (tools and system
  included), rendered and tokenized off the event loop.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from atom_stream.protocol import DeltaMessage, ResponseMessage
from atom_stream.server.anthropic_protocol import (
    CountTokensRequest,
    MessagesRequest,
    to_chat_request,
)
from atom_stream.server.chat_parsing import ParsePlan, delta_pieces, parsed_stream
from atom_stream.server.choices import Choice
from atom_stream.server.openai import OpenAIServing, decode_request
from atom_stream.server.openai_params import refuse_template_kwargs
from atom_stream.server.responses import (
    ClientGone,
    FinalChunk,
    HTTPError,
    read_body,
    until_disconnect,
)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}
_ENC = msgspec.json.Encoder()
PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def error_body(exc: BaseException) -> tuple[HTTPError, bytes]:
    """An exception -> (its HTTPError, Anthropic's error body for it)."""
    err = HTTPError.from_exception(exc)
    kind = ERROR_TYPES.get(err.status, "api_error")
    return err, _ENC.encode({"type": "error", "error": {"type": kind, "message": err.message}})


def error_response(exc: BaseException) -> Response:
    err, body = error_body(exc)
    return Response(body, err.status, headers=err.headers, media_type="application/json")


def event(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _ENC.encode(data) + b"\n\n"


def stop_reason(finish: str | None, stop: int | str | None, called_tools: bool
                ) -> tuple[str, str | None]:
    """The engine's finish (after the parsers: "tool_calls" when they found calls) and stop
    reason -> Anthropic's (stop_reason, stop_sequence)."""
    if called_tools and finish in ("stop", "tool_calls"):
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if finish == "stop" and isinstance(stop, str):
        return "stop_sequence", stop
    return "end_turn", None


def tool_input(arguments: str) -> dict:
    """A tool call's JSON arguments as Anthropic's `input` object ({} when not an object)."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(message: ResponseMessage) -> list[dict[str, Any]]:
    """A parsed chat answer -> Anthropic content blocks: thinking, text, then tool_use."""
    blocks: list[dict[str, Any]] = []
    if message.reasoning_content:
        blocks.append({"type": "thinking", "thinking": message.reasoning_content,
                       "signature": uuid.uuid4().hex})
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    for call in message.tool_calls:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.function.name,
                       "input": tool_input(call.function.arguments)})
    return blocks


class BlockStream:
    """The content-block events of one streamed answer, from the chat parsers' deltas."""

    __slots__ = ("_text", "called", "index", "kind")

    def __init__(self) -> None:
        self.index = -1  # the open block's index (the count of blocks opened, minus one)
        self.kind: str | None = None  # the open block's type; None: none open
        self.called = False
        self._text = b""  # an open text block's text_delta event up to the text (hot path)

    def _open(self, block: dict[str, Any]) -> bytes:
        out = self.close()
        self.index += 1
        self.kind = block["type"]
        if self.kind == "text":  # the bytes _delta writes, up to the text's JSON string
            self._text = (b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                          b'"index":%d,"delta":{"type":"text_delta","text":' % self.index)
        return out + event("content_block_start", {"type": "content_block_start",
                                                   "index": self.index, "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta",
                                             "index": self.index, "delta": delta})

    def close(self) -> bytes:
        if self.kind is None:
            return b""
        out = b""
        if self.kind == "thinking":
            out = self._delta({"type": "signature_delta", "signature": uuid.uuid4().hex})
        self.kind = None
        return out + event("content_block_stop", {"type": "content_block_stop",
                                                  "index": self.index})

    def feed(self, delta: DeltaMessage | None) -> bytes:
        if (self.kind == "text" and delta is not None and isinstance(delta.content, str)
                and delta.reasoning_content is UNSET and delta.tool_calls is UNSET):
            # hot path, more text for the open text block: _delta's bytes, one string encode
            return self._text + _ENC.encode(delta.content) + b"}}\n\n" if delta.content else b""
        out = b""
        for kind, text, name in delta_pieces(delta):
            if kind == "reasoning":
                if self.kind != "thinking":
                    out += self._open({"type": "thinking", "thinking": ""})
                out += self._delta({"type": "thinking_delta", "thinking": text})
            elif kind == "content":
                if self.kind != "text":
                    out += self._open({"type": "text", "text": ""})
                out += self._delta({"type": "text_delta", "text": text})
            elif kind == "call":
                self.called = True
                out += self._open({"type": "tool_use", "id": text, "name": name, "input": {}})
            elif self.kind == "tool_use":  # arguments of the open call
                out += self._delta({"type": "input_json_delta", "partial_json": text})
        return out


async def message_stream(msg_id: str, model: str, choice: Choice, plan: ParsePlan | None
                         ) -> AsyncIterator[bytes]:
    """The SSE body of a streamed /v1/messages answer (module docstring)."""
    prompt = len(choice.first.prompt_token_ids or ())
    yield event("message_start", {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": 0}}}) + PING
    blocks = BlockStream()
    try:
        async with contextlib.aclosing(parsed_stream(choice, plan)) as stream:
            async for delta, out, finish in stream:
                chunk = blocks.feed(delta)
                if finish is None:
                    if chunk:
                        yield chunk
                    continue
                reason, sequence = stop_reason(finish, out.stop_reason, blocks.called)
                usage = out.usage
                completion = usage.completion_tokens if usage is not None else 0
                yield FinalChunk(chunk + blocks.close() + event("message_delta", {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": {"input_tokens": prompt, "output_tokens": completion}})
                    + event("message_stop", {"type": "message_stop"}))
                return
    except Exception as e:  # noqa: BLE001 - after the 200: an error event ends the stream
        yield FinalChunk(b"event: error\ndata: " + error_body(e)[1] + b"\n\n")


class AnthropicServing:
    """The /v1/messages routes over the chat route's OpenAIServing (the same state)."""

    def __init__(self, chat: OpenAIServing):
        self.chat = chat
        self.state = chat.state

    def _error(self, route: str, exc: BaseException) -> Response:
        response = error_response(exc)
        self.state.metrics.request(route, response.status_code)
        return response

    async def messages(self, request: Request) -> Response:
        route = "/v1/messages"
        try:
            req = decode_request(MessagesRequest, await read_body(
                request, self.state.config.max_body_bytes))
            started = await self.chat.open_chat(request, to_chat_request(req))
        except ClientGone:
            return self.chat._gone()
        except Exception as e:  # noqa: BLE001 - every failure becomes an Anthropic error body
            return self._error(route, e)
        self.state.metrics.request(route, 200)
        msg_id = "msg_" + started.rid.removeprefix("chatcmpl-")
        choice = started.choices[0]
        if req.stream:
            return self.chat._sse(message_stream(msg_id, started.model, choice, started.plan))
        try:
            result = (await until_disconnect(request, self.chat._collect([choice])))[0]
        except ClientGone:
            return self.chat._gone()
        except Exception as e:  # noqa: BLE001
            return self._error(route, e)
        message, finish = self.chat._message(started.plan, "assistant", "",
                                             "".join(result.text), result.finish_reason)
        reason, sequence = stop_reason(finish, result.stop_reason, bool(message.tool_calls))
        usage = result.usage
        body = {"id": msg_id, "type": "message", "role": "assistant", "model": started.model,
                "content": content_blocks(message), "stop_reason": reason,
                "stop_sequence": sequence,
                "usage": {"input_tokens": usage.prompt_tokens if usage else 0,
                          "output_tokens": usage.completion_tokens if usage else 0}}
        return Response(_ENC.encode(body), media_type="application/json")

    async def count_tokens(self, request: Request) -> Response:
        route = "/v1/messages/count_tokens"
        try:
            req = decode_request(CountTokensRequest, await read_body(
                request, self.state.config.max_body_bytes))
            chat = to_chat_request(req)
            self.chat._model(chat.model)
            # as /v1/messages: a request template (or `tokenize`) in the kwargs is a 400
            refuse_template_kwargs(chat.chat_template, chat.chat_template_kwargs)
            messages, kwargs, opts = self.chat.chat_prompt(chat)
            ids = await self.chat.engine.tokenize_prompt(messages, kwargs, **opts)
        except Exception as e:  # noqa: BLE001
            return self._error(route, e)
        self.state.metrics.request(route, 200)
        return Response(_ENC.encode({"input_tokens": len(ids)}),
                        media_type="application/json")
