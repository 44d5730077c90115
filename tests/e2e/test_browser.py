"""A real Chromium against a relay and a daemon started as a user starts them.

One ``repowire relay start`` serves the module; each test runs its own user's
``repowire serve --relay`` (with a key of its own) as a process on loopback, and drives the
relay's pages in the browser: signing in, the dashboard's live feed (SSE and WebSocket through
the tunnel), the send form, the daemon going away and coming back, signing out, key rotation,
and the layout on a phone and a desktop. Screenshots go to ``test-artifacts/``. Delays are
measured and printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import secrets
import statistics
import time
from pathlib import Path
from typing import Any, Final

import pytest
from playwright.sync_api import Page, expect

from tests.support.blocking_processes import Budget, ProcessStack, http, json_object
from tests.support.leaks import FULL_KEY

from .e2e_support import (
    DEFAULT_WAIT,
    DESKTOP,
    PHONE,
    Browsing,
    browser,
    browsing,
    budget,
    event_arrival_ms,
    first_run_stack,
    reaper,
    relay_process,
    session_cookie,
    sign_in,
    stack,
    submit_key,
    wait_live,
    wall_ms,
    watch_event,
)

pytestmark = pytest.mark.browser

#: Fixtures this module uses, imported from the support module (named here so the imports
#: count as used: pytest finds fixtures among a module's names).
FIXTURES: Final = (browser, browsing, budget, first_run_stack, reaper, relay_process, stack)

#: Where screenshots are written (gitignored).
ARTIFACTS: Final = Path(__file__).resolve().parents[2] / "test-artifacts"

#: What the sign-in form says about a wrong key.
BAD_KEY_ERROR: Final = "This API key is not valid: it is malformed, unknown or revoked."
#: Longest delay accepted between a message posted to the daemon and its line on the page.
LIVE_DELAY_LIMIT_MS: Final = 1000.0
#: Seconds within which the dashboard must say the daemon is offline after it was stopped.
OFFLINE_LIMIT: Final = 5.0
#: Seconds within which the dashboard must show the daemon online again once its link is up
#: (the page polls ../health every 5 s).
ONLINE_AGAIN_LIMIT: Final = 8.0
#: Seconds within which an open dashboard notices that its session ended.
SIGNED_OUT_LIMIT: Final = 8.0
#: Longest wait for something the page shows, seconds (at most what the budget has left).
WAIT: Final = 5.0

#: The sections of the dashboard, by the id of their heading.
SECTIONS: Final = ("connection-heading", "daemons-heading", "peers-heading", "events-heading")

#: A WebSocket round trip from the page: opens ``../ws`` (through the relay), sends a notify
#: and resolves with the result message, the message event pushed back for it, the URL used
#: and timings; rejects on error, close or after ``timeoutMs``.
WEBSOCKET_ROUND_TRIP_JS: Final = """async ({ to, text, sender, timeoutMs }) => {
  const url = new URL("../ws", location.href).href.replace(/^http/, "ws");
  const started = performance.now();
  const socket = new WebSocket(url);
  try {
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`no result within ${timeoutMs} ms`)), timeoutMs);
      let openedAt = null;
      let result = null;
      let event = null;
      const finish = () => {
        if (result === null || event === null) return;
        clearTimeout(timer);
        resolve({ url, result, event, openMs: openedAt - started,
                  roundTripMs: performance.now() - openedAt });
      };
      socket.addEventListener("open", () => {
        openedAt = performance.now();
        socket.send(JSON.stringify({ type: "notify", to, text, from: sender }));
      });
      socket.addEventListener("message", (message) => {
        const value = JSON.parse(message.data);
        if (value.type === "result") result = value;
        if (value.type === "event" && value.event.data.text === text) event = value.event;
        finish();
      });
      socket.addEventListener("error", () => {
        clearTimeout(timer);
        reject(new Error("WebSocket error"));
      });
      socket.addEventListener("close", (closed) => {
        clearTimeout(timer);
        reject(new Error(`WebSocket closed early: ${closed.code} ${closed.reason}`));
      });
    });
  } finally {
    socket.close();
  }
}"""

#: Everything inside a dashboard card that sticks out of the card, sideways.
OUTSIDE_CARDS_JS: Final = """() => {
  const out = [];
  for (const card of document.querySelectorAll(".card")) {
    const box = card.getBoundingClientRect();
    const name = card.querySelector("h2")?.textContent.trim() ?? "?";
    for (const node of card.querySelectorAll("*")) {
      const rect = node.getBoundingClientRect();
      if (rect.width === 0 || rect.height === 0) continue;
      if (rect.left < box.left - 0.5 || rect.right > box.right + 0.5) {
        out.push(`${name}: <${node.tagName.toLowerCase()} class="${node.className}">`
          + ` "${node.textContent.trim().slice(0, 40)}" spans ${Math.round(rect.left)}`
          + `-${Math.round(rect.right)} px, the card ${Math.round(box.left)}`
          + `-${Math.round(box.right)} px`);
      }
    }
  }
  return out;
}"""


#: ``fetch`` from the page (its cookies, its origin), given up after ``timeoutMs``: resolves
#: with the status and the JSON body (or null).
FETCH_JS: Final = """async ({ route, timeoutMs }) => {
  const response = await fetch(new URL(route, location.href), {
    credentials: "same-origin",
    cache: "no-store",
    signal: AbortSignal.timeout(timeoutMs),
  });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return { status: response.status, body };
}"""


def page_fetch(page: Page, route: str, budget: Budget) -> dict[str, Any]:
    """``GET route`` (relative to the page) from the page: ``{"status", "body"}``."""
    answer = page.evaluate(FETCH_JS, {"route": route, "timeoutMs": budget.ms(WAIT)})
    assert isinstance(answer, dict)
    return answer


def wrong_key() -> str:
    """A key of the right shape that no relay issued."""
    return "rw_" + secrets.token_urlsafe(32)


def screenshot(page: Page, name: str, budget: Budget) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=path, full_page=True, timeout=budget.ms(DEFAULT_WAIT))
    return path


def seed_dashboard(stack: ProcessStack) -> None:
    """Peers and messages of a plausible working day."""
    stack.register_peer("alice", {"repo": "repowire", "branch": "main"})
    stack.register_peer("reviewer-bot", {"repo": "repowire", "model": "small", "busy": False})
    stack.register_peer(
        "a-peer-with-a-rather-long-name-from-the-ci-farm", {"host": "ci-runner-17.example.net"}
    )
    stack.notify("alice", "Build 1432 passed on main.", "ci")
    stack.notify(
        "reviewer-bot",
        "Please review the tunnel changes:\n- flow control\n- go-away on shutdown",
        "alice",
    )
    stack.notify(
        "alice",
        "Logs: https://ci.example.net/runs/1432/artifacts/"
        "relay-tunnel-benchmark-results-with-a-very-long-unbroken-name.txt",
    )


# -- signing in ---------------------------------------------------------------------------


def test_sign_in_form_as_served(stack: ProcessStack, browsing: Browsing) -> None:
    """The relay's own forms exactly as served."""
    budget = stack.budget
    page = browsing.new_page()

    # Checked on the page as it loaded (no waiting): the form is a plain POST and redirect.
    submit_key(page, stack.relay, wrong_key(), budget)
    shown = page.inner_text("main", timeout=budget.ms(2))
    assert BAD_KEY_ERROR in shown, shown

    submit_key(page, stack.relay, stack.daemon.api_key, budget)
    assert page.url == stack.dashboard_url
    expect(page.locator("#daemon-state")).to_contain_text("Online", timeout=budget.ms(WAIT))

    # The start page of a signed-in browser offers to sign out; that form posts the same way.
    page.goto(f"{stack.relay.url}/", timeout=budget.ms(DEFAULT_WAIT))
    with page.expect_navigation(timeout=budget.ms(DEFAULT_WAIT)):
        page.click("form[action='/logout'] button", timeout=budget.ms(DEFAULT_WAIT))
    assert page.url == f"{stack.relay.url}/"
    assert session_cookie(page) is None


def test_wrong_key_shows_the_error_and_the_right_key_opens_the_dashboard(
    first_run_stack: ProcessStack, browsing: Browsing
) -> None:
    # A new user: the daemon registered itself on its first run and stored its key.
    stack = first_run_stack
    budget = stack.budget
    stack.register_peer("alice", {"repo": "repowire", "branch": "main"})
    page = browsing.new_page()

    # A wrong key: the form again, with the error beside the field; no session.
    submit_key(page, stack.relay, wrong_key(), budget)
    assert page.url == f"{stack.relay.url}/auth"
    expect(page.locator("#api-key-error")).to_have_text(BAD_KEY_ERROR, timeout=budget.ms(2))
    expect(page.locator("#api-key")).to_have_attribute(
        "aria-invalid", "true", timeout=budget.ms(WAIT)
    )
    assert session_cookie(page) is None

    # The daemon's key: the daemon's own dashboard, online, with its peers.
    submit_key(page, stack.relay, stack.daemon.api_key, budget)
    assert page.url == stack.dashboard_url
    daemon_id = stack.daemon.daemon_id
    expect(page.locator("#current-daemon")).to_have_text(
        f"Daemon {daemon_id}", timeout=budget.ms(WAIT)
    )
    expect(page.locator("#access-state")).to_have_text("Through the relay", timeout=budget.ms(WAIT))
    expect(page.locator("#daemon-state")).to_contain_text("Online", timeout=budget.ms(WAIT))
    expect(page.locator("#daemon-state")).to_contain_text(daemon_id, timeout=budget.ms(WAIT))
    expect(page.locator("#relay-state")).to_contain_text("Connected", timeout=budget.ms(WAIT))
    daemons = page.locator("#daemons-list > li")
    expect(daemons).to_have_count(1, timeout=budget.ms(WAIT))
    expect(daemons.first).to_contain_text(daemon_id, timeout=budget.ms(WAIT))
    expect(daemons.first.locator(".badge").first).to_have_text("Online", timeout=budget.ms(WAIT))
    peers = page.locator("#peers-list > li")
    expect(peers).to_have_count(1, timeout=budget.ms(WAIT))
    expect(peers.first.locator(".row__name")).to_have_text("alice", timeout=budget.ms(WAIT))
    expect(peers.first.locator(".row__meta")).to_have_text(
        "repo: repowire · branch: main", timeout=budget.ms(WAIT)
    )
    expect(page.locator("#peers-count")).to_have_text("(1)", timeout=budget.ms(WAIT))
    expect(page.locator("#logout-form")).to_be_visible(timeout=budget.ms(WAIT))

    # The cookie holds a session id, not the key, out of the page's scripts' reach.
    cookie = session_cookie(page)
    assert cookie is not None
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax" and cookie["path"] == "/"
    holds_key = stack.daemon.api_key in str(cookie.get("value"))
    assert not holds_key, "the session cookie holds the API key"
    assert page.evaluate("document.cookie") == ""


# -- the live feed through the tunnel -------------------------------------------------------


def test_a_message_posted_to_the_daemon_appears_within_a_second(
    stack: ProcessStack, browsing: Browsing
) -> None:
    budget = stack.budget
    stack.register_peer("alice")
    page = browsing.new_page()
    sign_in(page, stack)
    wait_live(page, budget)

    delays: list[float] = []
    for attempt in range(3):
        text = f"live probe {attempt}: {secrets.token_hex(4)}"
        watch_event(page, text)
        sent = wall_ms()
        stack.notify("alice", text, "ci")
        delays.append(event_arrival_ms(page, text, budget, cap=3) - sent)
    print(
        "message posted to the daemon -> line on the dashboard (SSE through the relay): "
        + ", ".join(f"{delay:.0f} ms" for delay in delays)
        + f" (median {statistics.median(delays):.0f} ms)"
    )
    assert max(delays) < LIVE_DELAY_LIMIT_MS, delays

    newest = page.locator("#events-list > li").first
    expect(newest.locator(".event__title")).to_have_text("ci → alice", timeout=budget.ms(WAIT))
    expect(newest.locator(".event__type")).to_have_text("message", timeout=budget.ms(WAIT))
    # The events came over the server-sent events stream, not from a fallback.
    wait_live(page, budget)


def test_websocket_round_trip_through_the_tunnel(stack: ProcessStack, browsing: Browsing) -> None:
    budget = stack.budget
    stack.register_peer("alice")
    page = browsing.new_page()
    sign_in(page, stack)

    text = f"over the websocket {secrets.token_hex(4)}"
    timeout_ms = budget.ms(WAIT)
    answer = page.evaluate(
        WEBSOCKET_ROUND_TRIP_JS,
        {"to": "alice", "text": text, "sender": "browser-ws", "timeoutMs": timeout_ms},
    )
    assert isinstance(answer, dict)
    print(
        f"WebSocket through the relay: opened in {answer['openMs']:.0f} ms, notify -> result "
        f"and event in {answer['roundTripMs']:.0f} ms"
    )
    assert answer["url"] == f"{stack.relay.ws_url}/d/{stack.daemon.daemon_id}/ws"
    result: dict[str, Any] = answer["result"]
    assert result["ok"] is True and result["status"] == 200 and result["delivered"] is True
    assert result["to"] == "alice" and result["daemon_id"] == stack.daemon.daemon_id
    event: dict[str, Any] = answer["event"]
    assert event["type"] == "message" and event["id"] == result["event_id"]
    assert event["data"] == {"from": "browser-ws", "to": "alice", "text": text}
    # Delivered for real: the daemon holds the message, and the dashboard shows it.
    assert {"from": "browser-ws", "to": "alice", "text": text} in stack.messages()
    expect(page.locator("#events-list")).to_contain_text(text, timeout=budget.ms(2))


# -- the send form ----------------------------------------------------------------------------


def test_the_send_form_delivers_and_names_the_precise_error(
    stack: ProcessStack, browsing: Browsing
) -> None:
    budget = stack.budget
    stack.register_peer("alice")
    page = browsing.new_page()
    sign_in(page, stack)
    expect(page.locator("#peers-list")).to_contain_text("alice", timeout=budget.ms(WAIT))
    to = page.locator("#notify-to")
    text = page.locator("#notify-text")
    result = page.locator("#notify-result")
    send = page.locator("#notify-send")

    def submit(target: str, body: str) -> None:
        to.fill(target, timeout=budget.ms(DEFAULT_WAIT))
        text.fill(body, timeout=budget.ms(DEFAULT_WAIT))
        send.click(timeout=budget.ms(DEFAULT_WAIT))

    # A malformed target is caught in the page, and the field says so.
    submit("a b", "never sent")
    expect(result).to_have_text(
        "Use a peer name, or peer@daemon, without spaces.", timeout=budget.ms(2)
    )
    expect(to).to_have_attribute("aria-invalid", "true", timeout=budget.ms(WAIT))

    # An unknown peer: the daemon's own error, and the text is kept for a retry.
    submit("bob", "for bob")
    expect(result).to_have_text(
        "Not sent: No peer named 'bob' is registered here. unknown_peer", timeout=budget.ms(WAIT)
    )
    expect(result).to_have_class("result result--error", timeout=budget.ms(WAIT))
    expect(text).to_have_value("for bob", timeout=budget.ms(WAIT))

    # A daemon that is not one of this key's.
    submit("bob@nowhere", "for bob elsewhere")
    expect(result.locator("code")).to_have_text("unknown_daemon", timeout=budget.ms(WAIT))
    expect(result).to_contain_text("nowhere", timeout=budget.ms(WAIT))
    expect(result).to_have_class("result result--error", timeout=budget.ms(WAIT))
    expect(text).to_have_value("for bob elsewhere", timeout=budget.ms(WAIT))
    assert stack.messages() == []

    # A good one: delivered, shown in the feed, the text cleared.
    page.fill("#notify-from", "phone", timeout=budget.ms(DEFAULT_WAIT))
    submit("alice", "sent from the dashboard")
    expect(result).to_have_text("Delivered to alice.", timeout=budget.ms(WAIT))
    expect(result).to_have_class("result result--ok", timeout=budget.ms(WAIT))
    expect(text).to_have_value("", timeout=budget.ms(WAIT))
    newest = page.locator("#events-list > li").first
    expect(newest.locator(".event__title")).to_have_text("phone → alice", timeout=budget.ms(2))
    expect(newest.locator(".event__body")).to_have_text(
        "sent from the dashboard", timeout=budget.ms(WAIT)
    )
    assert stack.messages() == [{"from": "phone", "to": "alice", "text": "sent from the dashboard"}]


# -- the daemon going away and coming back ---------------------------------------------------


def test_the_dashboard_follows_the_daemon_going_offline_and_coming_back(
    stack: ProcessStack, browsing: Browsing
) -> None:
    budget = stack.budget
    stack.register_peer("alice")
    stack.notify("alice", "before the restart")
    page = browsing.new_page()
    sign_in(page, stack)
    wait_live(page, budget)
    expect(page.locator("#events-list")).to_contain_text(
        "before the restart", timeout=budget.ms(WAIT)
    )

    stopped_at = time.monotonic()
    assert stack.stop_daemon() == 0
    exited = time.monotonic() - stopped_at
    expect(page.locator("#daemon-state")).to_have_text("Offline", timeout=budget.ms(10))
    offline = time.monotonic() - stopped_at
    print(f"daemon stopped: exited after {exited:.2f} s, dashboard offline after {offline:.2f} s")
    assert offline < OFFLINE_LIMIT
    expect(page.locator("#banner")).to_contain_text(
        f"Daemon {stack.daemon.daemon_id} is offline.", timeout=budget.ms(WAIT)
    )
    expect(page.locator("#daemons-list > li").first).to_contain_text(
        "Offline", timeout=budget.ms(WAIT)
    )
    # Tunneled calls answer at once with a reason, not a hang.
    answer = page_fetch(page, "../peers", budget)
    assert answer["status"] == 503 and answer["body"]["error"] == "daemon_offline", answer
    screenshot(page, "dashboard-offline-1280x800.png", budget)

    started_at = time.monotonic()
    stack.start_daemon()
    link_up = time.monotonic() - started_at
    expect(page.locator("#daemon-state")).to_contain_text("Online", timeout=budget.ms(10))
    online = time.monotonic() - started_at
    print(
        f"daemon started again: link up after {link_up:.2f} s, dashboard online after "
        f"{online:.2f} s"
    )
    assert online - link_up < ONLINE_AGAIN_LIMIT
    expect(page.locator("#banner")).to_be_empty(timeout=budget.ms(WAIT))
    wait_live(page, budget)
    # The new daemon's event log starts over; the page notices and starts over with it.
    expect(page.locator("#events-note")).to_have_text(
        "The daemon's event log started over; older events were cleared.", timeout=budget.ms(WAIT)
    )

    # Live again, end to end: a new peer and a new message show up by themselves.
    stack.register_peer("alice")
    expect(page.locator("#peers-list")).to_contain_text("alice", timeout=budget.ms(WAIT))
    watch_event(page, "after the restart")
    sent = wall_ms()
    stack.notify("alice", "after the restart")
    delay = event_arrival_ms(page, "after the restart", budget, cap=3) - sent
    print(f"after the restart: message on the dashboard in {delay:.0f} ms")
    assert delay < LIVE_DELAY_LIMIT_MS


# -- sessions ---------------------------------------------------------------------------------


def test_logout_ends_the_session(stack: ProcessStack, browsing: Browsing) -> None:
    budget = stack.budget
    page = browsing.new_page()
    sign_in(page, stack)
    cookie = session_cookie(page)
    assert cookie is not None
    session_id = str(cookie["value"])

    with page.expect_navigation(timeout=budget.ms(DEFAULT_WAIT)):
        page.click("#logout-form button", timeout=budget.ms(DEFAULT_WAIT))
    assert page.url == f"{stack.relay.url}/"
    expect(page.locator("#api-key")).to_be_visible(timeout=budget.ms(WAIT))
    assert session_cookie(page) is None

    # The dashboard's address now leads to the form.
    page.goto(stack.dashboard_url, timeout=budget.ms(DEFAULT_WAIT))
    assert page.url == f"{stack.relay.url}/"
    expect(page.locator("#api-key")).to_be_visible(timeout=budget.ms(WAIT))

    # The session is ended on the relay, not only forgotten by the browser.
    old_cookie = [("Cookie", f"repowire_session={session_id}")]
    for path in ("/api/v1/daemons", "/d/" + stack.daemon.daemon_id + "/peers"):
        answer = http(stack.relay.address, "GET", path, budget=budget, headers=old_cookie)
        assert answer.status == 401, (path, answer.status)
    stack.assert_not_printed({"the API key": stack.daemon.api_key, "the session id": session_id})


def test_rotating_the_key_ends_the_browser_session(stack: ProcessStack, browsing: Browsing) -> None:
    budget = stack.budget
    page = browsing.new_page()
    sign_in(page, stack)
    wait_live(page, budget)
    old_key = stack.daemon.api_key

    # Rotated from outside the browser, with the key itself.
    rotated_at = time.monotonic()
    rotation = http(
        stack.relay.address,
        "POST",
        "/api/v1/keys/rotate",
        budget=budget,
        headers=[("Authorization", f"Bearer {old_key}")],
    )
    assert rotation.status == 200, rotation.status
    new_key = str(json_object(rotation)["api_key"])
    is_new = new_key != old_key and FULL_KEY.fullmatch(new_key) is not None
    assert is_new, "the rotation did not answer with a new key"

    # The open dashboard notices by itself...
    expect(page.locator("#banner")).to_contain_text(
        "Your session has ended.", timeout=budget.ms(SIGNED_OUT_LIMIT)
    )
    noticed = time.monotonic() - rotated_at
    print(f"key rotated: the open dashboard says it is signed out after {noticed:.2f} s")
    expect(page.locator("#daemon-state")).to_contain_text("signed out", timeout=budget.ms(WAIT))
    # ...its next API calls are signed out...
    for route in ("../api/v1/daemons", "../health"):
        answer = page_fetch(page, route, budget)
        assert answer["status"] == 401 and answer["body"]["error"] == "unauthorized", answer
    # ...and so is the next navigation.
    page.goto(stack.dashboard_url, timeout=budget.ms(DEFAULT_WAIT))
    assert page.url == f"{stack.relay.url}/"
    expect(page.locator("#api-key")).to_be_visible(timeout=budget.ms(WAIT))

    # The old key no longer signs in.
    submit_key(page, stack.relay, old_key, budget)
    expect(page.locator("#api-key-error")).to_have_text(BAD_KEY_ERROR, timeout=budget.ms(2))
    stack.assert_not_printed({"the old API key": old_key, "the new API key": new_key})


# -- how it looks -----------------------------------------------------------------------------


def test_dashboard_on_a_phone_and_a_desktop(stack: ProcessStack, browsing: Browsing) -> None:
    budget = stack.budget
    seed_dashboard(stack)
    for viewport, mobile in ((PHONE, True), (DESKTOP, False)):
        size = f"{viewport['width']}x{viewport['height']}"
        page = browsing.new_page(viewport, mobile=mobile)
        if mobile:
            page.goto(f"{stack.relay.url}/", timeout=budget.ms(DEFAULT_WAIT))
            screenshot(page, f"sign-in-{size}.png", budget)
        sign_in(page, stack)
        wait_live(page, budget)
        expect(page.locator("#peers-list > li")).to_have_count(3, timeout=budget.ms(WAIT))
        expect(page.locator("#events-list > li")).to_have_count(6, timeout=budget.ms(WAIT))
        expect(page.locator("#daemons-list > li")).to_have_count(1, timeout=budget.ms(WAIT))
        for heading in SECTIONS:
            expect(page.locator(f"section[aria-labelledby='{heading}']")).to_be_visible(
                timeout=budget.ms(WAIT)
            )
        path = screenshot(page, f"dashboard-{size}.png", budget)
        assert path.stat().st_size > 0
        width = page.evaluate("document.documentElement.scrollWidth")
        print(f"{size}: page width {width} px, screenshot {path}")
        if mobile:
            assert width <= viewport["width"], f"horizontal overflow: {width} px"
        else:
            # Two columns: the events beside the connection card.
            connection = page.locator("section[aria-labelledby='connection-heading']")
            events = page.locator("section[aria-labelledby='events-heading']")
            left = connection.bounding_box(timeout=budget.ms(WAIT))
            right = events.bounding_box(timeout=budget.ms(WAIT))
            assert left is not None and right is not None
            assert right["x"] >= left["x"] + left["width"], (left, right)


def test_on_a_phone_nothing_sticks_out_of_its_card(stack: ProcessStack, browsing: Browsing) -> None:
    budget = stack.budget
    seed_dashboard(stack)
    page = browsing.new_page(PHONE, mobile=True)
    sign_in(page, stack)
    wait_live(page, budget)
    expect(page.locator("#events-list > li")).to_have_count(6, timeout=budget.ms(WAIT))
    expect(page.locator("#peers-list > li")).to_have_count(3, timeout=budget.ms(WAIT))
    outside = page.evaluate(OUTSIDE_CARDS_JS)
    assert outside == [], "\n".join(outside)
