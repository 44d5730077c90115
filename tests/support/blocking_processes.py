"""The relay and ``repowire serve`` as processes, for blocking tests (Playwright's sync API).

The same stack as :mod:`tests.support.processes`, without trio between the test and its
processes:

- :class:`Budget`: the overall time bound of one test. Every wait (process output, HTTP calls,
  Playwright's ``timeout=`` arguments) takes its timeout from it, so no test can outlive it,
  and a spent budget fails the test.
- :class:`BlockingProcess`: a child process with its output in files; stopped with SIGTERM,
  then SIGKILL after a bounded wait. :class:`Reaper` stops processes in the background, so a
  test does not wait for the previous test's processes to exit.
- :func:`start_blocking_relay` and :class:`BlockingRelay`: ``repowire relay start``, shared by
  a module's tests (each test's daemon has a scope, hence a user, of its own).
- :class:`ProcessStack`: one user's ``repowire serve --relay`` (registering itself on its first
  run, or with a key from ``repowire relay keys create``), stoppable and startable again on
  the same port and home.
- :func:`http`: one HTTP exchange from the blocking test, bounded by the budget.

Secrets: the API key is held in memory only. Nothing here prints it, and checks that could
fail on a secret report where it leaked, never the secret itself.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import h11
import pytest
import trio

from repowire.config import load_settings

from .clients import Address, HttpResponse, http_request
from .leaks import FULL_KEY, mask_keys, printed_key
from .listener import LoopbackUrls
from .processes import (
    LOOPBACK,
    RELAY_LISTENING,
    STDERR_TAIL,
    TERM_TIMEOUT,
    Cli,
    ProcessOutput,
    free_port,
    listening_port,
    relay_start_args,
)

#: Seconds a process gets to print its first line, or a daemon to report its link up.
STARTUP_TIMEOUT: Final = 15.0
#: Seconds one HTTP exchange made by the test itself may take.
HTTP_TIMEOUT: Final = 5.0
#: Seconds between two polls of a process's output or of a daemon's /health.
POLL_INTERVAL: Final = 0.05


# -- the time bound of a test --------------------------------------------------------------


class Budget:
    """The overall time bound of one test.

    :meth:`seconds` and :meth:`ms` give a wait's timeout: ``cap``, or what is left of the
    budget if that is less. Once the budget is spent they fail the test (``pytest.fail``).
    """

    def __init__(self, total: float) -> None:
        self.total = total
        self._deadline = time.monotonic() + total

    def left(self) -> float:
        return self._deadline - time.monotonic()

    def seconds(self, cap: float) -> float:
        left = self.left()
        if left <= 0:
            pytest.fail(f"the test's time budget of {self.total:g} s is spent")
        return min(cap, left)

    def ms(self, cap: float) -> float:
        """:meth:`seconds` in milliseconds, for Playwright's ``timeout=`` arguments."""
        return self.seconds(cap) * 1000.0


# -- child processes -----------------------------------------------------------------------


class BlockingProcess(ProcessOutput):
    """A long-running ``python -m repowire ...``; stdout and stderr go to files (a full pipe
    would stall the child)."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: Path, stderr: Path) -> None:
        super().__init__(stdout, stderr)
        self.popen = popen

    @classmethod
    def start(cls, cli: Cli, name: str, *args: str) -> BlockingProcess:
        """Start ``repowire args...`` as ``cli`` runs it; output in ``workdir/name.*``
        (appended, so a restarted process keeps its earlier output)."""
        stdout = cli.workdir / f"{name}.stdout"
        stderr = cli.workdir / f"{name}.stderr"
        with stdout.open("ab") as out, stderr.open("ab") as err:
            popen = subprocess.Popen(
                cli.argv(*args),
                env=cli.env,
                cwd=cli.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        return cls(popen, stdout, stderr)

    def check_running(self, what: str) -> None:
        """Fail the test, quoting the end of stderr (keys masked), if the process exited."""
        code = self.popen.poll()
        if code is not None:
            tail = self.stderr_tail()
            pytest.fail(f"{what} exited with status {code}; stderr ends with:\n{tail}")

    def wait_for_line(self, prefix: str, budget: Budget, *, cap: float = STARTUP_TIMEOUT) -> str:
        """The first stdout line starting with ``prefix``; fails the test if the process
        exits first or ``cap`` seconds (at most the budget) pass."""
        deadline = time.monotonic() + budget.seconds(cap)
        while True:
            for line in self.stdout().splitlines():
                if line.startswith(prefix):
                    return line
            self.check_running(f"the process waited on for {prefix!r}")
            if time.monotonic() >= deadline:
                pytest.fail(f"no line starting with {prefix!r} within {cap:g} s")
            time.sleep(POLL_INTERVAL)

    def terminate(self, timeout: float = TERM_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds; returns the
        exit status. Safe to call on a process that already exited."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


class Reaper:
    """Stops processes without waiting for them: each :meth:`stop` starts a thread that sends
    SIGTERM and SIGKILL after :data:`TERM_TIMEOUT` (:meth:`BlockingProcess.terminate`);
    :meth:`join` waits for every one of them (a bounded wait)."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def stop(self, process: BlockingProcess) -> None:
        thread = threading.Thread(target=process.terminate, name=f"stop {process.popen.pid}")
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads.clear()


# -- HTTP from the test itself ---------------------------------------------------------------


def http(
    address: Address,
    method: str,
    path: str,
    *,
    budget: Budget,
    json_body: object = None,
    headers: Sequence[tuple[str, str]] = (),
    cap: float = HTTP_TIMEOUT,
) -> HttpResponse:
    """One HTTP/1.1 exchange (:func:`tests.support.clients.http_request`) from this
    synchronous test, bounded by ``cap`` seconds and the budget (trio.TooSlowError)."""
    timeout = budget.seconds(cap)

    async def exchange() -> HttpResponse:
        with trio.fail_after(timeout):
            return await http_request(address, method, path, json_body=json_body, headers=headers)

    return trio.run(exchange)


def _link_up(health: HttpResponse) -> bool:
    relay = json_object(health).get("relay")
    return isinstance(relay, dict) and relay.get("state") == "connected"


def json_object(response: HttpResponse) -> dict[str, Any]:
    document = response.json()
    assert isinstance(document, dict), f"not a JSON object: {response.body[:200]!r}"
    return document


# -- the relay and the daemon as processes -------------------------------------------------


@attrs.define(kw_only=True)
class BlockingRelay(LoopbackUrls):
    """``repowire relay start`` as its operator runs it (see :func:`start_blocking_relay`)."""

    process: BlockingProcess
    port: int
    data_dir: Path
    #: Runs ``repowire`` commands as the relay's operator (``relay keys ...``).
    cli: Cli

    def issue_key(self, label: str, budget: Budget) -> str:
        """A key in a new scope, from ``repowire relay keys create`` on the relay's store."""
        argv = self.cli.argv("relay", "keys", "create", "--data-dir", str(self.data_dir))
        done = subprocess.run(
            [*argv, "--label", label],
            env=self.cli.env,
            cwd=self.cli.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=budget.seconds(STARTUP_TIMEOUT),
            check=False,
        )
        key = printed_key(done.stdout.decode(errors="replace"))
        if done.returncode != 0 or key is None:
            stderr = mask_keys(done.stderr.decode(errors="replace")[-STDERR_TAIL:])
            pytest.fail(f"relay keys create failed ({done.returncode}): {stderr}")
        return key


def start_blocking_relay(root: Path, budget: Budget) -> BlockingRelay:
    """``repowire relay start --port 0 --data-dir root/data``, as its operator would run it;
    returns once it prints where it listens."""
    root.mkdir(parents=True, exist_ok=True)
    cli = Cli(root / "home", root)
    data_dir = root / "data"
    process = BlockingProcess.start(cli, "relay", *relay_start_args(data_dir))
    line = process.wait_for_line(RELAY_LISTENING, budget)
    return BlockingRelay(process=process, port=listening_port(line), data_dir=data_dir, cli=cli)


@attrs.define(kw_only=True)
class DaemonProcess:
    process: BlockingProcess
    port: int
    daemon_id: str
    api_key: str

    @property
    def address(self) -> Address:
        return (LOOPBACK, self.port)


class ProcessStack:
    """One user's daemon, a process under ``root``, connected to the shared ``relay``.

    The daemon's home (``REPOWIRE_HOME``) starts empty. With ``api_key`` the daemon uses that
    key (given as ``REPOWIRE_API_KEY``, as for a key its user got from the relay's operator);
    without, its first run registers with the relay and stores the key in its config file.
    """

    def __init__(
        self, root: Path, budget: Budget, relay: BlockingRelay, api_key: str | None = None
    ) -> None:
        self.root = root
        self.budget = budget
        self.relay = relay
        root.mkdir(parents=True, exist_ok=True)
        self.daemon_cli = Cli(root / "home", root)
        if api_key is not None:
            self.daemon_cli.env["REPOWIRE_API_KEY"] = api_key
        self.daemon_port = free_port()
        self._daemon: DaemonProcess | None = None
        self._daemon_processes: list[BlockingProcess] = []

    @property
    def daemon(self) -> DaemonProcess:
        assert self._daemon is not None, "the daemon was never started"
        return self._daemon

    @property
    def dashboard_url(self) -> str:
        return f"{self.relay.url}/d/{self.daemon.daemon_id}/dashboard/"

    def start_daemon(self) -> DaemonProcess:
        """``repowire serve --relay --relay-url ... --port P``; returns once the daemon's
        ``/health`` reports its relay link connected."""
        process = BlockingProcess.start(
            self.daemon_cli,
            "serve",
            "serve",
            "--relay",
            "--relay-url",
            self.relay.ws_url,
            "--port",
            str(self.daemon_port),
        )
        self._daemon_processes.append(process)
        health = self.wait_daemon_connected(process)
        settings = load_settings(self.daemon_cli.home, environ=self.daemon_cli.env)
        assert settings.relay.api_key is not None, "the daemon has no API key"
        assert health["daemon_id"] == settings.daemon.daemon_id
        self._daemon = DaemonProcess(
            process=process,
            port=self.daemon_port,
            daemon_id=settings.daemon.daemon_id,
            api_key=settings.relay.api_key,
        )
        return self._daemon

    def wait_daemon_connected(self, process: BlockingProcess) -> dict[str, Any]:
        """The daemon's ``/health`` once it reports the relay link connected."""
        deadline = time.monotonic() + self.budget.seconds(STARTUP_TIMEOUT)
        address = (LOOPBACK, self.daemon_port)
        while True:
            process.check_running("repowire serve")
            try:
                health = http(address, "GET", "/health", budget=self.budget, cap=1.0)
            except (OSError, trio.TooSlowError, h11.ProtocolError):
                health = None
            if health is not None and health.status == 200 and _link_up(health):
                return json_object(health)
            if time.monotonic() >= deadline:
                pytest.fail(f"the daemon's relay link was not up within {STARTUP_TIMEOUT:g} s")
            time.sleep(POLL_INTERVAL)

    def stop_daemon(self) -> int:
        """SIGTERM the daemon (SIGKILL after a bounded wait); returns its exit status."""
        return self.daemon.process.terminate()

    # -- the daemon's own API, called directly (not through the relay) ----------------------

    def daemon_call(self, method: str, path: str, json_body: object = None) -> HttpResponse:
        return http(self.daemon.address, method, path, budget=self.budget, json_body=json_body)

    def register_peer(self, name: str, meta: Mapping[str, object] | None = None) -> None:
        body: dict[str, object] = {"name": name}
        if meta is not None:
            body["meta"] = dict(meta)
        answer = self.daemon_call("POST", "/peers", body)
        assert answer.status in (200, 201), f"POST /peers: {answer.status} {answer.body!r}"

    def notify(self, to: str, text: str, sender: str | None = None) -> dict[str, Any]:
        body: dict[str, object] = {"to": to, "text": text}
        if sender is not None:
            body["from"] = sender
        answer = self.daemon_call("POST", "/notify", body)
        assert answer.status == 200, f"POST /notify: {answer.status} {answer.body!r}"
        return json_object(answer)

    def messages(self) -> list[dict[str, Any]]:
        """The ``data`` of every ``message`` event the daemon holds, oldest first."""
        events = json_object(self.daemon_call("GET", "/events?after=0&limit=1000"))["events"]
        return [event["data"] for event in events if event["type"] == "message"]

    # -- checks and teardown ------------------------------------------------------------------

    def outputs(self) -> dict[str, str]:
        """Everything the processes printed, by file name."""
        processes = [self.relay.process, *self._daemon_processes]
        texts: dict[str, str] = {}
        for process in processes:
            texts[process.stdout_path.name] = process.stdout()
            texts[process.stderr_path.name] = process.stderr()
        return texts

    def assert_not_printed(self, secrets: Mapping[str, str]) -> None:
        """No output of the relay or the daemon holds any of ``secrets`` (by what they are,
        e.g. ``{"the API key": key}``) or anything shaped like a whole key. A failure names
        the secret and the file, never the secret's value."""
        for file_name, text in self.outputs().items():
            for what, secret in secrets.items():
                leaked = secret in text
                assert not leaked, f"{what} was printed in {file_name}"
            shaped = FULL_KEY.search(text) is not None
            assert not shaped, f"something shaped like an API key was printed in {file_name}"

    def close(self, reaper: Reaper) -> None:
        """Stop the daemon processes this stack started, through ``reaper``."""
        for process in self._daemon_processes:
            reaper.stop(process)
