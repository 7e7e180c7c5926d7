"""Request ids as vLLM's OpenAI server makes them: the client names the response, the engine
gets a unique id.

    base = base_request_id(request.headers, req.request_id)   # header > body > random
    rid = f"cmpl-{base}"                                       # the response's "id"
    engine.generate(..., engine_request_id(rid))               # "cmpl-<base>-<8 hex>"

- `base_request_id`: vLLM's `OpenAIServing._base_request_id`
  (vllm/entrypoints/openai/engine/serving.py): an `X-Request-Id` header, when present (even
  empty), wins over the body's `request_id`; without either, a random uuid4 hex.
- `engine_request_id`: vLLM's `InputProcessor.assign_request_id`
  (vllm/v1/engine/input_processor.py): the external id plus "-" and 8 random hex characters, so
  two live requests that carry the same client id (a gateway retrying with one id, a trace id
  stamped on every request) are two engine requests, and both succeed. The engine id is never
  shown to the client; responses keep the external id. Aborts need no mapping: the HTTP layer
  aborts by closing the request's own generator (disconnects, errors), which knows its engine id.
  Two live requests could still collide with probability ~n^2 / 2^33 (vLLM accepts the same);
  the engine then refuses the second with its "already live" 400.
- Length: an id longer than `MAX_REQUEST_ID_CHARS` is a 400 (param `request_id`, or the header
  named). vLLM takes any length; but the id is repeated in every SSE chunk, so a megabyte id
  made each token a megabyte on the wire and slowed every other stream on the loop. Gateways'
  ids (uuids, trace ids) are far shorter.
- `RequestIdHeaderMiddleware`: vLLM's `--enable-request-id-headers` (off by default).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atom_stream.errors import InvalidRequestError

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID_CHARS = 1024


def base_request_id(headers: Mapping[str, str] | None, default: str | None = None) -> str:
    """The client's id for a request: the `X-Request-Id` header (case-insensitive lookup on
    starlette Headers; present, even empty, it wins), else `default` (the body's
    `request_id`), else a random hex uuid; an empty `default` counts as none (vLLM's
    `default = default or random_uuid()`). InvalidRequestError (400) for an id longer than
    MAX_REQUEST_ID_CHARS."""
    if headers is not None:
        value = headers.get(REQUEST_ID_HEADER)
        if value is not None:
            return _bounded(value, None)
    return _bounded(default, "request_id") if default else uuid.uuid4().hex


def _bounded(value: str, param: str | None) -> str:
    if len(value) > MAX_REQUEST_ID_CHARS:
        where = param or f"the {REQUEST_ID_HEADER} header"
        raise InvalidRequestError(f"{where}: at most {MAX_REQUEST_ID_CHARS} characters, got "
                                  f"{len(value)}", param)
    return value


def engine_request_id(external_id: str) -> str:
    """A unique engine-level id for `external_id` (vLLM: `f"{id}-{random_uuid():.8}"`)."""
    return f"{external_id}-{uuid.uuid4().hex[:8]}"


class RequestIdHeaderMiddleware:
    """vLLM's `--enable-request-id-headers` (its `add_request_id` HTTP middleware): every HTTP
    response carries `X-Request-Id`, the request's own header when it sent one (cut to
    MAX_REQUEST_ID_CHARS), else a random uuid4 hex. WebSocket and lifespan scopes pass
    through untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        value = Headers(scope=scope).get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        raw = value[:MAX_REQUEST_ID_CHARS].encode("latin-1", "replace")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", raw)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


__all__ = ["MAX_REQUEST_ID_CHARS", "REQUEST_ID_HEADER", "RequestIdHeaderMiddleware",
           "base_request_id", "engine_request_id"]
