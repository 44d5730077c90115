"""`repowire serve` stopped by a signal leaves its relay cleanly (issue 14, item 8): a GOAWAY,
then the WebSocket close 1001 (going away), instead of a dropped connection."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from common import generate_key
from repowire.config import update_config
from tests.support.fake_relay import start_fake_relay
from tests.support.processes import Cli, free_port, start_child
from tests.support.stack import Stack
from tests.support.waiting import eventually

#: Seconds the whole process test may take.
PROCESS_TEST_TIMEOUT = 30
#: WebSocket close code "going away": an endpoint that is shutting down.
GOING_AWAY = 1001


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serve_stopped_by_a_signal_sends_going_away(
    tmp_path: Path, nursery: trio.Nursery, signum: signal.Signals
) -> None:
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        fake = await start_fake_relay(nursery)
        update_config(
            home,
            {
                "daemon": {"id": "laptop", "port": free_port()},
                "relay": {"enabled": True, "url": fake.ws_url, "api_key": generate_key()},
            },
        )
        serve = await start_child(Cli(home, work), "serve", "serve", "--relay")
        try:
            session = await fake.session()
            await serve.wait_for_line("relay link up")
            serve.process.send_signal(signum)
            assert await serve.process.wait() == 0, serve.stderr()
            await session.wait_ended()
        finally:
            with trio.CancelScope(shield=True):
                await serve.terminate()
        closed = session.transport_closed
        assert closed is not None
        assert closed.code == GOING_AWAY, (closed, serve.stderr())


async def test_relay_sees_going_away_when_serve_is_terminated(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="repowire.relay")
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    with trio.fail_after(PROCESS_TEST_TIMEOUT):
        relay = await stack.start_relay()
        record, key = await relay.new_scope()
        update_config(
            home,
            {
                "daemon": {"id": "laptop", "port": free_port()},
                "relay": {"enabled": True, "url": relay.ws_url, "api_key": key},
            },
        )
        serve = await start_child(Cli(home, work), "serve", "serve", "--relay")
        links = relay.running.relay.links
        try:
            # Where to point a browser or a phone, said once the link is up.
            line = await serve.wait_for_line("relay link up")
            assert line == f"relay link up: dashboard at http://{relay.address[0]}:" + (
                f"{relay.address[1]}/d/laptop/dashboard/"
            )
            await eventually(lambda: links.get(record.scope_id, "laptop") is not None)
            link = links.get(record.scope_id, "laptop")
            assert link is not None
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.process.wait() == 0, serve.stderr()
            await link.finished.wait()
        finally:
            with trio.CancelScope(shield=True):
                await serve.terminate()
        # hypercorn reports any close the peer starts as 1006 to the relay, so the relay
        # knows a deliberate exit by the GOAWAY that came first.
        goaway = link.session.peer_goaway
        assert goaway is not None, serve.stderr()
        assert "shutting down" in goaway.reason
        # One ordinary line in the relay's log, not a dropped link (and no traceback).
        assert "daemon laptop left (it is going away)" in caplog.text
        assert "Traceback" not in caplog.text
