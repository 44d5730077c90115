"""The key store in Redis, shared by every replica of a relay cluster (through coredis).

Same semantics as the SQLite store (see :mod:`relay._store_api`); only SHA-256 digests of keys
and session ids (:func:`common.hash_secret`) ever reach Redis. Every write that touches more
than one Redis key is one Lua script, so it is atomic: a revocation marks the key and deletes
all its sessions in one step, and a session can only be created for a key that is live at that
instant. Scripts are sent once (EVALSHA, reloaded by coredis after a server restart).

Layout, every name under the namespace prefix ``P`` (default ``repowire:``)::

    P scope:<scope_id>          hash   label, created_at
    P scope-keys:<scope_id>     set    key ids of the scope
    P keys                      set    every key id (for list_keys of all scopes)
    P key:<key digest>          hash   key_id, scope_id, label, created_at, seq, [revoked_at]
    P key-id:<key_id>           string the key's digest
    P revoked                   set    revoked key ids (lets a watcher catch up after an outage)
    P seq                       string counter: creation order, for ties in list_keys
    P session:<session digest>  hash   scope_id, key_id, created_at, expires_at; Redis expiry
                                       at the session's ttl
    P key-sessions:<key_id>     zset   session digests of the key, by expires_at (revocation
                                       deletes them)
    P session-expiry            zset   every session digest by expires_at (purge_expired)
    P daemons:<scope_id>        zset   daemon ids by last_seen (at most MAX_DAEMONS_PER_SCOPE)
    P daemons-first:<scope_id>  hash   daemon id -> first_seen
    P login-link:<token digest> hash   key_id, scope_id, daemon_id ('' for none), expires_at;
                                       Redis expiry at the link's ttl
    P login-links:<scope_id>    zset   the scope's link digests, by creation order
    P login-links               zset   every link digest by expires_at (the total bound)
    P login-link-seq            string counter: creation order of links
    P rate:<name>:<digest>      string a rate limit's bucket (the time it is full again, see
                                       :meth:`RedisStore.take_rate_token`); Redis expiry then
    P changes                   pub/sub channel: JSON {"kind", "key_id" | "session"}

Times are stored as Python's ``repr`` of the float, so they come back exactly; Lua only
compares them. A session's Redis expiry uses its ttl on the server's clock, while
:meth:`RedisStore.lookup_session` compares ``expires_at`` with the caller's ``now``: whichever
comes first ends it.

Connections: :meth:`RedisStore.open` takes a ``redis://`` (TCP), ``rediss://`` (TLS) or
``unix://`` (Unix socket) URL, for one Redis server (7.0 or later, or 6.2). For Redis Sentinel,
build the client with coredis (``coredis.Sentinel(sentinels).primary_for(service)``, entered
as an async context manager) and pass it to :class:`RedisStore` directly: coredis follows a
failover to the new primary. Redis Cluster (``coredis.RedisCluster``) is not supported: the
scripts reach keys computed at run time, which a cluster can only route within one slot.

A failure to reach Redis (connection refused or lost, a timeout, a replica that became
read-only during a failover) raises :class:`StoreUnavailable` with a one-line message; other
Redis errors raise :class:`StoreError`. Neither ever contains a secret.

Session lookups go through a cache in this object (one per relay replica), as the SQLite
store's do: a session confirmed by Redis is trusted for ``session_cache_ttl`` seconds (5 by
default) without asking again, at most ``session_cache_size`` of them. A revocation, rotation
or sign-out made through this object drops its entries at once; one made through another
object (another replica, the CLI) as soon as the change feed announces it, before the
announcement reaches the handler (:meth:`RedisStore.watch`). With an ``outage_grace``, while
Redis cannot be reached, a cached session stays usable that long since Redis last confirmed
it, so the browsers a replica already serves keep working through an outage; a lookup that
must ask Redis then fails with StoreUnavailable as any other call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, Literal, TypeVar, cast

import coredis
import trio
from coredis.commands.script import Script
from coredis.response.types import PubSubMessage
from coredis.retry import NoRetryPolicy

from common import (
    generate_key,
    generate_public_id,
    generate_session_id,
    hash_secret,
    is_daemon_id,
    looks_like_key,
    looks_like_session_id,
)

from . import _login_links, _store
from ._login_links import LOGIN_LINK_TTL, LoginLink, LoginLinksFull, looks_like_token
from ._redis_pubsub import REDIS_ERRORS, follow_channel, translate_failure
from ._session_cache import SessionCache
from ._store import (
    _PUBLIC_ID,
    SESSION_CACHE_SIZE,
    SESSION_CACHE_TTL,
    KeyRecord,
    SessionRecord,
    StoreError,
    UnknownRecordError,
    _check_label,
    _check_time,
    _shown,
)
from ._store_api import (
    DEFAULT_NAMESPACE,
    REDIS_URL_SCHEMES,
    ChangeHandler,
    ChangeKind,
    ClosedOnExit,
    StoreChange,
    StoreUnavailable,
    check_namespace,
    check_redis_url,
)

log = logging.getLogger("repowire.relay.store")

T = TypeVar("T")

#: What copying one record in did (see :meth:`RedisStore.import_key`).
ImportVerdict = Literal["copied", "same", "conflict"]

#: Seconds to connect, to wait for a reply, or for a free pooled connection, before the call
#: fails with StoreUnavailable.
DEFAULT_TIMEOUT: Final = 2.0
#: URL schemes :meth:`RedisStore.open` accepts.
URL_SCHEMES: Final = REDIS_URL_SCHEMES
#: Name the relay's connections carry in Redis's CLIENT LIST.
CLIENT_NAME: Final = "repowire-relay"
#: Expired sessions deleted per script run by :meth:`RedisStore.purge_expired` (it loops), so
#: that one run never blocks Redis for long.
PURGE_BATCH: Final = 500

_DAEMON_ID_ERROR = "daemon id must be 1 to 64 characters from A-Z a-z 0-9 . _ -"

# -- scripts --------------------------------------------------------------------------------
# Every script gets the namespace prefix as ARGV[1]. A script is not rolled back if it fails
# half-way, so each checks everything it needs before its first write.

_PRELUDE = """
local p = ARGV[1]
local function key_free(key_id, digest)
  return redis.call('EXISTS', p .. 'key:' .. digest) == 0
    and redis.call('EXISTS', p .. 'key-id:' .. key_id) == 0
end
local function insert_key(scope_id, key_id, digest, label, now)
  local seq = redis.call('INCR', p .. 'seq')
  redis.call('HSET', p .. 'key:' .. digest, 'key_id', key_id, 'scope_id', scope_id,
    'label', label, 'created_at', now, 'seq', seq)
  redis.call('SET', p .. 'key-id:' .. key_id, digest)
  redis.call('SADD', p .. 'scope-keys:' .. scope_id, key_id)
  redis.call('SADD', p .. 'keys', key_id)
end
local function end_sessions(key_id)
  local index = p .. 'key-sessions:' .. key_id
  for _, digest in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    redis.call('DEL', p .. 'session:' .. digest)
    redis.call('ZREM', p .. 'session-expiry', digest)
  end
  redis.call('DEL', index)
end
local function drop_login_link(scope_id, digest)
  redis.call('DEL', p .. 'login-link:' .. digest)
  redis.call('ZREM', p .. 'login-links:' .. scope_id, digest)
  redis.call('ZREM', p .. 'login-links', digest)
end
local function end_login_links(key_id, scope_id)
  -- A scope holds a handful of links: look at each.
  for _, digest in ipairs(redis.call('ZRANGE', p .. 'login-links:' .. scope_id, 0, -1)) do
    local owner = redis.call('HGET', p .. 'login-link:' .. digest, 'key_id')
    if owner == key_id then drop_login_link(scope_id, digest) end
  end
end
local function revoke(key_id, now, event)
  local digest = redis.call('GET', p .. 'key-id:' .. key_id)
  if not digest then return false end
  local record = p .. 'key:' .. digest
  if redis.call('EXISTS', record) == 0 or redis.call('HEXISTS', record, 'revoked_at') == 1 then
    return false
  end
  redis.call('HSET', record, 'revoked_at', now)
  redis.call('SADD', p .. 'revoked', key_id)
  end_sessions(key_id)
  end_login_links(key_id, redis.call('HGET', record, 'scope_id'))
  redis.call('PUBLISH', p .. 'changes', event)
  return true
end
local function live_key_scope(key_id)
  local digest = redis.call('GET', p .. 'key-id:' .. key_id)
  if not digest then return false end
  local key = redis.call('HMGET', p .. 'key:' .. digest, 'scope_id', 'revoked_at')
  if not key[1] or key[2] then return false end
  return key[1]
end
"""

# ARGV: p, scope_id, label, now, key_id, key digest
_CREATE_SCOPE = """
local scope = p .. 'scope:' .. ARGV[2]
if redis.call('EXISTS', scope) == 1 or not key_free(ARGV[5], ARGV[6]) then
  return 'collision'
end
redis.call('HSET', scope, 'label', ARGV[3], 'created_at', ARGV[4])
insert_key(ARGV[2], ARGV[5], ARGV[6], ARGV[3], ARGV[4])
return 'ok'
"""

# ARGV: p, scope_id, label, now, key_id, key digest
_CREATE_KEY = """
if redis.call('EXISTS', p .. 'scope:' .. ARGV[2]) == 0 then return 'no-scope' end
if not key_free(ARGV[5], ARGV[6]) then return 'collision' end
insert_key(ARGV[2], ARGV[5], ARGV[6], ARGV[3], ARGV[4])
return 'ok'
"""

# ARGV: p, old key_id, now, new key_id, new key digest, change event
_ROTATE_KEY = """
local digest = redis.call('GET', p .. 'key-id:' .. ARGV[2])
if not digest then return {'unknown'} end
local old = redis.call('HMGET', p .. 'key:' .. digest, 'scope_id', 'label', 'revoked_at')
if not old[1] then return {'unknown'} end
if old[3] then return {'revoked'} end
if not key_free(ARGV[4], ARGV[5]) then return {'collision'} end
revoke(ARGV[2], ARGV[3], ARGV[6])
insert_key(old[1], ARGV[4], ARGV[5], old[2], ARGV[3])
return {'ok', old[1], old[2]}
"""

# ARGV: p, key_id, now, change event
_REVOKE_KEY = """
if revoke(ARGV[2], ARGV[3], ARGV[4]) then return 1 end
return 0
"""

# ARGV: p, key_id
_IS_KEY_LIVE = """
local digest = redis.call('GET', p .. 'key-id:' .. ARGV[2])
if not digest then return 0 end
local record = p .. 'key:' .. digest
if redis.call('EXISTS', record) == 0 or redis.call('HEXISTS', record, 'revoked_at') == 1 then
  return 0
end
return 1
"""

# ARGV: p, scope_id or '' for every scope
_LIST_KEYS = """
local ids
if ARGV[2] == '' then
  ids = redis.call('SMEMBERS', p .. 'keys')
else
  ids = redis.call('SMEMBERS', p .. 'scope-keys:' .. ARGV[2])
end
local out = {}
for _, key_id in ipairs(ids) do
  local digest = redis.call('GET', p .. 'key-id:' .. key_id)
  if digest then
    local f = redis.call('HMGET', p .. 'key:' .. digest,
      'key_id', 'scope_id', 'label', 'created_at', 'revoked_at', 'seq')
    if f[1] then
      out[#out + 1] = {f[1], f[2], f[3], f[4], f[5] or '', f[6]}
    end
  end
end
return out
"""

# ARGV: p, key_id, session digest, now, expires_at, ttl in ms
_CREATE_SESSION = """
local digest = redis.call('GET', p .. 'key-id:' .. ARGV[2])
if not digest then return {'unknown'} end
local key = redis.call('HMGET', p .. 'key:' .. digest, 'scope_id', 'revoked_at')
if not key[1] or key[2] then return {'unknown'} end
local session = p .. 'session:' .. ARGV[3]
if redis.call('EXISTS', session) == 1 then return {'collision'} end
redis.call('HSET', session, 'scope_id', key[1], 'key_id', ARGV[2],
  'created_at', ARGV[4], 'expires_at', ARGV[5])
redis.call('PEXPIRE', session, ARGV[6])
local index = p .. 'key-sessions:' .. ARGV[2]
-- Entries of sessions already expired are dead weight: drop them while here.
redis.call('ZREMRANGEBYSCORE', index, '-inf', ARGV[4])
redis.call('ZADD', index, ARGV[5], ARGV[3])
redis.call('ZADD', p .. 'session-expiry', ARGV[5], ARGV[3])
return {'ok', key[1]}
"""

# ARGV: p, session digest, now
_LOOKUP_SESSION = """
local f = redis.call('HMGET', p .. 'session:' .. ARGV[2],
  'scope_id', 'key_id', 'created_at', 'expires_at')
if not f[1] or not f[2] or not f[4] then return false end
if tonumber(f[4]) <= tonumber(ARGV[3]) then return false end
local digest = redis.call('GET', p .. 'key-id:' .. f[2])
if not digest or redis.call('HEXISTS', p .. 'key:' .. digest, 'revoked_at') == 1 then
  return false
end
return f
"""

# ARGV: p, session digest, change event
_END_SESSION = """
local session = p .. 'session:' .. ARGV[2]
local key_id = redis.call('HGET', session, 'key_id')
redis.call('ZREM', p .. 'session-expiry', ARGV[2])
if not key_id then return 0 end
redis.call('DEL', session)
redis.call('ZREM', p .. 'key-sessions:' .. key_id, ARGV[2])
redis.call('PUBLISH', p .. 'changes', ARGV[3])
return 1
"""

# ARGV: p, now, batch size. Returns {deleted, looked at}.
_PURGE_EXPIRED = """
local due = redis.call('ZRANGEBYSCORE', p .. 'session-expiry', '-inf', ARGV[2],
  'LIMIT', 0, tonumber(ARGV[3]))
local deleted = 0
for _, digest in ipairs(due) do
  local session = p .. 'session:' .. digest
  local key_id = redis.call('HGET', session, 'key_id')
  if key_id then
    redis.call('DEL', session)
    redis.call('ZREM', p .. 'key-sessions:' .. key_id, digest)
    deleted = deleted + 1
  end
  redis.call('ZREM', p .. 'session-expiry', digest)
end
return {deleted, #due}
"""

# ARGV: p, key_id, token digest, daemon_id ('' for none), now, expires_at, ttl in ms, most
# links per scope, most links in all.
_CREATE_LOGIN_LINK = """
local scope_id = live_key_scope(ARGV[2])
if not scope_id then return {'unknown'} end
local ours = p .. 'login-links:' .. scope_id
local all = p .. 'login-links'
local now = tonumber(ARGV[5])
-- Only live links count: forget the expired (and the taken, whose record is gone).
redis.call('ZREMRANGEBYSCORE', all, '-inf', ARGV[5])
for _, digest in ipairs(redis.call('ZRANGE', ours, 0, -1)) do
  local expires_at = redis.call('HGET', p .. 'login-link:' .. digest, 'expires_at')
  if not expires_at or tonumber(expires_at) <= now then drop_login_link(scope_id, digest) end
end
local per_scope = tonumber(ARGV[8])
while per_scope >= 1 and redis.call('ZCARD', ours) >= per_scope do
  drop_login_link(scope_id, redis.call('ZRANGE', ours, 0, 0)[1])
end
if redis.call('ZCARD', all) >= tonumber(ARGV[9]) then return {'full'} end
local link = p .. 'login-link:' .. ARGV[3]
if redis.call('EXISTS', link) == 1 then return {'collision'} end
redis.call('HSET', link, 'key_id', ARGV[2], 'scope_id', scope_id, 'daemon_id', ARGV[4],
  'expires_at', ARGV[6])
redis.call('PEXPIRE', link, ARGV[7])
redis.call('ZADD', ours, redis.call('INCR', p .. 'login-link-seq'), ARGV[3])
-- The scope's index goes with its newest link.
redis.call('PEXPIRE', ours, ARGV[7])
redis.call('ZADD', all, ARGV[6], ARGV[3])
return {'ok', scope_id}
"""

# ARGV: p, token digest, now. The link is gone whatever the answer.
_TAKE_LOGIN_LINK = """
local f = redis.call('HMGET', p .. 'login-link:' .. ARGV[2],
  'key_id', 'scope_id', 'daemon_id', 'expires_at')
if not f[1] or not f[2] or not f[4] then
  redis.call('ZREM', p .. 'login-links', ARGV[2])
  return false
end
drop_login_link(f[2], ARGV[2])
if tonumber(f[4]) <= tonumber(ARGV[3]) then return false end
if live_key_scope(f[1]) ~= f[2] then return false end
return f
"""

# ARGV: p, bucket name, now, seconds per token, burst. A token bucket kept as one number, the
# time at which the bucket is full again ("theoretical arrival time"): it holds
# burst - (full_at - now) / interval tokens. Returns 0 if a token was taken, else the seconds
# to wait (as a string: Lua numbers become integers on the way out).
_TAKE_RATE_TOKEN = """
local key = p .. ARGV[2]
local now = tonumber(ARGV[3])
local interval = tonumber(ARGV[4])
local burst = tonumber(ARGV[5])
local full_at = tonumber(redis.call('GET', key) or ARGV[3])
if full_at < now then full_at = now end
-- The slack absorbs rounding (epoch seconds carry ~2e-7 s): waiting exactly the seconds
-- returned must be enough.
local wait = full_at - now - (burst - 1) * interval
if wait > 1e-6 then return tostring(wait) end
full_at = full_at + interval
redis.call('SET', key, string.format('%.17g', full_at), 'PX',
  math.max(1, math.ceil((full_at - now) * 1000)))
return '0'
"""

# ARGV: p, scope_id, daemon_id, now, most daemons kept. Keeps the most recently seen; among
# equally recent ones, the smallest ids (the SQLite store's order).
_RECORD_DAEMON = """
if redis.call('EXISTS', p .. 'scope:' .. ARGV[2]) == 0 then return 0 end
local seen = p .. 'daemons:' .. ARGV[2]
local first = p .. 'daemons-first:' .. ARGV[2]
redis.call('ZADD', seen, 'GT', ARGV[4], ARGV[3])
redis.call('HSETNX', first, ARGV[3], ARGV[4])
local excess = redis.call('ZCARD', seen) - tonumber(ARGV[5])
while excess > 0 do
  local lowest = redis.call('ZRANGE', seen, 0, 0, 'WITHSCORES')
  local tied = redis.call('ZRANGEBYSCORE', seen, lowest[2], lowest[2])
  local i = #tied
  while excess > 0 and i >= 1 do
    redis.call('ZREM', seen, tied[i])
    redis.call('HDEL', first, tied[i])
    excess = excess - 1
    i = i - 1
  end
end
return 1
"""

# ARGV: p, scope_id
_KNOWN_DAEMONS = """
local seen = redis.call('ZRANGE', p .. 'daemons:' .. ARGV[2], 0, -1, 'WITHSCORES')
local first = p .. 'daemons-first:' .. ARGV[2]
local out = {}
for i = 1, #seen, 2 do
  out[#out + 1] = {seen[i], redis.call('HGET', first, seen[i]) or seen[i + 1], seen[i + 1]}
end
return out
"""

# -- copying records in (repowire relay migrate-store) ----------------------------------------
# Each returns 'copied', 'same' (present already, identical: nothing done) or 'conflict'
# (another record with the same id or digest: nothing done). ARGV[2] is '1' for a dry run,
# which writes nothing and answers what a real run would (but 'copied' for a record whose
# scope or key a real run would copy first).

# ARGV: p, dry, scope_id, label, created_at
_IMPORT_SCOPE = """
local scope = p .. 'scope:' .. ARGV[3]
local f = redis.call('HMGET', scope, 'label', 'created_at')
if f[1] or f[2] then
  if f[1] == ARGV[4] and f[2] == ARGV[5] then return 'same' end
  return 'conflict'
end
if ARGV[2] == '1' then return 'copied' end
redis.call('HSET', scope, 'label', ARGV[4], 'created_at', ARGV[5])
return 'copied'
"""

# ARGV: p, dry, key_id, key digest, scope_id, label, created_at, revoked_at ('' for none)
_IMPORT_KEY = """
local by_id = redis.call('GET', p .. 'key-id:' .. ARGV[3])
if by_id then
  if by_id ~= ARGV[4] then return 'conflict' end
  local f = redis.call('HMGET', p .. 'key:' .. by_id,
    'key_id', 'scope_id', 'label', 'created_at', 'revoked_at')
  if f[1] == ARGV[3] and f[2] == ARGV[5] and f[3] == ARGV[6] and f[4] == ARGV[7]
    and (f[5] or '') == ARGV[8] then
    return 'same'
  end
  return 'conflict'
end
if redis.call('EXISTS', p .. 'key:' .. ARGV[4]) == 1 then return 'conflict' end
if ARGV[2] == '1' then return 'copied' end
if redis.call('EXISTS', p .. 'scope:' .. ARGV[5]) == 0 then return 'conflict' end
insert_key(ARGV[5], ARGV[3], ARGV[4], ARGV[6], ARGV[7])
if ARGV[8] ~= '' then
  redis.call('HSET', p .. 'key:' .. ARGV[4], 'revoked_at', ARGV[8])
  redis.call('SADD', p .. 'revoked', ARGV[3])
end
return 'copied'
"""

# ARGV: p, dry, session digest, scope_id, key_id, created_at, expires_at, ttl in ms
_IMPORT_SESSION = """
local session = p .. 'session:' .. ARGV[3]
local f = redis.call('HMGET', session, 'scope_id', 'key_id', 'created_at', 'expires_at')
if f[1] or f[2] or f[3] or f[4] then
  if f[1] == ARGV[4] and f[2] == ARGV[5] and f[3] == ARGV[6] and f[4] == ARGV[7] then
    return 'same'
  end
  return 'conflict'
end
if ARGV[2] == '1' then return 'copied' end
if live_key_scope(ARGV[5]) ~= ARGV[4] then return 'conflict' end
redis.call('HSET', session, 'scope_id', ARGV[4], 'key_id', ARGV[5],
  'created_at', ARGV[6], 'expires_at', ARGV[7])
redis.call('PEXPIRE', session, ARGV[8])
redis.call('ZADD', p .. 'key-sessions:' .. ARGV[5], ARGV[7], ARGV[3])
redis.call('ZADD', p .. 'session-expiry', ARGV[7], ARGV[3])
return 'copied'
"""

# ARGV: p, dry, scope_id, daemon_id, first_seen, last_seen, most daemons kept. Merged with
# what Redis holds (the earliest first sighting, the latest last one): never a conflict.
_IMPORT_DAEMON = """
local seen = p .. 'daemons:' .. ARGV[3]
local first = p .. 'daemons-first:' .. ARGV[3]
local last = redis.call('ZSCORE', seen, ARGV[4])
local known_first = redis.call('HGET', first, ARGV[4])
local changes = (not last or tonumber(last) < tonumber(ARGV[6]))
  or (not known_first or tonumber(known_first) > tonumber(ARGV[5]))
if not changes then return 'same' end
if ARGV[2] == '1' then return 'copied' end
if redis.call('EXISTS', p .. 'scope:' .. ARGV[3]) == 0 then return 'conflict' end
redis.call('ZADD', seen, 'GT', ARGV[6], ARGV[4])
if not known_first or tonumber(known_first) > tonumber(ARGV[5]) then
  redis.call('HSET', first, ARGV[4], ARGV[5])
end
local excess = redis.call('ZCARD', seen) - tonumber(ARGV[7])
if excess > 0 then
  for _, daemon_id in ipairs(redis.call('ZRANGE', seen, 0, excess - 1)) do
    redis.call('ZREM', seen, daemon_id)
    redis.call('HDEL', first, daemon_id)
  end
end
return 'copied'
"""


class RedisStore(ClosedOnExit):
    """:class:`relay._store_api.Store` in Redis. Open with ``async with RedisStore.open(url)
    as store:``, or wrap a coredis client you entered yourself (Sentinel, custom TLS).

    Every lookup but session lookups asks Redis (one round trip); sessions go through a
    cache (see the module docstring). ``max_daemons_per_scope`` defaults to the SQLite
    store's :data:`relay._store.MAX_DAEMONS_PER_SCOPE`.
    """

    def __init__(
        self,
        client: coredis.Redis[bytes],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        max_daemons_per_scope: int | None = None,
        session_cache_size: int = SESSION_CACHE_SIZE,
        session_cache_ttl: float = SESSION_CACHE_TTL,
        outage_grace: float = 0.0,
    ) -> None:
        """Use ``client`` (entered already, with ``decode_responses=False``; this object does
        not close it). ValueError for a namespace outside ``[A-Za-z0-9_.:{}-]{1,64}``, a cap
        below 1, a negative cache size, or a cache ttl or grace that is not a finite number
        of seconds >= 0."""
        check_namespace(namespace)
        if max_daemons_per_scope is not None and max_daemons_per_scope < 1:
            raise ValueError(f"max_daemons_per_scope must be >= 1, not {max_daemons_per_scope}")
        for name, value in (
            ("session_cache_ttl", session_cache_ttl),
            ("outage_grace", outage_grace),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value}")
        self._sessions = SessionCache(session_cache_size)
        self._session_ttl = session_cache_ttl
        self._outage_grace = outage_grace
        # Whether the last call found Redis unreachable: cached sessions are then served
        # (within the grace) without waiting on Redis again.
        self._unreachable = False
        self._client = client
        self._prefix = namespace
        self._channel = namespace + "changes"
        self._max_daemons = max_daemons_per_scope
        self._closed = False
        register = client.register_script
        self._create_scope = register(_PRELUDE + _CREATE_SCOPE)
        self._create_key = register(_PRELUDE + _CREATE_KEY)
        self._rotate_key = register(_PRELUDE + _ROTATE_KEY)
        self._revoke_key = register(_PRELUDE + _REVOKE_KEY)
        self._is_key_live = register(_PRELUDE + _IS_KEY_LIVE)
        self._list_keys = register(_PRELUDE + _LIST_KEYS)
        self._create_session = register(_PRELUDE + _CREATE_SESSION)
        self._lookup_session = register(_PRELUDE + _LOOKUP_SESSION)
        self._end_session = register(_PRELUDE + _END_SESSION)
        self._purge_expired = register(_PRELUDE + _PURGE_EXPIRED)
        self._record_daemon = register(_PRELUDE + _RECORD_DAEMON)
        self._known_daemons = register(_PRELUDE + _KNOWN_DAEMONS)
        self._create_login_link = register(_PRELUDE + _CREATE_LOGIN_LINK)
        self._take_login_link = register(_PRELUDE + _TAKE_LOGIN_LINK)
        self._take_rate_token = register(_PRELUDE + _TAKE_RATE_TOKEN)
        self._imports = {
            "scope": register(_PRELUDE + _IMPORT_SCOPE),
            "key": register(_PRELUDE + _IMPORT_KEY),
            "session": register(_PRELUDE + _IMPORT_SESSION),
            "daemon": register(_PRELUDE + _IMPORT_DAEMON),
        }

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        io_timeout: float = DEFAULT_TIMEOUT,
        max_connections: int | None = None,
        session_cache_size: int = SESSION_CACHE_SIZE,
        session_cache_ttl: float = SESSION_CACHE_TTL,
        outage_grace: float = 0.0,
    ) -> AsyncIterator[RedisStore]:
        """A store on the Redis server at ``url`` (``redis://[user:password@]host[:port][/db]``,
        ``rediss://...`` for TLS, ``unix://[user:password@]/path/redis.sock[?db=N]``), closed
        on exit. Options coredis reads from the URL's query (``?db=``, ``ssl_ca_certs=``...)
        apply.

        Does not connect yet: a relay may start while Redis is down, and its calls raise
        :class:`StoreUnavailable` until Redis is back. ``io_timeout`` bounds each connection
        attempt, each reply and each wait for a pooled connection. coredis runs a task group
        for its connections, so an exception leaving the ``async with`` body comes out inside
        an ExceptionGroup. The session cache's settings are :class:`RedisStore`'s.

        ValueError for a URL of another scheme or that cannot be parsed (the message never
        repeats the URL: it may hold a password), a bad namespace, ``io_timeout`` or cache
        setting.
        """
        # Checked before coredis's task group starts, which would wrap any error it sees.
        check_namespace(namespace)
        if not (math.isfinite(io_timeout) and io_timeout > 0):
            raise ValueError(f"io_timeout must be a positive number of seconds, not {io_timeout}")
        client = _client_from_url(url, timeout=io_timeout, max_connections=max_connections)
        # Built before the client's task group starts, so that a bad setting is a plain error.
        store = cls(
            client,
            namespace=namespace,
            session_cache_size=session_cache_size,
            session_cache_ttl=session_cache_ttl,
            outage_grace=outage_grace,
        )
        async with client:
            try:
                yield store
            finally:
                await store.aclose()

    @property
    def namespace(self) -> str:
        return self._prefix

    @property
    def client(self) -> coredis.Redis[bytes]:
        """The coredis client this store uses (not to be closed by the caller): presence
        (``relay._presence``) shares its connection pool."""
        return self._client

    # -- scopes and keys ----------------------------------------------------------------------

    async def create_scope(self, *, label: str, now: float) -> tuple[KeyRecord, str]:
        _check_label_text(label)
        _check_time(now)
        scope_id = generate_public_id("scope")
        key_id = generate_public_id("key")
        key = generate_key()
        reply = await self._script(
            "creating a scope",
            self._create_scope,
            scope_id,
            label,
            _time(now),
            key_id,
            hash_secret(key),
        )
        _expect_ok(reply)
        record = KeyRecord(
            key_id=key_id, scope_id=scope_id, label=label, created_at=now, revoked_at=None
        )
        return record, key

    async def create_key(self, scope_id: str, *, label: str, now: float) -> tuple[KeyRecord, str]:
        _check_label_text(label)
        _check_time(now)
        self._require_open()
        if not _is_public_id(scope_id):
            raise UnknownRecordError(f"no scope {_shown(scope_id)}")
        key_id = generate_public_id("key")
        key = generate_key()
        reply = await self._script(
            "creating a key",
            self._create_key,
            scope_id,
            label,
            _time(now),
            key_id,
            hash_secret(key),
        )
        if reply == b"no-scope":
            raise UnknownRecordError(f"no scope {_shown(scope_id)}")
        _expect_ok(reply)
        record = KeyRecord(
            key_id=key_id, scope_id=scope_id, label=label, created_at=now, revoked_at=None
        )
        return record, key

    async def verify_key(self, key: str, *, now: float) -> KeyRecord | None:
        self._require_open()
        if not looks_like_key(key):
            return None
        fields = await self._call(
            "verifying a key",
            lambda: self._client.hgetall(self._prefix + "key:" + hash_secret(key)),
            idempotent=True,
        )
        if not fields or b"revoked_at" in fields:
            return None
        return KeyRecord(
            key_id=_text(fields.get(b"key_id")),
            scope_id=_text(fields.get(b"scope_id")),
            label=_text(fields.get(b"label")),
            created_at=_number(fields.get(b"created_at")),
            revoked_at=None,
        )

    async def rotate_key(self, key_id: str, *, now: float) -> tuple[KeyRecord, str]:
        _check_time(now)
        self._require_open()
        if not _is_public_id(key_id):
            raise UnknownRecordError(f"no key {_shown(key_id)}")
        new_id = generate_public_id("key")
        key = generate_key()
        # Dropped whatever happens: a lost reply may hide a rotation that took place.
        self._sessions.forget_key(key_id)
        reply = _items(
            await self._script(
                "rotating a key",
                self._rotate_key,
                key_id,
                _time(now),
                new_id,
                hash_secret(key),
                _event(ChangeKind.KEY_ROTATED, key_id=key_id),
            )
        )
        status = reply[0] if reply else None
        if status == b"unknown":
            raise UnknownRecordError(f"no key {_shown(key_id)}")
        if status == b"revoked":
            raise UnknownRecordError(f"key {_shown(key_id)} is revoked; create a new key")
        _expect_ok(status)
        if len(reply) != 3:
            raise _unexpected("rotating a key")
        record = KeyRecord(
            key_id=new_id,
            scope_id=_text(reply[1]),
            label=_text(reply[2]),
            created_at=now,
            revoked_at=None,
        )
        return record, key

    async def revoke_key(self, key_id: str, *, now: float) -> bool:
        _check_time(now)
        self._require_open()
        if not _is_public_id(key_id):
            return False
        self._sessions.forget_key(key_id)
        reply = await self._script(
            "revoking a key",
            self._revoke_key,
            key_id,
            _time(now),
            _event(ChangeKind.KEY_REVOKED, key_id=key_id),
        )
        return reply == 1

    async def is_key_live(self, key_id: str) -> bool:
        self._require_open()
        if not _is_public_id(key_id):
            return False
        reply = await self._script("checking a key", self._is_key_live, key_id, idempotent=True)
        return reply == 1

    async def list_keys(self, scope_id: str | None = None) -> list[KeyRecord]:
        self._require_open()
        if scope_id is not None and not _is_public_id(scope_id):
            return []
        reply = await self._script("listing keys", self._list_keys, scope_id or "", idempotent=True)
        rows: list[tuple[float, int, KeyRecord]] = []
        for row in _items(reply):
            fields = _items(row)
            if len(fields) != 6:
                raise _unexpected("listing keys")
            key_id, scope, label, created_at, revoked_at, seq = fields
            record = KeyRecord(
                key_id=_text(key_id),
                scope_id=_text(scope),
                label=_text(label),
                created_at=_number(created_at),
                revoked_at=_number(revoked_at) if revoked_at else None,
            )
            rows.append((record.created_at, int(_text(seq)), record))
        rows.sort(key=lambda row: row[:2])
        return [record for _, _, record in rows]

    # -- browser sessions ---------------------------------------------------------------------

    async def create_session(self, key: KeyRecord, *, now: float, ttl: float) -> str:
        _check_time(now)
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl}")
        self._require_open()
        if not _is_public_id(key.key_id):
            raise UnknownRecordError(f"key {_shown(key.key_id)} is unknown or revoked")
        session_id = generate_session_id()
        expires_at = now + ttl
        reply = _items(
            await self._script(
                "creating a session",
                self._create_session,
                key.key_id,
                hash_secret(session_id),
                _time(now),
                _time(expires_at),
                str(max(1, math.ceil(ttl * 1000))),
            )
        )
        status = reply[0] if reply else None
        if status == b"unknown":
            raise UnknownRecordError(f"key {_shown(key.key_id)} is unknown or revoked")
        _expect_ok(status)
        if len(reply) == 2:
            record = SessionRecord(
                scope_id=_text(reply[1]), key_id=key.key_id, created_at=now, expires_at=expires_at
            )
            self._sessions.remember(hash_secret(session_id), record, now=now)
        return session_id

    async def lookup_session(self, session_id: str, *, now: float) -> SessionRecord | None:
        """See :meth:`relay._store_api.Store.lookup_session`; through the session cache (see
        the module docstring)."""
        self._require_open()
        if not looks_like_session_id(session_id):
            return None
        digest = hash_secret(session_id)
        cache = self._sessions
        trusted_for = self._session_ttl
        if self._unreachable:
            # Redis was unreachable at the last call: do not wait on it for what is known.
            trusted_for = max(trusted_for, self._outage_grace)
        cached = cache.get(digest, now=now, trusted_for=trusted_for)
        if cached is not None:
            return cached
        try:
            reply = await self._script(
                "looking up a session",
                self._lookup_session,
                digest,
                _time(now),
                idempotent=True,
            )
        except StoreUnavailable:
            cached = cache.get(digest, now=now, trusted_for=self._outage_grace)
            if cached is not None:
                return cached
            raise
        if reply is None:
            cache.forget(digest)
            return None
        fields = _items(reply)
        if len(fields) != 4:
            raise _unexpected("looking up a session")
        scope_id, key_id, created_at, expires_at = fields
        record = SessionRecord(
            scope_id=_text(scope_id),
            key_id=_text(key_id),
            created_at=_number(created_at),
            expires_at=_number(expires_at),
        )
        cache.remember(digest, record, now=now)
        return record

    async def end_session(self, session_id: str) -> None:
        self._require_open()
        if not looks_like_session_id(session_id):
            return
        digest = hash_secret(session_id)
        self._sessions.forget(digest)
        await self._script(
            "ending a session",
            self._end_session,
            digest,
            _event(ChangeKind.SESSION_ENDED, session=digest),
        )

    async def purge_expired(self, *, now: float) -> int:
        _check_time(now)
        self._require_open()
        deleted = 0
        while True:
            reply = _items(
                await self._script(
                    "purging sessions", self._purge_expired, _time(now), str(PURGE_BATCH)
                )
            )
            batch_deleted, looked_at = reply if len(reply) == 2 else (None, None)
            if not (isinstance(batch_deleted, int) and isinstance(looked_at, int)):
                raise _unexpected("purging sessions")
            deleted += batch_deleted
            if looked_at < PURGE_BATCH:
                self._sessions.drop_expired(now)
                return deleted

    def forget_sessions_of(self, key_id: str) -> None:
        self._sessions.forget_key(key_id)

    # -- one-time sign-in links -------------------------------------------------------------

    async def create_login_link(
        self, key_id: str, *, daemon_id: str | None, now: float
    ) -> tuple[str, LoginLink]:
        if daemon_id is not None and not is_daemon_id(daemon_id):
            raise ValueError(_DAEMON_ID_ERROR)
        _check_time(now)
        self._require_open()
        if not _is_public_id(key_id):
            raise UnknownRecordError(f"key {_shown(key_id)} is unknown or revoked")
        token = _login_links.new_token()
        expires_at = now + LOGIN_LINK_TTL
        reply = _items(
            await self._script(
                "issuing a sign-in link",
                self._create_login_link,
                key_id,
                hash_secret(token),
                daemon_id or "",
                _time(now),
                _time(expires_at),
                str(max(1, math.ceil(LOGIN_LINK_TTL * 1000))),
                # Read at each call, like LoginLinks does.
                str(_login_links.MAX_LINKS_PER_SCOPE),
                str(_login_links.MAX_LINKS_TOTAL),
            )
        )
        status = reply[0] if reply else None
        if status == b"unknown":
            raise UnknownRecordError(f"key {_shown(key_id)} is unknown or revoked")
        if status == b"full":
            raise LoginLinksFull(f"{_login_links.MAX_LINKS_TOTAL} sign-in links are live")
        _expect_ok(status)
        if len(reply) != 2:
            raise _unexpected("issuing a sign-in link")
        link = LoginLink(
            key_id=key_id, scope_id=_text(reply[1]), daemon_id=daemon_id, expires_at=expires_at
        )
        return token, link

    async def take_login_link(self, token: str, *, now: float) -> LoginLink | None:
        self._require_open()
        if not looks_like_token(token) or not math.isfinite(now):
            return None
        reply = await self._script(
            "taking a sign-in link", self._take_login_link, hash_secret(token), _time(now)
        )
        if reply is None:
            return None
        fields = _items(reply)
        if len(fields) != 4:
            raise _unexpected("taking a sign-in link")
        key_id, scope_id, daemon_id, expires_at = fields
        return LoginLink(
            key_id=_text(key_id),
            scope_id=_text(scope_id),
            daemon_id=_text(daemon_id) or None,
            expires_at=_number(expires_at),
        )

    # -- shared rate limits -------------------------------------------------------------------

    async def take_rate_token(
        self, name: str, key: str, *, rate: float, burst: int, now: float
    ) -> float:
        """Take one token from the bucket of ``key`` in the rate limit ``name``, shared by
        every store object on this Redis: a token bucket of ``burst`` tokens refilled at
        ``rate`` a second (the semantics of :class:`relay._ratelimit.RateLimiter`), a new
        bucket full. Returns 0.0 if a token was taken, else the seconds until one will be
        (nothing taken). ``key`` (a client address, a key id) reaches Redis only as a digest;
        a bucket is forgotten by Redis once it is full again. ValueError for a bad rate,
        burst or time, or a ``name`` outside ``[a-z_]{1,32}``."""
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of events per second, not {rate}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst}")
        if re.fullmatch(r"[a-z_]{1,32}", name) is None:
            raise ValueError("a rate limit's name must be 1 to 32 characters from a-z _")
        _check_time(now)
        self._require_open()
        bucket = f"rate:{name}:{hash_secret(key)[:32]}"
        reply = await self._script(
            "checking a rate limit",
            self._take_rate_token,
            bucket,
            _time(now),
            _time(1.0 / rate),
            str(burst),
        )
        wait = _number(reply)
        return wait if wait > 0 else 0.0

    # -- copying records in ---------------------------------------------------------------------

    async def import_scope(
        self, scope_id: str, label: str, created_at: float, *, dry_run: bool
    ) -> ImportVerdict:
        """Copy one scope as it is (see :meth:`import_key`)."""
        return await self._import("scope", dry_run, scope_id, label, _time(created_at))

    async def import_key(
        self,
        key_id: str,
        digest: str,
        scope_id: str,
        label: str,
        created_at: float,
        revoked_at: float | None,
        *,
        dry_run: bool,
    ) -> ImportVerdict:
        """Copy one key record as it is, its digest included (its scope first). Returns
        ``"copied"``, ``"same"`` (held already, identical: nothing written) or
        ``"conflict"`` (another record holds the id or the digest, or the scope is missing:
        nothing written). ``dry_run`` writes nothing and answers as a real run would, but
        ``"copied"`` where the record's scope is still to be copied."""
        revoked = "" if revoked_at is None else _time(revoked_at)
        return await self._import(
            "key", dry_run, key_id, digest, scope_id, label, _time(created_at), revoked
        )

    async def import_session(
        self,
        digest: str,
        scope_id: str,
        key_id: str,
        created_at: float,
        expires_at: float,
        *,
        now: float,
        dry_run: bool,
    ) -> ImportVerdict:
        """Copy one live session (its key, live, first), with a Redis expiry at
        ``expires_at - now``; see :meth:`import_key` for the answers."""
        ttl_ms = str(max(1, math.ceil((expires_at - now) * 1000)))
        return await self._import(
            "session",
            dry_run,
            digest,
            scope_id,
            key_id,
            _time(created_at),
            _time(expires_at),
            ttl_ms,
        )

    async def import_daemon(
        self, scope_id: str, daemon_id: str, first_seen: float, last_seen: float, *, dry_run: bool
    ) -> ImportVerdict:
        """Merge one daemon sighting (the earliest first, the latest last): ``"same"`` if
        Redis knew as much already, ``"copied"`` otherwise (``"conflict"`` only for a
        missing scope)."""
        cap = self._max_daemons if self._max_daemons is not None else _store.MAX_DAEMONS_PER_SCOPE
        return await self._import(
            "daemon",
            dry_run,
            scope_id,
            daemon_id,
            _time(first_seen),
            _time(last_seen),
            str(cap),
        )

    async def _import(self, kind: str, dry_run: bool, *args: str) -> ImportVerdict:
        reply = await self._script(
            f"copying a {kind}", self._imports[kind], "1" if dry_run else "0", *args
        )
        verdict = _text(reply) if isinstance(reply, bytes) else ""
        if verdict not in ("copied", "same", "conflict"):
            raise _unexpected(f"copying a {kind}")
        return cast(ImportVerdict, verdict)

    # -- daemons ------------------------------------------------------------------------------

    async def record_daemon(self, scope_id: str, daemon_id: str, *, now: float) -> None:
        if not is_daemon_id(daemon_id):
            raise ValueError(_DAEMON_ID_ERROR)
        _check_time(now)
        self._require_open()
        if not _is_public_id(scope_id):
            raise UnknownRecordError(f"no scope {_shown(scope_id)}")
        cap = self._max_daemons
        if cap is None:
            # Read at each call, like the SQLite store does.
            cap = _store.MAX_DAEMONS_PER_SCOPE
        reply = await self._script(
            "recording a daemon", self._record_daemon, scope_id, daemon_id, _time(now), str(cap)
        )
        if reply == 0:
            raise UnknownRecordError(f"no scope {_shown(scope_id)}")

    async def known_daemons(self, scope_id: str) -> list[tuple[str, float, float]]:
        self._require_open()
        if not _is_public_id(scope_id):
            return []
        reply = await self._script(
            "listing daemons", self._known_daemons, scope_id, idempotent=True
        )
        daemons: list[tuple[str, float, float]] = []
        for row in _items(reply):
            fields = _items(row)
            if len(fields) != 3:
                raise _unexpected("listing daemons")
            daemons.append((_text(fields[0]), _number(fields[1]), _number(fields[2])))
        daemons.sort()
        return daemons

    # -- changes and life ---------------------------------------------------------------------

    async def watch(
        self,
        handler: ChangeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """See :meth:`relay._store_api.Store.watch`: a subscription to the change channel, and
        after each (re)connection a read of the revoked keys, whose new ones are announced.
        Sessions ended while the subscription was down are not announced (none is cached
        here, so lookups are right regardless)."""
        self._require_open()
        revoked = _RevokedKeys(self._revoked_key_ids)

        async def apply(change: StoreChange) -> None:
            # Announced means applied: this object answers nothing stale from here.
            if change.key_id is not None:
                self._sessions.forget_key(change.key_id)
            if change.session_digest is not None:
                self._sessions.forget(change.session_digest)
            await handler(change)

        await follow_channel(
            self._client,
            self._channel,
            apply,
            parse=revoked.parse,
            catch_up=revoked.catch_up,
            name="key store watcher",
            logger=log,
            task_status=task_status,
        )

    async def _revoked_key_ids(self) -> set[str]:
        members = await self._call(
            "listing revoked keys",
            lambda: self._client.smembers(self._prefix + "revoked"),
            idempotent=True,
        )
        return {_text(member) for member in members}

    async def ping(self) -> None:
        self._require_open()
        await self._call("checking the connection", self._client.ping, idempotent=True)

    async def aclose(self) -> None:
        """Mark the store closed (later calls raise StoreError). The client is closed by
        :meth:`open`'s context, or by whoever passed it in; cancel watchers first."""
        self._closed = True
        self._sessions.clear()

    # -- internals ----------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise StoreError("the key store is closed")

    async def _script(
        self, action: str, script: Script[bytes], *args: str, idempotent: bool = False
    ) -> object:
        self._require_open()
        arguments = [self._prefix, *args]
        return await self._call(
            action, lambda: script(keys=[], args=arguments), idempotent=idempotent
        )

    async def _call(
        self, action: str, command: Callable[[], Awaitable[T]], *, idempotent: bool = False
    ) -> T:
        """Run ``command``, turning Redis failures into StoreUnavailable or StoreError. A
        read (``idempotent``) is tried once more after a lost connection: a pooled
        connection may have died with a Redis restart. A write never is: it may have been
        applied before the connection was lost."""
        for attempt in (1, 2):
            try:
                result = await command()
            except (*REDIS_ERRORS, ExceptionGroup) as exc:
                error = _translate(exc, action)
                if error is None:
                    raise
                self._unreachable = isinstance(error, StoreUnavailable)
                if (
                    idempotent
                    and attempt == 1
                    and isinstance(error, StoreUnavailable)
                    and not isinstance(exc, TimeoutError)
                ):
                    continue
                raise error from exc
            self._unreachable = False
            return result
        raise AssertionError("unreachable")


# -- helpers ----------------------------------------------------------------------------------


def _client_from_url(
    url: str, *, timeout: float, max_connections: int | None
) -> coredis.Redis[bytes]:
    check_redis_url(url)
    try:
        return coredis.Redis.from_url(
            url,
            decode_responses=False,
            decode_components=True,  # a password may hold percent-escaped characters
            retry_policy=NoRetryPolicy(),
            pool_timeout=timeout,
            stream_timeout=timeout,
            connect_timeout=timeout,
            max_connections=max_connections,
            client_name=CLIENT_NAME,
        )
    except (ValueError, TypeError, KeyError):
        # Not chained: a parse error may quote any part of the URL, the password included.
        raise ValueError(
            "the Redis URL cannot be parsed (not shown: it may hold a password)"
        ) from None


def _translate(error: BaseException, action: str) -> StoreError | None:
    """The StoreError to raise for a Redis failure, or None if ``error`` is not one."""
    return translate_failure(error, action, unreachable="the key store", failed="key store failure")


def _unexpected(action: str) -> StoreError:
    return StoreError(f"key store failure (Redis) while {action}: unexpected reply")


def _expect_ok(status: object) -> None:
    if status == b"collision":
        # Two random 64-bit ids (or 256-bit secrets) met: never in practice; retrying works.
        raise StoreError("identifier collision in the key store; try again")
    if status != b"ok":
        raise StoreError("key store failure (Redis): unexpected reply")


def _items(reply: object) -> list[object]:
    if not isinstance(reply, list):
        raise StoreError("key store failure (Redis): unexpected reply")
    return reply


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    raise StoreError("key store failure (Redis): unexpected reply")


def _number(value: object) -> float:
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(value)
    try:
        return float(_text(value))
    except ValueError:
        raise StoreError("key store failure (Redis): unexpected reply") from None


def _time(value: float) -> str:
    # repr round-trips a float exactly; Lua's tostring would keep only 14 digits.
    return repr(float(value))


def _is_public_id(text: object) -> bool:
    """Whether ``text`` has the shape of a scope or key id. Every stored id has it, so any
    other text names nothing (and is never sent to Redis: it may be a pasted secret)."""
    return isinstance(text, str) and _PUBLIC_ID.fullmatch(text) is not None


def _check_label_text(label: str) -> None:
    _check_label(label)
    try:
        label.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("label must be valid Unicode text (it holds a lone surrogate)") from None


def _event(kind: ChangeKind, *, key_id: str | None = None, session: str | None = None) -> str:
    body: dict[str, str] = {"kind": kind.value}
    if key_id is not None:
        body["key_id"] = key_id
    if session is not None:
        body["session"] = session
    return json.dumps(body, separators=(",", ":"))


_KINDS: Final = {kind.value: kind for kind in ChangeKind}


def _parse_event(message: PubSubMessage) -> StoreChange | None:
    """The change a published message announces, or None for anything else (logged)."""
    if message.get("type") != "message":
        return None
    data = message.get("data")
    try:
        body = json.loads(data) if isinstance(data, bytes | str) else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        log.warning("key store watcher: ignored a malformed change message")
        return None
    kind_name = body.get("kind")
    kind = _KINDS.get(kind_name) if isinstance(kind_name, str) else None
    key_id = body.get("key_id")
    session = body.get("session")
    if kind in (ChangeKind.KEY_REVOKED, ChangeKind.KEY_ROTATED) and _is_public_id(key_id):
        assert isinstance(key_id, str)
        return StoreChange(kind=kind, key_id=key_id)
    if (
        kind is ChangeKind.SESSION_ENDED
        and isinstance(session, str)
        and re.fullmatch(r"[0-9a-f]{64}", session)
    ):
        return StoreChange(kind=kind, session_digest=session)
    log.warning("key store watcher: ignored a malformed change message")
    return None


class _RevokedKeys:
    """The revoked keys one :meth:`RedisStore.watch` knows of, so that each is announced at
    most once: the change feed's catch-up and message filter (:func:`follow_channel`)."""

    def __init__(self, read: Callable[[], Awaitable[set[str]]]) -> None:
        self._read = read
        # None until the first read succeeds: then the baseline, and every key announced since.
        self._known: set[str] | None = None

    async def catch_up(self, first: bool) -> list[StoreChange]:
        """The revocations to announce after a (re)subscription: those not known yet."""
        revoked = await self._read()
        if self._known is None:
            # On the first attempt what is revoked now was revoked before the watch started:
            # the baseline. After a failed first attempt there is none: what is revoked may
            # have been revoked after the start, so all of it is announced.
            fresh = set() if first else revoked
            self._known = revoked
        else:
            fresh = revoked - self._known
            self._known |= revoked
        return [StoreChange(kind=ChangeKind.KEY_REVOKED, key_id=key_id) for key_id in sorted(fresh)]

    def parse(self, message: PubSubMessage) -> StoreChange | None:
        """The change a message announces, or None for a malformed one or a key's change
        already announced (or found in a catch-up)."""
        change = _parse_event(message)
        if change is None or change.key_id is None:
            return change
        # Set: every subscription reads messages only after its catch-up.
        assert self._known is not None
        if change.key_id in self._known:
            return None
        self._known.add(change.key_id)
        return change
