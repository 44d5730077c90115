"""Error answers: the ``error`` codes of the JSON bodies ``{"error": code, "detail": sentence}``
that the relay and the daemon send, the HTTP status each mesh failure is answered with, and the
reason phrase of a status line written by hand.

The detail sentences are not here: each server words its own (a relay speaks of addresses, a
daemon of paths).
"""

from __future__ import annotations

import http
from collections.abc import Mapping
from typing import Final

#: The HTTP status each mesh failure (``connector.MeshErrorCode``) is answered with.
#: A code missing here is answered 502 (see :func:`mesh_error_status`).
MESH_ERROR_STATUS: Final[Mapping[str, int]] = {
    "unknown_daemon": 404,
    "daemon_offline": 503,
    "relay_down": 503,
    "forbidden": 403,
    "timeout": 504,
}

#: The error code of each HTTP status raised by routing, body limits or the web framework
#: rather than by a handler that names its own code. A status missing here gets
#: ``http_<status>`` (see :func:`http_error_code`).
HTTP_ERROR_CODES: Final[Mapping[int, str]] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
}


def mesh_error_status(code: str) -> int:
    """The HTTP status for the mesh failure ``code``: :data:`MESH_ERROR_STATUS`, else 502."""
    return MESH_ERROR_STATUS.get(code, 502)


def http_error_code(status: int) -> str:
    """The error code for the HTTP ``status``: :data:`HTTP_ERROR_CODES`, else ``http_<status>``."""
    return HTTP_ERROR_CODES.get(status, f"http_{status}")


def reason_phrase(status: int) -> str:
    """The standard reason phrase of ``status`` for an HTTP/1.1 status line ("Bad Gateway"),
    or ``Error`` for a status the standard does not name. Never raises."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"
