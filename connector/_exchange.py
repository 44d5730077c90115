"""One plain HTTP request on a kept-alive connection to the daemon.

The request head (already checked by :mod:`connector._pipe`) and body go to the daemon as they
came, the response comes back as the daemon wrote it; :class:`~connector._framing.MessageFramer`
only watches both pass so the connection can carry the next request once this one has ended
cleanly. Anything unexpected (framing the connector cannot follow, bytes beyond a message, an
abort on either side) closes the connection instead of returning it; stray bytes that arrive
after a connection went back are found by the pool's check before it is used again.
"""

from __future__ import annotations

import logging

import trio

from mux import MuxStream
from protocol import ErrorCode

from ._daemon_pool import DaemonPool, close_now
from ._framing import FramingError, MessageFramer

log = logging.getLogger("repowire.connector")

#: Bytes read per receive from the daemon or the stream.
READ_SIZE = 64 * 1024
#: Methods retried once on a fresh connection when a kept one turns out to be closed before any
#: byte of the response: safe to repeat, and sent with no body.
RETRY_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})


class _Stale(Exception):
    """A kept connection was closed by the daemon before it answered."""


class ExchangeError(Exception):
    """The daemon could not be reached; nothing was sent to the stream yet."""


async def pooled_exchange(
    stream: MuxStream, pool: DaemonPool, head: bytes, rest: bytes, request: MessageFramer
) -> None:
    """Carry the request whose ``head`` has been read from ``stream`` (``rest`` is whatever
    followed it; ``request`` has been fed ``head``) to the daemon and the response back.

    Raises :class:`ExchangeError` if no connection to the daemon could be opened (nothing was
    written to the stream then). Any other failure resets the stream; it is closed on return.
    """
    try:
        used = request.feed(rest)
    except FramingError:
        used = -1
    if used < len(rest):
        # One request per stream: bytes after it (or a body the framer cannot follow) were
        # never the daemon's to see.
        stream.reset(ErrorCode.PROTOCOL_ERROR)
        return
    first = head + rest
    # Decided now: the first attempt may read the body from the stream, and a retry can only
    # resend what is in ``first``.
    retryable = request.complete and request.method in RETRY_METHODS
    try:
        connection, reused = await pool.connect()
    except OSError as exc:
        raise ExchangeError(str(exc)) from exc
    if not reused:
        await _exchange_on(stream, pool, connection, first, request, kept=False)
        return
    if await _exchange_on(stream, pool, connection, first, request, kept=True):
        return
    # The kept connection was closed under us before any answer.
    if not retryable:
        stream.reset(ErrorCode.UPSTREAM_FAILED)
        return
    try:
        connection = await pool.fresh()
    except OSError as exc:
        raise ExchangeError(str(exc)) from exc
    await _exchange_on(stream, pool, connection, first, request, kept=False)


async def _exchange_on(
    stream: MuxStream,
    pool: DaemonPool,
    connection: trio.SocketStream,
    first: bytes,
    request: MessageFramer,
    *,
    kept: bool,
) -> bool:
    """Run the exchange on ``connection``. Returns False only when ``kept`` and the daemon
    closed the connection before any byte of the response (the stream is untouched then)."""
    response = MessageFramer(for_request=False, request_method=request.method or b"GET")
    answered = False  # a response byte arrived
    extra = False  # the daemon sent bytes after the response
    sent = False  # every byte of the request was written to the daemon

    async def upload() -> None:
        nonlocal sent
        try:
            await connection.send_all(first)
        except trio.BrokenResourceError:
            if kept and not answered:
                raise _Stale from None
            raise
        while not request.complete:
            data = await stream.receive_some(READ_SIZE)
            if not data:
                raise FramingError("the stream ended inside the request")
            if request.feed(data) < len(data):
                raise FramingError("bytes after the request")
            await connection.send_all(data)
        sent = True
        # The request is out. What comes now can only be the relay's end of the stream, or a
        # reset when the browser goes away, which must stop the daemon's work at once.
        if await stream.receive_some(READ_SIZE):
            raise FramingError("bytes after the request")

    async def download(cancel: trio.CancelScope) -> None:
        nonlocal answered, extra
        while not response.complete:
            try:
                data = await connection.receive_some(READ_SIZE)
            except trio.BrokenResourceError:
                if kept and not answered:
                    raise _Stale from None
                raise
            if not data:
                if kept and not answered:
                    raise _Stale
                response.finish()
                break
            answered = True
            used = response.feed(data)
            if used < len(data):
                extra = True
                data = data[:used]
            await stream.send_all(data)
        await stream.send_eof()
        cancel.cancel()

    stale = failed = keep = False
    try:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                nursery.start_soon(download, nursery.cancel_scope)
        except* _Stale:
            stale = True
        except* (trio.BrokenResourceError, trio.ClosedResourceError, FramingError) as group:
            log.debug("tunneled request ended early: %s", group.exceptions[0])
            failed = True
        # ``request.complete`` alone is not enough: the framer counts bytes before they are
        # sent, and an early answer may have cut the last send short.
        keep = not (stale or failed) and response.reusable and sent and not extra
    except BaseException:
        # Cancelled (the link or the connector is going away): nothing may outlive this task.
        stream.reset(ErrorCode.CANCEL)
        raise
    finally:
        # The connection goes back to the pool or is closed, on every path.
        if keep:
            pool.release(connection)
        else:
            close_now(connection)
    if failed:
        stream.reset(ErrorCode.UPSTREAM_FAILED)
        return True
    if stale:
        return False
    await stream.aclose()
    return True
