"""The registry of connected daemon links, by user scope and daemon id."""

from __future__ import annotations

import attrs

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

    @property
    def rtt(self) -> float | None:
        return self.session.rtt


class LinkRegistry:
    """Connected daemons. One link per (scope, daemon id): a newer link replaces the older.

    The default daemon of a scope (what plain paths reach) is the one connected the longest
    among those online: it does not change when another daemon of the scope connects, and it is
    never a random pick.
    """

    def __init__(self) -> None:
        self._links: dict[tuple[str, str], DaemonLink] = {}

    def add(self, link: DaemonLink) -> DaemonLink | None:
        """Register ``link``; return the link it replaced (the caller closes that one)."""
        key = (link.scope_id, link.daemon_id)
        previous = self._links.get(key)
        self._links[key] = link
        return previous

    def remove(self, link: DaemonLink) -> None:
        """Forget ``link`` if it is still the registered one (a replaced link's cleanup must
        not remove its successor)."""
        key = (link.scope_id, link.daemon_id)
        if self._links.get(key) is link:
            del self._links[key]

    def get(self, scope_id: str, daemon_id: str) -> DaemonLink | None:
        return self._links.get((scope_id, daemon_id))

    def for_scope(self, scope_id: str) -> list[DaemonLink]:
        links = [link for (scope, _), link in self._links.items() if scope == scope_id]
        return sorted(links, key=lambda link: (link.connected_at, link.daemon_id))

    def default_for(self, scope_id: str) -> DaemonLink | None:
        links = self.for_scope(scope_id)
        return links[0] if links else None

    def for_key(self, key_id: str) -> list[DaemonLink]:
        return [link for link in self._links.values() if link.key_id == key_id]

    def all(self) -> list[DaemonLink]:
        return list(self._links.values())

    def __len__(self) -> int:
        return len(self._links)
