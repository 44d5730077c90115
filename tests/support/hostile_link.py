"""A hostile daemon link: a peer holding a valid key that speaks ``/ws/relay`` by hand.

:class:`HostileLink` is wsproto over a raw trio socket, with frames from the sans-IO
``protocol`` package, so the test decides how and whether it reads: normally, one byte at a
time, or never. :func:`expected_failures` swallows what a hostile side normally meets (the
relay cut the link, refused the stream, answered nonsense or nothing). The scenarios that drive
it are :mod:`tests.support.hostile_scenarios`; the seeded run, :mod:`tests.support.hostile`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Final

import h11
import trio
import trio_websocket
import wsproto
import wsproto.events as ws_events
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError

from protocol import DataReceived as MuxDataReceived
from protocol import ErrorCode, ProtocolError, Role, Session, StreamState
from protocol import StreamOpened as MuxStreamOpened

from .links import LINK_PATH, link_headers
from .listener import Address

KIB: Final = 1024
MIB: Final = 1024 * KIB
#: Largest WebSocket message the hostile link writes (SPEC.md: "at or below 1 MiB").
MAX_LINK_MESSAGE: Final = 1 * MIB
#: Bytes a normal read takes from the socket.
READ_SIZE: Final = 64 * KIB
#: Reads a reader makes at most in one scenario (one byte each when trickling).
MAX_READS: Final = 200_000
#: Request bytes kept per stream (enough for a head; the rest is counted and dropped).
MAX_KEPT_REQUEST: Final = 16 * KIB
#: Seconds a hostile link's WebSocket handshake may take.
HANDSHAKE_TIMEOUT: Final = 5.0


class LinkClosed(Exception):
    """The hostile link ended (the relay closed it or refused it)."""


#: Errors that are a hostile side's normal lot: the relay cut the link, refused the stream,
#: answered nonsense or nothing. Anything else escaping a scenario is a harness bug.
EXPECTED: Final = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    h11.ProtocolError,
    WsLocalProtocolError,
    ProtocolError,
    trio_websocket.ConnectionClosed,
    trio_websocket.ConnectionRejected,
    trio_websocket.HandshakeError,
    LinkClosed,
)


@contextlib.contextmanager
def expected_failures() -> Iterator[None]:
    """Swallow what :data:`EXPECTED` lists, raised alone or in exception groups (Python 3.11's
    ``contextlib.suppress`` does not look into groups); anything else goes on."""
    try:
        yield
    except* EXPECTED:
        pass


class HostileLink:
    """A daemon link spoken by hand: wsproto over a trio socket, frames written by the test.

    A :class:`protocol.Session` in the connector role follows what the relay sends while the
    link is read (it answers the relay's pings and grants window credit); :attr:`desynced`
    turns true once the test's own raw frames make that bookkeeping meaningless, after which
    incoming bytes are read and dropped. Streams the relay opens are listed in :attr:`opened`;
    the request bytes of each (at most :data:`MAX_KEPT_REQUEST`) are in :attr:`requests`.
    """

    def __init__(self, tcp: trio.SocketStream) -> None:
        self.tcp = tcp
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.session = Session(Role.CONNECTOR)
        self.desynced = False
        self.closed = False
        self.opened: list[int] = []
        self.requests: dict[int, bytearray] = {}
        self.new_stream = trio.Event()
        self._send_lock = trio.Lock()

    async def handshake(self, host: str, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """The WebSocket upgrade to ``/ws/relay``; raises :data:`LinkClosed` if refused."""
        request = ws_events.Request(host=host, target=LINK_PATH, extra_headers=list(headers))
        await self.tcp.send_all(self.ws.send(request))
        for _ in range(MAX_READS):
            data = await self.tcp.receive_some(READ_SIZE)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, ws_events.AcceptConnection):
                    # Bytes after the 101 (the relay's HELLO) stay in wsproto's buffer.
                    return
                if isinstance(event, ws_events.RejectConnection):
                    raise LinkClosed("the relay refused the link")
            if not data:
                raise LinkClosed("the relay closed the connection during the handshake")
        raise LinkClosed("no handshake answer")

    async def send_raw(self, data: bytes) -> None:
        """Protocol bytes in binary messages of at most :data:`MAX_LINK_MESSAGE`."""
        async with self._send_lock:
            for start in range(0, max(len(data), 1), MAX_LINK_MESSAGE):
                piece = data[start : start + MAX_LINK_MESSAGE]
                await self.tcp.send_all(self.ws.send(ws_events.BytesMessage(data=piece)))

    async def flush(self) -> None:
        """Write what the session has queued (pongs, credit, the test's frames)."""
        data = self.session.data_to_send()
        if data:
            await self.send_raw(data)

    async def hello(self) -> None:
        """Send the connector's HELLO (the session's first output)."""
        await self.flush()

    async def pump(self, size: int = READ_SIZE) -> None:
        """One read of at most ``size`` bytes, taken in: WebSocket pings and closes answered,
        protocol bytes fed to the session, its answers written. Raises :data:`LinkClosed` at
        the end of the link."""
        if self.closed:
            raise LinkClosed("the link has ended")
        data = await self.tcp.receive_some(size)
        if not data:
            self.closed = True
            raise LinkClosed("the relay closed the connection")
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, ws_events.BytesMessage):
                self._take(bytes(event.data))
            elif isinstance(event, ws_events.Ping):
                async with self._send_lock:
                    await self.tcp.send_all(self.ws.send(event.response()))
            elif isinstance(event, ws_events.CloseConnection):
                self.closed = True
                with expected_failures():
                    async with self._send_lock:
                        await self.tcp.send_all(self.ws.send(event.response()))
                raise LinkClosed(f"the relay closed the link with {event.code}")
        if not self.desynced:
            await self.flush()

    def _take(self, data: bytes) -> None:
        if self.desynced:
            return
        try:
            events = self.session.receive_data(data)
        except ProtocolError:
            self.desynced = True
            return
        for event in events:
            if isinstance(event, MuxStreamOpened):
                self.session.accept_stream(event.stream_id)
                self.opened.append(event.stream_id)
                self.requests[event.stream_id] = bytearray()
                self.new_stream.set()
                self.new_stream = trio.Event()
            elif isinstance(event, MuxDataReceived):
                kept = self.requests.setdefault(event.stream_id, bytearray())
                if len(kept) < MAX_KEPT_REQUEST:
                    kept += event.data[: MAX_KEPT_REQUEST - len(kept)]
                with contextlib.suppress(ProtocolError):
                    self.session.acknowledge_received_data(event.stream_id, len(event.data))

    async def read_forever(self, size: int = READ_SIZE) -> None:
        """Keep reading (``size`` bytes at a time: 1 is the trickling reader) until the link
        ends or :data:`MAX_READS` reads; ends quietly either way."""
        with expected_failures():
            for _ in range(MAX_READS):
                await self.pump(size)

    async def next_stream(self) -> int:
        """The id of the next stream the relay opens (the link must be read meanwhile)."""
        seen = len(self.opened)
        while len(self.opened) <= seen:
            await self.new_stream.wait()
        return self.opened[seen]

    async def send_stream(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """Write ``data`` on a stream as its window allows (waiting for credit, which needs
        the link read meanwhile); :data:`LinkClosed` if the stream can no longer send."""
        view = memoryview(data)
        sent = 0
        for _ in range(MAX_READS):
            window = self.session.local_flow_control_window(stream_id)
            if window <= 0:
                if self.closed or self.session.stream_state(stream_id) is StreamState.CLOSED:
                    raise LinkClosed(f"stream {stream_id} is closed")
                await trio.sleep(0.01)
                continue
            take = min(window, len(data) - sent)
            last = sent + take >= len(data)
            self.session.send_data(
                stream_id, view[sent : sent + take].tobytes(), end_stream=end and last
            )
            sent += take
            await self.flush()
            if last:
                return
        raise LinkClosed(f"stream {stream_id} never got the credit it needed")

    def reset(self, stream_id: int) -> None:
        self.session.reset_stream(stream_id, ErrorCode.CANCEL)


@asynccontextmanager
async def open_hostile_link(
    address: Address, key: str, daemon_id: str, *, hello: bool = True
) -> AsyncIterator[HostileLink]:
    """A :class:`HostileLink` authenticated as ``daemon_id`` (its HELLO sent unless ``hello``
    is false). The socket is closed on exit, without a closing handshake."""
    tcp = await trio.open_tcp_stream(*address)
    async with tcp:
        link = HostileLink(tcp)
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await link.handshake(f"{address[0]}:{address[1]}", link_headers(key, daemon_id))
        if hello:
            await link.hello()
        yield link
