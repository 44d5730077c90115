"""Helpers and fixtures for the browser tests: a relay and a daemon started as a user starts
them (``python -m repowire ...`` processes on loopback, :mod:`tests.support.blocking_processes`)
and Debian's Chromium driven by Playwright's sync API.

- :class:`Browsing`: browser contexts for one test; uncaught page errors fail the test.
- :func:`sign_in`: the relay's sign-in form, filled and submitted in the browser.
- fixtures ``budget``, ``stack``, ``first_run_stack``, ``browsing``, and per module
  ``relay_process`` (``repowire relay start``, shared by a module's tests: each test's daemon
  has a scope, hence a user, of its own), ``browser`` (one Chromium) and ``reaper``.

Secrets: the API key and the session cookie are held in memory only. Nothing here prints them,
and checks that could fail on a secret report where it leaked, never the secret itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from tests.support.blocking_processes import (
    STARTUP_TIMEOUT,
    BlockingRelay,
    Budget,
    ProcessStack,
    Reaper,
    start_blocking_relay,
)
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
#: Desktop-sized viewport (the default for pages).
DESKTOP: Final[ViewportSize] = {"width": 1280, "height": 800}
#: Phone-sized viewport.
PHONE: Final[ViewportSize] = {"width": 360, "height": 740}
#: Name of the relay's browser session cookie.
SESSION_COOKIE: Final = "repowire_session"


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


def submit_key(page: Page, relay: BlockingRelay, key: str, budget: Budget) -> None:
    """Open the relay's start page, paste ``key`` into the form and submit it; returns once
    the answer (or the page it redirects to) has loaded."""
    page.goto(f"{relay.url}/", timeout=budget.ms(DEFAULT_WAIT))
    page.fill("#api-key", key, timeout=budget.ms(DEFAULT_WAIT))
    with page.expect_navigation(timeout=budget.ms(DEFAULT_WAIT)):
        page.click('button[type="submit"]', timeout=budget.ms(DEFAULT_WAIT))
    page.wait_for_load_state(timeout=budget.ms(DEFAULT_WAIT))


def sign_in(page: Page, stack: ProcessStack) -> None:
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
) -> Iterator[BlockingRelay]:
    """One relay for the module, as a process: each test's daemon has a scope of its own."""
    running = start_blocking_relay(tmp_path_factory.mktemp("relay"), Budget(STARTUP_TIMEOUT))
    try:
        yield running
    finally:
        reaper.stop(running.process)


@pytest.fixture
def stack(
    tmp_path: Path, budget: Budget, relay_process: BlockingRelay, reaper: Reaper
) -> Iterator[ProcessStack]:
    """A daemon process with a new key (issued by the relay's operator), connected to the
    module's relay; stopped after the test (by ``reaper``: the next test need not wait)."""
    key = relay_process.issue_key(tmp_path.name, budget)
    running = ProcessStack(tmp_path / "daemon", budget, relay_process, api_key=key)
    try:
        running.start_daemon()
        yield running
    finally:
        running.close(reaper)


@pytest.fixture
def first_run_stack(
    tmp_path: Path, budget: Budget, relay_process: BlockingRelay, reaper: Reaper
) -> Iterator[ProcessStack]:
    """A daemon process on its first run: it registers with the module's relay by itself.
    (The relay allows a few registrations per address and hour: use it sparingly.)"""
    running = ProcessStack(tmp_path / "daemon", budget, relay_process)
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
