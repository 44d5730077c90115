"""The hostile connector's adversarial sequences: :data:`SCENARIOS`, each a small async
function of a :class:`Scenario` (random and mutated frames, floods of each frame type with
each reading mode, streams reset at random points, malformed HTTP answers, never-ending bodies,
a big POST answered then reset, WebSocket upgrades sending huge messages), picked as
:data:`WEIGHTS` says by the seeded run of :mod:`tests.support.hostile`.
"""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio
import wsproto
import wsproto.events as ws_events

from protocol import ErrorCode, Flag, FrameType, Role, Session, encode_metadata

from .clients import open_browser_websocket, open_http_stream
from .hostile_link import (
    KIB,
    MAX_READS,
    MIB,
    READ_SIZE,
    HostileLink,
    expected_failures,
    open_hostile_link,
)
from .links import encode_frame
from .listener import Address

#: Frames a flood sends at most, and frames packed in one WebSocket message of a flood.
FLOOD_FRAMES: Final = 1_000_000
FLOOD_BATCH: Final = 500
#: Random or mutated frames one scenario sends at most.
RANDOM_FRAMES: Final = 300
#: Largest payload of a random frame, bytes.
RANDOM_PAYLOAD: Final = 2 * KIB
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

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


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
