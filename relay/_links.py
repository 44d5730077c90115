"""The registry of connected daemon links, by user scope and daemon id."""

from __future__ import annotations

import bisect

import attrs
import trio

from mux import MuxSession


@attrs.define(eq=False, kw_only=True)
class DaemonLink:
    """One connected daemon: its multiplexed session and who it is."""

    daemon_id: str
    scope_id: str
    key_id: str
    session: MuxSession
    connected_at: float
    version: str
    remote_address: str
    #: Set once the link's handler is done: the session has ended and its WebSocket is closed
    #: (the close frame sent, or the connection gone).
    finished: trio.Event = attrs.field(factory=trio.Event)
    #: Set once the link has been added to the registry (its handshake is over).
    registered: bool = False
    #: Whether the link holds one of its scope's ``max_links_per_scope`` slots
    #: (``Relay.scope_links``), given back when the link ends. A link admitted past a full
    #: quota to replace one of the same daemon id takes that link's slot over instead.
    holds_link_slot: bool = False
    #: In a cluster, the link epoch its presence claim was given (``relay._presence``); None
    #: before the claim, and always on a relay alone.
    epoch: int | None = None
    #: The newest epoch another replica claimed for this daemon while this link's own claim
    #: was under way (its epoch not known yet): once it is, an older epoch loses.
    rival_epoch: int = 0

    @property
    def rtt(self) -> float | None:
        return self.session.rtt


class HandshakeLimiter:
    """Counts the daemon-link handshakes in progress and admits at most ``limit`` at once, and
    at most ``per_scope`` of one key's scope, so that one key holder opening links that never
    finish their handshake cannot take every slot and turn everyone else's daemons away.

    Not a queue: :meth:`try_enter` answers at once, so a link past the limit is turned away
    before the relay spends more on it, and its daemon backs off instead of waiting for a
    handshake that would time out. Single-threaded (the relay's event loop); no awaits.
    """

    def __init__(self, limit: int, per_scope: int) -> None:
        if limit < 1 or per_scope < 1:
            raise ValueError(f"limits must be at least 1, not {limit} and {per_scope}")
        self.limit = limit
        self.per_scope = per_scope
        self._in_progress = 0
        self._by_scope: dict[str, int] = {}

    @property
    def in_progress(self) -> int:
        return self._in_progress

    def try_enter(self, scope_id: str) -> bool:
        """Take a slot and return True, or return False (nothing taken) if all are taken or
        ``scope_id`` holds its share."""
        held = self._by_scope.get(scope_id, 0)
        if self._in_progress >= self.limit or held >= self.per_scope:
            return False
        self._in_progress += 1
        self._by_scope[scope_id] = held + 1
        return True

    def leave(self, scope_id: str) -> None:
        """Give back a slot taken by :meth:`try_enter` for ``scope_id``. Raises RuntimeError
        if none is taken."""
        held = self._by_scope.get(scope_id, 0)
        if held == 0:
            raise RuntimeError("HandshakeLimiter.leave() without a matching try_enter()")
        self._in_progress -= 1
        if held == 1:
            del self._by_scope[scope_id]
        else:
            self._by_scope[scope_id] = held - 1


class LinkRegistry:
    """Connected daemons. One link per (scope, daemon id): a newer link replaces the older.

    The default daemon of a scope (what plain paths reach) is the one connected the longest
    among those online: it does not change when another daemon of the scope connects, and it is
    never a random pick.

    Links are indexed by scope (kept in :meth:`for_scope` order) and by key id, so a lookup
    costs in the links of that scope or key, not in every link the relay holds. A link's
    ``scope_id``, ``daemon_id``, ``key_id`` and ``connected_at`` are read when it is added (or
    begins its handshake) and must not change while the registry holds it.
    """

    def __init__(self) -> None:
        # The registered links in registration order; a replacement takes the place of the
        # link it replaced (the order of :meth:`all` and of the registered part of
        # :meth:`for_key`).
        self._links: dict[tuple[str, str], DaemonLink] = {}
        # The place of each (scope, daemon id) in ``_links``, so that the per-key index can
        # list its links in that order.
        self._place: dict[tuple[str, str], int] = {}
        self._next_place = 0
        # The registered links of each scope, sorted by (connected_at, daemon_id): a total
        # order, as a scope holds one link per daemon id. No empty lists.
        self._by_scope: dict[str, list[DaemonLink]] = {}
        # The registered links of each key id, by (scope, daemon id). No empty dicts.
        self._by_key: dict[str, dict[tuple[str, str], DaemonLink]] = {}
        # Links between their WebSocket accept and their registration, per (scope, daemon id):
        # how many, and an event set when the last of them is registered or gone.
        self._arriving: dict[tuple[str, str], tuple[int, trio.Event]] = {}
        # The same links themselves, per key id in the order their handshakes began, so that a
        # key revoked during their handshake can end them (:meth:`for_key`): they are not in
        # ``_links`` yet. No empty dicts.
        self._handshaking: dict[str, dict[DaemonLink, None]] = {}

    def begin_handshake(self, link: DaemonLink) -> None:
        """``link`` is in its handshake: :meth:`for_key` lists it until :meth:`end_handshake`."""
        self._handshaking.setdefault(link.key_id, {})[link] = None

    def end_handshake(self, link: DaemonLink) -> None:
        """``link``'s handshake is over (registered, refused or failed). Idempotent."""
        links = self._handshaking.get(link.key_id)
        if links is None:
            return
        links.pop(link, None)
        if not links:
            del self._handshaking[link.key_id]

    def expect(self, scope_id: str, daemon_id: str) -> None:
        """A link for ``daemon_id`` is in its handshake: requests for it may wait for it
        (:meth:`wait_arrival`). Every call is matched by one :meth:`settle`."""
        key = (scope_id, daemon_id)
        entry = self._arriving.get(key)
        if entry is None:
            self._arriving[key] = (1, trio.Event())
        else:
            self._arriving[key] = (entry[0] + 1, entry[1])

    def settle(self, scope_id: str, daemon_id: str) -> None:
        """The handshake announced by :meth:`expect` ended: registered, or failed."""
        key = (scope_id, daemon_id)
        count, event = self._arriving[key]
        if count > 1:
            self._arriving[key] = (count - 1, event)
            return
        del self._arriving[key]
        event.set()

    def is_arriving(self, scope_id: str, daemon_id: str | None) -> bool:
        """Whether a link for ``daemon_id`` (any daemon of the scope if ``None``) is in its
        handshake now."""
        if daemon_id is not None:
            return (scope_id, daemon_id) in self._arriving
        return any(scope == scope_id for scope, _ in self._arriving)

    async def wait_arrival(self, scope_id: str, daemon_id: str | None) -> None:
        """Wait until the links in their handshake for ``daemon_id`` (or, if ``None``, for
        any daemon of the scope) are registered or gone. The caller bounds the wait."""
        while True:
            events = [
                event
                for (scope, daemon), (_, event) in self._arriving.items()
                if scope == scope_id and daemon_id in (None, daemon)
            ]
            if not events:
                await trio.lowlevel.checkpoint()
                return
            await events[0].wait()

    def add(self, link: DaemonLink) -> DaemonLink | None:
        """Register ``link``; return the link it replaced (the caller closes that one)."""
        key = (link.scope_id, link.daemon_id)
        previous = self._links.get(key)
        if previous is None:
            self._place[key] = self._next_place
            self._next_place += 1
        else:
            self._unindex(previous)
        self._links[key] = link
        bisect.insort(self._by_scope.setdefault(link.scope_id, []), link, key=_scope_order)
        self._by_key.setdefault(link.key_id, {})[key] = link
        return previous

    def remove(self, link: DaemonLink) -> None:
        """Forget ``link`` if it is still the registered one (a replaced link's cleanup must
        not remove its successor)."""
        key = (link.scope_id, link.daemon_id)
        if self._links.get(key) is link:
            del self._links[key]
            del self._place[key]
            self._unindex(link)

    def _unindex(self, link: DaemonLink) -> None:
        """Take the registered ``link`` out of the scope and key indexes."""
        ordered = self._by_scope[link.scope_id]
        del ordered[bisect.bisect_left(ordered, _scope_order(link), key=_scope_order)]
        if not ordered:
            del self._by_scope[link.scope_id]
        keyed = self._by_key[link.key_id]
        del keyed[(link.scope_id, link.daemon_id)]
        if not keyed:
            del self._by_key[link.key_id]

    def get(self, scope_id: str, daemon_id: str) -> DaemonLink | None:
        return self._links.get((scope_id, daemon_id))

    def for_scope(self, scope_id: str) -> list[DaemonLink]:
        """The links of ``scope_id``, the longest connected first (ties by daemon id)."""
        return list(self._by_scope.get(scope_id, ()))

    def default_for(self, scope_id: str) -> DaemonLink | None:
        """The first of :meth:`for_scope`, or ``None`` when the scope has no link."""
        links = self._by_scope.get(scope_id)
        return links[0] if links else None

    def for_key(self, key_id: str) -> list[DaemonLink]:
        """The links opened with ``key_id``: registered ones (in the order of :meth:`all`),
        then those still in their handshake (see :meth:`begin_handshake`), in the order their
        handshakes began."""
        keyed = self._by_key.get(key_id, {})
        place = self._place
        registered = sorted(keyed.values(), key=lambda link: place[link.scope_id, link.daemon_id])
        return registered + list(self._handshaking.get(key_id, ()))

    def key_ids(self) -> set[str]:
        """The key ids the connected links were opened with."""
        return set(self._by_key)

    def all(self) -> list[DaemonLink]:
        return list(self._links.values())

    def __len__(self) -> int:
        return len(self._links)


def _scope_order(link: DaemonLink) -> tuple[float, str]:
    """Where ``link`` goes among the links of its scope (:meth:`LinkRegistry.for_scope`)."""
    return (link.connected_at, link.daemon_id)
