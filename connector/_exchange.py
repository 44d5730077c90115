"""One plain HTTP request on a kept-alive connection to the daemon.

The request head (already checked by :mod:`connector._pipe`) and body go to the daemon as they
came, the response comes back as the daemon wrote it; :class:`~connector._framing.MessageFramer`
only watches both pass so the connection can carry the next request once this one has ended
cleanly. Anything unexpected (framing the connector cannot follow, bytes beyond a message, an
abort on either side) closes the connection instead of returning it; stray bytes that arrive
after a connection went back are found by the pool's check before it is used again.
"""

from __future__ import annotations

import enum
import logging

import trio

from mux import MuxStream
from protocol import ErrorCode

from ._daemon_pool import DaemonPool, close_now
from ._framing import FramingError, MessageFramer

log = logging.getLogger("repowire.connector")

#: Bytes read per receive from the daemon or the stream.
READ_SIZE = 256 * 1024
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


class _Progress(enum.Enum):
    """How far one exchange has got, in the one value both of its tasks move on.

    The request and the response travel at once (a daemon may answer before the request body
    has arrived), so the states are the combinations that lead to different decisions: a
    kept connection the daemon closes before any response byte is stale (the request may go
    again), and only an exchange that ends :attr:`ANSWERED` may give its connection back.
    """

    SENDING = "request going out, no response byte yet"
    SENT = "request written whole, no response byte yet"
    ANSWERED_EARLY = "response bytes arrived before the request was written whole"
    ANSWERED = "request written whole, response bytes arrived"
    OVERRUN = "the daemon sent bytes past the response"


#: The state after the last byte of the request was written (any other state stays).
_AFTER_SENT = {
    _Progress.SENDING: _Progress.SENT,
    _Progress.ANSWERED_EARLY: _Progress.ANSWERED,
}
#: The state once response bytes arrived (any other state stays).
_AFTER_ANSWER = {
    _Progress.SENDING: _Progress.ANSWERED_EARLY,
    _Progress.SENT: _Progress.ANSWERED,
}
#: The states in which no response byte has arrived.
_UNANSWERED = frozenset({_Progress.SENDING, _Progress.SENT})


class _Outcome(enum.Enum):
    """How an exchange's two tasks ended."""

    DONE = "both messages passed"
    STALE = "a kept connection closed before any response byte"
    FAILED = "either side ended early or the framing was not followed"


class _Exchange:
    """One request and its response on one connection to the daemon: the two tasks that carry
    them and the :class:`_Progress` they share.

    A response byte counts as arrived before the await that forwards it, since from then on it
    may have reached the stream and the request must not go again; the request counts as
    written only once its last send has returned, since a send cut short leaves the connection
    inside a message.
    """

    def __init__(
        self,
        stream: MuxStream,
        connection: trio.SocketStream,
        first: bytes,
        request: MessageFramer,
        *,
        kept: bool,
    ) -> None:
        self.stream = stream
        self.connection = connection
        self.first = first
        self.request = request
        self.kept = kept
        self.response = MessageFramer(for_request=False, request_method=request.method or b"GET")
        self.progress = _Progress.SENDING

    @property
    def reusable(self) -> bool:
        """Whether the connection sits between two messages: the request went out whole, the
        response ended with nothing after it, and it lets the connection carry another."""
        # ``request.complete`` alone is not enough: the framer counts bytes before they are
        # sent, and an early answer may have cut the last send short.
        return self.progress is _Progress.ANSWERED and self.response.reusable

    async def run(self) -> _Outcome:
        """Carry the request to the daemon and the response to the stream. Returns
        :attr:`_Outcome.FAILED` when the framing could not be followed or either side ended
        early (even if the connection was also stale); any other exception (cancellation
        included) propagates."""
        outcome = _Outcome.DONE
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._upload)
                nursery.start_soon(self._download, nursery.cancel_scope)
        except* _Stale:
            outcome = _Outcome.STALE
        except* (trio.BrokenResourceError, trio.ClosedResourceError, FramingError) as group:
            log.debug("tunneled request ended early: %s", group.exceptions[0])
            # This clause runs after the stale one: when both came, the stream is reset
            # rather than the request sent again.
            outcome = _Outcome.FAILED
        return outcome

    def _stale_if_closed(self) -> bool:
        """Whether a close by the daemon now means a kept connection went stale."""
        return self.kept and self.progress in _UNANSWERED

    async def _upload(self) -> None:
        """Write the request to the daemon, reading the rest of its body from the stream, then
        wait for the stream's end. Raises :class:`_Stale` if a kept connection is closed under
        the first write, :class:`FramingError` for bytes beyond the request."""
        try:
            await self.connection.send_all(self.first)
        except trio.BrokenResourceError:
            if self._stale_if_closed():
                raise _Stale from None
            raise
        await self._send_body()
        self.progress = _AFTER_SENT.get(self.progress, self.progress)
        # The request is out. What comes now can only be the relay's end of the stream, or a
        # reset when the browser goes away, which must stop the daemon's work at once.
        if await self.stream.receive_some(READ_SIZE):
            raise FramingError("bytes after the request")

    async def _send_body(self) -> None:
        """Forward the request body still to come from the stream to the daemon."""
        request = self.request
        while not request.complete:
            data = await self.stream.receive_some(READ_SIZE)
            if not data:
                raise FramingError("the stream ended inside the request")
            if request.feed(data) < len(data):
                raise FramingError("bytes after the request")
            await self.connection.send_all(data)

    async def _download(self, cancel: trio.CancelScope) -> None:
        """Forward the response to the stream up to its last byte, end the stream's side, and
        cancel ``cancel`` (the upload no longer matters). Bytes past the response are dropped
        and make the exchange :attr:`_Progress.OVERRUN`."""
        response = self.response
        while not response.complete:
            data = await self._receive()
            if not data:
                response.finish()
                break
            self.progress = _AFTER_ANSWER.get(self.progress, self.progress)
            used = response.feed(data)
            if used < len(data):
                self.progress = _Progress.OVERRUN
                data = data[:used]
            await self.stream.send_all(data)
        await self.stream.send_eof()
        cancel.cancel()

    async def _receive(self) -> bytes:
        """The next bytes from the daemon, ``b""`` at its end of file. Raises :class:`_Stale`
        if a kept connection ends before any response byte."""
        try:
            data = await self.connection.receive_some(READ_SIZE)
        except trio.BrokenResourceError:
            if self._stale_if_closed():
                raise _Stale from None
            raise
        if not data and self._stale_if_closed():
            raise _Stale
        return data


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
    exchange = _Exchange(stream, connection, first, request, kept=kept)
    keep = False
    try:
        outcome = await exchange.run()
        keep = outcome is _Outcome.DONE and exchange.reusable
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
    if outcome is _Outcome.FAILED:
        stream.reset(ErrorCode.UPSTREAM_FAILED)
        return True
    if outcome is _Outcome.STALE:
        return False
    await stream.aclose()
    return True
