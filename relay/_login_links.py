"""One-time sign-in links: short-lived, single-use tokens the relay exchanges for a browser
session, so a phone can sign in by opening a URL (a QR code) instead of typing the API key.

A token is 32 random bytes, url-safe base64 encoded; only its digest
(:func:`common.hash_secret`) is kept, by the key store (:meth:`relay._store_api.Store.
create_login_link`), with the key and scope that asked for it: in memory for the SQLite store
(one relay per file; a restart forgets every token, they are minutes-long by design), in Redis
for a cluster (a link issued by one replica works on any other). It works once and for
:data:`LOGIN_LINK_TTL` seconds. The table is bounded: at most :data:`MAX_LINKS_PER_SCOPE` live
tokens per scope (issuing another drops that scope's oldest: a tenant only ever displaces its
own links, whatever number of keys it rotates through) and :data:`MAX_LINKS_TOTAL` in all; when
the table is full of live tokens, issuing is refused (:class:`LoginLinksFull`) rather than
dropping another tenant's. Issuing is also rate-limited per key by the relay
(:data:`ISSUE_RATE_PER_HOUR`, :data:`ISSUE_BURST`).

A token of a key that is no longer live (revoked, rotated) never signs in: the stores drop a
key's tokens when it is revoked and check the key when a token is taken. Time is an argument;
nothing here reads a clock.
"""

from __future__ import annotations

import collections
import re
import secrets
from typing import Final

import attrs

from common import hash_secret

#: Seconds a sign-in link works after it is issued.
LOGIN_LINK_TTL: Final = 300.0

#: Live sign-in links one scope (tenant) may hold, all its keys together; issuing another
#: drops that scope's oldest. Per scope, not per key: rotating a key gives a new key id.
MAX_LINKS_PER_SCOPE: Final = 8

#: Live sign-in links the relay holds in all; when that many live ones are held, issuing is
#: refused (:class:`LoginLinksFull`), never paid for with another scope's links.
MAX_LINKS_TOTAL: Final = 10_000

#: Sign-in links one key may ask for per hour on average (a token bucket, refilled evenly)...
ISSUE_RATE_PER_HOUR: Final = 30

#: ...and in one burst.
ISSUE_BURST: Final = 10

#: Random bytes behind a token (before url-safe base64 encoding, 43 characters without padding).
TOKEN_BYTES: Final = 32

_TOKEN_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{43}")


class LoginLinksFull(Exception):
    """The table holds :data:`MAX_LINKS_TOTAL` live tokens: no new one until some expire or
    are used."""


def looks_like_token(text: object) -> bool:
    """Whether ``text`` has the shape of a sign-in token (43 url-safe base64 characters).
    Never raises."""
    return isinstance(text, str) and _TOKEN_SHAPE.fullmatch(text) is not None


@attrs.frozen(kw_only=True)
class LoginLink:
    """What a token grants: a session for ``key_id`` (of ``scope_id``), landing on
    ``daemon_id``'s dashboard (or the scope's default without one)."""

    key_id: str
    scope_id: str
    daemon_id: str | None
    expires_at: float


def new_token() -> str:
    """A fresh random token (:data:`TOKEN_BYTES` bytes, url-safe base64, no padding)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


class LoginLinks:
    """The live sign-in tokens of one process, by digest (the SQLite store's table). Not
    thread-safe (the event loop's).

    ``max_per_scope`` and ``max_total`` default to :data:`MAX_LINKS_PER_SCOPE` and
    :data:`MAX_LINKS_TOTAL` as they are at each call (as the Redis store reads them).
    """

    def __init__(
        self,
        *,
        ttl: float = LOGIN_LINK_TTL,
        max_per_scope: int | None = None,
        max_total: int | None = None,
    ) -> None:
        """Raises ValueError unless ``ttl > 0`` and both bounds, when given, are at least 1."""
        if not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl}")
        if (max_per_scope is not None and max_per_scope < 1) or (
            max_total is not None and max_total < 1
        ):
            raise ValueError("max_per_scope and max_total must be at least 1")
        self.ttl = ttl
        self._max_per_scope = max_per_scope
        self._max_total = max_total
        # Oldest first: the ttl is the same for all, so this is also expiry order.
        self._links: collections.OrderedDict[str, LoginLink] = collections.OrderedDict()
        # key id -> that key's digests, oldest first.
        self._by_key: dict[str, collections.OrderedDict[str, None]] = {}
        # scope id -> that scope's digests, oldest first.
        self._by_scope: dict[str, collections.OrderedDict[str, None]] = {}

    @property
    def max_per_scope(self) -> int:
        return MAX_LINKS_PER_SCOPE if self._max_per_scope is None else self._max_per_scope

    @property
    def max_total(self) -> int:
        return MAX_LINKS_TOTAL if self._max_total is None else self._max_total

    def __len__(self) -> int:
        """How many tokens are held (expired ones not yet swept included)."""
        return len(self._links)

    def issue(
        self, *, key_id: str, scope_id: str, daemon_id: str | None, now: float
    ) -> tuple[str, LoginLink]:
        """A new token for ``key_id`` (of ``scope_id``) and what it grants; the raw token is
        returned only here. Drops the scope's oldest token when it holds ``max_per_scope``;
        raises :class:`LoginLinksFull` (nothing dropped) when ``max_total`` live tokens of
        other scopes fill the table."""
        # Expired entries first, so only live tokens count towards "full".
        self._sweep(now)
        ours = self._by_scope.get(scope_id)
        if ours is not None and len(ours) >= self.max_per_scope:
            self._drop(next(iter(ours)))
        if len(self._links) >= self.max_total:
            raise LoginLinksFull(f"{len(self._links)} sign-in links are live")
        token = new_token()
        digest = hash_secret(token)
        link = LoginLink(
            key_id=key_id, scope_id=scope_id, daemon_id=daemon_id, expires_at=now + self.ttl
        )
        self._links[digest] = link
        self._by_key.setdefault(key_id, collections.OrderedDict())[digest] = None
        self._by_scope.setdefault(scope_id, collections.OrderedDict())[digest] = None
        return token, link

    def redeem(self, token: object, *, now: float) -> LoginLink | None:
        """Use ``token`` up: what it grants, or None when it is malformed, unknown, already
        used or expired. Either way it never works again. Never raises."""
        self._sweep(now)
        if not looks_like_token(token):
            return None
        assert isinstance(token, str)
        digest = hash_secret(token)
        link = self._links.get(digest)
        if link is None:
            return None
        self._drop(digest)
        return link if now < link.expires_at else None

    def drop_key(self, key_id: str) -> int:
        """Forget every token of ``key_id`` (its access ended: revoked or rotated); how many
        were dropped."""
        digests = list(self._by_key.get(key_id, ()))
        for digest in digests:
            self._drop(digest)
        return len(digests)

    def _sweep(self, now: float) -> None:
        while self._links:
            digest, link = next(iter(self._links.items()))
            if now < link.expires_at:
                return
            self._drop(digest)

    def _drop(self, digest: str) -> None:
        link = self._links.pop(digest, None)
        if link is None:
            return
        for index, owner in ((self._by_key, link.key_id), (self._by_scope, link.scope_id)):
            entries = index.get(owner)
            if entries is not None:
                entries.pop(digest, None)
                if not entries:
                    del index[owner]
