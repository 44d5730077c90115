"""What every part of a running relay shares: settings, store, links, limits, metrics.

The key store is a :class:`relay._store_api.Store` (SQLite alone, Redis in a cluster); every
call to it is awaited and may raise :class:`~relay._store_api.StoreError`, which a request
answers with 503 ``store_unavailable``. (The Redis store caches the sessions this relay serves,
so that they keep working through a Redis outage: see :mod:`relay._redis_store`.)
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import attrs
import trio

from common import hash_secret
from mux import GrowingChunks, MuxStream, SessionClosed
from protocol import CloseCode

from ._links import DaemonLink, HandshakeLimiter, LinkRegistry
from ._live import LiveAccess
from ._login_links import ISSUE_BURST, ISSUE_RATE_PER_HOUR
from ._metrics import RelayMetrics
from ._quota import QuotaExceeded, ScopeBudget, ScopeCounter
from ._ratelimit import limiter_for
from ._settings import RelaySettings, stream_cost
from ._sqlite_store import SqliteStore
from ._store import KeyRecord, KeyStore, SessionRecord
from ._store_api import ChangeKind, Store, StoreChange, StoreError, StoreUnavailable
from ._store_health import StoreHealth

if TYPE_CHECKING:
    # Loaded only in a cluster (they bring coredis in): see relay._server.
    from ._presence import HeldLink, LinkClaimed, Presence
    from ._replica_link import ClusterNode

log = logging.getLogger("repowire.relay")

#: Name of the browser session cookie. Its value is a random session id, never a key.
SESSION_COOKIE = "repowire_session"

Headers = Iterable[tuple[bytes, bytes]]


@attrs.frozen(kw_only=True)
class OnlineDaemon:
    """A daemon of a scope with a live link: on this relay (``link``), or in a cluster on
    another replica (``link`` None)."""

    daemon_id: str
    connected_at: float
    link: DaemonLink | None


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class Relay:
    """The shared state of one relay process."""

    def __init__(
        self,
        settings: RelaySettings,
        store: Store | KeyStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``store``: the key store, which the relay uses but does not close (a
        :class:`KeyStore` is used through a :class:`SqliteStore` around it)."""
        self.settings = settings
        self.store: Store = SqliteStore(store) if isinstance(store, KeyStore) else store
        self.clock = clock
        self.metrics = RelayMetrics()
        #: Whether the store answers, as last seen (``/health``, the store gauge).
        self.store_health = StoreHealth(lambda up: self.metrics.store_up.set(1 if up else 0))
        self.links = LinkRegistry()
        #: Daemon-link handshakes in progress, bounded by ``settings.link_handshake_limit``.
        self.link_handshakes = HandshakeLimiter(
            settings.link_handshake_limit, settings.link_handshake_limit_per_key
        )
        #: Streams each scope holds open (tunneled requests, WebSockets, mesh streams).
        self.scope_streams = ScopeCounter("open streams", settings.max_streams_per_scope)
        #: Bytes those streams may make the relay hold (``_settings.stream_cost`` each).
        self.scope_bytes = ScopeCounter("bytes held", settings.max_scope_buffered)
        #: Bytes of window growth those streams hold (``max_scope_window_growth``; a counter
        #: of 1 byte when growth is off, which nothing then takes from).
        self.scope_growth = ScopeCounter(
            "bytes of window growth", max(1, settings.max_scope_window_growth)
        )
        #: Browser requests in flight, by session and key, so revocation can end them.
        self.live_access = LiveAccess()
        #: Daemon links each scope holds (registered or in their handshake).
        self.scope_links = ScopeCounter("daemon links", settings.max_links_per_scope)
        # Rate limits: in process for a relay alone, shared by every replica in Redis.
        #: Failed attempts per client address: /auth, bad keys on /ws/relay and the API.
        self.auth_limiter = limiter_for(
            self.store, "auth", settings.auth_rate_per_minute / 60.0, settings.auth_burst
        )
        #: Registrations per client address.
        self.register_limiter = limiter_for(
            self.store,
            "register",
            settings.register_rate_per_hour / 3600.0,
            settings.register_burst,
        )
        #: Sign-in links issued, per key id.
        self.login_link_limiter = limiter_for(
            self.store, "login_link", ISSUE_RATE_PER_HOUR / 3600.0, ISSUE_BURST
        )
        self.shutting_down = False
        #: In a cluster (``settings.clustered``): this replica's node of the replica mesh and
        #: the presence records. None on a relay alone. Set by ``serve_relay`` before the
        #: relay serves anything.
        self.cluster: ClusterNode | None = None
        self.presence: Presence | None = None
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies]

    @contextmanager
    def stream_slot(self, scope_id: str, kind: str) -> Iterator[None]:
        """Hold one of the scope's stream slots and the bytes a ``kind`` stream may make the
        relay hold (:func:`~relay._settings.stream_cost`) for the block. Raises
        :class:`~relay._quota.QuotaExceeded` (nothing taken) if either quota is full."""
        cost = stream_cost(self.settings, kind)
        streams, held = self.scope_streams, self.scope_bytes
        if not streams.try_take(scope_id):
            raise QuotaExceeded(streams.what, streams.limit)
        if not held.try_take(scope_id, cost):
            streams.give_back(scope_id)
            raise QuotaExceeded(held.what, held.limit)
        try:
            yield
        finally:
            held.give_back(scope_id, cost)
            streams.give_back(scope_id)

    def read_sizes(self, scope_id: str, payer: MuxStream) -> GrowingChunks:
        """How much to read at a time from streams the relay reads for ``scope_id`` (a
        response, a splice): ``mux.SPLICE_CHUNK``, or ``mux.BULK_SPLICE_CHUNK`` from a stream
        whose window has grown, the extra charged to the scope's window growth (never taken
        when growth is off). Call ``release()`` once the reading is over."""
        return GrowingChunks(ScopeBudget(self.scope_growth, scope_id), payer)

    def is_shutting_down(self) -> bool:
        """Whether a graceful shutdown has begun (new daemon links are turned away)."""
        return self.shutting_down

    # ------------------------------------------------------------------ the cluster

    async def online_daemons(self, scope_id: str) -> list[OnlineDaemon]:
        """The daemons of ``scope_id`` with a live link, the longest connected first (ties by
        daemon id): the first is the scope's default daemon. On a relay alone, its own links.
        In a cluster, every replica's (presence), with this replica's own links added if
        presence does not list them yet (a claim under way); when presence cannot be read,
        this replica's own links only. Never raises for the store."""
        local = self.links.for_scope(scope_id)
        presence = self.presence
        if presence is None:
            return [_online(link) for link in local]
        try:
            present = await presence.daemons_of(scope_id)
        except StoreError as exc:
            self.store_failed(exc)
            log.warning("scope %s: listing this replica's daemons only: %s", scope_id, str(exc))
            return [_online(link) for link in local]
        mine = {link.daemon_id: link for link in local}
        online: dict[str, OnlineDaemon] = {}
        for daemon in present:
            link = mine.get(daemon.daemon_id)
            if link is None and daemon.replica_id == self.settings.replica_id:
                continue  # its link here has just ended; the entry is on its way out
            online[daemon.daemon_id] = OnlineDaemon(
                daemon_id=daemon.daemon_id, connected_at=daemon.connected_at, link=link
            )
        for link in local:
            online.setdefault(link.daemon_id, _online(link))
        return sorted(online.values(), key=lambda d: (d.connected_at, d.daemon_id))

    async def open_local_stream(
        self, scope_id: str, daemon_id: str, metadata: Mapping[str, str]
    ) -> MuxStream | None:
        """A stream to ``daemon_id`` over this replica's own link, opened with ``metadata``
        (waiting for a free slot of the link: the caller bounds the wait), or None when this
        replica holds no link for it or the link is closing. The replica mesh's opener for
        the forwards peers send here."""
        link = self.links.get(scope_id, daemon_id)
        if link is None:
            return None
        try:
            return await link.session.open_stream(metadata)
        except SessionClosed:
            return None

    @contextmanager
    def forwarded_stream_slot(self, scope_id: str) -> Iterator[None]:
        """The scope's quota for a stream a peer replica forwards here (spliced onto a
        daemon's stream, it may hold a window each way, like a mesh stream): see
        :meth:`stream_slot`. Raises :class:`~relay._quota.QuotaExceeded` (nothing taken)."""
        with ExitStack() as held:
            try:
                held.enter_context(self.stream_slot(scope_id, "mesh"))
            except QuotaExceeded:
                self.metrics.streams_refused.labels("forwarded").inc()
                raise
            yield

    def held_links(self) -> list[HeldLink]:
        """The links this replica holds whose presence is claimed, as the presence refresher
        keeps them announced."""
        from ._presence import HeldLink

        advertise_url = self.settings.advertise_url
        if advertise_url is None:
            return []
        return [
            HeldLink(
                scope_id=link.scope_id,
                daemon_id=link.daemon_id,
                epoch=link.epoch,
                replica_id=self.settings.replica_id,
                advertise_url=advertise_url,
                connected_at=link.connected_at,
            )
            for link in self.links.all()
            if link.epoch is not None
        ]

    async def on_link_claimed(self, event: LinkClaimed) -> None:
        """A replica claimed a daemon's link (presence's ``link_claimed``): if this replica
        holds an older link of that daemon, close it with 4409 (:data:`CloseCode.REPLACED`),
        as a relay alone closes a link that a newer one of the same daemon replaced. Never
        raises."""
        if event.replica_id == self.settings.replica_id:
            return  # this replica's own claim: its registry already holds the newest link
        link = self.links.get(event.scope_id, event.daemon_id)
        if link is None:
            return
        if link.epoch is None:
            # Its own claim is under way: compared once its epoch is known.
            link.rival_epoch = max(link.rival_epoch, event.epoch)
            return
        if link.epoch < event.epoch:
            await self.close_replaced(link, event.replica_id)

    async def on_links_superseded(self, links: Sequence[HeldLink]) -> None:
        """The presence refresher found other epochs in the entries of ``links``: another
        replica claimed those daemons (an event this replica missed), or an entry that lapsed
        was written back by an older link. The newest epoch wins: a link of this replica
        that is older than the entry is closed with 4409; one that is newer claims its daemon
        again (whose event closes the older link). Never raises."""
        presence = self.presence
        if presence is None:
            return
        for held in links:
            link = self.links.get(held.scope_id, held.daemon_id)
            if link is None or link.epoch != held.epoch:
                continue
            try:
                entry = await presence.where(held.scope_id, held.daemon_id, fresh=True)
                if entry is None or entry.epoch == held.epoch:
                    continue  # lapsed (the next refresh writes it back), or ours again
                if entry.epoch > held.epoch:
                    await self.close_replaced(link, entry.replica_id)
                    continue
                epoch = await presence.claim(
                    held.scope_id,
                    held.daemon_id,
                    held.replica_id,
                    held.advertise_url,
                    connected_at=held.connected_at,
                )
            except StoreError as exc:
                # The next refresh reports it again.
                self.store_failed(exc)
                continue
            if link.epoch == held.epoch and self.links.get(held.scope_id, held.daemon_id) is link:
                link.epoch = epoch
                log.info(
                    "daemon %s: claimed again over an older link on replica %s",
                    link.daemon_id,
                    entry.replica_id,
                )

    async def close_replaced(self, link: DaemonLink, replica_id: str) -> None:
        """Close ``link`` with 4409: a newer link of its daemon is on ``replica_id``."""
        log.info("daemon %s: its link moved to replica %s", link.daemon_id, replica_id)
        await link.session.aclose(
            CloseCode.REPLACED, "replaced by a newer connection on another replica"
        )

    # ------------------------------------------------------------------ ending access

    async def end_key_access(self, key_id: str, why: str) -> None:
        """A key was revoked or rotated (``why`` says which, for the close reason and the
        log): forget its cached sessions, cancel its browser requests in flight (tunneled
        requests, SSE streams, WebSockets) and close its daemon links, those still in their
        handshake included, with :data:`CloseCode.KEY_REVOKED`. (Its unused sign-in links
        are dropped by the store.) Returns once the links are closed; never raises for a link
        that is gone already."""
        self.store.forget_sessions_of(key_id)
        requests = self.live_access.end_key(key_id, why)
        links = self.links.for_key(key_id)
        if requests or links:
            self.metrics.access_revoked.labels("request").inc(requests)
            self.metrics.access_revoked.labels("link").inc(len(links))
            log.info(
                "key %s %s: ended %d daemon link(s) and %d browser request(s)",
                key_id,
                why,
                len(links),
                requests,
            )
        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(link.session.aclose, CloseCode.KEY_REVOKED, f"key {why}")

    def end_session_access(self, session_digest: str) -> None:
        """A browser session ended (sign-out, here or on another replica): cancel its
        requests in flight. ``session_digest`` is :func:`common.hash_secret` of the session
        id (the live requests are indexed by it; the raw id is never kept)."""
        ended = self.live_access.end_session(session_digest, "signed_out")
        if ended:
            self.metrics.access_revoked.labels("request").inc(ended)

    async def on_store_change(self, change: StoreChange) -> None:
        """The store's change feed (:meth:`Store.watch`): a key revoked or rotated, or a
        session ended, through any store object on the same data (this relay, another
        replica, ``repowire relay keys``), ends its access here too."""
        if change.kind in (ChangeKind.KEY_REVOKED, ChangeKind.KEY_ROTATED):
            if change.key_id is not None:
                await self.end_key_access(change.key_id, change.kind.value)
        elif change.kind is ChangeKind.SESSION_ENDED and change.session_digest is not None:
            self.end_session_access(change.session_digest)

    def store_failed(self, error: StoreError) -> None:
        """A request met a store failure (it answers 503): note an outage."""
        if isinstance(error, StoreUnavailable):
            self.store_health.failed(error)

    # ------------------------------------------------------------------ who is asking

    def _from_trusted_proxy(self, peer: str) -> bool:
        if not self._trusted:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def client_address(self, client: tuple[str, int] | None, headers: Headers) -> str:
        """The browser's address: the socket peer, or X-Forwarded-For's last hop when the peer
        is a trusted proxy."""
        peer = client[0] if client else "unknown"
        if self._from_trusted_proxy(peer):
            forwarded = header(headers, b"x-forwarded-for")
            if forwarded:
                hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
                if hops:
                    return hops[-1]
        return peer

    def is_secure(self, scheme: str, client: tuple[str, int] | None, headers: Headers) -> bool:
        """Whether the browser reached us over TLS (directly, or via a trusted proxy)."""
        if scheme in ("https", "wss"):
            return True
        if self.settings.public_url and self.settings.public_url.startswith("https://"):
            return True
        peer = client[0] if client else ""
        if self._from_trusted_proxy(peer):
            proto = header(headers, b"x-forwarded-proto")
            return proto is not None and proto.strip().lower() == b"https"
        return False

    def origin_allowed(self, headers: Headers, scheme: str) -> bool:
        """Origin check for WebSocket upgrades and state-changing requests.

        Allowed: no Origin header at all (not a browser), or an Origin equal to the public URL's
        origin, or (no public URL configured) to the Host the request was sent to.
        """
        origin = header(headers, b"origin")
        if origin is None:
            return True
        origin_text = origin.decode("latin-1").strip().lower()
        if origin_text == "null":
            return False
        if self.settings.public_url:
            public = urlsplit(self.settings.public_url)
            return origin_text == f"{public.scheme}://{public.netloc}".lower()
        host = header(headers, b"host")
        if host is None:
            return False
        parsed = urlsplit(origin_text)
        return parsed.netloc == host.decode("latin-1").strip().lower()

    def expected_origin(self, headers: Headers, scheme: str) -> str:
        """The origin a browser's request must come from: the public URL's, or (none set) the
        one of the Host the request was sent to."""
        if self.settings.public_url:
            public = urlsplit(self.settings.public_url)
            return f"{public.scheme}://{public.netloc}"
        host = (header(headers, b"host") or b"").decode("latin-1").strip() or "this relay"
        return f"{'https' if scheme in ('https', 'wss') else 'http'}://{host}"

    def origin_refusal(self, headers: Headers, scheme: str, path: str) -> str:
        """Log a request refused for its origin (one line) and return the one-line reason to
        answer with, naming the origin this relay expects."""
        origin = (header(headers, b"origin") or b"").decode("latin-1").strip()
        expected = self.expected_origin(headers, scheme)
        log.info(
            # %r: the path is percent-decoded; a raw newline in it must not forge a log line.
            "refused a cross-site request to %r from origin %r (expected %r)",
            path[:200],
            origin[:100],
            expected,
        )
        return (
            f"This request came from {origin[:100] or 'another site'}, not from {expected}, "
            "and was refused. Open the relay at that address (set it with --public-url)."
        )

    # ------------------------------------------------------------------ browser sessions

    def session_id_from(self, headers: Headers) -> str | None:
        cookie_header = header(headers, b"cookie")
        if not cookie_header:
            return None
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(cookie_header.decode("latin-1"))
        except CookieError:
            return None
        morsel = jar.get(SESSION_COOKIE)
        return morsel.value if morsel is not None else None

    async def browser_session(self, headers: Headers) -> SessionRecord | None:
        """The live session of the request's cookie, or None. Raises :class:`StoreError`
        when the store fails (a session the Redis store holds in its cache rides out an
        outage instead)."""
        session_id = self.session_id_from(headers)
        if session_id is None:
            return None
        try:
            return await self.store.lookup_session(session_id, now=self.clock())
        except StoreError as exc:
            self.store_failed(exc)
            raise

    async def open_session(self, record: KeyRecord, now: float) -> str:
        """A new browser session for the key of ``record``, for ``settings.session_ttl``;
        returns its raw id (for the cookie). Raises UnknownRecordError if the key is no
        longer live, :class:`StoreError` if the store fails."""
        return await self.store.create_session(record, now=now, ttl=self.settings.session_ttl)

    async def close_session(self, session_id: str) -> None:
        """End a browser session (sign-out) in the store, and its access here at once (other
        replicas hear of it through the store's change feed). Raises :class:`StoreError` if
        the store fails: the session then still works, so the sign-out must be retried."""
        await self.store.end_session(session_id)
        self.end_session_access(hash_secret(session_id))

    def cookie_header(self, session_id: str, *, secure: bool) -> str:
        attributes = f"Path=/; HttpOnly; SameSite=Lax; Max-Age={int(self.settings.session_ttl)}"
        return f"{SESSION_COOKIE}={session_id}; {attributes}{'; Secure' if secure else ''}"

    def clearing_cookie_header(self, *, secure: bool) -> str:
        return f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0" + (
            "; Secure" if secure else ""
        )


def _online(link: DaemonLink) -> OnlineDaemon:
    return OnlineDaemon(daemon_id=link.daemon_id, connected_at=link.connected_at, link=link)
