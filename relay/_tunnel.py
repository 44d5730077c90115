"""The tunnel: a browser's HTTP request or WebSocket, carried to a daemon over one stream.

HTTP is spoken with h11 on the stream (request out, response back) and both bodies stream
through chunk by chunk, so Server-Sent Events arrive event by event and large bodies are never
held whole. A WebSocket is bridged with wsproto: the relay is the WebSocket client of the daemon
on the stream and relays messages and close codes to the browser's ASGI connection.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import h11
import trio
import wsproto
import wsproto.events as ws
from wsproto.connection import ConnectionState
from wsproto.utilities import ProtocolError

from mux import MuxStream, SessionClosed
from protocol import CloseCode, ErrorCode

from ._asgi_transport import Receive, Send
from ._context import Relay, header
from ._links import DaemonLink
from ._quota import QuotaExceeded
from ._store_api import StoreError

log = logging.getLogger("repowire.relay")

#: Opens the stream a tunneled request is carried on (to the daemon over this relay's own
#: link, or forwarded to the replica holding the daemon's link); raises :class:`TunnelRefused`
#: with the answer when there is none.
StreamOpener = Callable[[], Awaitable[MuxStream]]

#: Bytes a WebSocket bridge reads from the stream per receive. Once read, a piece is out of
#: the stream's window and waits in hypercorn until the browser takes it. A response reads
#: what ``Relay.read_sizes`` says: as much, or 256 KiB once its window has grown (a download:
#: a fifth less relay CPU per byte in the bulk bench), the extra charged to the scope.
READ_SIZE = 64 * 1024
#: Seconds the daemon has to start its response (the head) once the whole request has been
#: sent up: then the browser gets 504 ``daemon_timeout`` and the stream is reset. Generous,
#: because a daemon may answer a long-poll late; once the head is out no deadline applies,
#: so Server-Sent Events and slow bodies are unaffected. Read at call time.
RESPONSE_HEAD_TIMEOUT = 60.0

#: Request headers never forwarded: hop-by-hop ones, the relay's credentials and the browser's
#: cookies (the daemon does not use them), and headers only the connector may set.
DROPPED_REQUEST_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"authorization",
        b"cookie",
        b"host",
        # Client-address headers: a browser could forge them; the relay sets its own.
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-ssl",
        b"x-real-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"repowire-mesh-from",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
    }
)
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"set-cookie",
        # hypercorn dates every response itself: the daemon's would make a second header.
        b"date",
    }
)
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Methods forwarded without a request body unless the browser declared its length: h11 will
#: not send a chunked body for them, so such a request is refused with 400 before a stream.
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
#: Seconds a browser is asked to wait (Retry-After) when the replica holding its daemon's link
#: says the daemon is not there (it may be reconnecting to another replica), when that replica
#: is busy, and when presence (Redis) cannot be read.
DAEMON_OFFLINE_RETRY_AFTER = 2
DAEMON_BUSY_RETRY_AFTER = 1
STORE_UNAVAILABLE_RETRY_AFTER = 5


def json_body(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()


async def send_json(
    send: Send,
    status: int,
    error: str,
    detail: str,
    *,
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A whole JSON error answer; ``close`` asks the browser to close the connection after
    it (the request body was not read: the connection cannot carry another request).
    ``headers`` are added (a ``Retry-After``, say)."""
    body = json_body(error, detail)
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *(headers or ()),
    ]
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def has_request_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request announces a body (chunked, or a non-zero Content-Length)."""
    if header(headers, b"transfer-encoding") is not None:
        return True
    length = header(headers, b"content-length")
    return length is not None and length.strip() not in (b"0", b"")


async def refuse(
    send: Send,
    status: int,
    error: str,
    detail: str,
    *,
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer a request without tunneling it: a JSON error, before its body is read.

    hypercorn closes the connection after an answer to a request whose body is unread; with
    ``close`` the answer says so (``Connection: close``) so the browser stops sending at once.
    The unread body is drained by the ASGI guard (:mod:`relay._asgi_guard`) while the answer
    goes out, and no longer.
    """
    await send_json(send, status, error, detail, close=close, headers=headers)


async def refuse_early(
    scope: dict[str, Any],
    send: Send,
    status: int,
    error: str,
    detail: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """:func:`refuse`, closing the connection if the request announced a body."""
    close = has_request_body(scope["headers"])
    await refuse(send, status, error, detail, close=close, headers=headers)


async def refuse_too_large(send: Send, limit: int) -> None:
    """413 for a body over ``limit``; the connection closes rather than read the rest."""
    detail = f"Request bodies are limited to {limit} bytes."
    await refuse(send, 413, "body_too_large", detail, close=True)


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in ``Connection``: hop-by-hop for this connection only."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def forwarded_headers(relay: Relay, scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The browser's headers as the daemon should see them."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    client = scope.get("client")
    address = relay.client_address(client, headers)
    secure = relay.is_secure(scope.get("scheme", "http"), client, headers)
    dropped = DROPPED_REQUEST_HEADERS | connection_tokens(headers)
    out = [(k, v) for k, v in headers if k.lower() not in dropped]
    host = next((v for k, v in headers if k.lower() == b"host"), b"")
    proto = b"https" if secure else b"http"
    out.append((b"x-forwarded-for", address.encode("latin-1")))
    out.append((b"x-forwarded-proto", proto))
    if host:
        out.append((b"x-forwarded-host", host))
    out.append((b"forwarded", _forwarded_value(address, proto, host)))
    return out


def _forwarded_value(address: str, proto: bytes, host: bytes) -> bytes:
    """RFC 7239 ``Forwarded`` from what the relay knows: ``for=...;proto=...;host=...``."""
    node = address
    if ":" in node:  # an IPv6 address is quoted and bracketed (RFC 7239 section 6)
        node = f'"[{node}]"'
    parts = [b"for=" + node.encode("latin-1"), b"proto=" + proto]
    if host:
        # A quoted string: a host with a port has a colon, not allowed in a token.
        safe = host.replace(b"\\", b"").replace(b'"', b"")
        parts.append(b'host="' + safe + b'"')
    return b";".join(parts)


async def open_tunnel_stream(link: DaemonLink, kind: str) -> MuxStream | None:
    try:
        return await link.session.open_stream({"kind": kind, "from": "browser"})
    except SessionClosed:
        return None


# ---------------------------------------------------------------------- HTTP


class TunnelRefused(Exception):
    """A tunneled request cannot get a stream: ``status``, ``error`` and ``detail`` are the
    answer the browser gets (503 ``daemon_offline``, ``daemon_busy``, ``too_many_streams`` or
    ``store_unavailable``), with a ``Retry-After`` of ``retry_after`` seconds if given."""

    def __init__(
        self, status: int, error: str, detail: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after = retry_after

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The extra headers of the answer."""
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(self.retry_after).encode())]


@contextmanager
def scope_stream_slot(relay: Relay, scope_id: str, kind: str) -> Iterator[None]:
    """Hold one of the scope's stream slots and the bytes a ``kind`` stream may hold
    (:meth:`Relay.stream_slot`) for the block; raises :class:`TunnelRefused` (503
    ``too_many_streams``) if the scope holds its quota."""
    with ExitStack() as held:
        try:
            held.enter_context(relay.stream_slot(scope_id, kind))
        except QuotaExceeded as full:
            raise TunnelRefused(503, "too_many_streams", _quota_detail(full)) from None
        yield


def _quota_detail(full: QuotaExceeded) -> str:
    if full.what == "open streams":
        return (
            f"This key's daemons already have {full.limit} requests open at once "
            "(the relay's per-key limit); try again when some have finished."
        )
    return (
        "This key's open requests already hold the relay's per-key share of memory "
        f"({full.limit} bytes); try again when some have finished."
    )


async def open_daemon_stream(relay: Relay, link: DaemonLink) -> MuxStream:
    """Open a stream to ``link``'s daemon within ``settings.stream_open_timeout``. Raises
    :class:`TunnelRefused`: 503 ``daemon_busy`` if every stream slot of the link stays taken
    that long, 503 ``daemon_offline`` if the link is closing."""
    timeout = relay.settings.stream_open_timeout
    stream: MuxStream | None = None
    with trio.move_on_after(timeout):
        stream = await open_tunnel_stream(link, "http")
        if stream is None:
            raise TunnelRefused(503, "daemon_offline", "The daemon's link just closed; try again.")
    if stream is None:
        raise TunnelRefused(
            503,
            "daemon_busy",
            f"The daemon has no free stream for {timeout:g} s: it is carrying as many "
            "requests as its link allows. Try again shortly.",
        )
    return stream


async def open_forwarded_daemon_stream(
    relay: Relay, scope_id: str, daemon_id: str, kind: str
) -> MuxStream:
    """A stream to ``daemon_id``, whose link another replica of the cluster holds, through
    that replica (:meth:`relay._replica_link.ClusterNode.open_forwarded_stream`, which bounds
    every wait). Raises :class:`TunnelRefused`, each with a ``Retry-After``: 503
    ``daemon_offline`` at once when no replica holds the daemon's link (or the one named
    cannot be reached), 503 ``daemon_busy`` when that replica refuses for load, 503
    ``store_unavailable`` when presence (Redis) cannot be read."""
    from ._replica_link import DaemonOffline, ForwardBusy

    cluster = relay.cluster
    if cluster is None:
        raise TunnelRefused(
            503,
            "daemon_offline",
            f"Daemon {daemon_id} is not connected.",
            retry_after=DAEMON_OFFLINE_RETRY_AFTER,
        )
    try:
        return await cluster.open_forwarded_stream(
            scope_id, daemon_id, {"kind": kind, "from": "browser"}
        )
    except DaemonOffline as offline:
        raise TunnelRefused(
            503, "daemon_offline", offline.detail, retry_after=DAEMON_OFFLINE_RETRY_AFTER
        ) from None
    except ForwardBusy as busy:
        relay.metrics.streams_refused.labels("forward_busy").inc()
        raise TunnelRefused(
            503, "daemon_busy", busy.detail, retry_after=DAEMON_BUSY_RETRY_AFTER
        ) from None
    except StoreError as exc:
        relay.store_failed(exc)
        raise TunnelRefused(
            503,
            "store_unavailable",
            "The relay cannot tell where the daemon is connected now (its store is "
            "unavailable); try again shortly.",
            retry_after=STORE_UNAVAILABLE_RETRY_AFTER,
        ) from None


def framing_problem(method: str, headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why the request's body framing cannot be forwarded as it is, or None."""
    chunked = header(headers, b"transfer-encoding") is not None
    if chunked and header(headers, b"content-length") is not None:
        return "Content-Length together with Transfer-Encoding is ambiguous."
    if chunked and method in BODYLESS_METHODS:
        return f"A {method} request with a chunked body is not forwarded."
    return None


async def tunnel_http(
    relay: Relay,
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    opener: StreamOpener,
    target: bytes,
    scope_id: str,
) -> None:
    """Carry one HTTP request to a daemon, over the stream ``opener`` gives (see
    :data:`StreamOpener`), and its response back. ``scope_id`` is the scope whose stream
    quota the request counts against."""
    method: str = scope["method"]
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    limit = relay.settings.max_body_size
    problem = framing_problem(method, headers)
    if problem is not None:
        await refuse(send, 400, "bad_request", problem, close=True)
        return
    declared = header(headers, b"content-length")
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            await refuse(send, 400, "bad_request", "Content-Length is not a number.")
            return
        if declared_size > limit:
            await refuse_too_large(send, limit)
            return
    try:
        with scope_stream_slot(relay, scope_id, "http"):
            stream = await opener()
            relay.metrics.streams_total.labels("http").inc()
            relay.metrics.streams_open.inc()
            exchange: HttpExchange | None = None
            try:
                exchange = HttpExchange(relay, scope, receive, send, stream, target, scope_id)
                await exchange.run(has_length=declared is not None)
            except BaseException:
                # Cancelled (access revoked, the relay stopping) or failed: the daemon's side
                # learns at once, rather than reading an orderly end of the request.
                stream.reset(ErrorCode.CANCEL)
                raise
            finally:
                relay.metrics.streams_open.dec()
                if exchange is not None:
                    exchange.release()
                await trio.aclose_forcefully(stream)
    except TunnelRefused as refused:
        await refuse_early(
            scope, send, refused.status, refused.error, refused.detail, headers=refused.headers
        )


class ExchangeState(enum.Enum):
    """Where one tunneled HTTP exchange is, towards the browser."""

    #: No part of a response has been sent to the browser.
    REQUEST = enum.auto()
    #: The response head is out (set before the send: a cancelled send may still have
    #: reached hypercorn); only body may follow.
    RESPONSE_STARTED = enum.auto()
    #: The whole response has been sent.
    RESPONSE_ENDED = enum.auto()
    #: The response cannot complete; the browser sees its connection end.
    ABORTED = enum.auto()


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class _HeadTimeout(Exception):
    """The daemon sent no response head within ``RESPONSE_HEAD_TIMEOUT``."""


class HttpExchange:
    """One HTTP request tunneled over ``stream``: the request (head, body) goes up, the
    response comes down, each in its own task, while :attr:`state` says what the browser has
    been sent. :meth:`run` never raises for a failure of the daemon, the stream or the
    browser; it answers, or aborts the response, as :attr:`state` allows."""

    def __init__(
        self,
        relay: Relay,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        stream: MuxStream,
        target: bytes,
        scope_id: str,
    ) -> None:
        self.relay = relay
        self.scope = scope
        self.scope_id = scope_id
        #: How much each read of the response takes (:meth:`release` gives back its charge).
        self._reads = relay.read_sizes(scope_id, stream)
        self.method: str = scope["method"]
        self.target = target
        self._receive = receive
        self._send = send
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.state = ExchangeState.REQUEST
        #: The browser went away (hypercorn reported ``http.disconnect``).
        self.browser_gone = False
        #: The whole request body has been read from hypercorn.
        self.request_read = False
        #: Bounds the wait for the daemon's response head: no deadline while the request
        #: goes up, ``RESPONSE_HEAD_TIMEOUT`` from its end, none once the head has arrived.
        self._head_wait = trio.CancelScope()
        self._head_received = False

    def request(self, *, has_length: bool) -> h11.Request:
        """The request head the stream carries.

        It says nothing about keeping a connection alive: the stream carries this one
        exchange and ends with it (:func:`tunnel_http` closes it once the response is through,
        whatever h11's state), and whether the connector's connection to the daemon stays open
        is the connector's decision alone. h11 therefore ends a complete exchange with both
        sides ``DONE`` (not ``MUST_CLOSE``); nothing starts another cycle on it, and nothing
        is read from the stream after the response's end, which h11 finds by the response's
        own framing (its length, its chunks, or the stream's end for a response with neither).
        """
        headers = forwarded_headers(self.relay, self.scope)
        headers.insert(0, (b"host", b"repowire-daemon"))
        if self.method not in BODYLESS_METHODS and not has_length:
            headers.append((b"transfer-encoding", b"chunked"))
        return h11.Request(method=self.method, target=self.target, headers=headers)

    async def run(self, *, has_length: bool) -> None:
        request = self.request(has_length=has_length)
        failure: str | None = None
        too_large = timed_out = head_timed_out = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._upload, request, nursery.cancel_scope)
                await self._download()
                nursery.cancel_scope.cancel()
        except* _BodyTooLarge:
            too_large = True
        except* _BodyTimeout:
            timed_out = True
        except* _HeadTimeout:
            head_timed_out = True
        except* (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as group:
            failure = str(group.exceptions[0])
        limit = self.relay.settings.max_body_size
        if too_large:
            await self._fail(
                ErrorCode.CANCEL,
                413,
                "body_too_large",
                f"Request bodies are limited to {limit} bytes.",
            )
        elif timed_out:
            timeout = self.relay.settings.body_timeout
            await self._fail(
                ErrorCode.CANCEL,
                408,
                "body_timeout",
                f"No part of the request body arrived for {timeout:g} s.",
            )
        elif self.browser_gone:
            self.stream.reset(ErrorCode.CANCEL)
        elif head_timed_out:
            await self._fail(
                ErrorCode.CANCEL,
                504,
                "daemon_timeout",
                f"The daemon did not start its answer within {RESPONSE_HEAD_TIMEOUT:g} s.",
            )
        elif failure is not None:
            log.info("tunnel %s request failed: %s", self.method, failure)
            await self._fail(
                ErrorCode.UPSTREAM_FAILED,
                502,
                "daemon_failed",
                "The daemon failed before answering this request.",
            )
        elif self.state is ExchangeState.RESPONSE_STARTED:
            self.state = ExchangeState.RESPONSE_ENDED
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _fail(self, code: ErrorCode, status: int, error: str, detail: str) -> None:
        """The exchange cannot complete: reset the daemon's stream; answer the browser with
        ``status`` if it has been sent nothing yet, else leave its response aborted."""
        self.stream.reset(code)
        if self.state is ExchangeState.REQUEST:
            self.state = ExchangeState.RESPONSE_ENDED
            await send_json(self._send, status, error, detail, close=not self.request_read)
        elif self.state is ExchangeState.RESPONSE_STARTED:
            # Headers are out: the only honest signal left is an aborted response, which is
            # what the browser sees when this request's task ends without finishing it.
            self.state = ExchangeState.ABORTED

    async def _upload(self, request: h11.Request, cancel: trio.CancelScope) -> None:
        conn, stream = self.conn, self.stream
        metrics = self.relay.metrics
        limit = self.relay.settings.max_body_size
        body_timeout = self.relay.settings.body_timeout
        await stream.send_all(conn.send(request) or b"")
        sent = 0
        more = True
        while more:
            message: dict[str, Any] | None = None
            with trio.move_on_after(body_timeout):
                message = await self._receive()
            if message is None:
                raise _BodyTimeout
            if message["type"] == "http.disconnect":
                self.browser_gone = True
                cancel.cancel()
                return
            body = message.get("body", b"")
            more = bool(message.get("more_body", False))
            if body:
                sent += len(body)
                if sent > limit:
                    raise _BodyTooLarge
                metrics.bytes_to_daemon.inc(len(body))
                await stream.send_all(conn.send(h11.Data(data=body)) or b"")
        self.request_read = True
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        if not self._head_received:
            self._head_wait.deadline = trio.current_time() + RESPONSE_HEAD_TIMEOUT
        # The request is complete; wait for the browser to go away (hypercorn reports it here)
        # so a closed tab cancels the daemon's work at once.
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.browser_gone = True
                cancel.cancel()
                return

    def release(self) -> None:
        """Give back what the exchange charged to the scope (the exchange is over)."""
        self._reads.release()

    async def _download(self) -> None:
        with self._head_wait:
            await self._relay_response()
        if self._head_wait.cancelled_caught:
            raise _HeadTimeout

    async def _relay_response(self) -> None:
        conn, stream, send = self.conn, self.stream, self._send
        metrics = self.relay.metrics
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(self._reads(stream)))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                self._head_received = True
                self._head_wait.deadline = math.inf
                dropped = DROPPED_RESPONSE_HEADERS | connection_tokens(list(event.headers))
                if any(k == b"transfer-encoding" for k, _ in event.headers):
                    # h11 framed the body by Transfer-Encoding and the relay re-frames it: a
                    # Content-Length alongside would not match what the browser is sent.
                    dropped |= {b"content-length"}
                response_headers = [(k, v) for k, v in event.headers if k not in dropped]
                self.state = ExchangeState.RESPONSE_STARTED
                await send(
                    {
                        "type": "http.response.start",
                        "status": event.status_code,
                        "headers": response_headers,
                    }
                )
            elif isinstance(event, h11.Data):
                metrics.bytes_from_daemon.inc(len(event.data))
                await send(
                    {"type": "http.response.body", "body": bytes(event.data), "more_body": True}
                )
            elif isinstance(event, h11.EndOfMessage):
                # The final (empty) body message is sent once the upload has stopped.
                return
            else:  # ConnectionClosed before the response finished
                raise h11.RemoteProtocolError("daemon closed the stream mid-response")


# ---------------------------------------------------------------------- WebSocket

#: Most bytes of a daemon's refusal body (an upgrade answered with an HTTP error) the relay
#: reads; the browser gets the first 200 characters in the JSON detail anyway.
MAX_REJECTION_BODY = 64 * 1024
#: Seconds the daemon has to answer a tunneled WebSocket upgrade (its 101 or a refusal)
#: before the browser is denied with 504 ``daemon_timeout`` and the stream is reset. A
#: module constant (read at call time) rather than ``settings.stream_open_timeout``: that
#: one bounds getting a stream, this one the daemon's own handler, which may do some work.
UPGRADE_ANSWER_TIMEOUT = 30.0
#: WebSocket close code for a message over ``settings.max_websocket_message_size``.
WS_MESSAGE_TOO_BIG = CloseCode.MESSAGE_TOO_BIG
#: Seconds the daemon has to answer a close the browser started before the bridge ends.
BROWSER_CLOSE_GRACE = 2.0


async def deny_websocket(
    send: Send,
    scope: dict[str, Any],
    status: int,
    error: str,
    detail: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Refuse a WebSocket upgrade with an HTTP status and JSON body (or a bare 403);
    ``headers`` are added to the answer."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = json_body(error, detail)
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *(headers or ()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


async def tunnel_websocket(
    relay: Relay,
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    opener: StreamOpener,
    target: bytes,
    scope_id: str,
) -> None:
    """Bridge a browser WebSocket to a daemon over the stream ``opener`` gives. ``scope_id``
    is the scope whose stream quota it counts against."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    try:
        with scope_stream_slot(relay, scope_id, "websocket"):
            stream = await opener()
            relay.metrics.streams_total.labels("websocket").inc()
            relay.metrics.streams_open.inc()
            try:
                await WebSocketBridge(relay, scope, receive, send, stream, target).run()
            except BaseException:
                stream.reset(ErrorCode.CANCEL)  # as for HTTP: the daemon learns at once
                raise
            finally:
                relay.metrics.streams_open.dec()
                await trio.aclose_forcefully(stream)
    except TunnelRefused as refused:
        await deny_websocket(
            send, scope, refused.status, refused.error, refused.detail, headers=refused.headers
        )


class BridgeState(enum.Enum):
    """Where one tunneled WebSocket is, towards the browser. Each change is made before the
    await that acts on it, so a cancelled send still counts as sent."""

    #: The upgrade goes to the daemon and its answer is awaited; the browser has been sent
    #: nothing yet.
    CONNECTING = enum.auto()
    #: The browser's upgrade is refused (an HTTP answer, or a close before any accept).
    DENIED = enum.auto()
    #: The browser is accepted: messages flow both ways.
    OPEN = enum.auto()
    #: The browser went away (hypercorn reported its disconnect): nothing more goes to it;
    #: its close goes on to the daemon.
    BROWSER_GONE = enum.auto()
    #: The relay has closed the browser's WebSocket (the daemon closed it, went away or
    #: failed): nothing more goes to the browser.
    CLOSED = enum.auto()


class _MessageTooBig(Exception):
    """A tunneled WebSocket message from the daemon grew past the limit."""


class WebSocketBridge:
    """One browser WebSocket bridged to the daemon over ``stream``: the relay is the
    WebSocket client of the daemon (wsproto) and relays messages and closes to the browser's
    ASGI connection, while :attr:`state` says what the browser has been sent. :meth:`run`
    never raises for a failure of the daemon or the stream: the browser is denied or closed,
    as :attr:`state` allows, and the stream reset."""

    def __init__(
        self,
        relay: Relay,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        stream: MuxStream,
        target: bytes,
    ) -> None:
        self.relay = relay
        self.scope = scope
        self.target = target
        self.stream = stream
        self._receive = receive
        self._send = send
        self.conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.state = BridgeState.CONNECTING
        #: The daemon's answer to the upgrade: its accept, or its refusal as (status, detail);
        #: ``None`` until it has come.
        self.answer: ws.AcceptConnection | tuple[int, str] | None = None
        self.limit = relay.settings.max_websocket_message_size
        self.answer_timeout = UPGRADE_ANSWER_TIMEOUT  # read at call time: tests shorten it

    async def run(self) -> None:
        if await self._upgrade():
            await self._relay_messages()

    # ------------------------------------------------------------------ the upgrade

    async def _upgrade(self) -> bool:
        """Ask the daemon to upgrade, and accept the browser if it does. Returns False when
        the browser was denied or has left (the stream is reset unless the daemon accepted)."""
        if not await self._send_upgrade_request() or not await self._await_answer():
            await self._deny(502, "daemon_failed", "The daemon failed the upgrade.")
            return False
        answer = self.answer
        if not isinstance(answer, ws.AcceptConnection):
            # Refused, timed out or abandoned: the daemon's side of the stream ends at once.
            self.stream.reset(ErrorCode.CANCEL)
        if self.state is BridgeState.BROWSER_GONE:
            return False
        if answer is None:
            timeout = self.answer_timeout
            detail = f"The daemon did not answer the WebSocket upgrade within {timeout:g} s."
            await self._deny(504, "daemon_timeout", detail)
            return False
        if isinstance(answer, tuple):
            status, detail = answer
            await self._deny(status, "upgrade_refused", detail)
            return False
        self.state = BridgeState.OPEN
        await self._send({"type": "websocket.accept", "subprotocol": answer.subprotocol})
        return True

    async def _send_upgrade_request(self) -> bool:
        """Write the upgrade request on the stream; False if the stream refused it."""
        extra = [
            (k, v)
            for k, v in forwarded_headers(self.relay, self.scope)
            if k.lower() not in (b"origin", b"sec-websocket-protocol")
        ]
        request = ws.Request(
            host="repowire-daemon",
            target=self.target.decode("latin-1"),
            subprotocols=list(self.scope.get("subprotocols") or []),
            extra_headers=extra,
        )
        try:
            await self.stream.send_all(self.conn.send(request))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
            return False
        return True

    async def _await_answer(self) -> bool:
        """Wait for the daemon's answer (:attr:`answer`) within :attr:`answer_timeout`,
        and watch the browser meanwhile: a browser that leaves ends the wait at once. Returns
        False if the stream failed."""
        failed = False
        try:
            with trio.move_on_after(self.answer_timeout):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_browser, nursery.cancel_scope)
                    nursery.start_soon(self._read_answer, nursery.cancel_scope)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
            failed = True
        return not failed

    async def _watch_browser(self, cancel: trio.CancelScope) -> None:
        while True:
            # Before the accept hypercorn delivers nothing but the disconnect.
            if (await self._receive())["type"] == "websocket.disconnect":
                self.state = BridgeState.BROWSER_GONE
                cancel.cancel()
                return

    async def _read_answer(self, cancel: trio.CancelScope) -> None:
        self.answer = await _upgrade_answer(self.conn, self.stream)
        cancel.cancel()

    async def _deny(self, status: int, error: str, detail: str) -> None:
        self.state = BridgeState.DENIED
        await deny_websocket(self._send, self.scope, status, error, detail)

    # ------------------------------------------------------------------ messages

    async def _relay_messages(self) -> None:
        """Relay messages both ways until either side closes; a message over the limit, or
        a failing stream, closes the browser's side and resets the stream."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._browser_to_daemon, nursery.cancel_scope)
                nursery.start_soon(self._daemon_to_browser, nursery.cancel_scope)
        except* _MessageTooBig:
            self.stream.reset(ErrorCode.CANCEL)
            reason = f"message over the relay's limit of {self.limit} bytes"
            await self._close_browser(WS_MESSAGE_TOO_BIG, reason)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
            await self._close_browser(CloseCode.INTERNAL_ERROR, "daemon link failed")
            self.stream.reset(ErrorCode.UPSTREAM_FAILED)

    async def _close_browser(self, code: int, reason: str) -> None:
        """Close the browser's WebSocket, unless it is gone or closed already."""
        if self.state is BridgeState.OPEN:
            self.state = BridgeState.CLOSED
            await self._send({"type": "websocket.close", "code": code, "reason": reason})

    async def _browser_to_daemon(self, cancel: trio.CancelScope) -> None:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                data = self.conn.send(_browser_message(message))
                # Only the encoding is held while the daemon's window lets it through.
                del message
                self.relay.metrics.bytes_to_daemon.inc(len(data))
                await self.stream.send_all(data)
                del data
            elif kind == "websocket.disconnect":
                await self._browser_left(int(message.get("code", CloseCode.NORMAL)))
                cancel.cancel()
                return

    async def _browser_left(self, code: int) -> None:
        """Pass the browser's close on to the daemon, and give the daemon's answer (which
        ends :meth:`_daemon_to_browser`) ``BROWSER_CLOSE_GRACE`` to come."""
        if self.state is BridgeState.OPEN:
            self.state = BridgeState.BROWSER_GONE
        if code in (1005, 1006):  # "no status" and "abnormal": not codes to send
            code = CloseCode.NORMAL
        if self.conn.state is ConnectionState.OPEN:
            await self.stream.send_all(self.conn.send(ws.CloseConnection(code=code)))
        await trio.sleep(BROWSER_CLOSE_GRACE)

    async def _daemon_to_browser(self, cancel: trio.CancelScope) -> None:
        assembler = _MessageAssembler(self.limit)
        while True:
            data = await self.stream.receive_some(READ_SIZE)
            if not data:
                await self._close_browser(CloseCode.INTERNAL_ERROR, "daemon went away")
                cancel.cancel()
                return
            self.relay.metrics.bytes_from_daemon.inc(len(data))
            self.conn.receive_data(data)
            del data
            for event in self.conn.events():
                if not await self._daemon_event(event, assembler):
                    cancel.cancel()
                    return

    async def _daemon_event(self, event: ws.Event, assembler: _MessageAssembler) -> bool:
        """Act on one event from the daemon; False once the daemon has closed."""
        if isinstance(event, ws.TextMessage | ws.BytesMessage):
            message = assembler.add(event)
            if message is not None and self.state is BridgeState.OPEN:
                key = "text" if isinstance(message, str) else "bytes"
                await self._send({"type": "websocket.send", key: message})
        elif isinstance(event, ws.Ping):
            await self.stream.send_all(self.conn.send(event.response()))
        elif isinstance(event, ws.CloseConnection):
            if self.conn.state is ConnectionState.REMOTE_CLOSING:
                await self.stream.send_all(self.conn.send(event.response()))
            await self._close_browser(event.code, event.reason or "")
            return False
        return True


class _MessageAssembler:
    """The daemon's message being received: one unfinished message at most, and at most
    ``limit`` bytes of it (UTF-8 bytes for text: a character may take 4), held once (its
    parts are dropped before the joined message is returned). See ``stream_cost`` for all
    a WebSocket may make the relay hold."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._text: list[str] = []
        self._bytes: list[bytes] = []
        self._held = 0

    def add(self, event: ws.TextMessage | ws.BytesMessage) -> str | bytes | None:
        """Take the next part of a message; returns the message once it is whole. Raises
        :class:`_MessageTooBig` past the limit."""
        if isinstance(event, ws.TextMessage):
            self._held += len(event.data.encode())
        else:
            self._held += len(event.data)
        if self._held > self.limit:
            raise _MessageTooBig(self.limit)
        if not event.message_finished:
            if isinstance(event, ws.TextMessage):
                self._text.append(event.data)
            else:
                self._bytes.append(bytes(event.data))
            return None
        self._held = 0
        if isinstance(event, ws.TextMessage):
            text = "".join([*self._text, event.data])
            self._text.clear()
            return text
        joined = b"".join([*self._bytes, bytes(event.data)])
        self._bytes.clear()
        return joined


def _browser_message(message: dict[str, Any]) -> ws.Event:
    """The wsproto event for a browser's ``websocket.receive`` message."""
    text = message.get("text")
    if text is not None:
        return ws.TextMessage(data=text)
    return ws.BytesMessage(data=message.get("bytes") or b"")


async def _upgrade_answer(
    conn: wsproto.WSConnection, stream: MuxStream
) -> ws.AcceptConnection | tuple[int, str]:
    """Read the daemon's answer to the upgrade: its accept, or its refusal as (status, the
    first 200 characters of its body). Raises BrokenResourceError if the stream ends."""
    rejection: ws.RejectConnection | None = None
    rejection_body = bytearray()
    while True:
        data = await stream.receive_some(READ_SIZE)
        if not data:
            raise trio.BrokenResourceError("daemon closed the stream during the upgrade")
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, ws.AcceptConnection):
                return event
            if isinstance(event, ws.RejectConnection):
                rejection = event
            elif isinstance(event, ws.RejectData):
                rejection_body += event.data[: MAX_REJECTION_BODY - len(rejection_body)]
                # Read no more than the bound: answer with what has arrived.
                if event.body_finished or len(rejection_body) >= MAX_REJECTION_BODY:
                    assert rejection is not None
                    text = bytes(rejection_body).decode("utf-8", "replace")[:200]
                    return rejection.status_code, text
        if rejection is not None and not rejection.has_body:
            return rejection.status_code, "The daemon refused."
