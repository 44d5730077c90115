"""``/ws/relay``: where daemons connect. Authentication, the link's session, mesh splicing."""

from __future__ import annotations

import json
import logging
import re

import trio

from mux import MuxConfig, MuxSession, MuxStream, SessionClosed, splice
from protocol import PROTOCOL_VERSION, CloseCode, ErrorCode, Role, SessionConfig

from ._asgi_transport import AsgiWebSocketTransport, Receive, Send
from ._context import Relay, header
from ._links import DaemonLink
from ._store import StoreError

log = logging.getLogger("repowire.relay")

DAEMON_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: WebSocket close code 1013, "try again later" (RFC 6455 registry): the relay is working on
#: ``link_handshake_limit`` links already. The connector backs off (``RELAY_BUSY``).
TRY_AGAIN_LATER = CloseCode.TRY_AGAIN_LATER
#: The close reason sent with :data:`TRY_AGAIN_LATER`.
BUSY_REASON = "relay busy: too many daemons connecting at once; try again later"


async def handle_daemon_link(
    relay: Relay, scope: dict[str, object], receive: Receive, send: Send
) -> None:
    """Serve one daemon link from the WebSocket handshake to its end.

    The WebSocket is accepted first so that every refusal carries a close code the connector
    can act on (see ``protocol.CloseCode``): 4503 while shutting down, 4426, 4401 and 4400 for
    a bad handshake, and :data:`TRY_AGAIN_LATER` (1013) when ``link_handshake_limit`` links
    are already connecting. The checks that cost next to nothing (version, key, daemon id)
    come before that limit, so only well-formed links with a valid key hold a slot, and the
    slot is given back as soon as the protocol HELLOs are exchanged.
    """
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    headers = scope["headers"]
    assert isinstance(headers, list)
    client = scope.get("client")
    address = relay.client_address(client if isinstance(client, tuple) else None, headers)
    await send(
        {
            "type": "websocket.accept",
            "headers": [(b"repowire-protocol", str(PROTOCOL_VERSION).encode())],
        }
    )
    transport = AsgiWebSocketTransport(receive, send)

    if relay.is_shutting_down():
        await transport.aclose(CloseCode.SHUTTING_DOWN, "relay shutting down")
        return
    version = (header(headers, b"repowire-protocol") or b"").decode("latin-1").strip()
    if version != str(PROTOCOL_VERSION):
        await transport.aclose(
            CloseCode.INCOMPATIBLE_VERSION,
            f"relay speaks protocol {PROTOCOL_VERSION}, daemon sent {version[:16] or 'none'}",
        )
        return
    now = relay.clock()
    authorization = (header(headers, b"authorization") or b"").decode("latin-1")
    scheme, _, key = authorization.partition(" ")
    record = relay.store.verify_key(key.strip(), now=now) if scheme.lower() == "bearer" else None
    if record is None:
        # Only wrong keys meet the limiter: a right key always links, whatever others sharing
        # the address have tried.
        relay.metrics.auth_failures.labels("link").inc()
        log.info("daemon link refused from %s: invalid key", address)
        if not relay.auth_limiter.allow(address, now):
            relay.metrics.rate_limited.labels("link").inc()
            await transport.aclose(CloseCode.INVALID_KEY, "invalid API key; too many attempts")
            return
        await transport.aclose(CloseCode.INVALID_KEY, "invalid API key")
        return
    daemon_id = (header(headers, b"repowire-daemon-id") or b"").decode("latin-1").strip()
    if not DAEMON_ID.match(daemon_id):
        await transport.aclose(CloseCode.PROTOCOL_ERROR, "missing or malformed daemon id")
        return
    daemon_version = (header(headers, b"repowire-version") or b"").decode("latin-1")[:32]

    link = DaemonLink(
        daemon_id=daemon_id,
        scope_id=record.scope_id,
        key_id=record.key_id,
        session=_link_session(relay, transport),
        connected_at=now,
        version=daemon_version,
        remote_address=address,
    )
    # Built before a slot is taken: nothing between try_enter() and the try below can raise.
    handshakes = relay.link_handshakes
    scope_id = record.scope_id
    if not handshakes.try_enter(scope_id):
        # No log line per refusal: in a herd there are thousands; the metric counts them.
        relay.metrics.rate_limited.labels("link_handshake").inc()
        await transport.aclose(TRY_AGAIN_LATER, BUSY_REASON)
        return
    in_handshake = True
    # Requests for this daemon that arrive now wait for the link rather than get a 503: its
    # connector may already report "connected" (it has the relay's HELLO) while the relay is
    # still reading the connector's.
    relay.links.expect(scope_id, daemon_id)
    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(link.session.run)
            except SessionClosed as exc:
                log.info("daemon %s: handshake failed: %s", daemon_id, exc.reason)
                return
            in_handshake = False
            handshakes.leave(scope_id)
            await _serve_link(relay, link)
    finally:
        if in_handshake:
            handshakes.leave(scope_id)
        if not link.registered:
            relay.links.settle(scope_id, daemon_id)
        link.finished.set()


def _link_session(relay: Relay, transport: AsgiWebSocketTransport) -> MuxSession:
    settings = relay.settings
    return MuxSession(
        transport,
        Role.RELAY,
        MuxConfig(
            protocol=SessionConfig(max_concurrent_streams=settings.max_streams_per_link),
            keepalive_interval=settings.link_ping_interval,
            keepalive_timeout=settings.link_ping_timeout,
        ),
    )


async def _serve_link(relay: Relay, link: DaemonLink) -> None:
    """A link whose HELLOs are exchanged: register it, serve its mesh streams, forget it."""
    session = link.session
    if relay.is_shutting_down():
        # The relay began shutting down during the handshake: this link missed the go-away
        # sent to the others, so tell it now.
        await session.aclose(CloseCode.SHUTTING_DOWN, "relay shutting down")
        return
    replaced = relay.links.add(link)
    link.registered = True
    relay.links.settle(link.scope_id, link.daemon_id)
    try:
        relay.store.record_daemon(link.scope_id, link.daemon_id, now=link.connected_at)
    except StoreError as exc:
        # A last-seen record is bookkeeping: the link works without it.
        log.warning("daemon %s: not recorded in the key store: %s", link.daemon_id, exc)
    relay.metrics.daemons_connected.set(len(relay.links))
    log.info("daemon %s connected from %s", link.daemon_id, link.remote_address)
    if replaced is not None:
        await replaced.session.aclose(CloseCode.REPLACED, "replaced by a newer connection")
    try:
        await _serve_mesh(relay, link)
    finally:
        relay.links.remove(link)
        relay.metrics.daemons_connected.set(len(relay.links))
        if session.close_reason and "protocol error" in session.close_reason:
            relay.metrics.rejected_frames.inc()
        log.info("daemon %s disconnected: %s", link.daemon_id, session.close_reason)


async def _serve_mesh(relay: Relay, link: DaemonLink) -> None:
    """Accept the streams the daemon opens (mesh streams) until the session ends."""
    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await link.session.accept_stream()
            except SessionClosed:
                return
            nursery.start_soon(_route_mesh_stream, relay, link, stream)


async def _answer_directory(relay: Relay, source: DaemonLink, stream: MuxStream) -> None:
    """A ``directory`` stream: the relay answers with the scope's online daemons, as JSON."""
    listing = {
        "daemons": [
            {"daemon_id": link.daemon_id, "connected_since": link.connected_at}
            for link in relay.links.for_scope(source.scope_id)
        ]
    }
    try:
        await stream.send_all(json.dumps(listing).encode())
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _route_mesh_stream(relay: Relay, source: DaemonLink, stream: MuxStream) -> None:
    kind = stream.metadata.get("kind")
    if kind == "directory":
        await _answer_directory(relay, source, stream)
        return
    if kind != "mesh":
        stream.reset(ErrorCode.FORBIDDEN)
        return
    target_id = stream.metadata.get("target", "")
    target = relay.links.get(source.scope_id, target_id)
    if target is None:
        known = {d for d, _, _ in relay.store.known_daemons(source.scope_id)}
        stream.reset(ErrorCode.TARGET_OFFLINE if target_id in known else ErrorCode.UNKNOWN_TARGET)
        return
    try:
        outbound = await target.session.open_stream({"kind": "mesh", "from": source.daemon_id})
    except SessionClosed:
        stream.reset(ErrorCode.TARGET_OFFLINE)
        return
    relay.metrics.streams_total.labels("mesh").inc()
    relay.metrics.streams_open.inc()
    try:
        await splice(stream, outbound)
    finally:
        relay.metrics.streams_open.dec()
