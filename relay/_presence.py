"""Presence: which relay replica holds the link of each daemon, in Redis (through coredis).

A replica that registers a daemon link *claims* it: the claim takes a new **link epoch** from a
counter, writes a presence entry naming the replica, and announces ``link_claimed`` on a
pub/sub channel. The replica then *refreshes* the entries of every link it holds every
``ttl / 3`` seconds (:meth:`Presence.run_refresher`), and *releases* an entry when its link
ends. The newest epoch wins: a refresh or release that carries an epoch which is no longer the
entry's changes nothing, and a replica that hears of a newer claim for a daemon it holds closes
its own link (the relay's handler, :meth:`Presence.watch`). An entry whose replica died is
refreshed by nobody and expires within ``ttl``.

Layout, every name under the namespace prefix ``P`` (the key store's, default ``repowire:``)::

    P presence:<scope_id>:<daemon_id>   hash    replica, epoch, url, since; Redis expiry: ttl
    P presence-scope:<scope_id>         zset    daemon ids by the expiry of their entry (ms,
                                                Redis clock); pruned when read; Redis expiry:
                                                the latest of its members'
    P presence-epoch                    string  counter: the last epoch handed out
    P presence-events                   pub/sub channel: JSON {"kind": "link_claimed",
                                                "scope", "daemon", "epoch", "replica"}

Epochs come from one counter for every (scope, daemon): an epoch is then never reused, even
when the daemon's own history in Redis has expired, so an old link can never come back looking
newer. After a Redis restart without persistence the counter starts again from 0; every
refresh lifts it to at least the epochs the refreshing replica holds, so epochs order claims
again within ``ttl / 3``.

Expiry is measured on the Redis server's clock (``PEXPIRE``, ``TIME`` in the scripts), so the
replicas' clocks do not matter. Every write is one Lua script, atomic: an epoch is compared
and the entry written in one step. Bytes never go through Redis: only these few keys do.

Errors: :class:`~relay._store_api.StoreUnavailable` when Redis cannot be reached (connection
refused or lost, a timeout), :class:`~relay._store_api.StoreError` for any other Redis
failure; ValueError for a malformed id or URL. No message contains a secret.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Final, TypeVar

import attrs
import coredis
import trio
from coredis.commands.script import Script
from coredis.response.types import PubSubMessage

from common import is_daemon_id

from ._redis_pubsub import REDIS_ERRORS, follow_channel, translate_failure
from ._store_api import DEFAULT_NAMESPACE, StoreError, StoreUnavailable, check_namespace

log = logging.getLogger("repowire.relay.presence")

T = TypeVar("T")

#: Seconds a presence entry lives without a refresh: a replica that dies stops being named
#: within this. Refreshed every third of it, so two refreshes may be lost before it lapses.
DEFAULT_PRESENCE_TTL: Final = 6.0
#: Entries per refresh script run; the runs of one refresh go out in one pipeline. Bounds how
#: long one script keeps Redis busy (a script runs alone).
REFRESH_BATCH: Final = 256
#: Seconds between the refresher's attempts while Redis cannot be reached (rather than a whole
#: ``ttl / 3``): the entries that lapsed during an outage are written back as soon as Redis
#: answers again, before browsers find every daemon of another replica missing.
REFRESH_RETRY: Final = 0.1
#: The one event kind published on the channel.
LINK_CLAIMED: Final = "link_claimed"
#: Seconds a replica reuses where a daemon's link is (``Presence(reuse_for=...)``) when it
#: watches the ``link_claimed`` events that make it ask again.
WHERE_REUSE_SECONDS: Final = 1.0
#: Longest advertised URL accepted.
MAX_URL_LENGTH: Final = 512
#: Answers of :meth:`Presence.where` and :meth:`Presence.daemons_of` kept to ride out a Redis
#: outage (``outage_grace``), the least recently used dropped first.
KNOWN_ANSWERS: Final = 10_000

#: Scope and replica ids: what fits in a Redis key between the separators (no ``:``).
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_URL = re.compile(r"(?:https?|wss?)://[\x21-\x7e]+")


@attrs.frozen(kw_only=True)
class PresenceEntry:
    """Where a daemon's link is: the replica holding it, the link's epoch, the URL other
    replicas dial to reach that replica, and when the link connected (epoch seconds)."""

    replica_id: str
    epoch: int
    advertise_url: str
    connected_at: float


@attrs.frozen(kw_only=True)
class HeldLink:
    """A link this replica holds, as :meth:`Presence.refresh` keeps it announced."""

    scope_id: str
    daemon_id: str
    epoch: int
    replica_id: str
    advertise_url: str
    connected_at: float


@attrs.frozen(kw_only=True)
class PresentDaemon:
    """One daemon of a scope with a live link somewhere in the cluster
    (:meth:`Presence.daemons_of`)."""

    daemon_id: str
    replica_id: str
    epoch: int
    connected_at: float


@attrs.frozen(kw_only=True)
class LinkClaimed:
    """A ``link_claimed`` event: ``replica_id`` now holds ``daemon_id``'s link with ``epoch``.
    A replica holding an older epoch for the same (scope, daemon) closes its link."""

    scope_id: str
    daemon_id: str
    epoch: int
    replica_id: str


#: Called by :meth:`Presence.watch` for each event, one at a time, in the watcher's task.
ClaimHandler = Callable[[LinkClaimed], Awaitable[None]]
#: Called by :meth:`Presence.run_refresher` with the held links another replica has taken over.
SupersededHandler = Callable[[list[HeldLink]], Awaitable[None]]

# -- scripts --------------------------------------------------------------------------------
# ARGV[1] is the namespace prefix; ``now`` is the Redis server's clock in milliseconds.

_PRELUDE = """
local p = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function entry_key(scope, daemon)
  return p .. 'presence:' .. scope .. ':' .. daemon
end
local function list_add(scope, daemon, ttl)
  local index = p .. 'presence-scope:' .. scope
  redis.call('ZADD', index, now + ttl, daemon)
  if redis.call('PTTL', index) < ttl then redis.call('PEXPIRE', index, ttl) end
end
"""

# ARGV: p, scope, daemon, replica, url, since ('' for the Redis clock), ttl ms. Returns the
# new epoch.
_CLAIM = """
local ttl = tonumber(ARGV[7])
local since = ARGV[6]
if since == '' then since = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2])) end
local epoch = redis.call('INCR', p .. 'presence-epoch')
local key = entry_key(ARGV[2], ARGV[3])
redis.call('HSET', key, 'replica', ARGV[4], 'epoch', epoch, 'url', ARGV[5], 'since', since)
redis.call('PEXPIRE', key, ttl)
list_add(ARGV[2], ARGV[3], ttl)
redis.call('PUBLISH', p .. 'presence-events', cjson.encode({
  kind = 'link_claimed', scope = ARGV[2], daemon = ARGV[3], epoch = epoch, replica = ARGV[4]}))
return epoch
"""

# ARGV: p, ttl ms, then 6 per link: scope, daemon, epoch, replica, url, since. An entry with
# the link's epoch gets a new expiry; a missing one (expired during an outage, or Redis lost
# its data) is written again; one with another epoch is left alone and the link's position
# (1-based) returned: another replica has claimed the daemon since.
_REFRESH = """
local ttl = tonumber(ARGV[2])
local superseded = {}
local top = 0
local position = 0
for i = 3, #ARGV, 6 do
  position = position + 1
  local scope, daemon, epoch = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local key = entry_key(scope, daemon)
  local current = redis.call('HGET', key, 'epoch')
  if current == epoch or not current then
    if not current then
      redis.call('HSET', key, 'replica', ARGV[i + 3], 'epoch', epoch, 'url', ARGV[i + 4],
        'since', ARGV[i + 5])
    end
    redis.call('PEXPIRE', key, ttl)
    list_add(scope, daemon, ttl)
  else
    superseded[#superseded + 1] = position
  end
  if tonumber(epoch) > top then top = tonumber(epoch) end
end
local counter = p .. 'presence-epoch'
if tonumber(redis.call('GET', counter) or '0') < top then
  redis.call('SET', counter, string.format('%d', top))
end
return superseded
"""

# ARGV: p, scope, daemon, epoch. 1 if the entry was this epoch's and is gone, else 0.
_RELEASE = """
local key = entry_key(ARGV[2], ARGV[3])
if redis.call('HGET', key, 'epoch') ~= ARGV[4] then return 0 end
redis.call('DEL', key)
redis.call('ZREM', p .. 'presence-scope:' .. ARGV[2], ARGV[3])
return 1
"""

# ARGV: p, scope. Drops index members whose entry expired; returns the live ones as
# {daemon, replica, epoch, since}.
_DAEMONS_OF = """
local index = p .. 'presence-scope:' .. ARGV[2]
redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
local out = {}
for _, daemon in ipairs(redis.call('ZRANGE', index, 0, -1)) do
  local f = redis.call('HMGET', entry_key(ARGV[2], daemon), 'replica', 'epoch', 'since')
  if f[1] and f[2] then
    out[#out + 1] = {daemon, f[1], f[2], f[3] or '0'}
  else
    redis.call('ZREM', index, daemon)
  end
end
return out
"""


class Presence:
    """Presence entries over a coredis client (entered already, ``decode_responses=False``;
    not closed by this object), under ``namespace`` (the key store's prefix: every replica
    of one cluster uses the same). ``ttl`` is the life of an entry without refresh, in
    seconds.

    ``outage_grace`` (seconds, default 0: off): while Redis cannot be reached,
    :meth:`where` and :meth:`daemons_of` answer with what they last read for the same
    question, if they read it at most that long ago, instead of raising StoreUnavailable: a
    daemon whose link has not moved stays reachable through the outage (its replica still
    holds the link). And for ``ttl`` seconds after this object last found Redis unreachable,
    entries that lapsed during the outage (their replicas could not refresh them) are not yet
    taken for gone: :meth:`where` answers a missing entry with the one it last read, and
    :meth:`daemons_of` adds the daemons it last listed, until the replicas have written their
    entries back. (Whoever acts on such an answer learns from the replica named whether it
    still holds the link.) At most :data:`KNOWN_ANSWERS` answers are kept. ValueError for a
    bad namespace, ttl or grace.
    """

    def __init__(
        self,
        client: coredis.Redis[bytes],
        *,
        namespace: str = DEFAULT_NAMESPACE,
        ttl: float = DEFAULT_PRESENCE_TTL,
        outage_grace: float = 0.0,
        reuse_for: float = 0.0,
    ) -> None:
        check_namespace(namespace)
        if not (math.isfinite(ttl) and ttl >= 0.01):
            raise ValueError(f"presence ttl must be at least 0.01 s, not {ttl!r}")
        if not (math.isfinite(reuse_for) and 0 <= reuse_for <= ttl):
            raise ValueError(f"reuse_for must be between 0 and the ttl, not {reuse_for!r}")
        self._reuse_for = reuse_for
        # (scope id, daemon id) -> (entry, trio time until which it may be reused), oldest
        # first: answers of where() naming a replica, forgotten on the daemon's next claim.
        self._recent: OrderedDict[tuple[str, str], tuple[PresenceEntry, float]] = OrderedDict()
        # Bumped by every forget(): an answer read before one is not kept (it may be what was
        # just forgotten).
        self._forgotten = 0
        if not (math.isfinite(outage_grace) and outage_grace >= 0):
            raise ValueError(f"outage grace must be a finite number >= 0, not {outage_grace!r}")
        self._outage_grace = outage_grace
        # (question) -> (answer, trio time it was read), least recently used first.
        self._known: OrderedDict[Hashable, tuple[object, float]] = OrderedDict()
        # trio time a call last found Redis unreachable (None: never).
        self._unreachable_at: float | None = None
        self._client = client
        self._prefix = namespace
        self._channel = namespace + "presence-events"
        self.ttl = ttl
        self._ttl_ms = str(max(1, math.ceil(ttl * 1000)))
        register = client.register_script
        self._claim = register(_PRELUDE + _CLAIM)
        self._refresh = register(_PRELUDE + _REFRESH)
        self._release = register(_PRELUDE + _RELEASE)
        self._daemons_of = register(_PRELUDE + _DAEMONS_OF)

    @property
    def namespace(self) -> str:
        return self._prefix

    # -- writes ---------------------------------------------------------------------------

    async def claim(
        self,
        scope_id: str,
        daemon_id: str,
        replica_id: str,
        advertise_url: str,
        *,
        connected_at: float | None = None,
    ) -> int:
        """Claim ``daemon_id``'s link for ``replica_id``: return a new epoch, greater than any
        handed out before (for any daemon), write the entry (replacing whatever replica held
        it) with a life of ``ttl``, and publish ``link_claimed``. ``connected_at`` (epoch
        seconds) orders the scope's daemons (:meth:`daemons_of`); None takes the Redis clock.
        Not retried after a lost connection: it may have been applied."""
        _check_ids(scope_id, daemon_id, replica_id)
        _check_url(advertise_url)
        self.forget(scope_id, daemon_id)
        since = "" if connected_at is None else _time(connected_at)
        reply = await self._script(
            "claiming a daemon link",
            self._claim,
            scope_id,
            daemon_id,
            replica_id,
            advertise_url,
            since,
            self._ttl_ms,
        )
        # Again once it is written: a where() that read the old entry meanwhile keeps nothing.
        self.forget(scope_id, daemon_id)
        if not isinstance(reply, int) or isinstance(reply, bool) or reply < 1:
            raise _unexpected("claiming a daemon link")
        return reply

    async def refresh(self, links: Sequence[HeldLink]) -> list[HeldLink]:
        """Give every entry of ``links`` a fresh ``ttl`` (one pipeline of scripts, each for up
        to :data:`REFRESH_BATCH` links), writing back any that expired meanwhile. Returns the
        links whose entry now carries another epoch: another replica claimed the daemon since
        (those entries are left as they are). An empty ``links`` costs nothing."""
        for link in links:
            _check_ids(link.scope_id, link.daemon_id, link.replica_id)
            _check_url(link.advertise_url)
        if not links:
            await trio.lowlevel.checkpoint()
            return []
        batches = [links[i : i + REFRESH_BATCH] for i in range(0, len(links), REFRESH_BATCH)]

        async def run() -> list[object]:
            async with self._client.pipeline(transaction=False) as pipe:
                pending: list[Awaitable[object]] = [
                    self._refresh(keys=[], args=self._refresh_args(batch), client=pipe)
                    for batch in batches
                ]
            return [await reply for reply in pending]

        replies = await self._call("refreshing presence", run, idempotent=True)
        superseded: list[HeldLink] = []
        for batch, reply in zip(batches, replies, strict=True):
            for position in _items(reply, "refreshing presence"):
                if not isinstance(position, int) or not 1 <= position <= len(batch):
                    raise _unexpected("refreshing presence")
                superseded.append(batch[position - 1])
        return superseded

    def _refresh_args(self, batch: Sequence[HeldLink]) -> list[str]:
        args = [self._prefix, self._ttl_ms]
        for link in batch:
            args += [
                link.scope_id,
                link.daemon_id,
                str(link.epoch),
                link.replica_id,
                link.advertise_url,
                _time(link.connected_at),
            ]
        return args

    async def release(self, scope_id: str, daemon_id: str, epoch: int) -> bool:
        """Delete ``daemon_id``'s entry if it still carries ``epoch`` (the link ended); True if
        it did. An entry written by a newer claim is left alone."""
        _check_ids(scope_id, daemon_id)
        self.forget(scope_id, daemon_id)
        reply = await self._script(
            "releasing a daemon link",
            self._release,
            scope_id,
            daemon_id,
            str(epoch),
            idempotent=True,
        )
        self.forget(scope_id, daemon_id)
        return reply == 1

    # -- reads ----------------------------------------------------------------------------

    async def where(
        self, scope_id: str, daemon_id: str, *, fresh: bool = False
    ) -> PresenceEntry | None:
        """The live entry of ``daemon_id`` in ``scope_id``, or None (no replica holds its link,
        or the one that did stopped refreshing it for ``ttl``).

        With ``reuse_for`` (and not ``fresh``), an entry read at most that long ago is
        answered again without asking Redis, unless a ``link_claimed`` event for the daemon
        arrived since (:meth:`watch` must be running) or this object claimed or released it.
        The caller learns from the replica named whether it still holds the link, and asks
        again with ``fresh`` when it does not."""
        _check_ids(scope_id, daemon_id)
        if self._reuse_for and not fresh:
            recent = self._recent.get((scope_id, daemon_id))
            if recent is not None and trio.current_time() < recent[1]:
                return recent[0]
        key = f"{self._prefix}presence:{scope_id}:{daemon_id}"
        question = ("where", scope_id, daemon_id)
        forgotten = self._forgotten
        try:
            fields = await self._call(
                "looking up a daemon link",
                lambda: self._client.hmget(key, ["replica", "epoch", "url", "since"]),
                idempotent=True,
            )
        except StoreUnavailable:
            known = self._recall(question)
            if known is None:
                raise
            answer = known[0]
            assert answer is None or isinstance(answer, PresenceEntry)
            return answer
        replica, epoch, url, since = (list(fields) + [None] * 4)[:4]
        entry = None
        if replica is not None and epoch is not None and url is not None:
            entry = PresenceEntry(
                replica_id=_text(replica),
                epoch=_integer(epoch),
                advertise_url=_text(url),
                connected_at=_number(since) if since is not None else 0.0,
            )
        elif self.settling:
            known = self._recall(question)
            if known is not None and isinstance(known[0], PresenceEntry):
                # Lapsed in the outage, perhaps, and not written back yet.
                return known[0]
        self._remember(question, entry)
        if entry is None:
            self._recent.pop((scope_id, daemon_id), None)
        elif forgotten == self._forgotten:
            self._reuse(scope_id, daemon_id, entry)
        return entry

    def forget(self, scope_id: str, daemon_id: str) -> None:
        """Stop reusing what :meth:`where` last read for ``daemon_id`` (its link moved): the
        next question asks Redis. Also done on each ``link_claimed`` event :meth:`watch`
        receives, and on this object's own :meth:`claim` and :meth:`release`."""
        self._forgotten += 1
        self._recent.pop((scope_id, daemon_id), None)

    def _reuse(self, scope_id: str, daemon_id: str, entry: PresenceEntry) -> None:
        """Keep ``entry`` for :meth:`where` to answer again, for ``reuse_for`` seconds."""
        if not self._reuse_for:
            return
        recent = self._recent
        recent.pop((scope_id, daemon_id), None)
        recent[(scope_id, daemon_id)] = (entry, trio.current_time() + self._reuse_for)
        while len(recent) > KNOWN_ANSWERS:
            recent.popitem(last=False)

    async def daemons_of(self, scope_id: str) -> list[PresentDaemon]:
        """The daemons of ``scope_id`` whose link some replica holds now, the longest connected
        first (ties by daemon id): the first is the scope's default daemon, cluster-wide.
        Entries that expired are dropped from the scope's index on the way."""
        _check_ids(scope_id)
        question = ("daemons_of", scope_id)
        try:
            reply = await self._script(
                "listing a scope's daemon links", self._daemons_of, scope_id, idempotent=True
            )
        except StoreUnavailable:
            known = self._recall(question)
            if known is None:
                raise
            answer = known[0]
            assert isinstance(answer, tuple)
            return list(answer)
        daemons: list[PresentDaemon] = []
        for row in _items(reply, "listing a scope's daemon links"):
            fields = _items(row, "listing a scope's daemon links")
            if len(fields) != 4:
                raise _unexpected("listing a scope's daemon links")
            daemon, replica, epoch, since = fields
            daemons.append(
                PresentDaemon(
                    daemon_id=_text(daemon),
                    replica_id=_text(replica),
                    epoch=_integer(epoch),
                    connected_at=_number(since),
                )
            )
        if self.settling:
            known = self._recall(question)
            if known is not None and isinstance(known[0], tuple):
                # Those that lapsed in the outage, perhaps, and are not written back yet.
                listed = {daemon.daemon_id for daemon in daemons}
                daemons += [d for d in known[0] if d.daemon_id not in listed]
        daemons.sort(key=lambda daemon: (daemon.connected_at, daemon.daemon_id))
        self._remember(question, tuple(daemons))
        return daemons

    @property
    def settling(self) -> bool:
        """Whether Redis was found unreachable less than ``ttl`` ago (with an outage grace):
        entries that lapsed meanwhile may not have been written back yet, so a daemon missing
        from presence now may still be connected."""
        at = self._unreachable_at
        return self._outage_grace > 0 and at is not None and trio.current_time() - at <= self.ttl

    def _remember(self, question: Hashable, answer: object) -> None:
        """Keep ``answer`` for an outage (when there is a grace)."""
        if self._outage_grace <= 0:
            return
        known = self._known
        known[question] = (answer, trio.current_time())
        known.move_to_end(question)
        while len(known) > KNOWN_ANSWERS:
            known.popitem(last=False)

    def _recall(self, question: Hashable) -> tuple[object] | None:
        """The answer last read for ``question`` (in a 1-tuple: it may be None), if it is at
        most ``outage_grace`` old."""
        kept = self._known.get(question)
        if kept is None or trio.current_time() - kept[1] > self._outage_grace:
            return None
        self._known.move_to_end(question)
        return (kept[0],)

    # -- background work ------------------------------------------------------------------

    async def run_refresher(
        self,
        held: Callable[[], Iterable[HeldLink]],
        on_superseded: SupersededHandler | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled, every ``ttl / 3`` seconds: :meth:`refresh` the links ``held()``
        lists, and pass those another replica has claimed since to ``on_superseded`` (how a
        replica learns of a claim whose event it missed). ``nursery.start`` returns after the
        first attempt. Never raises for Redis: an outage is logged once and retried every
        :data:`REFRESH_RETRY` seconds while Redis cannot be reached (entries lapse if it
        lasts ``ttl``, and are written back as soon as Redis answers). An exception from
        ``held`` or ``on_superseded`` propagates."""
        interval = self.ttl / 3
        failing = unreachable = False
        started = False
        next_run = trio.current_time()
        while True:
            next_run += interval
            unreachable = False
            try:
                superseded = await self.refresh(list(held()))
            except StoreError as exc:
                superseded = []
                unreachable = isinstance(exc, StoreUnavailable)
                if not failing:
                    failing = True
                    # The text only: a record holding the error would keep its traceback alive.
                    log.warning("presence refresher: %s; retrying", str(exc))
            else:
                if failing:
                    failing = False
                    log.info("presence refresher: Redis is reachable again")
            if not started:
                started = True
                task_status.started()
            if superseded and on_superseded is not None:
                await on_superseded(superseded)
            now = trio.current_time()
            if unreachable:
                next_run = min(next_run, now + min(interval, REFRESH_RETRY))
            # A refresh that took longer than the interval is followed by the next at once.
            next_run = max(next_run, now)
            await trio.sleep_until(next_run)

    async def watch(
        self,
        handler: ClaimHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled, call ``handler`` with each ``link_claimed`` event published after
        the subscription started (this replica's own claims included), one at a time.

        ``await nursery.start(presence.watch, handler)`` returns once subscribed, or after the
        first attempt failed (Redis down): then it keeps retrying with backoff. Events
        published while the subscription is down are not replayed: :meth:`run_refresher`
        reports the links they would have ended within ``ttl / 3``. Never raises for a failing
        Redis; an exception from ``handler`` ends the watch and propagates as it is.
        """

        async def on_event(event: LinkClaimed) -> None:
            # The daemon's link moved (or was made again): where() must ask Redis.
            self.forget(event.scope_id, event.daemon_id)
            await handler(event)

        await follow_channel(
            self._client,
            self._channel,
            on_event,
            parse=_parse_event,
            name="presence watcher",
            logger=log,
            task_status=task_status,
        )

    # -- internals ------------------------------------------------------------------------

    async def _script(
        self, action: str, script: Script[bytes], *args: str, idempotent: bool = False
    ) -> object:
        arguments = [self._prefix, *args]
        return await self._call(
            action, lambda: script(keys=[], args=arguments), idempotent=idempotent
        )

    async def _call(
        self, action: str, command: Callable[[], Awaitable[T]], *, idempotent: bool = False
    ) -> T:
        """Run ``command``, turning Redis failures into StoreUnavailable or StoreError. An
        idempotent call is tried once more after a lost connection (a pooled connection may
        have died with a Redis restart); a timeout is never retried."""
        for attempt in (1, 2):
            try:
                return await command()
            except (*REDIS_ERRORS, ExceptionGroup) as exc:
                error = _translate(exc, action)
                if error is None:
                    raise
                if isinstance(error, StoreUnavailable):
                    self._unreachable_at = trio.current_time()
                if (
                    idempotent
                    and attempt == 1
                    and isinstance(error, StoreUnavailable)
                    and not isinstance(exc, TimeoutError)
                ):
                    continue
                raise error from exc
        raise AssertionError("unreachable")


# -- helpers ----------------------------------------------------------------------------------


def _check_ids(scope_id: str, daemon_id: str | None = None, replica_id: str | None = None) -> None:
    if not isinstance(scope_id, str) or _ID.fullmatch(scope_id) is None:
        raise ValueError("scope id must be 1 to 64 characters from A-Z a-z 0-9 . _ -")
    if daemon_id is not None and not is_daemon_id(daemon_id):
        raise ValueError("daemon id must be 1 to 64 characters from A-Z a-z 0-9 . _ -")
    if replica_id is not None and (
        not isinstance(replica_id, str) or _ID.fullmatch(replica_id) is None
    ):
        raise ValueError("replica id must be 1 to 64 characters from A-Z a-z 0-9 . _ -")


def _check_url(url: str) -> None:
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH or _URL.fullmatch(url) is None:
        raise ValueError(
            f"advertised URL must be an http(s):// or ws(s):// URL of at most {MAX_URL_LENGTH} "
            "characters without spaces"
        )


def _translate(error: BaseException, action: str) -> StoreError | None:
    """The StoreError to raise for a Redis failure, or None if ``error`` is not one."""
    return translate_failure(error, action, unreachable="presence", failed="presence failure")


def _unexpected(action: str) -> StoreError:
    return StoreError(f"presence failure (Redis) while {action}: unexpected reply")


def _items(reply: object, action: str) -> list[object]:
    if not isinstance(reply, list):
        raise _unexpected(action)
    return reply


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    raise _unexpected("reading presence")


def _integer(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(_text(value))
    except ValueError:
        raise _unexpected("reading presence") from None


def _number(value: object) -> float:
    try:
        return float(_text(value))
    except ValueError:
        raise _unexpected("reading presence") from None


def _time(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"time must be a finite number of seconds, not {value!r}")
    # repr round-trips a float exactly.
    return repr(float(value))


def _parse_event(message: PubSubMessage) -> LinkClaimed | None:
    """The event a published message announces, or None for anything else (logged)."""
    if message.get("type") != "message":
        return None
    data = message.get("data")
    try:
        body = json.loads(data) if isinstance(data, bytes | str) else None
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("kind") == LINK_CLAIMED:
        scope, daemon, epoch, replica = (
            body.get(k) for k in ("scope", "daemon", "epoch", "replica")
        )
        if (
            isinstance(scope, str)
            and _ID.fullmatch(scope)
            and is_daemon_id(daemon)
            and isinstance(epoch, int)
            and not isinstance(epoch, bool)
            and isinstance(replica, str)
            and _ID.fullmatch(replica)
        ):
            assert isinstance(daemon, str)
            return LinkClaimed(scope_id=scope, daemon_id=daemon, epoch=epoch, replica_id=replica)
    log.warning("presence watcher: ignored a malformed event")
    return None
