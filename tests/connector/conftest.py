"""Fixtures for the connector's integration tests; the helpers live in tests/support/."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.stack import Stack, open_stack


@pytest.fixture
async def stack(tmp_path: Path, dashboard_dir: Path) -> AsyncIterator[Stack]:
    """A :class:`tests.support.stack.Stack`: relays stopped before daemons after the test."""
    async with open_stack(tmp_path, dashboard_dir) as running:
        yield running
