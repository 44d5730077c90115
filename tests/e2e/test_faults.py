"""Faults, end to end: real relay and daemon processes on loopback, killed and cut off.

- The relay SIGKILLed in the middle of a large download, then started again on the same port
  and data directory: the download fails at once, the connector comes back by itself, the
  next request goes through.
- A daemon SIGKILLed mid-response: each of its streams fails in the way its state allows, and
  another daemon's traffic through the same relay carries on untouched.
- A link that goes silent: both ends notice within their keepalive bounds.
- A hundred connectors and a relay restart: the reconnects are spread out, not a burst.

The in-process versions of these (``tests/relay``, ``tests/connector``) script every byte;
these run the programs as a user does (``repowire relay start``, a daemon process with the real
connector) and kill them the way machines fail.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio_websocket
from trio_websocket import CloseReason

from connector import Connector, ConnectorConfig, LinkState
from mux import MuxConfig
from protocol import BackoffConfig, CloseCode
from relay import RelaySettings
from tests.support.clients import (
    HttpStream,
    http_request,
    next_text,
    open_browser_websocket,
    open_http_stream,
)
from tests.support.fault_daemon import MIB, pattern
from tests.support.lab import Lab, open_lab
from tests.support.links import RawLink, link_headers, open_link_websocket
from tests.support.processes import free_port
from tests.support.proxy import SilentProxy
from tests.support.sessions import session_id_of, sign_in
from tests.support.stats import describe, percentile
from tests.support.waiting import poll

#: Size of the download the relay dies in the middle of (it never gets near the end).
HUGE = 200 * MIB
#: Bytes per second the fault daemon serves the huge body at.
SLOW_RATE = 8 * MIB
#: Bytes the client must have before the kill (well into the body).
BEFORE_KILL = 2 * MIB
#: Seconds after a kill within which every affected client must have seen the failure.
PROMPT = 3.0
#: Most WebSocket messages a test reads while it waits for something else.
MAX_MESSAGES = 10_000
#: Extra seconds on top of a computed bound for scheduling and process start-up.
SLACK = 2.0

#: The relay's link keepalive (RelaySettings defaults; `relay start` has no flag for them).
_RELAY_DEFAULTS = RelaySettings(data_dir=Path("unused"))
RELAY_PING_INTERVAL = _RELAY_DEFAULTS.link_ping_interval
RELAY_PING_TIMEOUT = _RELAY_DEFAULTS.link_ping_timeout
#: Seconds a relay's shutdown gives in-flight streams (RelaySettings default).
RELAY_SHUTDOWN_GRACE = _RELAY_DEFAULTS.shutdown_grace
#: The mux driver's final flush-and-close time (MuxConfig default, both ends).
CLOSE_TIMEOUT = MuxConfig().close_timeout
#: The connector's keepalive (MuxConfig defaults, as `repowire serve` runs it).
CONNECTOR_PING_INTERVAL = MuxConfig().keepalive_interval
CONNECTOR_PING_TIMEOUT = MuxConfig().keepalive_timeout


#: How many connectors see the relay restart.
HERD = 100
#: Keys (scopes) the herd is spread over: 10 links each, within the relay's default quota of
#: links per scope (16).
HERD_KEYS = 10
#: The product's restart spread (BackoffConfig default).
RESTART_SPREAD = BackoffConfig().restart_spread
#: How often the herd's status is sampled, seconds, and at most how many times.
HERD_SAMPLE_INTERVAL = 0.005
HERD_SAMPLES = 20_000
#: Least spread (10th to 90th percentile) of the first redials, as a fraction of
#: RESTART_SPREAD. Full jitter over [0, spread) gives 0.8; one burst gives about 0.
MIN_SPREAD_FRACTION = 0.3

#: Hard stop for one test, setup included (each phase has a tighter deadline of its own).
TEST_DEADLINE = 90


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async with open_lab(tmp_path) as lab:
        yield lab


async def read_some_of(stream: HttpStream, at_least: int) -> int:
    """Read the body until ``at_least`` bytes arrived, checking them against the pattern;
    return how many arrived."""
    received = 0
    while received < at_least:
        chunk = await stream.read_chunk()
        assert chunk is not None, "the body ended early"
        assert chunk == pattern(received, len(chunk)), f"wrong bytes at {received}"
        received += len(chunk)
    return received


async def read_to_failure(stream: HttpStream, received: int) -> tuple[int, BaseException]:
    """Keep reading a body that must fail; ``(bytes received, the error)``."""
    for _ in range(HUGE):  # every read returns at least a byte
        try:
            chunk = await stream.read_chunk()
        except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
            return received, exc
        assert chunk is not None, "the body ended normally although its sender died"
        received += len(chunk)
    raise AssertionError("the body never failed")


# ---------------------------------------------------------------------- the relay dies


async def test_relay_killed_mid_download_fails_it_cleanly_and_comes_back(lab: Lab) -> None:
    with trio.fail_after(60):
        relay = await lab.relay()
        key = await lab.key(relay)
        daemon = await lab.fault_daemon(relay.ws_url, key, "laptop")
        _, cookie = await sign_in(relay.address, key)
        port = relay.port

        async with open_http_stream(
            relay.address,
            "GET",
            f"/d/laptop/big?size={HUGE}&rate={SLOW_RATE}",
            headers=[cookie],
        ) as download:
            assert download.status == 200
            assert download.header("content-length") == str(HUGE)
            received = await read_some_of(download, BEFORE_KILL)
            await relay.kill()
            killed_at = trio.current_time()
            with trio.fail_after(PROMPT):
                received, error = await read_to_failure(download, received)
        failed_after = trio.current_time() - killed_at
        print(
            f"\ndownload failed {failed_after * 1000:.0f} ms after the kill, at "
            f"{received / MIB:.1f} of {HUGE // MIB} MiB: {type(error).__name__}"
        )
        assert received < HUGE

        # The daemon's side of the dead stream ends too: nothing stays wedged there.
        async def daemon_idle() -> bool:
            return bool((await daemon.health())["active"] == 0)

        with trio.fail_after(PROMPT):
            await poll(daemon_idle, what="the daemon's in-flight count back to 0")
        status = await daemon.wait_link(lambda s: s["state"] != "connected")
        assert status["retrying"] is True

        # Same port, same data directory: the key and the browser session survive.
        await relay.start(port)
        assert relay.port == port
        restarted_at = trio.current_time()
        status = await daemon.wait_connected()
        print(
            f"connector back {trio.current_time() - restarted_at:.2f} s after the restart "
            f"(attempts {status['attempts']})"
        )
        assert status["attempts"] >= 2

        size = 4 * MIB
        async with open_http_stream(
            relay.address, "GET", f"/d/laptop/big?size={size}", headers=[cookie]
        ) as again:
            assert again.status == 200
            body = await again.read_all(limit=size)
        assert body == pattern(0, size)
        lab.assert_no_secret(key, session_id_of(cookie))


# ---------------------------------------------------------------------- a daemon dies


async def test_daemon_killed_mid_response_fails_its_streams_and_spares_the_other(
    lab: Lab,
) -> None:
    with trio.fail_after(60):
        relay = await lab.relay()
        key = await lab.key(relay)
        doomed = await lab.fault_daemon(relay.ws_url, key, "doomed")
        await lab.fault_daemon(relay.ws_url, key, "steady")
        _, cookie = await sign_in(relay.address, key)
        origin = ("Origin", relay.url)
        outcomes: dict[str, Any] = {}
        # The steady daemon's body takes this long; the kill lands in its middle.
        steady_size = 6 * MIB
        steady_rate = 3 * MIB

        async def no_head_yet(ready: trio.Event) -> None:
            async def arrived() -> bool:
                return ("GET", "/hang") in await doomed.seen()

            async def watch() -> None:
                await poll(arrived, what="the request reaching the daemon")
                ready.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                response = await http_request(
                    relay.address, "GET", "/d/doomed/hang", headers=[cookie]
                )
            outcomes["hang"] = response

        async def mid_body(ready: trio.Event) -> None:
            async with open_http_stream(
                relay.address,
                "GET",
                f"/d/doomed/big?size={HUGE}&rate={SLOW_RATE}",
                headers=[cookie],
            ) as download:
                assert download.status == 200
                received = await read_some_of(download, BEFORE_KILL)
                ready.set()
                outcomes["big"] = await read_to_failure(download, received)

        async def websocket(ready: trio.Event) -> None:
            async with open_browser_websocket(
                relay.address, "/d/doomed/ws", [cookie, origin]
            ) as ws:
                for _ in range(3):
                    assert (await next_text(ws)).startswith("tick")
                ready.set()
                try:
                    for _ in range(MAX_MESSAGES):
                        await ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    outcomes["ws"] = exc.reason

        async def steady_download() -> None:
            async with open_http_stream(
                relay.address,
                "GET",
                f"/d/steady/big?size={steady_size}&rate={steady_rate}",
                headers=[cookie],
            ) as download:
                assert download.status == 200
                outcomes["steady"] = await download.read_all(limit=steady_size)

        async def steady_websocket(killed: trio.Event) -> None:
            async with open_browser_websocket(
                relay.address, "/d/steady/ws", [cookie, origin]
            ) as ws:
                await killed.wait()
                ticks = [await next_text(ws) for _ in range(10)]
                await ws.send_message("still there?")
                for _ in range(MAX_MESSAGES):
                    message = await next_text(ws)
                    if not message.startswith("tick"):
                        outcomes["steady_ws"] = (ticks, message)
                        return

        killed = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(steady_download)
            nursery.start_soon(steady_websocket, killed)
            readies = []
            for task in (no_head_yet, mid_body, websocket):
                ready = trio.Event()
                readies.append(ready)
                nursery.start_soon(task, ready)
            for ready in readies:
                await ready.wait()
            await doomed.kill()
            killed.set()
            killed_at = trio.current_time()
            with trio.fail_after(PROMPT):
                await poll(
                    lambda: {"hang", "big", "ws"} <= outcomes.keys(),
                    interval=0.01,
                    what="every stream of the killed daemon failing",
                )
            took = trio.current_time() - killed_at
            print(f"\nthe killed daemon's streams all failed within {took:.2f} s")

        hang = outcomes["hang"]
        assert hang.status == 502
        assert hang.json()["error"] == "daemon_failed"
        received, error = outcomes["big"]
        assert received < HUGE
        print(f"aborted download: {received / MIB:.1f} MiB then {type(error).__name__}")
        assert outcomes["ws"].code == 1011

        # The other daemon's traffic went on whole, during and after the kill.
        assert outcomes["steady"] == pattern(0, steady_size)
        ticks, echo = outcomes["steady_ws"]
        assert all(tick.startswith("tick") for tick in ticks)
        assert echo == "echo still there?"
        again = await http_request(relay.address, "GET", "/d/steady/hello", headers=[cookie])
        assert again.status == 200 and again.json()["daemon_id"] == "steady"
        gone = await http_request(relay.address, "GET", "/d/doomed/hello", headers=[cookie])
        assert gone.status == 503
        assert gone.json()["error"] == "daemon_offline"
        lab.assert_no_secret(key, session_id_of(cookie))


# ---------------------------------------------------------------------- a silent link


async def daemon_listing(address: tuple[str, int], key: str) -> dict[str, bool]:
    """``{daemon id: online}`` from the relay's ``/api/v1/daemons`` (Bearer key)."""
    response = await http_request(
        address, "GET", "/api/v1/daemons", headers=[("Authorization", f"Bearer {key}")]
    )
    assert response.status == 200, response.status
    return {entry["daemon_id"]: entry["online"] for entry in response.json()["daemons"]}


@pytest.mark.slow
async def test_a_silent_link_is_dropped_by_both_ends_within_their_ping_timeouts(
    lab: Lab,
) -> None:
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay()
        key = await lab.key(relay)
        connector_bound = CONNECTOR_PING_INTERVAL + CONNECTOR_PING_TIMEOUT + SLACK
        relay_bound = RELAY_PING_INTERVAL + RELAY_PING_TIMEOUT + CLOSE_TIMEOUT + SLACK
        with trio.fail_after(relay_bound + 20):
            async with trio.open_nursery() as nursery:
                proxy: SilentProxy = await nursery.start(SilentProxy(relay.address).serve)
                # The connector as `repowire serve` runs it (default keepalive), behind the proxy.
                connector = Connector(
                    ConnectorConfig(
                        relay_url=proxy.ws_url,
                        api_key=key,
                        daemon_id="silent",
                        daemon_port=free_port(),
                    )
                )
                connector_scope = trio.CancelScope()

                async def run_connector() -> None:
                    with connector_scope:
                        await connector.run()

                nursery.start_soon(run_connector)
                await connector.wait_state(LinkState.CONNECTED)
                assert (await daemon_listing(relay.address, key)) == {"silent": True}

                proxy.silence()
                silent_since = trio.current_time()
                await connector.wait_state(LinkState.DOWN)
                connector_noticed = trio.current_time() - silent_since
                # Its part is done; its redials into the dead path are not this test's subject.
                connector_scope.cancel()
                print(
                    f"\nconnector found the silent link after {connector_noticed:.2f} s "
                    f"(bound {connector_bound:.0f} s): {connector.status().last_error}"
                )
                assert connector_noticed <= connector_bound

                async def relay_dropped() -> bool:
                    return not (await daemon_listing(relay.address, key))["silent"]

                await poll(
                    relay_dropped, tries=200, interval=0.25, what="the relay dropping the link"
                )
                relay_noticed = trio.current_time() - silent_since
                print(
                    f"relay dropped the silent link after {relay_noticed:.2f} s "
                    f"(bound {relay_bound:.0f} s)"
                )
                assert relay_noticed <= relay_bound
                # Found by the relay's own keepalive: its side of the path never saw a close.
                assert relay_noticed >= RELAY_PING_TIMEOUT
                nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------- a herd and a restart


class HerdWatch:
    """Samples the status of every connector; records, per connector, when it was first seen
    down, when it first redialled and when it was connected again (test clock, seconds)."""

    def __init__(self, connectors: list[Connector]) -> None:
        self.connectors = connectors
        self.baseline = [c.status().attempts for c in connectors]
        self.down: dict[int, float] = {}
        self.first_redial: dict[int, float] = {}
        self.reconnected: dict[int, float] = {}

    async def run(self) -> None:
        # Until cancelled (the test's deadline bounds it).
        for _ in range(HERD_SAMPLES):
            now = trio.current_time()
            for index, connector in enumerate(self.connectors):
                status = connector.status()
                if status.state is not LinkState.CONNECTED:
                    self.down.setdefault(index, now)
                if status.attempts > self.baseline[index]:
                    self.first_redial.setdefault(index, now)
                if index in self.down and status.state is LinkState.CONNECTED:
                    self.reconnected.setdefault(index, now)
            await trio.sleep(HERD_SAMPLE_INTERVAL)


@pytest.mark.slow
async def test_a_hundred_connectors_reconnect_spread_out_after_a_relay_restart(lab: Lab) -> None:
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay()
        keys = [await lab.key(relay, f"herd-{n}") for n in range(HERD_KEYS)]
        dummy_port = free_port()
        connectors = [
            Connector(
                ConnectorConfig(
                    relay_url=relay.ws_url,
                    api_key=keys[n % HERD_KEYS],
                    daemon_id=f"herd-{n:03d}",
                    daemon_port=dummy_port,
                )
            )
            for n in range(HERD)
        ]
        with trio.fail_after(80):
            async with trio.open_nursery() as nursery:
                for connector in connectors:
                    nursery.start_soon(connector.run)
                for connector in connectors:
                    await connector.wait_state(LinkState.CONNECTED)

                async def all_registered() -> bool:
                    listings = [await daemon_listing(relay.address, key) for key in keys]
                    return sum(sum(listing.values()) for listing in listings) == HERD

                # The relay registers a link a moment after the connector sees it up; the restart
                # under test starts from a relay that knows all of them.
                await poll(all_registered, what="the relay listing every link")
                watch = HerdWatch(connectors)
                nursery.start_soon(watch.run)
                port = relay.port
                terminated_at = trio.current_time()
                wall = time.time()
                assert await relay.terminate() == 0
                stopped_after = trio.current_time() - terminated_at
                await relay.start(port)
                started_after = trio.current_time() - terminated_at
                await poll(
                    lambda: len(watch.reconnected) == HERD,
                    tries=1200,
                    what="every connector connected again",
                )
                nursery.cancel_scope.cancel()

        assert len(watch.down) == HERD, "some links never went down"
        first = [watch.first_redial[i] - terminated_at for i in range(HERD)]
        back = [watch.reconnected[i] - terminated_at for i in range(HERD)]
        print(
            f"\nrelay stopped {stopped_after:.2f} s after SIGTERM, listening again after "
            f"{started_after:.2f} s"
        )
        print(f"first redial (s after SIGTERM): {describe(first)}")
        print(f"connected again (s after SIGTERM): {describe(back)}")
        print(
            f"attempts per connector: {describe([float(c.status().attempts) for c in connectors])}"
        )
        assert all(c.status().last_connected_at is not None for c in connectors)
        assert all((c.status().last_connected_at or 0) >= wall for c in connectors)
        spread = percentile(first, 0.9) - percentile(first, 0.1)
        print(
            f"p10-p90 spread of first redials: {spread:.3f} s (restart_spread {RESTART_SPREAD} s)"
        )
        assert spread >= MIN_SPREAD_FRACTION * RESTART_SPREAD
        lab.assert_no_secret(*keys)


# ---------------------------------------------------------------------- shutdown races


async def test_a_link_finishing_its_handshake_during_shutdown_is_told_to_come_back(
    lab: Lab,
) -> None:
    """SIGTERM lands while a daemon's link is between the WebSocket upgrade and the HELLO (one
    round trip on a real network; many at once when a fleet reconnects). The shutdown promise
    holds for it too: close 4503 (so it comes back promptly) as soon as it has no stream in
    flight, not a link left up until the HTTP server's own deadline."""
    with trio.fail_after(TEST_DEADLINE):
        relay = await lab.relay()
        key = await lab.key(relay)
        assert relay.child is not None
        child = relay.child
        with trio.fail_after(30):
            async with open_link_websocket(relay.address, link_headers(key, "late")) as ws:
                link = RawLink(ws)
                child.process.send_signal(signal.SIGTERM)
                await poll(lambda: "received SIGTERM" in child.stderr(), what="the relay's SIGTERM")
                await link.hello()
                hello_at = trio.current_time()
                reason: CloseReason | None = None
                with trio.move_on_after(PROMPT):
                    _, reason = await link.frames_until_closed()
                took = trio.current_time() - hello_at
            print(f"\nlink closed {took:.2f} s after its HELLO: {reason}")
            assert reason is not None, f"the link was still up {PROMPT:g} s into the shutdown"
            assert reason.code == CloseCode.SHUTTING_DOWN
            with trio.move_on_after(PROMPT):
                await child.process.wait()
            assert child.process.returncode == 0, "the relay did not exit promptly"
