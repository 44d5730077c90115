"""The daemon's HTTP service: the routes of docs/ARCHITECTURE.md on a QuartTrio app."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from quart import Response, request, send_file, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.routing import WebsocketMismatch

from common import DAEMON_ID_PATTERN, is_daemon_id

from ._errors import ApiError, dump_json, http_error, parse_json_object
from ._host import host_refusal
from ._mesh import MESH_FROM_HEADER, MeshClient
from ._messaging import Messenger
from ._settings import EVENTS_DEFAULT_LIMIT, EVENTS_MAX_LIMIT, DaemonSettings
from ._sse import event_stream
from ._state import DaemonState, InvalidPeerName, TooManyPeers, UnknownPeer
from ._static import DASHBOARD_CACHE_CONTROL, resolve_static
from ._ws import WebSocketLink, WebSocketSession

logger = logging.getLogger("repowire.daemon")

_DECIMAL: Final = re.compile(r"[0-9]{1,18}")
_LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})


def create_app(
    *,
    daemon_id: str,
    version: str,
    state: DaemonState,
    mesh: MeshClient | None,
    relay_status: Callable[[], Mapping[str, object]] | None,
    dashboard_dir: Path,
    settings: DaemonSettings | None = None,
) -> QuartTrio:
    """Build the daemon's app. Serve it with :func:`serve_daemon`.

    ``mesh`` is None when the relay is disabled (then ``peer@other`` targets answer 503
    ``relay_disabled`` and broadcasts stay local); ``relay_status`` gives the connector's
    status for ``/health`` as a JSON-ready mapping (None: ``{"state": "disabled"}``).
    ``dashboard_dir`` holds the dashboard's static files. Raises ValueError if ``daemon_id``
    is not a valid id.
    """
    if not is_daemon_id(daemon_id):
        raise ValueError(f"daemon id {daemon_id!r} must match {DAEMON_ID_PATTERN.pattern}")
    settings = settings or DaemonSettings()
    app = QuartTrio("repowire.daemon", static_folder=None, template_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    # No redirects invented by the router: they would carry an absolute URL built from the
    # Host header, which is wrong behind the relay. "//" in a path is simply not found.
    app.url_map.merge_slashes = False
    routes = _Routes(
        app=app,
        daemon_id=daemon_id,
        version=version,
        state=state,
        messenger=Messenger(daemon_id=daemon_id, state=state, mesh=mesh, settings=settings),
        relay_status=relay_status,
        dashboard_dir=dashboard_dir,
        settings=settings,
    )
    # Before routing's own errors too, so a foreign Host learns nothing, not even a 404.
    app.before_request(routes.check_request_host)
    app.before_websocket(routes.check_websocket_host)
    app.add_url_rule("/health", "health", routes.health, methods=["GET"])
    app.add_url_rule("/peers", "peers", routes.list_peers, methods=["GET"])
    app.add_url_rule("/peers", "add_peer", routes.add_peer, methods=["POST"])
    app.add_url_rule("/peers/<name>", "remove_peer", routes.remove_peer, methods=["DELETE"])
    app.add_url_rule("/events", "events", routes.events, methods=["GET"])
    app.add_url_rule("/events/stream", "event_stream", routes.event_stream, methods=["GET"])
    app.add_url_rule("/notify", "notify", routes.notify, methods=["POST"])
    app.add_url_rule("/broadcast", "broadcast", routes.broadcast, methods=["POST"])
    app.add_url_rule("/dashboard", "dashboard", routes.dashboard_redirect, methods=["GET"])
    app.add_url_rule("/dashboard/", "dashboard_index", routes.dashboard_index, methods=["GET"])
    app.add_url_rule(
        "/dashboard/<path:subpath>", "dashboard_file", routes.dashboard_file, methods=["GET"]
    )
    app.add_websocket("/ws", "ws", routes.ws)
    app.add_url_rule("/ws", "ws_plain", routes.ws_plain, methods=["GET"])
    app.register_error_handler(ApiError, routes.api_error)
    app.register_error_handler(HTTPException, routes.http_error)
    return app


class _Routes:
    def __init__(
        self,
        *,
        app: QuartTrio,
        daemon_id: str,
        version: str,
        state: DaemonState,
        messenger: Messenger,
        relay_status: Callable[[], Mapping[str, object]] | None,
        dashboard_dir: Path,
        settings: DaemonSettings,
    ) -> None:
        self._app = app
        self._daemon_id = daemon_id
        self._version = version
        self._state = state
        self._messenger = messenger
        self._relay_status = relay_status
        self._dashboard_dir = dashboard_dir
        self._settings = settings

    # -- helpers ------------------------------------------------------------------------

    def _json(self, body: Mapping[str, object], status: int = 200) -> Response:
        return self._app.response_class(
            dump_json(body), status=status, content_type="application/json"
        )

    async def _json_body(self) -> dict[str, object]:
        """The request body as a JSON object; raises ApiError (400/413/415)."""
        if request.mimetype != "application/json":
            # Requiring this type also makes browsers preflight cross-site posts, which this
            # daemon never approves: a web page cannot post to it behind the user's back.
            raise http_error(415)
        raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        return parse_json_object(raw)

    @staticmethod
    def _check_host(hosts: list[str], server: object) -> None:
        """Raise ``ApiError(421, "bad_host")`` unless the request names this daemon (see
        :func:`host_refusal`)."""
        if len(hosts) > 1:
            raise ApiError(421, "bad_host", "The request has more than one Host header.")
        address: tuple[str, int] | None = None
        if isinstance(server, (tuple, list)) and len(server) == 2:
            host, port = server
            if isinstance(host, str) and isinstance(port, int):
                address = (host, port)
        reason = host_refusal(hosts[0] if hosts else None, address)
        if reason is not None:
            raise ApiError(421, "bad_host", reason)

    async def check_request_host(self) -> None:
        self._check_host(request.headers.getlist("Host"), request.scope.get("server"))

    async def check_websocket_host(self) -> None:
        self._check_host(websocket.headers.getlist("Host"), websocket.scope.get("server"))

    @staticmethod
    def _via() -> str | None:
        value = request.headers.get(MESH_FROM_HEADER)
        if value is None:
            return None
        if not is_daemon_id(value):
            raise ApiError(
                400, "bad_request", f"The {MESH_FROM_HEADER} header must be a daemon id."
            )
        return value

    @staticmethod
    def _decimal(value: str | None, name: str, *, default: int, low: int = 0, high: int = 0) -> int:
        """``value`` as a whole number in ``[low, high]`` (no upper bound if ``high`` is 0)."""
        if value is None:
            return default
        number = int(value) if _DECIMAL.fullmatch(value) else -1
        if number < low or (high and number > high):
            bound = f"from {low} to {high}" if high else f"of at least {low}"
            raise ApiError(400, "bad_request", f"'{name}' must be a whole number {bound}.")
        return number

    # -- routes -------------------------------------------------------------------------

    async def health(self) -> Response:
        relay: Mapping[str, object] = {"state": "disabled"}
        if self._relay_status is not None:
            try:
                relay = dict(self._relay_status())
            except Exception:
                logger.exception("reading the relay status failed")
                relay = {"state": "unknown"}
        return self._json(
            {
                "status": "ok",
                "daemon_id": self._daemon_id,
                "version": self._version,
                "relay": relay,
            }
        )

    async def list_peers(self) -> Response:
        return self._json({"peers": [peer.to_json() for peer in self._state.peers()]})

    async def add_peer(self) -> Response:
        body = await self._json_body()
        name = body.get("name")
        meta = body.get("meta")
        if not isinstance(name, str):
            raise ApiError(400, "bad_request", "The field 'name' is required and must be a string.")
        if meta is not None and not isinstance(meta, dict):
            raise ApiError(400, "bad_request", "The field 'meta' must be a JSON object.")
        try:
            peer, created = self._state.add_peer(name, meta)
        except InvalidPeerName as exc:
            raise ApiError(400, "bad_request", f"The {exc}.") from None
        except TooManyPeers as exc:
            raise ApiError(409, "too_many_peers", f"No more peers can be added: {exc}.") from None
        return self._json({"peer": peer.to_json()}, 201 if created else 200)

    async def remove_peer(self, name: str) -> Response:
        try:
            self._state.remove_peer(name)
        except UnknownPeer:
            raise ApiError(
                404, "unknown_peer", f"No peer named {name!r} is registered here."
            ) from None
        return self._app.response_class("", status=204)

    async def events(self) -> Response:
        after = self._decimal(request.args.get("after"), "after", default=0)
        limit = self._decimal(
            request.args.get("limit"),
            "limit",
            default=EVENTS_DEFAULT_LIMIT,
            low=1,
            high=EVENTS_MAX_LIMIT,
        )
        events = self._state.events_after(after, limit)
        return self._json({"events": [event.to_json() for event in events]})

    async def event_stream(self) -> Response:
        # An EventSource sends Last-Event-ID when it reconnects; that is newer than the
        # ?after= it was first opened with, so it wins.
        last_event_id = request.headers.get("Last-Event-ID", "").strip()
        # An empty value means "no id yet" (the SSE spec lets an id field reset it).
        if last_event_id:
            after = self._decimal(last_event_id, "Last-Event-ID", default=0)
        else:
            after = self._decimal(
                request.args.get("after"), "after", default=self._state.last_event_id
            )
        response = self._app.response_class(
            event_stream(
                self._state,
                after=after,
                keepalive_interval=self._settings.sse_keepalive_interval,
                retry_ms=self._settings.sse_retry_ms,
            ),
            status=200,
            content_type="text/event-stream; charset=utf-8",
        )
        response.headers["Cache-Control"] = "no-cache"
        # Asks nginx-style proxies not to buffer the stream.
        response.headers["X-Accel-Buffering"] = "no"
        # The stream lives as long as the client stays; no response deadline.
        response.timeout = None
        return response

    async def notify(self) -> Response:
        via = self._via()
        status, answer = await self._messenger.notify(await self._json_body(), via=via)
        return self._json(answer, status)

    async def broadcast(self) -> Response:
        via = self._via()
        results = await self._messenger.broadcast(await self._json_body(), via=via)
        return self._json({"results": results})

    async def dashboard_redirect(self) -> Response:
        # A relative Location stays right behind the relay, whatever host the browser used.
        return self._app.response_class("", status=308, headers={"Location": "/dashboard/"})

    async def dashboard_index(self) -> Response:
        return await self._static("")

    async def dashboard_file(self, subpath: str) -> Response:
        return await self._static(subpath)

    async def _static(self, subpath: str) -> Response:
        path = resolve_static(self._dashboard_dir, subpath)
        if path is None:
            raise ApiError(404, "not_found", "There is no dashboard file at this path.")
        response = await send_file(path, conditional=True)
        # Every file, not only the page: the dashboard's names carry no content hash, so a
        # browser that kept app.js for hours would run old code after an upgrade. "no-cache"
        # still stores the file but revalidates it (ETag / Last-Modified, a cheap 304).
        response.headers["Cache-Control"] = DASHBOARD_CACHE_CONTROL
        response.headers.pop("Expires", None)
        return response

    async def ws_plain(self) -> Response:
        response = self._json(
            {
                "error": "upgrade_required",
                "detail": "This path only accepts WebSocket connections.",
            },
            426,
        )
        response.headers["Upgrade"] = "websocket"
        return response

    async def ws(self) -> None:
        origin = websocket.headers.get("Origin")
        if not _origin_allowed(origin, websocket.headers.get("Host")):
            raise ApiError(403, "forbidden", "WebSocket connections from this origin are refused.")
        after_arg = websocket.args.get("after")
        after = None if after_arg is None else self._decimal(after_arg, "after", default=0)
        await websocket.accept()
        session = WebSocketSession(
            WebSocketLink(receive=websocket.receive, send=websocket.send, close=websocket.close),
            state=self._state,
            notify=partial(self._messenger.notify, via=None),
            after=after,
            final_send_timeout=self._settings.ws_final_send_timeout,
        )
        await session.run()

    # -- errors -------------------------------------------------------------------------

    async def api_error(self, error: ApiError) -> Response:
        return self._json(error.to_json(), error.status)

    async def http_error(self, error: HTTPException) -> Response:
        status = error.code or 500
        if isinstance(error, RequestEntityTooLarge):
            api_error = http_error(
                413, f"The request body is larger than {self._settings.max_body_bytes} bytes."
            )
        elif isinstance(error, WebsocketMismatch):
            api_error = http_error(
                400, "This path does not accept this kind of request (HTTP or WebSocket)."
            )
        else:
            api_error = http_error(status)
        response = self._json(api_error.to_json(), status)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response


def _origin_allowed(origin: str | None, host: str | None) -> bool:
    """Whether a WebSocket may be opened from ``origin``.

    Clients that are not browsers send no Origin and are allowed. A browser page may connect
    if it was served by this same host (``Origin`` matches ``Host``) or from a loopback
    address; a page of any other site may not, since it would read the event feed.
    """
    if origin is None:
        return True
    try:
        parts = urlsplit(origin)
        hostname = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not hostname:
        return False
    if host is not None and parts.netloc.lower() == host.lower():
        return True
    return hostname in _LOOPBACK_HOSTS
