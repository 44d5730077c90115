"""A connector stand-in for relay tests: a daemon link whose streams the test answers itself.

The relay under test is real (hypercorn on 127.0.0.1, see ``relay_support.start_relay``). The
daemon side of its link is built here from the project's own driver, trio-websocket under
``mux.MuxSession(WebSocketTransport(...), Role.CONNECTOR)``, with handshake headers the test
chooses. Every stream the relay opens goes to a handler written in the test, usually through
:class:`ScriptedHttp` (h11, server side), so a test decides when each byte of a response is
written and sees exactly what reached "the daemon".

- :func:`running_relay`: a relay and a nursery for the links, torn down links first;
  :func:`relay_stacks`: as many of those as a test asks for (for a fixture).
- :func:`link_headers`: the ``/ws/relay`` handshake headers, each one replaceable or left out.
- :func:`start_stand_in` and :class:`StandIn`: a connected link serving streams with a handler;
  :meth:`StandIn.close` ends it cleanly, :meth:`StandIn.drop` loses it (TCP closed under it).
- :class:`ScriptedHttp`: the daemon side of one tunneled HTTP exchange;
  :func:`identity_handler` answers every request with who answered and what arrived;
  :class:`ScriptedWebSocket`: the daemon side of one tunneled WebSocket.
- :func:`open_browser_websocket`: a browser's WebSocket through the relay, with its headers.
- :func:`open_raw_link` and :class:`RawLink`: a link spoken frame by frame, for bad input;
  :func:`link_refusal`: dial and return the close code the relay answers with.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
import trio.testing
import wsproto
import wsproto.events as ws_events
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
)
from wsproto.connection import ConnectionState

from mux import MuxConfig, MuxSession, MuxStream, SessionClosed, WebSocketTransport
from protocol import (
    HEADER_SIZE,
    PROTOCOL_VERSION,
    Flag,
    FrameType,
    Role,
    Session,
    SessionConfig,
    encode_metadata,
)
from tests.daemon.daemon_support import Address
from tests.relay.relay_support import RelayHandle, start_relay
from tests.support.websocket import open_client_websocket

#: Where daemons connect.
LINK_PATH = "/ws/relay"
#: Largest WebSocket message a stand-in accepts (the relay writes at most 256 KiB at a time).
STAND_IN_MAX_MESSAGE = 4 * 1024 * 1024
#: Messages trio-websocket queues for a stand-in's reader (the session drains it continuously).
STAND_IN_MESSAGE_QUEUE = 4
#: Seconds a stand-in's WebSocket gets for its closing handshake.
CLOSE_TIMEOUT = 2.0
#: Bytes read from a stream at a time.
READ_SIZE = 64 * 1024
#: Seconds a relay gets, when a test ends, to close its links before they are cancelled.
STOP_TIMEOUT = 5.0
#: Seconds without any runnable task that count as "the links have taken the close in".
SETTLE_TIME = 0.02
#: Largest request body :meth:`ScriptedHttp.read_body` buffers.
MAX_SCRIPTED_BODY = 8 * 1024 * 1024
#: A stand-in's driver settings: keepalive off (the relay's own pings still get answered).
STAND_IN_MUX = MuxConfig(keepalive_interval=math.inf, handshake_timeout=5.0)

#: Header layout of every frame (protocol/_frames.py): type, flags, reserved, stream id, length.
_FRAME_HEADER = struct.Struct(">BBHII")

StreamHandler = Callable[[MuxStream], Awaitable[None]]


@attrs.frozen(kw_only=True)
class RunningStack:
    """A relay and the nursery its daemon links (stand-ins, real connectors) run in."""

    relay: RelayHandle
    links: trio.Nursery


@asynccontextmanager
async def running_relay(data_dir: Path, **settings: object) -> AsyncIterator[RunningStack]:
    """A relay (``start_relay`` with ``settings``) and a nursery for links and daemons.

    On exit the relay shuts down gracefully first (go-away, links closed with 4503, as on
    SIGTERM) while the links still run, so their WebSockets close with a full handshake; once
    the relay has stopped and the links have taken that in, the links nursery is cancelled.
    (Cancelling a live link instead cancels trio-websocket's reader with it, and the session's
    close then waits out its whole timeout for an answer nobody reads.)
    """
    stopped = trio.Event()

    async def run_relay(*, task_status: trio.TaskStatus[RelayHandle]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(await start_relay(nursery, data_dir, **settings))
        finally:
            stopped.set()

    async with trio.open_nursery() as relay_nursery:
        relay: RelayHandle = await relay_nursery.start(run_relay)
        async with trio.open_nursery() as links:
            try:
                yield RunningStack(relay=relay, links=links)
            finally:
                relay.running.shutdown()
                with trio.move_on_after(STOP_TIMEOUT):
                    await stopped.wait()
                    await trio.testing.wait_all_tasks_blocked(SETTLE_TIME)
                links.cancel_scope.cancel()


StackFactory = Callable[..., Awaitable[RunningStack]]


@asynccontextmanager
async def relay_stacks(base_dir: Path) -> AsyncIterator[StackFactory]:
    """Yield ``start``: ``await start(**settings)`` runs one more :func:`running_relay` (its
    data directory under ``base_dir``) in a task of this context, so any task may call it.
    Everything started is torn down on exit, each relay's links before the relay."""
    stop = trio.Event()
    started = 0

    async def run(
        data_dir: Path,
        settings: dict[str, object],
        *,
        task_status: trio.TaskStatus[RunningStack],
    ) -> None:
        async with running_relay(data_dir, **settings) as stack:
            task_status.started(stack)
            await stop.wait()

    async with trio.open_nursery() as nursery:

        async def start(**settings: object) -> RunningStack:
            nonlocal started
            started += 1
            stack: RunningStack = await nursery.start(run, base_dir / f"relay-{started}", settings)
            return stack

        try:
            yield start
        finally:
            stop.set()


def link_headers(
    key: str | None,
    daemon_id: str | None,
    *,
    protocol: str | None = str(PROTOCOL_VERSION),
    version: str = "test",
) -> list[tuple[bytes, bytes]]:
    """The ``/ws/relay`` handshake headers a connector sends; ``None`` leaves one out."""
    headers: list[tuple[bytes, bytes]] = []
    if key is not None:
        headers.append((b"authorization", b"Bearer " + key.encode("latin-1")))
    if daemon_id is not None:
        headers.append((b"repowire-daemon-id", daemon_id.encode("latin-1")))
    if protocol is not None:
        headers.append((b"repowire-protocol", protocol.encode("latin-1")))
    headers.append((b"repowire-version", version.encode("latin-1")))
    return headers


@asynccontextmanager
async def open_link_websocket(
    address: Address, headers: Sequence[tuple[bytes, bytes]]
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket to ``/ws/relay`` whose TCP stream this helper owns and closes."""
    async with open_client_websocket(
        address,
        LINK_PATH,
        headers=headers,
        message_queue_size=STAND_IN_MESSAGE_QUEUE,
        max_message_size=STAND_IN_MAX_MESSAGE,
        close_timeout=CLOSE_TIMEOUT,
    ) as ws:
        yield ws


async def link_refusal(address: Address, headers: Sequence[tuple[bytes, bytes]]) -> CloseReason:
    """Dial ``/ws/relay`` with ``headers`` and return how the relay closed the link.

    Fails if the relay sends anything first (a refused link must not get a session).
    """
    async with open_link_websocket(address, headers) as ws:
        try:
            message = await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            return exc.reason
        raise AssertionError(f"the relay sent {message!r} instead of closing the link")


@asynccontextmanager
async def open_browser_websocket(
    address: Address,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    max_message_size: int = STAND_IN_MAX_MESSAGE,
) -> AsyncIterator[WebSocketConnection]:
    """A browser's WebSocket through the relay (``headers``: its cookie, its Origin), on a TCP
    stream this helper owns and closes. A refused upgrade raises ConnectionRejected."""
    rejected: ConnectionRejected | None = None
    try:
        async with open_client_websocket(
            address,
            path,
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            message_queue_size=STAND_IN_MESSAGE_QUEUE,
            max_message_size=max_message_size,
            close_timeout=CLOSE_TIMEOUT,
        ) as ws:
            yield ws
    except* ConnectionRejected as group:
        # trio-websocket raises the refusal from its reader task; hand it over unwrapped.
        first = group.exceptions[0]
        assert isinstance(first, ConnectionRejected)
        rejected = first
    if rejected is not None:
        raise rejected


# ---------------------------------------------------------------------- the stand-in


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
            message_queue_size=STAND_IN_MESSAGE_QUEUE,
            max_message_size=STAND_IN_MAX_MESSAGE,
            close_timeout=CLOSE_TIMEOUT,
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


# ---------------------------------------------------------------------- scripted HTTP


class ScriptedHttp:
    """The daemon side of one tunneled HTTP/1.1 exchange, spoken with h11 on a stream.

    Call :meth:`receive_request` first; then read the body with :meth:`receive_data` (or
    :meth:`read_body`) and answer with :meth:`respond`, or piece by piece with
    :meth:`send_head`, :meth:`send_data` and :meth:`finish`. Stream errors (a reset by the
    relay, the link going down) surface as :class:`trio.BrokenResourceError`.
    """

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None
        #: Request body bytes received so far.
        self.body_received = 0

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(READ_SIZE))

    async def receive_request(self) -> h11.Request:
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            raise AssertionError(f"expected a request head, got {event!r}")
        self.request = event
        return event

    @property
    def target(self) -> str:
        assert self.request is not None
        return self.request.target.decode("latin-1")

    @property
    def method(self) -> str:
        assert self.request is not None
        return self.request.method.decode("latin-1")

    def header_values(self, name: str) -> list[str]:
        """Every value of request header ``name`` (case-insensitive), in order."""
        assert self.request is not None
        wanted = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.request.headers if k.lower() == wanted]

    def header_names(self) -> list[str]:
        assert self.request is not None
        return [k.decode("latin-1").lower() for k, _ in self.request.headers]

    async def receive_data(self) -> bytes | None:
        """The next piece of the request body (never empty), or None at its end."""
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                if not event.data:
                    continue
                self.body_received += len(event.data)
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                return None
            raise AssertionError(f"unexpected event in the request body: {event!r}")

    async def read_body(self, limit: int = MAX_SCRIPTED_BODY) -> bytes:
        body = bytearray()
        while (piece := await self.receive_data()) is not None:
            body += piece
            if len(body) > limit:
                raise AssertionError(f"request body larger than {limit} bytes")
        return bytes(body)

    async def send_head(self, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """The response head. Without a Content-Length the body goes out chunked."""
        response = h11.Response(status_code=status, headers=list(headers))
        await self.stream.send_all(self.conn.send(response) or b"")

    async def send_data(self, data: bytes) -> None:
        await self.stream.send_all(self.conn.send(h11.Data(data=data)) or b"")

    async def finish(self) -> None:
        """End the response and half-close the stream."""
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()) or b"")
        await self.stream.send_eof()

    async def respond(
        self, status: int, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """A whole response with a Content-Length."""
        await self.send_head(status, [*headers, ("content-length", str(len(body)))])
        if body:
            await self.send_data(body)
        await self.finish()

    async def respond_json(self, status: int, document: object) -> None:
        await self.respond(
            status, json.dumps(document).encode(), [("content-type", "application/json")]
        )


class ScriptedWebSocket:
    """The daemon side of one tunneled WebSocket, spoken with wsproto on a stream.

    :meth:`accept` reads the upgrade request the relay sends and accepts it; then
    :meth:`receive` returns whole messages (text as ``str``, binary as ``bytes``) or the
    peer's :class:`wsproto.events.CloseConnection` (answered at once). Pings are answered.
    """

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self.conn = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        self.request: ws_events.Request | None = None
        self._pending: list[ws_events.Event] = []

    async def _next_event(self) -> ws_events.Event:
        while not self._pending:
            data = await self.stream.receive_some(READ_SIZE)
            self.conn.receive_data(data or None)
            self._pending.extend(self.conn.events())
            if not data and not self._pending:
                raise trio.BrokenResourceError("the stream ended")
        return self._pending.pop(0)

    async def accept(self) -> ws_events.Request:
        event = await self._next_event()
        if not isinstance(event, ws_events.Request):
            raise AssertionError(f"expected an upgrade request, got {event!r}")
        self.request = event
        await self.stream.send_all(self.conn.send(ws_events.AcceptConnection()))
        return event

    def header_names(self) -> list[str]:
        assert self.request is not None
        return [bytes(k).decode("latin-1").lower() for k, _ in self.request.extra_headers]

    async def receive(self) -> str | bytes | ws_events.CloseConnection:
        text: list[str] = []
        binary: list[bytes] = []
        while True:
            event = await self._next_event()
            if isinstance(event, ws_events.TextMessage):
                text.append(event.data)
                if event.message_finished:
                    return "".join(text)
            elif isinstance(event, ws_events.BytesMessage):
                binary.append(bytes(event.data))
                if event.message_finished:
                    return b"".join(binary)
            elif isinstance(event, ws_events.Ping):
                await self.stream.send_all(self.conn.send(event.response()))
            elif isinstance(event, ws_events.CloseConnection):
                if self.conn.state is ConnectionState.REMOTE_CLOSING:
                    await self.stream.send_all(self.conn.send(event.response()))
                return event

    async def send(self, message: str | bytes) -> None:
        event: ws_events.Event = (
            ws_events.TextMessage(data=message)
            if isinstance(message, str)
            else ws_events.BytesMessage(data=message)
        )
        await self.stream.send_all(self.conn.send(event))

    async def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake with ``code``."""
        await self.stream.send_all(self.conn.send(ws_events.CloseConnection(code, reason)))


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


# ---------------------------------------------------------------------- raw frames


@attrs.frozen(kw_only=True)
class Frame:
    """One frame as it came off the link."""

    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def code(self) -> int:
        """The error code of a RESET (first 4 bytes) or GOAWAY (bytes 4 to 8)."""
        if self.type == FrameType.RESET:
            return int(struct.unpack(">I", self.payload[:4])[0])
        if self.type == FrameType.GOAWAY:
            return int(struct.unpack(">I", self.payload[4:8])[0])
        raise AssertionError(f"frame type {self.type} carries no error code")


def encode_frame(
    frame_type: int, flags: int, stream_id: int, payload: bytes = b"", *, length: int | None = None
) -> bytes:
    """One frame; ``length`` overrides the header's length field (to lie about it)."""
    declared = len(payload) if length is None else length
    return _FRAME_HEADER.pack(frame_type, flags, 0, stream_id, declared) + payload


def open_frame(stream_id: int, metadata: Mapping[str, str]) -> bytes:
    return encode_frame(FrameType.OPEN, 0, stream_id, encode_metadata(metadata))


class RawLink:
    """A daemon link spoken frame by frame over a WebSocket (no session object in between).

    Pings from the relay are answered as they are read, so a raw link stays up between steps.
    """

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._buffer = bytearray()

    async def send(self, data: bytes) -> None:
        await self.ws.send_message(data)

    async def hello(self, config: SessionConfig | None = None) -> Frame:
        """Send a connector's HELLO and return the relay's."""
        await self.send(Session(Role.CONNECTOR, config).data_to_send())
        frame = await self.next_frame()
        if frame.type != FrameType.HELLO:
            raise AssertionError(f"expected the relay's HELLO, got {frame!r}")
        return frame

    async def next_frame(self) -> Frame:
        """The next frame other than a ping; raises ConnectionClosed when the link ends."""
        while True:
            if len(self._buffer) >= HEADER_SIZE:
                frame_type, flags, _, stream_id, length = _FRAME_HEADER.unpack_from(self._buffer)
                if len(self._buffer) >= HEADER_SIZE + length:
                    payload = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
                    del self._buffer[: HEADER_SIZE + length]
                    if frame_type == FrameType.PING and not flags & Flag.ACK:
                        await self.send(encode_frame(FrameType.PING, Flag.ACK, 0, payload))
                        continue
                    return Frame(type=frame_type, flags=flags, stream_id=stream_id, payload=payload)
            message = await self.ws.get_message()
            assert isinstance(message, bytes), "the relay sent a text message on the link"
            self._buffer += message

    async def frames_until_closed(self, limit: int = 1000) -> tuple[list[Frame], CloseReason]:
        """Read frames until the relay closes the link: ``(frames, close reason)``."""
        frames: list[Frame] = []
        for _ in range(limit):
            try:
                frames.append(await self.next_frame())
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return frames, exc.reason
        raise AssertionError(f"the link was still open after {limit} frames")


@asynccontextmanager
async def open_raw_link(
    address: Address, key: str, daemon_id: str, *, handshake: bool = True
) -> AsyncIterator[RawLink]:
    """A :class:`RawLink` authenticated as ``daemon_id``; with ``handshake`` the HELLOs are
    already exchanged."""
    async with open_link_websocket(address, link_headers(key, daemon_id)) as ws:
        link = RawLink(ws)
        if handshake:
            await link.hello()
        yield link


async def scoped_relay(
    stacks: StackFactory, **settings: object
) -> tuple[RunningStack, str, tuple[str, str]]:
    """A relay, a new scope's key and a browser session cookie for that scope."""
    stack = await stacks(**settings)
    record, key = stack.relay.new_scope()
    return stack, key, stack.relay.session_cookie(record)
