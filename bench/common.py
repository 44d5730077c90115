"""Shared parts of the tunnel benchmarks: processes, a target server, wrk, figures and output.

Two halves live here:

- The bench side (imported by ``bench/<name>.py``): :class:`Bench` starts a relay (the real
  ``repowire relay start`` command), daemons and connectors as child processes on 127.0.0.1,
  mints keys and browser sessions in the relay's key store, and stops everything on exit;
  :func:`run_wrk` drives wrk; :func:`describe_machine`, :func:`median`, :func:`percentile`,
  :func:`print_table` and :func:`write_results` format what was measured.
- The worker side (``python -m bench.common <role> ...``, started by :class:`Bench`): ``target``
  (a tiny HTTP server serving and consuming bytes), ``daemon`` (the local daemon with its
  connector, as ``repowire serve --relay`` runs them, plus an event publisher driven over stdin)
  and ``connectors`` (any number of bare connectors, each linking one daemon id to a port).

Workers speak one JSON object per line on stdout; their stderr goes to a log file in the
bench's temporary directory. Secrets (API keys, session ids) reach workers and wrk only through
files readable by the owner alone, never through a command line or a log line.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import http.client
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

import attrs

REPO = Path(__file__).resolve().parent.parent
# Run from a checkout without installing: make the repository root importable (first, so that
# ``protocol`` is the package and not bench/protocol.py beside the running script).
if str(REPO) not in sys.path[:1]:
    sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from relay import SESSION_COOKIE, KeyRecord, KeyStore  # noqa: E402

#: Where every bench writes its JSON.
RESULTS_DIR = REPO / "bench" / "results"
#: Where ``--profile`` runs write their cProfile dumps.
PROFILE_DIR = RESULTS_DIR / "profiles"
#: The relay's key store file inside its data directory (as ``relay._server.STORE_FILE``).
STORE_FILE = "relay.sqlite3"
#: Loopback only: nothing here listens on or dials another address.
HOST = "127.0.0.1"
#: 10**6 bytes: every MB/s figure uses decimal megabytes.
MB = 1_000_000
MIB = 1024 * 1024

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


# ============================================================================ machine, figures


def describe_machine() -> dict[str, Any]:
    """Cores, CPU model, memory, Python, OS and wrk version of this machine."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory: int | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "wrk": wrk_version(),
        "load_average": load_average(),
        "code": code_version(),
    }


def code_version() -> str | None:
    """The checkout's commit, with ``+changes`` when tracked files outside ``bench/`` differ
    from it (None outside a git checkout). Figures are only comparable between runs of the
    same code."""
    git = shutil.which("git")
    if git is None:
        return None
    head = subprocess.run(
        [git, "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    if head.returncode != 0:
        return None
    changes = subprocess.run(
        [git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() + ("+changes" if changes.stdout.strip() else "")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: a busy machine makes every figure noisier."""
    return [round(value, 2) for value in os.getloadavg()]


def machine_line(machine: dict[str, Any]) -> str:
    memory = machine.get("memory_bytes")
    memory_text = f", {memory / 2**30:.1f} GiB RAM" if isinstance(memory, int) else ""
    load = machine.get("load_average") or []
    load_text = f"; load average at start {load[0]:g}" if load else ""
    if machine.get("code"):
        load_text += f"; code {machine['code']}"
    return (
        f"machine: {machine['cores']} cores ({machine['cpu_model']}){memory_text}, "
        f"{machine['implementation']} {machine['python']}, {machine['platform']}{load_text}"
    )


def wrk_version() -> str | None:
    """wrk's version line, or None when wrk is not installed."""
    path = shutil.which("wrk")
    if path is None:
        return None
    # wrk prints its usage (version first) and exits 1 when asked for its version.
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].strip() if first else "wrk"


def median(values: Sequence[float]) -> float:
    """The median of ``values``; NaN for an empty sequence."""
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(tunnel: float, direct: float) -> float:
    """``tunnel / direct``, NaN when direct is zero or missing."""
    if not direct or math.isnan(direct) or math.isnan(tunnel):
        return math.nan
    return tunnel / direct


def rounded(value: float, digits: int = 3) -> float | None:
    """``value`` rounded for JSON (NaN becomes null)."""
    return None if math.isnan(value) else round(value, digits)


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> None:
    """Print rows as an aligned table: the first ``left`` columns left-aligned, the others
    right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    print(line(headers))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def goal(
    name: str, value: float, target: float, *, at_least: bool, unit: str = ""
) -> dict[str, Any]:
    """A goal record for the JSON output: ``met`` is None when the value is missing."""
    met: bool | None = None
    if not math.isnan(value):
        met = value >= target if at_least else value < target
    return {
        "goal": name,
        "value": rounded(value, 4),
        "target": f"{'>=' if at_least else '<'} {target:g}{unit}",
        "met": met,
    }


def print_goals(goals: Sequence[dict[str, Any]]) -> None:
    for record in goals:
        verdict = {True: "met", False: "MISSED", None: "no figure"}[record["met"]]
        value = record["value"]
        shown = "-" if value is None else f"{value:g}"
        print(f"goal: {record['goal']}: {shown} (target {record['target']}): {verdict}")


def write_results(name: str, payload: dict[str, Any], output: Path | None = None) -> Path:
    """Write ``payload`` as ``bench/results/<name>.json`` (or ``output``); return the path."""
    path = output if output is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def add_common_arguments(parser: argparse.ArgumentParser, *, runs: int = 5) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs, smaller and shorter workloads"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help=f"runs per figure (median; default {runs}, 3 quick)"
    )
    parser.add_argument("--output", type=Path, default=None, help="where to write the JSON")
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"run the relay and workers under cProfile (dumps in {PROFILE_DIR})",
    )


def resolve_runs(parser: argparse.ArgumentParser, args: argparse.Namespace, full: int = 5) -> int:
    runs: int = args.runs if args.runs is not None else (3 if args.quick else full)
    if runs < 1:
        parser.error("--runs must be at least 1")
    return runs


# ============================================================================ processes


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


@attrs.define(kw_only=True)
class RelayProcess:
    """A relay started by :meth:`Bench.start_relay`."""

    worker: Worker
    port: int
    data_dir: Path

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.worker.pid


@attrs.define(kw_only=True)
class DaemonProcess:
    """A daemon with its connector, started by :meth:`Bench.start_daemon`."""

    worker: Worker
    port: int
    daemon_id: str

    @property
    def pid(self) -> int:
        return self.worker.pid


@attrs.frozen(kw_only=True)
class Credentials:
    """A scope's key and a browser session cookie value for it (both secrets)."""

    record: KeyRecord
    key: str = attrs.field(repr=False)
    cookie: str = attrs.field(repr=False)


_LISTENING = re.compile(r"repowire relay listening on http://[^\s:]+:(\d+)")


class Bench:
    """Processes of one benchmark and the temporary directory they share. A context manager:
    on exit every process still running is stopped (SIGTERM, then kill) and the directory is
    removed (kept, and named on stderr, if ``keep`` is true)."""

    def __init__(self, name: str, *, profile: bool = False, keep: bool = False) -> None:
        self.name = name
        self.profile = profile
        self.keep = keep
        self.tmp = Path(tempfile.mkdtemp(prefix=f"repowire-bench-{name}-"))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self._workers: list[Worker] = []
        self._counter = 0
        self.env = dict(os.environ)
        # Nothing a worker does may touch the user's own ~/.repowire.
        self.env["REPOWIRE_HOME"] = str(self.tmp / "home")
        self.env.pop("REPOWIRE_API_KEY", None)

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in reversed(self._workers):
            worker.terminate()
        for worker in reversed(self._workers):
            worker.stop()
        self._workers.clear()
        if self.keep:
            print(f"bench files kept in {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _unique(self, name: str) -> str:
        self._counter += 1
        return f"{self._counter:02d}-{name}"

    def _python(self, name: str, module_args: Sequence[str]) -> list[str]:
        argv = [sys.executable]
        if self.profile:
            PROFILE_DIR.mkdir(parents=True, exist_ok=True)
            argv += ["-m", "cProfile", "-o", str(PROFILE_DIR / f"{self.name}-{name}.prof")]
        return [*argv, "-m", *module_args]

    def spawn(self, name: str, module_args: Sequence[str], *, stdin: bool = False) -> Worker:
        """Start ``python -m <module_args>`` from the repository root."""
        unique = self._unique(name)
        worker = Worker(
            unique,
            self._python(unique, module_args),
            log_dir=self.logs,
            env=self.env,
            stdin=stdin,
        )
        self._workers.append(worker)
        return worker

    def forget(self, worker: Worker) -> None:
        """Stop tracking ``worker`` (it was stopped by the caller)."""
        if worker in self._workers:
            self._workers.remove(worker)

    # -------------------------------------------------------------------- the relay

    def relay_data_dir(self) -> Path:
        data_dir = self.tmp / "relay-data"
        data_dir.mkdir(exist_ok=True)
        return data_dir

    def start_relay(self, port: int = 0, *, data_dir: Path | None = None) -> RelayProcess:
        """``repowire relay start`` on 127.0.0.1 (embedded defaults); returns once it listens."""
        data_dir = data_dir if data_dir is not None else self.relay_data_dir()
        worker = self.spawn(
            "relay",
            [
                *("repowire", "relay", "start", "--host", HOST, "--port", str(port)),
                *("--data-dir", str(data_dir)),
                *("--metrics-listen", "off"),
            ],
        )

        def pick(line: str) -> int | None:
            match = _LISTENING.search(line)
            return int(match.group(1)) if match else None

        bound = worker.expect(pick, READY_TIMEOUT, "listening line")
        return RelayProcess(worker=worker, port=bound, data_dir=data_dir)

    def open_store(self, data_dir: Path | None = None) -> KeyStore:
        """The relay's key store (the same SQLite file the relay uses; WAL allows both)."""
        data_dir = data_dir if data_dir is not None else self.relay_data_dir()
        return KeyStore.open(data_dir / STORE_FILE)

    def credentials(self, count: int = 1, *, data_dir: Path | None = None) -> list[Credentials]:
        """``count`` new scopes, each with its key and a browser session cookie."""
        now = time.time()
        out: list[Credentials] = []
        with self.open_store(data_dir) as store:
            for index in range(count):
                record, key = store.create_scope(label=f"bench-{index}", now=now)
                session = store.create_session(record, now=now, ttl=24 * 3600)
                out.append(
                    Credentials(record=record, key=key, cookie=f"{SESSION_COOKIE}={session}")
                )
        return out

    def keys(self, count: int, *, data_dir: Path | None = None) -> list[str]:
        """``count`` new scopes, each with its key (no browser session)."""
        now = time.time()
        with self.open_store(data_dir) as store:
            return [store.create_scope(label=f"bench-{i}", now=now)[1] for i in range(count)]

    def keys_file(self, pairs: Sequence[tuple[str, str]]) -> Path:
        """A private file of ``[[daemon_id, key], ...]`` for a worker to read."""
        path = self.tmp / f"keys-{self._unique('k')}.json"
        return write_secret_file(path, json.dumps([list(pair) for pair in pairs]))

    # -------------------------------------------------------------------- workers

    def start_target(self) -> tuple[Worker, int]:
        """The bench's own tiny HTTP server (``/small``, ``/bytes``, ``/sink``)."""
        worker = self.spawn("target", ["bench.common", "target"])
        ready = worker.expect_event("ready")
        return worker, int(ready["port"])

    def start_daemon(
        self, relay: RelayProcess, credentials: Credentials, daemon_id: str
    ) -> DaemonProcess:
        """The real daemon and its connector in one process, linked to ``relay``."""
        keys = self.keys_file([(daemon_id, credentials.key)])
        worker = self.spawn(
            f"daemon-{daemon_id}",
            ["bench.common", "daemon", "--relay-url", relay.ws_url, "--keys", str(keys)],
            stdin=True,
        )
        ready = worker.expect_event("ready")
        return DaemonProcess(worker=worker, port=int(ready["port"]), daemon_id=daemon_id)

    def start_connectors(
        self,
        relay: RelayProcess,
        pairs: Sequence[tuple[str, str]],
        target_port: int,
        *,
        rate: float = 1000.0,
        name: str = "connectors",
        keepalive: float | None = None,
    ) -> Worker:
        """One process running a connector per ``(daemon_id, key)``, each piping its streams
        to ``target_port``; they start at ``rate`` per second. ``keepalive`` overrides the
        connectors' ping interval (None: the product's default). Waits until all are started
        (not connected: watch the relay's metrics or the worker's progress lines)."""
        keys = self.keys_file(pairs)
        extra = [] if keepalive is None else ["--keepalive", str(keepalive)]
        worker = self.spawn(
            name,
            [
                "bench.common",
                "connectors",
                "--relay-url",
                relay.ws_url,
                "--keys",
                str(keys),
                "--target-port",
                str(target_port),
                "--rate",
                str(rate),
                *extra,
            ],
        )
        worker.expect_event("started", READY_TIMEOUT + len(pairs) / rate)
        return worker


# ============================================================================ HTTP clients


def http_get(
    port: int, path: str, *, cookie: str | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """A blocking GET on 127.0.0.1; returns ``(status, body)``."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Cookie": cookie} if cookie else {}
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def relay_metric(relay: RelayProcess, name: str, timeout: float = 10.0) -> float:
    """The value of the unlabelled metric ``name`` in the relay's ``/metrics``."""
    status, body = http_get(relay.port, "/metrics", timeout=timeout)
    if status != 200:
        raise WorkerError(f"relay /metrics answered {status}")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise WorkerError(f"relay /metrics has no {name}")


def relay_daemons_connected(relay: RelayProcess, timeout: float = 10.0) -> int:
    """The relay's ``repowire_relay_daemons_connected`` gauge."""
    return int(relay_metric(relay, "repowire_relay_daemons_connected", timeout))


def wait_for_links(
    relay: RelayProcess,
    count: int,
    timeout: float,
    *,
    poll: float = 0.2,
    poll_timeout: float = 10.0,
    progress: list[tuple[float, int]] | None = None,
) -> float:
    """Poll the relay until ``count`` daemons are connected; return the monotonic time seen.

    A poll the relay does not answer within ``poll_timeout`` seconds (it is not listening yet,
    or too busy) is skipped. Each answered poll is appended to ``progress`` as
    ``(monotonic time, links)``. Raises :class:`WorkerError` (with the last count seen, and how
    many polls went unanswered) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    seen = 0
    unanswered = 0
    while True:
        try:
            seen = relay_daemons_connected(relay, timeout=poll_timeout)
        except (OSError, http.client.HTTPException):
            unanswered += 1
        else:
            if progress is not None:
                progress.append((time.monotonic(), seen))
        now = time.monotonic()
        if seen >= count:
            return now
        if now > deadline:
            raise WorkerError(
                f"{seen} of {count} daemons connected after {timeout:g} s "
                f"({unanswered} polls of the relay's /metrics unanswered)"
            )
        if not relay.worker.alive():
            raise WorkerError(f"the relay exited; see {relay.worker.log_path}")
        time.sleep(poll)


def request_head(
    method: str,
    path: str,
    *,
    cookie: str | None = None,
    length: int | None = None,
    close: bool = True,
    accept: str | None = None,
) -> bytes:
    """An HTTP/1.1 request head for the raw-socket clients of the benches."""
    lines = [f"{method} {path} HTTP/1.1", "Host: bench"]
    if accept is not None:
        lines.append(f"Accept: {accept}")
    if cookie is not None:
        lines.append(f"Cookie: {cookie}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_response_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    """``(status, headers)`` of a response head (without its blank line); headers lower-case.

    Raises :class:`WorkerError` for something that is not an HTTP/1.1 response head.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise WorkerError(f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


def read_response_head(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[bytes, bytes]]:
    """Read a response head from a blocking socket. What follows it is left in ``buffer``."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            return parse_response_head(head)
        if len(buffer) > TARGET_MAX_HEAD:
            raise WorkerError("response head too large")
        data = sock.recv(65536)
        if not data:
            raise WorkerError("connection closed before a full response head")
        buffer += data


# ============================================================================ wrk


@attrs.frozen(kw_only=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles and every kind of error it counted."""

    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    #: Connect, read, write and timeout errors plus non-2xx/3xx answers.
    errors: int


_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH-JSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"connect\\": %d, "
    .. "\\"read\\": %d, \\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d, "
    .. "\\"p50_us\\": %d, \\"p99_us\\": %d, \\"mean_us\\": %.1f}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def run_wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    workdir: Path,
    cookie: str | None = None,
    threads: int = 1,
    timeout: float = 10.0,
) -> WrkResult:
    """Run wrk against ``url`` and return its figures.

    The cookie (a secret) goes into a private Lua script, not onto wrk's command line. Raises
    :class:`WorkerError` if wrk is missing or fails.
    """
    path = shutil.which("wrk")
    if path is None:
        raise WorkerError("wrk is not installed (Debian: apt-get install wrk)")
    script = _WRK_DONE
    if cookie is not None:
        if not re.fullmatch(r"[A-Za-z0-9_=.-]+", cookie):
            raise ValueError("unexpected characters in the cookie")
        script = f'wrk.headers["Cookie"] = "{cookie}"\n' + script
    script_path = write_secret_file(workdir / "wrk-bench.lua", script)
    argv = [
        path,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout:g}s",
        "-s",
        str(script_path),
        url,
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=duration + timeout + 30
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH-JSON "):
            data = json.loads(line[len("BENCH-JSON ") :])
            seconds = data["duration_us"] / 1e6
            errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
            return WrkResult(
                requests=int(data["requests"]),
                seconds=seconds,
                requests_per_s=data["requests"] / seconds if seconds > 0 else math.nan,
                p50_ms=data["p50_us"] / 1000.0,
                p99_ms=data["p99_us"] / 1000.0,
                mean_ms=data["mean_us"] / 1000.0,
                errors=int(errors),
            )
    raise WorkerError(f"wrk failed (exit {done.returncode}): {done.stderr.strip()[:300]}")


# ============================================================================ worker: target


#: Largest request head the target server reads.
TARGET_MAX_HEAD = 64 * 1024
#: Bytes per send and per receive in the target server.
TARGET_CHUNK = 1024 * 1024
#: ``/bytes?n=-1`` streams this many bytes: endless for any bench.
ENDLESS = 1 << 50
#: The ``/small`` answer: a small JSON document, the size of the daemon's ``/health``.
SMALL_BODY = json.dumps(
    {"status": "ok", "daemon_id": "bench-target", "version": "0", "relay": {"state": "n/a"}}
).encode()


class _BadRequest(Exception):
    pass


def _response_head(status: str, length: int, *, close: bool, kind: bytes) -> bytes:
    connection = b"connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + kind + b"\r\n"
        b"content-length: " + str(length).encode() + b"\r\n" + connection + b"\r\n"
    )


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], dict[bytes, bytes]]:
    """``(method, path, query, headers)`` of a request head (without the blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest("malformed request line")
    target = parts[1].decode("latin-1")
    path, _, query_text = target.partition("?")
    query = dict(item.partition("=")[::2] for item in query_text.split("&") if item)
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise _BadRequest("malformed header line")
        headers[name.strip().lower()] = value.strip()
    return parts[0].decode("latin-1"), path, query, headers


async def _serve_target(stream: trio.SocketStream) -> None:
    """One connection of the target server: keep-alive requests until EOF or ``close``."""
    buffer = bytearray()
    chunk = bytes(TARGET_CHUNK)
    view = memoryview(chunk)
    try:
        while True:
            end = buffer.find(b"\r\n\r\n")
            while end < 0:
                if len(buffer) > TARGET_MAX_HEAD:
                    raise _BadRequest("request head too large")
                data = await stream.receive_some(TARGET_CHUNK)
                if not data:
                    return
                searched = max(0, len(buffer) - 3)
                buffer += data
                end = buffer.find(b"\r\n\r\n", searched)
            method, path, query, headers = _parse_head(bytes(buffer[:end]))
            del buffer[: end + 4]
            close = headers.get(b"connection", b"").lower() == b"close"
            if b"transfer-encoding" in headers:
                raise _BadRequest("chunked request bodies are not supported")
            length = int(headers.get(b"content-length", b"0"))
            if method == "GET" and path == "/small":
                await stream.send_all(
                    _response_head("200 OK", len(SMALL_BODY), close=close, kind=b"application/json")
                    + SMALL_BODY
                )
            elif method == "GET" and path == "/bytes":
                size = int(query.get("n", "0"))
                size = ENDLESS if size < 0 else size
                await stream.send_all(
                    _response_head("200 OK", size, close=close, kind=b"application/octet-stream")
                )
                while size > 0:
                    step = min(size, TARGET_CHUNK)
                    await stream.send_all(view[:step] if step < TARGET_CHUNK else chunk)
                    size -= step
            elif method == "POST" and path == "/sink":
                remaining = length
                taken = min(remaining, len(buffer))
                del buffer[:taken]
                remaining -= taken
                while remaining > 0:
                    data = await stream.receive_some(min(remaining, TARGET_CHUNK))
                    if not data:
                        return
                    remaining -= len(data)
                body = json.dumps({"received": length}).encode()
                await stream.send_all(
                    _response_head("200 OK", len(body), close=close, kind=b"application/json")
                    + body
                )
            else:
                body = b'{"error": "not_found"}'
                await stream.send_all(
                    _response_head("404 Not Found", len(body), close=True, kind=b"application/json")
                    + body
                )
                return
            if close:
                return
    except (_BadRequest, ValueError):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            body = b'{"error": "bad_request"}'
            await stream.send_all(
                _response_head("400 Bad Request", len(body), close=True, kind=b"application/json")
                + body
            )
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away mid-answer: ordinary for streaming benches
    finally:
        await trio.aclose_forcefully(stream)


async def target_main(args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, _serve_target, 0, host=HOST)
        )
        port = listeners[0].socket.getsockname()[1]
        emit({"event": "ready", "port": port})
        await _until_sigterm()
        nursery.cancel_scope.cancel()


# ============================================================================ worker: daemon


def emit(message: dict[str, Any]) -> None:
    """One JSON line on stdout, for the bench."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _until_sigterm() -> None:
    """Return at SIGTERM or SIGINT, so the worker ends normally (and cProfile can dump)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


def _read_keys(path: Path) -> list[tuple[str, str]]:
    pairs = json.loads(path.read_text())
    return [(str(daemon_id), str(key)) for daemon_id, key in pairs]


async def _commands() -> AsyncIterator[dict[str, Any]]:
    """JSON command lines from stdin (an async generator of dicts); ends at EOF."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = bytearray()
    async with stream:
        while True:
            newline = buffer.find(b"\n")
            if newline >= 0:
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                if line.strip():
                    yield json.loads(line)
                continue
            data = await stream.receive_some(4096)
            if not data:
                return
            buffer += data


async def _publish(state: Any, rate: float, count: int) -> dict[str, Any]:
    """Publish ``count`` ``message`` events at ``rate`` per second, on a fixed schedule (so a
    late wake-up is caught up, not carried over)."""
    start = trio.current_time()
    first = state.last_event_id + 1
    for index in range(count):
        await trio.sleep_until(start + index / rate)
        state.publish("message", {"seq": index, "text": "bench"})
    return {
        "event": "published",
        "count": count,
        "first_id": first,
        "last_id": state.last_event_id,
        "seconds": trio.current_time() - start,
    }


async def daemon_main(args: argparse.Namespace) -> None:
    """The daemon and its connector, built as ``repowire._serve.run_daemon`` builds them, with
    the daemon's state kept here so that events can be published on command."""
    from connector import LinkState
    from repowire import __version__
    from repowire._serve import build_connector
    from repowire.config import DaemonConfig, RelayConfig, Settings
    from repowire.daemon import DaemonState, create_app, serve_daemon
    from repowire.dashboard import STATIC_DIR

    [(daemon_id, key)] = _read_keys(args.keys)
    home = Path(os.environ.get("REPOWIRE_HOME", tempfile.gettempdir()))
    settings = Settings(
        home=home,
        config_path=home / "config.yaml",
        daemon=DaemonConfig(host=HOST, port=0, daemon_id=daemon_id),
        relay=RelayConfig(enabled=True, url=args.relay_url, api_key=key, ca_file=None),
    )
    connector = build_connector(settings)
    assert connector is not None
    state = DaemonState()
    app = create_app(
        daemon_id=daemon_id,
        version=__version__,
        state=state,
        mesh=connector,
        relay_status=lambda: connector.status().to_json(),
        dashboard_dir=STATIC_DIR,
    )
    async with trio.open_nursery() as nursery:
        address: tuple[str, int] = await nursery.start(
            lambda task_status: serve_daemon(app, host=HOST, port=0, task_status=task_status)
        )
        connector.config = attrs.evolve(connector.config, daemon_port=address[1])
        await nursery.start(connector.run)
        with trio.fail_after(READY_TIMEOUT):
            await connector.wait_state(LinkState.CONNECTED)
        emit({"event": "ready", "port": address[1]})

        async def serve_commands() -> None:
            async for command in _commands():
                if command.get("cmd") == "publish":
                    emit(await _publish(state, float(command["rate"]), int(command["count"])))
                else:
                    emit({"event": "error", "detail": f"unknown command {command.get('cmd')!r}"})

        nursery.start_soon(serve_commands)
        await _until_sigterm()
        nursery.cancel_scope.cancel()


# ============================================================================ worker: connectors


#: Seconds between progress lines of the ``connectors`` worker.
PROGRESS_INTERVAL = 1.0


async def connectors_main(args: argparse.Namespace) -> None:
    """Bare connectors (production defaults), each pointing its streams at ``target_port``."""
    from connector import Connector, ConnectorConfig, LinkState
    from mux import MuxConfig
    from relay._server import GC_THRESHOLDS

    raise_fd_limit()
    # Thousands of connectors in one process: the relay's collector thresholds (see
    # relay._server.GC_THRESHOLDS), or this process pauses for seconds in full collections
    # that no real daemon, with its single connector, ever has.
    gc.set_threshold(*GC_THRESHOLDS)
    pairs = _read_keys(args.keys)
    mux = MuxConfig() if args.keepalive is None else MuxConfig(keepalive_interval=args.keepalive)
    connectors = [
        Connector(
            ConnectorConfig(
                relay_url=args.relay_url,
                api_key=key,
                daemon_id=daemon_id,
                daemon_port=args.target_port,
                version="bench",
                mux=mux,
            )
        )
        for daemon_id, key in pairs
    ]
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        for index, connector in enumerate(connectors):
            await trio.sleep_until(start + index / args.rate)
            await nursery.start(connector.run)
        emit({"event": "started", "count": len(connectors)})

        async def progress() -> None:
            last = -1
            while True:
                statuses = [c.status() for c in connectors]
                connected = sum(1 for st in statuses if st.state is LinkState.CONNECTED)
                if connected != last:
                    # Why the others are not connected: their last errors (never secrets).
                    reasons = collections.Counter(
                        (st.last_error or st.state.value)[:120]
                        for st in statuses
                        if st.state is not LinkState.CONNECTED
                    )
                    emit(
                        {
                            "event": "progress",
                            "connected": connected,
                            "total": len(connectors),
                            "not_connected_because": dict(reasons.most_common(3)),
                        }
                    )
                    last = connected
                await trio.sleep(PROGRESS_INTERVAL)

        nursery.start_soon(progress)
        await _until_sigterm()
        nursery.cancel_scope.cancel()


# ============================================================================ worker entry


def worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.common", description="Processes started by the tunnel benchmarks."
    )
    roles = parser.add_subparsers(dest="role", required=True)
    roles.add_parser("target", help="the tiny HTTP server: /small, /bytes?n=N, POST /sink")
    daemon = roles.add_parser("daemon", help="the daemon and its connector")
    daemon.add_argument("--relay-url", required=True)
    daemon.add_argument("--keys", type=Path, required=True, help="[[daemon_id, key]] (private)")
    connectors = roles.add_parser("connectors", help="bare connectors pointing at one port")
    connectors.add_argument("--relay-url", required=True)
    connectors.add_argument("--keys", type=Path, required=True, help="[[daemon_id, key], ...]")
    connectors.add_argument("--target-port", type=int, required=True)
    connectors.add_argument("--rate", type=float, default=1000.0, help="connectors started/s")
    connectors.add_argument(
        "--keepalive",
        type=float,
        default=None,
        help="seconds between each connector's keepalive pings (default: the product's)",
    )
    args = parser.parse_args(argv)
    main_for_role: dict[str, Callable[[argparse.Namespace], Any]] = {
        "target": target_main,
        "daemon": daemon_main,
        "connectors": connectors_main,
    }
    # Worker logs (stderr, into the bench's log file) are warnings only: per-link INFO lines
    # would cost CPU at thousands of links and say nothing the bench needs.
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    trio.run(main_for_role[args.role], args)
    return 0


def connect_socket(port: int, timeout: float = 30.0) -> socket.socket:
    """A blocking TCP connection to 127.0.0.1:``port`` with TCP_NODELAY."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


if __name__ == "__main__":
    sys.exit(worker_main())
