"""The connector's link to a relay: connecting, tunneling, status, and the relay's refusals."""

from __future__ import annotations

import json
import time
from functools import partial

import trio
import trio_websocket

from connector import Connector, LinkState
from mux import MuxConfig
from protocol import PROTOCOL_VERSION, BackoffConfig, CloseCode
from tests.support.clients import http_request
from tests.support.daemons import start_daemon
from tests.support.fake_relay import BOGUS_KEY, fake_relay_config, start_fake_relay
from tests.support.processes import LOOPBACK
from tests.support.stack import Stack, start_daemon_for
from tests.support.waiting import eventually


async def test_connects_tunnels_and_reports_its_status(stack: Stack) -> None:
    with trio.fail_after(10):
        relay = await stack.start_relay()
        record, key = await relay.new_scope()
        before = time.time()
        laptop = await stack.start_daemon(
            relay, key, "laptop", mux=MuxConfig(keepalive_interval=0.2, keepalive_timeout=1.0)
        )
        status = laptop.connector.status()
        assert status.state is LinkState.CONNECTED
        assert status.connected_since is not None
        assert before <= status.connected_since <= time.time()
        assert status.last_connected_at == status.connected_since
        assert status.attempts == 1
        assert status.last_error is None
        assert status.next_retry_at is None
        assert status.retrying is False  # connected: nothing to retry
        assert (status.relay_url, status.daemon_id) == (relay.ws_url, "laptop")
        # The relay registers the link just after its side of the handshake, which can finish
        # a moment after the connector's.
        links = relay.running.relay.links
        await eventually(lambda: links.get(record.scope_id, "laptop") is not None)

        # A browser request through the relay reaches the daemon.
        cookie = await relay.session_cookie(record)
        created = await http_request(
            relay.address,
            "POST",
            "/d/laptop/peers",
            json_body={"name": "alice"},
            headers=[cookie],
        )
        assert created.status == 201
        assert laptop.state.get_peer("alice") is not None

        # The round trip appears once a keepalive ping was answered.
        await eventually(lambda: laptop.connector.status().rtt_ms is not None)
        rtt = laptop.connector.status().rtt_ms
        assert rtt is not None and 0 <= rtt < 1000

        # The daemon's /health carries the same snapshot, and never the key.
        health = await http_request(relay.address, "GET", "/d/laptop/health", headers=[cookie])
        assert health.status == 200
        assert health.json()["relay"]["state"] == "connected"
        assert health.json()["relay"]["attempts"] == 1
        assert key not in health.body.decode()


async def test_link_handshake_carries_the_key_in_a_header_never_in_the_url(
    stack: Stack,
) -> None:
    with trio.fail_after(10):
        fake = await start_fake_relay(stack.relays)
        connector = Connector(fake_relay_config(fake.ws_url))
        await start_daemon_for(stack.daemons, connector, stack.dashboard_dir)
        (request,) = fake.requests
        assert request.path == "/ws/relay"
        assert BOGUS_KEY not in request.path
        assert request.headers["authorization"] == f"Bearer {BOGUS_KEY}"
        assert request.headers["repowire-daemon-id"] == "laptop"
        assert request.headers["repowire-protocol"] == str(PROTOCOL_VERSION)


async def test_status_never_contains_the_key(stack: Stack) -> None:
    with trio.fail_after(10):
        relay = await stack.start_relay()
        _, key = await relay.new_scope()
        laptop = await stack.start_daemon(relay, key, "laptop")
        assert key not in json.dumps(laptop.connector.status().to_json())
        assert key not in repr(laptop.connector.config)
        health = await http_request(laptop.address, "GET", "/health")
        assert key not in health.body.decode()


async def test_bad_key_slows_down_to_the_cap_and_says_so(stack: Stack) -> None:
    cap = 1.0
    with trio.fail_after(10):
        relay = await stack.start_relay()
        laptop = await stack.start_daemon(
            relay,
            BOGUS_KEY,
            "laptop",
            wait=False,
            backoff=BackoffConfig(base=0.05, cap=cap, stable_after=5.0, restart_spread=0.2),
        )
        await laptop.connector.wait_state(LinkState.DOWN)
        seen_down = trio.current_time()
        status = laptop.connector.status()
        assert status.retrying is True
        assert status.last_error is not None
        assert "invalid" in status.last_error.lower()
        assert "key" in status.last_error.lower()
        assert status.last_error_at is not None and status.next_retry_at is not None
        assert cap / 2 <= status.next_retry_at - status.last_error_at <= cap
        assert BOGUS_KEY not in json.dumps(status.to_json())

        # It does retry, but not sooner than half the cap.
        await eventually(lambda: laptop.connector.status().attempts >= 2, interval=0.01)
        assert trio.current_time() - seen_down >= cap / 2 - 0.05

        # The daemon keeps serving and says why the link is down.
        health = await http_request(laptop.address, "GET", "/health")
        assert health.status == 200
        assert health.json()["relay"]["state"] in ("down", "connecting")
        assert BOGUS_KEY not in health.body.decode()


async def test_same_daemon_id_twice_the_older_backs_off_long_and_the_newer_serves(
    stack: Stack,
) -> None:
    with trio.fail_after(10):
        relay = await stack.start_relay()
        record, key = await relay.new_scope()
        older = await stack.start_daemon(relay, key, "laptop")
        newer = await stack.start_daemon(relay, key, "laptop")
        await older.connector.wait_state(LinkState.DOWN)
        status = older.connector.status()
        # Displaced, not stopped for good: it retries, but only after the long replaced delay,
        # so two connectors sharing an id never fight over the link.
        assert status.retrying is True
        assert status.next_retry_at is not None
        assert status.next_retry_at - time.time() >= BackoffConfig().replaced_delay * 0.9
        assert status.last_error is not None and "replaced" in status.last_error

        # Far longer than the first backoff delay of these settings (at most 0.05 s): no fight.
        await trio.sleep(0.3)
        assert older.connector.status().attempts == 1
        assert older.connector.status().state is LinkState.DOWN
        assert newer.connector.status().state is LinkState.CONNECTED
        assert newer.connector.status().attempts == 1

        # The relay routes the daemon id to the newer daemon.
        await http_request(newer.address, "POST", "/peers", json_body={"name": "bob"})
        cookie = await relay.session_cookie(record)
        listed = await http_request(relay.address, "GET", "/d/laptop/peers", headers=[cookie])
        assert listed.status == 200
        assert [peer["name"] for peer in listed.json()["peers"]] == ["bob"]


async def test_incompatible_version_stops_and_says_so(stack: Stack) -> None:
    with trio.fail_after(10):
        fake = await start_fake_relay(
            stack.relays,
            close_code=CloseCode.INCOMPATIBLE_VERSION,
            close_reason="relay speaks protocol 99, daemon sent 1",
        )
        connector = Connector(fake_relay_config(fake.ws_url), rand=lambda: 0.5)
        laptop = await start_daemon_for(stack.daemons, connector, stack.dashboard_dir, wait=False)
        await connector.wait_state(LinkState.DOWN)
        status = connector.status()
        assert status.retrying is False
        assert status.next_retry_at is None
        assert status.last_error is not None
        assert "incompatible version" in status.last_error
        assert "4426" in status.last_error
        await trio.sleep(0.3)
        assert len(fake.requests) == 1
        assert connector.status().attempts == 1
        health = await laptop.request("GET", "/health")
        assert health.json()["relay"]["retrying"] is False


async def test_an_endpoint_that_refuses_the_upgrade_is_retried(stack: Stack) -> None:
    with trio.fail_after(10):
        # A daemon serves HTTP but has no /ws/relay: it answers the upgrade with 404.
        not_a_relay = await start_daemon(
            stack.relays, daemon_id="web", dashboard_dir=stack.dashboard_dir
        )
        host, port = not_a_relay.address
        connector = Connector(fake_relay_config(f"ws://{host}:{port}"), rand=lambda: 0.5)
        await stack.daemons.start(connector.run)
        await connector.wait_state(LinkState.DOWN)
        status = connector.status()
        assert status.retrying is True
        assert status.last_error is not None and "HTTP 404" in status.last_error
        assert status.next_retry_at is not None
        await eventually(lambda: connector.status().attempts >= 2)


async def test_an_upgrade_refused_with_503_backs_off_as_busy(stack: Stack) -> None:
    """A proxy in front of a busy relay may answer 503 (or 429) instead of a 1013 close: the
    connector backs off as from a busy relay (at least half of the delay bound), not as from
    a network failure."""
    refused = 0

    async def busy(request: trio_websocket.WebSocketRequest) -> None:
        nonlocal refused
        refused += 1
        await request.reject(503, body=b"busy")

    with trio.fail_after(10):
        server = await stack.relays.start(
            partial(trio_websocket.serve_websocket, busy, LOOPBACK, 0, ssl_context=None)
        )
        port = server.port
        backoff = BackoffConfig(base=0.01, cap=0.2, restart_spread=0.1)
        connector = Connector(
            fake_relay_config(f"ws://{LOOPBACK}:{port}", backoff=backoff), rand=lambda: 0.0
        )
        await stack.daemons.start(connector.run)
        await connector.wait_state(LinkState.DOWN)
        status = connector.status()
        assert status.retrying is True
        assert status.last_error is not None
        assert "HTTP 503" in status.last_error
        assert "the relay is busy" in status.last_error
        # With rand=0 a network failure would retry at once; busy waits half the bound.
        assert status.next_retry_at is not None
        assert status.next_retry_at - (status.last_error_at or 0) >= 0.05 - 1e-6
        await eventually(lambda: refused >= 2)


async def test_several_tasks_can_wait_for_the_same_state(stack: Stack) -> None:
    with trio.fail_after(3):
        relay = await stack.start_relay()
        _, key = await relay.new_scope()
        laptop = await stack.start_daemon(relay, key, "laptop", wait=False)
        woken: list[int] = []

        async def waiter(number: int) -> None:
            await laptop.connector.wait_state(LinkState.CONNECTED)
            woken.append(number)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, 1)
            nursery.start_soon(waiter, 2)
        assert sorted(woken) == [1, 2]
