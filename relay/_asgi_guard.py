"""A guard around an ASGI app served by hypercorn: one request's failure ends that request.

hypercorn (0.18, trio worker) runs each request's app in a task of its connection's task
group, and calls the app's ``send(None)`` in a ``finally`` when the app returns. If that call
raises -- because the app left hypercorn's HTTP state and h11's state apart (a second
``http.response.start``, or a send cancelled half-way) -- the exception leaves the connection's
task group and ends hypercorn's server nursery: every connection of the relay, not one
request. hypercorn also waits, when a response ends, to hand ``http.disconnect`` to the app
through its request queue; if the app stopped reading a body that queue is full, and the send
(or hypercorn's own close after the app returned) waits for ever.

:class:`AsgiGuard` keeps that from ever happening, whatever the app does:

- it tracks the ASGI response state itself (:class:`ResponseState`) and refuses, with
  :class:`ResponseSequenceError` raised into the app, any message hypercorn must not see
  (a second response start, body after the end, anything after an abort);
- the sends that change hypercorn's state (the response head, the end of the body, a
  WebSocket accept or close) run shielded from cancellation, so hypercorn's state and h11's
  never part; hypercorn shields its socket writes already, so this adds no new unbounded wait;
- a send that ends the exchange while the request body is unread reads and drops that body
  until the send is through, so hypercorn's queue always has room for ``http.disconnect``;
  when a WebSocket app returns, the guard likewise closes it with hypercorn while dropping
  the client's messages until ``websocket.disconnect`` (within ``WEBSOCKET_SETTLE_TIMEOUT``);
- every Exception raised by the app (not a cancellation) is caught and logged as one line;
  the browser then gets a 500 JSON answer if nothing was sent yet, or an aborted response
  (the connection closes) if a response had started. Nothing propagates into hypercorn.
"""

from __future__ import annotations

import enum
import json
import logging
from typing import Any, cast

import trio

from protocol import CloseCode

from ._asgi_transport import Receive, Send

log = logging.getLogger("repowire.relay")

ASGIApp = Any

#: Status, error code and detail of the answer to a request whose handler failed before it
#: sent anything.
INTERNAL_ERROR_STATUS = 500
_INTERNAL_ERROR_BODY = json.dumps(
    {"error": "internal_error", "detail": "The relay failed while handling this request."}
).encode()
#: Seconds a WebSocket whose app has returned may take to be settled: the guard reads and
#: drops the client's messages until hypercorn reports ``websocket.disconnect`` (hypercorn's
#: full queue, ``APP_QUEUE_SIZE`` messages in relay._settings, would otherwise block its
#: close, and the connection, for ever). This bounds the wait for that disconnect; it cannot
#: cut the close frame's socket write, which hypercorn shields (see ``finish``).
WEBSOCKET_SETTLE_TIMEOUT = 10.0


class ResponseState(enum.Enum):
    """Where one exchange is, as hypercorn must see it."""

    #: Nothing sent yet.
    REQUEST = enum.auto()
    #: The response head (or a WebSocket accept) is out; its body may follow.
    RESPONSE_STARTED = enum.auto()
    #: The response ended (or the WebSocket was closed): nothing more may be sent.
    RESPONSE_ENDED = enum.auto()
    #: The response could not complete; the connection is closed under it.
    ABORTED = enum.auto()


class ResponseSequenceError(Exception):
    """The app tried to send a message that is invalid in the exchange's state. Raised into
    the app by the guard's ``send``; nothing reaches hypercorn."""


class _HttpExchange:
    """The guard's view of one HTTP request: its state, and whether its body was read."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self.state = ResponseState.REQUEST
        #: The request body was read to its end, or the client went away: hypercorn puts
        #: nothing more in the app's queue but ``http.disconnect``, which then always fits.
        self.request_done = False
        #: hypercorn has been told that the app finished (``send(None)``).
        self._finished = False
        self._receive = receive
        self._send = send

    async def receive(self) -> dict[str, Any]:
        message = await self._receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            self.request_done = True
        return message

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start" and self.state is ResponseState.REQUEST:
            # Set before the await: a cancelled send may have reached h11 all the same.
            self.state = ResponseState.RESPONSE_STARTED
            with trio.CancelScope(shield=True):
                await self._send(message)
        elif kind == "http.response.body" and self.state is ResponseState.RESPONSE_STARTED:
            if message.get("more_body", False):
                try:
                    await self._send(message)
                except BaseException:
                    # h11 may have counted bytes that never left: the body is not whole.
                    self.state = ResponseState.ABORTED
                    raise
            else:
                self.state = ResponseState.RESPONSE_ENDED
                await self._closing_send(message)
        else:
            raise ResponseSequenceError(f"{kind} is not valid in state {self.state.name}")

    async def _closing_send(self, message: dict[str, Any] | None) -> None:
        """A send after which hypercorn hands ``http.disconnect`` to the app: shielded, and
        with the unread request body drained meanwhile so the disconnect fits in the queue.
        ``None`` is hypercorn's own "the app has finished" (it closes an unfinished
        response's connection)."""
        try:
            with trio.CancelScope(shield=True):
                if self.request_done:
                    await self._send(cast(dict[str, Any], message))
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._drain)
                    await self._send(cast(dict[str, Any], message))
                    nursery.cancel_scope.cancel()
        except BaseException:
            # The end did not go out whole (h11 refused it, or the socket broke): hypercorn
            # must see an aborted response, never one the guard believes ended.
            self.state = ResponseState.ABORTED
            raise

    async def _drain(self) -> None:
        while not self.request_done:
            await self.receive()

    async def abort(self) -> None:
        """End a started response unfinished: hypercorn closes the connection, so the
        browser sees a truncated response rather than a complete-looking one. Done here
        rather than left to hypercorn's own ``send(None)`` so that the unread request body
        is drained meanwhile."""
        if self._finished or self.state not in (
            ResponseState.RESPONSE_STARTED,
            ResponseState.ABORTED,
        ):
            return
        self.state = ResponseState.ABORTED
        self._finished = True
        await self._closing_send(None)

    async def fail(self) -> None:
        """After the app failed: a 500 JSON answer if nothing was sent, else an abort."""
        if self.state is ResponseState.REQUEST:
            await self.send(
                {
                    "type": "http.response.start",
                    "status": INTERNAL_ERROR_STATUS,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_INTERNAL_ERROR_BODY)).encode()),
                        (b"cache-control", b"no-store"),
                        (b"connection", b"close"),
                    ],
                }
            )
            await self.send({"type": "http.response.body", "body": _INTERNAL_ERROR_BODY})
        else:
            await self.abort()


class _WebSocketExchange:
    """The guard's view of one WebSocket: handshake, accepted, or closed."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self.state = ResponseState.REQUEST
        #: The handshake is being refused with an HTTP response (``websocket.http.response``).
        self.rejecting = False
        #: hypercorn reported ``websocket.disconnect``: it puts nothing more in the queue.
        self.disconnected = False
        self._receive = receive
        self._send = send

    async def receive(self) -> dict[str, Any]:
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            self.disconnected = True
        return message

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        state = self.state
        if kind == "websocket.send" and state is ResponseState.RESPONSE_STARTED:
            if self.rejecting:
                raise ResponseSequenceError(f"{kind} is not valid during a refusal")
            await self._send(message)
            return
        if state is ResponseState.RESPONSE_ENDED:
            # Closed already: like hypercorn once the client has gone, ignore what follows
            # (a link's last words racing its close), rather than fail the handler for it.
            return
        if kind == "websocket.accept" and state is ResponseState.REQUEST:
            self.state = ResponseState.RESPONSE_STARTED
        elif kind == "websocket.close" and (
            state is ResponseState.REQUEST
            or (state is ResponseState.RESPONSE_STARTED and not self.rejecting)
        ):
            self.state = ResponseState.RESPONSE_ENDED
        elif kind == "websocket.http.response.start" and state is ResponseState.REQUEST:
            self.state = ResponseState.RESPONSE_STARTED
            self.rejecting = True
        elif (
            kind == "websocket.http.response.body"
            and state is ResponseState.RESPONSE_STARTED
            and self.rejecting
        ):
            if not message.get("more_body", False):
                self.state = ResponseState.RESPONSE_ENDED
        else:
            raise ResponseSequenceError(f"{kind} is not valid in state {state.name}")
        # Handshake answers and closes change hypercorn's state: never half-done.
        with trio.CancelScope(shield=True):
            await self._send(message)

    async def fail(self) -> None:
        if self.state is ResponseState.REQUEST:
            await self.send({"type": "websocket.close", "code": CloseCode.INTERNAL_ERROR})
        elif self.state is ResponseState.RESPONSE_STARTED and not self.rejecting:
            await self.send(
                {
                    "type": "websocket.close",
                    "code": CloseCode.INTERNAL_ERROR,
                    "reason": "relay error",
                }
            )
        # A rejection half-sent: hypercorn closes the connection when the app returns.

    async def finish(self) -> None:
        """The app has returned: tell hypercorn (``send(None)``, which closes the stream) while
        reading and dropping the client's messages until ``websocket.disconnect``, so that
        hypercorn's queue has room for it. Shielded; the wait for the disconnect ends within
        ``WEBSOCKET_SETTLE_TIMEOUT``, but hypercorn writes the close frame to the socket in its
        own shielded scope, which the deadline cannot cut: a client that never reads keeps
        that write (and this call) until the kernel gives up on the connection (TCP_USER_TIMEOUT,
        ``relay._server.STALLED_PEER_TIMEOUT``, 60 s). hypercorn's own ``send(None)``
        afterwards finds the stream closed and returns."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(WEBSOCKET_SETTLE_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._drain)
                    await self._send(cast(dict[str, Any], None))
                    if self.disconnected:
                        nursery.cancel_scope.cancel()

    async def _drain(self) -> None:
        while not self.disconnected:
            await self.receive()


class AsgiGuard:
    """Wraps ``app`` (an ASGI app served by hypercorn) so that nothing a request does can
    reach hypercorn as an exception or an invalid message sequence (see the module's doc).

    Lifespan events pass through unguarded. ``name`` labels the log lines, written to
    ``logger`` (the relay's by default).
    """

    def __init__(
        self, app: ASGIApp, name: str = "relay", logger: logging.Logger | None = None
    ) -> None:
        self.app = app
        self.name = name
        self.log = logger or log

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        exchange: _HttpExchange | _WebSocketExchange
        if kind == "http":
            exchange = _HttpExchange(receive, send)
            app_receive: Receive = exchange.receive
        elif kind == "websocket":
            exchange = _WebSocketExchange(receive, send)
            app_receive = exchange.receive
        else:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, app_receive, exchange.send)
        except BaseException as exc:
            # Exceptions are the request's own failure; the rest (Cancelled above all: the
            # connection or the server is being stopped) belongs to whoever stops us.
            failure: BaseException | None
            rest: BaseException | None
            if isinstance(exc, BaseExceptionGroup):
                failure, rest = exc.split(Exception)
            elif isinstance(exc, Exception):
                failure, rest = exc, None
            else:
                raise
            if failure is not None:
                self._log(scope, failure)
                await self._settle(exchange, scope, failing=True)
            if rest is not None:
                raise rest from None
            return
        await self._settle(exchange, scope, failing=False)

    async def _settle(
        self, exchange: _HttpExchange | _WebSocketExchange, scope: dict[str, Any], *, failing: bool
    ) -> None:
        """Leave hypercorn a finished exchange; never raises (but Cancelled)."""
        try:
            if failing:
                await exchange.fail()
            elif isinstance(exchange, _HttpExchange):
                if exchange.state is ResponseState.REQUEST:
                    await exchange.fail()  # the app answered nothing: 500, not a hang
                else:
                    await exchange.abort()  # a no-op for a response that ended
            if isinstance(exchange, _WebSocketExchange):
                await exchange.finish()
        except Exception as exc:  # the connection is gone already: nothing left to tell
            self.log.debug(
                "%s: could not finish %s %r: %r", self.name, scope["type"], _path(scope), exc
            )

    def _log(self, scope: dict[str, Any], failure: BaseException) -> None:
        first = failure
        while isinstance(first, BaseExceptionGroup) and first.exceptions:
            first = first.exceptions[0]
        # One line, no traceback at INFO; the path only (a query string may be private),
        # quoted: hypercorn has percent-decoded it, so it may hold a newline.
        self.log.info(
            "%s: %s %r failed: %s: %r",
            self.name,
            scope.get("method", "WEBSOCKET"),
            _path(scope),
            type(first).__name__,
            str(first)[:200],
        )
        self.log.debug("%s: traceback of that failure", self.name, exc_info=failure)


def _path(scope: dict[str, Any]) -> str:
    path = str(scope.get("path", ""))
    return path if len(path) <= 200 else path[:200] + "..."
