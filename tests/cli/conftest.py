"""Fixtures for the command-line tests: an isolated home, scripted HTTP servers on loopback
(plain, or behind TLS: ``tests.support.tls``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common import generate_key
from tests.support.fake_http import FakeHttpServer, serve_fake
from tests.support.processes import free_port

# A conftest below the top one cannot load a plugin (pytest_plugins): imported, they serve
# every test of this folder.
from tests.support.tls import self_signed, tls_server  # noqa: F401 (fixtures)

_ENV_NAMES = (
    "REPOWIRE_HOME",
    "REPOWIRE_RELAY_URL",
    "REPOWIRE_API_KEY",
    "REPOWIRE_RELAY_ENABLED",
    "REPOWIRE_DAEMON_PORT",
    "REPOWIRE_DEBUG",
)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``REPOWIRE_HOME`` and no Repowire variables inherited from the environment."""
    for name in _ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    # Proxies from the machine's environment must not divert loopback test traffic.
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("REPOWIRE_HOME", str(home))
    return home


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
async def http_server() -> AsyncIterator[FakeHttpServer]:
    """A plain-HTTP scripted server on 127.0.0.1 (a relay's API, or a daemon's /health)."""
    async with serve_fake(FakeHttpServer()) as server:
        yield server


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    return free_port()
