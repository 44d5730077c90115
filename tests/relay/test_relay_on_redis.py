"""A relay on Redis (``--redis-url``): the same service as on SQLite, shared by replicas, and
riding out a Redis outage.

Real relays in-process (``tests.support.relays``) on a real redis-server
(``tests.support.redis_fixtures``): registration, sign-in and the tunnel; a revocation made
through another store object (another replica, the CLI) ending a live link and a tunneled
request within a second; Redis stopped (held links and sessions keep serving, everything
that needs Redis answers 503 at once, ``/health`` says so) and started again (the relay
recovers on its own); and two relays on one Redis sharing sign-in links, sessions, sign-outs
and rate limits.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio

from mux import MuxStream
from protocol import CloseCode
from relay import KeyRecord, Relay
from relay._redis_store import RedisStore
from tests.support.clients import HttpResponse, http_request, open_http_stream
from tests.support.links import link_headers, link_refusal
from tests.support.redis_server import RedisServerFactory, tolerates_failed_connections
from tests.support.relays import RunningStack, running_relay
from tests.support.scripted import ScriptedHttp
from tests.support.stand_in import StandIn, identity_handler, start_stand_in

pytest_plugins = ("tests.support.redis_fixtures",)

#: What the brief promises: access ends this soon after a revocation or a sign-out.
PROMPT = 1.0
#: Hard stop for one test, relays' start and teardown included.
TEST_LIMIT = 60
#: Bound on one request or wait on the network.
IO_DEADLINE = 10.0


class ShiftedClock:
    """The relay's clock, moved forward on demand (a session's age, without waiting)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@asynccontextmanager
async def redis_relay(data_dir: Path, redis_url: str, **settings: Any) -> AsyncIterator[Relayed]:
    """A relay on ``redis_url`` with a :class:`ShiftedClock`, and the stack it runs in."""
    async with running_relay(data_dir, redis_url=redis_url, **settings) as stack:
        relay = stack.relay.running.relay
        clock = ShiftedClock()
        relay.clock = clock
        yield Relayed(stack=stack, relay=relay, clock=clock)


@attrs.frozen(kw_only=True)
class Relayed:
    stack: RunningStack
    relay: Relay
    clock: ShiftedClock

    @property
    def address(self) -> tuple[str, int]:
        return self.stack.relay.address

    async def new_scope(self, label: str = "test") -> tuple[KeyRecord, str]:
        return await self.relay.store.create_scope(label=label, now=time.time())

    async def link(
        self, key: str, daemon_id: str, handler: Callable[[MuxStream], Any] | None = None
    ) -> StandIn:
        """A stand-in daemon linked with ``key``, returned once the relay has registered it
        (its last check of the key, in Redis, comes after the stand-in has the HELLO)."""
        stand_in = await start_stand_in(
            self.stack.links,
            self.address,
            key,
            daemon_id,
            handler if handler is not None else identity_handler(daemon_id),
        )
        record = await self.relay.store.verify_key(key, now=time.time())
        assert record is not None
        with trio.fail_after(IO_DEADLINE):
            await self.relay.links.wait_arrival(record.scope_id, daemon_id)
        assert self.relay.links.get(record.scope_id, daemon_id) is not None
        return stand_in

    async def request(
        self,
        method: str,
        path: str,
        *,
        cookie: str | None = None,
        bearer: str | None = None,
        json_body: object = None,
        form: dict[str, str] | None = None,
    ) -> HttpResponse:
        headers: list[tuple[str, str]] = []
        body = None
        if cookie is not None:
            headers.append(("Cookie", f"repowire_session={cookie}"))
        if bearer is not None:
            headers.append(("Authorization", f"Bearer {bearer}"))
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers.append(("Content-Type", "application/x-www-form-urlencoded"))
        with trio.fail_after(IO_DEADLINE):
            return await http_request(
                self.address, method, path, body=body, json_body=json_body, headers=headers
            )

    async def sign_in(self, key: str) -> str:
        """``POST /auth`` with ``key``: the session id of the cookie it sets."""
        answer = await self.request("POST", "/auth", form={"api_key": key})
        assert answer.status == 303, answer.body
        return session_of(answer)


def session_of(answer: HttpResponse) -> str:
    cookie = answer.header("set-cookie")
    assert cookie is not None and cookie.startswith("repowire_session=")
    return cookie.split(";", 1)[0].split("=", 1)[1]


def store_up(relay: Relay) -> float | None:
    value: float | None = relay.metrics.registry.get_sample_value("repowire_relay_store_up")
    return value


async def event_stream(stream: MuxStream) -> None:
    """A daemon's SSE endpoint: one comment, then the stream stays open."""
    exchange = ScriptedHttp(stream)
    try:
        await exchange.receive_request()
        await exchange.read_body()
        await exchange.send_head(200, [("content-type", "text/event-stream")])
        await exchange.send_data(b": connected\n\n")
        await trio.sleep_forever()
    except trio.BrokenResourceError:
        return


async def watch_sse(
    address: tuple[str, int],
    path: str,
    session_id: str,
    ended: trio.Event,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    """Open a tunneled SSE stream; report once it has started, set ``ended`` when it ends."""
    cookie = ("Cookie", f"repowire_session={session_id}")
    try:
        async with open_http_stream(address, "GET", path, headers=[cookie]) as response:
            assert response.status == 200
            assert await response.read_chunk() == b": connected\n\n"
            task_status.started()
            try:
                while await response.read_chunk() is not None:
                    pass
            except (trio.BrokenResourceError, h11.RemoteProtocolError):
                pass
    finally:
        ended.set()


# -- the service, on Redis --------------------------------------------------------------------


async def test_register_sign_in_and_tunnel_on_redis(tmp_path: Path, redis_url: str) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with redis_relay(tmp_path / "relay", redis_url) as on:
            registered = await on.request("POST", "/api/v1/register", json_body={"label": "me"})
            assert registered.status == 201, registered.body
            key = registered.json()["api_key"]
            await on.link(key, "laptop")
            session_id = await on.sign_in(key)
            answer = await on.request("GET", "/d/laptop/peers?x=1", cookie=session_id)
            assert answer.status == 200, answer.body
            assert answer.json() == {"daemon": "laptop", "method": "GET", "target": "/peers?x=1"}
            listed = await on.request("GET", "/api/v1/daemons", bearer=key)
            assert [d["daemon_id"] for d in listed.json()["daemons"]] == ["laptop"]
            health = await on.request("GET", "/health")
            assert health.status == 200 and health.json()["store"] == "ok"
            assert store_up(on.relay) == 1.0
        # Everything is in Redis, seen by any other store object; SQLite is not used.
        async with RedisStore.open(redis_url) as other:
            record = await other.verify_key(key, now=time.time())
            assert record is not None and record.label == "me"
            assert await other.lookup_session(session_id, now=time.time()) is not None
            assert [d for d, _, _ in await other.known_daemons(record.scope_id)] == ["laptop"]
        assert not (tmp_path / "relay" / "relay.sqlite3").exists()


async def test_a_revocation_through_another_store_ends_a_link_and_a_request_at_once(
    tmp_path: Path, redis_url: str
) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with (
            redis_relay(tmp_path / "relay", redis_url) as on,
            RedisStore.open(redis_url) as elsewhere,
        ):
            record, key = await on.new_scope()
            link = await on.link(key, "events", event_stream)
            session_id = await on.sign_in(key)
            ended = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_sse, on.address, "/d/events/stream", session_id, ended)
                revoked_at = time.monotonic()
                assert await elsewhere.revoke_key(record.key_id, now=time.time())
                with trio.move_on_after(PROMPT):
                    await ended.wait()
                    await link.finished.wait()
                assert ended.is_set(), "the tunneled request outlived the revocation"
                assert link.finished.is_set(), "the link outlived the revocation"
                assert time.monotonic() - revoked_at < PROMPT
            assert link.close_code == CloseCode.KEY_REVOKED
            refused = await on.request("GET", "/d/events/stream", cookie=session_id)
            assert refused.status == 401
            assert (await link_refusal(on.address, link_headers(key, "events"))).code == (
                CloseCode.INVALID_KEY
            )


# -- Redis down and back ----------------------------------------------------------------------


@tolerates_failed_connections
async def test_held_links_and_sessions_ride_out_a_redis_outage(
    tmp_path: Path, redis_servers: RedisServerFactory
) -> None:
    server = redis_servers(persistent=True)
    with trio.fail_after(TEST_LIMIT):
        async with redis_relay(tmp_path / "relay", server.url) as on:
            record, key = await on.new_scope()
            other, other_key = await on.new_scope("other")
            link = await on.link(key, "laptop")
            session_id = await on.sign_in(key)
            assert (await on.request("GET", "/d/laptop/peers", cookie=session_id)).status == 200

            server.stop()
            # Past the cache's normal trust (5 s): the store must be asked, and cannot be.
            on.clock.offset = 10.0
            # The link and the browser session this relay holds keep serving.
            kept = await on.request("GET", "/d/laptop/peers", cookie=session_id)
            assert kept.status == 200, kept.body
            assert not link.finished.is_set()
            # What needs Redis answers 503 at once.
            started = time.monotonic()
            signing_in = await on.request("POST", "/auth", form={"api_key": other_key})
            assert signing_in.status == 503
            assert b"key store is unavailable" in signing_in.body
            assert other_key.encode() not in signing_in.body
            by_api = await on.request("GET", "/api/v1/daemons", bearer=other_key)
            assert by_api.status == 503
            assert by_api.json() == {
                "error": "store_unavailable",
                "detail": "The relay's key store is unavailable; try again shortly.",
            }
            registering = await on.request("POST", "/api/v1/register")
            assert registering.status == 503
            assert registering.json()["error"] == "store_unavailable"
            stranger = await on.request(
                "GET",
                "/d/laptop/peers",
                cookie="A" * 43,  # a session this relay never saw
            )
            assert stranger.status == 503
            assert stranger.json()["error"] == "store_unavailable"
            refused = await link_refusal(on.address, link_headers(other_key, "desktop"))
            assert refused.code == CloseCode.TRY_AGAIN_LATER
            assert time.monotonic() - started < 5.0
            health = await on.request("GET", "/health")
            assert health.status == 503
            assert health.json()["store"] == "unavailable"
            assert store_up(on.relay) == 0.0
            # The grace ends 60 s after the session was last confirmed.
            on.clock.offset = 61.0
            expired = await on.request("GET", "/d/laptop/peers", cookie=session_id)
            assert expired.status == 503

            server.start()
            # Back without a restart: the store's probe sees it within a second or so.
            with trio.fail_after(IO_DEADLINE):
                await on.relay.store_health.wait_until(up=True)
            assert (await on.request("GET", "/health")).status == 200
            assert store_up(on.relay) == 1.0
            assert (await on.request("GET", "/d/laptop/peers", cookie=session_id)).status == 200
            await on.link(other_key, "desktop")
            fresh = await on.sign_in(other_key)
            assert (await on.request("GET", "/d/desktop/x", cookie=fresh)).status == 200
            assert record.scope_id != other.scope_id


@tolerates_failed_connections
async def test_a_relay_starts_while_redis_is_down_and_serves_once_it_is_up(
    tmp_path: Path, redis_servers: RedisServerFactory
) -> None:
    server = redis_servers(persistent=True)
    url = server.url
    server.stop()
    with trio.fail_after(TEST_LIMIT):
        async with redis_relay(tmp_path / "relay", url) as on:
            assert (await on.request("GET", "/health")).status == 503
            assert (await on.request("POST", "/api/v1/register")).status == 503
            server.start()
            with trio.fail_after(IO_DEADLINE):
                await on.relay.store_health.wait_until(up=True)
            assert (await on.request("GET", "/health")).status == 200
            assert (await on.request("POST", "/api/v1/register")).status == 201


# -- two relays on one Redis ------------------------------------------------------------------


async def test_a_login_link_issued_on_one_relay_is_taken_on_another(
    tmp_path: Path, redis_url: str
) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with (
            redis_relay(tmp_path / "a", redis_url) as a,
            redis_relay(tmp_path / "b", redis_url) as b,
        ):
            _, key = await a.new_scope()
            await a.link(key, "laptop")
            issued = await a.request("POST", "/api/v1/login-links", bearer=key)
            assert issued.status == 201, issued.body
            token = issued.json()["url"].split("#", 1)[1]
            taken = await b.request(
                "POST", "/api/v1/login-links/redeem", json_body={"token": token}
            )
            assert taken.status == 200, taken.body
            assert taken.json() == {"next": "/dashboard/"}
            session_id = session_of(taken)
            # Once only, on either relay.
            again = await a.request(
                "POST", "/api/v1/login-links/redeem", json_body={"token": token}
            )
            assert again.status == 410
            # The session opened on B serves on A, where the daemon is linked.
            answer = await a.request("GET", "/d/laptop/peers", cookie=session_id)
            assert answer.status == 200, answer.body


async def test_signing_out_on_one_relay_ends_streams_on_another_at_once(
    tmp_path: Path, redis_url: str
) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with (
            redis_relay(tmp_path / "a", redis_url) as a,
            redis_relay(tmp_path / "b", redis_url) as b,
        ):
            _, key = await a.new_scope()
            await a.link(key, "events", event_stream)
            session_id = await a.sign_in(key)
            kept_session = await a.sign_in(key)
            ended = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_sse, a.address, "/d/events/stream", session_id, ended)
                kept = trio.Event()
                await nursery.start(watch_sse, a.address, "/d/events/stream", kept_session, kept)
                signed_out_at = time.monotonic()
                answer = await b.request("POST", "/logout", cookie=session_id)
                assert answer.status == 303
                with trio.move_on_after(PROMPT):
                    await ended.wait()
                assert ended.is_set(), "the stream outlived the sign-out on the other relay"
                assert time.monotonic() - signed_out_at < PROMPT
                assert not kept.is_set(), "another session's stream ended too"
                nursery.cancel_scope.cancel()
            refused = await a.request("GET", "/api/v1/daemons", cookie=session_id)
            assert refused.status == 401


async def test_rate_limits_are_shared_by_the_relays(tmp_path: Path, redis_url: str) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with (
            redis_relay(tmp_path / "a", redis_url, register_burst=3) as a,
            redis_relay(tmp_path / "b", redis_url, register_burst=3) as b,
        ):
            statuses = []
            for on in (a, b, a, b):
                statuses.append((await on.request("POST", "/api/v1/register")).status)
            assert statuses == [201, 201, 201, 429]
            limited = await a.request("POST", "/api/v1/register")
            assert limited.status == 429
            assert int(limited.header("retry-after") or "0") >= 1
            # Failed sign-ins are counted across the relays too (10 a minute, burst 10).
            bad = "rw_" + "A" * 43
            answers = []
            for n in range(11):
                on = a if n % 2 else b
                answers.append((await on.request("POST", "/auth", form={"api_key": bad})).status)
            assert answers == [401] * 10 + [429]


async def test_issuing_sign_in_links_is_limited_per_key_across_relays(
    tmp_path: Path, redis_url: str
) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with (
            redis_relay(tmp_path / "a", redis_url) as a,
            redis_relay(tmp_path / "b", redis_url) as b,
        ):
            _, key = await a.new_scope()
            statuses = []
            for n in range(11):  # a burst of 10, 30 an hour
                on = a if n % 2 else b
                statuses.append(
                    (await on.request("POST", "/api/v1/login-links", bearer=key)).status
                )
            assert statuses == [201] * 10 + [429]


@tolerates_failed_connections
@pytest.mark.parametrize("where", ["/api/v1/daemons", "/d/laptop/peers"])
async def test_no_secret_reaches_an_answer_while_redis_is_down(
    tmp_path: Path, redis_servers: RedisServerFactory, where: str
) -> None:
    password = "hunter2-secret"
    server = redis_servers(password=password)
    with trio.fail_after(TEST_LIMIT):
        async with redis_relay(tmp_path / "relay", server.url) as on:
            _, key = await on.new_scope()
            server.stop()
            answer = await on.request("GET", where, bearer=key, cookie="B" * 43)
            assert answer.status == 503
            text = answer.body.decode()
            for secret in (password, key, "B" * 43, server.url):
                assert secret not in text
            json.loads(text)
