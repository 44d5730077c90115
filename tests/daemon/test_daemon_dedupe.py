"""Message ids: a retried notify is delivered once, by the daemon that delivers it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from repowire.daemon import DaemonSettings, MeshError, MeshResponse
from repowire.daemon._dedupe import RecentMessages, fingerprint
from repowire.daemon._errors import ApiError
from tests.support.clients import http_request, open_websocket
from tests.support.daemons import DaemonFactory, FixedClock, LoopbackMesh
from tests.support.relays import start_relay
from tests.support.stack import start_connected_daemon
from tests.support.waiting import eventually

from .test_daemon_mesh import messages, start_pair
from .test_daemon_ws import receive_json, send_json


async def test_the_same_notify_twice_is_delivered_once(daemon_factory: DaemonFactory) -> None:
    body = {"to": "bob", "text": "deploy", "from": "ann", "id": "msg-1"}
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="alpha")
        daemon.state.add_peer("bob")
        first = await daemon.request("POST", "/notify", json_body=body)
        again = await daemon.request("POST", "/notify", json_body=body)
    assert first.status == again.status == 200
    assert first.json() == again.json()
    assert first.json()["id"] == "msg-1"
    assert messages(daemon) == [{"from": "ann", "to": "bob", "text": "deploy"}]


async def test_an_id_reused_for_another_message_is_refused(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="alpha")
        daemon.state.add_peer("bob")
        await daemon.request("POST", "/notify", json_body={"to": "bob", "text": "a", "id": "x"})
        other = await daemon.request(
            "POST", "/notify", json_body={"to": "bob", "text": "b", "id": "x"}
        )
        fresh = await daemon.request(
            "POST", "/notify", json_body={"to": "bob", "text": "b", "id": "y"}
        )
    # Not a silent success: that would lose the second message.
    assert other.status == 409
    assert other.json()["error"] == "id_reused"
    assert fresh.status == 200
    assert [m["text"] for m in messages(daemon)] == ["a", "b"]


async def test_without_an_id_each_notify_is_a_new_message(daemon_factory: DaemonFactory) -> None:
    body = {"to": "bob", "text": "ping"}
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="alpha")
        daemon.state.add_peer("bob")
        first = await daemon.request("POST", "/notify", json_body=body)
        second = await daemon.request("POST", "/notify", json_body=body)
        # The id the daemon chose makes a retry of that message safe.
        retry = await daemon.request(
            "POST", "/notify", json_body={**body, "id": first.json()["id"]}
        )
    assert first.json()["id"] != second.json()["id"]
    assert retry.json() == first.json()
    assert len(messages(daemon)) == 2


@pytest.mark.parametrize(
    "bad_id",
    ["", "a" * 129, "two words", "caf\u00e9", "a/b", "line\nbreak", 5, True, [], {}],
    ids=[
        "empty",
        "too-long",
        "space",
        "non-ascii",
        "slash",
        "newline",
        "int",
        "bool",
        "list",
        "obj",
    ],
)
async def test_malformed_ids_are_refused_and_nothing_is_delivered(
    daemon_factory: DaemonFactory, bad_id: object
) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="alpha")
        daemon.state.add_peer("bob")
        refused = await daemon.request(
            "POST", "/notify", json_body={"to": "bob", "text": "hi", "id": bad_id}
        )
        # Nothing lost: the same message with a good id goes through.
        accepted = await daemon.request(
            "POST", "/notify", json_body={"to": "bob", "text": "hi", "id": "a" * 128}
        )
    assert refused.status == 400
    assert refused.json()["error"] == "bad_request"
    assert "'id'" in refused.json()["detail"]
    assert accepted.status == 200
    assert len(messages(daemon)) == 1


async def test_a_failed_delivery_is_not_remembered(daemon_factory: DaemonFactory) -> None:
    body = {"to": "bob", "text": "hi", "id": "m-1"}
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="alpha")
        missing = await daemon.request("POST", "/notify", json_body=body)
        daemon.state.add_peer("bob")
        retry = await daemon.request("POST", "/notify", json_body=body)
    assert missing.status == 404
    assert missing.json()["id"] == "m-1"
    assert retry.status == 200
    assert len(messages(daemon)) == 1


async def test_a_retry_across_two_daemons_is_delivered_once(
    daemon_factory: DaemonFactory,
) -> None:
    body = {"to": "bob@beta", "text": "hi", "id": "m-1"}
    with trio.fail_after(10):
        alpha, beta, alpha_mesh, _ = await start_pair(daemon_factory)
        beta.state.add_peer("bob")
        first = await alpha.request("POST", "/notify", json_body=body)
        again = await alpha.request("POST", "/notify", json_body=body)
        # The same message sent to beta directly is the same message too.
        direct = await beta.request("POST", "/notify", json_body={**body, "to": "bob"})
    assert first.status == again.status == direct.status == 200
    assert first.json() == again.json() == direct.json()
    assert len(alpha_mesh.calls) == 2
    assert messages(beta) == [{"from": None, "to": "bob", "text": "hi", "via": "alpha"}]


class AnswerLosingMesh(LoopbackMesh):
    """Delivers the first request, then reports the relay down as if its answer were lost
    (the relay stopped after forwarding it)."""

    def __init__(self, own_id: str) -> None:
        super().__init__(own_id)
        self.lost = 0

    async def request(
        self,
        daemon_id: str,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> MeshResponse:
        response = await super().request(daemon_id, method, path, body=body, headers=headers)
        if self.lost == 0:
            self.lost += 1
            raise MeshError("relay_down", "The relay link broke during the request.")
        return response


async def test_a_notify_whose_answer_was_lost_is_retried_safely(
    daemon_factory: DaemonFactory,
) -> None:
    """The reported defect: a 503 for a message that was delivered; the retry duplicated it."""
    alpha_mesh = AnswerLosingMesh("alpha")
    with trio.fail_after(10):
        alpha = await daemon_factory(daemon_id="alpha", mesh=alpha_mesh)
        beta = await daemon_factory(daemon_id="beta", mesh=LoopbackMesh("beta"))
        alpha_mesh.peers["beta"] = beta.address
        beta.state.add_peer("bob")
        failed = await alpha.request("POST", "/notify", json_body={"to": "bob@beta", "text": "hi"})
        # The sender sent no id; the error names the one the daemon gave the message.
        retry = await alpha.request(
            "POST",
            "/notify",
            json_body={"to": "bob@beta", "text": "hi", "id": failed.json()["id"]},
        )
    assert failed.status == 503
    assert failed.json()["error"] == "relay_down"
    assert retry.status == 200
    assert retry.json()["id"] == failed.json()["id"]
    assert len(messages(beta)) == 1


async def test_a_websocket_notify_retry_is_delivered_once(daemon_factory: DaemonFactory) -> None:
    message = {"type": "notify", "to": "bob", "text": "hi", "id": "ws-1"}
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="alpha")
        daemon.state.add_peer("bob")
        async with open_websocket(daemon.address, "/ws") as ws:
            results: list[dict[str, Any]] = []
            for _ in range(2):
                await send_json(ws, message)
                while True:
                    received = await receive_json(ws)
                    if received["type"] == "result":
                        results.append(received)
                        break
    assert [r["ok"] for r in results] == [True, True]
    assert results[0] == results[1]
    assert len(messages(daemon)) == 1


async def test_a_retry_through_a_real_relay_is_delivered_once(
    nursery: trio.Nursery, tmp_path: Path, dashboard_dir: Path
) -> None:
    body = {"to": "bob@desk", "text": "over the relay", "id": "relay-1"}
    with trio.fail_after(15):
        relay = await start_relay(nursery, tmp_path / "relay")
        record, key = await relay.new_scope()
        laptop = await start_connected_daemon(nursery, relay, key, "laptop", dashboard_dir)
        desk = await start_connected_daemon(nursery, relay, key, "desk", dashboard_dir)
        links = relay.running.relay.links
        await eventually(lambda: len(links.for_scope(record.scope_id)) == 2)
        desk.state.add_peer("bob")
        first = await http_request(laptop.address, "POST", "/notify", json_body=body)
        again = await http_request(laptop.address, "POST", "/notify", json_body=body)
        # Done with the relay and daemons: stop them now rather than at fixture teardown.
        nursery.cancel_scope.cancel()
    assert first.status == again.status == 200, (first.body, again.body)
    assert first.json() == again.json()
    delivered = [e.data for e in desk.state.events_after(0, 100) if e.type == "message"]
    assert [(m["text"], m["via"]) for m in delivered] == [("over the relay", "laptop")]


# -- the memory of ids --------------------------------------------------------------------


def test_ids_are_forgotten_after_the_ttl() -> None:
    clock = FixedClock(100.0)
    recent = RecentMessages(capacity=10, ttl=60.0, clock=clock)
    digest = fingerprint("notify", "bob", "hi", None)
    recent.remember("m-1", digest, {"delivered": True})
    clock.now = 159.0
    assert recent.previous("m-1", digest) == {"delivered": True}
    clock.now = 160.0
    assert recent.previous("m-1", digest) is None
    assert len(recent) == 0


def test_at_most_capacity_ids_are_kept_oldest_forgotten_first() -> None:
    recent = RecentMessages(capacity=3, ttl=60.0, clock=FixedClock())
    digest = fingerprint("x")
    for i in range(5):
        recent.remember(f"m-{i}", digest, {"n": i})
    assert len(recent) == 3
    assert recent.previous("m-1", digest) is None
    assert recent.previous("m-2", digest) == {"n": 2}
    assert recent.previous("m-4", digest) == {"n": 4}


def test_a_reused_id_is_told_apart_by_content() -> None:
    recent = RecentMessages(clock=FixedClock())
    recent.remember("m", fingerprint("notify", "bob", "a", None), {"ok": 1})
    with pytest.raises(ApiError) as caught:
        recent.previous("m", fingerprint("notify", "bob", "b", None))
    assert (caught.value.status, caught.value.code) == (409, "id_reused")


async def test_the_memory_bound_comes_from_the_settings(daemon_factory: DaemonFactory) -> None:
    settings = DaemonSettings(message_id_memory=1)
    with trio.fail_after(10):
        daemon = await daemon_factory(daemon_id="alpha", settings=settings)
        daemon.state.add_peer("bob")
        for message_id in ("a", "b", "a"):
            answer = await daemon.request(
                "POST", "/notify", json_body={"to": "bob", "text": "t", "id": message_id}
            )
            assert answer.status == 200
    # "a" was forgotten when "b" came, so its retry was delivered again.
    assert len(messages(daemon)) == 3
