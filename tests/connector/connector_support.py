"""Helpers for the connector's integration tests (fixtures are in conftest.py).

Kept out of conftest.py so test modules can import them by a name no other test directory
uses. Everything listens on 127.0.0.1, port 0.

- :class:`RelayRunner`: a real relay that can be stopped (gracefully or by cancellation) and
  started again on the same port and data directory.
- :func:`start_connected_daemon` and :func:`start_daemon_for`: a real daemon and its connector,
  stoppable together, with the connector's entropy injectable so backoff delays are exact.
- :func:`fake_relay_config`: connector settings for a fake relay.
- :class:`FakeRelay`: a WebSocket endpoint standing in for ``/ws/relay`` that either closes
  every link with a chosen close code or runs the relay side of the multiplexed session, so a
  test can open streams to the connector with any metadata and any request head.
- :func:`stream_request`: one HTTP/1.1 exchange over a multiplexed stream.
- :class:`Cli` and :func:`start_child`: ``python -m repowire ...`` as child processes, run to
  completion or kept running and stopped with SIGTERM.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
import trio_websocket

from connector import Connector, ConnectorConfig, LinkState
from mux import MuxConfig, MuxSession, WebSocketTransport
from protocol import BackoffConfig, Role
from relay import RelaySettings, RunningRelay, serve_relay
from tests.daemon.daemon_support import HttpResponse, RunningDaemon, start_daemon
from tests.relay.relay_support import RelayHandle, fast_connector_config, relay_options

Address = tuple[str, int]

LOOPBACK = "127.0.0.1"
#: Largest response the stream client buffers whole.
MAX_STREAM_RESPONSE = 1024 * 1024
#: Seconds a fake relay waits for a closing handshake.
FAKE_CLOSE_TIMEOUT = 0.2
#: Largest output of a child process kept for assertions.
MAX_PROCESS_OUTPUT = 1024 * 1024


# -- a relay that can be stopped and started again ----------------------------------------


class RelayRunner:
    """A real relay in ``nursery``, on a fixed data directory, that tests can restart.

    Settings are :func:`tests.relay.relay_support.relay_options` of ``settings`` (fast
    timings, the bundled dashboard).
    """

    def __init__(self, nursery: trio.Nursery, data_dir: Path, **settings: Any) -> None:
        self._nursery = nursery
        self.data_dir = data_dir
        self.settings: dict[str, Any] = relay_options(**settings)
        self.handle: RelayHandle | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    @property
    def running(self) -> bool:
        return self.handle is not None

    async def start(self, port: int = 0) -> RelayHandle:
        """Start the relay (on ``port``; 0 picks one) and return once it listens."""
        assert self.handle is None, "the relay is already running"
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        running: RunningRelay = await self._nursery.start(self._run, port)
        self.handle = RelayHandle(running=running)
        return self.handle

    async def _run(self, port: int, *, task_status: trio.TaskStatus[RunningRelay]) -> None:
        assert self._scope is not None
        settings = RelaySettings(data_dir=self.data_dir, port=port, **self.settings)
        try:
            with self._scope:
                await serve_relay(settings, task_status=task_status)
        finally:
            self._stopped.set()

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop the relay and wait until it is gone.

        ``graceful``: what SIGTERM does (go-away, then close code 4503). Otherwise the relay's
        task is cancelled, as when its process is torn down.
        """
        assert self.handle is not None and self._scope is not None, "the relay is not running"
        if graceful:
            self.handle.running.shutdown()
        else:
            self._scope.cancel()
        await self._stopped.wait()
        self.handle = None


# -- a daemon and its connector ----------------------------------------------------------


@attrs.define(kw_only=True)
class ConnectedDaemon:
    """A real daemon whose connector is its mesh client, as in `repowire serve --relay`."""

    daemon: RunningDaemon
    connector: Connector
    _scope: trio.CancelScope
    _stopped: trio.Event

    @property
    def daemon_id(self) -> str:
        return self.daemon.daemon_id

    @property
    def address(self) -> Address:
        return self.daemon.address

    async def request(self, method: str, path: str, **kwargs: Any) -> HttpResponse:
        """A request to the daemon itself (not through the relay)."""
        return await self.daemon.request(method, path, **kwargs)

    def cancel(self) -> None:
        """Stop the daemon and its connector (without waiting)."""
        self._scope.cancel()

    async def stop(self) -> None:
        """Stop the daemon and its connector and wait until both are gone."""
        self._scope.cancel()
        await self._stopped.wait()


async def start_connected_daemon(
    nursery: trio.Nursery,
    relay: RelayHandle,
    key: str,
    daemon_id: str,
    dashboard_dir: Path,
    *,
    rand: Callable[[], float] | None = None,
    wait: bool = True,
    **connector_changes: Any,
) -> ConnectedDaemon:
    """A daemon on 127.0.0.1:0 and a connector with
    :func:`~tests.relay.relay_support.fast_connector_config` (updated with
    ``connector_changes``, e.g. ``relay_url=proxy.ws_url``); see :func:`start_daemon_for`.

    ``rand`` replaces the connector's entropy (uniform in [0, 1)), which makes every backoff
    delay exact.
    """
    config = fast_connector_config(relay, key, daemon_id, 0, **connector_changes)
    connector = Connector(config) if rand is None else Connector(config, rand=rand)
    return await start_daemon_for(nursery, connector, dashboard_dir, wait=wait)


async def start_daemon_for(
    nursery: trio.Nursery, connector: Connector, dashboard_dir: Path, *, wait: bool = True
) -> ConnectedDaemon:
    """A daemon on 127.0.0.1:0 (id: the connector's) whose mesh client is ``connector``, and
    the connector piping to it, both under one cancel scope in ``nursery``. With ``wait`` the
    call returns once the link is connected (within 5 s)."""

    async def run(*, task_status: trio.TaskStatus[ConnectedDaemon]) -> None:
        stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    daemon = await start_daemon(
                        inner,
                        daemon_id=connector.config.daemon_id,
                        dashboard_dir=dashboard_dir,
                        mesh=connector,
                        relay_status=lambda: connector.status().to_json(),
                    )
                    connector.config = attrs.evolve(connector.config, daemon_port=daemon.address[1])
                    await inner.start(connector.run)
                    task_status.started(
                        ConnectedDaemon(
                            daemon=daemon, connector=connector, scope=scope, stopped=stopped
                        )
                    )
        finally:
            stopped.set()

    handle: ConnectedDaemon = await nursery.start(run)
    if wait:
        with trio.fail_after(5):
            await connector.wait_state(LinkState.CONNECTED)
    return handle


#: A key of the right shape that no relay issued.
BOGUS_KEY = "rw_" + "B" * 43

#: The xfail reason of the tests that a connector crash on refused dials blocks.


def fake_relay_config(relay_url: str, **changes: Any) -> ConnectorConfig:
    """Connector settings for a fake relay (key :data:`BOGUS_KEY`, daemon id ``laptop``):
    short timeouts and backoff, updated with ``changes``."""
    config = ConnectorConfig(
        relay_url=relay_url,
        api_key=BOGUS_KEY,
        daemon_id="laptop",
        backoff=BackoffConfig(base=0.05, cap=1.0, stable_after=5.0, restart_spread=0.2),
        mux=MuxConfig(keepalive_interval=1.0, keepalive_timeout=1.0),
        connect_timeout=2.0,
        mesh_timeout=5.0,
    )
    return attrs.evolve(config, **changes)


# -- a fake relay endpoint ----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LinkRequest:
    """The opening handshake of one link, as the fake relay saw it."""

    path: str
    headers: dict[str, str]


class FakeRelay:
    """A WebSocket server standing in for a relay's ``/ws/relay``.

    Start it with :func:`start_fake_relay`. With ``close_code`` it accepts each link and
    closes it at once with that code and ``close_reason``. Otherwise it runs the relay side of
    the session on each link (keepalive off, so only the connector pings) and appends it to
    ``sessions``; :meth:`session` waits for one. ``requests`` records every handshake.
    """

    def __init__(self, *, close_code: int | None = None, close_reason: str = "") -> None:
        self.close_code = close_code
        self.close_reason = close_reason
        self.requests: list[LinkRequest] = []
        self.sessions: list[MuxSession] = []
        self.port = 0
        self._new_session = trio.Event()

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    async def session(self, index: int = 0) -> MuxSession:
        """The ``index``-th link session, once it has started (callers bound the wait)."""
        while len(self.sessions) <= index:
            event = self._new_session = trio.Event()
            await event.wait()
        return self.sessions[index]

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        self.requests.append(
            LinkRequest(
                path=request.path,
                headers={
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers
                },
            )
        )
        connection = await request.accept()
        if self.close_code is not None:
            await connection.aclose(self.close_code, self.close_reason or None)
            return
        session = MuxSession(
            _QuickCloseTransport(connection),
            Role.RELAY,
            MuxConfig(keepalive_interval=math.inf, close_timeout=FAKE_CLOSE_TIMEOUT),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            self.sessions.append(session)
            self._new_session.set()


class _QuickCloseTransport(WebSocketTransport):
    """Waits at most :data:`FAKE_CLOSE_TIMEOUT` for the closing handshake, so stopping a fake
    relay does not hold up a test."""

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        with trio.move_on_after(FAKE_CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await self.connection.aclose(code, reason or None)


async def start_fake_relay(
    nursery: trio.Nursery, *, close_code: int | None = None, close_reason: str = ""
) -> FakeRelay:
    fake = FakeRelay(close_code=close_code, close_reason=close_reason)
    server: trio_websocket.WebSocketServer = await nursery.start(_serve_websocket, fake.handle)
    fake.port = server.port
    return fake


async def _serve_websocket(
    handler: Callable[[trio_websocket.WebSocketRequest], Any],
    *,
    task_status: trio.TaskStatus[trio_websocket.WebSocketServer],
) -> None:
    await trio_websocket.serve_websocket(
        handler,
        LOOPBACK,
        0,
        None,
        message_queue_size=4,
        max_message_size=4 * 1024 * 1024,
        disconnect_timeout=1,
        task_status=task_status,
    )


# -- HTTP over a multiplexed stream -------------------------------------------------------


async def stream_request(
    stream: trio.abc.HalfCloseableStream,
    head: bytes,
    body: bytes = b"",
    *,
    limit: int = MAX_STREAM_RESPONSE,
) -> HttpResponse:
    """Write a raw request (``head`` as given, so tests can forge any header) and ``body``,
    then read one whole response by its framing. Header names come back lower-case."""
    if head or body:
        await stream.send_all(head + body)
    conn = h11.Connection(h11.CLIENT)
    # The client side of h11 must have sent a request before it reads a response.
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "stream")]))
    conn.send(h11.EndOfMessage())
    status = 0
    headers: list[tuple[str, str]] = []
    content = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some()))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = [(k.decode().lower(), v.decode()) for k, v in event.headers]
        elif isinstance(event, h11.Data):
            content += event.data
            assert len(content) <= limit, f"response larger than {limit} bytes"
        elif isinstance(event, h11.EndOfMessage):
            return HttpResponse(status=status, headers=headers, body=bytes(content))
        elif isinstance(event, h11.ConnectionClosed):
            raise AssertionError("the stream ended before a whole response")


def request_head(
    method: str, path: str, headers: Sequence[tuple[str, str]] = (), *, body: bytes = b""
) -> bytes:
    """A raw HTTP/1.1 request head (``Connection: close``, Content-Length of ``body``)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: repowire-daemon"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_head(
    method: str, path: str, document: object, headers: Sequence[tuple[str, str]] = ()
) -> tuple[bytes, bytes]:
    """``(head, body)`` of a JSON request."""
    body = json.dumps(document).encode()
    head = request_head(method, path, [("Content-Type", "application/json"), *headers], body=body)
    return head, body


# -- the command line as child processes --------------------------------------------------

#: Seconds a child process gets to exit after SIGTERM before it is killed.
TERM_TIMEOUT = 5.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (for flags that refuse port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def cli_environment(home: Path) -> dict[str, str]:
    """The current environment without any REPOWIRE_ variable, with REPOWIRE_HOME=home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPOWIRE_")}
    env["REPOWIRE_HOME"] = str(home)
    return env


@attrs.define(kw_only=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


class Cli:
    """Runs ``python -m repowire`` in ``home`` (as ``REPOWIRE_HOME``) from ``workdir``."""

    def __init__(self, home: Path, workdir: Path) -> None:
        self.home = home
        self.workdir = workdir
        self.env = cli_environment(home)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "repowire", *args]

    async def run(self, *args: str) -> CliResult:
        """Run a command to completion (the caller bounds the time)."""
        result = await trio.run_process(
            self.argv(*args),
            env=self.env,
            cwd=self.workdir,
            check=False,
            capture_stdout=True,
            capture_stderr=True,
        )
        return CliResult(
            returncode=result.returncode,
            stdout=result.stdout.decode(errors="replace"),
            stderr=result.stderr.decode(errors="replace"),
        )


class ChildProcess:
    """A long-running command. Output goes to files (a full pipe would stall the child)."""

    def __init__(self, process: trio.Process, stdout: Path, stderr: Path) -> None:
        self.process = process
        self.stdout_path = stdout
        self.stderr_path = stderr

    def stdout(self) -> str:
        return _read_bounded(self.stdout_path)

    def stderr(self) -> str:
        return _read_bounded(self.stderr_path)

    async def wait_for_line(self, prefix: str, *, interval: float = 0.05) -> str:
        """The first stdout line starting with ``prefix`` (callers bound the wait).

        Raises AssertionError if the process exits first."""
        while True:
            for line in self.stdout().splitlines():
                if line.startswith(prefix):
                    return line
            if self.process.poll() is not None:
                raise AssertionError(
                    f"exited ({self.process.returncode}) before printing {prefix!r}; "
                    f"stderr: {self.stderr()[-2000:]}"
                )
            await trio.sleep(interval)

    async def terminate(self) -> int:
        """SIGTERM, then SIGKILL after :data:`TERM_TIMEOUT`; returns the exit status."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(TERM_TIMEOUT):
                return await self.process.wait()
            self.process.kill()
        return await self.process.wait()


def _read_bounded(path: Path) -> str:
    with path.open("rb") as file:
        return file.read(MAX_PROCESS_OUTPUT).decode(errors="replace")


async def start_child(cli: Cli, name: str, *args: str) -> ChildProcess:
    """Start ``python -m repowire args...`` with stdout and stderr in ``workdir/name.*``."""
    stdout = cli.workdir / f"{name}.stdout"
    stderr = cli.workdir / f"{name}.stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            cli.argv(*args),
            env=cli.env,
            cwd=cli.workdir,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    return ChildProcess(process, stdout, stderr)
