"""Flow control through the driver: a reader that stops stops its sender, and nothing else.

Every test runs on the autojump clock with keepalive off: no timer is involved in moving data,
so a transfer that needs one (a missed wake-up papered over by a timeout) fails at once, and
virtual time not moving shows the flowing streams never waited.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import mux
from mux import MuxConfig, MuxSession, MuxStream, memory_transport_pair
from protocol import ErrorCode, Role, SessionConfig

KIB = 1024
MIB = 1024 * KIB


def config(**protocol: int) -> MuxConfig:
    return MuxConfig(keepalive_interval=math.inf, protocol=SessionConfig(**protocol))


@asynccontextmanager
async def sessions(mux_config: MuxConfig) -> AsyncIterator[tuple[MuxSession, MuxSession]]:
    """A relay-role and a connector-role session, both handshakes complete."""
    relay_end, connector_end = memory_transport_pair()
    relay = MuxSession(relay_end, Role.RELAY, mux_config)
    connector = MuxSession(connector_end, Role.CONNECTOR, mux_config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        await nursery.start(connector.run)
        await trio.testing.wait_all_tasks_blocked()
        assert relay.protocol.handshake_complete
        try:
            yield relay, connector
        finally:
            nursery.cancel_scope.cancel()


async def open_pair(opener: MuxSession, acceptor: MuxSession) -> tuple[MuxStream, MuxStream]:
    local = await opener.open_stream({"kind": "test"})
    remote = await acceptor.accept_stream()
    assert remote.stream_id == local.stream_id
    return local, remote


def pattern(seed: int, size: int) -> bytes:
    """Distinct, position-dependent bytes: a lost, repeated or reordered chunk shows."""
    block = bytes((seed * 31 + i) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


async def receive_all(stream: MuxStream, limit: int) -> bytes:
    """Read to end of file. Fails past ``limit`` bytes, which also bounds the loop."""
    data = bytearray()
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            return bytes(data)
        data += chunk
        assert len(data) <= limit


class Flood:
    """Sends ``data`` in ``chunk``-sized writes, then EOF; counts what the stream accepted."""

    def __init__(self, stream: MuxStream, data: bytes, chunk: int) -> None:
        self.stream = stream
        self.data = data
        self.chunk = chunk
        self.sent = 0
        self.done = trio.Event()

    async def run(self) -> None:
        for start in range(0, len(self.data), self.chunk):
            piece = self.data[start : start + self.chunk]
            await self.stream.send_all(piece)
            self.sent += len(piece)
        await self.stream.send_eof()
        self.done.set()


async def test_a_stalled_reader_blocks_its_sender_and_nothing_else(
    autojump_clock: trio.testing.MockClock,
) -> None:
    window = 16 * KIB
    stalled_data = pattern(1, 256 * KIB)
    fast_data = pattern(2, 4 * MIB)
    with trio.fail_after(10):
        async with sessions(config(initial_window_size=window)) as (relay, connector):
            stalled_out, stalled_in = await open_pair(relay, connector)
            flood = Flood(stalled_out, stalled_data, 4 * KIB)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood.run)
                await trio.testing.wait_all_tasks_blocked()
                # Exactly one window went out, and the sender waits for credit.
                assert flood.sent == window
                assert not flood.done.is_set()
                assert relay.protocol.local_flow_control_window(stalled_out.stream_id) == 0

                # Meanwhile another stream of the same session moves 4 MiB, and the link stays
                # responsive: the session's reader never waits for the stalled application.
                start = trio.current_time()
                fast_out, fast_in = await open_pair(relay, connector)
                received: list[bytes] = []

                async def fast_send() -> None:
                    await fast_out.send_all(fast_data)
                    await fast_out.send_eof()

                async def fast_receive() -> None:
                    received.append(await receive_all(fast_in, len(fast_data)))

                async with trio.open_nursery() as fast:
                    fast.start_soon(fast_send)
                    fast.start_soon(fast_receive)
                assert received == [fast_data]
                assert await connector.ping() >= 0
                assert await relay.ping() >= 0
                assert trio.current_time() == start  # nothing waited for a timer
                await trio.testing.wait_all_tasks_blocked()
                assert flood.sent == window  # still stuck, none of the fast stream's credit leaked

                # What got through is exactly what the window allowed.
                first = await stalled_in.receive_some(4 * window)
                assert first == stalled_data[:window]
                # Reading returned credit: the sender moves again.
                await trio.testing.wait_all_tasks_blocked()
                assert flood.sent > window
                rest = await receive_all(stalled_in, len(stalled_data))
            assert flood.done.is_set()
            assert first + rest == stalled_data


async def test_connector_to_relay_direction_is_flow_controlled_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    window = 8 * KIB
    data = pattern(3, 200 * KIB)
    with trio.fail_after(10):
        async with sessions(config(initial_window_size=window)) as (relay, connector):
            at_relay, from_connector = await open_pair(relay, connector)
            flood = Flood(from_connector, data, 1 * KIB)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood.run)
                await trio.testing.wait_all_tasks_blocked()
                assert flood.sent == window
                assert not flood.done.is_set()
                received = await receive_all(at_relay, len(data))
            assert received == data
            assert flood.done.is_set()


async def test_wait_send_all_might_not_block_waits_for_credit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    window = 8 * KIB
    with trio.fail_after(10):
        async with sessions(config(initial_window_size=window)) as (relay, connector):
            local, remote = await open_pair(connector, relay)
            await local.send_all(b"y" * window)  # fits exactly, does not block
            ready: list[bool] = []

            async def probe() -> None:
                await local.wait_send_all_might_not_block()
                ready.append(True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe)
                await trio.testing.wait_all_tasks_blocked()
                assert ready == []  # the window is spent
                assert await remote.receive_some(window) == b"y" * window
                await trio.testing.wait_all_tasks_blocked()
                assert ready == [True]


async def test_session_budget_bounds_what_many_stalled_streams_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    window, budget, streams = 32 * KIB, 64 * KIB, 10
    assert streams * window > budget  # the stream windows alone would allow five times more
    per_stream = 48 * KIB
    mux_config = config(initial_window_size=window, session_window_size=budget)
    with trio.fail_after(10):
        async with sessions(mux_config) as (relay, connector):
            pairs = [await open_pair(relay, connector) for _ in range(streams)]
            floods = [
                Flood(out, pattern(10 + index, per_stream), 1 * KIB)
                for index, (out, _) in enumerate(pairs)
            ]
            async with trio.open_nursery() as nursery:
                for flood in floods:
                    nursery.start_soon(flood.run)
                await trio.testing.wait_all_tasks_blocked()
                # All senders wait, and together they got exactly the session budget through.
                assert not any(flood.done.is_set() for flood in floods)
                assert sum(flood.sent for flood in floods) == budget
                assert all(flood.sent <= window for flood in floods)

                # A fresh stream is stopped by the same budget before sending a byte.
                late_out, late_in = await open_pair(relay, connector)
                late = Flood(late_out, pattern(99, 4 * KIB), 1 * KIB)
                nursery.start_soon(late.run)
                await trio.testing.wait_all_tasks_blocked()
                assert late.sent == 0

                # Readers come back: every stream completes, intact.
                results: dict[int, bytes] = {}

                async def drain(index: int, stream: MuxStream) -> None:
                    results[index] = await receive_all(stream, per_stream)

                for index, (_, remote) in enumerate(pairs):
                    nursery.start_soon(drain, index, remote)
                nursery.start_soon(drain, -1, late_in)
            assert all(flood.done.is_set() for flood in floods) and late.done.is_set()
            for index in range(streams):
                assert results[index] == pattern(10 + index, per_stream)
            assert results[-1] == pattern(99, 4 * KIB)


@pytest.mark.parametrize("eof_first", [False, True], ids=["reset", "eof-then-reset"])
async def test_streams_reset_by_the_peer_do_not_escape_the_session_budget(
    autojump_clock: trio.testing.MockClock, eof_first: bool
) -> None:
    """A peer fills streams the application is not reading, then resets them, over and over.

    The protocol discards a reset stream's unconsumed bytes and returns their budget to the
    peer (also when the peer had half-closed first), so the driver must not keep them either;
    otherwise what it holds grows past the budget with every round.
    """
    window, budget, rounds = 16 * KIB, 64 * KIB, 40
    mux_config = config(initial_window_size=window, session_window_size=budget)
    with trio.fail_after(10):
        async with sessions(mux_config) as (relay, connector):
            # The connector's application accepts nothing yet: it is slow, not gone.
            for _ in range(rounds):
                stream = await relay.open_stream({"kind": "test"})
                await stream.send_all(b"x" * window)
                if eof_first:
                    await stream.send_eof()
                stream.reset()
            await trio.testing.wait_all_tasks_blocked()

            # Now see what the connector is holding on to.
            held = 0
            pending = 0
            for _ in range(rounds + 1):
                with trio.move_on_after(1) as scope:
                    stream = await connector.accept_stream()
                if scope.cancelled_caught:
                    break
                pending += 1
                for _ in range(window + 1):  # bounded: at least one byte per read
                    try:
                        chunk = await stream.receive_some()
                    except mux.StreamResetError:
                        break
                    if not chunk:
                        break
                    held += len(chunk)
                else:
                    pytest.fail("a reset stream kept returning data")
            assert held <= budget, (
                f"{held} bytes of {pending} reset streams still buffered; the budget is {budget}"
            )


async def test_streams_reset_before_accept_do_not_pile_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The accept backlog bounds what a peer can queue, even when it resets what it opened."""
    backlog = 16
    with trio.fail_after(10):
        async with sessions(config(max_accept_backlog=backlog)) as (relay, connector):
            for _ in range(5 * backlog):
                stream = await relay.open_stream({"kind": "test"})
                stream.reset()
            await trio.testing.wait_all_tasks_blocked()
            pending = 0
            for _ in range(5 * backlog + 1):
                with trio.move_on_after(1) as scope:
                    await connector.accept_stream()
                if scope.cancelled_caught:
                    break
                pending += 1
            assert pending <= backlog, (
                f"{pending} streams queued for accept; the bound is {backlog}"
            )


async def test_opens_past_the_accept_backlog_are_refused_not_queued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backlog, extra = 4, 6
    with trio.fail_after(10):
        async with sessions(config(max_accept_backlog=backlog)) as (relay, connector):
            streams = [await relay.open_stream({"n": str(n)}) for n in range(backlog + extra)]
            await trio.testing.wait_all_tasks_blocked()
            # The connector's application has accepted nothing: the overflow is refused, and
            # the opener learns it at once instead of waiting on a stream nobody will serve.
            for stream in streams[backlog:]:
                with pytest.raises(mux.StreamResetError) as info:
                    await stream.receive_some()
                assert info.value.code == ErrorCode.REFUSED_STREAM
            # The ones inside the backlog are served once the application gets to them.
            for stream in streams[:backlog]:
                accepted = await connector.accept_stream()
                assert accepted.stream_id == stream.stream_id
                await stream.send_all(b"queued, not lost")
                assert await accepted.receive_some() == b"queued, not lost"
