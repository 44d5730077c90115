"""The whole chain once: browser → relay → connector → daemon and back."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.support.clients import http_request
from tests.support.relays import start_relay
from tests.support.stack import start_connected_daemon


async def test_request_reaches_the_daemon_through_the_relay(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    dashboard = tmp_path / "dashboard"
    dashboard.mkdir()
    (dashboard / "index.html").write_text("<!doctype html><title>d</title>")
    with trio.fail_after(15):
        relay = await start_relay(nursery, tmp_path / "relay")
        record, key = await relay.new_scope()
        await start_connected_daemon(nursery, relay, key, "laptop", dashboard)
        cookie = await relay.session_cookie(record)
        created = await http_request(
            relay.address,
            "POST",
            "/d/laptop/peers",
            json_body={"name": "alice"},
            headers=[cookie],
        )
        assert created.status == 201
        listed = await http_request(relay.address, "GET", "/peers", headers=[cookie])
        assert listed.status == 200
        assert [p["name"] for p in listed.json()["peers"]] == ["alice"]
        health = await http_request(relay.address, "GET", "/d/laptop/health", headers=[cookie])
        assert health.json()["relay"]["state"] == "connected"
