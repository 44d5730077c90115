"""A private ``redis-server`` for tests: loopback only, a port the system picks, its own directory.

:class:`RedisServer` starts Debian's ``redis-server`` on 127.0.0.1 at a free port (and on a
Unix socket in its directory), waits until it answers ``PING``, and stops it with SIGTERM
(SIGKILL if it lingers). :meth:`RedisServer.stop` then :meth:`RedisServer.start` simulate Redis
going down and coming back on the same port and directory; with ``persistent=True`` it runs with
``--appendonly yes``, so what was written before the stop is there after the start.

Every method is synchronous and bounded by :data:`START_TIMEOUT` / :data:`STOP_TIMEOUT`: the
waits are short (tens of milliseconds), so calling them from a trio test is fine.

Use :func:`redis_server_binary` (or the fixtures in ``tests.support.redis_fixtures``) to skip
with a clear reason where ``redis-server`` is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.support.processes import free_port
from tests.support.system import skip_missing

LOOPBACK: Final = "127.0.0.1"
#: What to install where ``redis-server`` is missing.
INSTALL: Final = "apt-get install redis-server"
#: Seconds a start may take before it is a failure (a fresh redis-server answers in ~20 ms).
START_TIMEOUT: Final = 10.0
#: Seconds a SIGTERM is given before SIGKILL.
STOP_TIMEOUT: Final = 10.0
#: Attempts at a fresh port when another process takes the one picked before Redis binds it.
PORT_ATTEMPTS: Final = 5

_POLL_INTERVAL = 0.005
# Room in a Unix socket address (sun_path holds 108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 100


class RedisServerError(RuntimeError):
    """The server did not start (its log's last lines are in the message) or did not stop."""


#: The ``redis_servers`` fixture: ``redis_servers(persistent=..., password=...)`` returns a
#: started private server (tests.support.redis_fixtures).
RedisServerFactory = Callable[..., "RedisServer"]


#: For tests that make Redis unreachable: coredis (6.9) leaves the memory streams of a failed
#: connection attempt unclosed, and their ResourceWarning, an error in this suite, would
#: surface at a random later garbage collection. With this mark (and the ``redis_servers``
#: fixture, which collects garbage at teardown) it is ignored, within the test only.
tolerates_failed_connections = pytest.mark.filterwarnings(
    "ignore:Unclosed <MemoryObject:ResourceWarning"
)


def redis_server_binary() -> str:
    """The path of ``redis-server``, or skip the running test as a missing system part."""
    binary = shutil.which("redis-server")
    if binary is None:
        skip_missing("redis-server", INSTALL)
    return binary


class RedisServer:
    """One ``redis-server`` process at a time, always on the same port and directory.

    ``persistent=False`` runs with ``--save ""`` and no append-only file: nothing reaches the
    disk, and a restart comes back empty. ``persistent=True`` adds ``--appendonly yes``
    (``appendfsync always``), so every write acknowledged before :meth:`stop` survives it.
    ``password`` sets ``--requirepass`` (the URLs then carry it).
    """

    def __init__(
        self,
        directory: Path,
        *,
        persistent: bool = False,
        password: str | None = None,
        binary: str = "",
    ) -> None:
        self.directory = directory
        self.persistent = persistent
        self.password = password
        self.binary = binary or redis_server_binary()
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._socket_path: Path | None = None
        self._socket_dir: Path | None = None

    # -- addresses ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:<port>/0``. Valid once started (the port stays
        across restarts)."""
        if self.port == 0:
            raise RedisServerError("the server has not been started")
        return f"redis://{self._credentials()}{LOOPBACK}:{self.port}/0"

    @property
    def socket_path(self) -> Path:
        """The Unix socket the server also listens on: in its directory, or where that path
        would be too long for a socket address (about 100 bytes), in a short temporary
        directory that :meth:`stop` with ``final=True`` removes."""
        if self._socket_path is None:
            path = self.directory / "redis.sock"
            if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
                path = Path(tempfile.mkdtemp(prefix="redis-")) / "redis.sock"
                self._socket_dir = path.parent
            self._socket_path = path
        return self._socket_path

    @property
    def unix_url(self) -> str:
        """``unix://[:password@]<directory>/redis.sock?db=0``."""
        return f"unix://{self._credentials()}{self.socket_path}?db=0"

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> str:
        """Start the server and wait until it answers ``PING``; return its URL.

        The first start picks a free port, retrying with another one if a different process
        took it meanwhile; later starts reuse that port (and fail if it is taken). Raises
        :class:`RedisServerError` if the server does not come up within :data:`START_TIMEOUT`.
        """
        if self.running:
            raise RedisServerError("the server is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.port != 0:
            self._launch(self.port)
            return self.url
        for attempt in range(PORT_ATTEMPTS):
            port = free_port()
            try:
                self._launch(port)
            except RedisServerError:
                if attempt == PORT_ATTEMPTS - 1 or not self._port_was_taken():
                    raise
                continue
            self.port = port
            return self.url
        raise AssertionError("unreachable")

    def stop(self, *, kill: bool = False, final: bool = False) -> None:
        """Stop the server: SIGTERM (a clean shutdown, which flushes the append-only file),
        then SIGKILL after :data:`STOP_TIMEOUT`; ``kill=True`` sends SIGKILL at once (a
        crash). ``final=True`` also removes the temporary socket directory, if one was made
        (the server cannot be started again). Idempotent."""
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                # A frozen server would never act on SIGTERM.
                process.send_signal(signal.SIGCONT)
                try:
                    process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=STOP_TIMEOUT)
        finally:
            if final and self._socket_dir is not None:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

    def freeze(self) -> None:
        """Suspend the server (SIGSTOP): it keeps its connections but answers nothing, as a
        hung or partitioned Redis would. :meth:`thaw` resumes it; :meth:`stop` works on a
        frozen server too."""
        if self._process is None:
            raise RedisServerError("the server is not running")
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Resume a server suspended by :meth:`freeze` (SIGCONT)."""
        if self._process is None:
            raise RedisServerError("the server is not running")
        self._process.send_signal(signal.SIGCONT)

    def restart(self) -> str:
        """:meth:`stop` then :meth:`start`, on the same port and directory."""
        self.stop()
        return self.start()

    def command(self, *words: str) -> bytes:
        """Send one command (words without spaces or newlines) and return its reply: a status
        or error line (``+OK``, ``-ERR ...``), an integer (``:3``), or a bulk string's content.
        Enough for ``PING``, ``FLUSHALL``, ``DBSIZE`` and ``INFO`` without a client library."""
        if not self.running:
            raise RedisServerError("the server is not running")
        return _command(self.port, " ".join(words), self.password, timeout=START_TIMEOUT)

    def flushall(self) -> None:
        if self.command("FLUSHALL") != b"+OK":
            raise RedisServerError("FLUSHALL failed")

    # -- internals ----------------------------------------------------------------------------

    def _credentials(self) -> str:
        return "" if self.password is None else f":{urllib.parse.quote(self.password, safe='')}@"

    def _arguments(self, port: int) -> list[str]:
        arguments = [
            self.binary,
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_file),
            "--daemonize",
            "no",
            "--save",
            "",
            "--databases",
            "1",
        ]
        if self.password is not None:
            arguments += ["--requirepass", self.password]
        if self.persistent:
            arguments += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            arguments += ["--appendonly", "no"]
        return arguments

    def _launch(self, port: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.log_file.unlink()
        process = subprocess.Popen(
            self._arguments(port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RedisServerError(f"redis-server exited at start: {self._log_tail()}")
            if _is_our_server(port, process.pid, self.password):
                break
            if time.monotonic() > deadline:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
                raise RedisServerError(
                    f"redis-server did not answer within {START_TIMEOUT} s: {self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL)
        self._process = process

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:]) or "(empty log)"

    def _port_was_taken(self) -> bool:
        try:
            return "Address already in use" in self.log_file.read_text(errors="replace")
        except OSError:
            return False


def _command(port: int, line: str, password: str | None, *, timeout: float) -> bytes:
    """Send ``line`` (after an AUTH if there is a password) and return its reply."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as conn:
        buffer = bytearray()
        if password is not None:
            conn.sendall(b"AUTH " + password.encode() + b"\r\n")
            if _reply(conn, buffer) != b"+OK":
                raise OSError("AUTH refused")
        conn.sendall(line.encode() + b"\r\n")
        return _reply(conn, buffer)


def _reply(conn: socket.socket, buffer: bytearray) -> bytes:
    """Read one reply (status, error, integer or bulk string) from ``conn``; what follows it
    stays in ``buffer``."""
    while True:
        head, found, rest = bytes(buffer).partition(b"\r\n")
        if found and not head.startswith(b"$"):
            del buffer[: len(head) + 2]
            return head
        if found and len(rest) >= int(head[1:]) + 2:
            size = int(head[1:])
            del buffer[: len(head) + 2 + size + 2]
            return rest[:size]
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("connection closed before a full reply")
        buffer += chunk


def _is_our_server(port: int, pid: int, password: str | None) -> bool:
    """Whether the server answering on ``port`` is process ``pid`` (another process that took
    the port first must not pass for ours) and done loading its data (until then it refuses
    commands with LOADING)."""
    try:
        info = _command(port, "INFO server persistence", password, timeout=1.0)
    except (OSError, ValueError):
        return False
    return f"\r\nprocess_id:{pid}\r\n".encode() in info and b"\r\nloading:0\r\n" in info


@contextlib.contextmanager
def running_redis(
    directory: Path, *, persistent: bool = False, password: str | None = None
) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped on exit whatever happened."""
    server = RedisServer(directory, persistent=persistent, password=password)
    try:
        server.start()
        yield server
    finally:
        server.stop(final=True)
