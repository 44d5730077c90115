"""pytest fixtures for tests that talk TLS to a scripted server (``tests.support.fake_http``).

Load them in a test module with ``pytest_plugins = ("tests.support.tls",)``; a conftest below
the top one cannot, so it imports them instead. A plugin module is normally rewritten for
pytest's asserts, which an earlier import (such a conftest's) makes impossible: this one holds
no assert, and says so to pytest (PYTEST_DONT_REWRITE), so either order of loading is quiet.

- ``self_signed``: a self-signed certificate for 127.0.0.1 (its own CA), made with openssl
  once per session; skips the test where openssl is missing.
- ``tls_server``: a :class:`FakeHttpServer` on 127.0.0.1 behind TLS with that certificate.
  With nothing scripted it is a web server that is not a relay: every path answers 404.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.fake_http import (
    FakeHttpServer,
    SelfSigned,
    make_self_signed,
    serve_fake,
    tls_server_context,
)


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> SelfSigned:
    """A self-signed certificate for 127.0.0.1 (it is its own CA), made with openssl."""
    return make_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def tls_server(self_signed: SelfSigned) -> AsyncIterator[FakeHttpServer]:
    """The scripted server behind TLS with the self-signed certificate."""
    async with serve_fake(FakeHttpServer(tls=tls_server_context(self_signed))) as server:
        yield server
