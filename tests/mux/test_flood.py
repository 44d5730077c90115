"""A peer that floods the driver with frames that need an answer and never reads its end.

The protocol bounds what it queues (pending pongs, queued control frames) and the driver stops
reading a link whose control output it cannot send, so memory stays flat and the link ends:
with ``ENHANCE_YOUR_CALM`` when one read crosses the protocol's bounds, or by its unanswered
keepalive when the reader has stopped. Other links are not held up meanwhile.
"""

from __future__ import annotations

import struct

import trio
import trio.testing

from mux import MemoryTransport, MuxConfig, MuxSession, TransportClosed, memory_transport_pair
from protocol import ErrorCode, Role, Session, SessionConfig

from .test_session import HEADER, QUIET, bare_handshake, open_pair, running_pair

PING, OPEN, DATA, RESET = 0x5, 0x1, 0x2, 0x4
#: Messages in flight each way: the flooded driver's writer blocks almost at once.
BUFFER = 2
#: Upper bound on the flood loops; each test ends long before.
MAX_MESSAGES = 5_000
INTERVAL, TIMEOUT = 10.0, 5.0


def ping_frame(n: int) -> bytes:
    return HEADER.pack(PING, 0, 0, 0, 8) + struct.pack(">Q", n)


async def start_flooded(
    nursery: trio.Nursery, config: MuxConfig
) -> tuple[MuxSession, MemoryTransport, trio.Event]:
    """A relay-role driver over a small transport buffer, and the raw peer end, handshaken.
    The peer reads the driver's HELLO and nothing after it. The event is set when run ends."""
    relay_end, peer_end = memory_transport_pair(buffer=BUFFER)
    relay = MuxSession(relay_end, Role.RELAY, config)
    peer = Session(Role.CONNECTOR)
    done = trio.Event()

    async def run(*, task_status: trio.TaskStatus[MuxSession] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await relay.run(task_status=task_status)
        finally:
            done.set()

    await peer_end.send_message(peer.data_to_send())
    await nursery.start(run)
    await bare_handshake(peer_end, peer)
    return relay, peer_end, done


async def flood(end: MemoryTransport, messages: list[bytes], watch: MuxSession) -> int:
    """Send ``messages`` round-robin until the driver closes the link; return how many went.
    Checks after each send that the driver's queued control bytes stay bounded."""
    high_water = watch.config.control_high_water
    largest = max(len(m) for m in messages)
    for sent in range(MAX_MESSAGES):
        try:
            await end.send_message(messages[sent % len(messages)])
        except TransportClosed:
            return sent
        # At most one message's answers above the mark: the reader stops right after it.
        assert watch.protocol.queued_control_bytes <= high_water + 2 * largest
    raise AssertionError(f"the driver still read after {MAX_MESSAGES} flood messages")


async def test_a_ping_flood_ends_the_link_with_enhance_your_calm(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            relay, peer_end, done = await start_flooded(nursery, QUIET)
            start = trio.current_time()
            sent = await flood(peer_end, [ping_frame(n) for n in range(10)], relay)
            await done.wait()
    # HELLO and a pong fill the transport buffer, the writer holds one or two more, four wait
    # in the protocol: the next ping is one too many. Then the peer's sends fill the buffer its
    # way (the exact count depends on scheduling).
    assert sent <= 4 + 2 + 2 + 3 * BUFFER
    assert trio.current_time() - start <= QUIET.close_timeout + 1
    assert relay.close_reason is not None
    assert "pongs still queued" in relay.close_reason
    assert relay.protocol.queued_control_frames <= SessionConfig().max_pending_pongs + 1


async def test_a_ping_flood_in_one_message_ends_the_link_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            relay, peer_end, done = await start_flooded(nursery, QUIET)
            await peer_end.send_message(b"".join(ping_frame(n) for n in range(50_000)))
            await done.wait()
    assert relay.close_reason is not None and "pongs" in relay.close_reason


async def test_refused_opens_across_messages_stop_the_reader_until_the_keepalive_ends_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each message is harmless alone; together their resets would pile up. The reader stops at
    the high-water mark, and the peer, which reads nothing, fails the keepalive."""
    config = MuxConfig(
        protocol=SessionConfig(max_concurrent_streams=0),
        keepalive_interval=INTERVAL,
        keepalive_timeout=TIMEOUT,
    )
    per_message = 50
    messages = [
        b"".join(
            HEADER.pack(OPEN, 0, 0, 1 + 2 * (m * per_message + i), 0) for i in range(per_message)
        )
        for m in range(MAX_MESSAGES)
    ]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            relay, peer_end, done = await start_flooded(nursery, config)
            start = trio.current_time()
            sent = await flood(peer_end, messages, relay)
            await done.wait()
    resets_per_message = per_message * (HEADER.size + 4)
    # The reader stopped once the mark was passed (the resets of a mark's worth of messages
    # in the transport buffer, as many in the writer's hands, as many queued), the peer's
    # sends filled the buffer its way and then blocked until the link closed.
    assert sent <= 3 * (config.control_high_water // resets_per_message + 1) + 2 * BUFFER
    assert relay.close_reason is not None and "ping" in relay.close_reason
    assert trio.current_time() - start <= INTERVAL + TIMEOUT + config.close_timeout + 1


async def test_data_on_a_reset_stream_never_grows_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Late DATA on a stream the driver reset is credited back in one coalesced WINDOW_UPDATE:
    however much arrives, one control frame waits for the peer."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            relay, peer_end, done = await start_flooded(nursery, QUIET)
            await peer_end.send_message(HEADER.pack(OPEN, 0, 0, 1, 0))
            stream = await relay.accept_stream()
            stream.reset(ErrorCode.CANCEL)
            chunk = HEADER.pack(DATA, 0, 0, 1, 16 * 1024) + bytes(16 * 1024)
            for _ in range(2_000):  # 32 MiB, half the default session window twice over
                await peer_end.send_message(chunk)
                assert relay.protocol.queued_control_frames <= 2
            await trio.testing.wait_all_tasks_blocked()
            assert not relay.ended
            assert relay.protocol.queued_control_bytes <= 2 * (HEADER.size + 4)
            nursery.cancel_scope.cancel()
    assert done.is_set()


async def test_a_stopped_reader_does_not_hold_up_other_links(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = MuxConfig(
        protocol=SessionConfig(max_concurrent_streams=0),
        keepalive_interval=INTERVAL,
        keepalive_timeout=TIMEOUT,
    )
    opens = [
        b"".join(HEADER.pack(OPEN, 0, 0, 1 + 2 * (m * 100 + i), 0) for i in range(100))
        for m in range(MAX_MESSAGES)
    ]
    with trio.fail_after(120):
        async with running_pair() as healthy, trio.open_nursery() as nursery:
            relay, peer_end, done = await start_flooded(nursery, config)

            async def flooder() -> None:
                await flood(peer_end, opens, relay)

            nursery.start_soon(flooder)
            await trio.testing.wait_all_tasks_blocked()
            assert relay.protocol.queued_control_bytes > config.control_high_water
            assert not relay.ended  # stopped, not ended: the keepalive has not fired yet
            start = trio.current_time()
            for n in range(20):
                local, remote = await open_pair(healthy.relay, healthy.connector)
                await local.send_all(b"ping %d" % n)
                assert await remote.receive_some() == b"ping %d" % n
                await remote.send_all(b"pong")
                assert await local.receive_some() == b"pong"
                await local.aclose()
                await remote.aclose()
            assert trio.current_time() - start < 0.1
            await done.wait()
