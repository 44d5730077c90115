"""Helpers for tests that talk to a real daemon over loopback (fixtures are in conftest.py).

Kept out of conftest.py so test modules can import them by a name no other test directory
uses.

- :func:`http_request`: one HTTP/1.1 exchange on a fresh connection (h11 over trio sockets),
  the body read by Content-Length or chunked end, never by waiting for EOF.
- :func:`open_http_stream` and :class:`SseReader`: a response read incrementally (SSE).
- :func:`open_websocket`: a WebSocket client (trio-websocket) on a stream it closes.
- :func:`start_daemon`: a real hypercorn server on 127.0.0.1, port 0, under a nursery (the
  ``daemon_factory`` fixture wraps it).
- :class:`LoopbackMesh`: a MeshClient that reaches other in-process daemons directly, adding
  the ``Repowire-Mesh-From`` header as the connector does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
from trio_websocket import WebSocketConnection

from repowire.daemon import (
    MESH_FROM_HEADER,
    DaemonSettings,
    DaemonState,
    MeshClient,
    MeshDirectory,
    MeshError,
    MeshResponse,
    create_app,
    serve_daemon,
)
from tests.support.websocket import open_client_websocket

Address = tuple[str, int]

#: Bytes read from a socket at a time.
READ_SIZE = 65536
#: Seconds a server gets to finish open connections at the end of a test.
TEST_GRACEFUL_TIMEOUT = 0.5
#: Largest response body the test client buffers whole.
MAX_TEST_BODY = 64 * 1024 * 1024


# -- a small HTTP/1.1 client -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class HttpResponse:
    """A whole response. Header names are lower-case."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def _request_headers(
    address: Address, headers: Sequence[tuple[str, str]], body: bytes | None
) -> list[tuple[str, str]]:
    out = [("Host", f"{address[0]}:{address[1]}")]
    chunked = any(name.lower() == "transfer-encoding" for name, _ in headers)
    if body is not None and not chunked:
        out.append(("Content-Length", str(len(body))))
    out.extend(headers)
    return out


class HttpStream:
    """An open response whose body is read piece by piece (e.g. an SSE stream)."""

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, head: h11.Response):
        self._stream = stream
        self._conn = conn
        self.status = head.status_code
        self.headers = [(k.decode().lower(), v.decode()) for k, v in head.headers]
        self.ended = False

    def header(self, name: str) -> str | None:
        return dict(self.headers).get(name.lower())

    async def read_chunk(self) -> bytes | None:
        """The next piece of body (never empty), or None at the end of the message."""
        while not self.ended:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                self._conn.receive_data(await self._stream.receive_some(READ_SIZE))
            elif isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.ended = True
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("connection closed before the end of the body")
        return None

    async def read_all(self, limit: int = MAX_TEST_BODY) -> bytes:
        body = bytearray()
        while (chunk := await self.read_chunk()) is not None:
            body += chunk
            if len(body) > limit:
                raise AssertionError(f"response body larger than {limit} bytes")
        return bytes(body)


@asynccontextmanager
async def open_http_stream(
    address: Address,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[HttpStream]:
    """Send one request on a new connection and yield the response once its head arrived.

    The request is sent by a background task while the response is read, as a browser does:
    a server may answer early (say, 413) and stop reading; a send that then fails is ignored
    once a response has arrived. The connection is closed on exit, read or not.
    """
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method=method,
            target=path,
            headers=_request_headers(address, headers, body if method != "GET" else None),
        )
        data = conn.send(request)
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        send_failed: list[trio.BrokenResourceError] = []

        async def send() -> None:
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError as exc:
                send_failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        received = await stream.receive_some(READ_SIZE)
                    except trio.BrokenResourceError:
                        if send_failed:
                            raise send_failed[0] from None
                        raise
                    conn.receive_data(received)
                elif isinstance(event, h11.InformationalResponse):
                    continue
                elif isinstance(event, h11.Response):
                    break
                else:
                    raise AssertionError(f"unexpected event before the response: {event!r}")
            yield HttpStream(stream, conn, event)
            nursery.cancel_scope.cancel()


async def http_request(
    address: Address,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    json_body: object = None,
    headers: Sequence[tuple[str, str]] = (),
) -> HttpResponse:
    """One request, the whole response. ``json_body`` sets the body and its content type."""
    headers = list(headers)
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers.append(("Content-Type", "application/json"))
    async with open_http_stream(address, method, path, body=body, headers=headers) as response:
        content = await response.read_all()
        return HttpResponse(status=response.status, headers=response.headers, body=content)


# -- WebSocket ----------------------------------------------------------------------------


@asynccontextmanager
async def open_websocket(
    address: Address,
    path: str,
    *,
    origin: str | None = None,
    message_queue_size: int = 1,
    max_message_size: int = 4 * 1024 * 1024,
) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client connection to the daemon, with an ``Origin`` header if given,
    on a TCP stream it owns and closes (:func:`tests.support.websocket.open_client_websocket`)."""
    headers = [] if origin is None else [(b"Origin", origin.encode())]
    async with open_client_websocket(
        address,
        path,
        headers=headers,
        message_queue_size=message_queue_size,
        max_message_size=max_message_size,
    ) as ws:
        yield ws


# -- Server-Sent Events -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SseMessage:
    """One block of an SSE stream (up to a blank line)."""

    id: str | None = None
    event: str | None = None
    data: str = ""
    retry: str | None = None
    comments: tuple[str, ...] = ()

    def json(self) -> Any:
        return json.loads(self.data)


class SseReader:
    """Splits an :class:`HttpStream` body into :class:`SseMessage` blocks."""

    def __init__(self, stream: HttpStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next_message(self) -> SseMessage | None:
        """The next block, or None when the stream ended (a partial block is an error)."""
        while True:
            # The daemon ends lines with LF only.
            head, found, rest = self._buffer.partition(b"\n\n")
            if found:
                self._buffer = rest
                return _parse_block(head.decode())
            chunk = await self._stream.read_chunk()
            if chunk is None:
                if self._buffer.strip():
                    raise AssertionError(f"stream ended inside a message: {self._buffer!r}")
                return None
            self._buffer += chunk

    async def next_event(self) -> SseMessage:
        """The next block that carries an event (skipping comments and retry hints)."""
        while True:
            message = await self.next_message()
            if message is None:
                raise AssertionError("the stream ended before another event")
            if message.event is not None or message.data:
                return message


def _parse_block(block: str) -> SseMessage:
    fields: dict[str, Any] = {"comments": []}
    data: list[str] = []
    for line in block.splitlines():
        if line.startswith(":"):
            fields["comments"].append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event", "retry"):
            fields[name] = value
    fields["comments"] = tuple(fields["comments"])
    return SseMessage(data="\n".join(data), **fields)


# -- waiting ------------------------------------------------------------------------------


async def eventually(
    predicate: Callable[[], bool], *, tries: int = 1000, interval: float = 0.005
) -> None:
    """Return once ``predicate()`` holds; fail after ``tries`` short sleeps.

    For state the server changes on its own schedule (a subscription released after the
    client left), where there is no event to wait on. Callers still wrap it in fail_after.
    """
    for _ in range(tries):
        if predicate():
            return
        await trio.sleep(interval)
    raise AssertionError(f"condition still false after {tries} checks")


# -- servers ------------------------------------------------------------------------------


class FixedClock:
    """A clock callable for DaemonState: returns ``now``, which tests may set."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@attrs.define(kw_only=True)
class RunningDaemon:
    daemon_id: str
    address: Address
    state: DaemonState
    clock: FixedClock

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    async def request(self, method: str, path: str, **kwargs: Any) -> HttpResponse:
        return await http_request(self.address, method, path, **kwargs)


async def start_daemon(
    nursery: trio.Nursery,
    *,
    daemon_id: str = "alpha",
    dashboard_dir: Path,
    mesh: MeshClient | None = None,
    relay_status: Callable[[], Mapping[str, object]] | None = None,
    settings: DaemonSettings | None = None,
    state: DaemonState | None = None,
    clock: FixedClock | None = None,
) -> RunningDaemon:
    """Serve a new daemon app on 127.0.0.1, port 0, under ``nursery``."""
    clock = clock or FixedClock()
    state = state or DaemonState(clock=clock)
    app = create_app(
        daemon_id=daemon_id,
        version="0.0.test",
        state=state,
        mesh=mesh,
        relay_status=relay_status,
        dashboard_dir=dashboard_dir,
        settings=settings,
    )
    address: Address = await nursery.start(
        partial(serve_daemon, app, host="127.0.0.1", port=0, graceful_timeout=TEST_GRACEFUL_TIMEOUT)
    )
    return RunningDaemon(daemon_id=daemon_id, address=address, state=state, clock=clock)


#: The type of the ``daemon_factory`` fixture (see conftest.py).
DaemonFactory = Callable[..., Awaitable[RunningDaemon]]


# -- a mesh between in-process daemons ----------------------------------------------------


class LoopbackMesh:
    """A MeshClient for daemon ``own_id`` that reaches the daemons in ``peers`` directly.

    Requests carry ``Repowire-Mesh-From: own_id``, as the connector adds it. A daemon id not
    in ``peers`` raises ``MeshError("unknown_daemon")``; ids in ``offline`` raise
    ``daemon_offline``. ``calls`` records ``(daemon_id, method, path, body)``.
    """

    def __init__(self, own_id: str) -> None:
        self.own_id = own_id
        self.peers: dict[str, Address] = {}
        self.offline: set[str] = set()
        self.calls: list[tuple[str, str, str, bytes]] = []

    async def request(
        self,
        daemon_id: str,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> MeshResponse:
        self.calls.append((daemon_id, method, path, body))
        if daemon_id in self.offline:
            raise MeshError("daemon_offline", f"Daemon {daemon_id!r} is not connected.")
        if daemon_id not in self.peers:
            raise MeshError("unknown_daemon", f"No daemon {daemon_id!r} in this scope.")
        sent = [(k, v) for k, v in headers if k.lower() != MESH_FROM_HEADER.lower()]
        sent.append((MESH_FROM_HEADER, self.own_id))
        response = await http_request(self.peers[daemon_id], method, path, body=body, headers=sent)
        return MeshResponse(status=response.status, headers=response.headers, body=response.body)

    async def directory(self) -> MeshDirectory:
        return MeshDirectory(online=tuple(sorted(self.peers)))
