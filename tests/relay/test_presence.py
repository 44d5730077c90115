"""Presence in Redis (relay._presence): which replica holds each daemon's link.

Against a real redis-server (tests/support/redis_fixtures.py): claims and their epochs, the
newest epoch winning over refreshes and releases of older ones, expiry of entries nobody
refreshes, the per-scope listing, the link_claimed events, and Redis outages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import coredis
import pytest
import trio
from coredis.retry import NoRetryPolicy

from relay._presence import (
    REFRESH_BATCH,
    HeldLink,
    LinkClaimed,
    Presence,
    PresenceEntry,
    PresentDaemon,
)
from relay._store_api import StoreUnavailable
from tests.support.redis_server import RedisServer, RedisServerFactory, tolerates_failed_connections
from tests.support.waiting import poll

pytest_plugins = ("tests.support.redis_fixtures",)

SCOPE = "scope_0a"
OTHER_SCOPE = "scope_0b"
URL_A = "http://10.0.0.1:8000"
URL_B = "http://10.0.0.2:8000"
T0 = 1_700_000_000.25
#: Bound on anything that waits on Redis.
IO_DEADLINE = 10.0
#: How late past its ttl an entry may still be seen (Redis expires keys on access, exactly).
EXPIRY_SLACK = 0.25
#: Bound on the delivery of a link_claimed event.
EVENT_DELAY = 1.0


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[coredis.Redis[bytes]]:
    async with coredis.Redis.from_url(redis_url, decode_responses=False) as opened:
        yield opened


def held(presence_epoch: int, daemon_id: str, replica_id: str, url: str, **kw: object) -> HeldLink:
    scope = kw.get("scope_id", SCOPE)
    assert isinstance(scope, str)
    return HeldLink(
        scope_id=scope,
        daemon_id=daemon_id,
        epoch=presence_epoch,
        replica_id=replica_id,
        advertise_url=url,
        connected_at=T0,
    )


class Events:
    """A link_claimed handler that queues what it is given."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[LinkClaimed](100)

    async def __call__(self, event: LinkClaimed) -> None:
        await self._send.send(event)

    async def next(self, within: float = EVENT_DELAY) -> LinkClaimed:
        with trio.fail_after(within):
            return await self._receive.receive()


# -- claims and epochs --------------------------------------------------------------------------


async def test_a_claim_writes_an_entry_with_a_ttl_and_a_new_epoch(
    client: coredis.Redis[bytes],
) -> None:
    presence = Presence(client)
    with trio.fail_after(IO_DEADLINE):
        first = await presence.claim(SCOPE, "laptop", "replica-a", URL_A, connected_at=T0)
        second = await presence.claim(SCOPE, "desktop", "replica-a", URL_A, connected_at=T0)
        assert second > first >= 1
        assert await presence.where(SCOPE, "laptop") == PresenceEntry(
            replica_id="replica-a", epoch=first, advertise_url=URL_A, connected_at=T0
        )
        assert await presence.where(SCOPE, "nobody") is None
        assert await presence.where(OTHER_SCOPE, "laptop") is None
        remaining = await client.pttl(b"repowire:presence:scope_0a:laptop")
        assert 0 < remaining <= 6000


async def test_a_claim_without_a_connection_time_takes_the_redis_clock(
    client: coredis.Redis[bytes],
) -> None:
    presence = Presence(client)
    with trio.fail_after(IO_DEADLINE):
        await presence.claim(SCOPE, "laptop", "replica-a", URL_A)
        redis_now = (await client.time()).timestamp()
        entry = await presence.where(SCOPE, "laptop")
    assert entry is not None
    assert abs(entry.connected_at - redis_now) < 5


async def test_the_newest_epoch_wins_over_refreshes_and_releases_of_older_ones(
    client: coredis.Redis[bytes],
) -> None:
    presence = Presence(client)
    with trio.fail_after(IO_DEADLINE):
        old = await presence.claim(SCOPE, "laptop", "replica-a", URL_A, connected_at=T0)
        new = await presence.claim(SCOPE, "laptop", "replica-b", URL_B, connected_at=T0)
        assert new > old
        newest = PresenceEntry(
            replica_id="replica-b", epoch=new, advertise_url=URL_B, connected_at=T0
        )
        assert await presence.where(SCOPE, "laptop") == newest

        # Replica A still refreshes its old link: told it is superseded, nothing overwritten.
        old_link = held(old, "laptop", "replica-a", URL_A)
        assert await presence.refresh([old_link]) == [old_link]
        assert await presence.where(SCOPE, "laptop") == newest

        # A's link ends: its release must not delete B's entry.
        assert await presence.release(SCOPE, "laptop", old) is False
        assert await presence.where(SCOPE, "laptop") == newest
        assert [d.replica_id for d in await presence.daemons_of(SCOPE)] == ["replica-b"]

        # B's own refresh and release work.
        assert await presence.refresh([held(new, "laptop", "replica-b", URL_B)]) == []
        assert await presence.release(SCOPE, "laptop", new) is True
        assert await presence.where(SCOPE, "laptop") is None
        assert await presence.daemons_of(SCOPE) == []
        assert await presence.release(SCOPE, "laptop", new) is False


async def test_an_entry_nobody_refreshes_expires_within_its_ttl(
    client: coredis.Redis[bytes],
) -> None:
    ttl = 0.3
    presence = Presence(client, ttl=ttl)
    with trio.fail_after(IO_DEADLINE):
        await presence.claim(SCOPE, "laptop", "dead-replica", URL_A, connected_at=T0)
        claimed = trio.current_time()
        assert await presence.where(SCOPE, "laptop") is not None

        async def gone() -> bool:
            return await presence.where(SCOPE, "laptop") is None

        await poll(gone, interval=0.02, what="the entry's expiry")
        assert trio.current_time() - claimed <= ttl + EXPIRY_SLACK, "the entry outlived its ttl"
        # The listing drops it too, and prunes the scope's index on the way.
        assert await presence.daemons_of(SCOPE) == []
        assert await client.zcard(b"repowire:presence-scope:scope_0a") == 0


async def test_the_refresher_keeps_held_links_alive_and_reports_superseded_ones(
    client: coredis.Redis[bytes],
) -> None:
    ttl = 0.3
    presence = Presence(client, ttl=ttl)
    other = Presence(client, ttl=ttl)
    superseded_send, superseded = trio.open_memory_channel[list[HeldLink]](10)

    async def on_superseded(links: list[HeldLink]) -> None:
        await superseded_send.send(links)

    with trio.fail_after(IO_DEADLINE):
        epoch = await presence.claim(SCOPE, "laptop", "replica-a", URL_A, connected_at=T0)
        links = [held(epoch, "laptop", "replica-a", URL_A)]
        async with trio.open_nursery() as nursery:
            await nursery.start(presence.run_refresher, lambda: links, on_superseded)
            # Time passing is what is tested: several ttls without the entry lapsing.
            for _ in range(5):
                await trio.sleep(ttl)
                entry = await presence.where(SCOPE, "laptop")
                assert entry is not None and entry.epoch == epoch
            # Another replica takes the daemon over: the refresher says so within a tick.
            await other.claim(SCOPE, "laptop", "replica-b", URL_B, connected_at=T0)
            with trio.fail_after(ttl):
                assert await superseded.receive() == links
            nursery.cancel_scope.cancel()
        entry = await presence.where(SCOPE, "laptop")
        assert entry is not None and entry.replica_id == "replica-b"


async def test_refresh_writes_back_entries_redis_lost_and_lifts_the_epoch_counter(
    client: coredis.Redis[bytes], redis_server: RedisServer
) -> None:
    presence = Presence(client)
    with trio.fail_after(IO_DEADLINE):
        for _ in range(4):
            epoch = await presence.claim(SCOPE, "laptop", "replica-a", URL_A, connected_at=T0)
        link = held(epoch, "laptop", "replica-a", URL_A)
        # Redis restarted without its data (no persistence).
        redis_server.flushall()
        assert await presence.where(SCOPE, "laptop") is None
        assert await presence.refresh([link]) == []
        assert await presence.where(SCOPE, "laptop") == PresenceEntry(
            replica_id="replica-a", epoch=epoch, advertise_url=URL_A, connected_at=T0
        )
        assert [d.daemon_id for d in await presence.daemons_of(SCOPE)] == ["laptop"]
        # A claim after the refresh is newer than every epoch held, the lost counter
        # notwithstanding.
        assert await presence.claim(SCOPE, "laptop", "replica-b", URL_B) > epoch


async def test_refresh_of_many_links_runs_in_batches_and_reports_the_right_ones(
    client: coredis.Redis[bytes],
) -> None:
    presence = Presence(client)
    count = 2 * REFRESH_BATCH + 40
    links = [held(i + 1, f"daemon-{i}", "replica-a", URL_A) for i in range(count)]
    taken = {REFRESH_BATCH - 1, REFRESH_BATCH + 7, count - 1}
    with trio.fail_after(IO_DEADLINE):
        # Nothing exists yet: every entry is written.
        assert await presence.refresh(links) == []
        for i in taken:
            await presence.claim(SCOPE, f"daemon-{i}", "replica-b", URL_B)
        superseded = await presence.refresh(links)
        listing = await presence.daemons_of(SCOPE)
    assert sorted(link.daemon_id for link in superseded) == sorted(f"daemon-{i}" for i in taken)
    assert len(listing) == count
    assert {d.daemon_id for d in listing if d.replica_id == "replica-b"} == {
        f"daemon-{i}" for i in taken
    }
    assert await presence.refresh([]) == []


# -- the scope's listing ------------------------------------------------------------------------


async def test_daemons_of_lists_a_scopes_links_the_longest_connected_first(
    client: coredis.Redis[bytes],
) -> None:
    presence = Presence(client)
    with trio.fail_after(IO_DEADLINE):
        desktop = await presence.claim(SCOPE, "desktop", "replica-b", URL_B, connected_at=T0 + 5)
        laptop = await presence.claim(SCOPE, "laptop", "replica-a", URL_A, connected_at=T0)
        tied = await presence.claim(SCOPE, "attic", "replica-a", URL_A, connected_at=T0 + 5)
        await presence.claim(OTHER_SCOPE, "stranger", "replica-a", URL_A, connected_at=T0)
        assert await presence.daemons_of(SCOPE) == [
            PresentDaemon(
                daemon_id="laptop", replica_id="replica-a", epoch=laptop, connected_at=T0
            ),
            PresentDaemon(
                daemon_id="attic", replica_id="replica-a", epoch=tied, connected_at=T0 + 5
            ),
            PresentDaemon(
                daemon_id="desktop", replica_id="replica-b", epoch=desktop, connected_at=T0 + 5
            ),
        ]
        await presence.release(SCOPE, "laptop", laptop)
        assert [d.daemon_id for d in await presence.daemons_of(SCOPE)] == ["attic", "desktop"]
        assert [d.daemon_id for d in await presence.daemons_of(OTHER_SCOPE)] == ["stranger"]
        assert await presence.daemons_of("scope_ff") == []


# -- events -------------------------------------------------------------------------------------


async def test_a_replica_holding_an_older_epoch_hears_of_the_new_claim_within_a_second(
    client: coredis.Redis[bytes], redis_url: str
) -> None:
    replica_a = Presence(client)
    events = Events()
    async with coredis.Redis.from_url(redis_url, decode_responses=False) as other_client:
        replica_b = Presence(other_client)
        with trio.fail_after(IO_DEADLINE):
            async with trio.open_nursery() as nursery:
                await nursery.start(replica_a.watch, events)
                mine = await replica_a.claim(SCOPE, "laptop", "replica-a", URL_A)
                assert await events.next() == LinkClaimed(
                    scope_id=SCOPE, daemon_id="laptop", epoch=mine, replica_id="replica-a"
                )
                theirs = await replica_b.claim(SCOPE, "laptop", "replica-b", URL_B)
                event = await events.next(EVENT_DELAY)
                # What the relay's handler decides on: a newer epoch, from another replica.
                assert event == LinkClaimed(
                    scope_id=SCOPE, daemon_id="laptop", epoch=theirs, replica_id="replica-b"
                )
                assert event.epoch > mine
                nursery.cancel_scope.cancel()


async def test_malformed_events_are_skipped(client: coredis.Redis[bytes]) -> None:
    presence = Presence(client)
    events = Events()
    with trio.fail_after(IO_DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(presence.watch, events)
            channel = b"repowire:presence-events"
            for junk in (b"not json", b"[]", b'{"kind": "link_claimed", "scope": "a:b"}'):
                await client.publish(channel, junk)
            epoch = await presence.claim(SCOPE, "laptop", "replica-a", URL_A)
            assert (await events.next()).epoch == epoch
            nursery.cancel_scope.cancel()


async def test_a_failing_handler_ends_the_watch_with_its_error(
    client: coredis.Redis[bytes],
) -> None:
    presence = Presence(client)

    async def handler(event: LinkClaimed) -> None:
        raise LookupError(event.daemon_id)

    with trio.fail_after(IO_DEADLINE):
        async with trio.open_nursery() as nursery:
            watching = trio.Event()

            async def watch() -> None:
                with pytest.raises(LookupError, match="laptop"):
                    await presence.watch(handler, task_status=_Started(watching))

            nursery.start_soon(watch)
            await watching.wait()
            await presence.claim(SCOPE, "laptop", "replica-a", URL_A)


class _Started:
    """A task_status that sets an event (for a call whose exception the test awaits)."""

    def __init__(self, event: trio.Event) -> None:
        self._event = event

    def started(self, value: object = None) -> None:
        self._event.set()


# -- isolation, arguments, outages ----------------------------------------------------------------


async def test_namespaces_isolate_two_clusters_on_one_redis(client: coredis.Redis[bytes]) -> None:
    alpha = Presence(client, namespace="alpha:")
    beta = Presence(client, namespace="beta:")
    with trio.fail_after(IO_DEADLINE):
        epoch = await alpha.claim(SCOPE, "laptop", "replica-a", URL_A)
        assert await beta.where(SCOPE, "laptop") is None
        assert await beta.daemons_of(SCOPE) == []
        assert await beta.release(SCOPE, "laptop", epoch) is False
        assert await alpha.where(SCOPE, "laptop") is not None
        assert all(key.startswith(b"alpha:") for key in await client.keys(b"*"))


async def test_malformed_arguments_are_refused_before_redis(client: coredis.Redis[bytes]) -> None:
    presence = Presence(client)
    with pytest.raises(ValueError, match="daemon id"):
        await presence.claim(SCOPE, "bad id", "replica-a", URL_A)
    with pytest.raises(ValueError, match="scope id"):
        await presence.where("scope:0a", "laptop")
    with pytest.raises(ValueError, match="replica id"):
        await presence.claim(SCOPE, "laptop", "replica a", URL_A)
    with pytest.raises(ValueError, match="URL"):
        await presence.claim(SCOPE, "laptop", "replica-a", "ftp://10.0.0.1")
    with pytest.raises(ValueError, match="URL"):
        await presence.claim(SCOPE, "laptop", "replica-a", "http://host/a b")
    with pytest.raises(ValueError, match="time"):
        await presence.claim(SCOPE, "laptop", "replica-a", URL_A, connected_at=float("nan"))
    with pytest.raises(ValueError, match="ttl"):
        Presence(client, ttl=0)
    with pytest.raises(ValueError, match="namespace"):
        Presence(client, namespace="has space")
    assert await client.dbsize() == 0


@tolerates_failed_connections
async def test_redis_down_is_store_unavailable_and_the_refresher_rides_it_out(
    redis_servers: RedisServerFactory,
) -> None:
    server = redis_servers()
    ttl = 0.3
    async with coredis.Redis.from_url(
        server.url,
        decode_responses=False,
        retry_policy=NoRetryPolicy(),
        connect_timeout=1.0,
        stream_timeout=1.0,
        pool_timeout=1.0,
    ) as client:
        presence = Presence(client, ttl=ttl)
        with trio.fail_after(IO_DEADLINE):
            epoch = await presence.claim(SCOPE, "laptop", "replica-a", URL_A, connected_at=T0)
            link = held(epoch, "laptop", "replica-a", URL_A)
            server.stop()
            with pytest.raises(StoreUnavailable, match="cannot be reached"):
                await presence.claim(SCOPE, "desktop", "replica-a", URL_A)
            with pytest.raises(StoreUnavailable):
                await presence.where(SCOPE, "laptop")
            with pytest.raises(StoreUnavailable):
                await presence.refresh([link])
            with pytest.raises(StoreUnavailable):
                await presence.release(SCOPE, "laptop", epoch)
            with pytest.raises(StoreUnavailable):
                await presence.daemons_of(SCOPE)
            events = Events()
            async with trio.open_nursery() as nursery:
                # Neither background task fails for the outage; both start.
                await nursery.start(presence.run_refresher, lambda: [link])
                await nursery.start(presence.watch, events)
                server.start()  # back, empty: the refresher writes the entry again
                await poll(_written_back(presence), what="the entry written back")
                nursery.cancel_scope.cancel()
            entry = await presence.where(SCOPE, "laptop")
            assert entry is not None and entry.epoch == epoch


def _written_back(presence: Presence) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            return await presence.where(SCOPE, "laptop") is not None
        except StoreUnavailable:
            return False

    return check


# -- reusing where() answers ----------------------------------------------------------------------


async def test_where_reuses_an_answer_for_its_window_and_fresh_asks_redis(
    client: coredis.Redis[bytes],
) -> None:
    presence = Presence(client, reuse_for=0.5)
    with trio.fail_after(IO_DEADLINE):
        epoch = await presence.claim(SCOPE, "laptop", "replica-a", URL_A, connected_at=T0)
        entry = await presence.where(SCOPE, "laptop")
        assert entry is not None and entry.epoch == epoch
        await client.delete([b"repowire:presence:scope_0a:laptop"])
        assert await presence.where(SCOPE, "laptop") == entry  # from memory
        assert await presence.where(SCOPE, "laptop", fresh=True) is None
        # A fresh answer of "nobody" is not kept: the next question asks Redis too (the entry
        # is written back behind this object's back, as another replica would).
        await Presence(client).claim(SCOPE, "laptop", "replica-b", URL_B, connected_at=T0)
        moved = await presence.where(SCOPE, "laptop")
        assert moved is not None and moved.replica_id == "replica-b"
        await client.delete([b"repowire:presence:scope_0a:laptop"])
        await trio.sleep(0.5)
        assert await presence.where(SCOPE, "laptop") is None  # the window is over


async def test_another_replicas_claim_makes_where_ask_again_at_once(
    client: coredis.Redis[bytes], redis_url: str
) -> None:
    replica_b = Presence(client, reuse_for=5.0)
    events = Events()
    async with coredis.Redis.from_url(redis_url, decode_responses=False) as other_client:
        replica_a = Presence(other_client)
        with trio.fail_after(IO_DEADLINE):
            async with trio.open_nursery() as nursery:
                await nursery.start(replica_b.watch, events)
                first = await replica_a.claim(SCOPE, "laptop", "replica-a", URL_A)
                await events.next()
                entry = await replica_b.where(SCOPE, "laptop")
                assert entry is not None and entry.epoch == first
                # The daemon relinks through replica C: B hears of it and asks Redis again,
                # well within its 5 s window.
                moved = await replica_a.claim(SCOPE, "laptop", "replica-c", URL_B)
                await events.next()
                now = await replica_b.where(SCOPE, "laptop")
                assert now is not None and (now.epoch, now.replica_id) == (moved, "replica-c")
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("reuse_for", [-0.1, 7.0, float("nan"), float("inf")])
async def test_reuse_for_is_between_zero_and_the_ttl(
    client: coredis.Redis[bytes], reuse_for: float
) -> None:
    with pytest.raises(ValueError, match="reuse_for"):
        Presence(client, ttl=6.0, reuse_for=reuse_for)


async def test_a_release_or_forget_stops_the_reuse_at_once(client: coredis.Redis[bytes]) -> None:
    presence = Presence(client, reuse_for=5.0)
    with trio.fail_after(IO_DEADLINE):
        epoch = await presence.claim(SCOPE, "laptop", "replica-a", URL_A, connected_at=T0)
        assert await presence.where(SCOPE, "laptop") is not None
        assert await presence.release(SCOPE, "laptop", epoch)
        assert await presence.where(SCOPE, "laptop") is None  # not the reused answer
        await presence.claim(SCOPE, "laptop", "replica-a", URL_A, connected_at=T0)
        assert await presence.where(SCOPE, "laptop") is not None
        await client.delete([b"repowire:presence:scope_0a:laptop"])
        presence.forget(SCOPE, "laptop")
        assert await presence.where(SCOPE, "laptop") is None
