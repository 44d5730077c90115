"""Where an HTTP/1.1 message ends, for bytes that pass through untouched.

The connector forwards a tunneled request and its response as raw bytes. To reuse a connection
to the daemon for the next request it must know exactly where each message ends, without
re-encoding it: :class:`MessageFramer` is fed the bytes as they pass and says how many of them
belong to the message and whether the connection may carry another one. It is sans-IO (no
sockets, no clock) and parses only what framing needs: the start line, ``Content-Length``,
``Transfer-Encoding``, ``Connection`` and the chunked encoding (RFC 9112, sections 6 and 7).

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
_TOKEN_LIST = re.compile(rb"\s*,\s*")
_RESPONSE_LINE = re.compile(rb"^HTTP/1\.([01]) (\d{3})(?: .*)?$", re.DOTALL)
_REQUEST_LINE = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/1\.([01])$")
_CHUNK_SIZE = re.compile(rb"^([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?$", re.DOTALL)


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


class MessageFramer:
    """Follows one request (``for_request=True``) or one response through a byte stream.

    :meth:`feed` takes the next bytes and returns how many of them belong to the message; once
    :attr:`complete` is true the rest (if any) lies beyond it. For a response, ``request_method``
    is the method of the request it answers (a response to ``HEAD`` has no body). Interim (1xx)
    responses are passed over: the message ends with the final response. ``101 Switching
    Protocols`` is refused with :class:`FramingError`, since after it the bytes are no longer
    HTTP.
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
        start = max(0, len(line) - 3)
        line += view
        end = line.find(b"\r\n\r\n", start)
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
        start, _, fields = head.partition(b"\r\n")
        lengths: list[bytes] = []
        codings: list[bytes] = []
        connection: list[bytes] = []
        for field in fields.split(b"\r\n") if fields else ():
            name, colon, value = field.partition(b":")
            if not colon or not name or name != name.strip() or b" " in name:
                raise FramingError("malformed header field")
            lowered = name.lower()
            if lowered == b"content-length":
                lengths.append(value.strip())
            elif lowered == b"transfer-encoding":
                codings.extend(_tokens(value))
            elif lowered == b"connection":
                connection.extend(_tokens(value))
        if self._for_request:
            match = _REQUEST_LINE.match(start)
            if match is None:
                raise FramingError("malformed request line")
            self.method = match.group(1)
            minor = match.group(3)
        else:
            match = _RESPONSE_LINE.match(start)
            if match is None:
                raise FramingError("malformed status line")
            minor = match.group(1)
            status = int(match.group(2))
            if status == 101:
                raise FramingError("the connection switches protocols")
            if 100 <= status < 200:
                return  # interim response: the final one follows (phase stays HEAD)
            self.status = status
        if minor != b"1" or b"close" in connection:
            self._keep_alive = False
        self._choose_body(lengths, codings)

    def _choose_body(self, lengths: list[bytes], codings: list[bytes]) -> None:
        if not self._for_request and (self._request_method == b"HEAD" or self.status in (204, 304)):
            self._phase = _Phase.DONE
            return
        if codings:
            if lengths:
                raise FramingError("both Content-Length and Transfer-Encoding")
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                if self._for_request:
                    raise FramingError("a request body must end with the chunked coding")
                self._keep_alive = False
                self._phase = _Phase.UNTIL_CLOSE
                return
            self._phase = _Phase.CHUNK_SIZE
            return
        if lengths:
            if any(value != lengths[0] for value in lengths) or not lengths[0].isdigit():
                raise FramingError("invalid Content-Length")
            if len(lengths[0]) > 18:
                raise FramingError("Content-Length too large")
            self._remaining = int(lengths[0])
            self._phase = _Phase.LENGTH if self._remaining else _Phase.DONE
            return
        if self._for_request:
            self._phase = _Phase.DONE  # a request without framing headers has no body
        else:
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
        start = max(0, len(line) - 1)
        kept = len(line)
        # Copy only as much of the read as a line may still take: a short probe first (chunk
        # size lines are short), then up to the bound. Appending the whole read for every line
        # would copy a read once per chunk in it.
        limit = MAX_CHUNK_LINE + 2 - kept
        end = -1
        for size in (min(limit, _LINE_PROBE), limit):
            del line[kept:]
            line += view[:size]
            end = line.find(b"\r\n", start)
            if end >= 0 or size >= len(view):
                break
        if end < 0:
            # A final CR may be the start of the line's CRLF: it does not count.
            if len(line) - line.endswith(b"\r") > MAX_CHUNK_LINE:
                raise FramingError(f"{self._phase.value} too long")
            return len(line) - kept
        if end > MAX_CHUNK_LINE:
            raise FramingError(f"{self._phase.value} too long")
        used = end + 2 - kept
        text = bytes(line[:end])
        self._line = bytearray()
        if self._phase is _Phase.TRAILERS:
            if not text:
                self._phase = _Phase.DONE
            elif b":" not in text:
                raise FramingError("malformed trailer field")
            return used
        match = _CHUNK_SIZE.match(text)
        if match is None:
            raise FramingError("malformed chunk size")
        size = int(match.group(1), 16)
        if size:
            self._remaining = size
            self._phase = _Phase.CHUNK_DATA
        else:
            self._phase = _Phase.TRAILERS
        return used


def _tokens(value: bytes) -> list[bytes]:
    return [token.lower() for token in _TOKEN_LIST.split(value.strip()) if token]
