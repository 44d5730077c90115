"""The fault daemon: a small scripted daemon process for end-to-end tests.

``python -m tests.support.fault_daemon --relay-url URL --daemon-id ID`` (the key in
:data:`KEY_VARIABLE`, never on the command line) runs the real :class:`connector.Connector` in
front of an HTTP/WebSocket server whose routes misbehave on purpose:

- ``/big?size=N&rate=R``: ``N`` bytes of :func:`pattern`, at ``R`` bytes per second;
- ``/hang``: never answered; ``/upload``: counts the body; ``/hello``: who answered;
- ``/ws``: a WebSocket that ticks every :data:`TICK_INTERVAL` and echoes text;
- ``/health``: its id, pid, requests in flight and the connector's status; ``/stats``: every
  request that reached it.

:func:`start_fault_daemon` starts one and returns a :class:`FaultDaemon`, the test's handle
(:meth:`tests.support.lab.Lab.fault_daemon` is the usual way).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio
import wsproto
import wsproto.events as ws

from connector import Connector, ConnectorConfig, LinkState

from .clients import Address, http_request
from .processes import LOOPBACK, START_TIMEOUT, ChildProcess, Cli, listening_port, open_child
from .waiting import PROCESS_TRIES, poll

KIB = 1024
MIB = 1024 * KIB

#: The repository root (what ``python -m tests.support.fault_daemon`` needs on its path).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The module a fault daemon process runs.
MODULE = "tests.support.fault_daemon"
#: Environment variable that hands a fault daemon its API key.
KEY_VARIABLE = "FAULT_DAEMON_API_KEY"
#: What a fault daemon prints once its HTTP side listens.
DAEMON_READY = "fault daemon listening on "

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
#: Seconds between two looks at the connector's state for the log.
STATE_REPORT_INTERVAL = 0.02


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


# ---------------------------------------------------------------------- the test's handle


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
        self, predicate: Callable[[dict[str, Any]], bool], *, tries: int = PROCESS_TRIES
    ) -> dict[str, Any]:
        """Poll the connector's status until ``predicate(status)`` holds; return it. Raises
        AssertionError after ``tries`` polls or if the process exits."""
        latest: dict[str, Any] = {}

        async def check() -> bool:
            if self.child.process.returncode is not None:
                raise AssertionError(
                    f"fault daemon {self.daemon_id} exited ({self.child.process.returncode}): "
                    f"{self.child.stderr_tail()}"
                )
            latest.update((await self.health())["relay"])
            return predicate(latest)

        await poll(check, tries=tries, what=f"{self.daemon_id}'s link state")
        return latest

    async def wait_connected(self) -> dict[str, Any]:
        return await self.wait_link(lambda status: status["state"] == "connected")

    async def kill(self) -> None:
        """SIGKILL the whole process: daemon and connector die mid-whatever."""
        await self.child.kill()


async def start_fault_daemon(
    cli: Cli,
    relay_url: str,
    key: str,
    daemon_id: str,
    *,
    children: list[ChildProcess],
) -> FaultDaemon:
    """Start a fault daemon linking to ``relay_url`` as ``daemon_id`` (output in
    ``cli.workdir``; the process is appended to ``children`` at once, for whoever stops them
    all); return once its link is up (the connector's own status says so)."""
    env = dict(cli.env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env[KEY_VARIABLE] = key
    argv = [sys.executable, "-m", MODULE, "--relay-url", relay_url, "--daemon-id", daemon_id]
    name = f"daemon-{daemon_id}-{len(children)}"
    child = await open_child(argv, name, cwd=cli.workdir, env=env)
    children.append(child)
    with trio.fail_after(START_TIMEOUT):
        line = await child.wait_for_line(DAEMON_READY)
    port = listening_port(line)
    daemon = FaultDaemon(daemon_id=daemon_id, address=(LOOPBACK, port), child=child)
    await daemon.wait_connected()
    return daemon


# ---------------------------------------------------------------------- the daemon process


class _FaultServer:
    """The HTTP/WebSocket side of a fault daemon: it answers one request per connection and
    then closes it."""

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

    def _health(self) -> dict[str, object]:
        relay = self.connector.status().to_json() if self.connector is not None else None
        return {
            "daemon_id": self.daemon_id,
            "pid": os.getpid(),
            "active": self.active,
            "relay": relay,
        }

    async def _http(
        self, tcp: trio.SocketStream, data: bytes, method: str, path: str, query: dict[str, str]
    ) -> None:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data)
        if not isinstance(conn.next_event(), h11.Request):
            return
        respond = partial(_respond_json, tcp, conn)
        if path == "/health":
            await respond(200, self._health())
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
                size, rate = int(query.get("size", "0")), float(query.get("rate", "0"))
                await _big(tcp, conn, size, rate)
            elif path == "/upload":
                received = await _count_body(tcp, conn)
                if received is not None:
                    await respond(200, {"received": received, "daemon_id": self.daemon_id})
            elif path == "/hello":
                await respond(200, {"daemon_id": self.daemon_id, "method": method})
            else:
                await respond(404, {"error": "not_found", "detail": f"No route {path}."})
        finally:
            self.active -= 1

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
                nursery.start_soon(_tick, tcp, conn)
                await _echo_until_closed(tcp, conn)
                nursery.cancel_scope.cancel()
        finally:
            self.active -= 1


async def _respond_json(
    tcp: trio.SocketStream, conn: h11.Connection, status: int, document: object
) -> None:
    body = json.dumps(document).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await tcp.send_all(out)


async def _count_body(tcp: trio.SocketStream, conn: h11.Connection) -> int | None:
    """Bytes of the request body, read to its end; None if the request broke off."""
    received = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await tcp.receive_some(READ_SIZE))
        elif isinstance(event, h11.Data):
            received += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return received
        else:
            return None


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


async def _tick(tcp: trio.SocketStream, conn: wsproto.WSConnection) -> None:
    tick = 0
    while True:
        await tcp.send_all(conn.send(ws.TextMessage(data=f"tick {tick}")))
        tick += 1
        await trio.sleep(TICK_INTERVAL)


async def _echo_until_closed(tcp: trio.SocketStream, conn: wsproto.WSConnection) -> None:
    """Echo text messages, answer pings, and return once the peer closed or left."""
    while True:
        chunk = await tcp.receive_some(READ_SIZE)
        if not chunk:
            return
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
            return


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
        await trio.sleep(STATE_REPORT_INTERVAL)


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
    parser = argparse.ArgumentParser(prog="fault_daemon", description="a scripted daemon")
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
