"""A bounded cache of browser sessions a store has confirmed, by session digest.

Used by :class:`relay._redis_store.RedisStore` (one per relay replica) in front of Redis: a
confirmed session is trusted for a short time without asking again, and, while Redis cannot be
reached, for up to an outage grace since it was last confirmed. Only digests are kept, never a
session id. Least recently used entries go first when it is full. Time is an argument.
"""

from __future__ import annotations

import collections
import math

from ._store import SessionRecord


class SessionCache:
    """Sessions by digest: ``(record, when the store last confirmed it)``. ``size`` 0 keeps
    nothing. Single-threaded (the event loop's)."""

    def __init__(self, size: int) -> None:
        """ValueError for a negative size."""
        if size < 0:
            raise ValueError(f"session cache size must be >= 0, not {size}")
        self._size = size
        self._entries: collections.OrderedDict[str, tuple[SessionRecord, float]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str, *, now: float, trusted_for: float) -> SessionRecord | None:
        """The session with ``digest`` if it was confirmed less than ``trusted_for`` seconds
        before ``now`` and has not expired (an expired entry is dropped), else None."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        record, confirmed_at = entry
        if not now < record.expires_at:
            del self._entries[digest]
            return None
        if not (math.isfinite(now) and now - confirmed_at < trusted_for):
            return None
        self._entries.move_to_end(digest)
        return record

    def remember(self, digest: str, record: SessionRecord, *, now: float) -> None:
        """Note that the store confirmed (or created) this session at ``now``."""
        if self._size == 0:
            return
        self._entries[digest] = (record, now)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def forget(self, digest: str) -> None:
        self._entries.pop(digest, None)

    def forget_key(self, key_id: str) -> None:
        """Drop every session of ``key_id``."""
        # A linear scan of at most ``size`` entries, on rare revocations and rotations only.
        stale = [d for d, (record, _) in self._entries.items() if record.key_id == key_id]
        for digest in stale:
            del self._entries[digest]

    def drop_expired(self, now: float) -> None:
        for digest, (record, _) in list(self._entries.items()):
            if now >= record.expires_at:
                del self._entries[digest]

    def clear(self) -> None:
        self._entries.clear()
