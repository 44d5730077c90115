"""An accepted ASGI WebSocket (hypercorn) as a :class:`mux.MessageTransport`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from mux import TransportClosed
from protocol import CloseCode

#: What a close without a status code is reported as (RFC 6455's 1005, "no status received":
#: a code the far end never sends, so :class:`protocol.CloseCode` does not name it).
NO_STATUS_RECEIVED = 1005

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class AsgiWebSocketTransport:
    """Binary messages over an ASGI WebSocket connection that has been accepted.

    hypercorn ignores sends after the client went away, so the end is seen on the receive side
    (``websocket.disconnect``); after that every call raises :class:`TransportClosed`.
    """

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed: TransportClosed | None = None

    async def send_message(self, data: bytes) -> None:
        if self._closed is not None:
            raise self._closed
        await self._send({"type": "websocket.send", "bytes": data})

    async def receive_message(self) -> bytes:
        if self._closed is not None:
            raise self._closed
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            data = message.get("bytes")
            if data is None:
                await self.aclose(CloseCode.PROTOCOL_ERROR, "text message on a binary link")
                raise TransportClosed(CloseCode.PROTOCOL_ERROR, "text message on a binary link")
            return bytes(data)
        code = int(message.get("code", NO_STATUS_RECEIVED))
        self._closed = TransportClosed(code, "daemon disconnected")
        raise self._closed

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self._closed is None:
            self._closed = TransportClosed(code, reason)
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
