"""What each key-store write commits with: FULL for keys and sessions, NORMAL for daemons seen.

A relay restart records thousands of daemons in a row, one write per connect; an fsync for each
would hold the event loop. Those last-seen records are committed without one (``synchronous =
NORMAL``), and everything else keeps ``synchronous = FULL``. The statements SQLite runs are
traced to check which setting each commit ran under.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import KeyStore, UnknownRecordError

FULL = 2
NORMAL = 1


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    with KeyStore.open(tmp_path / "relay.sqlite3") as opened:
        yield opened


def traced(store: KeyStore) -> list[str]:
    """Every statement the store's connection runs from now on, in order."""
    statements: list[str] = []
    store._conn().set_trace_callback(statements.append)
    return statements


def synchronous(store: KeyStore) -> int:
    (value,) = store._conn().execute("PRAGMA synchronous").fetchone()
    return int(value)


def commits_under(statements: list[str]) -> list[str]:
    """For each COMMIT, the synchronous setting in force when it ran."""
    setting = "FULL"
    seen: list[str] = []
    for statement in statements:
        normalized = " ".join(statement.split()).upper()
        if normalized.startswith("PRAGMA SYNCHRONOUS = "):
            setting = normalized.rsplit(" ", 1)[1]
        elif normalized == "COMMIT":
            seen.append(setting)
    return seen


def test_recording_a_daemon_commits_without_fsync_and_restores_full(store: KeyStore) -> None:
    record, _key = store.create_scope(label="s", now=time.time())
    assert synchronous(store) == FULL
    statements = traced(store)
    store.record_daemon(record.scope_id, "laptop", now=1000.0)
    assert commits_under(statements) == ["NORMAL"]
    assert synchronous(store) == FULL


def test_keys_and_sessions_still_commit_with_full(store: KeyStore) -> None:
    statements = traced(store)
    now = time.time()
    record, _key = store.create_scope(label="s", now=now)
    store.record_daemon(record.scope_id, "laptop", now=now)
    session = store.create_session(record, now=now, ttl=60)
    store.revoke_key(record.key_id, now=now)
    store.end_session(session)
    assert commits_under(statements) == ["FULL", "NORMAL", "FULL", "FULL", "FULL"]


def test_a_refused_daemon_record_writes_nothing_and_leaves_full(store: KeyStore) -> None:
    with pytest.raises(UnknownRecordError):
        store.record_daemon("scope_0123abcd", "laptop", now=1000.0)
    with pytest.raises(ValueError):
        store.record_daemon("scope_0123abcd", "bad id", now=1000.0)
    assert synchronous(store) == FULL
    assert not store._conn().in_transaction


def test_daemon_records_are_committed_for_other_readers(tmp_path: Path) -> None:
    path = tmp_path / "relay.sqlite3"
    with KeyStore.open(path) as writer, KeyStore.open(path) as reader:
        record, _key = writer.create_scope(label="s", now=1.0)
        writer.record_daemon(record.scope_id, "laptop", now=5.0)
        writer.record_daemon(record.scope_id, "laptop", now=9.0)
        assert reader.known_daemons(record.scope_id) == [("laptop", 5.0, 9.0)]
    with KeyStore.open(path) as reopened:
        assert reopened.known_daemons(record.scope_id) == [("laptop", 5.0, 9.0)]
