"""HTTP plumbing shared by the OpenAI routes: error bodies, bounded body reads, the SSE response.

- `HTTPError` / `error_response(...)`: the OpenAI error body `{"error": {"message", "type",
  "param", "code"}}` (code = HTTP status, as vLLM). `from_exception` maps the engine's exceptions
  (errors.py: `.status`, `.param`), `SamplingParamsError` (400 with its param) and plain
  ValueError/TypeError (400); overload (429/503) carries `Retry-After`. A RecursionError is the
  request's nesting (tools or chat_template_kwargs deep enough to pass the JSON decoder but not
  the template's rendering): 400. Anything else is a 500 whose message names only the exception
  type (its text may hold internal paths); the traceback goes to the server log.
- `read_body(request, limit)`: refuses a declared Content-Length over the limit before reading,
  and otherwise counts bytes while reading, so an oversized body is cut off at `limit` (413) and
  never buffered whole.
- `SSEResponse`: a lean StreamingResponse for `text/event-stream`. A watcher task waits for
  `http.disconnect` and cancels the streaming task, so the body generator (and the engine stream
  inside it) is closed promptly: the request is aborted and its KV blocks are freed within a step.
  A chunk of type `FinalChunk` is sent with `more_body=False` (one write for the tail of a stream).
- `until_disconnect(request, coro)`: runs a non-streaming handler body, cancelling it (and so
  aborting its requests) if the client goes away first (`ClientGone`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from atom_stream.errors import AtomStreamError, EngineOverloadedError
from atom_stream.protocol import ErrorInfo, ErrorResponse
from atom_stream.sampling_params import SamplingParamsError

logger = logging.getLogger("atom_stream.server")
_ENCODER = msgspec.json.Encoder()
RETRY_AFTER_S = "1"
STATUS_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
    405: "MethodNotAllowed", 413: "RequestEntityTooLarge", 429: "RateLimitError",
    431: "RequestHeaderFieldsTooLarge",
    500: "InternalServerError", 501: "NotImplementedError", 503: "ServiceUnavailableError",
}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or STATUS_TYPES.get(status, "Error")
        self.headers = headers or {}

    @classmethod
    def from_exception(cls, exc: BaseException) -> HTTPError:
        if isinstance(exc, HTTPError):
            return exc
        if isinstance(exc, SamplingParamsError):
            return cls(400, str(exc), exc.param)
        if isinstance(exc, AtomStreamError):
            headers = {"Retry-After": RETRY_AFTER_S} if exc.status in (429, 503) else None
            if isinstance(exc, EngineOverloadedError):
                headers = {"Retry-After": RETRY_AFTER_S}
            return cls(exc.status, exc.message, exc.param, exc.type, headers)
        if isinstance(exc, (ValueError, TypeError, OverflowError)):
            return cls(400, str(exc), getattr(exc, "param", None))
        if isinstance(exc, RecursionError):
            return cls(400, "the request is nested too deeply", type=VALIDATION_TYPE)
        logger.error("internal error answered with 500", exc_info=exc)
        return cls(500, f"internal error ({type(exc).__name__}); see the server log")

    def body(self) -> bytes:
        return _ENCODER.encode(
            ErrorResponse(ErrorInfo(self.message, self.type, self.param, self.status)))

    def response(self) -> Response:
        return Response(self.body(), self.status, headers=self.headers,
                        media_type="application/json")


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_ENCODER.encode(obj), status, media_type="application/json")


# vLLM answers request-schema failures (its pydantic RequestValidationError: bad JSON, wrong
# types, the request's own validators, a non-JSON content type) with this type string, and
# out-of-range sampling values with "BadRequestError"
VALIDATION_TYPE = "Bad Request"


async def read_body(request: Request, limit: int, require_json: bool = True) -> bytes:
    """The body, at most `limit` bytes (413 beyond, checked first); with `require_json` a
    Content-Type other than application/json (parameters aside) is a 400, as in vLLM."""
    too_big = HTTPError(413, f"request body exceeds the limit of {limit} bytes "
                             "(--max-body-bytes)", headers={"Connection": "close"})
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    if require_json:
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise HTTPError(400, "Unsupported Media Type: Only 'application/json' is allowed",
                            type=VALIDATION_TYPE)
    return b"".join(chunks)


class FinalChunk(bytes):
    """The last chunk of an SSE body: sent together with the end of the HTTP response."""


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class SSEResponse:
    """ASGI response streaming `body` (an async iterator of bytes); see the module docstring."""

    def __init__(self, body: AsyncIterator[bytes], on_disconnect: Any = None,
                 gauge: Any = None):
        self.body = body
        self.on_disconnect = on_disconnect
        self.gauge = gauge  # a Prometheus gauge of open streams
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    task.cancel()
                    return

        watcher = asyncio.get_running_loop().create_task(watch())
        body = self.body
        if self.gauge is not None:
            self.gauge.inc()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            finished = False
            async for chunk in body:
                last = type(chunk) is FinalChunk
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if last:
                    finished = True
                    break
            if not finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self.disconnected:
                raise
            task.uncancel()
            if self.on_disconnect is not None:
                self.on_disconnect()
        finally:
            watcher.cancel()
            if self.gauge is not None:
                self.gauge.dec()
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()


class ClientGone(Exception):
    """The client disconnected before a non-streaming answer was ready (its work is cancelled;
    the handler answers 499, as ATOM does, which nobody reads)."""


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`; if the client disconnects first, cancel it and raise ClientGone."""
    loop = asyncio.get_running_loop()
    work_task = loop.create_task(work)  # type: ignore[arg-type]

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = loop.create_task(watch())
    try:
        done, _ = await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work_task.cancel()
        watcher.cancel()
        raise
    if work_task in done:
        watcher.cancel()
        return work_task.result()
    work_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work_task  # its generators close: the requests are aborted
    raise ClientGone("client disconnected")
