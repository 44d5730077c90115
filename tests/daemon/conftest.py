"""Fixtures for the daemon tests; the helpers they use live in daemon_support.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from .daemon_support import DaemonFactory, RunningDaemon, start_daemon


@pytest.fixture
def dashboard_dir(tmp_path: Path) -> Path:
    """A dashboard directory with an ``index.html``."""
    root = tmp_path / "dashboard"
    root.mkdir()
    (root / "index.html").write_text("<!doctype html><title>dashboard</title>")
    return root


@pytest.fixture
def daemon_factory(nursery: trio.Nursery, dashboard_dir: Path) -> DaemonFactory:
    """Start daemons (keyword arguments as :func:`start_daemon`); stopped after the test."""

    async def factory(**kwargs: Any) -> RunningDaemon:
        kwargs.setdefault("dashboard_dir", dashboard_dir)
        return await start_daemon(nursery, **kwargs)

    return factory
