"""POST /invocations: SageMaker's inference route (vLLM serves it beside /ping), dispatched by
the body's shape to the route that serves it: `messages` -> /v1/chat/completions, `prompt` ->
/v1/completions, `input` -> /v1/responses. The body is read once, under --max-body-bytes (413)
and as application/json (400), then handed to that route as if sent there; anything else is a
400 naming what is expected."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from atom_stream.server.responses import HTTPError, read_body

# body key -> the route it marks, in the order they are tried
ROUTES = (("messages", "/v1/chat/completions"), ("prompt", "/v1/completions"),
          ("input", "/v1/responses"))


def invocations_route(handlers: dict[str, Any], max_body_bytes: int) -> Any:
    """The /invocations handler over `handlers` (route path -> its handler)."""

    async def invocations(request: Request) -> Response:
        try:
            body = await read_body(request, max_body_bytes)
            try:
                obj = msgspec.json.decode(body)
            except msgspec.DecodeError as e:
                raise HTTPError(400, f"the request body is not valid JSON: {e}") from None
            route = next((path for key, path in ROUTES
                          if isinstance(obj, dict) and key in obj), None)
            if route is None:
                raise HTTPError(400, "an /invocations body is a chat completion (`messages`), "
                                "completion (`prompt`) or responses (`input`) request")
        except HTTPError as e:
            return e.response()
        request._body = body  # starlette's cache: the route reads these bytes again
        return await handlers[route](request)

    return invocations
