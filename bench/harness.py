"""What a bench runs on: the relay, daemons, connectors, the target and the ceiling forwarders
as child processes on 127.0.0.1, keys and browser sessions minted, and cleanup.

:class:`Bench` is a context manager: it owns a temporary directory (logs, key files, the
relay's data, TLS material) and every process it started, and stops them all on exit. The relay
is the real ``repowire relay start`` (embedded defaults, its ``/metrics`` on a listener of its
own, which :func:`relay_metric` and :func:`wait_for_links` poll); the other processes are
``python -m bench.workers <role>`` (see :mod:`bench.workers`).

Secrets (API keys, session ids) reach workers only through files readable by the owner alone,
never through a command line or a log line.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from bench.processes import READY_TIMEOUT, Worker, WorkerError, write_secret_file
from bench.report import PROFILE_DIR
from bench.tls import TlsFiles, make_tls_files
from relay import SESSION_COOKIE, KeyRecord, KeyStore

#: Loopback only: nothing here listens on or dials another address.
HOST = "127.0.0.1"
#: The relay's key store file inside its data directory (as ``relay._server.STORE_FILE``).
STORE_FILE = "relay.sqlite3"

_LISTENING = re.compile(r"repowire relay listening on https?://[^\s:]+:(\d+)")
_METRICS = re.compile(r"metrics served on http://[^\s:]+:(\d+)/metrics")


@attrs.define(kw_only=True)
class RelayProcess:
    """A relay started by :meth:`Bench.start_relay`; ``tls`` set when it serves HTTPS."""

    worker: Worker
    port: int
    metrics_port: int
    data_dir: Path
    tls: TlsFiles | None = None

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{HOST}:{self.port}"

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


@attrs.define(kw_only=True)
class Ceiling:
    """Two forwarders in series, started by :meth:`Bench.start_ceiling`: a client dials
    ``port`` (``first``, TLS there when ``tls``), ``first`` dials ``second``, ``second``
    dials the destination."""

    first: Worker
    second: Worker
    port: int
    tls: bool

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"


@attrs.frozen(kw_only=True)
class Credentials:
    """A scope's key and a browser session cookie value for it (both secrets)."""

    record: KeyRecord
    key: str = attrs.field(repr=False)
    cookie: str = attrs.field(repr=False)


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
        self._tls: TlsFiles | None = None
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

    def tls_files(self) -> TlsFiles:
        """This bench's CA and certificate for 127.0.0.1, made on first use."""
        if self._tls is None:
            self._tls = make_tls_files(self.tmp / "tls")
        return self._tls

    # -- the relay and its key store ------------------------------------------------------

    def relay_data_dir(self) -> Path:
        data_dir = self.tmp / "relay-data"
        data_dir.mkdir(exist_ok=True)
        return data_dir

    def start_relay(
        self, port: int = 0, *, data_dir: Path | None = None, tls: TlsFiles | None = None
    ) -> RelayProcess:
        """``repowire relay start`` on 127.0.0.1 (embedded defaults; HTTPS with ``tls``),
        ``/metrics`` on a port of its own; returns once both listen."""
        data_dir = data_dir if data_dir is not None else self.relay_data_dir()
        tls_args = [] if tls is None else ["--certfile", str(tls.cert), "--keyfile", str(tls.key)]
        worker = self.spawn(
            "relay",
            [
                *("repowire", "relay", "start", "--host", HOST, "--port", str(port)),
                *("--data-dir", str(data_dir)),
                *("--metrics-listen", f"{HOST}:0"),
                *tls_args,
            ],
        )

        def port_in(pattern: re.Pattern[str]) -> int:
            def pick(line: str) -> int | None:
                match = pattern.search(line)
                return int(match.group(1)) if match else None

            return worker.expect(pick, READY_TIMEOUT, f"line matching {pattern.pattern!r}")

        bound = port_in(_LISTENING)
        metrics = port_in(_METRICS)
        return RelayProcess(
            worker=worker, port=bound, metrics_port=metrics, data_dir=data_dir, tls=tls
        )

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

    # -- workers --------------------------------------------------------------------------

    def start_target(self) -> tuple[Worker, int]:
        """The bench's own tiny HTTP server (``/small``, ``/bytes``, ``/sink``)."""
        worker = self.spawn("target", ["bench.workers", "target"])
        ready = worker.expect_event("ready")
        return worker, int(ready["port"])

    def start_daemon(
        self, relay: RelayProcess, credentials: Credentials, daemon_id: str
    ) -> DaemonProcess:
        """The real daemon and its connector in one process, linked to ``relay`` (over
        ``wss://``, trusting the relay's CA, when the relay serves TLS)."""
        keys = self.keys_file([(daemon_id, credentials.key)])
        worker = self.spawn(
            f"daemon-{daemon_id}",
            [
                *("bench.workers", "daemon", "--relay-url", relay.ws_url, "--keys", str(keys)),
                *_ca_args(relay),
            ],
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
                *("bench.workers", "connectors", "--relay-url", relay.ws_url),
                *("--keys", str(keys), "--target-port", str(target_port), "--rate", str(rate)),
                *_ca_args(relay),
                *extra,
            ],
        )
        worker.expect_event("started", READY_TIMEOUT + len(pairs) / rate)
        return worker

    def start_ceiling(self, to_port: int, *, tls: TlsFiles | None = None) -> Ceiling:
        """Two forwarders in series, each in its own process, in front of ``to_port``; the
        first terminates TLS when ``tls`` is given."""
        second = self.spawn(
            "forwarder-2", ["bench.workers", "forwarder", "--to-port", str(to_port)]
        )
        second_port = int(second.expect_event("ready")["port"])
        tls_args = [] if tls is None else ["--certfile", str(tls.cert), "--keyfile", str(tls.key)]
        first = self.spawn(
            "forwarder-1",
            ["bench.workers", "forwarder", "--to-port", str(second_port), *tls_args],
        )
        port = int(first.expect_event("ready")["port"])
        return Ceiling(first=first, second=second, port=port, tls=tls is not None)


def _ca_args(relay: RelayProcess) -> list[str]:
    return [] if relay.tls is None else ["--ca-file", str(relay.tls.ca)]


# -- the relay's metrics -----------------------------------------------------------------


def http_get(
    port: int, path: str, *, cookie: str | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """A blocking GET on 127.0.0.1 (for polling from outside an event loop); returns
    ``(status, body)``."""
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
    status, body = http_get(relay.metrics_port, "/metrics", timeout=timeout)
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
