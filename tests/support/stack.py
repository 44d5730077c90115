"""An in-process stack: a relay, real daemons and the real connectors linking them to it.

- :func:`connector_config` and :func:`fast_connector_config`: connector settings with short
  timeouts and backoff.
- :func:`start_connected_daemon` and :class:`ConnectedDaemon`: a daemon on 127.0.0.1:0 whose
  connector is its mesh client (as in `repowire serve --relay`), stoppable and restartable;
  :func:`start_daemon_for` does the same for a connector the test built.
- :class:`Stack` and :func:`open_stack`: the nurseries of one test's stack, relays stopped
  before daemons, with helpers to start (and restart) each part.

Every part listens on 127.0.0.1, port 0; relays come from :mod:`tests.support.relays`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from connector import Connector, ConnectorConfig, LinkState
from mux import link_mux_config
from protocol import BackoffConfig
from repowire.daemon import DaemonState

from .clients import Address, HttpResponse
from .daemons import RunningDaemon, start_daemon
from .processes import free_port
from .relays import RelayHandle, RelayRunner, start_relay

#: Seconds :func:`start_daemon_for` waits for the link to come up.
CONNECT_WAIT = 5.0


def connector_config(relay_url: str, api_key: str, daemon_id: str) -> ConnectorConfig:
    """Connector settings for tests: short timeouts and backoff (``attrs.evolve`` the rest).

    The daemon port is a loopback port nothing listens on until a test sets its own: the
    connector's default (8377) may be the user's own daemon.
    """
    return ConnectorConfig(
        relay_url=relay_url,
        api_key=api_key,
        daemon_id=daemon_id,
        daemon_port=free_port(),
        backoff=BackoffConfig(base=0.05, cap=1.0, stable_after=5.0, restart_spread=0.2),
        # The connector's own link settings (link_mux_config), with a quicker keepalive.
        mux=attrs.evolve(link_mux_config(), keepalive_interval=1.0, keepalive_timeout=1.0),
        connect_timeout=2.0,
        mesh_timeout=5.0,
    )


def fast_connector_config(
    relay: RelayHandle, key: str, daemon_id: str, daemon_port: int, **changes: Any
) -> ConnectorConfig:
    """:func:`connector_config` for ``relay``, piping to ``daemon_port``, updated with
    ``changes`` (``relay_url=proxy.ws_url``, say)."""
    config = connector_config(relay.ws_url, key, daemon_id)
    return attrs.evolve(config, daemon_port=daemon_port, **changes)


@attrs.define(kw_only=True)
class ConnectedDaemon:
    """A real daemon whose connector is its mesh client, as in `repowire serve --relay`."""

    daemon: RunningDaemon
    connector: Connector
    _scope: trio.CancelScope
    _stopped: trio.Event
    _nursery: trio.Nursery
    _dashboard_dir: Path
    _rand: Callable[[], float] | None

    @property
    def daemon_id(self) -> str:
        return self.daemon.daemon_id

    @property
    def address(self) -> Address:
        return self.daemon.address

    @property
    def state(self) -> DaemonState:
        return self.daemon.state

    async def request(self, method: str, path: str, **kwargs: Any) -> HttpResponse:
        """A request to the daemon itself (not through the relay)."""
        return await self.daemon.request(method, path, **kwargs)

    def cancel(self) -> None:
        """Stop the daemon and its connector (without waiting)."""
        self._scope.cancel()

    async def stop(self) -> None:
        """Stop the daemon and its connector and wait until both are gone."""
        self._scope.cancel()
        await self._stopped.wait()

    async def restart(self, *, wait: bool = True) -> None:
        """:meth:`stop`, then start a fresh daemon (on a new port, with empty state) and a
        fresh connector with the same settings; with ``wait``, return once it is linked."""
        await self.stop()
        config = attrs.evolve(self.connector.config, daemon_port=0)
        connector = Connector(config) if self._rand is None else Connector(config, rand=self._rand)
        fresh = await start_daemon_for(
            self._nursery, connector, self._dashboard_dir, wait=wait, rand=self._rand
        )
        self.daemon, self.connector = fresh.daemon, fresh.connector
        self._scope, self._stopped = fresh._scope, fresh._stopped


async def start_connected_daemon(
    nursery: trio.Nursery,
    relay: RelayHandle,
    key: str,
    daemon_id: str,
    dashboard_dir: Path,
    *,
    rand: Callable[[], float] | None = None,
    wait: bool = True,
    **connector_changes: Any,
) -> ConnectedDaemon:
    """A daemon on 127.0.0.1:0 and a connector with :func:`fast_connector_config` (updated
    with ``connector_changes``, e.g. ``relay_url=proxy.ws_url``); see :func:`start_daemon_for`.

    ``rand`` replaces the connector's entropy (uniform in [0, 1)), which makes every backoff
    delay exact.
    """
    config = fast_connector_config(relay, key, daemon_id, 0, **connector_changes)
    connector = Connector(config) if rand is None else Connector(config, rand=rand)
    return await start_daemon_for(nursery, connector, dashboard_dir, wait=wait, rand=rand)


async def start_daemon_for(
    nursery: trio.Nursery,
    connector: Connector,
    dashboard_dir: Path,
    *,
    wait: bool = True,
    rand: Callable[[], float] | None = None,
) -> ConnectedDaemon:
    """A daemon on 127.0.0.1:0 (id: the connector's) whose mesh client is ``connector``, and
    the connector piping to it, both under one cancel scope in ``nursery``. With ``wait`` the
    call returns once the link is connected (within :data:`CONNECT_WAIT`). ``rand`` is what a
    restart gives the next connector."""

    async def run(*, task_status: trio.TaskStatus[ConnectedDaemon]) -> None:
        stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    daemon = await start_daemon(
                        inner,
                        daemon_id=connector.config.daemon_id,
                        dashboard_dir=dashboard_dir,
                        mesh=connector,
                        relay_status=lambda: connector.status().to_json(),
                    )
                    connector.config = attrs.evolve(connector.config, daemon_port=daemon.address[1])
                    await inner.start(connector.run)
                    task_status.started(
                        ConnectedDaemon(
                            daemon=daemon,
                            connector=connector,
                            scope=scope,
                            stopped=stopped,
                            nursery=nursery,
                            dashboard_dir=dashboard_dir,
                            rand=rand,
                        )
                    )
        finally:
            stopped.set()

    handle: ConnectedDaemon = await nursery.start(run)
    if wait:
        with trio.fail_after(CONNECT_WAIT):
            await connector.wait_state(LinkState.CONNECTED)
    return handle


@attrs.define(kw_only=True)
class Stack:
    """Two nurseries: ``relays`` (relays, proxies, fake relays) is stopped before ``daemons``
    (daemons and connectors).

    The order keeps teardown fast: a connector whose relay is already gone is waiting to
    redial and stops at once, while one cancelled with its link up waits for the closing
    handshake.
    """

    daemons: trio.Nursery
    relays: trio.Nursery
    tmp_path: Path
    dashboard_dir: Path

    async def start_relay(self, name: str = "relay", **settings: Any) -> RelayHandle:
        """A running relay with its data directory in ``tmp_path/name``."""
        return await start_relay(self.relays, self.tmp_path / name, **settings)

    def relay_runner(self, name: str = "relay", **settings: Any) -> RelayRunner:
        """A relay that can be restarted (not started yet), data directory ``tmp_path/name``."""
        return RelayRunner(self.relays, self.tmp_path / name, **settings)

    async def start_daemon(
        self,
        relay: RelayHandle,
        key: str,
        daemon_id: str,
        *,
        rand: Callable[[], float] | None = None,
        wait: bool = True,
        **connector_changes: Any,
    ) -> ConnectedDaemon:
        """:func:`start_connected_daemon` in ``daemons`` with this stack's dashboard."""
        return await start_connected_daemon(
            self.daemons,
            relay,
            key,
            daemon_id,
            self.dashboard_dir,
            rand=rand,
            wait=wait,
            **connector_changes,
        )


@asynccontextmanager
async def open_stack(tmp_path: Path, dashboard_dir: Path) -> AsyncIterator[Stack]:
    """A :class:`Stack` whose relays, then daemons, are cancelled on exit."""
    async with trio.open_nursery() as daemons:
        try:
            async with trio.open_nursery() as relays:
                try:
                    yield Stack(
                        daemons=daemons,
                        relays=relays,
                        tmp_path=tmp_path,
                        dashboard_dir=dashboard_dir,
                    )
                finally:
                    relays.cancel_scope.cancel()
        finally:
            daemons.cancel_scope.cancel()
