"""The tunnel: a browser's HTTP request or WebSocket, carried to a daemon over one stream.

HTTP is spoken with h11 on the stream (request out, response back) and both bodies stream
through chunk by chunk, so Server-Sent Events arrive event by event and large bodies are never
held whole. A WebSocket is bridged with wsproto: the relay is the WebSocket client of the daemon
on the stream and relays messages and close codes to the browser's ASGI connection.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import h11
import trio
import wsproto
import wsproto.events as ws
from wsproto.connection import ConnectionState
from wsproto.utilities import ProtocolError

from mux import MuxStream, SessionClosed
from protocol import ErrorCode

from ._asgi_transport import Receive, Send
from ._context import Relay
from ._links import DaemonLink

log = logging.getLogger("repowire.relay")

#: Bytes read from the stream per receive.
READ_SIZE = 64 * 1024

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
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
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
    }
)
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def json_body(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()


async def send_json(
    send: Send, status: int, error: str, detail: str, *, close: bool = False
) -> None:
    body = json_body(error, detail)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


#: Seconds an early answer goes on reading (and dropping) the rest of the request body.
DISCARD_TIMEOUT = 5.0


async def discard_request_body(receive: Receive) -> None:
    """Read and drop what is left of the request body.

    hypercorn queues body chunks for the application and blocks once its queue is full; an
    application that answers early and stops reading would leave the connection stuck forever.
    Bounded by :data:`DISCARD_TIMEOUT`.
    """
    with trio.move_on_after(DISCARD_TIMEOUT):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return


async def send_draining(send: Send, receive: Receive, *messages: dict[str, Any]) -> None:
    """Send the end of a response while reading and dropping what is left of the request.

    Completing a response makes hypercorn queue ``http.disconnect`` for the application; if
    unread body chunks have filled its queue, that put (and so our send) would block forever
    unless something reads at the same time.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(discard_request_body, receive)
        for message in messages:
            await send(message)


async def refuse(
    send: Send, receive: Receive, status: int, error: str, detail: str, *, close: bool = False
) -> None:
    """Answer a request without tunneling it: a JSON error while the body is read and dropped."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(discard_request_body, receive)
        await send_json(send, status, error, detail, close=close)


async def refuse_too_large(send: Send, receive: Receive, limit: int) -> None:
    """413 for a body over ``limit``; the connection closes rather than read the rest."""
    detail = f"Request bodies are limited to {limit} bytes."
    await refuse(send, receive, 413, "body_too_large", detail, close=True)


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
    out.append((b"x-forwarded-for", address.encode("latin-1")))
    out.append((b"x-forwarded-proto", b"https" if secure else b"http"))
    if host:
        out.append((b"x-forwarded-host", host))
    return out


async def open_tunnel_stream(link: DaemonLink, kind: str) -> MuxStream | None:
    try:
        return await link.session.open_stream({"kind": kind, "from": "browser"})
    except SessionClosed:
        return None


# ---------------------------------------------------------------------- HTTP


async def tunnel_http(
    relay: Relay,
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    link: DaemonLink,
    target: bytes,
) -> None:
    """Carry one HTTP request to ``link``'s daemon and its response back."""
    method: str = scope["method"]
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    limit = relay.settings.max_body_size
    declared = next((v for k, v in headers if k.lower() == b"content-length"), None)
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            await refuse(send, receive, 400, "bad_request", "Content-Length is not a number.")
            return
        if declared_size > limit:
            await refuse_too_large(send, receive, limit)
            return
    stream = await open_tunnel_stream(link, "http")
    if stream is None:
        await refuse(
            send, receive, 503, "daemon_offline", "The daemon's link just closed; try again."
        )
        return
    relay.metrics.streams_total.labels("http").inc()
    relay.metrics.streams_open.inc()
    try:
        await _exchange(relay, scope, receive, send, stream, method, target, declared is not None)
    finally:
        relay.metrics.streams_open.dec()
        await trio.aclose_forcefully(stream)


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


async def _exchange(
    relay: Relay,
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    stream: MuxStream,
    method: str,
    target: bytes,
    has_length: bool,
) -> None:
    conn = h11.Connection(h11.CLIENT)
    out_headers = forwarded_headers(relay, scope)
    out_headers.insert(0, (b"host", b"repowire-daemon"))
    out_headers.append((b"connection", b"close"))
    if method not in ("GET", "HEAD", "OPTIONS", "DELETE") and not has_length:
        out_headers.append((b"transfer-encoding", b"chunked"))
    request = h11.Request(method=method, target=target, headers=out_headers)
    response_started = False
    browser_gone = False
    request_read = False  # the whole request body has been read from hypercorn
    metrics = relay.metrics
    limit = relay.settings.max_body_size
    body_timeout = relay.settings.body_timeout

    async def upload(cancel: trio.CancelScope) -> None:
        nonlocal browser_gone, request_read
        await stream.send_all(conn.send(request) or b"")
        message: dict[str, Any] | None
        sent = 0
        more = True
        while more:
            message = None
            with trio.move_on_after(body_timeout):
                message = await receive()
            if message is None:
                raise _BodyTimeout
            if message["type"] == "http.disconnect":
                browser_gone = True
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
        request_read = True
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        # The request is complete; wait for the browser to go away (hypercorn reports it here)
        # so a closed tab cancels the daemon's work at once.
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                browser_gone = True
                cancel.cancel()
                return

    async def download() -> None:
        nonlocal response_started
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(READ_SIZE)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                dropped = DROPPED_RESPONSE_HEADERS | connection_tokens(list(event.headers))
                response_headers = [(k, v) for k, v in event.headers if k not in dropped]
                await send(
                    {
                        "type": "http.response.start",
                        "status": event.status_code,
                        "headers": response_headers,
                    }
                )
                response_started = True
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

    failure: str | None = None
    too_large = timed_out = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload, nursery.cancel_scope)
            await download()
            nursery.cancel_scope.cancel()
    except* _BodyTooLarge:
        too_large = True
    except* _BodyTimeout:
        timed_out = True
    except* (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as group:
        failure = str(group.exceptions[0])
    if too_large:
        stream.reset(ErrorCode.CANCEL)
        if response_started:
            raise _Aborted("request body over the limit")
        await refuse_too_large(send, receive, limit)
        return
    if timed_out:
        stream.reset(ErrorCode.CANCEL)
        if response_started:
            raise _Aborted("request body stalled")
        detail = f"No part of the request body arrived for {body_timeout:g} s."
        await refuse(send, receive, 408, "body_timeout", detail, close=True)
        return
    if browser_gone:
        stream.reset(ErrorCode.CANCEL)
        return
    if failure is None:
        end = {"type": "http.response.body", "body": b"", "more_body": False}
        if request_read:
            await send(end)  # nothing left to drain: spare the draining task
        else:
            await send_draining(send, receive, end)
        return
    log.info("tunnel %s request failed: %s", method, failure)
    stream.reset(ErrorCode.UPSTREAM_FAILED)
    if response_started:
        # Headers are out: the only honest signal left is an aborted response.
        raise _Aborted(failure)
    await refuse(
        send, receive, 502, "daemon_failed", "The daemon failed before answering this request."
    )


class _Aborted(Exception):
    """Raised into hypercorn to abort a response that cannot complete."""


# ---------------------------------------------------------------------- WebSocket


async def deny_websocket(
    send: Send, scope: dict[str, Any], status: int, error: str, detail: str
) -> None:
    """Refuse a WebSocket upgrade with an HTTP status and JSON body (or a bare 403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = json_body(error, detail)
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
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
    link: DaemonLink,
    target: bytes,
) -> None:
    """Bridge a browser WebSocket to the daemon over one stream."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    stream = await open_tunnel_stream(link, "http")
    if stream is None:
        await deny_websocket(send, scope, 503, "daemon_offline", "The daemon is offline.")
        return
    relay.metrics.streams_total.labels("websocket").inc()
    relay.metrics.streams_open.inc()
    try:
        await _bridge(relay, scope, receive, send, stream, target)
    finally:
        relay.metrics.streams_open.dec()
        await trio.aclose_forcefully(stream)


async def _bridge(
    relay: Relay,
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    stream: MuxStream,
    target: bytes,
) -> None:
    conn = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    subprotocols: list[str] = list(scope.get("subprotocols") or [])
    extra = [
        (k, v)
        for k, v in forwarded_headers(relay, scope)
        if k.lower() not in (b"origin", b"sec-websocket-protocol")
    ]
    try:
        await stream.send_all(
            conn.send(
                ws.Request(
                    host="repowire-daemon",
                    target=target.decode("latin-1"),
                    subprotocols=subprotocols,
                    extra_headers=extra,
                )
            )
        )
        # Read the daemon's answer to the upgrade.
        accepted: ws.AcceptConnection | None = None
        rejection: ws.RejectConnection | None = None
        rejection_body = b""
        while accepted is None:
            data = await stream.receive_some(READ_SIZE)
            if not data:
                raise trio.BrokenResourceError("daemon closed the stream during the upgrade")
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, ws.AcceptConnection):
                    accepted = event
                elif isinstance(event, ws.RejectConnection):
                    rejection = event
                elif isinstance(event, ws.RejectData):
                    rejection_body += event.data
                    if event.body_finished:
                        assert rejection is not None
                        await deny_websocket(
                            send,
                            scope,
                            rejection.status_code,
                            "upgrade_refused",
                            rejection_body.decode("utf-8", "replace")[:200],
                        )
                        return
            if rejection is not None and not rejection.has_body:
                await deny_websocket(
                    send, scope, rejection.status_code, "upgrade_refused", "The daemon refused."
                )
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
        await deny_websocket(send, scope, 502, "daemon_failed", "The daemon failed the upgrade.")
        return

    await send({"type": "websocket.accept", "subprotocol": accepted.subprotocol})
    closed_by_browser = False

    async def browser_to_daemon(cancel: trio.CancelScope) -> None:
        nonlocal closed_by_browser
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                payload: ws.Event
                if text is not None:
                    payload = ws.TextMessage(data=text)
                else:
                    payload = ws.BytesMessage(data=message.get("bytes") or b"")
                data = conn.send(payload)
                relay.metrics.bytes_to_daemon.inc(len(data))
                await stream.send_all(data)
            elif kind == "websocket.disconnect":
                closed_by_browser = True
                code = int(message.get("code", 1000))
                if code in (1005, 1006):
                    code = 1000
                if conn.state is ConnectionState.OPEN:
                    await stream.send_all(conn.send(ws.CloseConnection(code=code)))
                # The daemon's answer to the close ends daemon_to_browser; do not wait forever.
                await trio.sleep(2)
                cancel.cancel()
                return

    async def daemon_to_browser(cancel: trio.CancelScope) -> None:
        text_parts: list[str] = []
        byte_parts: list[bytes] = []
        while True:
            data = await stream.receive_some(READ_SIZE)
            if not data:
                if not closed_by_browser:
                    await send(
                        {"type": "websocket.close", "code": 1011, "reason": "daemon went away"}
                    )
                cancel.cancel()
                return
            relay.metrics.bytes_from_daemon.inc(len(data))
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, ws.TextMessage):
                    text_parts.append(event.data)
                    if event.message_finished:
                        await send({"type": "websocket.send", "text": "".join(text_parts)})
                        text_parts.clear()
                elif isinstance(event, ws.BytesMessage):
                    byte_parts.append(bytes(event.data))
                    if event.message_finished:
                        await send({"type": "websocket.send", "bytes": b"".join(byte_parts)})
                        byte_parts.clear()
                elif isinstance(event, ws.Ping):
                    await stream.send_all(conn.send(event.response()))
                elif isinstance(event, ws.CloseConnection):
                    if conn.state is ConnectionState.REMOTE_CLOSING:
                        await stream.send_all(conn.send(event.response()))
                    if not closed_by_browser:
                        await send(
                            {
                                "type": "websocket.close",
                                "code": event.code,
                                "reason": event.reason or "",
                            }
                        )
                    cancel.cancel()
                    return

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(browser_to_daemon, nursery.cancel_scope)
            nursery.start_soon(daemon_to_browser, nursery.cancel_scope)
    except* (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
        if not closed_by_browser:
            await send({"type": "websocket.close", "code": 1011, "reason": "daemon link failed"})
        stream.reset(ErrorCode.UPSTREAM_FAILED)
