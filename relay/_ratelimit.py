"""Token-bucket rate limits per key (a client address, a key id).

:class:`RateLimiter` keeps its buckets in process, with bounded memory: the relay's limits when
it runs alone. A relay cluster shares its limits through Redis instead
(:class:`SharedLimiter`), so that a client spreading its attempts over the replicas gets no
more than from one. The relay uses either through :class:`Limiter` (:func:`limiter_for`
picks). Time is an argument: nothing here reads a clock, so behaviour is exact and testable.
"""

from __future__ import annotations

import heapq
import math
from typing import Protocol, runtime_checkable

#: When the table is full, at least this fraction of ``max_keys`` is freed at once, so that the
#: linear scan that chooses what to drop runs once per that many new keys, not on every one.
EVICTION_FRACTION = 0.01

# Slack for floating-point rounding, in tokens: waiting exactly retry_after() seconds must be
# enough. Epoch times carry about 2e-7 s of resolution, so the slack scales with it.
_EPSILON = 1e-9
_ULPS = 4


class RateLimiter:
    """Allow ``rate`` events per second per key on average, with bursts of up to ``burst``.

    Each key has a bucket holding up to ``burst`` tokens, refilled at ``rate`` tokens per
    second; an event takes one token. A key never seen before starts with a full bucket.

    Memory is bounded by ``max_keys`` buckets. When a new key arrives and the table is full,
    buckets are dropped fullest first: a full bucket is the same as no bucket, so dropping it
    loses nothing, and the keys that have spent the most (the ones being limited) are kept
    longest.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        """Raises ValueError unless ``rate > 0`` (finite), ``burst >= 1`` and ``max_keys >= 1``."""
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of events per second, not {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        # key -> (tokens at time `at`, at). Tuples: one allocation per update, no object churn.
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        """How many keys currently have a bucket (at most ``max_keys``)."""
        return len(self._buckets)

    def allow(self, key: str, now: float) -> bool:
        """Take one token from ``key``'s bucket at time ``now``; False if it has none.

        A refused event takes nothing. Time going backwards is treated as no time passing.
        """
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(now)
            tokens, at = float(self.burst), now
        else:
            tokens, at = self._refilled(bucket, now)
        if not self._enough(tokens, now):
            self._buckets[key] = (tokens, at)
            return False
        self._buckets[key] = (max(tokens - 1, 0.0), at)
        return True

    def retry_after(self, key: str, now: float) -> float:
        """Seconds from ``now`` until ``allow(key, ...)`` would succeed; 0.0 if it would now."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens, _ = self._refilled(bucket, now)
        if self._enough(tokens, now):
            return 0.0
        return (1 - tokens) / self.rate

    def _enough(self, tokens: float, now: float) -> bool:
        return tokens + _EPSILON + _ULPS * self.rate * math.ulp(now) >= 1

    def _refilled(self, bucket: tuple[float, float], now: float) -> tuple[float, float]:
        tokens, at = bucket
        if now <= at:
            return tokens, at
        return min(float(self.burst), tokens + (now - at) * self.rate), now

    def _full_at(self, bucket: tuple[float, float]) -> float:
        tokens, at = bucket
        return at + (self.burst - tokens) / self.rate

    def _evict(self, now: float) -> None:
        # A bucket's fullness at `now` is decided by the time it becomes full: the earlier,
        # the fuller. Buckets already full carry no state and all go; if that frees too little,
        # the fullest of the rest go too.
        target = max(1, int(self.max_keys * EVICTION_FRACTION))
        full_at = {key: self._full_at(bucket) for key, bucket in self._buckets.items()}
        idle = [key for key, when in full_at.items() if when <= now]
        for key in idle:
            del self._buckets[key]
        if len(idle) >= target:
            return
        rest = ((when, key) for key, when in full_at.items() if when > now)
        for _, key in heapq.nsmallest(target - len(idle), rest):
            del self._buckets[key]


class Limiter(Protocol):
    """A rate limit the relay consults: ``rate`` events per second per key on average,
    bursts of ``burst``."""

    rate: float
    burst: int

    async def take(self, key: str, now: float) -> float:
        """Take one token from ``key``'s bucket: 0.0 if taken, else the seconds until one
        will be (nothing taken). May raise :class:`relay._store_api.StoreError` (shared
        limits, when the store fails)."""
        ...


class LocalLimiter:
    """:class:`Limiter` over an in-process :class:`RateLimiter`. Its check and charge are one
    step, with no await in between."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        """Raises ValueError as :class:`RateLimiter` does."""
        self.buckets = RateLimiter(rate, burst, max_keys)
        self.rate = rate
        self.burst = burst

    async def take(self, key: str, now: float) -> float:
        buckets = self.buckets
        if buckets.allow(key, now):
            return 0.0
        # A refusal always names a wait: at least a moment, even where rounding says 0.
        return max(buckets.retry_after(key, now), 1e-3)


@runtime_checkable
class RateTokenStore(Protocol):
    """A store that keeps shared rate limits (:meth:`relay._redis_store.RedisStore.
    take_rate_token`)."""

    async def take_rate_token(
        self, name: str, key: str, *, rate: float, burst: int, now: float
    ) -> float: ...


class SharedLimiter:
    """:class:`Limiter` whose buckets are in a shared store (Redis): one limit for every
    relay replica. The store takes a token atomically, so concurrent attempts on any replica
    cannot slip past it. Raises the store's errors (StoreUnavailable when Redis is down)."""

    def __init__(self, store: RateTokenStore, name: str, rate: float, burst: int) -> None:
        """``name`` keeps this limit's buckets apart from the others' (``[a-z_]{1,32}``).
        Raises ValueError unless ``rate > 0`` (finite) and ``burst >= 1``."""
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of events per second, not {rate}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        self._store = store
        self.name = name
        self.rate = rate
        self.burst = burst

    async def take(self, key: str, now: float) -> float:
        return await self._store.take_rate_token(
            self.name, key, rate=self.rate, burst=self.burst, now=now
        )


def limiter_for(store: object, name: str, rate: float, burst: int) -> Limiter:
    """The limit ``name`` for a relay on ``store``: shared (:class:`SharedLimiter`) if the
    store keeps shared limits, else in process (:class:`LocalLimiter`)."""
    if isinstance(store, RateTokenStore):
        return SharedLimiter(store, name, rate, burst)
    return LocalLimiter(rate, burst)
