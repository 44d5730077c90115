"""A trio-websocket client for tests, on a stream the helper owns and closes.

trio-websocket 0.12's own client leaves its socket open when the server starts the close,
which pytest reports as an unclosed socket; this helper closes it itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

Address = tuple[str, int]
#: The streams trio-websocket's client runs on.
ClientStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]

#: Seconds a test WebSocket gets for its closing handshake.
WS_CLOSE_TIMEOUT = 2.0
#: trio-websocket's own defaults (messages buffered before its reader waits; largest message).
DEFAULT_MESSAGE_QUEUE = 1
DEFAULT_MAX_MESSAGE = 1024 * 1024


@asynccontextmanager
async def open_client_websocket(
    to: Address | ClientStream,
    path: str,
    *,
    host: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
    message_queue_size: int = DEFAULT_MESSAGE_QUEUE,
    max_message_size: int = DEFAULT_MAX_MESSAGE,
    close_timeout: float = WS_CLOSE_TIMEOUT,
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client handshake for ``path``, with extra request ``headers``.

    ``to`` is either an address, dialled over a new TCP connection (``host:port`` is the Host
    header unless ``host`` is given; OSError if the dial fails), or an open stream (TCP or
    TLS), which then needs ``host``; ValueError if it is missing.

    On exit the WebSocket is closed (shielded, at most ``close_timeout`` seconds), its reader
    task cancelled and the stream closed, a stream passed in included. A refused upgrade
    surfaces as ``trio_websocket.ConnectionRejected`` inside an ExceptionGroup, as
    trio-websocket raises it from its reader task.
    """
    if isinstance(to, tuple):
        host = f"{to[0]}:{to[1]}" if host is None else host
        stream: ClientStream = await trio.open_tcp_stream(*to)
    elif host is None:
        raise ValueError("a WebSocket over a given stream needs its host")
    else:
        stream = to
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery,
            stream,
            host,
            path,
            extra_headers=list(headers),
            message_queue_size=message_queue_size,
            max_message_size=max_message_size,
        )
        try:
            yield ws
        finally:
            with trio.move_on_after(close_timeout) as scope:
                scope.shield = True
                await ws.aclose()
            nursery.cancel_scope.cancel()
