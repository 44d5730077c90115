"""Kept-alive connections from the connector to the daemon, end to end.

A browser (an h11 client on loopback) talks to a real relay, whose link reaches a real
connector, whose pool reaches a scripted daemon: a small server that parses requests with h11,
writes every response byte by hand (so a test knows exactly what went out), and counts the
connections it accepted and what each one carried. It can misbehave on demand: close after every
response without saying so, drop a request that arrives on a kept connection, answer before the
request body has arrived, or write bytes after a response. One test runs the real repowire
daemon (hypercorn) behind a counting TCP proxy; a few drive the connector from a fake relay to
compare raw stream bytes with what the daemon wrote.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import pytest
import trio

from connector import Connector, LinkState
from connector._daemon_pool import DaemonPool
from mux import MuxSession, MuxStream, StreamResetError
from protocol import ErrorCode
from tests.support.clients import (
    HttpResponse,
    SseReader,
    http_request,
    open_http_stream,
    request_head,
)
from tests.support.daemons import start_daemon
from tests.support.fake_relay import fake_relay_config, start_fake_relay
from tests.support.listener import LoopbackServer
from tests.support.proxy import TcpProxy, start_proxy
from tests.support.relays import RelayHandle
from tests.support.stack import Stack, fast_connector_config
from tests.support.waiting import eventually

LOOPBACK = "127.0.0.1"
DAEMON_ID = "laptop"
#: Bytes read from a socket or a stream at a time.
READ_SIZE = 64 * 1024
#: Largest request head the scripted daemon parses.
MAX_HEAD = 64 * 1024
#: Largest request body the scripted daemon buffers, and largest response a test reads whole.
MAX_BODY = 4 * 1024 * 1024
#: Seconds each test may take, setup included.
TEST_TIMEOUT = 20
#: How soon the daemon must see its connection close once the browser left an SSE stream.
PROMPT = 1.0
#: Seconds after which an exchange that should have ended counts as hung.
HANG_BOUND = 1.0
#: Requests in the sequential test.
SEQUENTIAL = 10
#: Browsers in flight at once in the concurrency test, and how many rounds they make.
CONCURRENCY = 4
ROUNDS = 3
#: A complete response a misbehaving daemon writes after the real one.
STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
#: Seconds the daemon waits before writing stray bytes after a response (the late variant).
STRAY_DELAY = 0.05

# The scripted daemon's chunked answer: extensions, a chunk full of CRLFs, trailers.
CHUNKS = [b"hello", b"abcdefghijklmnopqrstuvwxyz", b"\r\n\r\n0\r\n\r\n", b"x" * 5000]
CHUNKED_BODY = b"".join(CHUNKS)


def _chunked(pieces: Sequence[bytes]) -> bytes:
    out = bytearray()
    for number, piece in enumerate(pieces):
        out += b"%x;n=%d\r\n" % (len(piece), number) + piece + b"\r\n"
    return bytes(out + b"0;end\r\nX-Checksum: 1234\r\nX-More: yes\r\n\r\n")


# ---------------------------------------------------------------------- the scripted daemon


@attrs.define(eq=False)
class DaemonConnection:
    """The daemon's side of one TCP connection."""

    index: int
    stream: trio.SocketStream
    #: Requests answered on it.
    served: int = 0
    #: Whether the connector's side ended the connection (end of file or reset).
    closed_by_peer: bool = False
    ended: trio.Event = attrs.Factory(trio.Event)


@attrs.frozen(kw_only=True)
class SeenRequest:
    connection: int
    method: str
    target: str
    body: bytes
    answered: bool


class ScriptedDaemon(LoopbackServer):
    """An HTTP/1.1 server on 127.0.0.1 (port 0). Routes:

    - ``/text/...``: ``reply to METHOD PATH`` with a Content-Length;
    - ``/chunked``: :data:`CHUNKED_BODY`, chunked with extensions and trailers;
    - ``/empty``: 204; ``/not-modified``: 304 with a Content-Length and no body;
    - ``/hints``: a 103 interim response, then the final one;
    - ``/echo``: the request body back;
    - ``/close``: a text answer with ``Connection: close``, after which the daemon (slow to
      close) would still serve another request on the connection;
    - ``/together``: answered once :attr:`together_size` of them are waiting at once;
    - ``/sse``: an event stream that never ends; the daemon waits for the connection to close;
    - ``/early``: answered as soon as the head arrived, the body never read;
    - ``/leaky`` and ``/leaky-late``: a text answer followed by :data:`STRAY`, in the same write
      or :data:`STRAY_DELAY` seconds later.

    HEAD gets the GET head without a body. With :attr:`close_after_response` every connection
    closes after its first answer (without ``Connection: close``); with :attr:`drop_on_kept` a
    request arriving on a connection that already served one is read whole, then the
    connection closes without an answer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.connections: list[DaemonConnection] = []
        self.requests: list[SeenRequest] = []
        #: The exact bytes of each answer, in order.
        self.written: list[bytes] = []
        self.close_after_response = False
        self.drop_on_kept = False
        self.together_size = CONCURRENCY
        self.stray_sent = trio.Event()
        self.heads_seen = 0
        self._changed = trio.Event()
        self._arrived = 0
        self._round = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds (re-checked on every change; callers bound it)."""
        while not predicate():
            await self._changed.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = DaemonConnection(index=len(self.connections), stream=stream)
        self.connections.append(conn)
        self._notify()
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                event = await _next_event(parser, stream)
                if isinstance(event, h11.ConnectionClosed):
                    conn.closed_by_peer = True
                    return
                assert isinstance(event, h11.Request), event
                self.heads_seen += 1
                self._notify()
                method = event.method.decode()
                target = event.target.decode()
                path = target.split("?", 1)[0]
                if path == "/early":
                    await self._answer_early(conn, method, target)
                    return
                body = await _read_body(parser, stream)
                if self.drop_on_kept and conn.served:
                    self._record(conn, method, target, body, answered=False)
                    return  # closes without a word
                self._record(conn, method, target, body, answered=True)
                if path == "/sse":
                    await self._serve_sse(conn)
                    return
                if path == "/together":
                    await self._together()
                response = _response(method, path, body)
                self.written.append(response)
                await stream.send_all(response + (STRAY if path == "/leaky" else b""))
                conn.served += 1
                self._notify()
                if path == "/leaky-late":
                    await trio.sleep(STRAY_DELAY)
                    await stream.send_all(STRAY)
                    self.stray_sent.set()
                if self.close_after_response or not _keep_alive(event):
                    return
                # Every answer is written by hand, so h11 starts afresh for the next request.
                leftover, _ = parser.trailing_data
                parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
                if leftover:  # (empty data would mean end of file to h11)
                    parser.receive_data(leftover)
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            conn.closed_by_peer = True
        finally:
            conn.ended.set()
            self._notify()
            await trio.aclose_forcefully(stream)

    def _record(
        self, conn: DaemonConnection, method: str, target: str, body: bytes, *, answered: bool
    ) -> None:
        seen = SeenRequest(
            connection=conn.index, method=method, target=target, body=body, answered=answered
        )
        self.requests.append(seen)
        self._notify()

    async def _together(self) -> None:
        event = self._round
        self._arrived += 1
        if self._arrived == self.together_size:
            self._arrived = 0
            self._round = trio.Event()
            event.set()
        await event.wait()

    async def _answer_early(self, conn: DaemonConnection, method: str, target: str) -> None:
        self._record(conn, method, target, b"", answered=True)
        response = _text_response(method, "early answer")
        self.written.append(response)
        await conn.stream.send_all(response)
        conn.served += 1
        self._notify()
        await _read_until_closed(conn)

    async def _serve_sse(self, conn: DaemonConnection) -> None:
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        event = b"id: 1\nevent: message\ndata: {}\n\n"
        await conn.stream.send_all(head + b"%x\r\n" % len(event) + event + b"\r\n")
        await _read_until_closed(conn)


async def _next_event(parser: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = parser.next_event()
        if event is not h11.NEED_DATA:
            return event
        parser.receive_data(await stream.receive_some(READ_SIZE))


async def _read_body(parser: h11.Connection, stream: trio.SocketStream) -> bytes:
    body = bytearray()
    while True:
        event = await _next_event(parser, stream)
        if isinstance(event, h11.Data):
            body += event.data
            assert len(body) <= MAX_BODY, "request body over the test bound"
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            raise h11.RemoteProtocolError(f"unexpected {event!r} inside a request")


async def _read_until_closed(conn: DaemonConnection) -> None:
    """Read and drop until the connector's side ends the connection."""
    try:
        while await conn.stream.receive_some(READ_SIZE):
            pass
    except trio.BrokenResourceError:
        pass
    conn.closed_by_peer = True


def _keep_alive(request: h11.Request) -> bool:
    tokens = {
        token.strip().lower()
        for name, value in request.headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return request.http_version == b"1.1" and b"close" not in tokens


def _text_response(method: str, text: str, *extra: bytes) -> bytes:
    body = text.encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(body)
    head += b"".join(line + b"\r\n" for line in extra) + b"\r\n"
    return head if method == "HEAD" else head + body


def _response(method: str, path: str, body: bytes) -> bytes:
    """The exact bytes of the answer to ``method path`` with request ``body``."""
    if path == "/chunked":
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Transfer-Encoding: chunked\r\nTrailer: X-Checksum, X-More\r\n\r\n"
        )
        return head if method == "HEAD" else head + _chunked(CHUNKS)
    if path == "/empty":
        return b"HTTP/1.1 204 No Content\r\nX-Empty: yes\r\n\r\n"
    if path == "/not-modified":
        return b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n'
    if path == "/hints":
        hint = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        return hint + _text_response(method, "after a hint")
    if path == "/echo":
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        return head if method == "HEAD" else head + body
    if path == "/close":
        return _text_response(method, f"reply to {method} {path}", b"Connection: close")
    return _text_response(method, f"reply to {method} {path}")


def reply(path: str, method: str = "GET") -> bytes:
    """The body the scripted daemon's text routes answer with."""
    return f"reply to {method} {path}".encode()


# ---------------------------------------------------------------------- the chain


@attrs.define(kw_only=True)
class Chain:
    """Browser → relay → connector → daemon."""

    relay: RelayHandle
    connector: Connector
    cookie: tuple[str, str]

    @property
    def pool(self) -> DaemonPool:
        # The connector keeps its pool to itself; the tests read its counters.
        pool = self.connector.daemon_pool
        assert pool is not None, "the connector has not served a stream yet"
        return pool

    async def request(self, method: str, path: str, **options: Any) -> HttpResponse:
        """One request through the relay (``options`` as for ``http_request``)."""
        return await http_request(
            self.relay.address, method, f"/d/{DAEMON_ID}{path}", headers=[self.cookie], **options
        )

    async def get(self, path: str) -> HttpResponse:
        return await self.request("GET", path)


async def start_chain(stack: Stack, daemon_port: int, **relay_settings: Any) -> Chain:
    relay = await stack.start_relay(**relay_settings)
    record, key = await relay.new_scope()
    connector = Connector(fast_connector_config(relay, key, DAEMON_ID, daemon_port))
    await stack.daemons.start(connector.run)
    with trio.fail_after(5):
        await connector.wait_state(LinkState.CONNECTED)
    return Chain(relay=relay, connector=connector, cookie=await relay.session_cookie(record))


async def start_scripted(stack: Stack) -> ScriptedDaemon:
    daemon = ScriptedDaemon()
    await stack.daemons.start(daemon.serve)
    return daemon


async def scripted_chain(stack: Stack, **relay_settings: Any) -> tuple[ScriptedDaemon, Chain]:
    daemon = await start_scripted(stack)
    return daemon, await start_chain(stack, daemon.port, **relay_settings)


async def wait_pool_idle(chain: Chain, count: int) -> None:
    """Wait until ``count`` connections sit idle in the connector's pool."""
    await eventually(lambda: chain.pool.idle_count == count)


class Browser:
    """One HTTP/1.1 connection to the relay whose request body is written when the test says."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, event: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        await self.stream.send_all(self.conn.send(event) or b"")

    async def response(self) -> HttpResponse:
        """Read one whole response (the request may still be unfinished)."""
        status = 0
        headers: list[tuple[str, str]] = []
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(READ_SIZE))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = [(k.decode(), v.decode()) for k, v in event.headers]
            elif isinstance(event, h11.Data):
                body += event.data
                assert len(body) <= MAX_BODY
            elif isinstance(event, h11.EndOfMessage):
                return HttpResponse(status=status, headers=headers, body=bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("the relay closed the connection before a response")


@asynccontextmanager
async def open_browser(chain: Chain) -> AsyncIterator[Browser]:
    stream = await trio.open_tcp_stream(*chain.relay.address)
    async with stream:
        yield Browser(stream)


def browser_head(chain: Chain, method: str, path: str, *headers: tuple[str, str]) -> h11.Request:
    return h11.Request(
        method=method,
        target=f"/d/{DAEMON_ID}{path}",
        headers=[("Host", "relay.test"), chain.cookie, *headers],
    )


# ---------------------------------------------------------------------- reuse


async def test_sequential_gets_share_one_daemon_connection(stack: Stack) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack)
        for number in range(SEQUENTIAL):
            response = await chain.get(f"/text/{number}")
            assert response.status == 200
            assert response.body == reply(f"/text/{number}")
        assert len(daemon.connections) == 1
        assert [r.target for r in daemon.requests] == [f"/text/{n}" for n in range(SEQUENTIAL)]
        assert (chain.pool.opened, chain.pool.reused) == (1, SEQUENTIAL - 1)


async def test_concurrent_requests_use_no_more_connections_than_are_in_flight(
    stack: Stack,
) -> None:
    """Each round has CONCURRENCY requests waiting at the daemon at once (it answers none until
    all have arrived); the later rounds ride on the connections of the first."""
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack)
        statuses: list[int] = []

        async def one() -> None:
            statuses.append((await chain.get("/together")).status)

        for _ in range(ROUNDS):
            async with trio.open_nursery() as nursery:
                for _ in range(CONCURRENCY):
                    nursery.start_soon(one)
            # The browsers have their answers; the connector gives the connections back
            # a moment later.
            await wait_pool_idle(chain, CONCURRENCY)
        assert statuses == [200] * (CONCURRENCY * ROUNDS)
        assert len(daemon.connections) == CONCURRENCY
        assert sorted(c.served for c in daemon.connections) == [ROUNDS] * CONCURRENCY


async def test_chunked_head_204_304_and_post_come_back_whole_and_keep_the_connection(
    stack: Stack,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack)
        chunked = await chain.get("/chunked")
        assert (chunked.status, chunked.body) == (200, CHUNKED_BODY)
        head = await chain.request("HEAD", "/text/head")
        assert (head.status, head.body) == (200, b"")
        assert head.header("content-length") == str(len(reply("/text/head", "HEAD")))
        empty = await chain.get("/empty")
        assert (empty.status, empty.body, empty.header("x-empty")) == (204, b"", "yes")
        not_modified = await chain.get("/not-modified")
        assert (not_modified.status, not_modified.body) == (304, b"")
        upload = bytes(range(256)) * 1024  # 256 KiB: several stream windows' worth of frames
        echoed = await chain.request("POST", "/echo", body=upload)
        assert (echoed.status, echoed.body) == (200, upload)
        last = await chain.get("/text/last")
        assert last.body == reply("/text/last")
        assert len(daemon.connections) == 1
        assert daemon.connections[0].served == 6
        assert [r.body for r in daemon.requests if r.method == "POST"] == [upload]


async def test_the_real_daemon_serves_a_session_of_requests_on_one_connection(
    stack: Stack,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        real = await start_daemon(
            stack.daemons, daemon_id=DAEMON_ID, dashboard_dir=stack.dashboard_dir
        )
        proxy: TcpProxy = await start_proxy(stack.daemons, real.address)
        chain = await start_chain(stack, proxy.port)
        for _ in range(3):
            health = await chain.get("/health")
            assert (health.status, health.json()["status"]) == (200, "ok")
        created = await chain.request("POST", "/peers", json_body={"name": "alice"})
        assert created.status == 201, created.body
        listed = await chain.get("/peers")
        assert [peer["name"] for peer in listed.json()["peers"]] == ["alice"]
        gone = await chain.request("DELETE", "/peers/alice")
        assert gone.status == 204
        assert (await chain.request("DELETE", "/peers/alice")).status == 404
        assert proxy.accepted == 1


# ---------------------------------------------------------------------- daemons that close


async def test_a_daemon_closing_after_each_response_still_serves_gets_and_posts(
    stack: Stack,
) -> None:
    """The daemon closes every connection after one answer and never says so. GETs back to
    back always work: a close that races the next request is caught by the retry. A POST is
    never repeated; it relies on the pool seeing the close first (the quiet check), which
    holds once the close has arrived, as it has between a person's clicks."""
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack)
        daemon.close_after_response = True
        for number in range(5):
            got = await chain.get(f"/text/{number}")
            assert (got.status, got.body) == (200, reply(f"/text/{number}"))
        for number in range(3):
            await daemon.wait_until(lambda: all(c.ended.is_set() for c in daemon.connections))
            posted = await chain.request("POST", "/echo", body=b"note %d" % number)
            assert (posted.status, posted.body) == (200, b"note %d" % number)
        posts = [r.body for r in daemon.requests if r.method == "POST"]
        assert posts == [b"note 0", b"note 1", b"note 2"]
        assert all(r.answered for r in daemon.requests)
        assert len(daemon.requests) == len(daemon.connections) == 8


async def test_a_get_on_a_kept_connection_the_daemon_drops_is_retried_once(stack: Stack) -> None:
    """The daemon reads the request on the kept connection, then closes without answering (its
    idle timeout fired as the request came in): a GET goes again on a fresh connection."""
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack)
        daemon.drop_on_kept = True
        for number in range(3):
            got = await chain.get(f"/text/{number}")
            assert (got.status, got.body) == (200, reply(f"/text/{number}"))
        seen = [(r.connection, r.target, r.answered) for r in daemon.requests]
        assert seen == [
            (0, "/text/0", True),
            (0, "/text/1", False),
            (1, "/text/1", True),
            (1, "/text/2", False),
            (2, "/text/2", True),
        ]


async def test_a_post_on_a_kept_connection_the_daemon_drops_is_not_sent_twice(
    stack: Stack,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack)
        daemon.drop_on_kept = True
        assert (await chain.get("/text/first")).status == 200
        posted = await chain.request("POST", "/echo", body=b"only once")
        assert posted.status == 502
        assert posted.json()["error"] == "daemon_failed"
        posts = [r for r in daemon.requests if r.method == "POST"]
        assert [(r.body, r.answered) for r in posts] == [(b"only once", False)]
        # The dropped connection is gone; the next request gets a fresh one.
        after = await chain.get("/text/after")
        assert (after.status, after.body) == (200, reply("/text/after"))
        assert len(daemon.connections) == 2


async def test_a_response_with_connection_close_is_not_reused(stack: Stack) -> None:
    """The connector ends a connection whose answer said ``Connection: close``, even when the
    daemon has not closed it yet."""
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack)
        for _ in range(2):
            closing = await chain.get("/close")
            assert (closing.status, closing.body) == (200, reply("/close"))
        kept = [await chain.get(f"/text/{n}") for n in range(2)]
        assert [r.body for r in kept] == [reply("/text/0"), reply("/text/1")]
        assert len(daemon.connections) == 3
        assert [c.served for c in daemon.connections] == [1, 1, 2]
        for closed in daemon.connections[:2]:
            await closed.ended.wait()
            assert closed.closed_by_peer
        assert chain.pool.reused == 1


# ---------------------------------------------------------------------- requests cut short


async def test_an_abandoned_sse_stream_closes_its_daemon_connection_promptly(
    stack: Stack,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack)
        assert (await chain.get("/text/warm")).status == 200  # the SSE rides a kept connection
        async with open_http_stream(
            chain.relay.address, "GET", f"/d/{DAEMON_ID}/sse", headers=[chain.cookie]
        ) as events:
            assert events.status == 200
            first = await SseReader(events).next_event()
            assert first.id == "1"
        sse = daemon.connections[0]
        with trio.fail_after(PROMPT):
            await sse.ended.wait()
        assert sse.closed_by_peer
        after = await chain.get("/text/after")
        assert (after.status, after.body) == (200, reply("/text/after"))
        assert len(daemon.connections) == 2


async def test_an_upload_cut_by_the_body_limit_does_not_poison_the_pool(stack: Stack) -> None:
    limit = 64 * 1024
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack, max_body_size=limit)
        assert (await chain.get("/text/warm")).status == 200
        async with open_browser(chain) as browser:
            # Chunked, so the relay only learns the size as the body passes through it.
            await browser.send(
                browser_head(chain, "POST", "/echo", ("Transfer-Encoding", "chunked"))
            )
            refused: list[HttpResponse] = []

            async def read_answer() -> None:
                refused.append(await browser.response())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_answer)
                piece = b"u" * (16 * 1024)
                try:
                    for _ in range(2 * limit // len(piece)):
                        await browser.send(h11.Data(data=piece))
                except trio.BrokenResourceError:
                    pass  # the relay may close before the whole body is written
        assert refused[0].status == 413
        cut = daemon.connections[0]
        with trio.fail_after(PROMPT):
            await cut.ended.wait()
        assert cut.closed_by_peer
        assert not any(r.method == "POST" for r in daemon.requests)  # never completed
        after = await chain.get("/text/after")
        assert (after.status, after.body) == (200, reply("/text/after"))
        assert len(daemon.connections) == 2


async def test_a_daemon_answering_before_the_body_arrived_does_not_get_its_connection_back(
    stack: Stack,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack)
        assert (await chain.get("/text/warm")).status == 200
        declared = 100_000
        async with open_browser(chain) as browser:
            await browser.send(
                browser_head(chain, "POST", "/early", ("Content-Length", str(declared)))
            )
            await browser.send(h11.Data(data=b"b" * 1000))  # the rest never comes
            early = await browser.response()
        assert (early.status, early.body) == (200, b"early answer")
        answered_early = daemon.connections[0]
        with trio.fail_after(PROMPT):
            await answered_early.ended.wait()
        assert answered_early.closed_by_peer
        after = await chain.get("/text/after")
        assert (after.status, after.body) == (200, reply("/text/after"))
        assert len(daemon.connections) == 2
        assert daemon.connections[1].served == 1


@pytest.mark.parametrize("route", ["/leaky", "/leaky-late"])
async def test_bytes_after_a_response_never_reach_the_next_request(
    stack: Stack, route: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        daemon, chain = await scripted_chain(stack)
        leaky = await chain.get(route)
        assert (leaky.status, leaky.body) == (200, reply(route))
        if route == "/leaky-late":
            await daemon.stray_sent.wait()
        for number in range(3):
            after = await chain.get(f"/text/{number}")
            assert (after.status, after.body) == (200, reply(f"/text/{number}"))
        first = daemon.connections[0]
        await first.ended.wait()
        assert first.closed_by_peer
        assert first.served == 1
        assert len(daemon.connections) == 2


# ---------------------------------------------------------------------- raw stream bytes


async def linked_to_fake_relay(
    stack: Stack, daemon: ScriptedDaemon
) -> tuple[Connector, MuxSession]:
    fake = await start_fake_relay(stack.relays)
    connector = Connector(fake_relay_config(fake.ws_url, daemon_port=daemon.port))
    await stack.daemons.start(connector.run)
    with trio.fail_after(5):
        await connector.wait_state(LinkState.CONNECTED)
        return connector, await fake.session()


async def read_to_end(stream: MuxStream) -> bytes:
    """Everything the connector writes on ``stream`` until it ends its side."""
    out = bytearray()
    while data := await stream.receive_some(READ_SIZE):
        out += data
        assert len(out) <= MAX_BODY
    return bytes(out)


async def raw_exchange(session: MuxSession, data: bytes) -> bytes:
    stream = await session.open_stream({"kind": "http", "from": "browser"})
    try:
        await stream.send_all(data)
        return await read_to_end(stream)
    finally:
        await stream.aclose()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/chunked", b""),
        ("HEAD", "/chunked", b""),
        ("GET", "/empty", b""),
        ("GET", "/not-modified", b""),
        ("GET", "/hints", b""),
        ("POST", "/echo", b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n" * 100),
        ("HEAD", "/text/h", b""),
    ],
)
async def test_responses_reach_the_stream_byte_for_byte_on_a_kept_connection(
    stack: Stack, method: str, path: str, body: bytes
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        daemon = await start_scripted(stack)
        _, session = await linked_to_fake_relay(stack, daemon)
        for attempt in range(2):
            raw = await raw_exchange(session, request_head(method, path, body=body) + body)
            assert raw == daemon.written[-1], f"attempt {attempt}"
            # The request went as it came, but for the Connection header the connector drops.
            assert daemon.requests[-1].body == body
        assert len(daemon.connections) == 1
        assert daemon.connections[0].served == 2


async def test_a_websocket_upgrade_gets_a_connection_of_its_own(stack: Stack) -> None:
    """Upgrades are spliced on a fresh connection, never taken from or given to the pool."""
    with trio.fail_after(TEST_TIMEOUT):
        daemon = await start_scripted(stack)
        connector, session = await linked_to_fake_relay(stack, daemon)
        plain = await raw_exchange(session, request_head("GET", "/text/a"))
        assert plain.endswith(reply("/text/a"))
        # The scripted daemon answers the upgrade request as a plain one and, since the
        # request says Connection: close, closes: the stream ends with the connection.
        upgrade = request_head("GET", "/text/b", [("Upgrade", "websocket")])
        assert (await raw_exchange(session, upgrade)).endswith(reply("/text/b"))
        plain = await raw_exchange(session, request_head("GET", "/text/c"))
        assert plain.endswith(reply("/text/c"))
        assert [(r.connection, r.target) for r in daemon.requests] == [
            (0, "/text/a"),
            (1, "/text/b"),
            (0, "/text/c"),
        ]
        pool = connector.daemon_pool
        assert pool is not None and (pool.opened, pool.reused) == (2, 1)


async def test_a_dropped_get_whose_body_came_late_is_not_retried_without_its_body(
    stack: Stack,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        daemon = await start_scripted(stack)
        daemon.drop_on_kept = True
        _, session = await linked_to_fake_relay(stack, daemon)
        assert (await raw_exchange(session, request_head("GET", "/text/1"))).endswith(
            reply("/text/1")
        )
        stream = await session.open_stream({"kind": "http", "from": "browser"})
        try:
            head = request_head("GET", "/text/2", body=b"hello")
            await stream.send_all(head)
            # The connector has written the head to the kept connection: now the body.
            await daemon.wait_until(lambda: daemon.heads_seen == 2)
            await stream.send_all(b"hello")
            outcome: bytes | int | None = None
            with trio.move_on_after(HANG_BOUND):
                try:
                    outcome = await read_to_end(stream)
                except StreamResetError as reset:
                    outcome = reset.code
        finally:
            await stream.aclose()
        # Not retryable once the body has gone (a reset), or retried with the body.
        assert outcome is not None, "the exchange hung"
        if isinstance(outcome, int):
            assert outcome == ErrorCode.UPSTREAM_FAILED
        else:
            assert outcome.endswith(reply("/text/2"))
            assert daemon.requests[-1].body == b"hello"
