"""A phone opens a one-time sign-in link (the URL ``repowire relay login-link`` shows as a QR
code) in a real Chromium and lands on its daemon's dashboard, signed in, without ever typing
the API key; the link works once. Relay and daemon are processes started as a user starts
them. The screenshot goes to ``test-artifacts/``."""

from __future__ import annotations

from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Route, expect

from tests.support.blocking_processes import ProcessStack, http, json_object

from .e2e_support import (
    DEFAULT_WAIT,
    PHONE,
    Browsing,
    browser,
    browsing,
    budget,
    reaper,
    relay_process,
    session_cookie,
    stack,
)

pytestmark = pytest.mark.browser

#: Fixtures this module uses, imported from the support module (named here so the imports
#: count as used: pytest finds fixtures among a module's names).
FIXTURES: Final = (browser, browsing, budget, reaper, relay_process, stack)

#: Where screenshots are written (gitignored).
ARTIFACTS: Final = Path(__file__).resolve().parents[2] / "test-artifacts"

#: ``next`` values a hostile or broken redeem answer might carry: each must leave the page on
#: the relay's origin (the tab one passed the old string check; browsers strip tabs).
HOSTILE_NEXT: Final = (
    "/\t/evil.example/",
    "/\\evil.example/",
    "//evil.example/",
    "http://evil.example/dashboard/",
    "/\n/evil.example/dashboard/",
    "javascript:alert(1)",
)

#: What the sign-in page says when a link is used a second time.
GONE: Final = "This sign-in link has expired or was already used."


def _login_link(stack: ProcessStack) -> str:
    """A sign-in link for the stack's daemon, asked for as the CLI asks for it."""
    answer = http(
        stack.relay.address,
        "POST",
        "/api/v1/login-links",
        budget=stack.budget,
        json_body={"daemon_id": stack.daemon.daemon_id},
        headers=[("Authorization", f"Bearer {stack.daemon.api_key}")],
    )
    assert answer.status == 201, f"login-links: {answer.status} {answer.body[:200]!r}"
    url = json_object(answer)["url"]
    assert isinstance(url, str)
    return url


def test_a_phone_signs_in_with_a_one_time_link(stack: ProcessStack, browsing: Browsing) -> None:
    budget = stack.budget
    url = _login_link(stack)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == stack.relay.url
    assert parts.path == "/signin" and len(parts.fragment) == 43 and not parts.query

    phone = browsing.new_page(PHONE, mobile=True)
    phone.goto(url, timeout=budget.ms(DEFAULT_WAIT))
    expect(phone).to_have_url(stack.dashboard_url, timeout=budget.ms(DEFAULT_WAIT))
    expect(phone.locator("#daemon-state")).to_contain_text("Online", timeout=budget.ms(5))
    assert session_cookie(phone) is not None
    ARTIFACTS.mkdir(exist_ok=True)
    phone.screenshot(path=str(ARTIFACTS / "login-link-phone.png"), full_page=False)
    # The token left the address bar before the page went on: not in the history either.
    phone.go_back(timeout=budget.ms(DEFAULT_WAIT))
    assert parts.fragment not in phone.url

    # Once used, the same link only explains itself, on another phone too.
    other = browsing.new_page(PHONE, mobile=True)
    other.goto(url, timeout=budget.ms(DEFAULT_WAIT))
    failure = other.locator("#signin-failure")
    expect(failure).to_be_visible(timeout=budget.ms(DEFAULT_WAIT))
    expect(failure).to_contain_text(GONE)
    expect(failure).to_contain_text("repowire relay login-link")
    assert parts.fragment not in other.url
    assert session_cookie(other) is None
    other.screenshot(path=str(ARTIFACTS / "login-link-used.png"), full_page=False)
    stack.assert_not_printed({"the API key": stack.daemon.api_key, "the token": parts.fragment})


@pytest.mark.parametrize("hostile", HOSTILE_NEXT)
def test_a_hostile_next_never_leaves_the_relay(
    stack: ProcessStack, browsing: Browsing, hostile: str
) -> None:
    budget = stack.budget
    page = browsing.new_page(PHONE, mobile=True)
    off_site: list[str] = []

    def answer_redeem(route: Route) -> None:
        route.fulfill(status=200, content_type="application/json", json={"next": hostile})

    def record_off_site(route: Route) -> None:
        off_site.append(route.request.url)
        route.fulfill(status=200, content_type="text/html", body="<p>evil</p>")

    page.route("**/api/v1/login-links/redeem", answer_redeem)
    page.route("**://evil.example/**", record_off_site)
    page.goto(f"{stack.relay.url}/signin#{'A' * 43}", timeout=budget.ms(DEFAULT_WAIT))
    # The page falls back to the relay's root.
    expect(page).to_have_url(f"{stack.relay.url}/", timeout=budget.ms(DEFAULT_WAIT))
    assert off_site == []
