"""The connector's HTTP/1.1 message delimiter (``connector._framing.MessageFramer``).

Table tests pin each framing rule and each error; every case is fed whole, byte by byte and
(with Hypothesis) at random splits, and must come out the same. A Hypothesis property uses h11
as the oracle: messages that h11 writes (random headers, bodies, chunked or Content-Length,
keep-alive or close, HEAD, interim responses, trailers) must end exactly where h11 says they
end, and be reusable exactly when h11 would start a next cycle. ``test_framing_vs_h11.py``
goes further: random and mutated messages, which the framer must read as h11 does or refuse.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs
import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector._framing import MAX_CHUNK_LINE, MAX_HEAD_SIZE, FramingError, MessageFramer
from connector._pipe import HeadError, read_head

#: Hypothesis settings of this file: modest example counts keep the whole file within seconds.
PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
#: Bytes that follow a message in the tables: they belong to whatever comes next.
NEXT = b"GET /next HTTP/1.1\r\nHost: d\r\n\r\n"


@attrs.frozen(kw_only=True)
class Outcome:
    """What the framer said after all the input: bytes it took, and its verdict."""

    used: int
    complete: bool
    reusable: bool


@attrs.frozen(kw_only=True)
class Case:
    """A message (``message``), the bytes after it (``after``), and how it must be framed."""

    name: str
    message: bytes
    after: bytes = NEXT
    for_request: bool = False
    method: bytes = b"GET"
    complete: bool = True
    reusable: bool = True
    #: For a body that runs until the connection closes: every byte is the message's.
    until_close: bool = False

    def framer(self) -> MessageFramer:
        return MessageFramer(for_request=self.for_request, request_method=self.method)

    @property
    def data(self) -> bytes:
        return self.message + self.after

    @property
    def expected(self) -> Outcome:
        used = len(self.data) if self.until_close else len(self.message)
        return Outcome(used=used, complete=self.complete, reusable=self.reusable)


def feed_pieces(framer: MessageFramer, pieces: Sequence[bytes]) -> Outcome:
    used = 0
    for piece in pieces:
        taken = framer.feed(piece)
        assert 0 <= taken <= len(piece)
        if taken < len(piece):
            # Once the framer leaves bytes, the message is over: it takes nothing more.
            assert framer.complete
        used += taken
    return Outcome(used=used, complete=framer.complete, reusable=framer.reusable)


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({min(max(cut, 0), len(data)) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def chunked_head(*, request: bool = False) -> bytes:
    if request:
        return b"POST /up HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def padded_response(head_size: int) -> bytes:
    """A response whose head, final blank line included, is ``head_size`` bytes; body ``x``."""
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX-Pad: "
    head = start + b"p" * (head_size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == head_size
    return head + b"x"


# ---------------------------------------------------------------------- the framing rules

CHUNKED_BODY = (
    b"5;name=value;flag\r\nhello\r\n"
    b"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n"
    b'4 ; spaced="quoted; value"\r\n\r\n\r\n\r\n'  # chunk data that looks like CRLFs
    b"0;last\r\nX-Trailer: one\r\nX-Other:two\r\n\r\n"
)

VALID = [
    Case(
        name="content-length",
        message=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    ),
    Case(name="content-length zero", message=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    Case(
        name="repeated equal content-length",
        message=b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nCONTENT-LENGTH:3 \r\n\r\nabc",
    ),
    Case(name="chunked, extensions, trailers", message=chunked_head() + CHUNKED_BODY),
    Case(
        name="chunked after another coding",
        message=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"
        b"a\r\n0123456789\r\n0\r\n\r\n",
    ),
    Case(name="chunked, no chunks", message=chunked_head() + b"0\r\n\r\n"),
    Case(
        name="HEAD answered with a length",
        message=b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        method=b"HEAD",
    ),
    Case(
        name="HEAD answered chunked",
        message=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        method=b"HEAD",
    ),
    Case(name="204", message=b"HTTP/1.1 204 No Content\r\n\r\n"),
    Case(
        name="304 with a length",
        message=b'HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\nETag: "x"\r\n\r\n',
    ),
    Case(
        name="interim responses are passed over",
        message=b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    ),
    Case(
        name="status line without a reason",
        message=b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\nx",
    ),
    Case(
        name="connection close",
        message=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        reusable=False,
    ),
    Case(
        name="close among other connection tokens",
        message=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive , CLOSE\r\n\r\nhi",
        reusable=False,
    ),
    Case(
        name="HTTP/1.0 response",
        message=b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nhi",
        reusable=False,
    ),
    Case(
        name="no framing: body until close",
        message=b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n",
        complete=False,
        reusable=False,
        until_close=True,
    ),
    Case(
        name="unknown final coding: body until close",
        message=b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nsomething",
        complete=False,
        reusable=False,
        until_close=True,
    ),
    Case(name="head at the size bound", message=padded_response(MAX_HEAD_SIZE)),
    Case(
        name="request without a body",
        message=b"GET /peers HTTP/1.1\r\nHost: d\r\n\r\n",
        for_request=True,
    ),
    Case(
        name="request with a length",
        message=b'POST /notify HTTP/1.1\r\nHost: d\r\ncontent-length: 4\r\n\r\n{"a"',
        for_request=True,
    ),
    Case(
        name="chunked request",
        message=chunked_head(request=True) + CHUNKED_BODY,
        for_request=True,
    ),
    Case(
        name="request with connection close",
        message=b"DELETE /peers/a HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n",
        for_request=True,
        reusable=False,
    ),
    Case(
        name="HTTP/1.0 request",
        message=b"GET / HTTP/1.0\r\n\r\n",
        for_request=True,
        reusable=False,
    ),
]


@pytest.mark.parametrize("case", VALID, ids=lambda case: case.name)
def test_valid_message_fed_whole(case: Case) -> None:
    assert feed_pieces(case.framer(), [case.data]) == case.expected


@pytest.mark.parametrize("case", VALID, ids=lambda case: case.name)
def test_valid_message_fed_byte_by_byte(case: Case) -> None:
    assert feed_pieces(case.framer(), bytewise(case.data)) == case.expected


@PROPERTY_SETTINGS
@given(case=st.sampled_from(VALID), cuts=st.lists(st.integers(0, 70_000), max_size=12))
def test_valid_message_fed_at_random_splits(case: Case, cuts: list[int]) -> None:
    assert feed_pieces(case.framer(), split_at(case.data, cuts)) == case.expected


@pytest.mark.parametrize("case", VALID, ids=lambda case: case.name)
def test_end_of_stream_after_the_message(case: Case) -> None:
    """``finish`` completes a body that runs until close (never reusable) and leaves a
    finished message as it was."""
    framer = case.framer()
    framer.feed(case.data)
    framer.finish()
    assert framer.complete
    assert framer.reusable == (case.reusable and not case.until_close)


def test_parsed_head_reports_method_and_status() -> None:
    request = MessageFramer(for_request=True)
    before = request.head_parsed
    request.feed(b"PATCH /x HTTP/1.1\r\nHost: d\r\nContent-Length: 3\r\n\r\n")
    assert (before, request.head_parsed) == (False, True)
    assert (request.method, request.status, request.complete) == (b"PATCH", None, False)
    response = MessageFramer(for_request=False)
    response.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    interim_status = response.status  # only the final response counts
    response.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert interim_status is None
    assert (response.method, response.status, response.reusable) == (None, 404, True)


def test_a_finished_message_takes_no_more_bytes() -> None:
    framer = MessageFramer(for_request=False)
    assert framer.feed(b"HTTP/1.1 204 No Content\r\n\r\n") == 27
    assert framer.feed(b"HTTP/1.1 200 OK\r\n\r\n") == 0
    assert framer.complete


# ---------------------------------------------------------------------- errors


@attrs.frozen(kw_only=True)
class Bad:
    name: str
    data: bytes
    error: str
    for_request: bool = False
    method: bytes = b"GET"


def _response(*fields: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def _request(*fields: bytes) -> bytes:
    return b"POST /x HTTP/1.1\r\nHost: d\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


BAD = [
    Bad(name="status line HTTP/2", data=b"HTTP/2 200 OK\r\n\r\n", error="malformed status line"),
    Bad(name="status code too short", data=b"HTTP/1.1 20 OK\r\n\r\n", error="malformed status"),
    Bad(name="no status line", data=b"hello there\r\n\r\n", error="malformed status line"),
    Bad(name="empty head", data=b"\r\n\r\n", error="malformed status line"),
    Bad(
        name="request line missing version",
        data=b"GET /\r\n\r\n",
        error="malformed request line",
        for_request=True,
    ),
    Bad(
        name="request line double space",
        data=b"GET  / HTTP/1.1\r\n\r\n",
        error="malformed request line",
        for_request=True,
    ),
    Bad(
        name="request line HTTP/2.0",
        data=b"GET / HTTP/2.0\r\n\r\n",
        error="malformed request line",
        for_request=True,
    ),
    Bad(
        name="method not a token",
        data=b"G(T / HTTP/1.1\r\n\r\n",
        error="malformed request line",
        for_request=True,
    ),
    Bad(name="field without colon", data=_response(b"NoColon"), error="malformed header field"),
    Bad(name="field with empty name", data=_response(b": x"), error="malformed header field"),
    Bad(name="space before colon", data=_response(b"Content-Length : 1"), error="malformed"),
    Bad(name="obsolete line folding", data=_response(b"X-A: 1", b" folded"), error="malformed"),
    Bad(
        name="content-length not a number",
        data=_response(b"Content-Length: abc"),
        error="Content-Length",
    ),
    Bad(
        name="content-length negative",
        data=_response(b"Content-Length: -1"),
        error="Content-Length",
    ),
    Bad(
        name="content-length signed", data=_response(b"Content-Length: +5"), error="Content-Length"
    ),
    Bad(name="content-length empty", data=_response(b"Content-Length:"), error="Content-Length"),
    Bad(
        name="content-length values differ",
        data=_response(b"Content-Length: 5", b"Content-Length: 6"),
        error="invalid Content-Length",
    ),
    Bad(
        name="content-length huge",
        data=_response(b"Content-Length: " + b"9" * 19),
        error="Content-Length too large",
    ),
    Bad(
        name="request content-length bad",
        data=_request(b"Content-Length: 1x"),
        error="invalid Content-Length",
        for_request=True,
    ),
    Bad(
        name="response length and chunked",
        data=_response(b"Content-Length: 5", b"Transfer-Encoding: chunked"),
        error="both Content-Length and Transfer-Encoding",
    ),
    Bad(
        name="request length and chunked",
        data=_request(b"Transfer-Encoding: chunked", b"Content-Length: 0"),
        error="both Content-Length and Transfer-Encoding",
        for_request=True,
    ),
    Bad(
        name="request coding not chunked",
        data=_request(b"Transfer-Encoding: gzip"),
        error="must end with the chunked coding",
        for_request=True,
    ),
    Bad(
        name="request chunked then gzip",
        data=_request(b"Transfer-Encoding: chunked, gzip"),
        error="must end with the chunked coding",
        for_request=True,
    ),
    Bad(
        name="request chunked twice",
        data=_request(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
        error="must end with the chunked coding",
        for_request=True,
    ),
    Bad(name="chunk size not hex", data=chunked_head() + b"zz\r\n", error="malformed chunk size"),
    Bad(name="chunk size empty", data=chunked_head() + b"\r\n", error="malformed chunk size"),
    Bad(name="chunk size 0x", data=chunked_head() + b"0x5\r\n", error="malformed chunk size"),
    Bad(name="chunk size indented", data=chunked_head() + b" 5\r\n", error="malformed chunk size"),
    Bad(
        name="chunk size 17 digits",
        data=chunked_head() + b"1" * 17 + b"\r\n",
        error="malformed chunk size",
    ),
    Bad(
        name="chunk data without CRLF",
        data=chunked_head() + b"5\r\nhelloXX",
        error="chunk data not followed by CRLF",
    ),
    Bad(
        name="chunk data with half a CRLF",
        data=chunked_head() + b"5\r\nhello\rX",
        error="chunk data not followed by CRLF",
    ),
    Bad(
        name="request chunk data without CRLF",
        data=chunked_head(request=True) + b"1\r\nab\r\n",
        error="chunk data not followed by CRLF",
        for_request=True,
    ),
    Bad(
        name="malformed trailer",
        data=chunked_head() + b"0\r\nnot a field\r\n\r\n",
        error="malformed trailer field",
    ),
    Bad(
        name="head over the bound",
        data=b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * MAX_HEAD_SIZE + b"\r\n\r\n",
        error="message head too large",
    ),
    Bad(
        name="head one byte over the bound",
        data=padded_response(MAX_HEAD_SIZE + 1),
        error="message head too large",
    ),
    Bad(
        name="request head over the bound",
        data=b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * MAX_HEAD_SIZE + b"\r\n\r\n",
        error="message head too large",
        for_request=True,
    ),
    Bad(
        name="chunk line over the bound",
        data=chunked_head() + b"5;" + b"e" * (MAX_CHUNK_LINE - 1) + b"\r\nhello\r\n0\r\n\r\n",
        error="chunk size line too long",
    ),
    Bad(
        name="trailer line over the bound",
        data=chunked_head() + b"0\r\nX-T: " + b"t" * MAX_CHUNK_LINE + b"\r\n\r\n",
        error="trailer section too long",
    ),
    Bad(
        name="101 switching protocols",
        data=b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        error="switches protocols",
    ),
    Bad(
        name="101 after an interim response",
        data=b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n\r\n",
        error="switches protocols",
    ),
    # What the comparison with h11 found (tests/connector/test_framing_vs_h11.py): each of these
    # the framer once read otherwise than h11 (a different end, keep-alive, or a message h11
    # refuses); it refuses them now.
    Bad(
        name="a bare LF hides a Content-Length",
        data=b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nhi" + NEXT,
        error="bare CR or LF",
    ),
    Bad(
        name="a bare LF ends a request head early",
        data=b"GET / HTTP/1.0\n\r\nX-A: 1\r\n\r\n",
        error="bare CR or LF",
        for_request=True,
    ),
    Bad(
        name="a bare CR hides Connection: close",
        data=b"HTTP/1.1 200 OK\rConnection: close\r\nContent-Length: 0\r\n\r\n",
        error="bare CR or LF",
    ),
    Bad(
        name="a NUL in a field value",
        data=_response(b"X-A: a\x00b", b"Content-Length: 0"),
        error="NUL",
    ),
    Bad(
        name="trailers ended by a bare LF",
        data=chunked_head() + b"0\r\n\nX-A: 1\r\n\r\n" + NEXT,
        error="bare LF in the trailer section",
    ),
    Bad(
        name="a bare LF in a chunk extension",
        data=chunked_head() + b"2;a\nb\r\nhi\r\n0\r\n\r\n",
        error="bare LF in the chunk size line",
    ),
    Bad(
        name="a bare CR in a chunk extension",
        data=chunked_head() + b"2;a\rb\r\nhi\r\n0\r\n\r\n",
        error="malformed chunk size",
    ),
    Bad(
        name="HTTP/1.1 request without Host",
        data=b"GET / HTTP/1.1\r\n\r\n",
        error="exactly one Host",
        for_request=True,
    ),
    Bad(
        name="request with two Host fields",
        data=b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        error="exactly one Host",
        for_request=True,
    ),
    Bad(
        name="CONNECT request",
        data=b"CONNECT d:443 HTTP/1.1\r\nHost: d\r\n\r\n",
        error="may switch protocols",
        for_request=True,
    ),
    Bad(
        name="request with Upgrade",
        data=_request(b"Upgrade: websocket", b"Connection: Upgrade"),
        error="may switch protocols",
        for_request=True,
    ),
    Bad(
        name="2xx answer to CONNECT",
        data=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        error="switches protocols",
        method=b"CONNECT",
    ),
    Bad(name="field name not a token", data=_response(b"X(: 1"), error="malformed header field"),
    Bad(
        name="request target not visible ASCII",
        data=b"GET /\x80 HTTP/1.1\r\nHost: d\r\n\r\n",
        error="malformed request line",
        for_request=True,
    ),
    Bad(
        name="status code under 100",
        data=b"HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n",
        error="status code under 100",
    ),
    Bad(
        name="204 with an invalid Content-Length",
        data=b"HTTP/1.1 204 No Content\r\nContent-Length: x\r\n\r\n",
        error="invalid Content-Length",
    ),
    Bad(
        name="interim response with an invalid Content-Length",
        data=b"HTTP/1.1 100 Continue\r\nContent-Length: x\r\n\r\n" + NEXT,
        error="invalid Content-Length",
    ),
    Bad(
        name="request coding list ending in chunked",
        data=_request(b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n",
        error="must end with the chunked coding",
        for_request=True,
    ),
    Bad(
        name="request with an empty second Transfer-Encoding",
        data=_request(b"Transfer-Encoding: chunked", b"Transfer-Encoding:") + b"0\r\n\r\n",
        error="must end with the chunked coding",
        for_request=True,
    ),
    Bad(
        name="request coding list with an empty element",
        data=_request(b"Transfer-Encoding: chunked,") + b"0\r\n\r\n",
        error="must end with the chunked coding",
        for_request=True,
    ),
    Bad(
        name="response coding list with an empty element",
        data=_response(b"Transfer-Encoding: , chunked") + b"0\r\n\r\n",
        error="invalid Transfer-Encoding",
    ),
    Bad(
        name="empty Transfer-Encoding beside Content-Length",
        data=_response(b"Transfer-Encoding: ", b"Content-Length: 2") + b"hi",
        error="invalid Transfer-Encoding",
    ),
    Bad(
        name="response chunked twice",
        data=_response(b"Transfer-Encoding: chunked, chunked") + b"0\r\n\r\n",
        error="chunked coding applied twice",
    ),
    Bad(
        name="malformed trailer name",
        data=chunked_head() + b"0\r\nBad Name: x\r\n\r\n",
        error="malformed trailer field",
    ),
    Bad(
        name="Content-Length as a trailer",
        data=chunked_head() + b"0\r\nContent-Length: 3\r\n\r\n",
        error="malformed trailer field",
    ),
]


def _framer(bad: Bad) -> MessageFramer:
    return MessageFramer(for_request=bad.for_request, request_method=bad.method)


@pytest.mark.parametrize("bad", BAD, ids=lambda bad: bad.name)
def test_malformed_message_fed_whole(bad: Bad) -> None:
    with pytest.raises(FramingError, match=bad.error):
        _framer(bad).feed(bad.data)


@pytest.mark.parametrize("bad", BAD, ids=lambda bad: bad.name)
def test_malformed_message_fed_byte_by_byte(bad: Bad) -> None:
    framer = _framer(bad)
    with pytest.raises(FramingError, match=bad.error):
        for piece in bytewise(bad.data):
            framer.feed(piece)


@PROPERTY_SETTINGS
@given(bad=st.sampled_from(BAD), cuts=st.lists(st.integers(0, 40_000), max_size=12))
def test_malformed_message_fed_at_random_splits(bad: Bad, cuts: list[int]) -> None:
    framer = _framer(bad)
    with pytest.raises(FramingError, match=bad.error):
        for piece in split_at(bad.data, cuts):
            framer.feed(piece)


def test_a_large_head_is_refused_before_it_ends() -> None:
    """The bound holds while the head is still arriving: no terminator is waited for."""
    framer = MessageFramer(for_request=False)
    framer.feed(b"HTTP/1.1 200 OK\r\nX-Pad: ")
    with pytest.raises(FramingError, match="too large"):
        for _ in range(MAX_HEAD_SIZE // 1024 + 1):
            framer.feed(b"p" * 1024)


def test_a_long_chunk_line_is_refused_before_it_ends() -> None:
    framer = MessageFramer(for_request=False)
    framer.feed(chunked_head() + b"5;")
    with pytest.raises(FramingError, match="too long"):
        for _ in range(MAX_CHUNK_LINE // 256 + 1):
            framer.feed(b"e" * 256)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Le", "head"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", "length"),
        (chunked_head() + b"5\r\nhe", "chunk data"),
        (chunked_head() + b"5", "chunk size line"),
        (chunked_head() + b"5\r\nhello", "CRLF after chunk data"),
        (chunked_head() + b"0\r\nX-T: 1\r\n", "trailer section"),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "head"),
    ],
)
def test_end_of_stream_inside_a_message_is_an_error(data: bytes, where: str) -> None:
    framer = MessageFramer(for_request=False)
    assert framer.feed(data) == len(data)
    with pytest.raises(FramingError, match=f"closed in the {where}"):
        framer.finish()


# ---------------------------------------------------------------------- lines at the bound


#: A chunk-size line and a trailer line of exactly MAX_CHUNK_LINE bytes (CRLF not counted).
LONG_CHUNK_LINE = b"5;" + b"e" * (MAX_CHUNK_LINE - 2)
LONG_TRAILER_LINE = b"X-T: " + b"t" * (MAX_CHUNK_LINE - 5)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (chunked_head() + LONG_CHUNK_LINE + b"\r", b"\nhello\r\n0\r\n\r\n"),
        (chunked_head() + b"0\r\n" + LONG_TRAILER_LINE + b"\r", b"\n\r\n"),
    ],
    ids=["chunk size line", "trailer line"],
)
def test_a_line_at_the_bound_is_framed_the_same_however_it_is_split(
    before: bytes, after: bytes
) -> None:
    data = before + after
    whole = feed_pieces(MessageFramer(for_request=False), [data])
    assert whole == Outcome(used=len(data), complete=True, reusable=True)
    # The same bytes, cut right after the CR that ends the long line.
    assert feed_pieces(MessageFramer(for_request=False), [before, after]) == whole


# ---------------------------------------------------------------------- h11 as the oracle

_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~"
#: Header names the generators set themselves (the random ones must not frame the message).
_FRAMING_NAMES = {"content-length", "transfer-encoding", "connection", "host", "te", "trailer"}

header_names = st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=12).filter(
    lambda name: name.lower() not in _FRAMING_NAMES
)
# A field value: visible characters with inner spaces or tabs (h11 refuses edge whitespace).
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\t"),
    max_size=24,
).map(lambda value: value.strip(" \t"))
random_headers = st.lists(st.tuples(header_names, header_values), max_size=4)


@st.composite
def cased(draw: st.DrawFn, name: str) -> str:
    """``name`` in a random mix of cases (field names are case-insensitive)."""
    return "".join(draw(st.sampled_from([c.lower(), c.upper()])) for c in name)


def _lookalike(size: int, seed: int) -> bytes:
    """``size`` bytes that keep looking like the end of a chunk or of a head."""
    return ((b"\r\n0\r\n\r\n" + bytes([seed])) * (size // 8 + 1))[:size]


#: Body pieces: short random ones, and long ones (multi-digit chunk sizes) full of CRLFs.
body_piece = st.binary(min_size=1, max_size=64) | st.builds(
    _lookalike, st.integers(64, 5000), st.integers(0, 255)
)
body_pieces = st.lists(body_piece, max_size=4)


@attrs.frozen(kw_only=True)
class Written:
    """A message as h11 wrote it, and h11's view of the connection afterwards."""

    method: bytes
    serialized: bytes
    reusable: bool


def _connection_close_header(draw: st.DrawFn) -> list[tuple[str, str]]:
    choice = draw(st.sampled_from(["none", "close", "keep-alive", "keep-alive, close"]))
    if choice == "none":
        return []
    return [(draw(cased("Connection")), draw(cased(choice)))]


@st.composite
def h11_responses(draw: st.DrawFn) -> Written:
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"DELETE"]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    client_close = draw(st.booleans()) and version == b"1.1"
    server = h11.Connection(h11.SERVER)
    server.receive_data(
        method
        + b" /x HTTP/"
        + version
        + b"\r\nHost: d\r\n"
        + (b"Connection: close\r\n" if client_close else b"")
        + b"\r\n"
    )
    assert isinstance(server.next_event(), h11.Request)
    assert isinstance(server.next_event(), h11.EndOfMessage)
    out = bytearray()
    for interim in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
        out += server.send(
            h11.InformationalResponse(status_code=interim, headers=draw(random_headers))
        )
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]) | st.integers(200, 599))
    bodyless = method == b"HEAD" or status in (204, 304)
    pieces = [] if bodyless else draw(body_pieces)
    body = b"".join(pieces)
    with_length = draw(st.booleans())
    headers = draw(random_headers) + _connection_close_header(draw)
    if with_length:
        # A HEAD or 304 answer may state the length of the body it leaves out.
        length = draw(st.integers(0, 500)) if bodyless and status != 204 else len(body)
        headers.append((draw(cased("Content-Length")), str(length)))
    out += server.send(h11.Response(status_code=status, headers=headers))
    for piece in pieces:
        out += server.send(h11.Data(data=piece))
    chunked = not with_length and not bodyless and version == b"1.1"
    trailers = draw(random_headers) if chunked else []
    out += server.send(h11.EndOfMessage(headers=trailers))
    reusable = server.our_state is h11.DONE and server.their_state is h11.DONE
    return Written(method=method, serialized=bytes(out), reusable=reusable)


@st.composite
def h11_requests(draw: st.DrawFn) -> Written:
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"OPTIONS"]))
    target = "/" + draw(st.text(alphabet=_TOKEN_CHARS + "/?=", max_size=20))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    pieces = [] if framing == "none" else draw(body_pieces)
    headers = [("Host", "d"), *draw(random_headers), *_connection_close_header(draw)]
    if framing == "length":
        headers.append((draw(cased("Content-Length")), str(sum(map(len, pieces)))))
    elif framing == "chunked":
        headers.append((draw(cased("Transfer-Encoding")), draw(cased("chunked"))))
    client = h11.Connection(h11.CLIENT)
    out = bytearray(client.send(h11.Request(method=method, target=target, headers=headers)))
    for piece in pieces:
        out += client.send(h11.Data(data=piece))
    trailers = draw(random_headers) if framing == "chunked" else []
    out += client.send(h11.EndOfMessage(headers=trailers))
    assert client.our_state in (h11.DONE, h11.MUST_CLOSE)
    return Written(method=method, serialized=bytes(out), reusable=client.our_state is h11.DONE)


def h11_read_length(*, client: bool, method: bytes, data: bytes) -> int | None:
    """How many bytes of ``data`` h11 takes as one message, reading as a client (a response to
    ``method``) or as a server (a request); ``None`` if the message runs until close."""
    conn = h11.Connection(h11.CLIENT if client else h11.SERVER)
    if client:
        conn.send(h11.Request(method=method, target="/x", headers=[("Host", "d")]))
        conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    for _ in range(len(data) + 8):  # every event takes at least one byte, but the last
        event = conn.next_event()
        if isinstance(event, h11.EndOfMessage):
            leftover, _closed = conn.trailing_data
            return len(data) - len(leftover)
        if event is h11.NEED_DATA:
            return None
    raise AssertionError("h11 produced more events than there are bytes")


@PROPERTY_SETTINGS
@given(
    written=h11_responses(),
    after=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
)
def test_responses_end_where_h11_ends_them(written: Written, after: bytes, cuts: list[int]) -> None:
    data = written.serialized + after
    framer = MessageFramer(for_request=False, request_method=written.method)
    outcome = feed_pieces(framer, split_at(data, cuts))
    oracle = h11_read_length(client=True, method=written.method, data=data)
    if oracle is None:
        # No framing (an HTTP/1.0 client): the body is everything until the close.
        assert outcome == Outcome(used=len(data), complete=False, reusable=False)
        assert not written.reusable
        framer.finish()
        assert framer.complete and not framer.reusable
        return
    assert oracle == len(written.serialized)
    assert outcome == Outcome(
        used=len(written.serialized), complete=True, reusable=written.reusable
    )


@PROPERTY_SETTINGS
@given(
    written=h11_requests(),
    after=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
)
def test_requests_end_where_h11_ends_them(written: Written, after: bytes, cuts: list[int]) -> None:
    data = written.serialized + after
    framer = MessageFramer(for_request=True)
    outcome = feed_pieces(framer, split_at(data, cuts))
    assert h11_read_length(client=False, method=written.method, data=data) == len(
        written.serialized
    )
    assert outcome == Outcome(
        used=len(written.serialized), complete=True, reusable=written.reusable
    )
    assert framer.method == written.method


# ---------------------------------------------------------------------- ambiguous heads


@pytest.mark.parametrize(
    "head",
    [
        b"POST /x HTTP/1.1\r\nHost: d\r\nX-A: 1\nContent-Length: 5\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX-A: 1\rRepowire-Mesh-From: other\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX-A: 1\r\n Repowire-Mesh-From: other\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX-A: \x00\r\n\r\n",
    ],
    ids=["bare LF", "bare CR", "folded line", "NUL"],
)
async def test_a_head_that_parsers_could_read_differently_is_refused(head: bytes) -> None:
    """h11 (the daemon's parser) takes a bare LF as a line end; the connector's checks would
    not: such a head could carry a header past them. It is refused with 400 instead."""
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(head)
    with pytest.raises(HeadError) as info:
        await read_head(receive)
    assert info.value.status == 400


async def test_a_plain_head_is_read_whole_with_what_follows() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nok")
    head, rest = await read_head(receive)
    assert head == b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n"
    assert rest == b"ok"
