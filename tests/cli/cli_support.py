"""Helpers for the command-line tests: running ``main`` beside a trio server, output checks.

The command line is blocking (``urllib``), so async tests run it in a worker thread while the
fake server (:mod:`tests.support.fake_http`) answers in the test's event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from repowire.cli import main

#: Seconds any single network test may take.
NETWORK_TEST_TIMEOUT = 20


def one_line(text: str) -> str:
    """The single line of ``text`` (asserting there is exactly one, and no traceback)."""
    assert "Traceback" not in text
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    return lines[0]


def write_config(home: Path, text: str) -> Path:
    """Create ``home`` and write ``text`` as its config file; returns the file's path."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.yaml"
    path.write_text(text)
    return path


def read_config(home: Path) -> str:
    return (home / "config.yaml").read_text()


async def run_cli(argv: Sequence[str]) -> int:
    """``main(argv)`` in a worker thread, so the test's event loop keeps serving meanwhile."""
    return await trio.to_thread.run_sync(main, list(argv), abandon_on_cancel=True)
