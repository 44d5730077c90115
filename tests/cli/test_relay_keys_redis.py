"""``repowire relay keys`` against Redis (``--redis-url``), and ``relay migrate-store``.

The commands run as the user runs them (``main``, in a worker thread so the test's event loop
can check Redis meanwhile); what they did is checked through a :class:`relay.RedisStore`, as a
relay replica would see it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import coredis
import pytest
import trio

from common import hash_secret, looks_like_key
from relay import KeyRecord, KeyStore, RedisStore
from tests.support.leaks import assert_no_full_key
from tests.support.redis_server import RedisServerFactory, tolerates_failed_connections

from .cli_support import one_line, run_cli

pytest_plugins = ("tests.support.redis_fixtures",)

#: Bound on one command or check.
DEADLINE = 30.0
T0 = time.time()


async def cli(*argv: str) -> int:
    with trio.fail_after(DEADLINE):
        return await run_cli(list(argv))


@pytest.fixture(autouse=True)
def quiet_redis_client() -> Iterator[None]:
    """coredis notes at INFO that it loads a script Redis does not know yet. A fresh
    ``repowire relay keys`` process shows warnings only, but an earlier test of this process
    may have set logging up (``relay start``'s flags): keep those notes off stderr here."""
    logger = logging.getLogger("coredis")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def created(out: str) -> tuple[str, str, str]:
    """(key id, scope id, key) from ``keys create`` or ``keys rotate`` output."""
    lines = out.splitlines()
    key = lines[-1]
    assert looks_like_key(key)
    assert out.count(key) == 1
    words = lines[0].split()
    key_id = words[2] if words[0] == "Created" else words[4]
    scope_id = words[words.index("scope") + 1]
    return key_id, scope_id, key


async def test_keys_create_list_rotate_revoke_in_redis(
    home: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("relay", "keys", "create", "--label", "laptop", "--redis-url", redis_url) == 0
    out = capsys.readouterr().out
    key_id, scope_id, key = created(out)
    assert "(Redis, namespace repowire:)" in out
    assert redis_url not in out
    second = "relay", "keys", "create", "--scope", scope_id, "--redis-url", redis_url
    assert await cli(*second) == 0
    second_id, _, second_key = created(capsys.readouterr().out)

    async with RedisStore.open(redis_url) as store:
        record = await store.verify_key(key, now=T0)
        assert record is not None
        assert (record.key_id, record.scope_id, record.label) == (key_id, scope_id, "laptop")
        assert await store.verify_key(second_key, now=T0) is not None

    assert await cli("relay", "keys", "list", "--json", "--redis-url", redis_url) == 0
    rows = json.loads(capsys.readouterr().out)["keys"]
    assert [row["key_id"] for row in rows] == [key_id, second_id]
    assert await cli("relay", "keys", "list", "--redis-url", redis_url) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "laptop" in listing
    assert_no_full_key(listing)

    assert await cli("relay", "keys", "rotate", key_id, "--redis-url", redis_url) == 0
    rotated_out = capsys.readouterr().out
    new_id, new_scope, new_key = created(rotated_out)
    assert new_scope == scope_id and new_id != key_id and new_key != key
    assert await cli("relay", "keys", "revoke", second_id, "--redis-url", redis_url) == 0
    assert "Revoked" in capsys.readouterr().out
    async with RedisStore.open(redis_url) as store:
        assert await store.verify_key(key, now=T0) is None
        assert await store.verify_key(second_key, now=T0) is None
        fresh = await store.verify_key(new_key, now=T0)
        assert fresh is not None and fresh.label == "laptop"

    assert await cli("relay", "keys", "revoke", second_id, "--redis-url", redis_url) == 1
    assert "already revoked" in one_line(capsys.readouterr().err)
    assert await cli("relay", "keys", "rotate", key_id, "--redis-url", redis_url) == 1
    assert "already revoked" in one_line(capsys.readouterr().err)
    # SQLite was not used, nor the home.
    assert not await trio.Path(home).exists()


async def test_the_environment_names_redis_and_a_namespace_keeps_relays_apart(
    home: Path, redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPOWIRE_REDIS_URL", redis_url)
    assert await cli("relay", "keys", "create", "--redis-namespace", "other:") == 0
    key_id, _, key = created(capsys.readouterr().out)
    async with (
        RedisStore.open(redis_url, namespace="other:") as other,
        RedisStore.open(redis_url) as default,
    ):
        assert await other.verify_key(key, now=T0) is not None
        assert await default.verify_key(key, now=T0) is None
    assert await cli("relay", "keys", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"keys": []}
    assert not await trio.Path(home).exists()
    assert key_id


@tolerates_failed_connections
async def test_redis_down_is_one_line_without_the_url(
    redis_servers: RedisServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    password = "pa55-word"
    server = redis_servers(password=password)
    url = server.url
    server.stop()
    for command in (["create"], ["list"], ["revoke", "key_00000000"], ["rotate", "key_00000000"]):
        assert await cli("relay", "keys", *command, "--redis-url", url) == 1
        captured = capsys.readouterr()
        line = one_line(captured.err)
        assert "cannot reach the key store" in line
        assert password not in line and url not in line
        assert captured.out == ""


@pytest.mark.parametrize(
    "url", ["http://:hunter2@127.0.0.1:6379/0", "hunter2", "redis://:hunter2@[::1/0"]
)
async def test_a_bad_redis_url_is_a_usage_error_never_echoed(
    url: str, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli("relay", "keys", "list", "--redis-url", url) == 64
    line = one_line(capsys.readouterr().err)
    assert "hunter2" not in line
    assert not await trio.Path(home).exists()


# -- migrate-store ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Populated:
    """What a migration of :func:`populated_sqlite`'s store must keep."""

    live_keys: list[str]
    dead_keys: list[str]
    records: list[KeyRecord]
    live_sessions: list[str]
    dead_sessions: list[str]
    daemons: dict[str, list[tuple[str, float, float]]]
    tied: KeyRecord


def populated_sqlite(data_dir: Path) -> Populated:
    """A SQLite key store with several scopes, live, revoked and rotated keys, live, ended,
    expired and revoked sessions, and daemons."""
    now = time.time()
    with KeyStore.open(data_dir / "relay.sqlite3") as store:
        alice, alice_key = store.create_scope(label="alice", now=now - 100)
        phone, phone_key = store.create_key(alice.scope_id, label="phone", now=now - 90)
        tied, tied_key = store.create_key(alice.scope_id, label="tied", now=now - 90)
        bob, bob_key = store.create_scope(label="bob", now=now - 80)
        carol, carol_key = store.create_scope(label="Zoë 📱", now=now - 70)
        rotated, rotated_key = store.rotate_key(bob.key_id, now=now - 60)
        of_revoked = store.create_session(phone, now=now - 55, ttl=3600)
        assert store.revoke_key(phone.key_id, now=now - 50)
        live = store.create_session(alice, now=now - 40, ttl=3600)
        other_live = store.create_session(rotated, now=now - 40, ttl=7200)
        expired = store.create_session(alice, now=now - 40, ttl=10)
        ended = store.create_session(carol, now=now - 40, ttl=3600)
        store.end_session(ended)
        store.record_daemon(alice.scope_id, "laptop", now=now - 30)
        store.record_daemon(alice.scope_id, "laptop", now=now - 20)
        store.record_daemon(carol.scope_id, "desk.top", now=now - 10)
        records = store.list_keys()
        daemons = {s: store.known_daemons(s) for s in (alice.scope_id, carol.scope_id)}
    return Populated(
        live_keys=[alice_key, tied_key, carol_key, rotated_key],
        dead_keys=[phone_key, bob_key],
        records=records,
        live_sessions=[live, other_live],
        dead_sessions=[expired, ended, of_revoked],
        daemons=daemons,
        tied=tied,
    )


async def redis_dump(url: str) -> dict[bytes, object]:
    """Every Redis key and its value (TTLs aside), to compare two states."""
    out: dict[bytes, object] = {}
    async with coredis.Redis.from_url(url, decode_responses=False) as client:
        async for name in client.scan_iter():
            kind = await client.type(name)
            if kind == b"string":
                out[name] = await client.get(name)
            elif kind == b"hash":
                out[name] = await client.hgetall(name)
            elif kind == b"set":
                out[name] = await client.smembers(name)
            elif kind == b"zset":
                out[name] = await client.zrange(name, 0, -1, withscores=True)
            else:
                raise AssertionError(f"unexpected Redis type {kind!r}")
    return out


async def test_migrate_store_copies_every_record_and_never_undoes_a_later_revocation(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "relay"
    expected = populated_sqlite(data_dir)
    before = (data_dir / "relay.sqlite3").read_bytes()
    argv = ["relay", "migrate-store", "--to", redis_url, "--data-dir", str(data_dir)]
    assert await cli(*argv) == 0
    out = capsys.readouterr().out
    assert "keys: 6 copied, 0 already there" in out
    assert "scopes: 3 copied" in out
    # The ended session is gone from SQLite already; the expired one and the revoked key's
    # are left behind.
    assert "browser sessions: 2 copied, 0 already there, 2 left behind" in out
    assert "daemon records: 2 copied" in out
    assert redis_url not in out
    now = time.time()
    async with RedisStore.open(redis_url) as store:
        for key in expected.live_keys:
            assert await store.verify_key(key, now=now) is not None
        for key in expected.dead_keys:
            assert await store.verify_key(key, now=now) is None
        # Every record as it was, revocations and order (ties included) kept.
        assert await store.list_keys() == expected.records
        for session_id in expected.live_sessions:
            assert await store.lookup_session(session_id, now=now) is not None
        for session_id in expected.dead_sessions:
            assert await store.lookup_session(session_id, now=now) is None
        for scope_id, daemons in expected.daemons.items():
            assert await store.known_daemons(scope_id) == daemons
        # A key copied in works on in the cluster: a new key in its scope, a rotation.
        tied = expected.tied
        await store.create_key(tied.scope_id, label="new", now=now)
        await store.rotate_key(tied.key_id, now=now)
    state = await redis_dump(redis_url)
    for secret in expected.live_keys + expected.live_sessions:
        assert secret.encode() not in repr(state).encode()

    # Run again after the rotation: SQLite still has the rotated key live, Redis revoked. The
    # record differs, so nothing is overwritten (the revocation is never undone).
    assert await cli(*argv) == 1
    line = one_line(capsys.readouterr().err)
    assert f"key {tied.key_id}" in line and "nothing was copied" in line
    assert await redis_dump(redis_url) == state
    assert (data_dir / "relay.sqlite3").read_bytes() == before


async def test_running_migrate_store_twice_changes_nothing(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "relay"
    populated_sqlite(data_dir)
    argv = ["relay", "migrate-store", "--to", redis_url, "--data-dir", str(data_dir)]
    assert await cli(*argv) == 0
    capsys.readouterr()
    state = await redis_dump(redis_url)
    assert await cli(*argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Nothing to copy")
    assert "keys: 0 copied, 6 already there" in out
    assert await redis_dump(redis_url) == state


async def test_migrate_store_refuses_a_different_record_and_copies_nothing(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "relay"
    with KeyStore.open(data_dir / "relay.sqlite3") as sqlite:
        record, _ = sqlite.create_scope(label="alice", now=T0)
        _, new_key = sqlite.create_scope(label="new", now=T0 + 1)
    # Redis holds a scope with alice's id, another label.
    async with coredis.Redis.from_url(redis_url, decode_responses=False) as client:
        await client.hset(
            f"repowire:scope:{record.scope_id}", {"label": "mallory", "created_at": repr(T0)}
        )
    before = await redis_dump(redis_url)
    argv = ["relay", "migrate-store", "--to", redis_url, "--data-dir", str(data_dir)]
    assert await cli(*argv) == 1
    line = one_line(capsys.readouterr().err)
    assert f"scope {record.scope_id}" in line and "nothing was copied" in line
    assert await redis_dump(redis_url) == before
    async with RedisStore.open(redis_url) as store:
        assert await store.verify_key(new_key, now=T0) is None
    assert hash_secret(new_key).encode() not in repr(before).encode()


async def test_migrate_store_without_a_store_says_so(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    argv = ["relay", "migrate-store", "--to", redis_url, "--data-dir", str(missing)]
    assert await cli(*argv) == 1
    assert "no key store at" in one_line(capsys.readouterr().err)
    assert not missing.exists()
