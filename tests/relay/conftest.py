"""Fixtures shared by the relay suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.support.relays import StackFactory, relay_stacks

#: Hard stop for the relays of one test, teardown included (each test has its own, shorter
#: deadline around what it checks).
STACK_LIFETIME = 120


@pytest.fixture
async def stacks(tmp_path: Path) -> AsyncIterator[StackFactory]:
    """``await stacks(**settings)`` starts one more relay stack; all stop with the test."""
    with trio.fail_after(STACK_LIFETIME):
        async with relay_stacks(tmp_path) as start:
            yield start
