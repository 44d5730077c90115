"""The relay: daemon links over ``/ws/relay``, the browser auth and dashboard, and the tunnel.

The server parts (hypercorn, Quart, the tunnel) load on first use, so tools that only need the
key helpers or the store (the CLI's ``status``, ``relay keys``) start quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._ratelimit import RateLimiter as RateLimiter
from ._settings import RelaySettings as RelaySettings
from ._store import MEMORY as MEMORY
from ._store import SESSION_CACHE_TTL as SESSION_CACHE_TTL
from ._store import KeyRecord as KeyRecord
from ._store import KeyStore as KeyStore
from ._store import SessionRecord as SessionRecord
from ._store import StoreError as StoreError
from ._store import UnknownRecordError as UnknownRecordError

if TYPE_CHECKING:
    from ._app import RelayApp as RelayApp
    from ._asgi_guard import AsgiGuard as AsgiGuard
    from ._context import SESSION_COOKIE as SESSION_COOKIE
    from ._context import Relay as Relay
    from ._links import DaemonLink as DaemonLink
    from ._links import LinkRegistry as LinkRegistry
    from ._server import ListenError as ListenError
    from ._server import RunningRelay as RunningRelay
    from ._server import serve_relay as serve_relay
    from ._server import serve_relay_main as serve_relay_main

_LAZY = {
    "RelayApp": "._app",
    # Also guards the daemon's app (repowire.daemon): one request's failure ends that request.
    "AsgiGuard": "._asgi_guard",
    "SESSION_COOKIE": "._context",
    "Relay": "._context",
    "DaemonLink": "._links",
    "LinkRegistry": "._links",
    "ListenError": "._server",
    "RunningRelay": "._server",
    "serve_relay": "._server",
    "serve_relay_main": "._server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'relay' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = sorted(
    [
        name
        for name in dir()
        if not name.startswith("_")
        and name not in ("annotations", "importlib", "TYPE_CHECKING", "Any")
    ]
    + list(_LAZY)
)
