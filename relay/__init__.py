"""The relay: daemon links over ``/ws/relay``, the browser auth and dashboard, and the tunnel."""

from ._app import RelayApp as RelayApp
from ._context import SESSION_COOKIE as SESSION_COOKIE
from ._context import Relay as Relay
from ._keys import KEY_PREFIX as KEY_PREFIX
from ._keys import generate_key as generate_key
from ._keys import generate_public_id as generate_public_id
from ._keys import generate_session_id as generate_session_id
from ._keys import hash_secret as hash_secret
from ._keys import looks_like_key as looks_like_key
from ._keys import looks_like_session_id as looks_like_session_id
from ._keys import mask_key as mask_key
from ._links import DaemonLink as DaemonLink
from ._links import LinkRegistry as LinkRegistry
from ._ratelimit import RateLimiter as RateLimiter
from ._server import RunningRelay as RunningRelay
from ._server import serve_relay as serve_relay
from ._server import serve_relay_main as serve_relay_main
from ._settings import RelaySettings as RelaySettings
from ._store import MEMORY as MEMORY
from ._store import SESSION_CACHE_TTL as SESSION_CACHE_TTL
from ._store import KeyRecord as KeyRecord
from ._store import KeyStore as KeyStore
from ._store import SessionRecord as SessionRecord
from ._store import StoreError as StoreError
from ._store import UnknownRecordError as UnknownRecordError

__all__ = [name for name in dir() if not name.startswith("_")]
