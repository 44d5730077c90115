"""A small HTTP/1.1 client on trio streams, for the tests and the benchmarks.

- :func:`connect`: a TCP connection to ``(host, port)`` (TLS on top with an ``ssl_context``),
  as an :class:`HttpConnection`.
- :class:`HttpConnection`: requests one after the other on one connection (keep-alive);
  :meth:`~HttpConnection.request` for a whole exchange, or the steps apart for a body streamed
  either way (:meth:`~HttpConnection.send_request`, :meth:`~HttpConnection.send_body`,
  :meth:`~HttpConnection.read_head`, :meth:`~HttpConnection.receive_body`), and
  :meth:`~HttpConnection.read_line` / :meth:`~HttpConnection.read_sse_event` for an event
  stream.
- :func:`request`: one exchange on a new connection.
- :func:`request_head` and :func:`parse_response_head`: the two ends of the format alone, for
  a caller on a blocking socket (the bulk benchmark, whose direct figure a trio reader would
  cap: trio's scheduling pass per receive halves what one core can read).

A response body is read by its Content-Length or by its chunked framing, never by waiting for
the end of the connection: a server may keep its socket open after answering
``Connection: close`` (hypercorn 0.18 does), so a client that waits for EOF hangs. A response
that has a body but neither framing is refused with :class:`HttpError`. Nothing is read past the
end of a response, so the next one on the connection starts where it should.

Every read is bounded: a response head by :data:`MAX_HEAD`, a line of the body by
:data:`MAX_LINE`, a body read whole by the ``limit`` given (:data:`MAX_BODY`).
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Sequence
from typing import Any, Self

import attrs
import trio

Address = tuple[str, int]

#: Largest response head read (status line and headers).
MAX_HEAD = 64 * 1024
#: Largest line :meth:`HttpConnection.read_line` returns (a chunk-size line is far shorter).
MAX_LINE = 1024 * 1024
#: Largest body :meth:`HttpConnection.read_body` and :func:`request` keep by default.
MAX_BODY = 64 * 1024 * 1024
#: Bytes asked of the transport per receive, by default.
READ_SIZE = 64 * 1024

#: A chunk size: hexadecimal digits only (no sign, prefix or underscore, which int() allows).
_HEX = re.compile(rb"[0-9A-Fa-f]+")
#: Statuses whose responses never carry a body (RFC 9112, section 6.3).
_BODILESS_STATUSES = frozenset({204, 304})


class HttpError(Exception):
    """The response broke HTTP/1.1 framing, exceeded a bound, or the connection ended early."""


@attrs.frozen(kw_only=True)
class ResponseHead:
    """A response's status line and headers; header names are lower-case, in arrival order."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)


@attrs.frozen(kw_only=True)
class Response(ResponseHead):
    """A whole response."""

    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen(kw_only=True)
class SseEvent:
    """One block of an event stream (its lines up to a blank one)."""

    event: str | None = None
    data: str = ""
    id: str | None = None
    retry: str | None = None
    comments: tuple[str, ...] = ()

    def json(self) -> Any:
        return json.loads(self.data)


def request_head(
    method: str,
    target: str,
    *,
    host: str,
    headers: Sequence[tuple[str, str]] = (),
    cookie: str | None = None,
    content_length: int | None = None,
    close: bool = False,
) -> bytes:
    """An HTTP/1.1 request head, blank line included (for a blocking socket too)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if cookie is not None:
        lines.append(f"Cookie: {cookie}")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_response_head(raw: bytes) -> ResponseHead:
    """Parse a response head (without its blank line; for a blocking socket too). Raises
    :class:`HttpError`."""
    lines = raw.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise HttpError(f"malformed header line: {line[:80]!r}")
        headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
    return ResponseHead(status=int(code), reason=reason.decode("latin-1"), headers=tuple(headers))


def _content_length(head: ResponseHead) -> int | None:
    values = {value for name, value in head.headers if name == "content-length"}
    if not values:
        return None
    if len(values) > 1:
        raise HttpError(f"conflicting Content-Length values: {sorted(values)}")
    [value] = values
    if not value.isdigit():
        raise HttpError(f"malformed Content-Length: {value[:40]!r}")
    return int(value)


def _is_chunked(head: ResponseHead) -> bool:
    codings = [
        coding.strip().lower()
        for name, value in head.headers
        if name == "transfer-encoding"
        for coding in value.split(",")
    ]
    if not codings:
        return False
    if codings[-1] != "chunked":
        raise HttpError(f"a body coded {codings} has no framing but the end of the connection")
    return True


def _sse_event(lines: Sequence[bytes]) -> SseEvent:
    fields: dict[str, str] = {}
    data: list[str] = []
    comments: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8")
        if line.startswith(":"):
            comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("event", "id", "retry"):
            fields[name] = value
    return SseEvent(
        event=fields.get("event"),
        data="\n".join(data),
        id=fields.get("id"),
        retry=fields.get("retry"),
        comments=tuple(comments),
    )


class HttpConnection:
    """HTTP/1.1 exchanges on one stream, one after the other; the connection owns the stream.

    ``host`` is the Host header of every request; ``cookie`` (``name=value``, a secret: it is
    never in a repr or an error) goes with every request as its Cookie header. A response must
    be read to its end (or the connection closed) before the next request.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        host: str,
        cookie: str | None = None,
        read_size: int = READ_SIZE,
    ) -> None:
        self.stream = stream
        self.host = host
        self._cookie = cookie
        self.read_size = read_size
        #: Bytes received from the stream and not yet parsed.
        self._buffer = bytearray()
        #: Body bytes already unframed but not yet handed out (read_line leaves them here).
        self._pending = bytearray()
        self._method = ""
        #: Body bytes left: of the whole body (Content-Length) or of the current chunk.
        self._left = 0
        self._chunked = False
        #: Whether a chunk of the current body was read (its line end is still due).
        self._chunk_seen = False
        self._in_body = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the stream (at once for plain TCP; TLS sends its close_notify)."""
        await self.stream.aclose()

    # -- the request ------------------------------------------------------------------

    async def send_request(
        self,
        method: str,
        target: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        content_length: int | None = None,
        close: bool = False,
    ) -> None:
        """Send a request head, then ``body`` if given (with its Content-Length).

        With ``content_length`` and no ``body``, the body follows through :meth:`send_body`.
        ``close`` asks the server to close after answering (``Connection: close``); the
        answer is read by its framing all the same. Raises ``trio.BrokenResourceError`` if
        the connection is gone.
        """
        if body is not None:
            content_length = len(body)
        head = request_head(
            method,
            target,
            host=self.host,
            headers=headers,
            cookie=self._cookie,
            content_length=content_length,
            close=close,
        )
        self._method = method.upper()
        await self.stream.send_all(head + body if body else head)

    async def send_body(self, data: bytes | bytearray | memoryview) -> None:
        """Send a piece of the request body announced by ``content_length``."""
        await self.stream.send_all(data)

    # -- the response -----------------------------------------------------------------

    async def _fill(self, what: str) -> None:
        data = await self.stream.receive_some(self.read_size)
        if not data:
            raise HttpError(f"the connection closed before {what}")
        self._buffer += data

    async def read_head(self) -> ResponseHead:
        """Read the next response head (interim 1xx answers other than 101 are skipped) and
        prepare to read its body. Raises :class:`HttpError`."""
        while True:
            searched = 0
            while (end := self._buffer.find(b"\r\n\r\n", searched)) < 0:
                if len(self._buffer) > MAX_HEAD:
                    raise HttpError(f"response head larger than {MAX_HEAD} bytes")
                searched = max(0, len(self._buffer) - 3)
                await self._fill("a whole response head")
            head = parse_response_head(bytes(self._buffer[:end]))
            del self._buffer[: end + 4]
            if 100 <= head.status < 200 and head.status != 101:
                continue
            self._start_body(head)
            return head

    def _start_body(self, head: ResponseHead) -> None:
        self._pending.clear()
        self._chunked = False
        self._chunk_seen = False
        self._left = 0
        if self._method == "HEAD" or head.status < 200 or head.status in _BODILESS_STATUSES:
            self._in_body = False
            return
        length = _content_length(head)
        if _is_chunked(head):
            # RFC 9112: chunked framing wins over a Content-Length sent beside it.
            self._chunked = True
        elif length is None:
            raise HttpError(
                f"HTTP {head.status} has neither Content-Length nor chunked framing: its end "
                "would be the end of the connection"
            )
        else:
            self._left = length
        self._in_body = self._chunked or length != 0

    async def receive_body(self, max_bytes: int | None = None) -> bytes:
        """The next piece of the body (at most ``max_bytes``, default the read size): never
        empty until the body ended, then ``b""``. Raises :class:`HttpError`."""
        limit = max_bytes if max_bytes is not None else self.read_size
        if self._pending:
            piece = bytes(self._pending[:limit])
            del self._pending[:limit]
            return piece
        return await self._receive_framed(limit)

    async def _receive_framed(self, limit: int) -> bytes:
        """The next piece of the body from the framing (``b""`` at its end); bytes already
        in :attr:`_pending` are not looked at."""
        if not self._in_body:
            return b""
        if self._chunked and self._left == 0 and not await self._next_chunk():
            return b""
        step = min(limit, self._left)
        if self._buffer:
            piece = bytes(self._buffer[:step])
            del self._buffer[:step]
        else:
            # Straight from the transport, asking no more than the body holds: nothing of the
            # next response is read, and no copy is made.
            data = await self.stream.receive_some(step)
            piece = data if type(data) is bytes else bytes(data)
            if not piece:
                raise HttpError(f"the connection closed with {self._left} bytes of body unread")
        self._left -= len(piece)
        if self._left == 0 and not self._chunked:
            self._in_body = False
        return piece

    async def _read_line_raw(self, what: str) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > MAX_LINE:
                raise HttpError(f"a line of chunked framing longer than {MAX_LINE} bytes")
            await self._fill(what)
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _next_chunk(self) -> bool:
        """Read the line end of the chunk before (if any) and a chunk-size line; True if a
        chunk follows, False at the last one (whose trailer section is read and dropped).

        The line end after a chunk's data is only read here, so a chunk is handed out as soon
        as its data is in."""
        if self._chunk_seen and await self._read_line_raw("the end of a chunk"):
            raise HttpError("a chunk's data is longer than its size")
        line = await self._read_line_raw("a chunk size")
        size_text = line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_text):
            raise HttpError(f"malformed chunk size: {line[:40]!r}")
        size = int(size_text, 16)
        if size > 0:
            self._left = size
            self._chunk_seen = True
            return True
        while await self._read_line_raw("the end of the trailers"):
            pass
        self._in_body = False
        return False

    async def read_body(self, limit: int = MAX_BODY) -> bytes:
        """The rest of the body, whole. Raises :class:`HttpError` past ``limit`` bytes."""
        body = bytearray()
        while piece := await self.receive_body():
            body += piece
            if len(body) > limit:
                raise HttpError(f"response body larger than {limit} bytes")
        return bytes(body)

    async def discard_body(self, read_size: int | None = None) -> int:
        """Read the rest of the body and drop it; return how many bytes it had."""
        total = 0
        while piece := await self.receive_body(read_size):
            total += len(piece)
        return total

    async def read_line(self, limit: int = MAX_LINE) -> bytes | None:
        """The next line of the body without its line end (LF or CRLF), or None once the body
        ended (a last line without a line end is returned first). Raises :class:`HttpError`
        for a line longer than ``limit``."""
        searched = 0
        while (end := self._pending.find(b"\n", searched)) < 0:
            if len(self._pending) > limit:
                raise HttpError(f"a body line longer than {limit} bytes")
            searched = len(self._pending)
            piece = await self._receive_framed(self.read_size)
            if not piece:
                if not self._pending:
                    return None
                line = bytes(self._pending)
                self._pending.clear()
                return line
            self._pending += piece
        line = bytes(self._pending[:end])
        del self._pending[: end + 1]
        return line.removesuffix(b"\r")

    async def read_sse_event(self) -> SseEvent | None:
        """The next block of an event stream, or None once the body ended between blocks.
        Raises :class:`HttpError` if it ends inside one."""
        lines: list[bytes] = []
        while True:
            line = await self.read_line()
            if line is None:
                if lines:
                    raise HttpError("the event stream ended inside an event")
                return None
            if line:
                lines.append(line)
            elif lines:
                return _sse_event(lines)

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        close: bool = False,
        limit: int = MAX_BODY,
    ) -> Response:
        """Send a request, read the whole response. Raises :class:`HttpError`."""
        await self.send_request(method, target, headers=headers, body=body, close=close)
        head = await self.read_head()
        content = await self.read_body(limit)
        return Response(status=head.status, reason=head.reason, headers=head.headers, body=content)


async def connect(
    address: Address,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    host: str | None = None,
    cookie: str | None = None,
    read_size: int = READ_SIZE,
) -> HttpConnection:
    """A new connection to ``address`` (TCP_NODELAY, as trio sets it), with TLS when an
    ``ssl_context`` is given: verified against ``server_hostname`` (default the address's
    host), handshake done before this returns. ``host`` is the Host header (default
    ``host:port``). Raises OSError if the dial fails, ``trio.BrokenResourceError`` if the TLS
    handshake does."""
    tcp = await trio.open_tcp_stream(*address)
    stream: trio.abc.Stream = tcp
    if ssl_context is not None:
        tls = trio.SSLStream(
            tcp,
            ssl_context,
            server_hostname=server_hostname or address[0],
            https_compatible=True,
        )
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        stream = tls
    return HttpConnection(
        stream, host=host or f"{address[0]}:{address[1]}", cookie=cookie, read_size=read_size
    )


async def request(
    address: Address,
    method: str,
    target: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    cookie: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    limit: int = MAX_BODY,
) -> Response:
    """One exchange on a new connection (``Connection: close``), closed afterwards."""
    connection = await connect(address, ssl_context=ssl_context, cookie=cookie)
    async with connection:
        return await connection.request(
            method, target, headers=headers, body=body, close=True, limit=limit
        )
