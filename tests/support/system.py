"""Optional system parts (Chromium, nginx, Caddy, curl, openssl, node, systemd-analyze).

A suite that needs one skips with a clear reason where it is missing, so the README's test
command passes on a fresh machine. ``.ci/run`` installs every part and sets
:data:`REQUIRE_ENV`; the root ``conftest.py`` then turns each such skip into a failure, so a
missing install step cannot hide behind a green run.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

#: Set to ``1`` (as ``.ci/run`` does) to make a missing system part fail its tests.
REQUIRE_ENV = "REPOWIRE_REQUIRE_SYSTEM_PARTS"
#: Every skip for a missing part starts with this, which is how the hook recognises it.
MISSING_PREFIX = "missing system part: "


def required() -> bool:
    """Whether missing parts must fail instead of skip (``REPOWIRE_REQUIRE_SYSTEM_PARTS=1``)."""
    return os.environ.get(REQUIRE_ENV, "") == "1"


def reason(part: str, install: str) -> str:
    return f"{MISSING_PREFIX}{part} (install it with: {install})"


def needs(part: str, present: bool, install: str) -> pytest.MarkDecorator:
    """A mark that skips a test (or a module, as ``pytestmark``) where ``part`` is missing."""
    return pytest.mark.skipif(not present, reason=reason(part, install))


def skip_missing(part: str, install: str) -> NoReturn:
    """Skip the running test because ``part`` is missing (a failure under REQUIRE_ENV)."""
    pytest.skip(reason(part, install))
