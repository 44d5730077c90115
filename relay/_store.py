"""The relay's key store: scopes, API keys, browser sessions and the daemons seen, in SQLite.

Only SHA-256 digests of keys and session ids are stored (see :func:`common.hash_secret`);
a raw key or session id is handed out once, when it is created, and never written anywhere.

Every method is synchronous and runs one short transaction, so the relay may call it inline
from its event loop. Time is an argument (``now``, epoch seconds); nothing here reads a clock.
Several :class:`KeyStore` objects (in one process or several, e.g. ``repowire relay keys``
beside a running relay) may use the same file: it is in WAL mode, writers take the write lock
up front and wait for it up to a busy timeout.

Durability differs by table. Scopes, keys and sessions are committed with ``synchronous =
FULL``: a revocation, once it returns, survives a power cut. The daemons seen (a last-seen
record written on every daemon connect, thousands of times in a row after a relay restart) are
committed with ``synchronous = NORMAL``: no fsync of their own, so a power cut may lose the
latest of them, never the file's consistency nor anything committed with FULL (WAL is
sequential: the next FULL commit syncs the records before it too).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import sqlite3
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs

from common import (
    generate_key,
    generate_public_id,
    generate_session_id,
    hash_secret,
    is_daemon_id,
    looks_like_key,
    looks_like_session_id,
)

#: Pass this instead of a path to :meth:`KeyStore.open` for a private in-memory store (tests).
MEMORY: Final = ":memory:"

#: Version of the schema this module creates and understands.
SCHEMA_VERSION: Final = 1

#: Written to the SQLite header (``PRAGMA application_id``) so that a foreign database is
#: recognised as such instead of being silently extended with our tables. ASCII "RWKS".
APPLICATION_ID: Final = 0x52574B53

#: Seconds a write waits for another connection's write lock before failing with StoreError.
DEFAULT_BUSY_TIMEOUT: Final = 5.0

#: Bound on the in-memory session cache in front of :meth:`KeyStore.lookup_session`.
SESSION_CACHE_SIZE: Final = 10_000

#: Seconds a cached session is trusted without reading the database. Revocations made through
#: the same store object take effect at once; those made through another object or process
#: (an admin command beside the running relay) take effect within this delay, or as soon as
#: the relay's revocation watcher sees them (it calls :meth:`KeyStore.forget_sessions_of`).
SESSION_CACHE_TTL: Final = 5.0

#: Longest label accepted for a scope or a key.
MAX_LABEL_LENGTH: Final = 200

#: Daemons remembered per scope; past it the least recently seen are forgotten, so a client
#: inventing daemon ids cannot grow the file without limit.
MAX_DAEMONS_PER_SCOPE: Final = 1000

# Pause between attempts to switch a new file to WAL mode while another process holds a lock.
_WAL_RETRY_INTERVAL = 0.02

_PUBLIC_ID = re.compile(r"[a-z]{1,8}_[0-9a-f]{1,24}")  # never as long as a secret

_SCHEMA: Final = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY) STRICT",
    """
    CREATE TABLE scopes (
        scope_id TEXT NOT NULL PRIMARY KEY,
        label TEXT NOT NULL,
        created_at REAL NOT NULL
    ) STRICT
    """,
    """
    CREATE TABLE keys (
        key_id TEXT NOT NULL PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        scope_id TEXT NOT NULL REFERENCES scopes (scope_id),
        label TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    ) STRICT
    """,
    "CREATE INDEX keys_by_scope ON keys (scope_id)",
    """
    CREATE TABLE sessions (
        session_hash TEXT NOT NULL PRIMARY KEY,
        scope_id TEXT NOT NULL REFERENCES scopes (scope_id),
        key_id TEXT NOT NULL REFERENCES keys (key_id),
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        revoked_at REAL
    ) STRICT
    """,
    "CREATE INDEX sessions_by_key ON sessions (key_id)",
    "CREATE INDEX sessions_by_expiry ON sessions (expires_at)",
    """
    CREATE TABLE daemons (
        scope_id TEXT NOT NULL REFERENCES scopes (scope_id),
        daemon_id TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        PRIMARY KEY (scope_id, daemon_id)
    ) STRICT
    """,
)
_TABLES: Final = frozenset({"schema_version", "scopes", "keys", "sessions", "daemons"})


class StoreError(Exception):
    """The key store cannot do what was asked: unreadable, foreign or corrupt file, a lock
    held too long by another process, a closed store, or (subclass) an unknown record.

    Messages never contain a key or a session id.
    """


class UnknownRecordError(StoreError, LookupError):
    """The scope or key named does not exist, or the key is revoked where a live one is needed."""


@attrs.frozen(kw_only=True)
class KeyRecord:
    """An API key as the store knows it: everything but the key itself.

    ``key_id`` is a short random public identifier, unrelated to the key, for admin tools.
    """

    key_id: str
    scope_id: str
    label: str
    created_at: float
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@attrs.frozen(kw_only=True)
class SessionRecord:
    """A live browser session: the scope it may reach and the key that opened it."""

    scope_id: str
    key_id: str
    created_at: float
    expires_at: float


@attrs.frozen(kw_only=True)
class StoreSnapshot:
    """Every record of a key store, as stored (digests, never keys or session ids), read in
    one transaction: what ``repowire relay migrate-store`` copies.

    Rows: ``scopes`` ``(scope_id, label, created_at)``; ``keys`` ``(key_id, key digest,
    scope_id, label, created_at, revoked_at)`` oldest first, ties in creation order;
    ``sessions`` ``(session digest, scope_id, key_id, created_at, expires_at, revoked_at)``;
    ``daemons`` ``(scope_id, daemon_id, first_seen, last_seen)``.
    """

    scopes: tuple[tuple[str, str, float], ...]
    keys: tuple[tuple[str, str, str, str, float, float | None], ...]
    sessions: tuple[tuple[str, str, str, float, float, float | None], ...]
    daemons: tuple[tuple[str, str, float, float], ...]


class KeyStore:
    """Scopes, keys, sessions and daemons seen, in one SQLite database. Create with :meth:`open`.

    Not thread-safe: use one object per thread (the relay uses one, from its event loop).
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        *,
        session_cache_size: int = SESSION_CACHE_SIZE,
        session_cache_ttl: float = SESSION_CACHE_TTL,
    ) -> None:
        """Wrap an open connection; :meth:`open` is the way in (it also prepares the schema)."""
        if session_cache_size < 0:
            raise ValueError(f"session_cache_size must be >= 0, not {session_cache_size}")
        if not (math.isfinite(session_cache_ttl) and session_cache_ttl >= 0):
            raise ValueError(f"session_cache_ttl must be finite and >= 0, not {session_cache_ttl}")
        self._connection: sqlite3.Connection | None = connection
        self._cache_size = session_cache_size
        self._cache_ttl = session_cache_ttl
        # Keyed by session digest (the raw id is not kept). Value: (record, trusted until).
        # Ordered by last use, so the least recently used entry is the one dropped when full.
        self._cache: collections.OrderedDict[str, tuple[SessionRecord, float]] = (
            collections.OrderedDict()
        )
        # Revocations and rotations made through this object: SQLite's data_version does not
        # count a connection's own writes, so :meth:`change_token` adds this.
        self._own_revocations = 0

    # -- opening and closing ------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        session_cache_size: int = SESSION_CACHE_SIZE,
        session_cache_ttl: float = SESSION_CACHE_TTL,
    ) -> KeyStore:
        """Open the store at ``path`` (or :data:`MEMORY`), creating the file and schema if needed.

        A new file is created readable by its owner only, with missing parent directories. An
        existing file must be a key store of this or an older schema version.

        Blocks for up to ``busy_timeout`` seconds while another process holds a lock on a file
        it is creating. Raises :class:`StoreError` if the file cannot be opened, is corrupt or
        not an SQLite database, holds another application's data, or was written by a newer
        version; ValueError for bad settings.
        """
        if not (math.isfinite(busy_timeout) and busy_timeout >= 0):
            raise ValueError(f"busy_timeout must be finite and >= 0, not {busy_timeout}")
        if isinstance(path, str) and path == MEMORY:
            target = MEMORY
        else:
            file = Path(path)
            target = str(file)
            try:
                file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # Create the file ourselves so that it is private from the start; SQLite gives
                # its -wal and -shm files the same permissions.
                os.close(os.open(file, os.O_RDWR | os.O_CREAT, 0o600))
            except OSError as exc:
                raise StoreError(f"cannot open the key store at {file}: {exc.strerror}") from exc
        try:
            # isolation_level=None: no implicit transactions; every write below runs in an
            # explicit BEGIN IMMEDIATE ... COMMIT.
            connection = sqlite3.connect(target, timeout=busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the key store at {target}: {exc}") from exc
        try:
            store = cls(
                connection,
                session_cache_size=session_cache_size,
                session_cache_ttl=session_cache_ttl,
            )
            store._prepare(target, busy_timeout)
        except BaseException:
            connection.close()
            raise
        return store

    def _prepare(self, target: str, busy_timeout: float) -> None:
        connection = self._conn()
        try:
            with self._guard(f"opening {target}"):
                # One read transaction, so both answers come from the same snapshot even while
                # another process is creating the schema. The first read of the header is also
                # where a file that is not an SQLite database fails.
                connection.execute("BEGIN")
                try:
                    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
                    tables = self._tables()
                finally:
                    if connection.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            connection.execute("ROLLBACK")
        except StoreError as exc:
            if _is_damage(exc.__cause__):
                raise StoreError(
                    f"{target} is not a usable key store: it is corrupt or not an SQLite database"
                ) from exc.__cause__
            raise
        fresh = application_id == 0 and not tables
        if not fresh:
            self._check_existing(target, application_id, tables)
        # Only after the checks above, so that a foreign database is never modified.
        if target != MEMORY:
            self._enable_wal(target, busy_timeout)
        with self._guard(f"opening {target}"):
            # FULL: a committed revocation must survive a power cut. Writes are rare.
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA foreign_keys = ON")
        if fresh:
            with self._transaction(f"creating the schema in {target}") as conn:
                # Another process may have created it between our check and our lock.
                if self._tables():
                    created = conn.execute("PRAGMA application_id").fetchone()[0]
                    self._check_existing(target, created, self._tables())
                    return
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def _enable_wal(self, target: str, busy_timeout: float) -> None:
        connection = self._conn()
        # WAL mode is stored in the file, so this is a no-op after the first open. The switch
        # needs an exclusive lock, and SQLite reports a conflict there at once instead of
        # calling the busy handler: retry for up to the busy timeout.
        attempts = 1 + int(busy_timeout / _WAL_RETRY_INTERVAL)
        for attempt in range(attempts):
            try:
                with self._guard(f"opening {target}"):
                    if connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                        return
                    connection.execute("PRAGMA journal_mode = WAL")
                    return
            except StoreError as exc:
                if not _is_busy(exc.__cause__) or attempt == attempts - 1:
                    raise
            time.sleep(_WAL_RETRY_INTERVAL)

    def _tables(self) -> set[str]:
        rows = self._conn().execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
        return {name for (name,) in rows}

    def _check_existing(self, target: str, application_id: int, tables: set[str]) -> None:
        if application_id != APPLICATION_ID:
            raise StoreError(f"{target} is not a repowire key store (it holds other data)")
        if not tables >= _TABLES:
            missing = ", ".join(sorted(_TABLES - tables))
            raise StoreError(f"the key store {target} is damaged: missing tables {missing}")
        with self._guard(f"opening {target}"):
            (version,) = self._conn().execute("SELECT max(version) FROM schema_version").fetchone()
        if not isinstance(version, int):
            raise StoreError(f"the key store {target} is damaged: no schema version")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the key store {target} has schema version {version}, newer than this "
                f"version of repowire understands ({SCHEMA_VERSION}); upgrade repowire"
            )
        # Version 1 is the first schema: there is nothing older to migrate from yet.

    def close(self) -> None:
        """Close the database. Idempotent; any later call raises :class:`StoreError`."""
        connection, self._connection = self._connection, None
        self._cache.clear()
        if connection is not None:
            connection.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- scopes and keys ----------------------------------------------------------------------

    def create_scope(self, *, label: str, now: float) -> tuple[KeyRecord, str]:
        """Create a scope and its first key. Returns the key's record and the raw key.

        The raw key is returned only here; the store keeps its digest. Raises ValueError for a
        bad label or time.
        """
        _check_label(label)
        _check_time(now)
        scope_id = generate_public_id("scope")
        with self._transaction("creating a scope") as conn:
            conn.execute(
                "INSERT INTO scopes (scope_id, label, created_at) VALUES (?, ?, ?)",
                (scope_id, label, now),
            )
            return _insert_key(conn, scope_id, label, now)

    def create_key(self, scope_id: str, *, label: str, now: float) -> tuple[KeyRecord, str]:
        """Create another key in an existing scope. Returns its record and the raw key.

        Raises UnknownRecordError if the scope does not exist, ValueError for a bad label.
        """
        _check_label(label)
        _check_time(now)
        with self._transaction("creating a key") as conn:
            row = conn.execute("SELECT 1 FROM scopes WHERE scope_id = ?", (scope_id,)).fetchone()
            if row is None:
                raise UnknownRecordError(f"no scope {_shown(scope_id)}")
            return _insert_key(conn, scope_id, label, now)

    def verify_key(self, key: str, *, now: float) -> KeyRecord | None:
        """The record of a live key, or None if ``key`` is malformed, unknown or revoked.

        Never raises for any ``key`` value. ``now`` is taken for symmetry with the session
        checks; keys do not expire on their own.
        """
        if not looks_like_key(key):
            return None
        with self._guard("verifying a key"):
            row = (
                self._conn()
                .execute(
                    "SELECT key_id, scope_id, label, created_at, revoked_at FROM keys"
                    " WHERE key_hash = ?",
                    (hash_secret(key),),
                )
                .fetchone()
            )
        if row is None or row[4] is not None:
            return None
        return _key_record(row)

    def rotate_key(self, key_id: str, *, now: float) -> tuple[KeyRecord, str]:
        """Replace a live key: a new key in the same scope with the same label; the old key and
        all its sessions are revoked at ``now``. Returns the new record and the raw key.

        Raises UnknownRecordError if ``key_id`` is unknown or already revoked.
        """
        _check_time(now)
        with self._transaction("rotating a key") as conn:
            row = conn.execute(
                "SELECT scope_id, label, revoked_at FROM keys WHERE key_id = ?", (key_id,)
            ).fetchone()
            if row is None:
                raise UnknownRecordError(f"no key {_shown(key_id)}")
            scope_id, label, revoked_at = row
            if revoked_at is not None:
                raise UnknownRecordError(f"key {_shown(key_id)} is revoked; create a new key")
            _revoke(conn, key_id, now)
            result = _insert_key(conn, scope_id, label, now)
        self._own_revocations += 1
        self.forget_sessions_of(key_id)
        return result

    def revoke_key(self, key_id: str, *, now: float) -> bool:
        """Revoke a key and all its sessions at ``now``.

        Returns False (and changes nothing) if the key is unknown or already revoked.
        """
        _check_time(now)
        with self._transaction("revoking a key") as conn:
            revoked = _revoke(conn, key_id, now)
        if revoked:
            self._own_revocations += 1
        # Also when nothing changed here: another process may have revoked it meanwhile.
        self.forget_sessions_of(key_id)
        return revoked

    def change_token(self) -> tuple[int, int]:
        """A cheap token that differs from an earlier one if a key may have been revoked since:
        SQLite's ``PRAGMA data_version`` (bumped by commits of every other connection, other
        processes included) and the revocations made through this object.

        Raises :class:`StoreError` if the database cannot be read.
        """
        with self._guard("checking for changes"):
            (version,) = self._conn().execute("PRAGMA data_version").fetchone()
        return int(version), self._own_revocations

    def revoked_key_ids(self) -> set[str]:
        """The ids of every revoked key. Raises :class:`StoreError` if the database cannot be
        read."""
        with self._guard("listing revoked keys"):
            rows = self._conn().execute("SELECT key_id FROM keys WHERE revoked_at IS NOT NULL")
            return {key_id for (key_id,) in rows}

    def is_key_live(self, key_id: str) -> bool:
        """Whether ``key_id`` names a key that exists and is not revoked: for checks made
        without the raw key (a daemon link about to be registered). Raises
        :class:`StoreError` if the database cannot be read."""
        with self._guard("checking a key"):
            row = (
                self._conn()
                .execute("SELECT 1 FROM keys WHERE key_id = ? AND revoked_at IS NULL", (key_id,))
                .fetchone()
            )
        return row is not None

    def live_key_scope(self, key_id: str) -> str | None:
        """The scope of ``key_id`` if it names a live key, else None. Raises
        :class:`StoreError` if the database cannot be read."""
        with self._guard("checking a key"):
            row = (
                self._conn()
                .execute(
                    "SELECT scope_id FROM keys WHERE key_id = ? AND revoked_at IS NULL", (key_id,)
                )
                .fetchone()
            )
        return None if row is None else str(row[0])

    def list_keys(self, scope_id: str | None = None) -> list[KeyRecord]:
        """All keys (revoked ones included), or one scope's: oldest first, ties by insertion."""
        query = "SELECT key_id, scope_id, label, created_at, revoked_at FROM keys"
        parameters: tuple[str, ...] = ()
        if scope_id is not None:
            query += " WHERE scope_id = ?"
            parameters = (scope_id,)
        query += " ORDER BY created_at, rowid"
        with self._guard("listing keys"):
            rows = self._conn().execute(query, parameters).fetchall()
        return [_key_record(row) for row in rows]

    # -- browser sessions ---------------------------------------------------------------------

    def create_session(self, key: KeyRecord, *, now: float, ttl: float) -> str:
        """Open a browser session for ``key``, expiring at ``now + ttl``. Returns the raw
        session id (for the cookie); only its digest is stored.

        Raises UnknownRecordError if the key is unknown or has been revoked (the database is
        the authority, not the record passed in), ValueError for a bad time or ttl.
        """
        _check_time(now)
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl}")
        session_id = generate_session_id()
        digest = hash_secret(session_id)
        expires_at = now + ttl
        with self._transaction("creating a session") as conn:
            rows = conn.execute(
                "INSERT INTO sessions"
                " (session_hash, scope_id, key_id, created_at, expires_at, revoked_at)"
                " SELECT ?, scope_id, key_id, ?, ?, NULL FROM keys"
                " WHERE key_id = ? AND revoked_at IS NULL"
                " RETURNING scope_id",
                (digest, now, expires_at, key.key_id),
            ).fetchall()
            if not rows:
                raise UnknownRecordError(f"key {_shown(key.key_id)} is unknown or revoked")
        record = SessionRecord(
            scope_id=rows[0][0], key_id=key.key_id, created_at=now, expires_at=expires_at
        )
        self._remember(digest, record, now)
        return session_id

    def lookup_session(self, session_id: str, *, now: float) -> SessionRecord | None:
        """The live session with this id, or None if the id is malformed or unknown, or the
        session has expired (``now >= expires_at``), was ended or revoked, or its key revoked.

        Never raises for any ``session_id`` value. Answers come from a bounded cache for up to
        :data:`SESSION_CACHE_TTL` seconds (see there for what that means for revocations).
        """
        if not looks_like_session_id(session_id):
            return None
        digest = hash_secret(session_id)
        cached = self._cache.get(digest)
        if cached is not None:
            record, trusted_until = cached
            if now < trusted_until and now < record.expires_at:
                self._cache.move_to_end(digest)
                return record
            del self._cache[digest]
        with self._guard("looking up a session"):
            row = (
                self._conn()
                .execute(
                    "SELECT s.scope_id, s.key_id, s.created_at, s.expires_at"
                    " FROM sessions AS s JOIN keys AS k ON k.key_id = s.key_id"
                    " WHERE s.session_hash = ? AND s.revoked_at IS NULL"
                    " AND k.revoked_at IS NULL AND s.expires_at > ?",
                    (digest, now),
                )
                .fetchone()
            )
        if row is None:
            return None
        record = SessionRecord(scope_id=row[0], key_id=row[1], created_at=row[2], expires_at=row[3])
        self._remember(digest, record, now)
        return record

    def end_session(self, session_id: str) -> None:
        """Delete a session (logout). Unknown or malformed ids are ignored."""
        if not looks_like_session_id(session_id):
            return
        digest = hash_secret(session_id)
        self._cache.pop(digest, None)
        with self._transaction("ending a session") as conn:
            conn.execute("DELETE FROM sessions WHERE session_hash = ?", (digest,))

    def purge_expired(self, *, now: float) -> int:
        """Delete sessions that have expired or been revoked (they can never be used again).
        Returns how many were deleted. Keys, revoked or not, are kept for the record.
        """
        _check_time(now)
        with self._transaction("purging sessions") as conn:
            deleted = conn.execute(
                "DELETE FROM sessions WHERE expires_at <= ? OR revoked_at IS NOT NULL", (now,)
            ).rowcount
        for digest, (record, _) in list(self._cache.items()):
            if now >= record.expires_at:
                del self._cache[digest]
        return deleted

    # -- daemons ------------------------------------------------------------------------------

    def record_daemon(self, scope_id: str, daemon_id: str, *, now: float) -> None:
        """Note that ``daemon_id`` connected in ``scope_id`` at ``now``.

        Raises ValueError for a malformed daemon id (see :func:`common.is_daemon_id`),
        UnknownRecordError for an unknown scope. Keeps at most :data:`MAX_DAEMONS_PER_SCOPE`
        per scope.
        """
        if not is_daemon_id(daemon_id):
            raise ValueError("daemon id must be 1 to 64 characters from A-Z a-z 0-9 . _ -")
        _check_time(now)
        with self._transaction("recording a daemon", durable=False) as conn:
            row = conn.execute("SELECT 1 FROM scopes WHERE scope_id = ?", (scope_id,)).fetchone()
            if row is None:
                raise UnknownRecordError(f"no scope {_shown(scope_id)}")
            conn.execute(
                "INSERT INTO daemons (scope_id, daemon_id, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (scope_id, daemon_id)"
                " DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
                (scope_id, daemon_id, now, now),
            )
            (count,) = conn.execute(
                "SELECT count(*) FROM daemons WHERE scope_id = ?", (scope_id,)
            ).fetchone()
            if count > MAX_DAEMONS_PER_SCOPE:
                conn.execute(
                    "DELETE FROM daemons WHERE scope_id = ? AND daemon_id NOT IN"
                    " (SELECT daemon_id FROM daemons WHERE scope_id = ?"
                    " ORDER BY last_seen DESC, daemon_id LIMIT ?)",
                    (scope_id, scope_id, MAX_DAEMONS_PER_SCOPE),
                )

    def known_daemons(self, scope_id: str) -> list[tuple[str, float, float]]:
        """``(daemon_id, first_seen, last_seen)`` for each daemon seen in the scope, by id."""
        with self._guard("listing daemons"):
            rows = (
                self._conn()
                .execute(
                    "SELECT daemon_id, first_seen, last_seen FROM daemons"
                    " WHERE scope_id = ? ORDER BY daemon_id",
                    (scope_id,),
                )
                .fetchall()
            )
        return [(daemon_id, first, last) for daemon_id, first, last in rows]

    # -- export -------------------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        """Every record, read in one transaction (a consistent view while others write).
        Raises :class:`StoreError` if the database cannot be read."""
        connection = self._conn()
        with self._guard("reading every record"):
            connection.execute("BEGIN")
            try:
                scopes = connection.execute(
                    "SELECT scope_id, label, created_at FROM scopes ORDER BY created_at, rowid"
                ).fetchall()
                keys = connection.execute(
                    "SELECT key_id, key_hash, scope_id, label, created_at, revoked_at FROM keys"
                    " ORDER BY created_at, rowid"
                ).fetchall()
                sessions = connection.execute(
                    "SELECT session_hash, scope_id, key_id, created_at, expires_at, revoked_at"
                    " FROM sessions ORDER BY created_at, rowid"
                ).fetchall()
                daemons = connection.execute(
                    "SELECT scope_id, daemon_id, first_seen, last_seen FROM daemons"
                    " ORDER BY scope_id, daemon_id"
                ).fetchall()
            finally:
                if connection.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("ROLLBACK")
        return StoreSnapshot(
            scopes=tuple(map(tuple, scopes)),
            keys=tuple(map(tuple, keys)),
            sessions=tuple(map(tuple, sessions)),
            daemons=tuple(map(tuple, daemons)),
        )

    # -- internals ----------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            raise StoreError("the key store is closed")
        return self._connection

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn any SQLite failure into a StoreError saying what was being done."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"key store failure while {action}: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self, action: str, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed if the body returns, rolled back if it raises.

        ``durable=False`` commits without an fsync (``synchronous = NORMAL``, see the module
        docstring); the connection is back to FULL afterwards, whatever happened.
        """
        connection = self._conn()
        with self._guard(action):
            if not durable:
                connection.execute("PRAGMA synchronous = NORMAL")
            try:
                # IMMEDIATE takes the write lock now, waiting up to the busy timeout. A deferred
                # transaction that reads first and then writes cannot wait in WAL mode: it
                # fails at once if another connection wrote in between.
                connection.execute("BEGIN IMMEDIATE")
                try:
                    yield connection
                    connection.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            connection.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    connection.execute("PRAGMA synchronous = FULL")

    def _remember(self, digest: str, record: SessionRecord, now: float) -> None:
        if self._cache_size == 0 or self._cache_ttl == 0:
            return
        self._cache[digest] = (record, now + self._cache_ttl)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def forget_sessions_of(self, key_id: str) -> None:
        """Drop the cached sessions of ``key_id``, so that the next lookup of each reads the
        database (where a revoked key's sessions are dead)."""
        # A linear scan of at most SESSION_CACHE_SIZE entries, on rare admin operations only.
        stale = [digest for digest, (record, _) in self._cache.items() if record.key_id == key_id]
        for digest in stale:
            del self._cache[digest]


def _insert_key(
    conn: sqlite3.Connection, scope_id: str, label: str, now: float
) -> tuple[KeyRecord, str]:
    key = generate_key()
    record = KeyRecord(
        key_id=generate_public_id("key"),
        scope_id=scope_id,
        label=label,
        created_at=now,
        revoked_at=None,
    )
    conn.execute(
        "INSERT INTO keys (key_id, key_hash, scope_id, label, created_at, revoked_at)"
        " VALUES (?, ?, ?, ?, ?, NULL)",
        (record.key_id, hash_secret(key), scope_id, label, now),
    )
    return record, key


def _revoke(conn: sqlite3.Connection, key_id: str, now: float) -> bool:
    changed = conn.execute(
        "UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (now, key_id)
    ).rowcount
    if changed:
        conn.execute(
            "UPDATE sessions SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
            (now, key_id),
        )
    return changed > 0


def _key_record(row: tuple[str, str, str, float, float | None]) -> KeyRecord:
    key_id, scope_id, label, created_at, revoked_at = row
    return KeyRecord(
        key_id=key_id,
        scope_id=scope_id,
        label=label,
        created_at=created_at,
        revoked_at=revoked_at,
    )


def _is_busy(error: BaseException | None) -> bool:
    if not isinstance(error, sqlite3.OperationalError):
        return False
    return error.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_damage(error: BaseException | None) -> bool:
    if not isinstance(error, sqlite3.DatabaseError):
        return False
    return error.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)


def _check_label(label: str) -> None:
    if len(label) > MAX_LABEL_LENGTH or any(unicodedata.category(c) == "Cc" for c in label):
        raise ValueError(
            f"label must be at most {MAX_LABEL_LENGTH} characters, without control characters"
        )


def _check_time(now: float) -> None:
    if not math.isfinite(now):
        raise ValueError(f"time must be a finite number of epoch seconds, not {now}")


def _shown(identifier: str) -> str:
    """An identifier for an error message, or a placeholder: it may be a secret pasted by
    mistake in place of an id, and a secret must never reach a message."""
    if _PUBLIC_ID.fullmatch(identifier) is not None:
        return repr(identifier)
    return "(malformed id, not shown)"
