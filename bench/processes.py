"""Child processes of a bench, and what /proc says about them.

- :class:`Worker`: a child process whose stdout lines (one JSON object per line for the
  bench's own workers) are read by a thread and queued for :meth:`Worker.expect`; its stderr
  goes to a log file; :meth:`Worker.stop` sends SIGTERM, waits, then kills.
- :func:`rss_bytes`, :func:`cpu_seconds`: memory and CPU time of a process, from /proc.
- :func:`raise_fd_limit`: the file descriptor limit raised towards the hard limit.
- :func:`write_secret_file`: a file only the owner can read (keys reach workers that way).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from bench.report import REPO

#: Seconds a worker gets to say it is ready.
READY_TIMEOUT = 60.0
#: Seconds a worker gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 30.0
#: Longest line a worker may write (a bound on what the reader thread buffers).
MAX_WORKER_LINE = 64 * 1024
#: Lines a worker may have written that nobody has read yet; past it the oldest are dropped
#: (a worker must never block on its stdout: that would freeze everything it runs).
WORKER_LINE_BACKLOG = 10_000

T = TypeVar("T")


def raise_fd_limit(wanted: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``wanted`` (default: the hard
    limit); children inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid``, from /proc. Raises OSError if it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far by process ``pid``, from /proc."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces: the fields we want follow its ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def write_secret_file(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, readable by the owner only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    return path


class WorkerError(Exception):
    """A worker process exited, or did not say what was expected in time."""


class Worker:
    """A child process whose stdout lines are read by a thread and queued for :meth:`expect`.

    Its stderr goes to ``<log_dir>/<name>.log``. :meth:`stop` sends SIGTERM, waits, then kills.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: dict[str, str] | None = None,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self.process = subprocess.Popen(
            list(argv),
            cwd=REPO,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self._lines: collections.deque[str] = collections.deque(maxlen=WORKER_LINE_BACKLOG)
        self._eof = False
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._pump, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _pump(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        for raw in iter(lambda: stream.readline(MAX_WORKER_LINE), b""):
            with self._arrived:
                self._lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._arrived.notify_all()
        with self._arrived:
            self._eof = True
            self._arrived.notify_all()

    def expect(self, pick: Callable[[str], T | None], timeout: float, what: str) -> T:
        """Read lines until ``pick`` returns something for one; return that.

        Raises :class:`WorkerError` if the worker exits first or ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._arrived:
                while not self._lines and not self._eof:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise WorkerError(
                            f"{self.name}: no {what} within {timeout:g} s ({self.log_path})"
                        )
                    self._arrived.wait(remaining)
                line = self._lines.popleft() if self._lines else None
            if line is None:
                code = self.process.wait()
                raise WorkerError(
                    f"{self.name} exited with code {code} before {what}; see {self.log_path}"
                )
            found = pick(line)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise WorkerError(f"{self.name}: no {what} within {timeout:g} s ({self.log_path})")

    def expect_event(self, event: str, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Wait for the JSON line ``{"event": event, ...}`` and return it."""

        def pick(line: str) -> dict[str, Any] | None:
            if not line.startswith("{"):
                return None
            try:
                message = json.loads(line)
            except ValueError:
                return None
            if isinstance(message, dict) and message.get("event") == event:
                return message
            return None

        return self.expect(pick, timeout, f"'{event}' message")

    def latest_event(self, event: str) -> dict[str, Any] | None:
        """The newest ``{"event": event, ...}`` line written so far, without waiting; the lines
        read on the way are consumed."""
        latest: dict[str, Any] | None = None
        while True:
            try:
                latest = self.expect_event(event, timeout=0.0)
            except WorkerError:
                return latest

    def send(self, message: dict[str, Any]) -> None:
        """Write one JSON command line to the worker's stdin."""
        stream = self.process.stdin
        if stream is None:
            raise WorkerError(f"{self.name} was started without a command channel")
        stream.write(json.dumps(message).encode() + b"\n")
        stream.flush()

    def alive(self) -> bool:
        return self.process.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM (a graceful stop) without waiting."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the exit; kill after ``timeout`` seconds. Returns the exit code."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        self.terminate()
        code = self.wait(timeout)
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        self._log.close()
        return code
