"""API keys, browser session ids and public identifiers: generation, shape checks, hashing, masking.

Pure functions over strings. The only side effect is drawing randomness from :mod:`secrets`.
A raw key or session id is a secret: nothing here logs it, and :func:`mask_key` is the only
form in which a key may be shown to a person.
"""

from __future__ import annotations

import hashlib
import re
import secrets

#: Every API key starts with this prefix, so a leaked key is easy to recognise and scan for.
KEY_PREFIX = "rw_"

#: Random bytes behind a key or a session id (before url-safe base64 encoding).
SECRET_BYTES = 32

#: Length of the url-safe base64 text of :data:`SECRET_BYTES` bytes, without padding.
SECRET_TEXT_LENGTH = 43

#: Longest secret text accepted by the shape checks. Keys may carry more than 32 random bytes,
#: but an oversized header value is refused before it is hashed or looked up.
MAX_SECRET_TEXT_LENGTH = 256

#: Characters shown at each end of a masked key.
MASK_VISIBLE = 4

_SECRET_BODY = re.compile(rf"[A-Za-z0-9_-]{{{SECRET_TEXT_LENGTH},{MAX_SECRET_TEXT_LENGTH}}}")


def generate_key() -> str:
    """A new API key: ``rw_`` followed by 32 random bytes, url-safe base64 encoded (43 chars)."""
    return KEY_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def generate_session_id() -> str:
    """A new browser session id: 32 random bytes, url-safe base64 encoded (43 chars)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def generate_public_id(prefix: str) -> str:
    """A short random public identifier such as ``key_3f9c0a1b2d4e5f60``.

    Public ids name keys and scopes in admin tools and logs. They are drawn independently of any
    secret, so showing one reveals nothing about a key. Hex keeps them free of a leading ``-``
    (which a command line would take for an option).
    """
    return f"{prefix}_{secrets.token_hex(8)}"


def looks_like_key(text: object) -> bool:
    """Whether ``text`` has the shape of an API key.

    The shape is the ``rw_`` prefix followed by 43 to 256 characters of the url-safe base64
    alphabet (``A-Z a-z 0-9 - _``), nothing else (no padding, spaces or newlines). This is a
    cheap filter applied before any hashing or lookup; it never raises, whatever ``text`` is.
    """
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        return False
    return _SECRET_BODY.fullmatch(text, len(KEY_PREFIX)) is not None


def looks_like_session_id(text: object) -> bool:
    """Whether ``text`` has the shape of a session id (43 to 256 url-safe base64 characters).

    Never raises, whatever ``text`` is.
    """
    return isinstance(text, str) and _SECRET_BODY.fullmatch(text) is not None


def hash_secret(secret: str) -> str:
    """The SHA-256 digest of ``secret``'s UTF-8 encoding, as 64 lowercase hex characters.

    Never raises: a string holding lone surrogates (which UTF-8 cannot encode) is hashed with
    ``surrogatepass``, so malformed input simply matches nothing.
    """
    # Keys and session ids carry 256 bits of randomness, so a fast unsalted hash is the right
    # tool: a slow password hash (bcrypt, scrypt) protects guessable secrets and would only add
    # latency to every authenticated request here. Being unsalted makes the digest a lookup key.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def mask_key(key: str) -> str:
    """A form of ``key`` safe to show: ``rw_abcd…wxyz`` (at most 4 + 4 characters of the body).

    Anything that does not look like a key shows nothing of its content: ``rw_…`` when it has
    the prefix, ``…`` otherwise (the input may be a mistyped or truncated secret).
    """
    if not looks_like_key(key):
        return f"{KEY_PREFIX}…" if key.startswith(KEY_PREFIX) else "…"
    body = key[len(KEY_PREFIX) :]
    return f"{KEY_PREFIX}{body[:MASK_VISIBLE]}…{body[-MASK_VISIBLE:]}"
