"""A small blocking JSON-over-HTTP client for the command line (``urllib`` only).

It exists so that a command such as ``repowire setup`` can talk to a relay and ``repowire
status`` to the local daemon without an event loop. Every failure becomes one :class:`HttpError`
with a one-line message; a bearer token is sent only in the ``Authorization`` header and never
appears in a URL or a message.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from common import package_version

#: The longest answer read; a JSON document from the relay or the daemon is far smaller, and
#: the bound keeps a wrong URL (a download, an endless stream) from filling memory.
MAX_RESPONSE_BYTES = 1024 * 1024


class HttpError(Exception):
    """A request failed: unreachable host, TLS failure, redirect, oversized or non-JSON answer.

    ``str(error)`` is one line. ``status`` is the HTTP status when an answer arrived (an answer
    that was not JSON), else ``None``. ``unreachable`` is true when no connection could be made
    (refused, no route, unknown host), which a caller may report as "not running".
    """

    def __init__(self, message: str, *, status: int | None = None, unreachable: bool = False):
        super().__init__(message)
        self.status = status
        self.unreachable = unreachable


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would replay the Authorization header to wherever a redirect points, and turn a
    # POST into a GET. A relay or daemon API never redirects, so a redirect is an error.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


def safe_url(url: str) -> str:
    """``url`` without credentials, query or fragment: the form used in messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise HttpError(f"cannot use CA file {str(ca_file)!r}: {reason}") from None


def _describe_reason(reason: object, where: str, timeout: float) -> tuple[str, bool]:
    """A one-line description of a connection failure and whether it means "unreachable"."""
    if isinstance(reason, ssl.SSLCertVerificationError):
        detail = reason.verify_message or "certificate verification failed"
        return f"TLS certificate of {where} not trusted: {detail}", False
    if isinstance(reason, ssl.SSLError):
        return f"TLS handshake with {where} failed: {reason.reason or reason}", False
    if isinstance(reason, TimeoutError | socket.timeout):
        return f"no answer from {where} within {timeout:g} s", False
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host of {where}", True
    if isinstance(reason, ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused", True
    if isinstance(reason, OSError):
        text = reason.strerror or str(reason) or type(reason).__name__
        return f"cannot connect to {where}: {text}", True
    return f"request to {where} failed: {reason}", False


def request_json(
    method: str,
    url: str,
    *,
    body: dict[str, Any] | None = None,
    bearer: str | None = None,
    ca_file: Path | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, Any]]:
    """Send one request and return ``(status, json_object)``.

    Any status is returned as long as the answer is a JSON object (an error answer usually is);
    an empty answer (such as ``204``) reads as ``{}``. ``bearer`` is sent as ``Authorization:
    Bearer ...``. ``ca_file`` adds a trusted certificate authority for ``https``. Proxies from the
    environment are used, except for loopback hosts. Redirects are not followed.

    Raises :class:`HttpError` for an unreachable host, a TLS failure, a timeout, a redirect, an
    answer over :data:`MAX_RESPONSE_BYTES`, or an answer that is not a JSON object.
    """
    where = safe_url(url)
    scheme, host = _checked_url(url, where)
    request = _build_request(method, url, body, bearer)
    opener = _build_opener(scheme, host, ca_file)
    response = _open(opener, request, where, timeout)
    status, raw = _read_answer(response, where, timeout)
    return status, _parse_answer(status, raw, where)


def _checked_url(url: str, where: str) -> tuple[str, str]:
    """The scheme and host of ``url`` (``where`` is its form for messages). Raises
    :class:`HttpError` unless it is an ``http`` or ``https`` URL with a host."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        raise HttpError(f"invalid URL {where!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"not an http(s) URL: {where!r}")
    return parts.scheme, parts.hostname


def _build_request(
    method: str, url: str, body: dict[str, Any] | None, bearer: str | None
) -> urllib.request.Request:
    """The request, with ``body`` as JSON and ``bearer`` in the ``Authorization`` header."""
    headers = {
        "Accept": "application/json",
        "User-Agent": f"repowire/{package_version()}",
    }
    data = None
    if body is not None:
        data = json.dumps(body).encode("utf-8")
        headers["Content-Type"] = "application/json"
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    return urllib.request.Request(url, data=data, headers=headers, method=method)


def _build_opener(scheme: str, host: str, ca_file: Path | None) -> urllib.request.OpenerDirector:
    """An opener that follows no redirect, trusts ``ca_file`` for ``https`` and bypasses
    proxies for a loopback ``host``. Raises :class:`HttpError` if ``ca_file`` is unusable."""
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if scheme == "https":
        handlers.append(urllib.request.HTTPSHandler(context=_tls_context(ca_file)))
    if _is_loopback(host):
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def _open(
    opener: urllib.request.OpenerDirector,
    request: urllib.request.Request,
    where: str,
    timeout: float,
) -> http.client.HTTPResponse | urllib.error.HTTPError:
    """The answer to ``request``, whatever its status. Raises :class:`HttpError` when none
    arrived (``unreachable`` set when no connection could be made)."""
    try:
        response: http.client.HTTPResponse = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        # An error status still carries an answer worth reading (usually a JSON error).
        return exc
    except urllib.error.URLError as exc:
        message, unreachable = _describe_reason(exc.reason, where, timeout)
        raise HttpError(message, unreachable=unreachable) from None
    except (OSError, http.client.HTTPException) as exc:
        message, unreachable = _describe_reason(exc, where, timeout)
        raise HttpError(message, unreachable=unreachable) from None
    return response


def _read_answer(
    response: http.client.HTTPResponse | urllib.error.HTTPError, where: str, timeout: float
) -> tuple[int, bytes]:
    """The status and body of ``response``, which is closed on return. Raises
    :class:`HttpError` for a redirect, a failed read or a body over
    :data:`MAX_RESPONSE_BYTES`."""
    with response:
        status = int(response.status or 0)
        if 300 <= status < 400:
            raise HttpError(
                f"{where} answered with a redirect ({status}); not followed", status=status
            )
        try:
            # One byte over the bound tells an answer at the bound from a longer one.
            raw = response.read(MAX_RESPONSE_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            message, _ = _describe_reason(exc, where, timeout)
            raise HttpError(f"reading the answer failed: {message}", status=status) from None
    if len(raw) > MAX_RESPONSE_BYTES:
        raise HttpError(
            f"{where} answered {status} with more than {MAX_RESPONSE_BYTES} bytes", status=status
        )
    return status, raw


def _parse_answer(status: int, raw: bytes, where: str) -> dict[str, Any]:
    """The JSON object in ``raw`` (``{}`` for an empty answer). Raises :class:`HttpError`
    unless it is one."""
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HttpError(
            f"{where} answered {status} with something that is not JSON", status=status
        ) from None
    if not isinstance(document, dict):
        raise HttpError(f"{where} answered {status} with JSON that is not an object", status=status)
    return document
