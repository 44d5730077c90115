"""A herd of daemons at the relay: the handshake limit, and a shutdown that does not linger.

After a relay restart every daemon that was linked dials at once. Past
``link_handshake_limit`` handshakes in progress a link is accepted and closed at once with
1013 (try again later), which the connector maps to ``RELAY_BUSY`` and backs off from; only
links that passed the cheap checks (version, key, daemon id) hold a slot, and a slot comes back
when the HELLOs are exchanged or the handshake fails. On shutdown an idle link is closed with
4503 at once, not after the grace given to links with streams in flight.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest
import trio
import trio.testing
import wsproto
import wsproto.events as ws_events

from connector import LinkState
from mux import MuxStream
from protocol import CloseCode, DisconnectReason, Role, Session
from relay import RelaySettings, serve_relay_main
from relay._daemon_link import BUSY_REASON, TRY_AGAIN_LATER
from relay._links import HandshakeLimiter, LinkRegistry
from relay._server import GC_THRESHOLDS, HTTP_STOP_TIMEOUT, hypercorn_config
from tests.support.clients import Address, HttpResponse, http_request
from tests.support.links import LINK_PATH, RawLink, link_headers, link_refusal, open_link_websocket
from tests.support.relays import RelayRunner, RunningStack, StackFactory
from tests.support.scripted import ScriptedHttp
from tests.support.stack import start_connected_daemon
from tests.support.stand_in import hold_stream, identity_handler, start_stand_in
from tests.support.waiting import eventually

#: "At once": how soon a refusal or an idle link's close must come.
PROMPT = 1.0


def in_progress(stack: RunningStack) -> int:
    return stack.relay.running.relay.link_handshakes.in_progress


def busy_refusals(stack: RunningStack) -> float:
    registry = stack.relay.running.relay.metrics.registry
    value = registry.get_sample_value(
        "repowire_relay_rate_limited_total", {"where": "link_handshake"}
    )
    return value or 0.0


async def open_silent_link(address: Address, key: str, daemon_id: str) -> trio.SocketStream:
    """A daemon link that upgrades and sends its HELLO, then never reads again: it will not
    answer the relay's closing handshake (a daemon whose machine froze)."""
    stream = await trio.open_tcp_stream(*address)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    headers = link_headers(key, daemon_id)
    await stream.send_all(
        ws.send(
            ws_events.Request(
                host=f"{address[0]}:{address[1]}", target=LINK_PATH, extra_headers=headers
            )
        )
    )
    accepted = False
    while not accepted:
        ws.receive_data(await stream.receive_some())
        accepted = any(isinstance(event, ws_events.AcceptConnection) for event in ws.events())
    hello = Session(Role.CONNECTOR).data_to_send()
    await stream.send_all(ws.send(ws_events.BytesMessage(data=hello)))
    return stream


# ---------------------------------------------------------------------- the handshake limit


async def test_links_past_the_handshake_limit_are_turned_away_at_once_and_admitted_after(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(20):
        stack = await stacks(link_handshake_limit=2)
        relay = stack.relay
        keys = [await relay.new_scope(f"scope-{n}") for n in range(3)]
        address = relay.address
        async with (
            open_link_websocket(address, link_headers(keys[0][1], "first")) as first,
            open_link_websocket(address, link_headers(keys[1][1], "second")),
        ):
            # Both upgrades are accepted and wait for their HELLO: the limit is reached.
            await eventually(lambda: in_progress(stack) == 2)
            asked = trio.current_time()
            refusal = await link_refusal(address, link_headers(keys[2][1], "third"))
            assert trio.current_time() - asked < PROMPT
            assert refusal.code == TRY_AGAIN_LATER == 1013
            assert refusal.reason == BUSY_REASON
            assert DisconnectReason.from_close_code(refusal.code) is DisconnectReason.RELAY_BUSY
            assert busy_refusals(stack) == 1
            # The refused link was never registered, recorded or counted as connected.
            assert relay.running.relay.links.get(keys[2][0].scope_id, "third") is None
            assert await relay.running.relay.store.known_daemons(keys[2][0].scope_id) == []
            assert in_progress(stack) == 2

            # The first handshake completes: its slot is free, and the third link gets in.
            await RawLink(first).hello()
            await eventually(lambda: in_progress(stack) == 1)
            third = await start_stand_in(
                stack.links, address, keys[2][1], "third", identity_handler("third")
            )
            assert third.session.transport_closed is None
            # The relay registers a link a moment after the daemon sees the HELLOs exchanged.
            links = relay.running.relay.links
            await eventually(lambda: links.get(keys[2][0].scope_id, "third") is not None)
            await eventually(lambda: links.get(keys[0][0].scope_id, "first") is not None)
        # The second left without a HELLO: a failed handshake gives its slot back too.
        await eventually(lambda: in_progress(stack) == 0)
        await third.close()


async def test_links_failing_the_cheap_checks_are_refused_as_before_and_hold_no_slot(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(20):
        stack = await stacks(link_handshake_limit=1)
        relay = stack.relay
        _record, key = await relay.new_scope()
        async with open_link_websocket(relay.address, link_headers(key, "holder")):
            await eventually(lambda: in_progress(stack) == 1)
            wrong_key = await link_refusal(relay.address, link_headers("rw_" + "A" * 43, "x"))
            bad_id = await link_refusal(relay.address, link_headers(key, "has space"))
            old = await link_refusal(relay.address, link_headers(key, "x", protocol="0"))
            assert wrong_key.code == CloseCode.INVALID_KEY
            assert bad_id.code == CloseCode.PROTOCOL_ERROR
            assert old.code == CloseCode.INCOMPATIBLE_VERSION
            assert in_progress(stack) == 1
            assert busy_refusals(stack) == 0


async def test_a_real_connector_told_the_relay_is_busy_backs_off_and_comes_in_later(
    stacks: StackFactory, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        stack = await stacks(link_handshake_limit=1)
        relay = stack.relay
        _holder_record, holder_key = await relay.new_scope("holder")
        _record, key = await relay.new_scope("laptop")
        dashboard = tmp_path / "dashboard"
        dashboard.mkdir()
        async with open_link_websocket(relay.address, link_headers(holder_key, "holder")):
            await eventually(lambda: in_progress(stack) == 1)
            daemon = await start_connected_daemon(
                stack.links, relay, key, "laptop", dashboard, wait=False
            )
            connector = daemon.connector
            await eventually(lambda: busy_refusals(stack) >= 2, tries=2000)
            status = connector.status()
            assert status.state is not LinkState.CONNECTED
            assert status.last_error is not None
            assert "1013" in status.last_error
            assert "relay is busy" in status.last_error
            assert status.retrying
        # The holder left: the next redial gets in.
        await connector.wait_state(LinkState.CONNECTED)
        links = relay.running.relay.links
        await eventually(lambda: links.get(_record.scope_id, "laptop") is not None)


# ---------------------------------------------------------------------- shutdown


async def test_shutdown_closes_idle_links_at_once_and_busy_ones_when_their_streams_end(
    tmp_path: Path,
) -> None:
    # A grace far longer than PROMPT: an idle link waiting for it would be seen.
    grace = 15.0
    with trio.fail_after(30):
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
            runner = RelayRunner(nursery, tmp_path / "relay", shutdown_grace=grace)
            relay = await runner.start()
            busy_record, busy_key = await relay.new_scope("busy")
            _idle_record, idle_key = await relay.new_scope("idle")
            busy = await start_stand_in(nursery, relay.address, busy_key, "busy", slow)
            idles = [
                await start_stand_in(nursery, relay.address, idle_key, f"idle-{n}", hold_stream)
                for n in range(3)
            ]
            silent = await open_silent_link(relay.address, idle_key, "silent")
            await eventually(lambda: len(relay.running.relay.links) == 5)
            in_flight: list[HttpResponse] = []

            async def browser() -> None:
                cookie = await relay.session_cookie(busy_record)
                in_flight.append(await http_request(relay.address, "GET", "/x", headers=[cookie]))

            nursery.start_soon(browser)
            await request_in.wait()
            asked = trio.current_time()
            relay.running.shutdown()
            for idle in idles:
                await idle.finished.wait()
            assert trio.current_time() - asked < PROMPT
            assert [idle.close_code for idle in idles] == [CloseCode.SHUTTING_DOWN] * 3
            # The busy link is still up, its request in flight, well within the grace.
            assert not busy.finished.is_set()
            assert busy.session.peer_goaway is not None
            release.set()
            await busy.finished.wait()
            assert busy.close_code == CloseCode.SHUTTING_DOWN
            assert trio.current_time() - asked < grace
            # The silent link never answers its close: it holds the relay up only for
            # HTTP_STOP_TIMEOUT, not for another grace.
            with trio.fail_after(HTTP_STOP_TIMEOUT + PROMPT):
                await runner.wait_stopped()
            await silent.aclose()
            await eventually(lambda: bool(in_flight))
        assert in_flight[0].status == 200
        assert in_flight[0].json() == {"finished": True}


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "name", ["link_handshake_limit", "link_handshake_limit_per_key", "listen_backlog"]
)
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "64"])
def test_bad_limits_are_refused_naming_the_setting(
    tmp_path: Path, name: str, value: object
) -> None:
    with pytest.raises(ValueError, match=name):
        RelaySettings(data_dir=tmp_path, **{name: value})  # type: ignore[arg-type]


async def test_arriving_links_are_counted_and_waited_for_per_daemon() -> None:
    links = LinkRegistry()
    links.expect("s", "a")
    links.expect("s", "a")  # a second link for the same daemon, also in its handshake
    assert links.is_arriving("s", "a") and links.is_arriving("s", None)
    assert not links.is_arriving("s", "b") and not links.is_arriving("t", None)
    arrived = trio.Event()

    async def wait() -> None:
        await links.wait_arrival("s", "a")
        arrived.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            links.settle("s", "a")
            await trio.testing.wait_all_tasks_blocked()
            assert not arrived.is_set()  # one of the two is still in its handshake
            links.settle("s", "a")
    assert arrived.is_set() and not links.is_arriving("s", None)
    await links.wait_arrival("s", "a")  # nothing arriving: returns at once


def test_one_scope_holds_at_most_its_share_of_the_handshake_slots() -> None:
    limiter = HandshakeLimiter(4, per_scope=2)
    assert limiter.try_enter("a") and limiter.try_enter("a")
    assert not limiter.try_enter("a")  # its share is taken ...
    assert limiter.try_enter("b") and limiter.try_enter("b")  # ... others still get in
    assert not limiter.try_enter("c")  # until the whole limit is reached
    assert limiter.in_progress == 4
    limiter.leave("a")
    assert limiter.try_enter("c")
    assert not limiter.try_enter("a")  # the whole limit again
    limiter.leave("b")
    assert limiter.try_enter("a")
    with pytest.raises(RuntimeError):
        limiter.leave("nobody")
    with pytest.raises(ValueError):
        HandshakeLimiter(4, per_scope=0)


@pytest.mark.parametrize("value", [0, -2.0, float("nan")])
def test_a_body_timeout_must_be_positive(tmp_path: Path, value: float) -> None:
    with pytest.raises(ValueError, match="body_timeout"):
        RelaySettings(data_dir=tmp_path, body_timeout=value)


def test_hypercorn_gets_the_backlog_and_a_short_stop_after_the_drain(tmp_path: Path) -> None:
    config = hypercorn_config(RelaySettings(data_dir=tmp_path, listen_backlog=777))
    assert config.backlog == 777
    assert config.graceful_timeout == HTTP_STOP_TIMEOUT
    defaults = RelaySettings(data_dir=tmp_path)
    assert hypercorn_config(defaults).backlog == defaults.listen_backlog > 100


async def test_the_relay_process_entry_tunes_the_garbage_collector(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_relay_main, RelaySettings(data_dir=tmp_path, port=0))
                deadline = time.monotonic() + 10
                while "listening on" not in capsys.readouterr().out:
                    assert time.monotonic() < deadline
                    await trio.sleep(0.01)
                assert gc.get_threshold() == GC_THRESHOLDS
                nursery.cancel_scope.cancel()
    finally:
        gc.set_threshold(*before)
