"""Reaching other daemons: notify to peer@daemon and broadcast, through a MeshClient double.

The real connector is tested elsewhere; here LoopbackMesh joins real in-process daemons, and
ScriptedMesh produces each failure the connector can report.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
import trio

from repowire.daemon import (
    MESH_ERROR_CODES,
    MESH_ERROR_STATUS,
    DaemonSettings,
    MeshDirectory,
    MeshError,
    MeshErrorCode,
    MeshResponse,
)
from tests.support.clients import HttpResponse
from tests.support.daemons import DaemonFactory, LoopbackMesh, RunningDaemon

Handler = Callable[[str, str, str, bytes], Awaitable[MeshResponse]]


class ScriptedMesh:
    """A MeshClient whose answers come from ``handler``; records every call."""

    def __init__(
        self,
        handler: Handler,
        daemons: Sequence[str] = ("beta",),
        offline_daemons: Sequence[str] = (),
    ) -> None:
        self.handler = handler
        self.daemons = list(daemons)
        #: What the relay lists as seen before but offline now.
        self.offline_daemons = list(offline_daemons)
        self.calls: list[tuple[str, str, str, bytes, list[tuple[str, str]]]] = []
        self.list_error: MeshError | None = None

    async def request(
        self,
        daemon_id: str,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> MeshResponse:
        self.calls.append((daemon_id, method, path, body, list(headers)))
        return await self.handler(daemon_id, method, path, body)

    async def directory(self) -> MeshDirectory:
        if self.list_error is not None:
            raise self.list_error
        return MeshDirectory(online=tuple(self.daemons), offline=tuple(self.offline_daemons))


def json_answer(status: int, body: object) -> MeshResponse:
    return MeshResponse(
        status=status,
        headers=[("content-type", "application/json")],
        body=json.dumps(body).encode(),
    )


def assert_error(response: HttpResponse, status: int, code: str) -> None:
    assert response.status == status, response.body
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str) and body["detail"]


async def start_pair(
    daemon_factory: DaemonFactory,
) -> tuple[RunningDaemon, RunningDaemon, LoopbackMesh, LoopbackMesh]:
    alpha_mesh, beta_mesh = LoopbackMesh("alpha"), LoopbackMesh("beta")
    alpha = await daemon_factory(daemon_id="alpha", mesh=alpha_mesh)
    beta = await daemon_factory(daemon_id="beta", mesh=beta_mesh)
    alpha_mesh.peers["beta"] = beta.address
    beta_mesh.peers["alpha"] = alpha.address
    return alpha, beta, alpha_mesh, beta_mesh


def messages(daemon: RunningDaemon) -> list[dict[str, Any]]:
    return [dict(e.data) for e in daemon.state.events_after(0, 1000) if e.type == "message"]


async def test_notify_reaches_a_peer_of_another_daemon(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        alpha, beta, alpha_mesh, _ = await start_pair(daemon_factory)
        beta.state.add_peer("bob")
        response = await alpha.request(
            "POST",
            "/notify",
            json_body={"to": "bob@beta", "text": "hi", "from": "ann", "id": "m-1"},
        )
    assert response.status == 200
    assert response.json() == {
        "delivered": True,
        "to": "bob",
        "daemon_id": "beta",
        "event_id": 2,
        "id": "m-1",
    }
    assert messages(beta) == [{"from": "ann", "to": "bob", "text": "hi", "via": "alpha"}]
    assert messages(alpha) == []
    [(daemon_id, method, path, body)] = alpha_mesh.calls
    assert (daemon_id, method, path) == ("beta", "POST", "/notify")
    # The id travels with the message, so the receiving daemon can recognise a retry.
    assert json.loads(body) == {"to": "bob", "text": "hi", "from": "ann", "id": "m-1"}


async def test_remote_error_is_passed_back(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        alpha, beta, _, _ = await start_pair(daemon_factory)
        response = await alpha.request(
            "POST", "/notify", json_body={"to": "ghost@beta", "text": "hi"}
        )
    assert_error(response, 404, "unknown_peer")
    assert beta.state.last_event_id == 0


async def test_forwarded_request_is_json_with_its_content_type(
    daemon_factory: DaemonFactory,
) -> None:
    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        return json_answer(200, {"delivered": True, "to": "bob", "daemon_id": daemon_id})

    mesh = ScriptedMesh(handler)
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=mesh)
        response = await alpha.request("POST", "/notify", json_body={"to": "bob@beta", "text": "x"})
    answer = response.json()
    message_id = answer.pop("id")
    assert answer == {"delivered": True, "to": "bob", "daemon_id": "beta"}
    [(_, _, _, body, headers)] = mesh.calls
    assert ("Content-Type", "application/json") in headers
    # A generated id travels too, and the sender is told it.
    assert json.loads(body) == {"to": "bob", "text": "x", "from": None, "id": message_id}


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("unknown_daemon", 404),
        ("daemon_offline", 503),
        ("relay_down", 503),
        ("forbidden", 403),
        ("timeout", 504),
    ],
)
async def test_mesh_errors_map_to_statuses(
    daemon_factory: DaemonFactory, code: MeshErrorCode, status: int
) -> None:
    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        raise MeshError(code, f"Mesh said {code}.")

    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=ScriptedMesh(handler))
        response = await alpha.request(
            "POST", "/notify", json_body={"to": "bob@beta", "text": "hi", "id": "m-1"}
        )
    assert response.status == status
    assert response.json() == {"error": code, "detail": f"Mesh said {code}.", "id": "m-1"}


def test_mesh_error_refuses_unknown_codes() -> None:
    with pytest.raises(ValueError):
        MeshError("exploded", "nope")  # type: ignore[arg-type]


def test_every_mesh_error_code_has_its_own_status() -> None:
    # A code added to MeshErrorCode without a status would be answered as a bare 502.
    assert set(MESH_ERROR_STATUS) == set(MESH_ERROR_CODES)


@pytest.mark.parametrize(
    "answer",
    [
        MeshResponse(status=200, headers=[], body=b"<html>not json</html>"),
        MeshResponse(status=500, headers=[], body=b"Internal Server Error"),
        MeshResponse(status=200, headers=[], body=b"[1, 2]"),
        MeshResponse(status=302, headers=[("location", "/x")], body=b"{}"),
    ],
    ids=["html", "text-500", "array", "redirect"],
)
async def test_unusable_remote_answer_is_502(
    daemon_factory: DaemonFactory, answer: MeshResponse
) -> None:
    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        return answer

    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=ScriptedMesh(handler))
        response = await alpha.request(
            "POST", "/notify", json_body={"to": "bob@beta", "text": "hi"}
        )
    assert_error(response, 502, "bad_gateway")


async def test_remote_5xx_json_is_passed_back(daemon_factory: DaemonFactory) -> None:
    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        return json_answer(503, {"error": "busy", "detail": "Try later."})

    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=ScriptedMesh(handler))
        response = await alpha.request(
            "POST", "/notify", json_body={"to": "bob@beta", "text": "hi", "id": "m-1"}
        )
    assert response.status == 503
    assert response.json() == {"error": "busy", "detail": "Try later.", "id": "m-1"}


async def test_a_mesh_that_never_answers_times_out(daemon_factory: DaemonFactory) -> None:
    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    settings = DaemonSettings(mesh_request_timeout=0.05)
    with trio.fail_after(10):
        alpha = await daemon_factory(
            daemon_id="alpha", mesh=ScriptedMesh(handler), settings=settings
        )
        response = await alpha.request(
            "POST", "/notify", json_body={"to": "bob@beta", "text": "hi"}
        )
    assert_error(response, 504, "timeout")


async def test_request_from_the_mesh_is_delivered_locally_and_never_forwarded(
    daemon_factory: DaemonFactory,
) -> None:
    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        raise AssertionError("a mesh request must not be forwarded")

    mesh = ScriptedMesh(handler)
    from_mesh = [("Repowire-Mesh-From", "gamma")]
    with trio.fail_after(10):
        beta = await daemon_factory(daemon_id="beta", mesh=mesh)
        beta.state.add_peer("bob")
        local = await beta.request(
            "POST", "/notify", json_body={"to": "bob@beta", "text": "hi"}, headers=from_mesh
        )
        onward = await beta.request(
            "POST", "/notify", json_body={"to": "bob@delta", "text": "hi"}, headers=from_mesh
        )
    assert local.status == 200
    assert messages(beta) == [{"from": None, "to": "bob", "text": "hi", "via": "gamma"}]
    assert_error(onward, 400, "bad_request")
    assert mesh.calls == []


async def test_broadcast_reaches_local_and_remote_peers(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        alpha, beta, alpha_mesh, beta_mesh = await start_pair(daemon_factory)
        alpha_mesh.peers["gamma"] = ("127.0.0.1", 9)
        alpha_mesh.offline.add("gamma")
        alpha.state.add_peer("ann")
        beta.state.add_peer("bob")
        beta.state.add_peer("bea")
        response = await alpha.request(
            "POST", "/broadcast", json_body={"text": "deploy at 5", "from": "ann"}
        )
    assert response.status == 200
    results = response.json()["results"]
    assert results[:3] == [
        {"target": "ann", "ok": True},
        {"target": "bob@beta", "ok": True},
        {"target": "bea@beta", "ok": True},
    ]
    assert results[3]["target"] == "*@gamma"
    assert results[3]["ok"] is False
    assert results[3]["error"] == "daemon_offline"
    assert len(results) == 4
    assert messages(alpha) == [{"from": "ann", "to": "ann", "text": "deploy at 5"}]
    assert messages(beta) == [
        {"from": "ann", "to": "bob", "text": "deploy at 5", "via": "alpha"},
        {"from": "ann", "to": "bea", "text": "deploy at 5", "via": "alpha"},
    ]
    # beta answered for its own peers only: a broadcast from the mesh does not fan out again.
    assert beta_mesh.calls == []


async def test_broadcast_when_the_daemon_list_is_unavailable(
    daemon_factory: DaemonFactory,
) -> None:
    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        raise AssertionError("no daemon should be contacted")

    mesh = ScriptedMesh(handler)
    mesh.list_error = MeshError("relay_down", "The relay is not reachable.")
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=mesh)
        alpha.state.add_peer("ann")
        response = await alpha.request("POST", "/broadcast", json_body={"text": "hi"})
    assert response.status == 200
    assert response.json()["results"] == [
        {"target": "ann", "ok": True},
        {
            "target": "*",
            "ok": False,
            "error": "relay_down",
            "detail": "The relay is not reachable.",
        },
    ]


async def test_broadcast_reports_each_daemon_failure(daemon_factory: DaemonFactory) -> None:
    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        if daemon_id == "err":
            return json_answer(500, {"error": "internal_error", "detail": "It broke."})
        if daemon_id == "odd":
            return json_answer(200, {"results": [{"target": 5}]})
        if daemon_id == "nope":
            raise MeshError("forbidden", "Not in your scope.")
        return json_answer(200, {"results": [{"target": "zed", "ok": True}]})

    mesh = ScriptedMesh(handler, daemons=["err", "odd", "nope", "fine", "alpha", "fine", "b d"])
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=mesh)
        response = await alpha.request("POST", "/broadcast", json_body={"text": "hi"})
    results = response.json()["results"]
    assert [(r["target"], r["ok"], r.get("error")) for r in results] == [
        ("*@err", False, "internal_error"),
        ("*@odd", False, "bad_gateway"),
        ("*@nope", False, "forbidden"),
        ("zed@fine", True, None),
    ]
    # This daemon, duplicates and malformed ids are not contacted.
    assert sorted(call[0] for call in mesh.calls) == ["err", "fine", "nope", "odd"]
    assert all(call[1:3] == ("POST", "/broadcast") for call in mesh.calls)


async def test_broadcast_contacts_daemons_concurrently(daemon_factory: DaemonFactory) -> None:
    in_flight = 0
    most = 0

    async def handler(daemon_id: str, method: str, path: str, body: bytes) -> MeshResponse:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await trio.sleep(0.05)
        in_flight -= 1
        return json_answer(200, {"results": []})

    mesh = ScriptedMesh(handler, daemons=[f"d{i}" for i in range(12)])
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=mesh)
        response = await alpha.request("POST", "/broadcast", json_body={"text": "hi"})
    assert response.json() == {"results": []}
    assert len(mesh.calls) == 12
    # Several at once, but no more than the fan-out limit.
    assert 1 < most <= DaemonSettings().mesh_fanout_limit


async def test_broadcast_with_relay_disabled_stays_local(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=None)
        alpha.state.add_peer("ann")
        response = await alpha.request("POST", "/broadcast", json_body={"text": "hi"})
    assert response.json() == {"results": [{"target": "ann", "ok": True}]}
