"""A daemon link that floods the relay with pings and never reads its end.

Before the protocol bounded what it queues, every ping was answered into a queue that grew
with the flood (24 MB of pings grew the relay by 136 MB) and the other links slowed down.
Now the flooding link's queued answers stay within the protocol's bounds, the link ends
promptly (``ENHANCE_YOUR_CALM`` once too many pongs wait, or the relay's keepalive when its
transport stopped reading first), and another scope's requests stay fast meanwhile.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from protocol import HEADER_SIZE, FrameType, SessionConfig
from relay import DaemonLink
from tests.support.clients import http_request
from tests.support.links import RawLink, encode_frame, open_raw_link
from tests.support.relays import RunningStack, running_relay
from tests.support.stand_in import identity_handler, start_stand_in
from tests.support.waiting import eventually

#: Pings per WebSocket message: as many as may be unanswered at once, so each message alone
#: is within the rules; it is not reading the answers that breaks them.
PINGS_PER_MESSAGE = 4
#: Upper bound on flood messages (about 1.6 MB of pings); the relay ends the link long before.
MAX_MESSAGES = 20_000
#: The flooder's socket receive buffer, in bytes (the kernel doubles it).
RECEIVE_BUFFER = 4096
#: Slowest acceptable request of the other scope during the flood (it was 0.9 s before; a
#: loaded test machine needs slack above the usual few milliseconds).
SLOW = 0.5


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[RunningStack]:
    with trio.fail_after(120):
        async with running_relay(tmp_path / "relay") as stack:
            yield stack


async def test_a_ping_flood_that_never_reads_is_cut_off_and_others_stay_fast(
    stack: RunningStack,
) -> None:
    relay = stack.relay
    links = relay.running.relay.links
    witness_record, witness_key = await relay.new_scope("witness")
    await start_stand_in(stack.links, relay.address, witness_key, "witness", identity_handler("ok"))
    cookie = await relay.session_cookie(witness_record)
    flood_record, flood_key = await relay.new_scope("flood")
    # Four pongs and the GOAWAY that ends the link, at most.
    bound = SessionConfig().max_pending_pongs * (HEADER_SIZE + 8) + HEADER_SIZE + 8 + 1024
    largest_queue = 0
    latencies: list[float] = []
    flood_over = trio.Event()

    async def witness() -> None:
        for _ in range(1000):
            start = time.perf_counter()
            response = await http_request(relay.address, "GET", "/peers", headers=[cookie])
            latencies.append(time.perf_counter() - start)
            assert response.status == 200
            if flood_over.is_set():
                return
            await trio.sleep(0.01)

    async def flood(link: RawLink, flooder: DaemonLink) -> None:
        nonlocal largest_queue
        for sent in range(MAX_MESSAGES):
            payloads = range(sent * PINGS_PER_MESSAGE, (sent + 1) * PINGS_PER_MESSAGE)
            await link.send(
                b"".join(encode_frame(FrameType.PING, 0, 0, struct.pack(">Q", n)) for n in payloads)
            )
            if flooder.session.ended:
                return
            largest_queue = max(largest_queue, flooder.session.protocol.queued_bytes)
        raise AssertionError("the relay still took pings after the whole flood")

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(witness)
            async with open_raw_link(relay.address, flood_key, "flooder") as link:
                await eventually(lambda: links.get(flood_record.scope_id, "flooder") is not None)
                flooder = links.get(flood_record.scope_id, "flooder")
                assert flooder is not None
                # A small receive buffer, so the relay's sends block after kilobytes of pongs
                # rather than the megabytes loopback would otherwise absorb.
                sock = link.ws._stream.socket  # type: ignore[attr-defined]
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
                async with trio.open_nursery() as flooding:
                    flooding.start_soon(flood, link, flooder)
                    # Once the relay has ended the link it reads no more: the flood's sends
                    # may then block until the connection closes; stop them.
                    await flooder.session.wait_ended()
                    flooding.cancel_scope.cancel()
                flood_over.set()
    # Ended by the protocol's bound on pending pongs, or, when the relay's transport stopped
    # reading first, by its keepalive: either way promptly, and with little queued.
    reason = flooder.session.close_reason
    assert reason is not None
    assert "pongs still queued" in reason or "no answer to a ping" in reason, reason
    assert links.get(flood_record.scope_id, "flooder") is None
    assert largest_queue <= bound
    assert latencies and max(latencies) < SLOW, sorted(latencies)[-5:]
