"""The relay as a cluster: three replicas behind the documented nginx load balancer, one Redis.

Everything runs as a user runs it (:mod:`tests.support.cluster`): ``redis-server``, three
``repowire relay start --redis-url ... --replica-id ... --advertise-url ...
--cluster-secret-file ...`` processes, nginx with ``docs/deploy/cluster/nginx-cluster.conf``
(round robin, no sticky sessions) over TLS with a private CA, and ``repowire serve --relay``
daemons dialling nginx. Browsers are plain HTTP clients through nginx, so their requests land
on every replica in turn; one test drives Chromium.

The module shares one cluster (:func:`cluster_stack`); every test starts from a healthy one
(the ``stack`` fixture: every replica and Redis up, every daemon linked), and the tests that
break something put it back. Figures (recovery times, throughput) are printed: ``pytest -s``
shows them. The first two tests run independent relays behind the same balancer: they check
the balancer and the harness alone; the last ones check the deployment files themselves.
Its failure and load cases (the rolling restart, the Redis outage, the stale presence entry,
the balancer skipping a dead replica, the 256 MiB download) are marked ``slow``: `.ci/run`
runs them after the default run, which keeps the rest.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import h11
import pytest
import trio
from playwright.sync_api import Browser, expect

from repowire.cli import build_parser
from tests.support.blocking_processes import Budget
from tests.support.clients import SseReader, http_request, open_http_stream
from tests.support.cluster import (
    CLUSTER_SITE,
    ClusterDaemon,
    RedisReplyError,
    RelayCluster,
    open_cluster,
    redis_call,
    reported,
    skip_without_cluster_parts,
)
from tests.support.processes import free_ports
from tests.support.redis_server import redis_server_binary
from tests.support.system import needs

from .cluster_support import (
    ClusterStack,
    aim_past,
    describe,
    download,
    entry_of,
    error_code,
    expected_digest,
    get,
    holder,
    messages_of,
    post_sign_in,
    restore,
    scope_of,
    sign_in,
    spread,
    start_stack,
    upstreams_of,
    wait_peer_joined,
    write_stale_presence,
)
from .e2e_support import DEFAULT_WAIT, browser, wait_live
from .tls_support import DEPLOY_DIR, render_template

#: Fixtures this module takes from the browser tests' support module (named here so the
#: import counts as used).
FIXTURES: Final = (browser,)

#: Seconds for one test of the balancer alone.
BALANCER_TEST_TIMEOUT = 60.0
#: Seconds within which nginx must have skipped a dead replica (it refuses at once).
SKIP_DEAD_LIMIT = 1.0


async def probe_upstreams(cluster: RelayCluster, count: int) -> list[tuple[str, ...]]:
    """``count`` requests for ``/health`` through nginx, one after the other; the replicas
    each went to (from nginx's access log), in order. Every answer must be 200."""
    before = len(cluster.access_entries())
    for _ in range(count):
        started = time.monotonic()
        with trio.fail_after(5):
            response = await cluster.request("GET", "/health")
        assert response.status == 200, (response.status, response.body[:200])
        assert time.monotonic() - started < SKIP_DEAD_LIMIT + 1.0
    entries = (await cluster.wait_access_entries(before + count))[before:]
    assert len(entries) == count, entries
    return [entry.upstreams for entry in entries]


# -- the balancer and the harness, with independent replicas ---------------------------------


@pytest.mark.slow
async def test_the_documented_balancer_spreads_requests_and_skips_a_dead_replica(
    tmp_path: Path,
) -> None:
    """Three relays without the cluster flags behind the documented nginx config: requests go
    round robin, a SIGKILLed replica costs at most one refused connect before nginx skips it,
    a restarted one gets requests again, and a daemon links through the balancer."""
    cluster = RelayCluster(tmp_path / "cluster", cluster_flags=False)
    # Independent replicas share nothing: give them one key by starting each from a copy of
    # the same store.
    key = await cluster.create_key("balancer")
    for replica in cluster.replicas[1:]:
        shutil.copytree(cluster.replicas[0].data_dir, replica.data_dir)
    with trio.fail_after(BALANCER_TEST_TIMEOUT):
        await cluster.start()
        try:
            with reported(cluster):
                await check_balancer(cluster, key.key_id)
                daemon = await cluster.start_daemon("alpha", key)
                counts = await cluster.link_counts()
                holder = cluster.holder_from_logs("alpha")
                assert holder is not None and counts[holder.index] == 1, counts
                assert sum(c or 0 for c in counts) == 1, counts
                assert (await daemon.link())["state"] == "connected"
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(cluster.close)
    assert not any(r.running for r in cluster.replicas)


async def check_balancer(cluster: RelayCluster, key_id: str) -> None:
    ups = [r.upstream for r in cluster.replicas]
    first = await probe_upstreams(cluster, 6)
    assert all(len(u) == 1 for u in first), first
    served = [u[0] for u in first]
    assert sorted(served) == sorted(ups * 2), served
    # Round robin: each replica once per three requests.
    assert len(set(served[:3])) == 3 and served[3:] == served[:3], served

    # SIGKILL one: at most one request tries it (and moves on), the rest skip it.
    dead = cluster.replicas[1]
    assert await cluster.kill_replica(1) == -9
    after = await probe_upstreams(cluster, 6)
    tried_dead = [u for u in after if dead.upstream in u]
    assert len(tried_dead) <= 1, after
    assert all(u[-1] != dead.upstream for u in after), after
    print(f"replica killed: {len(tried_dead)} of 6 requests tried it first, all answered 200")

    # Started again on its port: nginx tries it once its fail_timeout ran out.
    await cluster.start_replica(1)
    back_at = time.monotonic()
    while True:
        (upstreams,) = await probe_upstreams(cluster, 1)
        if upstreams[-1] == dead.upstream:
            break
        assert time.monotonic() - back_at < 10.0, "nginx never sent a request to it again"
        await trio.sleep(0.2)
    print(f"restarted replica served again after {time.monotonic() - back_at:.1f} s")

    # The graceful stop ends the process cleanly.
    assert await cluster.stop_replica(1) == 0
    await cluster.start_replica(1)
    await cluster.wait_healthy()
    assert key_id.startswith("key_")


async def test_open_cluster_cleans_up_when_the_body_fails(tmp_path: Path) -> None:
    """Whatever happens inside, every process of the cluster is gone afterwards."""
    seen: list[RelayCluster] = []
    with pytest.raises(RuntimeError, match="inside"), trio.fail_after(BALANCER_TEST_TIMEOUT):
        async with open_cluster(tmp_path / "cluster", cluster_flags=False) as cluster:
            seen.append(cluster)
            assert cluster.secret_file.stat().st_mode & 0o777 == 0o600
            assert len(cluster.secret_file.read_text().strip()) >= 43
            raise RuntimeError("inside")
    (cluster,) = seen
    assert cluster.nginx is not None and not cluster.nginx.running
    assert not any(r.running for r in cluster.replicas)
    assert not cluster.redis.running


# -- the cluster --------------------------------------------------------------------------------

#: Seconds a replica serves a session it confirmed before Redis went away
#: (``--store-outage-grace``; 60 s by default, shortened to keep the test short).
OUTAGE_GRACE: Final = 12.0
#: Seconds cut off the outage grace where the test checks it: a session was last confirmed a
#: moment before Redis stopped, and a replica keeps a confirmation for a while (5 s) without
#: asking again.
GRACE_MARGIN: Final = 2.0
#: Flags every replica of the module's cluster gets on top of the harness's.
REPLICA_ARGS: Final = ("--store-outage-grace", f"{OUTAGE_GRACE:g}")
#: Seconds one test may take once the stack is healthy (the download and the rolling restart
#: have their own bounds).
TEST_TIMEOUT: Final = 60.0
#: Seconds the ``stack`` fixture may take to make the cluster healthy again.
RESTORE_TIMEOUT: Final = 60.0
#: Answer time that counts as "at once" for a daemon whose replica is gone.
AT_ONCE: Final = 1.0
#: Seconds within which a daemon whose replica died must be reachable again: its first
#: retries (0.5 s, 1 s, 2 s bounds) plus a TLS handshake and a link handshake.
LINK_BACK_LIMIT: Final = 10.0
#: Seconds within which a daemon sent away by a replica's graceful stop must be back: the
#: connector's restart window allows delays up to 15 s.
RESTART_BACK_LIMIT: Final = 20.0
#: Seconds the whole rolling restart may take.
ROLLING_TIMEOUT: Final = 150.0
#: Seconds between two polls of the rolling-restart client.
POLL_PERIOD: Final = 1.0
#: Seconds within which revoking a key ends its sessions, links and streams everywhere.
REVOKE_LIMIT: Final = 1.0
#: Seconds within which Redis's return makes sign-in work again.
STORE_BACK_LIMIT: Final = 10.0
#: Seconds the session is watched after Redis returned: longer than a presence refresh
#: period (a third of the presence ttl), in which expired entries are written again.
AFTER_OUTAGE_WATCH: Final = 4.0
#: Seconds within which every replica's /health reports Redis gone.
STORE_DOWN_LIMIT: Final = 5.0
#: The large download: its size and the time it may take.
BULK_SIZE: Final = 256 * 1024 * 1024
DOWNLOAD_TIMEOUT: Final = 180.0
#: A presence entry's life without refresh (relay/_presence.py DEFAULT_PRESENCE_TTL), and
#: what the test allows on top for Redis's expiry cycle.
PRESENCE_TTL: Final = 6.0
EXPIRY_SLACK: Final = 2.0


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    """The module's cluster and daemons, started once (synchronously: trio fixtures are
    per test) and stopped at the end of the module whatever happened."""
    skip_without_cluster_parts()
    cluster = RelayCluster(tmp_path_factory.mktemp("cluster"), replica_args=REPLICA_ARGS)
    try:
        try:
            stack = trio.run(start_stack, cluster)
        except BaseException as exc:
            raise AssertionError(f"the cluster did not start: {exc!r}\n{cluster.report()}") from exc
        yield stack
    finally:
        cluster.close()


@pytest.fixture
async def stack(cluster_stack: ClusterStack) -> AsyncIterator[ClusterStack]:
    """The module's stack, healthy: every replica and Redis up, every daemon linked."""
    with trio.fail_after(RESTORE_TIMEOUT), reported(cluster_stack.cluster):
        await restore(cluster_stack)
    yield cluster_stack


async def test_daemons_of_one_key_are_linked_to_different_replicas(stack: ClusterStack) -> None:
    cluster = stack.cluster
    with trio.fail_after(TEST_TIMEOUT), reported(cluster):
        first, second = await spread(stack)
        third = await holder(cluster, stack.bulk.daemon_id)
        counts = await cluster.link_counts()
        print(
            f"alpha on {first.replica_id}, beta on {second.replica_id}, bulk on "
            f"{third.replica_id}; links per replica {counts}"
        )
        assert first.index != second.index
        # Each replica counts only the links it holds itself: three daemons, three links.
        assert sum(c or 0 for c in counts) == 3, counts
        assert (counts[first.index] or 0) >= 1 and (counts[second.index] or 0) >= 1, counts
        # The presence entries carry what other replicas need: replica, epoch, address.
        for daemon in (stack.alpha, stack.beta):
            fields = entry_of(cluster, daemon.daemon_id).fields
            assert fields["replica"] in (first.replica_id, second.replica_id), fields
            assert int(fields["epoch"]) >= 1, fields
            assert fields["url"] == cluster.replica_by_id(fields["replica"]).url, fields


async def test_a_browser_reaches_both_daemons_through_every_replica(stack: ClusterStack) -> None:
    cluster = stack.cluster
    with trio.fail_after(TEST_TIMEOUT), reported(cluster):
        cookie = await sign_in(cluster, stack.team)
        everyone = {r.upstream for r in cluster.replicas}
        for daemon in (stack.alpha, stack.beta):
            since = len(cluster.access_entries())
            # Six requests in a row: round robin sends two to each replica.
            for _ in range(6):
                answer = await get(cluster, f"/d/{daemon.daemon_id}/health", cookie)
                assert answer.status == 200, describe(answer)
                assert answer.json()["daemon_id"] == daemon.daemon_id
            await cluster.wait_access_entries(since + 6)
            assert upstreams_of(cluster, since, f"/d/{daemon.daemon_id}/") == everyone
            page = await get(cluster, f"/d/{daemon.daemon_id}/dashboard/", cookie)
            assert page.status == 200, describe(page)
            assert (page.header("content-type") or "").startswith("text/html")
        # Every replica lists both daemons online, whichever holds them.
        for _ in range(3):
            listed = await get(cluster, "/api/v1/daemons", cookie)
            assert listed.status == 200, describe(listed)
            online = {d["daemon_id"] for d in listed.json()["daemons"] if d["online"]}
            assert online == {"alpha", "beta"}, listed.json()


async def test_event_streams_and_websockets_reach_daemons_on_other_replicas(
    stack: ClusterStack,
) -> None:
    cluster = stack.cluster
    with trio.fail_after(TEST_TIMEOUT), reported(cluster):
        cookie = await sign_in(cluster, stack.team)
        origin = ("Origin", cluster.origin)
        for daemon in (stack.alpha, stack.beta):
            since = len(cluster.access_entries())
            # Three streams one after the other land on the three replicas.
            for round_ in range(3):
                name = f"peer-{daemon.daemon_id}-{round_}"
                async with cluster.open_stream(
                    "GET",
                    f"/d/{daemon.daemon_id}/events/stream",
                    headers=[cookie, ("Accept", "text/event-stream")],
                ) as response:
                    assert response.status == 200
                    events = SseReader(response)
                    created = await http_request(
                        daemon.address, "POST", "/peers", json_body={"name": name}
                    )
                    assert created.status == 201, created.body
                    await wait_peer_joined(events, name)
            await cluster.wait_access_entries(since + 3)
            assert len(upstreams_of(cluster, since, f"/d/{daemon.daemon_id}/events")) == 3

            text = f"over the websocket {secrets.token_hex(4)}"
            async with cluster.open_websocket(
                f"/d/{daemon.daemon_id}/ws", headers=[cookie, origin]
            ) as ws:
                await ws.send_message(
                    json.dumps({"type": "notify", "to": name, "text": text, "from": "ws"})
                )
                result, event = None, None
                with trio.fail_after(5):
                    while result is None or event is None:
                        message = json.loads(await ws.get_message())
                        if message["type"] == "result":
                            result = message
                        elif (
                            message["type"] == "event"
                            and message["event"]["data"].get("text") == text
                        ):
                            event = message["event"]
            assert result["ok"] is True and result["delivered"] is True, result
            assert event["type"] == "message" and event["data"]["to"] == name, event


@pytest.mark.slow
async def test_a_256_mib_download_crosses_replicas(stack: ClusterStack) -> None:
    cluster = stack.cluster
    bulk = stack.bulk
    path = f"/d/{bulk.daemon_id}/big?size={BULK_SIZE}"
    with trio.fail_after(DOWNLOAD_TIMEOUT), reported(cluster):
        expected = expected_digest(BULK_SIZE)
        cookie = await sign_in(cluster, stack.bulk_key)
        held_by = await holder(cluster, bulk.daemon_id)
        for _attempt in range(3):
            await aim_past(cluster, held_by)
            since = len(cluster.access_entries())
            result = await download(cluster, cookie, path)
            assert result.status == 200
            assert result.received == BULK_SIZE, result
            assert result.digest == expected, "the body differs from what the daemon sent"
            (entry,) = (await cluster.wait_access_entries(since + 1))[since:]
            assert entry.status == 200 and entry.body_bytes == BULK_SIZE, entry
            served_by = cluster.replica_by_upstream(entry.upstreams[-1])
            if served_by.index != held_by.index:
                break
        else:
            raise AssertionError("every download landed on the replica holding the daemon")
        rate = BULK_SIZE / result.seconds / 1e6
        print(
            f"256 MiB through nginx, {served_by.replica_id} -> {held_by.replica_id} (holding "
            f"the daemon): {result.seconds:.1f} s, {rate:.0f} MB/s, checksum equal"
        )


async def test_mesh_messages_between_daemons_on_different_replicas(stack: ClusterStack) -> None:
    cluster = stack.cluster
    alpha, beta = stack.alpha, stack.beta
    with trio.fail_after(TEST_TIMEOUT), reported(cluster):
        await spread(stack)
        for daemon, peer in ((alpha, "ann"), (beta, "bob")):
            created = await http_request(daemon.address, "POST", "/peers", json_body={"name": peer})
            assert created.status == 201, created.body
        # Daemon to daemon: each asks its own connector, which asks its replica, which
        # forwards to the other daemon's replica.
        for sender, receiver, to in ((alpha, beta, "bob@beta"), (beta, alpha, "ann@alpha")):
            text = f"from {sender.daemon_id} {secrets.token_hex(4)}"
            with trio.fail_after(5):
                answer = await http_request(
                    sender.address, "POST", "/notify", json_body={"to": to, "text": text}
                )
            assert answer.status == 200, answer.body
            assert answer.json()["delivered"] is True
            held = await http_request(receiver.address, "GET", "/events?after=0&limit=1000")
            delivered = [m for m in messages_of(held.json()["events"]) if m["text"] == text]
            assert delivered == [
                {"from": None, "to": to.split("@")[0], "text": text, "via": sender.daemon_id}
            ], delivered
        # And from a browser through any replica: browser -> alpha -> beta.
        cookie = await sign_in(cluster, stack.team)
        for round_ in range(3):
            text = f"browser relay {round_}"
            with trio.fail_after(5):
                answer = await cluster.request(
                    "POST",
                    "/d/alpha/notify",
                    headers=[cookie, ("Origin", cluster.origin)],
                    json_body={"to": "bob@beta", "text": text},
                )
            assert answer.status == 200, describe(answer)
            assert answer.json()["delivered"] is True


# -- failures -----------------------------------------------------------------------------------


async def test_a_killed_replica_answers_503_at_once_and_its_daemon_comes_back(
    stack: ClusterStack,
) -> None:
    cluster = stack.cluster
    alpha = stack.alpha
    with trio.fail_after(TEST_TIMEOUT), reported(cluster):
        first, _second = await spread(stack)
        cookie = await sign_in(cluster, stack.team)
        # Frozen, alpha cannot come back before the test has asked for it in between.
        alpha.process.signal(signal.SIGSTOP)
        try:
            killed_at = time.monotonic()
            await cluster.kill_replica(first.index)
            for _ in range(3):
                started = time.monotonic()
                answer = await get(cluster, "/d/alpha/health", cookie)
                took = time.monotonic() - started
                assert answer.status == 503, describe(answer)
                assert error_code(answer) == "daemon_offline", describe(answer)
                assert took < AT_ONCE, f"the 503 took {took:.2f} s"
            # A daemon on another replica never noticed.
            other = await get(cluster, "/d/beta/health", cookie)
            assert other.status == 200, describe(other)
        finally:
            alpha.process.signal(signal.SIGCONT)
        resumed = time.monotonic()
        while True:
            answer = await get(cluster, "/d/alpha/health", cookie)
            if answer.status == 200:
                break
            assert answer.status == 503 and error_code(answer) == "daemon_offline", describe(answer)
            assert time.monotonic() - resumed < LINK_BACK_LIMIT, "alpha did not come back"
            await trio.sleep(0.05)
        back = time.monotonic() - resumed
        now_on = await holder(cluster, "alpha")
        print(
            f"replica {first.replica_id} killed: 503 daemon_offline at once; alpha reachable "
            f"again {back:.2f} s after it could retry ({time.monotonic() - killed_at:.2f} s "
            f"after the kill), now on {now_on.replica_id}"
        )
        assert now_on.index != first.index
        assert back < LINK_BACK_LIMIT


@pytest.mark.slow
async def test_a_rolling_restart_keeps_answering(stack: ClusterStack) -> None:
    cluster = stack.cluster
    daemons = stack.daemons[:2]
    outcomes: list[tuple[float, str, str]] = []
    back_after: dict[str, list[float]] = {d.daemon_id: [] for d in daemons}

    async def poll(cookie: tuple[str, str], done: trio.Event) -> None:
        while not done.is_set():
            for daemon in daemons:
                try:
                    answer = await get(cluster, f"/d/{daemon.daemon_id}/health", cookie)
                except trio.TooSlowError:
                    outcomes.append((time.monotonic(), daemon.daemon_id, "no answer within 5 s"))
                    continue
                except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
                    outcomes.append((time.monotonic(), daemon.daemon_id, f"error {exc!r}"))
                    continue
                code = error_code(answer)
                outcomes.append((time.monotonic(), daemon.daemon_id, f"{answer.status} {code}"))
            with trio.move_on_after(POLL_PERIOD):
                await done.wait()

    with trio.fail_after(ROLLING_TIMEOUT), reported(cluster):
        cookie = await sign_in(cluster, stack.team)
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll, cookie, done)
            for replica in cluster.replicas:
                held = [d for d in daemons if (await holder(cluster, d.daemon_id)) is replica]
                stopping = time.time()
                stopped = time.monotonic()
                assert await cluster.stop_replica(replica.index) == 0
                await cluster.start_replica(replica.index)
                # The documented procedure: the next one only once nginx uses this one again.
                await cluster.wait_in_rotation(replica.index)
                for daemon in held:
                    with trio.fail_after(RESTART_BACK_LIMIT):
                        await daemon.wait_connected(since=stopping)
                    back_after[daemon.daemon_id].append(time.monotonic() - stopped)
            await cluster.wait_healthy()
            done.set()
        allowed = {"200 None", "503 daemon_offline"}
        wrong = [o for o in outcomes if o[2] not in allowed]
        offline = sum(1 for o in outcomes if o[2] == "503 daemon_offline")
        print(
            f"rolling restart: {len(outcomes)} polls, {offline} answered 503 daemon_offline, "
            f"{len(wrong)} anything else; back after (s): "
            + ", ".join(f"{k} {[round(x, 2) for x in v]}" for k, v in back_after.items())
        )
        assert not wrong, wrong
        assert all(x < RESTART_BACK_LIMIT for v in back_after.values() for x in v), back_after


@pytest.mark.slow
async def test_a_redis_outage_keeps_sessions_and_refuses_sign_in(stack: ClusterStack) -> None:
    cluster = stack.cluster
    with trio.fail_after(TEST_TIMEOUT + OUTAGE_GRACE), reported(cluster):
        cookie = await sign_in(cluster, stack.team)
        # Every replica confirms the session (and learns where the daemons are) first.
        since = len(cluster.access_entries())
        for _ in range(2):
            for daemon in (stack.alpha, stack.beta):
                for _ in range(3):
                    answer = await get(cluster, f"/d/{daemon.daemon_id}/health", cookie)
                    assert answer.status == 200, describe(answer)
        await cluster.wait_access_entries(since + 12)
        assert len(upstreams_of(cluster, since, "/d/")) == 3

        await cluster.stop_redis()
        stopped = time.monotonic()
        try:
            # Every replica says so on /health (503, so a balancer with health checks would
            # send new sign-ins elsewhere), within a probe or two.
            for replica in cluster.replicas:
                while True:
                    status, health = await cluster.replica_health(replica.index)
                    if status == 503 and health.get("store") == "unavailable":
                        break
                    assert time.monotonic() - stopped < STORE_DOWN_LIMIT, (status, health)
                    await trio.sleep(0.1)
            refused = await post_sign_in(cluster, stack.team)
            assert refused.status == 503, describe(refused)
            assert refused.header("set-cookie") is None
            api = await get(cluster, "/api/v1/daemons", cookie)
            assert api.status in (200, 503), describe(api)
            if api.status == 503:
                assert error_code(api) == "store_unavailable", describe(api)
            # The session keeps working on every replica, for both daemons, for the grace.
            polls = 0
            while time.monotonic() - stopped < OUTAGE_GRACE - GRACE_MARGIN:
                for daemon in (stack.alpha, stack.beta):
                    answer = await get(cluster, f"/d/{daemon.daemon_id}/health", cookie)
                    assert answer.status == 200, (
                        f"{time.monotonic() - stopped:.1f} s into the outage: {describe(answer)}"
                    )
                    polls += 1
                await trio.sleep(0.25)
        finally:
            await cluster.start_redis()
        back = time.monotonic()
        # Redis is back (its presence entries expired meanwhile): sign-in works again without
        # restarting anything, saying 503 until then and never anything else, and the
        # session keeps reaching both daemons through every replica all along.
        signed_in_after: float | None = None
        while time.monotonic() - back < AFTER_OUTAGE_WATCH or signed_in_after is None:
            if signed_in_after is None:
                answer = await post_sign_in(cluster, stack.team)
                if answer.status == 303:
                    signed_in_after = time.monotonic() - back
                else:
                    assert answer.status == 503, (
                        f"{time.monotonic() - back:.1f} s after Redis returned: {describe(answer)}"
                    )
            for daemon in (stack.alpha, stack.beta):
                answer = await get(cluster, f"/d/{daemon.daemon_id}/health", cookie)
                assert answer.status == 200, (
                    f"{time.monotonic() - back:.1f} s after Redis returned: {describe(answer)}"
                )
            assert time.monotonic() - back < STORE_BACK_LIMIT, "sign-in did not come back"
            await trio.sleep(0.1)
        with trio.fail_after(STORE_BACK_LIMIT):
            await cluster.wait_healthy()
        print(
            f"Redis down {back - stopped:.1f} s: {polls} requests with the session answered "
            f"200; sign-in refused with 503, working again {signed_in_after:.2f} s after Redis "
            "returned"
        )


@pytest.mark.parametrize("how", ["rotate through one replica", "keys revoke --redis-url"])
async def test_revoking_a_key_ends_its_access_on_every_replica_within_a_second(
    stack: ClusterStack, how: str
) -> None:
    cluster = stack.cluster
    with trio.fail_after(TEST_TIMEOUT), reported(cluster):
        key = await cluster.create_key("doomed")
        gamma = await cluster.start_daemon(f"gamma-{secrets.token_hex(2)}", key)
        try:
            held_by = await holder(cluster, gamma.daemon_id)
            others = [r for r in cluster.replicas if r.index != held_by.index]
            # A: where the key is rotated; B: where the event stream is open (forwarded to
            # the replica holding the link).
            a, b = others
            cookie = await sign_in(cluster, key)
            stream_path = f"/d/{gamma.daemon_id}/events/stream"
            ended: dict[str, float] = {}

            async with open_http_stream(
                b.address, "GET", stream_path, headers=[cookie, ("Accept", "text/event-stream")]
            ) as response:
                assert response.status == 200
                events = SseReader(response)
                created = await http_request(
                    gamma.address, "POST", "/peers", json_body={"name": "watcher"}
                )
                assert created.status == 201
                await wait_peer_joined(events, "watcher")

                async def stream_end() -> None:
                    # The relay ends the response (or cuts it): either way the stream ended.
                    with contextlib.suppress(
                        h11.ProtocolError, trio.BrokenResourceError, AssertionError
                    ):
                        while await events.next_message() is not None:
                            pass
                    ended["event stream on " + b.replica_id] = time.monotonic()

                async def link_end() -> None:
                    while True:
                        if (await gamma.link())["state"] != "connected":
                            break
                        await trio.sleep(0.02)
                    ended["daemon link on " + held_by.replica_id] = time.monotonic()

                async def sessions_end() -> None:
                    for replica in cluster.replicas:
                        while True:
                            answer = await http_request(
                                replica.address,
                                "GET",
                                f"/d/{gamma.daemon_id}/health",
                                headers=[cookie],
                            )
                            if answer.status == 401:
                                break
                            await trio.sleep(0.02)
                        ended["session on " + replica.replica_id] = time.monotonic()

                if how == "rotate through one replica":
                    with trio.fail_after(5):
                        rotated = await http_request(
                            a.address,
                            "POST",
                            "/api/v1/keys/rotate",
                            headers=[("Authorization", f"Bearer {key.key}")],
                        )
                    assert rotated.status == 200, describe(rotated)
                else:
                    await cluster.revoke_key(key.key_id)
                revoked = time.monotonic()
                with trio.fail_after(REVOKE_LIMIT * 3):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(stream_end)
                        nursery.start_soon(link_end)
                        nursery.start_soon(sessions_end)
            delays = {what: at - revoked for what, at in ended.items()}
            print(
                f"{how} (via {a.replica_id if how.startswith('rotate') else 'Redis'}): "
                + ", ".join(f"{what} ended after {delay:.2f} s" for what, delay in delays.items())
            )
            assert all(delay <= REVOKE_LIMIT for delay in delays.values()), delays
            assert len(delays) == 2 + len(cluster.replicas)
        finally:
            await gamma.stop()
            cluster.daemons.remove(gamma)


@pytest.mark.slow
async def test_a_stale_presence_entry_neither_hides_a_daemon_nor_outlives_its_ttl(
    stack: ClusterStack,
) -> None:
    cluster = stack.cluster
    beta = stack.beta
    with trio.fail_after(TEST_TIMEOUT), reported(cluster):
        cookie = await sign_in(cluster, stack.team)
        entry = entry_of(cluster, beta.daemon_id)
        scope_id = scope_of(entry)
        old_epoch = int(entry.fields["epoch"])
        assert 0 < entry.pttl <= PRESENCE_TTL * 1000, entry
        ttl_ms = int(PRESENCE_TTL * 1000)

        # Beta goes away; an entry from a replica that died long ago claims it, with an
        # epoch older than beta's last link.
        await beta.stop()
        key = write_stale_presence(
            cluster,
            scope_id=scope_id,
            daemon_id=beta.daemon_id,
            replica_id="relay-gone",
            epoch=old_epoch - 1,
            ttl_ms=ttl_ms,
        )
        for _ in range(3):
            started = time.monotonic()
            answer = await get(cluster, "/d/beta/health", cookie)
            assert answer.status == 503 and error_code(answer) == "daemon_offline", describe(answer)
            assert time.monotonic() - started < AT_ONCE + 1.0

        # Beta links again: its new claim wins, from every replica.
        relinked = time.time()
        await beta.start()
        await beta.wait_connected(since=relinked)
        fresh = entry_of(cluster, beta.daemon_id)
        assert int(fresh.fields["epoch"]) > old_epoch, fresh
        assert fresh.fields["replica"] != "relay-gone", fresh
        since = len(cluster.access_entries())
        for _ in range(6):
            answer = await get(cluster, "/d/beta/health", cookie)
            assert answer.status == 200, describe(answer)
        await cluster.wait_access_entries(since + 6)
        assert len(upstreams_of(cluster, since, "/d/beta/")) == 3

        # An entry nobody refreshes (a daemon whose replica died) is gone within its ttl.
        ghost = write_stale_presence(
            cluster,
            scope_id=scope_id,
            daemon_id="ghost",
            replica_id="relay-gone",
            epoch=1,
            ttl_ms=ttl_ms,
        )
        written = time.monotonic()
        while cluster.redis_call("EXISTS", ghost) == 1:
            assert time.monotonic() - written < PRESENCE_TTL + EXPIRY_SLACK, "ghost outlived"
            await trio.sleep(0.1)
        gone_after = time.monotonic() - written
        listed = await get(cluster, "/api/v1/daemons", cookie)
        assert listed.status == 200, describe(listed)
        online = {d["daemon_id"] for d in listed.json()["daemons"] if d["online"]}
        assert "ghost" not in online, listed.json()
        print(
            f"stale entry {key.split(':', 2)[-1]!r} (epoch {old_epoch - 1} < {old_epoch}) "
            f"replaced by beta's new link (epoch {fresh.fields['epoch']}); an unrefreshed "
            f"entry expired after {gone_after:.1f} s (ttl {PRESENCE_TTL:g} s)"
        )


# -- a real browser -------------------------------------------------------------------------------


@pytest.mark.browser
def test_chromium_signs_in_through_nginx_and_sees_both_daemons_live(
    cluster_stack: ClusterStack, browser: Browser
) -> None:
    stack = cluster_stack
    cluster = stack.cluster

    async def healthy() -> None:
        with trio.fail_after(RESTORE_TIMEOUT):
            await restore(stack)

    trio.run(healthy)
    wait = DEFAULT_WAIT * 1000
    # The private CA is the test's own: the page trusts nginx's certificate explicitly.
    context = browser.new_context(ignore_https_errors=True)
    errors: list[str] = []
    try:
        context.set_default_timeout(wait)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{cluster.origin}/")
        page.fill("#api-key", stack.team.key)
        with page.expect_navigation():
            page.click('button[type="submit"]')
        # Whichever replica answered, the dashboard lists both daemons of the key online.
        expect(page).to_have_url(re.compile(rf"{cluster.origin}/(d/(alpha|beta)/)?dashboard/"))
        daemons = page.locator("#daemons-list > li")
        expect(daemons).to_have_count(2)
        for daemon_id in ("alpha", "beta"):
            row = daemons.filter(has_text=daemon_id)
            expect(row).to_have_count(1)
            expect(row.locator(".badge").first).to_have_text("Online")

        # Each daemon's own dashboard, and a live event over its event stream through nginx.
        for daemon in (stack.alpha, stack.beta):
            page.goto(f"{cluster.origin}/d/{daemon.daemon_id}/dashboard/")
            expect(page.locator("#current-daemon")).to_have_text(f"Daemon {daemon.daemon_id}")
            expect(page.locator("#daemon-state")).to_contain_text("Online")
            wait_live(page, Budget(DEFAULT_WAIT))
            text = f"live through the cluster {secrets.token_hex(4)}"
            trio.run(notify, daemon, text)
            expect(page.locator("#events-list")).to_contain_text(text, timeout=5000)
    finally:
        context.close()
    assert not errors, errors


async def notify(daemon: ClusterDaemon, text: str) -> None:
    """A message to peer ``eve`` (registered first) of ``daemon``, posted to the daemon."""
    with trio.fail_after(5):
        await http_request(daemon.address, "POST", "/peers", json_body={"name": "eve"})
        answer = await http_request(
            daemon.address, "POST", "/notify", json_body={"to": "eve", "text": text}
        )
    assert answer.status == 200, answer.body


# -- the deployment files -------------------------------------------------------------------------

CLUSTER_DOCS: Final = DEPLOY_DIR / "cluster"
UNIT: Final = CLUSTER_DOCS / "repowire-relay@.service"
ENV_EXAMPLE: Final = CLUSTER_DOCS / "relay-a.env"
REDIS_SETTINGS: Final = CLUSTER_DOCS / "redis-repowire.conf"
#: The unit's instance the checks use: the first replica of the example.
INSTANCE: Final = "repowire-relay@relay-a"
#: Judge a unit alone: no dependency units, generators or man pages exist in a test root.
VERIFY_OPTIONS: Final = ["--man=no", "--generators=no", "--recursive-errors=no"]


def directives(text: str) -> list[list[str]]:
    """The nginx directives of ``text`` as word lists (comments dropped, no nesting kept);
    a placeholder ``{{NAME}}`` stays one word."""
    words = " ".join(line.split("#", 1)[0] for line in text.splitlines())
    words = re.sub(r"\{\{([A-Z_0-9]+)\}\}", r"<\1>", words)
    out = []
    for statement in re.split(r"[;{}]", words):
        parts = statement.split()
        if parts:
            out.append(parts)
    return out


def test_the_cluster_site_balances_round_robin_without_stickiness() -> None:
    text = CLUSTER_SITE.read_text()
    found = directives(text)
    names = [d[0] for d in found]
    # Round robin is nginx's default: no other balancing method, no stickiness.
    for method in ("ip_hash", "hash", "sticky", "least_conn", "random", "keepalive"):
        assert method not in names, method
    servers = [d for d in found if d[0] == "server" and len(d) > 1]
    assert [d[1] for d in servers] == ["<REPLICA_1>", "<REPLICA_2>", "<REPLICA_3>"]
    for server in servers:
        assert "max_fails=1" in server and any(w.startswith("fail_timeout=") for w in server)
    wanted = [
        ["proxy_pass", "http://repowire_relays"],
        ["proxy_http_version", "1.1"],
        ["proxy_set_header", "Upgrade", "$http_upgrade"],
        ["proxy_set_header", "Connection", "$repowire_cluster_connection"],
        ["proxy_buffering", "off"],
        ["proxy_request_buffering", "off"],
        ["proxy_next_upstream", "error", "timeout"],
        ["proxy_set_header", "X-Forwarded-For", "$proxy_add_x_forwarded_for"],
    ]
    for directive in wanted:
        assert directive in found, directive
    # An answer from a replica (503 daemon_offline, say) is never retried elsewhere.
    (next_upstream,) = [d for d in found if d[0] == "proxy_next_upstream"]
    assert not any(w.startswith(("http_", "non_idempotent")) for w in next_upstream)
    # Every placeholder is one the harness fills in (and the guide lists).
    placeholders = set(re.findall(r"\{\{([A-Z_0-9]+)\}\}", text))
    assert placeholders == {
        "SERVER_NAME",
        "LISTEN",
        "HTTP_LISTEN",
        "CERT",
        "KEY",
        "LOG_DIR",
        "REPLICA_1",
        "REPLICA_2",
        "REPLICA_3",
    }
    guide = (CLUSTER_DOCS / "README.md").read_text()
    for name in placeholders:
        assert "{{" + name + "}}" in guide, name


def env_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def unit_exec_start(instance: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart for ``instance``, with ``%i`` and ``${NAME}`` filled in."""
    (command,) = unit_values(UNIT, "ExecStart")
    command = command.replace("%i", instance)
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], word) for word in shlex.split(command)]


def unit_values(unit: Path, key: str) -> list[str]:
    """The values of ``key=`` in a systemd unit, continuation lines joined."""
    text = unit.read_text().replace("\\\n", " ")
    prefix = f"{key}="
    return [line[len(prefix) :].strip() for line in text.splitlines() if line.startswith(prefix)]


def test_the_replica_unit_runs_a_command_the_cli_accepts() -> None:
    env = env_values(ENV_EXAMPLE)
    argv = unit_exec_start("relay-a", env)
    assert argv[0].endswith("/bin/repowire") and argv[1:3] == ["relay", "start"]
    args = build_parser().parse_args(argv[1:])
    assert args.replica_id == "relay-a"
    assert args.port == int(env["RELAY_PORT"])
    assert args.advertise_url == f"http://{env['RELAY_HOST']}:{env['RELAY_PORT']}"
    assert args.cluster_secret_file is not None
    # The Redis URL (with its password) comes from the environment, never the command line.
    assert "--redis-url" not in argv and args.redis_url is None
    assert env["REPOWIRE_REDIS_URL"].startswith("redis://")
    assert unit_values(UNIT, "EnvironmentFile") == ["/etc/repowire/relay-%i.env"]
    assert unit_values(UNIT, "User") == ["repowire"]
    assert unit_values(UNIT, "KillSignal") == ["SIGTERM"]
    assert unit_values(UNIT, "Restart") == ["on-failure"]
    assert unit_values(UNIT, "ProtectSystem") == ["strict"]
    # The replicas of the example and the site agree: relay-a is the first upstream.
    assert f"{env['RELAY_HOST']}:{env['RELAY_PORT']}" == "127.0.0.1:8001"


@needs("systemd-analyze", shutil.which("systemd-analyze") is not None, "apt-get install systemd")
async def test_the_replica_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    # A root holding the template, its environment file and a stand-in for the entry point,
    # so that verify judges the unit and not this machine's installation.
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    (root / "etc/repowire").mkdir(parents=True)
    shutil.copy(ENV_EXAMPLE, root / "etc/repowire/relay-a.env")
    entry = root / unit_exec_start("relay-a", env_values(ENV_EXAMPLE))[0].lstrip("/")
    entry.parent.mkdir(parents=True)
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    with trio.fail_after(20):
        result = await trio.run_process(
            [
                analyze,
                "verify",
                *VERIFY_OPTIONS,
                f"--root={root}",
                "repowire-relay@relay-a.service",
            ],
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output
    assert output.strip() == "", output


def test_the_redis_settings_ask_for_a_password_and_keep_every_write(tmp_path: Path) -> None:
    binary = redis_server_binary()
    password = secrets.token_hex(16)
    settings = tmp_path / "repowire.conf"
    settings.write_text(render_template(REDIS_SETTINGS.read_text(), {"REDIS_PASSWORD": password}))
    data = tmp_path / "data"
    data.mkdir()
    (port,) = free_ports(1)
    process = subprocess.Popen(
        [binary, str(settings), "--port", str(port), "--dir", str(data), "--daemonize", "no"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                refused = redis_call(port, "PING")
            except RedisReplyError as exc:
                assert "NOAUTH" in str(exc), exc
                break
            except OSError:
                assert process.poll() is None, "redis-server exited with the documented settings"
                assert time.monotonic() < deadline, "redis-server never answered"
                time.sleep(0.02)
                continue
            raise AssertionError(f"PING answered without a password: {refused!r}")
        assert redis_call(port, "PING", password=password) == "PONG"
        for name, value in (
            ("appendonly", b"yes"),
            ("maxmemory-policy", b"noeviction"),
            ("protected-mode", b"yes"),
        ):
            assert redis_call(port, "CONFIG", "GET", name, password=password) == [
                name.encode(),
                value,
            ]
    finally:
        process.kill()
        process.wait(timeout=10)
