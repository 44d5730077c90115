"""DaemonState: peers, the bounded event ring, and subscriptions (no network)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from repowire.daemon import (
    DaemonState,
    FeedDropped,
    InvalidPeerName,
    TooManyPeers,
    UnknownPeer,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_peers_register_replace_and_remove() -> None:
    clock = Clock()
    state = DaemonState(clock=clock)
    peer, created = state.add_peer("bob", {"role": "coder"})
    assert created
    assert peer.registered_at == 100.0
    assert peer.to_json() == {"name": "bob", "registered_at": 100.0, "meta": {"role": "coder"}}
    clock.now = 101.0
    state.add_peer("carol")
    again, created = state.add_peer("bob", {"role": "reviewer"})
    assert not created
    assert again.registered_at == 101.0
    assert [p.name for p in state.peers()] == ["carol", "bob"]
    assert state.get_peer("bob") == again
    state.remove_peer("carol")
    assert [p.name for p in state.peers()] == ["bob"]
    types = [e.type for e in state.events_after(0, 10)]
    assert types == ["peer_joined", "peer_joined", "peer_joined", "peer_left"]


@pytest.mark.parametrize("name", ["", "a" * 65, "bad name", "x/y", "é", "a@b", "new\nline"])
def test_bad_peer_names_are_refused_and_change_nothing(name: str) -> None:
    state = DaemonState()
    with pytest.raises(InvalidPeerName):
        state.add_peer(name)
    assert state.peers() == []
    assert state.last_event_id == 0


def test_peer_name_limits_accept_the_whole_alphabet() -> None:
    state = DaemonState()
    state.add_peer("A-z_0.9")
    state.add_peer("a" * 64)
    assert len(state.peers()) == 2


def test_unknown_peer_removal() -> None:
    state = DaemonState()
    with pytest.raises(UnknownPeer):
        state.remove_peer("ghost")
    assert state.last_event_id == 0


def test_peer_table_is_bounded_but_replacing_is_allowed() -> None:
    state = DaemonState(max_peers=2)
    state.add_peer("a")
    state.add_peer("b")
    with pytest.raises(TooManyPeers):
        state.add_peer("c")
    state.add_peer("a", {"again": True})
    assert [p.name for p in state.peers()] == ["b", "a"]


def test_events_have_increasing_ids_and_clock_time() -> None:
    clock = Clock()
    state = DaemonState(clock=clock)
    first = state.publish("message", {"text": "one"})
    clock.now = 200.0
    second = state.publish("message", {"text": "two"})
    explicit = state.publish("message", {"text": "three"}, time=5.0)
    assert (first.id, second.id, explicit.id) == (1, 2, 3)
    assert (first.time, second.time, explicit.time) == (100.0, 200.0, 5.0)
    assert state.last_event_id == 3
    assert second.to_json() == {
        "id": 2,
        "type": "message",
        "time": 200.0,
        "data": {"text": "two"},
    }


def test_events_after_pages_oldest_first() -> None:
    state = DaemonState()
    for i in range(10):
        state.publish("message", {"i": i})
    assert [e.id for e in state.events_after(0, 3)] == [1, 2, 3]
    assert [e.id for e in state.events_after(3, 3)] == [4, 5, 6]
    assert [e.id for e in state.events_after(8, 100)] == [9, 10]
    assert state.events_after(10, 5) == []
    with pytest.raises(ValueError):
        state.events_after(-1, 5)
    with pytest.raises(ValueError):
        state.events_after(0, 0)


def test_ring_keeps_only_the_newest_events() -> None:
    state = DaemonState(max_events=5)
    for i in range(12):
        state.publish("message", {"i": i})
    assert [e.id for e in state.events_after(0, 100)] == [8, 9, 10, 11, 12]
    assert [e.id for e in state.events_after(9, 100)] == [10, 11, 12]


def test_an_id_from_an_earlier_run_reads_as_zero() -> None:
    state = DaemonState()
    state.publish("message", {})
    state.publish("message", {})
    # Ids restart at 1 with the daemon; 500 was handed out by a previous run.
    assert [e.id for e in state.events_after(500, 10)] == [1, 2]
    with state.subscribe(after=500) as subscription:
        assert subscription.last_id == 0


async def test_subscription_joins_backlog_and_live_without_gap() -> None:
    state = DaemonState()
    for i in range(3):
        state.publish("message", {"i": i})
    with state.subscribe(after=1) as subscription:
        state.publish("message", {"i": 3})
        ids = [(await subscription.receive()).id for _ in range(3)]
    assert ids == [2, 3, 4]
    assert state.subscriber_count == 0


async def test_subscription_without_after_gets_only_new_events() -> None:
    state = DaemonState()
    state.publish("message", {"old": True})
    with state.subscribe() as subscription:
        new = state.publish("message", {"old": False})
        assert await subscription.receive() == new


async def test_closed_subscription_ends_iteration() -> None:
    state = DaemonState()
    subscription = state.subscribe()
    subscription.close()
    subscription.close()  # idempotent
    seen = [event async for event in subscription]
    assert seen == []
    state.publish("message", {})  # publishing after close is harmless
    assert state.subscriber_count == 0


async def test_subscriber_that_falls_behind_is_dropped_without_blocking_others() -> None:
    state = DaemonState(subscriber_buffer=4)
    slow = state.subscribe()
    fast = state.subscribe()
    fast_seen: list[int] = []
    for i in range(10):
        # publish() is synchronous: it cannot wait for the slow reader even if it wanted to.
        state.publish("message", {"i": i})
        fast_seen.append((await fast.receive()).id)
    assert fast_seen == list(range(1, 11))
    assert slow.dropped
    assert not fast.dropped
    assert state.subscriber_count == 1
    # The slow reader still gets what was queued before the drop, then a clear end.
    got = [(await slow.receive()).id for _ in range(4)]
    assert got == [1, 2, 3, 4]
    with pytest.raises(FeedDropped) as info:
        await slow.receive()
    assert info.value.last_id == 4
    # It can resume from the ring where it stopped.
    with state.subscribe(after=info.value.last_id) as resumed:
        assert (await resumed.receive()).id == 5
    slow.close()
    fast.close()


async def test_waiting_reader_wakes_on_publish() -> None:
    state = DaemonState()
    received: list[int] = []
    with state.subscribe() as subscription:
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                received.append((await subscription.receive()).id)

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert received == []
            state.publish("peer_left", {"name": "x"})
    assert received == [1]


def test_bad_construction_arguments() -> None:
    with pytest.raises(ValueError):
        DaemonState(max_events=0)
    with pytest.raises(ValueError):
        DaemonState(subscriber_buffer=0)
    state = DaemonState()
    with pytest.raises(ValueError):
        state.subscribe(after=-1)
