"""The relay's registry of daemon links (``relay._links.LinkRegistry``): its order and its indexes.

The registry keeps its links indexed by scope and by key id; these tests hold it to the plain
definition (scan every link, sort) over fixed scenarios and over random sequences of
operations, checking every lookup after every step.
"""

from __future__ import annotations

import itertools
from typing import cast

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from mux import MuxSession
from relay._links import DaemonLink, LinkRegistry

SCOPES = ("s1", "s2", "s3")
DAEMONS = ("a", "b", "c", "d")
KEYS = ("k1", "k2", "k3")
#: Few distinct times, so that links of a scope often connect "at once" and the daemon id
#: decides their order.
TIMES = (0.0, 1.0, 1.5, 2.0)

_serial = itertools.count()


def make_link(scope: str, daemon: str, key: str = "k1", at: float = 0.0) -> DaemonLink:
    """A link that is never served: the registry reads only its ids and time."""
    return DaemonLink(
        daemon_id=daemon,
        scope_id=scope,
        key_id=key,
        # Never touched by the registry.
        session=cast(MuxSession, object()),
        connected_at=at,
        version="test",
        remote_address=f"127.0.0.1:{next(_serial)}",
    )


class NaiveRegistry:
    """The definition the indexed registry must agree with: one dict of the registered links
    (a replacement keeps the replaced link's place, as a dict does), scanned and sorted on
    every lookup. Links in their handshake are listed in the order their handshakes began."""

    def __init__(self) -> None:
        self.links: dict[tuple[str, str], DaemonLink] = {}
        self.handshaking: dict[DaemonLink, None] = {}

    def add(self, link: DaemonLink) -> DaemonLink | None:
        key = (link.scope_id, link.daemon_id)
        previous = self.links.get(key)
        self.links[key] = link
        return previous

    def remove(self, link: DaemonLink) -> None:
        key = (link.scope_id, link.daemon_id)
        if self.links.get(key) is link:
            del self.links[key]

    def for_scope(self, scope_id: str) -> list[DaemonLink]:
        links = [link for (scope, _), link in self.links.items() if scope == scope_id]
        return sorted(links, key=lambda link: (link.connected_at, link.daemon_id))

    def default_for(self, scope_id: str) -> DaemonLink | None:
        links = self.for_scope(scope_id)
        return links[0] if links else None

    def for_key(self, key_id: str) -> list[DaemonLink]:
        registered = [link for link in self.links.values() if link.key_id == key_id]
        return registered + [link for link in self.handshaking if link.key_id == key_id]

    def key_ids(self) -> set[str]:
        return {link.key_id for link in self.links.values()}


def same(found: list[DaemonLink], expected: list[DaemonLink]) -> bool:
    """Whether two lists hold the very same links in the same order (links compare by
    identity, but a clear failure message needs the ids)."""
    return [id(link) for link in found] == [id(link) for link in expected]


def describe(links: list[DaemonLink]) -> list[tuple[str, str, str, float]]:
    return [(link.scope_id, link.daemon_id, link.key_id, link.connected_at) for link in links]


def assert_agrees(registry: LinkRegistry, model: NaiveRegistry) -> None:
    """Every lookup of ``registry`` gives what the plain definition gives."""
    assert len(registry) == len(model.links)
    assert same(registry.all(), list(model.links.values()))
    assert registry.key_ids() == model.key_ids()
    for scope in SCOPES:
        found, expected = registry.for_scope(scope), model.for_scope(scope)
        assert same(found, expected), (scope, describe(found), describe(expected))
        assert registry.default_for(scope) is model.default_for(scope)
        for daemon in DAEMONS:
            assert registry.get(scope, daemon) is model.links.get((scope, daemon))
    for key in KEYS:
        found, expected = registry.for_key(key), model.for_key(key)
        assert same(found, expected), (key, describe(found), describe(expected))


# ---------------------------------------------------------------- fixed scenarios


def test_a_scope_lists_its_links_the_longest_connected_first_ties_by_daemon_id() -> None:
    links = LinkRegistry()
    late = make_link("s", "a", at=3.0)
    tie_b = make_link("s", "b", at=1.0)
    tie_a = make_link("s", "0", at=1.0)  # before "b" at the same time
    first = make_link("s", "z", at=0.5)
    other_scope = make_link("t", "y", at=0.0)
    for link in (late, tie_b, other_scope, tie_a, first):
        assert links.add(link) is None
    assert links.for_scope("s") == [first, tie_a, tie_b, late]
    assert links.default_for("s") is first
    assert links.for_scope("t") == [other_scope]
    assert links.for_scope("nobody") == [] and links.default_for("nobody") is None


def test_the_default_daemon_stays_when_others_connect_and_moves_on_when_it_leaves() -> None:
    links = LinkRegistry()
    oldest = make_link("s", "a", at=1.0)
    links.add(oldest)
    links.add(make_link("s", "b", at=2.0))
    assert links.default_for("s") is oldest
    links.add(make_link("s", "c", at=3.0))
    assert links.default_for("s") is oldest
    # "a" reconnects: its new link is the newest of the scope, so "b" is the default now.
    again = make_link("s", "a", at=4.0)
    assert links.add(again) is oldest
    assert [link.daemon_id for link in links.for_scope("s")] == ["b", "c", "a"]
    assert links.default_for("s") is links.get("s", "b")


def test_for_scope_returns_a_copy_the_caller_may_change() -> None:
    links = LinkRegistry()
    link = make_link("s", "a")
    links.add(link)
    listed = links.for_scope("s")
    listed.clear()
    assert links.for_scope("s") == [link] and links.default_for("s") is link


def test_a_replaced_links_cleanup_leaves_its_successor_in_every_index() -> None:
    links = LinkRegistry()
    old = make_link("s", "a", key="k1", at=1.0)
    links.add(old)
    new = make_link("s", "a", key="k2", at=2.0)
    assert links.add(new) is old
    links.remove(old)  # the old link's handler ends after its successor registered
    assert links.get("s", "a") is new
    assert links.for_scope("s") == [new] and links.default_for("s") is new
    assert links.for_key("k1") == [] and links.for_key("k2") == [new]
    assert links.key_ids() == {"k2"} and len(links) == 1
    links.remove(new)
    assert links.for_scope("s") == [] and links.default_for("s") is None
    assert links.for_key("k2") == [] and links.key_ids() == set() and len(links) == 0


def test_a_key_lists_registered_links_in_registration_order_then_those_in_handshake() -> None:
    links = LinkRegistry()
    a = make_link("s", "a", key="k2", at=1.0)
    b = make_link("s", "b", key="k2", at=2.0)
    c = make_link("t", "c", key="k1", at=3.0)
    for link in (a, c, b):
        links.add(link)
    arriving = make_link("s", "d", key="k2", at=4.0)
    links.begin_handshake(arriving)
    assert links.for_key("k2") == [a, b, arriving]
    # A replacement takes the place of the link it replaced, whatever its key.
    c2 = make_link("t", "c", key="k2", at=5.0)
    links.add(c2)
    assert links.for_key("k2") == [a, c2, b, arriving]
    assert links.for_key("k1") == []
    # Registered and still in its handshake for a moment: listed twice, as before.
    links.add(arriving)
    assert links.for_key("k2") == [a, c2, b, arriving, arriving]
    links.end_handshake(arriving)
    links.end_handshake(arriving)  # idempotent
    assert links.for_key("k2") == [a, c2, b, arriving]
    # Gone and back: registered again, last.
    links.remove(a)
    links.add(a)
    assert links.for_key("k2") == [c2, b, arriving, a]
    assert links.all() == [c2, b, arriving, a]


# ---------------------------------------------------------------- random operation sequences


class RegistryMachine(RuleBasedStateMachine):
    """Random adds (new links, replacements, links added again), removals (of the registered
    link, of replaced ones, of links never added) and handshakes, checked against
    :class:`NaiveRegistry` after every step."""

    links = Bundle("links")

    def __init__(self) -> None:
        super().__init__()
        self.registry = LinkRegistry()
        self.model = NaiveRegistry()

    @rule(
        target=links,
        scope=st.sampled_from(SCOPES),
        daemon=st.sampled_from(DAEMONS),
        key=st.sampled_from(KEYS),
        at=st.sampled_from(TIMES),
    )
    def new_link(self, scope: str, daemon: str, key: str, at: float) -> DaemonLink:
        return make_link(scope, daemon, key, at)

    @rule(link=links)
    def add(self, link: DaemonLink) -> None:
        assert self.registry.add(link) is self.model.add(link)

    @rule(link=links)
    def remove(self, link: DaemonLink) -> None:
        self.registry.remove(link)
        self.model.remove(link)

    @rule(link=links)
    def begin_handshake(self, link: DaemonLink) -> None:
        self.registry.begin_handshake(link)
        self.model.handshaking[link] = None

    @rule(link=links)
    def end_handshake(self, link: DaemonLink) -> None:
        self.registry.end_handshake(link)
        self.model.handshaking.pop(link, None)

    @precondition(lambda self: bool(self.model.links))
    @rule(link=consumes(links))
    def forget(self, link: DaemonLink) -> None:
        """Drop a link from the draws (a finished link is never seen again), removing it
        first, as its handler does."""
        self.remove(link)
        self.end_handshake(link)

    @invariant()
    def agrees_with_the_definition(self) -> None:
        assert_agrees(self.registry, self.model)


RegistryMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
test_registry_agrees_with_the_definition = RegistryMachine.TestCase
