"""Plain HTTP through the relay's tunnel, against a real relay (hypercorn on loopback).

The daemon side is a connector stand-in (``tests.support.stand_in``) whose handlers script
each exchange with h11, so every test controls when the daemon reads and writes. Covered:
large bodies streamed both ways with bounded buffering, the body size limit, header hygiene,
browser disconnects, a daemon lost mid-request, offline daemons, cross-site requests and slow
clients.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from mux import MuxConfig, MuxStream, StreamResetError
from protocol import ErrorCode, SessionConfig
from relay._settings import RelaySettings, stream_cost
from tests.support.clients import Address, http_request, open_http_stream
from tests.support.relays import StackFactory, scoped_relay
from tests.support.scripted import ScriptedHttp
from tests.support.stand_in import (
    STAND_IN_MUX,
    SeenRequest,
    hold_stream,
    identity_handler,
    start_stand_in,
)
from tests.support.waiting import eventually

KIB = 1024
MIB = 1024 * KIB

#: Size of the large bodies, each way.
LARGE_BODY = 64 * MIB
#: Bytes the client writes per send.
CLIENT_CHUNK = 64 * KIB
#: Where the slow side of the large-body tests stops reading for a while.
PAUSE_AT = 8 * MIB
#: Most bytes allowed in flight (sent, not yet read) while the reader is paused: socket
#: buffers on two TCP hops plus one stream window. Far below the body size.
MAX_IN_FLIGHT = 16 * MIB
#: Most resident-memory growth allowed while a large body goes through (the whole test
#: process: client, relay and stand-in); a relay holding the body whole would add 64 MiB.
MAX_RSS_GROWTH = 24 * MIB
#: How long a sender's progress must stay unchanged to count as blocked.
STALL_QUIET = 0.3
#: A cheap, position-dependent byte pattern: a period longer than any chunk and prime, so a
#: lost, repeated or reordered chunk never lines up again.
PATTERN_PERIOD = 65537
_PATTERN = random.Random(20240611).randbytes(PATTERN_PERIOD) * 2

#: How soon the daemon's side of a stream must learn that the browser left.
PROMPT = 1.0
#: Requests sent by the tests that look for connections left behind.
REPEATS = 8
#: Body size limit used by the 413 tests.
SMALL_LIMIT = 1 * MIB


def pattern(offset: int, size: int) -> bytes:
    """``size`` bytes of the pattern starting at absolute position ``offset``."""
    parts = []
    while size > 0:
        start = offset % PATTERN_PERIOD
        take = min(size, PATTERN_PERIOD)
        parts.append(_PATTERN[start : start + take])
        offset += take
        size -= take
    return b"".join(parts)


def rss_bytes() -> int:
    """This process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RssPeak:
    """Samples the resident set size every few milliseconds while a transfer runs."""

    def __init__(self) -> None:
        self.start = rss_bytes()
        self.peak = self.start

    async def run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            await trio.sleep(0.01)

    @property
    def growth(self) -> int:
        return self.peak - self.start


async def wait_stalled(progress: list[int], *, polls: int = 100) -> int:
    """Wait until ``progress[0]`` stops changing for STALL_QUIET seconds; return its value."""
    value = progress[0]
    quiet_since = trio.current_time()
    for _ in range(polls):
        await trio.sleep(0.05)
        if progress[0] != value:
            value = progress[0]
            quiet_since = trio.current_time()
        elif trio.current_time() - quiet_since >= STALL_QUIET:
            return value
    raise AssertionError(f"the sender never stalled (at {progress[0]} bytes)")


# ---------------------------------------------------------------------- a streaming client


class Browser:
    """One HTTP/1.1 connection to the relay, written and read piece by piece (h11)."""

    def __init__(self, stream: trio.SocketStream, address: Address) -> None:
        self.stream = stream
        self.address = address
        self.conn = h11.Connection(h11.CLIENT)
        #: Request body bytes handed to the socket.
        self.sent = 0
        #: Response body bytes received.
        self.received = 0

    async def send_head(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        length: int | None = None,
    ) -> None:
        """The request head; a body is chunked unless ``length`` is given."""
        out = [("host", f"{self.address[0]}:{self.address[1]}"), *headers]
        if length is not None:
            out.append(("content-length", str(length)))
        elif method not in ("GET", "HEAD"):
            out.append(("transfer-encoding", "chunked"))
        request = h11.Request(method=method, target=target, headers=out)
        await self.stream.send_all(self.conn.send(request) or b"")

    async def send_data(self, data: bytes) -> None:
        await self.stream.send_all(self.conn.send(h11.Data(data=data)) or b"")
        self.sent += len(data)

    async def end(self) -> None:
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()) or b"")

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(CLIENT_CHUNK))

    async def response(self) -> h11.Response:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise AssertionError(f"expected a response head, got {event!r}")

    async def body_piece(self) -> bytes | None:
        """The next piece of the response body, or None at its end. An aborted body raises
        h11.RemoteProtocolError."""
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                if event.data:
                    self.received += len(event.data)
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return None
            else:
                raise h11.RemoteProtocolError(f"the response body ended early: {event!r}")

    async def read_body(self, limit: int = MIB) -> bytes:
        body = bytearray()
        while (piece := await self.body_piece()) is not None:
            body += piece
            assert len(body) <= limit, "response body larger than expected"
        return bytes(body)


@asynccontextmanager
async def browser(address: Address) -> AsyncIterator[Browser]:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        yield Browser(stream, address)


# ---------------------------------------------------------------------- large bodies


async def test_large_upload_streams_through_and_the_client_blocks_when_the_daemon_stops(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(65):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        paused = trio.Event()
        resume = trio.Event()
        daemon_read = [0]
        seen_headers: list[list[str]] = []

        async def handler(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            seen_headers.append(exchange.header_values("content-length"))
            while (piece := await exchange.receive_data()) is not None:
                # Checked as it arrives, at its absolute position: nothing lost, doubled or moved.
                assert piece == pattern(daemon_read[0], len(piece)), (
                    f"bad bytes at {daemon_read[0]}"
                )
                daemon_read[0] += len(piece)
                if daemon_read[0] >= PAUSE_AT and not paused.is_set():
                    paused.set()
                    await resume.wait()
            await exchange.respond_json(200, {"received": daemon_read[0]})

        await start_stand_in(stack.links, relay.address, key, "laptop", handler)
        memory = RssPeak()
        async with browser(relay.address) as client, trio.open_nursery() as inner:
            inner.start_soon(memory.run)
            await client.send_head("POST", "/upload", [cookie], length=LARGE_BODY)
            sent = [0]

            async def upload() -> None:
                for offset in range(0, LARGE_BODY, CLIENT_CHUNK):
                    await client.send_data(pattern(offset, CLIENT_CHUNK))
                    sent[0] = client.sent
                await client.end()

            inner.start_soon(upload)
            await paused.wait()
            stalled_at = await wait_stalled(sent)
            in_flight = stalled_at - daemon_read[0]
            print(f"\nupload: client blocked with {in_flight / MIB:.1f} MiB in flight")
            assert stalled_at < LARGE_BODY, "the whole body left the client: nothing pushed back"
            assert in_flight <= MAX_IN_FLIGHT
            resume.set()
            head = await client.response()
            body = await client.read_body()
            inner.cancel_scope.cancel()
        assert head.status_code == 200
        assert body == b'{"received": %d}' % LARGE_BODY
        assert seen_headers == [[str(LARGE_BODY)]]
        print(f"upload: peak RSS growth {memory.growth / MIB:.1f} MiB")
        assert memory.growth <= MAX_RSS_GROWTH


async def test_large_download_streams_through_and_the_daemon_blocks_when_the_browser_stops(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(65):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        daemon_sent = [0]

        async def handler(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            await exchange.read_body()
            await exchange.send_head(
                200,
                [("content-type", "application/octet-stream"), ("content-length", str(LARGE_BODY))],
            )
            for offset in range(0, LARGE_BODY, CLIENT_CHUNK):
                await exchange.send_data(pattern(offset, CLIENT_CHUNK))
                daemon_sent[0] = offset + CLIENT_CHUNK
            await exchange.finish()

        await start_stand_in(stack.links, relay.address, key, "laptop", handler)
        memory = RssPeak()
        async with browser(relay.address) as client, trio.open_nursery() as inner:
            inner.start_soon(memory.run)
            await client.send_head("GET", "/download", [cookie])
            await client.end()
            head = await client.response()
            assert head.status_code == 200
            assert dict(head.headers)[b"content-length"] == str(LARGE_BODY).encode()
            paused = False
            while (piece := await client.body_piece()) is not None:
                offset = client.received - len(piece)
                assert piece == pattern(offset, len(piece)), f"bad bytes at {offset}"
                if not paused and client.received >= PAUSE_AT:
                    paused = True
                    stalled_at = await wait_stalled(daemon_sent)
                    in_flight = stalled_at - client.received
                    print(f"\ndownload: daemon blocked with {in_flight / MIB:.1f} MiB in flight")
                    assert stalled_at < LARGE_BODY, "the daemon wrote everything: no push back"
                    assert in_flight <= MAX_IN_FLIGHT
            inner.cancel_scope.cancel()
        assert client.received == LARGE_BODY
        print(f"download: peak RSS growth {memory.growth / MIB:.1f} MiB")
        assert memory.growth <= MAX_RSS_GROWTH


# ---------------------------------------------------------------------- body size limit


async def test_declared_content_length_over_the_limit_gets_413_before_any_body(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks, max_body_size=SMALL_LIMIT)
        relay = stack.relay
        stand_in = await start_stand_in(
            stack.links, relay.address, key, "laptop", identity_handler("x")
        )
        async with browser(relay.address) as client:
            # Only the head goes out: the answer must not wait for a body.
            await client.send_head("POST", "/upload", [cookie], length=SMALL_LIMIT + 1)
            head = await client.response()
            body = await client.read_body()
        assert head.status_code == 413
        assert dict(head.headers)[b"content-type"] == b"application/json"
        assert json.loads(body)["error"] == "body_too_large"
        assert stand_in.accepted == [], "a refused body must not open a stream to the daemon"


async def test_chunked_body_growing_past_the_limit_gets_413_and_the_daemon_sees_a_reset(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks, max_body_size=SMALL_LIMIT)
        relay = stack.relay
        outcome: list[BaseException] = []
        daemon_read = [0]

        async def handler(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            try:
                while await exchange.receive_data() is not None:
                    daemon_read[0] = exchange.body_received
            except trio.BrokenResourceError as exc:
                outcome.append(exc)
                return
            await exchange.respond_json(200, {"unexpected": "whole body accepted"})

        await start_stand_in(stack.links, relay.address, key, "laptop", handler)
        async with browser(relay.address) as client, trio.open_nursery() as inner:
            await client.send_head("POST", "/upload", [cookie])

            async def upload() -> None:
                # Twice the limit, in pieces; the relay may stop reading part way.
                try:
                    for offset in range(0, 2 * SMALL_LIMIT, CLIENT_CHUNK):
                        await client.send_data(pattern(offset, CLIENT_CHUNK))
                    await client.end()
                except trio.BrokenResourceError:
                    pass

            inner.start_soon(upload)
            head = await client.response()
            body = await client.read_body()
            inner.cancel_scope.cancel()
        await eventually(lambda: bool(outcome))
        assert head.status_code == 413
        assert json.loads(body)["error"] == "body_too_large"
        assert isinstance(outcome[0], StreamResetError)
        assert outcome[0].code == ErrorCode.CANCEL
        assert daemon_read[0] <= SMALL_LIMIT


def open_fds() -> int:
    """File descriptors this process holds (client, relay and stand-in sockets alike)."""
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.parametrize(
    ("case", "length"),
    [("over the limit", 4 * SMALL_LIMIT), ("over the limit", None), ("offline daemon", None)],
    ids=["declared-413", "chunked-413", "offline-503"],
)
async def test_refused_uploads_leave_no_connection_behind(
    stacks: StackFactory, case: str, length: int | None
) -> None:
    """A browser sends its body right after the head; when the relay answers early and the
    browser leaves, the relay's side of the connection must go too."""
    with trio.fail_after(20):
        stack, key, cookie = await scoped_relay(stacks, max_body_size=SMALL_LIMIT)
        relay = stack.relay
        expected = 503
        path = "/d/elsewhere/upload" if case == "offline daemon" else "/upload"
        if case == "over the limit":
            expected = 413
            await start_stand_in(stack.links, relay.address, key, "laptop", identity_handler("x"))
        baseline = open_fds()
        for _ in range(REPEATS):
            async with browser(relay.address) as client, trio.open_nursery() as inner:
                await client.send_head("POST", path, [cookie], length=length)

                async def blast(client: Browser = client) -> None:
                    with contextlib.suppress(trio.BrokenResourceError):
                        for offset in range(0, 4 * SMALL_LIMIT, CLIENT_CHUNK):
                            await client.send_data(pattern(offset, CLIENT_CHUNK))

                inner.start_soon(blast)
                head = await client.response()
                assert head.status_code == expected
                await client.read_body()
                inner.cancel_scope.cancel()
        # Every browser has closed its socket: the relay's ends must close as well.
        for _ in range(200):
            if open_fds() <= baseline:
                break
            await trio.sleep(0.01)
        left = open_fds() - baseline
        assert left <= 0, f"{left} connections of browsers that left are still open on the relay"
        registry = relay.running.relay.metrics.registry
        # The handler finishes just after its socket closes: give it that moment.
        await eventually(lambda: registry.get_sample_value("repowire_relay_streams_open") == 0)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_body_of_exactly_the_limit_goes_through(stacks: StackFactory, declared: bool) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks, max_body_size=SMALL_LIMIT)
        relay = stack.relay
        seen: list[SeenRequest] = []
        await start_stand_in(stack.links, relay.address, key, "laptop", identity_handler("x", seen))
        async with browser(relay.address) as client:
            await client.send_head(
                "PUT", "/blob", [cookie], length=SMALL_LIMIT if declared else None
            )
            for offset in range(0, SMALL_LIMIT, CLIENT_CHUNK):
                await client.send_data(pattern(offset, CLIENT_CHUNK))
            await client.end()
            head = await client.response()
            await client.read_body()
        assert head.status_code == 200
        assert seen[0].body == pattern(0, SMALL_LIMIT)


# ---------------------------------------------------------------------- headers


async def test_hop_by_hop_headers_and_relay_credentials_never_reach_the_daemon(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        seen: list[SeenRequest] = []
        await start_stand_in(stack.links, relay.address, key, "laptop", identity_handler("x", seen))
        session_id = cookie[1].split("=", 1)[1]
        sent_headers = [
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
            ("Authorization", f"Bearer {key}"),
            ("Cookie", f"{cookie[1]}; theme=dark"),
            ("Repowire-Mesh-From", "someone-else"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Custom", "kept"),
            ("Content-Type", "application/json"),
        ]
        response = await http_request(
            relay.address, "POST", "/notify?x=1", body=b"{}", headers=sent_headers
        )
        assert response.status == 200, response.body
        request = seen[0]
        names = [name for name, _ in request.headers]
        # The relay speaks its own hop to the daemon: one request per stream.
        # The browser's Connection header is hop-by-hop and dropped; the stream carries one
        # request, and only the connector decides keep-alive towards the daemon.
        assert [v for k, v in request.headers if k == "connection"] == []
        for dropped in (
            "keep-alive",
            "te",
            "proxy-authorization",
            "authorization",
            "cookie",
            "repowire-mesh-from",
        ):
            assert dropped not in names, f"{dropped} reached the daemon"
        values = dict(request.headers)
        assert [v for k, v in request.headers if k == "x-forwarded-for"] == ["127.0.0.1"]
        assert [v for k, v in request.headers if k == "x-forwarded-proto"] == ["http"]
        assert [v for k, v in request.headers if k == "x-forwarded-host"] == [
            f"127.0.0.1:{relay.address[1]}"
        ]
        assert values["x-custom"] == "kept"
        assert values["content-type"] == "application/json"
        assert request.target == "/notify?x=1"
        assert request.body == b"{}"
        everything = repr(request)
        assert session_id not in everything
        assert key not in everything


async def test_headers_named_in_connection_are_hop_by_hop_too(stacks: StackFactory) -> None:
    """RFC 9110 section 7.6.1: a proxy removes the headers a Connection header names, in
    requests and in responses."""
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        seen: list[list[str]] = []

        async def handler(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            await exchange.read_body()
            seen.append(exchange.header_names())
            await exchange.respond(
                200, b"ok", [("Connection", "close, X-Answer-Hop"), ("X-Answer-Hop", "1")]
            )

        await start_stand_in(stack.links, relay.address, key, "laptop", handler)
        response = await http_request(
            relay.address,
            "GET",
            "/peers",
            headers=[cookie, ("Connection", "keep-alive, X-Hop-Secret"), ("X-Hop-Secret", "1")],
        )
        assert response.status == 200
        assert "x-hop-secret" not in seen[0], "a header the browser marked hop-by-hop was forwarded"
        assert response.header("x-answer-hop") is None, "a hop-by-hop answer header was forwarded"


async def test_a_tunneled_response_carries_one_date_header(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay

        async def handler(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            await exchange.read_body()
            await exchange.respond(200, b"ok", [("Date", "Tue, 01 Jan 2030 00:00:00 GMT")])

        await start_stand_in(stack.links, relay.address, key, "laptop", handler)
        response = await http_request(relay.address, "GET", "/peers", headers=[cookie])
        assert response.status == 200
        dates = [value for name, value in response.headers if name == "date"]
        assert len(dates) == 1, dates
        assert "2030" not in dates[0]


async def test_response_hop_by_hop_headers_and_cookies_are_dropped(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay

        async def handler(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            await exchange.read_body()
            await exchange.respond(
                200,
                b"ok",
                [
                    ("Keep-Alive", "timeout=1"),
                    ("Set-Cookie", "repowire_session=planted; Path=/"),
                    ("Proxy-Connection", "keep-alive"),
                    ("X-Kept", "yes"),
                ],
            )

        await start_stand_in(stack.links, relay.address, key, "laptop", handler)
        response = await http_request(relay.address, "GET", "/status", headers=[cookie])
        assert response.status == 200
        assert response.body == b"ok"
        assert response.header("x-kept") == "yes"
        assert response.header("set-cookie") is None
        assert response.header("keep-alive") is None
        assert response.header("proxy-connection") is None


# ---------------------------------------------------------------------- origin


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("origin", ["http://evil.example", "null"])
async def test_cross_site_state_changing_request_is_refused(
    stacks: StackFactory, method: str, origin: str
) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        stand_in = await start_stand_in(
            stack.links, relay.address, key, "laptop", identity_handler("x")
        )
        refused = await http_request(
            relay.address, method, "/peers", body=b"{}", headers=[cookie, ("Origin", origin)]
        )
        assert refused.status == 403
        assert refused.json()["error"] == "bad_origin"
        assert stand_in.accepted == []


async def test_same_site_post_and_cross_site_get_pass(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        seen: list[SeenRequest] = []
        await start_stand_in(stack.links, relay.address, key, "laptop", identity_handler("x", seen))
        own = f"http://127.0.0.1:{relay.address[1]}"
        posted = await http_request(
            relay.address, "POST", "/peers", body=b"{}", headers=[cookie, ("Origin", own)]
        )
        got = await http_request(
            relay.address, "GET", "/peers", headers=[cookie, ("Origin", "http://evil.example")]
        )
        assert (posted.status, got.status) == (200, 200)
        assert [(r.method, r.target) for r in seen] == [("POST", "/peers"), ("GET", "/peers")]


# ---------------------------------------------------------------------- browser goes away


async def test_browser_leaving_before_the_answer_resets_the_daemon_side_promptly(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        request_in = trio.Event()
        reset_at: list[float] = []
        errors: list[BaseException] = []

        async def handler(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            await exchange.read_body()
            request_in.set()
            # A slow daemon: it would answer much later. Until then it waits on the stream.
            try:
                data = await stream.receive_some()
            except trio.BrokenResourceError as exc:
                reset_at.append(trio.current_time())
                errors.append(exc)
                return
            raise AssertionError(f"expected a reset, got {data!r}")

        await start_stand_in(stack.links, relay.address, key, "laptop", handler)
        async with browser(relay.address) as client:
            await client.send_head("GET", "/slow", [cookie])
            await client.end()
            await request_in.wait()
        closed_at = trio.current_time()
        await eventually(lambda: bool(reset_at))
        assert isinstance(errors[0], StreamResetError)
        assert errors[0].code == ErrorCode.CANCEL
        print(
            f"\ndaemon side reset {1000 * (reset_at[0] - closed_at):.1f} ms after the browser left"
        )
        assert reset_at[0] - closed_at < PROMPT


async def test_browser_leaving_mid_response_stops_the_daemon_side_promptly(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        failed_at: list[float] = []
        pieces_sent = [0]

        async def handler(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            await exchange.read_body()
            await exchange.send_head(200, [("content-type", "text/plain")])
            try:
                for _ in range(1000):
                    await exchange.send_data(b"tick\n")
                    pieces_sent[0] += 1
                    await trio.sleep(0.02)
            except trio.BrokenResourceError:
                failed_at.append(trio.current_time())
                return
            raise AssertionError("the daemon kept writing to a browser that left")

        await start_stand_in(stack.links, relay.address, key, "laptop", handler)
        async with browser(relay.address) as client:
            await client.send_head("GET", "/ticks", [cookie])
            await client.end()
            assert (await client.response()).status_code == 200
            assert await client.body_piece() is not None
        closed_at = trio.current_time()
        await eventually(lambda: bool(failed_at))
        took = failed_at[0] - closed_at
        print(f"\ndaemon side failed {1000 * took:.1f} ms after the browser left")
        assert took < PROMPT


# ---------------------------------------------------------------------- daemon goes away


@pytest.mark.parametrize("how", ["link dropped", "stream reset"])
async def test_daemon_failing_before_the_response_head_gives_502_json(
    stacks: StackFactory, how: str
) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        request_in = trio.Event()

        async def handler(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            await exchange.read_body()
            if how == "stream reset":
                stream.reset(ErrorCode.INTERNAL_ERROR)
                return
            request_in.set()
            await trio.sleep_forever()

        stand_in = await start_stand_in(stack.links, relay.address, key, "laptop", handler)

        async def drop_when_asked() -> None:
            await request_in.wait()
            await stand_in.drop()

        if how == "link dropped":
            stack.links.start_soon(drop_when_asked)
        response = await http_request(relay.address, "GET", "/peers", headers=[cookie])
        assert response.status == 502
        assert response.header("content-type") == "application/json"
        assert response.json()["error"] == "daemon_failed"


async def test_daemon_lost_mid_response_aborts_it_and_spares_other_daemons_and_users(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(15):
        stack = await stacks()
        relay = stack.relay
        record, key = await relay.new_scope("alice")
        other_record, other_key = await relay.new_scope("bob")
        cookie = await relay.session_cookie(record)
        other_cookie = await relay.session_cookie(other_record)
        head_sent = trio.Event()

        async def dying(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            await exchange.read_body()
            await exchange.send_head(200, [("content-length", "1000")])
            await exchange.send_data(b"x" * 100)
            head_sent.set()
            await trio.sleep_forever()

        async def steady(stream: MuxStream) -> None:
            # A slow, long response that must finish whole whatever happens to the other link.
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            await exchange.read_body()
            await exchange.send_head(200, [("content-type", "text/plain")])
            for i in range(10):
                await exchange.send_data(b"%d\n" % i)
                await trio.sleep(0.03)
            await exchange.finish()

        doomed = await start_stand_in(stack.links, relay.address, key, "laptop", dying)
        await start_stand_in(stack.links, relay.address, key, "desktop", steady)
        await start_stand_in(stack.links, relay.address, other_key, "laptop", steady)
        async with (
            open_http_stream(relay.address, "GET", "/d/desktop/feed", headers=[cookie]) as same,
            open_http_stream(relay.address, "GET", "/d/laptop/f", headers=[other_cookie]) as other,
        ):
            async with browser(relay.address) as client:
                await client.send_head("GET", "/d/laptop/big", [cookie])
                await client.end()
                head = await client.response()
                assert head.status_code == 200
                await head_sent.wait()
                assert await client.body_piece() == b"x" * 100
                await doomed.drop()
                with pytest.raises(h11.RemoteProtocolError):
                    await client.body_piece()
            # The other responses were in flight all along and end whole.
            expected = b"".join(b"%d\n" % i for i in range(10))
            assert await same.read_all() == expected
            assert await other.read_all() == expected
        again = await http_request(relay.address, "GET", "/d/desktop/x", headers=[cookie])
        assert again.status == 200


# ---------------------------------------------------------------------- offline daemon


async def test_offline_daemon_answers_503_json_without_waiting(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        for path in ("/peers", "/d/laptop/peers"):
            response = await http_request(relay.address, "GET", path, headers=[cookie])
            assert response.status == 503, path
            assert response.json()["error"] == "daemon_offline"
        # Once connected, then gone: the same answer, not a hang on a dead link.
        stand_in = await start_stand_in(
            stack.links, relay.address, key, "laptop", identity_handler("x")
        )
        assert (await http_request(relay.address, "GET", "/peers", headers=[cookie])).status == 200
        await stand_in.close()
        await eventually(lambda: len(relay.running.relay.links) == 0)
        for path in ("/peers", "/d/laptop/peers"):
            started = trio.current_time()
            response = await http_request(relay.address, "GET", path, headers=[cookie])
            assert response.status == 503, path
            assert response.json()["error"] == "daemon_offline"
            assert trio.current_time() - started < 1.0


# ---------------------------------------------------------------------- slow clients


async def slow_head(address: Address, head: bytes, interval: float) -> float:
    """Send ``head`` one byte every ``interval`` seconds (never finishing it) until the server
    closes the connection; return how long that took."""
    started = trio.current_time()
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        for byte in head:
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                return trio.current_time() - started
            with trio.move_on_after(interval):
                try:
                    data = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    return trio.current_time() - started
                # Any answer (a 408, a 400) or the end of the connection ends the attempt.
                if data == b"" or data:
                    return trio.current_time() - started
        raise AssertionError("the server waited for the whole slow head")


async def test_a_slow_request_head_does_not_block_other_clients(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        await start_stand_in(stack.links, relay.address, key, "laptop", identity_handler("x"))
        head = b"GET /peers HTTP/1.1\r\nHost: relay\r\nX-Padding: " + b"a" * 200
        latencies: list[float] = []
        async with trio.open_nursery() as inner:
            for _ in range(3):
                inner.start_soon(slow_head, relay.address, head, 0.1)
            await trio.sleep(0.2)
            for _ in range(10):
                started = time.perf_counter()
                response = await http_request(relay.address, "GET", "/peers", headers=[cookie])
                latencies.append(time.perf_counter() - started)
                assert response.status == 200
            inner.cancel_scope.cancel()
        print(
            f"\nrequests beside slow clients: median {1000 * statistics.median(latencies):.1f} ms"
        )
        assert max(latencies) < 1.0


async def test_a_slow_request_head_is_cut_off_after_the_header_timeout(
    stacks: StackFactory,
) -> None:
    """``RelaySettings.header_timeout`` promises a deadline on the request head (slowloris)."""
    with trio.fail_after(20):
        timeout = 1.0
        stack, _key, _cookie = await scoped_relay(stacks, header_timeout=timeout)
        relay = stack.relay
        head = b"GET /peers HTTP/1.1\r\nHost: relay\r\nX-Padding: " + b"a" * 400
        took = await slow_head(relay.address, head, 0.1)
        print(f"\nslow head cut off after {took:.2f} s (header_timeout {timeout} s)")
        assert took <= timeout + 1.0


async def test_an_oversized_request_head_is_refused(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks, max_header_size=4 * KIB)
        relay = stack.relay
        stand_in = await start_stand_in(
            stack.links, relay.address, key, "laptop", identity_handler("x")
        )
        response = await http_request(
            relay.address, "GET", "/peers", headers=[cookie, ("X-Big", "b" * (8 * KIB))]
        )
        assert 400 <= response.status < 500
        assert stand_in.accepted == []


# ---------------------------------------------------------------------- framing, forwarding


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("GET", []),
        ("DELETE", []),
        ("POST", [("content-length", "4")]),
    ],
    ids=["get-chunked", "delete-chunked", "length-and-chunked"],
)
async def test_a_body_the_relay_cannot_forward_gets_400_before_any_stream(
    stacks: StackFactory, method: str, extra: list[tuple[str, str]]
) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        stand_in = await start_stand_in(
            stack.links, relay.address, key, "laptop", identity_handler("x")
        )
        raw = await trio.open_tcp_stream(*relay.address)
        async with raw:
            head = (
                f"{method} /thing HTTP/1.1\r\nHost: relay\r\n{cookie[0]}: {cookie[1]}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in extra)
                + "Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
            )
            await raw.send_all(head.encode())
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
            status, body = 0, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await raw.receive_some(CLIENT_CHUNK))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        if status != 400:
            # h11 (hypercorn) may refuse the framing itself; then it must be a 4xx too.
            assert 400 <= status < 500, status
        else:
            assert json.loads(body)["error"] == "bad_request"
        assert stand_in.accepted == [], "a refused request must not open a stream"


async def test_forged_client_address_headers_are_replaced_by_the_relays_own(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(15):
        stack, key, cookie = await scoped_relay(stacks)
        relay = stack.relay
        seen: list[SeenRequest] = []
        await start_stand_in(stack.links, relay.address, key, "laptop", identity_handler("x", seen))
        forged = [
            ("Forwarded", "for=203.0.113.9;proto=https"),
            ("X-Real-IP", "203.0.113.9"),
            ("X-Forwarded-Port", "443"),
            ("X-Forwarded-Server", "evil"),
            ("X-Client-IP", "203.0.113.9"),
            ("True-Client-IP", "203.0.113.9"),
            ("CF-Connecting-IP", "203.0.113.9"),
        ]
        response = await http_request(relay.address, "GET", "/who", headers=[cookie, *forged])
        assert response.status == 200
        headers = seen[0].headers
        assert "203.0.113.9" not in repr(headers)
        for name in ("x-real-ip", "x-forwarded-port", "x-forwarded-server", "x-client-ip"):
            assert name not in dict(headers), f"{name} reached the daemon"
        assert "true-client-ip" not in dict(headers)
        assert "cf-connecting-ip" not in dict(headers)
        assert [v for k, v in headers if k == "forwarded"] == [
            f'for=127.0.0.1;proto=http;host="127.0.0.1:{relay.address[1]}"'
        ]


# ---------------------------------------------------------------------- stream slots


async def test_a_full_stream_table_answers_503_daemon_busy_within_the_deadline(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(20):
        stack, key, cookie = await scoped_relay(stacks, stream_open_timeout=0.5)
        relay = stack.relay
        one_stream = MuxConfig(
            keepalive_interval=STAND_IN_MUX.keepalive_interval,
            handshake_timeout=STAND_IN_MUX.handshake_timeout,
            protocol=SessionConfig(max_concurrent_streams=1),
        )
        stand_in = await start_stand_in(
            stack.links, relay.address, key, "laptop", hold_stream, mux_config=one_stream
        )
        async with trio.open_nursery() as inner:
            # The one slot, held by a request the daemon never answers.
            inner.start_soon(lambda: http_request(relay.address, "GET", "/held", headers=[cookie]))
            await eventually(lambda: len(stand_in.accepted) == 1)
            started = trio.current_time()
            response = await http_request(relay.address, "GET", "/next", headers=[cookie])
            took = trio.current_time() - started
            inner.cancel_scope.cancel()
        assert response.status == 503
        assert response.json()["error"] == "daemon_busy"
        assert 0.4 <= took < 2.0, took


async def test_a_scope_over_its_stream_quota_gets_503_too_many_streams(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(20):
        stack = await stacks(max_streams_per_scope=1)
        relay = stack.relay
        record, key = await relay.new_scope()
        cookie = await relay.session_cookie(record)
        other_record, other_key = await relay.new_scope("other")
        other_cookie = await relay.session_cookie(other_record)
        stand_in = await start_stand_in(stack.links, relay.address, key, "laptop", hold_stream)
        await start_stand_in(stack.links, relay.address, other_key, "laptop", identity_handler("o"))
        counter = relay.running.relay.scope_streams
        async with trio.open_nursery() as inner:
            inner.start_soon(lambda: http_request(relay.address, "GET", "/held", headers=[cookie]))
            await eventually(lambda: len(stand_in.accepted) == 1)
            refused = await http_request(relay.address, "GET", "/next", headers=[cookie])
            # Another scope is not affected by this one's quota.
            other = await http_request(relay.address, "GET", "/x", headers=[other_cookie])
            inner.cancel_scope.cancel()
        assert refused.status == 503
        assert refused.json()["error"] == "too_many_streams"
        assert "1" in refused.json()["detail"]
        assert other.status == 200
        # The held request's slot is given back once it ends.
        await eventually(lambda: counter.held(record.scope_id) == 0)


async def test_a_scope_over_its_memory_quota_gets_503_too_many_streams(
    stacks: StackFactory,
) -> None:
    """Streams are also charged what they may make the relay hold: a budget of two plain
    requests admits two, then refuses, whatever the stream count allows."""
    with trio.fail_after(20):
        budget = 2 * stream_cost(RelaySettings(data_dir="unused"), "http")
        stack = await stacks(max_scope_buffered=budget)
        relay = stack.relay
        record, key = await relay.new_scope()
        cookie = await relay.session_cookie(record)
        stand_in = await start_stand_in(stack.links, relay.address, key, "laptop", hold_stream)
        held = relay.running.relay.scope_bytes
        async with trio.open_nursery() as inner:
            for path in ("/held-1", "/held-2"):
                inner.start_soon(
                    partial(http_request, relay.address, "GET", path, headers=[cookie])
                )
            await eventually(lambda: len(stand_in.accepted) == 2)
            assert held.held(record.scope_id) == budget
            refused = await http_request(relay.address, "GET", "/next", headers=[cookie])
            inner.cancel_scope.cancel()
        assert refused.status == 503
        assert refused.json()["error"] == "too_many_streams"
        assert str(budget) in refused.json()["detail"]
        await eventually(lambda: held.held(record.scope_id) == 0)
        assert relay.running.relay.scope_streams.held(record.scope_id) == 0
