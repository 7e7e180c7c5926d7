"""The socket side of a /v1/ws connection (server/websocket.py has the protocol): the outbox and
its writer task, error frames, and reading with back-pressure.

Sending: each live request has one outbox entry (`LiveRequest`) that its deltas merge into until
the writer takes it; one writer task per connection drains the error queue and the outbox in FIFO
order, everything ready in one batch (one socket write) when the server offers the send-batch
extension (ws_protocol.SEND_BATCH). uvicorn's send waits while the socket's write buffer is above
its high-water mark, so a slow reader stalls only the writer, and memory stays bounded by the live
requests' own output.

Reading (`_next_message`): a client that sends and reads nothing pauses reading while
MAX_PENDING_ERRORS error frames or ws_max_requests finished requests' output wait unsent. The
socket is still received from meanwhile, so a close frame (the disconnect) ends the connection
and aborts its requests at once and uvicorn answers pings; a `cancel` is acted on at once, other
frames are held in order (ws_frames.ReadAhead: at most 64 frames / 1 MiB, then TCP pushes back)
until reading resumes.

Subclasses provide `cancel(id)` (abort a live request) and `authed` (cancels are read early only
once the connection is authenticated).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import msgspec
from uvicorn.protocols.utils import ClientDisconnected

from atom_stream.protocol import WsCancel, WsDelta, WsDone, WsError
from atom_stream.server.ws_frames import (
    DECODE_ERRORS,
    ClientFrameStruct,
    LenientFrameStruct,
    ReadAhead,
    frame_size,
)
from atom_stream.server.ws_protocol import INVALID_UTF8, SEND_BATCH

logger = logging.getLogger(__name__)
MAX_PENDING_ERRORS = 1024  # unsent error frames per connection before reading pauses
EARLY_CANCEL_BYTES = 1024  # a cancel frame acted on while reading is paused is this small


class LiveRequest:
    """One live request of a connection (also the outbox key: ids may be reused after done)."""

    __slots__ = ("cancelled", "done", "id", "logprobs", "queued", "task", "text", "token_ids")

    def __init__(self, cid: str):
        self.id = cid
        self.task: asyncio.Task | None = None
        self.cancelled = False
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list | None = None
        self.done: WsDone | WsError | None = None  # the request's last frame
        self.queued = False


class SocketIO:
    """A connection's codec, outbox, writer and paced reader. `receive` / `send`: the ASGI
    callables; `binary`: MessagePack frames (else JSON text); `cfg`: the server config
    (ws_max_requests, ws_max_frame_bytes)."""

    authed: bool

    def __init__(self, scope: Any, receive: Any, send: Any, binary: bool, cfg: Any):
        self.cfg = cfg
        self.receive = receive
        self._send = send
        self.binary = binary
        if binary:
            self.encode = msgspec.msgpack.Encoder().encode
            self.decoder = msgspec.msgpack.Decoder(ClientFrameStruct)
            self.lenient = msgspec.msgpack.Decoder(LenientFrameStruct)
            self.loose = msgspec.msgpack.Decoder()
        else:
            self.encode = msgspec.json.Encoder().encode
            self.decoder = msgspec.json.Decoder(ClientFrameStruct)
            self.lenient = msgspec.json.Decoder(LenientFrameStruct)
            self.loose = msgspec.json.Decoder()
        self.outbox: dict[LiveRequest, None] = {}  # insertion-ordered set of entries with output
        self.errors: deque[WsError] = deque()
        # set while fewer than MAX_PENDING_ERRORS error frames and fewer than ws_max_requests
        # finished requests' outputs wait for the writer: the receive loop stops reading a
        # client that sends frames without reading the replies (a finished request leaves
        # `live` at once, but its output stays queued until the stalled send takes it). Live
        # requests' output does not pause reading: ws_max_requests bounds it already, and
        # their `cancel` frames must still be read.
        self.room = asyncio.Event()
        self.room.set()
        # while reading is paused: the messages received meanwhile, and the receive in flight
        self.ahead = ReadAhead()
        self.receiving: asyncio.Future | None = None
        self.peer_gone = False  # a send found the client gone (the writer ended)
        self.unsent_final = 0  # outbox entries whose request ended (their last frame waits)
        self.wake = asyncio.Event()
        self.batch = SEND_BATCH in scope.get("extensions", {})
        self.closing = False  # the writer returns once everything queued is sent

    def cancel(self, cid: str) -> None:
        raise NotImplementedError

    async def send_frame(self, frame: Any) -> None:
        await self._send_raw(self.encode(frame))

    def error(self, rid: str | None, code: int, message: str, param: str | None = None) -> None:
        self.errors.append(WsError(rid, code, message, param if param else msgspec.UNSET))
        if len(self.errors) >= MAX_PENDING_ERRORS:
            self.room.clear()
        self.wake.set()

    def _queue(self, live: LiveRequest, final: bool = False) -> None:
        """Put `live` in the outbox (once until the writer takes it); `final`: its request
        ended (live.done is set), which counts toward the read pause."""
        if final:
            self.unsent_final += 1
            if self.unsent_final >= self.cfg.ws_max_requests:
                self.room.clear()
        if not live.queued:
            live.queued = True
            self.outbox[live] = None
            self.wake.set()

    async def _next_message(self, writer: asyncio.Task) -> Any:
        """The next ASGI message to act on. Reading pauses while MAX_PENDING_ERRORS error
        frames or ws_max_requests finished requests' output wait unsent (a client that sends
        and reads nothing). Receiving goes on while paused, into `self.ahead` (bounded; once
        full TCP pushes back on the client): a disconnect or close frame still ends the
        connection at once, uvicorn still answers pings, and a cancel frame is acted on at
        once (_cancel_early); the other frames wait there, in order, until reading resumes."""
        while True:
            if self.peer_gone:
                return {"type": "websocket.disconnect", "code": 1006}
            if self.room.is_set() or writer.done():  # not paused
                if self.ahead:
                    return self.ahead.pop()
                if self.receiving is None:
                    return await self.receive()  # the common case: nothing held or in flight
                await asyncio.wait({self.receiving})  # a cancel (auth deadline) spares it
            else:
                if self.receiving is None and not self.ahead.full():
                    self.receiving = asyncio.ensure_future(self.receive())
                await self._wait_paused(writer)
            if self.receiving is None or not self.receiving.done():
                continue
            message, self.receiving = self.receiving.result(), None
            if message["type"] != "websocket.receive":
                return message  # a disconnect, or SHUTDOWN: acted on at once
            paused = not self.room.is_set() and not writer.done()
            if not paused and not self.ahead:
                return message
            if not (paused and self._cancel_early(message)):
                self.ahead.push(message, payload(message))

    async def _wait_paused(self, writer: asyncio.Task) -> None:
        """Until the receive in flight (if any) has a message, or room, or the writer ended.
        Never cancels the receive: a later call takes its message."""
        room = asyncio.ensure_future(self.room.wait())
        waits = {room, writer} if self.receiving is None else {room, writer, self.receiving}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            room.cancel()

    def _cancel_early(self, message: dict) -> bool:
        """Act on a small, valid `cancel` frame received while reading is paused: it adds no
        output beyond the live requests' own, and it overtakes no held frame that may start
        its id (ReadAhead.may_overtake). False (the frame is held) for anything else."""
        data = payload(message)
        if (data is None or not self.authed or message.get(INVALID_UTF8)
                or isinstance(data, bytes) != self.binary
                or frame_size(data) > min(EARLY_CANCEL_BYTES, self.cfg.ws_max_frame_bytes)):
            return False
        try:
            frame = self.decoder.decode(data)
        except DECODE_ERRORS:
            return False
        if not isinstance(frame, WsCancel) or not self.ahead.may_overtake(frame.id):
            return False
        self.cancel(frame.id)
        return True

    async def writer(self) -> None:
        try:
            await self._write_loop()
        except ClientDisconnected:
            # the receive loop ends at once (_next_message), aborting every request
            self.peer_gone = True
        except Exception:  # a bug must not leave a silent, half-dead connection
            logger.exception("websocket writer failed; closing the connection")
            with contextlib.suppress(Exception):
                await self._send({"type": "websocket.close", "code": 1011})

    async def _write_loop(self) -> None:
        """Drain errors and pending entries; everything ready goes out in one batch (one
        socket write) when the server offers the send-batch extension."""
        outbox, errors, encode = self.outbox, self.errors, self.encode
        batch = self.batch
        while True:
            if self.closing and not outbox and not errors:
                return  # every queued frame is sent (_flush)
            await self.wake.wait()
            self.wake.clear()
            while outbox or errors:
                frames: list[bytes] = [encode(e) for e in errors]
                errors.clear()
                while outbox:
                    live = next(iter(outbox))
                    del outbox[live]
                    live.queued = False
                    text, ids, lps, done = live.text, live.token_ids, live.logprobs, live.done
                    if ids or text:
                        live.text, live.token_ids = [], []
                        if lps is not None:
                            live.logprobs = []
                        frames.append(encode(WsDelta(
                            live.id, text[0] if len(text) == 1 else "".join(text), ids,
                            msgspec.UNSET if lps is None else lps)))
                    if done is not None:
                        live.done = None
                        frames.append(encode(done))
                self.unsent_final = 0
                self.room.set()  # both queues are empty: the frames are in this batch
                if batch:
                    await self._send({"type": SEND_BATCH, "frames": frames,
                                      "binary": self.binary})
                else:
                    for data in frames:
                        await self._send_raw(data)

    async def _send_raw(self, data: bytes) -> None:
        if self.binary:
            await self._send({"type": "websocket.send", "bytes": data})
        else:
            await self._send({"type": "websocket.send", "text": data.decode()})

    async def _close(self, writer: asyncio.Task, code: int, reason: str = "") -> None:
        """Send every queued frame (for at most 2 s: a client that reads nothing must not hold
        the socket open), then the close frame."""
        try:
            await self._flush(writer, 2.0)
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception:  # noqa: BLE001 - the peer is gone already
            writer.cancel()

    async def _flush(self, writer: asyncio.Task, timeout: float) -> None:
        """Let the writer send everything queued and return (a frame taken from the outbox
        is on the wire only once its send returned, so the writer is not cancelled mid-send
        unless `timeout` runs out first: a peer that reads nothing)."""
        self.closing = True
        self.wake.set()
        if not writer.done():
            await asyncio.wait({writer}, timeout=timeout)
        writer.cancel()


def payload(message: dict) -> bytes | str | None:
    """A websocket.receive message's frame: bytes, or text, or None."""
    data = message.get("bytes")
    return message.get("text") if data is None else data
