"""Regression tests for the browser request path: WebSockets settled with hypercorn whatever
the client sends, bounded waits for the daemon's answers (upgrade, response head), the
revocation window before a daemon's link arrives, and a daemon's contradictory framing."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.protocol.ws_stream import WSStream
from trio_websocket import ConnectionRejected

import relay._tunnel
from mux import MuxStream
from relay._asgi_guard import AsgiGuard, ResponseSequenceError
from tests.support.clients import http_request, open_browser_websocket, open_http_stream
from tests.support.relays import RunningStack, running_relay
from tests.support.scripted import ScriptedHttp, ScriptedWebSocket
from tests.support.stand_in import start_stand_in
from tests.support.waiting import eventually

#: Hard stop for one test, the relay's teardown included.
TEST_TIMEOUT = 60
#: hypercorn's queue of messages for the app (``max_app_queue_size``' default).
APP_QUEUE = 10
#: A binary frame the browser keeps sending to a WebSocket that no longer reads.
FLOOD_FRAME = 256 * 1024
#: Seconds the browser floods the WebSocket: long enough to fill hypercorn's queue.
FLOOD_TIME = 1.2
#: Short stand-ins for the relay's deadlines, so the tests need not wait them out.
SHORT_DEADLINE = 0.5


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[RunningStack]:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_relay(tmp_path / "relay") as running:
            yield running


def origin_of(stack: RunningStack) -> tuple[str, str]:
    return ("Origin", f"http://127.0.0.1:{stack.relay.address[1]}")


def masked_frame(payload: bytes) -> bytes:
    """One client-to-server binary WebSocket frame (masked, 64-bit length)."""
    mask = os.urandom(4)
    head = bytes([0x82, 0x80 | 127]) + len(payload).to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_upgrade(stack: RunningStack, cookie: tuple[str, str]) -> trio.SocketStream:
    """A browser's upgrade request on a raw socket (the test controls every byte after)."""
    sock = await trio.open_tcp_stream(*stack.relay.address)
    key = base64.b64encode(os.urandom(16)).decode()
    origin = origin_of(stack)
    await sock.send_all(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{stack.relay.address[1]}\r\n"
            f"{cookie[0]}: {cookie[1]}\r\n{origin[0]}: {origin[1]}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    return sock


# ---------------------------------------------------------------------- WebSocket settling


async def test_a_websocket_flooded_after_its_app_stopped_reading_is_still_closed(
    stack: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon stops reading, the browser keeps sending, then the daemon closes: hypercorn's
    own close of the WebSocket (``send(None)``) must complete, not wait for ever on a full
    queue (holding the connection and its buffers)."""
    closed = trio.Event()
    original = WSStream.app_send

    async def traced(self: WSStream, message: Any) -> None:
        await original(self, message)
        if message is None:
            closed.set()

    monkeypatch.setattr(WSStream, "app_send", traced)

    async def slow_daemon(stream: MuxStream) -> None:
        sock = ScriptedWebSocket(stream)
        await sock.accept()
        await trio.sleep(FLOOD_TIME + 0.3)  # reads nothing: the stream window fills
        await sock.close(1000, "bye")
        await trio.sleep_forever()

    record, key = await stack.relay.new_scope()
    await start_stand_in(stack.links, stack.relay.address, key, "d1", slow_daemon)
    browser = await raw_upgrade(stack, await stack.relay.session_cookie(record))
    async with browser:
        assert b" 101 " in await browser.receive_some(4096)
        frame = masked_frame(os.urandom(FLOOD_FRAME))
        with trio.move_on_after(FLOOD_TIME):
            for _ in range(4 * APP_QUEUE):
                await browser.send_all(frame)
        with trio.fail_after(10):
            await closed.wait()


class FakeHypercornWebSocket:
    """hypercorn's side of one WebSocket as the guard sees it: a queue of ``APP_QUEUE``
    messages for the app, already full of the client's messages, and a ``send(None)`` that
    puts ``websocket.disconnect`` in it (waiting for room) unless the stream is closed."""

    def __init__(self) -> None:
        self.to_app, self.queue = trio.open_memory_channel[dict[str, Any]](APP_QUEUE)
        self.to_app.send_nowait({"type": "websocket.connect"})
        for _ in range(APP_QUEUE - 1):
            self.to_app.send_nowait({"type": "websocket.receive", "bytes": b"x"})
        self.closed = False
        self.sent: list[str] = []

    async def receive(self) -> dict[str, Any]:
        message = await self.queue.receive()
        if not self.closed:
            # The client keeps sending: whatever the app takes is replaced at once.
            with contextlib.suppress(trio.WouldBlock):
                self.to_app.send_nowait({"type": "websocket.receive", "bytes": b"x"})
        return message

    async def send(self, message: dict[str, Any] | None) -> None:
        if self.closed:
            return
        if message is None:
            self.closed = True
            await self.to_app.send({"type": "websocket.disconnect", "code": 1000})
            return
        self.sent.append(message["type"])


async def _refuse(receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
    await send({"type": "websocket.http.response.body", "body": b"no"})


async def _accept_and_close(receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": 1000})


async def _accept_and_fail(receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    raise RuntimeError("handler failed")


@pytest.mark.parametrize("behaviour", [_refuse, _accept_and_close, _accept_and_fail])
async def test_the_guard_settles_every_websocket_with_a_full_queue(behaviour: Any) -> None:
    """Refused upgrades, closed WebSockets (daemon links end this way) and failed handlers: once
    the app returns, hypercorn's ``send(None)`` never waits for room in the queue."""
    fake = FakeHypercornWebSocket()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await behaviour(receive, send)

    guard = AsgiGuard(app)
    scope = {"type": "websocket", "path": "/ws", "extensions": {"websocket.http.response": {}}}
    with trio.fail_after(5):
        await guard(scope, fake.receive, fake.send)
        await fake.send(None)  # hypercorn's own, after the app returned
    assert fake.closed


async def test_the_guard_refuses_websocket_messages_during_a_refusal() -> None:
    fake = FakeHypercornWebSocket()
    refused: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
        messages: list[dict[str, Any]] = [
            {"type": "websocket.send", "text": "hi"},
            {"type": "websocket.close", "code": 1000},
        ]
        for message in messages:
            try:
                await send(message)
            except ResponseSequenceError:
                refused.append(message["type"])
        await send({"type": "websocket.http.response.body", "body": b"no"})

    scope = {"type": "websocket", "path": "/ws", "extensions": {"websocket.http.response": {}}}
    with trio.fail_after(5):
        await AsgiGuard(app)(scope, fake.receive, fake.send)
    assert refused == ["websocket.send", "websocket.close"]
    assert fake.sent == ["websocket.http.response.start", "websocket.http.response.body"]


# ---------------------------------------------------------------------- the upgrade answer


async def silent_daemon(stream: MuxStream) -> None:
    await trio.sleep_forever()  # never answers the upgrade


async def test_a_browser_leaving_during_the_upgrade_gives_its_stream_back(
    stack: RunningStack,
) -> None:
    relay = stack.relay.running.relay
    record, key = await stack.relay.new_scope()
    stand_in = await start_stand_in(stack.links, stack.relay.address, key, "d1", silent_daemon)
    browser = await raw_upgrade(stack, await stack.relay.session_cookie(record))
    await eventually(lambda: len(stand_in.accepted) == 1)
    assert relay.scope_streams.held(record.scope_id) == 1
    await browser.aclose()
    # Well within stream_open_timeout and the upgrade deadline: the leave itself ends it.
    with trio.fail_after(2):
        await eventually(lambda: relay.scope_streams.held(record.scope_id) == 0)
        with pytest.raises(trio.BrokenResourceError):  # the daemon's side was reset
            await stand_in.accepted[0].receive_some(1024)


async def test_a_daemon_that_never_answers_the_upgrade_gets_504(
    stack: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay._tunnel, "UPGRADE_ANSWER_TIMEOUT", SHORT_DEADLINE)
    relay_state = stack.relay.running.relay
    record, key = await stack.relay.new_scope()
    await start_stand_in(stack.links, stack.relay.address, key, "d1", silent_daemon)
    cookie = await stack.relay.session_cookie(record)
    with trio.fail_after(5), pytest.raises(ConnectionRejected) as rejected:
        async with open_browser_websocket(stack.relay.address, "/ws", [cookie, origin_of(stack)]):
            pass
    assert rejected.value.status_code == 504
    assert json.loads(rejected.value.body or b"{}")["error"] == "daemon_timeout"
    await eventually(lambda: relay_state.scope_streams.held(record.scope_id) == 0)


async def upgrade_with_body(stack: RunningStack, cookie: tuple[str, str] | None) -> bytes:
    """Send a WebSocket upgrade that carries a body; return the relay's answer (its head)."""
    origin = origin_of(stack)
    session = f"{cookie[0]}: {cookie[1]}\r\n" if cookie is not None else ""
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{stack.relay.address[1]}\r\n"
        f"{session}{origin[0]}: {origin[1]}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\nContent-Length: 5\r\n\r\nhello"
    )
    sock = await trio.open_tcp_stream(*stack.relay.address)
    async with sock:
        await sock.send_all(request.encode())
        answer = b""
        for _ in range(100):  # bounded: the head is short
            chunk = await sock.receive_some(4096)
            answer += chunk
            if not chunk or b"\r\n\r\n" in answer:
                break
    return answer


async def test_an_upgrade_with_a_body_opens_no_stream(stack: RunningStack) -> None:
    relay_state = stack.relay.running.relay
    record, key = await stack.relay.new_scope()

    async def accepting_daemon(stream: MuxStream) -> None:
        await ScriptedWebSocket(stream).accept()
        await trio.sleep_forever()

    stand_in = await start_stand_in(stack.links, stack.relay.address, key, "d1", accepting_daemon)
    with trio.fail_after(5):
        answer = await upgrade_with_body(stack, await stack.relay.session_cookie(record))
        assert answer.startswith(b"HTTP/1.1 400 ")  # hypercorn's own
        # No bridge waits on the browser: nothing reached the daemon, the scope holds nothing.
        await trio.sleep(SHORT_DEADLINE)
        assert stand_in.accepted == []
        assert relay_state.scope_streams.held(record.scope_id) == 0
        assert relay_state.scope_bytes.held(record.scope_id) == 0


async def test_upgrades_with_a_body_never_stop_the_relay(stack: RunningStack) -> None:
    with trio.fail_after(10):
        # Refused ones (no session) too: an answer of the relay's racing hypercorn's own 400
        # failed hypercorn's connection task and stopped the whole server.
        for _ in range(3):
            assert (await upgrade_with_body(stack, None)).startswith(b"HTTP/1.1 400 ")
        health = await http_request(stack.relay.address, "GET", "/health")
        assert health.status == 200


# ---------------------------------------------------------------------- the response head


async def test_a_daemon_that_never_starts_its_answer_gets_504(
    stack: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay._tunnel, "RESPONSE_HEAD_TIMEOUT", SHORT_DEADLINE)
    reset = trio.Event()

    async def mute_daemon(stream: MuxStream) -> None:
        http = ScriptedHttp(stream)
        await http.receive_request()
        try:
            await stream.receive_some(1024)
            await trio.sleep_forever()
        except trio.BrokenResourceError:
            reset.set()

    record, key = await stack.relay.new_scope()
    await start_stand_in(stack.links, stack.relay.address, key, "d1", mute_daemon)
    with trio.fail_after(5):
        answer = await http_request(
            stack.relay.address, "GET", "/slow", headers=[await stack.relay.session_cookie(record)]
        )
        assert answer.status == 504
        assert json.loads(answer.body)["error"] == "daemon_timeout"
        await reset.wait()


async def test_the_head_deadline_does_not_limit_a_slow_body(
    stack: RunningStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay._tunnel, "RESPONSE_HEAD_TIMEOUT", SHORT_DEADLINE)

    async def trickling_daemon(stream: MuxStream) -> None:
        http = ScriptedHttp(stream)
        await http.receive_request()
        await http.send_head(200, [("content-type", "text/event-stream")])
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            await trio.sleep(2 * SHORT_DEADLINE)
            await http.send_data(part)
        await http.finish()

    record, key = await stack.relay.new_scope()
    await start_stand_in(stack.links, stack.relay.address, key, "d1", trickling_daemon)
    with trio.fail_after(10):
        answer = await http_request(
            stack.relay.address,
            "GET",
            "/events",
            headers=[await stack.relay.session_cookie(record)],
        )
    assert answer.status == 200
    assert answer.body == b"data: 1\n\ndata: 2\n\n"


# ---------------------------------------------------------------------- revocation


async def test_access_revoked_while_waiting_for_the_link_never_reaches_the_daemon(
    stack: RunningStack,
) -> None:
    relay = stack.relay.running.relay
    record, key = await stack.relay.new_scope()
    seen: list[MuxStream] = []

    async def recording(stream: MuxStream) -> None:
        seen.append(stream)
        await ScriptedHttp(stream).respond(200, b"served")

    # The stand-in holds its HELLO back: the relay has the link in its handshake, and a
    # request for it waits (LINK_ARRIVAL_WAIT) rather than answering 503 at once.
    await start_stand_in(stack.links, stack.relay.address, key, "d1", recording, hello_delay=1.5)
    cookie = await stack.relay.session_cookie(record)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            statuses: list[int] = []

            async def browse() -> None:
                async with open_http_stream(
                    stack.relay.address, "GET", "/d/d1/x", headers=[cookie]
                ) as response:
                    await response.read_all()
                    statuses.append(response.status)

            nursery.start_soon(browse)
            await eventually(lambda: relay.links.is_arriving(record.scope_id, "d1"))
            await trio.testing.wait_all_tasks_blocked(0.1)  # the request is in its wait
            relay.live_access.end_key(record.key_id, "revoked")
        assert statuses == [401]
        await eventually(lambda: relay.links.get(record.scope_id, "d1") is not None)
        await trio.sleep(0.2)
    assert seen == []


# ---------------------------------------------------------------------- framing


async def test_a_daemon_answer_with_length_and_chunked_arrives_whole(stack: RunningStack) -> None:
    async def contradictory_daemon(stream: MuxStream) -> None:
        http = ScriptedHttp(stream)
        await http.receive_request()
        # Both framings: h11 reads it as chunked (5 bytes), the Content-Length says 100.
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        await trio.sleep_forever()

    record, key = await stack.relay.new_scope()
    await start_stand_in(stack.links, stack.relay.address, key, "d1", contradictory_daemon)
    with trio.fail_after(5):
        answer = await http_request(
            stack.relay.address, "GET", "/x", headers=[await stack.relay.session_cookie(record)]
        )
    assert answer.status == 200
    assert answer.body == b"hello"
    assert "100" not in [v for k, v in answer.headers if k.lower() == "content-length"]


# ---------------------------------------------------------------------- one connection, one failure


async def raw_exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the relay closes it (bounded)."""
    stream = await trio.open_tcp_stream(*address)
    received = b""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)
        with trio.move_on_after(2), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return received


@pytest.mark.parametrize(
    "path",
    ["/some/tunneled/path", "/ws/relay", "/d/laptop/ws"],
)
async def test_bytes_after_an_upgrade_head_never_stop_the_relay(
    stack: RunningStack, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends bytes right behind a WebSocket upgrade head, without announcing a
    body, races the relay's own answer (401 without a session) against hypercorn's 400: h11
    then fails inside hypercorn's connection task. That must end that connection only."""
    head = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    with trio.fail_after(30):
        for _ in range(5):
            await raw_exchange(stack.relay.address, head + b"x" * 4096)
            health = await http_request(stack.relay.address, "GET", "/health")
            assert health.status == 200
