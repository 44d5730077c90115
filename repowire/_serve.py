"""`repowire serve`: the local daemon, with the connector beside it when relay access is on."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping

import attrs
import trio

from connector import SHUTDOWN_GRACE, Connector, ConnectorConfig, LinkState

from . import __version__
from ._runtime import RuntimeRecord, acquire_home
from .config import Settings, dashboard_url
from .daemon import DaemonState, create_app, serve_daemon
from .dashboard import STATIC_DIR

log = logging.getLogger("repowire")

#: Seconds a stopping daemon gives its relay link to close cleanly (GOAWAY, the streams in
#: flight, the closing handshake) before it stops regardless.
STOP_TIMEOUT = SHUTDOWN_GRACE + 2.0


def build_connector(settings: Settings) -> Connector | None:
    """The connector for these settings, or None when relay access is off."""
    relay = settings.relay
    if not relay.enabled:
        return None
    if relay.api_key is None:
        raise ValueError("relay access is enabled but no API key is configured")
    return Connector(
        ConnectorConfig(
            relay_url=relay.url,
            api_key=relay.api_key,
            daemon_id=settings.daemon.daemon_id,
            daemon_host=settings.daemon.host,
            daemon_port=settings.daemon.port,
            ca_file=relay.ca_file,
            version=__version__,
        )
    )


async def run_daemon(
    settings: Settings,
    *,
    task_status: trio.TaskStatus[
        tuple[tuple[str, int], Connector | None]
    ] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the daemon (and its connector) until cancelled. Reports ``(address, connector)``.

    The connector starts once the daemon listens, so the first tunneled request finds it.
    """
    connector = build_connector(settings)

    def relay_status() -> Mapping[str, object]:
        assert connector is not None
        return connector.status().to_json()

    app = create_app(
        daemon_id=settings.daemon.daemon_id,
        version=__version__,
        state=DaemonState(),
        mesh=connector,
        relay_status=relay_status if connector is not None else None,
        dashboard_dir=STATIC_DIR,
    )
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            lambda task_status: serve_daemon(
                app, host=settings.daemon.host, port=settings.daemon.port, task_status=task_status
            )
        )
        if connector is not None:
            # The daemon's real port (it may have been 0) is where tunneled streams go.
            connector.config = attrs.evolve(connector.config, daemon_port=address[1])
            await nursery.start(connector.run)
        task_status.started((address, connector))


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


async def announce_dashboard(connector: Connector, url: str) -> None:
    """Print ``url`` (the dashboard through the relay) once, when the link first comes up:
    it is where the user points a browser or a phone."""
    await connector.wait_state(LinkState.CONNECTED)
    print(f"relay link up: dashboard at {url}", flush=True)


async def serve(settings: Settings) -> None:
    """The `repowire serve` command: run until SIGTERM or SIGINT.

    Holds the home's daemon lock for its whole run and publishes the runtime file
    (``<home>/daemon.json``) once the listener is bound; removes it on the way out.

    Raises :class:`~repowire._runtime.DaemonAlreadyRunning` (before binding anything) when a
    daemon of the same home is running, OSError when the address cannot be bound.
    """
    # Logging is set up by the command line (repowire._logging), before this runs.
    # In a thread: the claim may retry for a moment while a reader tests the lock.
    claim = await trio.to_thread.run_sync(acquire_home, settings.home)
    try:
        async with trio.open_nursery() as nursery:
            (host, port), connector = await nursery.start(run_daemon, settings)
            record = RuntimeRecord(
                pid=os.getpid(),
                host=host,
                port=port,
                daemon_id=settings.daemon.daemon_id,
                started_at=time.time(),
                version=__version__,
            )
            await trio.to_thread.run_sync(claim.publish, record)
            print(f"repowire daemon {settings.daemon.daemon_id} listening on http://{host}:{port}")
            print(f"dashboard: http://{host}:{port}/dashboard/")
            if connector is not None:
                print(f"relay access on: connecting to {settings.relay.url}", flush=True)
                nursery.start_soon(
                    announce_dashboard,
                    connector,
                    dashboard_url(settings.relay.url, settings.daemon.daemon_id),
                )
            else:
                print("relay access off (repowire setup --relay to turn it on)")
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
                if connector is not None:
                    # Tell the relay this daemon is going away rather than drop the link; a
                    # second signal meanwhile stops at once.
                    with trio.move_on_after(STOP_TIMEOUT):
                        async with trio.open_nursery() as stopping:
                            stopping.start_soon(_cancel_on_signal, signals, stopping.cancel_scope)
                            await connector.shutdown()
                            stopping.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    finally:
        # Synchronous on purpose: it must also run while cancelled, and it is two file calls.
        claim.release()
