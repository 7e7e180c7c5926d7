"""SSE helper: stream atom-stream's OpenAI-compatible routes without the openai package.

    for chunk in stream_sse("http://127.0.0.1:8000", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")

- `iter_sse(lines)`: the events of a `text/event-stream` body (DESIGN.md: `data: <json>\\n\\n`
  frames closed by `data: [DONE]`), each `data:` payload decoded as JSON (a dict). Comment lines
  (`:`) and other fields are skipped; `[DONE]` ends the iteration. An event `{"error": {...}}`
  (an error after the 200) raises the matching `RequestError` (errors.error_for by its code).
- `stream_sse(base_url, path, body, api_key=None, timeout=60)`: POSTs `body` with
  `"stream": true` and yields `iter_sse` of the response. An HTTP error status raises the
  matching `RequestError` from the OpenAI-shaped error body; an unreachable server raises
  `ConnectionClosedError`. Synchronous, standard library only (http.client decodes chunked
  bodies); in asyncio code run it in a thread. Closing the generator early closes the HTTP
  connection, which aborts the request on the server.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec

from atom_stream_client.errors import ConnectionClosedError, RequestError, error_for


def _error(payload: Any, status: int) -> RequestError:
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return error_for(status, f"HTTP {status}: {str(payload)[:200]}")
    code = err.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else status
    return error_for(code, str(err.get("message", "")), None, err.get("param"))


def iter_sse(lines: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    """The JSON events of an SSE body given line by line (see the module docstring)."""
    data: list[str] = []
    for raw in lines:
        line = (raw.decode("utf-8") if isinstance(raw, bytes) else raw).rstrip("\r\n")
        if line:
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            continue  # comments (":...") and other fields (event:, id:, retry:)
        if not data:
            continue
        payload, data = "\n".join(data), []
        if payload == "[DONE]":
            return
        event = msgspec.json.decode(payload)
        if isinstance(event, dict) and "error" in event:
            raise _error(event, 500)
        yield event
    if data:  # a body that ends without a blank line after its last event
        payload = "\n".join(data)
        if payload != "[DONE]":
            event = msgspec.json.decode(payload)
            if isinstance(event, dict) and "error" in event:
                raise _error(event, 500)
            yield event


def stream_sse(base_url: str, path: str, body: dict[str, Any], api_key: str | None = None,
               timeout: float = 60.0) -> Iterator[dict[str, Any]]:
    """POST `body` (plus `"stream": true`) to `base_url + path` and yield its SSE events."""
    url = base_url.rstrip("/") + "/" + path.lstrip("/")
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=msgspec.json.encode({**body, "stream": True}),
                                 headers=headers, method="POST")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            payload: Any = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            payload = raw.decode("utf-8", "replace")
        raise _error(payload, e.code) from None
    except OSError as e:
        raise ConnectionClosedError(f"cannot connect to {url}: {e}") from e
    with resp:
        yield from iter_sse(resp)
