"""Loopback servers for tests: :class:`LoopbackUrls`, where a server on 127.0.0.1 is reached,
and :class:`LoopbackServer`, a TCP server base whose connections each go to one handler."""

from __future__ import annotations

from typing import Protocol, Self

import trio

Address = tuple[str, int]

LOOPBACK = "127.0.0.1"


class _Listening(Protocol):
    @property
    def port(self) -> int: ...


class LoopbackUrls:
    """``address``, ``url`` and ``ws_url`` of a server listening on 127.0.0.1 at ``port``
    (an attribute or a property of the class this is mixed into)."""

    @property
    def address(self: _Listening) -> Address:
        return (LOOPBACK, self.port)

    @property
    def url(self: _Listening) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self: _Listening) -> str:
        return f"ws://{LOOPBACK}:{self.port}"


class LoopbackServer(LoopbackUrls):
    """Listens on 127.0.0.1 at a port the system picks and runs :meth:`_handle` for every
    accepted connection, each in its own task.

    Start it with ``await nursery.start(server.serve)``: it returns the server once it listens
    (``port`` is set by then); every connection ends with that nursery. Subclasses implement
    :meth:`_handle`, which owns the stream it is given.
    """

    def __init__(self) -> None:
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[Self] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def _handle(self, stream: trio.SocketStream) -> None:
        raise NotImplementedError
