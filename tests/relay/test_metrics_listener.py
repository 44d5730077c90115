"""``/metrics`` shows every tenant's traffic: it is served on its own listener
(``RelaySettings.metrics_listen``, ``--metrics-listen``), never on the public one."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from tests.support.clients import http_request
from tests.support.processes import Cli
from tests.support.relays import StackFactory, start_relay
from tests.support.stand_in import identity_handler, start_stand_in


async def test_metrics_are_served_on_their_own_listener_only(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack = await stacks(metrics_listen="127.0.0.1:0")
        running = stack.relay.running
        assert running.metrics_url is not None
        parts = urlsplit(running.metrics_url)
        assert parts.hostname == "127.0.0.1" and parts.path == "/metrics"
        assert parts.port is not None and parts.port != running.port
        _, key = await stack.relay.new_scope()
        await start_stand_in(stack.links, stack.relay.address, key, "laptop", identity_handler("x"))
        metrics_address = ("127.0.0.1", parts.port)
        answer = await http_request(metrics_address, "GET", "/metrics")
        assert answer.status == 200
        assert (answer.header("content-type") or "").startswith("text/plain")
        text = answer.body.decode()
        assert "repowire_relay_daemons_connected 1.0" in text
        assert "repowire_relay_links_refused_total" in text
        # Nothing else there, and not on the public listener.
        assert (await http_request(metrics_address, "GET", "/")).status == 404
        public = await http_request(stack.relay.address, "GET", "/metrics")
        assert public.status == 404
        assert "repowire_relay" not in public.body.decode()


async def test_metrics_are_off_without_an_address(stacks: StackFactory) -> None:
    with trio.fail_after(15):
        stack = await stacks()
        assert stack.relay.running.metrics_url is None


async def test_a_metrics_address_in_use_fails_the_start_with_one_line(tmp_path: Path) -> None:
    with trio.fail_after(30), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"

        # In process: a ListenError naming the address, before the relay reports anything.
        with pytest.RaisesGroup(pytest.RaisesExc(OSError, match=address), flatten_subgroups=True):
            async with trio.open_nursery() as nursery:
                await start_relay(nursery, tmp_path / "data", metrics_listen=address)

        # And `repowire relay start` says so in one line, without a traceback.
        work = tmp_path / "work"
        work.mkdir()
        cli = Cli(tmp_path / "home", work)
        result = await cli.run(
            "relay",
            "start",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "cli-data"),
            "--metrics-listen",
            address,
        )
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        lines = [line for line in result.stderr.splitlines() if address in line]
        assert len(lines) == 1, result.stderr
        assert "metrics" in lines[0]
