"""One-time sign-in links: short-lived, single-use tokens the relay exchanges for a browser
session, so a phone can sign in by opening a URL (a QR code) instead of typing the API key.

A token is 32 random bytes, url-safe base64 encoded; only its digest
(:func:`relay._keys.hash_secret`) is kept, in memory, with the key and scope that asked for it.
It works once and for :data:`LOGIN_LINK_TTL` seconds. The table is bounded: at most
:data:`MAX_LINKS_PER_KEY` live tokens per key and :data:`MAX_LINKS_TOTAL` in all, the oldest
dropped first. A relay restart forgets every token (they are minutes-long by design).

This table does not know whether a key is still live: whoever redeems a token must check the
key against the store before opening a session (:meth:`relay._store.KeyStore.create_session`
refuses a revoked key), so revoking or rotating a key ends its tokens without any hook here.
Time is an argument; nothing here reads a clock.
"""

from __future__ import annotations

import collections
import re
import secrets
from typing import Final

import attrs

from ._keys import hash_secret

#: Seconds a sign-in link works after it is issued.
LOGIN_LINK_TTL: Final = 300.0

#: Live sign-in links one key may hold; issuing another drops that key's oldest.
MAX_LINKS_PER_KEY: Final = 8

#: Live sign-in links the relay holds in all; issuing another drops the oldest of any key.
MAX_LINKS_TOTAL: Final = 10_000

#: Random bytes behind a token (before url-safe base64 encoding, 43 characters without padding).
TOKEN_BYTES: Final = 32

_TOKEN_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{43}")


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


class LoginLinks:
    """The live sign-in tokens of one relay, by digest. Not thread-safe (the event loop's)."""

    def __init__(
        self,
        *,
        ttl: float = LOGIN_LINK_TTL,
        max_per_key: int = MAX_LINKS_PER_KEY,
        max_total: int = MAX_LINKS_TOTAL,
    ) -> None:
        """Raises ValueError unless ``ttl > 0`` and both bounds are at least 1."""
        if not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl}")
        if max_per_key < 1 or max_total < 1:
            raise ValueError("max_per_key and max_total must be at least 1")
        self.ttl = ttl
        self.max_per_key = max_per_key
        self.max_total = max_total
        # Oldest first: the ttl is the same for all, so this is also expiry order.
        self._links: collections.OrderedDict[str, LoginLink] = collections.OrderedDict()
        # key id -> that key's digests, oldest first.
        self._by_key: dict[str, collections.OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        """How many tokens are held (expired ones not yet swept included)."""
        return len(self._links)

    def issue(
        self, *, key_id: str, scope_id: str, daemon_id: str | None, now: float
    ) -> tuple[str, LoginLink]:
        """A new token for ``key_id`` and what it grants. The raw token is returned only here."""
        self._sweep(now)
        mine = self._by_key.get(key_id)
        if mine is not None and len(mine) >= self.max_per_key:
            self._drop(next(iter(mine)))
        while len(self._links) >= self.max_total:
            self._drop(next(iter(self._links)))
        token = secrets.token_urlsafe(TOKEN_BYTES)
        digest = hash_secret(token)
        link = LoginLink(
            key_id=key_id, scope_id=scope_id, daemon_id=daemon_id, expires_at=now + self.ttl
        )
        self._links[digest] = link
        self._by_key.setdefault(key_id, collections.OrderedDict())[digest] = None
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
        """Forget every token of ``key_id`` (its key was revoked); how many were dropped."""
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
        mine = self._by_key.get(link.key_id)
        if mine is not None:
            mine.pop(digest, None)
            if not mine:
                del self._by_key[link.key_id]
