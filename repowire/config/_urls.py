"""Relay URLs: what one may be, how ``http(s)://`` is taken, and the URLs derived from one."""

from __future__ import annotations

import urllib.parse

from ._errors import ConfigError, redact_secrets

#: The relay's daemon endpoint. A relay URL names the relay's root or this path, nothing else.
RELAY_LINK_PATH = "/ws/relay"
#: How an ``http(s)://`` relay URL is taken: the daemon's link to a relay is a WebSocket.
_HTTP_TO_WS = {"http": "ws", "https": "wss"}


def relay_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a relay URL, or ``None`` when it can.

    A relay URL is ``ws://`` or ``wss://`` with a host, an optional port, no credentials, query
    or fragment (a secret must never travel in a URL), and a path that is empty, ``/`` or
    :data:`RELAY_LINK_PATH` (any other path reaches no relay, and the relay's answer to it
    would read like a refused key). ``http(s)://`` is refused here: see
    :func:`normalize_relay_url`, which maps it first.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("ws", "wss"):
        return "must start with ws:// or wss://"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials (the API key goes in relay.api_key)"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "must not contain a query or a fragment"
    if port == 0:
        return "has port 0"
    if parts.path.rstrip("/") not in ("", RELAY_LINK_PATH):
        return (
            f"names the path {parts.path!r}: a relay URL names the relay's root (such as "
            f"{parts.scheme}://{parts.netloc}) or its {RELAY_LINK_PATH} endpoint"
        )
    return None


def normalize_relay_url(url: str) -> tuple[str, str | None]:
    """``url`` as a relay URL, and a note when it was changed to get there.

    ``http://`` becomes ``ws://`` and ``https://`` becomes ``wss://`` (the relay serves both
    on one origin); nothing else changes. The result may still have a
    :func:`relay_url_problem`.
    """
    scheme, sep, rest = url.partition("://")
    mapped = _HTTP_TO_WS.get(scheme.lower()) if sep else None
    if mapped is None:
        return url, None
    new = f"{mapped}://{rest}"
    return new, f"relay URL {redact_secrets(url)!r} taken as {redact_secrets(new)!r}"


def dashboard_url(relay_url: str, daemon_id: str) -> str:
    """Where a browser finds this daemon's dashboard through the relay:
    ``wss://relay.example`` -> ``https://relay.example/d/<daemon id>/dashboard/``.

    Raises :class:`ConfigError` when ``relay_url`` is not a valid relay URL.
    """
    return f"{http_base(relay_url)}/d/{urllib.parse.quote(daemon_id, safe='')}/dashboard/"


def http_base(relay_url: str) -> str:
    """The relay's HTTP origin: ``wss://h/p`` -> ``https://h``, ``ws://h:8000`` -> ``http://h:8000``.

    Raises :class:`ConfigError` when ``relay_url`` is not a valid relay URL.
    """
    problem = relay_url_problem(relay_url)
    if problem is not None:
        raise ConfigError(f"relay URL {redact_secrets(relay_url)!r} {problem}")
    parts = urllib.parse.urlsplit(relay_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    # netloc holds no userinfo here (refused above), so it is exactly host[:port].
    return f"{scheme}://{parts.netloc}"
