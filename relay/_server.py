"""Running a relay: hypercorn serving :class:`RelayApp`, and its graceful shutdown."""

from __future__ import annotations

import logging
import signal
import sys
from functools import partial

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from mux import MuxSession
from protocol import CloseCode, ErrorCode

from ._app import RelayApp
from ._context import Relay
from ._settings import RelaySettings
from ._store import KeyStore

log = logging.getLogger("repowire.relay")

#: Database file of the key store, inside the data directory.
STORE_FILE = "relay.sqlite3"
#: Largest WebSocket message accepted on a daemon link (the connector sends at most 256 KiB).
LINK_MAX_MESSAGE = 4 * 1024 * 1024


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
    config.graceful_timeout = settings.shutdown_grace
    config.include_server_header = False
    return config


async def serve_relay(
    settings: RelaySettings,
    *,
    task_status: trio.TaskStatus[RunningRelay] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay until cancelled or until :meth:`RunningRelay.shutdown` is called.

    ``await nursery.start(serve_relay, settings)`` returns once it listens. A shutdown sends a
    go-away to every daemon, gives in-flight streams ``settings.shutdown_grace`` seconds, closes
    the links with 4503 (so connectors come back promptly), then stops hypercorn.
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
                    await _drain_links(relay)
                    http_stopped.set()
    finally:
        store.close()


async def _drain_links(relay: Relay) -> None:
    relay.shutting_down = True
    grace = relay.settings.shutdown_grace

    async def drain(link_session: MuxSession) -> None:
        await link_session.drain(grace, ErrorCode.SHUTTING_DOWN, "relay shutting down")
        await link_session.aclose(CloseCode.SHUTTING_DOWN, "relay shutting down")

    async with trio.open_nursery() as nursery:
        for link in relay.links.all():
            nursery.start_soon(drain, link.session)


async def serve_relay_main(settings: RelaySettings) -> None:
    """`repowire relay start`: serve, print where, stop gracefully on SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
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
