"""The command line as real processes (``python -m repowire ...``), for trio tests.

- :class:`Cli`: runs commands in a temporary ``REPOWIRE_HOME`` (no Repowire variable inherited)
  from a work directory, to completion (:meth:`Cli.run`) or as a :class:`ChildProcess`
  (:func:`start_child`) whose output goes to files in the work directory.
- :class:`RelayProcess`: ``repowire relay start`` on a fixed data directory, which a test can
  SIGKILL, SIGTERM and start again on the same port; :func:`create_key` issues a key the way
  its operator does (``repowire relay keys create``).
- :func:`wait_for_relay_state`: a ``repowire serve`` process's ``/health`` polled until its
  relay link is in a given state.
- :func:`free_port` and :func:`free_ports`: ports for flags that refuse 0.

Processes are stopped with SIGTERM, then SIGKILL after :data:`TERM_TIMEOUT`. The same stack
for blocking tests (Playwright's sync API) is :mod:`tests.support.blocking_processes`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from .clients import Address, http_request
from .leaks import mask_keys, printed_key
from .listener import LOOPBACK as LOOPBACK
from .listener import LoopbackUrls

#: Seconds a child process gets to exit after SIGTERM before it is killed.
TERM_TIMEOUT = 5.0
#: Seconds a process gets to exit after SIGKILL (the kernel's part).
KILL_TIMEOUT = 5.0
#: Seconds a process may take to start and say it is ready.
START_TIMEOUT = 15.0
#: Largest part of a process's output read for assertions, bytes.
MAX_PROCESS_OUTPUT = 1024 * 1024
#: Characters of a process's stderr quoted in a failure message.
STDERR_TAIL = 2000
#: Seconds between two looks at a process's output or its ``/health``.
POLL_INTERVAL = 0.05
#: What ``repowire relay start`` prints once it listens (the URL follows).
RELAY_LISTENING = "repowire relay listening on http://"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (for flags that refuse port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    ports: list[int] = []
    for _ in range(100 * count):
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise AssertionError(f"no {count} distinct free ports found")


def cli_environment(home: Path) -> dict[str, str]:
    """The current environment without any REPOWIRE_ variable, with REPOWIRE_HOME=home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPOWIRE_")}
    env["REPOWIRE_HOME"] = str(home)
    return env


def relay_start_args(data_dir: Path, port: int = 0, *extra: str) -> list[str]:
    """The arguments of ``repowire relay start`` on loopback ``port`` (0: the system picks)
    with its data in ``data_dir``, no metrics listener, then ``extra`` flags."""
    return [
        *("relay", "start", "--port", str(port), "--data-dir", str(data_dir)),
        *("--metrics-listen", "off"),
        *extra,
    ]


def listening_port(line: str) -> int:
    """The port in the line a server prints once it listens (``... http://127.0.0.1:PORT``)."""
    return int(line.rsplit(":", 1)[1])


def read_bounded(path: Path) -> str:
    """The first :data:`MAX_PROCESS_OUTPUT` bytes of ``path`` as text ("" if it is missing)."""
    try:
        with path.open("rb") as file:
            return file.read(MAX_PROCESS_OUTPUT).decode(errors="replace")
    except FileNotFoundError:
        return ""


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


class ProcessOutput:
    """Where a long-running process writes: files, since a full pipe would stall it."""

    def __init__(self, stdout: Path, stderr: Path) -> None:
        self.stdout_path = stdout
        self.stderr_path = stderr

    def stdout(self) -> str:
        return read_bounded(self.stdout_path)

    def stderr(self) -> str:
        return read_bounded(self.stderr_path)

    def stderr_tail(self) -> str:
        """The end of stderr for a failure message, anything shaped like a key masked."""
        return mask_keys(self.stderr()[-STDERR_TAIL:])


class ChildProcess(ProcessOutput):
    """A long-running command under trio."""

    def __init__(self, process: trio.Process, stdout: Path, stderr: Path) -> None:
        super().__init__(stdout, stderr)
        self.process = process

    async def wait_for_line(self, prefix: str, *, interval: float = POLL_INTERVAL) -> str:
        """The first stdout line starting with ``prefix`` (callers bound the wait).

        Raises AssertionError if the process exits first."""
        while True:
            for line in self.stdout().splitlines():
                if line.startswith(prefix):
                    return line
            if self.process.poll() is not None:
                raise AssertionError(
                    f"exited ({self.process.returncode}) before printing {prefix!r}; "
                    f"stderr: {self.stderr_tail()}"
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

    async def kill(self) -> None:
        """SIGKILL: the process vanishes mid-whatever; reaped within :data:`KILL_TIMEOUT`."""
        if self.process.returncode is None:
            self.process.kill()
        with trio.move_on_after(KILL_TIMEOUT):
            await self.process.wait()


async def open_child(
    argv: Sequence[str], name: str, *, cwd: Path, env: Mapping[str, str]
) -> ChildProcess:
    """Start ``argv`` in ``cwd`` with stdout and stderr in ``cwd/name.*``."""
    stdout = cwd / f"{name}.stdout"
    stderr = cwd / f"{name}.stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            list(argv), env=dict(env), cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL
        )
    return ChildProcess(process, stdout, stderr)


async def stop_processes(children: Iterable[ChildProcess]) -> None:
    """SIGTERM every process still running, SIGKILL after a bounded wait, all at once (a
    daemon whose relay is gone exits without waiting for a closing handshake); shielded, so
    it also runs while the caller is being cancelled."""
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for child in children:
                if child.process.returncode is None:
                    nursery.start_soon(child.terminate)


async def start_child(cli: Cli, name: str, *args: str) -> ChildProcess:
    """Start ``python -m repowire args...`` with stdout and stderr in ``workdir/name.*``."""
    return await open_child(cli.argv(*args), name, cwd=cli.workdir, env=cli.env)


class RelayProcess(LoopbackUrls):
    """``repowire relay start`` on a fixed data directory, restartable on the same port.

    ``args`` are extra flags of every start; each started process is appended to
    ``children`` (for whoever stops them all at the end).
    """

    def __init__(
        self,
        cli: Cli,
        data_dir: Path,
        args: Sequence[str] = (),
        *,
        children: list[ChildProcess] | None = None,
    ) -> None:
        self.cli = cli
        self.data_dir = data_dir
        self.args = list(args)
        self.port = 0
        self.child: ChildProcess | None = None
        self._children = children if children is not None else []
        self._starts = 0

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.process.returncode is None

    async def start(self, port: int | None = None) -> None:
        """Start the relay (on ``port``; by default the port it had, or a free one) and return
        once it listens (within :data:`START_TIMEOUT`). Raises AssertionError if it exits
        first."""
        assert not self.running, "the relay is already running"
        self._starts += 1
        chosen = self.port if port is None else port
        args = relay_start_args(self.data_dir, chosen, *self.args)
        child = await start_child(self.cli, f"{self.data_dir.name}-{self._starts}", *args)
        self.child = child
        self._children.append(child)
        with trio.fail_after(START_TIMEOUT):
            line = await child.wait_for_line(RELAY_LISTENING)
        self.port = listening_port(line)

    async def kill(self) -> None:
        """SIGKILL: the relay vanishes without a word to anyone."""
        assert self.child is not None
        await self.child.kill()

    async def terminate(self) -> int:
        """SIGTERM (a graceful shutdown), SIGKILL after a bounded wait; the exit status."""
        assert self.child is not None
        return await self.child.terminate()

    async def create_key(self, label: str = "test") -> str:
        """A new scope's key, made on this relay's store (:func:`create_key`)."""
        return await create_key(self.cli, self.data_dir, label)


async def create_key(cli: Cli, data_dir: Path, label: str) -> str:
    """``repowire relay keys create`` in a new scope; the key it printed."""
    with trio.fail_after(START_TIMEOUT):
        result = await cli.run(
            "relay", "keys", "create", "--data-dir", str(data_dir), "--label", label
        )
    assert result.returncode == 0, mask_keys(result.stderr)
    key = printed_key(result.stdout)
    assert key is not None, "keys create printed no key"
    return key


async def wait_for_relay_state(
    serve: ChildProcess, address: Address, state: str, *, interval: float = POLL_INTERVAL
) -> Mapping[str, Any]:
    """The ``relay`` part of the daemon's ``GET /health`` once its state is ``state``
    (``connected``, ``down``...). Raises AssertionError if ``serve`` exits first; the caller
    bounds the wait."""
    while True:
        if serve.process.poll() is not None:
            raise AssertionError(
                f"serve exited with {serve.process.returncode}: {serve.stderr_tail()}"
            )
        try:
            health = await http_request(address, "GET", "/health")
        except OSError:
            health = None
        if health is not None and health.status == 200:
            relay = health.json().get("relay")
            if isinstance(relay, dict) and relay.get("state") == state:
                return relay
        await trio.sleep(interval)
