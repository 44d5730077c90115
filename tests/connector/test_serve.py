"""`repowire serve` with relay access: in-process through run_daemon, and as real processes."""

from __future__ import annotations

import stat
from pathlib import Path

import attrs
import trio

from common import looks_like_key
from connector import Connector, LinkState
from repowire._serve import run_daemon
from repowire.config import Settings, load_settings, update_config
from tests.support.clients import Address, http_request
from tests.support.leaks import assert_no_full_key
from tests.support.processes import (
    LOOPBACK,
    ChildProcess,
    Cli,
    RelayProcess,
    free_port,
    start_child,
    stop_processes,
    wait_for_relay_state,
)
from tests.support.stack import Stack
from tests.support.waiting import eventually

#: Seconds the whole process test may take.
PROCESS_TEST_TIMEOUT = 30


@attrs.define(kw_only=True)
class Served:
    """A daemon started the way `repowire serve` starts it."""

    address: Address
    connector: Connector
    scope: trio.CancelScope
    stopped: trio.Event

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


async def start_served(nursery: trio.Nursery, settings: Settings) -> Served:
    async def run(*, task_status: trio.TaskStatus[Served]) -> None:
        stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    address, connector = await inner.start(run_daemon, settings)
                    assert connector is not None, "relay access is off"
                    task_status.started(
                        Served(address=address, connector=connector, scope=scope, stopped=stopped)
                    )
        finally:
            stopped.set()

    served: Served = await nursery.start(run)
    return served


def settings_for(home: Path) -> Settings:
    """The settings `repowire serve` would resolve in ``home`` (no environment), port 0."""
    settings = load_settings(home, environ={})
    return attrs.evolve(settings, daemon=attrs.evolve(settings.daemon, port=0))


async def test_restart_after_changing_the_relay_url_uses_the_new_url(
    stack: Stack, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    with trio.fail_after(15):
        # Two relays sharing one key store, so the key works on both.
        first = stack.relay_runner("relays")
        second = stack.relay_runner("relays")
        relay_a = await first.start()
        relay_b = await second.start()
        record, key = await relay_a.new_scope()
        update_config(
            home,
            {
                "daemon": {"id": "laptop"},
                "relay": {"enabled": True, "url": relay_a.ws_url, "api_key": key},
            },
        )
        served = await start_served(stack.daemons, settings_for(home))
        await served.connector.wait_state(LinkState.CONNECTED)
        assert served.connector.status().relay_url == relay_a.ws_url
        links_a = relay_a.running.relay.links
        links_b = relay_b.running.relay.links
        await eventually(lambda: links_a.get(record.scope_id, "laptop") is not None)
        assert links_b.get(record.scope_id, "laptop") is None

        # Stop the daemon and point the config file at the other relay.
        await first.stop()
        await served.connector.wait_state(LinkState.DOWN)
        await served.stop()
        update_config(home, {"relay": {"url": relay_b.ws_url}})

        served = await start_served(stack.daemons, settings_for(home))
        await served.connector.wait_state(LinkState.CONNECTED)
        assert served.connector.status().relay_url == relay_b.ws_url
        await eventually(lambda: links_b.get(record.scope_id, "laptop") is not None)
        health = await http_request(served.address, "GET", "/health")
        assert health.json()["relay"]["relay_url"] == relay_b.ws_url


async def test_serve_with_relay_end_to_end_as_processes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    cli = Cli(home, work)
    children: list[ChildProcess] = []
    relay = RelayProcess(cli, tmp_path / "relay-data", children=children)
    try:
        with trio.fail_after(PROCESS_TEST_TIMEOUT):
            await relay.start()
            daemon_port = free_port()
            serve = await start_child(
                cli,
                "serve",
                "serve",
                "--relay",
                "--relay-url",
                relay.ws_url,
                "--port",
                str(daemon_port),
            )
            children.append(serve)
            link = await wait_for_relay_state(serve, (LOOPBACK, daemon_port), "connected")
            assert link["relay_url"] == f"ws://{LOOPBACK}:{relay.port}"

            # The first-run key is in the config file, which only its owner may read.
            config_file = home / "config.yaml"
            assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
            stored = load_settings(home, environ={}).relay
            assert stored.api_key is not None and looks_like_key(stored.api_key)

            status = await cli.run("status", "--port", str(daemon_port))
            assert status.returncode == 0, status.stderr
            assert any(
                line.split() == ["relay:", "connected"] for line in status.stdout.splitlines()
            ), status.stdout
            assert_no_full_key(status.stdout, status.stderr)

            assert await serve.terminate() == 0
            stopped = await cli.run("status", "--port", str(daemon_port))
            assert stopped.returncode == 2
            assert "not running" in stopped.stderr

            assert await relay.terminate() == 0
            assert "Registered with" in serve.stdout()
            assert relay.child is not None
            assert_no_full_key(
                serve.stdout(), serve.stderr(), relay.child.stdout(), relay.child.stderr()
            )
    finally:
        await stop_processes(children)
