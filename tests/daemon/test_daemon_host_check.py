"""The daemon answers only requests addressed to it: the defence against DNS rebinding.

Raw requests on real loopback sockets, so every ``Host`` (or none) can be sent as is.
"""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionRejected

from repowire.daemon import DaemonState, create_app, serve_daemon
from repowire.daemon._host import host_refusal, split_host
from tests.support.clients import Address, HttpResponse, stream_request
from tests.support.daemons import TEST_GRACEFUL_TIMEOUT, DaemonFactory
from tests.support.websocket import open_client_websocket

from .test_daemon_ws import receive_json, send_json

#: The routes a rebound page would go for, each as (method, path, body).
ROUTES = [
    ("GET", "/health", b""),
    ("GET", "/peers", b""),
    ("POST", "/peers", b'{"name": "mallory"}'),
    ("DELETE", "/peers/bob", b""),
    ("GET", "/events", b""),
    ("GET", "/events/stream", b""),
    ("POST", "/notify", b'{"to": "bob", "text": "rebound"}'),
    ("POST", "/broadcast", b'{"text": "rebound"}'),
    ("GET", "/dashboard/", b""),
    ("GET", "/no/such/route", b""),
]

#: The headers of a WebSocket upgrade request.
UPGRADE = [
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
]


def raw_head(method: str, path: str, host: str | None, *lines: str, body: bytes = b"") -> bytes:
    head = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        head.append(f"Host: {host}")
    head += lines
    if body:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def exchange(address: Address, data: bytes) -> HttpResponse:
    """``data`` sent as is on a new connection; the one response read by its framing."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        answer = await stream_request(stream, data)
    return HttpResponse(status=answer.status, headers=answer.headers, body=answer.body)


def assert_bad_host(response: HttpResponse) -> None:
    assert response.status == 421, response.body
    assert response.header("content-type") == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == "bad_host"
    assert body["detail"] and "\n" not in body["detail"]


FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:8377",
    "evil.example:{port}",
    "127.0.0.1.evil.example:{port}",
    "localhost.evil.example",
    "localhost:1",
    "[::1]:1",
    "repowire-daemon:{port}",
    "[::2]:{port}",
    "0.0.0.0:{port}",
    "localhost:{port}x",
    "[::1",
]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
async def test_foreign_hosts_are_refused_on_every_route(
    daemon_factory: DaemonFactory, host: str
) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        daemon.state.add_peer("bob")
        host = host.format(port=daemon.address[1])
        for method, path, body in ROUTES:
            response = await exchange(daemon.address, raw_head(method, path, host, body=body))
            assert_bad_host(response)
        upgrade = await exchange(daemon.address, raw_head("GET", "/ws", host, *UPGRADE))
        assert_bad_host(upgrade)
    # Nothing was read, added, removed or delivered.
    assert [p.name for p in daemon.state.peers()] == ["bob"]
    assert daemon.state.last_event_id == 1
    assert daemon.state.subscriber_count == 0


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.1:{port}",
        "localhost",
        "LocalHost:{port}",
        "[::1]",
        "[::1]:{port}",
        "repowire-daemon",
    ],
)
async def test_the_daemons_own_names_are_accepted(daemon_factory: DaemonFactory, host: str) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        host = host.format(port=daemon.address[1])
        health = await exchange(daemon.address, raw_head("GET", "/health", host))
        posted = await exchange(
            daemon.address, raw_head("POST", "/peers", host, body=b'{"name": "bob"}')
        )
    assert health.status == 200, health.body
    assert posted.status == 201, posted.body


async def test_a_request_without_a_host_is_refused(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        # HTTP/1.1 requires Host: the server refuses the request before the app sees it.
        missing = await exchange(daemon.address, raw_head("GET", "/events", None))
        # HTTP/1.0 may leave it out; the daemon still answers only requests addressed to it.
        old = await exchange(daemon.address, b"GET /events HTTP/1.0\r\n\r\n")
        twice = await exchange(
            daemon.address, raw_head("GET", "/events", "127.0.0.1", "Host: evil.example")
        )
        empty = await exchange(daemon.address, raw_head("GET", "/events", ""))
    assert missing.status == 400
    assert_bad_host(old)
    assert twice.status in (400, 421)
    assert b'"events"' not in twice.body
    assert empty.status in (400, 421)
    assert b'"events"' not in empty.body


async def test_websocket_upgrades_check_the_host(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        daemon.state.add_peer("bob")
        with pytest.RaisesGroup(ConnectionRejected) as refused:
            async with open_client_websocket(daemon.address, "/ws", host="evil.example"):
                raise AssertionError("the upgrade must be refused")
        # The relay's tunnel host is accepted, as the relay and connector send it.
        async with open_client_websocket(daemon.address, "/ws", host="repowire-daemon") as ws:
            await send_json(ws, {"type": "notify", "to": "bob", "text": "hi"})
            # The message's event and the notify's result, in either order.
            received = [await receive_json(ws) for _ in range(2)]
    [result] = [m for m in received if m["type"] == "result"]
    rejection = refused.value.exceptions[0]
    assert isinstance(rejection, ConnectionRejected)
    assert rejection.status_code == 421
    assert result["ok"] is True


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_a_daemon_on_ipv6_loopback(nursery: trio.Nursery, dashboard_dir: Path) -> None:
    app = create_app(
        daemon_id="alpha",
        version="0.0.test",
        state=DaemonState(),
        mesh=None,
        relay_status=None,
        dashboard_dir=dashboard_dir,
    )
    with trio.fail_after(10):
        address: Address = await nursery.start(
            partial(serve_daemon, app, host="::1", port=0, graceful_timeout=TEST_GRACEFUL_TIMEOUT)
        )
        port = address[1]
        own = await exchange(address, raw_head("GET", "/health", f"[::1]:{port}"))
        named = await exchange(address, raw_head("GET", "/health", f"localhost:{port}"))
        foreign = await exchange(address, raw_head("GET", "/health", f"evil.example:{port}"))
    assert own.status == 200
    assert named.status == 200
    assert_bad_host(foreign)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("192.168.1.5:48377", True),
        ("192.168.1.5", True),
        ("192.168.1.5:48378", False),
        ("192.168.1.6:48377", False),
        ("localhost:48377", True),
        ("repowire-daemon", True),
        ("Repowire-Daemon", True),
        ("repowire-daemon:48377", False),
        ("localhost:99999", False),
        ("localhost:", False),
        (":48377", False),
        ("", False),
        ("   ", False),
    ],
)
def test_the_listening_address_is_accepted(value: str, accepted: bool) -> None:
    """A daemon bound to another address is also reached by that address and its port."""
    assert (host_refusal(value, ("192.168.1.5", 48377)) is None) is accepted


def test_the_listening_ipv6_address_is_accepted() -> None:
    assert host_refusal("[fe80::1]:48377", ("fe80::1", 48377)) is None
    assert host_refusal("[FE80::1]", ("fe80::1", 48377)) is None
    assert host_refusal("[fe80::2]:48377", ("fe80::1", 48377)) is not None


def test_an_overlong_host_is_not_echoed_whole() -> None:
    reason = host_refusal("a" * 5000, ("127.0.0.1", 48377))
    assert reason is not None and len(reason) < 300


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("LOCALHOST:80", ("localhost", 80)),
        ("[::1]", ("[::1]", None)),
        ("[::1]:80", ("[::1]", 80)),
        ("[::1]80", None),
        ("a:b", None),
        ("a:80:80", None),
        ("a:123456", None),
    ],
)
def test_split_host(value: str, parsed: tuple[str, int | None] | None) -> None:
    assert split_host(value) == parsed
