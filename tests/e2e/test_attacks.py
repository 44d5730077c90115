"""Attacks from outside, end to end: a relay process on loopback and daemons linked to it.

Each test fails if its defence is gone: oversized heads and bodies, slowloris, garbage on the
daemon endpoint, a flood of wrong keys, cross-site WebSockets, path traversal, cookie flags,
and one scope's credentials aimed at another scope's daemon on every route.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
import trio
import trio_websocket

from connector import Connector, ConnectorConfig, LinkState, MeshError
from protocol import CloseCode, FrameType
from tests.support.clients import (
    Address,
    HttpResponse,
    http_request,
    next_text,
    open_browser_websocket,
    open_http_stream,
)
from tests.support.fault_daemon import KIB, MIB
from tests.support.lab import Lab, open_lab
from tests.support.links import (
    RawLink,
    encode_frame,
    link_headers,
    link_refusal,
    open_link_websocket,
    open_raw_link,
)
from tests.support.processes import free_port
from tests.support.sessions import cookie_attributes, form_body, session_id_of, sign_in
from tests.support.stats import describe
from tests.support.waiting import poll

#: The relay's request-head limit and slow-head deadline (RelaySettings defaults; `relay
#: start` has no flag for them).
MAX_HEADER_SIZE = 16 * KIB
HEADER_TIMEOUT = 10.0
#: The relay's auth limit (RelaySettings defaults): a burst, then this many per minute.
AUTH_BURST = 10
AUTH_RATE_PER_MINUTE = 10.0
#: Body limit given to the relay with --max-body-size.
BODY_LIMIT = 1 * MIB
#: Slowloris connections, and the seconds between their bytes.
SLOW_CLIENTS = 50
SLOW_INTERVAL = 1.0
#: Most a normal request may take while the relay is under attack, seconds.
NORMAL_LATENCY = 1.0
#: Wrong keys thrown at /auth from one address one after another, and all at once.
WRONG_KEYS = 1000
CONCURRENT_WRONG_KEYS = 100
#: Seconds the held-back attempts wait between their heads and their bodies.
HOLD_BACK = 0.5
#: Most reads a raw client makes for one response.
MAX_READS = 1000
#: Extra seconds on top of a documented bound.
SLACK = 2.0

#: Hard stop for one test, setup included (each phase has a tighter deadline of its own).
TEST_DEADLINE = 90


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async with open_lab(tmp_path) as lab:
        yield lab


async def get(address: Address, path: str, *headers: tuple[str, str]) -> HttpResponse:
    return await http_request(address, "GET", path, headers=list(headers))


def unknown_key() -> str:
    """A well-formed key that no relay issued."""
    return "rw_" + secrets.token_urlsafe(32)


# ---------------------------------------------------------------------- oversized input


async def test_oversized_heads_and_bodies_are_refused_and_the_relay_stays_up(lab: Lab) -> None:
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay("relay", "--max-body-size", str(BODY_LIMIT))
        key = await lab.key(relay)
        daemon = await lab.fault_daemon(relay.ws_url, key, "laptop")
        _, cookie = await sign_in(relay.address, key)
        origin = ("Origin", relay.url)
        huge_header = ("X-Huge", "h" * (4 * MAX_HEADER_SIZE))
        with trio.fail_after(30):
            for path in ("/health", "/d/laptop/hello"):
                response = await get(relay.address, path, cookie, huge_header)
                print(f"\n{4 * MAX_HEADER_SIZE // KIB} KiB header on {path}: {response.status}")
                assert response.status in (400, 431), (path, response.status)
            assert (await get(relay.address, "/health")).status == 200
            assert await daemon.seen() == []
            # Half the limit is an ordinary (if fat) request.
            fat = await get(
                relay.address, "/d/laptop/hello", cookie, ("X-Fat", "f" * (MAX_HEADER_SIZE // 2))
            )
            assert fat.status == 200

            # A declared body over the limit: refused before the daemon hears of it.
            async with open_http_stream(
                relay.address,
                "POST",
                "/d/laptop/upload",
                body=b"u" * (2 * BODY_LIMIT),
                headers=[cookie, origin, ("Content-Type", "application/octet-stream")],
            ) as refused:
                assert refused.status == 413
                assert b"body_too_large" in await refused.read_all()
            assert ("POST", "/upload") not in await daemon.seen()

            # A chunked body that grows past the limit: cut off with 413 as it crosses it.
            async with open_http_stream(
                relay.address,
                "POST",
                "/d/laptop/upload",
                body=b"c" * (2 * BODY_LIMIT),
                headers=[cookie, origin, ("Transfer-Encoding", "chunked")],
            ) as cut:
                assert cut.status == 413

            async def daemon_idle() -> bool:
                return bool((await daemon.health())["active"] == 0)

            await poll(daemon_idle, what="the daemon's side of the cut upload ending")

            # Bodies within the limit still go through, and the link never dropped.
            body = b"k" * (BODY_LIMIT // 2)
            accepted = await http_request(
                relay.address, "POST", "/d/laptop/upload", body=body, headers=[cookie, origin]
            )
            assert accepted.status == 200
            assert accepted.json()["received"] == len(body)
            assert (await daemon.health())["relay"]["attempts"] == 1
        lab.assert_no_secret(key, session_id_of(cookie))


# ---------------------------------------------------------------------- slowloris


async def slow_client(address: Address, head: bytes, started: float, closed: list[float]) -> None:
    """Send ``head`` one byte every SLOW_INTERVAL; record when the relay cut it off."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        for byte in head:
            try:
                await stream.send_all(bytes([byte]))
                with trio.move_on_after(SLOW_INTERVAL):
                    # Anything at all (a 408, an EOF) means the relay gave up on us.
                    await stream.receive_some(4096)
                    break
            except trio.BrokenResourceError:
                break
        else:
            raise AssertionError("the relay waited for the whole slow head")
    closed.append(trio.current_time() - started)


@pytest.mark.slow
async def test_slowloris_neither_blocks_others_nor_holds_connections_past_the_deadline(
    lab: Lab,
) -> None:
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay()
        key = await lab.key(relay)
        await lab.fault_daemon(relay.ws_url, key, "laptop")
        _, cookie = await sign_in(relay.address, key)
        # Far longer than the deadline allows at one byte per second.
        head = b"GET /health HTTP/1.1\r\nHost: relay\r\nX-Slow: " + b"s" * 200
        closed: list[float] = []
        latencies: list[float] = []
        with trio.fail_after(HEADER_TIMEOUT + 20):
            async with trio.open_nursery() as nursery:
                started = trio.current_time()
                for _ in range(SLOW_CLIENTS):
                    nursery.start_soon(slow_client, relay.address, head, started, closed)
                await trio.sleep(SLOW_INTERVAL)
                for _ in range(int(HEADER_TIMEOUT + SLACK) * 2):
                    for path, headers in (("/health", ()), ("/d/laptop/hello", (cookie,))):
                        began = time.perf_counter()
                        response = await get(relay.address, path, *headers)
                        latencies.append(time.perf_counter() - began)
                        assert response.status == 200, (path, response.status)
                    await trio.sleep(0.5)
                    if len(closed) == SLOW_CLIENTS:
                        break
                with trio.move_on_after(SLACK):
                    await poll(
                        lambda: len(closed) == SLOW_CLIENTS, what="every slow client cut off"
                    )
                nursery.cancel_scope.cancel()
        print(f"\nnormal requests beside {SLOW_CLIENTS} slow clients (s): {describe(latencies)}")
        still_open = SLOW_CLIENTS - len(closed)
        print(f"slow clients cut off after (s): {describe(closed)}; still open: {still_open}")
        assert max(latencies) < NORMAL_LATENCY
        # RelaySettings.header_timeout: the time a client may take to send its request head.
        assert len(closed) == SLOW_CLIENTS
        assert max(closed) <= HEADER_TIMEOUT + SLACK


#: The relay's --body-timeout in the stalled-upload test, seconds.
BODY_TIMEOUT = 1.0


async def test_a_stalled_upload_gets_408_and_is_withdrawn_from_the_daemon(lab: Lab) -> None:
    """A client that sends a request head and part of its body, then stops, is answered 408
    after the relay's body timeout, and the daemon's handler for it ends: a stalled upload
    holds neither a stream nor the daemon's work open. Other requests are served meanwhile."""
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay("relay", "--body-timeout", str(BODY_TIMEOUT))
        key = await lab.key(relay)
        daemon = await lab.fault_daemon(relay.ws_url, key, "laptop")
        _, cookie = await sign_in(relay.address, key)
        head = (
            "POST /d/laptop/upload HTTP/1.1\r\n"
            f"Host: {relay.url.split('://', 1)[1]}\r\n"
            f"{cookie[0]}: {cookie[1]}\r\nOrigin: {relay.url}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n"
        ).encode()
        stream = await trio.open_tcp_stream(*relay.address)
        async with stream:
            started = trio.current_time()
            await stream.send_all(head + b"x" * 100)

            async def daemon_busy() -> bool:
                return bool((await daemon.health())["active"] == 1)

            await poll(daemon_busy, what="the daemon receiving the upload")
            # Meanwhile the relay serves others as usual.
            assert (await get(relay.address, "/d/laptop/hello", cookie)).status == 200
            answer = b""
            with trio.fail_after(BODY_TIMEOUT + SLACK):
                while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    answer += data
            waited = trio.current_time() - started
        print(f"\nstalled upload answered after {waited:.2f} s: {answer[:40]!r}")
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"body_timeout" in answer
        assert BODY_TIMEOUT <= waited <= BODY_TIMEOUT + SLACK

        async def daemon_idle() -> bool:
            return bool((await daemon.health())["active"] == 0)

        await poll(daemon_idle, what="the daemon's side of the stalled upload ending")
        assert (await daemon.health())["relay"]["attempts"] == 1
        lab.assert_no_secret(key, session_id_of(cookie))


# ---------------------------------------------------------------------- the daemon endpoint


async def assert_still_serving(relay_address: Address, cookie: tuple[str, str]) -> None:
    response = await get(relay_address, "/d/steady/hello", cookie)
    assert response.status == 200, response.status
    assert response.json()["daemon_id"] == "steady"


async def test_garbage_and_oversized_frames_close_only_the_offending_link(lab: Lab) -> None:
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay()
        key = await lab.key(relay)
        steady = await lab.fault_daemon(relay.ws_url, key, "steady")
        _, cookie = await sign_in(relay.address, key)
        attacks: list[tuple[str, bytes | str, bool]] = [
            ("garbage after the HELLO", b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n" * 4, True),
            ("garbage instead of the HELLO", b"\xff" * 64, False),
            (
                "a frame longer than the maximum",
                encode_frame(FrameType.DATA, 0, 1, b"x" * 64, length=16 * MIB),
                True,
            ),
            ("an unknown frame type", encode_frame(0x7F, 0, 0, b"????"), True),
            ("a text message", "not a frame", True),
        ]
        codes: dict[str, int | None] = {}
        with trio.fail_after(40):
            for index, (name, payload, after_hello) in enumerate(attacks):
                async with open_raw_link(
                    relay.address, key, f"attacker-{index}", handshake=after_hello
                ) as link:
                    if isinstance(payload, str):
                        await link.ws.send_message(payload)
                    else:
                        await link.send(payload)
                    _, reason = await link.frames_until_closed()
                codes[name] = reason.code
                await assert_still_serving(relay.address, cookie)

            # A WebSocket message past the link's maximum (4 MiB): refused by size, not buffered.
            async with open_link_websocket(relay.address, link_headers(key, "attacker-big")) as ws:
                link = RawLink(ws)
                await link.hello()
                await link.send(b"z" * (5 * MIB))
                _, reason = await link.frames_until_closed()
            codes["a 5 MiB WebSocket message"] = reason.code
            await assert_still_serving(relay.address, cookie)

            wrong_version = await link_refusal(
                relay.address, link_headers(key, "attacker-old", protocol="99")
            )
            codes["protocol version 99"] = wrong_version.code
            await assert_still_serving(relay.address, cookie)
        print("\n" + "\n".join(f"{name}: closed with {code}" for name, code in codes.items()))
        for name, _, _ in attacks:
            assert codes[name] == CloseCode.PROTOCOL_ERROR, name
        assert codes["a 5 MiB WebSocket message"] in (1009, CloseCode.PROTOCOL_ERROR)
        assert codes["protocol version 99"] == CloseCode.INCOMPATIBLE_VERSION
        # The honest daemon's link never noticed.
        assert (await steady.health())["relay"]["attempts"] == 1


# ---------------------------------------------------------------------- wrong keys


async def try_key(address: Address, key: str) -> HttpResponse:
    return await http_request(
        address,
        "POST",
        "/auth",
        body=form_body(api_key=key),
        headers=[("Content-Type", "application/x-www-form-urlencoded")],
    )


def allowed_attempts(elapsed: float) -> float:
    """Most wrong keys the auth limit lets through from one address in ``elapsed`` seconds."""
    return AUTH_BURST + AUTH_RATE_PER_MINUTE * elapsed / 60 + 1


async def test_a_flood_of_wrong_keys_is_limited_and_the_users_link_stays_up(lab: Lab) -> None:
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay()
        key = await lab.key(relay)
        daemon = await lab.fault_daemon(relay.ws_url, key, "laptop")
        _, cookie = await sign_in(relay.address, key)
        statuses: Counter[int] = Counter()
        with trio.fail_after(60):
            began = trio.current_time()
            for _ in range(WRONG_KEYS):
                response = await try_key(relay.address, unknown_key())
                statuses[response.status] += 1
                if response.status == 429:
                    retry_after = response.header("retry-after")
                    assert retry_after is not None and int(retry_after) >= 1
            elapsed = trio.current_time() - began
            print(f"\n{WRONG_KEYS} wrong keys in {elapsed:.1f} s, one at a time: {dict(statuses)}")
            assert set(statuses) <= {401, 429}
            assert AUTH_BURST <= statuses[401] <= allowed_attempts(elapsed)

            # The user's daemon, on the same address, stayed connected and reachable throughout.
            status = (await daemon.health())["relay"]
            assert status["state"] == "connected"
            assert status["attempts"] == 1
            assert (await get(relay.address, "/d/laptop/hello", cookie)).status == 200
        lab.assert_no_secret(key, session_id_of(cookie))


async def held_back_attempt(
    address: Address, key: str, heads_sent: list[int], go: trio.Event, statuses: Counter[int]
) -> None:
    """POST ``key`` to /auth, sending the body only once ``go`` is set."""
    body = form_body(api_key=key)
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = h11.Request(
            method="POST",
            target="/auth",
            headers=[
                ("Host", f"{address[0]}:{address[1]}"),
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Content-Length", str(len(body))),
            ],
        )
        await stream.send_all(conn.send(head) or b"")
        heads_sent[0] += 1
        await go.wait()
        await stream.send_all(
            (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        )
        for _ in range(MAX_READS):
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(64 * KIB))
            elif isinstance(event, h11.Response):
                statuses[event.status_code] += 1
                return
            else:
                raise AssertionError(f"unexpected answer: {event!r}")
        raise AssertionError("no answer")


async def test_wrong_keys_whose_bodies_lag_are_still_limited_to_the_burst(lab: Lab) -> None:
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay()
        statuses: Counter[int] = Counter()
        heads_sent = [0]
        go = trio.Event()
        with trio.fail_after(30):
            began = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(CONCURRENT_WRONG_KEYS):
                    nursery.start_soon(
                        held_back_attempt, relay.address, unknown_key(), heads_sent, go, statuses
                    )
                await poll(lambda: heads_sent[0] == CONCURRENT_WRONG_KEYS, what="every head sent")
                # Time for the relay to start handling every request it has the head of.
                await trio.sleep(HOLD_BACK)
                go.set()
            elapsed = trio.current_time() - began
        print(f"\n{CONCURRENT_WRONG_KEYS} wrong keys, bodies held back: {dict(statuses)}")
        assert set(statuses) <= {401, 429}
        assert statuses[401] <= allowed_attempts(elapsed)


async def test_after_wrong_keys_the_right_key_still_links_a_daemon_from_that_address(
    lab: Lab,
) -> None:
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay()
        key = await lab.key(relay)
        with trio.fail_after(30):
            for _ in range(AUTH_BURST + 5):
                await try_key(relay.address, unknown_key())
            assert (await try_key(relay.address, unknown_key())).status == 429
            async with open_raw_link(relay.address, key, "desktop", handshake=False) as link:
                try:
                    await link.hello()
                except trio_websocket.ConnectionClosed as exc:
                    raise AssertionError(
                        f"a link with the right key was refused after wrong keys: {exc.reason}"
                    ) from None
            # And as a real connector sees it.
            connector = Connector(
                ConnectorConfig(
                    relay_url=relay.ws_url, api_key=key, daemon_id="tablet", daemon_port=free_port()
                )
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connector.run)
                with trio.fail_after(5):
                    await connector.wait_state(LinkState.CONNECTED)
                nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- browsers


async def test_cross_site_websockets_traversal_and_cookie_flags(lab: Lab) -> None:
    with trio.fail_after(TEST_DEADLINE):
        export = lab.root / "export"
        (export / "assets").mkdir(parents=True)
        (export / "index.html").write_text("<!doctype html><title>dashboard</title>")
        (export / "assets" / "app.js").write_text("// app")
        marker = secrets.token_hex(16)
        (lab.root / "secret.txt").write_text(marker)
        relay = await lab.relay("relay", "--dashboard-dir", str(export))
        key = await lab.key(relay)
        daemon = await lab.fault_daemon(relay.ws_url, key, "laptop")
        signed_in, cookie = await sign_in(relay.address, key)
        with trio.fail_after(40):
            # The cookie: a random session id, HttpOnly, SameSite=Lax, Path=/, not Secure on http.
            set_cookie = signed_in.header("set-cookie")
            assert set_cookie is not None and key not in set_cookie
            flags = cookie_attributes(set_cookie)
            assert "httponly" in flags
            assert flags.get("samesite", "").lower() == "lax"
            assert flags.get("path") == "/"
            assert "secure" not in flags

            # Cross-site WebSocket upgrades to tunneled paths are refused before the daemon.
            for path in ("/d/laptop/ws", "/ws"):
                for origin in ("http://evil.example", "null", f"http://127.0.0.1:{relay.port + 1}"):
                    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                        async with open_browser_websocket(
                            relay.address, path, [cookie, ("Origin", origin)]
                        ):
                            pass
                    assert refused.value.status_code == 403, (path, origin)
            assert ("GET", "/ws") not in await daemon.seen()
            # The relay's own origin (and a client sending none) get through.
            async with open_browser_websocket(
                relay.address, "/d/laptop/ws", [cookie, ("Origin", relay.url)]
            ) as ws:
                assert (await next_text(ws)).startswith("tick")

            # Path traversal on the dashboard's files, plain and encoded: never outside the export.
            traversals = [
                "/dashboard/../secret.txt",
                "/dashboard/../../secret.txt",
                "/dashboard/assets/../../secret.txt",
                "/dashboard/..%2fsecret.txt",
                "/dashboard/%2e%2e/secret.txt",
                "/dashboard/%2e%2e%2fsecret.txt",
                "/dashboard/%252e%252e/secret.txt",
                "/dashboard/..%5csecret.txt",
                "/dashboard/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                "/dashboard//etc/passwd",
                "/dashboard/....//secret.txt",
                "/dashboard/assets%2f..%2f..%2fsecret.txt",
                "/d/laptop/dashboard/../secret.txt",
                "/d/laptop/dashboard/%2e%2e/secret.txt",
                "/static/../../secret.txt",
                "/static/%2e%2e/%2e%2e/secret.txt",
            ]
            for path in traversals:
                response = await get(relay.address, path, cookie)
                assert response.status == 404, (path, response.status)
                assert marker.encode() not in response.body, path
                assert b"root:" not in response.body, path
            assert (await get(relay.address, "/dashboard/assets/app.js", cookie)).status == 200

        # Behind an https public URL the same cookie is Secure.
        tls_relay = await lab.relay("tls-relay", "--public-url", "https://relay.example")
        tls_key = await lab.key(tls_relay)
        await lab.fault_daemon(tls_relay.ws_url, tls_key, "laptop")
        with trio.fail_after(20):
            secure_sign_in, _ = await sign_in(tls_relay.address, tls_key)
        secure_cookie = secure_sign_in.header("set-cookie")
        assert secure_cookie is not None
        secure_flags = cookie_attributes(secure_cookie)
        assert "secure" in secure_flags and "httponly" in secure_flags
        assert secure_flags.get("samesite", "").lower() == "lax"


# ---------------------------------------------------------------------- scope isolation


async def test_one_scopes_credentials_never_reach_another_scopes_daemon(lab: Lab) -> None:
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay()
        victim_key = await lab.key(relay, "victim")
        attacker_key = await lab.key(relay, "attacker")
        victim = await lab.fault_daemon(relay.ws_url, victim_key, "victim")
        await lab.fault_daemon(relay.ws_url, attacker_key, "attacker")
        _, victim_cookie = await sign_in(relay.address, victim_key)
        _, cookie = await sign_in(relay.address, attacker_key)
        origin = ("Origin", relay.url)
        bearer = ("Authorization", f"Bearer {attacker_key}")
        with trio.fail_after(40):
            # HTTP on every method, with the attacker's session and with its key as a Bearer.
            for method in ("GET", "POST", "PUT", "DELETE"):
                for path in ("/d/victim/hello", "/d/victim/big?size=10", "/d/victim/upload"):
                    body = None if method == "GET" else b"{}"
                    response = await http_request(
                        relay.address, method, path, body=body, headers=[cookie, origin]
                    )
                    assert response.status == 503, (method, path, response.status)
                    assert response.json()["error"] == "daemon_offline"
                    with_key = await http_request(
                        relay.address, method, path, body=body, headers=[bearer]
                    )
                    assert with_key.status == 401, (method, path, with_key.status)
            # The refusal is the same as for an id nobody uses: no oracle for other scopes.
            victims = await get(relay.address, "/d/victim/hello", cookie)
            ghosts = await get(relay.address, "/d/ghost/hello", cookie)
            assert victims.status == ghosts.status == 503
            assert victims.json()["detail"].replace("victim", "ghost") == ghosts.json()["detail"]
            # WebSocket.
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with open_browser_websocket(relay.address, "/d/victim/ws", [cookie, origin]):
                    pass
            assert refused.value.status_code == 503
            # The API lists only the caller's scope, by key and by session, at the root or under
            # the victim's prefix.
            for path in ("/api/v1/daemons", "/d/victim/api/v1/daemons"):
                for credential in (bearer, cookie):
                    listing = await get(relay.address, path, credential)
                    assert listing.status == 200
                    ids = [entry["daemon_id"] for entry in listing.json()["daemons"]]
                    assert ids == ["attacker"], (path, ids)

            # Mesh streams from a connector of the attacker's scope.
            prober = Connector(
                ConnectorConfig(
                    relay_url=relay.ws_url,
                    api_key=attacker_key,
                    daemon_id="prober",
                    daemon_port=free_port(),
                )
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(prober.run)
                await prober.wait_state(LinkState.CONNECTED)
                assert sorted(await prober.other_daemons()) == ["attacker"]
                for method, path in (
                    ("POST", "/notify"),
                    ("POST", "/broadcast"),
                    ("GET", "/hello"),
                ):
                    with pytest.raises(MeshError) as failed:
                        await prober.request("victim", method, path, body=b"{}")
                    assert failed.value.code == "unknown_daemon"
                nursery.cancel_scope.cancel()

            # An impostor with the victim's daemon id in the attacker's scope is a separate
            # daemon: it takes nothing over, and the victim stays reachable by its own scope.
            impostor = await lab.fault_daemon(relay.ws_url, attacker_key, "victim")
            mine = await get(relay.address, "/d/victim/health", cookie)
            assert mine.status == 200
            assert mine.json()["pid"] == impostor.child.process.pid
            theirs = await get(relay.address, "/d/victim/health", victim_cookie)
            assert theirs.status == 200
            assert theirs.json()["pid"] == victim.child.process.pid
            assert (await victim.health())["relay"]["attempts"] == 1

        # Nothing the attacker sent ever reached the victim's daemon.
        assert await victim.seen() == []
        lab.assert_no_secret(
            victim_key, attacker_key, session_id_of(cookie), session_id_of(victim_cookie)
        )
