"""The uvicorn side of `/v1/ws` (server/websocket.py is the app side): the WebSocket protocol
class the server runs (`BatchingWebSocketProtocol`, uvicorn's sans-I/O one plus two ASGI
extensions: one transport write per batch of frames, and a graceful shutdown that lets the app
drain its live requests), and the shutdown deadline shared with the HTTP side
(`shutdown_abort_delay`)."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

SEND_BATCH = "atom_stream.websocket.send_batch"
# ASGI extension and receive-message type: the server is shutting down (see the module docstring)
SHUTDOWN = "atom_stream.websocket.shutdown"


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
    uvicorn does."""

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


__all__ = ["SEND_BATCH", "SHUTDOWN", "BatchingWebSocketProtocol", "shutdown_abort_delay"]
