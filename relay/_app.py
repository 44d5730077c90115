"""The relay's ASGI application: routes each request to its owner.

- ``/ws/relay``: daemon links (plain ASGI, :mod:`relay._daemon_link`).
- The relay's own pages and API (the Quart app of :mod:`relay._web`): ``/``, ``/auth``,
  ``/health``, ``/metrics``, ``/static/...``, and, at the root or under ``/d/<daemon id>/``,
  ``/dashboard...``, ``/api/v1/...`` and ``/logout``.
- Everything else is tunneled (plain ASGI, :mod:`relay._tunnel`): under ``/d/<daemon id>/`` to
  that daemon, elsewhere to the scope's default daemon (the one connected the longest).
"""

from __future__ import annotations

import re
from typing import Any

import trio

from ._asgi_transport import Receive, Send
from ._context import Relay
from ._daemon_link import handle_daemon_link
from ._links import DaemonLink
from ._tunnel import deny_websocket, refuse, tunnel_http, tunnel_websocket
from ._web import create_web_app

_DAEMON_PREFIX = re.compile(r"^/d/([A-Za-z0-9._-]{1,64})(/.*)?$")
_ROOT_ONLY = ("/", "/auth", "/health", "/metrics")
#: Seconds a tunneled request waits for its daemon's link to finish its handshake (the link
#: exists but is not registered yet) before the relay answers 503.
LINK_ARRIVAL_WAIT = 5.0


def _owned(path: str, *, at_root: bool) -> bool:
    if at_root and (path in _ROOT_ONLY or path.startswith("/static/")):
        return True
    return (
        path == "/dashboard"
        or path.startswith("/dashboard/")
        or path.startswith("/api/v1/")
        or path == "/logout"
    )


def _head_size(scope: dict[str, Any]) -> int:
    """Bytes of the request head as the client sent it (near enough: line and headers)."""
    raw_path = scope.get("raw_path") or b""
    size = len(raw_path) + len(scope.get("query_string") or b"") + 16
    return size + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


class RelayApp:
    """ASGI entry point of one relay."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._quart = create_web_app(relay)

    async def web(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """The Quart app of the relay's own routes (typed loosely: ASGI dicts pass through)."""
        app: Any = self._quart
        await app(scope, receive, send)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.web(scope, receive, send)
            return
        path: str = scope["path"]
        if kind == "websocket" and path == "/ws/relay":
            await handle_daemon_link(self.relay, scope, receive, send)
            return
        if _head_size(scope) > self.relay.settings.max_header_size:
            detail = f"Request heads are limited to {self.relay.settings.max_header_size} bytes."
            if kind == "websocket":
                await receive()
                await deny_websocket(send, scope, 431, "header_too_large", detail)
            else:
                await refuse(send, receive, 431, "header_too_large", detail, close=True)
            return
        daemon_id: str | None = None
        rest = path
        raw_path: bytes = scope.get("raw_path") or path.encode("utf-8")
        raw_rest = raw_path
        match = _DAEMON_PREFIX.match(path)
        if match:
            daemon_id = match.group(1)
            rest = match.group(2) or "/"
            prefix = f"/d/{daemon_id}".encode()
            raw_rest = raw_path[len(prefix) :] if raw_path.startswith(prefix) else rest.encode()
            raw_rest = raw_rest or b"/"
        if _owned(rest, at_root=daemon_id is None):
            inner = dict(scope)
            inner["path"] = rest
            inner["raw_path"] = raw_rest
            if daemon_id is not None:
                inner["repowire.daemon_id"] = daemon_id
            await self.web(inner, receive, send)
            return
        await self._tunnel(scope, receive, send, daemon_id, raw_rest)

    async def _tunnel(
        self,
        scope: dict[str, Any],
        receive: Receive,
        send: Send,
        daemon_id: str | None,
        raw_path: bytes,
    ) -> None:
        relay = self.relay
        websocket = scope["type"] == "websocket"
        headers = scope["headers"]
        session = relay.browser_session(headers)
        if session is None:
            if websocket:
                await receive()
                await deny_websocket(
                    send, scope, 401, "unauthorized", "Sign in on the relay first."
                )
            else:
                await refuse(send, receive, 401, "unauthorized", "Sign in on the relay first.")
            return
        state_changing = not websocket and scope["method"] not in ("GET", "HEAD", "OPTIONS")
        if (websocket or state_changing) and not relay.origin_allowed(
            headers, scope.get("scheme", "http")
        ):
            if websocket:
                await receive()
                await deny_websocket(send, scope, 403, "bad_origin", "Cross-site request refused.")
            else:
                await refuse(send, receive, 403, "bad_origin", "Cross-site request refused.")
            return
        link = self._link_for(session.scope_id, daemon_id)
        if link is None and relay.links.is_arriving(session.scope_id, daemon_id):
            # Its link is in the handshake: a moment's wait beats a 503.
            with trio.move_on_after(LINK_ARRIVAL_WAIT):
                await relay.links.wait_arrival(session.scope_id, daemon_id)
            link = self._link_for(session.scope_id, daemon_id)
        if link is None:
            missing = self._offline_detail(session.scope_id, daemon_id)
            if websocket:
                await receive()
                await deny_websocket(send, scope, 503, "daemon_offline", missing)
            else:
                await refuse(send, receive, 503, "daemon_offline", missing)
            return
        query = scope.get("query_string") or b""
        target = raw_path + (b"?" + query if query else b"")
        if websocket:
            await tunnel_websocket(relay, scope, receive, send, link, target)
        else:
            await tunnel_http(relay, scope, receive, send, link, target)

    def _link_for(self, scope_id: str, daemon_id: str | None) -> DaemonLink | None:
        links = self.relay.links
        return links.default_for(scope_id) if daemon_id is None else links.get(scope_id, daemon_id)

    def _offline_detail(self, scope_id: str, daemon_id: str | None) -> str:
        """Why nothing answers, in one sentence, naming only this scope's own daemons."""
        if daemon_id is None:
            return "No daemon is connected with this key."
        known = {known_id for known_id, _, _ in self.relay.store.known_daemons(scope_id)}
        if daemon_id in known:
            return f"Daemon {daemon_id} is offline."
        return f"No daemon {daemon_id} has connected with this key."
