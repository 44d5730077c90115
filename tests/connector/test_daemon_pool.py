"""The connector's pool of kept-alive daemon connections (``connector._daemon_pool``).

A real loopback listener stands in for the daemon and records every connection it accepted,
what arrived on it, and when the pool's side closed it. The pool's clock is a fake the tests
move by hand.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from connector._daemon_pool import DaemonPool
from tests.support.listener import LoopbackServer

LOOPBACK = "127.0.0.1"
#: Bytes the listener reads at a time.
READ_SIZE = 4096
#: Seconds each test may take, network included.
TEST_TIMEOUT = 5


@attrs.define(eq=False)
class Accepted:
    """The daemon's side of one connection."""

    stream: trio.SocketStream
    received: bytearray = attrs.Factory(bytearray)
    #: Set once the pool's side closed the connection (the daemon read end of file).
    peer_closed: trio.Event = attrs.Factory(trio.Event)
    _grew: trio.Event = attrs.Factory(trio.Event)

    def add(self, data: bytes) -> None:
        self.received += data
        self._grew.set()
        self._grew = trio.Event()

    async def wait_received(self, expected: bytes) -> None:
        """Wait until exactly ``expected`` has arrived (callers bound the wait)."""
        while len(self.received) < len(expected):
            await self._grew.wait()
        assert self.received == expected

    @property
    def peer_port(self) -> int:
        port: int = self.stream.socket.getpeername()[1]
        return port


class LoopbackDaemon(LoopbackServer):
    """Accepts connections on 127.0.0.1 (port 0) and reads each until the peer closes it."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted: list[Accepted] = []
        self._changed = trio.Event()

    async def _handle(self, stream: trio.SocketStream) -> None:
        accepted = Accepted(stream=stream)
        self.accepted.append(accepted)
        self._changed.set()
        self._changed = trio.Event()
        try:
            while data := await stream.receive_some(READ_SIZE):
                accepted.add(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            accepted.peer_closed.set()
            await trio.aclose_forcefully(stream)

    async def side_of(self, connection: trio.SocketStream) -> Accepted:
        """The daemon's side of ``connection`` (once accepted; callers bound the wait)."""
        port = connection.socket.getsockname()[1]
        while True:
            for accepted in self.accepted:
                if accepted.peer_port == port:
                    return accepted
            await self._changed.wait()


class FakeClock:
    """The pool's clock: ``now`` moves only when a test sets it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def daemon(nursery: trio.Nursery) -> LoopbackDaemon:
    server = LoopbackDaemon()
    await nursery.start(server.serve)
    return server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def pool(daemon: LoopbackDaemon, clock: FakeClock) -> AsyncIterator[DaemonPool]:
    pool = DaemonPool(LOOPBACK, daemon.port, max_idle=4, idle_seconds=2.0, clock=clock)
    try:
        yield pool
    finally:
        pool.close_idle()


class InUse:
    """Connections a test holds; all closed when the test ends."""

    def __init__(self) -> None:
        self.connections: list[trio.SocketStream] = []

    async def connect(self, pool: DaemonPool) -> tuple[trio.SocketStream, bool]:
        connection, reused = await pool.connect()
        self.connections.append(connection)
        return connection, reused

    def close_all(self) -> None:
        for connection in self.connections:
            connection.socket.close()


@pytest.fixture
async def in_use() -> AsyncIterator[InUse]:
    held = InUse()
    try:
        yield held
    finally:
        held.close_all()


def is_closed(connection: trio.SocketStream) -> bool:
    return connection.socket.fileno() == -1


async def wait_readable(connection: trio.SocketStream) -> None:
    """Wait until the client side has something to read (bytes or end of file)."""
    await trio.lowlevel.wait_readable(connection.socket)


# ---------------------------------------------------------------------- reuse


async def test_connections_are_reused_last_in_first_out(pool: DaemonPool, in_use: InUse) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        opened = [await in_use.connect(pool) for _ in range(3)]
        assert [reused for _, reused in opened] == [False, False, False]
        first, second, third = (connection for connection, _ in opened)
        for connection in (first, second, third):
            pool.release(connection)
        assert pool.idle_count == 3
        again = [await pool.connect() for _ in range(3)]
        assert again == [(third, True), (second, True), (first, True)]
        assert pool.idle_count == 0
        fresh, reused = await in_use.connect(pool)
        assert not reused
        assert fresh not in (first, second, third)
        assert (pool.opened, pool.reused) == (4, 3)


async def test_a_reused_connection_still_reaches_the_same_daemon_connection(
    pool: DaemonPool, daemon: LoopbackDaemon, in_use: InUse
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        connection, _ = await in_use.connect(pool)
        await connection.send_all(b"first ")
        pool.release(connection)
        again, reused = await pool.connect()
        assert reused and again is connection
        await again.send_all(b"second")
        await (await daemon.side_of(connection)).wait_received(b"first second")
        assert len(daemon.accepted) == 1


async def test_a_cancelled_connect_leaves_the_idle_connection_in_the_pool(
    pool: DaemonPool, in_use: InUse
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        connection, _ = await in_use.connect(pool)
        pool.release(connection)
        with trio.CancelScope() as scope:
            scope.cancel()
            await pool.connect()
        assert scope.cancelled_caught
        # Nobody got it, so it must still be the pool's (not popped and forgotten).
        assert pool.idle_count == 1
        assert await pool.connect() == (connection, True)


async def test_counters_count_dials_and_reuses(pool: DaemonPool, in_use: InUse) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        assert (pool.opened, pool.reused) == (0, 0)
        connection, _ = await in_use.connect(pool)
        for _ in range(5):
            pool.release(connection)
            connection, reused = await pool.connect()
            assert reused
        extra = await pool.fresh()
        in_use.connections.append(extra)
        assert (pool.opened, pool.reused) == (2, 5)


# ---------------------------------------------------------------------- expiry and bounds


async def test_an_idle_connection_expires_after_idle_seconds(
    pool: DaemonPool, daemon: LoopbackDaemon, clock: FakeClock, in_use: InUse
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        connection, _ = await in_use.connect(pool)
        side = await daemon.side_of(connection)
        pool.release(connection)
        clock.now += 1.9
        assert await pool.connect() == (connection, True)
        pool.release(connection)  # idle again from now
        clock.now += 2.0
        fresh, reused = await in_use.connect(pool)
        assert not reused and fresh is not connection
        assert is_closed(connection)
        await side.peer_closed.wait()
        assert (pool.opened, pool.reused) == (2, 1)


async def test_release_closes_connections_that_expired_meanwhile(
    pool: DaemonPool, daemon: LoopbackDaemon, clock: FakeClock, in_use: InUse
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        old, _ = await in_use.connect(pool)
        new, _ = await in_use.connect(pool)
        old_side = await daemon.side_of(old)
        pool.release(old)
        clock.now += 5
        pool.release(new)
        assert pool.idle_count == 1
        await old_side.peer_closed.wait()
        assert not is_closed(new)
        assert await pool.connect() == (new, True)


async def test_max_idle_closes_the_surplus(
    daemon: LoopbackDaemon, clock: FakeClock, in_use: InUse
) -> None:
    pool = DaemonPool(LOOPBACK, daemon.port, max_idle=2, clock=clock)
    try:
        with trio.fail_after(TEST_TIMEOUT):
            connections = [(await in_use.connect(pool))[0] for _ in range(3)]
            sides = {c: await daemon.side_of(c) for c in connections}
            for connection in connections:
                pool.release(connection)
            assert pool.idle_count == 2
            closed = [c for c in connections if is_closed(c)]
            assert len(closed) == 1
            await sides[closed[0]].peer_closed.wait()
            kept = [sides[c] for c in connections if c not in closed]
            assert not any(side.peer_closed.is_set() for side in kept)
    finally:
        pool.close_idle()


async def test_max_idle_zero_keeps_nothing(
    daemon: LoopbackDaemon, clock: FakeClock, in_use: InUse
) -> None:
    pool = DaemonPool(LOOPBACK, daemon.port, max_idle=0, clock=clock)
    with trio.fail_after(TEST_TIMEOUT):
        connection, _ = await in_use.connect(pool)
        side = await daemon.side_of(connection)
        pool.release(connection)
        assert pool.idle_count == 0
        await side.peer_closed.wait()
        assert (await in_use.connect(pool))[1] is False
        assert pool.opened == 2


# ---------------------------------------------------------------------- the quiet check


async def test_a_connection_the_daemon_closed_while_idle_is_not_reused(
    pool: DaemonPool, daemon: LoopbackDaemon, in_use: InUse
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        connection, _ = await in_use.connect(pool)
        side = await daemon.side_of(connection)
        pool.release(connection)
        await side.stream.aclose()
        await wait_readable(connection)  # the end of file has arrived
        fresh, reused = await in_use.connect(pool)
        assert not reused and fresh is not connection
        assert is_closed(connection)
        assert (pool.opened, pool.reused, pool.idle_count) == (2, 0, 0)


async def test_a_connection_with_stray_bytes_pending_is_not_reused(
    pool: DaemonPool, daemon: LoopbackDaemon, in_use: InUse
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        dirty, _ = await in_use.connect(pool)
        clean, _ = await in_use.connect(pool)
        dirty_side = await daemon.side_of(dirty)
        pool.release(clean)
        pool.release(dirty)  # the newest: tried first
        await dirty_side.stream.send_all(b"HTTP/1.1 200 OK\r\n")
        await wait_readable(dirty)
        assert await pool.connect() == (clean, True)
        assert is_closed(dirty)
        await dirty_side.peer_closed.wait()
        assert pool.opened == 2


async def test_a_quiet_connection_is_reused_after_the_daemon_read_from_it(
    pool: DaemonPool, daemon: LoopbackDaemon, in_use: InUse
) -> None:
    """Bytes the connection carried to the daemon never disqualify it: only bytes or an end
    of file coming back do."""
    with trio.fail_after(TEST_TIMEOUT):
        connection, _ = await in_use.connect(pool)
        await connection.send_all(b"GET / HTTP/1.1\r\n\r\n")
        await (await daemon.side_of(connection)).wait_received(b"GET / HTTP/1.1\r\n\r\n")
        pool.release(connection)
        assert await pool.connect() == (connection, True)


# ---------------------------------------------------------------------- closing


@pytest.mark.parametrize("how", ["close_idle", "aclose"])
async def test_closing_the_pool_closes_idle_connections_only(
    pool: DaemonPool, daemon: LoopbackDaemon, in_use: InUse, how: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        idle = [(await in_use.connect(pool))[0] for _ in range(3)]
        idle_sides = [await daemon.side_of(connection) for connection in idle]
        busy, _ = await in_use.connect(pool)
        busy_side = await daemon.side_of(busy)
        for connection in idle:
            pool.release(connection)
        if how == "aclose":
            await pool.aclose()
        else:
            pool.close_idle()
        assert pool.idle_count == 0
        for side in idle_sides:
            await side.peer_closed.wait()
        # A connection in use stays with its user and still works.
        await busy.send_all(b"still here")
        await busy_side.wait_received(b"still here")
        assert not busy_side.peer_closed.is_set()
        # Given back after the close, it is closed at once; new requests get fresh connections.
        pool.release(busy)
        await busy_side.peer_closed.wait()
        assert pool.idle_count == 0
        assert (await in_use.connect(pool))[1] is False


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "options",
    [
        {"max_idle": -1},
        {"idle_seconds": 0},
        {"idle_seconds": -1.5},
        {"idle_seconds": math.nan},
    ],
    ids=["negative max_idle", "zero idle_seconds", "negative idle_seconds", "nan idle_seconds"],
)
def test_invalid_settings_raise_value_error(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        DaemonPool(LOOPBACK, 1, **options)  # refused before any connection


async def test_an_unreachable_daemon_raises_os_error_and_counts_nothing() -> None:
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()  # nothing listens there now
    pool = DaemonPool(LOOPBACK, port)
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(OSError):
        await pool.connect()
    assert (pool.opened, pool.reused, pool.idle_count) == (0, 0, 0)
