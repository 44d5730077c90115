"""The relay: daemon links over ``/ws/relay``, the browser auth and dashboard, and the tunnel.

The server parts (hypercorn, Quart, the tunnel) and the Redis store (coredis) load on first use,
so tools that only need the key helpers or the SQLite store (the CLI's ``status``, ``relay
keys``) start quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._ratelimit import RateLimiter as RateLimiter
from ._settings import RelaySettings as RelaySettings
from ._settings import read_cluster_secret as read_cluster_secret
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
    from ._migrate import MigrationConflict as MigrationConflict
    from ._migrate import MigrationReport as MigrationReport
    from ._migrate import migrate_to_redis as migrate_to_redis
    from ._redis_store import RedisStore as RedisStore
    from ._server import ListenError as ListenError
    from ._server import RunningRelay as RunningRelay
    from ._server import serve_relay as serve_relay
    from ._server import serve_relay_main as serve_relay_main
    from ._sqlite_store import SqliteStore as SqliteStore
    from ._store_api import DEFAULT_NAMESPACE as DEFAULT_NAMESPACE
    from ._store_api import Store as Store
    from ._store_api import StoreUnavailable as StoreUnavailable

_LAZY = {
    "RelayApp": "._app",
    # Also guards the daemon's app (repowire.daemon): one request's failure ends that request.
    "AsgiGuard": "._asgi_guard",
    "SESSION_COOKIE": "._context",
    "Relay": "._context",
    "DaemonLink": "._links",
    "LinkRegistry": "._links",
    "MigrationConflict": "._migrate",
    "MigrationReport": "._migrate",
    "migrate_to_redis": "._migrate",
    "RedisStore": "._redis_store",
    "ListenError": "._server",
    "RunningRelay": "._server",
    "serve_relay": "._server",
    "serve_relay_main": "._server",
    "SqliteStore": "._sqlite_store",
    "DEFAULT_NAMESPACE": "._store_api",
    "Store": "._store_api",
    "StoreUnavailable": "._store_api",
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
