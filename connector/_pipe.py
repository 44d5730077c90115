"""Piping a stream accepted from the relay to the local daemon.

The connector stays generic: it reads the request head (to decide what the stream may reach and
to set or strip the mesh header) and hands the stream to the daemon unchanged. A plain browser
request (no upgrade) goes over a kept-alive connection, whose reuse needs only the framing of
the messages (see :mod:`connector._exchange`); a mesh request is framed the same way but closes
its connection after the response; anything else (a WebSocket upgrade, a request the framer
cannot follow) gets a TCP connection of its own, spliced both ways without another look, so
upgraded WebSockets flow through untouched. Whether a connection to the daemon stays open is
the connector's decision alone (see :func:`rewrite_head`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection

import attrs
import trio

from common import is_daemon_id, reason_phrase
from mux import BULK_SPLICE_CHUNK, MuxStream, splice
from protocol import ErrorCode

from ._daemon_pool import DaemonPool
from ._exchange import ExchangeError, pooled_exchange
from ._framing import FramingError, MessageFramer
from ._mesh_types import MESH_FROM_HEADER

log = logging.getLogger("repowire.connector")

#: Largest request head (request line and headers) accepted on a tunneled stream.
MAX_HEAD_SIZE = 32 * 1024
#: Seconds the relay gets to deliver a request head.
HEAD_TIMEOUT = 30.0
_MESH_HEADER = MESH_FROM_HEADER.lower().encode()
#: What a request head may not hold: a CR or LF outside a CRLF pair, a NUL, or a folded line.
#: Parsers disagree on those (h11 accepts a bare LF as a line end), so a header hidden behind
#: one could pass the connector's checks and still reach the daemon.
_AMBIGUOUS_HEAD = re.compile(rb"\x00|\r(?!\n)|(?<!\r)\n|\r\n[ \t]")


class HeadError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


async def read_head(
    stream: trio.abc.ReceiveStream, limit: int = MAX_HEAD_SIZE
) -> tuple[bytes, bytes]:
    """Read up to the end of the request head. Returns ``(head, rest)``: the head including its
    final blank line, and whatever followed it. Raises :class:`HeadError` past ``limit`` bytes or
    on end of stream."""
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[: end + 4])
            if _AMBIGUOUS_HEAD.search(head):
                raise HeadError(400, "bad_request", "Malformed request head.")
            return head, bytes(buffer[end + 4 :])
        if len(buffer) > limit:
            raise HeadError(431, "head_too_large", "The request head is too large.")
        data = await stream.receive_some(16 * 1024)
        if not data:
            raise HeadError(400, "bad_request", "The stream ended before a full request head.")
        buffer += data


def parse_request_line(head: bytes) -> tuple[str, str]:
    """``(method, path)`` of a request head (the path without its query)."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HeadError(400, "bad_request", "Malformed request line.")
    method = parts[0].decode("ascii", "replace")
    path = parts[1].split(b"?", 1)[0].decode("latin-1")
    return method, path


def rewrite_head(head: bytes, *, mesh_from: str | None, keep_alive: bool = False) -> bytes:
    """The head as the daemon gets it. Any mesh header the sender supplied goes; a mesh stream
    gets ours.

    ``Connection`` speaks for the hop a request arrived on (the stream, which carries one
    request and ends with it), and the connector alone decides the hop to the daemon. With
    ``keep_alive`` (a request for a kept connection) no ``Connection`` header goes, whatever
    the sender wrote (the relay writes none), so the daemon keeps the connection open. A mesh
    request gets ``Connection: close``, so its connection carries exactly one request (the one
    checked against the allowlist) and nothing can follow it to the daemon unchecked. A request
    on a connection of its own keeps its header (an upgrade needs its ``Connection: Upgrade``).
    """
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]]
    drop_connection = mesh_from is not None or keep_alive
    for line in lines[1:]:
        name = line.split(b":", 1)[0].strip().lower()
        if name == _MESH_HEADER or (drop_connection and name == b"connection"):
            continue
        kept.append(line)
    if mesh_from is not None:
        kept.append(MESH_FROM_HEADER.encode() + b": " + mesh_from.encode("ascii"))
        kept.append(b"Connection: close")
    return b"\r\n".join(kept) + b"\r\n\r\n"


async def answer(
    stream: trio.abc.HalfCloseableStream, status: int, error: str, detail: str
) -> None:
    """Write a complete JSON error response on the stream and close our side."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    reason = reason_phrase(status)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    try:
        await stream.send_all(head + body)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def framer_for(head: bytes) -> MessageFramer | None:
    """A request framer that has read ``head``, or ``None`` if the request must have a
    connection of its own: the framer refuses an upgrade (or ``CONNECT``), and framing it
    does not follow."""
    framer = MessageFramer(for_request=True)
    try:
        framer.feed(head)
    except FramingError:
        return None
    return framer


@attrs.frozen
class _Request:
    """A checked request, ready for the daemon: its rewritten ``head``, the bytes that
    followed it on the stream, and its framer (``None``: a connection of its own)."""

    head: bytes
    rest: bytes
    framer: MessageFramer | None


async def pipe_to_daemon(
    stream: MuxStream,
    *,
    pool: DaemonPool,
    mesh_allowlist: Collection[tuple[str, str]],
) -> None:
    """Serve one stream the relay opened: check it, then carry it to the local daemon.

    ``kind=http`` streams (browsers, through the relay) may reach any route of the daemon;
    ``kind=mesh`` streams (other daemons of the scope) only the ``(method, path)`` pairs of
    ``mesh_allowlist``. Anything else is reset with ``FORBIDDEN``.
    """
    kind = stream.metadata.get("kind")
    if kind not in ("http", "mesh"):
        stream.reset(ErrorCode.FORBIDDEN)
        return
    request = await _receive_request(stream, kind, mesh_allowlist)
    if request is not None:
        await _carry(stream, pool, request)


async def _receive_request(
    stream: MuxStream, kind: str, mesh_allowlist: Collection[tuple[str, str]]
) -> _Request | None:
    """Read and check the request head of ``stream``. Returns ``None`` once the stream has
    been answered (a refused head) or reset (no head in time)."""
    try:
        with trio.fail_after(HEAD_TIMEOUT):
            head, rest = await read_head(stream)
        method, path = parse_request_line(head)
        mesh_from = _mesh_sender(stream, method, path, mesh_allowlist) if kind == "mesh" else None
        # Mesh requests are framed too (with `Connection: close`, so their connection is not
        # kept): the exchange ends the stream when the response is complete, and a sender's
        # half-close after its request is never passed on to the daemon. Spliced raw, that
        # half-close reached the daemon, and an HTTP server reads end of file from its client
        # as an abort: the response was cut after its head.
        framer = framer_for(head)
        head = rewrite_head(
            head, mesh_from=mesh_from, keep_alive=framer is not None and mesh_from is None
        )
    except HeadError as exc:
        await answer(stream, exc.status, exc.error, exc.detail)
        await trio.aclose_forcefully(stream)
        return None
    except trio.TooSlowError:
        stream.reset(ErrorCode.CANCEL)
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await trio.aclose_forcefully(stream)
        return None
    return _Request(head, rest, framer)


def _mesh_sender(
    stream: MuxStream, method: str, path: str, mesh_allowlist: Collection[tuple[str, str]]
) -> str:
    """The daemon a mesh stream comes from, as the relay named it. Raises :class:`HeadError`
    for a malformed sender or a route outside ``mesh_allowlist``."""
    sender = stream.metadata.get("from", "")
    if not is_daemon_id(sender):
        raise HeadError(400, "bad_request", "The mesh stream names no valid sender.")
    if (method, path) not in mesh_allowlist:
        raise HeadError(403, "forbidden", f"{method} {path} is not reachable from other daemons.")
    return sender


async def _carry(stream: MuxStream, pool: DaemonPool, request: _Request) -> None:
    """Carry a checked request to the daemon (a kept connection if it is framed, else a new
    one spliced to the stream) and the response back; 502 if the daemon cannot be reached."""
    try:
        if request.framer is not None:
            await pooled_exchange(stream, pool, request.head, request.rest, request.framer)
            return
        daemon = await pool.fresh()
    except (OSError, ExchangeError) as exc:
        log.warning("local daemon at %s:%d not reachable: %s", pool.host, pool.port, exc)
        await answer(stream, 502, "daemon_unreachable", "The local daemon is not answering.")
        await trio.aclose_forcefully(stream)
        return
    try:
        await daemon.send_all(request.head + request.rest)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        stream.reset(ErrorCode.UPSTREAM_FAILED)
        await trio.aclose_forcefully(daemon)
        return
    except BaseException:
        # Cancelled (the link went down): the socket must not outlive this task.
        stream.reset(ErrorCode.CANCEL)
        await trio.aclose_forcefully(daemon)
        raise
    # The connector's own memory: larger pieces, fewer wakeups per byte of a busy WebSocket.
    await splice(stream, daemon, chunk=BULK_SPLICE_CHUNK)
