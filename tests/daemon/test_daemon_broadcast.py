"""A broadcast names every daemon of the scope it knows of, offline ones included."""

from __future__ import annotations

from pathlib import Path

import trio

from repowire.daemon import DaemonSettings, MeshError, MeshResponse
from repowire.daemon._messaging import KnownDaemons
from tests.support.clients import http_request
from tests.support.daemons import DaemonFactory
from tests.support.relays import start_relay
from tests.support.stack import start_connected_daemon
from tests.support.waiting import eventually

from .test_daemon_mesh import ScriptedMesh, json_answer


async def answer_for_one_peer(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
    return json_answer(200, {"results": [{"target": "bob", "ok": True}]})


def outcomes(results: list[dict[str, object]]) -> list[tuple[object, object, object]]:
    return [(r["target"], r["ok"], r.get("error")) for r in results]


async def test_a_daemon_seen_before_is_reported_offline(daemon_factory: DaemonFactory) -> None:
    mesh = ScriptedMesh(answer_for_one_peer, daemons=["beta", "gamma"])
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=mesh)
        first = await alpha.request("POST", "/broadcast", json_body={"text": "one"})
        # gamma went offline: the relay lists only the daemons connected now.
        mesh.daemons = ["beta"]
        mesh.calls.clear()
        second = await alpha.request("POST", "/broadcast", json_body={"text": "two"})
    assert outcomes(first.json()["results"]) == [
        ("bob@beta", True, None),
        ("bob@gamma", True, None),
    ]
    results = second.json()["results"]
    assert outcomes(results) == [
        ("bob@beta", True, None),
        ("*@gamma", False, "daemon_offline"),
    ]
    assert isinstance(results[1]["detail"], str) and results[1]["detail"]
    # An offline daemon is reported, not contacted.
    assert [call[0] for call in mesh.calls] == ["beta"]


async def test_a_daemon_answering_over_the_mesh_is_known(daemon_factory: DaemonFactory) -> None:
    """A daemon reached by a notify is known too, even before any broadcast listed it."""

    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        return json_answer(200, {"delivered": True, "to": "bob", "daemon_id": daemon_id})

    # The relay lists no one at the time of the broadcast.
    mesh = ScriptedMesh(handler, daemons=[])
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=mesh)
        sent = await alpha.request("POST", "/notify", json_body={"to": "bob@beta", "text": "x"})
        response = await alpha.request("POST", "/broadcast", json_body={"text": "hi"})
    assert sent.status == 200
    assert outcomes(response.json()["results"]) == [("*@beta", False, "daemon_offline")]


async def test_when_the_list_is_unavailable_each_known_daemon_is_named(
    daemon_factory: DaemonFactory,
) -> None:
    mesh = ScriptedMesh(answer_for_one_peer, daemons=["beta", "gamma"])
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=mesh)
        alpha.state.add_peer("ann")
        await alpha.request("POST", "/broadcast", json_body={"text": "one"})
        mesh.list_error = MeshError("relay_down", "The relay is not reachable.")
        response = await alpha.request("POST", "/broadcast", json_body={"text": "two"})
    assert outcomes(response.json()["results"]) == [
        ("ann", True, None),
        ("*@beta", False, "relay_down"),
        ("*@gamma", False, "relay_down"),
    ]


async def test_a_daemon_the_relay_does_not_know_is_forgotten(
    daemon_factory: DaemonFactory,
) -> None:
    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        if daemon_id == "gone":
            raise MeshError("unknown_daemon", "No daemon 'gone' in this scope.")
        return await answer_for_one_peer(daemon_id, method, path, body)

    mesh = ScriptedMesh(handler, daemons=["beta", "gone"])
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=mesh)
        first = await alpha.request("POST", "/broadcast", json_body={"text": "one"})
        mesh.daemons = ["beta"]
        second = await alpha.request("POST", "/broadcast", json_body={"text": "two"})
    assert ("*@gone", False, "unknown_daemon") in outcomes(first.json()["results"])
    assert outcomes(second.json()["results"]) == [("bob@beta", True, None)]


async def test_known_daemons_are_bounded(daemon_factory: DaemonFactory) -> None:
    mesh = ScriptedMesh(answer_for_one_peer, daemons=["d1", "d2", "d3"])
    with trio.fail_after(10):
        alpha = await daemon_factory(
            daemon_id="alpha", mesh=mesh, settings=DaemonSettings(max_known_daemons=2)
        )
        await alpha.request("POST", "/broadcast", json_body={"text": "one"})
        mesh.daemons = []
        response = await alpha.request("POST", "/broadcast", json_body={"text": "two"})
    # Three were seen, two are remembered (which two depends on the order the answers came).
    results = response.json()["results"]
    assert len(results) == 2
    assert {r["error"] for r in results} == {"daemon_offline"}


def test_the_daemon_seen_longest_ago_is_forgotten_first() -> None:
    known = KnownDaemons(2)
    known.saw(["d1", "d2"])
    known.saw(["d1"])
    known.saw(["d3"])
    assert known.ids() == ["d1", "d3"]
    known.forget("d1")
    assert known.ids() == ["d3"]


async def test_a_daemon_that_left_the_relay_is_reported_offline(
    nursery: trio.Nursery, tmp_path: Path, dashboard_dir: Path
) -> None:
    with trio.fail_after(20):
        relay = await start_relay(nursery, tmp_path / "relay")
        record, key = await relay.new_scope()
        laptop = await start_connected_daemon(nursery, relay, key, "laptop", dashboard_dir)
        links = relay.running.relay.links
        async with trio.open_nursery() as desk_nursery:
            desk = await start_connected_daemon(desk_nursery, relay, key, "desk", dashboard_dir)
            desk.state.add_peer("bob")
            await eventually(lambda: len(links.for_scope(record.scope_id)) == 2)
            online = await http_request(
                laptop.address, "POST", "/broadcast", json_body={"text": "one"}
            )
            desk_nursery.cancel_scope.cancel()
        await eventually(lambda: len(links.for_scope(record.scope_id)) == 1)
        offline = await http_request(
            laptop.address, "POST", "/broadcast", json_body={"text": "two"}
        )
        # Done with the relay and daemons: stop them now rather than at fixture teardown.
        nursery.cancel_scope.cancel()
    assert outcomes(online.json()["results"]) == [("bob@desk", True, None)]
    assert outcomes(offline.json()["results"]) == [("*@desk", False, "daemon_offline")]


async def test_a_daemon_only_the_relay_remembers_is_reported_offline(
    daemon_factory: DaemonFactory,
) -> None:
    """A daemon that just started has seen nobody: the relay's directory names the daemons of
    the scope seen before and offline now, and the broadcast reports them, never skips them."""
    mesh = ScriptedMesh(answer_for_one_peer, daemons=["beta"], offline_daemons=["gamma", "alpha"])
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=mesh)
        answer = await alpha.request("POST", "/broadcast", json_body={"text": "hello"})
    assert answer.status == 200
    assert outcomes(answer.json()["results"]) == [
        ("bob@beta", True, None),
        ("*@gamma", False, "daemon_offline"),
    ]
    # Only beta was asked; gamma is reported without a call, and alpha never lists itself.
    assert [call[0] for call in mesh.calls] == ["beta"]
