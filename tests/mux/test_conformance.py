"""The generic stream conformance checks of trio, run on MuxStream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from mux import MuxConfig, MuxSession, MuxStream, memory_transport_pair
from protocol import Role, SessionConfig


@asynccontextmanager
async def sessions(window: int = 256 * 1024) -> AsyncIterator[tuple[MuxSession, MuxSession]]:
    relay_end, connector_end = memory_transport_pair()
    config = MuxConfig(
        keepalive_interval=3600,
        protocol=SessionConfig(initial_window_size=window),
    )
    async with trio.open_nursery() as nursery:
        relay = MuxSession(relay_end, Role.RELAY, config)
        connector = MuxSession(connector_end, Role.CONNECTOR, config)
        nursery.start_soon(relay.run)
        await nursery.start(connector.run)
        yield relay, connector
        nursery.cancel_scope.cancel()


async def open_pair(relay: MuxSession, connector: MuxSession) -> tuple[MuxStream, MuxStream]:
    local = await relay.open_stream({"kind": "test"})
    # The OPEN frame travels only with data or when the writer flushes; accept waits for it.
    remote = await connector.accept_stream()
    return local, remote


async def test_check_half_closeable_stream() -> None:
    with trio.fail_after(30):
        async with sessions() as (relay, connector), sessions(window=1024) as (r2, c2):

            async def maker() -> tuple[MuxStream, MuxStream]:
                return await open_pair(relay, connector)

            async def clogged() -> tuple[MuxStream, MuxStream]:
                left, right = await open_pair(r2, c2)
                # Spend the whole window both ways: the next send blocks until the peer reads.
                await left.send_all(b"x" * 1024)
                await right.send_all(b"x" * 1024)
                return left, right

            await trio.testing.check_half_closeable_stream(maker, clogged)
