"""Talking to a relay's HTTP API: register, rotate and check keys, ask for sign-in links.

Every function blocks for at most about its ``timeout`` and raises :class:`CommandError` (one
line, no secret) when the relay is unreachable, refuses, or answers something unexpected.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import attrs

from common import looks_like_key, mask_key
from repowire._httpclient import HttpError, request_json
from repowire.config import http_base

from ._errors import CommandError, answer_detail

#: Seconds allowed for a request to the relay (register, rotate).
RELAY_REQUEST_TIMEOUT = 15.0

#: What :func:`check_key` found out about a key.
KEY_VALID = "valid"
KEY_UNCHECKED = "unchecked"


@attrs.frozen(kw_only=True)
class IssuedKey:
    """A key handed out by a relay (``scope_id`` is ``None`` for a rotation)."""

    api_key: str = attrs.field(repr=lambda key: repr(mask_key(key)))
    key_id: str
    scope_id: str | None = None


@attrs.frozen(kw_only=True)
class LoginLink:
    """A one-time sign-in link from the relay. ``url`` holds a single-use token, never a key."""

    url: str
    expires_at: float
    expires_in: float
    daemon_id: str | None


def _issued_key(answer: Mapping[str, Any], base: str, *, want_scope: bool) -> IssuedKey:
    api_key = answer.get("api_key")
    key_id = answer.get("key_id")
    scope_id = answer.get("scope_id")
    if not isinstance(api_key, str) or not looks_like_key(api_key):
        raise CommandError(f"the relay at {base} answered without a valid API key")
    if not isinstance(key_id, str) or not key_id:
        raise CommandError(f"the relay at {base} answered without a key id")
    if want_scope and (not isinstance(scope_id, str) or not scope_id):
        raise CommandError(f"the relay at {base} answered without a scope id")
    return IssuedKey(
        api_key=api_key, key_id=key_id, scope_id=scope_id if isinstance(scope_id, str) else None
    )


def _relay_request(
    method: str,
    base: str,
    route: str,
    *,
    body: dict[str, Any] | None,
    bearer: str | None,
    ca_file: Path | None,
    timeout: float,
) -> tuple[int, dict[str, Any]]:
    try:
        return request_json(
            method, base + route, body=body, bearer=bearer, ca_file=ca_file, timeout=timeout
        )
    except HttpError as exc:
        raise CommandError(f"relay request failed: {exc}") from None


def register_key(
    relay_url: str, *, label: str, ca_file: Path | None, timeout: float = RELAY_REQUEST_TIMEOUT
) -> IssuedKey:
    """Obtain a new key (in a new scope) with ``POST <http_base>/api/v1/register``.

    Raises :class:`CommandError` when the relay is unreachable, refuses (registration closed,
    rate limited) or answers something unexpected; :class:`~repowire.config.ConfigError` for
    a malformed relay URL.
    """
    base = http_base(relay_url)
    status, answer = _relay_request(
        "POST",
        base,
        "/api/v1/register",
        body={"label": label},
        bearer=None,
        ca_file=ca_file,
        timeout=timeout,
    )
    if status in (200, 201):
        return _issued_key(answer, base, want_scope=True)
    if status == 403:
        raise CommandError(
            f"registration is closed on the relay at {base}: ask its operator for a key, then "
            "run 'repowire setup --relay --api-key KEY'"
        )
    if status == 429:
        raise CommandError(f"the relay at {base} is limiting registrations; try again later")
    raise CommandError(
        f"the relay at {base} refused registration ({status}: {answer_detail(answer)})"
    )


def rotate_key(
    relay_url: str, api_key: str, *, ca_file: Path | None, timeout: float = RELAY_REQUEST_TIMEOUT
) -> IssuedKey:
    """Replace ``api_key`` with a new key via ``POST <http_base>/api/v1/keys/rotate``.

    The old key is sent as ``Authorization: Bearer``. Raises :class:`CommandError` when the
    relay is unreachable, rejects the key, or answers something unexpected.
    """
    base = http_base(relay_url)
    status, answer = _relay_request(
        "POST",
        base,
        "/api/v1/keys/rotate",
        body={},
        bearer=api_key,
        ca_file=ca_file,
        timeout=timeout,
    )
    if status == 200:
        return _issued_key(answer, base, want_scope=False)
    if status == 401:
        raise CommandError(
            f"the relay at {base} rejected the current API key (unknown or revoked); "
            "run 'repowire setup --relay --api-key KEY' with a valid key"
        )
    if status == 429:
        raise CommandError(f"the relay at {base} is limiting requests; try again later")
    raise CommandError(
        f"the relay at {base} refused the rotation ({status}: {answer_detail(answer)})"
    )


def check_key(
    relay_url: str, api_key: str, *, ca_file: Path | None, timeout: float = RELAY_REQUEST_TIMEOUT
) -> tuple[str, str | None]:
    """Ask the relay whether it knows ``api_key`` (``GET /api/v1/daemons`` with it as Bearer).

    Returns ``(KEY_VALID, None)`` when it does, ``(KEY_UNCHECKED, why)`` when the relay cannot
    be reached or gives no clear answer. Raises :class:`CommandError` when the relay rejects
    the key (401, 403) or when no relay answers at that URL (404).
    """
    base = http_base(relay_url)
    try:
        status, answer = request_json(
            "GET",
            base + "/api/v1/daemons",
            body=None,
            bearer=api_key,
            ca_file=ca_file,
            timeout=timeout,
        )
    except HttpError as exc:
        return KEY_UNCHECKED, f"could not reach the relay at {base} to check the key: {exc}"
    if status == 200:
        return KEY_VALID, None
    if status in (401, 403):
        raise CommandError(
            f"the relay at {base} does not accept this API key (unknown or revoked); nothing "
            "was stored. Register a new key for this daemon with "
            "'repowire setup --relay --new-key'"
        )
    if status == 404:
        raise CommandError(
            f"no Repowire relay answers at {base} (HTTP 404 for /api/v1/daemons); nothing was "
            "stored. Check --relay-url"
        )
    return (
        KEY_UNCHECKED,
        f"the relay at {base} could not check the key ({status}: {answer_detail(answer)})",
    )


def request_login_link(
    relay_url: str,
    api_key: str,
    *,
    daemon_id: str | None,
    ca_file: Path | None,
    timeout: float = RELAY_REQUEST_TIMEOUT,
) -> LoginLink:
    """Ask the relay for a one-time sign-in link (``POST /api/v1/login-links``, the key as
    Bearer, ``{"daemon_id": ...}`` when given).

    Raises :class:`CommandError` when the relay is unreachable, rejects the key, does not know
    the daemon, limits requests or answers something unexpected.
    """
    base = http_base(relay_url)
    status, answer = _relay_request(
        "POST",
        base,
        "/api/v1/login-links",
        body={} if daemon_id is None else {"daemon_id": daemon_id},
        bearer=api_key,
        ca_file=ca_file,
        timeout=timeout,
    )
    if status in (200, 201):
        return _login_link(answer, base, daemon_id)
    if status == 401:
        raise CommandError(
            f"the relay at {base} does not accept this daemon's API key (unknown or revoked); "
            "register a new one with 'repowire setup --relay --new-key'"
        )
    if status == 404 and answer.get("error") == "unknown_daemon":
        raise CommandError(
            f"daemon {daemon_id} has not connected to the relay at {base} with this key yet: "
            "start it with 'repowire serve --relay', then ask again"
        )
    if status == 429:
        raise CommandError(f"the relay at {base} is limiting sign-in links; try again shortly")
    raise CommandError(
        f"the relay at {base} refused the sign-in link ({status}: {answer_detail(answer)})"
    )


def _login_link(answer: Mapping[str, Any], base: str, daemon_id: str | None) -> LoginLink:
    """The link in a successful answer; CommandError when it holds no valid one."""
    url = answer.get("url")
    expires_at = answer.get("expires_at")
    expires_in = answer.get("expires_in")
    scheme = urllib.parse.urlsplit(url).scheme if isinstance(url, str) else ""
    if (
        scheme not in ("http", "https")
        or not isinstance(url, str)
        or not _finite_number(expires_at)
        or not _finite_number(expires_in)
    ):
        raise CommandError(f"the relay at {base} answered without a valid sign-in link")
    return LoginLink(
        url=url, expires_at=float(expires_at), expires_in=float(expires_in), daemon_id=daemon_id
    )


def _finite_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
