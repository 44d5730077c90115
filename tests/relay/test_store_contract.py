"""The key store interface (relay._store_api.Store), one contract for every implementation.

Each contract test runs against the SQLite store (a file in a temporary directory) and the
Redis store (a private redis-server, see tests/support/redis_fixtures.py). The tests at the
end concern Redis alone: what reaches Redis, outages, timeouts, namespaces and URLs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import cast

import coredis
import pytest
import trio
import trio.testing

import relay._login_links
import relay._store
from common import generate_key, generate_session_id, hash_secret
from relay._login_links import LOGIN_LINK_TTL, new_token
from relay._ratelimit import RateLimiter
from relay._redis_store import RedisStore
from relay._sqlite_store import SqliteStore
from relay._store_api import (
    ChangeKind,
    KeyRecord,
    LoginLink,
    LoginLinksFull,
    SessionRecord,
    Store,
    StoreChange,
    StoreError,
    StoreUnavailable,
    UnknownRecordError,
)
from tests.support.redis_server import (
    RedisServer,
    RedisServerFactory,
    tolerates_failed_connections,
)

pytest_plugins = ("tests.support.redis_fixtures",)

T0 = 1_700_000_000.0
TTL = 3600.0
#: Bound on the delivery of a change made through another store object.
CHANGE_DELAY = 1.0
#: Bound on anything else that waits on the network.
IO_DEADLINE = 10.0

StoreOpener = Callable[[], AbstractAsyncContextManager[Store]]


def _conforms(sqlite: SqliteStore, redis: RedisStore) -> tuple[Store, Store]:
    """Checked by mypy: both implementations satisfy the interface."""
    return sqlite, redis


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    """Opens a store object on this test's backend; every call gives another object on the
    same data (as another relay replica or the CLI would have)."""
    if request.param == "sqlite":
        path = tmp_path / "data" / "keys.sqlite3"
        return lambda: SqliteStore.open(path)
    url = cast(str, request.getfixturevalue("redis_url"))
    return lambda: RedisStore.open(url)


@pytest.fixture
async def store(open_store: StoreOpener) -> AsyncIterator[Store]:
    async with open_store() as opened:
        yield opened


@pytest.fixture
async def other(open_store: StoreOpener) -> AsyncIterator[Store]:
    """A second store object on the same backend."""
    async with open_store() as opened:
        yield opened


class Feed:
    """A change handler that queues what it is given, for the test to receive in order."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[StoreChange](100)

    async def __call__(self, change: StoreChange) -> None:
        await self._send.send(change)

    async def next(self, within: float = CHANGE_DELAY) -> StoreChange:
        with trio.fail_after(within):
            return await self._receive.receive()


# -- scopes and keys --------------------------------------------------------------------------


async def test_create_scope_returns_a_key_that_verifies(store: Store) -> None:
    record, key = await store.create_scope(label="alice", now=T0)
    assert record.label == "alice"
    assert record.created_at == T0
    assert record.revoked_at is None
    assert key not in (record.key_id, record.scope_id)
    assert record.key_id not in key
    assert await store.verify_key(key, now=T0 + 1) == record
    assert await store.list_keys() == [record]
    assert await store.list_keys(record.scope_id) == [record]
    assert await store.is_key_live(record.key_id)


async def test_scopes_are_distinct(store: Store) -> None:
    first, _ = await store.create_scope(label="a", now=T0)
    second, _ = await store.create_scope(label="b", now=T0)
    assert first.scope_id != second.scope_id
    assert await store.list_keys(first.scope_id) == [first]
    assert await store.list_keys(second.scope_id) == [second]
    assert await store.list_keys("scope_0000") == []
    assert await store.list_keys("") == []


async def test_create_key_adds_a_key_to_the_same_scope(store: Store) -> None:
    first, first_key = await store.create_scope(label="alice", now=T0)
    second, second_key = await store.create_key(first.scope_id, label="laptop", now=T0 + 5)
    assert second.scope_id == first.scope_id
    assert second.key_id != first.key_id
    assert second_key != first_key
    assert second.label == "laptop"
    assert second.created_at == T0 + 5
    assert await store.verify_key(first_key, now=T0 + 6) == first
    assert await store.verify_key(second_key, now=T0 + 6) == second
    assert await store.list_keys(first.scope_id) == [first, second]


async def test_list_keys_is_oldest_first_then_creation_order(store: Store) -> None:
    late, _ = await store.create_scope(label="late", now=T0 + 100)
    early, _ = await store.create_key(late.scope_id, label="early", now=T0)
    tie_a, _ = await store.create_key(late.scope_id, label="tie a", now=T0 + 50)
    tie_b, _ = await store.create_key(late.scope_id, label="tie b", now=T0 + 50)
    other, _ = await store.create_scope(label="other", now=T0 + 75)
    assert await store.list_keys(late.scope_id) == [early, tie_a, tie_b, late]
    assert await store.list_keys() == [early, tie_a, tie_b, other, late]
    # Exact times come back exactly, not rounded.
    odd, _ = await store.create_key(late.scope_id, label="odd", now=T0 + 0.123456789)
    assert (await store.list_keys(late.scope_id))[1] == odd


async def test_create_key_in_an_unknown_scope_is_a_clear_error(store: Store) -> None:
    with pytest.raises(UnknownRecordError, match="no scope 'scope_abc'"):
        await store.create_key("scope_abc", label="x", now=T0)
    with pytest.raises(UnknownRecordError, match="malformed id"):
        await store.create_key("scope\ud800", label="x", now=T0)
    assert await store.list_keys() == []


async def test_errors_never_echo_a_secret_given_in_place_of_an_id(store: Store) -> None:
    record, key = await store.create_scope(label="alice", now=T0)
    with pytest.raises(UnknownRecordError) as excinfo:
        await store.create_key(key, label="x", now=T0)
    assert key not in str(excinfo.value)
    with pytest.raises(UnknownRecordError) as rotated:
        await store.rotate_key(key, now=T0)
    assert key not in str(rotated.value)
    with pytest.raises(UnknownRecordError) as recorded:
        await store.record_daemon(key, "laptop", now=T0)
    assert key not in str(recorded.value)
    forged = KeyRecord(key_id=key, scope_id=key, label="", created_at=T0, revoked_at=None)
    with pytest.raises(UnknownRecordError) as session:
        await store.create_session(forged, now=T0, ttl=TTL)
    assert key not in str(session.value)
    assert await store.revoke_key(key, now=T0) is False
    assert await store.verify_key(key, now=T0) == record


async def test_unknown_key_does_not_verify(store: Store) -> None:
    await store.create_scope(label="alice", now=T0)
    assert await store.verify_key(generate_key(), now=T0) is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "rw_",
        "not a key",
        "Bearer rw_" + "a" * 43,
        "rw_" + "a" * 43 + "\n",
        "rw_" + "a" * 10_000,
        "rw_" + "a" * 42 + "\ud800",
        "rw_" + "a" * 42 + "\x00",
        "' OR 1=1 --",
        "*",
    ],
)
async def test_malformed_keys_verify_to_none(store: Store, bad: str) -> None:
    _, key = await store.create_scope(label="alice", now=T0)
    assert await store.verify_key(bad, now=T0) is None
    assert await store.verify_key(key + "x", now=T0) is None
    assert await store.verify_key(key[:-1], now=T0) is None


@pytest.mark.parametrize("bad", [None, b"rw_" + b"a" * 43, 42])
async def test_non_string_secrets_are_none(store: Store, bad: object) -> None:
    assert await store.verify_key(cast(str, bad), now=T0) is None
    assert await store.lookup_session(cast(str, bad), now=T0) is None
    await store.end_session(cast(str, bad))


@pytest.mark.parametrize("label", ["x" * 201, "line\nbreak", "bell\x07", "\x00", "lone \ud800"])
async def test_bad_labels_are_refused_and_nothing_is_written(store: Store, label: str) -> None:
    with pytest.raises(ValueError, match="label"):
        await store.create_scope(label=label, now=T0)
    assert await store.list_keys() == []
    record, _ = await store.create_scope(label="ok", now=T0)
    with pytest.raises(ValueError, match="label"):
        await store.create_key(record.scope_id, label=label, now=T0)
    assert await store.list_keys() == [record]


async def test_labels_may_be_empty_or_unicode(store: Store) -> None:
    record, _ = await store.create_scope(label="", now=T0)
    other, _ = await store.create_key(record.scope_id, label="Zoë's phone 📱", now=T0)
    assert [r.label for r in await store.list_keys()] == ["", "Zoë's phone 📱"]
    assert other.label == "Zoë's phone 📱"


@pytest.mark.parametrize("now", [float("nan"), float("inf"), float("-inf")])
async def test_non_finite_times_are_refused(store: Store, now: float) -> None:
    record, _ = await store.create_scope(label="a", now=T0)
    with pytest.raises(ValueError, match="time"):
        await store.create_scope(label="a", now=now)
    with pytest.raises(ValueError, match="time"):
        await store.create_key(record.scope_id, label="b", now=now)
    with pytest.raises(ValueError, match="time"):
        await store.rotate_key(record.key_id, now=now)
    with pytest.raises(ValueError, match="time"):
        await store.revoke_key(record.key_id, now=now)
    with pytest.raises(ValueError, match="time"):
        await store.create_session(record, now=now, ttl=TTL)
    with pytest.raises(ValueError, match="time"):
        await store.record_daemon(record.scope_id, "laptop", now=now)
    with pytest.raises(ValueError, match="time"):
        await store.purge_expired(now=now)
    assert await store.list_keys() == [record]
    assert await store.known_daemons(record.scope_id) == []


async def test_revoke_key(store: Store) -> None:
    record, key = await store.create_scope(label="alice", now=T0)
    other, other_key = await store.create_key(record.scope_id, label="other", now=T0)
    assert await store.revoke_key(record.key_id, now=T0 + 10) is True
    assert await store.verify_key(key, now=T0 + 11) is None
    assert not await store.is_key_live(record.key_id)
    assert await store.verify_key(other_key, now=T0 + 11) == other
    assert await store.is_key_live(other.key_id)
    assert await store.revoke_key(record.key_id, now=T0 + 20) is False
    assert await store.revoke_key("key_0123456789abcdef", now=T0 + 20) is False
    listed = await store.list_keys(record.scope_id)
    assert listed[0].key_id == record.key_id
    assert listed[0].revoked_at == T0 + 10
    assert listed[0].revoked
    assert listed[1] == other


async def test_rotate_key(store: Store) -> None:
    old, old_key = await store.create_scope(label="alice", now=T0)
    new, new_key = await store.rotate_key(old.key_id, now=T0 + 10)
    assert new_key != old_key
    assert new.key_id != old.key_id
    assert new.scope_id == old.scope_id
    assert new.label == old.label
    assert new.created_at == T0 + 10
    assert new.revoked_at is None
    assert await store.verify_key(old_key, now=T0 + 11) is None
    assert await store.verify_key(new_key, now=T0 + 11) == new
    assert [k.revoked_at for k in await store.list_keys(old.scope_id)] == [T0 + 10, None]
    assert not await store.is_key_live(old.key_id)
    assert await store.is_key_live(new.key_id)


async def test_rotating_an_unknown_or_revoked_key_fails_and_changes_nothing(store: Store) -> None:
    with pytest.raises(UnknownRecordError, match="no key"):
        await store.rotate_key("key_0123456789abcdef", now=T0)
    record, _ = await store.create_scope(label="alice", now=T0)
    await store.revoke_key(record.key_id, now=T0 + 1)
    with pytest.raises(UnknownRecordError, match="revoked"):
        await store.rotate_key(record.key_id, now=T0 + 2)
    assert len(await store.list_keys()) == 1


async def test_is_key_live_for_unknown_and_malformed_ids(store: Store) -> None:
    assert not await store.is_key_live("key_0123456789abcdef")
    assert not await store.is_key_live("")
    assert not await store.is_key_live("key_\ud800")
    assert not await store.is_key_live(generate_key())


# -- sessions ---------------------------------------------------------------------------------


async def test_session_round_trip(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    session_id = await store.create_session(record, now=T0, ttl=TTL)
    expected = SessionRecord(
        scope_id=record.scope_id, key_id=record.key_id, created_at=T0, expires_at=T0 + TTL
    )
    assert await store.lookup_session(session_id, now=T0 + 1) == expected
    assert await store.lookup_session(generate_session_id(), now=T0 + 1) is None


async def test_sessions_expire(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    session_id = await store.create_session(record, now=T0, ttl=60)
    assert await store.lookup_session(session_id, now=T0 + 59.9) is not None
    assert await store.lookup_session(session_id, now=T0 + 60) is None
    assert await store.lookup_session(session_id, now=T0 + 3600) is None


async def test_end_session(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    ended = await store.create_session(record, now=T0, ttl=TTL)
    kept = await store.create_session(record, now=T0, ttl=TTL)
    assert await store.lookup_session(ended, now=T0 + 1) is not None
    await store.end_session(ended)
    assert await store.lookup_session(ended, now=T0 + 2) is None
    assert await store.lookup_session(kept, now=T0 + 2) is not None
    await store.end_session(ended)  # again: ignored
    await store.end_session(generate_session_id())  # unknown: ignored


@pytest.mark.parametrize(
    "bad", ["", "short", "a" * 42 + "=", "a" * 43 + "\n", "a" * 5000, "\ud800" * 43, "' OR 1=1"]
)
async def test_malformed_session_ids_are_none_and_never_raise(store: Store, bad: str) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    await store.create_session(record, now=T0, ttl=TTL)
    assert await store.lookup_session(bad, now=T0) is None
    await store.end_session(bad)


async def test_revoking_a_key_ends_its_sessions_only(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    other, _ = await store.create_key(record.scope_id, label="other", now=T0)
    doomed = [await store.create_session(record, now=T0, ttl=TTL) for _ in range(3)]
    kept = await store.create_session(other, now=T0, ttl=TTL)
    # Looked up first, so that a store with a cache holds the answers: revocation must reach
    # past it.
    for session_id in [*doomed, kept]:
        assert await store.lookup_session(session_id, now=T0 + 1) is not None
    assert await store.revoke_key(record.key_id, now=T0 + 2)
    for session_id in doomed:
        assert await store.lookup_session(session_id, now=T0 + 2) is None
    assert await store.lookup_session(kept, now=T0 + 2) is not None


async def test_rotating_a_key_ends_its_sessions(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    session_id = await store.create_session(record, now=T0, ttl=TTL)
    assert await store.lookup_session(session_id, now=T0 + 1) is not None
    new, _ = await store.rotate_key(record.key_id, now=T0 + 2)
    assert await store.lookup_session(session_id, now=T0 + 2) is None
    fresh = await store.create_session(new, now=T0 + 3, ttl=TTL)
    looked_up = await store.lookup_session(fresh, now=T0 + 4)
    assert looked_up is not None
    assert looked_up.key_id == new.key_id


async def test_no_session_for_a_revoked_key_even_from_a_stale_record(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    await store.revoke_key(record.key_id, now=T0 + 1)
    with pytest.raises(UnknownRecordError, match="unknown or revoked"):
        await store.create_session(record, now=T0 + 2, ttl=TTL)
    forged = KeyRecord(
        key_id="key_0123456789abcdef",
        scope_id=record.scope_id,
        label="",
        created_at=T0,
        revoked_at=None,
    )
    with pytest.raises(UnknownRecordError, match="unknown or revoked"):
        await store.create_session(forged, now=T0 + 2, ttl=TTL)
    assert await store.purge_expired(now=T0 + 2) == 0


async def test_session_scope_comes_from_the_store_not_the_record(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    other, _ = await store.create_scope(label="mallory", now=T0)
    claimed = KeyRecord(
        key_id=record.key_id, scope_id=other.scope_id, label="", created_at=T0, revoked_at=None
    )
    session_id = await store.create_session(claimed, now=T0, ttl=TTL)
    looked_up = await store.lookup_session(session_id, now=T0 + 1)
    assert looked_up is not None
    assert looked_up.scope_id == record.scope_id


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("nan"), float("inf")])
async def test_bad_ttl_is_refused(store: Store, ttl: float) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    with pytest.raises(ValueError, match="ttl"):
        await store.create_session(record, now=T0, ttl=ttl)


async def test_purge_expired(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    expiring = [await store.create_session(record, now=T0, ttl=10) for _ in range(2)]
    live = await store.create_session(record, now=T0, ttl=TTL)
    assert await store.purge_expired(now=T0 + 5) == 0
    assert await store.purge_expired(now=T0 + 20) == 2
    assert await store.purge_expired(now=T0 + 20) == 0
    for session_id in expiring:
        assert await store.lookup_session(session_id, now=T0 + 1) is None  # deleted, not only old
    assert await store.lookup_session(live, now=T0 + 20) is not None
    assert len(await store.list_keys()) == 1  # keys are kept


async def test_a_revocation_racing_session_creation_leaves_no_live_session(
    store: Store, other: Store
) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    created: list[str] = []

    async def open_session() -> None:
        # After the revocation, refused: as it must be.
        with contextlib.suppress(UnknownRecordError):
            created.append(await store.create_session(record, now=T0, ttl=TTL))

    with trio.fail_after(IO_DEADLINE):
        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(open_session)
            nursery.start_soon(partial(other.revoke_key, record.key_id, now=T0 + 1))
            for _ in range(30):
                nursery.start_soon(open_session)
    store.forget_sessions_of(record.key_id)
    for session_id in created:
        assert await store.lookup_session(session_id, now=T0 + 2) is None


# -- one-time sign-in links -------------------------------------------------------------------


async def test_a_login_link_is_taken_once(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    token, link = await store.create_login_link(record.key_id, daemon_id="laptop", now=T0)
    assert link == LoginLink(
        key_id=record.key_id,
        scope_id=record.scope_id,
        daemon_id="laptop",
        expires_at=T0 + LOGIN_LINK_TTL,
    )
    assert record.key_id not in token and record.scope_id not in token
    assert await store.take_login_link(token, now=T0 + 1) == link
    assert await store.take_login_link(token, now=T0 + 2) is None
    # Without a daemon, and two links are two tokens.
    first, plain = await store.create_login_link(record.key_id, daemon_id=None, now=T0)
    second, _ = await store.create_login_link(record.key_id, daemon_id=None, now=T0)
    assert first != second and plain.daemon_id is None
    assert await store.take_login_link(second, now=T0) is not None
    assert await store.take_login_link(first, now=T0) == plain


async def test_a_login_link_expires(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    late, _ = await store.create_login_link(record.key_id, daemon_id=None, now=T0)
    assert await store.take_login_link(late, now=T0 + LOGIN_LINK_TTL) is None
    # An expired token is used up too.
    assert await store.take_login_link(late, now=T0) is None
    just_in_time, _ = await store.create_login_link(record.key_id, daemon_id=None, now=T0)
    assert await store.take_login_link(just_in_time, now=T0 + LOGIN_LINK_TTL - 0.5) is not None


@pytest.mark.parametrize(
    "bad", ["", "short", "a" * 42 + "=", "a" * 43 + "\n", "a" * 5000, "\ud800" * 43, None, 7]
)
async def test_malformed_or_unknown_tokens_are_none(store: Store, bad: object) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    token, link = await store.create_login_link(record.key_id, daemon_id=None, now=T0)
    assert await store.take_login_link(cast(str, bad), now=T0) is None
    assert await store.take_login_link(new_token(), now=T0) is None
    # The real token still works: the others took nothing.
    assert await store.take_login_link(token, now=T0) == link


async def test_login_links_of_a_revoked_or_rotated_key_never_work(
    store: Store, other: Store
) -> None:
    revoked, _ = await store.create_scope(label="revoked", now=T0)
    rotated, _ = await store.create_scope(label="rotated", now=T0)
    elsewhere, _ = await store.create_scope(label="revoked elsewhere", now=T0)
    kept, _ = await store.create_key(revoked.scope_id, label="kept", now=T0)
    doomed = [
        (await store.create_login_link(key.key_id, daemon_id=None, now=T0))[0]
        for key in (revoked, rotated, elsewhere)
    ]
    survivor, _ = await store.create_login_link(kept.key_id, daemon_id=None, now=T0)
    assert await store.revoke_key(revoked.key_id, now=T0 + 1)
    await store.rotate_key(rotated.key_id, now=T0 + 1)
    # Revoked through another store object (another replica, the CLI): the key is checked.
    assert await other.revoke_key(elsewhere.key_id, now=T0 + 1)
    for token in doomed:
        assert await store.take_login_link(token, now=T0 + 2) is None
    assert await store.take_login_link(survivor, now=T0 + 2) is not None
    with pytest.raises(UnknownRecordError, match="unknown or revoked"):
        await store.create_login_link(revoked.key_id, daemon_id=None, now=T0 + 3)
    with pytest.raises(UnknownRecordError, match="unknown or revoked"):
        await store.create_login_link("key_0123456789abcdef", daemon_id=None, now=T0 + 3)


async def test_bad_login_link_arguments_are_refused_without_echo(store: Store) -> None:
    record, key = await store.create_scope(label="alice", now=T0)
    for daemon_id in ["", "a" * 65, "has space", "\ud800"]:
        with pytest.raises(ValueError, match="daemon id"):
            await store.create_login_link(record.key_id, daemon_id=daemon_id, now=T0)
    with pytest.raises(ValueError, match="time"):
        await store.create_login_link(record.key_id, daemon_id=None, now=math.inf)
    with pytest.raises(UnknownRecordError) as excinfo:
        await store.create_login_link(key, daemon_id=None, now=T0)
    assert key not in str(excinfo.value)
    with pytest.raises(UnknownRecordError):
        await store.create_login_link("key_\ud800", daemon_id=None, now=T0)


async def test_a_scope_holds_a_bounded_number_of_login_links(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay._login_links, "MAX_LINKS_PER_SCOPE", 3)
    record, _ = await store.create_scope(label="alice", now=T0)
    second, _ = await store.create_key(record.scope_id, label="second", now=T0)
    other, _ = await store.create_scope(label="bob", now=T0)
    others = [
        (await store.create_login_link(other.key_id, daemon_id=None, now=T0))[0] for _ in range(3)
    ]
    # Four links of one scope, from two of its keys: the oldest is dropped.
    tokens = []
    for n, key in enumerate([record, second, record, second]):
        tokens.append((await store.create_login_link(key.key_id, daemon_id=None, now=T0 + n))[0])
    assert await store.take_login_link(tokens[0], now=T0 + 5) is None
    for token in tokens[1:] + others:
        assert await store.take_login_link(token, now=T0 + 5) is not None


async def test_a_full_login_link_table_refuses_and_drops_nobody(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay._login_links, "MAX_LINKS_TOTAL", 3)
    first, _ = await store.create_scope(label="first", now=T0)
    second, _ = await store.create_scope(label="second", now=T0)

    async def issue(key: KeyRecord, now: float) -> str:
        return (await store.create_login_link(key.key_id, daemon_id=None, now=now))[0]

    held = [await issue(first, T0) for _ in range(3)]
    with pytest.raises(LoginLinksFull):
        await issue(second, T0 + 1)
    # Nothing was dropped for it; a taken link frees its place.
    assert await store.take_login_link(held[0], now=T0 + 2) is not None
    late = await issue(second, T0 + 2)
    with pytest.raises(LoginLinksFull):
        await issue(second, T0 + 3)
    assert await store.take_login_link(held[1], now=T0 + 3) is not None
    assert await store.take_login_link(late, now=T0 + 3) is not None
    extra = [await issue(second, T0 + 4) for _ in range(2)]
    with pytest.raises(LoginLinksFull):
        await issue(second, T0 + 5)
    # An expired link does not count: held[2], issued at T0, is gone at T0 + ttl.
    last = await issue(second, T0 + LOGIN_LINK_TTL)
    for token in [*extra, last]:
        assert await store.take_login_link(token, now=T0 + LOGIN_LINK_TTL) is not None
    assert await store.take_login_link(held[2], now=T0 + LOGIN_LINK_TTL) is None


async def test_concurrent_takes_of_one_token_succeed_once(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    token, _ = await store.create_login_link(record.key_id, daemon_id=None, now=T0)
    taken: list[LoginLink | None] = []

    async def take(on: Store) -> None:
        taken.append(await on.take_login_link(token, now=T0 + 1))

    with trio.fail_after(IO_DEADLINE):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(take, store)
    assert len(taken) == 20
    assert sum(link is not None for link in taken) == 1


# -- daemons ----------------------------------------------------------------------------------


async def test_record_daemon(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    other, _ = await store.create_scope(label="bob", now=T0)
    await store.record_daemon(record.scope_id, "laptop", now=T0)
    await store.record_daemon(record.scope_id, "desktop.home", now=T0 + 5)
    await store.record_daemon(record.scope_id, "laptop", now=T0 + 10)
    await store.record_daemon(record.scope_id, "laptop", now=T0 + 7)  # late: no step back
    await store.record_daemon(other.scope_id, "laptop", now=T0 + 3)
    assert await store.known_daemons(record.scope_id) == [
        ("desktop.home", T0 + 5, T0 + 5),
        ("laptop", T0, T0 + 10),
    ]
    assert await store.known_daemons(other.scope_id) == [("laptop", T0 + 3, T0 + 3)]
    assert await store.known_daemons("scope_0000") == []
    assert await store.known_daemons("") == []


@pytest.mark.parametrize("daemon_id", ["", "a" * 65, "has space", "slash/y", "é", "a\n", "\ud800"])
async def test_record_daemon_refuses_bad_ids(store: Store, daemon_id: str) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)
    with pytest.raises(ValueError, match="daemon id"):
        await store.record_daemon(record.scope_id, daemon_id, now=T0)
    assert await store.known_daemons(record.scope_id) == []


async def test_record_daemon_in_an_unknown_scope(store: Store) -> None:
    with pytest.raises(UnknownRecordError, match="no scope"):
        await store.record_daemon("scope_abc", "laptop", now=T0)
    with pytest.raises(UnknownRecordError, match="no scope"):
        await store.record_daemon("scope_\ud800", "laptop", now=T0)


async def test_daemons_per_scope_are_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay._store, "MAX_DAEMONS_PER_SCOPE", 3)
    record, _ = await store.create_scope(label="alice", now=T0)
    other, _ = await store.create_scope(label="bob", now=T0)
    for n in range(6):
        await store.record_daemon(record.scope_id, f"d{n}", now=T0 + n)
    await store.record_daemon(record.scope_id, "d0", now=T0 + 10)  # back: most recent now
    assert [d for d, _, _ in await store.known_daemons(record.scope_id)] == ["d0", "d4", "d5"]
    # d0 was forgotten, so its first sighting is the new one.
    assert (await store.known_daemons(record.scope_id))[0] == ("d0", T0 + 10, T0 + 10)
    # Among equally recent daemons, the smallest ids are kept.
    for name in ["e", "c", "a", "d", "b"]:
        await store.record_daemon(other.scope_id, name, now=T0)
    assert [d for d, _, _ in await store.known_daemons(other.scope_id)] == ["a", "b", "c"]


# -- the change feed --------------------------------------------------------------------------


async def test_a_revocation_through_another_store_object_is_announced(
    store: Store, other: Store
) -> None:
    record, key = await store.create_scope(label="alice", now=T0)
    session_id = await store.create_session(record, now=T0, ttl=TTL)
    assert await store.lookup_session(session_id, now=T0 + 1) is not None  # cached, if caching
    feed = Feed()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(IO_DEADLINE):
            await nursery.start(store.watch, feed)
        assert await other.revoke_key(record.key_id, now=T0 + 2)
        change = await feed.next()
        assert change == StoreChange(kind=ChangeKind.KEY_REVOKED, key_id=record.key_id)
        # Announced means applied: the watching object answers no stale session or key.
        assert await store.lookup_session(session_id, now=T0 + 3) is None
        assert await store.verify_key(key, now=T0 + 3) is None
        nursery.cancel_scope.cancel()


async def test_the_feed_announces_each_change_once_and_none_from_before(
    store: Store, other: Store
) -> None:
    before, _ = await store.create_scope(label="before", now=T0)
    await other.revoke_key(before.key_id, now=T0)
    revoked, _ = await store.create_scope(label="revoked", now=T0)
    rotated, _ = await store.create_scope(label="rotated", now=T0)
    last, _ = await store.create_scope(label="last", now=T0)
    feed = Feed()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(IO_DEADLINE):
            await nursery.start(store.watch, feed)
        await other.revoke_key(revoked.key_id, now=T0 + 1)
        assert await feed.next() == StoreChange(kind=ChangeKind.KEY_REVOKED, key_id=revoked.key_id)
        assert not await other.revoke_key(revoked.key_id, now=T0 + 2)
        await other.rotate_key(rotated.key_id, now=T0 + 3)
        change = await feed.next()
        # A rotation made elsewhere may look like a revocation (SQLite cannot tell them apart).
        assert change.kind in (ChangeKind.KEY_ROTATED, ChangeKind.KEY_REVOKED)
        assert change.key_id == rotated.key_id
        # The next change is the last one: nothing was announced twice in between.
        await other.revoke_key(last.key_id, now=T0 + 4)
        assert await feed.next() == StoreChange(kind=ChangeKind.KEY_REVOKED, key_id=last.key_id)
        nursery.cancel_scope.cancel()


async def test_the_feed_announces_this_objects_own_changes(store: Store) -> None:
    revoked, _ = await store.create_scope(label="revoked", now=T0)
    rotated, _ = await store.create_scope(label="rotated", now=T0)
    session_id = await store.create_session(rotated, now=T0, ttl=TTL)
    feed = Feed()
    async with trio.open_nursery() as nursery:
        with trio.fail_after(IO_DEADLINE):
            await nursery.start(store.watch, feed)
        await store.revoke_key(revoked.key_id, now=T0 + 1)
        assert await feed.next() == StoreChange(kind=ChangeKind.KEY_REVOKED, key_id=revoked.key_id)
        await store.end_session(session_id)
        assert await feed.next() == StoreChange(
            kind=ChangeKind.SESSION_ENDED, session_digest=hash_secret(session_id)
        )
        await store.rotate_key(rotated.key_id, now=T0 + 2)
        assert await feed.next() == StoreChange(kind=ChangeKind.KEY_ROTATED, key_id=rotated.key_id)
        nursery.cancel_scope.cancel()


async def test_an_exception_from_the_handler_ends_the_watch_unchanged(store: Store) -> None:
    record, _ = await store.create_scope(label="alice", now=T0)

    async def failing(change: StoreChange) -> None:
        raise RuntimeError(f"handler failed on {change.kind.value}")

    with (
        trio.fail_after(IO_DEADLINE),
        pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="handler failed on revoked")),
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.watch, failing)
            await store.revoke_key(record.key_id, now=T0 + 1)


# -- life -------------------------------------------------------------------------------------


async def test_a_closed_store_raises_store_error(open_store: StoreOpener) -> None:
    async with open_store() as store:
        record, key = await store.create_scope(label="alice", now=T0)
        await store.ping()
        await store.aclose()
        await store.aclose()  # idempotent
        with pytest.raises(StoreError, match="closed"):
            await store.verify_key(key, now=T0)
        with pytest.raises(StoreError, match="closed"):
            await store.create_key(record.scope_id, label="x", now=T0)
        with pytest.raises(StoreError, match="closed"):
            await store.list_keys()
        with pytest.raises(StoreError, match="closed"):
            await store.ping()
        store.forget_sessions_of(record.key_id)  # never raises


# -- Redis only -------------------------------------------------------------------------------


async def _dump(url: str) -> bytes:
    """Every key name and value in the Redis at ``url``, as one blob."""
    blob = bytearray()
    async with coredis.Redis.from_url(url, decode_responses=False) as client:
        async for name in client.scan_iter():
            blob += name + b"\n"
            kind = await client.type(name)
            if kind == b"string":
                blob += (await client.get(name)) or b""
            elif kind == b"hash":
                for field, value in (await client.hgetall(name)).items():
                    blob += field + b"=" + value + b"\n"
            elif kind == b"set":
                blob += b"\n".join(await client.smembers(name))
            elif kind == b"zset":
                for member in await client.zrange(name, 0, -1):
                    blob += member + b"\n"
            else:
                raise AssertionError(f"unexpected Redis type {kind!r}")
            blob += b"\n"
    return bytes(blob)


async def test_redis_holds_no_raw_key_or_session_id(redis_url: str) -> None:
    published: list[bytes] = []
    all_published = trio.Event()
    async with (
        RedisStore.open(redis_url) as store,
        coredis.Redis.from_url(redis_url, decode_responses=False) as client,
        trio.open_nursery() as nursery,
    ):

        async def listen(*, task_status: trio.TaskStatus[None]) -> None:
            async with client.pubsub(channels=["repowire:changes"]) as subscription:
                task_status.started()
                async for message in subscription:
                    if message["type"] == "message":
                        published.append(cast(bytes, message["data"]))
                        if len(published) == 3:  # rotated, signed out, revoked
                            all_published.set()

        with trio.fail_after(IO_DEADLINE):
            await nursery.start(listen)
            record, key = await store.create_scope(label="alice", now=T0)
            second, second_key = await store.create_key(record.scope_id, label="b", now=T0)
            session_id = await store.create_session(record, now=T0, ttl=TTL)
            rotated, rotated_key = await store.rotate_key(record.key_id, now=T0 + 1)
            kept_session = await store.create_session(rotated, now=T0 + 2, ttl=TTL)
            ended_session = await store.create_session(second, now=T0 + 2, ttl=TTL)
            await store.end_session(ended_session)
            await store.record_daemon(record.scope_id, "laptop", now=T0)
            await store.revoke_key(second.key_id, now=T0 + 3)
            await all_published.wait()
        nursery.cancel_scope.cancel()
    data = await _dump(redis_url)
    assert b"alice" in data and b"laptop" in data  # the dump sees the store's data at all
    for secret in [key, second_key, rotated_key, session_id, kept_session, ended_session]:
        for form in (secret, secret.removeprefix("rw_")):
            assert form.encode() not in data
            assert all(form.encode() not in message for message in published)
    for live in [rotated_key, kept_session]:
        assert hash_secret(live).encode() in data
    assert len(published) == 3


async def test_redis_sessions_carry_a_redis_expiry(redis_url: str) -> None:
    async with (
        RedisStore.open(redis_url) as store,
        coredis.Redis.from_url(redis_url, decode_responses=False) as client,
    ):
        record, _ = await store.create_scope(label="alice", now=T0)
        session_id = await store.create_session(record, now=T0, ttl=90.5)
        ttl_ms = await client.pttl(f"repowire:session:{hash_secret(session_id)}")
        assert 0 < ttl_ms <= 90_500


@tolerates_failed_connections
async def test_redis_down_is_store_unavailable_and_data_survives_a_restart(
    redis_servers: RedisServerFactory,
) -> None:
    password = "pa:ss/word%"
    server = redis_servers(persistent=True, password=password)
    url = server.url
    assert "pa%3Ass%2Fword%25" in url  # percent-escaped in the URL, decoded for Redis
    async with RedisStore.open(url, io_timeout=1.0) as store:
        record, key = await store.create_scope(label="alice", now=T0)
        session_id = await store.create_session(record, now=T0, ttl=TTL)
        server.stop()
        # Its cache would answer for the session (see the outage grace test below).
        store.forget_sessions_of(record.key_id)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.verify_key(key, now=T0),
            lambda: store.lookup_session(session_id, now=T0),
            lambda: store.create_scope(label="bob", now=T0),
            lambda: store.revoke_key(record.key_id, now=T0),
            lambda: store.list_keys(),
            lambda: store.ping(),
            lambda: store.create_login_link(record.key_id, daemon_id=None, now=T0),
            lambda: store.take_login_link(new_token(), now=T0),
            lambda: store.take_rate_token("auth", "127.0.0.1", rate=1.0, burst=1, now=T0),
        ]
        for call in calls:
            with trio.fail_after(IO_DEADLINE), pytest.raises(StoreUnavailable) as excinfo:
                await call()
            message = str(excinfo.value)
            assert "\n" not in message
            for secret in (key, session_id, password, "pa%3Ass"):
                assert secret not in message
        server.start()
        with trio.fail_after(IO_DEADLINE):
            assert await store.verify_key(key, now=T0) == record
            looked_up = await store.lookup_session(session_id, now=T0 + 1)
            assert looked_up is not None and looked_up.key_id == record.key_id
            assert await store.revoke_key(record.key_id, now=T0 + 2)
            assert await store.verify_key(key, now=T0 + 2) is None


@tolerates_failed_connections
async def test_a_hung_redis_is_store_unavailable_after_the_timeout(
    redis_servers: RedisServerFactory,
) -> None:
    server = redis_servers()
    async with RedisStore.open(server.url, io_timeout=0.3) as store:
        record, key = await store.create_scope(label="alice", now=T0)
        server.freeze()
        try:
            with trio.fail_after(IO_DEADLINE), pytest.raises(StoreUnavailable):
                await store.verify_key(key, now=T0)
        finally:
            server.thaw()
        with trio.fail_after(IO_DEADLINE):
            assert await store.verify_key(key, now=T0) == record


@tolerates_failed_connections
async def test_the_watcher_rides_out_an_outage_and_catches_up(
    redis_servers: RedisServerFactory,
) -> None:
    server = redis_servers(persistent=True)
    url = server.url
    server.stop()
    feed = Feed()
    async with (
        RedisStore.open(url, io_timeout=1.0) as store,
        RedisStore.open(url, io_timeout=1.0) as other,
        trio.open_nursery() as nursery,
    ):
        # Redis is down: the watcher still starts (and keeps trying).
        with trio.fail_after(IO_DEADLINE):
            await nursery.start(store.watch, feed)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        server.start()
        with trio.fail_after(IO_DEADLINE):
            first, _ = await other.create_scope(label="first", now=T0)
            second, _ = await other.create_scope(label="second", now=T0)
            await other.revoke_key(first.key_id, now=T0 + 1)
        # Announced once the watcher is back: from the channel, or from its catch-up read.
        assert await feed.next(within=IO_DEADLINE) == StoreChange(
            kind=ChangeKind.KEY_REVOKED, key_id=first.key_id
        )
        # Down and up again: a revocation made right after the restart, possibly before the
        # watcher has subscribed again (it waits between attempts), is announced too.
        server.stop()
        # An outage lasts long enough for every connection to see its end (without this the
        # write below could go out on a connection whose end nobody has read yet, and fail).
        await trio.testing.wait_all_tasks_blocked()
        server.start()
        with trio.fail_after(IO_DEADLINE):
            await other.revoke_key(second.key_id, now=T0 + 2)
        assert await feed.next(within=IO_DEADLINE) == StoreChange(
            kind=ChangeKind.KEY_REVOKED, key_id=second.key_id
        )
        nursery.cancel_scope.cancel()


async def test_namespaces_isolate_two_stores_on_one_redis(redis_url: str) -> None:
    feed = Feed()
    async with (
        RedisStore.open(redis_url, namespace="alpha:") as alpha,
        RedisStore.open(redis_url, namespace="beta:") as beta,
        trio.open_nursery() as nursery,
    ):
        with trio.fail_after(IO_DEADLINE):
            await nursery.start(beta.watch, feed)
        record, key = await alpha.create_scope(label="alice", now=T0)
        session_id = await alpha.create_session(record, now=T0, ttl=TTL)
        await alpha.record_daemon(record.scope_id, "laptop", now=T0)
        assert await beta.verify_key(key, now=T0) is None
        assert await beta.lookup_session(session_id, now=T0) is None
        assert await beta.list_keys() == []
        assert await beta.known_daemons(record.scope_id) == []
        assert not await beta.is_key_live(record.key_id)
        assert not await beta.revoke_key(record.key_id, now=T0)
        with pytest.raises(UnknownRecordError):
            await beta.create_key(record.scope_id, label="x", now=T0)
        # alpha's revocation is not announced to beta's watcher: beta's own comes first.
        own, _ = await beta.create_scope(label="bob", now=T0)
        assert await alpha.revoke_key(record.key_id, now=T0 + 1)
        assert await beta.revoke_key(own.key_id, now=T0 + 1)
        assert await feed.next() == StoreChange(kind=ChangeKind.KEY_REVOKED, key_id=own.key_id)
        nursery.cancel_scope.cancel()
    async with coredis.Redis.from_url(redis_url, decode_responses=False) as client:
        names = [name async for name in client.scan_iter()]
    assert names
    assert all(name.startswith((b"alpha:", b"beta:")) for name in names)


async def test_a_session_ended_through_another_object_is_announced(
    redis_url: str,
) -> None:
    feed = Feed()
    async with (
        RedisStore.open(redis_url) as store,
        RedisStore.open(redis_url) as other,
        trio.open_nursery() as nursery,
    ):
        record, _ = await store.create_scope(label="alice", now=T0)
        session_id = await store.create_session(record, now=T0, ttl=TTL)
        with trio.fail_after(IO_DEADLINE):
            await nursery.start(store.watch, feed)
        await other.end_session(session_id)
        await other.end_session(session_id)  # gone already: nothing more to announce
        await other.rotate_key(record.key_id, now=T0 + 1)
        assert await feed.next() == StoreChange(
            kind=ChangeKind.SESSION_ENDED, session_digest=hash_secret(session_id)
        )
        # A rotation made elsewhere is told apart from a revocation here.
        assert await feed.next() == StoreChange(kind=ChangeKind.KEY_ROTATED, key_id=record.key_id)
        nursery.cancel_scope.cancel()


async def test_a_unix_socket_url_works(redis_server: RedisServer) -> None:
    async with RedisStore.open(redis_server.unix_url) as store:
        record, key = await store.create_scope(label="alice", now=T0)
        assert await store.verify_key(key, now=T0) == record


@pytest.mark.parametrize(
    "url",
    [
        "http://:hunter2@127.0.0.1:6379/0",
        "hunter2",
        "",
        "redis://:hunter2@127.0.0.1:notaport/0",
        "redis://:hunter2@[::1/0",
    ],
)
async def test_bad_urls_are_refused_without_repeating_them(url: str) -> None:
    with pytest.raises(ValueError, match="Redis URL") as excinfo:
        async with RedisStore.open(url):
            pass
    assert "hunter2" not in str(excinfo.value)
    assert excinfo.value.__cause__ is None or "hunter2" not in str(excinfo.value.__cause__)


@pytest.mark.parametrize("namespace", ["", "has space", "new\nline", "x" * 65, "é"])
async def test_bad_namespaces_are_refused(redis_url: str, namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        async with RedisStore.open(redis_url, namespace=namespace):
            pass


@pytest.mark.parametrize("io_timeout", [0.0, -1.0, math.nan, math.inf])
async def test_bad_timeouts_are_refused(redis_url: str, io_timeout: float) -> None:
    with pytest.raises(ValueError, match="io_timeout"):
        async with RedisStore.open(redis_url, io_timeout=io_timeout):
            pass


async def test_a_login_link_issued_through_one_redis_store_is_taken_through_another(
    redis_url: str,
) -> None:
    async with RedisStore.open(redis_url) as one, RedisStore.open(redis_url) as another:
        record, _ = await one.create_scope(label="alice", now=T0)
        token, link = await one.create_login_link(record.key_id, daemon_id="laptop", now=T0)
        assert await another.take_login_link(token, now=T0 + 1) == link
        assert await one.take_login_link(token, now=T0 + 2) is None
        # And a link's record expires in Redis with the link.
        token, _ = await one.create_login_link(record.key_id, daemon_id=None, now=T0)
        async with coredis.Redis.from_url(redis_url, decode_responses=False) as client:
            ttl_ms = await client.pttl(f"repowire:login-link:{hash_secret(token)}")
            assert 0 < ttl_ms <= LOGIN_LINK_TTL * 1000
            assert token.encode() not in await _dump(redis_url)


async def test_shared_rate_tokens_behave_as_the_local_buckets(redis_url: str) -> None:
    """The same answers as the in-process RateLimiter, step by step, shared by two store
    objects (two replicas), the key never stored as it is."""
    local = RateLimiter(rate=0.5, burst=3)
    now = T0
    async with RedisStore.open(redis_url) as one, RedisStore.open(redis_url) as another:
        steps = [0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 0.7, 2.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0]
        for n, step in enumerate(steps):
            now += step
            on = one if n % 2 else another
            wait = await on.take_rate_token("auth", "203.0.113.7", rate=0.5, burst=3, now=now)
            allowed = local.allow("203.0.113.7", now)
            assert (wait == 0.0) is allowed, (n, wait)
            if not allowed:
                assert wait == pytest.approx(local.retry_after("203.0.113.7", now))
        # Waiting what was asked is enough.
        wait = await one.take_rate_token("auth", "203.0.113.7", rate=0.5, burst=3, now=now)
        assert wait > 0
        now += wait
        assert await one.take_rate_token("auth", "203.0.113.7", rate=0.5, burst=3, now=now) == 0.0
        # Another key, another limit: their own buckets.
        assert await one.take_rate_token("auth", "198.51.100.1", rate=0.5, burst=3, now=now) == 0
        assert await one.take_rate_token("register", "203.0.113.7", rate=0.5, burst=3, now=now) == 0
    assert b"203.0.113.7" not in await _dump(redis_url)


@pytest.mark.parametrize(
    "arguments",
    [
        {"name": "Auth!", "rate": 1.0, "burst": 1},
        {"name": "auth", "rate": 0.0, "burst": 1},
        {"name": "auth", "rate": math.inf, "burst": 1},
        {"name": "auth", "rate": 1.0, "burst": 0},
    ],
)
async def test_bad_rate_limits_are_refused(redis_url: str, arguments: dict[str, object]) -> None:
    async with RedisStore.open(redis_url) as store:
        with pytest.raises(ValueError):
            await store.take_rate_token(
                cast(str, arguments["name"]),
                "k",
                rate=cast(float, arguments["rate"]),
                burst=cast(int, arguments["burst"]),
                now=T0,
            )


@tolerates_failed_connections
async def test_cached_sessions_ride_out_an_outage_for_the_grace_only(
    redis_servers: RedisServerFactory,
) -> None:
    server = redis_servers(persistent=True)
    url = server.url
    async with (
        RedisStore.open(url, io_timeout=1.0, outage_grace=60.0) as store,
        RedisStore.open(url, io_timeout=1.0) as plain,
    ):
        record, _ = await store.create_scope(label="alice", now=T0)
        seen = await store.create_session(record, now=T0, ttl=TTL)
        unseen = await plain.create_session(record, now=T0, ttl=TTL)
        expected = await store.lookup_session(seen, now=T0 + 1)
        assert expected is not None
        server.stop()
        with trio.fail_after(IO_DEADLINE):
            # Past the cache's trust (5 s): Redis must be asked and cannot be; within the
            # grace since Redis last confirmed it, the session is still served.
            assert await store.lookup_session(seen, now=T0 + 30) == expected
            # Known unreachable now: served at once, without waiting on Redis again.
            assert await store.lookup_session(seen, now=T0 + 40) == expected
            # A session this object never saw, or one past the grace, fails.
            with pytest.raises(StoreUnavailable):
                await store.lookup_session(unseen, now=T0 + 30)
            with pytest.raises(StoreUnavailable):
                await store.lookup_session(seen, now=T0 + 61)
            # Without a grace, the cache's trust only.
            assert await plain.lookup_session(unseen, now=T0 + 1) is not None
            with pytest.raises(StoreUnavailable):
                await plain.lookup_session(unseen, now=T0 + 10)
            # An expired session is never served from the cache.
            with pytest.raises(StoreUnavailable):
                await store.lookup_session(seen, now=T0 + TTL)
        server.start()
        with trio.fail_after(IO_DEADLINE):
            assert await store.lookup_session(seen, now=T0 + 70) == expected
            assert await store.lookup_session(unseen, now=T0 + 70) is not None
            # Revoked elsewhere while this object caches it: the cache does not outlive the
            # revocation once Redis is asked (or the change feed announces it).
            assert await plain.revoke_key(record.key_id, now=T0 + 71)
            assert await store.lookup_session(seen, now=T0 + 80) is None


@pytest.mark.parametrize(
    "arguments",
    [
        {"session_cache_size": -1},
        {"session_cache_ttl": -1.0},
        {"session_cache_ttl": math.nan},
        {"outage_grace": math.inf},
        {"outage_grace": -5.0},
    ],
)
async def test_bad_cache_settings_are_refused(redis_url: str, arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        async with RedisStore.open(redis_url, **arguments):  # type: ignore[arg-type]
            pass


@tolerates_failed_connections
async def test_a_hung_redis_delays_a_cached_session_once_only(
    redis_servers: RedisServerFactory,
) -> None:
    server = redis_servers()
    async with RedisStore.open(server.url, io_timeout=0.5, outage_grace=60.0) as store:
        record, _ = await store.create_scope(label="alice", now=T0)
        session_id = await store.create_session(record, now=T0, ttl=TTL)
        server.freeze()
        try:
            with trio.fail_after(IO_DEADLINE):
                # The first lookup past the cache's trust waits for Redis (the io timeout)...
                assert await store.lookup_session(session_id, now=T0 + 10) is not None
                # ...the next ones know better.
                started = trio.current_time()
                for n in range(5):
                    assert await store.lookup_session(session_id, now=T0 + 11 + n) is not None
                assert trio.current_time() - started < 0.25
        finally:
            server.thaw()
