"""What the cluster tests share: the module's stack and what a browser does through nginx.

- :class:`ClusterStack` and :func:`start_stack`: a :class:`tests.support.cluster.RelayCluster`
  with two ``repowire serve --relay`` daemons of one key (``alpha`` and ``beta``) on different
  replicas, and the scripted daemon ``bulk`` (its own key) for large bodies.
  :func:`restore` brings a stack back to healthy after a test broke something.
- :func:`sign_in`: the relay's sign-in form through nginx; the session cookie.
- :func:`holder`: the replica that holds a daemon's link, from the presence entry in Redis,
  checked against that replica's own count of links.
- :func:`download`: a large body streamed through nginx, counted and hashed.
- :func:`write_stale_presence`: a presence entry written by hand (the layout of
  :mod:`relay._presence`), for the stale-entry test.

Secrets: keys and cookies stay in memory; nothing here prints them.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from typing import Any, Final

import attrs
import trio

from tests.support.clients import HttpResponse, SseReader
from tests.support.cluster import (
    ClusterDaemon,
    ClusterKey,
    FaultDaemonProcess,
    PresenceRecord,
    RelayCluster,
    Replica,
)
from tests.support.fault_daemon import BODY_CHUNK, pattern
from tests.support.processes import free_port
from tests.support.sessions import cookie_from, form_body

#: Seconds for the whole stack to start (certificates, Redis, replicas, nginx, daemons).
STACK_START_TIMEOUT: Final = 90.0
#: Daemon restarts tried to put ``beta`` on another replica than ``alpha``.
SPREAD_ATTEMPTS: Final = 8
#: Seconds one request of a test may take: an answer, never a hang.
REQUEST_TIMEOUT: Final = 5.0
#: Seconds :func:`holder` waits for presence and link counts to agree.
HOLDER_TIMEOUT: Final = 10.0
#: The presence layout of relay/_presence.py: the hash of one daemon's entry and the index
#: of a scope's daemons (a sorted set by expiry, ms on the Redis clock).
PRESENCE_ENTRY: Final = "repowire:presence:{scope}:{daemon}"
PRESENCE_INDEX: Final = "repowire:presence-scope:{scope}"


@attrs.define(kw_only=True)
class ClusterStack:
    """The module's cluster: ``alpha`` and ``beta`` (``repowire serve``, key ``team``) and
    ``bulk`` (the scripted daemon, key ``bulk_key``)."""

    cluster: RelayCluster
    team: ClusterKey
    bulk_key: ClusterKey
    alpha: ClusterDaemon
    beta: ClusterDaemon
    bulk: FaultDaemonProcess

    @property
    def daemons(self) -> list[ClusterDaemon]:
        return [self.alpha, self.beta, self.bulk]


async def start_stack(cluster: RelayCluster) -> ClusterStack:
    """Start ``cluster`` and its daemons; ``beta`` is restarted until its link is on another
    replica than ``alpha``'s (at most :data:`SPREAD_ATTEMPTS` times)."""
    with trio.fail_after(STACK_START_TIMEOUT):
        await cluster.start()
        team = await cluster.create_key("team")
        bulk_key = await cluster.create_key("bulk")
        alpha = await cluster.start_daemon("alpha", team)
        beta = await cluster.start_daemon("beta", team)
        bulk = await cluster.start_fault_daemon("bulk", bulk_key)
        stack = ClusterStack(
            cluster=cluster, team=team, bulk_key=bulk_key, alpha=alpha, beta=beta, bulk=bulk
        )
        await spread(stack)
        return stack


async def spread(stack: ClusterStack) -> tuple[Replica, Replica]:
    """Make sure ``alpha`` and ``beta`` are linked to different replicas (restarting ``beta``
    until they are); their holders."""
    cluster = stack.cluster
    for _attempt in range(SPREAD_ATTEMPTS):
        first = await holder(cluster, stack.alpha.daemon_id)
        second = await holder(cluster, stack.beta.daemon_id)
        if first.index != second.index:
            return first, second
        await stack.beta.restart()
    raise AssertionError(f"beta stayed on alpha's replica after {SPREAD_ATTEMPTS} restarts")


async def restore(stack: ClusterStack) -> None:
    """Bring the stack back to healthy: Redis and every replica running and answering
    ``/health``, every daemon running and linked. Raises AssertionError if it cannot."""
    cluster = stack.cluster
    if not cluster.redis.running:
        await cluster.start_redis()
    for replica in cluster.replicas:
        if not replica.running:
            await cluster.start_replica(replica.index)
    await cluster.wait_healthy()
    # A replica nginx saw fail (stopped or killed by the test before) stays out of the
    # rotation until nginx tries it again.
    await cluster.wait_in_rotation()
    for daemon in stack.daemons:
        if not daemon.process.running:
            await daemon.start()
        await daemon.wait_connected()


# -- what a browser does ----------------------------------------------------------------------


async def post_sign_in(cluster: RelayCluster, key: ClusterKey) -> HttpResponse:
    """Post ``key`` to the sign-in form through nginx as the relay's own page does; the
    answer, whatever it is, within :data:`REQUEST_TIMEOUT`."""
    with trio.fail_after(REQUEST_TIMEOUT):
        return await cluster.request(
            "POST",
            "/auth",
            headers=[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", cluster.origin),
            ],
            body=form_body(api_key=key.key),
        )


async def sign_in(cluster: RelayCluster, key: ClusterKey) -> tuple[str, str]:
    """:func:`post_sign_in`; the ``("Cookie", ...)`` header of the new session. Fails unless
    the answer is 303."""
    answer = await post_sign_in(cluster, key)
    assert answer.status == 303, (answer.status, answer.body[:300])
    return cookie_from(answer)


async def get(cluster: RelayCluster, path: str, cookie: tuple[str, str]) -> HttpResponse:
    """``GET path`` through nginx with the session cookie, answered within
    :data:`REQUEST_TIMEOUT` (trio.TooSlowError otherwise: a hang is a failure)."""
    with trio.fail_after(REQUEST_TIMEOUT):
        return await cluster.request("GET", path, headers=[cookie])


def error_code(response: HttpResponse) -> str | None:
    """The ``error`` of a JSON error answer, or None."""
    try:
        document = response.json()
    except ValueError:
        return None
    return document.get("error") if isinstance(document, dict) else None


def describe(response: HttpResponse) -> str:
    """A response for a failure message: its status and its JSON, or the text of its page
    (tags dropped) for an HTML answer."""
    body = response.body.decode(errors="replace")
    if "<html" in body[:200].lower():
        body = re.sub(r"\s+", " ", re.sub(r"<[^>]*>", " ", body.split("<body", 1)[-1])).strip()
    return f"{response.status} {body[:300]!r}"


async def wait_peer_joined(events: SseReader, name: str) -> Any:
    """The next ``peer_joined`` event for peer ``name`` on a daemon's event stream (earlier
    events the stream may replay are skipped), within :data:`REQUEST_TIMEOUT`."""
    with trio.fail_after(REQUEST_TIMEOUT):
        while True:
            event = await events.next_event()
            if event.event == "peer_joined" and event.json()["data"]["name"] == name:
                return event.json()


# -- where the links are ----------------------------------------------------------------------


async def holder(cluster: RelayCluster, daemon_id: str) -> Replica:
    """The replica holding ``daemon_id``'s link: the one its presence entry names, once that
    replica is running and counts at least one link of its own. Raises AssertionError after
    :data:`HOLDER_TIMEOUT` seconds."""
    deadline = trio.current_time() + HOLDER_TIMEOUT
    seen = ""
    while True:
        named = cluster.holder_from_presence(daemon_id)
        counts = await cluster.link_counts()
        from_logs = cluster.holder_from_logs(daemon_id)
        seen = (
            f"presence names {named and named.replica_id}, the logs "
            f"{from_logs and from_logs.replica_id}; links per replica {counts}; "
            f"entries {cluster.presence_of(daemon_id)}"
        )
        if named is not None and named.running and (counts[named.index] or 0) >= 1:
            return named
        if trio.current_time() > deadline:
            raise AssertionError(f"no replica holds {daemon_id}'s link: {seen}")
        await trio.sleep(0.05)


def entry_of(cluster: RelayCluster, daemon_id: str) -> PresenceRecord:
    """The presence entry (the hash) of ``daemon_id``; exactly one must exist."""
    entries = [e for e in cluster.presence_of(daemon_id) if e.kind == "hash"]
    assert len(entries) == 1, entries
    return entries[0]


def scope_of(entry: PresenceRecord) -> str:
    """The scope id in a presence entry's key (``repowire:presence:<scope>:<daemon>``)."""
    parts = entry.key.split(":")
    assert len(parts) == 4 and parts[1] == "presence", entry.key
    return parts[2]


def write_stale_presence(
    cluster: RelayCluster,
    *,
    scope_id: str,
    daemon_id: str,
    replica_id: str,
    epoch: int,
    ttl_ms: int,
) -> str:
    """Write a presence entry by hand: ``daemon_id`` held by ``replica_id`` (advertised at a
    loopback port nobody listens on) with ``epoch``, living ``ttl_ms``, and listed in its
    scope's index as a relay would list it. Returns the entry's key."""
    key = PRESENCE_ENTRY.format(scope=scope_id, daemon=daemon_id)
    dead_url = f"http://127.0.0.1:{free_port()}"
    cluster.redis_call(
        "HSET",
        key,
        "replica",
        replica_id,
        "epoch",
        str(epoch),
        "url",
        dead_url,
        "since",
        repr(time.time() - 60.0),
    )
    cluster.redis_call("PEXPIRE", key, str(ttl_ms))
    seconds, micros = (int(x) for x in _words(cluster.redis_call("TIME")))
    now_ms = seconds * 1000 + micros // 1000
    index = PRESENCE_INDEX.format(scope=scope_id)
    cluster.redis_call("ZADD", index, str(now_ms + ttl_ms), daemon_id)
    return key


def _words(reply: object) -> list[str]:
    assert isinstance(reply, list), reply
    return [item.decode() if isinstance(item, bytes) else str(item) for item in reply]


# -- large bodies -----------------------------------------------------------------------------

#: Hashes of the scripted daemon's large body, by size (it is the same bytes every time).
_EXPECTED_DIGESTS: dict[int, str] = {}


def expected_digest(size: int) -> str:
    """SHA-256 of the first ``size`` bytes of :func:`tests.support.fault_daemon.pattern`."""
    if size not in _EXPECTED_DIGESTS:
        digest = hashlib.sha256()
        step = BODY_CHUNK * 16
        for offset in range(0, size, step):
            digest.update(pattern(offset, min(step, size - offset)))
        _EXPECTED_DIGESTS[size] = digest.hexdigest()
    return _EXPECTED_DIGESTS[size]


@attrs.frozen(kw_only=True)
class Download:
    status: int
    received: int
    digest: str
    seconds: float


async def download(cluster: RelayCluster, cookie: tuple[str, str], path: str) -> Download:
    """``GET path`` through nginx on a connection of its own, the body streamed (never held
    whole), counted and hashed. The caller bounds the time."""
    connection = await cluster.connect(cookie=cookie[1])
    async with connection:
        started = time.monotonic()
        await connection.send_request("GET", path)
        head = await connection.read_head()
        digest = hashlib.sha256()
        received = 0
        while piece := await connection.receive_body(1024 * 1024):
            digest.update(piece)
            received += len(piece)
        return Download(
            status=head.status,
            received=received,
            digest=digest.hexdigest(),
            seconds=time.monotonic() - started,
        )


async def aim_past(cluster: RelayCluster, avoid: Replica, tries: int = 6) -> None:
    """Send ``GET /health`` through nginx until one lands on ``avoid``: nginx's round robin
    then sends the next request to another replica (unless something else is sent between)."""
    for _ in range(tries):
        count = len(cluster.access_entries())
        with trio.fail_after(REQUEST_TIMEOUT):
            answer = await cluster.request("GET", "/health")
        assert answer.status == 200, describe(answer)
        entries = (await cluster.wait_access_entries(count + 1))[count:]
        if entries[-1].upstreams[-1:] == (avoid.upstream,):
            return
    raise AssertionError(f"no request landed on {avoid.replica_id} in {tries} tries")


def upstreams_of(cluster: RelayCluster, since: int, path_prefix: str) -> set[str]:
    """The replicas that answered the logged requests (from entry ``since`` on) whose path
    starts with ``path_prefix``."""
    return {
        entry.upstreams[-1]
        for entry in cluster.access_entries()[since:]
        if entry.path.startswith(path_prefix) and entry.upstreams
    }


def messages_of(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``data`` of every ``message`` event in a daemon's ``/events`` answer."""
    return [event["data"] for event in events if event.get("type") == "message"]
