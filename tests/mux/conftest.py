from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from mux import MuxConfig, MuxSession, memory_transport_pair
from protocol import Role


@pytest.fixture
async def session_pair() -> AsyncIterator[tuple[MuxSession, MuxSession]]:
    """A relay-role and a connector-role session joined by an in-memory transport."""
    relay_end, connector_end = memory_transport_pair()
    config = MuxConfig(keepalive_interval=3600)
    async with trio.open_nursery() as nursery:
        relay = MuxSession(relay_end, Role.RELAY, config)
        connector = MuxSession(connector_end, Role.CONNECTOR, config)
        nursery.start_soon(relay.run)
        nursery.start_soon(connector.run)
        try:
            yield relay, connector
        finally:
            nursery.cancel_scope.cancel()
