"""The connector's framer against h11, on random and mutated messages.

``connector._framing.MessageFramer`` lets a message's bytes pass untouched and says where the
message ends; h11 parses the same bytes at both ends of the connector (the relay reads
responses with it, the daemon's server reads requests). Every case here is a request or a
response built at random (Content-Length, chunked with extensions and trailers, no body,
HEAD/204/304/1xx, ``Connection``, HTTP/1.0, duplicate or conflicting lengths, transfer-coding
lists, oversized heads...), often mutated (a bare LF or CR, a folded line, whitespace before a
colon, a byte inserted, deleted or recased, a line doubled, the end cut off), followed by the
start of another message or by noise. Both read it whole and split at random byte
boundaries, and the framer must reach h11's decision (the message ends at the same byte, the
connection is kept alive or not alike; the body runs until close; the bytes are not a whole
message yet) or refuse the bytes: it may be stricter than h11, never looser.

h11 is given the two readings RFC 9112 defines and h11 does not implement, which the framer
makes (see :mod:`connector._framing`): whitespace before a chunk extension, and a response's
transfer codings other than ``chunked`` alone (:func:`rfc9112_allowances`). Nothing else.

Hypothesis draws cases (``EXAMPLES``), and ``SEEDS`` more come from seeded generators, so a
failure names its seed. ``REPOWIRE_FUZZ_SCALE=20`` multiplies both for a longer run.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import random
import re
from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar
from unittest import mock

import attrs
import h11
import h11._events
import h11._headers
import h11._readers
import pytest
from h11._state import MIGHT_SWITCH_PROTOCOL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector._framing import MAX_HEAD_SIZE, FramingError, MessageFramer

T = TypeVar("T")

SCALE = int(os.environ.get("REPOWIRE_FUZZ_SCALE", "1"))
#: Hypothesis examples per property, and seeded cases: a few seconds in all by default.
EXAMPLES = 600 * SCALE
SEEDS = 500 * SCALE
#: h11 buffers at most this much of an unfinished event: far above the framer's bounds, so
#: that h11's own limit never decides (the framer's are a strictness it may have).
ORACLE_MAX_EVENT = 1 << 24

NEXT_REQUEST = b"GET /next HTTP/1.1\r\nHost: d\r\n\r\n"
NEXT_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
Field = tuple[bytes, bytes]


# ---------------------------------------------------------------------- verdicts


@attrs.frozen
class Verdict:
    """What a reader made of the bytes: ``ends`` (at byte ``end``, the connection kept alive
    or not), ``until close`` (the body runs until the connection closes), ``incomplete``
    (more bytes are needed), ``switch`` (the connection may switch protocols) or ``refused``."""

    kind: str
    end: int | None = None
    keep_alive: bool | None = None


REFUSED = Verdict("refused")
UNTIL_CLOSE = Verdict("until close")
INCOMPLETE = Verdict("incomplete")
SWITCH = Verdict("switch")


def framer_verdict(pieces: Sequence[bytes], *, for_request: bool, method: bytes) -> Verdict:
    framer = MessageFramer(for_request=for_request, request_method=method)
    used = 0
    try:
        for piece in pieces:
            taken = framer.feed(piece)
            assert 0 <= taken <= len(piece)
            # Once the framer leaves bytes the message is over: it takes nothing more.
            assert taken == len(piece) or framer.complete
            used += taken
    except FramingError:
        return REFUSED
    if framer.complete:
        return Verdict("ends", used, framer.reusable)
    assert used == sum(map(len, pieces))
    try:
        framer.finish()
    except FramingError:
        return INCOMPLETE
    assert (framer.complete, framer.reusable) == (True, False)
    return UNTIL_CLOSE


#: h11's chunk-size line, with the whitespace RFC 9112 (7.1.1) allows before an extension.
_CHUNK_HEADER_BWS = re.compile(
    rb"(?P<chunk_size>[0-9A-Fa-f]{1,20})(?P<chunk_ext>[ \t]*;.*)?[ \t]*\r\n"
)
_ORIGINAL_NORMALIZE = h11._headers.normalize_and_validate
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _rfc9112_codings(
    headers: h11._headers.Headers | list[tuple[bytes, bytes]], _parsed: bool = False
) -> h11._headers.Headers:
    """h11's header check, with a response's transfer codings read as RFC 9112 (6.3) reads
    them when they are well-formed: ``chunked`` last means chunked framing (the one coding h11
    frames by), anything else a body until close (h11's framing without length fields)."""
    if isinstance(headers, h11._headers.Headers):
        return _ORIGINAL_NORMALIZE(headers, _parsed=_parsed)
    items = [(bytes(name), bytes(value)) for name, value in headers]
    fields = [value for name, value in items if name.lower() == b"transfer-encoding"]
    lists = [
        [c.strip(b" \t") for c in value.lower().split(b",") if c.strip(b" \t")] for value in fields
    ]
    codings = [coding for codings in lists for coding in codings]
    if not fields or not all(lists) or not all(_TOKEN.fullmatch(c) for c in codings):
        return _ORIGINAL_NORMALIZE(items, _parsed=_parsed)
    kept = [(name, value) for name, value in items if name.lower() != b"transfer-encoding"]
    if codings[-1] == b"chunked":
        kept.append((b"transfer-encoding", b"chunked"))
    else:
        kept = [(name, value) for name, value in kept if name.lower() != b"content-length"]
    return _ORIGINAL_NORMALIZE(kept, _parsed=_parsed)


@contextlib.contextmanager
def rfc9112_allowances(*, responses: bool) -> Iterator[None]:
    """h11 with the two readings the framer makes that h11 does not (responses only for the
    second)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(h11._readers, "chunk_header_re", _CHUNK_HEADER_BWS))
        if responses:
            stack.enter_context(
                mock.patch.object(h11._events, "normalize_and_validate", _rfc9112_codings)
            )
        yield


def h11_verdict(pieces: Sequence[bytes], *, for_request: bool, method: bytes) -> Verdict:
    """h11's reading of ``pieces``: as a server (a request) or as the client that sent a
    ``method`` request (a response)."""
    conn = h11.Connection(
        h11.SERVER if for_request else h11.CLIENT, max_incomplete_event_size=ORACLE_MAX_EVENT
    )
    if not for_request:
        conn.send(h11.Request(method=method, target="/x", headers=[("Host", "d")]))
        conn.send(h11.EndOfMessage())
    with rfc9112_allowances(responses=not for_request):
        fed = 0
        try:
            for piece in filter(None, pieces):  # an empty one would mean the end of input
                conn.receive_data(piece)
                fed += len(piece)
                verdict = _h11_events(conn, fed)
                if verdict is not None:
                    return verdict
        except h11.ProtocolError:
            return REFUSED
        return _h11_at_close(conn)


def _h11_events(conn: h11.Connection, fed: int) -> Verdict | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            return None
        if event is h11.PAUSED:
            return SWITCH  # a 2xx answer to CONNECT
        if isinstance(event, h11.EndOfMessage):
            state = conn.their_state
            if state is MIGHT_SWITCH_PROTOCOL:
                return SWITCH  # an upgrade or CONNECT request
            leftover, _ = conn.trailing_data
            return Verdict("ends", fed - len(leftover), state is h11.DONE)


def _h11_at_close(conn: h11.Connection) -> Verdict:
    """Every byte is in and h11 needs more: does the connection's end finish the message?"""
    try:
        conn.receive_data(b"")
        while True:
            event = conn.next_event()
            if isinstance(event, h11.EndOfMessage):
                return UNTIL_CLOSE
            if not isinstance(event, h11.Data):
                return INCOMPLETE
    except h11.ProtocolError:
        return INCOMPLETE


# ---------------------------------------------------------------------- cases


class Chooser(Protocol):
    """Where a case's random choices come from: Hypothesis draws or a seeded generator."""

    def integer(self, low: int, high: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...

    def chance(self, percent: int) -> bool: ...

    def binary(self, size: int) -> bytes: ...


@attrs.frozen
class DrawChooser:
    data: st.DataObject

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def choice(self, options: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(options))

    def chance(self, percent: int) -> bool:
        return self.data.draw(st.integers(0, 99)) < percent

    def binary(self, size: int) -> bytes:
        return self.data.draw(st.binary(min_size=size, max_size=size))


@attrs.frozen
class RandomChooser:
    rng: random.Random

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def choice(self, options: Sequence[T]) -> T:
        return self.rng.choice(options)

    def chance(self, percent: int) -> bool:
        return self.rng.randrange(100) < percent

    def binary(self, size: int) -> bytes:
        return self.rng.randbytes(size)


@attrs.frozen
class Case:
    """Bytes to read as a request, or as the response to a ``method`` request; ``cuts`` are
    where they are split for the second reading."""

    for_request: bool
    method: bytes
    data: bytes
    cuts: tuple[int, ...]

    def pieces(self) -> list[bytes]:
        bounds = [0, *sorted(set(self.cuts)), len(self.data)]
        return [self.data[a:b] for a, b in itertools.pairwise(bounds)]


@attrs.frozen
class Builder:
    """Builds one message from ``c``'s choices. Each choice is made among sound options, or,
    ``odds`` percent of the time, among odd ones (what parsers disagree on, or refuse)."""

    c: Chooser
    odds: int

    def pick(self, sound: Sequence[T], odd: Sequence[T] = ()) -> T:
        if odd and self.c.chance(self.odds):
            return self.c.choice(odd)
        return self.c.choice(sound)

    def cased(self, name: bytes) -> bytes:
        return self.c.choice([name, name.lower(), name.upper(), name.swapcase()])

    def payload(self) -> bytes:
        """A body: none, a few random bytes, or a long one that keeps looking like the end of a
        chunked body or the start of the next message."""
        kind = self.c.choice(["short", "none", "long"])
        if kind == "none":
            return b""
        if kind == "short":
            return self.c.binary(self.c.integer(1, 40))
        size = self.c.integer(64, 5000)
        filler = b"\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n" + bytes([self.c.integer(0, 255)])
        return (filler * (size // len(filler) + 1))[:size]

    def length_fields(self, size: int) -> list[Field]:
        value = self.pick(
            [b"%d" % size, b"0%d" % size, b" %d\t" % size],
            [
                b"%d" % (size + 1),
                b"%d" % max(size - 1, 0),
                b"%d, %d" % (size, size),
                b"+%d" % size,
                b"",
                b"-1",
                b"9" * 19,
                b"0x10",
            ],
        )
        fields = [(self.cased(b"Content-Length"), value)]
        if self.c.chance(10):
            other = self.pick([value], [b"%d" % size, b"%d" % (size + 2)])
            fields.append((self.cased(b"Content-Length"), other))
        return fields

    def coding_fields(self, *, request: bool) -> list[Field]:
        # A response may list other codings (RFC 9112); a request may not (the framer, h11).
        listed = [b"gzip, chunked", b"gzip,,chunked", b"chunked, gzip", b"gzip"]
        value = self.pick(
            [b"chunked", b"Chunked", b"chunked "] + ([] if request else listed),
            [b"chunked, chunked", b"", b"x;q=1, chunked", b'"chunked"', *listed],
        )
        fields = [(self.cased(b"Transfer-Encoding"), value)]
        if self.c.chance(self.odds // 2):
            fields.append((b"Transfer-Encoding", self.c.choice([b"chunked", b"gzip", b""])))
        return fields

    def chunked(self, body: bytes) -> bytes:
        out = bytearray()
        while body:
            size = self.c.integer(1, len(body))
            piece, body = body[:size], body[size:]
            out += self.chunk_line(size) + piece + b"\r\n"
        out += self.chunk_line(0)
        for _ in range(self.c.choice([0, 0, 1, 2])):
            name, value = self.pick(
                [(b"X-Trailer", b"1"), (b"x-other", b""), (b"X-Spaced", b" a b ")],
                [
                    (b"Content-Length", b"3"),
                    (b"Transfer-Encoding", b"chunked"),
                    (b"Bad Name", b"x"),
                    (b"X-Nul", b"a\x00b"),
                ],
            )
            out += name + self.c.choice([b": ", b":"]) + value + b"\r\n"
        return bytes(out + b"\r\n")

    def chunk_line(self, size: int) -> bytes:
        digits = self.c.choice([b"%x", b"%X", b"00%x", b"%x "]) % size
        extension = self.pick(
            [b"", b";a", b";a=b", b';a="q;v"', b" ;bws", b"\t;bws", b"; a = b"],
            [b";\x00", b";\r", b"\r", b";a\nb"],
        )
        return digits + extension + b"\r\n"

    def framing(self, *, request: bool) -> tuple[list[Field], bytes]:
        """Framing fields and a body they frame (or not quite)."""
        kind = self.pick(["length", "chunked", "none"], ["both"])
        body = self.payload()
        if kind == "length":
            return self.length_fields(len(body)), body
        if kind == "chunked":
            return self.coding_fields(request=request), self.chunked(body)
        if kind == "both":
            fields = self.coding_fields(request=request) + self.length_fields(len(body))
            return fields, self.chunked(body)
        # No framing fields: a request has no body, a response runs until close.
        return [], b"" if request else body

    def connection_fields(self) -> list[Field]:
        return self.pick(
            [
                [],
                [(b"Connection", b"close")],
                [(b"Connection", b"keep-alive")],
                [(b"connection", b"Keep-Alive, CLOSE")],
                [(b"Connection", b"keep-alive"), (b"Connection", b"close")],
                [(b"Connection", b"closed")],
                [(b"Connection", b" , close ,")],
            ],
            [[(b"Connection", b"Upgrade")]],
        )

    def other_fields(self) -> list[Field]:
        return [
            self.pick(
                [
                    (b"Content-Type", b"text/plain"),
                    (b"X-A", b"1"),
                    (b"X-Empty", b""),
                    (b"Expect", b"100-continue"),
                    (b"X-Ctl", b"a\x01b\x7f"),
                    (b"X-Obs", b"\xe9t\xe9"),
                    (b"X-Tab", b"a\tb"),
                    (b"Content-Length-X", b"5"),
                    (b"X-Hidden", b"1\r\nContent-Length: 9"),
                ],
                [
                    (b"Upgrade", b"websocket"),
                    (b"Bad Name", b"x"),
                    (b"(", b"x"),
                    (b"X-Nul", b"a\x00b"),
                    (b"X-Vt", b"a\x0bb"),
                ],
            )
            for _ in range(self.c.choice([0, 1, 2, 3]))
        ]

    def head(self, start: bytes, fields: list[Field]) -> bytes:
        lines = [start]
        for name, value in fields:
            separator = self.pick([b": ", b":", b":\t", b":  "], [b" : ", b"\t:"])
            trailing = self.c.choice([b"", b"", b"", b" ", b"\t"])
            lines.append(name + separator + value + trailing)
        if self.c.chance(self.odds // 4):
            line = self.c.choice([b" folded", b"\tfolded: x"])
            lines.insert(self.c.integer(1, len(lines)), line)
        if self.c.chance(5):
            # Pad the head to within a few bytes of the framer's bound, either side.
            size = sum(len(line) + 2 for line in lines) + 2
            pad = MAX_HEAD_SIZE + self.c.integer(-6, 6) - size - len(b"\r\nX-Pad: ")
            if pad > 0:
                lines.append(b"X-Pad: " + b"p" * pad)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def request(self) -> tuple[bytes, bytes]:
        method = self.pick(
            [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"get"], [b"G(T"]
        )
        if self.c.chance(4):
            method = b"CONNECT"  # sound, but h11 may switch protocols after it
        target = self.pick([b"/x", b"/", b"/a?b=c&d", b"*", b"http://d/x"], [b"/\x80", b"/a\x01"])
        version = self.pick([b"1.1", b"1.1", b"1.0"], [b"1.2", b"2.0"])
        hosts = self.pick([1], [0, 2]) if version == b"1.1" else self.c.choice([0, 1])
        fields: list[Field] = [(self.cased(b"Host"), b"d")] * hosts
        fields += self.connection_fields() + self.other_fields()
        framing_fields, body = self.framing(request=True)
        for field in framing_fields:
            fields.insert(self.c.integer(0, len(fields)), field)
        start = method + b" " + target + b" HTTP/" + version
        return method, self.head(start, fields) + body

    def response(self) -> tuple[bytes, bytes]:
        method = self.c.choice([b"GET", b"HEAD", b"POST", b"head"])
        if self.c.chance(4):
            method = b"CONNECT"
        out = bytearray()
        for _ in range(self.c.choice([0, 0, 0, 1, 2])):
            status = self.pick([b"100 Continue", b"103 Early Hints", b"102"], [b"101 Switching"])
            interim = self.other_fields() + self.pick([[]], [self.length_fields(0)])
            out += self.head(b"HTTP/1.1 " + status, interim)
        version = self.pick([b"1.1", b"1.1", b"1.0"], [b"1.2", b"2.0"])
        status_code = self.pick([200, 200, 204, 304, 404, 500, 201, 299, 999], [100, 101, 99])
        reason = self.pick([b" OK", b"", b" ", b" Not Found", b" a\tb", b" \x80\xff"], [b"OK"])
        fields = self.connection_fields() + self.other_fields()
        framing_fields, body = self.framing(request=False)
        for field in framing_fields:
            fields.insert(self.c.integer(0, len(fields)), field)
        start = b"HTTP/" + version + b" %03d" % status_code + reason
        out += self.head(start, fields) + body
        return method, bytes(out)


def mutate(c: Chooser, data: bytes) -> bytes:
    """One to three small damages, mostly in the (first) head."""
    for _ in range(c.integer(1, 3)):
        head_end = data.find(b"\r\n\r\n") + 4 if b"\r\n\r\n" in data else len(data)
        at = c.integer(0, head_end) if c.chance(75) else c.integer(0, len(data))
        kind = c.choice(["lf", "cr", "insert", "delete", "double", "fold", "colon", "cut", "case"])
        crlfs = [m.start() for m in re.finditer(rb"\r\n", data)] or [at]
        colons = [m.start() for m in re.finditer(rb":", data)] or [at]
        if kind == "lf":  # a bare LF
            where = c.choice(crlfs)
            data = data[:where] + data[where + 1 :]
        elif kind == "cr":  # a bare CR
            where = c.choice(crlfs)
            data = data[: where + 1] + data[where + 2 :]
        elif kind == "insert":
            byte = c.choice(
                [b" ", b"\t", b"\r", b"\n", b"\x00", b":", b",", b"0", b"\x0b", b"\r\n"]
            )
            data = data[:at] + byte + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + c.integer(1, 3) :]
        elif kind == "double":  # the line around ``at``, twice
            start = data.rfind(b"\r\n", 0, at) + 2 if data.rfind(b"\r\n", 0, at) >= 0 else 0
            end = data.find(b"\r\n", at)
            end = len(data) if end < 0 else end + 2
            data = data[:end] + data[start:end] + data[end:]
        elif kind == "fold":  # the next line becomes a continuation
            where = c.choice(crlfs) + 2
            data = data[:where] + c.choice([b" ", b"\t"]) + data[where:]
        elif kind == "colon":  # whitespace before a colon
            where = c.choice(colons)
            data = data[:where] + c.choice([b" ", b"\t"]) + data[where:]
        elif kind == "cut":
            data = data[:at]
        elif at < len(data):
            data = data[:at] + bytes([data[at]]).swapcase() + data[at + 1 :]
    return data


def build_case(c: Chooser) -> Case:
    """A request or a response: sound (most), with odd choices, or damaged afterwards."""
    style = c.choice(["sound", "sound", "odd", "damaged"])
    builder = Builder(c, odds=25 if style == "odd" else 0)
    for_request = c.chance(50)
    method, message = builder.request() if for_request else builder.response()
    if style == "damaged":
        message = mutate(c, message)
    following = c.choice(["next", "nothing", "noise"])
    if following == "next":
        message += NEXT_REQUEST if for_request else NEXT_RESPONSE
    elif following == "noise":
        message += c.binary(c.integer(1, 12))
    cuts = tuple(c.integer(0, len(message)) for _ in range(c.choice([1, 2, 4, 8])))
    return Case(for_request=for_request, method=method, data=message, cuts=cuts)


# ---------------------------------------------------------------------- the comparison


@attrs.frozen
class Compared:
    framer: Verdict
    h11: Verdict


def compare(case: Case) -> Compared:
    """Read ``case`` with the framer and with h11, whole and split; fail unless the framer
    agrees with h11 or refuses."""
    whole, split = [case.data], case.pieces()
    for_request, method = case.for_request, case.method
    framer = framer_verdict(whole, for_request=for_request, method=method)
    assert framer_verdict(split, for_request=for_request, method=method) == framer, (
        "the framer read the split differently"
    )
    oracle = h11_verdict(whole, for_request=for_request, method=method)
    assert h11_verdict(split, for_request=for_request, method=method) == oracle, (
        "h11 read the split differently"
    )
    if framer != REFUSED:
        assert framer == oracle, f"the framer says {framer}, h11 {oracle}: {case!r}"
    return Compared(framer=framer, h11=oracle)


PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_the_framer_agrees_with_h11_or_refuses(data: st.DataObject) -> None:
    compare(build_case(DrawChooser(data)))


def seeded_case(seed: int) -> Case:
    return build_case(RandomChooser(random.Random(seed)))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_seeded_case(seed: int) -> None:
    compare(seeded_case(seed))


def test_the_seeded_cases_reach_every_decision() -> None:
    """The comparison means something only if the cases reach every kind of decision, and
    the framer does not get by on refusing: most of what h11 reads, the framer reads too."""
    tally: collections.Counter[tuple[str, str]] = collections.Counter()
    keep_alive: collections.Counter[bool | None] = collections.Counter()
    for seed in range(SEEDS):
        compared = compare(seeded_case(seed))
        tally[compared.framer.kind, compared.h11.kind] += 1
        if compared.framer.kind == "ends":
            keep_alive[compared.framer.keep_alive] += 1
    agreed = {kind: tally[kind, kind] for kind in ("ends", "until close", "incomplete")}
    minimum = SEEDS // 60
    assert all(count >= minimum for count in agreed.values()), tally
    assert keep_alive[True] >= minimum and keep_alive[False] >= minimum, keep_alive
    assert tally["refused", "refused"] >= minimum, tally
    assert tally["refused", "switch"] >= 1, tally
    read_by_h11 = sum(count for (_, oracle), count in tally.items() if oracle != "refused")
    refused_only_by_framer = sum(
        count for (framer, oracle), count in tally.items() if framer == "refused" != oracle
    )
    assert refused_only_by_framer < read_by_h11 // 2, tally
