"""``/ws/relay``, the daemon endpoint, against bad input, floods, replacement and shutdown.

Links are raw (frames written by hand, ``tests.support.links.RawLink``), stand-ins (the project's
driver with test handlers) or real connectors, as each case needs. Every refusal must carry
the close code of docs/ARCHITECTURE.md, and the relay must keep serving everyone else.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from connector import LinkState
from mux import LINK_FRAME_SIZE, MuxStream
from protocol import CloseCode, ErrorCode, FrameType
from tests.support.clients import HttpResponse, http_request
from tests.support.links import (
    Frame,
    RawLink,
    encode_frame,
    link_headers,
    link_refusal,
    open_frame,
    open_link_websocket,
    open_raw_link,
)
from tests.support.relays import RelayRunner, RunningStack, StackFactory, start_relay
from tests.support.scripted import ScriptedHttp
from tests.support.stack import start_connected_daemon
from tests.support.stand_in import hold_stream, identity_handler, start_stand_in
from tests.support.waiting import eventually

#: How soon the relay must close a link that broke the protocol.
PROMPT = 1.0
#: Concurrent streams a link may open in the flood test.
STREAM_LIMIT = 4


async def relay_with_key(stacks: StackFactory, **settings: object) -> tuple[RunningStack, str]:
    stack = await stacks(**settings)
    _record, key = await stack.relay.new_scope()
    return stack, key


async def still_serving(stack: RunningStack, daemon_id: str = "witness") -> None:
    """A daemon connected after the trouble is reached by a browser: the relay is fine."""
    record, key = await stack.relay.new_scope("witness")
    await start_stand_in(stack.links, stack.relay.address, key, daemon_id, identity_handler("ok"))
    response = await http_request(
        stack.relay.address, "GET", "/peers", headers=[await stack.relay.session_cookie(record)]
    )
    assert response.status == 200
    assert response.json()["daemon"] == "ok"


# ---------------------------------------------------------------------- the handshake


@pytest.mark.parametrize("path", ["/d/laptop/peers", "/peers"], ids=["by-id", "default"])
async def test_a_request_during_the_links_handshake_waits_for_the_link(
    stacks: StackFactory, path: str
) -> None:
    """A connector reports "connected" once it has the relay's HELLO; the relay registers the
    link once it has the connector's. A request in between waits for the link, not a 503."""
    with trio.fail_after(20):
        stack = await stacks()
        record, key = await stack.relay.new_scope("early")
        await start_stand_in(
            stack.links,
            stack.relay.address,
            key,
            "laptop",
            identity_handler("laptop"),
            hello_delay=0.5,
        )
        links = stack.relay.running.relay.links
        assert links.get(record.scope_id, "laptop") is None  # still in its handshake
        assert links.is_arriving(record.scope_id, "laptop")
        response = await http_request(
            stack.relay.address, "GET", path, headers=[await stack.relay.session_cookie(record)]
        )
        assert response.status == 200
        assert response.json()["daemon"] == "laptop"
        assert not links.is_arriving(record.scope_id, "laptop")


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer rw_" + "A" * 43, "Basic dXNlcjpwYXNz", "Bearer", "Bearer rw_short"],
    ids=["missing", "unknown-key", "basic", "empty-bearer", "malformed-key"],
)
async def test_a_bad_key_is_closed_with_4401(
    stacks: StackFactory, authorization: str | None
) -> None:
    with trio.fail_after(15):
        stack, _key = await relay_with_key(stacks)
        headers = link_headers(None, "laptop")
        if authorization is not None:
            headers.append((b"authorization", authorization.encode()))
        reason = await link_refusal(stack.relay.address, headers)
        await still_serving(stack)
        assert reason.code == CloseCode.INVALID_KEY
        assert len(stack.relay.running.relay.links) == 1  # the witness only


async def test_a_revoked_key_is_closed_with_4401(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack, key = await relay_with_key(stacks)
        store = stack.relay.running.relay.store
        record = await store.verify_key(key, now=time.time())
        assert record is not None
        await store.revoke_key(record.key_id, now=time.time())
        reason = await link_refusal(stack.relay.address, link_headers(key, "laptop"))
        assert reason.code == CloseCode.INVALID_KEY


@pytest.mark.parametrize("version", [None, "", "2", "0", "1.0", "one"])
async def test_a_wrong_or_missing_protocol_version_is_closed_with_4426(
    stacks: StackFactory, version: str | None
) -> None:
    with trio.fail_after(15):
        stack, key = await relay_with_key(stacks)
        reason = await link_refusal(
            stack.relay.address, link_headers(key, "laptop", protocol=version)
        )
        assert reason.code == CloseCode.INCOMPATIBLE_VERSION
        assert "relay speaks protocol 1" in (reason.reason or "")


@pytest.mark.parametrize(
    "daemon_id", [None, "", "has space", "a/b", "x" * 65, "ünïcode", "semi;colon"]
)
async def test_a_malformed_daemon_id_is_closed_with_4400(
    stacks: StackFactory, daemon_id: str | None
) -> None:
    with trio.fail_after(15):
        stack, key = await relay_with_key(stacks)
        headers = link_headers(key, None)
        if daemon_id is not None:
            headers.append((b"repowire-daemon-id", daemon_id.encode("utf-8")))
        reason = await link_refusal(stack.relay.address, headers)
        await still_serving(stack)
        assert reason.code == CloseCode.PROTOCOL_ERROR


async def test_the_key_never_appears_in_the_relay_log(
    stacks: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(15):
        caplog.set_level(logging.DEBUG)
        stack, key = await relay_with_key(stacks)
        await start_stand_in(stack.links, stack.relay.address, key, "laptop", hold_stream)
        await link_refusal(stack.relay.address, link_headers(key + "x", "laptop"))
        assert caplog.records, "expected the relay to log the link's arrival"
        assert key not in caplog.text
        assert key[3:20] not in caplog.text


# ---------------------------------------------------------------------- bad frames


async def expect_protocol_close(link: RawLink, error: int) -> list[Frame]:
    """The relay answers with a GOAWAY carrying ``error`` and closes the link with 4400."""
    started = trio.current_time()
    frames, reason = await link.frames_until_closed()
    took = trio.current_time() - started
    goaways = [f for f in frames if f.type == FrameType.GOAWAY]
    assert goaways, f"no GOAWAY before the close; frames: {frames!r}"
    assert goaways[-1].code == error
    assert reason.code == CloseCode.PROTOCOL_ERROR
    assert took < PROMPT
    return frames


@pytest.mark.parametrize("when", ["instead of HELLO", "after the handshake"])
async def test_garbage_instead_of_frames_closes_the_link_and_the_relay_serves_others(
    stacks: StackFactory, when: str
) -> None:
    with trio.fail_after(15):
        stack, key = await relay_with_key(stacks)
        garbage = b"GET / HTTP/1.1\r\nthis is not a frame at all\r\n\r\n"
        async with open_raw_link(
            stack.relay.address, key, "laptop", handshake=when == "after the handshake"
        ) as link:
            await link.send(garbage)
            await expect_protocol_close(link, ErrorCode.PROTOCOL_ERROR)
        await eventually(lambda: len(stack.relay.running.relay.links) == 0)
        await still_serving(stack)
        # The same daemon may come back at once with a well-formed link.
        await start_stand_in(stack.links, stack.relay.address, key, "laptop", hold_stream)


async def test_a_text_message_on_the_link_is_closed_with_4400(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack, key = await relay_with_key(stacks)
        async with open_link_websocket(stack.relay.address, link_headers(key, "laptop")) as ws:
            link = RawLink(ws)
            await link.hello()
            await ws.send_message("a text message")
            _frames, reason = await link.frames_until_closed()
        await still_serving(stack)
        assert reason.code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("length", [LINK_FRAME_SIZE + 1, 2**31 - 1, 2**32 - 1])
async def test_an_oversized_frame_is_refused_on_its_header_before_the_payload_is_sent(
    stacks: StackFactory, length: int
) -> None:
    with trio.fail_after(15):
        stack, key = await relay_with_key(stacks)
        async with open_raw_link(stack.relay.address, key, "laptop") as link:
            await link.send(open_frame(1, {"kind": "mesh", "target": "nobody"}))
            # Only the 12-byte header: the payload it announces never comes.
            await link.send(encode_frame(FrameType.DATA, 0, 1, b"", length=length))
            await expect_protocol_close(link, ErrorCode.FRAME_SIZE_ERROR)
        await still_serving(stack)


async def test_a_stream_flood_past_the_limit_gets_refused_streams_and_the_relay_stays_up(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(15):
        stack, key = await relay_with_key(stacks, max_streams_per_link=STREAM_LIMIT)
        holder = await start_stand_in(stack.links, stack.relay.address, key, "holder", hold_stream)
        flood = 3 * STREAM_LIMIT
        ids = [2 * i + 1 for i in range(flood)]
        async with open_raw_link(stack.relay.address, key, "flooder") as link:
            await link.send(
                b"".join(open_frame(i, {"kind": "mesh", "target": "holder"}) for i in ids)
            )
            refused: list[int] = []
            for _ in range(1000):
                if len(refused) >= flood - STREAM_LIMIT:
                    break
                frame = await link.next_frame()
                if frame.type == FrameType.RESET:
                    assert frame.code == ErrorCode.REFUSED_STREAM
                    refused.append(frame.stream_id)
            assert refused == ids[STREAM_LIMIT:]
            await eventually(lambda: len(holder.accepted) == STREAM_LIMIT)
            # The link itself is fine: it answers a ping.
            await link.send(encode_frame(FrameType.PING, 0, 0, b"12345678"))
            pong = await link.next_frame()
            assert (pong.type, pong.payload) == (FrameType.PING, b"12345678")
            # Ending one stream frees one slot: the next stream gets through.
            await link.send(encode_frame(FrameType.RESET, 0, ids[0], b"\0\0\0\x07"))
            await link.send(open_frame(ids[-1] + 2, {"kind": "mesh", "target": "holder"}))
            await eventually(lambda: len(holder.accepted) == STREAM_LIMIT + 1)
            await still_serving(stack)


# ---------------------------------------------------------------------- replacement


async def test_the_same_daemon_id_twice_replaces_the_first_link_and_keeps_the_second(
    stacks: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(15):
        caplog.set_level(logging.INFO, logger="repowire.relay")
        stack = await stacks()
        record, key = await stack.relay.new_scope()
        cookie = await stack.relay.session_cookie(record)
        first = await start_stand_in(
            stack.links, stack.relay.address, key, "laptop", identity_handler("first")
        )
        second = await start_stand_in(
            stack.links, stack.relay.address, key, "laptop", identity_handler("second")
        )
        await first.finished.wait()
        assert first.close_code == CloseCode.REPLACED
        # The first link's cleanup has run (it logs its end last) and left the second alone.
        await eventually(lambda: "daemon laptop disconnected" in caplog.text)
        for path in ("/peers", "/d/laptop/peers"):
            response = await http_request(stack.relay.address, "GET", path, headers=[cookie])
            assert response.status == 200
            assert response.json()["daemon"] == "second"
        listed = await http_request(stack.relay.address, "GET", "/api/v1/daemons", headers=[cookie])
        assert [d["daemon_id"] for d in listed.json()["daemons"]] == ["laptop"]
        assert not second.session.ended


async def test_a_replaced_real_connector_backs_off_instead_of_fighting(
    stacks: StackFactory, tmp_path: Path
) -> None:
    with trio.fail_after(15):
        stack, key = await relay_with_key(stacks)
        dashboard = tmp_path / "dashboard"
        dashboard.mkdir()
        old = await start_connected_daemon(stack.links, stack.relay, key, "laptop", dashboard)
        new = await start_connected_daemon(stack.links, stack.relay, key, "laptop", dashboard)
        await old.connector.wait_state(LinkState.DOWN)
        # Give a fighting connector time to come back (its backoff base is 50 ms).
        await trio.sleep(0.5)
        status = old.connector.status()
        assert status.state is LinkState.DOWN
        # It has not given up for good, but waits the long replaced delay before trying again.
        assert status.retrying is True
        assert status.attempts == 1
        assert status.next_retry_at is not None and status.last_error_at is not None
        delay = old.connector.config.backoff.replaced_delay
        assert status.next_retry_at - status.last_error_at >= delay
        assert status.last_error is not None
        assert "replaced by another connection using this key" in status.last_error
        assert new.connector.status().state is LinkState.CONNECTED
        assert new.connector.status().attempts == 1


async def test_a_link_of_another_scope_with_the_same_daemon_id_replaces_nothing(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(15):
        stack = await stacks()
        mine, my_key = await stack.relay.new_scope()
        _, their_key = await stack.relay.new_scope()
        first = await start_stand_in(
            stack.links, stack.relay.address, my_key, "laptop", identity_handler("mine")
        )
        theirs = await start_stand_in(
            stack.links, stack.relay.address, their_key, "laptop", identity_handler("theirs")
        )
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert not first.session.ended and not theirs.session.ended
        cookie = await stack.relay.session_cookie(mine)
        response = await http_request(stack.relay.address, "GET", "/d/laptop/x", headers=[cookie])
        assert response.json()["daemon"] == "mine"


# ---------------------------------------------------------------------- graceful shutdown


async def test_shutdown_sends_go_away_lets_in_flight_requests_finish_and_closes_with_4503(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        request_in = trio.Event()
        release = trio.Event()

        async def slow(stream: MuxStream) -> None:
            exchange = ScriptedHttp(stream)
            await exchange.receive_request()
            await exchange.read_body()
            request_in.set()
            await release.wait()
            await exchange.respond_json(200, {"finished": True})

        async with trio.open_nursery() as nursery:
            relay = await start_relay(nursery, tmp_path / "relay")
            record, key = await relay.new_scope()
            cookie = await relay.session_cookie(record)
            stand_in = await start_stand_in(nursery, relay.address, key, "laptop", slow)
            in_flight: list[HttpResponse] = []

            async def browser() -> None:
                in_flight.append(
                    await http_request(relay.address, "GET", "/slow", headers=[cookie])
                )

            nursery.start_soon(browser)
            await request_in.wait()
            relay.running.shutdown()
            await eventually(lambda: stand_in.session.peer_goaway is not None)
            goaway = stand_in.session.peer_goaway
            assert goaway is not None and goaway.code == ErrorCode.SHUTTING_DOWN
            # While in-flight work drains, new work is turned away at once, not queued.
            refused = await http_request(relay.address, "GET", "/peers", headers=[cookie])
            assert refused.status == 503
            assert refused.json()["error"] == "daemon_offline"
            late = await link_refusal(relay.address, link_headers(key, "late"))
            assert late.code == CloseCode.SHUTTING_DOWN
            # The in-flight request still gets its answer (the grace is 1 s).
            release.set()
            await stand_in.finished.wait()
            assert stand_in.close_code == CloseCode.SHUTTING_DOWN
            await eventually(lambda: bool(in_flight))
        assert in_flight[0].status == 200
        assert in_flight[0].json() == {"finished": True}


async def test_a_real_connector_comes_back_to_a_restarted_relay_on_the_same_port_and_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="repowire.connector")
    with trio.fail_after(25):
        data_dir = tmp_path / "relay"
        dashboard = tmp_path / "dashboard"
        dashboard.mkdir()
        async with trio.open_nursery() as links:
            runner = RelayRunner(links, data_dir)
            first = await runner.start()
            record, key = await first.new_scope()
            daemon = await start_connected_daemon(links, first, key, "laptop", dashboard)
            await runner.stop(graceful=True)
            # The connector was told why (4503: come back soon), whatever it has tried since.
            await eventually(lambda: "4503" in caplog.text)
            # Same port, same settings, same data directory.
            second = await runner.start()
            assert second.port == first.port
            await daemon.connector.wait_state(LinkState.CONNECTED)
            cookie = await second.session_cookie(record)
            health = await http_request(second.address, "GET", "/d/laptop/health", headers=[cookie])
            assert health.status == 200
            assert health.json()["relay"]["state"] == "connected"
            await runner.stop(graceful=True)
            links.cancel_scope.cancel()
