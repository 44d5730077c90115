"""Moving a relay's key store from its SQLite file into Redis (``repowire relay migrate-store``).

Every scope, key (its digest: no key is ever known here), live session and daemon record is
copied as it is, ids, digests and times included, so every key that verified before verifies
after, a revoked key stays revoked, and a signed-in browser stays signed in. Sessions that can
never be used again (expired, ended, of a revoked key) are left behind.

Safe to repeat: a record Redis holds already, identical, is left alone, so a second run changes
nothing. A record Redis holds under the same id (or digest) but different is never
overwritten: the migration first checks every record (a dry run) and, if any conflicts, copies
nothing and raises :class:`MigrationConflict` naming them. Daemon records are merged instead
(the earliest first sighting, the latest last one): a relay already running on Redis updates
them, and they are bookkeeping.

A copy is not a move: the SQLite file is only read, and stays as it was.
"""

from __future__ import annotations

import attrs

from ._redis_store import ImportVerdict, RedisStore
from ._store import KeyStore, StoreError, StoreSnapshot

#: Most conflicting ids named in a :class:`MigrationConflict` message.
MAX_CONFLICTS_SHOWN = 10


class MigrationConflict(StoreError):
    """Redis holds different records under ids (or digests) the SQLite store has: nothing was
    copied. ``conflicts`` names them (``"key key_..."``); the message, one line, the first
    :data:`MAX_CONFLICTS_SHOWN`. Key and session digests are not named (only ids)."""

    def __init__(self, conflicts: list[str]) -> None:
        shown = ", ".join(conflicts[:MAX_CONFLICTS_SHOWN])
        more = len(conflicts) - MAX_CONFLICTS_SHOWN
        super().__init__(
            f"Redis already holds {len(conflicts)} different record(s) with the same id: "
            f"{shown}{f' and {more} more' if more > 0 else ''}; nothing was copied"
        )
        self.conflicts = conflicts


@attrs.define(kw_only=True)
class Tally:
    """Records of one kind: copied now, found identical in Redis, left behind."""

    copied: int = 0
    same: int = 0
    skipped: int = 0


@attrs.frozen(kw_only=True)
class MigrationReport:
    """What :func:`migrate_to_redis` did, by kind of record."""

    scopes: Tally
    keys: Tally
    sessions: Tally
    daemons: Tally

    @property
    def copied(self) -> int:
        return sum(t.copied for t in (self.scopes, self.keys, self.sessions, self.daemons))


async def migrate_to_redis(source: KeyStore, target: RedisStore, *, now: float) -> MigrationReport:
    """Copy every record of ``source`` into ``target`` (see the module docstring); ``now``
    decides which sessions are still live (and sets their Redis expiry).

    Raises :class:`MigrationConflict` (nothing copied) if Redis holds a different record under
    an id the source has, StoreError (StoreUnavailable included) if either store fails: the
    records copied until then stay, and running it again finishes the copy.
    """
    snapshot = source.snapshot()
    conflicts: list[str] = []
    await _copy(snapshot, target, now=now, dry_run=True, conflicts=conflicts)
    if conflicts:
        raise MigrationConflict(conflicts)
    report = await _copy(snapshot, target, now=now, dry_run=False, conflicts=conflicts)
    if conflicts:
        # Written by someone else between the check and the copy.
        raise MigrationConflict(conflicts)
    return report


async def _copy(
    snapshot: StoreSnapshot,
    target: RedisStore,
    *,
    now: float,
    dry_run: bool,
    conflicts: list[str],
) -> MigrationReport:
    report = MigrationReport(scopes=Tally(), keys=Tally(), sessions=Tally(), daemons=Tally())

    def count(tally: Tally, verdict: ImportVerdict, name: str) -> None:
        if verdict == "copied":
            tally.copied += 1
        elif verdict == "same":
            tally.same += 1
        else:
            conflicts.append(name)

    for scope_id, label, created_at in snapshot.scopes:
        verdict = await target.import_scope(scope_id, label, created_at, dry_run=dry_run)
        count(report.scopes, verdict, f"scope {scope_id}")
    live_keys: dict[str, str] = {}
    for key_id, digest, scope_id, label, created_at, revoked_at in snapshot.keys:
        if revoked_at is None:
            live_keys[key_id] = scope_id
        verdict = await target.import_key(
            key_id, digest, scope_id, label, created_at, revoked_at, dry_run=dry_run
        )
        count(report.keys, verdict, f"key {key_id}")
    for digest, scope_id, key_id, created_at, expires_at, revoked_at in snapshot.sessions:
        if revoked_at is not None or expires_at <= now or live_keys.get(key_id) != scope_id:
            report.sessions.skipped += 1
            continue
        verdict = await target.import_session(
            digest, scope_id, key_id, created_at, expires_at, now=now, dry_run=dry_run
        )
        # A session is named by its key: its digest is a credential's.
        count(report.sessions, verdict, f"a session of key {key_id}")
    for scope_id, daemon_id, first_seen, last_seen in snapshot.daemons:
        verdict = await target.import_daemon(
            scope_id, daemon_id, first_seen, last_seen, dry_run=dry_run
        )
        count(report.daemons, verdict, f"daemon {daemon_id} of scope {scope_id}")
    return report
