"""serve_daemon: binding, reporting the address, graceful stop on cancellation, quiet logs."""

from __future__ import annotations

import logging
import socket
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
from quart_trio import QuartTrio

from repowire.daemon import (
    DaemonState,
    MeshClient,
    MeshDirectory,
    MeshResponse,
    create_app,
    serve_daemon,
)
from repowire.daemon._server import make_config
from tests.support.clients import SseReader, http_request, open_http_stream


def make_app(
    dashboard_dir: Path, state: DaemonState | None = None, mesh: MeshClient | None = None
) -> QuartTrio:
    return create_app(
        daemon_id="alpha",
        version="1.2.3",
        state=state or DaemonState(),
        mesh=mesh,
        relay_status=None,
        dashboard_dir=dashboard_dir,
    )


async def test_port_zero_reports_the_bound_address(dashboard_dir: Path) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            first = await nursery.start(partial(serve_daemon, make_app(dashboard_dir), port=0))
            second = await nursery.start(partial(serve_daemon, make_app(dashboard_dir), port=0))
            assert first[0] == second[0] == "127.0.0.1"
            assert first[1] != second[1]
            assert first[1] > 0
            for address in (first, second):
                response = await http_request(address, "GET", "/health")
                assert response.json()["version"] == "1.2.3"
            nursery.cancel_scope.cancel()


async def test_cancellation_stops_the_server(dashboard_dir: Path) -> None:
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                address = await nursery.start(
                    partial(serve_daemon, make_app(dashboard_dir), port=0)
                )
                scope.cancel()
        assert scope.cancelled_caught
        with pytest.raises(OSError):
            await trio.open_tcp_stream(*address)


async def test_open_streams_are_ended_within_the_grace_period(dashboard_dir: Path) -> None:
    grace = 0.2
    state = DaemonState()
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()
            stopped = trio.Event()

            async def run_server(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                with server_scope:
                    await serve_daemon(
                        make_app(dashboard_dir, state),
                        port=0,
                        graceful_timeout=grace,
                        task_status=task_status,
                    )
                stopped.set()

            address = await outer.start(run_server)
            async with open_http_stream(address, "GET", "/events/stream") as stream:
                reader = SseReader(stream)
                await reader.next_message()
                server_scope.cancel()
                # Stopped soon after the grace period, though the stream was still open.
                with trio.fail_after(grace + 1.5):
                    await stopped.wait()
                # And the stream was ended, not left hanging (else fail_after fires).
                with trio.fail_after(2):
                    try:
                        while await stream.read_chunk() is not None:
                            pass
                    except (trio.BrokenResourceError, h11.RemoteProtocolError):
                        pass
    assert state.subscriber_count == 0


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="needs TCP_USER_TIMEOUT")
async def test_a_client_that_stops_reading_cannot_hold_the_shutdown(dashboard_dir: Path) -> None:
    state = DaemonState(subscriber_buffer=4)
    with trio.fail_after(15):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()
            stopped = trio.Event()

            async def run_server(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                with server_scope:
                    await serve_daemon(
                        make_app(dashboard_dir, state),
                        port=0,
                        graceful_timeout=0.2,
                        stalled_client_timeout=1.0,
                        task_status=task_status,
                    )
                stopped.set()

            address = await outer.start(run_server)
            async with open_http_stream(address, "GET", "/events/stream") as stream:
                await SseReader(stream).next_message()
                # The client reads nothing more; the server's writes fill every buffer and
                # block, and the feed is dropped.
                for _ in range(200):
                    if state.subscriber_count == 0:
                        break
                    state.publish("message", {"pad": "s" * 200_000})
                    await trio.sleep(0.001)
                assert state.subscriber_count == 0
                server_scope.cancel()
                # Stopped within the grace period plus the stalled-client timeout.
                with trio.fail_after(0.2 + 1.0 + 2.0):
                    await stopped.wait()


async def test_request_in_flight_completes_during_graceful_stop(dashboard_dir: Path) -> None:
    release = trio.Event()
    entered = trio.Event()

    class SlowMesh:
        async def request(
            self, daemon_id: str, method: str, path: str, **_: object
        ) -> MeshResponse:
            entered.set()
            await release.wait()
            return MeshResponse(status=200, headers=[], body=b'{"delivered": true}')

        async def directory(self) -> MeshDirectory:
            return MeshDirectory(online=())

    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()

            async def run_server(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                with server_scope:
                    await serve_daemon(
                        make_app(dashboard_dir, mesh=SlowMesh()),
                        port=0,
                        graceful_timeout=5.0,
                        task_status=task_status,
                    )

            address = await outer.start(run_server)
            responses: list[int] = []

            async def call() -> None:
                response = await http_request(
                    address, "POST", "/notify", json_body={"to": "bob@beta", "text": "x"}
                )
                responses.append(response.status)

            outer.start_soon(call)
            await entered.wait()
            server_scope.cancel()
            await trio.sleep(0.05)
            release.set()
    assert responses == [200]


async def test_address_in_use_raises(dashboard_dir: Path) -> None:
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(10):
            with pytest.RaisesGroup(OSError, allow_unwrapped=True, flatten_subgroups=True):
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(serve_daemon, make_app(dashboard_dir), port=port))
    finally:
        taken.close()


async def test_logs_carry_no_request_lines_or_secrets(
    dashboard_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(partial(serve_daemon, make_app(dashboard_dir), port=0))
            await http_request(
                address,
                "GET",
                "/health?api_key=rw_supersecret",
                headers=[("Cookie", "session=cookiesecret")],
            )
            await http_request(address, "GET", "/missing?token=rw_supersecret")
            nursery.cancel_scope.cancel()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "supersecret" not in text
    assert "cookiesecret" not in text
    assert "/health" not in text
    assert not any(record.name == "hypercorn.access" for record in caplog.records)


def test_config_is_quiet_and_bounded() -> None:
    config = make_config("127.0.0.1", 0, graceful_timeout=1.5)
    assert config.accesslog is None
    assert config.graceful_timeout == 1.5
    assert config.websocket_max_message_size == 1024 * 1024
    assert config.bind == ["127.0.0.1:0"]
    assert make_config("::1", 48377, graceful_timeout=1).bind == ["[::1]:48377"]
