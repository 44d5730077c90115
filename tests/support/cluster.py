"""A relay cluster for end-to-end tests: Redis, N relay replicas and nginx, as real processes.

:class:`RelayCluster` starts, on 127.0.0.1 and ports picked free:

- ``redis-server`` (:class:`tests.support.redis_server.RedisServer`), stoppable and startable
  again on the same port;
- a cluster secret file (mode 0600, :data:`SECRET_BYTES` random bytes);
- N replicas, each ``python -m repowire relay start --port P --redis-url ... --replica-id
  relay-a --advertise-url http://127.0.0.1:P --cluster-secret-file ...`` with a data directory
  of its own, ``--public-url`` naming nginx, ``--trusted-proxy 127.0.0.1`` and ``/metrics`` on
  a port of its own. ``cluster_flags=False`` leaves out the four cluster flags (each replica
  then has its own SQLite store), which is how the harness itself is tested without a
  cluster-capable relay;
- nginx with ``docs/deploy/cluster/nginx-cluster.conf`` rendered with those ports and a test
  certificate (a private CA, :func:`tests.e2e.tls_support.make_certificates`): the documented
  round-robin load balancer, the only address browsers and daemons use.

Every process runs in a process group of its own, with stdout and stderr in files under the
cluster's directory (one pair per start), and is stopped with SIGTERM, then SIGKILL after a
bounded wait. :meth:`RelayCluster.close` stops everything still running and is safe to call
from any state, also from a synchronous fixture's teardown; :func:`open_cluster` is the
async context manager for one test.

Daemons: :meth:`RelayCluster.start_daemon` runs ``repowire serve --relay`` in a home of its
own (``config.yaml`` naming nginx's ``wss://`` URL and the test CA, the key in
``REPOWIRE_API_KEY``), and :meth:`RelayCluster.start_fault_daemon` the scripted daemon of
:mod:`tests.support.fault_daemon` (large bodies, WebSocket echo), both through nginx.

Which replica holds which daemon's link: :meth:`RelayCluster.link_counts` (each replica's own
``/health``), :meth:`RelayCluster.holder_from_logs` (the replicas' "daemon X connected" log
lines) and :meth:`RelayCluster.presence` (the presence entries in Redis, read with the small
RESP client :func:`redis_call`).

Waits are bounded (:data:`START_TIMEOUT`, :data:`STOP_TIMEOUT`, :data:`HEALTH_TIMEOUT`);
callers still put ``trio.fail_after`` around what they do. Skips with a clear reason, as a
missing system part, where redis-server, nginx or openssl is missing.

Secrets: API keys reach daemons through their environment and session cookies stay in memory;
failure reports quote process output with anything shaped like a key masked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import trio
from trio_websocket import WebSocketConnection

from tests.e2e.tls_support import (
    DEPLOY_DIR,
    TLS_HOST,
    TlsFiles,
    client_context,
    find_nginx,
    https_request,
    make_certificates,
    nginx_main_config,
    open_https_stream,
    open_wss,
    render_template,
)

from .clients import Address, HttpResponse, HttpStream, http_request
from .fault_daemon import DAEMON_READY, KEY_VARIABLE, MODULE, REPO_ROOT
from .http_client import HttpConnection, connect
from .leaks import mask_keys, printed_key
from .listener import LOOPBACK
from .processes import cli_environment, free_ports, listening_port
from .redis_server import RedisServer, redis_server_binary
from .system import skip_missing

#: The documented load balancer config this harness runs.
CLUSTER_SITE: Final = DEPLOY_DIR / "cluster" / "nginx-cluster.conf"
#: Replicas the documented config balances over (its {{REPLICA_n}} placeholders).
SITE_REPLICAS: Final = 3
#: Bytes of randomness in the cluster secret file.
SECRET_BYTES: Final = 32
#: Seconds a process may take to start and say it listens.
START_TIMEOUT: Final = 20.0
#: Seconds a SIGTERM is given before SIGKILL: a replica drains its links for up to its
#: shutdown grace (10 s by default) and then gives hypercorn 5 s more.
STOP_TIMEOUT: Final = 20.0
#: Seconds the kernel is given to reap a process after SIGKILL.
KILL_TIMEOUT: Final = 5.0
#: Seconds :meth:`RelayCluster.wait_healthy` waits for every replica's ``/health``.
HEALTH_TIMEOUT: Final = 20.0
#: Seconds one health or status request may take.
PROBE_TIMEOUT: Final = 2.0
#: Seconds a restarted replica may take to be back in nginx's rotation (the site's
#: fail_timeout, 2 s, and a margin).
ROTATION_TIMEOUT: Final = 10.0
#: Seconds a daemon may take to report its relay link connected.
LINK_TIMEOUT: Final = 20.0
#: Seconds between two looks at a process's output or state.
POLL_INTERVAL: Final = 0.05
#: Characters of a process's output quoted in a failure report.
TAIL_CHARS: Final = 3000
#: Largest part of an output file read back.
MAX_OUTPUT: Final = 4 * 1024 * 1024
#: What ``repowire relay start`` prints once it listens.
RELAY_LISTENING: Final = "repowire relay listening on http://"
#: The relay's log line for a daemon link that came up, and for one that ended.
LINK_UP_LINE: Final = re.compile(r"\bdaemon (?P<id>[A-Za-z0-9._-]+) connected from ")
LINK_DOWN_LINE: Final = re.compile(
    r"\bdaemon (?P<id>[A-Za-z0-9._-]+) (?:left|disconnected|refused|: handshake failed)"
)
#: The namespace of every Redis key the relay writes, and the word in presence keys.
REDIS_NAMESPACE: Final = "repowire:"
PRESENCE_WORD: Final = "presence"
#: Seconds one Redis command of the test may take.
REDIS_TIMEOUT: Final = 2.0
#: The access log the cluster site writes (in its {{LOG_DIR}}).
ACCESS_LOG_NAME: Final = "repowire-cluster.access.log"
#: ``... "GET /path HTTP/1.1" 200 123 0.004 upstream=127.0.0.1:8001`` (the site's format).
_ACCESS_LINE: Final = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S*) [^"]*" (?P<status>\d{3}) (?P<bytes>\d+) '
    r"(?P<time>[\d.]+) upstream=(?P<upstream>.*)$"
)


def replica_id(index: int) -> str:
    """``relay-a``, ``relay-b``, ... for index 0, 1, ..."""
    return f"relay-{string.ascii_lowercase[index]}"


def skip_without_cluster_parts() -> None:
    """Skip the running test, as a missing system part, where redis-server, nginx or openssl
    is missing (a failure under ``REPOWIRE_REQUIRE_SYSTEM_PARTS=1``)."""
    redis_server_binary()
    if find_nginx() is None:
        skip_missing("nginx", "apt-get install nginx-light")
    if shutil.which("openssl") is None:
        skip_missing("openssl", "apt-get install openssl")


def write_secret_file(path: Path) -> Path:
    """A new cluster secret: :data:`SECRET_BYTES` random bytes, url-safe base64 text, in a file
    readable by its owner only (created with mode 0600, never wider for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_urlsafe(SECRET_BYTES) + "\n")
    return path


def _read_bounded(path: Path) -> str:
    try:
        with path.open("rb") as file:
            return file.read(MAX_OUTPUT).decode(errors="replace")
    except FileNotFoundError:
        return ""


# -- processes ------------------------------------------------------------------------------


class GroupProcess:
    """One command as a process group of its own (so a signal reaches everything it started),
    its stdout and stderr in ``log_dir/<name>-<n>.{stdout,stderr}`` for the n-th start.

    Starting is synchronous (fork and exec); waiting has sync (:meth:`wait_sync`) and async
    (:meth:`wait`) forms, so the same object serves a synchronous fixture and a trio test.
    """

    def __init__(
        self, argv: Sequence[str], *, name: str, cwd: Path, env: Mapping[str, str], log_dir: Path
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.cwd = cwd
        self.env = dict(env)
        self.log_dir = log_dir
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"

    def start(self) -> None:
        """Start the command (again); raises AssertionError if it is running."""
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = self.log_dir / f"{self.name}-{self.starts}.stdout"
        self.stderr_path = self.log_dir / f"{self.name}-{self.starts}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` to the process group (nothing if the process is gone)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signum)

    def stdout(self) -> str:
        return _read_bounded(self.stdout_path)

    def stderr(self) -> str:
        return _read_bounded(self.stderr_path)

    def tail(self) -> str:
        """The end of this start's stderr and stdout, keys masked, for a failure message."""
        err = self.stderr()[-TAIL_CHARS:]
        out = self.stdout()[-TAIL_CHARS // 3 :]
        return mask_keys(f"--- {self.stderr_path.name}\n{err}\n--- {self.stdout_path.name}\n{out}")

    def wait_sync(self, timeout: float) -> int | None:
        """The exit status, waiting at most ``timeout`` seconds (None if still running)."""
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    async def wait_exit(self) -> int | None:
        """The exit status once the process exited (None if it was never started); the caller
        bounds the wait."""
        while True:
            if not self.running:
                return self.returncode
            await trio.sleep(POLL_INTERVAL)

    async def stop(self) -> int | None:
        """SIGTERM, SIGKILL after :data:`STOP_TIMEOUT` seconds; the exit status."""
        self.signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            return await self.wait_exit()
        return await self.kill()

    async def kill(self) -> int | None:
        """SIGKILL: the process vanishes mid-whatever; its exit status (None if the kernel
        has not reaped it within :data:`KILL_TIMEOUT`)."""
        self.signal(signal.SIGKILL)
        with trio.move_on_after(KILL_TIMEOUT):
            return await self.wait_exit()
        return None

    async def wait_for_line(self, prefix: str) -> str:
        """The first stdout line of this start beginning with ``prefix``. Raises
        AssertionError if the process exits first or :data:`START_TIMEOUT` passes."""
        with _bounded(START_TIMEOUT, lambda: f"{self.name} printed no {prefix!r}:\n{self.tail()}"):
            while True:
                for line in self.stdout().splitlines():
                    if line.startswith(prefix):
                        return line
                if not self.running:
                    raise AssertionError(
                        f"{self.name} exited ({self.returncode}) before printing {prefix!r}:\n"
                        f"{self.tail()}"
                    )
                await trio.sleep(POLL_INTERVAL)
        raise AssertionError("unreachable")


@contextlib.contextmanager
def _bounded(seconds: float, what: Callable[[], str]) -> Iterator[None]:
    """``trio.fail_after(seconds)``, the timeout turned into an AssertionError saying
    ``what()`` (called only then)."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise AssertionError(f"not within {seconds:g} s: {what()}") from None


def stop_all_sync(processes: Sequence[GroupProcess], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every running process at once, wait for all (at most ``timeout`` seconds),
    SIGKILL the rest."""
    for process in processes:
        process.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        process.wait_sync(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.running:
            process.signal(signal.SIGKILL)
            process.wait_sync(KILL_TIMEOUT)


# -- Redis, spoken directly -----------------------------------------------------------------

#: A RESP2 reply: status text, integer, bulk string, nil, or an array of those.
RespValue = str | int | bytes | None | list["RespValue"]


class RedisReplyError(Exception):
    """Redis answered with an error reply (the message is Redis's, never a secret)."""


def redis_call(
    port: int, *words: str | bytes, password: str | None = None, timeout: float = REDIS_TIMEOUT
) -> RespValue:
    """Send one command to the Redis on 127.0.0.1:``port`` and return its parsed reply.

    Unlike ``RedisServer.command`` this sends the words as a RESP array (a word may hold
    spaces or any byte) and reads arrays (SCAN, HGETALL). Raises :class:`RedisReplyError` for
    an error reply and OSError when Redis cannot be reached or the reply is cut.
    """
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as conn:
        reader = _RespReader(conn)
        if password is not None:
            conn.sendall(_resp_command(("AUTH", password)))
            reader.read()
        conn.sendall(_resp_command(words))
        return reader.read()


def _resp_command(words: Sequence[str | bytes]) -> bytes:
    out = bytearray(b"*%d\r\n" % len(words))
    for word in words:
        data = word.encode() if isinstance(word, str) else word
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return bytes(out)


class _RespReader:
    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._buffer = bytearray()

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[: size + 2]
        return data

    def _fill(self) -> None:
        chunk = self._conn.recv(65536)
        if not chunk:
            raise OSError("Redis closed the connection before a whole reply")
        self._buffer += chunk

    def read(self) -> RespValue:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exactly(size)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self.read() for _ in range(count)]
        raise OSError(f"not a RESP reply: {line[:40]!r}")


def _text(value: RespValue) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


@attrs.frozen(kw_only=True)
class PresenceRecord:
    """One presence record as found in Redis: its key, its type (``string`` or ``hash``), its
    fields (a string's JSON object, or a hash's fields; a hash field holding JSON is decoded)
    and its time to live in ms (-1: none, -2: gone)."""

    key: str
    kind: str
    fields: Mapping[str, Any]
    pttl: int

    def text(self) -> str:
        return self.key + " " + json.dumps(self.fields, default=str, sort_keys=True)


def _decode_field(value: RespValue) -> Any:
    text = _text(value)
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_presence(port: int, password: str | None = None) -> list[PresenceRecord]:
    """Every Redis key under :data:`REDIS_NAMESPACE` whose name holds :data:`PRESENCE_WORD`,
    with its contents. A hash whose fields name daemons (values holding JSON objects) comes
    back as one entry per field, keyed ``<key>#<field>``."""
    entries: list[PresenceRecord] = []
    cursor = "0"
    pattern = f"{REDIS_NAMESPACE}*{PRESENCE_WORD}*"
    names: list[str] = []
    while True:
        reply = redis_call(
            port, "SCAN", cursor, "MATCH", pattern, "COUNT", "1000", password=password
        )
        assert isinstance(reply, list) and len(reply) == 2, reply
        cursor = _text(reply[0])
        batch = reply[1]
        assert isinstance(batch, list)
        names += [_text(name) for name in batch]
        if cursor == "0":
            break
    for name in sorted(set(names)):
        kind = _text(redis_call(port, "TYPE", name, password=password))
        pttl = redis_call(port, "PTTL", name, password=password)
        assert isinstance(pttl, int)
        if kind == "string":
            value = _decode_field(redis_call(port, "GET", name, password=password))
            fields = value if isinstance(value, dict) else {"value": value}
            entries.append(PresenceRecord(key=name, kind=kind, fields=fields, pttl=pttl))
        elif kind == "hash":
            flat = redis_call(port, "HGETALL", name, password=password)
            assert isinstance(flat, list)
            pairs = {_text(flat[i]): _decode_field(flat[i + 1]) for i in range(0, len(flat), 2)}
            if pairs and all(isinstance(v, dict) for v in pairs.values()):
                for field, value in pairs.items():
                    entries.append(
                        PresenceRecord(key=f"{name}#{field}", kind=kind, fields=value, pttl=pttl)
                    )
            else:
                entries.append(PresenceRecord(key=name, kind=kind, fields=pairs, pttl=pttl))
        else:
            entries.append(PresenceRecord(key=name, kind=kind, fields={}, pttl=pttl))
    return entries


# -- the parts ------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class Replica:
    """One relay replica: its fixed ports and directories, and its process."""

    index: int
    replica_id: str
    port: int
    metrics_port: int
    data_dir: Path
    process: GroupProcess

    @property
    def address(self) -> Address:
        return (LOOPBACK, self.port)

    @property
    def url(self) -> str:
        """Where the replica listens, and what it advertises to the other replicas."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def upstream(self) -> str:
        """The replica as nginx names it (``host:port``, as in ``$upstream_addr``)."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.running


@attrs.frozen(kw_only=True)
class ClusterKey:
    """An API key made by the relay's operator: the key (a secret) and its id."""

    key: str = attrs.field(repr=False)
    key_id: str


@attrs.frozen(kw_only=True)
class AccessEntry:
    """One line of nginx's access log: the request and the replicas it went to, in order."""

    method: str
    path: str
    status: int
    body_bytes: int
    upstreams: tuple[str, ...]


def parse_access_log(text: str) -> list[AccessEntry]:
    entries = []
    for line in text.splitlines():
        match = _ACCESS_LINE.search(line)
        if match is None:
            continue
        upstreams = tuple(
            part.strip() for part in re.split(r"[,:]\s", match["upstream"]) if part.strip()
        )
        entries.append(
            AccessEntry(
                method=match["method"],
                path=match["path"],
                status=int(match["status"]),
                body_bytes=int(match["bytes"]),
                upstreams=tuple(u for u in upstreams if u != "-"),
            )
        )
    return entries


class ClusterDaemon:
    """``repowire serve --relay`` in a home of its own, linking through nginx.

    Its config names nginx's ``wss://`` URL and the test CA; the key comes from the
    environment (``REPOWIRE_API_KEY``); the daemon id and port are fixed, so a restart is the
    same daemon on the same port.
    """

    def __init__(self, root: Path, *, daemon_id: str, port: int, process: GroupProcess) -> None:
        self.root = root
        self.daemon_id = daemon_id
        self.port = port
        self.process = process

    @property
    def address(self) -> Address:
        return (LOOPBACK, self.port)

    async def health(self) -> dict[str, Any]:
        """The daemon's own ``GET /health`` (not through the relay)."""
        with trio.fail_after(PROBE_TIMEOUT):
            response = await http_request(self.address, "GET", "/health")
        document = response.json()
        assert isinstance(document, dict), document
        return document

    async def link(self) -> dict[str, Any]:
        """The ``relay`` part of its ``/health``: the connector's state."""
        relay = (await self.health()).get("relay")
        assert isinstance(relay, dict), relay
        return relay

    async def wait_connected(self, *, since: float = 0.0) -> float:
        """Wait until the link is connected and came up at or after ``since`` (epoch seconds;
        0: any link); return when it came up (``connected_since``). Raises AssertionError if
        the process exits or :data:`LINK_TIMEOUT` passes (callers may bound it tighter)."""
        last: list[object] = [None]

        def what() -> str:
            return f"daemon {self.daemon_id} connected (last {last[0]!r})\n{self.process.tail()}"

        with _bounded(LINK_TIMEOUT, what):
            while True:
                self._check_running()
                with contextlib.suppress(OSError, trio.TooSlowError, ValueError, AssertionError):
                    link = last[0] = await self.link()
                    up = link.get("connected_since")
                    connected = link.get("state") == "connected"
                    if connected and isinstance(up, int | float) and up >= since:
                        return float(up)
                await trio.sleep(POLL_INTERVAL)
        raise AssertionError("unreachable")

    def _check_running(self) -> None:
        if not self.process.running:
            raise AssertionError(
                f"daemon {self.daemon_id} exited ({self.process.returncode}):\n"
                f"{self.process.tail()}"
            )

    async def stop(self) -> int | None:
        """SIGTERM (the connector says goodbye), SIGKILL after a bounded wait."""
        return await self.process.stop()

    async def start(self) -> None:
        """Start it again (same home, port and id); returns once it listens, not once linked."""
        self.process.start()
        await self._wait_listening()

    async def restart(self) -> float:
        """Stop and start it; return when its new link came up."""
        started = time.time()
        await self.stop()
        await self.start()
        return await self.wait_connected(since=started)

    async def _wait_listening(self) -> None:
        def what() -> str:
            return f"daemon {self.daemon_id} listening:\n{self.process.tail()}"

        with _bounded(START_TIMEOUT, what):
            while True:
                with contextlib.suppress(OSError, trio.TooSlowError, ValueError, AssertionError):
                    await self.health()
                    return
                self._check_running()
                await trio.sleep(POLL_INTERVAL)


class FaultDaemonProcess(ClusterDaemon):
    """The scripted daemon of :mod:`tests.support.fault_daemon` (``/big``, ``/ws`` echo,
    ``/hello``) linking through nginx; its port is the one it printed."""

    async def start(self) -> None:
        self.process.start()
        line = await self.process.wait_for_line(DAEMON_READY)
        self.port = listening_port(line)


# -- the cluster ----------------------------------------------------------------------------


class RelayCluster:
    """Redis, ``replicas`` relay replicas and nginx in front, under ``root``.

    ``cluster_flags=False`` starts the replicas without ``--redis-url``, ``--replica-id``,
    ``--advertise-url`` and ``--cluster-secret-file`` (independent relays behind one
    balancer: enough to test the harness and the balancer). ``replica_args`` are added to
    every replica's command line.
    """

    def __init__(
        self,
        root: Path,
        *,
        replicas: int = SITE_REPLICAS,
        cluster_flags: bool = True,
        replica_args: Sequence[str] = (),
    ) -> None:
        if replicas != SITE_REPLICAS:
            raise ValueError(f"the documented config balances over {SITE_REPLICAS} replicas")
        self.root = root
        self.cluster_flags = cluster_flags
        self.replica_args = list(replica_args)
        self.logs = root / "logs"
        self.work = root / "work"
        self.home = root / "home"
        for directory in (self.logs, self.work, self.home):
            directory.mkdir(parents=True, exist_ok=True)
        self.env = cli_environment(self.home)
        self.secret_file = root / "secret" / "cluster.key"
        # Append-only, as in production: what the relays wrote survives a Redis restart.
        self.redis = RedisServer(root / "redis", persistent=True)
        self.tls: TlsFiles | None = None
        ports = free_ports(2 + 2 * replicas)
        self.https_port, self.http_port = ports[0], ports[1]
        self.replicas = [
            self._replica(index, ports[2 + 2 * index], ports[3 + 2 * index])
            for index in range(replicas)
        ]
        self.nginx: GroupProcess | None = None
        self.daemons: list[ClusterDaemon] = []

    # -- addresses --------------------------------------------------------------------------

    @property
    def lb_address(self) -> Address:
        return (LOOPBACK, self.https_port)

    @property
    def origin(self) -> str:
        """What browsers see: ``https://localhost:PORT`` (the replicas' ``--public-url``)."""
        return f"https://{TLS_HOST}:{self.https_port}"

    @property
    def ws_url(self) -> str:
        """What daemons dial: ``wss://localhost:PORT``."""
        return f"wss://{TLS_HOST}:{self.https_port}"

    @property
    def ca_file(self) -> Path:
        assert self.tls is not None, "the cluster was not started"
        return self.tls.ca_cert

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def replica_url(self, index: int) -> str:
        return self.replicas[index].url

    def replica_by_id(self, wanted: str) -> Replica:
        for replica in self.replicas:
            if replica.replica_id == wanted:
                return replica
        raise KeyError(wanted)

    def replica_by_upstream(self, upstream: str) -> Replica:
        for replica in self.replicas:
            if replica.upstream == upstream:
                return replica
        raise KeyError(upstream)

    # -- life -------------------------------------------------------------------------------

    def _replica(self, index: int, port: int, metrics_port: int) -> Replica:
        rid = replica_id(index)
        data_dir = self.root / rid / "data"
        process = GroupProcess(
            self._replica_argv(rid, port, metrics_port, data_dir),
            name=rid,
            cwd=self.work,
            env=self.env,
            log_dir=self.logs,
        )
        return Replica(
            index=index,
            replica_id=rid,
            port=port,
            metrics_port=metrics_port,
            data_dir=data_dir,
            process=process,
        )

    def _replica_argv(self, rid: str, port: int, metrics_port: int, data_dir: Path) -> list[str]:
        argv = [sys.executable, "-m", "repowire", "relay", "start"]
        argv += ["--host", LOOPBACK, "--port", str(port), "--data-dir", str(data_dir)]
        argv += ["--metrics-listen", f"{LOOPBACK}:{metrics_port}"]
        argv += ["--public-url", f"https://{TLS_HOST}:{self.https_port}"]
        argv += ["--trusted-proxy", LOOPBACK]
        if self.cluster_flags:
            # The Redis URL is only known once Redis runs: filled in at start.
            argv += ["--redis-url", "{REDIS_URL}", "--replica-id", rid]
            argv += ["--advertise-url", f"http://{LOOPBACK}:{port}"]
            argv += ["--cluster-secret-file", str(self.secret_file)]
        return argv + self.replica_args

    async def start(self) -> None:
        """Start everything and return once every replica answers ``/health`` and nginx
        listens. Skips the test where a system part is missing. On failure, whatever started
        is stopped and the AssertionError carries the processes' output."""
        skip_without_cluster_parts()
        try:
            self.tls = await make_certificates(self.root / "tls")
            await trio.to_thread.run_sync(self.redis.start)
            write_secret_file(self.secret_file)
            for replica in self.replicas:
                replica.process.argv = [
                    self.redis.url if word == "{REDIS_URL}" else word
                    for word in replica.process.argv
                ]
            async with trio.open_nursery() as nursery:
                for index in range(len(self.replicas)):
                    nursery.start_soon(self.start_replica, index)
            self.nginx = self._nginx_process()
            self.nginx.start()
            await self._wait_nginx()
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.close)
            raise

    def close(self) -> None:
        """Stop every process still running (daemons first, then nginx and the replicas, then
        Redis), each group with SIGTERM and SIGKILL after a bounded wait. Synchronous and
        idempotent: safe in any teardown."""
        try:
            stop_all_sync([daemon.process for daemon in self.daemons], timeout=10.0)
        finally:
            try:
                parts = [replica.process for replica in self.replicas]
                if self.nginx is not None:
                    parts.append(self.nginx)
                stop_all_sync(parts)
            finally:
                self.redis.stop(final=True)

    def report(self) -> str:
        """The ends of every process's output and of Redis's log, keys masked: what a failed
        test should show."""
        parts = [replica.process.tail() for replica in self.replicas if replica.process.starts]
        if self.nginx is not None:
            parts.append(self.nginx.tail())
        parts += [daemon.process.tail() for daemon in self.daemons if daemon.process.starts]
        redis_log = _read_bounded(self.redis.log_file)[-TAIL_CHARS:]
        parts.append(f"--- {self.redis.log_file.name}\n{redis_log}")
        return "\n".join(parts)

    # -- replicas ---------------------------------------------------------------------------

    async def start_replica(self, index: int) -> None:
        """Start replica ``index`` (on its port) and return once its ``/health`` answers."""
        replica = self.replicas[index]
        replica.process.start()
        await replica.process.wait_for_line(RELAY_LISTENING)
        await self._wait_replica_healthy(replica)

    async def stop_replica(self, index: int) -> int | None:
        """SIGTERM: the graceful stop (go-away to its daemons); its exit status."""
        return await self.replicas[index].process.stop()

    async def kill_replica(self, index: int) -> int | None:
        """SIGKILL: the replica vanishes without a word; its exit status."""
        return await self.replicas[index].process.kill()

    async def restart_replica(self, index: int) -> None:
        """A graceful stop, then a start on the same port; returns once it is healthy."""
        await self.stop_replica(index)
        await self.start_replica(index)

    async def replica_health(self, index: int) -> tuple[int, dict[str, Any]]:
        """``GET /health`` of one replica, directly: its status and JSON body."""
        with trio.fail_after(PROBE_TIMEOUT):
            response = await http_request(self.replicas[index].address, "GET", "/health")
        document = response.json()
        assert isinstance(document, dict), document
        return response.status, document

    async def _wait_replica_healthy(self, replica: Replica) -> None:
        last: list[object] = [None]

        def what() -> str:
            return f"{replica.replica_id} healthy (last {last[0]!r}):\n{replica.process.tail()}"

        with _bounded(HEALTH_TIMEOUT, what):
            while True:
                if not replica.running:
                    raise AssertionError(
                        f"{replica.replica_id} exited ({replica.process.returncode}):\n"
                        f"{replica.process.tail()}"
                    )
                with contextlib.suppress(OSError, trio.TooSlowError, ValueError, AssertionError):
                    status, health = await self.replica_health(replica.index)
                    last[0] = (status, health)
                    if status == 200:
                        return
                await trio.sleep(POLL_INTERVAL)

    async def wait_healthy(self) -> None:
        """Return once every replica is running and answers ``/health`` with 200; raises
        AssertionError naming the first that does not within :data:`HEALTH_TIMEOUT` (callers
        may bound it tighter)."""
        for replica in self.replicas:
            await self._wait_replica_healthy(replica)

    async def link_counts(self) -> list[int | None]:
        """Daemon links each replica holds itself (its ``/health`` ``daemons_connected``);
        None for a replica that does not answer."""
        counts: list[int | None] = []
        for replica in self.replicas:
            try:
                _status, health = await self.replica_health(replica.index)
            except (OSError, trio.TooSlowError, ValueError, AssertionError):
                counts.append(None)
                continue
            value = health.get("daemons_connected")
            counts.append(value if isinstance(value, int) else None)
        return counts

    def holder_from_logs(self, daemon_id: str) -> Replica | None:
        """The running replica whose current log says ``daemon_id`` connected last and has
        not left since, or None."""
        holder = None
        for replica in self.replicas:
            if not replica.running:
                continue
            state = None
            for line in replica.process.stderr().splitlines():
                up, down = LINK_UP_LINE.search(line), LINK_DOWN_LINE.search(line)
                if up is not None and up["id"] == daemon_id:
                    state = True
                elif down is not None and down["id"] == daemon_id:
                    state = False
            if state:
                holder = replica
        return holder

    # -- Redis ------------------------------------------------------------------------------

    async def stop_redis(self) -> None:
        """Stop Redis (SIGTERM; it comes back with :meth:`start_redis` on the same port)."""
        await trio.to_thread.run_sync(self.redis.stop)

    async def start_redis(self) -> None:
        await trio.to_thread.run_sync(self.redis.start)

    def redis_call(self, *words: str | bytes) -> RespValue:
        """One command to the cluster's Redis (see :func:`redis_call`)."""
        return redis_call(self.redis.port, *words, password=self.redis.password)

    def presence(self) -> list[PresenceRecord]:
        return read_presence(self.redis.port, self.redis.password)

    def presence_of(self, daemon_id: str) -> list[PresenceRecord]:
        """The presence entries that name ``daemon_id`` (in their key or a field)."""
        found = []
        for entry in self.presence():
            key_words = re.split(r"[:#]", entry.key)
            if daemon_id in key_words or daemon_id in entry.fields.values():
                found.append(entry)
        return found

    def holder_from_presence(self, daemon_id: str) -> Replica | None:
        """The replica that the presence entry of ``daemon_id`` names (by replica id or
        advertised URL), or None if there is none or it names no replica of this cluster."""
        for entry in self.presence_of(daemon_id):
            text = entry.text()
            named = [r for r in self.replicas if f'"{r.replica_id}"' in text or r.url in text]
            if len(named) == 1:
                return named[0]
        return None

    # -- keys -------------------------------------------------------------------------------

    def _store_flags(self) -> list[str]:
        if self.cluster_flags:
            return ["--redis-url", self.redis.url]
        # Independent replicas: the first one's store.
        return ["--data-dir", str(self.replicas[0].data_dir)]

    async def _cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        argv = [sys.executable, "-m", "repowire", *args]
        with trio.fail_after(START_TIMEOUT):
            return await trio.run_process(
                argv,
                env=self.env,
                cwd=self.work,
                check=False,
                capture_stdout=True,
                capture_stderr=True,
            )

    async def create_key(self, label: str) -> ClusterKey:
        """``repowire relay keys create`` on the cluster's store, in a new scope."""
        done = await self._cli("relay", "keys", "create", "--label", label, *self._store_flags())
        out = done.stdout.decode(errors="replace")
        err = mask_keys(done.stderr.decode(errors="replace"))
        assert done.returncode == 0, f"keys create failed ({done.returncode}): {err}"
        key = printed_key(out)
        match = re.search(r"\b(key_[0-9a-f]+)\b", out)
        assert key is not None and match is not None, "keys create printed no key or id"
        return ClusterKey(key=key, key_id=match[1])

    async def revoke_key(self, key_id: str) -> None:
        """``repowire relay keys revoke`` on the cluster's store."""
        done = await self._cli("relay", "keys", "revoke", key_id, *self._store_flags())
        err = mask_keys(done.stderr.decode(errors="replace"))
        assert done.returncode == 0, f"keys revoke failed ({done.returncode}): {err}"

    # -- daemons ----------------------------------------------------------------------------

    def _daemon_env(self, home: Path) -> dict[str, str]:
        env = cli_environment(home)
        # The fault daemon's connector has no CA option: the default context reads this.
        env["SSL_CERT_FILE"] = str(self.ca_file)
        return env

    async def start_daemon(
        self, daemon_id: str, key: ClusterKey, *, wait: bool = True
    ) -> ClusterDaemon:
        """``repowire serve --relay`` as ``daemon_id`` with ``key``, dialling nginx; returns
        once its link is connected (``wait``) or once it listens."""
        root = self.root / "daemons" / daemon_id
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.yaml").write_text(
            f"relay:\n  enabled: true\n  url: {self.ws_url}\n  ca_file: {self.ca_file}\n"
        )
        env = self._daemon_env(home)
        env["REPOWIRE_API_KEY"] = key.key
        (port,) = free_ports(1)
        argv = [sys.executable, "-m", "repowire", "serve", "--relay"]
        argv += ["--port", str(port), "--daemon-id", daemon_id]
        process = GroupProcess(
            argv, name=f"serve-{daemon_id}", cwd=root, env=env, log_dir=self.logs
        )
        daemon = ClusterDaemon(root, daemon_id=daemon_id, port=port, process=process)
        self.daemons.append(daemon)
        await daemon.start()
        if wait:
            await daemon.wait_connected()
        return daemon

    async def start_fault_daemon(self, daemon_id: str, key: ClusterKey) -> FaultDaemonProcess:
        """The scripted daemon (:mod:`tests.support.fault_daemon`) as ``daemon_id``, dialling
        nginx; returns once its link is connected."""
        root = self.root / "daemons" / daemon_id
        root.mkdir(parents=True, exist_ok=True)
        env = self._daemon_env(root / "home")
        paths = [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env[KEY_VARIABLE] = key.key
        argv = [sys.executable, "-m", MODULE, "--relay-url", self.ws_url, "--daemon-id", daemon_id]
        process = GroupProcess(
            argv, name=f"fault-{daemon_id}", cwd=root, env=env, log_dir=self.logs
        )
        daemon = FaultDaemonProcess(root, daemon_id=daemon_id, port=0, process=process)
        self.daemons.append(daemon)
        await daemon.start()
        await daemon.wait_connected()
        return daemon

    # -- nginx ------------------------------------------------------------------------------

    @property
    def nginx_dir(self) -> Path:
        return self.root / "nginx"

    @property
    def access_log(self) -> Path:
        return self.nginx_dir / "logs" / ACCESS_LOG_NAME

    def site_values(self) -> dict[str, str]:
        """The values of the cluster site's placeholders for this cluster."""
        assert self.tls is not None
        values = {
            "SERVER_NAME": TLS_HOST,
            "LISTEN": f"{LOOPBACK}:{self.https_port}",
            "HTTP_LISTEN": f"{LOOPBACK}:{self.http_port}",
            "CERT": str(self.tls.cert),
            "KEY": str(self.tls.key),
            "LOG_DIR": str(self.nginx_dir / "logs"),
        }
        for replica in self.replicas:
            values[f"REPLICA_{replica.index + 1}"] = replica.upstream
        return values

    def _nginx_process(self) -> GroupProcess:
        nginx = find_nginx()
        assert nginx is not None
        directory = self.nginx_dir
        for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (directory / "temp" / name).mkdir(parents=True, exist_ok=True)
        (directory / "logs").mkdir(parents=True, exist_ok=True)
        site = directory / "repowire-cluster.conf"
        site.write_text(render_template(CLUSTER_SITE.read_text(), self.site_values()))
        main = directory / "nginx.conf"
        main.write_text(nginx_main_config(directory, site))
        base = [nginx, "-e", "stderr", "-p", str(directory), "-c", str(main)]
        check = subprocess.run(
            [*base, "-t", "-q"], capture_output=True, timeout=START_TIMEOUT, check=False
        )
        assert check.returncode == 0, f"nginx -t: {check.stderr.decode(errors='replace')}"
        return GroupProcess(
            [*base, "-g", "daemon off;"],
            name="nginx",
            cwd=directory,
            env=os.environ,
            log_dir=self.logs,
        )

    async def _wait_nginx(self) -> None:
        assert self.nginx is not None
        deadline = trio.current_time() + START_TIMEOUT
        while True:
            if not self.nginx.running:
                raise AssertionError(
                    f"nginx exited ({self.nginx.returncode}):\n{self.nginx.tail()}"
                )
            try:
                stream = await trio.open_tcp_stream(*self.lb_address)
            except OSError:
                if trio.current_time() > deadline:
                    raise AssertionError(f"nginx never listened:\n{self.nginx.tail()}") from None
                await trio.sleep(POLL_INTERVAL)
                continue
            await stream.aclose()
            return

    async def wait_in_rotation(self, *indexes: int) -> None:
        """Return once nginx has sent a request (anyone's) to each replica of ``indexes``
        (default: all) and got an answer, probing with ``GET /health`` through nginx: a
        replica nginx saw fail stays out of the rotation for the site's ``fail_timeout``.
        Raises AssertionError after :data:`ROTATION_TIMEOUT` seconds."""
        wanted = {self.replicas[i].upstream for i in indexes or range(len(self.replicas))}
        since = len(self.access_entries())

        def missing() -> set[str]:
            answered = {
                entry.upstreams[-1]
                for entry in self.access_entries()[since:]
                if entry.upstreams and entry.status not in (502, 504)
            }
            return wanted - answered

        with _bounded(ROTATION_TIMEOUT, lambda: f"nginx sending requests to {missing()}"):
            while missing():
                with contextlib.suppress(OSError, trio.BrokenResourceError, trio.TooSlowError):
                    with trio.fail_after(PROBE_TIMEOUT):
                        await self.request("GET", "/health")
                    # Its log line comes just after the answer.
                    await trio.sleep(POLL_INTERVAL / 5)
                await trio.sleep(POLL_INTERVAL)

    def access_entries(self) -> list[AccessEntry]:
        """Every request nginx logged so far (a request is logged once it ended)."""
        return parse_access_log(_read_bounded(self.access_log))

    async def wait_access_entries(self, count: int) -> list[AccessEntry]:
        """The access log's entries once it holds at least ``count`` (nginx writes a line
        just after the last byte of the answer went out, so a client may read the answer
        before its line is there). Raises AssertionError after :data:`PROBE_TIMEOUT`."""
        with _bounded(PROBE_TIMEOUT, lambda: f"nginx logging {count} requests"):
            while True:
                entries = self.access_entries()
                if len(entries) >= count:
                    return entries
                await trio.sleep(POLL_INTERVAL / 5)
        raise AssertionError("unreachable")

    # -- clients through nginx ----------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        json_body: object = None,
    ) -> HttpResponse:
        """One request through nginx over HTTPS (a fresh connection), the whole response."""
        return await https_request(
            self.https_port,
            self.ca_file,
            method,
            path,
            headers=headers,
            body=body,
            json_body=json_body,
        )

    @asynccontextmanager
    async def open_stream(
        self, method: str, path: str, *, headers: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[HttpStream]:
        """A request through nginx whose response is read piece by piece (an event stream)."""
        async with open_https_stream(
            self.https_port, self.ca_file, method, path, headers=headers
        ) as response:
            yield response

    @asynccontextmanager
    async def open_websocket(
        self, path: str, *, headers: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[WebSocketConnection]:
        """A WebSocket through nginx (send the Origin and the Cookie in ``headers``)."""
        async with open_wss(self.https_port, self.ca_file, path, headers=headers) as ws:
            yield ws

    async def connect(self, *, cookie: str | None = None) -> HttpConnection:
        """A keep-alive HTTPS connection to nginx (requests on it still go round robin:
        nginx picks a replica per request). ``cookie`` is ``name=value``."""
        return await connect(
            self.lb_address,
            ssl_context=client_context(self.ca_file),
            server_hostname=TLS_HOST,
            host=f"{TLS_HOST}:{self.https_port}",
            cookie=cookie,
        )


@asynccontextmanager
async def open_cluster(
    root: Path,
    *,
    cluster_flags: bool = True,
    replica_args: Sequence[str] = (),
) -> AsyncIterator[RelayCluster]:
    """A started :class:`RelayCluster`, stopped on exit whatever happened (the report of its
    processes is added to a failure's message)."""
    cluster = RelayCluster(root, cluster_flags=cluster_flags, replica_args=replica_args)
    await cluster.start()
    try:
        yield cluster
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cluster.close)


@contextlib.contextmanager
def reported(cluster: RelayCluster) -> Iterator[None]:
    """Add the cluster's process output to an AssertionError or timeout raised inside."""
    try:
        yield
    except (AssertionError, trio.TooSlowError) as exc:
        raise AssertionError(f"{exc}\n\n=== cluster processes ===\n{cluster.report()}") from exc
