"""pytest fixtures for tests that need a Redis server (``tests.support.redis_server``).

Load them in a test module with ``pytest_plugins = ("tests.support.redis_fixtures",)``.

- ``redis_url``: the URL of a clean Redis. One server serves the whole session (a fresh one
  per test would cost ~50 ms each); it is emptied with FLUSHALL before every test that asks
  for it. Sync, so usable from trio tests and fixtures alike.
- ``redis_server``: that shared :class:`RedisServer` itself (emptied likewise). Do not stop
  it: use ``redis_servers`` for that.
- ``redis_servers``: a factory of private servers, ``redis_servers(persistent=True)``, for
  tests that stop and restart Redis; each is stopped when the test ends. Mark such tests
  with ``tolerates_failed_connections`` (from ``tests.support.redis_server``).

Every one of them skips the test, as a missing system part, where ``redis-server`` is not
installed (a failure under ``REPOWIRE_REQUIRE_SYSTEM_PARTS=1``).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer, RedisServerFactory, redis_server_binary


@pytest.fixture(scope="session")
def _shared_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = redis_server_binary()
    server = RedisServer(tmp_path_factory.mktemp("redis"), binary=binary)
    server.start()
    try:
        yield server
    finally:
        server.stop(final=True)


@pytest.fixture
def redis_server(_shared_redis_server: RedisServer) -> RedisServer:
    """The session's shared Redis server, emptied for this test."""
    if not _shared_redis_server.running:
        # A test stopped it against the rules above: bring it back rather than fail the rest.
        _shared_redis_server.start()
    _shared_redis_server.flushall()
    return _shared_redis_server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:<port>/0`` of an empty Redis."""
    return redis_server.url


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[RedisServerFactory]:
    """Start private servers (each in its own directory under ``tmp_path``) for this test."""
    binary = redis_server_binary()
    started: list[RedisServer] = []

    def start(*, persistent: bool = False, password: str | None = None) -> RedisServer:
        server = RedisServer(
            tmp_path / f"redis-{len(started)}",
            persistent=persistent,
            password=password,
            binary=binary,
        )
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop(final=True)
        # Collect the remains of failed connection attempts now, under this test's warning
        # filters (see tolerates_failed_connections), not during some later test.
        gc.collect()
