"""Helpers for tests that run a real relay (hypercorn on 127.0.0.1, port 0) in-process.

- :func:`start_relay`: a relay under a nursery, with helpers to mint keys and browser sessions.
- :func:`start_stack`: a relay, a real local daemon and a real connector linking them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import trio

from connector import Connector, ConnectorConfig, LinkState
from mux import MuxConfig
from protocol import BackoffConfig
from relay import KeyRecord, RelaySettings, RunningRelay, serve_relay
from repowire.daemon import DaemonState, create_app, serve_daemon
from repowire.dashboard import static_dir
from tests.daemon.daemon_support import Address

#: Relay settings that keep tests fast: short grace, frequent pings.
FAST = {"shutdown_grace": 1.0, "link_ping_interval": 2.0, "link_ping_timeout": 2.0}


@attrs.define(kw_only=True)
class RelayHandle:
    running: RunningRelay

    @property
    def address(self) -> Address:
        return ("127.0.0.1", self.running.port)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.running.port}"

    def new_scope(self, label: str = "test") -> tuple[KeyRecord, str]:
        """A new user scope and its key."""
        return self.running.relay.store.create_scope(label=label, now=time.time())

    def session_cookie(self, record: KeyRecord) -> tuple[str, str]:
        """A ``("Cookie", ...)`` header of a fresh browser session for ``record``'s scope."""
        session_id = self.running.relay.store.create_session(record, now=time.time(), ttl=3600)
        return ("Cookie", f"repowire_session={session_id}")


def relay_options(**settings: object) -> dict[str, object]:
    """Settings of a test relay: :data:`FAST`, the bundled dashboard (as `repowire relay start`
    serves it; ``dashboard_dir=None`` for none), then ``settings``."""
    return {"dashboard_dir": static_dir(), **FAST, **settings}


async def start_relay(nursery: trio.Nursery, data_dir: Path, **settings: object) -> RelayHandle:
    options = relay_options(**settings)
    running: RunningRelay = await nursery.start(
        serve_relay,
        RelaySettings(data_dir=data_dir, port=0, **options),  # type: ignore[arg-type]
    )
    return RelayHandle(running=running)


def fast_connector_config(
    relay: RelayHandle, key: str, daemon_id: str, daemon_port: int, **changes: Any
) -> ConnectorConfig:
    config = ConnectorConfig(
        relay_url=relay.ws_url,
        api_key=key,
        daemon_id=daemon_id,
        daemon_port=daemon_port,
        backoff=BackoffConfig(base=0.05, cap=1.0, stable_after=5.0, restart_spread=0.2),
        mux=MuxConfig(keepalive_interval=1.0, keepalive_timeout=1.0),
        connect_timeout=2.0,
        mesh_timeout=5.0,
    )
    return attrs.evolve(config, **changes)


@attrs.define(kw_only=True)
class DaemonHandle:
    daemon_id: str
    address: Address
    state: DaemonState
    connector: Connector


async def start_daemon_with_connector(
    nursery: trio.Nursery,
    relay: RelayHandle,
    key: str,
    daemon_id: str,
    dashboard_dir: Path,
    *,
    wait: bool = True,
    **connector_changes: Any,
) -> DaemonHandle:
    """A real daemon on 127.0.0.1:0 with its connector dialling ``relay`` (and serving as the
    daemon's mesh client, as in `repowire serve --relay`)."""
    state = DaemonState()
    connector = Connector(fast_connector_config(relay, key, daemon_id, 0, **connector_changes))
    app = create_app(
        daemon_id=daemon_id,
        version="test",
        state=state,
        mesh=connector,
        relay_status=lambda: connector.status().to_json(),
        dashboard_dir=dashboard_dir,
    )
    address: Address = await nursery.start(
        lambda task_status: serve_daemon(app, port=0, task_status=task_status)
    )
    connector.config = attrs.evolve(connector.config, daemon_port=address[1])
    await nursery.start(connector.run)
    if wait:
        with trio.fail_after(5):
            await connector.wait_state(LinkState.CONNECTED)
    return DaemonHandle(daemon_id=daemon_id, address=address, state=state, connector=connector)
