"""A hostile connector: a peer holding a valid key that drives a relay process with adversarial
sequences over a real socket, while a second tenant makes ordinary requests beside it.

- :class:`HostileLink`: one daemon link spoken by hand (wsproto over a raw trio socket, frames
  from the sans-IO ``protocol`` package), so the test decides how and whether it reads: normally,
  one byte at a time, or never.
- :data:`SCENARIOS`: the adversarial sequences, each a small async function of a
  :class:`Scenario` (random and mutated frames, floods of each frame type with each reading
  mode, streams reset at random points, malformed HTTP answers, never-ending bodies, a big POST
  answered then reset, WebSocket upgrades sending huge messages).
- :func:`run_fuzz`: a seeded run against a running relay process for a given time, with
  :data:`HOSTILE_SLOTS` hostile links at once, the relay's memory sampled from ``/proc``, its
  ``/health`` checked and its log searched for escaped exceptions (:class:`LogWatch`) after
  every scenario, and the second tenant's requests timed; the outcome is a
  :class:`FuzzReport`. :func:`fuzz_relay_process` sets the whole thing up (relay process,
  keys, the tenant's daemon) in a :class:`tests.e2e.fault_support.Lab`.

Everything is on loopback, every loop is bounded by a count and every wait by a deadline. Keys
and cookies stay in memory: nothing here prints them, and reports name scenarios and seeds only.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import attrs
import h11
import trio
import trio_websocket
import wsproto
import wsproto.events as ws_events
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError

from protocol import DataReceived as MuxDataReceived
from protocol import (
    ErrorCode,
    Flag,
    FrameType,
    ProtocolError,
    Role,
    Session,
    StreamState,
    encode_metadata,
)
from protocol import StreamOpened as MuxStreamOpened
from tests.daemon.daemon_support import Address, http_request, open_http_stream
from tests.e2e.fault_support import Lab, RelayProcess, form_body, percentile, sign_in
from tests.relay.link_support import LINK_PATH, encode_frame, link_headers, open_browser_websocket

KIB: Final = 1024
MIB: Final = 1024 * KIB

#: Environment variable: seconds of fuzzing (setup not counted).
SECONDS_VARIABLE: Final = "REPOWIRE_FUZZ_SECONDS"
#: Environment variable: the seed of the run.
SEED_VARIABLE: Final = "REPOWIRE_FUZZ_SEED"
#: Seconds of fuzzing when :data:`SECONDS_VARIABLE` is not set (what CI runs).
DEFAULT_SECONDS: Final = 60.0
#: The seed when :data:`SEED_VARIABLE` is not set (CI's fixed seed).
DEFAULT_SEED: Final = 20261205

#: Hostile links driving the relay at the same time (each runs one scenario after another).
HOSTILE_SLOTS: Final = 3
#: Longest a scenario may run, seconds; it is cancelled then, as a normal end.
SCENARIO_TIMEOUT: Final = 4.0
#: Most scenarios one slot runs (a backstop: the run's duration ends it first).
MAX_SCENARIOS_PER_SLOT: Final = 10_000
#: Frames a flood sends at most, and frames packed in one WebSocket message of a flood.
FLOOD_FRAMES: Final = 1_000_000
FLOOD_BATCH: Final = 500
#: Random or mutated frames one scenario sends at most.
RANDOM_FRAMES: Final = 300
#: Largest payload of a random frame, bytes.
RANDOM_PAYLOAD: Final = 2 * KIB
#: Largest WebSocket message the hostile link writes (SPEC.md: "at or below 1 MiB").
MAX_LINK_MESSAGE: Final = 1 * MIB
#: Bytes a normal read takes from the socket.
READ_SIZE: Final = 64 * KIB
#: Reads a reader makes at most in one scenario (one byte each when trickling).
MAX_READS: Final = 200_000
#: Request bytes kept per stream (enough for a head; the rest is counted and dropped).
MAX_KEPT_REQUEST: Final = 16 * KIB
#: Browser requests one scenario makes towards the hostile daemon.
BROWSER_REQUESTS: Final = 6
#: Seconds a browser request of the hostile scope may take before it is abandoned.
BROWSER_TIMEOUT: Final = 3.0
#: Seconds a slow browser pauses after each piece of a body it reads.
SLOW_READ_PAUSE: Final = 0.05
#: Body of the big POSTs, bytes (larger than one stream window, so the relay is mid-upload).
BIG_POST: Final = 2 * MIB
#: Bytes of a huge tunneled WebSocket message (four times the relay's default message cap).
HUGE_WS_MESSAGE: Final = 16 * MIB
#: Content-Length an endless body announces (it never gets there).
ENDLESS_LENGTH: Final = 1 << 40
#: Bytes of response body written per DATA chunk of a hostile answer.
BODY_CHUNK: Final = 32 * KIB
#: Body bytes a hostile answer writes at most (a backstop behind SCENARIO_TIMEOUT).
MAX_BODY_WRITTEN: Final = 256 * MIB
#: Seconds between two requests of the second tenant.
TENANT_INTERVAL: Final = 0.02
#: Seconds one request of the second tenant may take before it counts as failed.
TENANT_TIMEOUT: Final = 5.0
#: Most requests the second tenant makes (a backstop behind the run's duration).
MAX_TENANT_REQUESTS: Final = 100_000
#: Seconds between two samples of the relay's memory.
RSS_INTERVAL: Final = 0.1
#: Seconds the relay's ``/health`` may take after a scenario.
HEALTH_TIMEOUT: Final = 3.0
#: Seconds a hostile link's WebSocket handshake may take.
HANDSHAKE_TIMEOUT: Final = 5.0
#: Most bytes of the relay's log read per check.
MAX_LOG_READ: Final = 8 * MIB
#: Sign-in attempts while the hostile link comes up, and the seconds between them (the
#: relay's auth limit allows a burst of 10 per address).
SIGN_IN_TRIES: Final = 5
SIGN_IN_INTERVAL: Final = 0.3
#: Most failures a report keeps (each names the seed and scenario).
MAX_FAILURES: Final = 50


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


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


# ---------------------------------------------------------------------- the hostile link


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


# ---------------------------------------------------------------------- scenarios


@attrs.define(kw_only=True)
class Target:
    """What the hostile side holds: the relay's address, its key, its browser cookie."""

    address: Address
    key: str
    cookie: tuple[str, str]
    origin: tuple[str, str]


@attrs.define(kw_only=True)
class Scenario:
    """One run of one scenario: its random source, target and hostile daemon id."""

    rng: random.Random
    target: Target
    daemon_id: str
    #: Browser requests the scenario made towards the hostile daemon, and how many got an
    #: answer head (any status).
    browsed: int = 0
    answered: int = 0

    @asynccontextmanager
    async def link(self, *, hello: bool = True) -> AsyncIterator[HostileLink]:
        async with open_hostile_link(
            self.target.address, self.target.key, self.daemon_id, hello=hello
        ) as link:
            yield link

    async def browse(
        self,
        method: str = "GET",
        path: str = "/x",
        body: bytes | None = None,
        *,
        reader: str = "normal",
        read_limit: int = 4 * MIB,
    ) -> None:
        """A browser request of the hostile scope to the hostile daemon, abandoned after
        :data:`BROWSER_TIMEOUT`; any failure is its normal lot. ``reader`` is "normal",
        "slow" (a pause of :data:`SLOW_READ_PAUSE` after every piece read) or "never" (the
        body is never read); ``read_limit`` bounds what is read."""
        self.browsed += 1
        headers = [self.target.cookie]
        with trio.move_on_after(BROWSER_TIMEOUT), expected_failures():
            async with open_http_stream(
                self.target.address,
                method,
                f"/d/{self.daemon_id}{path}",
                body=body,
                headers=headers,
            ) as response:
                self.answered += 1
                if reader == "never":
                    await trio.sleep(BROWSER_TIMEOUT)
                    return
                received = 0
                while received < read_limit:
                    chunk = await response.read_chunk()
                    if chunk is None:
                        return
                    received += len(chunk)
                    if reader == "slow":
                        await trio.sleep(SLOW_READ_PAUSE)

    async def websocket(self, messages: int) -> None:
        """A browser WebSocket of the hostile scope to the hostile daemon that reads up to
        ``messages`` messages; any failure is its normal lot."""
        self.browsed += 1
        with trio.move_on_after(BROWSER_TIMEOUT), expected_failures():
            async with open_browser_websocket(
                self.target.address,
                f"/d/{self.daemon_id}/ws",
                [self.target.cookie, self.target.origin],
            ) as ws:
                self.answered += 1
                for _ in range(messages):
                    await ws.get_message()


ScenarioFunction = Callable[[Scenario], Awaitable[None]]


def random_frame(rng: random.Random) -> bytes:
    """A frame with a random header (any type, flags, reserved bits, stream id) and a payload
    whose length may disagree with its header."""
    payload = rng.randbytes(rng.randrange(RANDOM_PAYLOAD))
    header = struct.pack(
        ">BBHII",
        rng.choice([rng.randrange(256), rng.randrange(8)]),
        rng.randrange(256) if rng.random() < 0.3 else rng.choice([0, Flag.FIN, Flag.ACK]),
        0 if rng.random() < 0.8 else rng.randrange(65536),
        rng.choice([0, 1, 2, 3, rng.randrange(1, 1000), rng.randrange(2**32)]),
        rng.choice([len(payload), rng.randrange(2**32), rng.randrange(len(payload) + 1)]),
    )
    return header + payload


def valid_frame(rng: random.Random, next_odd: int) -> bytes:
    """A well-formed frame of a random type, as the protocol's encoder lays it out."""
    kind = rng.choice(list(FrameType))
    if kind is FrameType.HELLO:
        return Session(Role.CONNECTOR).data_to_send()
    if kind is FrameType.OPEN:
        return encode_frame(kind, 0, next_odd, encode_metadata({"kind": "mesh", "target": "x"}))
    if kind is FrameType.DATA:
        return encode_frame(kind, rng.choice([0, Flag.FIN]), next_odd, rng.randbytes(64))
    if kind is FrameType.WINDOW_UPDATE:
        return encode_frame(kind, 0, rng.choice([0, next_odd]), _U32.pack(rng.randrange(1, 4096)))
    if kind is FrameType.RESET:
        return encode_frame(kind, 0, next_odd, _U32.pack(ErrorCode.CANCEL))
    if kind is FrameType.PING:
        return encode_frame(kind, 0, 0, _U64.pack(rng.randrange(2**64)))
    return encode_frame(kind, 0, 0, struct.pack(">II", 0, 0) + b"bye")


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """``frame`` with one to three bytes changed, a byte inserted or it cut short."""
    data = bytearray(frame)
    choice = rng.random()
    if choice < 0.6 and data:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice < 0.8:
        data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
    elif data:
        del data[rng.randrange(len(data)) :]
    return bytes(data)


async def scenario_random_frames(run: Scenario) -> None:
    """Random frames (headers and lengths lying) right after the HELLO, the link read."""
    async with run.link() as link, trio.open_nursery() as nursery:
        nursery.start_soon(link.read_forever)
        for _ in range(run.rng.randrange(1, RANDOM_FRAMES)):
            await link.send_raw(random_frame(run.rng))
            if link.closed:
                break
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()


async def scenario_mutated_frames(run: Scenario) -> None:
    """Valid frames from the encoder, some with bytes flipped, inserted or cut; sometimes the
    HELLO itself is the mutated one."""
    async with run.link(hello=False) as link, trio.open_nursery() as nursery:
        nursery.start_soon(link.read_forever)
        hello = link.session.data_to_send()
        await link.send_raw(mutate(run.rng, hello) if run.rng.random() < 0.2 else hello)
        link.desynced = True
        odd = 1
        for _ in range(run.rng.randrange(1, RANDOM_FRAMES)):
            frame = valid_frame(run.rng, odd)
            if frame[0] == FrameType.OPEN:
                odd += 2
            await link.send_raw(mutate(run.rng, frame) if run.rng.random() < 0.3 else frame)
            if link.closed:
                break
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()


def flood_frame(frame_type: FrameType, index: int, rng: random.Random) -> bytes:
    """The ``index``-th frame of a flood of ``frame_type`` (valid where it can be)."""
    odd = 2 * index + 1
    if frame_type is FrameType.PING:
        return encode_frame(FrameType.PING, 0, 0, _U64.pack(index))
    if frame_type is FrameType.WINDOW_UPDATE:
        return encode_frame(FrameType.WINDOW_UPDATE, 0, 0, _U32.pack(1))
    if frame_type is FrameType.OPEN:
        metadata = encode_metadata({"kind": "mesh", "target": f"nobody-{rng.randrange(9)}"})
        return encode_frame(FrameType.OPEN, 0, odd, metadata)
    if frame_type is FrameType.RESET:
        return encode_frame(FrameType.RESET, 0, 1, _U32.pack(ErrorCode.CANCEL))
    if frame_type is FrameType.DATA:
        return encode_frame(FrameType.DATA, 0, 1, b"")
    if frame_type is FrameType.GOAWAY:
        return encode_frame(FrameType.GOAWAY, 0, 0, struct.pack(">II", 0, 0) + b"x" * 1024)
    return Session(Role.CONNECTOR).data_to_send()


def make_flood(frame_type: FrameType, reading: str) -> ScenarioFunction:
    """A flood of ``frame_type`` frames, :data:`FLOOD_BATCH` per message, up to
    :data:`FLOOD_FRAMES`, while the link is read ``reading``: "normal", "trickle" (a byte per
    read) or "never". Streams the flood's DATA and RESET frames name are opened first."""

    async def flood(run: Scenario) -> None:
        async with run.link() as link, trio.open_nursery() as nursery:
            if reading != "never":
                nursery.start_soon(link.read_forever, 1 if reading == "trickle" else READ_SIZE)
            if frame_type in (FrameType.DATA, FrameType.RESET):
                await link.send_raw(
                    encode_frame(FrameType.OPEN, 0, 1, encode_metadata({"kind": "mesh"}))
                )
            link.desynced = True
            sent = 0
            while sent < FLOOD_FRAMES and not link.closed:
                batch = b"".join(
                    flood_frame(frame_type, sent + i, run.rng) for i in range(FLOOD_BATCH)
                )
                await link.send_raw(batch)
                sent += FLOOD_BATCH
            nursery.cancel_scope.cancel()

    flood.__name__ = f"flood_{frame_type.name.lower()}_{reading}"
    return flood


async def _answer_streams(
    run: Scenario,
    link: HostileLink,
    answer: Callable[[HostileLink, int], Awaitable[None]],
) -> None:
    """Run ``answer(link, stream_id)`` for each stream the relay opens, each in its task."""
    async with trio.open_nursery() as nursery:
        for _ in range(BROWSER_REQUESTS * 4):
            stream_id = await link.next_stream()

            async def one(stream_id: int = stream_id) -> None:
                with expected_failures():
                    await answer(link, stream_id)

            nursery.start_soon(one)


async def _request_head_arrived(link: HostileLink, stream_id: int) -> None:
    for _ in range(MAX_READS):
        if b"\r\n\r\n" in link.requests.get(stream_id, b"") or link.closed:
            return
        await trio.sleep(0.01)


async def _with_browsers(
    run: Scenario,
    answer: Callable[[HostileLink, int], Awaitable[None]],
    browser: Callable[[], Awaitable[None]],
    *,
    reading: int = READ_SIZE,
) -> None:
    """A hostile link answering with ``answer`` while :data:`BROWSER_REQUESTS` browsers run
    ``browser`` (a few at a time); ends when the browsers are done."""
    async with run.link() as link, trio.open_nursery() as nursery:
        nursery.start_soon(link.read_forever, reading)
        nursery.start_soon(_answer_streams, run, link, answer)
        async with trio.open_nursery() as browsers:
            for _ in range(BROWSER_REQUESTS):
                browsers.start_soon(browser)
                await trio.sleep(run.rng.random() * 0.1)
        nursery.cancel_scope.cancel()


MALFORMED_ANSWERS: Final = (
    b"garbage\r\n\r\n",
    b"HTTP/1.1 999999999999 Nope\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n0123456789",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (256 * KIB) + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-Many: b\r\n" * 20_000 + b"\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x00\xff" * 3,
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nFolded: a\r\n b\r\n\r\n",
    b"\x00" * 4096,
)


async def scenario_malformed_http(run: Scenario) -> None:
    """Every request answered with a malformed HTTP response (or random bytes), then FIN or
    a reset."""

    async def answer(link: HostileLink, stream_id: int) -> None:
        await _request_head_arrived(link, stream_id)
        if run.rng.random() < 0.2:
            data = run.rng.randbytes(run.rng.randrange(1, 64 * KIB))
        else:
            data = run.rng.choice(MALFORMED_ANSWERS)
        end = run.rng.random() < 0.7
        await link.send_stream(stream_id, data, end=end)
        if not end:
            link.reset(stream_id)
            await link.flush()

    await _with_browsers(run, answer, run.browse)


async def scenario_reset_at_random_points(run: Scenario) -> None:
    """Streams reset at a random point: at once, after the request head, after part of a
    response head, after the head, in the middle of the body; browsers GET and POST."""

    async def answer(link: HostileLink, stream_id: int) -> None:
        point = run.rng.randrange(5)
        if point >= 1:
            await _request_head_arrived(link, stream_id)
        if point == 2:
            await link.send_stream(stream_id, b"HTTP/1.1 200 OK\r\nContent-Le")
        if point >= 3:
            await link.send_stream(stream_id, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        if point == 4:
            await link.send_stream(stream_id, b"x" * run.rng.randrange(1, 90_000))
        link.reset(stream_id)
        await link.flush()

    async def browser() -> None:
        if run.rng.random() < 0.5:
            await run.browse("POST", "/upload", run.rng.randbytes(run.rng.randrange(1, 512 * KIB)))
        else:
            await run.browse()

    await _with_browsers(run, answer, browser)


async def scenario_big_post_then_reset(run: Scenario) -> None:
    """A big POST answered at once (a whole 200) before its body is read, then the stream
    reset while the relay is still uploading the body."""

    async def answer(link: HostileLink, stream_id: int) -> None:
        await _request_head_arrived(link, stream_id)
        await link.send_stream(stream_id, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await trio.sleep(run.rng.random() * 0.05)
        link.reset(stream_id)
        await link.flush()

    await _with_browsers(run, answer, lambda: run.browse("POST", "/upload", bytes(BIG_POST)))


async def _endless_body(run: Scenario, link: HostileLink, stream_id: int) -> None:
    await _request_head_arrived(link, stream_id)
    if run.rng.random() < 0.5:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"%x\r\n" % BODY_CHUNK + b"z" * BODY_CHUNK + b"\r\n"
    else:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % ENDLESS_LENGTH
        chunk = b"z" * BODY_CHUNK
    await link.send_stream(stream_id, head)
    for _ in range(MAX_BODY_WRITTEN // BODY_CHUNK):
        await link.send_stream(stream_id, chunk)


async def scenario_endless_body(run: Scenario) -> None:
    """Never-ending response bodies (chunked, or a Content-Length of a terabyte) to browsers
    that read normally, a byte at a time, or never."""

    async def browser() -> None:
        await run.browse(reader=run.rng.choice(["normal", "slow", "never"]), read_limit=64 * MIB)

    await _with_browsers(run, lambda link, sid: _endless_body(run, link, sid), browser)


async def scenario_trickle_reader(run: Scenario) -> None:
    """A link that reads one byte at a time while browsers POST to it and it answers with
    endless bodies."""

    async def browser() -> None:
        await run.browse("POST", "/upload", bytes(256 * KIB))

    await _with_browsers(run, lambda link, sid: _endless_body(run, link, sid), browser, reading=1)


async def scenario_never_reads_streams(run: Scenario) -> None:
    """Browsers POST to a link that never reads at all (the relay's stream opens, bodies and
    pings pile up towards a peer that takes nothing)."""
    async with run.link(), trio.open_nursery() as browsers:
        for _ in range(BROWSER_REQUESTS):
            browsers.start_soon(run.browse, "POST", "/upload", bytes(BIG_POST))


async def scenario_websocket_huge(run: Scenario) -> None:
    """Tunneled WebSockets accepted by the hostile daemon, which then sends one huge message
    (beyond the relay's message cap), or a fragmented message that never ends."""

    async def answer(link: HostileLink, stream_id: int) -> None:
        await _request_head_arrived(link, stream_id)
        server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        server.receive_data(bytes(link.requests[stream_id]))
        accepted = False
        for event in server.events():
            if isinstance(event, ws_events.Request):
                await link.send_stream(stream_id, server.send(ws_events.AcceptConnection()))
                accepted = True
        if not accepted:
            link.reset(stream_id)
            await link.flush()
            return
        if run.rng.random() < 0.5:
            message = ws_events.BytesMessage(data=bytes(HUGE_WS_MESSAGE))
            await link.send_stream(stream_id, server.send(message))
        else:
            piece = ws_events.BytesMessage(data=bytes(BODY_CHUNK), message_finished=False)
            for _ in range(MAX_BODY_WRITTEN // BODY_CHUNK):
                await link.send_stream(stream_id, server.send(piece))

    async def browser() -> None:
        await run.websocket(messages=4)

    await _with_browsers(run, answer, browser)


async def scenario_streams_then_vanish(run: Scenario) -> None:
    """Streams opened by the relay left half-answered, then the link's socket dropped
    without a close, mid-exchange."""
    async with run.link() as link, trio.open_nursery() as nursery:
        nursery.start_soon(link.read_forever)
        for _ in range(BROWSER_REQUESTS):
            nursery.start_soon(run.browse, "POST", "/upload", bytes(BIG_POST // 4))
        await trio.sleep(run.rng.random() * 1.0)
        await trio.aclose_forcefully(link.tcp)
        nursery.cancel_scope.cancel()


def _scenario_table() -> dict[str, ScenarioFunction]:
    table: dict[str, ScenarioFunction] = {
        "random_frames": scenario_random_frames,
        "mutated_frames": scenario_mutated_frames,
        "malformed_http": scenario_malformed_http,
        "reset_at_random_points": scenario_reset_at_random_points,
        "big_post_then_reset": scenario_big_post_then_reset,
        "endless_body": scenario_endless_body,
        "trickle_reader": scenario_trickle_reader,
        "never_reads_streams": scenario_never_reads_streams,
        "websocket_huge": scenario_websocket_huge,
        "streams_then_vanish": scenario_streams_then_vanish,
    }
    for frame_type in FrameType:
        for reading in ("normal", "trickle", "never"):
            flood = make_flood(frame_type, reading)
            table[flood.__name__] = flood
    return table


#: Every scenario by name (the seeded run picks from these).
SCENARIOS: Final = _scenario_table()
#: How often each scenario is picked relative to the others: the 21 floods share the weight
#: of 7 other scenarios, so the browser-driven ones still get most of the run.
FLOOD_WEIGHT: Final = 1 / 3
WEIGHTS: Final = {name: FLOOD_WEIGHT if name.startswith("flood_") else 1.0 for name in SCENARIOS}


# ---------------------------------------------------------------------- the run


@attrs.define(kw_only=True)
class FuzzReport:
    """What one run saw. :meth:`summary` is the line printed and attached to failures."""

    seed: int
    seconds: float
    scenarios: Counter[str] = attrs.Factory(Counter)
    #: Each failure names the seed and the scenarios running when it was seen.
    failures: list[str] = attrs.Factory(list)
    latencies: list[float] = attrs.Factory(list)
    tenant_failures: list[str] = attrs.Factory(list)
    rss_start: int = 0
    rss_peak: int = 0
    rss_peak_during: tuple[str, ...] = ()
    rss_end: int = 0
    hwm: int = 0
    health_checks: int = 0
    #: Exceptions that escaped a request's or a link's task in the relay (its log shows their
    #: tracebacks), by "type at file:line", with how often each was seen.
    escaped: Counter[str] = attrs.Factory(Counter)
    #: Browser requests of the hostile scope, and how many got a response head.
    browsed: int = 0
    answered: int = 0
    relay_exit: int | None = None

    def fail(self, what: str, running: Sequence[str]) -> None:
        if len(self.failures) < MAX_FAILURES:
            self.failures.append(f"seed {self.seed}: {what} (running: {', '.join(running)})")

    @property
    def growth(self) -> int:
        return max(0, self.rss_peak - self.rss_start)

    def p(self, fraction: float) -> float:
        return percentile(self.latencies, fraction) if self.latencies else float("nan")

    def summary(self) -> str:
        return (
            f"hostile fuzz: seed={self.seed} seconds={self.seconds:g} "
            f"scenarios={sum(self.scenarios.values())} ({len(self.scenarios)} kinds) "
            f"tenant requests={len(self.latencies) + len(self.tenant_failures)} "
            f"failed={len(self.tenant_failures)} p50={self.p(0.5) * 1000:.1f}ms "
            f"p99={self.p(0.99) * 1000:.1f}ms max={max(self.latencies, default=0) * 1000:.1f}ms "
            f"rss start={self.rss_start / MIB:.1f}MiB peak={self.rss_peak / MIB:.1f}MiB "
            f"(+{self.growth / MIB:.1f}MiB during {', '.join(self.rss_peak_during) or '-'}) "
            f"end={self.rss_end / MIB:.1f}MiB hwm={self.hwm / MIB:.1f}MiB "
            f"hostile browsing={self.answered}/{self.browsed} answered "
            f"health checks={self.health_checks} relay exit={self.relay_exit} "
            f"escaped exceptions={sum(self.escaped.values())} failures={len(self.failures)}"
        )


class LogWatch:
    """Reads a relay's log (its stderr file) as it grows and finds the tracebacks in it: an
    exception that reached hypercorn or trio's top level rather than ending in its own
    request's or link's task. Reads at most :data:`MAX_LOG_READ` bytes per call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_tracebacks(self, *, final: bool = False) -> list[str]:
        """``"Type at file:line"`` for each traceback logged since the last call: the last
        exception of the traceback (for a group, its last leaf) and the innermost frame
        above it (and the innermost frame of the project's own code). The exception's
        message is left out: it could quote anything. ``final`` reads the log to its end
        (the relay has stopped writing)."""
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                data = file.read(MAX_LOG_READ)
        except OSError:
            return []
        # Consume only whole records: a traceback still being written is read next time.
        cut = len(data) - 1 if final else data.rfind(b"\n20")
        if cut < 0:
            return []
        self._offset += cut + 1
        text = data[: cut + 1].decode(errors="replace")
        found: list[str] = []
        for record in _LOG_RECORD.split(text):
            if "Traceback (most recent call last)" in record:
                found.append(_last_exception(record))
        return found


#: Where a new record starts in the relay's log (a timestamp at the start of a line).
_LOG_RECORD: Final = re.compile(r"\n(?=\d{4}-\d\d-\d\d )")
#: The frame decorations of an exception group's traceback.
_GROUP_PREFIX: Final = re.compile(r"^[ |+-]*")
#: A traceback's exception line: a dotted name, then ``:`` or the end of the line.
_EXCEPTION_LINE: Final = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")
_NOT_EXCEPTIONS: Final = ("Traceback", "During", "The", "Exception")


def _last_exception(record: str) -> str:
    """``"Type at file:line"`` of the last exception in one log record's traceback."""
    where = ours = "?"
    last = "?"
    for raw in record.splitlines()[1:]:
        line = _GROUP_PREFIX.sub("", raw) if raw[:1] in (" ", "+", "|") else raw
        stripped = raw.strip(" |+-")
        if stripped.startswith('File "'):
            parts = stripped.split('"')
            number = stripped.rsplit("line ", 1)[-1].split(",")[0]
            where = f"{_short(parts[1])}:{number}"
            if "site-packages" not in where:
                ours = where
            continue
        if raw.startswith(" " * 4) and not raw.lstrip(" ").startswith("|"):
            continue  # source lines and carets under a frame of a plain traceback
        match = _EXCEPTION_LINE.match(line)
        if match and not line.startswith(_NOT_EXCEPTIONS) and "Group" not in match.group(1):
            last = f"{match.group(1)} at {where}"
            if ours != where:
                last += f" (from {ours})"
    return last


def _short(path: str) -> str:
    """A source path relative to the repository (or its file name)."""
    for root in ("/site-packages/", "/relay/", "/mux/", "/protocol/", "/repowire/"):
        if root in path:
            return root.strip("/") + "/" + path.split(root, 1)[1]
    return Path(path).name


def read_memory(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of process ``pid`` in bytes, from ``/proc/<pid>/status``; (0, 0)
    once the process is gone."""
    rss = hwm = 0
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            amount = int(value.split()[0]) * KIB
            if name == "VmRSS":
                rss = amount
            else:
                hwm = amount
    return rss, hwm


@attrs.define(kw_only=True)
class Tenant:
    """The second tenant: a daemon path requested through the relay with its own cookie."""

    address: Address
    cookie: tuple[str, str]
    path: str


async def run_fuzz(
    relay: RelayProcess,
    target: Target,
    tenant: Tenant,
    *,
    seed: int,
    seconds: float,
    slots: int = HOSTILE_SLOTS,
    names: Sequence[str] | None = None,
) -> FuzzReport:
    """Drive ``relay`` with ``slots`` hostile links, each running scenarios picked by a
    ``random.Random`` seeded from ``seed`` (from ``names``, by default all of
    :data:`SCENARIOS`, as :data:`WEIGHTS` says) for ``seconds``, while ``tenant`` is
    requested in a loop. Returns the report; the caller asserts on it. Stops early if the
    relay process exits."""
    assert relay.child is not None
    pid = relay.child.process.pid
    report = FuzzReport(seed=seed, seconds=seconds)
    report.rss_start, _ = read_memory(pid)
    report.rss_peak = report.rss_start
    running: dict[int, str] = {}
    master = random.Random(seed)
    choices = sorted(names if names is not None else SCENARIOS)
    weights = [WEIGHTS[name] for name in choices]
    deadline = trio.current_time() + seconds
    stop = trio.Event()

    def now_running() -> tuple[str, ...]:
        return tuple(running[slot] for slot in sorted(running)) or ("between scenarios",)

    def relay_gone() -> bool:
        if relay.child is not None and relay.child.process.poll() is not None:
            if report.relay_exit is None:
                report.relay_exit = relay.child.process.returncode
                report.fail(f"the relay exited with {report.relay_exit}", now_running())
            stop.set()
            return True
        return False

    watch = LogWatch(relay.child.stderr_path)

    def check_log(*, final: bool = False) -> None:
        for escaped in watch.new_tracebacks(final=final):
            if escaped not in report.escaped:
                report.fail(f"an exception escaped in the relay: {escaped}", now_running())
            report.escaped[escaped] += 1

    async def health(after: str) -> None:
        check_log()
        if relay_gone():
            return
        report.health_checks += 1
        outcome: int | str = f"no answer within {HEALTH_TIMEOUT:g} s"
        with trio.move_on_after(HEALTH_TIMEOUT):
            outcome = await get_status(relay.address, "/health")
        if outcome != 200 and not relay_gone():
            report.fail(f"/health failed after {after}: {outcome}", now_running())

    # Every scenario first runs once (a seeded deck dealt to the slots), so a short run
    # still covers them all; then the slots pick at random, as WEIGHTS says.
    deck = list(choices)
    master.shuffle(deck)

    async def slot(index: int, rng: random.Random) -> None:
        dealt = deck[index::slots]
        for number in range(MAX_SCENARIOS_PER_SLOT):
            if stop.is_set() or trio.current_time() >= deadline:
                return
            name = dealt[number] if number < len(dealt) else rng.choices(choices, weights)[0]
            running[index] = f"{name}#{index}.{number}"
            scenario = Scenario(
                rng=random.Random(rng.randrange(2**63)),
                target=target,
                daemon_id=f"hostile-{index}",
            )
            with trio.move_on_after(
                min(SCENARIO_TIMEOUT, max(deadline - trio.current_time(), 0.1))
            ):
                try:
                    with expected_failures():
                        await SCENARIOS[name](scenario)
                except Exception as exc:  # a harness bug: reported with its seed
                    report.fail(f"harness error {exc!r} in {running[index]}", now_running())
            report.scenarios[name] += 1
            report.browsed += scenario.browsed
            report.answered += scenario.answered
            await health(running[index])
            del running[index]

    async def tenant_loop() -> None:
        for _ in range(MAX_TENANT_REQUESTS):
            if stop.is_set():
                return
            started = time.monotonic()
            outcome: int | str = f"no answer within {TENANT_TIMEOUT:g} s"
            with trio.move_on_after(TENANT_TIMEOUT):
                outcome = await get_status(tenant.address, tenant.path, [tenant.cookie])
            elapsed = time.monotonic() - started
            if outcome == 200:
                report.latencies.append(elapsed)
            elif len(report.tenant_failures) < MAX_FAILURES:
                report.tenant_failures.append(
                    f"seed {seed}: tenant request failed ({outcome}) after {elapsed:.3f}s "
                    f"(running: {', '.join(now_running())})"
                )
            await trio.sleep(TENANT_INTERVAL)

    async def memory_loop() -> None:
        while not stop.is_set():
            rss, hwm = read_memory(pid)
            if relay_gone():
                return
            report.hwm = max(report.hwm, hwm)
            if rss > report.rss_peak:
                report.rss_peak = rss
                report.rss_peak_during = now_running()
            await trio.sleep(RSS_INTERVAL)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tenant_loop)
        nursery.start_soon(memory_loop)
        async with trio.open_nursery() as slots_nursery:
            for index in range(slots):
                slots_nursery.start_soon(slot, index, random.Random(master.randrange(2**63)))
        stop.set()
    report.rss_end, hwm = read_memory(pid)
    report.hwm = max(report.hwm, hwm)
    relay_gone()
    check_log(final=report.relay_exit is not None)
    return report


async def _sign_in_with_link(address: Address, key: str) -> tuple[str, str]:
    """The hostile scope's browser cookie. Signing in needs a daemon of the scope online, so
    a well-behaved hostile link is held up (and read) until the sign-in succeeds."""
    async with (
        open_hostile_link(address, key, "hostile-anchor") as link,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(link.read_forever)
        for _ in range(SIGN_IN_TRIES):
            response = await http_request(
                address,
                "POST",
                "/auth",
                body=form_body(api_key=key),
                headers=[("Content-Type", "application/x-www-form-urlencoded")],
            )
            set_cookie = response.header("set-cookie")
            if response.status == 303 and set_cookie is not None:
                nursery.cancel_scope.cancel()
                return ("Cookie", set_cookie.split(";", 1)[0].strip())
            await trio.sleep(SIGN_IN_INTERVAL)
    raise AssertionError(f"the hostile scope could not sign in ({response.status})")


async def get_status(
    address: Address, path: str, headers: Sequence[tuple[str, str]] = ()
) -> int | str:
    """``GET path`` with the whole body read: the status, or the name of what went wrong
    (raised alone or in a group). The caller bounds the time."""
    outcome: int | str = "no answer"
    try:
        async with open_http_stream(address, "GET", path, headers=headers) as response:
            await response.read_all()
            outcome = response.status
    except* EXPECTED as group:
        outcome = " + ".join(type(exc).__name__ for exc in group.exceptions)
    return outcome


def fuzz_settings() -> tuple[int, float]:
    """``(seed, seconds)`` from :data:`SEED_VARIABLE` and :data:`SECONDS_VARIABLE`."""
    seed = int(os.environ.get(SEED_VARIABLE, DEFAULT_SEED))
    seconds = float(os.environ.get(SECONDS_VARIABLE, DEFAULT_SECONDS))
    return seed, seconds


async def fuzz_relay_process(
    lab: Lab,
    *,
    seed: int,
    seconds: float,
    names: Sequence[str] | None = None,
) -> FuzzReport:
    """Start a relay process, a hostile key and a second tenant (a fault daemon with the
    real connector, its ``/hello`` requested through the relay) in ``lab``; run
    :func:`run_fuzz`; return its report."""
    relay = await lab.relay()
    hostile_key = await lab.key(relay, "hostile")
    tenant_key = await lab.key(relay, "tenant")
    await lab.fault_daemon(relay.ws_url, tenant_key, "steady")
    hostile_cookie = await _sign_in_with_link(relay.address, hostile_key)
    _, tenant_cookie = await sign_in(relay.address, tenant_key)
    target = Target(
        address=relay.address,
        key=hostile_key,
        cookie=hostile_cookie,
        origin=("Origin", relay.url),
    )
    tenant = Tenant(address=relay.address, cookie=tenant_cookie, path="/d/steady/hello")
    return await run_fuzz(relay, target, tenant, seed=seed, seconds=seconds, names=names)
