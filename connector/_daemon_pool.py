"""Kept-alive TCP connections from the connector to the local daemon.

Opening a connection per tunneled request costs both ends (the connect, and the daemon setting
up and tearing down a connection). Plain requests whose end the connector can see (see
:mod:`connector._framing`) return their connection here afterwards, to carry the next one.
"""

from __future__ import annotations

import select
from collections.abc import Callable

import attrs
import trio

#: Idle connections kept at most; more are closed on release.
DEFAULT_MAX_IDLE = 32
#: Seconds an idle connection is kept. Well under the daemon's own keep-alive timeout (hypercorn
#: closes idle connections after 5 s), so a pooled connection is not closed under a request.
DEFAULT_IDLE_SECONDS = 2.0


@attrs.define(eq=False)
class _Idle:
    connection: trio.SocketStream
    since: float


class DaemonPool:
    """Connections to ``host:port``, reused last-in first-out.

    :meth:`connect` returns ``(connection, reused)``; the caller gives the connection back with
    :meth:`release` when it ended cleanly between two messages, or closes it otherwise.
    :meth:`aclose` closes the idle ones (in-use connections stay with their users).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int = DEFAULT_MAX_IDLE,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if max_idle < 0:
            raise ValueError(f"max_idle must be >= 0, not {max_idle}")
        if not idle_seconds > 0:  # NaN included
            raise ValueError(f"idle_seconds must be > 0, not {idle_seconds}")
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._idle: list[_Idle] = []
        self._closed = False
        #: Connections opened, and requests served on a kept connection (for tests and metrics).
        self.opened = 0
        self.reused = 0

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def connect(self) -> tuple[trio.SocketStream, bool]:
        """A connection to the daemon: a kept one if a fresh-enough one is idle, else a new
        one. Raises :class:`OSError` if the daemon cannot be reached."""
        # Cancellation is checked before an idle connection leaves the list, never after:
        # a connection popped and then cancelled would belong to nobody.
        await trio.lowlevel.checkpoint_if_cancelled()
        now = self._clock()
        while self._idle:
            idle = self._idle.pop()
            if now - idle.since < self.idle_seconds and _quiet(idle.connection):
                self.reused += 1
                await trio.lowlevel.cancel_shielded_checkpoint()
                return idle.connection, True
            close_now(idle.connection)
        return await self.fresh(), False

    async def fresh(self) -> trio.SocketStream:
        """A new connection to the daemon. Raises :class:`OSError` if it cannot be reached."""
        connection = await trio.open_tcp_stream(self.host, self.port)
        self.opened += 1
        return connection

    def release(self, connection: trio.SocketStream) -> None:
        """Keep ``connection`` for the next request (it must sit between two messages)."""
        now = self._clock()
        self._expire(now)
        if self._closed or not self.max_idle:
            close_now(connection)
            return
        if len(self._idle) >= self.max_idle:
            # Full: the oldest goes (it would expire first), the fresh one stays.
            close_now(self._idle.pop(0).connection)
        self._idle.append(_Idle(connection, now))

    def _expire(self, now: float) -> None:
        # The oldest sit at the front.
        idle = self._idle
        expired = 0
        while expired < len(idle) and now - idle[expired].since >= self.idle_seconds:
            close_now(idle[expired].connection)
            expired += 1
        del idle[:expired]

    def close_idle(self) -> None:
        """Close every idle connection and keep none from now on."""
        self._closed = True
        idle, self._idle = self._idle, []
        for entry in idle:
            close_now(entry.connection)

    async def aclose(self) -> None:
        self.close_idle()
        await trio.lowlevel.checkpoint()


#: Poll events that mean an idle connection is no longer clean: the daemon closed it, or sent
#: something between two messages.
_NOT_QUIET = select.POLLIN | select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


def _quiet(connection: trio.SocketStream) -> bool:
    """Whether an idle connection has nothing to read (no end of file, no stray bytes). A
    server may close a kept connection whenever it likes; catching that here, before a request
    is written to it, saves a failed or repeated request."""
    poller = select.poll()
    poller.register(connection.socket.fileno(), _NOT_QUIET)
    return not poller.poll(0)


def close_now(connection: trio.SocketStream) -> None:
    """Close a connection to the daemon at once (no waiting, so callers can stay sync)."""
    connection.socket.close()
