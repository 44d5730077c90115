"""Helpers and fixtures for the browser tests: a relay and a daemon started as a user starts
them (``python -m repowire ...`` processes on loopback) and Debian's Chromium driven by
Playwright's sync API.

- :class:`Budget`: the overall time bound of one test. Every wait of a test (process output,
  HTTP calls, Playwright's ``timeout=`` arguments) takes its timeout from it, so no test can
  outlive it, and a spent budget fails the test.
- :class:`Process`: a child process with its output in files; stopped with SIGTERM, then
  SIGKILL after a bounded wait.
- :class:`Reaper`: stops processes in the background, so a test does not wait for the previous
  test's processes to exit.
- :func:`start_relay`: ``repowire relay start``, shared by a module's tests (each test's daemon
  has a scope, hence a user, of its own).
- :class:`Stack`: one user's ``repowire serve --relay`` (registering itself on its first run,
  or with a key from ``repowire relay keys create``), stoppable and startable again on the
  same port and home.
- :class:`Browsing`: browser contexts for one test; uncaught page errors fail the test.
- :func:`sign_in`: the relay's sign-in form, filled and submitted in the browser.
- fixtures ``budget``, ``stack``, ``first_run_stack``, ``browsing``, and per module
  ``relay_process``, ``browser`` (one Chromium) and ``reaper``.

Secrets: the API key and the session cookie are held in memory only. Nothing here prints them,
and checks that could fail on a secret report where it leaked, never the secret itself.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import h11
import pytest
import trio
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from repowire.config import load_settings
from tests.cli.cli_support import FULL_KEY
from tests.connector.connector_support import LOOPBACK, TERM_TIMEOUT, Cli, free_port
from tests.daemon.daemon_support import Address, HttpResponse, http_request
from tests.support.system import skip_missing

#: Debian's Chromium; Playwright never downloads a browser for these tests.
CHROMIUM: Final = Path("/usr/bin/chromium")
#: Flags for a quiet, sandbox-less headless Chromium (the tests run as root in CI).
CHROMIUM_ARGS: Final = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
#: Seconds Chromium gets to start.
BROWSER_LAUNCH_TIMEOUT: Final = 20.0
#: Overall bound of one test (fixture setup included), seconds.
TEST_BUDGET: Final = 30.0
#: Longest single Playwright wait unless a call asks for less, seconds (a backstop: calls pass
#: their own ``timeout=`` from the budget).
DEFAULT_WAIT: Final = 10.0
#: Seconds a process gets to print its first line, or a daemon to report its link up.
STARTUP_TIMEOUT: Final = 15.0
#: Seconds one HTTP exchange made by the test itself may take.
HTTP_TIMEOUT: Final = 5.0
#: Seconds between two polls of a process's output or of a daemon's /health.
POLL_INTERVAL: Final = 0.05
#: Largest part of a process's output read for assertions, bytes.
MAX_OUTPUT: Final = 1024 * 1024
#: Characters of a process's stderr quoted in a failure message.
STDERR_TAIL: Final = 2000
#: Desktop-sized viewport (the default for pages).
DESKTOP: Final[ViewportSize] = {"width": 1280, "height": 800}
#: Phone-sized viewport.
PHONE: Final[ViewportSize] = {"width": 360, "height": 740}
#: What the relay prints once it listens.
RELAY_LISTENING: Final = "repowire relay listening on http://"
#: Name of the relay's browser session cookie.
SESSION_COOKIE: Final = "repowire_session"


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


def _scrub(text: str) -> str:
    """``text`` with anything shaped like an API key masked, for failure messages."""
    return FULL_KEY.sub("rw_<masked>", text)


class Process:
    """A long-running ``python -m repowire ...``; stdout and stderr go to files (a full pipe
    would stall the child)."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: Path, stderr: Path) -> None:
        self.popen = popen
        self.stdout_path = stdout
        self.stderr_path = stderr

    @classmethod
    def start(cls, cli: Cli, name: str, *args: str) -> Process:
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

    def stdout(self) -> str:
        return _read_bounded(self.stdout_path)

    def stderr(self) -> str:
        return _read_bounded(self.stderr_path)

    def check_running(self, what: str) -> None:
        """Fail the test, quoting the end of stderr (keys masked), if the process exited."""
        code = self.popen.poll()
        if code is not None:
            tail = _scrub(self.stderr()[-STDERR_TAIL:])
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
    SIGTERM and SIGKILL after :data:`TERM_TIMEOUT` (:meth:`Process.terminate`); :meth:`join`
    waits for every one of them (a bounded wait)."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def stop(self, process: Process) -> None:
        thread = threading.Thread(target=process.terminate, name=f"stop {process.popen.pid}")
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads.clear()


def _read_bounded(path: Path) -> str:
    try:
        with path.open("rb") as file:
            return file.read(MAX_OUTPUT).decode(errors="replace")
    except FileNotFoundError:
        return ""


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
    """One HTTP/1.1 exchange (``tests.daemon.daemon_support.http_request``) from this
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
class RelayProcess:
    process: Process
    port: int
    data_dir: Path
    #: Runs ``repowire`` commands as the relay's operator (``relay keys ...``).
    cli: Cli

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    @property
    def address(self) -> Address:
        return (LOOPBACK, self.port)

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
        found = FULL_KEY.search(done.stdout.decode(errors="replace"))
        if done.returncode != 0 or found is None:
            stderr = _scrub(done.stderr.decode(errors="replace")[-STDERR_TAIL:])
            pytest.fail(f"relay keys create failed ({done.returncode}): {stderr}")
        return found.group(0)


def start_relay(root: Path, budget: Budget) -> RelayProcess:
    """``repowire relay start --port 0 --data-dir root/data``, as its operator would run it;
    returns once it prints where it listens."""
    root.mkdir(parents=True, exist_ok=True)
    cli = Cli(root / "home", root)
    data_dir = root / "data"
    process = Process.start(
        cli,
        "relay",
        "relay",
        "start",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        *("--metrics-listen", "off"),
    )
    line = process.wait_for_line(RELAY_LISTENING, budget)
    return RelayProcess(
        process=process, port=int(line.rsplit(":", 1)[1]), data_dir=data_dir, cli=cli
    )


@attrs.define(kw_only=True)
class DaemonProcess:
    process: Process
    port: int
    daemon_id: str
    api_key: str

    @property
    def address(self) -> Address:
        return (LOOPBACK, self.port)


class Stack:
    """One user's daemon, a process under ``root``, connected to the shared ``relay``.

    The daemon's home (``REPOWIRE_HOME``) starts empty. With ``api_key`` the daemon uses that
    key (given as ``REPOWIRE_API_KEY``, as for a key its user got from the relay's operator);
    without, its first run registers with the relay and stores the key in its config file.
    """

    def __init__(
        self, root: Path, budget: Budget, relay: RelayProcess, api_key: str | None = None
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
        self._daemon_processes: list[Process] = []

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
        process = Process.start(
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

    def wait_daemon_connected(self, process: Process) -> dict[str, Any]:
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


# -- the browser ---------------------------------------------------------------------------


class Browsing:
    """Browser contexts of one test. Each page records its uncaught script errors;
    :meth:`close` closes the contexts and fails the test if there were any."""

    def __init__(self, browser: Browser, budget: Budget) -> None:
        self.browser = browser
        self.budget = budget
        self.page_errors: list[str] = []
        self._contexts: list[BrowserContext] = []

    def new_page(self, viewport: ViewportSize = DESKTOP, *, mobile: bool = False) -> Page:
        """A page in a new context (its own cookies). ``mobile`` emulates a touch phone that
        honours the page's viewport meta tag."""
        context = self.browser.new_context(viewport=viewport, is_mobile=mobile, has_touch=mobile)
        self._contexts.append(context)
        context.set_default_timeout(DEFAULT_WAIT * 1000)
        context.set_default_navigation_timeout(DEFAULT_WAIT * 1000)
        page = context.new_page()
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        return page

    def close(self) -> None:
        for context in self._contexts:
            context.close()
        self._contexts.clear()
        assert not self.page_errors, f"uncaught errors in the page: {self.page_errors}"


def launch_browser() -> Iterator[Browser]:
    """Debian's Chromium under Playwright, closed on exit."""
    if not CHROMIUM.is_file():
        skip_missing(f"Chromium at {CHROMIUM}", "apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=list(CHROMIUM_ARGS),
            timeout=BROWSER_LAUNCH_TIMEOUT * 1000,
        )
        try:
            yield browser
        finally:
            browser.close()


def session_cookie(page: Page) -> dict[str, Any] | None:
    """The relay's session cookie as the browser holds it, or None."""
    for cookie in page.context.cookies():
        if cookie.get("name") == SESSION_COOKIE:
            return dict(cookie)
    return None


# -- the sign-in form ------------------------------------------------------------------------


def submit_key(page: Page, relay: RelayProcess, key: str, budget: Budget) -> None:
    """Open the relay's start page, paste ``key`` into the form and submit it; returns once
    the answer (or the page it redirects to) has loaded."""
    page.goto(f"{relay.url}/", timeout=budget.ms(DEFAULT_WAIT))
    page.fill("#api-key", key, timeout=budget.ms(DEFAULT_WAIT))
    with page.expect_navigation(timeout=budget.ms(DEFAULT_WAIT)):
        page.click('button[type="submit"]', timeout=budget.ms(DEFAULT_WAIT))
    page.wait_for_load_state(timeout=budget.ms(DEFAULT_WAIT))


def sign_in(page: Page, stack: Stack) -> None:
    """Sign in with the daemon's key through the form and wait until the dashboard shows the
    daemon online."""
    budget = stack.budget
    submit_key(page, stack.relay, stack.daemon.api_key, budget)
    expect(page).to_have_url(stack.dashboard_url, timeout=budget.ms(DEFAULT_WAIT))
    expect(page.locator("#daemon-state")).to_contain_text("Online", timeout=budget.ms(5))


def wait_live(page: Page, budget: Budget, mode: str = "server-sent events") -> None:
    """Wait until the dashboard's live feed is open in ``mode``."""
    expect(page.locator("#feed-state")).to_have_text(f"Live ({mode})", timeout=budget.ms(5))


# -- measuring in the page -------------------------------------------------------------------

#: Records, in ``window.__arrivals[text]``, the time (ms since the epoch, the page's clock) at
#: which an event whose body is ``text`` first appears in the event list.
WATCH_EVENT_JS: Final = """(text) => {
  window.__arrivals = window.__arrivals || {};
  const list = document.getElementById("events-list");
  const seen = () => [...list.querySelectorAll(".event__body")].some(
    (node) => node.textContent === text);
  const observer = new MutationObserver(() => {
    if (seen()) {
      window.__arrivals[text] = Date.now();
      observer.disconnect();
    }
  });
  observer.observe(list, { childList: true, subtree: true });
}"""


def watch_event(page: Page, text: str) -> None:
    page.evaluate(WATCH_EVENT_JS, text)


def event_arrival_ms(page: Page, text: str, budget: Budget, cap: float) -> float:
    """When (ms since the epoch) the watched event ``text`` appeared, waiting ``cap`` s."""
    page.wait_for_function(
        "(text) => window.__arrivals !== undefined && text in window.__arrivals",
        arg=text,
        timeout=budget.ms(cap),
    )
    arrived = page.evaluate("(text) => window.__arrivals[text]", text)
    assert isinstance(arrived, int | float)
    return float(arrived)


def wall_ms() -> float:
    """This machine's wall clock in ms (the page's ``Date.now()`` reads the same clock)."""
    return time.time() * 1000.0


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def budget() -> Budget:
    return Budget(TEST_BUDGET)


@pytest.fixture(scope="module")
def reaper() -> Iterator[Reaper]:
    """Stops the module's processes; waits for the last of them at the end of the module."""
    stopping = Reaper()
    try:
        yield stopping
    finally:
        stopping.join()


@pytest.fixture(scope="module")
def relay_process(
    tmp_path_factory: pytest.TempPathFactory, reaper: Reaper
) -> Iterator[RelayProcess]:
    """One relay for the module, as a process: each test's daemon has a scope of its own."""
    running = start_relay(tmp_path_factory.mktemp("relay"), Budget(STARTUP_TIMEOUT))
    try:
        yield running
    finally:
        reaper.stop(running.process)


@pytest.fixture
def stack(
    tmp_path: Path, budget: Budget, relay_process: RelayProcess, reaper: Reaper
) -> Iterator[Stack]:
    """A daemon process with a new key (issued by the relay's operator), connected to the
    module's relay; stopped after the test (by ``reaper``: the next test need not wait)."""
    key = relay_process.issue_key(tmp_path.name, budget)
    running = Stack(tmp_path / "daemon", budget, relay_process, api_key=key)
    try:
        running.start_daemon()
        yield running
    finally:
        running.close(reaper)


@pytest.fixture
def first_run_stack(
    tmp_path: Path, budget: Budget, relay_process: RelayProcess, reaper: Reaper
) -> Iterator[Stack]:
    """A daemon process on its first run: it registers with the module's relay by itself.
    (The relay allows a few registrations per address and hour: use it sparingly.)"""
    running = Stack(tmp_path / "daemon", budget, relay_process)
    try:
        running.start_daemon()
        yield running
    finally:
        running.close(reaper)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch_browser()


@pytest.fixture
def browsing(browser: Browser, budget: Budget) -> Iterator[Browsing]:
    session = Browsing(browser, budget)
    try:
        yield session
    finally:
        session.close()
