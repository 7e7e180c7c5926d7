"""SDK exceptions. A server `error` frame becomes a `RequestError` subclass chosen by its code."""

from __future__ import annotations


class AtomStreamClientError(Exception):
    """Base class of every SDK error."""


class ConnectionClosedError(AtomStreamClientError):
    """The WebSocket closed (or never opened) while a request was in flight."""


class RequestError(AtomStreamClientError):
    """The server refused or failed a request. `code` is an HTTP status, `param` the bad field."""

    def __init__(self, message: str, code: int = 500, request_id: str | None = None,
                 param: str | None = None):
        super().__init__(f"[{code}] {message}" + (f" (param: {param})" if param else ""))
        self.message = message
        self.code = code
        self.request_id = request_id
        self.param = param


class BadRequestError(RequestError):
    """400/413: an invalid parameter, a prompt longer than the context, an oversized frame."""


class AuthenticationError(RequestError):
    """401: missing or wrong API key."""


class OverloadedError(RequestError):
    """429/503: the server is overloaded or shutting down; retry later."""


class ServerError(RequestError):
    """500: the request failed inside the engine."""


def error_for(code: int, message: str, request_id: str | None = None,
              param: str | None = None) -> RequestError:
    cls = {400: BadRequestError, 401: AuthenticationError, 413: BadRequestError,
           429: OverloadedError, 503: OverloadedError}.get(code)
    if cls is None:
        cls = ServerError if code >= 500 else RequestError
    return cls(message, code, request_id, param)
