"""A loopback TCP proxy that can fail like a network path does."""

from __future__ import annotations

import trio

from .listener import Address, LoopbackServer

#: Bytes the proxy reads from a socket at a time.
PROXY_READ_SIZE = 64 * 1024


class _ProxiedConnection:
    """One client connection through the proxy."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        #: Set once the connection saw a black hole: it never forwards again, as a TCP
        #: connection whose path broke does not come back when the route does.
        self.dead = False


class TcpProxy(LoopbackServer):
    """Forwards each accepted connection to ``target`` on a fresh upstream connection.

    - :meth:`blackhole`: from now on nothing is forwarded in either direction, but every socket
      stays open and is still read (and the bytes dropped), so neither end sees an error: a
      half-open link. Connections accepted meanwhile are never connected upstream.
    - :meth:`heal`: new connections forward again; the ones that saw the black hole stay dead.
    - :meth:`kill_connections`: close every proxied connection on both sides at once.

    When one end of a forwarding connection closes, the proxy closes the other end too (a link
    has no use for half-closes). With ``hide_closes`` a black-holed connection passes no close
    on either, as a dead path carries no FIN: the proxy keeps the other end's socket open until
    :meth:`kill_connections` or the end of the :meth:`serve` nursery, and holds the sockets of
    connections accepted during the black hole open after their client closed.

    ``accepted`` counts accepted connections (dials).
    """

    def __init__(self, target: Address, *, hide_closes: bool = False) -> None:
        super().__init__()
        self.target = target
        self.hide_closes = hide_closes
        self.accepted = 0
        self._blackholed = False
        self._connections: set[_ProxiedConnection] = set()

    def blackhole(self) -> None:
        self._blackholed = True
        for connection in self._connections:
            connection.dead = True

    def heal(self) -> None:
        self._blackholed = False

    def kill_connections(self) -> None:
        for connection in list(self._connections):
            connection.scope.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        connection = _ProxiedConnection()
        self._connections.add(connection)
        try:
            with connection.scope:
                if self._blackholed:
                    connection.dead = True
                    await self._drop(client)
                    return
                try:
                    upstream = await trio.open_tcp_stream(*self.target)
                except OSError:
                    return
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, connection, client, upstream, nursery)
                    nursery.start_soon(self._pump, connection, upstream, client, nursery)
        finally:
            self._connections.discard(connection)
            await trio.aclose_forcefully(client)

    async def _drop(self, source: trio.SocketStream) -> None:
        """Read and discard until the peer closes."""
        try:
            while await source.receive_some(PROXY_READ_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if self.hide_closes:
            await trio.sleep_forever()

    async def _pump(
        self,
        connection: _ProxiedConnection,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        nursery: trio.Nursery,
    ) -> None:
        try:
            while data := await source.receive_some(PROXY_READ_SIZE):
                if not connection.dead:
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if connection.dead and self.hide_closes:
            # The other end must not learn of this close: hold its socket open.
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()


class SilentProxy(TcpProxy):
    """A loopback TCP proxy whose path can go silent, as a dead network path does.

    After :meth:`silence` nothing is forwarded in either direction and nothing is closed on
    one side because the other side closed (a dead path carries no FIN either): each end keeps
    an open socket whose peer never answers, and must find that out by itself. Connections
    accepted meanwhile are read and dropped, never connected upstream. Run :meth:`serve` with
    ``nursery.start``; everything ends with that nursery.
    """

    def __init__(self, target: Address) -> None:
        super().__init__(target, hide_closes=True)

    def silence(self) -> None:
        self.blackhole()


async def start_proxy(nursery: trio.Nursery, target: Address) -> TcpProxy:
    """A :class:`TcpProxy` to ``target`` serving in ``nursery``, once it listens."""
    proxy: TcpProxy = await nursery.start(TcpProxy(target).serve)
    return proxy
