"""/v1/ws: the native WebSocket protocol (DESIGN.md), many requests multiplexed on one socket.

Subprotocols: `atom-stream.v1.json` (text frames) and `atom-stream.v1.msgpack` (binary frames);
the first of the client's offers that is one of them is chosen. A client that offers none is
accepted and speaks JSON (the handshake then names no subprotocol); one that offers only others
is refused at the handshake (HTTP 403). Frames (protocol.py):

    client -> server  {"type":"generate","id",prompt|prompt_token_ids|messages,"params":{...}}
                      {"type":"cancel","id"}   {"type":"auth","api_key"}
    server -> client  {"type":"delta","id","text","token_ids"[,"logprobs"]}
                      {"type":"done","id","finish_reason","usage":{..}[,"stop_reason"]}
                      {"type":"error","id"|null,"code","message"[,"param"]}

A `messages` frame may carry the chat route's `chat_template_kwargs`, `add_generation_prompt`
and `continue_final_message` beside `params`; its list-of-parts contents are read as the chat
route reads them (engine/prompts.resolve_content_format).
`params` are read as the OpenAI routes read the same fields (`sampling_kwargs`): null means the
default, and the checkpoint's generation_config.json defaults fill what the frame leaves out.

Per request a task drives `engine.generate()` and merges its deltas into the connection's outbox
(one pending entry per live request). One writer task per connection drains the outbox in FIFO
order. uvicorn's send waits while the socket's write buffer is above its high-water mark, so a slow
reader stalls only the writer: deltas keep merging into the pending entries (a slow client gets
fewer, larger delta frames) and memory stays bounded by the live requests' own output (at most
`--ws-max-requests` per connection).

Errors never kill the connection: a malformed, unknown or oversized frame, a sampling parameter at
the top level (they go under "params"; other unknown top-level fields are ignored), a duplicate
live id, an invalid parameter or an engine refusal gets an `error` frame (`code` is the HTTP status
the same problem gets over HTTP; 429/503 for overload; a `max_tokens` that does not fit the context
left after the prompt is a 400 naming `params.max_tokens`, as over HTTP) and everything else goes
on. An oversized frame's error carries the id found in the frame's head (`sniff_id`), else null.
`cancel` aborts the request in the engine; its stream ends with `done` (finish_reason "abort").
Closing the socket cancels every request task, which aborts the requests and frees their KV
blocks.

Auth: with `--api-key`, either the handshake carried a valid `Authorization` header (checked by
the middleware) or the first frame must be `auth`; frames before it get 401 error frames, a wrong
key gets a 401 error frame and close code 1008, and no auth within `auth_timeout_s` of the
handshake closes (1008); frames sent before `auth` do not restart that clock.
uvicorn sends keepalive pings (`--ws-ping-interval`); a peer that misses the pong while its
socket's buffers are full is dropped (ws_protocol), which aborts its requests.

A client that sends and reads nothing: reading pauses, a close or cancel is still acted on at
once (server/ws_io.py, which holds the outbox, the writer and the paced reader). A text frame that
is not valid UTF-8 is a malformed frame (400 error frame, the connection goes on), not uvicorn's
close 1007.

Shutdown (SIGTERM/SIGINT): the socket is drained as an SSE stream is (app.py). uvicorn's
shutdown hook (ws_protocol.BatchingWebSocketProtocol.shutdown) hands the app a `SHUTDOWN`
message instead of closing the socket with 1012 at once. From then on a `generate` frame gets a
503 error frame ("server shutting down", the status the engine's refusal gets over HTTP while it
drains); the live requests stream on until they finish, or until the deadline abort
(shutdown_abort_delay: a little before `--shutdown-timeout`; app.py's abort_all and the drain's
own abort) ends each with an `error` frame, code 503, "the request was aborted (server shutting
down)": the SSE path's equivalent is an error event, and a `done` frame with finish_reason
"abort" is what a client's own `cancel` gets (still so while draining). Once the last live
request has its last frame on the wire, the server closes the socket with code 1001 (going
away; at once for a socket with no live request). 1001 is RFC 6455's code for "a server going
down" and one of the two codes websockets clients report as a normal closure
(ConnectionClosedOK: `async for` over the socket just ends); uvicorn's 1012 (IANA's "service
restart") raises ConnectionClosedError, right for a socket cut mid-stream, wrong after a
complete drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

import msgspec

from atom_stream.engine.prompts import resolve_chat_options, resolve_content_format
from atom_stream.protocol import (
    WS_JSON,
    WS_MSGPACK,
    WS_SUBPROTOCOLS,
    ClientFrame,
    WsAuth,
    WsCancel,
    WsDone,
    WsError,
    WsGenerate,
    WsUsage,
    validation_param,
)
from atom_stream.sampling_params import SamplingParams
from atom_stream.server.auth import AUTH_SCOPE_KEY
from atom_stream.server.openai import messages_to_dicts
from atom_stream.server.responses import HTTPError
from atom_stream.server.ws_frames import (
    DECODE_ERRORS,
    MAX_ID_LEN,
    PARAM_NAMES,
    PROMPT_FIELDS,
    SAMPLING_NAMES,
    UNKNOWN_FIELD,
    frame_param,
    frame_size,
    sampling_kwargs,
    sniff_id,
)
from atom_stream.server.ws_io import LiveRequest, SocketIO, payload
from atom_stream.server.ws_protocol import (
    INVALID_UTF8,
    SHUTDOWN,
    shutdown_abort_delay,
)

logger = logging.getLogger(__name__)
_conn_counter = itertools.count()


class _Connection(SocketIO):
    """One accepted /v1/ws socket: the receive loop (run), one writer task, one task per live
    request, and at shutdown one drain task (_drain_then_close)."""

    def __init__(self, state: Any, scope: Any, receive: Any, send: Any, binary: bool):
        self.state = state
        self.engine = state.engine
        # the checkpoint's generation_config.json sampling defaults (as over HTTP)
        self.defaults: dict[str, Any] = getattr(state, "default_sampling", None) or {}
        super().__init__(scope, receive, send, binary, state.config)
        self.prefix = f"ws{next(_conn_counter)}-"
        self.live: dict[str, LiveRequest] = {}
        self.authed = scope.get(AUTH_SCOPE_KEY) != "pending"
        self.closed = False
        self.close_code: int | None = None
        self.draining = False  # the server is shutting down (the SHUTDOWN message came)
        self._drainer: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        drain = scope.get("extensions", {}).get(SHUTDOWN)
        if drain is not None:
            drain["drains"] = True  # the protocol then sends SHUTDOWN instead of closing

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ sending
    def refused(self, data: bytes | str, e: Exception) -> ClientFrame | None:
        """The strict decoder refused `data`: send its error frame and return None, or return
        the frame when its only fault is top-level fields that are not sampling parameters
        (ignored, as OpenAI servers ignore unknown request fields). A sampling parameter next to
        the prompt instead of under "params" is an error naming it."""
        raw = None
        with contextlib.suppress(Exception):  # not decodable at all: no id to report
            raw = self.loose.decode(data)
        rid = raw.get("id") if isinstance(raw, dict) else None
        rid = rid if isinstance(rid, str) else None
        if isinstance(e, msgspec.ValidationError) and UNKNOWN_FIELD.search(str(e)):
            misplaced = sorted(set(raw) & SAMPLING_NAMES) if isinstance(raw, dict) else []
            if misplaced:
                self.error(rid, 400, f"unknown field {misplaced[0]!r} in the frame (sampling "
                           "parameters go under \"params\")", misplaced[0])
                return None
            try:
                return self.lenient.decode(data)
            except DECODE_ERRORS as e2:
                e = e2
        param = validation_param(e) if isinstance(e, msgspec.ValidationError) else None
        self.error(rid, 400, f"malformed frame: {e}", param)
        return None

    # ------------------------------------------------------------------ requests
    async def run_request(self, live: LiveRequest, prompt: Any, params: SamplingParams,
                          template_kwargs: dict | None, prompt_field: str = "prompt",
                          chat_options: dict | None = None) -> None:
        engine = self.engine
        rid = self.prefix + live.id
        metrics = self.state.metrics
        metrics.ws_streams.inc()
        try:
            # strict_max_tokens: a max_tokens past the context left is a 400 error frame, as the
            # same request gets over HTTP (the docstring's "code" rule), never a silent cap
            gen = engine.generate(prompt, params, rid, chat_template_kwargs=template_kwargs,
                                  strict_max_tokens=True, **(chat_options or {}))
            try:
                async for out in gen:
                    if live.cancelled and out.finish_reason is None:
                        await engine.abort(rid)  # the stream ends with an "abort" delta
                    if out.token_ids:
                        live.token_ids.extend(out.token_ids)
                        if out.engine_logprobs is not None:  # the engine form
                            if live.logprobs is None:
                                live.logprobs = []
                            live.logprobs.extend(out.engine_logprobs)
                    if out.text:
                        live.text.append(out.text)
                    if (out.finish_reason == "abort" and self.draining
                            and not live.cancelled):
                        # the shutdown deadline's abort_all: as the SSE path's error event
                        live.done = WsError(live.id, 503, "the request was aborted (server "
                                            "shutting down)")
                    elif out.finish_reason is not None:
                        u = out.usage
                        usage = (WsUsage(u.prompt_tokens, u.completion_tokens, u.total_tokens)
                                 if u is not None else WsUsage(0, 0, 0))
                        live.done = WsDone(live.id, out.finish_reason, usage,
                                           out.stop_reason if out.stop_reason is not None
                                           else msgspec.UNSET)
                    self._queue(live, out.finish_reason is not None)
            finally:
                await gen.aclose()  # aborts in the engine if unfinished
        except asyncio.CancelledError:
            if self.closed:
                metrics.ws_disconnects.inc()
            raise
        except Exception as e:  # noqa: BLE001 - reported to this request only
            err = HTTPError.from_exception(e)
            # after any delta still pending for this id, in place of its done frame
            live.done = WsError(live.id, err.status, err.message,
                                frame_param(err.param, prompt_field) or msgspec.UNSET)
            self._queue(live, True)
        finally:
            metrics.ws_streams.dec()
            if self.live.get(live.id) is live:
                del self.live[live.id]

    def on_generate(self, frame: WsGenerate) -> None:
        cid = frame.id
        if not cid or len(cid) > MAX_ID_LEN:
            self.error(cid or None, 400, f"id must be a non-empty string of at most "
                       f"{MAX_ID_LEN} characters", "id")
            return
        if self.draining:
            self.error(cid, 503, "server shutting down: no new requests are accepted")
            return
        if cid in self.live:
            self.error(cid, 400, f"duplicate id: request {cid!r} is still live on this "
                       "connection (it goes on)", "id")
            return
        if len(self.live) >= self.cfg.ws_max_requests:
            self.error(cid, 429, f"too many live requests on this connection "
                       f"(limit {self.cfg.ws_max_requests})")
            return
        given = [f for f in PROMPT_FIELDS if getattr(frame, f) is not None]
        if len(given) != 1:
            self.error(cid, 400, "give exactly one of prompt, prompt_token_ids, messages",
                       "prompt")
            return
        field = given[0]
        try:
            given_params = frame.params or {}  # "params": null is the defaults, as omitted
            if "prompt_logprobs" in given_params:
                raise HTTPError(400, "prompt_logprobs is not served over the WebSocket (no "
                                "frame carries them): use /v1/completions with echo",
                                "params.prompt_logprobs")
            unknown = sorted(set(given_params) - PARAM_NAMES)
            if unknown:
                raise HTTPError(400, f"unknown parameter {unknown[0]!r}", f"params.{unknown[0]}")
            kw = sampling_kwargs(given_params, self.defaults)
            if kw.get("n", 1) != 1:  # n=1 (what OpenAI-style clients send) is accepted
                raise HTTPError(400, "n: one choice per request over the WebSocket (send one "
                                "generate frame per choice)", "params.n")
            params = SamplingParams(**kw)
            prompt: Any = getattr(frame, field)
            kwargs = frame.chat_template_kwargs
            options = {}
            if field == "messages":
                prompt = messages_to_dicts(prompt, content_format=resolve_content_format(
                    getattr(self.engine, "tokenizer", None),
                    self.cfg.chat_template_content_format))
                if self.cfg.default_chat_template_kwargs:
                    kwargs = {**self.cfg.default_chat_template_kwargs, **(kwargs or {})}
                # as the chat route: both options true is a 400 before any work
                resolve_chat_options(kwargs, frame.add_generation_prompt,
                                     frame.continue_final_message)
                options = {"add_generation_prompt": frame.add_generation_prompt,
                           "continue_final_message": frame.continue_final_message}
        except Exception as e:  # noqa: BLE001
            err = HTTPError.from_exception(e)
            self.error(cid, err.status, err.message, frame_param(err.param, field))
            return
        live = self.live[cid] = LiveRequest(cid)
        live.task = asyncio.get_running_loop().create_task(
            self.run_request(live, prompt, params, kwargs, field, options))

    def on_frame(self, data: bytes | str) -> None:
        size = frame_size(data)  # in bytes: a text frame's UTF-8 size, not its length
        if size > self.cfg.ws_max_frame_bytes:
            self.error(sniff_id(data), 413, f"frame of {size} bytes exceeds the limit of "
                       f"{self.cfg.ws_max_frame_bytes} bytes")
            return
        if self.binary and isinstance(data, str):
            self.error(None, 400, "this connection speaks atom-stream.v1.msgpack: send binary "
                       "MessagePack frames")
            return
        if not self.binary and isinstance(data, bytes):
            self.error(None, 400, "this connection speaks atom-stream.v1.json: send text JSON "
                       "frames")
            return
        try:
            frame = self.decoder.decode(data)
        # RecursionError: a deeply nested frame (issue 10 fuzzing) must be an error frame too;
        # UnicodeDecodeError: a MessagePack string that is not UTF-8 (msgspec raises it bare)
        except DECODE_ERRORS as e:
            frame = self.refused(data, e)
            if frame is None:
                return
        if isinstance(frame, WsAuth):
            checker = self.state.key_checker
            if checker and not checker.check(frame.api_key):
                self.error(None, 401, "invalid API key")
                self.close_code = 1008
                return
            self.authed = True
            return
        if not self.authed:
            self.error(getattr(frame, "id", None), 401,
                       "unauthorized: send {\"type\": \"auth\", \"api_key\": ...} first")
            return
        if isinstance(frame, WsCancel):
            self.cancel(frame.id)
            return
        self.on_generate(frame)

    def cancel(self, cid: str) -> None:
        """Abort live request `cid` (an unknown or finished id is ignored): its stream then
        ends with a "done" frame, finish_reason "abort"; a request not yet in the engine is
        aborted at its first delta (run_request)."""
        live = self.live.get(cid)
        if live is not None and not live.cancelled:
            live.cancelled = True
            self._spawn(self.engine.abort(self.prefix + live.id))

    # ------------------------------------------------------------------ the connection
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        writer = loop.create_task(self.writer())
        metrics = self.state.metrics
        metrics.ws_connections.inc()
        # the auth deadline runs from the handshake: frames before `auth` do not restart it
        deadline = loop.time() + self.cfg.ws_auth_timeout_s
        try:
            while self.close_code is None:
                timeout = None if self.authed else max(0.0, deadline - loop.time())
                try:
                    message = await asyncio.wait_for(self._next_message(writer), timeout)
                except TimeoutError:
                    self.error(None, 401, "no auth frame received in time")
                    self.close_code = 1008
                    break
                if message["type"] == "websocket.disconnect":
                    break
                if message["type"] == SHUTDOWN:
                    self.begin_drain(writer)
                    continue
                data = payload(message)
                if message.get(INVALID_UTF8):  # ws_protocol: a text frame that is not UTF-8
                    self.error(sniff_id(data), 400, "malformed frame: text that is not UTF-8")
                elif data is not None:
                    self.on_frame(data)
        finally:
            self.closed = True
            if self.receiving is not None:
                self.receiving.cancel()  # uvicorn's receive is a queue get: safe to cancel
            tasks = [lv.task for lv in self.live.values() if lv.task is not None]
            for t in tasks:
                t.cancel()  # closing the socket aborts every request of the connection
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            metrics.ws_connections.dec()
            if self._drainer is not None:
                self._drainer.cancel()  # the peer left first (done, if it sent the close)
            if self.close_code is None:
                writer.cancel()
        if self.close_code is not None:  # flush the error frame, then close
            await self._close(writer, self.close_code)

    def begin_drain(self, writer: asyncio.Task) -> None:
        """The server is shutting down: refuse new requests (on_generate), let the live ones
        finish (or be aborted at the deadline), then close with 1001 (_drain_then_close)."""
        if not self.draining:
            self.draining = True
            self._drainer = self._spawn(self._drain_then_close(writer))

    async def _drain_then_close(self, writer: asyncio.Task) -> None:
        """Wait for every live request (none start while draining), send what they left
        queued, close with 1001. uvicorn then queues the disconnect that ends run(). Requests
        still live at shutdown_abort_delay() are aborted here (each ends with its 503 error
        frame), as app.py's deadline abort does engine-wide: a server started without it
        (uvicorn_config alone) drains the same way before uvicorn cancels the tasks."""
        grace = float(self.cfg.shutdown_timeout)
        delay = shutdown_abort_delay(grace)
        tasks = [lv.task for lv in self.live.values() if lv.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=delay)
            if pending:
                await self.engine.abort([self.prefix + cid for cid in self.live])
                await asyncio.wait(pending, timeout=(grace - delay) / 2)
        await self._close(writer, 1001, "server shutting down")

class WebSocketEndpoint:
    """The raw ASGI app mounted at /v1/ws."""

    def __init__(self, state: Any):
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        offered = list(scope.get("subprotocols") or ())
        chosen = next((p for p in offered if p in WS_SUBPROTOCOLS), None)
        if offered and chosen is None:
            self.state.metrics.request("/v1/ws", 403)
            await send({"type": "websocket.close", "code": 1002})
            return
        if self.state.engine is None or self.state.engine.is_dead:
            self.state.metrics.request("/v1/ws", 503)
            await send({"type": "websocket.close", "code": 1013})
            return
        self.state.metrics.request("/v1/ws", 101)
        await send({"type": "websocket.accept", "subprotocol": chosen})
        conn = _Connection(self.state, scope, receive, send, binary=(chosen == WS_MSGPACK))
        await conn.run()


__all__ = ["WS_JSON", "WS_MSGPACK", "WebSocketEndpoint"]
