"""The relay's ASGI application: routes each request to its owner.

- ``/ws/relay``: daemon links (plain ASGI, :mod:`relay._daemon_link`).
- ``/ws/replica``: in a cluster, the links of the other replicas (:mod:`relay._replica_link`);
  404 on a relay alone.
- The relay's own pages and API (the Quart app of :mod:`relay._web`): ``/``, ``/auth``,
  ``/health``, ``/signin``, ``/favicon.ico``, ``/static/...``, and, at the root or under
  ``/d/<daemon id>/``,
  ``/dashboard...``, ``/api/v1/...`` and ``/logout``.
- Everything else is tunneled (plain ASGI, :mod:`relay._tunnel`): under ``/d/<daemon id>/`` to
  that daemon, elsewhere to the scope's default daemon (the one connected the longest). In a
  cluster, a daemon whose link another replica holds is reached through that replica.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import trio

from common import DAEMON_ID_PATTERN, hash_secret
from protocol import CloseCode

from ._asgi_guard import AsgiGuard, ResponseSequenceError
from ._asgi_transport import Receive, Send
from ._context import Relay
from ._daemon_link import handle_daemon_link
from ._links import DaemonLink
from ._store_api import StoreError
from ._tunnel import (
    StreamOpener,
    deny_websocket,
    has_request_body,
    open_daemon_stream,
    open_forwarded_daemon_stream,
    refuse_early,
    send_json,
    tunnel_http,
    tunnel_websocket,
)
from ._web import STORE_UNAVAILABLE_MESSAGE, create_web_app

_DAEMON_PREFIX = re.compile(rf"^/d/({DAEMON_ID_PATTERN.pattern})(/.*)?$")
# /metrics stays the relay's own path (404 here: it is served on its own listener), never tunneled.
_ROOT_ONLY = ("/", "/auth", "/health", "/metrics", "/signin", "/favicon.ico")
#: Where replicas of a cluster link to each other (``relay._replica_link.REPLICA_PATH``).
REPLICA_PATH = "/ws/replica"
#: Seconds a tunneled request waits for its daemon's link to finish its handshake (the link
#: exists but is not registered yet) before the relay answers 503.
LINK_ARRIVAL_WAIT = 5.0
#: What the browser is told when its access ends mid-request (``LiveRequest.ended_by``).
ACCESS_ENDED = {"revoked": "access revoked", "signed_out": "signed out"}
#: Seconds the relay waits, answering nothing, on a WebSocket upgrade that announces a body
#: (see :func:`ignore_upgrade_with_body`) before it returns the request to hypercorn.
UPGRADE_WITH_BODY_WAIT = 5.0


async def ignore_upgrade_with_body(receive: Receive) -> None:
    """Leave a WebSocket upgrade that announces a body (Content-Length or Transfer-Encoding)
    to hypercorn, answering nothing: returns when the client leaves, or after
    ``UPGRADE_WITH_BODY_WAIT``.

    hypercorn answers such an upgrade 400 itself as soon as a byte of its body arrives, and
    then reports nothing more to the app, not even ``websocket.disconnect``: a tunnel would
    wait on the browser for good, holding a stream slot. And an answer of the app's racing
    hypercorn's 400 makes hypercorn send a second response, which fails its connection task
    and with it the whole server. So no stream, no answer: hypercorn's 400 is the answer
    (or, if the body never comes, hypercorn's 500 when the app returns)."""
    with trio.move_on_after(UPGRADE_WITH_BODY_WAIT):
        while (await receive())["type"] != "websocket.disconnect":
            pass


async def reject(
    scope: dict[str, Any], receive: Receive, send: Send, status: int, code: str, detail: str
) -> None:
    """Refuse a request the relay will not serve, WebSocket or HTTP alike: an HTTP ``status``
    with a JSON body ``{"error": code, "detail": detail}`` (a WebSocket upgrade is denied
    with it, where the server lets the app answer the handshake with HTTP)."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await deny_websocket(send, scope, status, code, detail)
    else:
        await refuse_early(scope, send, status, code, detail)


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
        # Everything, the Quart pages included, runs behind the guard: nothing one request
        # does can reach hypercorn as an exception or an invalid message sequence.
        self._guarded = AsgiGuard(self.route)

    async def web(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """The Quart app of the relay's own routes (typed loosely: ASGI dicts pass through)."""
        app: Any = self._quart
        await app(scope, receive, send)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await self._guarded(scope, receive, send)

    async def route(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Route one request (unguarded: call the app itself)."""
        kind = scope["type"]
        if kind == "lifespan":
            await self.web(scope, receive, send)
            return
        path: str = scope["path"]
        if kind == "websocket" and has_request_body(scope["headers"]):
            await ignore_upgrade_with_body(receive)
            return
        if kind == "websocket" and path == "/ws/relay":
            await handle_daemon_link(self.relay, scope, receive, send)
            return
        if kind == "websocket" and path == REPLICA_PATH:
            await self._replica_link(scope, receive, send)
            return
        if _head_size(scope) > self.relay.settings.max_header_size:
            detail = f"Request heads are limited to {self.relay.settings.max_header_size} bytes."
            await reject(scope, receive, send, 431, "header_too_large", detail)
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

    async def _replica_link(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """A peer replica's link: served in a cluster, not found on a relay alone."""
        cluster = self.relay.cluster
        if cluster is None:
            await reject(
                scope, receive, send, 404, "not_found", "There is nothing at this address."
            )
            return
        from ._replica_link import handle_replica_link

        await handle_replica_link(scope, receive, send, cluster=cluster)

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
        session_id = relay.session_id_from(headers)
        try:
            session = await relay.browser_session(headers)
        except StoreError as exc:
            # A session this relay holds rides out an outage (the store caches it); this
            # one is not among them, and nothing can be checked now.
            relay.store_failed(exc)
            await reject(scope, receive, send, 503, "store_unavailable", STORE_UNAVAILABLE_MESSAGE)
            return
        if session is None or session_id is None:
            await reject(scope, receive, send, 401, "unauthorized", "Sign in on the relay first.")
            return
        state_changing = not websocket and scope["method"] not in ("GET", "HEAD", "OPTIONS")
        if (websocket or state_changing) and not relay.origin_allowed(
            headers, scope.get("scheme", "http")
        ):
            detail = relay.origin_refusal(headers, scope.get("scheme", "http"), scope["path"])
            await reject(scope, receive, send, 403, "bad_origin", detail)
            return
        query = scope.get("query_string") or b""
        target = raw_path + (b"?" + query if query else b"")
        # Registered by the session's digest (the raw id is never kept) and its key, so that
        # revoking the key or signing out cancels this request at once -- the wait for its
        # daemon's link included, so no request slips past a revocation during that wait.
        with relay.live_access.hold(hash_secret(session_id), session.key_id) as live:
            with live.cancel_scope:
                opener = await self._opener_for(session.scope_id, daemon_id)
                if live.ended_by is not None:
                    pass  # answered below (the guard shields sends: none may go out here)
                elif opener is None:
                    missing = await self._offline_detail(session.scope_id, daemon_id)
                    await reject(scope, receive, send, 503, "daemon_offline", missing)
                elif websocket:
                    await tunnel_websocket(
                        relay, scope, receive, send, opener, target, session.scope_id
                    )
                else:
                    await tunnel_http(relay, scope, receive, send, opener, target, session.scope_id)
            if live.ended_by is not None:
                await self._access_ended(scope, send, live.ended_by)

    async def _opener_for(self, scope_id: str, daemon_id: str | None) -> StreamOpener | None:
        """How to reach the daemon a request is for (``daemon_id``, or the scope's default):
        over this relay's own link, or (in a cluster) through the replica holding its link;
        None when no daemon is there to try."""
        relay = self.relay
        if relay.cluster is not None and daemon_id is None:
            # The default daemon is the cluster's (the same on every replica), not this
            # replica's oldest link.
            online = await relay.online_daemons(scope_id)
            if online:
                daemon_id = online[0].daemon_id
        link = self._link_for(scope_id, daemon_id)
        if link is None and relay.links.is_arriving(scope_id, daemon_id):
            # Its link is in the handshake: a moment's wait beats a 503.
            with trio.move_on_after(LINK_ARRIVAL_WAIT):
                await relay.links.wait_arrival(scope_id, daemon_id)
            link = self._link_for(scope_id, daemon_id)
        if link is not None:
            return partial(open_daemon_stream, relay, link)
        if relay.cluster is None:
            return None
        if daemon_id is None:
            online = await relay.online_daemons(scope_id)
            if not online:
                return None
            first = online[0]
            if first.link is not None:
                return partial(open_daemon_stream, relay, first.link)
            daemon_id = first.daemon_id
        return partial(open_forwarded_daemon_stream, relay, scope_id, daemon_id, "http")

    async def _access_ended(self, scope: dict[str, Any], send: Send, why: str) -> None:
        """Tell the browser its access ended mid-request: a WebSocket is closed with
        ``CloseCode.POLICY_VIOLATION`` (1008), a response not started yet becomes 401 JSON; a
        started one stays aborted (the guard closes its connection)."""
        reason = ACCESS_ENDED.get(why, "access ended")
        try:
            if scope["type"] == "websocket":
                await send(
                    {
                        "type": "websocket.close",
                        "code": CloseCode.POLICY_VIOLATION,
                        "reason": reason,
                    }
                )
            else:
                await send_json(send, 401, "access_ended", f"Access ended: {reason}.", close=True)
        except ResponseSequenceError:
            pass  # too late for an answer: the response had started (or the socket closed)

    def _link_for(self, scope_id: str, daemon_id: str | None) -> DaemonLink | None:
        links = self.relay.links
        return links.default_for(scope_id) if daemon_id is None else links.get(scope_id, daemon_id)

    async def _offline_detail(self, scope_id: str, daemon_id: str | None) -> str:
        """Why nothing answers, in one sentence, naming only this scope's own daemons."""
        if daemon_id is None:
            return "No daemon is connected with this key."
        try:
            known = {known_id for known_id, _, _ in await self.relay.store.known_daemons(scope_id)}
        except StoreError:
            # Offline and unknown cannot be told apart now; either way it is not here.
            return f"Daemon {daemon_id} is not connected."
        if daemon_id in known:
            return f"Daemon {daemon_id} is offline."
        return f"No daemon {daemon_id} has connected with this key."
