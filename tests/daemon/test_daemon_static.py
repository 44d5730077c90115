"""Dashboard files: served from the dashboard directory and never from outside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from repowire.daemon._static import resolve_static
from tests.support.daemons import DaemonFactory


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "_next" / "static").mkdir(parents=True)
    (root / "index.html").write_text("<title>home</title>")
    (root / "app.js").write_text("console.log('app')")
    (root / "_next" / "static" / "chunk.css").write_text("body{}")
    (root / "peers").mkdir()
    (root / "peers" / "index.html").write_text("<title>peers</title>")
    (root / "settings.html").write_text("<title>settings</title>")
    (root / ".env").write_text("SECRET=1")
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", root / "escape.txt")
    os.symlink(tmp_path, root / "up")
    os.symlink(root / "app.js", root / "alias.js")
    return root


def test_resolve_inside(site: Path) -> None:
    assert resolve_static(site, "") == (site / "index.html").resolve()
    assert resolve_static(site, "app.js") == (site / "app.js").resolve()
    assert resolve_static(site, "_next/static/chunk.css") is not None
    assert resolve_static(site, "peers") == (site / "peers" / "index.html").resolve()
    assert resolve_static(site, "peers/") == (site / "peers" / "index.html").resolve()
    assert resolve_static(site, "settings") == (site / "settings.html").resolve()
    # A symlink that stays inside the directory is fine.
    assert resolve_static(site, "alias.js") == (site / "app.js").resolve()


@pytest.mark.parametrize(
    "subpath",
    [
        "../secret.txt",
        "peers/../../secret.txt",
        "./app.js",
        "peers//index.html",
        "/etc/passwd",
        "escape.txt",
        "up/secret.txt",
        ".env",
        "app.js\x00.png",
        "..\\secret.txt",
        "missing.js",
        "_next",
    ],
)
def test_resolve_refuses(site: Path, subpath: str) -> None:
    assert resolve_static(site, subpath) is None


def test_resolve_with_missing_root(tmp_path: Path) -> None:
    assert resolve_static(tmp_path / "absent", "index.html") is None


async def test_dashboard_routes(daemon_factory: DaemonFactory, site: Path) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory(dashboard_dir=site)
        bare = await daemon.request("GET", "/dashboard")
        index = await daemon.request("GET", "/dashboard/")
        script = await daemon.request("GET", "/dashboard/app.js")
        nested = await daemon.request("GET", "/dashboard/_next/static/chunk.css")
        page = await daemon.request("GET", "/dashboard/settings")
        missing = await daemon.request("GET", "/dashboard/nope.js")
    assert bare.status in (301, 302, 307, 308)
    assert bare.header("location") == "/dashboard/"
    assert index.status == 200
    assert index.body == b"<title>home</title>"
    assert (index.header("content-type") or "").startswith("text/html")
    assert index.header("cache-control") == "no-cache"
    assert script.body == b"console.log('app')"
    assert "javascript" in (script.header("content-type") or "")
    assert nested.body == b"body{}"
    assert page.body == b"<title>settings</title>"
    assert missing.status == 404
    assert missing.json()["error"] == "not_found"


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/../secret.txt",
        "/dashboard/%2e%2e/secret.txt",
        "/dashboard/%2E%2E/secret.txt",
        "/dashboard/..%2fsecret.txt",
        "/dashboard/peers/%2e%2e/%2e%2e/secret.txt",
        "/dashboard/%2fetc%2fpasswd",
        "/dashboard//etc/passwd",
        "/dashboard/..%5csecret.txt",
        "/dashboard/escape.txt",
        "/dashboard/up/secret.txt",
        "/dashboard/.env",
        "/dashboard/app.js%00.png",
    ],
)
async def test_dashboard_path_traversal_is_refused(
    daemon_factory: DaemonFactory, site: Path, path: str
) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory(dashboard_dir=site)
        response = await daemon.request("GET", path)
    assert b"outside" not in response.body
    assert b"SECRET" not in response.body
    assert b"root:" not in response.body
    assert response.status in (400, 404), response.status
    assert response.json()["error"] in ("not_found", "bad_request")


async def test_dashboard_without_index(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with trio.fail_after(10):
        daemon = await daemon_factory(dashboard_dir=empty)
        response = await daemon.request("GET", "/dashboard/")
    assert response.status == 404
    assert response.json()["error"] == "not_found"
