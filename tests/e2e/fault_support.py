"""Helpers for the end-to-end fault and attack tests: real processes on loopback.

- :class:`Lab`: the processes of one test (relays, scripted daemons), all stopped at the end
  with SIGTERM, then SIGKILL after a bounded wait, whatever happens (:func:`open_lab`).
- :class:`RelayProcess`: ``python -m repowire relay start`` that a test can SIGKILL, SIGTERM
  and start again on the same port and data directory.
- The *fault daemon*: a small scripted daemon process (``python -m tests.e2e.fault_support``)
  running the real :class:`connector.Connector` in front of an HTTP/WebSocket server whose
  routes misbehave on purpose: a large body served slowly, a request never answered, a
  WebSocket that ticks, and a record of every request that reached it. :class:`FaultDaemon`
  is the test's handle on one.
- :class:`SilentProxy`: a TCP path between a connector and a relay that can go silent without
  either end seeing a close.
- :func:`create_key` (``repowire relay keys create``), :func:`sign_in` (the ``/auth`` form),
  :func:`pattern` (the bytes of the large body), :func:`poll` (bounded polling of another
  process's state), :func:`describe` (a distribution for the test output).

Keys reach a fault daemon through its environment, never its command line or a URL; nothing
here prints a key or a cookie.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import attrs
import h11
import trio
import wsproto
import wsproto.events as ws
from trio_websocket import WebSocketConnection

from connector import Connector, ConnectorConfig, LinkState
from tests.connector.connector_support import ChildProcess, Cli, start_child
from tests.daemon.daemon_support import Address, HttpResponse, http_request
from tests.support.proxy import TcpProxy

LOOPBACK = "127.0.0.1"
KIB = 1024
MIB = 1024 * KIB

#: The repository root (what ``python -m tests.e2e.fault_support`` needs on its path).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Environment variable that hands a fault daemon its API key.
KEY_VARIABLE = "FAULT_DAEMON_API_KEY"
#: What a relay prints once it listens.
RELAY_READY = "repowire relay listening on http://"
#: What a fault daemon prints once its HTTP side listens.
DAEMON_READY = "fault daemon listening on "
#: Seconds a process may take to start and say it is ready.
START_TIMEOUT = 15.0
#: Seconds a process gets to exit after SIGKILL (the kernel's part).
KILL_TIMEOUT = 5.0
#: Interval of the status polls (a daemon's /health, a relay's API), seconds.
POLL_INTERVAL = 0.05
#: Checks a poll makes by default before it gives up (15 s at POLL_INTERVAL).
DEFAULT_TRIES = 300

#: Period of the large body's byte pattern: prime, so a lost or repeated chunk never lines up.
PATTERN_PERIOD = 251
_PATTERN = bytes((i * 97 + 13) % 256 for i in range(PATTERN_PERIOD))
#: Bytes per write of a slow body.
BODY_CHUNK = 64 * KIB
_PATTERN_TILE = _PATTERN * (BODY_CHUNK // PATTERN_PERIOD + 2)

#: Largest request head the fault daemon reads.
MAX_HEAD = 64 * KIB
#: Most requests the fault daemon remembers for ``/stats``.
MAX_SEEN = 10_000
#: Seconds between the fault daemon's WebSocket ticks.
TICK_INTERVAL = 0.05
#: Bytes the fault daemon reads at a time.
READ_SIZE = 64 * KIB


def pattern(offset: int, size: int) -> bytes:
    """``size`` bytes of the large body starting at absolute position ``offset``."""
    out = bytearray()
    while size > 0:
        start = offset % PATTERN_PERIOD
        take = min(size, BODY_CHUNK)
        out += _PATTERN_TILE[start : start + take]
        offset += take
        size -= take
    return bytes(out)


def describe(values: Sequence[float]) -> str:
    """``min, quartiles, max`` (and p10/p90) of ``values`` in seconds, for the test output."""
    ordered = sorted(values)
    if len(ordered) < 2:
        return f"n={len(ordered)} values={ordered}"
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive")
    return (
        f"n={len(ordered)} min={ordered[0]:.3f} p10={deciles[0]:.3f} q1={quartiles[0]:.3f} "
        f"median={quartiles[1]:.3f} q3={quartiles[2]:.3f} p90={deciles[-1]:.3f} "
        f"max={ordered[-1]:.3f}"
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (linear interpolation)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def poll(
    check: Callable[[], Awaitable[bool] | bool],
    *,
    tries: int = DEFAULT_TRIES,
    interval: float = POLL_INTERVAL,
    what: str = "the condition",
) -> None:
    """Call ``check`` every ``interval`` seconds until it returns true; raise AssertionError
    after ``tries`` calls. For state another process changes on its own schedule, where there
    is no event to wait on; callers still bound the time with ``trio.fail_after``."""
    for _ in range(tries):
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await trio.sleep(interval)
    raise AssertionError(f"{what} still did not hold after {tries} checks")


# ---------------------------------------------------------------------- processes


async def _kill(child: ChildProcess) -> None:
    """SIGKILL ``child`` and reap it (bounded)."""
    if child.process.returncode is None:
        child.process.kill()
    with trio.move_on_after(KILL_TIMEOUT):
        await child.process.wait()


class RelayProcess:
    """``repowire relay start`` on a fixed data directory, restartable on the same port."""

    def __init__(self, lab: Lab, data_dir: Path, args: Sequence[str]) -> None:
        self._lab = lab
        self.data_dir = data_dir
        self.args = list(args)
        self.port = 0
        self.child: ChildProcess | None = None
        self._starts = 0

    @property
    def address(self) -> Address:
        return (LOOPBACK, self.port)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.process.returncode is None

    async def start(self, port: int | None = None) -> None:
        """Start the relay (on ``port``; by default the port it had, or a free one) and return
        once it listens. Raises AssertionError if it exits first."""
        assert not self.running, "the relay is already running"
        self._starts += 1
        chosen = self.port if port is None else port
        child = await start_child(
            self._lab.cli,
            f"{self.data_dir.name}-{self._starts}",
            "relay",
            "start",
            "--port",
            str(chosen),
            "--data-dir",
            str(self.data_dir),
            *("--metrics-listen", "off"),
            *self.args,
        )
        self.child = child
        self._lab.children.append(child)
        with trio.fail_after(START_TIMEOUT):
            line = await child.wait_for_line(RELAY_READY)
        self.port = int(line.rsplit(":", 1)[1])

    async def kill(self) -> None:
        """SIGKILL: the relay vanishes without a word to anyone."""
        assert self.child is not None
        await _kill(self.child)

    async def terminate(self) -> int:
        """SIGTERM (a graceful shutdown), SIGKILL after a bounded wait; the exit status."""
        assert self.child is not None
        return await self.child.terminate()


@attrs.define(kw_only=True)
class FaultDaemon:
    """A running fault daemon process (see the module docstring)."""

    daemon_id: str
    address: Address
    child: ChildProcess

    async def health(self) -> dict[str, Any]:
        """``GET /health`` of the daemon itself: its id, pid, in-flight requests and the
        connector's status (``relay``)."""
        response = await http_request(self.address, "GET", "/health")
        document = response.json()
        assert isinstance(document, dict)
        return document

    async def seen(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request that reached this daemon, oldest first."""
        response = await http_request(self.address, "GET", "/stats")
        return [(method, path) for method, path in response.json()["requests"]]

    async def wait_link(
        self, predicate: Callable[[dict[str, Any]], bool], *, tries: int = DEFAULT_TRIES
    ) -> dict[str, Any]:
        """Poll the connector's status until ``predicate(status)`` holds; return it. Raises
        AssertionError after ``tries`` polls or if the process exits."""
        latest: dict[str, Any] = {}

        async def check() -> bool:
            if self.child.process.returncode is not None:
                raise AssertionError(
                    f"fault daemon {self.daemon_id} exited ({self.child.process.returncode}): "
                    f"{self.child.stderr()[-2000:]}"
                )
            latest.update((await self.health())["relay"])
            return predicate(latest)

        await poll(check, tries=tries, what=f"{self.daemon_id}'s link state")
        return latest

    async def wait_connected(self) -> dict[str, Any]:
        return await self.wait_link(lambda status: status["state"] == "connected")

    async def kill(self) -> None:
        """SIGKILL the whole process: daemon and connector die mid-whatever."""
        await _kill(self.child)


class Lab:
    """The processes of one test. Use :func:`open_lab`, which stops them all at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        work = root / "work"
        work.mkdir(parents=True, exist_ok=True)
        self.cli = Cli(root / "home", work)
        self.children: list[ChildProcess] = []

    async def relay(self, name: str = "relay", *args: str) -> RelayProcess:
        """A started relay with its data directory ``root/name`` and extra flags ``args``."""
        relay = RelayProcess(self, self.root / name, args)
        await relay.start()
        return relay

    async def key(self, relay: RelayProcess, label: str = "e2e") -> str:
        """A new scope's key, made with ``repowire relay keys create`` on the relay's store."""
        return await create_key(self.cli, relay.data_dir, label)

    async def fault_daemon(
        self,
        relay_url: str,
        key: str,
        daemon_id: str,
    ) -> FaultDaemon:
        """Start a fault daemon linking to ``relay_url`` as ``daemon_id``; return once its
        link is up (the connector's own status says so)."""
        args = ["--relay-url", relay_url, "--daemon-id", daemon_id]
        env = dict(self.cli.env)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        env[KEY_VARIABLE] = key
        name = f"daemon-{daemon_id}-{len(self.children)}"
        stdout = self.cli.workdir / f"{name}.stdout"
        stderr = self.cli.workdir / f"{name}.stderr"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.e2e.fault_support", *args],
                env=env,
                cwd=self.cli.workdir,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        child = ChildProcess(process, stdout, stderr)
        self.children.append(child)
        with trio.fail_after(START_TIMEOUT):
            line = await child.wait_for_line(DAEMON_READY)
        port = int(line.rsplit(":", 1)[1])
        daemon = FaultDaemon(daemon_id=daemon_id, address=(LOOPBACK, port), child=child)
        await daemon.wait_connected()
        return daemon

    def output(self) -> str:
        """Everything every process of this lab wrote."""
        return "\n".join(child.stdout() + child.stderr() for child in self.children)

    def assert_no_secret(self, *secrets: str) -> None:
        """Fail if any process of this lab wrote one of ``secrets`` (keys, session ids); the
        message never repeats the secret."""
        output = self.output()
        for index, secret in enumerate(secrets):
            assert secret, "an empty secret proves nothing"
            assert secret not in output, f"secret #{index} appears in a process's output"

    async def stop_all(self) -> None:
        """SIGTERM every process still running, SIGKILL after a bounded wait (in parallel)."""
        async with trio.open_nursery() as nursery:
            for child in self.children:
                if child.process.returncode is None:
                    nursery.start_soon(child.terminate)


@asynccontextmanager
async def open_lab(root: Path) -> AsyncIterator[Lab]:
    """A :class:`Lab` whose processes are all stopped on exit, even on cancellation."""
    lab = Lab(root)
    try:
        yield lab
    finally:
        with trio.CancelScope(shield=True):
            await lab.stop_all()


async def create_key(cli: Cli, data_dir: Path, label: str) -> str:
    """``repowire relay keys create`` in a new scope; the key it printed."""
    with trio.fail_after(START_TIMEOUT):
        result = await cli.run(
            "relay", "keys", "create", "--data-dir", str(data_dir), "--label", label
        )
    assert result.returncode == 0, result.stderr
    keys = [line for line in result.stdout.splitlines() if line.startswith("rw_")]
    assert len(keys) == 1, "keys create printed no key"
    return keys[0]


# ---------------------------------------------------------------------- a path that dies


class SilentProxy(TcpProxy):
    """A loopback TCP proxy whose path can go silent, as a dead network path does.

    After :meth:`silence` nothing is forwarded in either direction and nothing is closed on
    one side because the other side closed (a dead path carries no FIN either): each end keeps
    an open socket whose peer never answers, and must find that out by itself. Connections
    accepted meanwhile are read and dropped, never connected upstream. Run :meth:`serve` with
    ``nursery.start``; everything ends with that nursery.
    """

    def __init__(self, target: Address) -> None:
        super().__init__(target, hide_closes=True)

    def silence(self) -> None:
        self.blackhole()


# ---------------------------------------------------------------------- browser side


def form_body(**fields: str) -> bytes:
    """An ``application/x-www-form-urlencoded`` body."""
    return urlencode(fields).encode()


async def sign_in(
    address: Address, key: str, headers: Sequence[tuple[str, str]] = ()
) -> tuple[HttpResponse, tuple[str, str]]:
    """Post ``key`` to the relay's ``/auth`` form; ``(response, ("Cookie", ...))``.

    Fails unless the relay answered 303 with a session cookie.
    """
    response = await http_request(
        address,
        "POST",
        "/auth",
        body=form_body(api_key=key),
        headers=[("Content-Type", "application/x-www-form-urlencoded"), *headers],
    )
    assert response.status == 303, f"sign-in answered {response.status}"
    set_cookie = response.header("set-cookie")
    assert set_cookie is not None, "sign-in set no cookie"
    pair = set_cookie.split(";", 1)[0].strip()
    return response, ("Cookie", pair)


def session_id_of(cookie: tuple[str, str]) -> str:
    """The session id in a ``("Cookie", "name=value")`` header."""
    return cookie[1].split("=", 1)[1]


def cookie_attributes(set_cookie: str) -> dict[str, str]:
    """The attributes of a Set-Cookie value, names lower-case (``{"httponly": "", ...}``)."""
    attributes: dict[str, str] = {}
    for part in set_cookie.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        attributes[name.lower()] = value
    return attributes


async def next_text(connection: WebSocketConnection) -> str:
    """The next message of ``connection``, which must be text."""
    message = await connection.get_message()
    assert isinstance(message, str), f"expected a text message, got {message!r}"
    return message


# ---------------------------------------------------------------------- the fault daemon


class _FaultServer:
    """The HTTP/WebSocket side of a fault daemon. One request per connection (the connector
    opens a fresh connection for every stream, and the relay sends ``Connection: close``)."""

    def __init__(self, daemon_id: str) -> None:
        self.daemon_id = daemon_id
        self.connector: Connector | None = None
        self.seen: list[tuple[str, str]] = []
        #: Requests being served now (not counting /health and /stats).
        self.active = 0

    async def handle(self, tcp: trio.SocketStream) -> None:
        async with tcp:
            try:
                head, rest = await _read_head(tcp)
            except (ValueError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3:
                return
            method, target = parts[0], parts[1]
            url = urlsplit(target)
            path = url.path
            query = {name: values[-1] for name, values in parse_qs(url.query).items()}
            if path not in ("/health", "/stats") and len(self.seen) < MAX_SEEN:
                self.seen.append((method, path))
            try:
                if path == "/ws":
                    await self._websocket(tcp, head + rest)
                else:
                    await self._http(tcp, head + rest, method, path, query)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                # The stream was cut (a reset, the link or the relay gone): nothing to answer.
                pass

    async def _http(
        self, tcp: trio.SocketStream, data: bytes, method: str, path: str, query: dict[str, str]
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data)
        request = conn.next_event()
        if not isinstance(request, h11.Request):
            return

        async def respond(status: int, document: object) -> None:
            body = json.dumps(document).encode()
            headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
            out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            out += conn.send(h11.Data(data=body)) or b""
            out += conn.send(h11.EndOfMessage()) or b""
            await tcp.send_all(out)

        if path == "/health":
            relay = self.connector.status().to_json() if self.connector is not None else None
            await respond(
                200,
                {
                    "daemon_id": self.daemon_id,
                    "pid": os.getpid(),
                    "active": self.active,
                    "relay": relay,
                },
            )
            return
        if path == "/stats":
            await respond(200, {"requests": self.seen})
            return
        self.active += 1
        try:
            if path == "/hang":
                # Never answer; end when the other side gives up on the request.
                while await tcp.receive_some(READ_SIZE):
                    pass
            elif path == "/big":
                await self._big(
                    tcp, conn, int(query.get("size", "0")), float(query.get("rate", "0"))
                )
            elif path == "/upload":
                received = 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        chunk = await tcp.receive_some(READ_SIZE)
                        conn.receive_data(chunk)
                        continue
                    if isinstance(event, h11.Data):
                        received += len(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                await respond(200, {"received": received, "daemon_id": self.daemon_id})
            elif path == "/hello":
                await respond(200, {"daemon_id": self.daemon_id, "method": method})
            else:
                await respond(404, {"error": "not_found", "detail": f"No route {path}."})
        finally:
            self.active -= 1

    @staticmethod
    async def _big(tcp: trio.SocketStream, conn: h11.Connection, size: int, rate: float) -> None:
        """``size`` bytes of :func:`pattern`, at ``rate`` bytes per second (0: at once)."""
        head = h11.Response(
            status_code=200,
            headers=[("content-type", "application/octet-stream"), ("content-length", str(size))],
        )
        await tcp.send_all(conn.send(head) or b"")
        started = trio.current_time()
        sent = 0
        while sent < size:
            take = min(BODY_CHUNK, size - sent)
            await tcp.send_all(conn.send(h11.Data(data=pattern(sent, take))) or b"")
            sent += take
            if rate > 0:
                await trio.sleep_until(started + sent / rate)
        await tcp.send_all(conn.send(h11.EndOfMessage()) or b"")

    async def _websocket(self, tcp: trio.SocketStream, data: bytes) -> None:
        """A WebSocket that sends ``tick N`` every :data:`TICK_INTERVAL` and echoes text."""
        conn = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        conn.receive_data(data)
        accepted = False
        for event in conn.events():
            if isinstance(event, ws.Request):
                await tcp.send_all(conn.send(ws.AcceptConnection()))
                accepted = True
        if not accepted:
            return
        self.active += 1
        try:
            async with trio.open_nursery() as nursery:

                async def ticker() -> None:
                    tick = 0
                    while True:
                        await tcp.send_all(conn.send(ws.TextMessage(data=f"tick {tick}")))
                        tick += 1
                        await trio.sleep(TICK_INTERVAL)

                nursery.start_soon(ticker)
                while True:
                    chunk = await tcp.receive_some(READ_SIZE)
                    if not chunk:
                        break
                    conn.receive_data(chunk)
                    closing = False
                    for event in conn.events():
                        if isinstance(event, ws.TextMessage):
                            await tcp.send_all(conn.send(ws.TextMessage(data=f"echo {event.data}")))
                        elif isinstance(event, ws.Ping):
                            await tcp.send_all(conn.send(event.response()))
                        elif isinstance(event, ws.CloseConnection):
                            await tcp.send_all(conn.send(event.response()))
                            closing = True
                    if closing:
                        break
                nursery.cancel_scope.cancel()
        finally:
            self.active -= 1


async def _read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])
        if len(buffer) > MAX_HEAD:
            raise ValueError("request head too large")
        chunk = await stream.receive_some(READ_SIZE)
        if not chunk:
            raise ValueError("connection closed before a whole request head")
        buffer += chunk


async def _report_states(connector: Connector) -> None:
    """Print each change of the link's state (the test's log of what happened when)."""
    last: LinkState | None = None
    while True:
        status = connector.status()
        if status.state is not last:
            last = status.state
            detail = f" ({status.last_error})" if status.state is LinkState.DOWN else ""
            print(f"link {status.state.value}{detail}", flush=True)
        await trio.sleep(0.02)


async def run_fault_daemon(args: argparse.Namespace, key: str) -> None:
    server = _FaultServer(args.daemon_id)
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, server.handle, 0, host=LOOPBACK)
        )
        port = listeners[0].socket.getsockname()[1]
        # The product's defaults (backoff, keepalive), as `repowire serve` runs its connector.
        connector = Connector(
            ConnectorConfig(
                relay_url=args.relay_url,
                api_key=key,
                daemon_id=args.daemon_id,
                daemon_port=port,
                version="fault",
            )
        )
        server.connector = connector
        print(f"{DAEMON_READY}{LOOPBACK}:{port}", flush=True)
        nursery.start_soon(_report_states, connector)
        await nursery.start(connector.run)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fault_support", description="a scripted daemon")
    parser.add_argument("--relay-url", required=True)
    parser.add_argument("--daemon-id", required=True)
    args = parser.parse_args(argv)
    key = os.environ.get(KEY_VARIABLE, "")
    if not key:
        parser.error(f"set {KEY_VARIABLE}")
    # SIGTERM ends the process at once (no graceful close): the default action, made explicit.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    trio.run(run_fault_daemon, args, key)


if __name__ == "__main__":
    main()
