"""atom_stream_client: the Python SDK for atom-stream's WebSocket protocol (/v1/ws).

`AsyncClient` (asyncio; many concurrent streams over one socket), `Client` (synchronous wrapper),
typed frames (`Delta`, `Done`, `Error`, ...) and exceptions (`RequestError` and subclasses,
`ConnectionClosedError`), and an SSE helper for the OpenAI routes (`stream_sse`, `iter_sse`).
Depends only on websockets and msgspec.
"""

from __future__ import annotations

from atom_stream_client.client import AsyncClient, Stream
from atom_stream_client.errors import (
    AtomStreamClientError,
    AuthenticationError,
    BadRequestError,
    ConnectionClosedError,
    OverloadedError,
    RequestError,
    ServerError,
)
from atom_stream_client.messages import Completion, Delta, Done, Error, Usage
from atom_stream_client.sse import iter_sse, stream_sse
from atom_stream_client.sync import Client

__all__ = [
    "AsyncClient",
    "AtomStreamClientError",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "Completion",
    "ConnectionClosedError",
    "Delta",
    "Done",
    "Error",
    "OverloadedError",
    "RequestError",
    "ServerError",
    "Stream",
    "Usage",
    "iter_sse",
    "stream_sse",
]
__version__ = "0.1.0"
