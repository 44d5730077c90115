"""Which ``Host`` headers the daemon answers: its defence against DNS rebinding.

A web page whose name an attacker re-points at 127.0.0.1 reaches the daemon with the
attacker's own name in ``Host`` (the browser sends the name it resolved), and the browser
then treats the daemon as that page's origin: it could read ``/events``, add peers and open
``/ws``. Refusing every name but the daemon's own closes that door, whatever the path.
"""

from __future__ import annotations

import re
from typing import Final

#: The ``Host`` the relay sends for browser streams and the connector for mesh requests
#: (relay/_tunnel.py and connector/_mesh_client.py); the connector passes it on unchanged.
TUNNEL_HOST: Final = "repowire-daemon"

#: Loopback names accepted with no port or with the port the daemon listens on.
LOOPBACK_NAMES: Final = frozenset({"127.0.0.1", "localhost", "[::1]"})

#: How much of a refused ``Host`` value is echoed back in the error detail.
SHOWN_HOST_LENGTH: Final = 80

_PORT: Final = re.compile(r"[0-9]{1,5}")


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port or None)`` of a ``Host`` value, the name lower-case, an IPv6 literal
    kept in brackets; None if the value is not of that form."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        if not rest:
            return name, None
        if not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        name, colon, port_text = value.partition(":")
        if not colon:
            return (name, None) if name else None
    if not name or not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        return None
    return name, int(port_text)


def _address_name(host: str) -> str:
    """A socket address's host as it appears in a ``Host`` header."""
    host = host.lower()
    return f"[{host}]" if ":" in host else host


def host_refusal(value: str | None, server: tuple[str, int] | None) -> str | None:
    """Why a request with ``Host: value`` is refused, in one sentence; None if it is accepted.

    ``server`` is the local address the request arrived on (the ASGI scope's ``server``), so
    the port (and, when the daemon listens on another address, that address) is the one it
    really listens on. Accepted: :data:`TUNNEL_HOST` without a port; a name of
    :data:`LOOPBACK_NAMES` without a port or with the daemon's port; the listening address
    itself, with or without its port. Anything else, a missing ``Host`` included, is refused.
    """
    if value is None or not value.strip():
        return "The request has no Host header; this daemon answers only requests addressed to it."
    parsed = split_host(value)
    if parsed is not None:
        name, port = parsed
        if name == TUNNEL_HOST and port is None:
            return None
        own_port = server[1] if server is not None else None
        port_ok = port is None or port == own_port
        if port_ok and name in LOOPBACK_NAMES:
            return None
        if port_ok and server is not None and name == _address_name(server[0]):
            return None
    shown = value if len(value) <= SHOWN_HOST_LENGTH else value[:SHOWN_HOST_LENGTH] + "..."
    return (
        f"Host {shown!r} is not a name of this daemon: it answers only to 127.0.0.1, "
        "localhost and [::1] (with its own port or none) and to the relay tunnel."
    )
