"""One-time sign-in links: ``POST /api/v1/login-links`` issues a token (in a URL fragment),
``GET /signin`` serves the page that redeems it, ``POST /api/v1/login-links/redeem`` trades it
once for a browser session."""

# The fixtures of test_web.py are imported, and so shadowed by the test arguments naming them.
# ruff: noqa: F811

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest

from relay._login_links import (
    ISSUE_BURST,
    LOGIN_LINK_TTL,
    MAX_LINKS_PER_SCOPE,
    LoginLinks,
    LoginLinksFull,
)
from relay._sqlite_store import SqliteStore
from relay._web import LOGIN_LINK_GONE_MESSAGE, PAGE_CSP
from tests.relay.test_web import (  # noqa: F401 (fixtures)
    ORIGIN,
    Answer,
    Web,
    clock,
    cookie_attributes,
    make_web,
    sample,
    session_from,
    store,
    web,
)

_URL = re.compile(r"^http://localhost/signin#([A-Za-z0-9_-]{43})$")


def sqlite_of(web: Web) -> SqliteStore:
    """The relay's store, which keeps the sign-in links of a relay on SQLite (in memory)."""
    store = web.relay.store
    assert isinstance(store, SqliteStore)
    return store


async def issue(web: Web, key: str, body: dict[str, object] | None = None, **kw: Any) -> Answer:
    return await web.request(
        "POST",
        "/api/v1/login-links",
        bearer=key,
        body=None if body is None else json.dumps(body).encode(),
        content_type=None if body is None else "application/json",
        **kw,
    )


async def issue_token(web: Web, key: str, daemon_id: str | None = "laptop") -> str:
    answer = await issue(web, key, None if daemon_id is None else {"daemon_id": daemon_id})
    assert answer.status == 201, answer.text
    match = _URL.match(answer.json()["url"])
    assert match is not None, answer.json()
    return match.group(1)


async def redeem(web: Web, token: object, **kw: Any) -> Answer:
    return await web.request(
        "POST",
        "/api/v1/login-links/redeem",
        body=json.dumps({"token": token}).encode(),
        content_type="application/json",
        origin=kw.pop("origin", ORIGIN),
        **kw,
    )


async def test_issue_answers_a_fragment_url_with_its_expiry(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    answer = await issue(web, key, {"daemon_id": "laptop"})
    assert answer.status == 201
    assert answer.header("cache-control") == "no-store"
    body = answer.json()
    assert set(body) == {"url", "expires_at", "expires_in"}
    assert _URL.match(body["url"])
    assert body["expires_in"] == LOGIN_LINK_TTL == 300
    assert body["expires_at"] == web.clock() + LOGIN_LINK_TTL
    # Two links are two different tokens.
    assert (await issue_token(web, key)) != (await issue_token(web, key))


async def test_issue_uses_the_public_url(make_web: Any) -> None:
    web = make_web(public_url="https://relay.example/")
    record, key = web.new_scope()
    web.connect(record, "laptop")
    answer = await issue(web, key)
    assert re.match(r"^https://relay\.example/signin#[A-Za-z0-9_-]{43}$", answer.json()["url"])


async def test_redeem_opens_a_session_once(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    token = await issue_token(web, key)
    answer = await redeem(web, token)
    assert answer.status == 200, answer.text
    assert answer.json() == {"next": "/d/laptop/dashboard/"}
    # The same cookie as /auth sets: HttpOnly, SameSite=Lax, Path=/, a live session.
    (line,) = answer.set_cookies
    assert {"path", "httponly", "samesite", "max-age"} <= cookie_attributes(line)
    assert "SameSite=Lax" in line and token not in line and key not in line
    session = await web.relay.store.lookup_session(session_from(answer), now=web.clock())
    assert session is not None and session.key_id == record.key_id
    # Works once.
    again = await redeem(web, token)
    assert again.status == 410
    assert again.json() == {"error": "link_gone", "detail": LOGIN_LINK_GONE_MESSAGE}
    assert again.set_cookies == []


async def test_without_a_daemon_id_the_link_lands_on_the_default_dashboard(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    token = await issue_token(web, key, daemon_id=None)
    assert (await redeem(web, token)).json() == {"next": "/dashboard/"}


@pytest.mark.parametrize("daemon_id", ["phone", "../x", 7, ""])
async def test_a_daemon_the_key_never_connected_is_404(web: Web, daemon_id: object) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    other, _ = web.new_scope("other")
    web.connect(other, "phone")
    answer = await issue(web, key, {"daemon_id": daemon_id})
    assert answer.status == 404
    assert answer.json()["error"] == "unknown_daemon"


async def test_a_link_expires(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    token = await issue_token(web, key)
    web.clock.now += LOGIN_LINK_TTL
    answer = await redeem(web, token)
    assert answer.status == 410 and answer.set_cookies == []
    # Just inside its lifetime it still works.
    fresh = await issue_token(web, key)
    web.clock.now += LOGIN_LINK_TTL - 1
    assert (await redeem(web, fresh)).status == 200


@pytest.mark.parametrize("how", ["revoked", "rotated"])
async def test_a_link_of_a_dead_key_never_signs_in(web: Web, how: str) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    token = await issue_token(web, key)
    if how == "revoked":
        assert await web.relay.store.revoke_key(record.key_id, now=web.clock())
    else:
        rotated = await web.request("POST", "/api/v1/keys/rotate", bearer=key)
        assert rotated.status == 200
    answer = await redeem(web, token)
    assert answer.status == 410 and answer.set_cookies == []


@pytest.mark.parametrize("token", ["", "short", "A" * 44, "!" * 43, 42, None])
async def test_a_malformed_token_is_400(web: Web, token: object) -> None:
    answer = await redeem(web, token)
    assert answer.status == 400
    assert answer.json()["detail"] == LOGIN_LINK_GONE_MESSAGE


async def test_redeem_from_another_site_is_refused(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    token = await issue_token(web, key)
    assert (await redeem(web, token, origin="https://evil.example")).status == 403
    # The refusal did not use the token up.
    assert (await redeem(web, token)).status == 200


async def test_failed_redemptions_are_rate_limited_per_address(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    token = await issue_token(web, key)
    for _ in range(10):
        assert (await redeem(web, "U" * 43)).status == 410
    limited = await redeem(web, "U" * 43)
    assert limited.status == 429 and int(limited.header("retry-after") or 0) >= 1
    assert sample(web, "repowire_relay_rate_limited_total", {"where": "login_link"}) == 1
    # A real token still works from the same address (guessing cannot lock a user out).
    assert (await redeem(web, token)).status == 200


async def test_issuing_needs_a_right_key_and_a_right_key_is_never_locked_out(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    wrong = "rw_" + "B" * 43
    for _ in range(10):
        assert (await issue(web, wrong)).status == 401
    assert (await issue(web, wrong)).status == 429
    assert (await issue(web, key)).status == 201
    # A browser cookie alone does not mint links.
    session = await web.login(key, origin=ORIGIN)
    answer = await web.request("POST", "/api/v1/login-links", cookie=session, origin=ORIGIN)
    assert answer.status == 401


async def test_the_signin_page_has_no_inline_script(web: Web) -> None:
    answer = await web.request("GET", "/signin")
    assert answer.status == 200
    assert answer.header("content-security-policy") == PAGE_CSP
    page = answer.text
    assert '<script src="/static/signin.js" defer></script>' in page
    assert re.search(r"<script(?![^>]*\bsrc=)", page) is None and "style=" not in page
    assert "repowire relay login-link" in page
    script = await web.request("GET", "/static/signin.js")
    assert script.status == 200 and script.content_type.startswith("text/javascript")
    assert "history.replaceState" in script.text and "/api/v1/login-links/redeem" in script.text


async def test_no_token_or_key_in_logs_or_answers(
    web: Web, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    record, key = web.new_scope()
    web.connect(record, "laptop")
    token = await issue_token(web, key)
    assert (await redeem(web, token)).status == 200
    assert (await redeem(web, token)).status == 410
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "sign-in link issued" in logged
    assert token not in logged and key not in logged
    for path, answer in web.answers:
        if path == "/api/v1/login-links":
            continue  # the token's one way out
        assert token not in answer.text and key not in answer.text


def test_the_table_is_bounded_per_scope_whatever_its_keys() -> None:
    links = LoginLinks(max_per_scope=MAX_LINKS_PER_SCOPE, max_total=20)
    first, _ = links.issue(key_id="key_a", scope_id="s", daemon_id=None, now=0.0)
    # Many keys of one scope (a key rotated over and over) share the scope's places.
    for index in range(MAX_LINKS_PER_SCOPE):
        links.issue(key_id=f"key_{index}", scope_id="s", daemon_id=None, now=1.0)
    assert len(links) == MAX_LINKS_PER_SCOPE
    assert links.redeem(first, now=2.0) is None  # the scope's oldest was dropped
    # Expired tokens are swept as time passes, and a dropped key loses its tokens.
    last, _ = links.issue(key_id="key_z", scope_id="s", daemon_id=None, now=LOGIN_LINK_TTL + 3.5)
    assert len(links) == 1
    assert links.drop_key("key_z") == 1 and links.redeem(last, now=LOGIN_LINK_TTL + 4) is None


def test_a_flood_from_other_scopes_never_evicts_a_pending_token() -> None:
    links = LoginLinks(max_per_scope=2, max_total=20)
    victim, _ = links.issue(key_id="key_v", scope_id="victim", daemon_id=None, now=0.0)
    refused = 0
    for index in range(200):
        try:
            links.issue(
                key_id=f"key_{index}", scope_id=f"flood_{index % 50}", daemon_id=None, now=1
            )
        except LoginLinksFull:
            refused += 1
    assert len(links) == 20 and refused > 0
    grant = links.redeem(victim, now=2.0)
    assert grant is not None and grant.scope_id == "victim"


def test_a_full_table_refuses_and_keeps_its_tokens_until_they_expire() -> None:
    links = LoginLinks(max_per_scope=MAX_LINKS_PER_SCOPE, max_total=3)
    held = [
        links.issue(key_id=f"k{index}", scope_id=f"s{index}", daemon_id=None, now=0.0)[0]
        for index in range(3)
    ]
    with pytest.raises(LoginLinksFull):
        links.issue(key_id="late", scope_id="late", daemon_id=None, now=1.0)
    assert len(links) == 3
    assert all(links.redeem(token, now=2.0) is not None for token in held[:2])
    # Expired entries are purged before "full" is judged.
    links.issue(key_id="late", scope_id="late", daemon_id=None, now=2.0)
    assert len(links) == 2
    links.issue(key_id="later", scope_id="later", daemon_id=None, now=LOGIN_LINK_TTL + 1)
    assert len(links) == 2  # held[2] expired and was swept


async def test_a_full_table_answers_503_busy_and_keeps_existing_tokens(web: Web) -> None:
    sqlite_of(web).login_links = LoginLinks(max_total=2)
    other, other_key = web.new_scope("other")
    web.connect(other, "laptop")
    kept = [await issue_token(web, other_key) for _ in range(2)]
    record, key = web.new_scope()
    web.connect(record, "laptop")
    answer = await issue(web, key, {"daemon_id": "laptop"})
    assert answer.status == 503
    body = answer.json()
    assert body["error"] == "busy" and "\n" not in body["detail"] and body["detail"]
    assert len(sqlite_of(web).login_links) == 2
    assert (await redeem(web, kept[0])).status == 200
    assert (await redeem(web, kept[1])).status == 200


@pytest.mark.parametrize("how", ["revoked", "rotated"])
async def test_ending_a_key_drops_its_tokens_at_once(web: Web, how: str) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    other, other_key = web.new_scope("other")
    web.connect(other, "laptop")
    for _ in range(3):
        await issue_token(web, key)
    kept = await issue_token(web, other_key)
    assert len(sqlite_of(web).login_links) == 4
    if how == "revoked":
        # As the relay's revocation watcher does (relay._server).
        assert await web.relay.store.revoke_key(record.key_id, now=web.clock())
        await web.relay.end_key_access(record.key_id, "revoked")
    else:
        rotated = await web.request("POST", "/api/v1/keys/rotate", bearer=key)
        assert rotated.status == 200
    assert len(sqlite_of(web).login_links) == 1
    assert (await redeem(web, kept)).status == 200


async def test_issuing_is_rate_limited_per_key(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    other, other_key = web.new_scope("other")
    web.connect(other, "laptop")
    for _ in range(ISSUE_BURST):
        await issue_token(web, key)
    limited = await issue(web, key, {"daemon_id": "laptop"})
    assert limited.status == 429 and limited.json()["error"] == "rate_limited"
    assert int(limited.header("retry-after") or 0) >= 1
    # Another key is not held back.
    await issue_token(web, other_key)
    # The bucket refills: 30 an hour is one every two minutes.
    web.clock.now += 120
    await issue_token(web, key)
