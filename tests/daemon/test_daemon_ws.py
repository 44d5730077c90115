"""GET /ws: the event feed pushed live, notify requests answered, bad input survived."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from repowire.daemon import DaemonState
from tests.support.clients import http_request, open_websocket
from tests.support.daemons import DaemonFactory
from tests.support.waiting import eventually


async def receive_json(ws: WebSocketConnection) -> dict[str, Any]:
    message = await ws.get_message()
    value = json.loads(message)
    assert isinstance(value, dict)
    return value


async def send_json(ws: WebSocketConnection, value: object) -> None:
    await ws.send_message(json.dumps(value))


async def test_events_are_pushed(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        async with open_websocket(daemon.address, "/ws") as ws:
            await eventually(lambda: daemon.state.subscriber_count == 1)
            for name in ("bob", "carol"):
                posted = await http_request(
                    daemon.address, "POST", "/peers", json_body={"name": name}
                )
                assert posted.status == 201
                pushed = await receive_json(ws)
                assert pushed["type"] == "event"
                assert pushed["event"]["type"] == "peer_joined"
                assert pushed["event"]["data"]["name"] == name


async def test_notify_over_websocket(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="alpha")
        daemon.state.add_peer("bob")
        async with open_websocket(daemon.address, "/ws") as ws:
            await send_json(
                ws, {"type": "notify", "to": "bob", "text": "hi", "from": "ann", "id": "m-1"}
            )
            received = [await receive_json(ws) for _ in range(2)]
    by_type = {m["type"]: m for m in received}
    assert by_type["result"] == {
        "type": "result",
        "ok": True,
        "status": 200,
        "delivered": True,
        "to": "bob",
        "daemon_id": "alpha",
        "event_id": 2,
        "id": "m-1",
    }
    assert by_type["event"]["event"]["data"] == {"from": "ann", "to": "bob", "text": "hi"}


async def test_notify_failure_is_a_result_not_a_close(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        async with open_websocket(daemon.address, "/ws") as ws:
            await send_json(ws, {"type": "notify", "to": "ghost", "text": "hi"})
            unknown = await receive_json(ws)
            await send_json(ws, {"type": "notify", "to": "x@remote", "text": "hi"})
            disabled = await receive_json(ws)
            await send_json(ws, {"type": "notify", "to": 5, "text": "hi"})
            invalid = await receive_json(ws)
    assert unknown == {
        "type": "result",
        "ok": False,
        "status": 404,
        "error": "unknown_peer",
        "detail": unknown["detail"],
        "id": unknown["id"],
    }
    assert disabled["ok"] is False and disabled["error"] == "relay_disabled"
    assert invalid["ok"] is False and invalid["status"] == 400
    assert daemon.state.last_event_id == 0


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        "[1, 2, 3]",
        '"just a string"',
        '{"type": "dance"}',
        '{"no": "type"}',
        '{"type": "subscribe", "after": -1}',
        '{"type": "subscribe", "after": "3"}',
        '{"type": "subscribe", "after": true}',
        b"\xff\xfe binary garbage",
    ],
)
async def test_bad_messages_get_an_error_and_the_connection_stays(
    daemon_factory: DaemonFactory, raw: str | bytes
) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        daemon.state.add_peer("bob")
        async with open_websocket(daemon.address, "/ws") as ws:
            await ws.send_message(raw)
            error = await receive_json(ws)
            # Still open and still working.
            await send_json(ws, {"type": "notify", "to": "bob", "text": "still here"})
            after = [await receive_json(ws) for _ in range(2)]
    assert error["type"] == "error"
    assert error["error"] == "bad_request"
    assert isinstance(error["detail"], str) and error["detail"]
    assert {m["type"] for m in after} == {"result", "event"}


async def test_subscribe_sends_the_backlog_first(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        for i in range(4):
            daemon.state.publish("message", {"i": i})
        async with open_websocket(daemon.address, "/ws") as ws:
            await send_json(ws, {"type": "subscribe", "after": 2})
            backlog = [(await receive_json(ws))["event"]["id"] for _ in range(2)]
            daemon.state.publish("message", {"i": 4})
            live = (await receive_json(ws))["event"]["id"]
            # Subscribing again rewinds the feed.
            await send_json(ws, {"type": "subscribe", "after": 3})
            again = [(await receive_json(ws))["event"]["id"] for _ in range(2)]
    assert backlog == [3, 4]
    assert live == 5
    assert again == [4, 5]


async def test_after_query_parameter_starts_with_backlog(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        for i in range(3):
            daemon.state.publish("message", {"i": i})
        async with open_websocket(daemon.address, "/ws?after=1") as ws:
            ids = [(await receive_json(ws))["event"]["id"] for _ in range(2)]
    assert ids == [2, 3]


async def test_keeps_receiving_while_events_are_pushed(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(15):
        daemon = await daemon_factory()
        daemon.state.add_peer("bob")
        results: list[dict[str, Any]] = []
        events = 0
        async with open_websocket(daemon.address, "/ws") as ws:
            await eventually(lambda: daemon.state.subscriber_count == 1)
            async with trio.open_nursery() as nursery:

                async def publish_constantly() -> None:
                    for i in range(10_000):
                        daemon.state.publish("peer_left", {"name": f"p{i}"})
                        await trio.sleep(0.001)

                nursery.start_soon(publish_constantly)
                for i in range(5):
                    await send_json(ws, {"type": "notify", "to": "bob", "text": str(i)})
                    while True:
                        message = await receive_json(ws)
                        if message["type"] == "result":
                            results.append(message)
                            break
                        events += 1
                nursery.cancel_scope.cancel()
    assert [r["ok"] for r in results] == [True] * 5
    assert events > 0


async def test_feed_that_falls_behind_is_ended_clearly(daemon_factory: DaemonFactory) -> None:
    state = DaemonState(subscriber_buffer=4)
    payload = "w" * 200_000
    with trio.fail_after(20):
        daemon = await daemon_factory(state=state)
        async with open_websocket(
            daemon.address, "/ws", message_queue_size=1, max_message_size=1024 * 1024
        ) as ws:
            await eventually(lambda: state.subscriber_count == 1)
            # Nothing is read meanwhile; publishing must not block.
            for i in range(60):
                state.publish("message", {"i": i, "pad": payload})
                await trio.sleep(0.001)
            await eventually(lambda: state.subscriber_count == 0)
            ids: list[int] = []
            while True:
                message = await receive_json(ws)
                if message["type"] != "event":
                    break
                ids.append(message["event"]["id"])
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
    assert message["type"] == "error"
    assert message["error"] == "feed_dropped"
    assert message["last_id"] == (ids[-1] if ids else 0)
    assert ids == list(range(1, len(ids) + 1))
    assert len(ids) < 60
    assert info.value.reason is not None and info.value.reason.code == 1013


def upgrade_headers(origin: str) -> list[tuple[str, str]]:
    return [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Origin", origin),
    ]


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "file://", "http://"])
async def test_foreign_origin_is_refused(daemon_factory: DaemonFactory, origin: str) -> None:
    # Sent by hand: the handshake must fail with a JSON answer, and a raw client shows it.
    with trio.fail_after(10):
        daemon = await daemon_factory()
        response = await http_request(daemon.address, "GET", "/ws", headers=upgrade_headers(origin))
    assert response.status == 403
    assert response.json()["error"] == "forbidden"
    assert daemon.state.subscriber_count == 0


async def test_same_host_and_loopback_origins_are_accepted(
    daemon_factory: DaemonFactory,
) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        same_host = f"http://{daemon.address[0]}:{daemon.address[1]}"
        for origin in (same_host, "http://localhost:3000", "http://127.0.0.1"):
            async with open_websocket(daemon.address, "/ws", origin=origin):
                await eventually(lambda: daemon.state.subscriber_count == 1)
            await eventually(lambda: daemon.state.subscriber_count == 0)


async def test_closing_releases_the_subscription(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        for _ in range(3):
            async with open_websocket(daemon.address, "/ws"):
                await eventually(lambda: daemon.state.subscriber_count == 1)
            await eventually(lambda: daemon.state.subscriber_count == 0)
