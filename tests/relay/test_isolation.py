"""Who reaches which daemon: scope isolation, the choice of daemon, and the mesh.

A browser session of one scope must never reach a daemon of another, whatever the route;
plain paths reach the scope's longest-connected daemon, ``/d/<id>/`` exactly that one; and
daemons of one scope reach each other (through real connectors) while other scopes' daemons
stay invisible.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import attrs
import pytest
import trio
from trio_websocket import ConnectionRejected

from connector import MESH_FROM_HEADER
from relay import KeyRecord
from tests.support.clients import http_request, open_browser_websocket, open_http_stream
from tests.support.relays import RunningStack, StackFactory
from tests.support.stack import ConnectedDaemon, start_connected_daemon
from tests.support.stand_in import SeenRequest, identity_handler, start_stand_in
from tests.support.waiting import eventually

#: Requests tried on each plain path, to show the choice of daemon never varies.
REPEATS = 5

#: Every tunneled route of the daemon's API (docs/ARCHITECTURE.md), and then some.
ROUTES = [
    ("GET", "/"),
    ("GET", "/health"),
    ("GET", "/peers"),
    ("POST", "/peers"),
    ("DELETE", "/peers/bob"),
    ("GET", "/events?after=0"),
    ("GET", "/events/stream"),
    ("POST", "/notify"),
    ("POST", "/broadcast"),
    ("GET", "/no/such/route"),
    ("PUT", "/anything"),
]


def dashboard_dir(tmp_path: Path) -> Path:
    root = tmp_path / "dashboard"
    root.mkdir(exist_ok=True)
    (root / "index.html").write_text("<!doctype html><title>dashboard</title>")
    return root


def origin_of(stack: RunningStack) -> tuple[str, str]:
    return ("Origin", f"http://127.0.0.1:{stack.relay.address[1]}")


# ---------------------------------------------------------------------- scopes


async def test_a_session_never_reaches_another_scopes_daemon_on_any_route(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(20):
        stack = await stacks()
        relay = stack.relay
        record_a, key_a = await relay.new_scope("alice")
        _record_b, key_b = await relay.new_scope("bob")
        seen_a: list[SeenRequest] = []
        seen_b: list[SeenRequest] = []
        await start_stand_in(
            stack.links, relay.address, key_a, "alices", identity_handler("A", seen_a)
        )
        b_daemon = await start_stand_in(
            stack.links, relay.address, key_b, "bobs", identity_handler("B", seen_b)
        )
        cookie_a = await relay.session_cookie(record_a)
        for method, path in ROUTES:
            body = None if method == "GET" else b"{}"
            response = await http_request(
                relay.address, method, f"/d/bobs{path}", body=body, headers=[cookie_a]
            )
            assert response.status == 503, (method, path, response.body)
            assert response.json()["error"] == "daemon_offline"
            assert "daemon" not in response.json(), "the answer came from a daemon"
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_browser_websocket(
                relay.address, "/d/bobs/ws", [cookie_a, origin_of(stack)]
            ):
                pass
        assert rejected.value.status_code == 503
        # Its own daemon, by name and by default, is reached as usual.
        own = await http_request(relay.address, "GET", "/d/alices/peers", headers=[cookie_a])
        default = await http_request(relay.address, "GET", "/peers", headers=[cookie_a])
        assert own.json()["daemon"] == default.json()["daemon"] == "A"
        listed = await http_request(relay.address, "GET", "/api/v1/daemons", headers=[cookie_a])
        under_b = await http_request(
            relay.address, "GET", "/d/bobs/api/v1/daemons", headers=[cookie_a]
        )
        assert seen_b == [] and b_daemon.accepted == []
        assert [d["daemon_id"] for d in listed.json()["daemons"]] == ["alices"]
        assert [d["daemon_id"] for d in under_b.json()["daemons"]] == ["alices"]
        assert len(seen_a) == 2


async def test_the_same_daemon_id_in_two_scopes_stays_two_daemons(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack = await stacks()
        relay = stack.relay
        record_a, key_a = await relay.new_scope("alice")
        record_b, key_b = await relay.new_scope("bob")
        await start_stand_in(stack.links, relay.address, key_a, "laptop", identity_handler("A"))
        await start_stand_in(stack.links, relay.address, key_b, "laptop", identity_handler("B"))
        for record, expected in ((record_a, "A"), (record_b, "B")):
            cookie = await relay.session_cookie(record)
            for path in ("/peers", "/d/laptop/peers"):
                response = await http_request(relay.address, "GET", path, headers=[cookie])
                assert response.json()["daemon"] == expected, (expected, path)
            async with open_http_stream(
                relay.address, "GET", "/d/laptop/events/stream", headers=[cookie]
            ) as streamed:
                assert json.loads(await streamed.read_all())["daemon"] == expected


async def test_keys_of_one_scope_share_its_daemons(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack = await stacks()
        relay = stack.relay
        record, key = await relay.new_scope("alice")
        store = relay.running.relay.store
        second_record, _second_key = await store.create_key(
            record.scope_id, label="phone", now=time.time()
        )
        await start_stand_in(stack.links, relay.address, key, "laptop", identity_handler("A"))
        response = await http_request(
            relay.address,
            "GET",
            "/d/laptop/peers",
            headers=[await relay.session_cookie(second_record)],
        )
        assert response.status == 200
        assert response.json()["daemon"] == "A"


@pytest.mark.parametrize(
    "cookie",
    [None, "repowire_session=not-a-session", "repowire_session=", "other=1"],
    ids=["none", "unknown", "empty", "foreign-cookie"],
)
async def test_no_valid_session_reaches_no_daemon(stacks: StackFactory, cookie: str | None) -> None:
    with trio.fail_after(15):
        stack = await stacks()
        relay = stack.relay
        _record, key = await relay.new_scope()
        daemon = await start_stand_in(
            stack.links, relay.address, key, "laptop", identity_handler("A")
        )
        headers = [] if cookie is None else [("Cookie", cookie)]
        for path in ("/peers", "/d/laptop/peers"):
            response = await http_request(relay.address, "GET", path, headers=headers)
            assert response.status == 401, path
            assert response.json()["error"] == "unauthorized"
        assert daemon.accepted == []


# ---------------------------------------------------------------------- choosing a daemon


async def test_plain_paths_reach_the_longest_connected_daemon_and_d_paths_the_named_one(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(20):
        stack = await stacks()
        relay = stack.relay
        record, key = await relay.new_scope()
        cookie = await relay.session_cookie(record)

        async def who(path: str) -> str:
            response = await http_request(relay.address, "GET", path, headers=[cookie])
            assert response.status == 200, (path, response.body)
            answer: str = response.json()["daemon"]
            return answer

        first = await start_stand_in(
            stack.links, relay.address, key, "first", identity_handler("first")
        )
        await trio.sleep(0.01)  # distinct connection times
        await start_stand_in(stack.links, relay.address, key, "second", identity_handler("second"))
        assert [await who("/peers") for _ in range(REPEATS)] == ["first"] * REPEATS
        assert await who("/d/second/peers") == "second"
        assert await who("/d/first/peers") == "first"
        listed = await http_request(relay.address, "GET", "/api/v1/daemons", headers=[cookie])
        defaults = {d["daemon_id"]: d["default"] for d in listed.json()["daemons"]}
        assert defaults == {"first": True, "second": False}
        # The default goes offline: the other one takes over...
        await first.close()
        await eventually(lambda: len(relay.running.relay.links) == 1)
        assert [await who("/peers") for _ in range(REPEATS)] == ["second"] * REPEATS
        # ...and keeps the place when the first comes back (it is now the longest connected).
        await start_stand_in(stack.links, relay.address, key, "first", identity_handler("first"))
        assert [await who("/peers") for _ in range(REPEATS)] == ["second"] * REPEATS
        assert await who("/d/first/peers") == "first"


# ---------------------------------------------------------------------- the mesh


@attrs.frozen(kw_only=True)
class Pair:
    """Two real daemons with real connectors in one scope."""

    record: KeyRecord
    key: str
    cookie: tuple[str, str]
    alpha: ConnectedDaemon
    beta: ConnectedDaemon


async def start_pair(stack: RunningStack, tmp_path: Path) -> Pair:
    """Daemons alpha and beta (with peer bob) in a new scope."""
    record, key = await stack.relay.new_scope("team")
    dashboard = dashboard_dir(tmp_path)
    alpha = await start_connected_daemon(stack.links, stack.relay, key, "alpha", dashboard)
    beta = await start_connected_daemon(stack.links, stack.relay, key, "beta", dashboard)
    beta.state.add_peer("bob")
    return Pair(
        record=record,
        key=key,
        cookie=await stack.relay.session_cookie(record),
        alpha=alpha,
        beta=beta,
    )


def messages(daemon: ConnectedDaemon) -> list[dict[str, object]]:
    return [dict(e.data) for e in daemon.state.events_after(0, 100) if e.type == "message"]


async def test_notify_reaches_a_peer_on_another_daemon_of_the_scope(
    stacks: StackFactory, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        stack = await stacks()
        pair = await start_pair(stack, tmp_path)
        alpha, beta = pair.alpha, pair.beta
        direct = await http_request(
            alpha.address,
            "POST",
            "/notify",
            json_body={"to": "bob@beta", "text": "hi", "from": "ann"},
        )
        assert direct.status == 200, direct.body
        assert direct.json()["delivered"] is True
        # The whole chain: browser, relay, alpha, relay again, beta.
        chained = await http_request(
            stack.relay.address,
            "POST",
            "/d/alpha/notify",
            json_body={"to": "bob@beta", "text": "via the browser"},
            headers=[pair.cookie],
        )
        assert chained.status == 200, chained.body
        assert await alpha.connector.other_daemons() == ["beta"]
        assert messages(beta) == [
            {"from": "ann", "to": "bob", "text": "hi", "via": "alpha"},
            {"from": None, "to": "bob", "text": "via the browser", "via": "alpha"},
        ]


async def test_mesh_targets_that_cannot_be_reached_get_precise_errors(
    stacks: StackFactory, tmp_path: Path
) -> None:
    with trio.fail_after(25):
        stack = await stacks()
        relay = stack.relay
        pair = await start_pair(stack, tmp_path)
        alpha, beta = pair.alpha, pair.beta
        # gamma belonged to the scope and is offline now; delta is online in another scope.
        gamma = await start_stand_in(
            stack.links, relay.address, pair.key, "gamma", identity_handler("g")
        )
        await gamma.close()
        _other_record, other_key = await relay.new_scope("strangers")
        delta = await start_stand_in(
            stack.links, relay.address, other_key, "delta", identity_handler("d")
        )
        cases = [
            ("bob@nosuch", 404, "unknown_daemon"),
            ("bob@gamma", 503, "daemon_offline"),
            ("bob@delta", 404, "unknown_daemon"),
            ("nobody@beta", 404, "unknown_peer"),
        ]
        await eventually(
            lambda: relay.running.relay.links.get(pair.record.scope_id, "gamma") is None
        )
        for to, status, error in cases:
            started = time.perf_counter()
            response = await http_request(
                alpha.address, "POST", "/notify", json_body={"to": to, "text": "x"}
            )
            assert (response.status, response.json()["error"]) == (status, error), to
            assert time.perf_counter() - started < 2.0, f"{to} took too long"
        assert "delta" not in await alpha.connector.other_daemons()
        assert delta.accepted == []
        assert messages(beta) == []


async def test_mesh_streams_only_reach_the_allowlisted_routes(
    stacks: StackFactory, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        stack = await stacks()
        pair = await start_pair(stack, tmp_path)
        alpha, beta = pair.alpha, pair.beta
        listing = await alpha.connector.request("beta", "GET", "/peers")
        adding = await alpha.connector.request(
            "beta",
            "POST",
            "/peers",
            body=b'{"name": "mallory"}',
            headers=[("Content-Type", "application/json")],
        )
        allowed = await alpha.connector.request(
            "beta",
            "POST",
            "/notify",
            body=b'{"to": "bob", "text": "ok"}',
            headers=[("Content-Type", "application/json")],
        )
        assert listing.status == 403
        assert json.loads(listing.body)["error"] == "forbidden"
        assert adding.status == 403
        assert [p.name for p in beta.state.peers()] == ["bob"]
        assert allowed.status == 200


async def test_a_browser_cannot_pose_as_another_daemon(
    stacks: StackFactory, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        stack = await stacks()
        pair = await start_pair(stack, tmp_path)
        response = await http_request(
            stack.relay.address,
            "POST",
            "/d/beta/notify",
            json_body={"to": "bob", "text": "spoofed"},
            headers=[pair.cookie, (MESH_FROM_HEADER, "alpha")],
        )
        assert response.status == 200, response.body
        assert messages(pair.beta) == [{"from": None, "to": "bob", "text": "spoofed"}]
