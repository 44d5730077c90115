"""A connector stand-in for relay tests: a daemon link whose streams the test answers itself.

The relay under test is real (:mod:`tests.support.relays`). The daemon side of its link is
built here from the project's own driver, trio-websocket under
``mux.MuxSession(WebSocketTransport(...), Role.CONNECTOR)``, with handshake headers the test
chooses. Every stream the relay opens goes to a handler written in the test, usually through
:class:`tests.support.scripted.ScriptedHttp`.

- :func:`start_stand_in` and :class:`StandIn`: a connected link serving streams with a handler;
  :meth:`StandIn.close` ends it cleanly, :meth:`StandIn.drop` loses it (TCP closed under it).
- :func:`identity_handler` answers every request with who answered and what arrived;
  :func:`hold_stream` keeps every stream open.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import attrs
import trio
from trio_websocket import WebSocketConnection

from mux import MuxConfig, MuxSession, MuxStream, SessionClosed, WebSocketTransport
from protocol import Role

from .links import LINK_MAX_MESSAGE, LINK_MESSAGE_QUEUE, LINK_PATH, link_headers
from .listener import Address
from .scripted import ScriptedHttp
from .websocket import WS_CLOSE_TIMEOUT, open_client_websocket

#: A stand-in's driver settings: keepalive off (the relay's own pings still get answered).
STAND_IN_MUX = MuxConfig(keepalive_interval=math.inf, handshake_timeout=5.0)

StreamHandler = Callable[[MuxStream], Awaitable[None]]


@attrs.define(eq=False, kw_only=True)
class StandIn:
    """A connected daemon link served by a test's handler (see :func:`start_stand_in`)."""

    daemon_id: str
    session: MuxSession
    connection: WebSocketConnection
    #: Set once the link and every handler task have ended.
    finished: trio.Event
    #: Streams the relay opened, in order.
    accepted: list[MuxStream] = attrs.Factory(list)
    _tcp: trio.SocketStream

    @property
    def close_code(self) -> int | None:
        """The WebSocket close code the relay ended the link with (None if it did not)."""
        closed = self.session.transport_closed
        return closed.code if closed is not None else None

    async def close(self, code: int = 1000, reason: str = "stand-in closing") -> None:
        """End the link cleanly (WebSocket close ``code``) and wait until it is down."""
        await self.session.aclose(code, reason)
        await self.finished.wait()

    async def drop(self) -> None:
        """Lose the link abruptly: the TCP connection is closed under the WebSocket, as when
        the daemon's machine goes away. Returns once the stand-in is down."""
        await trio.aclose_forcefully(self._tcp)
        await self.finished.wait()


async def start_stand_in(
    nursery: trio.Nursery,
    address: Address,
    key: str,
    daemon_id: str,
    handler: StreamHandler,
    *,
    headers: Sequence[tuple[bytes, bytes]] | None = None,
    mux_config: MuxConfig = STAND_IN_MUX,
    hello_delay: float = 0.0,
) -> StandIn:
    """Connect a stand-in daemon ``daemon_id`` with ``key``; each accepted stream runs
    ``handler(stream)`` in its own task (the stream is closed when the handler returns).

    Returns once the link's session is up on the stand-in's side (it has the relay's HELLO).
    ``hello_delay`` holds the stand-in's own first message (its HELLO) back that long, so the
    relay is still in the handshake when this returns. ``headers`` replaces
    :func:`link_headers`. An exception escaping a handler fails the test through ``nursery``.
    """
    chosen = list(headers) if headers is not None else link_headers(key, daemon_id)
    stand_in: StandIn = await nursery.start(
        partial(_run_stand_in, address, chosen, daemon_id, handler, mux_config, hello_delay)
    )
    return stand_in


async def _run_stand_in(
    address: Address,
    headers: list[tuple[bytes, bytes]],
    daemon_id: str,
    handler: StreamHandler,
    mux_config: MuxConfig,
    hello_delay: float,
    *,
    task_status: trio.TaskStatus[StandIn],
) -> None:
    finished = trio.Event()
    try:
        tcp = await trio.open_tcp_stream(*address)
        async with open_client_websocket(
            tcp,
            LINK_PATH,
            host=f"{address[0]}:{address[1]}",
            headers=headers,
            message_queue_size=LINK_MESSAGE_QUEUE,
            max_message_size=LINK_MAX_MESSAGE,
            close_timeout=WS_CLOSE_TIMEOUT,
        ) as ws:
            transport = (
                _LateFirstMessage(ws, hello_delay) if hello_delay else WebSocketTransport(ws)
            )
            session = MuxSession(transport, Role.CONNECTOR, mux_config)
            async with trio.open_nursery() as link_nursery:
                await link_nursery.start(session.run)
                stand_in = StandIn(
                    daemon_id=daemon_id,
                    session=session,
                    connection=ws,
                    finished=finished,
                    tcp=tcp,
                )
                link_nursery.start_soon(_accept_streams, stand_in, handler)
                task_status.started(stand_in)
                await session.wait_ended()
                link_nursery.cancel_scope.cancel()
    finally:
        finished.set()


class _LateFirstMessage(WebSocketTransport):
    """A transport that holds its first message (a connector's HELLO) back for a while."""

    def __init__(self, connection: WebSocketConnection, delay: float) -> None:
        super().__init__(connection)
        self._delay: float | None = delay

    async def send_message(self, data: bytes) -> None:
        if self._delay is not None:
            delay, self._delay = self._delay, None
            await trio.sleep(delay)
        await super().send_message(data)


async def _accept_streams(stand_in: StandIn, handler: StreamHandler) -> None:
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await stand_in.session.accept_stream()
            except SessionClosed:
                return
            stand_in.accepted.append(stream)
            nursery.start_soon(_serve_stream, handler, stream)


async def _serve_stream(handler: StreamHandler, stream: MuxStream) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def hold_stream(stream: MuxStream) -> None:
    """A handler that keeps every stream open, reading nothing, until the test ends."""
    await trio.sleep_forever()


@attrs.frozen(kw_only=True)
class SeenRequest:
    """What a stand-in's :func:`identity_handler` received."""

    daemon: str
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


def identity_handler(label: str, seen: list[SeenRequest] | None = None) -> StreamHandler:
    """A handler answering every HTTP request with ``200 {"daemon": label, "method", "target"}``
    after reading the whole body; each request is appended to ``seen``. A stream the relay
    resets (the browser left, the body was refused) just ends."""

    async def handler(stream: MuxStream) -> None:
        exchange = ScriptedHttp(stream)
        try:
            request = await exchange.receive_request()
            body = await exchange.read_body()
        except trio.BrokenResourceError:
            return
        if seen is not None:
            seen.append(
                SeenRequest(
                    daemon=label,
                    method=exchange.method,
                    target=exchange.target,
                    headers=tuple(
                        (k.decode("latin-1").lower(), v.decode("latin-1"))
                        for k, v in request.headers
                    ),
                    body=body,
                )
            )
        with contextlib.suppress(trio.BrokenResourceError):
            await exchange.respond_json(
                200, {"daemon": label, "method": exchange.method, "target": exchange.target}
            )

    return handler
