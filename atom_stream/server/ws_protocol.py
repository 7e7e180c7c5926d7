"""The uvicorn side of `/v1/ws` (server/websocket.py is the app side): the WebSocket protocol
class the server runs (`BatchingWebSocketProtocol`, uvicorn's sans-I/O one plus two ASGI
extensions: one transport write per batch of frames, and a graceful shutdown that lets the app
drain its live requests; a text message that is not UTF-8 reaches the app flagged
(`INVALID_UTF8`) instead of failing the connection; a peer that fails the keepalive is
dropped), and the shutdown deadline shared with the HTTP side
(`shutdown_abort_delay`)."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

SEND_BATCH = "atom_stream.websocket.send_batch"
# ASGI extension and receive-message type: the server is shutting down (see the module docstring)
SHUTDOWN = "atom_stream.websocket.shutdown"
# key of a websocket.receive message whose text frame is not valid UTF-8 (its raw "bytes" given)
INVALID_UTF8 = "atom_stream.websocket.invalid_utf8"


def shutdown_abort_delay(shutdown_timeout: float) -> float:
    """Seconds after a shutdown begins at which live requests are aborted: a little before
    `shutdown_timeout` (uvicorn then cancels the handlers), so every stream gets its last frame
    and the socket its close frame first."""
    # the margin: the last frames must reach the sockets before uvicorn's own deadline even on
    # a loaded host (0.75 s at a 3 s timeout was seen to be too little once in 15 runs)
    return max(0.0, shutdown_timeout - min(2.0, shutdown_timeout / 3))


class BatchingWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol plus one ASGI extension, `SEND_BATCH`:
    `{"type": SEND_BATCH, "frames": [bytes, ...], "binary": bool}` sends every payload as its
    own WebSocket message (text frames for JSON) with ONE transport write. All the deltas of an
    engine step for one connection then cost one syscall instead of one per request; the wire
    format is unchanged. Flow control is uvicorn's.

    A second extension, `SHUTDOWN`, makes the server's shutdown graceful: an app that sets
    `scope["extensions"][SHUTDOWN]["drains"] = True` receives `{"type": SHUTDOWN}` when uvicorn
    begins shutting down, and closes the socket itself once its work is done (uvicorn cancels
    the app at `timeout_graceful_shutdown`); any other socket is closed at once with 1012, as
    uvicorn does.

    A text message that is not valid UTF-8 is handed to the app as
    `{"type": "websocket.receive", "bytes": raw, INVALID_UTF8: True}` (send_receive_event_to_app).
    A peer that does not answer a keepalive ping in time is dropped (`keepalive_timeout`)."""

    # seconds a connection failed by the keepalive gets to send its close frame before the
    # transport is aborted
    KEEPALIVE_ABORT_S = 2.0

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if hasattr(self, "scope"):  # a refused handshake has no scope (and no app task)
            # the app task has not started yet
            self.scope["extensions"][SEND_BATCH] = {}
            self.scope["extensions"][SHUTDOWN] = {}

    def shutdown(self) -> None:
        """uvicorn's Server.shutdown calls this on every connection. A socket whose app drains
        is told so through its receive queue (after the frames already queued) and stays open;
        keepalive pings go on, so a dead peer is still noticed."""
        scope = getattr(self, "scope", None)
        drains = scope is not None and scope["extensions"].get(SHUTDOWN, {}).get("drains")
        if (drains and self.handshake_complete and not self.close_sent and not self.disconnected
                and self.initial_response is None and not self.transport.is_closing()):
            self.queue.put_nowait({"type": SHUTDOWN})
            return
        super().shutdown()

    def send_receive_event_to_app(self) -> None:
        """uvicorn fails the connection on a text message that is not valid UTF-8 (close 1007,
        an ERROR log with a traceback per such frame), which ends every request of the socket;
        /v1/ws answers it as any malformed frame (an error frame; the connection goes on, as
        for a MessagePack string that is not UTF-8), so it is handed over flagged. Text is
        checked only when it is not ASCII (uvicorn then decodes it again)."""
        if self.curr_msg_data_type == "text" and not self.close_sent:
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            if not data.isascii():
                try:
                    data.decode()
                except UnicodeDecodeError:
                    self.frames = []
                    self.queue.put_nowait({"type": "websocket.receive", "bytes": bytes(data),
                                           INVALID_UTF8: True})
                    if not self.read_paused:
                        self.read_paused = True
                        self.transport.pause_reading()
                    return
        super().send_receive_event_to_app()

    def keepalive_timeout(self) -> None:
        """uvicorn fails the connection (close 1011) and closes the transport, but a close
        waits for the write buffer to drain: for a peer that reads nothing (the very peer that
        misses pongs) never, and the app is told nothing, so its requests ran on and the socket
        stayed open. The transport is aborted KEEPALIVE_ABORT_S later if still open;
        connection_lost then gives the app its disconnect (which aborts the requests)."""
        super().keepalive_timeout()
        self.loop.call_later(self.KEEPALIVE_ABORT_S, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.disconnected:
            self.transport.abort()

    async def send(self, message: Any) -> None:
        if message["type"] != SEND_BATCH:
            await super().send(message)
            if message["type"] == "websocket.http.response.body" and not message.get(
                    "more_body"):
                # a refused handshake (401) is finished: uvicorn would otherwise log "ASGI
                # callable returned without completing handshake" at ERROR for every one
                self.handshake_complete = True
            return
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        if not self.handshake_complete or self.close_sent or self.initial_response:
            raise RuntimeError(f"{SEND_BATCH} before accept or after close")
        put = self.conn.send_binary if message["binary"] else self.conn.send_text
        try:
            for data in message["frames"]:
                put(data)
        except InvalidState:
            raise ClientDisconnected() from None
        self.transport.write(b"".join(self.conn.data_to_send()))


__all__ = ["INVALID_UTF8", "SEND_BATCH", "SHUTDOWN", "BatchingWebSocketProtocol",
           "shutdown_abort_delay"]
