"""Fixtures for the daemon tests; the helpers they use live in tests/support/daemons.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.daemons import DaemonFactory, RunningDaemon, start_daemon


@pytest.fixture
def daemon_factory(nursery: trio.Nursery, dashboard_dir: Path) -> DaemonFactory:
    """Start daemons (keyword arguments as :func:`start_daemon`); stopped after the test."""

    async def factory(**kwargs: Any) -> RunningDaemon:
        kwargs.setdefault("dashboard_dir", dashboard_dir)
        return await start_daemon(nursery, **kwargs)

    return factory
