"""Per-backend request functions: one streamed request in, timings out (vLLM's definitions).

Backends (`ASYNC_REQUEST_FUNCS`):
- `vllm`, `openai` (and ATOM's aliases `sglang`, `lmdeploy`, `scalellm`): POST /v1/completions,
  `stream: true, stream_options.include_usage: true`, the payload ATOM's benchmark sends (model,
  prompt, temperature 0, best_of, max_tokens, logprobs, ignore_eos). The prompt is the request's
  token-id list (exact input length) unless `--prompt-as-text`.
- `openai-chat`: POST /v1/chat/completions with one user message (text) and
  `max_completion_tokens`.
- `atom-ws`: our WebSocket /v1/ws (subprotocol atom-stream.v1.json or .msgpack): a `generate`
  frame with `prompt_token_ids` and params {max_tokens, ignore_eos, temperature 0}; `delta` frames
  until `done`. Connections: a pool of `--ws-connections` sockets (default: one per concurrency
  slot, i.e. --max-concurrency; 1 = everything multiplexed on one socket). A request takes the
  open socket with the fewest requests in flight and opens a new one while the pool is not full,
  so with the default each in-flight request has a socket to itself, opened lazily (the handshake
  lands in the first request's TTFT, as a new HTTP keep-alive connection does for SSE).

Timing (identical for every backend; vLLM's `async_request_openai_completions`):
- TTFT: send -> first message carrying content (an SSE chunk with non-empty `choices`, a WS
  `delta` frame), even if its text is empty.
- ITL: one sample per later content message (per chunk / per delta frame, NOT per token).
- latency (E2EL): send -> last content message; the trailing usage chunk / `done` frame is not
  content.
- output_tokens: `usage.completion_tokens` (SSE usage chunk, WS done frame); None if absent
  (the caller then re-tokenizes the text, as vLLM does).
- A request that never gets a content message, gets a non-200 status, an error frame or a
  broken connection is failed (`success=False`, `error` set).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from atom_stream import envs

_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode
_mp_decode = msgspec.msgpack.Decoder().decode
_mp_encode = msgspec.msgpack.Encoder().encode

WS_SUBPROTOCOLS = {"json": "atom-stream.v1.json", "msgpack": "atom-stream.v1.msgpack"}


@dataclass
class RequestFuncInput:
    prompt: str | list[int]
    api_url: str
    prompt_len: int
    output_len: int
    model: str
    model_name: str | None = None
    best_of: int = 1
    logprobs: int | None = None
    extra_body: dict | None = None
    ignore_eos: bool = False


@dataclass
class RequestFuncOutput:
    generated_text: str = ""
    success: bool = False
    latency: float = 0.0
    output_tokens: int | None = None
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    tpot: float = 0.0
    prompt_len: int = 0
    server_prompt_tokens: int | None = None  # usage.prompt_tokens, to check input lengths
    error: str = ""


class Session:
    """Shared per-run client state: one HTTP connection pool and one WebSocket pool.

    aiohttp, as ATOM and vLLM use: its C HTTP parser costs ~0.04 ms of client CPU per SSE chunk
    where httpx (pure-Python h11 + anyio) cost ~0.6 ms, measured here; with client and server
    sharing a small CPU, that overhead would be charged to the SSE transport. Create it inside
    the running event loop.
    """

    def __init__(self, *, max_connections: int, ws_connections: int = 1,
                 ws_encoding: str = "json") -> None:
        connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections)
        # trust_env=False: a benchmark of localhost must not go through an HTTP(S)_PROXY.
        self.http = aiohttp.ClientSession(
            connector=connector, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=6 * 3600, sock_connect=60))
        self.ws_pool = WSPool(ws_connections, ws_encoding)

    async def aclose(self) -> None:
        await self.ws_pool.aclose()
        await self.http.close()


def auth_headers() -> dict[str, str]:
    # ATOM sends "Bearer None" when OPENAI_API_KEY is unset; we send no header at all then.
    key = envs.text("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _fail(output: RequestFuncOutput, error: str) -> RequestFuncOutput:
    output.success = False
    output.error = error
    return output


def _exc_text() -> str:
    return "".join(traceback.format_exception(*sys.exc_info()))


async def _sse_lines(resp: aiohttp.ClientResponse):
    """Stripped lines of a streamed body; no line-length limit (StreamReader.readline has)."""
    buf = b""
    async for data in resp.content.iter_any():
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.strip()
    if buf.strip():
        yield buf.strip()


async def _stream_sse(session: Session, inp: RequestFuncInput, payload: dict,
                      content_of: Callable[[dict], str | None]) -> RequestFuncOutput:
    """POST `payload`, read `data:` lines; content_of(choice) gives the text of one choice."""
    output = RequestFuncOutput(prompt_len=inp.prompt_len)
    headers = {"Content-Type": "application/json", **auth_headers()}
    text_parts: list[str] = []
    first = False
    st = time.perf_counter()
    last = st
    try:
        async with session.http.post(inp.api_url, data=_json_encode(payload),
                                     headers=headers) as resp:
            if resp.status != 200:
                body = await resp.text(errors="replace")
                return _fail(output, f"HTTP {resp.status}: {body[:500]}")
            async for line in _sse_lines(resp):
                if not line or line.startswith(b":"):  # blank separator / keep-alive comment
                    continue
                chunk = line.removeprefix(b"data:").strip()
                if chunk == b"[DONE]":
                    continue
                data = _json_decode(chunk)
                if choices := data.get("choices"):
                    ts = time.perf_counter()
                    if not first:
                        first = True
                        output.ttft = ts - st
                    else:
                        output.itl.append(ts - last)
                    last = ts
                    text_parts.append(content_of(choices[0]) or "")
                elif usage := data.get("usage"):
                    output.output_tokens = usage.get("completion_tokens")
                    output.server_prompt_tokens = usage.get("prompt_tokens")
                elif err := data.get("error"):
                    return _fail(output, f"error event: {err}")
        output.generated_text = "".join(text_parts)
        if not first:
            return _fail(output, "Never received a valid chunk to calculate TTFT. "
                                 "This response will be marked as failed!")
        output.success = True
        output.latency = last - st
    except Exception:  # noqa: BLE001 - any client error fails this request, not the run
        return _fail(output, _exc_text())
    return output


async def async_request_openai_completions(inp: RequestFuncInput, session: Session,
                                           pbar=None) -> RequestFuncOutput:
    if not inp.api_url.endswith(("completions", "profile")):
        raise ValueError("OpenAI Completions API URL must end with 'completions' or 'profile'.")
    payload: dict[str, Any] = {
        "model": inp.model_name or inp.model,
        "prompt": inp.prompt,
        "temperature": 0.0,
        "best_of": inp.best_of,
        "max_tokens": inp.output_len,
        "logprobs": inp.logprobs,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if inp.ignore_eos:
        payload["ignore_eos"] = True
    if inp.extra_body:
        payload.update(inp.extra_body)
    out = await _stream_sse(session, inp, payload, lambda c: c.get("text"))
    if pbar is not None:
        pbar.update(1)
    return out


async def async_request_openai_chat_completions(inp: RequestFuncInput, session: Session,
                                                pbar=None) -> RequestFuncOutput:
    if not inp.api_url.endswith("chat/completions"):
        raise ValueError("OpenAI Chat Completions API URL must end with 'chat/completions'.")
    prompt = inp.prompt if isinstance(inp.prompt, str) else ""
    payload: dict[str, Any] = {
        "model": inp.model_name or inp.model,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        "temperature": 0.0,
        "max_completion_tokens": inp.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if inp.ignore_eos:
        payload["ignore_eos"] = True
    if inp.extra_body:
        payload.update(inp.extra_body)
    out = await _stream_sse(session, inp, payload,
                            lambda c: (c.get("delta") or {}).get("content"))
    if pbar is not None:
        pbar.update(1)
    return out


class _WSConn:
    """One socket; a reader task time-stamps each frame and routes it to its request's queue."""

    def __init__(self, ws, encoding: str) -> None:
        self.ws = ws
        self.encoding = encoding
        self.streams: dict[str, asyncio.Queue] = {}
        self.in_flight = 0
        self.closed: str | None = None
        self.reader = asyncio.create_task(self._read())

    def encode(self, frame: dict) -> bytes | str:
        return _mp_encode(frame) if self.encoding == "msgpack" else _json_encode(frame).decode()

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                ts = time.perf_counter()
                frame = _mp_decode(msg) if isinstance(msg, bytes) and self.encoding == "msgpack" \
                    else _json_decode(msg)
                queue = self.streams.get(frame.get("id"))
                if queue is not None:
                    queue.put_nowait((ts, frame))
                elif frame.get("type") == "error":  # connection-level error: fail everyone
                    for q in self.streams.values():
                        q.put_nowait((ts, frame))
            self.closed = "connection closed by server"
        except Exception:  # noqa: BLE001 - reported to every waiting request below
            self.closed = _exc_text()
        for q in self.streams.values():
            q.put_nowait((time.perf_counter(), {"type": "_closed", "message": self.closed}))


class WSPool:
    """Up to `size` sockets to one URL, opened lazily; least-loaded socket per request."""

    def __init__(self, size: int, encoding: str) -> None:
        if encoding not in WS_SUBPROTOCOLS:
            raise ValueError(f"ws encoding must be one of {sorted(WS_SUBPROTOCOLS)}")
        self.size = max(1, size)
        self.encoding = encoding
        self.conns: list[asyncio.Future] = []  # futures of _WSConn, so opening is shared
        self.ids = itertools.count()

    async def _open(self, url: str) -> _WSConn:
        try:  # websockets >= 13
            from websockets.asyncio.client import connect

            headers = {"additional_headers": auth_headers()}
        except ImportError:  # websockets 12: the legacy client
            from websockets.client import connect

            headers = {"extra_headers": auth_headers()}
        ws = await connect(url, subprotocols=[WS_SUBPROTOCOLS[self.encoding]], compression=None,
                           max_size=2**24, open_timeout=60, ping_interval=None, **headers)
        return _WSConn(ws, self.encoding)

    async def acquire(self, url: str) -> _WSConn:
        live = [f for f in self.conns if not (f.done() and (f.exception() or f.result().closed))]
        self.conns = live
        if len(live) < self.size:
            fut = asyncio.ensure_future(self._open(url))
            self.conns.append(fut)
            conn = await fut
        else:
            # fewest in flight; futures still opening count as busy
            def load(f: asyncio.Future) -> int:
                return f.result().in_flight if f.done() else 1 << 30
            conn = await min(live, key=load)
        conn.in_flight += 1
        return conn

    async def aclose(self) -> None:
        for fut in self.conns:
            if fut.done() and not fut.exception():
                conn = fut.result()
                await conn.ws.close()
                conn.reader.cancel()
            else:
                fut.cancel()
        self.conns = []


async def async_request_atom_ws(inp: RequestFuncInput, session: Session,
                                pbar=None) -> RequestFuncOutput:
    output = RequestFuncOutput(prompt_len=inp.prompt_len)
    params: dict[str, Any] = {"max_tokens": inp.output_len, "temperature": 0.0,
                              "ignore_eos": bool(inp.ignore_eos)}
    if inp.logprobs is not None:
        params["logprobs"] = inp.logprobs
    if inp.extra_body:
        params.update(inp.extra_body)
    rid = f"bench-{os.getpid()}-{next(session.ws_pool.ids)}"
    frame: dict[str, Any] = {"type": "generate", "id": rid, "params": params}
    if isinstance(inp.prompt, str):
        frame["prompt"] = inp.prompt
    else:
        frame["prompt_token_ids"] = inp.prompt
    text_parts: list[str] = []
    conn: _WSConn | None = None
    queue: asyncio.Queue = asyncio.Queue()
    st = time.perf_counter()
    last = st
    first = False
    try:
        conn = await session.ws_pool.acquire(inp.api_url)
        conn.streams[rid] = queue
        await conn.ws.send(conn.encode(frame))
        while True:
            ts, msg = await queue.get()
            kind = msg.get("type")
            if kind == "delta":
                if not first:
                    first = True
                    output.ttft = ts - st
                else:
                    output.itl.append(ts - last)
                last = ts
                text_parts.append(msg.get("text") or "")
            elif kind == "done":
                usage = msg.get("usage") or {}
                output.output_tokens = usage.get("completion_tokens")
                output.server_prompt_tokens = usage.get("prompt_tokens")
                break
            elif kind in ("error", "_closed"):
                _fail(output, f"{kind}: {msg.get('code', '')} {msg.get('message', '')}".strip())
                break
        if not output.error:
            output.generated_text = "".join(text_parts)
            if first:
                output.success = True
                output.latency = last - st
            else:
                _fail(output, "Never received a delta frame to calculate TTFT. "
                              "This response will be marked as failed!")
    except asyncio.CancelledError:
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):  # best effort on the way out
                await conn.ws.send(conn.encode({"type": "cancel", "id": rid}))
        raise
    except Exception:  # noqa: BLE001 - any client error fails this request, not the run
        _fail(output, _exc_text())
    finally:
        if conn is not None:
            conn.streams.pop(rid, None)
            conn.in_flight -= 1
    if pbar is not None:
        pbar.update(1)
    return output


RequestFunc = Callable[..., Awaitable[RequestFuncOutput]]

ASYNC_REQUEST_FUNCS: dict[str, RequestFunc] = {
    "vllm": async_request_openai_completions,
    "openai": async_request_openai_completions,
    "openai-chat": async_request_openai_chat_completions,
    "atom-ws": async_request_atom_ws,
    # ATOM's / vLLM's other names for the same OpenAI /v1/completions client
    "sglang": async_request_openai_completions,
    "lmdeploy": async_request_openai_completions,
    "scalellm": async_request_openai_completions,
}
# Default endpoint per backend when --endpoint is left at its default (/v1/completions).
DEFAULT_ENDPOINTS = {"openai-chat": "/v1/chat/completions", "atom-ws": "/v1/ws"}
