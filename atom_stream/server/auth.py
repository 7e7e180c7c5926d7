"""API-key authentication: an ASGI middleware for HTTP and WebSocket scopes.

Contract (vLLM's `AuthenticationMiddleware`, with an OpenAI-shaped 401 body):

- Keys come from `--api-key` (several allowed). Only SHA-256 digests are kept; a presented key is
  hashed and compared to every stored digest with `secrets.compare_digest` (constant time, no
  early exit), so neither timing nor a memory dump reveals a key.
- Only paths under `/v1` are guarded; `/health`, `/metrics`, `/version`, `/tokenize`, ... and
  `OPTIONS` requests are not.
- HTTP: `Authorization: Bearer <key>` (scheme case-insensitive), or `x-api-key: <key>` (the
  header Anthropic's SDK and Claude Code send), or 401. Under `/v1/messages` the 401 body is
  Anthropic's (`{"type": "error", "error": {"type": "authentication_error", ...}}`).
- WebSocket: a wrong `Authorization` header is refused at the handshake (HTTP 401). Without a
  header the handshake proceeds with `scope["atom_stream.auth"] = "pending"`; the `/v1/ws` handler
  then requires an `{"type": "auth", "api_key": ...}` frame before it serves anything.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

AUTH_SCOPE_KEY = "atom_stream.auth"


class KeyChecker:
    """Holds hashed keys; `check(key)` is constant-time over all stored keys."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, key: str | None) -> bool:
        if key is None:
            return False
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for stored in self._digests:  # no short circuit: time does not depend on which key
            ok |= secrets.compare_digest(digest, stored)
        return ok

    def check_header(self, value: str) -> bool:
        scheme, _, token = value.strip().partition(" ")
        return scheme.lower() == "bearer" and self.check(token.strip())


def _authorization(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return value.decode("latin-1")
    return None


def _x_api_key(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
    return None


_UNAUTHORIZED = (
    b'{"error":{"message":"Unauthorized: a valid API key is required (Authorization: Bearer '
    b'<key>).","type":"AuthenticationError","param":null,"code":401}}'
)
_UNAUTHORIZED_ANTHROPIC = (
    b'{"type":"error","error":{"type":"authentication_error","message":"Unauthorized: a valid '
    b'API key is required (x-api-key: <key> or Authorization: Bearer <key>)."}}'
)


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, checker: KeyChecker):
        self.app = app
        self.checker = checker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if (
            not self.checker
            or kind not in ("http", "websocket")
            or not scope["path"].startswith("/v1")
            or (kind == "http" and scope["method"] == "OPTIONS")
        ):
            await self.app(scope, receive, send)
            return
        header = _authorization(scope)
        if header is not None and self.checker.check_header(header):
            scope[AUTH_SCOPE_KEY] = "ok"
            await self.app(scope, receive, send)
            return
        if kind == "http" and self.checker.check(_x_api_key(scope)):
            scope[AUTH_SCOPE_KEY] = "ok"
            await self.app(scope, receive, send)
            return
        if kind == "websocket" and header is None:
            scope[AUTH_SCOPE_KEY] = "pending"
            await self.app(scope, receive, send)
            return
        body = (_UNAUTHORIZED_ANTHROPIC if scope["path"].startswith("/v1/messages")
                else _UNAUTHORIZED)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()),
                   (b"www-authenticate", b"Bearer")]
        if kind == "http":
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
