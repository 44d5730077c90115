"""Suite-wide hooks."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from tests.support.daemons import write_dashboard
from tests.support.system import MISSING_PREFIX, REQUIRE_ENV, required


@pytest.fixture
def dashboard_dir(tmp_path: Path) -> Path:
    """A dashboard directory with an ``index.html``."""
    return write_dashboard(tmp_path / "dashboard")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    """Under ``REPOWIRE_REQUIRE_SYSTEM_PARTS=1`` a skip for a missing system part fails."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and required()):
        return
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if MISSING_PREFIX in message:
        report.outcome = "failed"
        report.longrepr = f"{message.removeprefix('Skipped: ')}; {REQUIRE_ENV}=1 requires it"
