"""Streams the relay opens to the connector, driven from a fake relay so that every header and
every metadata value can be chosen (the real relay already cleans what browsers send)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import trio

from connector import Connector, LinkState
from mux import MuxSession, StreamResetError
from protocol import ErrorCode
from repowire.daemon import DaemonState
from tests.support.clients import json_head, request_head, stream_request
from tests.support.fake_relay import FakeRelay, fake_relay_config, start_fake_relay
from tests.support.processes import free_port
from tests.support.stack import ConnectedDaemon, Stack, start_daemon_for


async def start_linked_daemon(stack: Stack) -> tuple[FakeRelay, MuxSession, ConnectedDaemon]:
    """A fake relay, and a daemon ``laptop`` (with peer ``alice``) linked to it."""
    fake = await start_fake_relay(stack.relays)
    laptop = await start_daemon_for(
        stack.daemons, Connector(fake_relay_config(fake.ws_url)), stack.dashboard_dir
    )
    assert (await laptop.request("POST", "/peers", json_body={"name": "alice"})).status == 201
    return fake, await fake.session(), laptop


def messages(state: DaemonState) -> list[Mapping[str, object]]:
    return [e.data for e in state.events_after(0, 1000) if e.type == "message"]


@pytest.mark.parametrize(
    "forged",
    [
        [("Repowire-Mesh-From", "mallory")],
        [("repowire-mesh-from", "mallory"), ("REPOWIRE-MESH-FROM", "trudy")],
    ],
)
async def test_browser_streams_lose_any_mesh_from_header(
    stack: Stack, forged: list[tuple[str, str]]
) -> None:
    with trio.fail_after(10):
        _, session, laptop = await start_linked_daemon(stack)
        stream = await session.open_stream({"kind": "http", "from": "browser"})
        head, body = json_head("POST", "/notify", {"to": "alice", "text": "hi"}, forged)
        response = await stream_request(stream, head, body)
        assert response.status == 200, response.body
        (message,) = messages(laptop.daemon.state)
        assert message["text"] == "hi"
        assert "via" not in message


async def test_mesh_streams_carry_the_sender_the_relay_named(stack: Stack) -> None:
    with trio.fail_after(10):
        _, session, laptop = await start_linked_daemon(stack)
        stream = await session.open_stream({"kind": "mesh", "from": "desk"})
        head, body = json_head(
            "POST",
            "/notify",
            {"to": "alice", "text": "from desk"},
            [("Repowire-Mesh-From", "mallory")],
        )
        response = await stream_request(stream, head, body)
        assert response.status == 200, response.body
        (message,) = messages(laptop.daemon.state)
        assert message["via"] == "desk"


@pytest.mark.parametrize("metadata", [{"kind": "directory"}, {"kind": "admin"}, {}])
async def test_streams_of_another_kind_are_refused(stack: Stack, metadata: dict[str, str]) -> None:
    with trio.fail_after(10):
        _, session, laptop = await start_linked_daemon(stack)
        stream = await session.open_stream(metadata)
        head = request_head("DELETE", "/peers/alice")
        with pytest.raises(StreamResetError) as caught:
            await stream.send_all(head)
            await stream.receive_some()
        assert caught.value.code == ErrorCode.FORBIDDEN
        assert laptop.daemon.state.get_peer("alice") is not None


async def test_mesh_stream_cannot_smuggle_a_second_request(stack: Stack) -> None:
    """Only the first request head of a stream is checked, so a second one pipelined behind
    an allowed request must never reach the daemon."""
    with trio.fail_after(10):
        _, session, laptop = await start_linked_daemon(stack)
        stream = await session.open_stream({"kind": "mesh", "from": "desk"})
        allowed, body = json_head("POST", "/notify", {"to": "alice", "text": "cover"})
        allowed = allowed.replace(b"Connection: close", b"Connection: keep-alive")
        smuggled = request_head("DELETE", "/peers/alice")
        await stream.send_all(allowed + body + smuggled)
        # Bytes after the request end the stream with a reset: the exchange is over.
        with pytest.raises(StreamResetError), trio.fail_after(5):
            while await stream.receive_some():
                pass
        assert laptop.daemon.state.get_peer("alice") is not None


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET /health HTTP/2\r\n\r\n", 400, "bad_request"),
        (b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * (40 * 1024), 431, "head_too_large"),
    ],
)
async def test_bad_request_heads_get_a_clear_error(
    stack: Stack, raw: bytes, status: int, error: str
) -> None:
    with trio.fail_after(10):
        _, session, _ = await start_linked_daemon(stack)
        stream = await session.open_stream({"kind": "http", "from": "browser"})
        response = await stream_request(stream, raw)
        assert response.status == status
        assert response.json()["error"] == error
        # The link survives a bad stream: the next one works.
        stream = await session.open_stream({"kind": "http", "from": "browser"})
        health = await stream_request(stream, request_head("GET", "/health"))
        assert health.status == 200


async def test_stream_ending_before_a_whole_head_gets_a_clear_error(stack: Stack) -> None:
    with trio.fail_after(10):
        _, session, _ = await start_linked_daemon(stack)
        stream = await session.open_stream({"kind": "http", "from": "browser"})
        await stream.send_all(b"GET /health HTTP/1.1\r\n")
        await stream.send_eof()
        response = await stream_request(stream, b"")
        assert response.status == 400
        assert response.json()["error"] == "bad_request"


async def test_a_daemon_that_is_not_running_gets_a_502(stack: Stack) -> None:
    with trio.fail_after(10):
        fake = await start_fake_relay(stack.relays)
        connector = Connector(fake_relay_config(fake.ws_url, daemon_port=free_port()))
        await stack.daemons.start(connector.run)
        await connector.wait_state(LinkState.CONNECTED)
        session = await fake.session()
        stream = await session.open_stream({"kind": "http", "from": "browser"})
        response = await stream_request(stream, request_head("GET", "/health"))
        assert response.status == 502
        assert response.json()["error"] == "daemon_unreachable"
        assert connector.status().state is LinkState.CONNECTED


@pytest.mark.parametrize("sender", ["dé", "desk\r\nX-Injected: yes", ""])
async def test_a_malformed_sender_from_the_relay_is_refused_and_the_link_survives(
    stack: Stack, sender: str
) -> None:
    with trio.fail_after(10):
        _, session, laptop = await start_linked_daemon(stack)
        stream = await session.open_stream({"kind": "mesh", "from": sender})
        head, body = json_head("POST", "/notify", {"to": "alice", "text": "odd sender"})
        try:
            response = await stream_request(stream, head, body)
        except StreamResetError:
            pass
        else:
            assert response.status == 400, response.body
        assert messages(laptop.daemon.state) == []
        # The link and the connector are still up: another stream works.
        assert laptop.connector.status().state is LinkState.CONNECTED
        stream = await session.open_stream({"kind": "http", "from": "browser"})
        health = await stream_request(stream, request_head("GET", "/health"))
        assert health.status == 200
