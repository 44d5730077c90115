"""The SQLite key store: scopes, keys, sessions, daemons; files, locking and damage."""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

import relay._store
from common import generate_key, generate_session_id, hash_secret
from relay._store import (
    MEMORY,
    KeyRecord,
    KeyStore,
    SessionRecord,
    StoreError,
    UnknownRecordError,
)

T0 = 1_700_000_000.0
TTL = 3600.0


@pytest.fixture
def store() -> Iterator[KeyStore]:
    key_store = KeyStore.open(MEMORY)
    try:
        yield key_store
    finally:
        key_store.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "keys.sqlite3"


def _files_bytes(path: Path) -> bytes:
    """The main database file and its WAL and shared-memory companions, if present."""
    data = b""
    for suffix in ("", "-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            data += companion.read_bytes()
    return data


# -- scopes and keys --------------------------------------------------------------------------


def test_create_scope_returns_a_key_that_verifies(store: KeyStore) -> None:
    record, key = store.create_scope(label="alice", now=T0)
    assert record.label == "alice"
    assert record.created_at == T0
    assert record.revoked_at is None
    assert not record.revoked
    assert key not in (record.key_id, record.scope_id)
    assert record.key_id not in key
    assert store.verify_key(key, now=T0 + 1) == record
    assert store.list_keys() == [record]
    assert store.list_keys(record.scope_id) == [record]


def test_scopes_are_distinct(store: KeyStore) -> None:
    first, _ = store.create_scope(label="a", now=T0)
    second, _ = store.create_scope(label="b", now=T0)
    assert first.scope_id != second.scope_id
    assert store.list_keys(first.scope_id) == [first]
    assert store.list_keys(second.scope_id) == [second]
    assert store.list_keys("scope_0000") == []


def test_create_key_adds_a_key_to_the_same_scope(store: KeyStore) -> None:
    first, first_key = store.create_scope(label="alice", now=T0)
    second, second_key = store.create_key(first.scope_id, label="laptop", now=T0 + 5)
    assert second.scope_id == first.scope_id
    assert second.key_id != first.key_id
    assert second_key != first_key
    assert second.label == "laptop"
    assert store.verify_key(first_key, now=T0 + 6) == first
    assert store.verify_key(second_key, now=T0 + 6) == second
    assert store.list_keys(first.scope_id) == [first, second]


def test_create_key_in_an_unknown_scope_is_a_clear_error(store: KeyStore) -> None:
    with pytest.raises(UnknownRecordError, match="no scope 'scope_abc'"):
        store.create_key("scope_abc", label="x", now=T0)
    assert store.list_keys() == []


def test_errors_never_echo_a_secret_given_in_place_of_an_id(store: KeyStore) -> None:
    record, key = store.create_scope(label="alice", now=T0)
    with pytest.raises(UnknownRecordError) as excinfo:
        store.create_key(key, label="x", now=T0)
    assert key not in str(excinfo.value)
    with pytest.raises(UnknownRecordError) as excinfo:
        store.rotate_key(key, now=T0)
    assert key not in str(excinfo.value)
    assert store.verify_key(key, now=T0) == record


def test_unknown_key_does_not_verify(store: KeyStore) -> None:
    store.create_scope(label="alice", now=T0)
    assert store.verify_key(generate_key(), now=T0) is None


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
    ],
)
def test_malformed_keys_verify_to_none(store: KeyStore, bad: str) -> None:
    _, key = store.create_scope(label="alice", now=T0)
    assert store.verify_key(bad, now=T0) is None
    assert store.verify_key(key + "x", now=T0) is None
    assert store.verify_key(key[:-1], now=T0) is None


@pytest.mark.parametrize("bad", [None, b"rw_" + b"a" * 43, 42])
def test_non_string_keys_verify_to_none(store: KeyStore, bad: object) -> None:
    assert store.verify_key(cast(str, bad), now=T0) is None
    assert store.lookup_session(cast(str, bad), now=T0) is None
    store.end_session(cast(str, bad))


@pytest.mark.parametrize("label", ["x" * 201, "line\nbreak", "bell\x07", "\x00"])
def test_bad_labels_are_refused_and_nothing_is_written(store: KeyStore, label: str) -> None:
    with pytest.raises(ValueError, match="label"):
        store.create_scope(label=label, now=T0)
    assert store.list_keys() == []
    record, _ = store.create_scope(label="ok", now=T0)
    with pytest.raises(ValueError, match="label"):
        store.create_key(record.scope_id, label=label, now=T0)
    assert store.list_keys() == [record]


def test_labels_may_be_empty_or_unicode(store: KeyStore) -> None:
    record, _ = store.create_scope(label="", now=T0)
    other, _ = store.create_key(record.scope_id, label="Zoë's phone 📱", now=T0)
    assert [r.label for r in store.list_keys()] == ["", "Zoë's phone 📱"]
    assert other.label == "Zoë's phone 📱"


@pytest.mark.parametrize("now", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_times_are_refused(store: KeyStore, now: float) -> None:
    with pytest.raises(ValueError, match="time"):
        store.create_scope(label="a", now=now)
    assert store.list_keys() == []


def test_revoke_key(store: KeyStore) -> None:
    record, key = store.create_scope(label="alice", now=T0)
    other, other_key = store.create_key(record.scope_id, label="other", now=T0)
    assert store.revoke_key(record.key_id, now=T0 + 10) is True
    assert store.verify_key(key, now=T0 + 11) is None
    assert store.verify_key(other_key, now=T0 + 11) == other
    assert store.revoke_key(record.key_id, now=T0 + 20) is False
    assert store.revoke_key("key_0123456789abcdef", now=T0 + 20) is False
    listed = store.list_keys(record.scope_id)
    assert listed[0].key_id == record.key_id
    assert listed[0].revoked_at == T0 + 10
    assert listed[0].revoked
    assert listed[1] == other


def test_rotate_key(store: KeyStore) -> None:
    old, old_key = store.create_scope(label="alice", now=T0)
    new, new_key = store.rotate_key(old.key_id, now=T0 + 10)
    assert new_key != old_key
    assert new.key_id != old.key_id
    assert new.scope_id == old.scope_id
    assert new.label == old.label
    assert new.created_at == T0 + 10
    assert store.verify_key(old_key, now=T0 + 11) is None
    assert store.verify_key(new_key, now=T0 + 11) == new
    assert [k.revoked_at for k in store.list_keys(old.scope_id)] == [T0 + 10, None]


def test_rotating_an_unknown_or_revoked_key_fails_and_changes_nothing(store: KeyStore) -> None:
    with pytest.raises(UnknownRecordError, match="no key"):
        store.rotate_key("key_0123456789abcdef", now=T0)
    record, _ = store.create_scope(label="alice", now=T0)
    store.revoke_key(record.key_id, now=T0 + 1)
    with pytest.raises(UnknownRecordError, match="revoked"):
        store.rotate_key(record.key_id, now=T0 + 2)
    assert len(store.list_keys()) == 1


# -- sessions ---------------------------------------------------------------------------------


def test_session_round_trip(store: KeyStore) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    session_id = store.create_session(record, now=T0, ttl=TTL)
    expected = SessionRecord(
        scope_id=record.scope_id, key_id=record.key_id, created_at=T0, expires_at=T0 + TTL
    )
    assert store.lookup_session(session_id, now=T0 + 1) == expected
    assert store.lookup_session(generate_session_id(), now=T0 + 1) is None


def test_sessions_expire(store: KeyStore) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    session_id = store.create_session(record, now=T0, ttl=60)
    assert store.lookup_session(session_id, now=T0 + 59.9) is not None
    assert store.lookup_session(session_id, now=T0 + 60) is None
    assert store.lookup_session(session_id, now=T0 + 3600) is None


def test_sessions_expire_even_when_cached(db_path: Path) -> None:
    # A cache trust period longer than the session's remaining life must not extend it.
    with KeyStore.open(db_path, session_cache_ttl=1000) as store:
        record, _ = store.create_scope(label="alice", now=T0)
        session_id = store.create_session(record, now=T0, ttl=10)
        assert store.lookup_session(session_id, now=T0 + 9) is not None
        assert store.lookup_session(session_id, now=T0 + 10) is None


def test_end_session(store: KeyStore) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    ended = store.create_session(record, now=T0, ttl=TTL)
    kept = store.create_session(record, now=T0, ttl=TTL)
    assert store.lookup_session(ended, now=T0 + 1) is not None
    store.end_session(ended)
    assert store.lookup_session(ended, now=T0 + 2) is None
    assert store.lookup_session(kept, now=T0 + 2) is not None
    store.end_session(ended)  # again: ignored
    store.end_session(generate_session_id())  # unknown: ignored


@pytest.mark.parametrize(
    "bad", ["", "short", "a" * 42 + "=", "a" * 43 + "\n", "a" * 5000, "\ud800" * 43, "' OR 1=1 --"]
)
def test_malformed_session_ids_are_none_and_never_raise(store: KeyStore, bad: str) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    store.create_session(record, now=T0, ttl=TTL)
    assert store.lookup_session(bad, now=T0) is None
    store.end_session(bad)


def test_revoking_a_key_ends_its_sessions_only(store: KeyStore) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    other, _ = store.create_key(record.scope_id, label="other", now=T0)
    doomed = store.create_session(record, now=T0, ttl=TTL)
    kept = store.create_session(other, now=T0, ttl=TTL)
    # Looked up first, so the answers sit in the cache: revocation must reach past it.
    assert store.lookup_session(doomed, now=T0 + 1) is not None
    assert store.lookup_session(kept, now=T0 + 1) is not None
    assert store.revoke_key(record.key_id, now=T0 + 2)
    assert store.lookup_session(doomed, now=T0 + 2) is None
    assert store.lookup_session(kept, now=T0 + 2) is not None


def test_rotating_a_key_ends_its_sessions(store: KeyStore) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    session_id = store.create_session(record, now=T0, ttl=TTL)
    assert store.lookup_session(session_id, now=T0 + 1) is not None
    new, _ = store.rotate_key(record.key_id, now=T0 + 2)
    assert store.lookup_session(session_id, now=T0 + 2) is None
    fresh = store.create_session(new, now=T0 + 3, ttl=TTL)
    looked_up = store.lookup_session(fresh, now=T0 + 4)
    assert looked_up is not None
    assert looked_up.key_id == new.key_id


def test_no_session_for_a_revoked_key_even_from_a_stale_record(store: KeyStore) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    store.revoke_key(record.key_id, now=T0 + 1)
    with pytest.raises(UnknownRecordError, match="unknown or revoked"):
        store.create_session(record, now=T0 + 2, ttl=TTL)
    forged = KeyRecord(
        key_id="key_0123456789abcdef",
        scope_id=record.scope_id,
        label="",
        created_at=T0,
        revoked_at=None,
    )
    with pytest.raises(UnknownRecordError):
        store.create_session(forged, now=T0 + 2, ttl=TTL)
    assert store.purge_expired(now=T0 + 2) == 0


def test_session_scope_comes_from_the_store_not_the_record(store: KeyStore) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    other, _ = store.create_scope(label="mallory", now=T0)
    claimed = KeyRecord(
        key_id=record.key_id, scope_id=other.scope_id, label="", created_at=T0, revoked_at=None
    )
    session_id = store.create_session(claimed, now=T0, ttl=TTL)
    looked_up = store.lookup_session(session_id, now=T0 + 1)
    assert looked_up is not None
    assert looked_up.scope_id == record.scope_id


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_ttl_is_refused(store: KeyStore, ttl: float) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    with pytest.raises(ValueError, match="ttl"):
        store.create_session(record, now=T0, ttl=ttl)


def test_purge_expired(store: KeyStore) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    other, _ = store.create_key(record.scope_id, label="other", now=T0)
    store.create_session(record, now=T0, ttl=10)  # expires
    live = store.create_session(record, now=T0, ttl=TTL)
    store.create_session(other, now=T0, ttl=TTL)  # its key gets revoked
    store.revoke_key(other.key_id, now=T0 + 1)
    assert store.purge_expired(now=T0 + 20) == 2
    assert store.purge_expired(now=T0 + 20) == 0
    assert store.lookup_session(live, now=T0 + 20) is not None
    assert len(store.list_keys()) == 2  # keys are kept, revoked or not


# -- the session cache ------------------------------------------------------------------------


def test_cache_answers_without_the_database_within_its_ttl(db_path: Path) -> None:
    with (
        KeyStore.open(db_path, session_cache_ttl=5) as relay_side,
        KeyStore.open(db_path) as admin_side,
    ):
        record, _ = admin_side.create_scope(label="alice", now=T0)
        session_id = admin_side.create_session(record, now=T0, ttl=TTL)
        assert relay_side.lookup_session(session_id, now=T0) is not None
        # Revoked by another store object: this one's cache is not told, and keeps the answer
        # for at most the cache's trust period.
        admin_side.revoke_key(record.key_id, now=T0 + 1)
        assert relay_side.lookup_session(session_id, now=T0 + 4.9) is not None
        assert relay_side.lookup_session(session_id, now=T0 + 5) is None


def test_without_a_cache_other_objects_revocations_apply_at_once(db_path: Path) -> None:
    with (
        KeyStore.open(db_path, session_cache_ttl=0) as relay_side,
        KeyStore.open(db_path) as admin_side,
    ):
        record, _ = admin_side.create_scope(label="alice", now=T0)
        session_id = admin_side.create_session(record, now=T0, ttl=TTL)
        assert relay_side.lookup_session(session_id, now=T0) is not None
        admin_side.end_session(session_id)
        assert relay_side.lookup_session(session_id, now=T0) is None


def test_cache_is_bounded(db_path: Path) -> None:
    with (
        KeyStore.open(db_path, session_cache_size=2, session_cache_ttl=60) as relay_side,
        KeyStore.open(db_path) as admin_side,
    ):
        record, _ = admin_side.create_scope(label="alice", now=T0)
        sessions = [admin_side.create_session(record, now=T0, ttl=TTL) for _ in range(3)]
        for session_id in sessions:
            assert relay_side.lookup_session(session_id, now=T0) is not None
        for session_id in sessions:
            admin_side.end_session(session_id)
        # The least recently used entry was dropped, so only its lookup reaches the database.
        assert relay_side.lookup_session(sessions[0], now=T0 + 1) is None
        assert relay_side.lookup_session(sessions[1], now=T0 + 1) is not None
        assert relay_side.lookup_session(sessions[2], now=T0 + 1) is not None


def test_cache_invalidated_by_end_session_through_the_same_object(db_path: Path) -> None:
    with KeyStore.open(db_path, session_cache_ttl=60) as store:
        record, _ = store.create_scope(label="alice", now=T0)
        session_id = store.create_session(record, now=T0, ttl=TTL)
        assert store.lookup_session(session_id, now=T0) is not None
        store.end_session(session_id)
        assert store.lookup_session(session_id, now=T0) is None


@pytest.mark.parametrize(("size", "ttl"), [(-1, 5.0), (10, -1.0), (10, float("nan"))])
def test_bad_cache_settings_are_refused(size: int, ttl: float) -> None:
    with pytest.raises(ValueError, match="session_cache"):
        KeyStore.open(MEMORY, session_cache_size=size, session_cache_ttl=ttl)


# -- daemons ----------------------------------------------------------------------------------


def test_record_daemon(store: KeyStore) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    other, _ = store.create_scope(label="bob", now=T0)
    store.record_daemon(record.scope_id, "laptop", now=T0)
    store.record_daemon(record.scope_id, "desktop.home", now=T0 + 5)
    store.record_daemon(record.scope_id, "laptop", now=T0 + 10)
    store.record_daemon(record.scope_id, "laptop", now=T0 + 7)  # late report: no step back
    store.record_daemon(other.scope_id, "laptop", now=T0 + 3)
    assert store.known_daemons(record.scope_id) == [
        ("desktop.home", T0 + 5, T0 + 5),
        ("laptop", T0, T0 + 10),
    ]
    assert store.known_daemons(other.scope_id) == [("laptop", T0 + 3, T0 + 3)]
    assert store.known_daemons("scope_0000") == []


@pytest.mark.parametrize("daemon_id", ["", "a" * 65, "has space", "slash/y", "é", "a\n"])
def test_record_daemon_refuses_bad_ids(store: KeyStore, daemon_id: str) -> None:
    record, _ = store.create_scope(label="alice", now=T0)
    with pytest.raises(ValueError, match="daemon id"):
        store.record_daemon(record.scope_id, daemon_id, now=T0)
    assert store.known_daemons(record.scope_id) == []


def test_record_daemon_in_an_unknown_scope(store: KeyStore) -> None:
    with pytest.raises(UnknownRecordError, match="no scope"):
        store.record_daemon("scope_abc", "laptop", now=T0)


def test_daemons_per_scope_are_bounded(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay._store, "MAX_DAEMONS_PER_SCOPE", 3)
    record, _ = store.create_scope(label="alice", now=T0)
    for n in range(6):
        store.record_daemon(record.scope_id, f"d{n}", now=T0 + n)
    store.record_daemon(record.scope_id, "d0", now=T0 + 10)  # back again: most recent now
    assert [d for d, _, _ in store.known_daemons(record.scope_id)] == ["d0", "d4", "d5"]


# -- the file ---------------------------------------------------------------------------------


def test_only_hashes_reach_the_file(db_path: Path) -> None:
    store = KeyStore.open(db_path)
    try:
        record, key = store.create_scope(label="alice", now=T0)
        _, second_key = store.create_key(record.scope_id, label="b", now=T0)
        session_id = store.create_session(record, now=T0, ttl=TTL)
        rotated, rotated_key = store.rotate_key(record.key_id, now=T0 + 1)
        new_session = store.create_session(rotated, now=T0 + 2, ttl=TTL)
        secrets = [key, second_key, rotated_key, session_id, new_session]
        data = _files_bytes(db_path)
        assert b"alice" in data  # the file's content is visible to this check at all
        for secret in secrets:
            assert secret.encode() not in data
            assert secret[3:].encode() not in data
            assert hash_secret(secret).encode() in data
    finally:
        store.close()
    data = _files_bytes(db_path)
    for secret in secrets:
        assert secret.encode() not in data
        assert secret[3:].encode() not in data


def test_new_file_is_private_and_in_wal_mode(db_path: Path) -> None:
    with KeyStore.open(db_path):
        pass
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    connection = sqlite3.connect(db_path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    finally:
        connection.close()


def test_reopen_keeps_everything(db_path: Path) -> None:
    with KeyStore.open(db_path) as store:
        record, key = store.create_scope(label="alice", now=T0)
        session_id = store.create_session(record, now=T0, ttl=TTL)
        store.record_daemon(record.scope_id, "laptop", now=T0)
    with KeyStore.open(db_path) as store:
        assert store.verify_key(key, now=T0) == record
        assert store.lookup_session(session_id, now=T0) is not None
        assert store.known_daemons(record.scope_id) == [("laptop", T0, T0)]


def test_two_store_objects_on_one_file(db_path: Path) -> None:
    with KeyStore.open(db_path) as relay_side, KeyStore.open(db_path) as admin_side:
        record, key = relay_side.create_scope(label="alice", now=T0)
        assert admin_side.verify_key(key, now=T0) == record
        second, second_key = admin_side.create_key(record.scope_id, label="cli", now=T0 + 1)
        assert relay_side.verify_key(second_key, now=T0 + 1) == second
        assert admin_side.revoke_key(record.key_id, now=T0 + 2)
        assert relay_side.verify_key(key, now=T0 + 2) is None
        assert relay_side.revoke_key(record.key_id, now=T0 + 3) is False
        relay_side.record_daemon(record.scope_id, "laptop", now=T0 + 4)
        assert admin_side.known_daemons(record.scope_id) == [("laptop", T0 + 4, T0 + 4)]


def test_concurrent_first_opens_of_a_new_file_all_succeed(tmp_path: Path) -> None:
    # Several processes (threads here, each with its own connection) creating the same store
    # at once: exactly one creates the schema, the others wait for it and use it.
    errors: list[BaseException] = []

    def open_and_write(path: Path) -> None:
        try:
            with KeyStore.open(path) as store:
                store.create_scope(label="racer", now=T0)
        except BaseException as exc:
            errors.append(exc)

    for trial in range(10):
        path = tmp_path / str(trial) / "keys.sqlite3"
        threads = [threading.Thread(target=open_and_write, args=(path,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == []
        with KeyStore.open(path) as store:
            assert len(store.list_keys()) == 4


def test_a_held_write_lock_gives_a_clear_error_after_the_busy_timeout(db_path: Path) -> None:
    with KeyStore.open(db_path, busy_timeout=0.05) as store:
        record, key = store.create_scope(label="alice", now=T0)
        blocker = sqlite3.connect(db_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="locked"):
                store.create_key(record.scope_id, label="x", now=T0)
            # Readers are not blocked by a writer in WAL mode.
            assert store.verify_key(key, now=T0) == record
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        # The failed write left nothing behind and the store still works.
        assert store.list_keys() == [record]
        store.create_key(record.scope_id, label="y", now=T0)
        assert len(store.list_keys()) == 2


def test_a_write_waits_for_a_short_lock(db_path: Path) -> None:
    with KeyStore.open(db_path, busy_timeout=10) as store:
        record, _ = store.create_scope(label="alice", now=T0)
        blocker = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            release = threading.Timer(0.1, blocker.execute, args=("COMMIT",))
            release.start()
            try:
                store.create_key(record.scope_id, label="waited", now=T0)
            finally:
                release.join(timeout=10)
        finally:
            blocker.close()
        assert [k.label for k in store.list_keys()] == ["alice", "waited"]


def test_a_file_that_is_not_a_database_is_a_store_error(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    garbage = b"definitely not an sqlite database\n" * 200
    db_path.write_bytes(garbage)
    with pytest.raises(StoreError, match="corrupt or not an SQLite database"):
        KeyStore.open(db_path)
    assert db_path.read_bytes() == garbage


def test_a_damaged_header_is_a_store_error(db_path: Path) -> None:
    with KeyStore.open(db_path) as store:
        store.create_scope(label="alice", now=T0)
    data = bytearray(db_path.read_bytes())
    data[0:16] = b"\xff" * 16  # the SQLite magic string
    db_path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        KeyStore.open(db_path)


def test_damaged_pages_give_a_store_error_on_use(db_path: Path) -> None:
    with KeyStore.open(db_path) as store:
        record, _ = store.create_scope(label="alice", now=T0)
        for n in range(100):
            store.create_key(record.scope_id, label=f"key {n} " + "x" * 100, now=T0)
    data = bytearray(db_path.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    for offset in range(2 * page, len(data), page):  # past the header and the schema page
        data[offset : offset + 100] = b"\xa5" * 100
    db_path.write_bytes(bytes(data))
    with KeyStore.open(db_path) as store, pytest.raises(StoreError, match="malformed"):
        store.list_keys()


def test_a_foreign_database_is_refused_and_left_untouched(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    foreign = sqlite3.connect(db_path)
    foreign.execute("CREATE TABLE notes (body TEXT)")
    foreign.execute("INSERT INTO notes VALUES ('keep me')")
    foreign.commit()
    foreign.close()
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match="not a repowire key store"):
        KeyStore.open(db_path)
    assert db_path.read_bytes() == before
    assert not db_path.with_name(db_path.name + "-wal").exists()


def test_a_store_from_a_newer_version_is_refused(db_path: Path) -> None:
    with KeyStore.open(db_path):
        pass
    connection = sqlite3.connect(db_path)
    connection.execute("INSERT INTO schema_version (version) VALUES (99)")
    connection.commit()
    connection.close()
    with pytest.raises(StoreError, match="schema version 99"):
        KeyStore.open(db_path)


def test_a_store_missing_a_table_is_refused(db_path: Path) -> None:
    with KeyStore.open(db_path):
        pass
    connection = sqlite3.connect(db_path)
    connection.execute("DROP TABLE daemons")
    connection.commit()
    connection.close()
    with pytest.raises(StoreError, match="damaged: missing tables daemons"):
        KeyStore.open(db_path)


def test_an_empty_existing_file_becomes_a_store(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.touch()
    with KeyStore.open(db_path) as store:
        record, key = store.create_scope(label="alice", now=T0)
        assert store.verify_key(key, now=T0) == record


def test_a_directory_in_place_of_the_file_is_a_store_error(db_path: Path) -> None:
    db_path.mkdir(parents=True)
    with pytest.raises(StoreError, match="cannot open the key store"):
        KeyStore.open(db_path)


def test_a_closed_store_raises_store_error(store: KeyStore) -> None:
    record, key = store.create_scope(label="alice", now=T0)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.verify_key(key, now=T0)
    with pytest.raises(StoreError, match="closed"):
        store.create_key(record.scope_id, label="x", now=T0)
    with pytest.raises(StoreError, match="closed"):
        store.list_keys()
