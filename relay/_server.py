"""Running a relay: hypercorn serving :class:`RelayApp`, and its graceful shutdown."""

from __future__ import annotations

import gc
import logging
import signal
import sys
from functools import partial

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from protocol import CloseCode, ErrorCode

from ._app import RelayApp
from ._context import Relay
from ._links import DaemonLink
from ._settings import RelaySettings
from ._store import KeyStore

log = logging.getLogger("repowire.relay")

#: Database file of the key store, inside the data directory.
STORE_FILE = "relay.sqlite3"
#: Largest WebSocket message accepted on a daemon link (the connector sends at most 256 KiB).
LINK_MAX_MESSAGE = 4 * 1024 * 1024
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


@attrs.define
class RunningRelay:
    """What :func:`serve_relay` reports once it listens."""

    relay: Relay
    #: Bound addresses, e.g. ``["http://127.0.0.1:45123"]``.
    binds: list[str]
    _stop: trio.Event

    @property
    def url(self) -> str:
        return self.binds[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def shutdown(self) -> None:
        """Start a graceful shutdown (what SIGTERM does)."""
        self._stop.set()


def hypercorn_config(settings: RelaySettings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    if settings.certfile is not None and settings.keyfile is not None:
        config.certfile = str(settings.certfile)
        config.keyfile = str(settings.keyfile)
    # No access log: request lines may carry things users consider private.
    config.accesslog = None
    config.errorlog = logging.getLogger("repowire.relay.http")
    config.websocket_max_message_size = LINK_MAX_MESSAGE
    config.h11_max_incomplete_size = settings.max_header_size
    # hypercorn's idle timer runs from the accept (and between requests) until a whole request
    # head has arrived: it is the slowloris deadline as well as the keep-alive timeout.
    config.keep_alive_timeout = settings.header_timeout
    # Only counts once the links are drained (see serve_relay), which is where the grace goes.
    config.graceful_timeout = HTTP_STOP_TIMEOUT
    config.backlog = settings.listen_backlog
    config.include_server_header = False
    return config


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
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = KeyStore.open(settings.data_dir / STORE_FILE)
    relay = Relay(settings, store)
    app = RelayApp(relay)
    stop = trio.Event()
    http_stopped = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(serve, app, hypercorn_config(settings), shutdown_trigger=http_stopped.wait)  # type: ignore[arg-type]
            )
            task_status.started(RunningRelay(relay, list(binds), stop))
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
    finally:
        store.close()
        if stop.is_set():
            log.info("relay stopped")


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
    log.info("daemon links closed in %.1f s", trio.current_time() - started)


async def serve_relay_main(settings: RelaySettings) -> None:
    """`repowire relay start`: serve, print where, stop gracefully on SIGTERM or SIGINT.

    It owns its process, so it also sets the process's garbage collector (:data:`GC_THRESHOLDS`).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    gc.set_threshold(*GC_THRESHOLDS)
    async with trio.open_nursery() as nursery:
        running: RunningRelay = await nursery.start(serve_relay, settings)
        for bind in running.binds:
            print(f"repowire relay listening on {bind}", flush=True)
        print(f"daemons connect to {running.url.replace('http', 'ws', 1)}/ws/relay", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                print(f"received {signal.Signals(signum).name}; shutting down", file=sys.stderr)
                running.shutdown()
                break
