"""Where an HTTP/1.1 message ends, for bytes that pass through untouched.

The connector forwards a tunneled request and its response as raw bytes. To reuse a connection
to the daemon for the next request it must know exactly where each message ends, without
re-encoding it: :class:`MessageFramer` is fed the bytes as they pass and says how many of them
belong to the message and whether the connection may carry another one. It is sans-IO (no
sockets, no clock) and parses only what framing needs: the start line, the shape of every
header field, ``Content-Length``, ``Transfer-Encoding``, ``Connection``, ``Host``, ``Upgrade``
and the chunked encoding (RFC 9112, sections 6 and 7).

The parsers on either side of the connector are h11's (the relay reads responses with it, the
daemon's server reads requests with it), so the framer agrees with h11: wherever h11 reads a
message, the framer ends it at the same byte with the same keep-alive decision, or refuses it
(``tests/connector/test_framing_vs_h11.py`` holds it to that). It is stricter than h11 where
parsers are known to disagree (a bare CR or LF, a folded line, a list in ``Content-Length``,
any transfer coding but ``chunked`` in a request). It departs from h11 in two ways RFC 9112
defines and h11 does not implement, neither of which can make the two disagree on a message
both accept: whitespace before a chunk extension's ``;`` (section 7.1.1), and a response whose
transfer codings are not ``chunked`` alone (section 6.3: chunked framing if ``chunked`` comes
last, else the body runs until the connection closes).

Anything it does not understand raises :class:`FramingError`; the caller then stops reusing
the connection (a request it cannot frame goes to the daemon on a connection of its own).
"""

from __future__ import annotations

import enum
import re

#: Largest message head (start line and header fields) the framer buffers.
MAX_HEAD_SIZE = 32 * 1024
#: Largest chunk-size line (size, extensions) or trailer line in a chunked body.
MAX_CHUNK_LINE = 4 * 1024

#: Bytes of a read first searched for the end of a chunk-size or trailer line.
_LINE_PROBE = 128
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_TOKEN_ONLY = re.compile(_TOKEN)
#: Request and status lines, matched whole (the head holds no CR or LF inside a line).
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") [\x21-\x7e]+ HTTP/1\.([01])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: .*)?")
#: Every line of a head after the start line: a field name, a colon, a value (no folding).
_FIELD_LINES = re.compile(rb"(?:\r\n" + _TOKEN + rb":[^\r\n]*+)*+")
#: The fields the framing depends on, at the start of a line of the head.
_FRAMING_FIELD = re.compile(
    rb"\r\n(content-length|transfer-encoding|connection|host|upgrade):([^\r\n]*)", re.IGNORECASE
)
#: A chunk-size line: the size, optional whitespace, optional extensions (read past, never
#: parsed: no CR, LF or NUL in them).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n\x00]*)?")
_TRAILER_FIELD = re.compile(rb"(" + _TOKEN + rb"):[^\r\n\x00\x0b\x0c]*")
#: Fields that frame a message, and so may not come as trailers (RFC 9110, section 6.5.1).
_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding"})
_CR = 0x0D


class FramingError(Exception):
    """The bytes are not an HTTP/1.1 message the framer can delimit."""


class _Phase(enum.Enum):
    HEAD = "head"
    LENGTH = "length"  # a body of known length
    CHUNK_SIZE = "chunk size line"
    CHUNK_DATA = "chunk data"
    CHUNK_CRLF = "CRLF after chunk data"
    TRAILERS = "trailer section"
    UNTIL_CLOSE = "body until the connection closes"
    DONE = "done"


class _Fields:
    """What a head's framing fields say (each value stripped of its optional whitespace)."""

    def __init__(self, fields: bytes) -> None:
        self.lengths: list[bytes] = []
        #: The token list of each ``Transfer-Encoding`` field, lowercased.
        self.codings: list[list[bytes]] = []
        #: Whether a ``Transfer-Encoding`` list has an empty element (``chunked,``): refused,
        #: as h11 refuses it, so the two never disagree on where such a body ends.
        self.empty_coding = False
        self.connection: list[bytes] = []
        self.hosts = 0
        self.upgrade = False
        for match in _FRAMING_FIELD.finditer(fields):
            name = match.group(1).lower()
            value = match.group(2)
            if name == b"content-length":
                self.lengths.append(value.strip(b" \t"))
            elif name == b"transfer-encoding":
                tokens = _tokens(value)
                self.empty_coding |= len(tokens) != value.count(b",") + 1
                self.codings.append(tokens)
            elif name == b"connection":
                self.connection.extend(_tokens(value))
            elif name == b"host":
                self.hosts += 1
            else:
                self.upgrade = True

    def content_length(self) -> int | None:
        """The declared length, or ``None`` without one. Raises :class:`FramingError` unless
        every ``Content-Length`` is the same string of at most 18 digits."""
        lengths = self.lengths
        if not lengths:
            return None
        first = lengths[0]
        if any(value != first for value in lengths) or not first.isdigit():
            raise FramingError("invalid Content-Length")
        if len(first) > 18:
            raise FramingError("Content-Length too large")
        return int(first)

    def response_codings(self) -> list[bytes]:
        """Every transfer coding of a response, in order. Raises :class:`FramingError` on an
        empty field or list element, or a coding that is not a bare token."""
        codings = [coding for field in self.codings for coding in field]
        if self.empty_coding or not all(_TOKEN_ONLY.fullmatch(coding) for coding in codings):
            raise FramingError("invalid Transfer-Encoding")
        return codings


class MessageFramer:
    """Follows one request (``for_request=True``) or one response through a byte stream.

    :meth:`feed` takes the next bytes and returns how many of them belong to the message; once
    :attr:`complete` is true the rest (if any) lies beyond it. For a response, ``request_method``
    is the method of the request it answers (a response to ``HEAD`` has no body). Interim (1xx)
    responses are passed over: the message ends with the final response. ``101 Switching
    Protocols``, a 2xx answer to ``CONNECT`` and a request that may switch protocols (``CONNECT``
    or an ``Upgrade`` field) are refused with :class:`FramingError`, since after them the bytes
    may no longer be HTTP.
    """

    def __init__(self, *, for_request: bool, request_method: bytes = b"GET") -> None:
        self._for_request = for_request
        self._request_method = request_method  # methods are case-sensitive (RFC 9110 9.1)
        self._phase = _Phase.HEAD
        self._line = bytearray()  # the head, or a chunk-size/trailer line, as it accumulates
        self._remaining = 0  # bytes left of a known-length body or of a chunk
        self._keep_alive = True
        #: Request method, or ``None`` for a response (set once the head is parsed).
        self.method: bytes | None = None
        #: Final status code of a response (set once its head is parsed).
        self.status: int | None = None

    @property
    def complete(self) -> bool:
        return self._phase is _Phase.DONE

    @property
    def head_parsed(self) -> bool:
        return self._phase is not _Phase.HEAD

    @property
    def reusable(self) -> bool:
        """Whether the connection may carry another message after this one: the message is
        complete, is HTTP/1.1 without ``Connection: close``, and did not run until close."""
        return self.complete and self._keep_alive

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume the next bytes of the stream; return how many belong to this message.

        Raises :class:`FramingError` on anything malformed or beyond the bounds; the framer is
        unusable after that.
        """
        view = memoryview(data)
        used = 0
        total = len(view)
        while used < total and self._phase is not _Phase.DONE:
            used += self._step(view[used:])
        return used

    def finish(self) -> None:
        """The connection closed. Completes a body that runs until close; raises
        :class:`FramingError` if the message is unfinished otherwise."""
        if self._phase is _Phase.UNTIL_CLOSE:
            self._phase = _Phase.DONE
        elif self._phase is not _Phase.DONE:
            raise FramingError(f"connection closed in the {self._phase.value}")

    # ------------------------------------------------------------------ steps

    def _step(self, view: memoryview) -> int:
        phase = self._phase
        if phase is _Phase.LENGTH or phase is _Phase.CHUNK_DATA:
            take = min(self._remaining, len(view))
            self._remaining -= take
            if not self._remaining:
                self._phase = _Phase.DONE if phase is _Phase.LENGTH else _Phase.CHUNK_CRLF
            return take
        if phase is _Phase.UNTIL_CLOSE:
            return len(view)
        if phase is _Phase.HEAD:
            return self._take_head(view)
        if phase is _Phase.CHUNK_CRLF:
            return self._take_chunk_crlf(view)
        # CHUNK_SIZE or TRAILERS: one line at a time.
        return self._take_line(view)

    def _take_head(self, view: memoryview) -> int:
        line = self._line
        kept = len(line)
        if not kept and view[0] < 0x21:
            # No start line begins with a control character or a space (h11 refuses as early).
            line_kind = "request" if self._for_request else "status"
            raise FramingError(f"malformed {line_kind} line: a space or control character first")
        line += view
        end = line.find(b"\r\n\r\n", max(0, kept - 3))
        # Check the new bytes of the head, from a CR left unchecked last time (it may have been
        # the first half of a CRLF) up to the end of the head, or to a final CR that may be.
        start = kept - 1 if kept and line[kept - 1] == _CR else kept
        stop = end + 4 if end >= 0 else len(line) - line.endswith(b"\r")
        if not _plain_lines(line[start:stop]):
            raise FramingError("malformed head: a bare CR or LF, a NUL, VT or FF")
        if end < 0:
            if len(line) > MAX_HEAD_SIZE:
                raise FramingError("message head too large")
            return len(view)
        if end + 4 > MAX_HEAD_SIZE:
            raise FramingError("message head too large")
        used = len(view) - (len(line) - (end + 4))
        head = bytes(line[:end])
        self._line = bytearray()
        self._parse_head(head)
        return used

    def _parse_head(self, head: bytes) -> None:
        start_end = head.find(b"\r\n")
        if start_end < 0:
            start_end = len(head)
        start, fields = head[:start_end], head[start_end:]
        if self._for_request:
            self._parse_request(start, fields)
        else:
            self._parse_response(start, fields)

    def _parse_request(self, start: bytes, raw_fields: bytes) -> None:
        match = _REQUEST_LINE.fullmatch(start)
        if match is None:
            raise FramingError("malformed request line")
        fields = _parse_fields(raw_fields)
        method, minor = match.group(1), match.group(2)
        self.method = method
        if fields.hosts > 1 or (minor == b"1" and not fields.hosts):
            raise FramingError("a request has exactly one Host field (none in HTTP/1.0)")
        if method == b"CONNECT" or fields.upgrade:
            raise FramingError("the request may switch protocols")
        self._keep_alive = minor == b"1" and b"close" not in fields.connection
        if fields.codings:
            if fields.lengths:
                raise FramingError("both Content-Length and Transfer-Encoding")
            if fields.empty_coding or fields.codings != [[b"chunked"]]:
                raise FramingError("a request body must end with the chunked coding, alone")
            self._phase = _Phase.CHUNK_SIZE
            return
        length = fields.content_length()
        # A request without framing fields has no body.
        self._start_length(length or 0)

    def _parse_response(self, start: bytes, raw_fields: bytes) -> None:
        match = _STATUS_LINE.fullmatch(start)
        if match is None:
            raise FramingError("malformed status line")
        status = int(match.group(2))
        if status < 100:
            raise FramingError("malformed status line: a status code under 100")
        fields = _parse_fields(raw_fields)
        # Checked whatever the status: h11 refuses a malformed one even where it frames nothing.
        length = fields.content_length()
        codings = fields.response_codings()
        if status == 101 or (self._request_method == b"CONNECT" and 200 <= status < 300):
            raise FramingError("the connection switches protocols")
        if status < 200:
            return  # interim response: the final one follows (phase stays HEAD)
        self.status = status
        self._keep_alive = match.group(1) == b"1" and b"close" not in fields.connection
        if self._request_method == b"HEAD" or status in (204, 304):
            self._phase = _Phase.DONE
            return
        if codings:
            if fields.lengths:
                raise FramingError("both Content-Length and Transfer-Encoding")
            if codings[-1] != b"chunked":
                self._until_close()
            elif codings.count(b"chunked") != 1:
                raise FramingError("the chunked coding applied twice")
            else:
                self._phase = _Phase.CHUNK_SIZE
            return
        if length is None:
            self._until_close()
        else:
            self._start_length(length)

    def _start_length(self, length: int) -> None:
        self._remaining = length
        self._phase = _Phase.LENGTH if length else _Phase.DONE

    def _until_close(self) -> None:
        self._keep_alive = False
        self._phase = _Phase.UNTIL_CLOSE

    def _take_chunk_crlf(self, view: memoryview) -> int:
        line = self._line
        take = min(2 - len(line), len(view))
        line += view[:take]
        if len(line) == 2:
            if line != b"\r\n":
                raise FramingError("chunk data not followed by CRLF")
            self._line = bytearray()
            self._phase = _Phase.CHUNK_SIZE
        return take

    def _take_line(self, view: memoryview) -> int:
        line = self._line
        kept = len(line)
        # Copy only as much of the read as a line may still take: a short probe first (chunk
        # size lines are short), then up to the bound. Appending the whole read for every line
        # would copy a read once per chunk in it.
        limit = MAX_CHUNK_LINE + 2 - kept
        newline = -1
        for size in (min(limit, _LINE_PROBE), limit):
            del line[kept:]
            line += view[:size]
            # The kept part holds no LF: the line would have ended there.
            newline = line.find(b"\n", kept)
            if newline >= 0 or size >= len(view):
                break
        if newline < 0:
            # A final CR may be the start of the line's CRLF: it does not count.
            if len(line) - line.endswith(b"\r") > MAX_CHUNK_LINE:
                raise FramingError(f"{self._phase.value} too long")
            return len(line) - kept
        if not newline or line[newline - 1] != _CR:
            # h11 ends a trailer section at a bare LF: the two would part here.
            raise FramingError(f"a bare LF in the {self._phase.value}")
        end = newline - 1
        if end > MAX_CHUNK_LINE:
            raise FramingError(f"{self._phase.value} too long")
        text = bytes(line[:end])
        self._line = bytearray()
        if self._phase is _Phase.TRAILERS:
            self._trailer_line(text)
        else:
            self._chunk_size_line(text)
        return newline + 1 - kept

    def _trailer_line(self, text: bytes) -> None:
        if not text:
            self._phase = _Phase.DONE
            return
        match = _TRAILER_FIELD.fullmatch(text)
        if match is None or match.group(1).lower() in _FRAMING_NAMES:
            raise FramingError("malformed trailer field")

    def _chunk_size_line(self, text: bytes) -> None:
        match = _CHUNK_SIZE.fullmatch(text)
        if match is None:
            raise FramingError("malformed chunk size")
        size = int(match.group(1), 16)
        if size:
            self._remaining = size
            self._phase = _Phase.CHUNK_DATA
        else:
            self._phase = _Phase.TRAILERS


def _parse_fields(fields: bytes) -> _Fields:
    """The framing fields of the lines after a start line (each line led by its CRLF).
    Raises :class:`FramingError` unless every line is a well-formed field."""
    if _FIELD_LINES.fullmatch(fields) is None:
        raise FramingError("malformed header field")
    return _Fields(fields)


def _plain_lines(data: bytes | bytearray) -> bool:
    """Whether ``data`` holds no CR or LF outside a CRLF pair (h11 ends a line at a bare LF,
    other parsers do not) and no NUL, VT or FF (no field value may hold them)."""
    pairs = data.count(b"\r\n")
    return (
        data.count(b"\r") == pairs
        and data.count(b"\n") == pairs
        and b"\x00" not in data
        and b"\x0b" not in data
        and b"\x0c" not in data
    )


def _tokens(value: bytes) -> list[bytes]:
    """The elements of a comma-separated list, lowercased, empty ones dropped (as h11 reads
    ``Connection`` and ``Transfer-Encoding``)."""
    return [token for token in (part.strip(b" \t") for part in value.lower().split(b",")) if token]
