"""The relay's own web routes: the sign-in form, the dashboard's files (those of
``RelaySettings.dashboard_dir``, when given), the JSON API and health, as one QuartTrio app.
``/metrics`` is not among them: it shows every tenant's traffic, so it is served on a separate
listener (``RelaySettings.metrics_listen``, see :mod:`relay._server`) and is not found here.

The relay's ASGI dispatcher hands this app every path the relay itself answers. Paths under
``/d/<daemon_id>/`` arrive with that prefix removed and ``scope["repowire.daemon_id"]`` set;
root paths arrive as they are. Every answer carries the security headers of
:data:`SECURITY_HEADERS` and a Content-Security-Policy (:data:`PAGE_CSP`, or
:data:`DASHBOARD_CSP` for the dashboard's files).

Secrets: an API key reaches this app only in the sign-in form or an ``Authorization: Bearer``
header, and leaves it only in the answers of ``/api/v1/register`` and ``/api/v1/keys/rotate``.
Nothing here logs a key, a session id or a cookie, or puts one in a URL. A one-time sign-in
token (:mod:`relay._login_links`) leaves only in the answer of ``POST /api/v1/login-links``, in
the fragment of the URL given there (``/signin#<token>``), which browsers never send to a
server, so it appears in no request line, log or Referer.
"""

from __future__ import annotations

import json
import logging
import math
import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs
from quart import Response, render_template, request, send_file
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from common import http_error_code, is_daemon_id, package_version

from ._context import Relay
from ._login_links import LOGIN_LINK_TTL, LoginLink, LoginLinksFull, looks_like_token
from ._store import KeyRecord, StoreError, UnknownRecordError
from ._store_api import StoreUnavailable

logger = logging.getLogger("repowire.relay.web")

#: Content-Security-Policy of the sign-in form, the error pages and the JSON answers.
PAGE_CSP: Final = "default-src 'self'; frame-ancestors 'none'; form-action 'self'"

#: Content-Security-Policy of the dashboard's files (the page talks only to its own origin).
DASHBOARD_CSP: Final = "default-src 'self'; connect-src 'self'; frame-ancestors 'none'"

#: Headers set on every answer of this app.
SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

#: Largest request body this app reads (the sign-in form, a registration), bytes. Larger
#: bodies get 413 before they are buffered.
MAX_BODY_SIZE: Final = 16 * 1024

#: Key of the ASGI scope entry the dispatcher sets for paths under ``/d/<daemon_id>/``.
DAEMON_ID_SCOPE_KEY: Final = "repowire.daemon_id"

#: The file served for the dashboard's directory.
INDEX_FILE: Final = "index.html"

#: The plain-text answer (404) under ``/dashboard`` of a relay started without
#: ``RelaySettings.dashboard_dir``; also logged once at startup.
NO_DASHBOARD_MESSAGE: Final = "this relay was started without dashboard files (dashboard_dir)"

#: Seconds a client is asked to wait (Retry-After) when the key store cannot be reached.
STORE_RETRY_AFTER: Final = 5

#: What a request that needs the key store is told while it cannot be reached.
STORE_UNAVAILABLE_MESSAGE: Final = "The relay's key store is unavailable; try again shortly."

#: Shown by the sign-in form when a valid key has no daemon connected.
NO_DAEMON_MESSAGE: Final = (
    "No daemon is connected with this key. Run `repowire serve --relay` on the daemon's "
    "machine, then try again."
)

#: Shown by the sign-in form of a replica of a cluster when it finds no daemon of the key
#: connected anywhere a moment after Redis was unreachable (the replicas may not have announced
#: their links again yet), with a Retry-After of that many seconds.
PRESENCE_SETTLING_MESSAGE: Final = (
    "The relay is catching up after an outage of its store and cannot tell yet whether a "
    "daemon is connected with this key. Try again in a few seconds."
)
PRESENCE_SETTLING_RETRY_AFTER: Final = 2

_TEMPLATE: Final = "page.html"
_SIGNIN_TEMPLATE: Final = "signin.html"

#: Why a sign-in link did not work, shown by the ``/signin`` page.
LOGIN_LINK_GONE_MESSAGE: Final = (
    "This sign-in link has expired or was already used. Run `repowire relay login-link` again."
)
_STATIC_DIR: Final = Path(__file__).resolve().parent / "static"

# Types of the files a static export holds. Explicit, so the answer does not depend on the
# host's mime.types; anything else falls back to the mimetypes module, then to bytes.
_CONTENT_TYPES: Final[Mapping[str, str]] = {
    ".html": "text/html",
    ".htm": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".txt": "text/plain",
}


def create_web_app(relay: Relay) -> QuartTrio:
    """Build the app serving the relay's own routes for ``relay``.

    The dashboard's files come from ``relay.settings.dashboard_dir``. Raises
    FileNotFoundError, naming the directory, when that directory has no ``index.html``: a
    broken installation fails at startup rather than answering 404 later. Without a
    ``dashboard_dir`` every path under ``/dashboard`` answers 404 with
    :data:`NO_DASHBOARD_MESSAGE` (logged once here); sign-in and the API work as ever.
    """
    dashboard_root: Path | None = None
    dashboard_dir = relay.settings.dashboard_dir
    if dashboard_dir is None:
        logger.info("%s: /dashboard/ answers 404", NO_DASHBOARD_MESSAGE)
    else:
        index = dashboard_dir / INDEX_FILE
        if not index.is_file():
            raise FileNotFoundError(f"the dashboard's static files are missing: no {index}")
        dashboard_root = dashboard_dir.resolve(strict=True)

    # Quart finds templates/ beside this module. Quart's own logger takes the module's name,
    # separate from "relay.web", and reports only failures inside Quart itself.
    app = QuartTrio(__name__, static_folder=None, template_folder="templates")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_SIZE
    # No redirects invented by the router: they would carry an absolute URL built from the
    # Host header, which is wrong under /d/<id>/. "//" in a path is simply not found.
    app.url_map.merge_slashes = False

    routes = _Routes(
        relay=relay,
        dashboard_root=dashboard_root,
        version=package_version(),
    )
    rules: list[tuple[str, str, Any, list[str]]] = [
        ("/", "landing", routes.landing, ["GET"]),
        ("/auth", "auth", routes.auth, ["POST"]),
        ("/logout", "logout", routes.logout, ["POST"]),
        ("/signin", "signin", routes.signin, ["GET"]),
        ("/static/<path:name>", "static_file", routes.static_file, ["GET"]),
        ("/favicon.ico", "favicon", routes.favicon, ["GET"]),
        ("/dashboard", "dashboard", routes.dashboard_redirect, ["GET"]),
        ("/dashboard/", "dashboard_index", routes.dashboard_index, ["GET"]),
        ("/dashboard/<path:asset>", "dashboard_file", routes.dashboard_file, ["GET"]),
        ("/health", "health", routes.health, ["GET"]),
        ("/api/v1/register", "register", routes.register, ["POST"]),
        ("/api/v1/daemons", "daemons", routes.daemons, ["GET"]),
        ("/api/v1/keys/rotate", "rotate", routes.rotate, ["POST"]),
        ("/api/v1/login-links", "login_links", routes.issue_login_link, ["POST"]),
        ("/api/v1/login-links/redeem", "redeem", routes.redeem_login_link, ["POST"]),
    ]
    for rule, endpoint, view, methods in rules:
        app.add_url_rule(rule, endpoint, view, methods=methods)
    app.register_error_handler(_Refusal, routes.refusal)
    app.register_error_handler(HTTPException, routes.http_error)
    app.register_error_handler(StoreError, routes.store_error)
    app.register_error_handler(Exception, routes.internal_error)
    app.after_request(_add_security_headers)
    return app


async def _add_security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    # Pages and API answers depend on who asks; only the dashboard's files may be kept.
    response.headers.setdefault("Cache-Control", "no-store")
    return response


class _Refusal(Exception):
    """An API request refused with a JSON error (raised inside a route, answered by
    :meth:`_Routes.refusal`)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})


@attrs.frozen(kw_only=True)
class _Caller:
    """Who an API request comes from. ``session_id`` is set when the browser cookie was used."""

    scope_id: str
    key_id: str
    session_id: str | None


def _json(
    body: Mapping[str, object], status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=True)
    return Response(
        text, status=status, content_type="application/json", headers=dict(headers or {})
    )


def _redirect(location: str, status: int) -> Response:
    return Response("", status=status, headers={"Location": location})


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def _is_api_path() -> bool:
    return request.path == "/api" or request.path.startswith("/api/")


def _resolve_file(root: Path, name: str) -> Path | None:
    """The regular file under ``root`` (already resolved) that the URL path ``name`` names, or
    None.

    Refused: empty, ``.``, ``..`` or hidden segments, backslashes, NUL, colons (drive letters,
    alternate streams), and anything that lands outside ``root`` once symlinks are followed.
    """
    if "\\" in name or "\x00" in name:
        return None
    parts = name.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") or ":" in part for part in parts):
        return None
    try:
        resolved = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):
        # Missing, unreadable, or a symlink loop.
        return None
    if not resolved.is_relative_to(root) or not resolved.is_file():
        return None
    return resolved


def _content_type(path: Path) -> str:
    known = _CONTENT_TYPES.get(path.suffix.lower())
    if known is not None:
        return known
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


class _Routes:
    def __init__(self, *, relay: Relay, dashboard_root: Path | None, version: str) -> None:
        self._relay = relay
        self._dashboard_root = dashboard_root
        self._static_root = _STATIC_DIR
        self._version = version

    # -- who is asking --------------------------------------------------------------------

    @property
    def _headers(self) -> list[tuple[bytes, bytes]]:
        return list(request.scope["headers"])

    @property
    def _client(self) -> tuple[str, int] | None:
        client = request.scope.get("client")
        return (client[0], client[1]) if client else None

    def _address(self) -> str:
        return self._relay.client_address(self._client, self._headers)

    def _secure(self) -> bool:
        return self._relay.is_secure(request.scheme, self._client, self._headers)

    def _origin_ok(self) -> bool:
        return self._relay.origin_allowed(self._headers, request.scheme)

    def _daemon_id(self) -> str | None:
        """The daemon id of the ``/d/<id>/`` prefix, or None at the root.

        Raises a 404 refusal for an id the dispatcher should never have passed.
        """
        scope: Mapping[str, object] = request.scope
        value = scope.get(DAEMON_ID_SCOPE_KEY)
        if value is None:
            return None
        if not isinstance(value, str) or not is_daemon_id(value):
            raise _Refusal(404, "not_found", "There is nothing at this address.")
        return value

    def _prefix(self) -> str:
        daemon_id = self._daemon_id()
        return "" if daemon_id is None else f"/d/{daemon_id}"

    def _bearer(self) -> str | None:
        """The key of an ``Authorization: Bearer`` header; "" for any other Authorization
        value (refused, never ignored); None without the header."""
        value = request.headers.get("Authorization")
        if value is None:
            return None
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return ""
        return credentials.strip()

    async def _api_caller(self, *, where: str, cookie_needs_origin: bool) -> _Caller:
        """Authenticate an API request by its Bearer key or, without one, its session cookie.

        A Bearer header, when present, is the credential (a bad one is not rescued by a
        cookie). Only wrong keys meet the client address's auth limit (as on ``/auth`` and
        ``/ws/relay``): a right key is never locked out by someone else's guessing from the
        same address; a wrong one is charged, and answered 429 once the limit is spent. With
        ``cookie_needs_origin`` a cookie only counts on a request that carries an allowed
        Origin header (a state-changing call from a browser always does).
        Raises :class:`_Refusal` (401, 403 or 429), or :class:`StoreError` (503).
        """
        relay = self._relay
        now = relay.clock()
        key = self._bearer()
        if key is not None:
            record = await relay.store.verify_key(key, now=now)
            if record is not None:
                return _Caller(scope_id=record.scope_id, key_id=record.key_id, session_id=None)
            relay.metrics.auth_failures.labels(where).inc()
            # The limiter checks and charges in one step (atomically, when shared).
            wait = await relay.auth_limiter.take(self._address(), now)
            if wait > 0:
                relay.metrics.rate_limited.labels(where).inc()
                raise _Refusal(
                    429,
                    "rate_limited",
                    "Too many failed attempts from this address; try again later.",
                    headers={"Retry-After": _retry_after(wait)},
                )
            raise _unauthorized("The API key is malformed, unknown or revoked.")
        session_id = relay.session_id_from(self._headers)
        session = await relay.browser_session(self._headers)
        if session is None or session_id is None:
            raise _unauthorized("Sign in on the relay's start page, or send a Bearer key.")
        if cookie_needs_origin and request.headers.get("Origin") is None:
            raise _Refusal(
                403, "forbidden", "A browser request must carry an Origin header for this."
            )
        return _Caller(scope_id=session.scope_id, key_id=session.key_id, session_id=session_id)

    # -- pages ----------------------------------------------------------------------------

    async def _page(
        self,
        *,
        status: int = 200,
        title: str = "Sign in",
        error: str | None = None,
        message: str | None = None,
        show_form: bool = True,
        signed_in: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """The sign-in page (with an optional inline error), the signed-in page, or (without
        the form) a short message page. Everything shown is escaped by the template."""
        body = await render_template(
            _TEMPLATE,
            title=title,
            error=error,
            message=message,
            show_form=show_form and not signed_in,
            signed_in=signed_in,
        )
        return Response(body, status=status, content_type="text/html", headers=dict(headers or {}))

    async def landing(self) -> Response:
        signed_in = await self._relay.browser_session(self._headers) is not None
        return await self._page(title="Repowire relay", signed_in=signed_in)

    async def auth(self) -> Response:
        relay = self._relay
        if not self._origin_ok():
            return await self._forbidden_page()
        form = await request.form
        key = (form.get("api_key") or "").strip()
        if not key:
            return await self._page(status=400, error="Enter your API key.")
        # Only wrong keys are limited (and charged): a right key is never locked out by
        # someone else's guessing from the same address. The limiter checks and charges in
        # one step, so concurrent attempts cannot slip past it.
        now = relay.clock()
        address = self._address()
        record = await relay.store.verify_key(key, now=now)
        if record is None:
            relay.metrics.auth_failures.labels("auth").inc()
            wait = await relay.auth_limiter.take(address, now)
            if wait > 0:
                relay.metrics.rate_limited.labels("auth").inc()
                seconds = _retry_after(wait)
                return await self._page(
                    status=429,
                    error=f"Too many attempts from your address. Try again in {seconds} seconds.",
                    headers={"Retry-After": seconds},
                )
            return await self._page(
                status=401, error="This API key is not valid: it is malformed, unknown or revoked."
            )
        if not await relay.online_daemons(record.scope_id):
            if relay.presence is not None and relay.presence.settling:
                # Redis was away a moment ago: the other replicas may not have announced
                # their links again yet. Not "no daemon", but "try again shortly".
                return await self._page(
                    status=503,
                    error=PRESENCE_SETTLING_MESSAGE,
                    headers={"Retry-After": str(PRESENCE_SETTLING_RETRY_AFTER)},
                )
            return await self._page(status=409, error=NO_DAEMON_MESSAGE)
        try:
            session_id = await relay.open_session(record, now)
        except UnknownRecordError:
            # Revoked between the check above and now.
            relay.metrics.auth_failures.labels("auth").inc()
            return await self._page(
                status=401, error="This API key is not valid: it is malformed, unknown or revoked."
            )
        previous = relay.session_id_from(self._headers)
        if previous is not None:
            await relay.close_session(previous)
        logger.info("browser session opened for key %s", record.key_id)
        response = _redirect("/dashboard/", 303)
        response.headers["Set-Cookie"] = relay.cookie_header(session_id, secure=self._secure())
        return response

    async def logout(self) -> Response:
        relay = self._relay
        if not self._origin_ok():
            return await self._forbidden_page()
        session_id = relay.session_id_from(self._headers)
        if session_id is not None:
            # Its SSE streams, WebSockets and requests in flight end now, not at their end.
            await relay.close_session(session_id)
        response = _redirect("/", 303)
        response.headers["Set-Cookie"] = relay.clearing_cookie_header(secure=self._secure())
        return response

    def _origin_refusal(self) -> str:
        return self._relay.origin_refusal(self._headers, request.scheme, request.path)

    async def _forbidden_page(self) -> Response:
        return await self._page(
            status=403, title="Forbidden", message=self._origin_refusal(), show_form=False
        )

    async def static_file(self, name: str) -> Response:
        path = _resolve_file(self._static_root, name)
        if path is None:
            return await self._not_found()
        response = await send_file(path, mimetype=_content_type(path), conditional=True)
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def favicon(self) -> Response:
        """Browsers ask for ``/favicon.ico`` on their own: the relay's icon, not a 401."""
        return await self.static_file("favicon.svg")

    # -- dashboard ------------------------------------------------------------------------

    def _no_dashboard(self) -> Response:
        return Response(NO_DASHBOARD_MESSAGE + "\n", status=404, content_type="text/plain")

    async def dashboard_redirect(self) -> Response:
        if self._dashboard_root is None:
            return self._no_dashboard()
        return _redirect(f"{self._prefix()}/dashboard/", 308)

    async def dashboard_index(self) -> Response:
        if self._dashboard_root is None:
            return self._no_dashboard()
        relay = self._relay
        session = await relay.browser_session(self._headers)
        if session is None:
            return _redirect("/", 303)
        if self._daemon_id() is None:
            online = await relay.online_daemons(session.scope_id)
            if online:
                return _redirect(f"/d/{online[0].daemon_id}/dashboard/", 303)
        return await self._dashboard_send(INDEX_FILE)

    async def dashboard_file(self, asset: str) -> Response:
        if self._dashboard_root is None:
            return self._no_dashboard()
        self._daemon_id()  # refuses a malformed prefix id
        if await self._relay.browser_session(self._headers) is None:
            if asset.endswith("/") or asset.rsplit("/", 1)[-1] == INDEX_FILE:
                return _redirect("/", 303)
            raise _unauthorized("Sign in on the relay's start page first.")
        if asset.endswith("/"):
            asset += INDEX_FILE
        return await self._dashboard_send(asset)

    async def _dashboard_send(self, name: str) -> Response:
        root = self._dashboard_root
        path = None if root is None else _resolve_file(root, name)
        if path is None:
            return await self._not_found()
        response = await send_file(path, mimetype=_content_type(path), conditional=True)
        # The export's names carry no content hash: always revalidate (cheap, with the ETag).
        response.headers["Cache-Control"] = "no-cache"
        response.headers.pop("Expires", None)
        response.headers["Content-Security-Policy"] = DASHBOARD_CSP
        return response

    # -- health ---------------------------------------------------------------------------

    async def health(self) -> Response:
        """The relay's state: 200, or 503 while its key store cannot be reached (so that a
        load balancer sends new sign-ins elsewhere; the links it holds keep serving)."""
        relay = self._relay
        store_up = relay.store_health.up
        body: dict[str, object] = {
            "status": "shutting_down" if relay.shutting_down else "ok",
            "version": self._version,
            "daemons_connected": len(relay.links),
            "store": "ok" if store_up else "unavailable",
        }
        if relay.cluster is not None:
            # Which replica answered (behind a balancer), and its links to the others.
            counts = relay.cluster.link_counts()
            body["replica"] = relay.settings.replica_id
            body["peer_links"] = counts.dialed + counts.accepted
        return _json(body, status=200 if store_up else 503)

    # -- API ------------------------------------------------------------------------------

    async def register(self) -> Response:
        relay = self._relay
        if relay.settings.registration == "closed":
            raise _Refusal(
                403,
                "registration_closed",
                "This relay does not register new keys; ask its operator for one.",
            )
        if not self._origin_ok():
            raise _Refusal(403, "forbidden", self._origin_refusal())
        now = relay.clock()
        wait = await relay.register_limiter.take(self._address(), now)
        if wait > 0:
            relay.metrics.rate_limited.labels("register").inc()
            raise _Refusal(
                429,
                "rate_limited",
                "Too many registrations from this address; try again later.",
                headers={"Retry-After": _retry_after(wait)},
            )
        label = await self._registration_label()
        try:
            record, key = await relay.store.create_scope(label=label, now=now)
        except ValueError as exc:
            raise _Refusal(400, "bad_request", str(exc)) from None
        relay.metrics.registrations.inc()
        logger.info("registered scope %s with key %s", record.scope_id, record.key_id)
        return _json(
            {"api_key": key, "key_id": record.key_id, "scope_id": record.scope_id},
            status=201,
            headers={"Cache-Control": "no-store"},
        )

    async def _json_object_body(self, example: str) -> dict[str, object]:
        """The request's JSON object body; {} without a body. Raises :class:`_Refusal` (415
        for another media type, 400 for anything but a JSON object, naming ``example``)."""
        data = await request.get_data(as_text=False)
        raw = data.encode("utf-8") if isinstance(data, str) else data
        if not raw.strip():
            return {}
        if request.mimetype != "application/json":
            raise _Refusal(415, "unsupported_media_type", "Send the body as application/json.")
        try:
            document = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise _Refusal(400, "bad_request", "The body is not valid JSON.") from None
        if not isinstance(document, dict):
            raise _Refusal(400, "bad_request", f"The body must be a JSON object: {example}.")
        return document

    async def _registration_label(self) -> str:
        """The optional ``label`` of a registration body; "" without a body."""
        document = await self._json_object_body('{"label": "..."}')
        label = document.get("label")
        if label is None:
            return ""
        if not isinstance(label, str):
            raise _Refusal(400, "bad_request", "label must be a string.")
        return label

    async def daemons(self) -> Response:
        relay = self._relay
        caller = await self._api_caller(where="api", cookie_needs_origin=False)
        # In a cluster, every replica's links; rtt and version are known of this replica's.
        online = await relay.online_daemons(caller.scope_id)
        default = online[0] if online else None
        entries: list[dict[str, object]] = []
        for daemon in online:
            link = daemon.link
            rtt = None if link is None else link.rtt
            entries.append(
                {
                    "daemon_id": daemon.daemon_id,
                    "online": True,
                    "connected_since": daemon.connected_at,
                    "rtt_ms": None if rtt is None else rtt * 1000.0,
                    "version": None if link is None else link.version,
                    "default": daemon is default,
                }
            )
        online_ids = {daemon.daemon_id for daemon in online}
        for daemon_id, _first_seen, _last_seen in await relay.store.known_daemons(caller.scope_id):
            if daemon_id in online_ids:
                continue
            entries.append(
                {
                    "daemon_id": daemon_id,
                    "online": False,
                    "connected_since": None,
                    "rtt_ms": None,
                    "version": None,
                    "default": False,
                }
            )
        current = self._daemon_id()
        if current is None and default is not None:
            current = default.daemon_id
        return _json({"daemons": entries, "current": current})

    async def rotate(self) -> Response:
        relay = self._relay
        if not self._origin_ok():
            raise _Refusal(403, "forbidden", self._origin_refusal())
        caller = await self._api_caller(where="rotate", cookie_needs_origin=True)
        now = relay.clock()
        try:
            record, key = await relay.store.rotate_key(caller.key_id, now=now)
        except UnknownRecordError:
            # Revoked or rotated by someone else in the meantime.
            raise _unauthorized("The API key is unknown or revoked.") from None
        logger.info("key %s rotated to %s", caller.key_id, record.key_id)
        # Every link, stream and session of the old key ends now (links with 4403).
        await relay.end_key_access(caller.key_id, "rotated")
        response = _json(
            {"api_key": key, "key_id": record.key_id}, headers={"Cache-Control": "no-store"}
        )
        if caller.session_id is not None:
            # The page that asked keeps working: its old session ended with the old key.
            response.headers["Set-Cookie"] = await self._new_session_cookie(record, now)
        return response

    async def _new_session_cookie(self, record: KeyRecord, now: float) -> str:
        relay = self._relay
        session_id = await relay.open_session(record, now)
        return relay.cookie_header(session_id, secure=self._secure())

    # -- one-time sign-in links -----------------------------------------------------------

    async def issue_login_link(self) -> Response:
        """``POST /api/v1/login-links`` with a Bearer key and an optional JSON body
        ``{"daemon_id": ...}`` (a daemon of the key's scope the store knows; else the
        ``/d/<id>/`` prefix, else none): 201 ``{"url", "expires_at", "expires_in"}``. The URL
        carries the token in its fragment, which browsers never send to a server."""
        relay = self._relay
        if not self._origin_ok():
            raise _Refusal(403, "forbidden", self._origin_refusal())
        if self._bearer() is None:
            # A browser session must not mint links that outlive it on another device.
            raise _unauthorized("Send the API key as a Bearer header.")
        caller = await self._api_caller(where="login_link", cookie_needs_origin=True)
        document = await self._json_object_body('{"daemon_id": "..."}')
        daemon_id = document.get("daemon_id", self._daemon_id())
        if daemon_id is not None:
            known = is_daemon_id(daemon_id) and any(
                known_id == daemon_id
                for known_id, _, _ in await relay.store.known_daemons(caller.scope_id)
            )
            if not known:
                raise _Refusal(
                    404, "unknown_daemon", "No daemon with this id has connected with this key."
                )
            assert isinstance(daemon_id, str)
        now = relay.clock()
        wait = await relay.login_link_limiter.take(caller.key_id, now)
        if wait > 0:
            relay.metrics.rate_limited.labels("login_link_issue").inc()
            raise _Refusal(
                429,
                "rate_limited",
                "This key asked for too many sign-in links; try again later.",
                headers={"Retry-After": _retry_after(wait)},
            )
        try:
            token, link = await relay.store.create_login_link(
                caller.key_id, daemon_id=daemon_id, now=now
            )
        except LoginLinksFull:
            logger.warning("sign-in link refused for key %s: the table is full", caller.key_id)
            raise _Refusal(
                503,
                "busy",
                "The relay holds too many unused sign-in links; try again in a few minutes.",
                headers={"Retry-After": _retry_after(LOGIN_LINK_TTL)},
            ) from None
        except UnknownRecordError:
            # Revoked or rotated by someone else in the meantime.
            raise _unauthorized("The API key is unknown or revoked.") from None
        logger.info(
            "sign-in link issued for key %s (daemon %r)", caller.key_id, daemon_id or "default"
        )
        return _json(
            {
                "url": f"{self._public_base()}/signin#{token}",
                "expires_at": link.expires_at,
                "expires_in": math.ceil(LOGIN_LINK_TTL),
            },
            status=201,
            headers={"Cache-Control": "no-store"},
        )

    def _public_base(self) -> str:
        """The relay's browser origin: ``public_url`` when set, else the origin this request
        was sent to."""
        public = self._relay.settings.public_url
        if public:
            return public.rstrip("/")
        return f"{request.scheme}://{request.host}"

    async def signin(self) -> Response:
        """The page a sign-in link opens: its script reads the token from the fragment and
        redeems it (the server never sees the fragment, so this page is the same for all)."""
        # The page words LOGIN_LINK_GONE_MESSAGE itself (with the command as code).
        body = await render_template(_SIGNIN_TEMPLATE, title="Signing in")
        return Response(body, content_type="text/html")

    async def redeem_login_link(self) -> Response:
        """``POST /api/v1/login-links/redeem`` ``{"token": ...}`` from the ``/signin`` page:
        a new browser session (as ``/auth`` opens it) and 200 ``{"next": <dashboard path>}``;
        400 for a malformed body or token, 410 for a token that is unknown, used, expired or
        whose key is no longer live, 429 once the address's failures are spent."""
        relay = self._relay
        if not self._origin_ok():
            raise _Refusal(403, "forbidden", self._origin_refusal())
        document = await self._json_object_body('{"token": "..."}')
        now = relay.clock()
        address = self._address()
        # Only failures are charged, in one step with the check (as on /auth).
        token = document.get("token")
        link = None
        if looks_like_token(token):
            assert isinstance(token, str)
            link = await relay.store.take_login_link(token, now=now)
        record = None if link is None else await self._live_key(link)
        if link is None or record is None:
            relay.metrics.auth_failures.labels("login_link").inc()
            wait = await relay.auth_limiter.take(address, now)
            if wait > 0:
                relay.metrics.rate_limited.labels("login_link").inc()
                raise _Refusal(
                    429,
                    "rate_limited",
                    "Too many failed sign-ins from this address; try again later.",
                    headers={"Retry-After": _retry_after(wait)},
                )
            if not looks_like_token(document.get("token")):
                raise _Refusal(400, "bad_token", LOGIN_LINK_GONE_MESSAGE)
            raise _Refusal(410, "link_gone", LOGIN_LINK_GONE_MESSAGE)
        try:
            session_id = await relay.open_session(record, now)
        except UnknownRecordError:
            # Revoked between the check above and now.
            relay.metrics.auth_failures.labels("login_link").inc()
            raise _Refusal(410, "link_gone", LOGIN_LINK_GONE_MESSAGE) from None
        previous = relay.session_id_from(self._headers)
        if previous is not None:
            await relay.close_session(previous)
        logger.info("browser session opened by a sign-in link of key %s", record.key_id)
        target = "/dashboard/" if link.daemon_id is None else f"/d/{link.daemon_id}/dashboard/"
        response = _json({"next": target}, headers={"Cache-Control": "no-store"})
        response.headers["Set-Cookie"] = relay.cookie_header(session_id, secure=self._secure())
        return response

    async def _live_key(self, link: LoginLink) -> KeyRecord | None:
        """The record of the key that issued ``link`` if the store still holds it live: a
        token of a revoked or rotated key never signs in."""
        for record in await self._relay.store.list_keys(link.scope_id):
            if record.key_id == link.key_id and not record.revoked:
                return record
        return None

    # -- errors ---------------------------------------------------------------------------

    async def _not_found(self) -> Response:
        if _is_api_path():
            return _json({"error": "not_found", "detail": "There is no such API route."}, 404)
        return await self._page(
            status=404,
            title="Not found",
            message="There is nothing at this address.",
            show_form=False,
        )

    async def refusal(self, error: _Refusal) -> Response:
        if _is_api_path() or request.path.startswith("/dashboard/"):
            return _json({"error": error.code, "detail": error.detail}, error.status, error.headers)
        return await self._page(
            status=error.status,
            title="Refused",
            message=error.detail,
            show_form=False,
            headers=error.headers,
        )

    async def http_error(self, error: HTTPException) -> Response:
        status = error.code or 500
        if status == 404:
            return await self._not_found()
        headers: dict[str, str] = {}
        if status == 405:
            allowed = error.get_response().headers.get("Allow")
            if allowed:
                headers["Allow"] = allowed
        code = http_error_code(status)
        detail = {
            400: "The request is malformed.",
            405: "This address does not accept that method.",
            413: f"The request body is larger than {MAX_BODY_SIZE} bytes.",
            415: "The request body has an unsupported type.",
        }.get(status, "The request could not be served.")
        if _is_api_path():
            return _json({"error": code, "detail": detail}, status, headers)
        return await self._page(
            status=status, title="Error", message=detail, show_form=False, headers=headers
        )

    async def store_error(self, error: StoreError) -> Response:
        """503 ``store_unavailable`` for a request the key store failed (JSON for the API and
        the dashboard's paths, a page for the others), with a Retry-After."""
        # StoreError messages never hold a secret; the path holds none either. An outage is
        # logged once, by the store's health, not once per refused request.
        if isinstance(error, StoreUnavailable):
            logger.debug(
                "refused %r %r: the key store is unavailable", request.method, request.path
            )
        else:
            logger.error("key store failure on %r %r: %s", request.method, request.path, str(error))
        self._relay.store_failed(error)
        headers = {"Retry-After": str(STORE_RETRY_AFTER)}
        if _is_api_path() or request.path.startswith("/dashboard/"):
            return _json(
                {"error": "store_unavailable", "detail": STORE_UNAVAILABLE_MESSAGE}, 503, headers
            )
        return await self._page(
            status=503,
            title="Unavailable",
            message=STORE_UNAVAILABLE_MESSAGE,
            show_form=False,
            headers=headers,
        )

    async def internal_error(self, error: Exception) -> Response:
        # The traceback goes to the log, never to the client. Only the path is named (the
        # query string is the client's and is not logged).
        logger.error("unhandled error on %r %r", request.method, request.path, exc_info=error)
        detail = "The relay failed to answer this request."
        if _is_api_path():
            return _json({"error": "internal_error", "detail": detail}, 500)
        return await self._page(status=500, title="Error", message=detail, show_form=False)


def _unauthorized(detail: str) -> _Refusal:
    return _Refusal(
        401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="repowire"'}
    )
