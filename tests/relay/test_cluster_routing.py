"""Two relay replicas on one Redis behave as one relay: presence and the replica mesh, wired.

Two relays run in this process (``tests.support.stack``), each with ``--redis-url``,
``--replica-id``, ``--advertise-url`` and a cluster secret, on a real redis-server
(``tests.support.redis_fixtures``). Daemons (real ones behind real connectors, or stand-ins
where a test pins down a close code) link to one replica; a browser session minted in the
shared store asks the other. What one relay does for a daemon linked to it, the cluster must
do for a daemon linked to any replica: HTTP, Server-Sent Events and WebSockets, the daemon
list, mesh traffic between daemons, a clear 503 when the daemon is gone, 4409 when a daemon's
link moves, and revocation ending everything within a second.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from connector import LinkState
from mux import MuxStream
from protocol import CloseCode
from relay import KeyRecord, Relay
from tests.support.clients import (
    HttpResponse,
    SseReader,
    http_request,
    open_browser_websocket,
    open_http_stream,
)
from tests.support.daemons import write_dashboard
from tests.support.processes import free_ports
from tests.support.redis_server import (
    RedisServer,
    RedisServerFactory,
    tolerates_failed_connections,
)
from tests.support.relays import RelayHandle
from tests.support.scripted import ScriptedHttp
from tests.support.sessions import form_body
from tests.support.stack import ConnectedDaemon, Stack, open_stack
from tests.support.stand_in import StandIn, identity_handler, start_stand_in
from tests.support.waiting import eventually

pytest_plugins = ("tests.support.redis_fixtures",)

#: The secret both replicas share (at least 32 bytes).
SECRET = b"the cluster secret of the routing tests"
#: What the brief promises: a revocation, a link replaced elsewhere, a daemon gone, all
#: answered within this.
PROMPT = 1.0
#: Hard stop for one test, the replicas' start and teardown included.
TEST_LIMIT = 60
#: Bound on one check of a test.
STEP = 15
#: The Redis key prefix of the relays (the default namespace).
NAMESPACE = "repowire:"


@attrs.frozen(kw_only=True)
class Pair:
    """Replicas ``a`` and ``b`` of one cluster, a scope's key and a browser cookie for it."""

    stack: Stack
    a: RelayHandle
    b: RelayHandle
    redis: RedisServer
    record: KeyRecord
    key: str
    cookie: tuple[str, str]

    @property
    def relay_a(self) -> Relay:
        return self.a.running.relay

    @property
    def relay_b(self) -> Relay:
        return self.b.running.relay

    async def daemon(self, replica: RelayHandle, daemon_id: str) -> ConnectedDaemon:
        """A real daemon linked to ``replica``, returned once every replica sees it online."""
        daemon = await self.stack.start_daemon(replica, self.key, daemon_id)
        await self.wait_present(daemon_id)
        return daemon

    async def stand_in(self, replica: RelayHandle, daemon_id: str, label: str) -> StandIn:
        """A stand-in daemon linked to ``replica`` that answers with ``label``."""
        return await start_stand_in(
            self.stack.daemons, replica.address, self.key, daemon_id, identity_handler(label)
        )

    async def wait_present(self, daemon_id: str) -> None:
        """Wait until both replicas list ``daemon_id`` online (its presence is claimed)."""

        async def listed() -> bool:
            for relay in (self.relay_a, self.relay_b):
                online = await relay.online_daemons(self.record.scope_id)
                if daemon_id not in {d.daemon_id for d in online}:
                    return False
            return True

        await eventually(listed, what=f"{daemon_id} listed by both replicas")

    def presence_key(self, daemon_id: str) -> str:
        return f"{NAMESPACE}presence:{self.record.scope_id}:{daemon_id}"

    async def get(self, replica: RelayHandle, path: str) -> HttpResponse:
        return await http_request(replica.address, "GET", path, headers=[self.cookie])

    def origin(self, replica: RelayHandle) -> tuple[str, str]:
        return ("Origin", f"http://127.0.0.1:{replica.port}")


def replica_settings(name: str, port: int, redis_url: str) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        "replica_id": name,
        "advertise_url": f"http://127.0.0.1:{port}",
        "cluster_secret": SECRET,
    }


@asynccontextmanager
async def cluster_pair(tmp_path: Path, redis: RedisServer, **settings: Any) -> AsyncIterator[Pair]:
    """Replicas ``relay-a`` and ``relay-b`` on ``redis`` (with ``settings``), a scope and a
    browser session."""
    async with open_stack(tmp_path, write_dashboard(tmp_path / "dashboard")) as stack:
        # The advertised URL names the port, so it is chosen before the replica starts.
        handles = []
        for name, port in zip(("relay-a", "relay-b"), free_ports(2), strict=True):
            options = replica_settings(name, port, redis.url) | settings
            handles.append(await stack.relay_runner(name, **options).start(port))
        a, b = handles
        record, key = await a.new_scope()
        # Minted through A's store, used on B: the store is the cluster's.
        cookie = await a.session_cookie(record)
        yield Pair(stack=stack, a=a, b=b, redis=redis, record=record, key=key, cookie=cookie)


@pytest.fixture
async def pair(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Pair]:
    with trio.fail_after(TEST_LIMIT):
        async with cluster_pair(tmp_path, redis_server) as started:
            yield started


async def wait_peer_joined(events: SseReader, name: str) -> None:
    """The next ``peer_joined`` event for peer ``name`` on a daemon's event stream."""
    while True:
        event = await events.next_event()
        if event.event == "peer_joined" and event.json()["data"]["name"] == name:
            return


# ---------------------------------------------------------------------- the tunnel


async def test_http_sse_and_a_websocket_through_b_reach_the_daemon_on_a(pair: Pair) -> None:
    with trio.fail_after(STEP):
        laptop = await pair.daemon(pair.a, "laptop")
        assert pair.relay_b.links.get(pair.record.scope_id, "laptop") is None

        answer = await pair.get(pair.b, "/d/laptop/health")
        assert answer.status == 200, answer.body
        assert answer.json()["daemon_id"] == "laptop"
        # The scope's default daemon is the cluster's, wherever its link is.
        assert (await pair.get(pair.b, "/peers")).status == 200
        assert pair.relay_b.cluster is not None and pair.relay_a.cluster is not None
        assert pair.relay_b.cluster.stats.forwarded_out == 2
        assert pair.relay_a.cluster.stats.forwarded_in == 2

        async with open_http_stream(
            pair.b.address,
            "GET",
            "/d/laptop/events/stream",
            headers=[pair.cookie, ("Accept", "text/event-stream")],
        ) as response:
            assert response.status == 200
            assert (response.header("content-type") or "").startswith("text/event-stream")
            events = SseReader(response)
            posted = await laptop.request("POST", "/peers", json_body={"name": "watcher"})
            assert posted.status == 201
            await wait_peer_joined(events, "watcher")
        # The daemon learns that the browser left, across both replicas.
        await eventually(lambda: laptop.state.subscriber_count == 0)

        async with open_browser_websocket(
            pair.b.address, "/d/laptop/ws", [pair.cookie, pair.origin(pair.b)]
        ) as ws:
            await eventually(lambda: laptop.state.subscriber_count == 1)
            await ws.send_message(json.dumps({"type": "notify", "to": "watcher", "text": "hi"}))
            received = [json.loads(await ws.get_message()) for _ in range(2)]
        by_type = {m["type"]: m for m in received}
        assert by_type["result"]["delivered"] is True, received
        assert by_type["event"]["event"]["data"]["text"] == "hi", received


async def test_both_replicas_list_every_daemon_and_agree_on_the_default(pair: Pair) -> None:
    with trio.fail_after(STEP):
        laptop = await pair.daemon(pair.a, "laptop")
        desk = await pair.daemon(pair.b, "desk")
        # The directory each daemon's replica answers lists the other replica's daemon.
        assert (await laptop.connector.directory()).online == ("desk",)
        assert (await desk.connector.directory()).online == ("laptop",)

        for replica in (pair.a, pair.b):
            listed = await pair.get(replica, "/api/v1/daemons")
            assert listed.status == 200, listed.body
            document = listed.json()
            by_id = {d["daemon_id"]: d for d in document["daemons"]}
            assert set(by_id) == {"laptop", "desk"}
            assert all(d["online"] for d in by_id.values())
            # The longest connected is everyone's default, on either replica.
            assert document["current"] == "laptop"
            assert by_id["laptop"]["default"] and not by_id["desk"]["default"]
            # Version and round trip are known of the links the replica holds itself.
            own = "laptop" if replica is pair.a else "desk"
            other = "desk" if own == "laptop" else "laptop"
            assert by_id[own]["version"] is not None
            assert by_id[other]["version"] is None and by_id[other]["rtt_ms"] is None
            # And a plain path goes to it from either replica.
            health = await pair.get(replica, "/api/v1/daemons")
            assert health.status == 200
            assert (await pair.get(replica, "/peers")).status == 200
        assert pair.relay_a.cluster is not None
        # B's /peers went to laptop on A: B forwarded it.
        assert pair.relay_a.cluster.stats.forwarded_in >= 1


async def test_a_daemon_whose_presence_is_gone_is_offline_at_once(pair: Pair) -> None:
    with trio.fail_after(STEP):
        laptop = await pair.daemon(pair.a, "laptop")
        assert (await pair.get(pair.b, "/d/laptop/health")).status == 200

        # The entry vanishes (Redis lost it). B may reuse what it read a moment ago (A, which
        # still holds the link, would answer); once B stops reusing it (the reuse window
        # ends, or as here it is told to forget), B cannot tell where laptop is, and says so.
        pair.redis.command("DEL", pair.presence_key("laptop"))
        assert pair.relay_b.presence is not None
        pair.relay_b.presence.forget(pair.record.scope_id, "laptop")
        started = time.monotonic()
        answer = await pair.get(pair.b, "/d/laptop/health")
        assert time.monotonic() - started < PROMPT
        assert answer.status == 503, answer.body
        assert answer.json()["error"] == "daemon_offline"
        assert answer.header("retry-after") is not None
        # A still serves it, and writes the entry back at its next refresh.
        assert (await pair.get(pair.a, "/d/laptop/health")).status == 200
        await eventually(
            lambda: pair.redis.command("EXISTS", pair.presence_key("laptop")) == b":1",
            what="the entry written back",
        )
        assert (await pair.get(pair.b, "/d/laptop/health")).status == 200

        # The daemon stops: its replica withdraws the entry, and B answers 503 at once.
        await laptop.stop()
        await eventually(
            lambda: pair.redis.command("EXISTS", pair.presence_key("laptop")) == b":0",
            what="the entry released",
        )
        for path in ("/d/laptop/health", "/peers"):
            started = time.monotonic()
            answer = await pair.get(pair.b, path)
            assert time.monotonic() - started < PROMPT
            assert answer.status == 503, answer.body
            assert answer.json()["error"] == "daemon_offline"


async def test_an_entry_naming_a_replica_that_is_gone_is_offline_at_once(pair: Pair) -> None:
    with trio.fail_after(STEP):
        await pair.daemon(pair.a, "laptop")
        (dead_port,) = free_ports(1)
        key = pair.presence_key("ghost")
        pair.redis.command(
            "HSET",
            key,
            "replica",
            "relay-gone",
            "epoch",
            "1",
            "url",
            f"http://127.0.0.1:{dead_port}",
            "since",
            "1.0",
        )
        pair.redis.command("PEXPIRE", key, "60000")
        for _ in range(3):
            started = time.monotonic()
            answer = await pair.get(pair.b, "/d/ghost/health")
            assert time.monotonic() - started < PROMPT
            assert answer.status == 503, answer.body
            assert answer.json()["error"] == "daemon_offline"
        # Nothing else suffered.
        assert (await pair.get(pair.b, "/d/laptop/health")).status == 200


async def test_a_daemon_relinking_to_b_closes_its_old_link_on_a_with_4409(pair: Pair) -> None:
    with trio.fail_after(STEP):
        old = await pair.stand_in(pair.a, "laptop", "on-a")
        await pair.wait_present("laptop")
        answer = await pair.get(pair.b, "/d/laptop/x")
        assert answer.json()["daemon"] == "on-a"

        new = await pair.stand_in(pair.b, "laptop", "on-b")
        moved = time.monotonic()
        with trio.fail_after(PROMPT):
            await old.finished.wait()
        print(f"\nold link closed {time.monotonic() - moved:.3f} s after the new one linked")
        assert old.close_code == CloseCode.REPLACED
        assert new.close_code is None
        await eventually(lambda: pair.relay_a.links.get(pair.record.scope_id, "laptop") is None)
        # Both replicas now reach the new link.
        for replica in (pair.a, pair.b):
            answer = await pair.get(replica, "/d/laptop/x")
            assert answer.status == 200, answer.body
            assert answer.json()["daemon"] == "on-b"


# ---------------------------------------------------------------------- revocation


@pytest.mark.parametrize("how", ["revoke", "rotate"])
async def test_revoking_the_key_through_b_ends_the_forwarded_stream_and_the_link_on_a(
    pair: Pair, how: str
) -> None:
    with trio.fail_after(STEP):
        laptop = await pair.daemon(pair.a, "laptop")
        ended: dict[str, float] = {}
        async with open_http_stream(
            pair.b.address,
            "GET",
            "/d/laptop/events/stream",
            headers=[pair.cookie, ("Accept", "text/event-stream")],
        ) as response:
            assert response.status == 200
            events = SseReader(response)
            await laptop.request("POST", "/peers", json_body={"name": "watcher"})
            await wait_peer_joined(events, "watcher")

            async def stream_end() -> None:
                try:
                    while await events.next_message() is not None:
                        pass
                except Exception:
                    pass  # cut rather than ended: ended all the same
                ended["forwarded stream on B"] = time.monotonic()

            async def link_end() -> None:
                await eventually(lambda: laptop.connector.status().state is not LinkState.CONNECTED)
                ended["daemon link on A"] = time.monotonic()

            async def daemon_released() -> None:
                await eventually(lambda: laptop.state.subscriber_count == 0)
                ended["the daemon's subscriber"] = time.monotonic()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream_end)
                nursery.start_soon(link_end)
                nursery.start_soon(daemon_released)
                await trio.testing.wait_all_tasks_blocked()
                revoked = time.monotonic()
                if how == "revoke":
                    assert await pair.b.store.revoke_key(pair.record.key_id, now=time.time())
                else:
                    rotated = await http_request(
                        pair.b.address,
                        "POST",
                        "/api/v1/keys/rotate",
                        headers=[("Authorization", f"Bearer {pair.key}")],
                    )
                    assert rotated.status == 200, rotated.body
        delays = {what: at - revoked for what, at in ended.items()}
        print(f"\n{how} through B: " + ", ".join(f"{k} {v:.3f} s" for k, v in delays.items()))
        assert all(delay <= PROMPT for delay in delays.values()), delays
        assert pair.relay_a.links.get(pair.record.scope_id, "laptop") is None


# ---------------------------------------------------------------------- mesh


async def test_mesh_traffic_between_a_daemon_on_a_and_one_on_b(pair: Pair) -> None:
    with trio.fail_after(STEP):
        laptop = await pair.daemon(pair.a, "laptop")
        desk = await pair.daemon(pair.b, "desk")
        assert (await laptop.request("POST", "/peers", json_body={"name": "alice"})).status == 201
        assert (await desk.request("POST", "/peers", json_body={"name": "bob"})).status == 201
        for sender, to, receiver in ((laptop, "bob@desk", desk), (desk, "alice@laptop", laptop)):
            text = f"from {sender.daemon_id}"
            answer = await sender.request("POST", "/notify", json_body={"to": to, "text": text})
            assert answer.status == 200, answer.body
            assert answer.json()["delivered"] is True
            messages = [
                e.data
                for e in receiver.daemon.state.events_after(0, 1000)
                if e.type == "message" and e.data["text"] == text
            ]
            assert len(messages) == 1 and messages[0]["via"] == sender.daemon_id, messages
        assert pair.relay_a.cluster is not None and pair.relay_b.cluster is not None
        assert pair.relay_a.cluster.stats.forwarded_out >= 1
        assert pair.relay_b.cluster.stats.forwarded_out >= 1
        # A daemon nobody has linked is unknown, from either side.
        with pytest.raises(Exception, match="No daemon nobody"):
            await laptop.connector.request("nobody", "GET", "/health")


# ---------------------------------------------------------------------- the replicas


@pytest.mark.parametrize("stopping", ["a", "b"])
async def test_a_forwarded_request_in_flight_finishes_through_a_graceful_stop(
    pair: Pair, stopping: str
) -> None:
    """A replica stopping (go-away) lets a request forwarded through it finish, whether it
    holds the daemon's link (``a``) or the browser's connection (``b``)."""
    answering = trio.Event()
    release = trio.Event()

    async def slow(stream: MuxStream) -> None:
        exchange = ScriptedHttp(stream)
        await exchange.receive_request()
        await exchange.read_body()
        answering.set()
        await release.wait()
        await exchange.respond_json(200, {"daemon": "slow"})

    with trio.fail_after(STEP):
        await start_stand_in(pair.stack.daemons, pair.a.address, pair.key, "laptop", slow)
        await pair.wait_present("laptop")
        answers: list[HttpResponse] = []
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                answers.append(await pair.get(pair.b, "/d/laptop/x"))

            nursery.start_soon(ask)
            await answering.wait()
            replica = pair.a if stopping == "a" else pair.b
            relay = replica.running.relay
            cluster = relay.cluster
            assert cluster is not None
            replica.running.shutdown()
            await eventually(lambda: relay.shutting_down and cluster.draining)
            release.set()
        (answer,) = answers
        assert answer.status == 200, answer.body
        assert answer.json() == {"daemon": "slow"}


async def test_a_request_a_stopping_replica_still_holds_is_forwarded_not_failed(
    pair: Pair,
) -> None:
    """A request a stopping replica has taken in but not routed yet when its links are
    drained (here: it waits for a link of its daemon in its handshake, which the stop then
    turns away) is still forwarded: the replica mesh stops after the HTTP server, not
    before."""
    with trio.fail_after(STEP):
        await pair.stand_in(pair.a, "laptop", "on-a")
        await pair.wait_present("laptop")
        relay = pair.relay_b
        # The same daemon dials B too, slowly: B holds requests for it until it arrives.
        await start_stand_in(
            pair.stack.daemons,
            pair.b.address,
            pair.key,
            "laptop",
            identity_handler("on-b"),
            hello_delay=1.0,
        )
        assert relay.links.is_arriving(pair.record.scope_id, "laptop")
        answers: list[HttpResponse] = []
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                answers.append(await pair.get(pair.b, "/d/laptop/x"))

            nursery.start_soon(ask)
            await eventually(lambda: len(relay.live_access) == 1)
            pair.b.running.shutdown()
        (answer,) = answers
        assert answer.status == 200, answer.body
        assert answer.json()["daemon"] == "on-a"


async def test_health_names_the_replica_and_a_relay_alone_has_no_replica_endpoint(
    pair: Pair, tmp_path: Path
) -> None:
    with trio.fail_after(STEP):
        await pair.daemon(pair.a, "laptop")
        assert (await pair.get(pair.b, "/d/laptop/health")).status == 200
        health = (await http_request(pair.b.address, "GET", "/health")).json()
        assert health["replica"] == "relay-b"
        assert health["peer_links"] == 1
        assert health["daemons_connected"] == 0

        alone = await pair.stack.start_relay("alone")
        health = (await http_request(alone.address, "GET", "/health")).json()
        assert "replica" not in health and "peer_links" not in health
        refused = await http_request(
            alone.address,
            "GET",
            "/ws/replica",
            headers=[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        )
        assert refused.status == 404, refused.body


#: A short presence ttl for the outage test (refreshed every second): entries lapse while
#: Redis is away.
SHORT_TTL = 3.0
#: Within this of Redis answering again, the lapsed entries are back (well within a refresh
#: interval: the refresher retries often while Redis is away).
WRITTEN_BACK = 0.5


@tolerates_failed_connections
async def test_a_redis_outage_keeps_forwarding_and_presence_comes_back_with_redis(
    tmp_path: Path, redis_servers: RedisServerFactory
) -> None:
    server = redis_servers(persistent=True)
    with trio.fail_after(TEST_LIMIT):
        async with cluster_pair(tmp_path, server, presence_ttl=SHORT_TTL) as pair:
            laptop = await pair.daemon(pair.a, "laptop")
            assert (await pair.get(pair.b, "/d/laptop/health")).status == 200

            server.stop()
            # Longer than the entries live: they are gone when Redis is back.
            await trio.sleep(SHORT_TTL + 0.5)
            # B cannot read presence, but remembers where laptop was: its link has not moved.
            during = await pair.get(pair.b, "/d/laptop/health")
            assert during.status == 200, during.body
            # What needs Redis for the first time says so.
            elsewhere = await pair.get(pair.b, "/d/desk/health")
            assert elsewhere.status == 503, elsewhere.body
            assert elsewhere.json()["error"] == "store_unavailable"
            assert elsewhere.header("retry-after") is not None

            server.start()
            back = time.monotonic()
            # From the moment Redis is back, before and after A writes its lapsed entry back:
            # B keeps reaching laptop, and a sign-in through B (which holds no daemon itself)
            # is refused for the store until it works, never for a missing daemon.
            signed_in = False
            written_back: float | None = None
            while time.monotonic() - back < SHORT_TTL / 3 + 0.5 or not signed_in:
                if (
                    written_back is None
                    and server.command("EXISTS", pair.presence_key("laptop")) == b":1"
                ):
                    written_back = time.monotonic() - back
                answer = await pair.get(pair.b, "/d/laptop/health")
                assert answer.status == 200, (time.monotonic() - back, answer.body)
                if not signed_in:
                    attempt = await http_request(
                        pair.b.address,
                        "POST",
                        "/auth",
                        body=form_body(api_key=pair.key),
                        headers=[("Content-Type", "application/x-www-form-urlencoded")],
                    )
                    assert attempt.status in (303, 503), (attempt.status, attempt.body[:200])
                    signed_in = attempt.status == 303
                await trio.sleep(0.05)
            # The refresher kept trying while Redis was away: the entry is back at once.
            assert written_back is not None and written_back < WRITTEN_BACK, written_back
            # A moment after an outage a missing entry may be one not written back yet: B
            # still tries the replica it last knew...
            server.command("DEL", pair.presence_key("laptop"))
            assert (await pair.get(pair.b, "/d/laptop/health")).status == 200
            # ...which says whether it holds the link: once laptop is gone, B answers 503.
            await laptop.stop()
            await eventually(lambda: not pair.relay_a.links.for_scope(pair.record.scope_id))
            gone = await pair.get(pair.b, "/d/laptop/health")
            assert gone.status == 503, gone.body
            assert gone.json()["error"] == "daemon_offline"
