"""What the relay and ``repowire relay keys`` need from a key store, whatever holds the data.

Two implementations: :class:`relay._sqlite_store.SqliteStore` (one relay, a local SQLite file,
over :class:`relay._store.KeyStore`) and :class:`relay._redis_store.RedisStore` (several relay
replicas sharing one Redis). Both keep the same semantics, which ``tests/relay/
test_store_contract.py`` checks against each:

- Only digests (:func:`common.hash_secret`) of API keys and session ids are stored; a raw key or
  session id is returned once, by the call that creates it.
- Time is an argument (``now``, epoch seconds); a store reads no clock to decide anything.
- Errors: :class:`StoreError` for anything the store cannot do, :class:`UnknownRecordError`
  (a subclass) for a scope or key that does not exist or is revoked where a live one is needed,
  :class:`StoreUnavailable` (a subclass) when the backend cannot be reached,
  :class:`LoginLinksFull` when the sign-in links fill their table, ValueError for bad
  arguments (label, time, ttl, daemon id). No message contains a key, a session id or a
  sign-in token.
- A method that raises StoreUnavailable may or may not have taken effect (the reply was lost);
  every write is atomic, so it took effect entirely or not at all.

Changes made elsewhere (another relay replica, the CLI) reach a running relay through
:meth:`Store.watch`, which calls a handler with a :class:`StoreChange` for each revocation,
rotation and ended session.
"""

from __future__ import annotations

import abc
import enum
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, Protocol, Self

import attrs
import trio

from ._login_links import LoginLink, LoginLinksFull
from ._store import KeyRecord, SessionRecord, StoreError, UnknownRecordError

__all__ = [
    "DEFAULT_NAMESPACE",
    "REDIS_URL_SCHEMES",
    "ChangeHandler",
    "ChangeKind",
    "ClosedOnExit",
    "KeyRecord",
    "LoginLink",
    "LoginLinksFull",
    "SessionRecord",
    "Store",
    "StoreChange",
    "StoreError",
    "StoreUnavailable",
    "UnknownRecordError",
    "check_namespace",
    "check_redis_url",
]

#: Prefix of every Redis key (and of the change channel) of a Redis store, unless another is
#: given.
DEFAULT_NAMESPACE: Final = "repowire:"
#: URL schemes a Redis store accepts: TCP, TLS, a Unix socket.
REDIS_URL_SCHEMES: Final = ("redis", "rediss", "unix")

_NAMESPACE: Final = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}")


def check_namespace(namespace: str) -> None:
    """Raise ValueError unless ``namespace`` is 1 to 64 characters of ``[A-Za-z0-9_.:{}-]``."""
    if not isinstance(namespace, str) or _NAMESPACE.fullmatch(namespace) is None:
        raise ValueError("namespace must be 1 to 64 characters from A-Z a-z 0-9 _ . : { } -")


def check_redis_url(url: str) -> None:
    """Raise ValueError unless ``url`` is a ``redis://``, ``rediss://`` or ``unix://`` URL.
    The message never repeats the URL: it may hold a password."""
    try:
        scheme = urllib.parse.urlsplit(url).scheme if isinstance(url, str) else ""
    except ValueError:
        scheme = ""
    if scheme not in REDIS_URL_SCHEMES:
        raise ValueError(
            "the Redis URL must start with redis://, rediss:// or unix:// "
            "(the URL given is not shown: it may hold a password)"
        )


class StoreUnavailable(StoreError):
    """The store's backend cannot be reached (Redis down, a connection lost, a timeout).

    Nothing is wrong with the request: the same call may succeed later. The relay answers it
    with 503. Messages are one line and never contain a key, a session id or a password.
    """


class ChangeKind(enum.Enum):
    """What a :class:`StoreChange` reports. The values double as the ``why`` the relay gives
    when it ends a key's access."""

    #: A key was revoked: its links, sessions and requests must end.
    KEY_REVOKED = "revoked"
    #: A key was replaced by a new one (:meth:`Store.rotate_key`); for access, as revoked.
    KEY_ROTATED = "rotated"
    #: A browser session was ended (logout) through :meth:`Store.end_session`.
    SESSION_ENDED = "signed_out"


@attrs.frozen(kw_only=True)
class StoreChange:
    """One change announced by :meth:`Store.watch`.

    ``key_id`` is set for :attr:`ChangeKind.KEY_REVOKED` and :attr:`ChangeKind.KEY_ROTATED`
    (the old key's id); ``session_digest`` for :attr:`ChangeKind.SESSION_ENDED`: the
    :func:`common.hash_secret` digest of the session id (compare it with the digest of the ids
    you hold; the raw id is never announced).
    """

    kind: ChangeKind
    key_id: str | None = None
    session_digest: str | None = None


#: Called by :meth:`Store.watch` for each change, one at a time, in the watcher's task.
ChangeHandler = Callable[[StoreChange], Awaitable[None]]


class Store(Protocol):
    """A key store: scopes, API keys, browser sessions, daemons seen, and a change feed.

    Every method but :meth:`forget_sessions_of` may raise :class:`StoreError` (the store is
    closed, damaged or refuses) and its subclass :class:`StoreUnavailable` (the backend cannot
    be reached); the lists below name only the other errors.
    """

    # -- scopes and keys ----------------------------------------------------------------------

    async def create_scope(self, *, label: str, now: float) -> tuple[KeyRecord, str]:
        """Create a scope and its first key (with the same label). Returns the key's record
        and the raw key, returned only here. ValueError for a bad label or time."""
        ...

    async def create_key(self, scope_id: str, *, label: str, now: float) -> tuple[KeyRecord, str]:
        """Create another key in an existing scope. Returns its record and the raw key.
        UnknownRecordError if the scope does not exist, ValueError for a bad label or time."""
        ...

    async def verify_key(self, key: str, *, now: float) -> KeyRecord | None:
        """The record of a live key, or None if ``key`` is malformed, unknown or revoked.
        Never raises for any ``key`` value (only for a failing store)."""
        ...

    async def rotate_key(self, key_id: str, *, now: float) -> tuple[KeyRecord, str]:
        """Replace a live key, atomically: a new key in the same scope with the same label,
        the old key and all its sessions revoked at ``now``. Returns the new record and raw
        key. UnknownRecordError if ``key_id`` is unknown or already revoked."""
        ...

    async def revoke_key(self, key_id: str, *, now: float) -> bool:
        """Revoke a key and end all its sessions, atomically. False (and nothing changed) if
        the key is unknown or already revoked. ValueError for a bad time."""
        ...

    async def is_key_live(self, key_id: str) -> bool:
        """Whether ``key_id`` names a key that exists and is not revoked."""
        ...

    async def list_keys(self, scope_id: str | None = None) -> list[KeyRecord]:
        """All keys, revoked ones included, or one scope's (an unknown scope has none):
        oldest first, ties in creation order."""
        ...

    # -- browser sessions ---------------------------------------------------------------------

    async def create_session(self, key: KeyRecord, *, now: float, ttl: float) -> str:
        """Open a session for ``key``, expiring at ``now + ttl``; returns the raw session id.
        Its scope is the key's scope in the store, whatever ``key.scope_id`` says.
        UnknownRecordError if the key is unknown or revoked (the store is the authority, not
        the record passed in), ValueError for a bad time or ttl."""
        ...

    async def lookup_session(self, session_id: str, *, now: float) -> SessionRecord | None:
        """The live session with this id, or None: malformed or unknown id, expired
        (``now >= expires_at``), ended, or its key revoked. Never raises for any
        ``session_id`` value (only for a failing store)."""
        ...

    async def end_session(self, session_id: str) -> None:
        """End a session (logout). Unknown or malformed ids are ignored."""
        ...

    async def purge_expired(self, *, now: float) -> int:
        """Delete the sessions expired at ``now`` (and, where the backend keeps them, revoked
        ones); returns how many this call deleted. A backend may also drop expired sessions
        on its own (Redis expiry), uncounted. Keys are kept, revoked or not."""
        ...

    def forget_sessions_of(self, key_id: str) -> None:
        """Drop whatever this object caches about ``key_id``'s sessions, so that the next
        lookup of each asks the backend. No I/O; never raises."""
        ...

    # -- one-time sign-in links -------------------------------------------------------------

    async def create_login_link(
        self, key_id: str, *, daemon_id: str | None, now: float
    ) -> tuple[str, LoginLink]:
        """A one-time sign-in token for the live key ``key_id``, valid for
        :data:`relay._login_links.LOGIN_LINK_TTL` seconds from ``now``; returns the raw
        token (only here) and what it grants (the scope is the key's in the store).

        Bounds, read from :mod:`relay._login_links` at each call: when the key's scope holds
        :data:`~relay._login_links.MAX_LINKS_PER_SCOPE` live tokens its oldest is dropped;
        when :data:`~relay._login_links.MAX_LINKS_TOTAL` live tokens are held in all,
        :class:`LoginLinksFull` is raised and nothing changes. The issue rate per key is the
        caller's to limit. UnknownRecordError if the key is unknown or revoked, ValueError for
        a bad time or a daemon id outside ``[A-Za-z0-9._-]{1,64}``."""
        ...

    async def take_login_link(self, token: str, *, now: float) -> LoginLink | None:
        """Use a token up, atomically: what it grants, or None if it is malformed, unknown,
        taken already, expired (``now >= expires_at``), or its key is no longer live. Either
        way it never works again, through any store object. Never raises for any ``token``
        value (only for a failing store). Revoking or rotating a key drops its tokens."""
        ...

    # -- daemons ------------------------------------------------------------------------------

    async def record_daemon(self, scope_id: str, daemon_id: str, *, now: float) -> None:
        """Note that ``daemon_id`` connected in ``scope_id`` at ``now`` (a late report never
        moves ``last_seen`` back). Keeps at most :data:`relay._store.MAX_DAEMONS_PER_SCOPE`
        per scope, forgetting the least recently seen. ValueError for a daemon id outside
        ``[A-Za-z0-9._-]{1,64}`` or a bad time, UnknownRecordError for an unknown scope."""
        ...

    async def known_daemons(self, scope_id: str) -> list[tuple[str, float, float]]:
        """``(daemon_id, first_seen, last_seen)`` for each daemon seen in the scope, by id."""
        ...

    # -- changes and life ---------------------------------------------------------------------

    async def watch(
        self,
        handler: ChangeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled, call ``handler`` for each change made after it started, through
        any store object on the same backend (this one included), one change at a time.

        ``await nursery.start(store.watch, handler)`` returns after the first attempt to
        reach the backend. If it succeeded, every later change is announced. If it failed
        (backend down), the watcher keeps retrying and, on first contact, announces every
        revoked key, those revoked before the start included (harmless: their access is
        gone already). After an outage it announces the keys revoked meanwhile; outages are
        logged once each. A key is announced at most once per watch. Never raises for a
        failing backend; an exception from ``handler`` ends the watch and propagates as is.
        """
        ...

    async def ping(self) -> None:
        """Return if the backend answers; raise StoreUnavailable (or StoreError) if not."""
        ...

    async def aclose(self) -> None:
        """Release the backend. Idempotent; any later call raises :class:`StoreError`."""
        ...


class ClosedOnExit(abc.ABC):
    """``async with store:`` for a store class: the block gets the store itself, and
    :meth:`aclose` runs when the block is left, however it is left."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the backend (see :meth:`Store.aclose`)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
