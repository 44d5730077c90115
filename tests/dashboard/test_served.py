"""The bundled dashboard as served: by the daemon locally and by the relay under both prefixes.

Every asset fetched over HTTP from each place, with the content type a browser needs, and the
page's API calls resolving (through the relay) to the daemon's real routes.
"""

from __future__ import annotations

import mimetypes
import os
import shutil
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import trio

from repowire.dashboard import STATIC_DIR
from tests.support.clients import http_request
from tests.support.daemons import start_daemon
from tests.support.relays import start_relay
from tests.support.stack import start_connected_daemon

ASSETS = sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file())
EXPECTED_TYPES = {
    ".html": "text/html",
    ".js": "javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}


def check_asset(name: str, status: int, content_type: str | None, body: bytes) -> None:
    assert status == 200, f"{name}: HTTP {status}"
    assert body == (STATIC_DIR / name).read_bytes(), f"{name}: served bytes differ"
    suffix = Path(name).suffix
    assert content_type is not None and EXPECTED_TYPES[suffix] in content_type, (
        f"{name}: content type {content_type!r}"
    )


async def test_every_asset_is_served_locally_and_through_the_relay(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    assert "index.html" in ASSETS
    assert all(Path(name).suffix in EXPECTED_TYPES for name in ASSETS), mimetypes.types_map
    with trio.fail_after(20):
        relay = await start_relay(nursery, tmp_path / "relay")
        record, key = await relay.new_scope()
        daemon = await start_connected_daemon(nursery, relay, key, "laptop", STATIC_DIR)
        cookie = await relay.session_cookie(record)
        places = [
            (daemon.address, "/dashboard/", []),
            (relay.address, "/d/laptop/dashboard/", [cookie]),
        ]
        for address, base, headers in places:
            for name in ASSETS:
                response = await http_request(address, "GET", base + name, headers=headers)
                check_asset(name, response.status, response.header("content-type"), response.body)
            index = await http_request(address, "GET", base, headers=headers)
            check_asset("index.html", index.status, index.header("content-type"), index.body)

        # Through the relay, the page's relative API calls reach the daemon's own routes.
        page = f"http://127.0.0.1:{relay.address[1]}/d/laptop/dashboard/"
        for relative in ("../health", "../peers", "../events?after=0"):
            target = urlsplit(urljoin(page, relative))
            path = target.path + (f"?{target.query}" if target.query else "")
            answer = await http_request(relay.address, "GET", path, headers=[cookie])
            assert answer.status == 200, f"{relative}: HTTP {answer.status}"
        daemons = await http_request(
            relay.address,
            "GET",
            urlsplit(urljoin(page, "../api/v1/daemons")).path,
            headers=[cookie],
        )
        assert daemons.json()["current"] == "laptop"

        # Without a session the relay does not serve the dashboard's assets.
        refused = await http_request(relay.address, "GET", "/d/laptop/dashboard/app.js")
        assert refused.status in (401, 303)


async def test_an_upgraded_file_is_seen_by_the_next_load(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The daemon serves its unhashed dashboard files with ``no-cache`` and a validator: a
    reload revalidates (304 while unchanged) and picks up a changed file at once."""
    dashboard = tmp_path / "dashboard"
    shutil.copytree(STATIC_DIR, dashboard)
    with trio.fail_after(20):
        daemon = await start_daemon(nursery, dashboard_dir=dashboard)
        for name in ASSETS:
            first = await daemon.request("GET", f"/dashboard/{name}")
            assert first.status == 200, name
            assert first.header("cache-control") == "no-cache", name
            assert first.header("expires") is None, name
            assert first.header("etag") is not None, name

        first = await daemon.request("GET", "/dashboard/app.js")
        etag = first.header("etag")
        assert etag is not None
        unchanged = await daemon.request(
            "GET", "/dashboard/app.js", headers=[("If-None-Match", etag)]
        )
        assert unchanged.status == 304 and unchanged.body == b""

        # The upgrade: new bytes (and a newer time, as an installer leaves them).
        app_js = dashboard / "app.js"
        app_js.write_bytes(first.body + b"\n// upgraded\n")
        later = app_js.stat().st_mtime + 10
        os.utime(app_js, (later, later))
        again = await daemon.request("GET", "/dashboard/app.js", headers=[("If-None-Match", etag)])
        assert again.status == 200
        assert again.body.endswith(b"// upgraded\n")
        assert again.header("etag") not in (None, etag)
