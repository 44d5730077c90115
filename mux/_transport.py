"""Message transports a :class:`~mux.MuxSession` can run over.

A transport moves whole binary messages. Their boundaries carry no meaning to the protocol (it is
a byte stream), so a transport may be a WebSocket, an in-memory channel or anything else that
delivers bytes in order.
"""

from __future__ import annotations

import contextlib
import math
from typing import Protocol

import trio
import trio_websocket

from ._errors import TransportClosed


class MessageTransport(Protocol):
    """What a session needs from the link under it.

    ``send_message`` and ``receive_message`` raise :class:`TransportClosed` once the link is gone.
    ``aclose`` closes the link (with a WebSocket close code where that means something); it is
    safe to call more than once and must not block for long.
    """

    async def send_message(self, data: bytes) -> None: ...

    async def receive_message(self) -> bytes: ...

    async def aclose(self, code: int = 1000, reason: str = "") -> None: ...


class WebSocketTransport:
    """A trio-websocket connection as a message transport.

    Text messages are a protocol violation: the link is closed with 4400. Callers must drain the
    connection continuously (the session's reader task does) so the library keeps answering
    WebSocket pings.
    """

    def __init__(self, connection: trio_websocket.WebSocketConnection) -> None:
        self.connection = connection
        self._closing = False

    async def send_message(self, data: bytes) -> None:
        try:
            await self.connection.send_message(data)
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None

    async def receive_message(self) -> bytes:
        try:
            message = await self.connection.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None
        if isinstance(message, str):
            await self.aclose(4400, "text message on a binary link")
            raise TransportClosed(4400, "text message on a binary link")
        return message

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code``; idempotent. Waits for the peer's close reply, bounded only by
        the caller's deadline (the session gives it ``close_timeout``)."""
        if self._closing:
            await trio.lowlevel.checkpoint()
            return
        self._closing = True
        await self.connection.aclose(code, reason or None)


def _closed(exc: trio_websocket.ConnectionClosed) -> TransportClosed:
    if exc.reason is None:
        return TransportClosed(None, "connection lost")
    return TransportClosed(exc.reason.code, exc.reason.reason or "")


class MemoryTransport:
    """One end of an in-process transport pair, for tests. See :func:`memory_transport_pair`."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes | TransportClosed],
        receive: trio.MemoryReceiveChannel[bytes | TransportClosed],
    ) -> None:
        self._send = send
        self._receive = receive
        self.closed_with: TransportClosed | None = None
        #: While set, messages are accepted and silently dropped (a link gone silent).
        self.blackhole = False

    async def send_message(self, data: bytes) -> None:
        if self.closed_with is not None:
            raise self.closed_with
        if self.blackhole:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._send.send(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportClosed(None, "peer gone") from None

    async def receive_message(self) -> bytes:
        if self.closed_with is not None:
            raise self.closed_with
        try:
            message = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportClosed(None, "peer gone") from None
        if isinstance(message, TransportClosed):
            self.closed_with = message
            raise message
        return message

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        if self.closed_with is None:
            self.closed_with = TransportClosed(code, reason)
            with contextlib.suppress(
                trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                self._send.send_nowait(TransportClosed(code, reason))
            self._send.close()
            self._receive.close()
        await trio.lowlevel.checkpoint()


def memory_transport_pair(buffer: float = math.inf) -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected in-memory transports. ``buffer`` bounds messages in flight each way."""
    a_send, b_receive = trio.open_memory_channel[bytes | TransportClosed](buffer)
    b_send, a_receive = trio.open_memory_channel[bytes | TransportClosed](buffer)
    return MemoryTransport(a_send, a_receive), MemoryTransport(b_send, b_receive)
