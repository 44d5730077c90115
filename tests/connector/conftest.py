"""Fixtures for the connector's integration tests; the helpers live in connector_support.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.relay.relay_support import RelayHandle, start_relay

from .connector_support import RelayRunner


@pytest.fixture
def dashboard_dir(tmp_path: Path) -> Path:
    """A dashboard directory with an ``index.html``."""
    root = tmp_path / "dashboard"
    root.mkdir()
    (root / "index.html").write_text("<!doctype html><title>dashboard</title>")
    return root


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


@pytest.fixture
async def stack(tmp_path: Path, dashboard_dir: Path) -> AsyncIterator[Stack]:
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
