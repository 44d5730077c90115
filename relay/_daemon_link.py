"""``/ws/relay``: where daemons connect. Authentication, the link's session, mesh splicing.

In a cluster a registered link is also claimed in presence (``relay._presence``), released
when it ends, and a mesh stream for a daemon whose link another replica holds is forwarded to
that replica (``relay._replica_link``)."""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from typing import NamedTuple

import trio

from common import is_daemon_id
from mux import (
    LINK_MESSAGE_SIZE,
    MAX_MESSAGE_HEADER,
    MAX_STREAM_WINDOW,
    MuxConfig,
    MuxSession,
    MuxStream,
    SessionClosed,
    link_protocol_config,
    splice,
)
from protocol import PROTOCOL_VERSION, CloseCode, ErrorCode, Role

from ._asgi_transport import AsgiWebSocketTransport, Receive, Send
from ._context import Relay, header
from ._links import DaemonLink
from ._quota import QuotaExceeded, ScopeBudget
from ._store import KeyRecord, StoreError

log = logging.getLogger("repowire.relay")

#: WebSocket close code 1013, "try again later" (RFC 6455 registry): the relay is working on
#: ``link_handshake_limit`` links already. The connector backs off (``RELAY_BUSY``).
TRY_AGAIN_LATER = CloseCode.TRY_AGAIN_LATER
#: The close reason sent with :data:`TRY_AGAIN_LATER`.
BUSY_REASON = "relay busy: too many daemons connecting at once; try again later"
#: The close reason sent with :data:`TRY_AGAIN_LATER` when the key store cannot be reached to
#: check the key: the connector backs off and comes back, as for a busy relay.
STORE_UNAVAILABLE_REASON = "relay's key store unavailable: cannot check the key; try again later"


#: The close reason sent with :data:`TRY_AGAIN_LATER` when the link cannot be announced to the
#: other replicas of a cluster (presence, in Redis, cannot be written).
PRESENCE_UNAVAILABLE_REASON = "relay cannot announce the link to its cluster; try again later"
#: Seconds the release of a link's presence entry may take when the link ends (shielded: it
#: runs during shutdown too). Past it the entry expires by itself within the presence ttl.
PRESENCE_RELEASE_TIMEOUT = 2.0

#: Daemons seen before but offline now that a ``directory`` answer lists at most.
DIRECTORY_MAX_OFFLINE = 256
#: The close reason sent with :data:`CloseCode.TOO_MANY_LINKS` (the limit is appended).
TOO_MANY_LINKS_REASON = "this key's scope holds its quota of daemon links"


async def handle_daemon_link(
    relay: Relay, scope: dict[str, object], receive: Receive, send: Send
) -> None:
    """Serve one daemon link from the WebSocket handshake to its end.

    Everything the handshake's headers decide is checked before the WebSocket is accepted:
    shutting down (4503), the protocol version (4426), the key (4401; when the key store cannot
    be reached to check it, :data:`TRY_AGAIN_LATER`, 1013), the daemon id (4400), the scope's
    quota of links (4429, see :func:`_take_link_slot`) and the relay's handshake limit
    (:data:`TRY_AGAIN_LATER`, 1013). Until the accept hypercorn reads nothing of the
    WebSocket (data sent early fails the upgrade), so a stranger gets nothing buffered or
    parsed. A refused link is then accepted and closed at once with its code, so that the
    connector can act on it (see ``protocol.CloseCode``), and the handler returns, which makes
    hypercorn close the connection: what the peer sends after the close is not read. The
    handshake slot is given back as soon as the protocol HELLOs are exchanged; the link slot
    when the link ends.
    """
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    admitted = await _admit(relay, scope, send)
    if admitted is None:
        return
    record, daemon_id, daemon_version, address, holds_slot, now = admitted
    scope_id = record.scope_id
    handshakes = relay.link_handshakes
    if not handshakes.try_enter(scope_id):
        if holds_slot:
            relay.scope_links.give_back(scope_id)
        # No log line per refusal: in a herd there are thousands; the metric counts them.
        relay.metrics.rate_limited.labels("link_handshake").inc()
        await _refuse(send, TRY_AGAIN_LATER, BUSY_REASON)
        return
    # From here every path ends in the finally below, which gives both slots back.
    try:
        await send(
            {
                "type": "websocket.accept",
                "headers": [
                    (b"repowire-protocol", str(PROTOCOL_VERSION).encode()),
                    # The connector writes messages up to this (mux.peer_message_limit).
                    (MAX_MESSAGE_HEADER, str(relay.settings.max_websocket_message_size).encode()),
                ],
            }
        )
    except BaseException:
        handshakes.leave(scope_id)
        if holds_slot:
            relay.scope_links.give_back(scope_id)
        raise
    transport = AsgiWebSocketTransport(receive, send)
    link = DaemonLink(
        daemon_id=daemon_id,
        scope_id=scope_id,
        key_id=record.key_id,
        session=_link_session(relay, transport, scope_id),
        connected_at=now,
        version=daemon_version,
        remote_address=address,
        holds_link_slot=holds_slot,
    )
    in_handshake = True
    # Requests for this daemon that arrive now wait for the link rather than get a 503: its
    # connector may already report "connected" (it has the relay's HELLO) while the relay is
    # still reading the connector's.
    relay.links.expect(scope_id, daemon_id)
    # A key revoked or rotated from here on ends this link too (Relay.end_key_access).
    relay.links.begin_handshake(link)
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
        relay.links.end_handshake(link)
        if in_handshake:
            handshakes.leave(scope_id)
        if not link.registered:
            relay.links.settle(scope_id, daemon_id)
        if link.holds_link_slot:
            link.holds_link_slot = False
            relay.scope_links.give_back(scope_id)
        link.finished.set()


class _Admission(NamedTuple):
    """What the handshake's headers established for a link about to be accepted."""

    record: KeyRecord
    daemon_id: str
    daemon_version: str
    address: str
    holds_slot: bool
    now: float


async def _admit(relay: Relay, scope: dict[str, object], send: Send) -> _Admission | None:
    """Check everything the handshake's headers decide (see :func:`handle_daemon_link`), in
    that order; a refused link is answered here and ``None`` returned. An admitted link holds
    its scope's link slot when ``holds_slot`` (the caller gives it back)."""
    headers = scope["headers"]
    assert isinstance(headers, list)
    client = scope.get("client")
    address = relay.client_address(client if isinstance(client, tuple) else None, headers)

    if relay.is_shutting_down():
        await _refuse(send, CloseCode.SHUTTING_DOWN, "relay shutting down")
        return None
    version = (header(headers, b"repowire-protocol") or b"").decode("latin-1").strip()
    if version != str(PROTOCOL_VERSION):
        await _refuse(
            send,
            CloseCode.INCOMPATIBLE_VERSION,
            f"relay speaks protocol {PROTOCOL_VERSION}, daemon sent {version[:16] or 'none'}",
        )
        return None
    now = relay.clock()
    record = await _verify_key(relay, headers, address, now, send)
    if record is None:
        return None
    daemon_id = (header(headers, b"repowire-daemon-id") or b"").decode("latin-1").strip()
    if not is_daemon_id(daemon_id):
        await _refuse(send, CloseCode.PROTOCOL_ERROR, "missing or malformed daemon id")
        return None
    daemon_version = (header(headers, b"repowire-version") or b"").decode("latin-1")[:32]
    holds_slot = _take_link_slot(relay, record.scope_id, daemon_id)
    if holds_slot is None:
        relay.metrics.links_refused.labels("links_per_scope").inc()
        await _refuse(
            send,
            CloseCode.TOO_MANY_LINKS,
            f"{TOO_MANY_LINKS_REASON} ({relay.scope_links.limit}); stop another daemon using it",
        )
        return None
    return _Admission(record, daemon_id, daemon_version, address, holds_slot, now)


async def _verify_key(
    relay: Relay, headers: list[tuple[bytes, bytes]], address: str, now: float, send: Send
) -> KeyRecord | None:
    """The key record of the link's ``Authorization: Bearer`` key; ``None`` once the link has
    been refused (a wrong key: 4401, counted against the address's limit; the key store out of
    reach: try again later)."""
    authorization = (header(headers, b"authorization") or b"").decode("latin-1")
    scheme, _, key = authorization.partition(" ")
    try:
        record = (
            await relay.store.verify_key(key.strip(), now=now)
            if scheme.lower() == "bearer"
            else None
        )
        # Only wrong keys meet the limiter: a right key always links, whatever others sharing
        # the address have tried.
        limited = record is None and await relay.auth_limiter.take(address, now) > 0
    except StoreError as exc:
        relay.store_failed(exc)
        await _refuse(send, TRY_AGAIN_LATER, STORE_UNAVAILABLE_REASON)
        return None
    if record is None:
        relay.metrics.auth_failures.labels("link").inc()
        log.info("daemon link refused from %s: invalid key", address)
        if limited:
            relay.metrics.rate_limited.labels("link").inc()
            await _refuse(send, CloseCode.INVALID_KEY, "invalid API key; too many attempts")
            return None
        await _refuse(send, CloseCode.INVALID_KEY, "invalid API key")
        return None
    return record


def _take_link_slot(relay: Relay, scope_id: str, daemon_id: str) -> bool | None:
    """Take one of the scope's ``max_links_per_scope`` link slots for a new link of
    ``daemon_id``: True if taken; False if none is free but the link will replace one of the
    same daemon id (registered or in its handshake), which then hands its slot over (see
    :func:`_serve_link`); None if the link is refused for the quota."""
    if relay.scope_links.try_take(scope_id):
        return True
    links = relay.links
    if links.get(scope_id, daemon_id) is not None or links.is_arriving(scope_id, daemon_id):
        return False
    return None


async def _refuse(send: Send, code: int, reason: str) -> None:
    """Accept the WebSocket and close it at once with ``code`` (what a connector acts on).

    Called before anything of the peer's WebSocket was read; returning from the handler right
    after makes hypercorn close the connection, so nothing the peer sends is read either.
    """
    await send(
        {
            "type": "websocket.accept",
            "headers": [(b"repowire-protocol", str(PROTOCOL_VERSION).encode())],
        }
    )
    await send({"type": "websocket.close", "code": int(code), "reason": reason})


def _link_session(relay: Relay, transport: AsgiWebSocketTransport, scope_id: str) -> MuxSession:
    """The link's session: the bulk-link settings (``mux.link_protocol_config``), its streams'
    window growth charged to the scope (``max_scope_window_growth``; none when that is 0)."""
    settings = relay.settings
    grows = settings.max_scope_window_growth > 0
    return MuxSession(
        transport,
        Role.RELAY,
        MuxConfig(
            protocol=link_protocol_config(settings.max_streams_per_link),
            max_stream_window=MAX_STREAM_WINDOW if grows else None,
            max_message_size=LINK_MESSAGE_SIZE,
            keepalive_interval=settings.link_ping_interval,
            keepalive_timeout=settings.link_ping_timeout,
        ),
        window_budget=ScopeBudget(relay.scope_growth, scope_id),
    )


async def _serve_link(relay: Relay, link: DaemonLink) -> None:
    """A link whose HELLOs are exchanged: register it, serve its mesh streams, forget it."""
    session = link.session
    if relay.is_shutting_down():
        # The relay began shutting down during the handshake: this link missed the go-away
        # sent to the others, so tell it now.
        await session.aclose(CloseCode.SHUTTING_DOWN, "relay shutting down")
        return
    if not await _key_still_live(relay, link):
        # Revoked or rotated since the link's headers were checked (the HELLOs take a while):
        # the revocation watcher may have looked already, and would never look at it again.
        relay.metrics.access_revoked.labels("link").inc()
        log.info("daemon %s refused: its key was revoked during the handshake", link.daemon_id)
        await session.aclose(CloseCode.KEY_REVOKED, "key revoked")
        return
    if not link.holds_link_slot:
        # Admitted past a full quota to replace a link of the same daemon id: take over that
        # link's slot, or (the other one's handshake failed meanwhile) a free one.
        previous = relay.links.get(link.scope_id, link.daemon_id)
        if previous is not None and previous.holds_link_slot:
            previous.holds_link_slot = False
            link.holds_link_slot = True
        elif relay.scope_links.try_take(link.scope_id):
            link.holds_link_slot = True
        else:
            relay.metrics.links_refused.labels("links_per_scope").inc()
            await session.aclose(
                CloseCode.TOO_MANY_LINKS,
                f"{TOO_MANY_LINKS_REASON} ({relay.scope_links.limit}); stop another daemon",
            )
            return
    # No await from the check to here: a revocation after it finds the link registered.
    replaced = relay.links.add(link)
    link.registered = True
    relay.links.end_handshake(link)
    relay.links.settle(link.scope_id, link.daemon_id)
    relay.metrics.daemons_connected.set(len(relay.links))
    log.info("daemon %s connected from %s", link.daemon_id, link.remote_address)
    if replaced is not None:
        await replaced.session.aclose(CloseCode.REPLACED, "replaced by a newer connection")
    try:
        if relay.presence is not None and not await _claim_presence(relay, link):
            return
        async with trio.open_nursery() as nursery:
            # Beside the mesh streams: a slow store must not hold them up.
            nursery.start_soon(_record_daemon, relay, link)
            await _serve_mesh(relay, link)
    finally:
        relay.links.remove(link)
        relay.metrics.daemons_connected.set(len(relay.links))
        if link.epoch is not None:
            await _release_presence(relay, link)
        if session.close_reason and "protocol error" in session.close_reason:
            relay.metrics.rejected_frames.inc()
        if session.peer_goaway is not None and not relay.is_shutting_down():
            # A daemon stopping says goodbye with a GOAWAY, then closes 1001; hypercorn reports
            # any close the peer starts as 1006, so the GOAWAY is what tells a clean leave.
            log.info("daemon %s left (it is going away)", link.daemon_id)
        else:
            log.info("daemon %s disconnected: %s", link.daemon_id, session.close_reason)


async def _claim_presence(relay: Relay, link: DaemonLink) -> bool:
    """Announce the registered ``link`` to the cluster (a presence claim, which gives it its
    epoch and tells a replica holding an older link of the daemon to close it). False when
    the link is not to be served: presence cannot be written (the link is closed with
    :data:`TRY_AGAIN_LATER`, and its daemon comes back later), or another replica claimed the
    daemon while this claim was under way, with a newer epoch (closed with 4409)."""
    presence = relay.presence
    advertise_url = relay.settings.advertise_url
    assert presence is not None and advertise_url is not None
    try:
        epoch = await presence.claim(
            link.scope_id,
            link.daemon_id,
            relay.settings.replica_id,
            advertise_url,
            connected_at=link.connected_at,
        )
    except StoreError as exc:
        relay.store_failed(exc)
        log.warning("daemon %s: link refused, presence not claimed: %s", link.daemon_id, str(exc))
        # Out of the registry before the close, so that no request picks it meanwhile.
        relay.links.remove(link)
        await link.session.aclose(TRY_AGAIN_LATER, PRESENCE_UNAVAILABLE_REASON)
        return False
    link.epoch = epoch
    if link.rival_epoch > epoch:
        await link.session.aclose(
            CloseCode.REPLACED, "replaced by a newer connection on another replica"
        )
        return False
    return True


async def _release_presence(relay: Relay, link: DaemonLink) -> None:
    """Withdraw ``link``'s presence entry (if it still carries the link's epoch), within
    :data:`PRESENCE_RELEASE_TIMEOUT`, even while the relay is being cancelled. A failure is
    left to the entry's expiry."""
    presence = relay.presence
    if presence is None or link.epoch is None:
        return
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + PRESENCE_RELEASE_TIMEOUT
        try:
            await presence.release(link.scope_id, link.daemon_id, link.epoch)
        except StoreError as exc:
            log.info("daemon %s: presence not released (it expires): %s", link.daemon_id, str(exc))


async def _key_still_live(relay: Relay, link: DaemonLink) -> bool:
    """Whether the key ``link`` was opened with is still live. A key store that cannot be read
    counts as live: the key was verified moments ago, and the store's change feed catches up
    on revocations once it is back."""
    try:
        return await relay.store.is_key_live(link.key_id)
    except StoreError as exc:
        relay.store_failed(exc)
        log.warning("daemon %s: cannot recheck its key: %s", link.daemon_id, str(exc))
        return True


async def _record_daemon(relay: Relay, link: DaemonLink) -> None:
    """Note the daemon's connection in the store (its last-seen record). A failure is logged
    and the link works on: the record is bookkeeping."""
    try:
        await relay.store.record_daemon(link.scope_id, link.daemon_id, now=link.connected_at)
    except StoreError as exc:
        relay.store_failed(exc)
        log.warning("daemon %s: not recorded in the key store: %s", link.daemon_id, str(exc))


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
    """A ``directory`` stream: the relay answers with the scope's online daemons (in a
    cluster, those of every replica: :meth:`Relay.online_daemons`) and, under ``offline``,
    the ones it has seen before that are not connected now (the most recently seen first, at
    most :data:`DIRECTORY_MAX_OFFLINE`), as JSON. ``offline`` is left out when the key store
    cannot be read: the online list is still right."""
    online = await relay.online_daemons(source.scope_id)
    listing: dict[str, object] = {
        "daemons": [
            {"daemon_id": daemon.daemon_id, "connected_since": daemon.connected_at}
            for daemon in online
        ]
    }
    try:
        known = await relay.store.known_daemons(source.scope_id)
    except StoreError as exc:
        log.warning("daemon %s: offline daemons not listed: %s", source.daemon_id, str(exc))
    else:
        online_ids = {daemon.daemon_id for daemon in online}
        offline = sorted(
            (entry for entry in known if entry[0] not in online_ids),
            key=lambda entry: (-entry[2], entry[0]),
        )[:DIRECTORY_MAX_OFFLINE]
        listing["offline"] = [
            {"daemon_id": daemon_id, "last_seen": last_seen} for daemon_id, _, last_seen in offline
        ]
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
    if target is None and (relay.cluster is None or not is_daemon_id(target_id)):
        stream.reset(await _missing_target(relay, source.scope_id, target_id))
        return
    # A spliced mesh stream holds up to a window of bytes on each side of the relay: it counts
    # against the scope's stream and byte quotas for as long as it is open.
    with ExitStack() as held:
        try:
            held.enter_context(relay.stream_slot(source.scope_id, "mesh"))
        except QuotaExceeded:
            relay.metrics.streams_refused.labels("mesh").inc()
            stream.reset(ErrorCode.REFUSED_STREAM)
            return
        if target is None:
            await _forward_mesh_stream(relay, source, stream, target_id)
            return
        # The target's link may have all its stream slots taken: wait for one, but not forever.
        outbound: MuxStream | None = None
        with trio.move_on_after(relay.settings.stream_open_timeout):
            try:
                outbound = await target.session.open_stream(
                    {"kind": "mesh", "from": source.daemon_id}
                )
            except SessionClosed:
                stream.reset(ErrorCode.TARGET_OFFLINE)
                return
        if outbound is None:
            relay.metrics.streams_refused.labels("mesh_timeout").inc()
            stream.reset(ErrorCode.REFUSED_STREAM)
            return
        relay.metrics.streams_total.labels("mesh").inc()
        relay.metrics.streams_open.inc()
        reads = relay.read_sizes(source.scope_id, stream)
        try:
            await splice(stream, outbound, chunk=reads)
        finally:
            relay.metrics.streams_open.dec()
            reads.release()


async def _missing_target(relay: Relay, scope_id: str, target_id: str) -> ErrorCode:
    """The reset code for a mesh stream whose target no replica holds: ``TARGET_OFFLINE`` for
    a daemon of the scope seen before, ``UNKNOWN_TARGET`` for any other."""
    try:
        daemons = await relay.store.known_daemons(scope_id)
    except StoreError:
        return ErrorCode.TARGET_OFFLINE  # offline and unknown cannot be told apart now
    known = target_id in {d for d, _, _ in daemons}
    return ErrorCode.TARGET_OFFLINE if known else ErrorCode.UNKNOWN_TARGET


async def _forward_mesh_stream(
    relay: Relay, source: DaemonLink, stream: MuxStream, target_id: str
) -> None:
    """Splice a mesh stream onto a stream to ``target_id`` through the replica holding its
    link; reset it with the reason when there is none (``TARGET_OFFLINE`` or
    ``UNKNOWN_TARGET``, ``REFUSED_STREAM`` when that replica is busy, ``TARGET_OFFLINE``
    when presence cannot be read). The caller holds the stream's quota."""
    from ._replica_link import DaemonOffline, ForwardBusy, splice_forwarded

    cluster = relay.cluster
    assert cluster is not None
    try:
        outbound = await cluster.open_forwarded_stream(
            source.scope_id, target_id, {"kind": "mesh", "from": source.daemon_id}
        )
    except DaemonOffline:
        stream.reset(await _missing_target(relay, source.scope_id, target_id))
        return
    except ForwardBusy:
        relay.metrics.streams_refused.labels("mesh_forward_busy").inc()
        stream.reset(ErrorCode.REFUSED_STREAM)
        return
    except StoreError as exc:
        relay.store_failed(exc)
        stream.reset(ErrorCode.TARGET_OFFLINE)
        return
    relay.metrics.streams_total.labels("mesh").inc()
    relay.metrics.streams_open.inc()
    reads = relay.read_sizes(source.scope_id, stream)
    try:
        await splice_forwarded(stream, outbound, chunk=reads)
    finally:
        relay.metrics.streams_open.dec()
        reads.release()
