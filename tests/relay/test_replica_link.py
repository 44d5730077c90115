"""The replica mesh (relay._replica_link): a stream forwarded to the replica holding a daemon.

Two or three ClusterNodes in one process, each serving ``/ws/replica`` with hypercorn on
127.0.0.1 (port 0), sharing a real redis-server for presence. Each replica's daemon links are
in-memory mux sessions whose daemon end runs a handler per stream.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any

import attrs
import coredis
import pytest
import trio
import trio_websocket
from hypercorn.config import Config
from hypercorn.trio import serve

from mux import MuxSession, MuxStream, StreamResetError, WebSocketTransport, memory_transport_pair
from protocol import PROTOCOL_VERSION, ErrorCode, Role
from relay._presence import Presence
from relay._quota import ScopeCounter
from relay._replica_link import (
    ACCEPTED,
    ANSWER_MARGIN,
    REPLICA_PATH,
    ClusterNode,
    ClusterSettings,
    DaemonOffline,
    ForwardBusy,
    handle_replica_link,
    link_url,
    replica_authorization,
    verify_replica_authorization,
)
from relay._server import refuse_websocket_extensions
from tests.support.proxy import start_proxy
from tests.support.waiting import eventually

pytest_plugins = ("tests.support.redis_fixtures",)

SECRET = b"a cluster secret for the tests, 32+"
SCOPE = "scope_0a"
OTHER_SCOPE = "scope_0b"
#: Bound on each test's network waits.
DEADLINE = 20.0
MIB = 1024 * 1024
#: Settings that keep failure tests short.
QUICK = ClusterSettings(dial_timeout=0.5, open_timeout=0.5, redial_delay=1.0)

DaemonHandler = Callable[[MuxStream], Awaitable[None]]


# ---------------------------------------------------------------------- daemons and replicas


class Daemons:
    """The daemon links one replica holds: for each, an in-memory mux session pair whose
    daemon end serves every stream with a handler. :meth:`open` is the replica's
    ``local_stream_opener``."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._links: dict[tuple[str, str], MuxSession] = {}
        #: The daemon end of each link.
        self.daemon_ends: dict[tuple[str, str], MuxSession] = {}
        #: Every call of :meth:`open`: (scope, daemon, metadata).
        self.opened: list[tuple[str, str, dict[str, str]]] = []
        #: Replaces :meth:`open`'s lookup when set (slow or failing openers).
        self.override: Callable[[str, str], Awaitable[MuxStream | None]] | None = None

    async def connect(self, daemon_id: str, handler: DaemonHandler, scope_id: str = SCOPE) -> None:
        relay_end, daemon_end = memory_transport_pair()
        daemon_session = MuxSession(daemon_end, Role.CONNECTOR)
        self._nursery.start_soon(self._serve, daemon_session, handler)
        relay_session = MuxSession(relay_end, Role.RELAY)
        self._links[(scope_id, daemon_id)] = await self._nursery.start(relay_session.run)
        self.daemon_ends[(scope_id, daemon_id)] = daemon_session

    def open_streams(self, daemon_id: str, scope_id: str = SCOPE) -> int:
        """Streams open on either end of ``daemon_id``'s link."""
        key = (scope_id, daemon_id)
        return self._links[key].protocol.open_streams + self.daemon_ends[key].protocol.open_streams

    async def _serve(self, session: MuxSession, handler: DaemonHandler) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            while True:
                try:
                    stream = await session.accept_stream()
                except trio.BrokenResourceError:
                    return
                nursery.start_soon(handler, stream)

    async def open(
        self, scope_id: str, daemon_id: str, metadata: Mapping[str, str]
    ) -> MuxStream | None:
        self.opened.append((scope_id, daemon_id, dict(metadata)))
        if self.override is not None:
            return await self.override(scope_id, daemon_id)
        session = self._links.get((scope_id, daemon_id))
        if session is None:
            return None
        return await session.open_stream(metadata)


@attrs.define
class Replica:
    name: str
    url: str
    node: ClusterNode
    daemons: Daemons

    async def claim(self, daemon_id: str, scope_id: str = SCOPE) -> int:
        return await self.node.presence.claim(scope_id, daemon_id, self.name, self.url)


def replica_app(nodes: dict[str, ClusterNode], name: str) -> Any:
    """A minimal ASGI app: ``/ws/replica`` for the node called ``name``, nothing else."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket" and scope["path"] == REPLICA_PATH:
            await handle_replica_link(scope, receive, send, cluster=nodes[name])
        elif scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    return app


def server_config() -> Config:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tests.replica")
    config.graceful_timeout = 0.5
    refuse_websocket_extensions(config)
    return config


@asynccontextmanager
async def running_cluster(
    redis_url: str,
    names: tuple[str, ...] = ("a", "b"),
    *,
    settings: Mapping[str, ClusterSettings] | None = None,
    secrets: Mapping[str, bytes] | None = None,
    scope_slots: Mapping[str, Callable[[str], Any]] | None = None,
) -> AsyncIterator[dict[str, Replica]]:
    """Replicas called ``names``, each serving ``/ws/replica`` and running its node."""
    async with (
        coredis.Redis.from_url(redis_url, decode_responses=False) as client,
        trio.open_nursery() as nursery,
    ):
        nodes: dict[str, ClusterNode] = {}
        replicas: dict[str, Replica] = {}
        for name in names:
            binds: list[str] = await nursery.start(
                partial(serve, replica_app(nodes, name), server_config(), mode="asgi")
            )
            daemons = Daemons(nursery)
            node = ClusterNode(
                replica_id=name,
                secret=(secrets or {}).get(name, SECRET),
                advertise_url=binds[0],
                presence=Presence(client),
                local_stream_opener=daemons.open,
                scope_slot=(scope_slots or {}).get(name),
                settings=(settings or {}).get(name),
            )
            nodes[name] = node
            await nursery.start(node.run)
            replicas[name] = Replica(name, binds[0], node, daemons)
        yield replicas
        nursery.cancel_scope.cancel()


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    parts = []
    while data := await stream.receive_some():
        parts.append(data)
    return b"".join(parts)


async def greet_then_read(log: list[bytes], stream: MuxStream) -> None:
    """A daemon that says hello, half-closes, then reads the request to its end."""
    log.append(repr(dict(stream.metadata)).encode())
    await stream.send_all(b"hello from the daemon")
    await stream.send_eof()
    log.append(await read_all(stream))
    await stream.aclose()


async def echo(stream: MuxStream) -> None:
    """A daemon that sends back what it reads, then half-closes."""
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()
    await read_all(stream)


async def hold_open(stream: MuxStream) -> None:
    """A daemon that keeps the stream until the other side ends it."""
    with suppress(trio.BrokenResourceError):
        await read_all(stream)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# ---------------------------------------------------------------------- forwarding


async def test_a_forwarded_stream_reaches_the_daemon_with_both_half_closes(redis_url: str) -> None:
    seen: list[bytes] = []
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", partial(greet_then_read, seen))
            epoch = await a.claim("laptop")
            metadata = {"kind": "http", "from": "browser"}
            stream = await b.node.open_forwarded_stream(SCOPE, "laptop", metadata)
            # The daemon's bytes come first, then its half-close, while B may still send.
            assert await read_all(stream) == b"hello from the daemon"
            await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
            await stream.send_eof()
            await eventually(lambda: len(seen) == 2, what="the daemon reading the request")
            await stream.aclose()
    assert seen == [repr(metadata).encode(), b"GET / HTTP/1.1\r\n\r\n"]
    assert a.daemons.opened == [(SCOPE, "laptop", metadata)]
    assert b.node.stats.forwarded_out == 1 and a.node.stats.forwarded_in == 1
    assert b.node.stats.dials == 1 and epoch >= 1


async def test_a_daemon_that_reads_first_gets_the_request_then_answers(redis_url: str) -> None:
    async def answer(stream: MuxStream) -> None:
        request = await read_all(stream)
        await stream.send_all(b"got " + str(len(request)).encode())
        await stream.send_eof()

    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", answer)
            await a.claim("laptop")
            stream = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "mesh"})
            await stream.send_all(b"x" * 100_000)
            await stream.send_eof()
            assert await read_all(stream) == b"got 100000"
            # Forwards reuse the one link.
            again = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "mesh"})
            await again.send_eof()
            assert await read_all(again) == b"got 0"
            assert b.node.stats.dials == 1


async def test_8_mib_each_way_with_end_to_end_flow_control(redis_url: str) -> None:
    payload = bytes(range(256)) * (8 * MIB // 256)
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", echo)
            await a.claim("laptop")
            stream = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            received = hashlib.sha256()
            size = 0
            started = time.perf_counter()

            async def upload() -> None:
                for offset in range(0, len(payload), 256 * 1024):
                    await stream.send_all(payload[offset : offset + 256 * 1024])
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                while data := await stream.receive_some():
                    received.update(data)
                    size += len(data)
            elapsed = time.perf_counter() - started
    assert size == len(payload)
    assert received.digest() == hashlib.sha256(payload).digest()
    rate = 2 * len(payload) / elapsed / 1e6
    print(f"\nforwarded 8 MiB each way (echo) in {elapsed:.2f} s: {rate:.0f} MB/s in total")


async def test_a_reader_that_stops_holds_back_the_daemon_not_the_replicas(
    redis_url: str,
) -> None:
    total = 8 * MIB
    chunk = 16 * 1024
    sent = [0]

    async def flood(stream: MuxStream) -> None:
        block = b"z" * chunk
        while sent[0] < total:
            await stream.send_all(block)
            sent[0] += chunk
        await stream.send_eof()

    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", flood)
            await a.claim("laptop")
            stream = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            # Nobody reads on B: the daemon must stall once the windows along the path are
            # full (its stream on A, the splice's chunk, the forwarded stream on B).
            last = -1
            while sent[0] != last:
                last = sent[0]
                await trio.sleep(0.2)
            assert 0 < sent[0] <= 1 * MIB, f"{sent[0]} bytes went out with nobody reading"
            data = await read_all(stream)
    assert len(data) == total


async def test_a_reset_travels_both_ways_with_its_code(redis_url: str) -> None:
    outcome: list[object] = []
    reading = trio.Event()

    async def record(stream: MuxStream) -> None:
        outcome.append(await stream.receive_some())
        reading.set()
        try:
            await read_all(stream)
            outcome.append("end of file")
        except StreamResetError as reset:
            outcome.append(reset.code)

    async def fail(stream: MuxStream) -> None:
        await stream.receive_some()
        stream.reset(ErrorCode.UPSTREAM_FAILED)

    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", record)
            await a.daemons.connect("desktop", fail)
            await a.claim("laptop")
            await a.claim("desktop")
            # The browser's side goes away mid-request: the daemon learns it as a reset, not
            # as an orderly end of the request.
            stream = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            await stream.send_all(b"partial request")
            await reading.wait()
            stream.reset(ErrorCode.CANCEL)
            await eventually(lambda: len(outcome) == 2, what="the daemon seeing the reset")
            assert outcome == [b"partial request", ErrorCode.CANCEL]
            # The daemon fails: B's reader learns it, with the daemon's code.
            stream = await b.node.open_forwarded_stream(SCOPE, "desktop", {"kind": "http"})
            await stream.send_all(b"request")
            with pytest.raises(StreamResetError) as reset:
                await read_all(stream)
            assert reset.value.code == ErrorCode.UPSTREAM_FAILED
            await eventually(lambda: a.node.stats.open_in == 0, what="the splices ending")
            assert a.daemons.open_streams("laptop") == a.daemons.open_streams("desktop") == 0


async def test_a_daemon_that_moved_is_found_on_its_new_replica(redis_url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url, ("a", "b", "c")) as replicas:
            a, b, c = replicas["a"], replicas["b"], replicas["c"]
            await c.daemons.connect("laptop", echo)
            await a.claim("laptop")

            async def moved(scope_id: str, daemon_id: str) -> MuxStream | None:
                # A's link has just gone; the daemon is reconnecting on C.
                await c.claim(daemon_id, scope_id)
                return None

            a.daemons.override = moved
            stream = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            await stream.send_all(b"ping")
            await stream.send_eof()
            assert await read_all(stream) == b"ping"
    assert len(a.daemons.opened) == 1 and len(c.daemons.opened) == 1


# ---------------------------------------------------------------------- offline answers


async def test_no_presence_is_daemon_offline_at_once(redis_url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            b = replicas["b"]
            with trio.fail_after(0.5), pytest.raises(DaemonOffline, match="not connected"):
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            # Presence naming this very replica (its link just ended here) is offline too.
            await b.claim("laptop")
            with trio.fail_after(0.5), pytest.raises(DaemonOffline, match="just disconnected"):
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            assert b.node.stats.dials == 0


async def test_a_replica_that_no_longer_holds_the_daemon_says_offline(redis_url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.claim("laptop")  # a stale entry: A holds no link for it
            with trio.fail_after(2), pytest.raises(DaemonOffline, match="no longer holds"):
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            assert [daemon for _, daemon, _ in a.daemons.opened] == ["laptop"]


async def test_presence_naming_a_dead_replica_is_offline_within_the_dial_timeout(
    redis_url: str,
) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url, settings={"b": QUICK}) as replicas:
            a, b = replicas["a"], replicas["b"]
            presence = b.node.presence
            # Nothing listens where the entry points: refused at once.
            url = f"http://127.0.0.1:{closed_port()}"
            await presence.claim(SCOPE, "laptop", "gone", url)
            with trio.fail_after(QUICK.dial_timeout), pytest.raises(DaemonOffline, match="gone"):
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            # An address no replica could be dialed at is not dialed at all.
            await presence.claim(SCOPE, "attic", "odd", "http://user:pw@127.0.0.1:1")
            with trio.fail_after(0.5), pytest.raises(DaemonOffline, match="not usable"):
                await b.node.open_forwarded_stream(SCOPE, "attic", {"kind": "http"})

            # A host that takes the connection and never answers: the dial timeout ends it.
            async with trio.open_nursery() as nursery:
                proxy = await start_proxy(nursery, ("127.0.0.1", int(a.url.rsplit(":", 1)[1])))
                proxy.blackhole()
                await presence.claim(SCOPE, "desktop", "silent", f"http://127.0.0.1:{proxy.port}")
                began = trio.current_time()
                with pytest.raises(DaemonOffline, match="silent"):
                    await b.node.open_forwarded_stream(SCOPE, "desktop", {"kind": "http"})
                waited = trio.current_time() - began
                assert QUICK.dial_timeout * 0.9 <= waited <= QUICK.dial_timeout + 0.5
                # Right after a failed dial, requests fail at once, without another dial.
                dials = b.node.stats.dials
                with trio.fail_after(0.2), pytest.raises(DaemonOffline, match="silent"):
                    await b.node.open_forwarded_stream(SCOPE, "desktop", {"kind": "http"})
                assert b.node.stats.dials == dials
                assert proxy.accepted == 1
                nursery.cancel_scope.cancel()


async def test_the_peer_link_is_dialed_again_after_it_drops(redis_url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", echo)
            async with trio.open_nursery() as nursery:
                proxy = await start_proxy(nursery, ("127.0.0.1", int(a.url.rsplit(":", 1)[1])))
                await b.node.presence.claim(SCOPE, "laptop", "a", f"http://127.0.0.1:{proxy.port}")
                for round_trip in (b"first", b"second"):
                    stream = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
                    await stream.send_all(round_trip)
                    await stream.send_eof()
                    assert await read_all(stream) == round_trip
                    proxy.kill_connections()
                assert proxy.accepted == 2
                assert b.node.stats.dials == 2
                nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- bounds


async def test_a_peer_link_carries_at_most_its_stream_limit(redis_url: str) -> None:
    limit = ClusterSettings(max_streams_per_peer_link=2, open_timeout=0.5)
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url, settings={"a": limit, "b": limit}) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", hold_open)
            await a.claim("laptop")
            first = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            began = trio.current_time()
            with pytest.raises(ForwardBusy, match="did not connect"):
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            # It waited for a slot for as long as a forward may take, then gave up.
            assert trio.current_time() - began >= limit.open_timeout + ANSWER_MARGIN - 0.05
            # A slot frees: the next forward goes through.
            await first.aclose()
            third = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            await third.aclose()
            assert len(a.daemons.opened) == 3


async def test_a_scope_holds_at_most_its_share_of_forwarded_streams(redis_url: str) -> None:
    share = ClusterSettings(max_forwarded_streams_per_scope=1)
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url, settings={"a": share}) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", hold_open)
            await a.daemons.connect("laptop", hold_open, scope_id=OTHER_SCOPE)
            await a.claim("laptop")
            await a.claim("laptop", OTHER_SCOPE)
            held = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            with trio.fail_after(1), pytest.raises(ForwardBusy, match="busy"):
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            # Another scope is not affected.
            other = await b.node.open_forwarded_stream(OTHER_SCOPE, "laptop", {"kind": "http"})
            await held.aclose()
            await eventually(lambda: a.node.stats.open_in == 1, what="the slot given back")
            again = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            for stream in (other, again):
                await stream.aclose()


async def test_the_relays_scope_quota_is_used_when_given(redis_url: str) -> None:
    quota = ScopeCounter("open streams", 1)
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url, scope_slots={"a": quota.hold}) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", hold_open)
            await a.claim("laptop")
            held = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            assert quota.held(SCOPE) == 1
            with pytest.raises(ForwardBusy):
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            await held.aclose()
            await eventually(lambda: quota.held(SCOPE) == 0, what="the quota given back")


async def test_a_daemon_stream_not_opened_in_time_is_refused_as_busy(redis_url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url, settings={"a": QUICK}) as replicas:
            a, b = replicas["a"], replicas["b"]

            async def never(scope_id: str, daemon_id: str) -> MuxStream | None:
                await trio.sleep_forever()
                raise AssertionError("unreachable")

            a.daemons.override = never
            await a.claim("laptop")
            began = trio.current_time()
            with pytest.raises(ForwardBusy, match="busy"):
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            waited = trio.current_time() - began
            assert QUICK.open_timeout <= waited < QUICK.open_timeout + 1


async def test_a_failing_opener_ends_only_that_forward(redis_url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", echo)
            await a.claim("laptop")
            await a.claim("broken")

            async def opener(scope_id: str, daemon_id: str) -> MuxStream | None:
                if daemon_id == "broken":
                    raise RuntimeError("the relay's opener failed")
                return await a.daemons._links[(scope_id, daemon_id)].open_stream({})

            a.daemons.override = opener
            with pytest.raises(DaemonOffline, match="UPSTREAM_FAILED"):
                await b.node.open_forwarded_stream(SCOPE, "broken", {"kind": "http"})
            stream = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            await stream.send_eof()
            assert await read_all(stream) == b""


async def test_a_cancelled_forward_leaves_nothing_open(redis_url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", hold_open)
            await a.claim("laptop")
            entered = trio.Event()
            release = trio.Event()

            async def slow(scope_id: str, daemon_id: str) -> MuxStream | None:
                entered.set()
                await release.wait()
                return await a.daemons._links[(scope_id, daemon_id)].open_stream({})

            a.daemons.override = slow

            async def forward() -> None:
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
                raise AssertionError("the forward was answered")

            # B gives up (its browser left) while A is still opening the daemon's stream.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward)
                await entered.wait()
                nursery.cancel_scope.cancel()
            release.set()
            # Whether A connected the stream before B's reset arrived or not (and whether the
            # daemon took it before A's reset), nothing is left open at either end.
            await eventually(
                lambda: a.node.stats.open_in == 0 and a.daemons.open_streams("laptop") == 0,
                what="nothing left open",
            )
            assert len(a.daemons.opened) == 1


async def test_a_draining_replica_refuses_new_links(redis_url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", echo)
            await a.claim("laptop")
            stream = await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            await stream.send_eof()
            assert await read_all(stream) == b""
            await a.node.drain(1.0)
            with pytest.raises(DaemonOffline, match="HTTP 503"):
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})


# ---------------------------------------------------------------------- authentication


def test_credentials_verify_only_with_the_secret_and_a_fresh_time() -> None:
    now = 1_700_000_000.0
    good = replica_authorization("relay-1.eu", SECRET, now=now)
    assert good.startswith("Replica relay-1.eu.1700000000.")

    def check(value: bytes | str | None, at: float = now) -> str | None:
        return verify_replica_authorization(value, SECRET, now=at, max_skew=60)

    assert check(good) == "relay-1.eu"
    assert check(good.encode()) == "relay-1.eu"
    assert check(good, now + 60) == "relay-1.eu"
    assert check(good, now - 60) == "relay-1.eu"
    assert check(good, now + 61) is None  # stale
    assert check(good, now - 61) is None  # from the future
    assert (
        check(replica_authorization("relay-1.eu", b"another secret of 32 bytes....", now=now))
        is None
    )
    assert check(good.replace("relay-1.eu", "relay-2.eu")) is None  # the id is signed
    assert check(good.replace(".1700000000.", ".1700000001.")) is None  # so is the time
    assert check(good[:-1] + ("0" if good[-1] != "0" else "1")) is None
    assert check(good.upper().replace("REPLICA RELAY-1.EU", "Replica relay-1.eu")) is None
    assert check("Bearer rw_" + "A" * 43) is None
    for malformed in ("", "Replica", "Replica x", "Replica a.b", "Replica .1.ab", None, b"\xff"):
        assert check(malformed) is None
    assert check(good + " " * 300) is None  # longer than any real header


@asynccontextmanager
async def raw_link(
    url: str, headers: list[tuple[bytes, bytes]]
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A WebSocket to a replica's endpoint, on a socket this helper closes (trio-websocket's
    own client leaves it open when the upgrade is refused)."""
    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        connection = await trio_websocket.wrap_client_stream(
            nursery, stream, f"127.0.0.1:{port}", REPLICA_PATH, extra_headers=headers
        )
        yield connection
        await connection.aclose()
        nursery.cancel_scope.cancel()


async def upgrade_status(url: str, headers: list[tuple[bytes, bytes]]) -> int | None:
    """The HTTP status a replica endpoint refuses the upgrade with, or None if accepted."""
    status: int | None = None
    try:
        async with raw_link(url, headers):
            pass
    except* trio_websocket.ConnectionRejected as group:
        rejected = group.exceptions[0]
        assert isinstance(rejected, trio_websocket.ConnectionRejected)
        status = rejected.status_code
    return status


async def test_the_endpoint_refuses_anything_but_fresh_cluster_credentials(
    redis_url: str,
) -> None:
    version = (b"repowire-protocol", str(PROTOCOL_VERSION).encode())
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url, ("a",)) as replicas:
            a = replicas["a"]
            now = time.time()

            def auth(value: str) -> list[tuple[bytes, bytes]]:
                return [(b"authorization", value.encode()), version]

            wrong_secret = replica_authorization("b", b"not the cluster secret at all!!", now=now)
            stale = replica_authorization("b", SECRET, now=now - 120)
            user_key = "Bearer rw_" + "k" * 43
            for headers in ([version], auth(wrong_secret), auth(stale), auth(user_key)):
                assert await upgrade_status(a.url, headers) == 401
            fresh = replica_authorization("b", SECRET, now=now)
            assert await upgrade_status(a.url, auth(fresh)[:1]) == 426  # no protocol version
            assert await upgrade_status(a.url, auth(fresh)) is None


async def test_replicas_with_different_secrets_cannot_forward(redis_url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(
            redis_url, secrets={"b": b"b was given another secret......"}
        ) as replicas:
            a, b = replicas["a"], replicas["b"]
            await a.daemons.connect("laptop", echo)
            await a.claim("laptop")
            with pytest.raises(DaemonOffline, match="HTTP 401"):
                await b.node.open_forwarded_stream(SCOPE, "laptop", {"kind": "http"})
            assert a.daemons.opened == []


async def test_a_link_peer_may_open_forwards_only(redis_url: str) -> None:
    with trio.fail_after(DEADLINE):
        async with running_cluster(redis_url, ("a",)) as replicas:
            a = replicas["a"]
            await a.daemons.connect("laptop", echo)
            headers = [
                (b"authorization", replica_authorization("b", SECRET, now=time.time()).encode()),
                (b"repowire-protocol", str(PROTOCOL_VERSION).encode()),
            ]
            async with raw_link(a.url, headers) as connection, trio.open_nursery() as nursery:
                session = MuxSession(WebSocketTransport(connection), Role.CONNECTOR)
                await nursery.start(session.run)
                for metadata in (
                    {"kind": "http", "from": "browser"},
                    {"kind": "forward", "scope": "a:b", "daemon": "laptop"},
                    {"kind": "forward", "scope": SCOPE, "daemon": "bad id"},
                ):
                    stream = await session.open_stream(metadata)
                    with pytest.raises(StreamResetError) as reset:
                        await stream.receive_some()
                    assert reset.value.code == ErrorCode.FORBIDDEN
                # A well-formed forward is answered: the accepted byte, then the daemon.
                stream = await session.open_stream(
                    {"kind": "forward", "scope": SCOPE, "daemon": "laptop", "epoch": "1"}
                )
                await stream.send_all(b"hi")
                await stream.send_eof()
                assert await read_all(stream) == ACCEPTED + b"hi"
                await session.aclose()
                nursery.cancel_scope.cancel()


def test_settings_and_arguments_are_checked() -> None:
    async def opener(scope_id: str, daemon_id: str, metadata: Mapping[str, str]) -> None:
        return None

    presence: Any = object()
    common: dict[str, Any] = {
        "presence": presence,
        "local_stream_opener": opener,
        "advertise_url": "http://10.0.0.1:8000",
    }
    with pytest.raises(ValueError, match="secret"):
        ClusterNode(replica_id="a", secret=b"short", **common)
    with pytest.raises(ValueError, match="replica id"):
        ClusterNode(replica_id="a b", secret=SECRET, **common)
    with pytest.raises(ValueError, match="advertised URL"):
        ClusterNode(
            replica_id="a",
            secret=SECRET,
            presence=presence,
            local_stream_opener=opener,
            advertise_url="ftp://10.0.0.1",
        )
    with pytest.raises(ValueError, match="dial_timeout"):
        ClusterSettings(dial_timeout=0)
    with pytest.raises(ValueError, match="max_streams_per_peer_link"):
        ClusterSettings(max_streams_per_peer_link=0)
    node = ClusterNode(replica_id="a", secret=SECRET, **common)
    assert "secret" not in repr(node) and SECRET.decode() not in repr(node)
    assert link_url("http://10.0.0.1:8000") == "ws://10.0.0.1:8000/ws/replica"
    assert link_url("https://relay-1.internal/base/") == "wss://relay-1.internal/base/ws/replica"
    assert link_url("ws://[::1]:9000") == "ws://[::1]:9000/ws/replica"
    for bad in ("http://user:pw@host", "http:///path", "http://host?x=1", "http://host:99999"):
        with pytest.raises(ValueError):
            link_url(bad)
