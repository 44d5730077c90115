"""The in-process stack of tests/support restarts each part and the rest finds it again: the
relay on its port with its key store, a daemon with a fresh connector."""

from __future__ import annotations

from pathlib import Path

import trio

from connector import LinkState
from relay import KeyRecord
from tests.support.clients import http_request
from tests.support.relays import RelayHandle
from tests.support.stack import open_stack
from tests.support.waiting import eventually


async def reach(relay: RelayHandle, record: KeyRecord, daemon_id: str) -> None:
    """A browser session minted on ``relay`` reaches ``daemon_id`` through it."""
    links = relay.running.relay.links
    await eventually(lambda: links.get(record.scope_id, daemon_id) is not None)
    cookie = await relay.session_cookie(record)
    health = await http_request(relay.address, "GET", f"/d/{daemon_id}/health", headers=[cookie])
    assert health.status == 200, health.body
    assert health.json()["daemon_id"] == daemon_id


async def test_a_restarted_relay_keeps_its_port_and_keys(
    tmp_path: Path, dashboard_dir: Path
) -> None:
    with trio.fail_after(20):
        async with open_stack(tmp_path, dashboard_dir) as stack:
            runner = stack.relay_runner()
            first = await runner.start()
            record, key = await first.new_scope()
            await stack.start_daemon(first, key, "laptop")
            await reach(first, record, "laptop")

            second = await runner.restart()
            assert second.port == first.port
            # The connector's key still opens a link: the key store is the same.
            await reach(second, record, "laptop")


async def test_a_restarted_daemon_links_again_with_a_fresh_connector(
    tmp_path: Path, dashboard_dir: Path
) -> None:
    with trio.fail_after(20):
        async with open_stack(tmp_path, dashboard_dir) as stack:
            relay = await stack.start_relay()
            record, key = await relay.new_scope()
            laptop = await stack.start_daemon(relay, key, "laptop")
            daemon, connector = laptop.daemon, laptop.connector

            await laptop.restart()
            assert laptop.daemon is not daemon and laptop.connector is not connector
            assert laptop.connector.status().state is LinkState.CONNECTED
            assert laptop.connector.config.daemon_port == laptop.address[1]
            await reach(relay, record, "laptop")
