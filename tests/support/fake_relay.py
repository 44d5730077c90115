"""A fake relay for connector tests: a WebSocket server standing in for ``/ws/relay``.

- :func:`start_fake_relay` and :class:`FakeRelay`: either close every link with a chosen close
  code, or run the relay side of the multiplexed session, so a test can open streams to the
  connector with any metadata and any request head.
- :func:`fake_relay_config`: connector settings for a fake relay (a key no relay issued).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import trio
import trio_websocket

from connector import ConnectorConfig
from mux import MuxConfig, MuxSession, WebSocketTransport
from protocol import Role

from .listener import LOOPBACK, LoopbackUrls
from .stack import connector_config

#: Seconds a fake relay waits for a closing handshake.
FAKE_CLOSE_TIMEOUT = 0.2
#: A key of the right shape that no relay issued.
BOGUS_KEY = "rw_" + "B" * 43


def fake_relay_config(relay_url: str, **changes: Any) -> ConnectorConfig:
    """Connector settings for a fake relay (key :data:`BOGUS_KEY`, daemon id ``laptop``):
    short timeouts and backoff, updated with ``changes``."""
    return attrs.evolve(connector_config(relay_url, BOGUS_KEY, "laptop"), **changes)


@attrs.frozen(kw_only=True)
class LinkRequest:
    """The opening handshake of one link, as the fake relay saw it."""

    path: str
    headers: dict[str, str]


class FakeRelay(LoopbackUrls):
    """A WebSocket server standing in for a relay's ``/ws/relay``.

    Start it with :func:`start_fake_relay`. With ``close_code`` it accepts each link and
    closes it at once with that code and ``close_reason``. Otherwise it runs the relay side of
    the session on each link (keepalive off, so only the connector pings) and appends it to
    ``sessions``; :meth:`session` waits for one. ``requests`` records every handshake.
    """

    def __init__(self, *, close_code: int | None = None, close_reason: str = "") -> None:
        self.close_code = close_code
        self.close_reason = close_reason
        self.requests: list[LinkRequest] = []
        self.sessions: list[MuxSession] = []
        self.port = 0
        self._new_session = trio.Event()

    async def session(self, index: int = 0) -> MuxSession:
        """The ``index``-th link session, once it has started (callers bound the wait)."""
        while len(self.sessions) <= index:
            event = self._new_session = trio.Event()
            await event.wait()
        return self.sessions[index]

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.requests.append(
            LinkRequest(
                path=request.path,
                headers={
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers
                },
            )
        )
        connection = await request.accept()
        if self.close_code is not None:
            await connection.aclose(self.close_code, self.close_reason or None)
            return
        session = MuxSession(
            _QuickCloseTransport(connection),
            Role.RELAY,
            MuxConfig(keepalive_interval=math.inf, close_timeout=FAKE_CLOSE_TIMEOUT),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            self.sessions.append(session)
            self._new_session.set()


class _QuickCloseTransport(WebSocketTransport):
    """Waits at most :data:`FAKE_CLOSE_TIMEOUT` for the closing handshake, so stopping a fake
    relay does not hold up a test."""

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        with trio.move_on_after(FAKE_CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await self.connection.aclose(code, reason or None)


async def start_fake_relay(
    nursery: trio.Nursery, *, close_code: int | None = None, close_reason: str = ""
) -> FakeRelay:
    fake = FakeRelay(close_code=close_code, close_reason=close_reason)
    server: trio_websocket.WebSocketServer = await nursery.start(_serve_websocket, fake.handle)
    fake.port = server.port
    return fake


async def _serve_websocket(
    handler: Callable[[trio_websocket.WebSocketRequest], Any],
    *,
    task_status: trio.TaskStatus[trio_websocket.WebSocketServer],
) -> None:
    await trio_websocket.serve_websocket(
        handler,
        LOOPBACK,
        0,
        None,
        message_queue_size=4,
        max_message_size=4 * 1024 * 1024,
        disconnect_timeout=1,
        task_status=task_status,
    )
