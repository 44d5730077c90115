"""The key store interface (:class:`relay._store_api.Store`) over the SQLite :class:`KeyStore`.

The relay's store when it runs alone. Each method calls :class:`KeyStore` directly, on the
event loop: the file is local and each call is one short transaction, so nothing is gained by
a worker thread (and a thread would need a connection of its own). As the calls never wait,
each one is atomic with respect to other trio tasks.

The change feed (:meth:`SqliteStore.watch`) polls SQLite's data version, as cheap as a pragma,
every :data:`POLL_INTERVAL` seconds, and reads the revoked keys only when it moved. A rotation
made through another object looks like a revocation from here (the file does not say which it
was), so it is announced as :attr:`ChangeKind.KEY_REVOKED`; one made through this object is
announced as :attr:`ChangeKind.KEY_ROTATED`. Sessions ended through this object are announced
(for any well-formed id: the file does not say whether it was known); those ended by another
process are not (one relay per file, and the CLI never ends sessions), and reach lookups
through this object within :data:`relay._store.SESSION_CACHE_TTL` seconds.

One-time sign-in links are kept in memory (:class:`relay._login_links.LoginLinks`), not in the
file: one relay uses a file, the links live minutes, and a restart may forget them. Taking a
link checks its key in the file, so a key revoked by another process never signs in.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Final

import trio

from common import hash_secret, is_daemon_id, looks_like_session_id

from ._login_links import LoginLink, LoginLinks
from ._store import (
    DEFAULT_BUSY_TIMEOUT,
    SESSION_CACHE_SIZE,
    SESSION_CACHE_TTL,
    KeyRecord,
    KeyStore,
    SessionRecord,
    StoreError,
    UnknownRecordError,
    _check_label,
    _check_time,
    _shown,
)
from ._store_api import ChangeHandler, ChangeKind, ClosedOnExit, StoreChange

log = logging.getLogger("repowire.relay.store")

#: Seconds between two looks at the file for revocations made by another process: a revoked
#: key loses its access within this delay (plus the time to close its links).
POLL_INTERVAL: Final = 0.25

# KeyStore's message for a bad daemon id.
_DAEMON_ID_ERROR = "daemon id must be 1 to 64 characters from A-Z a-z 0-9 . _ -"


class SqliteStore(ClosedOnExit):
    """:class:`relay._store_api.Store` over one :class:`KeyStore`. Create with :meth:`open`
    (or wrap an open KeyStore, which this object then owns and closes).

    Usable as ``async with SqliteStore.open(path) as store:``.
    """

    def __init__(self, key_store: KeyStore, *, poll_interval: float = POLL_INTERVAL) -> None:
        if not (math.isfinite(poll_interval) and poll_interval > 0):
            raise ValueError(f"poll_interval must be a positive number, not {poll_interval}")
        self._store = key_store
        self._poll_interval = poll_interval
        self._closed = False
        # Keys rotated through this object: the file records a rotation as a revocation, so
        # this is how the feed tells the two apart for our own changes. One id per rotation.
        self._rotated_here: set[str] = set()
        # One queue per running watch, for the sessions ended through this object (the file
        # keeps no trace of them), and the event that wakes that watch early.
        self._feeds: dict[int, tuple[list[StoreChange], trio.Event]] = {}
        #: The live one-time sign-in links (in memory: see the module docstring).
        self.login_links = LoginLinks()

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        poll_interval: float = POLL_INTERVAL,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        session_cache_size: int = SESSION_CACHE_SIZE,
        session_cache_ttl: float = SESSION_CACHE_TTL,
    ) -> SqliteStore:
        """Open (creating if needed) the SQLite store at ``path``: see :meth:`KeyStore.open`
        for what it raises."""
        key_store = KeyStore.open(
            path,
            busy_timeout=busy_timeout,
            session_cache_size=session_cache_size,
            session_cache_ttl=session_cache_ttl,
        )
        try:
            return cls(key_store, poll_interval=poll_interval)
        except BaseException:
            key_store.close()
            raise

    @property
    def key_store(self) -> KeyStore:
        """The synchronous store underneath, for code that still calls it directly."""
        return self._store

    # -- scopes and keys ----------------------------------------------------------------------

    async def create_scope(self, *, label: str, now: float) -> tuple[KeyRecord, str]:
        _check_encodable_label(label)
        return self._store.create_scope(label=label, now=now)

    async def create_key(self, scope_id: str, *, label: str, now: float) -> tuple[KeyRecord, str]:
        _check_encodable_label(label)
        if not _encodable(scope_id):
            # SQLite cannot be handed it, and no scope can have such an id.
            _check_label(label)
            _check_time(now)
            self._require_open()
            raise UnknownRecordError(f"no scope {_shown(scope_id)}")
        return self._store.create_key(scope_id, label=label, now=now)

    async def verify_key(self, key: str, *, now: float) -> KeyRecord | None:
        return self._store.verify_key(key, now=now)

    async def rotate_key(self, key_id: str, *, now: float) -> tuple[KeyRecord, str]:
        if not _encodable(key_id):
            _check_time(now)
            self._require_open()
            raise UnknownRecordError(f"no key {_shown(key_id)}")
        result = self._store.rotate_key(key_id, now=now)
        self._rotated_here.add(key_id)
        self.login_links.drop_key(key_id)
        return result

    async def revoke_key(self, key_id: str, *, now: float) -> bool:
        if not _encodable(key_id):
            _check_time(now)
            self._require_open()
            return False
        revoked = self._store.revoke_key(key_id, now=now)
        # Also when nothing changed here: another process may have revoked it meanwhile.
        self.login_links.drop_key(key_id)
        return revoked

    async def is_key_live(self, key_id: str) -> bool:
        if not _encodable(key_id):
            self._require_open()
            return False
        return self._store.is_key_live(key_id)

    async def list_keys(self, scope_id: str | None = None) -> list[KeyRecord]:
        if scope_id is not None and not _encodable(scope_id):
            self._require_open()
            return []
        return self._store.list_keys(scope_id)

    # -- browser sessions ---------------------------------------------------------------------

    async def create_session(self, key: KeyRecord, *, now: float, ttl: float) -> str:
        if not _encodable(key.key_id):
            _check_time(now)
            if not (math.isfinite(ttl) and ttl > 0):
                raise ValueError(f"ttl must be a positive number of seconds, not {ttl}")
            self._require_open()
            raise UnknownRecordError(f"key {_shown(key.key_id)} is unknown or revoked")
        return self._store.create_session(key, now=now, ttl=ttl)

    async def lookup_session(self, session_id: str, *, now: float) -> SessionRecord | None:
        return self._store.lookup_session(session_id, now=now)

    async def end_session(self, session_id: str) -> None:
        self._store.end_session(session_id)
        if looks_like_session_id(session_id) and self._feeds:
            change = StoreChange(
                kind=ChangeKind.SESSION_ENDED, session_digest=hash_secret(session_id)
            )
            for queue, wake in self._feeds.values():
                queue.append(change)
                wake.set()

    async def purge_expired(self, *, now: float) -> int:
        return self._store.purge_expired(now=now)

    def forget_sessions_of(self, key_id: str) -> None:
        self._store.forget_sessions_of(key_id)

    # -- one-time sign-in links -------------------------------------------------------------

    async def create_login_link(
        self, key_id: str, *, daemon_id: str | None, now: float
    ) -> tuple[str, LoginLink]:
        if daemon_id is not None and not is_daemon_id(daemon_id):
            raise ValueError(_DAEMON_ID_ERROR)
        _check_time(now)
        self._require_open()
        scope_id = self._store.live_key_scope(key_id) if _encodable(key_id) else None
        if scope_id is None:
            raise UnknownRecordError(f"key {_shown(key_id)} is unknown or revoked")
        return self.login_links.issue(
            key_id=key_id, scope_id=scope_id, daemon_id=daemon_id, now=now
        )

    async def take_login_link(self, token: str, *, now: float) -> LoginLink | None:
        self._require_open()
        link = self.login_links.redeem(token, now=now)
        if link is None or not self._store.is_key_live(link.key_id):
            return None
        return link

    # -- daemons ------------------------------------------------------------------------------

    async def record_daemon(self, scope_id: str, daemon_id: str, *, now: float) -> None:
        if not _encodable(scope_id):
            # Checked in KeyStore's order: the daemon id and time first, then the scope.
            if not is_daemon_id(daemon_id):
                raise ValueError(_DAEMON_ID_ERROR)
            _check_time(now)
            self._require_open()
            raise UnknownRecordError(f"no scope {_shown(scope_id)}")
        self._store.record_daemon(scope_id, daemon_id, now=now)

    async def known_daemons(self, scope_id: str) -> list[tuple[str, float, float]]:
        if not _encodable(scope_id):
            self._require_open()
            return []
        return self._store.known_daemons(scope_id)

    # -- changes and life ---------------------------------------------------------------------

    async def watch(
        self,
        handler: ChangeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """See :meth:`relay._store_api.Store.watch`. Polls every ``poll_interval`` seconds;
        a session ended through this object wakes it at once."""
        queue: list[StoreChange] = []
        wake = trio.Event()
        feed_id = id(queue)
        self._feeds[feed_id] = (queue, wake)
        try:
            token: tuple[int, int] | None = None
            known: set[str] = set()
            failing = False
            started = False
            while True:
                fresh: list[str] = []
                try:
                    current = self._store.change_token()
                    if current != token:
                        revoked = self._store.revoked_key_ids()
                        if token is not None:
                            fresh = sorted(revoked - known)
                        token, known = current, revoked
                    if failing:
                        log.info("key store watcher: the key store is readable again")
                        failing = False
                except StoreError as exc:
                    if token is None:
                        # No baseline: what is revoked once the file is readable may have
                        # been revoked after the start, so all of it will be announced.
                        token, known = (-1, -1), set()
                    if not failing:
                        log.warning("key store watcher: cannot read the key store: %s", exc)
                        failing = True
                if not started:
                    started = True
                    task_status.started()
                for key_id in fresh:
                    # Keep the cache honest before anyone acts on the change.
                    self._store.forget_sessions_of(key_id)
                    self.login_links.drop_key(key_id)
                    kind = ChangeKind.KEY_REVOKED
                    if key_id in self._rotated_here:
                        kind = ChangeKind.KEY_ROTATED
                    await handler(StoreChange(kind=kind, key_id=key_id))
                while queue:
                    await handler(queue.pop(0))
                with trio.move_on_after(self._poll_interval):
                    await wake.wait()
                if wake.is_set():
                    wake = trio.Event()
                    self._feeds[feed_id] = (queue, wake)
        finally:
            del self._feeds[feed_id]

    async def ping(self) -> None:
        self._store.change_token()

    async def aclose(self) -> None:
        self._closed = True
        self._store.close()

    def _require_open(self) -> None:
        if self._closed:
            raise StoreError("the key store is closed")


def _encodable(text: str) -> bool:
    """Whether SQLite can be given ``text``: a lone surrogate cannot be encoded as UTF-8."""
    try:
        text.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):
        return False
    return True


def _check_encodable_label(label: str) -> None:
    if not _encodable(label):
        raise ValueError("label must be valid Unicode text (it holds a lone surrogate)")
