"""The daemon's plain HTTP routes and their errors, against a real server on loopback."""

from __future__ import annotations

import json
import re

import pytest
import trio

from repowire.daemon import DaemonSettings, DaemonState, Peer
from tests.support.clients import HttpResponse, open_http_stream
from tests.support.daemons import DaemonFactory

JSON = [("Content-Type", "application/json")]


def assert_error(
    response: HttpResponse, status: int, code: str, *, extra: frozenset[str] = frozenset()
) -> None:
    """An error answer: ``error`` and ``detail``, and only the ``extra`` fields beside."""
    assert response.status == status, response.body
    assert response.header("content-type") == "application/json"
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    assert set(body) == {"error", "detail"} | extra


async def test_health_without_relay(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="home.box-1")
        response = await daemon.request("GET", "/health")
    assert response.status == 200
    assert response.json() == {
        "status": "ok",
        "daemon_id": "home.box-1",
        "version": "0.0.test",
        "relay": {"state": "disabled"},
    }


async def test_health_reports_relay_status(daemon_factory: DaemonFactory) -> None:
    status = {"state": "connected", "url": "wss://relay.test"}
    with trio.fail_after(10):
        daemon = await daemon_factory(relay_status=lambda: status)
        first = await daemon.request("GET", "/health")
        status["state"] = "down"
        second = await daemon.request("GET", "/health")
    assert first.json()["relay"] == {"state": "connected", "url": "wss://relay.test"}
    assert second.json()["relay"]["state"] == "down"


async def test_health_survives_a_failing_status_callable(daemon_factory: DaemonFactory) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("boom")

    with trio.fail_after(10):
        daemon = await daemon_factory(relay_status=broken)
        response = await daemon.request("GET", "/health")
    assert response.status == 200
    assert response.json()["relay"] == {"state": "unknown"}


async def test_peers_lifecycle_emits_events(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        created = await daemon.request(
            "POST", "/peers", json_body={"name": "bob", "meta": {"cwd": "/src"}}
        )
        listed = await daemon.request("GET", "/peers")
        deleted = await daemon.request("DELETE", "/peers/bob")
        after = await daemon.request("GET", "/peers")
        events = await daemon.request("GET", "/events")
    assert created.status == 201
    peer = {"name": "bob", "registered_at": 1_700_000_000.0, "meta": {"cwd": "/src"}}
    assert created.json() == {"peer": peer}
    assert listed.json() == {"peers": [peer]}
    assert deleted.status == 204
    assert deleted.body == b""
    assert after.json() == {"peers": []}
    assert [(e["type"], e["data"]) for e in events.json()["events"]] == [
        ("peer_joined", peer),
        ("peer_left", {"name": "bob"}),
    ]


async def test_reregistering_a_peer_answers_200(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        await daemon.request("POST", "/peers", json_body={"name": "bob"})
        again = await daemon.request("POST", "/peers", json_body={"name": "bob", "meta": {"v": 2}})
    assert again.status == 200
    assert again.json()["peer"]["meta"] == {"v": 2}
    assert len(daemon.state.peers()) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"name": "bad name"},
        {"name": ""},
        {"name": "x" * 65},
        {"name": 7},
        {},
        {"name": "ok", "meta": [1, 2]},
        {"name": "ok", "meta": "text"},
    ],
)
async def test_add_peer_rejects_bad_input(daemon_factory: DaemonFactory, body: object) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        response = await daemon.request("POST", "/peers", json_body=body)
    assert_error(response, 400, "bad_request")
    assert daemon.state.peers() == []
    assert daemon.state.last_event_id == 0


async def test_peer_table_full_is_a_clear_error(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory(state=DaemonState(max_peers=1))
        await daemon.request("POST", "/peers", json_body={"name": "a"})
        response = await daemon.request("POST", "/peers", json_body={"name": "b"})
    assert_error(response, 409, "too_many_peers")


async def test_delete_unknown_peer(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        response = await daemon.request("DELETE", "/peers/ghost")
    assert_error(response, 404, "unknown_peer")


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"{not json", JSON),
        (b"[1, 2]", JSON),
        (b'"text"', JSON),
        (b"", JSON),
        (b"\xff\xfe\xfa", JSON),
        (b'{"name": NaN}', JSON),
        (b"[" * 100_000 + b"]" * 100_000, JSON),
    ],
    ids=["syntax", "array", "string", "empty", "not-utf8", "nan", "deep"],
)
async def test_bad_json_bodies_get_400(
    daemon_factory: DaemonFactory, body: bytes, headers: list[tuple[str, str]]
) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        response = await daemon.request("POST", "/peers", body=body, headers=headers)
        still_up = await daemon.request("GET", "/health")
    assert_error(response, 400, "bad_request")
    assert still_up.status == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_json_routes_require_the_json_content_type(
    daemon_factory: DaemonFactory, content_type: str | None
) -> None:
    headers = [] if content_type is None else [("Content-Type", content_type)]
    with trio.fail_after(10):
        daemon = await daemon_factory()
        daemon.state.add_peer("bob")
        for path in ("/peers", "/notify", "/broadcast"):
            response = await daemon.request(
                "POST",
                path,
                body=json.dumps({"name": "x", "to": "bob", "text": "hi"}).encode(),
                headers=headers,
            )
            assert_error(response, 415, "unsupported_media_type")
    assert [p.name for p in daemon.state.peers()] == ["bob"]
    assert daemon.state.last_event_id == 1


async def test_body_over_the_limit_gets_413(daemon_factory: DaemonFactory) -> None:
    limit = 1024
    with trio.fail_after(10):
        daemon = await daemon_factory(settings=DaemonSettings(max_body_bytes=limit))
        daemon.state.add_peer("bob")
        text = "x" * limit
        response = await daemon.request("POST", "/notify", json_body={"to": "bob", "text": text})
        just_fits = await daemon.request(
            "POST", "/notify", json_body={"to": "bob", "text": "x" * (limit - 40)}
        )
    assert_error(response, 413, "payload_too_large")
    assert str(limit) in response.json()["detail"]
    assert just_fits.status == 200
    # Only the message that fit was delivered.
    assert [e.type for e in daemon.state.events_after(0, 10)] == ["peer_joined", "message"]


async def test_default_body_limit_is_one_mebibyte(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        daemon.state.add_peer("bob")
        over = await daemon.request(
            "POST", "/notify", json_body={"to": "bob", "text": "x" * (1024 * 1024)}
        )
        under = await daemon.request(
            "POST", "/notify", json_body={"to": "bob", "text": "x" * (1024 * 1024 - 100)}
        )
    assert_error(over, 413, "payload_too_large")
    assert under.status == 200


async def test_chunked_body_over_the_limit_gets_413(daemon_factory: DaemonFactory) -> None:
    limit = 1024
    with trio.fail_after(10):
        daemon = await daemon_factory(settings=DaemonSettings(max_body_bytes=limit))
        daemon.state.add_peer("bob")
        body = json.dumps({"to": "bob", "text": "y" * 4 * limit}).encode()
        # No Content-Length: h11 sends the body chunked, so the limit applies while reading.
        async with open_http_stream(
            daemon.address,
            "POST",
            "/notify",
            body=body,
            headers=[*JSON, ("Transfer-Encoding", "chunked")],
        ) as response:
            content = await response.read_all()
    assert response.status == 413
    assert json.loads(content)["error"] == "payload_too_large"
    assert daemon.state.last_event_id == 1


async def test_unknown_route_and_method_are_json(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        missing = await daemon.request("GET", "/no/such/thing?x=1")
        wrong_method = await daemon.request("PUT", "/health")
        plain_ws = await daemon.request("GET", "/ws")
    assert_error(missing, 404, "not_found")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert "GET" in (wrong_method.header("allow") or "")
    assert_error(plain_ws, 426, "upgrade_required")


async def test_events_paging_and_limits(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        for i in range(150):
            daemon.state.publish("message", {"i": i})
        default = await daemon.request("GET", "/events")
        page = await daemon.request("GET", "/events?after=140&limit=5")
        tail = await daemon.request("GET", "/events?after=148")
        biggest = await daemon.request("GET", "/events?limit=1000")
    assert [e["id"] for e in default.json()["events"]] == list(range(1, 101))
    assert [e["id"] for e in page.json()["events"]] == [141, 142, 143, 144, 145]
    assert [e["data"]["i"] for e in tail.json()["events"]] == [148, 149]
    assert len(biggest.json()["events"]) == 150
    first = default.json()["events"][0]
    assert first == {"id": 1, "type": "message", "time": 1_700_000_000.0, "data": {"i": 0}}


@pytest.mark.parametrize(
    "query",
    [
        "after=-1",
        "after=abc",
        "after=1.5",
        "after=",
        "limit=0",
        "limit=1001",
        "limit=ten",
        "after=+3",
    ],
)
async def test_events_bad_parameters_get_400(daemon_factory: DaemonFactory, query: str) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        response = await daemon.request("GET", f"/events?{query}")
    assert_error(response, 400, "bad_request")


async def test_notify_local_peer(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="alpha")
        daemon.state.add_peer("bob")
        plain = await daemon.request(
            "POST", "/notify", json_body={"to": "bob", "text": "hello", "from": "alice"}
        )
        # peer@<this daemon> is local too, and 'from' is optional.
        qualified = await daemon.request(
            "POST", "/notify", json_body={"to": "bob@alpha", "text": "again"}
        )
    assert plain.status == 200
    answer = plain.json()
    # Without an id of the sender's, the daemon names the message itself.
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", answer.pop("id"))
    assert answer == {"delivered": True, "to": "bob", "daemon_id": "alpha", "event_id": 2}
    assert qualified.json()["event_id"] == 3
    messages = [e for e in daemon.state.events_after(0, 10) if e.type == "message"]
    assert [dict(m.data) for m in messages] == [
        {"from": "alice", "to": "bob", "text": "hello"},
        {"from": None, "to": "bob", "text": "again"},
    ]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"to": "ghost", "text": "hi"}, 404, "unknown_peer"),
        ({"to": "bob", "text": 5}, 400, "bad_request"),
        ({"to": "bob"}, 400, "bad_request"),
        ({"text": "hi"}, 400, "bad_request"),
        ({"to": "bob@", "text": "hi"}, 400, "bad_request"),
        ({"to": "@alpha", "text": "hi"}, 400, "bad_request"),
        ({"to": "bob@a@b", "text": "hi"}, 400, "bad_request"),
        ({"to": "bob", "text": "hi", "from": 3}, 400, "bad_request"),
        ({"to": "bob", "text": "hi", "from": "x" * 257}, 400, "bad_request"),
        ({"to": "bob@elsewhere", "text": "hi"}, 503, "relay_disabled"),
    ],
)
async def test_notify_errors(
    daemon_factory: DaemonFactory, body: dict[str, object], status: int, code: str
) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="alpha")
        daemon.state.add_peer("bob")
        response = await daemon.request("POST", "/notify", json_body={**body, "id": "m-1"})
    # Every notify answer names the message, so the sender can retry it safely.
    assert_error(response, status, code, extra=frozenset({"id"}))
    assert response.json()["id"] == "m-1"
    assert daemon.state.last_event_id == 1  # only the peer_joined


async def test_broadcast_local_only(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        daemon.state.add_peer("bob")
        daemon.state.add_peer("carol")
        response = await daemon.request(
            "POST", "/broadcast", json_body={"text": "standup", "from": "alice"}
        )
        missing_text = await daemon.request("POST", "/broadcast", json_body={"from": "alice"})
    assert response.status == 200
    assert response.json() == {
        "results": [{"target": "bob", "ok": True}, {"target": "carol", "ok": True}]
    }
    messages = [dict(e.data) for e in daemon.state.events_after(0, 10) if e.type == "message"]
    assert messages == [
        {"from": "alice", "to": "bob", "text": "standup"},
        {"from": "alice", "to": "carol", "text": "standup"},
    ]
    assert_error(missing_text, 400, "bad_request")


async def test_broadcast_without_peers(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        response = await daemon.request("POST", "/broadcast", json_body={"text": "anyone?"})
    assert response.json() == {"results": []}


async def test_bad_mesh_from_header_is_refused(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        daemon.state.add_peer("bob")
        response = await daemon.request(
            "POST",
            "/notify",
            json_body={"to": "bob", "text": "hi"},
            headers=[("Repowire-Mesh-From", "not a daemon id")],
        )
    assert_error(response, 400, "bad_request")
    assert daemon.state.last_event_id == 1


async def test_handler_crash_is_a_json_500_without_traceback(
    daemon_factory: DaemonFactory, caplog: pytest.LogCaptureFixture
) -> None:
    class ExplodingState(DaemonState):
        def peers(self) -> list[Peer]:
            raise RuntimeError("secret internal detail")

    with trio.fail_after(10):
        daemon = await daemon_factory(state=ExplodingState())
        response = await daemon.request("GET", "/peers?token=abc")
    assert_error(response, 500, "internal_error")
    assert b"secret internal detail" not in response.body
    assert b"Traceback" not in response.body
    # The crash is logged for the operator, without the query string.
    assert any("RuntimeError" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    assert not any("token=abc" in r.getMessage() for r in caplog.records)


async def test_overlong_peer_name_is_not_echoed_whole(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        response = await daemon.request("POST", "/peers", json_body={"name": "n" * 100_000})
    assert_error(response, 400, "bad_request")
    assert len(response.body) < 1000
