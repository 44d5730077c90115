"""The relay's own web routes: sign-in form, logout, dashboard files, health, metrics, API."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from functools import partial
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, cast

import attrs
import h11
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart.testing import QuartClient
from quart_trio import QuartTrio

import repowire.dashboard
from common import HTTP_ERROR_CODES
from mux import MuxSession
from protocol import CloseCode
from relay import MEMORY, KeyRecord, KeyStore
from relay._context import SESSION_COOKIE, Relay
from relay._links import DaemonLink
from relay._settings import RelaySettings
from relay._sqlite_store import SqliteStore
from relay._web import (
    DASHBOARD_CSP,
    MAX_BODY_SIZE,
    NO_DAEMON_MESSAGE,
    NO_DASHBOARD_MESSAGE,
    PAGE_CSP,
    create_web_app,
)
from tests.support.clients import http_request
from tests.support.relays import running_relay
from tests.support.stack import start_connected_daemon

START = 1_700_000_000.0
ORIGIN = "http://localhost"  # the test client sends Host: localhost
DEFAULT_CLIENT = ("127.0.0.1", 50000)
TRAVERSAL_TIMEOUT = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@attrs.define
class FakeSession:
    """Stands in for a daemon link's MuxSession: an RTT and a recorded close."""

    rtt: float | None = 0.0125
    closed: list[tuple[int, str]] = attrs.Factory(list)

    async def aclose(self, code: int = 1000, reason: str = "closed") -> None:
        self.closed.append((code, reason))


@attrs.frozen(kw_only=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    set_cookies: list[str]
    text: str

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.text
        return json.loads(self.text)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


class Web:
    """A relay with an in-memory store and the web app, driven through Quart's test client."""

    def __init__(self, relay: Relay, clock: FakeClock) -> None:
        self.relay = relay
        self.clock = clock
        self.app: QuartTrio = create_web_app(relay)
        #: Every answer seen, for the "no secret leaks" checks.
        self.answers: list[tuple[str, Answer]] = []

    async def request(
        self,
        method: str,
        path: str,
        *,
        cookie: str | None = None,
        origin: str | None = None,
        bearer: str | None = None,
        daemon_id: str | None = None,
        client: tuple[str, int] = DEFAULT_CLIENT,
        scheme: str = "http",
        form: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent: dict[str, str] = dict(headers or {})
        if cookie is not None:
            sent["Cookie"] = f"{SESSION_COOKIE}={cookie}"
        if origin is not None:
            sent["Origin"] = origin
        if bearer is not None:
            sent["Authorization"] = f"Bearer {bearer}"
        if content_type is not None:
            sent["Content-Type"] = content_type
        scope_base: dict[str, object] = {"client": client}
        if daemon_id is not None:
            scope_base["repowire.daemon_id"] = daemon_id
        # QuartClient: the protocol type Quart declares lacks the defaults of open().
        client_ = cast(QuartClient, self.app.test_client(use_cookies=False))
        response = await client_.open(
            path,
            method=method,
            headers=sent,
            form=form,
            data=body,
            scheme=scheme,
            scope_base=scope_base,
        )
        answer = Answer(
            status=response.status_code,
            headers={name.lower(): value for name, value in response.headers.items()},
            set_cookies=response.headers.getlist("Set-Cookie"),
            text=await response.get_data(as_text=True),
        )
        self.answers.append((path, answer))
        return answer

    @property
    def keys(self) -> KeyStore:
        """The relay's SQLite key store itself, for synchronous set-up (the relay's store,
        :class:`SqliteStore`, is a view of it)."""
        store = self.relay.store
        assert isinstance(store, SqliteStore)
        return store.key_store

    def new_scope(self, label: str = "test") -> tuple[KeyRecord, str]:
        return self.keys.create_scope(label=label, now=self.clock())

    def connect(
        self, record: KeyRecord, daemon_id: str, *, connected_at: float | None = None
    ) -> FakeSession:
        fake = FakeSession()
        link = DaemonLink(
            daemon_id=daemon_id,
            scope_id=record.scope_id,
            key_id=record.key_id,
            session=cast(MuxSession, fake),
            connected_at=self.clock() if connected_at is None else connected_at,
            version="0.1.0",
            remote_address="127.0.0.1",
        )
        self.relay.links.add(link)
        self.keys.record_daemon(record.scope_id, daemon_id, now=self.clock())
        return fake

    async def login(self, key: str, **kwargs: Any) -> str:
        answer = await self.request("POST", "/auth", form={"api_key": key}, **kwargs)
        assert answer.status == 303, answer.text
        return session_from(answer)


def session_from(answer: Answer) -> str:
    (line,) = answer.set_cookies
    jar: SimpleCookie = SimpleCookie()
    jar.load(line)
    return jar[SESSION_COOKIE].value


def disconnect(web: Web, record: KeyRecord, daemon_id: str) -> None:
    link = web.relay.links.get(record.scope_id, daemon_id)
    assert link is not None
    web.relay.links.remove(link)


def sample(web: Web, name: str, labels: dict[str, str] | None = None) -> float:
    value = web.relay.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)


def cookie_attributes(line: str) -> set[str]:
    return {part.strip().split("=", 1)[0].lower() for part in line.split(";")[1:]}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> Iterator[KeyStore]:
    store = KeyStore.open(MEMORY)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def make_web(tmp_path: Path, store: KeyStore, clock: FakeClock) -> Any:
    def make(**settings: Any) -> Web:
        # The bundled dashboard unless a test names another (or None, for none).
        settings.setdefault("dashboard_dir", repowire.dashboard.static_dir())
        relay = Relay(RelaySettings(data_dir=tmp_path, **settings), store, clock=clock)
        return Web(relay, clock)

    return make


@pytest.fixture
def web(make_web: Any) -> Web:
    return cast(Web, make_web())


def assert_page_headers(answer: Answer) -> None:
    assert answer.header("content-security-policy") == PAGE_CSP
    assert answer.header("x-content-type-options") == "nosniff"
    assert answer.header("referrer-policy") == "same-origin"


# -- the sign-in form ----------------------------------------------------------------------


async def test_landing_page_shows_the_form_with_safe_headers(web: Web) -> None:
    answer = await web.request("GET", "/")
    assert answer.status == 200
    assert answer.content_type.startswith("text/html")
    assert_page_headers(answer)
    assert answer.header("cache-control") == "no-store"
    page = answer.text
    assert re.search(r'<input[^>]*name="api_key"[^>]*type="password"', page, re.S) or re.search(
        r'<input[^>]*type="password"[^>]*name="api_key"', page, re.S
    )
    assert 'autocomplete="off"' in page
    assert '<label for="api-key">' in page
    assert 'action="/auth"' in page and 'method="post"' in page
    # One external script (the key's show/hide toggle), nothing inline: the CSP allows 'self'.
    assert re.findall(r"<script\b[^>]*>", page) == ['<script type="module" src="/static/relay.js">']
    assert re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.S) == [""]
    assert "style=" not in page and "<style" not in page


async def test_sign_in_sets_a_session_cookie_and_redirects(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    answer = await web.request("POST", "/auth", form={"api_key": key}, origin=ORIGIN)
    assert answer.status == 303
    assert answer.header("location") == "/dashboard/"
    assert_page_headers(answer)
    (line,) = answer.set_cookies
    attributes = cookie_attributes(line)
    assert {"path", "httponly", "samesite"} <= attributes
    assert "secure" not in attributes
    assert "SameSite=Lax" in line and "Path=/" in line
    session_id = session_from(answer)
    assert session_id != key and key not in line
    # The cookie is a live session of the key's scope.
    session = await web.relay.store.lookup_session(session_id, now=web.clock())
    assert session is not None and session.scope_id == record.scope_id
    # And the start page now links to the dashboard instead of asking again.
    landing = await web.request("GET", "/", cookie=session_id)
    assert 'href="/dashboard/"' in landing.text
    assert 'name="api_key"' not in landing.text
    assert 'action="/logout"' in landing.text


async def test_the_api_key_field_is_trimmed(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    answer = await web.request("POST", "/auth", form={"api_key": f"  {key}\n"})
    assert answer.status == 303


@pytest.mark.parametrize(
    ("scheme", "public_url", "secure"),
    [
        ("https", None, True),
        ("http", "https://relay.example", True),
        ("http", "http://relay.example", False),
    ],
)
async def test_the_cookie_is_secure_behind_tls(
    make_web: Any, scheme: str, public_url: str | None, secure: bool
) -> None:
    web: Web = make_web(public_url=public_url)
    record, key = web.new_scope()
    web.connect(record, "laptop")
    answer = await web.request("POST", "/auth", form={"api_key": key}, scheme=scheme)
    assert answer.status == 303
    (line,) = answer.set_cookies
    assert ("secure" in cookie_attributes(line)) is secure


async def test_a_new_sign_in_ends_the_previous_session(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    first = await web.login(key)
    second = await web.login(key, cookie=first)
    assert await web.relay.store.lookup_session(first, now=web.clock()) is None
    assert await web.relay.store.lookup_session(second, now=web.clock()) is not None


async def test_missing_key_is_a_400_with_the_form(web: Web) -> None:
    for form in ({}, {"api_key": ""}, {"api_key": "   "}):
        answer = await web.request("POST", "/auth", form=form)
        assert answer.status == 400
        assert "Enter your API key." in answer.text
        assert 'name="api_key"' in answer.text
        assert answer.set_cookies == []


async def test_bad_keys_are_401_without_echo(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    revoked_record, revoked = web.new_scope()
    await web.relay.store.revoke_key(revoked_record.key_id, now=web.clock())
    unknown = "rw_" + "A" * 43
    malformed = "not-a-key-<script>alert(1)</script>"
    for wrong in (unknown, malformed, revoked, key + "x"):
        answer = await web.request("POST", "/auth", form={"api_key": wrong})
        assert answer.status == 401
        assert "This API key is not valid" in answer.text
        assert wrong not in answer.text
        assert "<script>alert" not in answer.text
        assert 'value=""' in answer.text  # the field comes back empty
        assert answer.set_cookies == []
    failures = sample(web, "repowire_relay_auth_failures_total", {"where": "auth"})
    assert failures == 4


async def test_valid_key_without_a_daemon_is_409(web: Web) -> None:
    _, key = web.new_scope()
    answer = await web.request("POST", "/auth", form={"api_key": key})
    assert answer.status == 409
    assert NO_DAEMON_MESSAGE.replace("'", "&#39;") in answer.text
    assert key not in answer.text
    assert answer.set_cookies == []


async def test_another_scopes_daemon_does_not_count(web: Web) -> None:
    other, _ = web.new_scope()
    web.connect(other, "theirs")
    _, key = web.new_scope()
    answer = await web.request("POST", "/auth", form={"api_key": key})
    assert answer.status == 409


async def test_sign_in_is_rate_limited_per_address(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    wrong = "rw_" + "B" * 43
    for _ in range(10):
        answer = await web.request("POST", "/auth", form={"api_key": wrong})
        assert answer.status == 401
    limited = await web.request("POST", "/auth", form={"api_key": wrong})
    assert limited.status == 429
    retry_after = limited.header("retry-after")
    assert retry_after is not None and int(retry_after) >= 1
    assert "Too many attempts" in limited.text and 'name="api_key"' in limited.text
    assert sample(web, "repowire_relay_rate_limited_total", {"where": "auth"}) == 1
    # The right key is never locked out by guessing from the same address (a shared NAT).
    assert (await web.request("POST", "/auth", form={"api_key": key})).status == 303
    # Another address is not affected.
    other = await web.request("POST", "/auth", form={"api_key": wrong}, client=("10.0.0.9", 1))
    assert other.status == 401
    # Once the wait is over, the address may guess again.
    assert (await web.request("POST", "/auth", form={"api_key": wrong})).status == 429
    web.clock.now += int(retry_after)
    assert (await web.request("POST", "/auth", form={"api_key": wrong})).status == 401


async def test_successful_sign_ins_are_not_charged(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    for _ in range(15):
        assert (await web.request("POST", "/auth", form={"api_key": key})).status == 303


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost.evil"])
async def test_sign_in_from_another_origin_is_refused(web: Web, origin: str) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    answer = await web.request("POST", "/auth", form={"api_key": key}, origin=origin)
    assert answer.status == 403
    assert answer.set_cookies == []
    assert key not in answer.text
    assert_page_headers(answer)


async def test_origin_must_match_the_public_url_when_set(make_web: Any) -> None:
    web: Web = make_web(public_url="https://relay.example")
    record, key = web.new_scope()
    web.connect(record, "laptop")
    refused = await web.request("POST", "/auth", form={"api_key": key}, origin=ORIGIN)
    assert refused.status == 403
    allowed = await web.request(
        "POST", "/auth", form={"api_key": key}, origin="https://relay.example"
    )
    assert allowed.status == 303


async def test_oversized_form_is_413(web: Web) -> None:
    answer = await web.request("POST", "/auth", form={"api_key": "x" * (MAX_BODY_SIZE + 10)})
    assert answer.status == 413
    assert "Traceback" not in answer.text


async def test_http_errors_of_the_api_carry_the_shared_codes(web: Web) -> None:
    # The relay and the daemon name a plain HTTP error alike (common.HTTP_ERROR_CODES).
    big = await web.request(
        "POST",
        "/api/v1/register",
        origin=ORIGIN,
        body=b"{" + b" " * (MAX_BODY_SIZE + 10) + b"}",
        content_type="application/json",
    )
    assert big.status == 413
    assert big.json()["error"] == HTTP_ERROR_CODES[413] == "payload_too_large"
    wrong = await web.request("GET", "/api/v1/register")
    assert wrong.status == 405
    assert wrong.json()["error"] == HTTP_ERROR_CODES[405] == "method_not_allowed"


async def test_the_forms_stylesheet(web: Web) -> None:
    answer = await web.request("GET", "/static/relay.css")
    assert answer.status == 200
    assert answer.content_type.startswith("text/css")
    assert "body" in answer.text
    for path in ("/static/../_web.py", "/static/%2e%2e/_web.py", "/static/nope.css"):
        missing = await web.request("GET", path)
        assert missing.status == 404, path
        assert "import" not in missing.text


# -- logout --------------------------------------------------------------------------------


@pytest.mark.parametrize("daemon_id", [None, "laptop"])
async def test_logout_ends_the_session(web: Web, daemon_id: str | None) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    session_id = await web.login(key)
    answer = await web.request(
        "POST", "/logout", cookie=session_id, origin=ORIGIN, daemon_id=daemon_id
    )
    assert answer.status == 303
    assert answer.header("location") == "/"
    (line,) = answer.set_cookies
    assert line.startswith(f"{SESSION_COOKIE}=;") and "Max-Age=0" in line
    assert session_id not in line
    assert await web.relay.store.lookup_session(session_id, now=web.clock()) is None
    after = await web.request("GET", "/dashboard/", cookie=session_id)
    assert after.status == 303 and after.header("location") == "/"


async def test_logout_from_another_origin_is_refused(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    session_id = await web.login(key)
    answer = await web.request("POST", "/logout", cookie=session_id, origin="https://evil.example")
    assert answer.status == 403
    assert answer.set_cookies == []
    assert await web.relay.store.lookup_session(session_id, now=web.clock()) is not None


async def test_logout_without_a_session_still_clears_the_cookie(web: Web) -> None:
    answer = await web.request("POST", "/logout", cookie="garbage")
    assert answer.status == 303
    assert len(answer.set_cookies) == 1


# -- dashboard -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("daemon_id", "target"), [(None, "/dashboard/"), ("pc", "/d/pc/dashboard/")]
)
async def test_dashboard_without_slash_redirects(
    web: Web, daemon_id: str | None, target: str
) -> None:
    answer = await web.request("GET", "/dashboard", daemon_id=daemon_id)
    assert answer.status == 308
    assert answer.header("location") == target


async def test_dashboard_needs_a_session(web: Web) -> None:
    page = await web.request("GET", "/dashboard/")
    assert page.status == 303 and page.header("location") == "/"
    under = await web.request("GET", "/dashboard/", daemon_id="laptop")
    assert under.status == 303 and under.header("location") == "/"
    named = await web.request("GET", "/dashboard/index.html", cookie="x" * 43)
    assert named.status == 303
    asset = await web.request("GET", "/dashboard/app.js")
    assert asset.status == 401
    assert asset.json()["error"] == "unauthorized"


async def test_root_dashboard_redirects_to_the_default_daemon(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "older", connected_at=START - 100)
    session_id = await web.login(key)
    web.connect(record, "newer", connected_at=START)
    answer = await web.request("GET", "/dashboard/", cookie=session_id)
    assert answer.status == 303
    assert answer.header("location") == "/d/older/dashboard/"


async def test_root_dashboard_without_daemon_serves_the_page(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    session_id = await web.login(key)
    disconnect(web, record, "laptop")
    answer = await web.request("GET", "/dashboard/", cookie=session_id)
    assert answer.status == 200
    expected = (repowire.dashboard.STATIC_DIR / "index.html").read_text("utf-8")
    assert answer.text == expected
    assert answer.header("cache-control") == "no-cache"
    assert answer.header("content-security-policy") == DASHBOARD_CSP
    assert answer.header("x-content-type-options") == "nosniff"
    assert answer.content_type.startswith("text/html")


async def test_dashboard_under_a_daemon_serves_whatever_its_state(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    session_id = await web.login(key)
    disconnect(web, record, "laptop")
    for daemon_id in ("laptop", "never-seen"):
        index = await web.request("GET", "/dashboard/", cookie=session_id, daemon_id=daemon_id)
        assert index.status == 200 and "<html" in index.text
        assert index.header("content-security-policy") == DASHBOARD_CSP
    types = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}
    for name, content_type in types.items():
        answer = await web.request(
            "GET", f"/dashboard/{name}", cookie=session_id, daemon_id="laptop"
        )
        assert answer.status == 200, name
        assert answer.content_type.startswith(content_type)
        assert answer.text == (repowire.dashboard.STATIC_DIR / name).read_text("utf-8")
        assert answer.header("content-security-policy") == DASHBOARD_CSP


async def test_dashboard_files_revalidate_by_etag(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    session_id = await web.login(key)
    first = await web.request("GET", "/dashboard/app.js", cookie=session_id, daemon_id="laptop")
    etag = first.header("etag")
    assert etag is not None
    again = await web.request(
        "GET",
        "/dashboard/app.js",
        cookie=session_id,
        daemon_id="laptop",
        headers={"If-None-Match": etag},
    )
    assert again.status == 304 and again.text == ""


async def test_dashboard_dir_setting_and_missing_index(make_web: Any, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "index.html").write_text("<!doctype html><title>custom</title>", "utf-8")
    web: Web = make_web(dashboard_dir=export)
    record, key = web.new_scope()
    web.connect(record, "laptop")
    session_id = await web.login(key)
    answer = await web.request("GET", "/dashboard/", cookie=session_id, daemon_id="laptop")
    assert answer.text == "<!doctype html><title>custom</title>"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"index\.html"):
        make_web(dashboard_dir=empty)


async def test_without_dashboard_dir_the_dashboard_is_404_and_sign_in_works(
    make_web: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="repowire.relay"):
        web: Web = make_web(dashboard_dir=None)
    said = [r.getMessage() for r in caplog.records if NO_DASHBOARD_MESSAGE in r.getMessage()]
    assert len(said) == 1, caplog.text
    record, key = web.new_scope()
    web.connect(record, "laptop")
    # Signing in still opens a session (and lands on /dashboard/, which then says why).
    session_id = await web.login(key, origin=ORIGIN)
    assert await web.relay.store.lookup_session(session_id, now=web.clock()) is not None
    for path, daemon_id in [
        ("/dashboard/", None),
        ("/dashboard/", "laptop"),
        ("/dashboard", None),
        ("/dashboard/index.html", "laptop"),
        ("/dashboard/app.js", None),
    ]:
        for cookie in (session_id, None):
            answer = await web.request("GET", path, cookie=cookie, daemon_id=daemon_id)
            where = (path, daemon_id, cookie is not None)
            assert answer.status == 404, where
            assert answer.content_type.startswith("text/plain"), where
            assert answer.text == NO_DASHBOARD_MESSAGE + "\n", where
            assert answer.header("x-content-type-options") == "nosniff", where
    # The session works for the API too.
    daemons = await web.request("GET", "/api/v1/daemons", cookie=session_id)
    assert daemons.status == 200 and daemons.json()["current"] == "laptop"


async def test_a_served_relay_without_dashboard_dir_says_so_and_signs_in(tmp_path: Path) -> None:
    daemon_files = tmp_path / "daemon-dashboard"
    daemon_files.mkdir()
    with trio.fail_after(20):
        async with running_relay(tmp_path / "relay", dashboard_dir=None) as stack:
            relay = stack.relay
            _, key = await relay.new_scope()
            await start_connected_daemon(stack.links, relay, key, "laptop", daemon_files)
            origin = f"http://127.0.0.1:{relay.address[1]}"
            signed_in = await http_request(
                relay.address,
                "POST",
                "/auth",
                headers=[("Origin", origin), ("Content-Type", "application/x-www-form-urlencoded")],
                body=f"api_key={key}".encode(),
            )
            assert signed_in.status == 303, signed_in.status
            assert signed_in.header("location") == "/dashboard/"
            cookie_line = signed_in.header("set-cookie") or ""
            session_id = cookie_line.split(";", 1)[0].split("=", 1)[1]
            cookie = ("Cookie", f"{SESSION_COOKIE}={session_id}")
            for path in ("/dashboard/", "/d/laptop/dashboard/", "/d/laptop/dashboard/app.js"):
                answer = await http_request(relay.address, "GET", path, headers=[cookie])
                assert answer.status == 404, (path, answer.status)
                assert (answer.header("content-type") or "").startswith("text/plain"), path
                assert answer.body.decode() == NO_DASHBOARD_MESSAGE + "\n", path
            # The session reaches the daemon through the tunnel as ever.
            health = await http_request(relay.address, "GET", "/d/laptop/health", headers=[cookie])
            assert health.status == 200 and health.json()["daemon_id"] == "laptop"


@pytest.fixture
def traversal_web(make_web: Any, tmp_path: Path) -> Web:
    """A dashboard export beside secrets: a file, a symlink out, a symlinked directory out."""
    (tmp_path / "secret.txt").write_text("TOP-SECRET", "utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "also.txt").write_text("TOP-SECRET", "utf-8")
    export = tmp_path / "export"
    (export / "sub").mkdir(parents=True)
    (export / "index.html").write_text("<!doctype html><title>ok</title>", "utf-8")
    (export / "sub" / "ok.js").write_text("export {};", "utf-8")
    (export / ".hidden").write_text("TOP-SECRET", "utf-8")
    (export / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (export / "out").symlink_to(outside, target_is_directory=True)
    return cast(Web, make_web(dashboard_dir=export))


TRAVERSALS = [
    "/dashboard/../secret.txt",
    "/dashboard/sub/../../secret.txt",
    "/dashboard/%2e%2e/secret.txt",
    "/dashboard/..%2fsecret.txt",
    "/dashboard/..\\secret.txt",
    "/dashboard/sub\\..\\..\\secret.txt",
    "/dashboard//etc/passwd",
    "/dashboard/" + str(Path("/etc/passwd")),
    "/dashboard/leak.txt",
    "/dashboard/out/also.txt",
    "/dashboard/.hidden",
    "/dashboard/./index.html",
    "/dashboard/sub",
    "/dashboard/C:/Windows/win.ini",
    "/dashboard/index.html%00.js",
]


async def test_dashboard_path_traversal_is_404(traversal_web: Web) -> None:
    web = traversal_web
    record, key = web.new_scope()
    web.connect(record, "laptop")
    session_id = await web.login(key)
    ok = await web.request("GET", "/dashboard/sub/ok.js", cookie=session_id, daemon_id="laptop")
    assert ok.status == 200 and ok.text == "export {};"
    for path in TRAVERSALS:
        for daemon_id in (None, "laptop"):
            answer = await web.request("GET", path, cookie=session_id, daemon_id=daemon_id)
            assert answer.status == 404, path
            assert "TOP-SECRET" not in answer.text


async def _raw_get(address: tuple[str, int], target: bytes, cookie: str) -> tuple[int, bytes]:
    """One GET on a fresh connection; the body is read by Content-Length, not until EOF."""
    connection = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", f"{address[0]}:{address[1]}"),
                ("Cookie", f"{SESSION_COOKIE}={cookie}"),
                ("Connection", "close"),
            ],
        )
        await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
        status = 0
        body = b""
        for _ in range(10_000):
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, body
        raise AssertionError("response did not end")


async def test_path_traversal_through_a_real_server(traversal_web: Web) -> None:
    web = traversal_web
    record, key = web.new_scope()
    web.connect(record, "laptop")
    session_id = await web.login(key)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 0.2
    config.accesslog = None
    with trio.fail_after(TRAVERSAL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, web.app, config))
            host, port = binds[0].removeprefix("http://").rsplit(":", 1)
            address = (host, int(port))
            status, _ = await _raw_get(address, b"/dashboard/sub/ok.js", session_id)
            assert status == 200
            for target in (
                b"/dashboard/../secret.txt",
                b"/dashboard/%2e%2e/secret.txt",
                b"/dashboard/%2E%2E/%2E%2E/secret.txt",
                b"/dashboard/sub/%2e%2e%2f%2e%2e%2fsecret.txt",
                b"/dashboard/%5c..%5csecret.txt",
                b"/dashboard/%2fetc%2fpasswd",
                b"/dashboard/leak.txt",
                b"/dashboard/out/also.txt",
                b"/dashboard/index.html%00",
            ):
                status, body = await _raw_get(address, target, session_id)
                assert status in (400, 404), target
                assert b"TOP-SECRET" not in body
            nursery.cancel_scope.cancel()


# -- health and metrics --------------------------------------------------------------------


async def test_health(web: Web) -> None:
    record, _ = web.new_scope()
    web.connect(record, "laptop")
    answer = await web.request("GET", "/health")
    assert answer.status == 200
    body = answer.json()
    assert body["status"] == "ok"
    assert body["daemons_connected"] == 1
    assert isinstance(body["version"], str) and body["version"]
    assert body["store"] == "ok"
    assert set(body) == {"status", "version", "daemons_connected", "store"}
    assert_page_headers(answer)
    web.relay.shutting_down = True
    assert (await web.request("GET", "/health")).json()["status"] == "shutting_down"


async def test_metrics_are_not_served_on_the_public_listener(web: Web) -> None:
    # They show every tenant's traffic: only the separate metrics listener serves them
    # (tests/relay/test_metrics_listener.py).
    first, _ = web.new_scope()
    web.connect(first, "a")
    answer = await web.request("GET", "/metrics")
    assert answer.status == 404
    assert "repowire_relay" not in answer.text


# -- registration --------------------------------------------------------------------------


async def test_register_creates_a_scope(web: Web) -> None:
    answer = await web.request(
        "POST", "/api/v1/register", body=b'{"label": "my laptop"}', content_type="application/json"
    )
    assert answer.status == 201
    assert answer.header("cache-control") == "no-store"
    body = answer.json()
    assert set(body) == {"api_key", "key_id", "scope_id"}
    record = await web.relay.store.verify_key(body["api_key"], now=web.clock())
    assert record is not None
    assert record.key_id == body["key_id"] and record.scope_id == body["scope_id"]
    assert record.label == "my laptop"
    assert sample(web, "repowire_relay_registrations_total") == 1


async def test_register_without_a_body(web: Web) -> None:
    answer = await web.request("POST", "/api/v1/register")
    assert answer.status == 201
    assert await web.relay.store.verify_key(answer.json()["api_key"], now=web.clock()) is not None


async def test_register_closed(make_web: Any) -> None:
    web: Web = make_web(registration="closed")
    answer = await web.request(
        "POST", "/api/v1/register", body=b"{}", content_type="application/json"
    )
    assert answer.status == 403
    assert answer.json()["error"] == "registration_closed"
    assert await web.relay.store.list_keys() == []


async def test_register_is_rate_limited(web: Web) -> None:
    for _ in range(3):
        assert (await web.request("POST", "/api/v1/register")).status == 201
    limited = await web.request("POST", "/api/v1/register")
    assert limited.status == 429
    assert limited.json()["error"] == "rate_limited"
    assert int(limited.header("retry-after") or "0") >= 1
    assert "api_key" not in limited.text
    assert len(await web.relay.store.list_keys()) == 3
    assert sample(web, "repowire_relay_rate_limited_total", {"where": "register"}) == 1
    other = await web.request("POST", "/api/v1/register", client=("192.0.2.7", 1))
    assert other.status == 201


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"label"', b'{"label": 5}', b"\xff\xfe", b'{"label": "a\\u0000b"}'],
)
async def test_register_rejects_bad_bodies(web: Web, body: bytes) -> None:
    answer = await web.request(
        "POST", "/api/v1/register", body=body, content_type="application/json"
    )
    assert answer.status == 400
    error = answer.json()
    assert error["error"] == "bad_request" and error["detail"]
    assert await web.relay.store.list_keys() == []


async def test_register_rejects_a_too_long_label_and_other_types(web: Web) -> None:
    long = json.dumps({"label": "x" * 201}).encode()
    answer = await web.request(
        "POST", "/api/v1/register", body=long, content_type="application/json"
    )
    assert answer.status == 400
    form = await web.request(
        "POST",
        "/api/v1/register",
        body=b"label=x",
        content_type="application/x-www-form-urlencoded",
    )
    assert form.status == 415
    assert form.json()["error"] == "unsupported_media_type"
    assert await web.relay.store.list_keys() == []


async def test_register_from_another_origin_is_refused(web: Web) -> None:
    answer = await web.request("POST", "/api/v1/register", origin="https://evil.example")
    assert answer.status == 403
    assert await web.relay.store.list_keys() == []


# -- daemons list --------------------------------------------------------------------------


async def test_daemons_list_is_limited_to_the_callers_scope(web: Web) -> None:
    a, key_a = web.new_scope("a")
    b, key_b = web.new_scope("b")
    web.connect(a, "a-first", connected_at=START - 50)
    web.connect(a, "a-second", connected_at=START - 10)
    await web.relay.store.record_daemon(a.scope_id, "a-offline", now=START - 1000)
    web.connect(b, "b-only")
    await web.relay.store.record_daemon(b.scope_id, "b-offline", now=START - 1000)

    answer = await web.request("GET", "/api/v1/daemons", bearer=key_a)
    assert answer.status == 200
    body = answer.json()
    by_id = {daemon["daemon_id"]: daemon for daemon in body["daemons"]}
    assert set(by_id) == {"a-first", "a-second", "a-offline"}
    assert body["current"] == "a-first"
    assert by_id["a-first"] == {
        "daemon_id": "a-first",
        "online": True,
        "connected_since": START - 50,
        "rtt_ms": pytest.approx(12.5),
        "version": "0.1.0",
        "default": True,
    }
    assert by_id["a-second"]["default"] is False and by_id["a-second"]["online"] is True
    assert by_id["a-offline"] == {
        "daemon_id": "a-offline",
        "online": False,
        "connected_since": None,
        "rtt_ms": None,
        "version": None,
        "default": False,
    }
    assert "b-" not in answer.text

    other = (await web.request("GET", "/api/v1/daemons", bearer=key_b)).json()
    assert {daemon["daemon_id"] for daemon in other["daemons"]} == {"b-only", "b-offline"}
    assert "a-" not in json.dumps(other)


async def test_daemons_list_by_cookie_and_current_under_a_prefix(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop", connected_at=START - 5)
    web.connect(record, "desktop", connected_at=START)
    session_id = await web.login(key)
    answer = await web.request("GET", "/api/v1/daemons", cookie=session_id, daemon_id="desktop")
    assert answer.status == 200
    assert answer.json()["current"] == "desktop"
    root = await web.request("GET", "/api/v1/daemons", cookie=session_id)
    assert root.json()["current"] == "laptop"


async def test_daemons_list_empty_scope_has_no_current(web: Web) -> None:
    _, key = web.new_scope()
    body = (await web.request("GET", "/api/v1/daemons", bearer=key)).json()
    assert body == {"daemons": [], "current": None}


async def test_daemons_list_rejects_missing_or_bad_credentials(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    cases: list[dict[str, Any]] = [
        {},
        {"bearer": "rw_" + "D" * 43},
        {"bearer": "garbage"},
        {"headers": {"Authorization": f"Basic {key}"}},
        {"cookie": "A" * 43},
    ]
    for case in cases:
        answer = await web.request("GET", "/api/v1/daemons", **case)
        assert answer.status == 401, case
        assert answer.json()["error"] == "unauthorized"
        assert answer.header("www-authenticate") is not None
        assert "laptop" not in answer.text
        assert key not in answer.text
    # A bad Bearer key is not rescued by a good cookie.
    session_id = await web.login(key)
    mixed = await web.request("GET", "/api/v1/daemons", cookie=session_id, bearer="rw_" + "E" * 43)
    assert mixed.status == 401


async def test_bad_bearer_keys_are_rate_limited_but_a_right_key_is_never_locked_out(
    web: Web,
) -> None:
    _, key = web.new_scope()
    for _ in range(10):
        bad = await web.request("GET", "/api/v1/daemons", bearer="rw_" + "F" * 43)
        assert bad.status == 401
    limited = await web.request("GET", "/api/v1/daemons", bearer="rw_" + "F" * 43)
    assert limited.status == 429
    assert limited.json()["error"] == "rate_limited"
    assert limited.header("retry-after") is not None
    # Someone else's guessing from the same address does not lock the key's holder out.
    for _ in range(3):
        right = await web.request("GET", "/api/v1/daemons", bearer=key)
        assert right.status == 200
    rotated = await web.request("POST", "/api/v1/keys/rotate", bearer=key)
    assert rotated.status == 200


# -- key rotation --------------------------------------------------------------------------


async def test_rotation_by_bearer_key(web: Web) -> None:
    record, old_key = web.new_scope()
    other, _ = web.new_scope()
    first = web.connect(record, "laptop")
    second = web.connect(record, "desktop")
    bystander = web.connect(other, "theirs")
    session_id = await web.login(old_key)

    answer = await web.request("POST", "/api/v1/keys/rotate", bearer=old_key)
    assert answer.status == 200
    assert answer.header("cache-control") == "no-store"
    body = answer.json()
    assert set(body) == {"api_key", "key_id"}
    new_key = body["api_key"]
    assert new_key != old_key and body["key_id"] != record.key_id
    assert answer.set_cookies == []

    assert first.closed == [(CloseCode.KEY_REVOKED, "key rotated")]
    assert second.closed == [(CloseCode.KEY_REVOKED, "key rotated")]
    assert bystander.closed == []

    assert (await web.request("GET", "/api/v1/daemons", bearer=old_key)).status == 401
    assert (await web.request("GET", "/api/v1/daemons", bearer=new_key)).status == 200
    assert (await web.request("GET", "/api/v1/daemons", cookie=session_id)).status == 401
    gone = await web.request("GET", "/dashboard/", cookie=session_id)
    assert gone.status == 303 and gone.header("location") == "/"
    again = await web.request("POST", "/api/v1/keys/rotate", bearer=old_key)
    assert again.status == 401


async def test_rotation_by_cookie_needs_an_allowed_origin(web: Web) -> None:
    record, old_key = web.new_scope()
    link = web.connect(record, "laptop")
    session_id = await web.login(old_key)

    no_origin = await web.request("POST", "/api/v1/keys/rotate", cookie=session_id)
    assert no_origin.status == 403
    evil = await web.request(
        "POST", "/api/v1/keys/rotate", cookie=session_id, origin="https://evil.example"
    )
    assert evil.status == 403
    assert link.closed == []
    assert await web.relay.store.verify_key(old_key, now=web.clock()) is not None

    answer = await web.request(
        "POST", "/api/v1/keys/rotate", cookie=session_id, origin=ORIGIN, daemon_id="laptop"
    )
    assert answer.status == 200
    new_key = answer.json()["api_key"]
    assert link.closed == [(CloseCode.KEY_REVOKED, "key rotated")]
    assert await web.relay.store.verify_key(old_key, now=web.clock()) is None
    assert await web.relay.store.lookup_session(session_id, now=web.clock()) is None
    # The page that asked gets a fresh session on the new key.
    fresh = session_from(answer)
    assert fresh != session_id
    session = await web.relay.store.lookup_session(fresh, now=web.clock())
    assert session is not None and session.key_id == answer.json()["key_id"]
    assert new_key not in answer.set_cookies[0]


async def test_rotation_without_credentials_is_401(web: Web) -> None:
    answer = await web.request("POST", "/api/v1/keys/rotate")
    assert answer.status == 401
    assert answer.json()["error"] == "unauthorized"


# -- errors and secrets --------------------------------------------------------------------


async def test_unknown_paths_and_methods(web: Web) -> None:
    api = await web.request("GET", "/api/v1/nope")
    assert api.status == 404
    assert api.json() == {"error": "not_found", "detail": "There is no such API route."}
    page = await web.request("GET", "/nope")
    assert page.status == 404 and page.content_type.startswith("text/html")
    assert_page_headers(page)
    method = await web.request("GET", "/api/v1/register")
    assert method.status == 405
    assert method.json()["error"] == "method_not_allowed"
    assert "POST" in (method.header("allow") or "")
    form_method = await web.request("GET", "/auth")
    assert form_method.status == 405 and "<html" in form_method.text


async def test_internal_errors_are_small_and_logged(
    web: Web, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, key = web.new_scope()

    def broken(scope_id: str) -> list[tuple[str, float, float]]:
        raise RuntimeError("boom")

    monkeypatch.setattr(web.relay.store, "known_daemons", broken)
    answer = await web.request("GET", "/api/v1/daemons?token=hidden", bearer=key)
    assert answer.status == 500
    assert answer.json()["error"] == "internal_error"
    assert "Traceback" not in answer.text and "boom" not in answer.text
    assert "boom" in caplog.text
    assert key not in caplog.text and "hidden" not in caplog.text


async def test_store_failure_is_503(web: Web) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    await web.relay.store.aclose()
    api = await web.request("GET", "/api/v1/daemons", bearer=key)
    assert api.status == 503
    assert api.json()["error"] == "store_unavailable"
    page = await web.request("POST", "/auth", form={"api_key": key})
    assert page.status == 503 and key not in page.text


async def test_malformed_daemon_id_in_scope_is_404(web: Web) -> None:
    answer = await web.request("GET", "/dashboard", daemon_id="../../etc")
    assert answer.status == 404


async def test_no_secret_in_any_answer_or_log(web: Web, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    registered = await web.request("POST", "/api/v1/register")
    key = registered.json()["api_key"]
    record = await web.relay.store.verify_key(key, now=web.clock())
    assert record is not None
    web.connect(record, "laptop")
    session_id = await web.login(key)
    await web.request("POST", "/auth", form={"api_key": key[:-1]})
    await web.request("GET", "/", cookie=session_id)
    await web.request("GET", "/dashboard/", cookie=session_id)
    await web.request("GET", "/dashboard/", cookie=session_id, daemon_id="laptop")
    await web.request("GET", "/api/v1/daemons", bearer=key)
    await web.request("GET", "/api/v1/daemons", cookie=session_id)
    await web.request("GET", "/health")
    await web.request("GET", "/metrics")
    rotated = await web.request("POST", "/api/v1/keys/rotate", bearer=key)
    new_key = rotated.json()["api_key"]
    await web.request("GET", "/api/v1/daemons", bearer=new_key)
    await web.request("POST", "/logout", cookie=session_id)

    allowed_key_answers = {id(registered), id(rotated)}
    for path, answer in web.answers:
        if id(answer) in allowed_key_answers:
            continue
        visible = answer.text + json.dumps(dict(answer.headers))
        for secret in (key, new_key, key[:-1]):
            assert secret not in visible, path
        assert session_id not in answer.text, path
        location = answer.header("location") or ""
        assert session_id not in location and key not in location
    for secret in (key, new_key, key[:-1], session_id):
        assert secret not in caplog.text


async def test_the_favicon_is_the_relays_icon_for_anyone(web: Web) -> None:
    # Browsers ask for it on every page, signed in or not: an icon, never a 401.
    answer = await web.request("GET", "/favicon.ico")
    assert answer.status == 200
    assert answer.content_type.startswith("image/svg+xml")
    assert "<svg" in answer.text


async def test_the_relay_serves_its_own_icon_and_sign_in_page_without_a_session(
    tmp_path: Path,
) -> None:
    # Routed to the relay's own pages, not tunneled (a tunneled path needs a session: 401).
    with trio.fail_after(20):
        async with running_relay(tmp_path / "relay") as stack:
            for path, kind in (("/favicon.ico", "image/svg+xml"), ("/signin", "text/html")):
                answer = await http_request(stack.relay.address, "GET", path)
                assert answer.status == 200, (path, answer.status)
                assert (answer.header("content-type") or "").startswith(kind)


async def test_a_cross_site_refusal_names_the_expected_origin_and_is_logged(
    web: Web, caplog: pytest.LogCaptureFixture
) -> None:
    record, key = web.new_scope()
    web.connect(record, "laptop")
    hostile = 'https://evil.example"><script>alert(1)</script>'
    with caplog.at_level("INFO", logger="repowire.relay"):
        page = await web.request("POST", "/auth", form={"api_key": key}, origin=hostile)
        api = await web.request("POST", "/api/v1/register", origin="https://evil.example")
    assert page.status == 403
    # The expected origin is the Host the request was sent to (no --public-url here).
    assert f"not from {ORIGIN}" in page.text
    assert "--public-url" in page.text
    assert "<script>alert(1)" not in page.text  # the page escapes what the browser sent
    assert api.status == 403
    assert f"not from {ORIGIN}" in api.json()["detail"]
    refusals = [r.getMessage() for r in caplog.records if "cross-site" in r.getMessage()]
    assert len(refusals) == 2
    assert "evil.example" in refusals[0] and f"expected {ORIGIN!r}" in refusals[0]
    assert key not in caplog.text


def test_a_refused_path_with_a_newline_cannot_forge_a_log_line(
    web: Web, caplog: pytest.LogCaptureFixture
) -> None:
    # Hypercorn percent-decodes the path: "/x%0A..." arrives with a raw newline.
    forged = "/x\n2026-01-01 00:00:00 INFO repowire.relay key rw_1 revoked"
    headers = [(b"host", b"localhost"), (b"origin", b"https://evil.example\r\nfake")]
    with caplog.at_level("INFO", logger="repowire.relay"):
        web.relay.origin_refusal(headers, "http", forged)
    refused = [r for r in caplog.records if "cross-site" in r.getMessage()]
    assert len(refused) == 1
    message = refused[0].getMessage()
    assert "\n" not in message and "\r" not in message
    assert "\\n2026-01-01" in message  # still there, escaped
