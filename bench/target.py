"""The benches' own target server: a tiny HTTP/1.1 server that serves and consumes bytes.

``GET /small`` answers a small JSON document (the size of the daemon's ``/health``);
``GET /bytes?n=N`` answers N bytes (``n=-1``: endless); ``POST /sink`` reads a body of any
Content-Length and answers how much it got. Keep-alive unless the request says
``Connection: close``. It costs as little CPU per byte as a trio server can: 1 MiB sends from a
preallocated buffer, 1 MiB receives. Run it with ``await nursery.start(serve_target)``.
"""

from __future__ import annotations

import contextlib
import json
from functools import partial

import trio

#: Loopback only.
HOST = "127.0.0.1"
#: Largest request head the target server reads.
TARGET_MAX_HEAD = 64 * 1024
#: Bytes per send and per receive in the target server.
TARGET_CHUNK = 1024 * 1024
#: ``/bytes?n=-1`` streams this many bytes: endless for any bench.
ENDLESS = 1 << 50
#: The ``/small`` answer: a small JSON document, the size of the daemon's ``/health``.
SMALL_BODY = json.dumps(
    {"status": "ok", "daemon_id": "bench-target", "version": "0", "relay": {"state": "n/a"}}
).encode()
#: One endless-download buffer, shared: nothing ever writes into it.
_ZEROS = bytes(TARGET_CHUNK)


class _BadRequest(Exception):
    pass


def _response_head(status: str, length: int, *, close: bool, kind: bytes) -> bytes:
    connection = b"connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + kind + b"\r\n"
        b"content-length: " + str(length).encode() + b"\r\n" + connection + b"\r\n"
    )


def _json_answer(status: str, body: bytes, *, close: bool) -> bytes:
    return _response_head(status, len(body), close=close, kind=b"application/json") + body


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], dict[bytes, bytes]]:
    """``(method, path, query, headers)`` of a request head (without the blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest("malformed request line")
    target = parts[1].decode("latin-1")
    path, _, query_text = target.partition("?")
    query = dict(item.partition("=")[::2] for item in query_text.split("&") if item)
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise _BadRequest("malformed header line")
        headers[name.strip().lower()] = value.strip()
    return parts[0].decode("latin-1"), path, query, headers


async def _read_head(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """The next request head from ``buffer`` and the stream (None at EOF before one); what
    follows it stays in ``buffer``."""
    end = buffer.find(b"\r\n\r\n")
    while end < 0:
        if len(buffer) > TARGET_MAX_HEAD:
            raise _BadRequest("request head too large")
        data = await stream.receive_some(TARGET_CHUNK)
        if not data:
            return None
        searched = max(0, len(buffer) - 3)
        buffer += data
        end = buffer.find(b"\r\n\r\n", searched)
    head = bytes(buffer[:end])
    del buffer[: end + 4]
    return head


async def _send_bytes(stream: trio.SocketStream, size: int, *, close: bool) -> None:
    size = ENDLESS if size < 0 else size
    await stream.send_all(
        _response_head("200 OK", size, close=close, kind=b"application/octet-stream")
    )
    view = memoryview(_ZEROS)
    while size > 0:
        step = min(size, TARGET_CHUNK)
        await stream.send_all(view[:step] if step < TARGET_CHUNK else _ZEROS)
        size -= step


async def _sink(stream: trio.SocketStream, buffer: bytearray, length: int, *, close: bool) -> bool:
    """Read a body of ``length`` bytes (part of it may be in ``buffer``) and answer; False if
    the client left first."""
    remaining = length
    taken = min(remaining, len(buffer))
    del buffer[:taken]
    remaining -= taken
    while remaining > 0:
        data = await stream.receive_some(min(remaining, TARGET_CHUNK))
        if not data:
            return False
        remaining -= len(data)
    body = json.dumps({"received": length}).encode()
    await stream.send_all(_json_answer("200 OK", body, close=close))
    return True


async def _answer(stream: trio.SocketStream, buffer: bytearray, head: bytes) -> bool:
    """Answer one request; True if the connection stays open for the next."""
    method, path, query, headers = _parse_head(head)
    close = headers.get(b"connection", b"").lower() == b"close"
    if b"transfer-encoding" in headers:
        raise _BadRequest("chunked request bodies are not supported")
    length = int(headers.get(b"content-length", b"0"))
    if method == "GET" and path == "/small":
        await stream.send_all(_json_answer("200 OK", SMALL_BODY, close=close))
    elif method == "GET" and path == "/bytes":
        await _send_bytes(stream, int(query.get("n", "0")), close=close)
    elif method == "POST" and path == "/sink":
        if not await _sink(stream, buffer, length, close=close):
            return False
    else:
        await stream.send_all(_json_answer("404 Not Found", b'{"error": "not_found"}', close=True))
        return False
    return not close


async def _serve_connection(stream: trio.SocketStream) -> None:
    """One connection of the target server: keep-alive requests until EOF or ``close``."""
    buffer = bytearray()
    try:
        while (head := await _read_head(stream, buffer)) is not None:
            if not await _answer(stream, buffer, head):
                return
    except (_BadRequest, ValueError):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            body = b'{"error": "bad_request"}'
            await stream.send_all(_json_answer("400 Bad Request", body, close=True))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away mid-answer: ordinary for streaming benches
    finally:
        await trio.aclose_forcefully(stream)


async def serve_target(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve on 127.0.0.1 at a port the system picks, reported once listening; until
    cancelled."""
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, _serve_connection, 0, host=HOST)
        )
        task_status.started(listeners[0].socket.getsockname()[1])
