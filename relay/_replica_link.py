"""The replica mesh: a request for a daemon whose link another relay replica holds is forwarded
to that replica over one hop.

Each replica (a :class:`ClusterNode`) dials every peer it needs at ``<advertise_url>/ws/replica``
and keeps that link: one WebSocket carrying one multiplexed session of the project's own
protocol (``protocol/SPEC.md``), dialed lazily, reused by every forwarded request, dialed again
once it ends. A forwarded request is one stream of that session, and the peer splices it onto a
stream of its daemon link, so flow control runs end to end: a browser that stops reading on one
replica stops the daemon on the other, and neither replica buffers more than the stream windows.

The link is authenticated with the cluster secret, never with a user's key::

    Authorization: Replica <replica_id>.<unix time>.<hex HMAC-SHA256(secret,
                   "repowire-replica\\n<replica_id>\\n<unix time>")>

checked in constant time before the WebSocket is accepted (:func:`handle_replica_link`):
anything else, a ``Bearer rw_...`` key included, gets 401, as does a time more than
``auth_max_skew`` seconds away from the accepting replica's clock.

A forwarded stream opens with the metadata ``kind=forward``, ``scope``, ``daemon``, ``epoch``
(of the presence entry the dialer acted on: a diagnostic) and the original stream's metadata,
each key under ``inner.``. The accepting replica asks its ``local_stream_opener`` for a stream
to the daemon, answers with one byte, :data:`ACCEPTED`, and splices the two (a reset at either
end travels on as a reset, with its code); or it resets the stream: ``TARGET_OFFLINE`` (it does
not hold that daemon's link), ``REFUSED_STREAM`` (the scope's quota, or no stream to the daemon
within ``open_timeout``), ``FORBIDDEN`` (not a forward), ``SHUTTING_DOWN`` (it is draining).
The dialing side waits for that answer, so :meth:`ClusterNode.open_forwarded_stream` returns a
stream that reaches the daemon, or raises :class:`DaemonOffline` or :class:`ForwardBusy`,
within bounded time: never a hang.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager, ExitStack, suppress
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from mux import (
    LINK_MESSAGE_FLOOR,
    LINK_MESSAGE_SIZE,
    MAX_MESSAGE_HEADER,
    MAX_STREAM_WINDOW,
    SPLICE_CHUNK,
    ChunkSize,
    GrowingChunks,
    MuxConfig,
    MuxSession,
    MuxStream,
    SessionClosed,
    StreamResetError,
    WebSocketTransport,
    WindowBudget,
    link_protocol_config,
    peer_message_limit,
    splice,
)
from protocol import PROTOCOL_VERSION, ErrorCode, Role, StreamState

from ._asgi_transport import AsgiWebSocketTransport, Receive, Send
from ._presence import Presence, PresenceEntry
from ._quota import QuotaExceeded, ScopeCounter

log = logging.getLogger("repowire.relay.cluster")

#: Where a replica accepts its peers' links.
REPLICA_PATH: Final = "/ws/replica"
#: The ``Authorization`` scheme of a replica link.
AUTH_SCHEME: Final = "Replica"
#: What the HMAC covers before the replica id and the time: the secret signs nothing else.
AUTH_CONTEXT: Final = "repowire-replica"
#: Shortest cluster secret accepted, in bytes.
MIN_SECRET_BYTES: Final = 32
#: Longest ``Authorization`` value read.
MAX_AUTHORIZATION_LENGTH: Final = 256
#: The byte the accepting replica sends first on a forwarded stream it has connected to its
#: daemon; what follows is the daemon's.
ACCEPTED: Final = b"\x01"
#: The ``kind`` of a forwarded stream.
FORWARD_KIND: Final = "forward"
#: Prefix of the original stream's metadata keys on a forwarded stream.
INNER_PREFIX: Final = "inner."
#: Seconds the dialing side allows beyond ``open_timeout`` for the peer's answer to travel.
ANSWER_MARGIN: Final = 1.0
#: Largest WebSocket message accepted on a link the replica dialed (the peer writes at most
#: ``MuxConfig.max_message_size``, 256 KiB).
LINK_MAX_MESSAGE: Final = 4 * 1024 * 1024
#: WebSocket messages trio-websocket queues before its reader waits for the session's.
LINK_MESSAGE_QUEUE: Final = 4
#: Bytes trio-websocket reads at a time.
LINK_RECEIVE_BUFFER: Final = 256 * 1024

_REPLICA_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SCOPE_ID = _REPLICA_ID
_DAEMON_ID = _REPLICA_ID
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_MAC = re.compile(r"[0-9a-f]{64}")


@attrs.frozen(kw_only=True)
class ClusterSettings:
    """Limits and deadlines of the replica mesh."""

    #: Seconds to connect to a peer, TLS and WebSocket and protocol handshakes included. A
    #: request for a daemon on an unreachable peer fails within this.
    dial_timeout: float = 3.0
    #: After a failed dial, seconds during which requests for that peer fail at once rather
    #: than each waiting for a dial of its own.
    redial_delay: float = 1.0
    #: Seconds the accepting replica waits for a stream to its daemon (every stream slot of
    #: the daemon's link may be taken) before it refuses the forward; the dialing side waits
    #: this plus :data:`ANSWER_MARGIN` for the answer.
    open_timeout: float = 5.0
    #: Forwarded streams one peer link carries at once (announced as the session's
    #: ``MAX_CONCURRENT_STREAMS``): past it a forward waits for a slot, up to its deadline.
    max_streams_per_peer_link: int = 4096
    #: Forwarded streams of one scope a replica accepts at once, when the relay gives no quota
    #: of its own (``scope_slot``). Past it a forward is refused (:class:`ForwardBusy`).
    max_forwarded_streams_per_scope: int = 512
    #: Keepalive of replica links: seconds of silence before a ping, and its timeout. Short:
    #: a dead peer is found before many requests have been sent its way.
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 5.0
    #: Largest difference, in seconds, between a link's signed time and the accepting clock.
    auth_max_skew: float = 60.0
    #: Largest WebSocket message this replica reads on a link a peer dialed (the relay's
    #: ``max_websocket_message_size``); named to the peer in the handshake, which writes no
    #: larger ones.
    max_message_size: int = LINK_MESSAGE_FLOOR

    def __attrs_post_init__(self) -> None:
        for name in (
            "dial_timeout",
            "redial_delay",
            "open_timeout",
            "keepalive_interval",
            "keepalive_timeout",
            "auth_max_skew",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        for name in (
            "max_streams_per_peer_link",
            "max_forwarded_streams_per_scope",
            "max_message_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")


@attrs.define(kw_only=True)
class ClusterStats:
    """Counters of one node, for metrics and tests."""

    #: Links to peers dialed, and dials that failed.
    dials: int = 0
    dial_failures: int = 0
    #: Streams this node forwarded to peers, and streams peers forwarded to it (accepted and
    #: connected to a daemon).
    forwarded_out: int = 0
    forwarded_in: int = 0
    #: Forwarded streams from peers open now.
    open_in: int = 0


@attrs.frozen(kw_only=True)
class LinkCounts:
    """Replica links of one node up now: those it dialed and those its peers dialed, and the
    streams open on each kind (forwards it sent, forwards it serves)."""

    dialed: int
    accepted: int
    streams_out: int
    streams_in: int


class ForwardError(Exception):
    """A stream cannot be forwarded. ``detail`` is one sentence for the log and the answer
    (no secret: ids and replica names only)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class DaemonOffline(ForwardError):
    """No replica reachable now holds the daemon's link: no presence entry, the replica named
    cannot be reached, or it no longer holds the link. The tunnel answers 503
    ``daemon_offline``."""


class _LinkLost(DaemonOffline):
    """The link to the peer ended before it answered a forward: nothing reached the daemon
    (the request goes out only after the answer), so a fresh link may be tried."""


class ForwardBusy(ForwardError):
    """The replica holding the daemon's link refused the stream for load: the scope's quota
    there, the peer link's stream limit, or no stream to the daemon in time. The tunnel answers
    503 ``daemon_busy``."""


#: ``(scope_id, daemon_id, metadata)`` -> a stream to that daemon over this replica's own
#: link, or None if this replica holds no link for it. May wait (the caller bounds it).
LocalStreamOpener = Callable[[str, str, Mapping[str, str]], Awaitable[MuxStream | None]]
#: ``scope_id`` -> a context manager holding one of the scope's stream slots for a forwarded
#: stream; raises :class:`~relay._quota.QuotaExceeded` (nothing held) when the scope is full.
ScopeSlot = Callable[[str], AbstractContextManager[object]]


# ---------------------------------------------------------------------- authentication


def _mac(secret: bytes, replica_id: str, timestamp: int) -> str:
    message = f"{AUTH_CONTEXT}\n{replica_id}\n{timestamp}".encode("ascii")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def replica_authorization(replica_id: str, secret: bytes, *, now: float) -> str:
    """The ``Authorization`` value a replica dials its peers with at time ``now`` (epoch
    seconds). ValueError for a malformed replica id."""
    if _REPLICA_ID.fullmatch(replica_id) is None:
        raise ValueError("replica id must be 1 to 64 characters from A-Z a-z 0-9 . _ -")
    timestamp = int(now)
    return f"{AUTH_SCHEME} {replica_id}.{timestamp}.{_mac(secret, replica_id, timestamp)}"


def verify_replica_authorization(
    value: bytes | str | None, secret: bytes, *, now: float, max_skew: float
) -> str | None:
    """The replica id ``value`` (an ``Authorization`` header) proves with ``secret``, or None:
    absent, another scheme (a ``Bearer`` key included), malformed, signed more than
    ``max_skew`` seconds away from ``now``, or a wrong MAC (compared in constant time).
    Never raises, whatever ``value`` is."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) > MAX_AUTHORIZATION_LENGTH:
        return None
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != AUTH_SCHEME.lower():
        return None
    parts = credentials.strip().rsplit(".", 2)
    if len(parts) != 3:
        return None
    replica_id, timestamp_text, mac = parts
    if (
        _REPLICA_ID.fullmatch(replica_id) is None
        or _TIMESTAMP.fullmatch(timestamp_text) is None
        or _HEX_MAC.fullmatch(mac) is None
    ):
        return None
    timestamp = int(timestamp_text)
    if not abs(now - timestamp) <= max_skew:
        return None
    expected = _mac(secret, replica_id, timestamp)
    if not hmac.compare_digest(expected.encode("ascii"), mac.encode("ascii")):
        return None
    return replica_id


# ---------------------------------------------------------------------- the node


class _PeerLink:
    """The link this node dialed to one peer: being dialed, up, or failed/ended."""

    def __init__(self, replica_id: str, url: str) -> None:
        self.replica_id = replica_id
        self.url = url
        #: Set once the dial is over: ``session`` is up, or ``failure`` says why not.
        self.ready = trio.Event()
        self.session: MuxSession | None = None
        self.failure = ""
        #: trio time the dial failed or the link ended.
        self.ended_at: float | None = None

    def usable(self) -> bool:
        session = self.session
        return (
            session is not None
            and not session.ended
            and session.peer_goaway is None
            and not session.protocol.goaway_sent
        )


class ClusterNode:
    """This replica's place in the cluster: its id, the cluster secret, presence, the links
    it dialed to its peers, and the forwarded streams its peers send it.

    Run it with ``await nursery.start(node.run)`` (it owns the dialed links' tasks). Then
    :meth:`open_forwarded_stream` forwards a stream to the replica holding a daemon's link,
    and :func:`handle_replica_link` serves the links peers dial to this replica.

    ``local_stream_opener`` gives a stream to a daemon this replica holds (see
    :data:`LocalStreamOpener`); ``scope_slot`` holds the scope's stream quota for each
    accepted forward (default: at most ``settings.max_forwarded_streams_per_scope`` per
    scope). ``ssl_context`` is used to dial ``https``/``wss`` peers (default: the system's
    trust store). ``clock`` (epoch seconds) signs and checks link credentials. ValueError for a
    malformed replica id, a secret shorter than :data:`MIN_SECRET_BYTES` or a bad URL.
    """

    def __init__(
        self,
        *,
        replica_id: str,
        secret: bytes,
        advertise_url: str,
        presence: Presence,
        local_stream_opener: LocalStreamOpener,
        scope_slot: ScopeSlot | None = None,
        window_budget: WindowBudget | None = None,
        settings: ClusterSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(replica_id, str) or _REPLICA_ID.fullmatch(replica_id) is None:
            raise ValueError("replica id must be 1 to 64 characters from A-Z a-z 0-9 . _ -")
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes")
        link_url(advertise_url)  # ValueError if it cannot be dialed
        self.replica_id = replica_id
        self.advertise_url = advertise_url
        self.presence = presence
        self.settings = settings if settings is not None else ClusterSettings()
        self.stats = ClusterStats()
        self._secret = secret
        self._opener = local_stream_opener
        self._scope_streams = ScopeCounter(
            "forwarded streams", self.settings.max_forwarded_streams_per_scope
        )
        self._scope_slot: ScopeSlot = scope_slot or self._scope_streams.hold
        # Where forwarded streams' window growth is charged (each to its scope); without
        # one, windows on replica links do not grow.
        self._window_budget = window_budget
        self._ssl_context = ssl_context
        self._clock = clock
        self._nursery: trio.Nursery | None = None
        self._peers: dict[str, _PeerLink] = {}
        #: Sessions of the links peers dialed to this node.
        self._accepted: set[MuxSession] = set()
        self._draining = False
        #: Set once :meth:`run` has ended: forwards are answered offline from then on.
        self._stopped = False

    def __repr__(self) -> str:
        # Never the secret.
        return f"<ClusterNode {self.replica_id} {self.advertise_url}>"

    # ------------------------------------------------------------------ life

    async def run(
        self, *, task_status: trio.TaskStatus[ClusterNode] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the dialed links until cancelled (cancelling closes them)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self._nursery = None
                self._stopped = True

    @property
    def draining(self) -> bool:
        return self._draining

    def link_counts(self) -> LinkCounts:
        """The replica links up now, and the forwarded streams open on them (for metrics and
        ``/health``)."""
        dialed = [
            peer.session
            for peer in self._peers.values()
            if peer.session is not None and not peer.session.ended
        ]
        accepted = [session for session in self._accepted if not session.ended]
        return LinkCounts(
            dialed=len(dialed),
            accepted=len(accepted),
            streams_out=sum(session.protocol.open_streams for session in dialed),
            streams_in=sum(session.protocol.open_streams for session in accepted),
        )

    async def drain(self, grace: float) -> None:
        """Graceful stop: refuse new links and forwards (peers' new forwards fail over to
        presence), let open forwarded streams finish for up to ``grace`` seconds, then close
        every replica link."""
        self._draining = True
        sessions = list(self._accepted) + [
            peer.session for peer in self._peers.values() if peer.session is not None
        ]
        async with trio.open_nursery() as nursery:
            for session in sessions:
                nursery.start_soon(session.drain, grace, ErrorCode.SHUTTING_DOWN, "shutting down")
        for session in sessions:
            await session.aclose(1001, "replica shutting down")

    # ------------------------------------------------------------------ the dialing side

    async def open_forwarded_stream(
        self, scope_id: str, daemon_id: str, metadata: Mapping[str, str]
    ) -> MuxStream:
        """A stream to ``daemon_id`` of ``scope_id`` through the replica that holds its link,
        as presence names it, opened with ``metadata`` (what the stream would carry on a local
        link: ``kind``, ``from``...).

        Returns once that replica has connected the stream to the daemon: what follows on the
        stream is the daemon's. Raises :class:`DaemonOffline` at once when presence names no
        replica (or this one), within ``dial_timeout`` when the replica cannot be reached, and
        when it no longer holds the link; :class:`ForwardBusy` when it refuses for load or
        gives no answer within ``open_timeout`` plus :data:`ANSWER_MARGIN`. One more try is
        made when the link to the replica ends before its answer (on a freshly dialed link),
        or when the replica turns the stream away as offline and presence meanwhile names
        another link. :class:`~relay._store_api.StoreUnavailable` (or
        :class:`~relay._store.StoreError`) when presence cannot be read. ValueError for
        metadata that cannot be forwarded (a key over 58 characters). Cancellation resets a
        stream half-opened."""
        inner = _inner_metadata(metadata)
        entry = await self.presence.where(scope_id, daemon_id)
        if entry is not None and entry.replica_id == self.replica_id:
            # A reused answer may name this replica just after the link here ended: ask Redis.
            entry = await self.presence.where(scope_id, daemon_id, fresh=True)
        if entry is None:
            raise DaemonOffline(f"Daemon {daemon_id} is not connected.")
        failure: DaemonOffline | None = None
        looked_again = False
        while True:
            if entry.replica_id == self.replica_id:
                # Presence names this replica, whose registry the caller found empty: the link
                # has just ended here and its entry is about to go.
                raise failure or DaemonOffline(f"Daemon {daemon_id} has just disconnected.")
            try:
                return await self._forward(entry, scope_id, daemon_id, inner)
            except _LinkLost as lost:
                if failure is not None:
                    raise
                # The peer link died under this forward (it may have been dead for a moment
                # before anyone knew): one more try, which dials a fresh link.
                failure = lost
                continue
            except DaemonOffline as offline:
                if looked_again:
                    raise
                failure = offline
            # The daemon may have moved since presence was read (its replica died, it
            # reconnected elsewhere; or the answer was a reused one): one more try if
            # presence names another link now. Asked once per request.
            looked_again = True
            fresh = await self.presence.where(scope_id, daemon_id, fresh=True)
            if fresh is None or fresh.epoch == entry.epoch:
                raise failure
            entry = fresh

    async def _forward(
        self, entry: PresenceEntry, scope_id: str, daemon_id: str, inner: dict[str, str]
    ) -> MuxStream:
        peer = await self._peer_session(entry.replica_id, entry.advertise_url)
        metadata = {
            "kind": FORWARD_KIND,
            "scope": scope_id,
            "daemon": daemon_id,
            "epoch": str(entry.epoch),
            **inner,
        }
        where = f"replica {entry.replica_id}"
        stream: MuxStream | None = None
        answered = False
        deadline = self.settings.open_timeout + ANSWER_MARGIN
        try:
            with trio.move_on_after(deadline):
                try:
                    stream = await peer.open_stream(metadata)
                    answer = await stream.receive_some(len(ACCEPTED))
                except StreamResetError as reset:
                    raise _refusal(reset.code, peer, daemon_id, where) from None
                except (SessionClosed, trio.BrokenResourceError) as exc:
                    raise _LinkLost(
                        f"Daemon {daemon_id} cannot be reached: the link to {where} ended ({exc})."
                    ) from None
                if answer != ACCEPTED:
                    raise DaemonOffline(
                        f"Daemon {daemon_id} cannot be reached: {where} answered the forward "
                        "with something else."
                    )
                answered = True
                self.stats.forwarded_out += 1
                return stream
            raise ForwardBusy(
                f"Daemon {daemon_id} has no free stream: {where} did not connect the request "
                f"within {deadline:g} s. Try again shortly."
            )
        finally:
            if stream is not None and not answered:
                stream.reset(ErrorCode.CANCEL)

    async def _peer_session(self, replica_id: str, url: str) -> MuxSession:
        """The session of the link to ``replica_id`` (dialing ``url`` if there is none up), or
        DaemonOffline within ``dial_timeout``."""
        nursery = self._nursery
        if nursery is None:
            if self._stopped:
                # The relay is stopping: a request that comes in meanwhile gets an answer.
                raise DaemonOffline(
                    f"Replica {replica_id} cannot be reached: this replica is shutting down."
                )
            raise RuntimeError("ClusterNode.run is not running")
        try:
            link_url(url)
        except ValueError:
            raise DaemonOffline(
                f"Replica {replica_id} cannot be reached: its advertised URL is not usable."
            ) from None
        peer = self._peers.get(replica_id)
        if peer is not None and peer.ready.is_set() and not peer.usable():
            recently = (
                peer.ended_at is not None
                and peer.session is None
                and trio.current_time() - peer.ended_at < self.settings.redial_delay
            )
            if recently and peer.url == url:
                raise DaemonOffline(f"Replica {replica_id} cannot be reached: {peer.failure}")
            peer = None
        if peer is not None and not peer.ready.is_set() and peer.url != url:
            peer = None  # presence moved the replica to another address: dial that one
        if peer is None:
            peer = _PeerLink(replica_id, url)
            self._peers[replica_id] = peer
            nursery.start_soon(self._maintain, peer)
        with trio.move_on_after(self.settings.dial_timeout + ANSWER_MARGIN):
            await peer.ready.wait()
        session = peer.session
        if session is None:
            reason = peer.failure or "no link in time"
            raise DaemonOffline(f"Replica {replica_id} cannot be reached: {reason}")
        if not peer.usable():
            # Up a moment ago, gone now: a fresh dial may well work.
            raise _LinkLost(f"Replica {replica_id} cannot be reached: its link just ended.")
        return session

    async def _maintain(self, peer: _PeerLink) -> None:
        """Dial ``peer`` and keep its link until it ends (or the node stops)."""
        self.stats.dials += 1
        try:
            try:
                await self._dial_and_serve(peer)
            except* trio_websocket.ConnectionRejected as group:
                status = getattr(group.exceptions[0], "status_code", None)
                why = " (the replicas' cluster secrets differ?)" if status == 401 else ""
                peer.failure = f"it refused the replica link with HTTP {status}{why}"
            except* (
                trio_websocket.HandshakeError,
                trio_websocket.ConnectionClosed,
                trio.BrokenResourceError,
                OSError,
            ) as group:
                peer.failure = _describe_failure(group.exceptions[0])
            except* Exception as group:
                # One peer's link failing in an unforeseen way must not end the node (and the
                # relay with it): it ends that link, loudly.
                peer.failure = f"link failed: {type(group.exceptions[0]).__name__}"
                log.error("replica link to %s failed unexpectedly", peer.replica_id, exc_info=group)
        finally:
            if peer.session is None:
                self.stats.dial_failures += 1
                peer.failure = peer.failure or "the link did not come up"
                log.warning("replica link to %s failed: %s", peer.replica_id, peer.failure)
            else:
                log.info("replica link to %s ended: %s", peer.replica_id, peer.session.close_reason)
            peer.ended_at = trio.current_time()
            peer.ready.set()

    async def _dial_and_serve(self, peer: _PeerLink) -> None:
        url = link_url(peer.url)
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        deadline = trio.current_time() + self.settings.dial_timeout
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
        with trio.CancelScope(deadline=deadline):
            tcp = await trio.open_tcp_stream(host, port)
            if secure:
                context = self._ssl_context or ssl.create_default_context()
                tls = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tls)
                    raise
                stream = tls
            else:
                stream = tcp
        if stream is None or trio.current_time() >= deadline:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            peer.failure = f"no connection within {self.settings.dial_timeout:g} s"
            return
        # The socket is ours to close: trio-websocket's client can leave it open when the
        # server starts the close.
        async with stream, trio.open_nursery() as nursery:
            session: MuxSession | None = None
            with trio.CancelScope(deadline=deadline):
                authorization = replica_authorization(
                    self.replica_id, self._secret, now=self._clock()
                )
                connection = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    parts.netloc,
                    parts.path,
                    extra_headers=[
                        (b"authorization", authorization.encode("ascii")),
                        (b"repowire-protocol", str(PROTOCOL_VERSION).encode()),
                    ],
                    max_message_size=LINK_MAX_MESSAGE,
                    message_queue_size=LINK_MESSAGE_QUEUE,
                    receive_buffer_size=LINK_RECEIVE_BUFFER,
                )
                candidate = MuxSession(
                    WebSocketTransport(connection),
                    Role.CONNECTOR,
                    self._mux(peer_message_limit(connection.handshake_headers)),
                    window_budget=self._window_budget,
                )
                try:
                    session = await nursery.start(candidate.run)
                except SessionClosed as exc:
                    peer.failure = f"protocol handshake failed: {exc.reason}"
            if session is None:
                if not peer.failure:
                    peer.failure = f"no link within {self.settings.dial_timeout:g} s"
                nursery.cancel_scope.cancel()
                return
            peer.session = session
            peer.ready.set()
            log.info("replica link to %s is up (%s)", peer.replica_id, peer.url)
            nursery.start_soon(_refuse_streams, session)
            await session.wait_ended()
            nursery.cancel_scope.cancel()

    def _mux(self, message_limit: int = LINK_MAX_MESSAGE) -> MuxConfig:
        """The session settings of every replica link, both ends; messages written are at
        most ``message_limit`` bytes, what the other end reads."""
        streams = self.settings.max_streams_per_peer_link
        return MuxConfig(
            # Room for a full initial window on every stream plus the growth budget: a browser
            # that stops reading stalls its own stream, never the link (SPEC.md, "Stalled
            # streams and the session budget"). Memory stays bounded by each scope's quotas
            # on the replica the browser or daemon is on; window growth is charged to the
            # stream's scope (``window_budget``).
            protocol=attrs.evolve(
                link_protocol_config(streams),
                max_accept_backlog=streams,
                max_queued_control_frames=max(4096, 2 * streams + 64),
            ),
            max_stream_window=MAX_STREAM_WINDOW if self._window_budget is not None else None,
            max_message_size=min(LINK_MESSAGE_SIZE, message_limit),
            keepalive_interval=self.settings.keepalive_interval,
            keepalive_timeout=self.settings.keepalive_timeout,
            handshake_timeout=self.settings.dial_timeout,
        )

    # ------------------------------------------------------------------ the accepting side

    def authenticate(self, authorization: bytes | str | None) -> str | None:
        """The peer replica id an ``Authorization`` header proves, or None."""
        return verify_replica_authorization(
            authorization,
            self._secret,
            now=self._clock(),
            max_skew=self.settings.auth_max_skew,
        )

    async def serve_replica_link(self, peer_id: str, transport: AsgiWebSocketTransport) -> None:
        """Serve a link ``peer_id`` dialed to this node over an accepted WebSocket until it
        ends: each stream it opens is a forward (see the module docstring)."""
        session = MuxSession(transport, Role.RELAY, self._mux(), window_budget=self._window_budget)
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(session.run)
            except SessionClosed as exc:
                log.info("replica link from %s: handshake failed: %s", peer_id, exc.reason)
                return
            log.info("replica link from %s accepted", peer_id)
            self._accepted.add(session)
            try:
                while True:
                    try:
                        stream = await session.accept_stream()
                    except SessionClosed:
                        break
                    nursery.start_soon(self._serve_forward, stream)
            finally:
                self._accepted.discard(session)
                log.info("replica link from %s ended: %s", peer_id, session.close_reason)

    async def _serve_forward(self, stream: MuxStream) -> None:
        metadata = stream.metadata
        scope_id = metadata.get("scope", "")
        daemon_id = metadata.get("daemon", "")
        if (
            metadata.get("kind") != FORWARD_KIND
            or _SCOPE_ID.fullmatch(scope_id) is None
            or _DAEMON_ID.fullmatch(daemon_id) is None
        ):
            stream.reset(ErrorCode.FORBIDDEN)
            return
        if self._draining:
            stream.reset(ErrorCode.SHUTTING_DOWN)
            return
        inner = {
            key[len(INNER_PREFIX) :]: value
            for key, value in metadata.items()
            if key.startswith(INNER_PREFIX)
        }
        with ExitStack() as held:
            try:
                held.enter_context(self._scope_slot(scope_id))
            except QuotaExceeded:
                stream.reset(ErrorCode.REFUSED_STREAM)
                return
            local: MuxStream | None = None
            with trio.move_on_after(self.settings.open_timeout) as waiting:
                try:
                    local = await self._opener(scope_id, daemon_id, inner)
                except Exception:
                    # The relay's opener failed: this forward ends, nothing else does.
                    log.exception("forward to daemon %s: opening its stream failed", daemon_id)
                    stream.reset(ErrorCode.UPSTREAM_FAILED)
                    return
            if local is None:
                stream.reset(
                    ErrorCode.REFUSED_STREAM
                    if waiting.cancelled_caught
                    else ErrorCode.TARGET_OFFLINE
                )
                return
            try:
                await stream.send_all(ACCEPTED)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await trio.aclose_forcefully(local)
                return
            self.stats.forwarded_in += 1
            self.stats.open_in += 1
            budget = self._window_budget
            chunks = SPLICE_CHUNK if budget is None else GrowingChunks(budget, stream)
            try:
                await splice(_AbortRelay(stream, local), _AbortRelay(local, stream), chunk=chunks)
            finally:
                self.stats.open_in -= 1
                if isinstance(chunks, GrowingChunks):
                    chunks.release()


class _AbortRelay(trio.abc.HalfCloseableStream):
    """One side of a forwarded stream's splice, which passes an abort on as an abort.

    :func:`mux.splice` ends both streams when one breaks, with ``aclose``: the other end then
    reads an orderly end of file (the FIN goes before the RESET). Across replicas that would
    turn a browser that went away, or a daemon that failed, into a request or a response that
    looks complete. So when ``stream`` turns out reset (while reading from it or writing to
    it), ``partner`` is reset with the same code first, and the splice's own close is then a
    no-op on it.

    A stream that ends with a FIN and then a RESET (its far end's ``aclose`` while this end
    could still send: a daemon closing its stream once its response is out) is passed on as
    the same pair: ``partner`` gets the FIN, so its reader has every byte and an orderly end
    of file, then the RESET, so its sends fail: what it would see on a direct link.
    """

    def __init__(self, stream: MuxStream, partner: MuxStream) -> None:
        self.stream = stream
        self.partner = partner
        self._eof_sent = False

    @property
    def window_growth(self) -> int:
        """What ``stream``'s receive window has grown by (``mux.GrowingChunks`` asks)."""
        return self.stream.window_growth

    def _abort_partner(self, error: BaseException | None) -> None:
        code = error.code if isinstance(error, StreamResetError) else ErrorCode.CANCEL
        self.partner.reset(code)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            self._abort_partner(exc)
            raise
        if not data and not self._eof_sent and self.stream.state is StreamState.CLOSED:
            # Closed though this side sent no FIN: the end of file came with a RESET right
            # behind it (the peer's aclose while this side could still send). Only this
            # direction of the splice writes to the partner: nothing else is sending on it.
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.partner.send_eof()
            self._abort_partner(None)
            raise trio.BrokenResourceError("the stream was reset after its end of file")
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as exc:
            self._abort_partner(exc)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        self._eof_sent = True
        try:
            await self.stream.send_eof()
        except trio.BrokenResourceError as exc:
            self._abort_partner(exc)
            raise

    async def aclose(self) -> None:
        await self.stream.aclose()


async def splice_forwarded(
    stream: MuxStream, forwarded: MuxStream, *, chunk: ChunkSize = SPLICE_CHUNK
) -> None:
    """Splice ``stream`` and a stream :meth:`ClusterNode.open_forwarded_stream` gave, each
    way, until both ends are done, reading ``chunk`` at a time (see :func:`mux.splice`); a
    reset at either end travels on as a reset with its code (see :class:`_AbortRelay`), so
    the daemon at the far end never reads a reset as an orderly end of file."""
    await splice(_AbortRelay(stream, forwarded), _AbortRelay(forwarded, stream), chunk=chunk)


async def _refuse_streams(session: MuxSession) -> None:
    """On a link this node dialed, the peer opens nothing: refuse what it tries."""
    while True:
        try:
            stream = await session.accept_stream()
        except SessionClosed:
            return
        stream.reset(ErrorCode.FORBIDDEN)


def _refusal(code: int, session: MuxSession, daemon_id: str, where: str) -> ForwardError:
    """The error for a forward the peer reset with ``code`` before answering."""
    if code == ErrorCode.REFUSED_STREAM and session.peer_goaway is None:
        return ForwardBusy(
            f"Daemon {daemon_id} is busy: {where} refused the request (its limits for this "
            "key, or the daemon's link has no free stream). Try again shortly."
        )
    if code in (ErrorCode.TARGET_OFFLINE, ErrorCode.UNKNOWN_TARGET):
        return DaemonOffline(f"Daemon {daemon_id} is not connected ({where} no longer holds it).")
    name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
    return DaemonOffline(f"Daemon {daemon_id} cannot be reached: {where} answered {name}.")


def _describe_failure(error: BaseException) -> str:
    """Why a dial failed, in a few words (no secret: the error is about the connection)."""
    shown = error
    # trio wraps the reason: a broken TLS stream its SSL error, a failed connect a group of
    # its attempts' errors (the last one said).
    for _ in range(8):
        if isinstance(shown, OSError) and shown.strerror:
            break
        if isinstance(shown, BaseExceptionGroup) and shown.exceptions:
            shown = shown.exceptions[-1]
        elif shown.__cause__ is not None:
            shown = shown.__cause__
        else:
            break
    if isinstance(shown, OSError) and shown.strerror:
        return f"cannot connect: {shown.strerror}"
    text = str(shown).strip().splitlines()[0][:120] if str(shown).strip() else ""
    return f"link failed: {type(shown).__name__}" + (f" ({text})" if text else "")


def _inner_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    inner: dict[str, str] = {}
    for key, value in metadata.items():
        wrapped = INNER_PREFIX + key
        if len(wrapped) > 64:
            raise ValueError(f"metadata key {key[:64]!r} is too long to forward")
        inner[wrapped] = value
    return inner


def link_url(advertise_url: str) -> str:
    """The WebSocket URL of a replica's link endpoint, from its advertised URL
    (``http://10.0.0.5:8000`` -> ``ws://10.0.0.5:8000/ws/replica``). ValueError if it has no
    host or another scheme."""
    try:
        parts = urlsplit(advertise_url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except (ValueError, TypeError, AttributeError):
        raise ValueError("the advertised URL cannot be parsed") from None
    schemes = {"http": "ws", "ws": "ws", "https": "wss", "wss": "wss"}
    scheme = schemes.get(parts.scheme)
    if (
        scheme is None
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
    ):
        raise ValueError(
            "the advertised URL must be http(s):// or ws(s):// with a host, and no user, "
            "query or fragment"
        )
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{REPLICA_PATH}"


# ---------------------------------------------------------------------- the ASGI endpoint


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


async def _deny(send: Send, scope: dict[str, Any], status: int, detail: str) -> None:
    """Refuse the upgrade with an HTTP ``status`` (where the server lets the app answer the
    handshake with HTTP; else a close 1008 before anything is accepted)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = detail.encode() + b"\n"
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 401:
            headers.append((b"www-authenticate", AUTH_SCHEME.encode()))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


async def handle_replica_link(
    scope: dict[str, Any], receive: Receive, send: Send, *, cluster: ClusterNode
) -> None:
    """Serve ``/ws/replica``: a peer replica's link, from the WebSocket handshake to its end.

    Checked before the WebSocket is accepted, so a stranger gets nothing read or parsed: the
    cluster credentials (401 for anything else, a user's key included: see
    :func:`verify_replica_authorization`), the protocol version (426), whether this node is
    draining (503). Then the session runs until the link ends (:meth:`ClusterNode.
    serve_replica_link`). The listener must negotiate no WebSocket extension (the relay's
    hypercorn config refuses them: ``relay._server.refuse_websocket_extensions``)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    peer_id = cluster.authenticate(_header(headers, b"authorization"))
    if peer_id is None:
        client = scope.get("client")
        address = client[0] if isinstance(client, list | tuple) and client else "unknown"
        log.warning("replica link refused from %s: missing or wrong cluster credentials", address)
        await _deny(send, scope, 401, "Replica links need the cluster's credentials.")
        return
    version = (_header(headers, b"repowire-protocol") or b"").decode("latin-1").strip()
    if version != str(PROTOCOL_VERSION):
        await _deny(
            send,
            scope,
            426,
            f"This replica speaks protocol {PROTOCOL_VERSION}, not {version[:16] or 'none'}.",
        )
        return
    if cluster.draining:
        await _deny(send, scope, 503, "This replica is shutting down.")
        return
    await send(
        {
            "type": "websocket.accept",
            "headers": [
                (b"repowire-protocol", str(PROTOCOL_VERSION).encode()),
                (MAX_MESSAGE_HEADER, str(cluster.settings.max_message_size).encode()),
            ],
        }
    )
    await cluster.serve_replica_link(peer_id, AsgiWebSocketTransport(receive, send))
