"""The trio driver end to end: sessions and streams over an in-memory transport.

Two kinds of setup: a relay-role and a connector-role :class:`MuxSession` joined back to back
(:func:`running_pair`), or one :class:`MuxSession` facing a bare :class:`MemoryTransport` that the
test drives by hand with a sans-IO :class:`protocol.Session`, to send exactly the bytes a test
needs (garbage, no HELLO) and to decode exactly what the driver wrote.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import attrs
import pytest
import trio
import trio.testing

import mux
from mux import MemoryTransport, MuxConfig, MuxSession, MuxStream, memory_transport_pair
from protocol import (
    CloseCode,
    ErrorCode,
    Event,
    GoAwayReceived,
    HandshakeCompleted,
    LocalProtocolError,
    Role,
    Session,
    SessionConfig,
    StreamOpened,
)

#: Keepalive off: tests that are not about keepalive must not see pings fire under autojump.
QUIET = MuxConfig(keepalive_interval=math.inf)
#: The frame header (type, flags, reserved, stream id, length), as the spec lays it out.
HEADER = struct.Struct(">BBHII")


# ---------------------------------------------------------------------- helpers


@attrs.frozen(kw_only=True)
class Pair:
    relay: MuxSession
    connector: MuxSession
    relay_end: MemoryTransport
    connector_end: MemoryTransport
    #: Set once the session's ``run`` has returned (or raised).
    relay_done: trio.Event
    connector_done: trio.Event


async def _run(
    session: MuxSession,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[MuxSession] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await session.run(task_status=task_status)
    finally:
        done.set()


@asynccontextmanager
async def running_pair(
    relay_config: MuxConfig = QUIET, connector_config: MuxConfig = QUIET
) -> AsyncIterator[Pair]:
    """Both sessions started (both handshakes complete); cancelled on exit."""
    relay_end, connector_end = memory_transport_pair()
    pair = Pair(
        relay=MuxSession(relay_end, Role.RELAY, relay_config),
        connector=MuxSession(connector_end, Role.CONNECTOR, connector_config),
        relay_end=relay_end,
        connector_end=connector_end,
        relay_done=trio.Event(),
        connector_done=trio.Event(),
    )
    async with trio.open_nursery() as nursery:

        async def start(session: MuxSession, done: trio.Event) -> None:
            await nursery.start(_run, session, done)

        async with trio.open_nursery() as starting:
            starting.start_soon(start, pair.relay, pair.relay_done)
            starting.start_soon(start, pair.connector, pair.connector_done)
        try:
            yield pair
        finally:
            nursery.cancel_scope.cancel()


async def open_pair(
    opener: MuxSession, acceptor: MuxSession, metadata: dict[str, str] | None = None
) -> tuple[MuxStream, MuxStream]:
    local = await opener.open_stream(metadata)
    remote = await acceptor.accept_stream()
    assert remote.stream_id == local.stream_id
    return local, remote


async def receive_all(stream: MuxStream, limit: int) -> bytes:
    """Read to end of file. Fails past ``limit`` bytes, which also bounds the loop."""
    data = bytearray()
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            return bytes(data)
        data += chunk
        assert len(data) <= limit, f"more than {limit} bytes on stream {stream.stream_id}"


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def bare_handshake(end: MemoryTransport, peer: Session) -> None:
    """Read the driver's HELLO on the bare peer's end (the peer sent its own HELLO already)."""
    events = peer.receive_data(await end.receive_message())
    assert any(isinstance(event, HandshakeCompleted) for event in events)


async def read_until_close(end: MemoryTransport, peer: Session) -> tuple[list[Event], int | None]:
    """Decode everything the driver writes until it closes the transport.

    Returns the events and the close code. Bounded: a driver that keeps writing fails the test.
    """
    events: list[Event] = []
    for _ in range(1000):
        try:
            message = await end.receive_message()
        except mux.TransportClosed as exc:
            return events, exc.code
        events += peer.receive_data(message)
    raise AssertionError("the driver kept writing and never closed the transport")


def all_tasks() -> set[trio.lowlevel.Task]:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    found: set[trio.lowlevel.Task] = set()
    pending = [root]
    while pending:
        task = pending.pop()
        found.add(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return found


# ---------------------------------------------------------------------- streams


async def test_open_and_accept_carry_metadata_both_ways() -> None:
    with trio.fail_after(5):
        async with running_pair() as pair:
            to_daemon, at_daemon = await open_pair(
                pair.relay, pair.connector, {"kind": "http", "from": "browser"}
            )
            to_relay, at_relay = await open_pair(
                pair.connector, pair.relay, {"kind": "mesh", "target": "laptop-2"}
            )

            assert dict(at_daemon.metadata) == {"kind": "http", "from": "browser"}
            assert dict(at_relay.metadata) == {"kind": "mesh", "target": "laptop-2"}
            # Parity by role: the relay opens even ids, the connector odd ones.
            assert to_daemon.stream_id % 2 == 0 and to_relay.stream_id % 2 == 1
            assert to_daemon.local and to_relay.local
            assert not at_daemon.local and not at_relay.local

            for local, remote in ((to_daemon, at_daemon), (to_relay, at_relay)):
                await local.send_all(b"request " + str(local.stream_id).encode())
                assert await remote.receive_some() == b"request " + str(local.stream_id).encode()
                await remote.send_all(b"response")
                assert await local.receive_some() == b"response"


async def test_session_pair_fixture_carries_data(
    session_pair: tuple[MuxSession, MuxSession],
) -> None:
    relay, connector = session_pair
    with trio.fail_after(5):
        local, remote = await open_pair(relay, connector, {"kind": "http"})
        await local.send_all(b"ping")
        assert await remote.receive_some() == b"ping"


async def test_half_close_each_direction() -> None:
    with trio.fail_after(5):
        async with running_pair() as pair:
            local, remote = await open_pair(pair.relay, pair.connector)

            # The relay finishes its direction first; the connector can still answer.
            await local.send_all(b"GET / HTTP/1.1\r\n\r\n")
            await local.send_eof()
            assert await receive_all(remote, 100) == b"GET / HTTP/1.1\r\n\r\n"
            assert await remote.receive_some() == b""  # end of file stays end of file
            with pytest.raises(trio.ClosedResourceError):
                await local.send_all(b"more")

            await remote.send_all(b"HTTP/1.1 200 OK\r\n\r\nhello")
            assert await local.receive_some() == b"HTTP/1.1 200 OK\r\n\r\nhello"
            await remote.send_eof()
            assert await local.receive_some() == b""

            # Both directions finished: nothing left open on either side.
            assert pair.relay.protocol.open_streams == 0
            assert pair.connector.protocol.open_streams == 0
            await local.aclose()
            await remote.aclose()

            # And the other way round, on a stream the connector opened.
            local, remote = await open_pair(pair.connector, pair.relay)
            await remote.send_eof()  # the acceptor closes first this time
            assert await local.receive_some() == b""
            await local.send_all(b"still flowing")
            await local.send_eof()
            assert await receive_all(remote, 100) == b"still flowing"
            assert pair.relay.protocol.open_streams == 0
            assert pair.connector.protocol.open_streams == 0


async def test_many_concurrent_streams_each_arrive_complete_and_in_order() -> None:
    count = 200
    with trio.fail_after(10):
        async with running_pair() as pair:
            received: dict[int, bytes] = {}
            echoed: dict[int, bytes] = {}

            async def serve(acceptor: MuxSession, streams: int) -> None:
                async with trio.open_nursery() as nursery:
                    for _ in range(streams):
                        stream = await acceptor.accept_stream()
                        nursery.start_soon(echo, stream)

            async def echo(stream: MuxStream) -> None:
                index = int(stream.metadata["index"])
                data = await receive_all(stream, 64 * 1024)
                received[index] = data
                await stream.send_all(data[::-1])
                await stream.aclose()

            async def client(opener: MuxSession, index: int) -> None:
                stream = await opener.open_stream({"kind": "test", "index": str(index)})
                data = payload(index, 4096 + 37 * index)
                # Several writes per stream, so the frames of all streams interleave.
                for start in range(0, len(data), 3000):
                    await stream.send_all(data[start : start + 3000])
                await stream.send_eof()
                echoed[index] = await receive_all(stream, 64 * 1024)
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                # Half the streams each way, all at once.
                nursery.start_soon(serve, pair.connector, count // 2)
                nursery.start_soon(serve, pair.relay, count // 2)
                for index in range(count):
                    opener = pair.relay if index % 2 == 0 else pair.connector
                    nursery.start_soon(client, opener, index)

            assert sorted(received) == list(range(count))
            for index in range(count):
                expected = payload(index, 4096 + 37 * index)
                assert received[index] == expected, f"stream {index} corrupted"
                assert echoed[index] == expected[::-1], f"echo of stream {index} corrupted"
            assert pair.relay.protocol.open_streams == 0
            assert pair.connector.protocol.open_streams == 0


async def test_large_payloads_cross_many_windows_both_ways() -> None:
    size = 8 * 1024 * 1024
    window = SessionConfig().initial_window_size
    assert size > 8 * window  # several window refills each way
    up, down = payload(1, size), payload(2, size)
    with trio.fail_after(10):
        async with running_pair() as pair:
            local, remote = await open_pair(pair.relay, pair.connector)
            results: dict[str, bytes] = {}

            async def send(stream: MuxStream, data: bytes) -> None:
                await stream.send_all(data)
                await stream.send_eof()

            async def receive(stream: MuxStream, key: str) -> None:
                results[key] = await receive_all(stream, size)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, local, up)
                nursery.start_soon(send, remote, down)
                nursery.start_soon(receive, remote, "up")
                nursery.start_soon(receive, local, "down")
            assert results["up"] == up
            assert results["down"] == down


async def test_bad_metadata_is_refused_and_the_session_carries_on() -> None:
    with trio.fail_after(5):
        async with running_pair() as pair:
            with pytest.raises(ValueError, match="invalid metadata key"):
                await pair.relay.open_stream({"not a key!": "x"})
            # Larger than the peer's announced MAX_METADATA_SIZE (4 KiB by default).
            with pytest.raises(LocalProtocolError, match="exceeds the peer's limit"):
                await pair.relay.open_stream({"kind": "x" * 5000})
            assert pair.relay.protocol.open_streams == 0

            local, remote = await open_pair(pair.relay, pair.connector, {"kind": "http"})
            await local.send_all(b"fine")
            assert await remote.receive_some() == b"fine"


async def test_open_stream_waits_for_a_slot_under_the_peer_limit() -> None:
    """Every opener waiting for a slot gets one as slots free up, not only the latest."""
    one_at_a_time = MuxConfig(
        keepalive_interval=math.inf, protocol=SessionConfig(max_concurrent_streams=1)
    )
    with trio.fail_after(5):
        async with running_pair(connector_config=one_at_a_time) as pair:
            first, first_remote = await open_pair(pair.relay, pair.connector)
            opened: list[MuxStream] = []

            async def opener() -> None:
                opened.append(await pair.relay.open_stream())

            async def finish(stream: MuxStream, remote: MuxStream) -> None:
                await stream.send_eof()
                await remote.send_eof()
                assert await remote.receive_some() == b""
                assert await stream.receive_some() == b""
                await trio.testing.wait_all_tasks_blocked()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(opener)
                nursery.start_soon(opener)
                await trio.testing.wait_all_tasks_blocked()
                assert opened == []  # both wait: the connector allows one stream at a time

                await finish(first, first_remote)
                assert len(opened) == 1, "a freed slot must go to a waiting opener"
                await finish(opened[0], await pair.connector.accept_stream())
                assert len(opened) == 2, "the second waiter never got the slot freed for it"
                assert opened[0].stream_id != opened[1].stream_id


# ---------------------------------------------------------------------- reset


async def test_reset_reaches_the_peer_with_its_code() -> None:
    with trio.fail_after(5):
        async with running_pair() as pair:
            local, remote = await open_pair(pair.relay, pair.connector)
            await local.send_all(b"x")
            assert await remote.receive_some() == b"x"

            local.reset(ErrorCode.TARGET_OFFLINE)
            with pytest.raises(mux.StreamResetError) as info:
                await remote.receive_some()
            assert info.value.code == ErrorCode.TARGET_OFFLINE
            assert info.value.stream_id == local.stream_id
            with pytest.raises(mux.StreamResetError):
                await remote.send_all(b"too late")
            # Locally the stream is closed, not broken.
            with pytest.raises(trio.ClosedResourceError):
                await local.send_all(b"y")
            local.reset(ErrorCode.CANCEL)  # idempotent

            # Bytes the peer has not read yet are dropped with the stream: the reset comes first.
            local, remote = await open_pair(pair.relay, pair.connector)
            await local.send_all(b"never read")
            await trio.testing.wait_all_tasks_blocked()
            local.reset(ErrorCode.FORBIDDEN)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(mux.StreamResetError) as info:
                await remote.receive_some()
            assert info.value.code == ErrorCode.FORBIDDEN

            # An unknown application code passes through as a number.
            local, remote = await open_pair(pair.connector, pair.relay)
            local.reset(0x1234)
            with pytest.raises(mux.StreamResetError) as info:
                await remote.receive_some()
            assert info.value.code == 0x1234


async def test_aclose_with_unread_data_fails_the_blocked_peer_sender() -> None:
    small = MuxConfig(keepalive_interval=math.inf, protocol=SessionConfig(initial_window_size=1024))
    with trio.fail_after(5):
        async with running_pair(relay_config=small, connector_config=small) as pair:
            local, remote = await open_pair(pair.relay, pair.connector)
            await remote.send_all(b"last words")
            failed: list[BaseException] = []

            async def flood() -> None:
                try:
                    await local.send_all(b"x" * 100_000)
                except trio.BrokenResourceError as exc:
                    failed.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                await trio.testing.wait_all_tasks_blocked()
                assert failed == []  # stuck on the 1 KiB window: nobody reads
                # The connector stops reading with data unread, while the relay still sends.
                await remote.aclose()
            assert len(failed) == 1
            assert isinstance(failed[0], mux.StreamResetError)
            assert failed[0].code == ErrorCode.CANCEL
            # What the connector sent before closing still arrives, then end of file.
            assert await receive_all(local, 100) == b"last words"


async def test_aclose_while_the_peer_keeps_sending_fails_its_next_send() -> None:
    with trio.fail_after(5):
        async with running_pair() as pair:
            local, remote = await open_pair(pair.connector, pair.relay)
            await local.send_all(b"unread")
            await remote.aclose()
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BrokenResourceError):
                for _ in range(100):  # bounded: the reset must arrive long before
                    await local.send_all(b"more")
                    await trio.testing.wait_all_tasks_blocked()
            assert await local.receive_some() == b""


# ---------------------------------------------------------------------- ping and keepalive


async def test_ping_returns_a_round_trip_time(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(5):
        async with running_pair() as pair:
            rtt = await pair.relay.ping()
            assert 0 <= rtt < 1
            assert pair.relay.rtt == rtt
            assert 0 <= await pair.connector.ping() < 1


async def test_keepalive_ends_a_session_whose_peer_went_silent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    interval, timeout = 2.0, 3.0
    watchful = MuxConfig(keepalive_interval=interval, keepalive_timeout=timeout)
    with trio.fail_after(60):
        async with running_pair(relay_config=watchful) as pair:
            to_daemon, at_daemon = await open_pair(pair.relay, pair.connector)
            to_relay, at_relay = await open_pair(pair.connector, pair.relay)
            pair.connector_end.blackhole = True  # the connector's pongs now vanish
            start = trio.current_time()

            await pair.relay_done.wait()
            assert trio.current_time() - start <= interval + timeout
            assert pair.relay.ended
            assert pair.relay.close_reason is not None
            assert "ping" in pair.relay.close_reason
            for stream in (to_daemon, at_relay):
                with pytest.raises(trio.BrokenResourceError):
                    await stream.send_all(b"x")
                with pytest.raises(trio.BrokenResourceError):
                    await stream.receive_some()
            with pytest.raises(mux.SessionClosed):
                await pair.relay.open_stream()

            # The connector learns it from the transport close that followed.
            await pair.connector_done.wait()
            assert pair.connector.transport_closed is not None
            for stream in (to_relay, at_daemon):
                with pytest.raises(trio.BrokenResourceError):
                    await stream.receive_some()


async def test_keepalive_keeps_a_live_session_up(autojump_clock: trio.testing.MockClock) -> None:
    watchful = MuxConfig(keepalive_interval=1.0, keepalive_timeout=1.0)
    with trio.fail_after(60):
        async with running_pair(relay_config=watchful, connector_config=watchful) as pair:
            await trio.sleep(30)  # thirty rounds of pings, all answered
            assert not pair.relay.ended and not pair.connector.ended
            assert pair.relay.rtt is not None


# ---------------------------------------------------------------------- session end


async def test_transport_closed_by_the_peer_ends_the_session() -> None:
    with trio.fail_after(5):
        async with running_pair() as pair:
            local, remote = await open_pair(pair.connector, pair.relay)
            blocked, _ = await open_pair(pair.connector, pair.relay)
            failures: list[BaseException] = []

            async def expect_break(operation: Callable[[], Awaitable[object]]) -> None:
                try:
                    await operation()
                except trio.BrokenResourceError as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                # Tasks already waiting when the link goes: a sender out of credit, a reader,
                # an acceptor. Each must be woken with an error, not left hanging.
                nursery.start_soon(expect_break, partial(blocked.send_all, b"x" * (1024 * 1024)))
                nursery.start_soon(expect_break, local.receive_some)
                nursery.start_soon(expect_break, pair.connector.accept_stream)
                await trio.testing.wait_all_tasks_blocked()
                assert failures == []
                # The relay side of the link rejects the connector's key.
                await pair.relay_end.aclose(4401, "bad key")
            assert len(failures) == 3
            assert all(isinstance(exc, mux.SessionClosed) for exc in failures), failures

            await pair.connector_done.wait()
            connector = pair.connector
            assert connector.ended
            assert connector.transport_closed is not None
            assert connector.transport_closed.code == CloseCode.INVALID_KEY
            assert connector.transport_closed.reason == "bad key"
            assert connector.close_reason is not None
            assert "4401" in connector.close_reason and "bad key" in connector.close_reason
            with pytest.raises(trio.BrokenResourceError):
                await local.send_all(b"x")
            with pytest.raises(trio.BrokenResourceError):
                await local.receive_some()
            with pytest.raises(mux.SessionClosed, match="bad key"):
                await connector.open_stream()
            with pytest.raises(mux.SessionClosed, match="bad key"):
                await connector.accept_stream()
            # The relay's own end is closed too: its session ends, its stream breaks.
            await pair.relay_done.wait()
            with pytest.raises(trio.BrokenResourceError):
                await remote.receive_some()


async def test_aclose_closes_the_transport_with_its_code() -> None:
    with trio.fail_after(5):
        async with running_pair() as pair:
            local, remote = await open_pair(pair.relay, pair.connector)
            await pair.relay.aclose(CloseCode.REPLACED, "replaced by a newer link")
            await pair.relay_done.wait()
            await pair.connector_done.wait()
            assert pair.relay.close_reason == "replaced by a newer link"
            assert pair.connector.transport_closed is not None
            assert pair.connector.transport_closed.code == CloseCode.REPLACED
            with pytest.raises(trio.BrokenResourceError):
                await local.send_all(b"x")
            with pytest.raises(trio.BrokenResourceError):
                await remote.receive_some()
            with pytest.raises(mux.SessionClosed):
                await pair.connector.accept_stream()


async def test_protocol_error_from_the_peer_flushes_goaway_then_closes() -> None:
    # Repeated: whether the GOAWAY goes out must not depend on how tasks happen to be scheduled.
    for _ in range(20):
        with trio.fail_after(5):
            relay_end, peer_end = memory_transport_pair()
            relay = MuxSession(relay_end, Role.RELAY, QUIET)
            peer = Session(Role.CONNECTOR)
            async with trio.open_nursery() as nursery:
                await peer_end.send_message(peer.data_to_send())
                await nursery.start(relay.run)
                await bare_handshake(peer_end, peer)
                stream_id = peer.open_stream({"kind": "mesh"})
                await peer_end.send_message(peer.data_to_send())
                stream = await relay.accept_stream()
                assert stream.stream_id == stream_id

                # Frame type 0x7f does not exist.
                await peer_end.send_message(HEADER.pack(0x7F, 0, 0, 0, 0))
                events, code = await read_until_close(peer_end, peer)

            goaways = [event for event in events if isinstance(event, GoAwayReceived)]
            assert len(goaways) == 1, f"expected one GOAWAY before the close, got {events}"
            assert goaways[0].code == ErrorCode.PROTOCOL_ERROR
            assert "unknown frame type" in goaways[0].reason
            assert goaways[0].last_stream_id == stream_id
            assert code == CloseCode.PROTOCOL_ERROR
            assert relay.close_reason is not None
            assert "protocol error" in relay.close_reason
            assert "unknown frame type 0x7f" in relay.close_reason
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()


# ---------------------------------------------------------------------- handshake


async def test_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        relay_end, peer_end = memory_transport_pair()
        relay = MuxSession(relay_end, Role.RELAY, MuxConfig(handshake_timeout=7.0))
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            with pytest.raises(mux.SessionClosed, match="HELLO"):
                await nursery.start(relay.run)
        assert trio.current_time() - start == pytest.approx(7.0)
        assert relay.ended
        # The silent peer sees the relay's HELLO, then the close.
        events, code = await read_until_close(peer_end, Session(Role.CONNECTOR))
        assert [type(event) for event in events] == [HandshakeCompleted]
        assert code == CloseCode.PROTOCOL_ERROR


async def test_garbage_instead_of_hello_fails_the_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(5):
        relay_end, peer_end = memory_transport_pair()
        relay = MuxSession(relay_end, Role.RELAY, QUIET)
        await peer_end.send_message(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with trio.open_nursery() as nursery:
            with pytest.raises(mux.SessionClosed, match="protocol error"):
                await nursery.start(relay.run)
        events, code = await read_until_close(peer_end, Session(Role.CONNECTOR))
        assert code == CloseCode.PROTOCOL_ERROR
        assert any(
            isinstance(event, GoAwayReceived) and event.code == ErrorCode.PROTOCOL_ERROR
            for event in events
        )


# ---------------------------------------------------------------------- go-away drain


async def test_drain_refuses_new_streams_and_lets_open_ones_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(30):
        async with running_pair() as pair:
            local, remote = await open_pair(pair.connector, pair.relay, {"kind": "mesh"})
            drained_at: list[float] = []

            async def drain() -> None:
                await pair.relay.drain(10.0, reason="restarting")
                drained_at.append(trio.current_time())

            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await trio.testing.wait_all_tasks_blocked()
                goaway = pair.connector.peer_goaway
                assert goaway is not None
                assert goaway.code == ErrorCode.NO_ERROR and goaway.reason == "restarting"
                assert goaway.last_stream_id == local.stream_id
                with pytest.raises(mux.SessionClosed, match="going away"):
                    await pair.connector.open_stream()
                with pytest.raises(mux.SessionClosed, match="going away"):
                    await pair.relay.open_stream()
                assert drained_at == []  # one stream still open

                # The open stream runs to completion, both ways.
                await local.send_all(b"request")
                await local.send_eof()
                assert await receive_all(remote, 100) == b"request"
                await remote.send_all(b"response")
                await remote.aclose()
                assert await receive_all(local, 100) == b"response"
            assert drained_at and drained_at[0] - start < 10.0
            assert not pair.relay.ended  # drain leaves the session up


async def test_drain_refuses_a_stream_opened_while_the_goaway_is_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(30):
        async with running_pair() as pair:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.relay.drain, 10.0)
                # Queued before the relay's GOAWAY arrives; the relay has not seen it yet.
                late = await pair.connector.open_stream({"kind": "mesh"})
            with pytest.raises(mux.StreamResetError) as info:
                await late.receive_some()
            assert info.value.code == ErrorCode.REFUSED_STREAM
            # The refused stream never reaches the relay's application.
            with trio.move_on_after(1) as scope:
                await pair.relay.accept_stream()
            assert scope.cancelled_caught


async def test_drain_returns_after_grace_with_a_stuck_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(30):
        async with running_pair() as pair:
            local, remote = await open_pair(pair.relay, pair.connector)
            start = trio.current_time()
            await pair.relay.drain(4.0)
            assert trio.current_time() - start == pytest.approx(4.0)
            # The stuck stream was not touched: it still works after the grace period.
            await local.send_all(b"late")
            assert await remote.receive_some() == b"late"
            assert not pair.relay.ended


# ---------------------------------------------------------------------- cancellation


async def test_cancelling_run_closes_the_transport_and_leaves_no_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(30):
        relay_end, peer_end = memory_transport_pair()
        peer = Session(Role.CONNECTOR)
        before = all_tasks()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await peer_end.send_message(peer.data_to_send())
                relay = await nursery.start(MuxSession(relay_end, Role.RELAY).run)
                await bare_handshake(peer_end, peer)
                stream = await relay.open_stream({"kind": "http"})

                async def read_forever() -> None:
                    await stream.receive_some()

                nursery.start_soon(read_forever)
                await trio.testing.wait_all_tasks_blocked()
                assert len(all_tasks()) > len(before)
                scope.cancel()
        assert all_tasks() == before

        events, code = await read_until_close(peer_end, peer)
        assert code == 1001
        assert any(isinstance(event, StreamOpened) for event in events)
        assert relay.ended
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"x")
        with pytest.raises(mux.SessionClosed):
            await relay.open_stream()
