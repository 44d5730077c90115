"""The connector against a failing relay: restarts, links that die silently, slow dials."""

from __future__ import annotations

import trio

from connector import LinkState
from mux import MuxConfig
from protocol import BackoffConfig
from relay import KeyRecord
from tests.support.clients import http_request
from tests.support.proxy import start_proxy
from tests.support.relays import RelayHandle
from tests.support.stack import ConnectedDaemon, Stack
from tests.support.waiting import eventually

#: Extra seconds allowed on top of a computed bound for scheduling and loopback I/O.
SLACK = 0.5


async def assert_reachable(relay: RelayHandle, record: KeyRecord, daemon_id: str) -> None:
    """A browser request through ``relay`` reaches ``daemon_id`` and reports it connected."""
    # The relay registers a link just after its side of the handshake, which can finish a
    # moment after the connector's.
    links = relay.running.relay.links
    await eventually(lambda: links.get(record.scope_id, daemon_id) is not None)
    health = await http_request(
        relay.address, "GET", f"/d/{daemon_id}/health", headers=[await relay.session_cookie(record)]
    )
    assert health.status == 200, health.body
    assert health.json()["daemon_id"] == daemon_id
    assert health.json()["relay"]["state"] == "connected"


def assert_down_and_retrying(daemon: ConnectedDaemon) -> None:
    status = daemon.connector.status()
    assert status.state is LinkState.DOWN
    assert status.retrying is True
    assert status.connected_since is None
    assert status.last_connected_at is not None
    assert status.last_error is not None
    assert status.last_error_at is not None
    assert status.next_retry_at is not None
    assert status.next_retry_at >= status.last_error_at


async def test_relay_restart_on_the_same_port_the_connector_comes_back_by_itself(
    stack: Stack,
) -> None:
    with trio.fail_after(15):
        runner = stack.relay_runner()
        relay = await runner.start()
        record, key = await relay.new_scope()
        port = relay.running.port
        laptop = await stack.start_daemon(relay, key, "laptop", rand=lambda: 0.5)
        await assert_reachable(relay, record, "laptop")

        await runner.stop(graceful=False)
        await laptop.connector.wait_state(LinkState.DOWN)
        assert_down_and_retrying(laptop)

        # Same port, same data directory: the scope and its key survive the restart.
        relay = await runner.start(port)
        await laptop.connector.wait_state(LinkState.CONNECTED)
        assert laptop.connector.status().attempts >= 2
        assert laptop.connector.status().last_error is not None  # the last failure is kept
        await assert_reachable(relay, record, "laptop")


async def test_graceful_relay_restart_reconnects_within_the_restart_spread(stack: Stack) -> None:
    # With rand fixed at 0.9, a prompt reconnect waits 0.9 * restart_spread = 0.27 s and an
    # ordinary failure at least 0.9 * base = 1.8 s, so the timing tells them apart.
    backoff = BackoffConfig(base=2.0, cap=4.0, stable_after=5.0, restart_spread=0.3)
    with trio.fail_after(15):
        runner = stack.relay_runner()
        relay = await runner.start()
        record, key = await relay.new_scope()
        port = relay.running.port
        laptop = await stack.start_daemon(relay, key, "laptop", rand=lambda: 0.9, backoff=backoff)
        started = trio.current_time()
        await runner.stop(graceful=True)
        await laptop.connector.wait_state(LinkState.DOWN)
        assert_down_and_retrying(laptop)
        status = laptop.connector.status()
        assert status.last_error is not None and "4503" in status.last_error
        assert status.next_retry_at is not None and status.last_error_at is not None
        assert status.next_retry_at - status.last_error_at <= backoff.restart_spread

        relay = await runner.start(port)
        await laptop.connector.wait_state(LinkState.CONNECTED)
        assert trio.current_time() - started <= backoff.restart_spread + SLACK
        await assert_reachable(relay, record, "laptop")


async def test_link_cut_without_a_close_frame_is_redialled(stack: Stack) -> None:
    with trio.fail_after(15):
        runner = stack.relay_runner()
        relay = await runner.start()
        record, key = await relay.new_scope()
        proxy = await start_proxy(stack.relays, relay.address)
        laptop = await stack.start_daemon(
            relay, key, "laptop", rand=lambda: 0.5, relay_url=proxy.ws_url
        )
        assert proxy.accepted == 1

        proxy.kill_connections()
        await laptop.connector.wait_state(LinkState.DOWN)
        assert_down_and_retrying(laptop)

        await laptop.connector.wait_state(LinkState.CONNECTED)
        assert proxy.accepted == 2
        assert laptop.connector.status().attempts == 2
        await assert_reachable(relay, record, "laptop")


async def test_half_open_link_is_found_within_the_keepalive_bounds(stack: Stack) -> None:
    mux = MuxConfig(keepalive_interval=0.5, keepalive_timeout=0.5, close_timeout=0.2)
    with trio.fail_after(15):
        relay = await stack.start_relay()
        _, key = await relay.new_scope()
        proxy = await start_proxy(stack.relays, relay.address)
        laptop = await stack.start_daemon(
            relay, key, "laptop", rand=lambda: 0.5, relay_url=proxy.ws_url, mux=mux
        )
        started = trio.current_time()
        proxy.blackhole()
        await laptop.connector.wait_state(LinkState.DOWN)
        # A ping is sent at most one interval after the black hole and times out one timeout
        # later; then the link gets close_timeout to say goodbye. Past that, the status would
        # claim a connection that no longer exists.
        bound = mux.keepalive_interval + mux.keepalive_timeout + mux.close_timeout + SLACK
        assert trio.current_time() - started <= bound


async def test_half_open_link_goes_down_then_reconnects_once_the_path_heals(
    stack: Stack,
) -> None:
    mux = MuxConfig(keepalive_interval=0.5, keepalive_timeout=0.5, close_timeout=0.2)
    with trio.fail_after(15):
        relay = await stack.start_relay()
        record, key = await relay.new_scope()
        proxy = await start_proxy(stack.relays, relay.address)
        laptop = await stack.start_daemon(
            relay, key, "laptop", rand=lambda: 0.5, relay_url=proxy.ws_url, mux=mux
        )
        proxy.blackhole()
        await laptop.connector.wait_state(LinkState.DOWN)
        assert_down_and_retrying(laptop)
        status = laptop.connector.status()
        assert status.last_error is not None and "ping" in status.last_error

        # The redial waits 0.5 * base = 0.025 s: heal first, so it goes through.
        proxy.heal()
        await laptop.connector.wait_state(LinkState.CONNECTED)
        assert laptop.connector.status().attempts == 2
        await assert_reachable(relay, record, "laptop")


async def test_dial_into_a_black_hole_times_out_and_is_retried(stack: Stack) -> None:
    with trio.fail_after(15):
        relay = await stack.start_relay()
        record, key = await relay.new_scope()
        proxy = await start_proxy(stack.relays, relay.address)
        proxy.blackhole()
        laptop = await stack.start_daemon(
            relay,
            key,
            "laptop",
            rand=lambda: 0.5,
            relay_url=proxy.ws_url,
            connect_timeout=0.5,
            wait=False,
        )
        await laptop.connector.wait_state(LinkState.DOWN)
        status = laptop.connector.status()
        assert status.retrying is True
        assert status.last_error is not None and "timed out" in status.last_error
        assert status.next_retry_at is not None

        proxy.heal()
        await laptop.connector.wait_state(LinkState.CONNECTED)
        await assert_reachable(relay, record, "laptop")


async def test_stopping_a_connected_daemon_closes_its_link_within_close_timeout(
    stack: Stack,
) -> None:
    mux = MuxConfig(keepalive_interval=1.0, keepalive_timeout=1.0, close_timeout=0.2)
    with trio.fail_after(15):
        relay = await stack.start_relay()
        record, key = await relay.new_scope()
        laptop = await stack.start_daemon(relay, key, "laptop", mux=mux)
        links = relay.running.relay.links
        await eventually(lambda: links.get(record.scope_id, "laptop") is not None)
        started = trio.current_time()
        await laptop.stop()
        assert trio.current_time() - started <= mux.close_timeout + SLACK
        assert links.get(record.scope_id, "laptop") is None
