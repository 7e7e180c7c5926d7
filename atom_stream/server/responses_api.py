"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id} (vLLM and
SGLang serve it; the `openai` SDK's `client.responses`).

A request converts into a chat completion request (responses_protocol.py) started by the chat
route's own code (OpenAIServing.open_chat), so templates, parsers and structured outputs are the
chat route's. The answer is a Response object:

- `output` items in order: `reasoning` (its `reasoning_text` content; with --reasoning-parser),
  `message` (one `output_text` part), `function_call` items (`call_id`, `name`, `arguments`;
  with --enable-auto-tool-choice --tool-call-parser, or tool_choice "required" / named).
- `status` "completed", or "incomplete" with `incomplete_details: {"reason":
  "max_output_tokens"}` when cut by max_output_tokens.
- `usage`: input_tokens (+ `input_tokens_details.cached_tokens`, the prefix-cache hits, and
  `cache_write_tokens`, 0: a field the SDK's ResponseUsage requires), output_tokens
  (+ `output_tokens_details.reasoning_tokens`, 0 as vLLM reports it outside
  harmony models), total_tokens.
- Streamed (`text/event-stream`, `event: <type>\ndata: <json>`, every event with its
  `sequence_number` from 0): response.created, response.in_progress, then per item
  response.output_item.added, response.content_part.added, the deltas
  (response.reasoning_text.delta / response.output_text.delta /
  response.function_call_arguments.delta), their done events and response.output_item.done;
  last response.completed (or response.incomplete). An error after the 200 is an `error`
  event `{code, message, param}` that ends the stream.
- The store: with `store` true (the default) a finished response is kept in memory (at most
  STORE_SIZE responses and STORE_BYTES of their JSON, least recently used out first) for GET
  /v1/responses/{id} and for a later request's `previous_response_id`, which continues its
  conversation (input + output).
  An unknown id is a 404; DELETE answers `{"id", "object": "response", "deleted": true}`.
- Errors before the 200 are the chat route's OpenAI error bodies.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from atom_stream.protocol import ChatMessage, DeltaMessage, ResponseMessage
from atom_stream.server.chat_parsing import delta_pieces, parsed_stream
from atom_stream.server.choices import Choice
from atom_stream.server.openai import OpenAIServing, decode_request
from atom_stream.server.responses import (
    ClientGone,
    FinalChunk,
    HTTPError,
    json_response,
    read_body,
    until_disconnect,
)
from atom_stream.server.responses_protocol import (
    ResponsesRequest,
    input_messages,
    to_chat_request,
)

STORE_SIZE = 512  # responses kept for GET and previous_response_id (least recently used out)
STORE_BYTES = 64 << 20  # ... and the most bytes of JSON (bodies and conversations) they hold
_ENC = msgspec.json.Encoder()


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseStore:
    """response id -> (its Response body as JSON bytes, its conversation as chat messages,
    output included); bounded to `size` entries and `max_bytes` (the body's JSON plus the
    conversation's), least recently used evicted first (an entry larger than `max_bytes` is
    not kept, and evicts nothing). The body is kept encoded: nothing stored shares a mutable
    object with a request. Loop thread only."""

    def __init__(self, size: int = STORE_SIZE, max_bytes: int = STORE_BYTES):
        self.size = size
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, tuple[bytes, list[ChatMessage], int]] = OrderedDict()

    def put(self, rid: str, body: dict, convo: list[ChatMessage]) -> bytes:
        """Store (evicting as needed); returns the body's JSON (the non-streamed answer)."""
        encoded = _ENC.encode(body)
        cost = len(encoded) + len(_ENC.encode(convo))
        self.pop(rid)
        if cost > self.max_bytes:
            return encoded  # it would push every other entry out and still not fit
        self._items[rid] = (encoded, convo, cost)
        self.nbytes += cost
        while self._items and (len(self._items) > self.size or self.nbytes > self.max_bytes):
            self.nbytes -= self._items.popitem(last=False)[1][2]
        return encoded

    def get(self, rid: str) -> tuple[bytes, list[ChatMessage]] | None:
        """(the stored body's JSON, its conversation), or None; a hit is now the most recent."""
        hit = self._items.get(rid)
        if hit is None:
            return None
        self._items.move_to_end(rid)
        return hit[0], hit[1]

    def pop(self, rid: str) -> bool:
        hit = self._items.pop(rid, None)
        if hit is None:
            return False
        self.nbytes -= hit[2]
        return True


def output_items(message: ResponseMessage) -> list[dict[str, Any]]:
    """A parsed chat answer -> Responses output items: reasoning, message, function calls."""
    items: list[dict[str, Any]] = []
    if message.reasoning_content:
        items.append(_reasoning_item(_id("rs"), message.reasoning_content, "completed"))
    if message.content:
        items.append(_message_item(_id("msg"), message.content, "completed"))
    for call in message.tool_calls:
        items.append(_call_item(_id("fc"), call.id, call.function.name,
                                call.function.arguments, "completed"))
    return items


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    item: dict[str, Any] = {"id": item_id, "type": "reasoning", "summary": []}
    if text is not None:
        item["content"] = [{"type": "reasoning_text", "text": text}]
    item["status"] = status
    return item


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status,
            "content": [] if text is None else [_text_part(text)], "role": "assistant"}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str
               ) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "arguments": arguments,
            "call_id": call_id, "name": name}


def output_messages(items: list[dict[str, Any]]) -> list[ChatMessage]:
    """Output items -> the assistant chat message a later previous_response_id continues: the
    texts of every reasoning item and of every message item joined (a streamed answer whose
    text goes on after its tool calls has two message items), then its function calls."""
    msg = ChatMessage(role="assistant", content="")
    for item in items:
        if item["type"] == "reasoning":
            msg.reasoning_content = (msg.reasoning_content or "") + "".join(
                c["text"] for c in item.get("content", ()))
        elif item["type"] == "message":
            msg.content += "".join(p["text"] for p in item["content"])
        else:
            msg.tool_calls = (msg.tool_calls or []) + [{
                "id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}]
    return [msg]


class ItemStream:
    """The events of one streamed answer's output items, numbered from `seq`; `items` holds
    each finished item as the final Response lists it."""

    __slots__ = ("_buf", "_item", "_kind", "_text", "items", "seq")

    def __init__(self, seq: int = 0):
        self.seq = seq
        self.items: list[dict[str, Any]] = []
        self._kind: str | None = None  # the open item's type
        self._buf: list[str] = []  # the open item's text / arguments so far
        self._item: dict[str, Any] = {}  # the open item as added (its id; a call's name)
        self._text = b""  # an open message's output_text.delta after its sequence number

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + _ENC.encode(data) + b"\n\n"

    @property
    def _where(self) -> dict[str, Any]:
        return {"item_id": self._item["id"], "output_index": len(self.items)}

    def _open(self, item: dict[str, Any]) -> bytes:
        out = self.close()
        self._kind, self._buf, self._item = item["type"], [], item
        out += self.event("response.output_item.added", output_index=len(self.items),
                          item=item)
        if item["type"] == "reasoning":
            out += self.event("response.content_part.added", **self._where, content_index=0,
                              part={"type": "reasoning_text", "text": ""})
        elif item["type"] == "message":
            out += self.event("response.content_part.added", **self._where, content_index=0,
                              part=_text_part(""))
            # the bytes event() writes for its text deltas, after the sequence number
            self._text = (b',"item_id":"%s","output_index":%d,"content_index":0,"logprobs":[],'
                          b'"delta":' % (item["id"].encode(), len(self.items)))
        return out

    def close(self) -> bytes:
        if self._kind is None:
            return b""
        text, item = "".join(self._buf), self._item
        where, out = self._where, b""
        if self._kind == "reasoning":
            out += self.event("response.reasoning_text.done", **where, content_index=0,
                              text=text)
            out += self.event("response.content_part.done", **where, content_index=0,
                              part={"type": "reasoning_text", "text": text})
            done = _reasoning_item(item["id"], text, "completed")
        elif self._kind == "message":
            out += self.event("response.output_text.done", **where, content_index=0,
                              text=text, logprobs=[])
            out += self.event("response.content_part.done", **where, content_index=0,
                              part=_text_part(text))
            done = _message_item(item["id"], text, "completed")
        else:
            out += self.event("response.function_call_arguments.done", **where,
                              arguments=text, name=item["name"])
            done = _call_item(item["id"], item["call_id"], item["name"], text, "completed")
        out += self.event("response.output_item.done", output_index=len(self.items),
                          item=done)
        self.items.append(done)
        self._kind = None
        return out

    def feed(self, delta: DeltaMessage | None) -> bytes:
        if (self._kind == "message" and delta is not None and isinstance(delta.content, str)
                and delta.reasoning_content is UNSET and delta.tool_calls is UNSET):
            # hot path, more text for the open message: event()'s bytes, one string encode
            if not delta.content:
                return b""
            self._buf.append(delta.content)
            self.seq += 1
            return (_TEXT_DELTA + str(self.seq - 1).encode() + self._text
                    + _ENC.encode(delta.content) + b"}\n\n")
        out = b""
        for kind, text, name in delta_pieces(delta):
            if kind == "call":
                out += self._open(_call_item(_id("fc"), text, name, "", "in_progress"))
                continue
            if kind == "reasoning" and self._kind != "reasoning":
                out += self._open(_reasoning_item(_id("rs"), None, "in_progress"))
            elif kind == "content" and self._kind != "message":
                out += self._open(_message_item(_id("msg"), None, "in_progress"))
            elif kind == "arguments" and self._kind != "function_call":
                continue  # arguments with no call open (never sent by the parsers)
            self._buf.append(text)
            out += self.event(_DELTAS[kind], **self._where, **_DELTA_FIELDS[kind], delta=text)
        return out


_TEXT_DELTA = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
               b'"sequence_number":')
_DELTAS = {"reasoning": "response.reasoning_text.delta",
           "content": "response.output_text.delta",
           "arguments": "response.function_call_arguments.delta"}
_DELTA_FIELDS: dict[str, dict[str, Any]] = {
    "reasoning": {"content_index": 0}, "content": {"content_index": 0, "logprobs": []},
    "arguments": {}}


class ResponsesServing:
    """The /v1/responses routes over the chat route's OpenAIServing (the same state)."""

    def __init__(self, chat: OpenAIServing, store_size: int = STORE_SIZE,
                 store_bytes: int | None = None):
        self.chat = chat
        self.state = chat.state
        self.store = ResponseStore(store_size,
                                   STORE_BYTES if store_bytes is None else store_bytes)

    def _body(self, rid: str, created: int, model: str, req: ResponsesRequest, status: str,
              output: list, usage: Any = None, reason: str | None = None) -> dict[str, Any]:
        """The Response object (OpenAI's field order)."""
        return {
            "id": rid, "object": "response", "created_at": created, "status": status,
            "background": False, "error": None,
            "incomplete_details": {"reason": reason} if reason else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": model, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning or {"effort": None, "summary": None},
            "store": bool(req.store), "temperature": req.temperature,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "top_p": req.top_p, "truncation": req.truncation or "disabled",
            "usage": None if usage is None else {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                         "cache_write_tokens": 0},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.prompt_tokens + usage.completion_tokens},
            "user": req.user, "metadata": req.metadata or {}}

    def _history(self, req: ResponsesRequest) -> list[ChatMessage]:
        if req.previous_response_id is None:
            return []
        hit = self.store.get(req.previous_response_id)
        if hit is None:
            raise HTTPError(404, f"Response with id '{req.previous_response_id}' not found.",
                            "previous_response_id")
        return hit[1]

    async def create(self, request: Request) -> Response:
        route = "/v1/responses"
        try:
            req = decode_request(ResponsesRequest, await read_body(
                request, self.state.config.max_body_bytes))
            messages, convo = input_messages(req, self._history(req))
            started = await self.chat.open_chat(request, to_chat_request(req, messages))
        except ClientGone:
            return self.chat._gone()
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return self.chat._error(route, e)
        self.state.metrics.request(route, 200)
        rid = "resp_" + started.rid.removeprefix("chatcmpl-")
        created = int(time.time())
        choice = started.choices[0]

        def finish(status: str, items: list, usage: Any, reason: str | None
                   ) -> tuple[dict, bytes | None]:
            """The final Response (stored with `store`) and its JSON when the store made it."""
            body = self._body(rid, created, started.model, req, status, items, usage, reason)
            if not req.store:
                return body, None
            return body, self.store.put(rid, body, convo + output_messages(items))

        if req.stream:
            return self.chat._sse(self._stream(req, rid, created, started.model, choice,
                                               started.plan, finish))
        try:
            result = (await until_disconnect(request, self.chat._collect([choice])))[0]
        except ClientGone:
            return self.chat._gone()
        except Exception as e:  # noqa: BLE001
            return self.chat._error(route, e)
        message, _ = self.chat._message(started.plan, "assistant", "", "".join(result.text),
                                        result.finish_reason)
        status, reason = _status(result.finish_reason)
        body, encoded = finish(status, output_items(message), result.usage, reason)
        if encoded is None:
            return json_response(body)
        return Response(encoded, media_type="application/json")  # encoded once, by the store

    async def _stream(self, req: ResponsesRequest, rid: str, created: int, model: str,
                      choice: Choice, plan: Any, finish: Any) -> AsyncIterator[bytes]:
        items = ItemStream()
        start = self._body(rid, created, model, req, "in_progress", [])
        yield (items.event("response.created", response=start)
               + items.event("response.in_progress", response=start))
        try:
            async with contextlib.aclosing(parsed_stream(choice, plan)) as stream:
                async for delta, out, finish_reason in stream:
                    chunk = items.feed(delta)
                    if finish_reason is None:
                        if chunk:
                            yield chunk
                        continue
                    chunk += items.close()
                    status, reason = _status(out.finish_reason)
                    body, _ = finish(status, items.items, out.usage, reason)
                    kind = "response.completed" if status == "completed" else (
                        "response.incomplete")
                    yield FinalChunk(chunk + items.event(kind, response=body))
                    return
        except Exception as e:  # noqa: BLE001 - after the 200: an error event ends the stream
            err = HTTPError.from_exception(e)
            yield FinalChunk(items.event("error", code=err.type, message=err.message,
                                         param=err.param))

    async def retrieve(self, request: Request) -> Response:
        hit = self.store.get(request.path_params["response_id"])
        if hit is None:
            return self._missing(request)
        return Response(hit[0], media_type="application/json")

    async def delete(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        if not self.store.pop(rid):
            return self._missing(request)
        return json_response({"id": rid, "object": "response", "deleted": True})

    def _missing(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        return HTTPError(404, f"Response with id '{rid}' not found.", "response_id").response()


def _status(finish: str | None) -> tuple[str, str | None]:
    """The engine's finish reason -> (Response status, incomplete_details reason)."""
    if finish == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None
