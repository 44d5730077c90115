"""Per-scope quotas: how much of the relay one key's scope may hold at once.

The relay is shared by strangers (registration is open by default), so what one scope can take
(links, streams, and through the streams the bytes the relay buffers) is counted here and
refused past its limit, instead of being shared first-come first-served with everyone else.
Single-threaded (the relay's event loop): no awaits, nothing to lock.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol


class QuotaExceeded(Exception):
    """A scope holds its quota of something. ``what`` names it, ``limit`` is the quota."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"this key's scope holds its quota of {limit} {what}")
        self.what = what
        self.limit = limit


class ScopeCounter:
    """Counts what each scope holds of one resource, at most ``limit`` each."""

    def __init__(self, what: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the {what} quota must be at least 1, not {limit}")
        self.what = what
        self.limit = limit
        self._held: dict[str, int] = {}

    def held(self, scope_id: str) -> int:
        return self._held.get(scope_id, 0)

    def try_take(self, scope_id: str, amount: int = 1) -> bool:
        """Take ``amount`` for ``scope_id`` and return True, or return False (nothing taken)
        if that would go over the limit."""
        held = self._held.get(scope_id, 0)
        if held + amount > self.limit:
            return False
        self._held[scope_id] = held + amount
        return True

    def give_back(self, scope_id: str, amount: int = 1) -> None:
        """Return ``amount`` taken by :meth:`try_take`. Raises RuntimeError if the scope holds
        less than that."""
        held = self._held.get(scope_id, 0)
        if held < amount:
            raise RuntimeError(f"{self.what}: give_back() without a matching try_take()")
        if held == amount:
            del self._held[scope_id]
        else:
            self._held[scope_id] = held - amount

    @contextmanager
    def hold(self, scope_id: str, amount: int = 1) -> Iterator[None]:
        """Hold ``amount`` for the duration of the block; raises :class:`QuotaExceeded` if the
        scope cannot take it (nothing is taken then)."""
        if not self.try_take(scope_id, amount):
            raise QuotaExceeded(self.what, self.limit)
        try:
            yield
        finally:
            self.give_back(scope_id, amount)


class ScopeBudget:
    """A :class:`mux.WindowBudget` charging one scope's :class:`ScopeCounter` (a daemon link's
    streams all belong to the link's scope)."""

    def __init__(self, counter: ScopeCounter, scope_id: str) -> None:
        self._counter = counter
        self._scope_id = scope_id

    def try_take(self, stream: object, amount: int) -> bool:
        return self._counter.try_take(self._scope_id, amount)

    def give_back(self, stream: object, amount: int) -> None:
        self._counter.give_back(self._scope_id, amount)


class StreamScopeBudget:
    """A :class:`mux.WindowBudget` charging each stream's own scope, named in its metadata
    (``scope``): a replica link carries streams of every scope. A stream naming none grows
    nothing."""

    def __init__(self, counter: ScopeCounter) -> None:
        self._counter = counter

    def try_take(self, stream: _HasMetadata, amount: int) -> bool:
        scope_id = stream.metadata.get("scope")
        return bool(scope_id) and self._counter.try_take(str(scope_id), amount)

    def give_back(self, stream: _HasMetadata, amount: int) -> None:
        self._counter.give_back(str(stream.metadata["scope"]), amount)


class _HasMetadata(Protocol):
    @property
    def metadata(self) -> Mapping[str, str]: ...
