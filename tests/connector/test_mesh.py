"""Daemon-to-daemon traffic through one relay, with real daemons and real connectors."""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs
import pytest
import trio

from connector import LinkState, MeshError
from relay import KeyRecord
from repowire.daemon import DaemonState
from tests.support.clients import http_request
from tests.support.relays import RelayHandle
from tests.support.stack import ConnectedDaemon, Stack
from tests.support.waiting import eventually

JSON = [("Content-Type", "application/json")]


@attrs.define(kw_only=True)
class Mesh:
    relay: RelayHandle
    record: KeyRecord
    key: str
    laptop: ConnectedDaemon
    desk: ConnectedDaemon


async def start_mesh(stack: Stack) -> Mesh:
    """A relay and two daemons of one scope, ``laptop`` and ``desk``; ``desk`` has peer ``bob``
    and ``laptop`` has peer ``alice``."""
    relay = await stack.start_relay()
    record, key = await relay.new_scope()
    laptop = await stack.start_daemon(relay, key, "laptop", rand=lambda: 0.5)
    desk = await stack.start_daemon(relay, key, "desk", rand=lambda: 0.5)
    links = relay.running.relay.links
    await eventually(lambda: len(links.for_scope(record.scope_id)) == 2)
    assert (await laptop.request("POST", "/peers", json_body={"name": "alice"})).status == 201
    assert (await desk.request("POST", "/peers", json_body={"name": "bob"})).status == 201
    return Mesh(relay=relay, record=record, key=key, laptop=laptop, desk=desk)


def messages(state: DaemonState) -> list[Mapping[str, object]]:
    """The data of every ``message`` event of a daemon, oldest first."""
    return [e.data for e in state.events_after(0, 1000) if e.type == "message"]


def notify_body(to: str, text: str) -> bytes:
    return json.dumps({"to": to, "text": text, "from": "tester"}).encode()


async def test_mesh_request_delivers_to_the_other_daemon(stack: Stack) -> None:
    with trio.fail_after(10):
        mesh = await start_mesh(stack)
        response = await mesh.laptop.connector.request(
            "desk", "POST", "/notify", body=notify_body("bob", "hello desk"), headers=JSON
        )
        assert response.status == 200
        answer = json.loads(response.body)
        assert answer["delivered"] is True
        assert answer["daemon_id"] == "desk"
        (message,) = messages(mesh.desk.daemon.state)
        assert message["to"] == "bob"
        assert message["text"] == "hello desk"
        assert message["via"] == "laptop"
        assert messages(mesh.laptop.daemon.state) == []


async def test_daemon_notify_reaches_a_peer_of_the_other_daemon(stack: Stack) -> None:
    with trio.fail_after(10):
        mesh = await start_mesh(stack)
        answer = await mesh.laptop.request(
            "POST", "/notify", json_body={"to": "bob@desk", "text": "over the mesh"}
        )
        assert answer.status == 200, answer.body
        assert answer.json()["delivered"] is True
        (message,) = messages(mesh.desk.daemon.state)
        assert (message["to"], message["text"], message["via"]) == (
            "bob",
            "over the mesh",
            "laptop",
        )


async def test_other_daemons_lists_the_scope_only(stack: Stack) -> None:
    with trio.fail_after(10):
        mesh = await start_mesh(stack)
        _, stranger_key = await mesh.relay.new_scope("stranger")
        stranger = await stack.start_daemon(mesh.relay, stranger_key, "stranger")
        assert await mesh.laptop.connector.other_daemons() == ["desk"]
        assert await mesh.desk.connector.other_daemons() == ["laptop"]
        assert await stranger.connector.other_daemons() == []
        # Nor does another scope's daemon appear among the offline ones, even once gone.
        mesh.desk.cancel()
        await eventually(
            lambda: mesh.relay.running.relay.links.get(mesh.record.scope_id, "desk") is None
        )
        assert (await stranger.connector.directory()).offline == ()
        assert (await mesh.laptop.connector.directory()).offline == ("desk",)


async def test_broadcast_reaches_the_peers_of_the_other_daemon(stack: Stack) -> None:
    with trio.fail_after(10):
        mesh = await start_mesh(stack)
        answer = await mesh.laptop.request(
            "POST", "/broadcast", json_body={"text": "all hands", "from": "ops"}
        )
        assert answer.status == 200, answer.body
        results = {r["target"]: r["ok"] for r in answer.json()["results"]}
        assert results == {"alice": True, "bob@desk": True}
        (local,) = messages(mesh.laptop.daemon.state)
        assert (local["to"], local["text"]) == ("alice", "all hands")
        (remote,) = messages(mesh.desk.daemon.state)
        assert (remote["to"], remote["text"], remote["via"]) == ("bob", "all hands", "laptop")


async def test_unknown_daemon_and_other_scopes_are_unknown(stack: Stack) -> None:
    with trio.fail_after(10):
        mesh = await start_mesh(stack)
        _, stranger_key = await mesh.relay.new_scope("stranger")
        await stack.start_daemon(mesh.relay, stranger_key, "stranger")
        for target in ("nobody", "stranger"):
            with pytest.raises(MeshError) as caught:
                await mesh.laptop.connector.request(
                    target, "POST", "/notify", body=notify_body("bob", "x"), headers=JSON
                )
            assert caught.value.code == "unknown_daemon"
        answer = await mesh.laptop.request(
            "POST", "/notify", json_body={"to": "bob@stranger", "text": "x"}
        )
        assert answer.status == 404
        assert answer.json()["error"] == "unknown_daemon"


async def test_a_daemon_that_went_away_is_offline(stack: Stack) -> None:
    with trio.fail_after(10):
        mesh = await start_mesh(stack)
        links = mesh.relay.running.relay.links
        # Not waited for: the relay drops the link as soon as the daemon says goodbye.
        mesh.desk.cancel()
        await eventually(lambda: links.get(mesh.record.scope_id, "desk") is None)
        with pytest.raises(MeshError) as caught:
            await mesh.laptop.connector.request(
                "desk", "POST", "/notify", body=notify_body("bob", "x"), headers=JSON
            )
        assert caught.value.code == "daemon_offline"
        answer = await mesh.laptop.request(
            "POST", "/notify", json_body={"to": "bob@desk", "text": "x"}
        )
        assert answer.status == 503
        assert answer.json()["error"] == "daemon_offline"
        assert await mesh.laptop.connector.other_daemons() == []
        # The relay remembers it: seen before, offline now.
        directory = await mesh.laptop.connector.directory()
        assert (directory.online, directory.offline) == ((), ("desk",))


async def test_relay_down_fails_fast_with_relay_down(stack: Stack) -> None:
    with trio.fail_after(10):
        mesh = await start_mesh(stack)
        mesh.relay.running.shutdown()
        await mesh.laptop.connector.wait_state(LinkState.DOWN)
        with pytest.raises(MeshError) as caught:
            await mesh.laptop.connector.request(
                "desk", "POST", "/notify", body=notify_body("bob", "x"), headers=JSON
            )
        assert caught.value.code == "relay_down"
        with pytest.raises(MeshError) as listing:
            await mesh.laptop.connector.other_daemons()
        assert listing.value.code == "relay_down"
        answer = await mesh.laptop.request(
            "POST", "/notify", json_body={"to": "bob@desk", "text": "x"}
        )
        assert answer.status == 503
        assert answer.json()["error"] == "relay_down"


async def test_mesh_reaches_only_the_allowlisted_routes(stack: Stack) -> None:
    with trio.fail_after(10):
        mesh = await start_mesh(stack)
        connector = mesh.laptop.connector
        listing = await connector.request("desk", "GET", "/peers")
        assert listing.status == 403
        assert json.loads(listing.body)["error"] == "forbidden"
        assert b"bob" not in listing.body

        created = await connector.request(
            "desk", "POST", "/peers", body=json.dumps({"name": "eve"}).encode(), headers=JSON
        )
        assert created.status == 403
        removed = await connector.request("desk", "DELETE", "/peers/bob")
        assert removed.status == 403
        # Nothing reached the daemon.
        assert [p.name for p in mesh.desk.daemon.state.peers()] == ["bob"]


async def test_mesh_from_header_is_set_by_the_connector_not_the_sender(stack: Stack) -> None:
    with trio.fail_after(10):
        mesh = await start_mesh(stack)
        forged = [*JSON, ("Repowire-Mesh-From", "mallory")]
        response = await mesh.laptop.connector.request(
            "desk", "POST", "/notify", body=notify_body("bob", "who am I"), headers=forged
        )
        assert response.status == 200
        (message,) = messages(mesh.desk.daemon.state)
        assert message["via"] == "laptop"


async def test_browser_requests_never_carry_a_mesh_from_header(stack: Stack) -> None:
    with trio.fail_after(10):
        mesh = await start_mesh(stack)
        cookie = await mesh.relay.session_cookie(mesh.record)
        answer = await http_request(
            mesh.relay.address,
            "POST",
            "/d/desk/notify",
            json_body={"to": "bob", "text": "from a browser"},
            headers=[cookie, ("Repowire-Mesh-From", "laptop")],
        )
        assert answer.status == 200, answer.body
        (message,) = messages(mesh.desk.daemon.state)
        assert message["text"] == "from a browser"
        assert "via" not in message
