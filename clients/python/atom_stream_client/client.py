"""AsyncClient: many concurrent generation streams over one atom-stream WebSocket.

    async with AsyncClient("ws://127.0.0.1:8000/v1/ws", api_key=None) as client:
        async for delta in client.generate("Hello", max_tokens=16):
            print(delta.text, end="")
        result = await client.complete(prompt_token_ids=[1, 2, 3], max_tokens=8)
        async for delta in client.chat([{"role": "user", "content": "Hi"}]):
            ...

- `generate(prompt | prompt_token_ids= | messages=, **params)` returns a `Stream`: iterate it for
  `Delta` frames; after the last one `stream.done` holds the `Done` frame (finish_reason, usage).
  Params are the server's sampling parameters (max_tokens, temperature, top_p, top_k, min_p, seed,
  stop, stop_token_ids, ignore_eos, logprobs, ...).
- Leaving the `async for` early (break, exception, task cancelled) sends a `cancel` frame; so does
  `await stream.cancel()`. A stream left early keeps its id until the server's `done` for the
  cancel: a new request with that id (`id=`) waits for it, so it is never refused as a duplicate
  live id nor sent the old request's frames. `complete()` returns a `Completion` (text,
  token_ids, finish_reason, usage, stop_reason, and `logprobs` when asked for).
- `messages` requests take the chat route's `chat_template_kwargs`, `add_generation_prompt` and
  `continue_final_message` as keyword arguments beside the sampling parameters.
- One reader task demultiplexes frames by id into per-stream queues; a request's `error` frame
  raises the matching `RequestError` from its iterator; a closed socket raises
  `ConnectionClosedError` from every open stream. Frames of an unknown type (a newer server's)
  are skipped; an undecodable frame closes the socket (its requests are aborted server-side) and
  fails every open stream with `ConnectionClosedError`.
- `protocol="msgpack"` (default, binary frames) or `"json"` (text frames). A URL of the form
  `http://host:port` (or the OpenAI base `http://host:port/v1`) is turned into
  `ws://host:port/v1/ws`. With `api_key` the handshake carries `Authorization: Bearer <key>`.
- Connection life: the first request (or `connect()` / `async with`) opens the socket. When the
  connection drops, open streams raise `ConnectionClosedError` and the next request opens a new
  socket. After `close()` requests raise `ConnectionClosedError` (no socket is opened behind
  the caller's back) until `connect()` is called again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from atom_stream_client.errors import (
    AtomStreamClientError,
    AuthenticationError,
    ConnectionClosedError,
    error_for,
)
from atom_stream_client.messages import (
    JSON,
    MSGPACK,
    Cancel,
    Completion,
    Delta,
    Done,
    Error,
    Generate,
    ServerFrame,
)


class _Head(msgspec.Struct):
    """A server frame's type alone (unknown fields ignored)."""

    type: str = ""


_KNOWN_TYPES = frozenset({"delta", "done", "error"})
_RELEASE_SPINS = 32  # loop iterations _claim waits for an abandoned `async for` to be closed


def ws_url(url: str) -> str:
    """The socket's URL: http(s) becomes ws(s); a bare `host:port` (with or without a trailing
    slash) and the OpenAI-style base `host:port/v1` get the path `/v1/ws`; any other path is
    kept as given."""
    if url.startswith(("http://", "https://")):
        url = "ws" + url[4:]
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("ws", "wss"):
        host, _, path = rest.partition("/")
        if path.strip("/") in ("", "v1"):
            url = f"{scheme}://{host}/v1/ws"
    return url


class Stream:
    """One request's stream of `Delta`s (see the module docstring)."""

    def __init__(self, client: AsyncClient, request_id: str, frame: Generate):
        self.client = client
        self.id = request_id
        self._frame = frame
        self._queue: asyncio.Queue = asyncio.Queue()
        self._started = False
        # left early: the id stays held until the server's last frame for it (_abandon)
        self._draining = False
        self._ended = asyncio.Event()  # set once the id is released
        self.done: Done | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.done.finish_reason if self.done else None

    @property
    def usage(self) -> Any:
        return self.done.usage if self.done else None

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Delta]:
        if self._started:
            raise AtomStreamClientError(f"stream {self.id!r} can be iterated only once")
        self._started = True
        client = self.client
        await client._submit(self)
        finished = False
        try:
            while True:
                item = await self._queue.get()
                if type(item) is Delta:
                    yield item
                elif type(item) is Done:
                    self.done = item
                    finished = True
                    return
                else:
                    finished = True
                    raise item
        finally:
            if finished:
                client._release(self)
            else:
                client._abandon(self)

    async def cancel(self) -> None:
        """Ask the server to abort; iteration then ends with finish_reason "abort"."""
        await self.client._send(Cancel(self.id))

    async def collect(self) -> Completion:
        """Iterate to the end; the whole result (`logprobs` when params.logprobs was set)."""
        text: list[str] = []
        ids: list[int] = []
        logprobs: list[Any] | None = None
        async for d in self:
            text.append(d.text)
            ids.extend(d.token_ids)
            if d.logprobs is not None:
                if logprobs is None:
                    logprobs = []
                logprobs.extend(d.logprobs)
        assert self.done is not None
        return Completion(self.id, "".join(text), ids, self.done.finish_reason, self.done.usage,
                          self.done.stop_reason, logprobs)


class AsyncClient:
    def __init__(self, url: str = "ws://127.0.0.1:8000/v1/ws", api_key: str | None = None, *,
                 protocol: str = "msgpack", open_timeout: float = 10.0,
                 ping_interval: float | None = 20.0):
        if protocol not in ("msgpack", "json"):
            raise ValueError("protocol must be 'msgpack' or 'json'")
        self.url = ws_url(url)
        self.api_key = api_key
        self.binary = protocol == "msgpack"
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        if self.binary:
            self._encode = msgspec.msgpack.Encoder().encode
            self._decode = msgspec.msgpack.Decoder(ServerFrame).decode
            self._peek = msgspec.msgpack.Decoder(_Head).decode
        else:
            self._encode = msgspec.json.Encoder().encode
            self._decode = msgspec.json.Decoder(ServerFrame).decode
            self._peek = msgspec.json.Decoder(_Head).decode
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task | None = None
        self._streams: dict[str, Stream] = {}
        self._ids = itertools.count()
        self._closed_exc: BaseException | None = None
        self._bg: set[asyncio.Task] = set()
        self._connect_lock: asyncio.Lock | None = None
        self._closed = False  # close() was called and connect() not since

    # ------------------------------------------------------------------ connection
    async def connect(self) -> AsyncClient:
        """Open the socket (a no-op while it is open); re-opens a closed client."""
        self._closed = False
        return await self._open()

    async def _open(self) -> AsyncClient:
        if self._closed:
            raise ConnectionClosedError("the client is closed (call connect() to re-open it)")
        if self._ws is not None:
            return self
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._ws is not None:
                return self
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
            try:
                self._ws = await connect(
                    self.url, subprotocols=[MSGPACK if self.binary else JSON],
                    additional_headers=headers, compression=None, max_size=None,
                    open_timeout=self.open_timeout, ping_interval=self.ping_interval)
            except Exception as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                if status == 401:
                    raise AuthenticationError("the server refused the API key", 401) from e
                raise ConnectionClosedError(f"cannot connect to {self.url}: {e}") from e
            self._closed_exc = None
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    async def close(self) -> None:
        """Close the socket; open streams raise ConnectionClosedError, and so do later requests
        until `connect()` is called again."""
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None

    async def __aenter__(self) -> AsyncClient:  # noqa: PYI034 - Self needs 3.11; SDK: 3.10+
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _frame(self, raw: bytes | str) -> Any:
        """The typed frame, or None for a frame of a type this SDK does not know (a newer
        server's: skipped). Anything else undecodable raises."""
        try:
            return self._decode(raw)
        except msgspec.ValidationError:
            if self._peek(raw).type in _KNOWN_TYPES:
                raise
            return None

    async def _read_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        exc: BaseException = ConnectionClosedError("the connection closed")
        try:
            async for raw in ws:
                frame = self._frame(raw)
                if frame is None:
                    continue
                stream = self._streams.get(frame.id) if frame.id is not None else None
                if stream is not None and stream._draining:
                    if type(frame) is not Delta:  # the left stream's last frame: id free
                        self._release(stream)
                    continue
                if type(frame) is Error:
                    err = error_for(frame.code, frame.message, frame.id, frame.param)
                    if stream is not None:
                        stream._queue.put_nowait(err)
                    elif frame.id is None and frame.code == 401:
                        exc = err
                    continue
                if stream is not None:
                    stream._queue.put_nowait(frame)
        except ConnectionClosed as e:
            exc = ConnectionClosedError(f"the connection closed: {e}")
        except Exception as e:  # noqa: BLE001 - undecodable frame: the protocol is broken
            exc = ConnectionClosedError(f"bad frame from the server: {e}")
            # close it: the server then aborts this socket's requests (left open, they ran on)
            with contextlib.suppress(Exception):
                await ws.close(1002, "bad frame")
        finally:
            self._closed_exc = exc
            self._ws = None
            for stream in list(self._streams.values()):
                if stream._draining:
                    self._release(stream)  # the server aborts the socket's requests itself
                else:
                    stream._queue.put_nowait(exc)

    async def _send(self, frame: Any) -> None:
        ws = self._ws
        if ws is None:
            raise self._closed_exc or ConnectionClosedError("not connected")
        data = self._encode(frame)
        try:
            await ws.send(data if self.binary else data.decode())
        except ConnectionClosed as e:
            raise ConnectionClosedError(f"the connection closed: {e}") from e

    def _release(self, stream: Stream) -> None:
        """Free the stream's id (for a new request of the same id)."""
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
        stream._ended.set()

    def _abandon(self, stream: Stream) -> None:
        """The caller left the stream before its end: cancel it on the server and keep its id
        held (frames dropped) until the server's done/error for it arrives, so that a new
        request with the same id is neither a duplicate live id nor sent the old one's frames.
        Released at once when that frame already came, or the socket is gone."""
        ended = False
        while not stream._queue.empty():
            ended = ended or type(stream._queue.get_nowait()) is not Delta
        if ended or self._ws is None or self._streams.get(stream.id) is not stream:
            self._release(stream)
            return
        stream._draining = True
        self._cancel_nowait(stream.id)

    async def _claim(self, request_id: str) -> None:
        """Wait until no stream holds `request_id`: one left early holds it until the server's
        last frame for it (_abandon); an `async for` left by `break` is closed by the event
        loop's async-generator finalizer a few loop iterations later. An id still being
        iterated raises."""
        for _ in range(_RELEASE_SPINS):
            held = self._streams.get(request_id)
            if held is None:
                return
            if held._draining:
                await held._ended.wait()
            else:
                await asyncio.sleep(0)
        raise AtomStreamClientError(f"request id {request_id!r} is already live")

    def _cancel_nowait(self, request_id: str) -> None:
        if self._ws is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._send(Cancel(request_id)))
        self._bg.add(task)
        task.add_done_callback(self._bg_done)

    def _bg_done(self, task: asyncio.Task) -> None:
        self._bg.discard(task)
        if not task.cancelled():
            task.exception()  # a cancel on a closed socket is moot

    async def _submit(self, stream: Stream) -> None:
        await self._claim(stream.id)
        await self._open()
        if stream.id in self._streams:  # claimed by another request while connecting
            raise AtomStreamClientError(f"request id {stream.id!r} is already live")
        self._streams[stream.id] = stream
        try:
            await self._send(stream._frame)
        except BaseException:
            self._streams.pop(stream.id, None)
            raise

    # ------------------------------------------------------------------ requests
    def generate(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
                 messages: list[dict[str, Any]] | None = None, id: str | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None,
                 add_generation_prompt: bool = True, continue_final_message: bool = False,
                 **params: Any) -> Stream:
        """One request's `Stream` (nothing is sent before it is iterated). `params` are the
        sampling parameters; `chat_template_kwargs`, `add_generation_prompt` and
        `continue_final_message` apply to `messages`, as the chat route's fields."""
        if sum(x is not None for x in (prompt, prompt_token_ids, messages)) != 1:
            raise ValueError("give exactly one of prompt, prompt_token_ids, messages")
        rid = id if id is not None else f"r{next(self._ids)}"
        frame = Generate(id=rid, prompt=prompt, prompt_token_ids=prompt_token_ids,
                         messages=messages, params=params,
                         chat_template_kwargs=chat_template_kwargs,
                         add_generation_prompt=add_generation_prompt,
                         continue_final_message=continue_final_message)
        return Stream(self, rid, frame)

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> Stream:
        return self.generate(messages=messages, **params)

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Generate and return the whole result."""
        return await self.generate(prompt, **kwargs).collect()
