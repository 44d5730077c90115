"""Clients for tests: one HTTP/1.1 exchange per connection, event streams, WebSockets.

- :func:`http_request`: one exchange on a fresh connection (h11 over trio sockets), the body
  read by Content-Length or chunked end, never by waiting for EOF.
- :func:`open_http_stream` and :class:`HttpStream`: a response read incrementally;
  :func:`open_http_stream_on` does the same on a stream the caller opened (TLS, say).
- :class:`SseReader`: an :class:`HttpStream` split into events
  (:class:`tests.support.http_client.SseEvent`).
- :func:`open_websocket` and :func:`open_browser_websocket`: a trio-websocket client on a
  stream it closes (:func:`tests.support.websocket.open_client_websocket`); a refused upgrade
  raises ConnectionRejected itself. :func:`next_text` reads one text message.
- :func:`stream_request`, :func:`request_head` and :func:`json_head`: HTTP/1.1 over a stream
  the test already has (a multiplexed stream), with a request head written byte for byte.

:mod:`tests.support.http_client` is the keep-alive client of the benchmarks; the one-shot
exchanges here send the request in a background task while the response is read, as a browser
does, so a server that answers early (a 413) and stops reading is seen answering; they also
send chunked request bodies (a ``Transfer-Encoding`` header in ``headers``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import h11
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection

from .http_client import SseEvent
from .listener import Address as Address
from .websocket import WS_CLOSE_TIMEOUT, open_client_websocket

#: Bytes read from a socket at a time.
READ_SIZE = 65536
#: Largest response body the test client buffers whole.
MAX_TEST_BODY = 64 * 1024 * 1024
#: Largest response :func:`stream_request` buffers whole.
MAX_STREAM_RESPONSE = 1024 * 1024
#: Largest WebSocket message a test client accepts by default.
WS_MAX_MESSAGE = 4 * 1024 * 1024
#: Messages trio-websocket queues for a browser's WebSocket before its reader waits.
BROWSER_MESSAGE_QUEUE = 4


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


class HttpStream:
    """An open response whose body is read piece by piece (e.g. an SSE stream)."""

    def __init__(
        self, stream: trio.abc.ReceiveStream, conn: h11.Connection, head: h11.Response
    ) -> None:
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
                self._conn.receive_data(bytes(await self._stream.receive_some(READ_SIZE)))
            elif isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.ended = True
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("connection closed before the end of the body")
        return None

    async def read_all(self, limit: int = MAX_TEST_BODY) -> bytes:
        return await read_to_end(self.read_chunk, limit, "response body")


async def read_to_end(
    next_piece: Callable[[], Awaitable[bytes | None]], limit: int, what: str
) -> bytes:
    """Every piece ``next_piece()`` returns until None, joined; AssertionError naming ``what``
    past ``limit`` bytes."""
    body = bytearray()
    while (piece := await next_piece()) is not None:
        body += piece
        if len(body) > limit:
            raise AssertionError(f"{what} larger than {limit} bytes")
    return bytes(body)


def _request_bytes(
    conn: h11.Connection,
    host: str,
    method: str,
    path: str,
    body: bytes | None,
    headers: Sequence[tuple[str, str]],
) -> bytes:
    """The whole request; a Content-Length unless ``headers`` ask for chunked framing (a GET
    announces none)."""
    out = [("Host", host)]
    chunked = any(name.lower() == "transfer-encoding" for name, _ in headers)
    if body is not None and method != "GET" and not chunked:
        out.append(("Content-Length", str(len(body))))
    out.extend(headers)
    data = conn.send(h11.Request(method=method, target=path, headers=out)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


async def _read_response_head(
    stream: trio.abc.ReceiveStream, conn: h11.Connection, send_failed: list[BaseException]
) -> h11.Response:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                received = await stream.receive_some(READ_SIZE)
            except trio.BrokenResourceError:
                if send_failed:
                    raise send_failed[0] from None
                raise
            conn.receive_data(bytes(received))
        elif isinstance(event, h11.InformationalResponse):
            continue
        elif isinstance(event, h11.Response):
            return event
        else:
            raise AssertionError(f"unexpected event before the response: {event!r}")


@asynccontextmanager
async def open_http_stream_on(
    stream: trio.abc.Stream,
    host: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[HttpStream]:
    """Send one request on ``stream`` (``host`` is its Host header) and yield the response
    once its head arrived. The stream is the caller's to close.

    The request is sent by a background task while the response is read, as a browser does:
    a server may answer early (say, 413) and stop reading; a send that then fails is ignored
    once a response has arrived.
    """
    conn = h11.Connection(h11.CLIENT)
    data = _request_bytes(conn, host, method, path, body, headers)
    send_failed: list[BaseException] = []

    async def send() -> None:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError as exc:
            send_failed.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        head = await _read_response_head(stream, conn, send_failed)
        yield HttpStream(stream, conn, head)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_http_stream(
    address: Address,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[HttpStream]:
    """:func:`open_http_stream_on` a new connection to ``address``, closed on exit (read or
    not)."""
    stream = await trio.open_tcp_stream(*address)
    async with (
        stream,
        open_http_stream_on(
            stream, f"{address[0]}:{address[1]}", method, path, body=body, headers=headers
        ) as response,
    ):
        yield response


def json_request(
    body: bytes | None, json_body: object, headers: Sequence[tuple[str, str]]
) -> tuple[bytes | None, list[tuple[str, str]]]:
    """``(body, headers)``: with a ``json_body``, its encoding and a JSON content type."""
    out = list(headers)
    if json_body is not None:
        body = json.dumps(json_body).encode()
        out.append(("Content-Type", "application/json"))
    return body, out


async def read_response(stream: HttpStream) -> HttpResponse:
    """The rest of ``stream`` as a whole :class:`HttpResponse`."""
    content = await stream.read_all()
    return HttpResponse(status=stream.status, headers=stream.headers, body=content)


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
    body, sent = json_request(body, json_body, headers)
    async with open_http_stream(address, method, path, body=body, headers=sent) as response:
        return await read_response(response)


# -- Server-Sent Events -------------------------------------------------------------------


class SseReader:
    """Splits an :class:`HttpStream` body into events (blocks up to a blank line)."""

    def __init__(self, stream: HttpStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next_message(self) -> SseEvent | None:
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

    async def next_event(self) -> SseEvent:
        """The next block that carries an event (skipping comments and retry hints)."""
        while True:
            message = await self.next_message()
            if message is None:
                raise AssertionError("the stream ended before another event")
            if message.event is not None or message.data:
                return message


def _parse_block(block: str) -> SseEvent:
    fields: dict[str, str] = {}
    comments: list[str] = []
    data: list[str] = []
    for line in block.splitlines():
        if line.startswith(":"):
            comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event", "retry"):
            fields[name] = value
    return SseEvent(
        id=fields.get("id"),
        event=fields.get("event"),
        retry=fields.get("retry"),
        data="\n".join(data),
        comments=tuple(comments),
    )


# -- WebSocket ----------------------------------------------------------------------------


@asynccontextmanager
async def open_websocket(
    address: Address,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    origin: str | None = None,
    message_queue_size: int = 1,
    max_message_size: int = WS_MAX_MESSAGE,
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket to ``address`` with extra request ``headers`` (and an ``Origin`` if given),
    on a TCP stream this helper owns and closes. A refused upgrade raises ConnectionRejected
    (trio-websocket raises it from its reader task, in a group; it is handed over unwrapped)."""
    sent = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if origin is not None:
        sent.append((b"Origin", origin.encode()))
    rejected: ConnectionRejected | None = None
    try:
        async with open_client_websocket(
            address,
            path,
            headers=sent,
            message_queue_size=message_queue_size,
            max_message_size=max_message_size,
            close_timeout=WS_CLOSE_TIMEOUT,
        ) as ws:
            yield ws
    except* ConnectionRejected as group:
        first = group.exceptions[0]
        assert isinstance(first, ConnectionRejected)
        rejected = first
    if rejected is not None:
        raise rejected


def open_browser_websocket(
    address: Address,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    max_message_size: int = WS_MAX_MESSAGE,
) -> AbstractAsyncContextManager[WebSocketConnection]:
    """A browser's WebSocket through the relay (``headers``: its cookie, its Origin), as
    :func:`open_websocket` with room for :data:`BROWSER_MESSAGE_QUEUE` messages."""
    return open_websocket(
        address,
        path,
        headers,
        message_queue_size=BROWSER_MESSAGE_QUEUE,
        max_message_size=max_message_size,
    )


async def next_text(connection: WebSocketConnection) -> str:
    """The next message of ``connection``, which must be text."""
    message = await connection.get_message()
    assert isinstance(message, str), f"expected a text message, got {message!r}"
    return message


# -- HTTP over a stream the test holds ----------------------------------------------------


async def stream_request(
    stream: trio.abc.HalfCloseableStream,
    head: bytes,
    body: bytes = b"",
    *,
    limit: int = MAX_STREAM_RESPONSE,
) -> HttpResponse:
    """Write a raw request (``head`` as given, so tests can forge any header) and ``body``,
    then read one whole response by its framing. Header names come back lower-case."""
    if head or body:
        await stream.send_all(head + body)
    conn = h11.Connection(h11.CLIENT)
    # The client side of h11 must have sent a request before it reads a response.
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "stream")]))
    conn.send(h11.EndOfMessage())
    status = 0
    headers: list[tuple[str, str]] = []
    content = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some()))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = [(k.decode().lower(), v.decode()) for k, v in event.headers]
        elif isinstance(event, h11.Data):
            content += event.data
            assert len(content) <= limit, f"response larger than {limit} bytes"
        elif isinstance(event, h11.EndOfMessage):
            return HttpResponse(status=status, headers=headers, body=bytes(content))
        elif isinstance(event, h11.ConnectionClosed):
            raise AssertionError("the stream ended before a whole response")


def request_head(
    method: str, path: str, headers: Sequence[tuple[str, str]] = (), *, body: bytes = b""
) -> bytes:
    """A raw HTTP/1.1 request head (``Connection: close``, Content-Length of ``body``)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: repowire-daemon"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_head(
    method: str, path: str, document: object, headers: Sequence[tuple[str, str]] = ()
) -> tuple[bytes, bytes]:
    """``(head, body)`` of a JSON request."""
    body = json.dumps(document).encode()
    head = request_head(method, path, [("Content-Type", "application/json"), *headers], body=body)
    return head, body
