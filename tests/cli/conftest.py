"""Fixtures for the command-line tests: an isolated home, scripted HTTP servers on loopback."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from common import generate_key
from tests.support.system import skip_missing

from .cli_support import FakeHttpServer, SelfSigned, serve_fake

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


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> SelfSigned:
    """A self-signed certificate for 127.0.0.1 (it is its own CA), made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        skip_missing("openssl, to make a test certificate", "apt-get install openssl")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return SelfSigned(cert=cert, key=key)


@pytest.fixture
async def tls_server(self_signed: SelfSigned) -> AsyncIterator[FakeHttpServer]:
    """The scripted server behind TLS with the self-signed certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(self_signed.cert, self_signed.key)
    async with serve_fake(FakeHttpServer(tls=context)) as server:
        yield server


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port with nothing listening (bound then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    yield port
