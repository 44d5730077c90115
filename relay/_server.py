"""Running a relay: hypercorn serving :class:`RelayApp`, and its graceful shutdown."""

from __future__ import annotations

import errno
import gc
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import attrs
import trio
from hypercorn.config import Config, Sockets
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.run import worker_serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.utils import wrap_app

from mux import install_fast_masking
from protocol import CloseCode, ErrorCode

from ._app import RelayApp
from ._asgi_transport import Receive, Send
from ._context import Relay
from ._links import DaemonLink
from ._quota import StreamScopeBudget
from ._settings import APP_QUEUE_SIZE, BODY_PIECE_SIZE, RelaySettings
from ._sqlite_store import SqliteStore
from ._store import StoreError
from ._store_api import Store

log = logging.getLogger("repowire.relay")

#: Database file of the key store, inside the data directory.
STORE_FILE = "relay.sqlite3"
#: Seconds a peer may accept no data at all (a zero receive window, or no acknowledgement)
#: before the kernel aborts its connection (TCP_USER_TIMEOUT, where the platform has it).
#: hypercorn's socket writes are shielded from cancellation, so without this a client that
#: stops reading holds its connection's task, and the relay's shutdown, for as long as it
#: likes. Far above the links' keepalive timeout, so a slow but live peer is never cut.
STALLED_PEER_TIMEOUT = 60.0
#: Seconds between two purges of the expired sessions from the key store.
PURGE_INTERVAL = 600.0
#: Limits of the metrics listener (``settings.metrics_listen``): largest request head, and
#: seconds a client gets to send it (and an idle keep-alive connection is kept).
METRICS_MAX_HEADER = 4 * 1024
METRICS_HEADER_TIMEOUT = 5.0
#: Connections the kernel queues for the metrics listener (a scraper or two).
METRICS_BACKLOG = 16
#: Thresholds of the cyclic garbage collector in a relay process (``gc.set_threshold``).
#: CPython's default, (700, 10, 10), collects the youngest generation every 700 net
#: allocations; with thousands of links some of their short-lived objects (a ping in flight, a
#: timer) are alive at any such moment, get promoted, and soon fill the oldest generation, whose
#: collection walks every object of every link: measured at 5,000 idle links, a 1 to 2 s pause
#: about every 10 s, two thirds of the relay's CPU. A young generation of 50,000 lets those
#: objects die first; the oldest is then collected only as links are added, and garbage cycles
#: are still found (the young generation fills within seconds under load).
GC_THRESHOLDS = (50_000, 20, 10)
#: Seconds hypercorn gives the connections still open once every daemon link is closed (the
#: links' closing handshakes, a browser's last response): streams in flight had the shutdown
#: grace already, so there is nothing left worth a longer wait. Until this expires the old
#: relay still holds the port, and daemons redialling it just wait.
HTTP_STOP_TIMEOUT = 2.0


class ListenError(OSError):
    """A listener of the relay cannot be bound. ``strerror`` is one line naming the address."""


@attrs.define
class RunningRelay:
    """What :func:`serve_relay` reports once it listens."""

    relay: Relay
    #: Bound addresses, e.g. ``["http://127.0.0.1:45123"]``.
    binds: list[str]
    _stop: trio.Event
    #: Where ``/metrics`` is served (``http://127.0.0.1:9108/metrics``), or None if it is not.
    metrics_url: str | None = None

    @property
    def url(self) -> str:
        return self.binds[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def shutdown(self) -> None:
        """Start a graceful shutdown (what SIGTERM does)."""
        self._stop.set()


def read_in_body_pieces() -> None:
    """Make hypercorn read up to :data:`~relay._settings.BODY_PIECE_SIZE` from a socket at
    once (a module constant of its TCP server, 64 KiB, not a setting): each read becomes one
    body piece or a share of a WebSocket message, and is handled as one, so larger reads cost
    the relay less CPU per byte. Raises RuntimeError if this hypercorn has no such constant
    (the relay's accounting of what a request may hold assumes the size)."""
    from hypercorn.trio import tcp_server

    if not isinstance(getattr(tcp_server, "MAX_RECV", None), int):
        raise RuntimeError("hypercorn.trio.tcp_server.MAX_RECV is gone: pin a known hypercorn")
    tcp_server.MAX_RECV = BODY_PIECE_SIZE


def hypercorn_config(settings: RelaySettings) -> Config:
    read_in_body_pieces()
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    if settings.certfile is not None and settings.keyfile is not None:
        config.certfile = str(settings.certfile)
        config.keyfile = str(settings.keyfile)
    # No access log: request lines may carry things users consider private.
    config.accesslog = None
    config.errorlog = logging.getLogger("repowire.relay.http")
    config.websocket_max_message_size = settings.max_websocket_message_size
    config.max_app_queue_size = APP_QUEUE_SIZE
    config.h11_max_incomplete_size = settings.max_header_size
    # hypercorn's idle timer runs from the accept (and between requests) until a whole request
    # head has arrived: it is the slowloris deadline as well as the keep-alive timeout.
    config.keep_alive_timeout = settings.header_timeout
    # Only counts once the links are drained (see serve_relay), which is where the grace goes.
    config.graceful_timeout = HTTP_STOP_TIMEOUT
    config.backlog = settings.listen_backlog
    config.include_server_header = False
    refuse_websocket_extensions(config)
    contain_connection_failures(config)
    return config


# ---------------------------------------------------------------------- WebSocket extensions

#: Attribute set on a hypercorn ``Config`` whose server must negotiate no WebSocket extension.
_NO_EXTENSIONS = "repowire_refuse_websocket_extensions"
_original_accept: Any = None
_CONTAINED = "repowire_contain_connection_failures"
_original_run: Any = None


def refuse_websocket_extensions(config: Config) -> None:
    """Make the servers run with ``config`` accept WebSockets without any extension.

    hypercorn 0.18 has no option for it: ``Handshake.accept`` (hypercorn/protocol/ws_stream.py)
    always offers wsproto's ``PerMessageDeflate``, and wsproto inflates a whole frame before
    hypercorn's message-size limit is applied, so a quarter of a megabyte of compressed input
    becomes hundreds of megabytes on the relay. The adapter: ``WSStream._accept``, the one place
    that builds the handshake's answer, is wrapped once per process to forget the client's
    ``Sec-WebSocket-Extensions`` offer when the stream's config carries the mark set here. The
    answer then has no ``Sec-WebSocket-Extensions``, the extension stays disabled, and a frame
    with the compression bit set is a protocol error (close 1002). Servers of the same process
    without the mark (the local daemon's) are unchanged.

    Raises RuntimeError if hypercorn's internals are not what this adapter expects (a newer
    hypercorn): better not to start than to serve with compression on.
    """
    global _original_accept
    if _original_accept is None:
        accept = getattr(WSStream, "_accept", None)
        if accept is None or not callable(accept):
            raise RuntimeError(
                "this hypercorn has no WSStream._accept: cannot turn WebSocket compression off"
            )
        _original_accept = accept

        async def _accept_without_extensions(self: WSStream, message: Any) -> None:
            if getattr(self.config, _NO_EXTENSIONS, False):
                # Nothing negotiated: accept() then answers without the header and leaves
                # PerMessageDeflate disabled.
                self.handshake.extensions = None
            await _original_accept(self, message)

        WSStream._accept = _accept_without_extensions  # type: ignore[method-assign]
    setattr(config, _NO_EXTENSIONS, True)


def contain_connection_failures(config: Config) -> None:
    """Make one connection's failure end that connection only, on servers run with ``config``.

    hypercorn's ``TCPServer.run`` (hypercorn/trio/tcp_server.py) catches only ``OSError``;
    anything else raised while it drives one connection (h11's ``LocalProtocolError`` when a
    client's bytes race hypercorn's own error answer, say) leaves the connection's task and
    ends hypercorn's server nursery, and with it every tenant's service. The adapter wraps
    ``TCPServer.run`` once per process: for a server whose config carries the mark set here,
    such an exception is logged in one line and the connection closed. Cancellation still
    passes. Raises RuntimeError if hypercorn's internals are not what it expects.
    """
    global _original_run
    if _original_run is None:
        run = getattr(TCPServer, "run", None)
        if run is None or not callable(run):
            raise RuntimeError("this hypercorn has no TCPServer.run: cannot contain failures")
        _original_run = run

        async def _run_contained(self: TCPServer) -> None:
            try:
                await _original_run(self)
            except Exception as exc:
                if not getattr(self.config, _CONTAINED, False):
                    raise
                failure = exc
                while isinstance(failure, ExceptionGroup) and len(failure.exceptions) == 1:
                    failure = failure.exceptions[0]
                # The type and hypercorn's or h11's own words: no request data, no secret.
                log.warning(
                    "a connection failed inside the HTTP server and was closed: %s: %r",
                    type(failure).__name__,
                    str(failure)[:120],
                )
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self.stream)

        TCPServer.run = _run_contained  # type: ignore[method-assign]
    setattr(config, _CONTAINED, True)


# ---------------------------------------------------------------------- listening sockets


@contextmanager
def _listening(config: Config, what: str, backlog: int) -> Iterator[Sockets]:
    """Listening sockets for the ``host:port`` addresses of ``config.bind`` (TLS ones if
    ``config`` has a certificate), each with :data:`STALLED_PEER_TIMEOUT` (inherited by the
    connections it accepts). Closed on exit. Raises :class:`ListenError`, naming ``what`` and
    the address, if one cannot be bound (and leaves no socket open)."""
    sockets: list[socket.socket] = []
    try:
        for address in config.bind:
            sockets.append(_bind(address, what, backlog))
        if config.ssl_enabled:
            yield Sockets(secure_sockets=sockets, insecure_sockets=[], quic_sockets=[])
        else:
            yield Sockets(secure_sockets=[], insecure_sockets=sockets, quic_sockets=[])
    finally:
        for sock in sockets:
            sock.close()


def _bind(address: str, what: str, backlog: int) -> socket.socket:
    """A socket listening on ``address`` (``host:port``, ``[v6]:port``), or ListenError."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(
                socket.IPPROTO_TCP,
                socket.TCP_USER_TIMEOUT,
                max(1, round(STALLED_PEER_TIMEOUT * 1000)),
            )
        sock.bind((host, int(port)))
        sock.listen(backlog)
        sock.setblocking(False)
    except (OSError, ValueError) as exc:
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EADDRNOTAVAIL
        raise ListenError(code, f"cannot listen for {what} on {address}: {reason}") from None
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------- metrics


def metrics_config(settings: RelaySettings) -> Config:
    """The hypercorn configuration of the metrics listener (``settings.metrics_listen``)."""
    assert settings.metrics_listen is not None
    config = Config()
    config.bind = [settings.metrics_listen]
    config.accesslog = None
    config.errorlog = logging.getLogger("repowire.relay.metrics")
    config.h11_max_incomplete_size = METRICS_MAX_HEADER
    config.keep_alive_timeout = METRICS_HEADER_TIMEOUT
    config.graceful_timeout = HTTP_STOP_TIMEOUT
    config.include_server_header = False
    refuse_websocket_extensions(config)
    contain_connection_failures(config)
    return config


class MetricsApp:
    """The metrics listener's ASGI app: ``GET /metrics`` (Prometheus text), 404 for anything
    else, WebSockets refused. Reads no request body."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": CloseCode.POLICY_VIOLATION})
            return
        if kind != "http":
            return
        if scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD"):
            metrics = self.relay.metrics
            metrics.daemons_connected.set(len(self.relay.links))
            _set_cluster_gauges(self.relay)
            status, body, content_type = 200, metrics.render(), metrics.content_type
        else:
            status, body, content_type = 404, b"not found\n", "text/plain; charset=utf-8"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode("latin-1")),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )


def _set_cluster_gauges(relay: Relay) -> None:
    cluster, metrics = relay.cluster, relay.metrics
    if cluster is None or metrics.peer_links is None or metrics.forwarded_streams is None:
        return
    counts = cluster.link_counts()
    metrics.peer_links.labels("dialed").set(counts.dialed)
    metrics.peer_links.labels("accepted").set(counts.accepted)
    metrics.forwarded_streams.labels("out").set(counts.streams_out)
    metrics.forwarded_streams.labels("in").set(counts.streams_in)


# ---------------------------------------------------------------------- the cluster


def join_cluster(relay: Relay) -> None:
    """Make ``relay`` a replica of a cluster (``settings.clustered``; its store must be the
    Redis one): presence in the store's Redis, shared through its connection pool, and this
    replica's node of the replica mesh (:attr:`Relay.presence`, :attr:`Relay.cluster`).
    Their tasks run under :func:`run_cluster`."""
    # Imported here: coredis is needed only for a cluster.
    from ._presence import WHERE_REUSE_SECONDS, Presence
    from ._redis_store import RedisStore
    from ._replica_link import ClusterNode, ClusterSettings

    settings = relay.settings
    store = relay.store
    if not isinstance(store, RedisStore):
        raise ValueError("a relay cluster keeps its store in Redis (--redis-url)")
    if settings.advertise_url is None or settings.cluster_secret is None:
        raise ValueError("a relay cluster needs --advertise-url and --cluster-secret-file")
    presence = Presence(
        store.client,
        namespace=settings.redis_namespace,
        ttl=settings.presence_ttl,
        # Where daemons are is served from memory through an outage as long as sessions are.
        outage_grace=settings.store_outage_grace,
        # A forwarded request reuses a second-old answer instead of asking Redis each time;
        # the daemon's next claim (presence.watch, below) or a refusal makes it ask again.
        reuse_for=min(WHERE_REUSE_SECONDS, settings.presence_ttl),
    )
    relay.presence = presence
    relay.cluster = ClusterNode(
        replica_id=settings.replica_id,
        secret=settings.cluster_secret,
        advertise_url=settings.advertise_url,
        presence=presence,
        local_stream_opener=relay.open_local_stream,
        scope_slot=relay.forwarded_stream_slot,
        window_budget=(
            StreamScopeBudget(relay.scope_growth) if settings.max_scope_window_growth > 0 else None
        ),
        # A replica waits for a stream to its daemon as long as a request here would.
        settings=ClusterSettings(
            open_timeout=settings.stream_open_timeout,
            max_message_size=settings.max_websocket_message_size,
        ),
    )
    relay.metrics.enable_cluster()


async def run_cluster(
    relay: Relay, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Until cancelled, the cluster's tasks of a relay :func:`join_cluster` set up: the
    replica links (:meth:`ClusterNode.run`), the ``link_claimed`` events (an older link of a
    daemon that moved here is closed) and the refresh of this replica's presence entries
    (which also finds the claims whose events were missed). Started once all of them are;
    never raises for a failing Redis."""
    cluster, presence = relay.cluster, relay.presence
    assert cluster is not None and presence is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(cluster.run)
        await nursery.start(presence.watch, relay.on_link_claimed)
        await nursery.start(presence.run_refresher, relay.held_links, relay.on_links_superseded)
        log.info(
            "replica %s of a cluster, reachable by the others at %s",
            relay.settings.replica_id,
            relay.settings.advertise_url,
        )
        task_status.started()


# ---------------------------------------------------------------------- the key store


@asynccontextmanager
async def open_store(settings: RelaySettings) -> AsyncIterator[Store]:
    """The relay's key store, closed on exit: Redis at ``settings.redis_url`` (not reached
    yet: the relay may start while Redis is down; its session cache rides out outages for
    ``settings.store_outage_grace``), else the SQLite file :data:`STORE_FILE` in
    ``settings.data_dir``. Raises StoreError if the SQLite file cannot be opened."""
    if settings.redis_url is not None:
        # Imported here: coredis is needed only for a cluster.
        from ._redis_store import RedisStore

        async with RedisStore.open(
            settings.redis_url,
            namespace=settings.redis_namespace,
            outage_grace=settings.store_outage_grace,
        ) as redis:
            yield redis
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with SqliteStore.open(settings.data_dir / STORE_FILE) as sqlite:
        yield sqlite


async def watch_store(
    relay: Relay, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Until cancelled: end the access of every key revoked or rotated, and of every session
    ended, through any store object on the relay's data (this relay, another replica, the
    CLI), as the store's change feed announces them (:meth:`Relay.on_store_change`: links
    closed with 4403, browser requests cancelled, cached sessions dropped). Started once the
    feed has first tried the store; never raises for a failing store (the feed retries)."""
    await relay.store.watch(relay.on_store_change, task_status=task_status)


async def purge_sessions(relay: Relay, interval: float = PURGE_INTERVAL) -> None:
    """Until cancelled: every ``interval`` seconds, delete the expired sessions from the
    store. A failure is logged and tried again at the next turn."""
    while True:
        await trio.sleep(interval)
        try:
            purged = await relay.store.purge_expired(now=relay.clock())
        except StoreError as exc:
            relay.store_failed(exc)
            log.warning("expired sessions not purged: %s", str(exc))
        else:
            if purged:
                log.info("purged %d expired browser sessions", purged)


async def serve_relay(
    settings: RelaySettings,
    *,
    task_status: trio.TaskStatus[RunningRelay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay until cancelled or until :meth:`RunningRelay.shutdown` is called.

    ``await nursery.start(serve_relay, settings)`` returns once it listens. A shutdown sends a
    go-away to every daemon, closes each link with 4503 (so connectors come back promptly) as
    soon as its streams are done, an idle link at once, a busy one after at most
    ``settings.shutdown_grace`` seconds, then stops hypercorn, which gives the connections left
    :data:`HTTP_STOP_TIMEOUT` seconds.

    Beside the public listener it runs the metrics listener (``settings.metrics_listen``, if
    set; its URL is :attr:`RunningRelay.metrics_url`), the store's change feed
    (:func:`watch_store`), a probe of the store's health and :func:`purge_sessions`. The key
    store is :func:`open_store`'s. A replica of a cluster (``settings.clustered``) also joins
    it (:func:`join_cluster`, :func:`run_cluster`) before it serves, and its shutdown drains
    the replica links at the same time as the daemon links. Raises :class:`ListenError`
    (before reporting) if a listener cannot be bound, StoreError if the SQLite store cannot be
    opened, ValueError for settings hypercorn cannot run with (or a cluster without Redis).
    """
    config = hypercorn_config(settings)
    # Unmasking every byte the connectors send costs a fifth of the relay's CPU in bulk
    # transfers on the pure path; with numpy (the fast extra) it is one vectorised pass.
    install_fast_masking()
    stop = trio.Event()
    async with open_store(settings) as store:
        relay = Relay(settings, store)
        if settings.clustered:
            join_cluster(relay)
        try:
            await _serve(relay, config, stop, task_status=task_status)
        finally:
            if stop.is_set():
                log.info("relay stopped")


async def _serve(
    relay: Relay,
    config: Config,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[RunningRelay],
) -> None:
    settings = relay.settings
    app = RelayApp(relay)
    http_stopped = trio.Event()
    with _listening(config, "the relay", settings.listen_backlog) as sockets:
        async with trio.open_nursery() as nursery:
            # Before anything is served, and stopped once hypercorn has: the last requests it
            # serves may still be forwarded to other replicas.
            clustering = trio.CancelScope()
            if relay.cluster is not None:
                await nursery.start(_in_scope, clustering, partial(run_cluster, relay))

            async def serve_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    await worker_serve(
                        wrap_app(app, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                        config,
                        sockets=sockets,
                        shutdown_trigger=http_stopped.wait,
                        task_status=task_status,
                    )
                finally:
                    clustering.cancel()

            binds = await nursery.start(serve_http)
            metrics_url = None
            if settings.metrics_listen is not None:
                metrics_url = await nursery.start(_serve_metrics, relay, http_stopped)
            # Their own scope: stopping them must not cancel hypercorn, whose connections
            # get HTTP_STOP_TIMEOUT once the links are drained.
            watcher = trio.CancelScope()

            async def watch(*, task_status: trio.TaskStatus[None]) -> None:
                with watcher:
                    async with trio.open_nursery() as tasks:
                        await tasks.start(relay.store_health.probe, relay.store)
                        tasks.start_soon(purge_sessions, relay)
                        await watch_store(relay, task_status=task_status)

            await nursery.start(watch)
            task_status.started(RunningRelay(relay, list(binds), stop, metrics_url))
            try:
                await stop.wait()
            finally:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + settings.shutdown_grace + 5
                    try:
                        await _drain_links(relay)
                    finally:
                        # Even past the deadline: without it hypercorn would never stop.
                        http_stopped.set()
                # The watcher's work is done once the links are.
                watcher.cancel()


async def _in_scope(
    scope: trio.CancelScope,
    run: Callable[..., Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``await run(task_status=...)`` inside ``scope`` (cancelled by its owner)."""
    with scope:
        await run(task_status=task_status)


async def _serve_metrics(
    relay: Relay, stopped: trio.Event, *, task_status: trio.TaskStatus[str]
) -> None:
    """Serve :class:`MetricsApp` on ``settings.metrics_listen`` until ``stopped`` is set;
    report its URL. Raises :class:`ListenError` (before reporting) if the address cannot be
    bound."""
    config = metrics_config(relay.settings)
    with _listening(config, "/metrics", METRICS_BACKLOG) as sockets:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(
                    worker_serve,
                    wrap_app(MetricsApp(relay), config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                    config,
                    sockets=sockets,
                    shutdown_trigger=stopped.wait,
                )
            )
            task_status.started(f"{binds[0]}/metrics")


async def _drain_links(relay: Relay) -> None:
    """Go-away to every link; each closes with 4503 as soon as its last stream has ended (an
    idle link at once), or when the grace runs out. Returns once every link's handler is done,
    its close frame written: stopping hypercorn earlier would cut links whose close is still
    queued behind thousands of others, and their daemons would never see the 4503."""
    relay.shutting_down = True
    grace = relay.settings.shutdown_grace
    links = relay.links.all()
    started = trio.current_time()
    log.info("shutting down: closing %d daemon links (up to %g s for streams)", len(links), grace)

    async def drain(link: DaemonLink) -> None:
        await link.session.drain(grace, ErrorCode.SHUTTING_DOWN, "relay shutting down")
        await link.session.aclose(CloseCode.SHUTTING_DOWN, "relay shutting down")
        await link.finished.wait()

    async with trio.open_nursery() as nursery:
        for link in links:
            nursery.start_soon(drain, link)
        if relay.cluster is not None:
            # At the same time, not after: the forwards this replica sent to its peers
            # (browsers here, daemons there) finish within the same grace as the streams of
            # its own daemons, and peers stop forwarding here (their requests fail over to
            # where presence names the daemons next).
            nursery.start_soon(relay.cluster.drain, grace)
    log.info("daemon links closed in %.1f s", trio.current_time() - started)


async def serve_relay_main(settings: RelaySettings) -> None:
    """`repowire relay start`: serve, print where, stop gracefully on SIGTERM or SIGINT.

    It owns its process, so it also sets the process's garbage collector (:data:`GC_THRESHOLDS`).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if logging.getLogger().getEffectiveLevel() >= logging.INFO:
        # coredis notes at INFO, as a "retry due to error", each Lua script it loads into a
        # Redis that does not have it yet (every start, every Redis restart): noise in a
        # relay's log. Its warnings stay; -v shows everything.
        logging.getLogger("coredis").setLevel(logging.WARNING)
    gc.set_threshold(*GC_THRESHOLDS)
    failure: ListenError | None = None
    try:
        async with trio.open_nursery() as nursery:
            running: RunningRelay = await nursery.start(serve_relay, settings)
            for bind in running.binds:
                print(f"repowire relay listening on {bind}", flush=True)
            print(f"daemons connect to {running.url.replace('http', 'ws', 1)}/ws/relay", flush=True)
            if running.metrics_url is not None:
                print(f"metrics served on {running.metrics_url}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    print(f"received {signal.Signals(signum).name}; shutting down", file=sys.stderr)
                    running.shutdown()
                    break
    except* ListenError as group:
        # The group nests (serve_relay's nursery in this one): find the error itself.
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        assert isinstance(error, ListenError)
        failure = error
    if failure is not None:
        # One line (the caller prints strerror), not a traceback.
        raise ListenError(failure.errno, failure.strerror)
