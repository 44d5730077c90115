"""The daemon's error shape: every error answer is ``{"error": code, "detail": sentence}``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from ._mesh import MeshError

#: The HTTP status each mesh failure is reported with.
MESH_ERROR_STATUS: Final[Mapping[str, int]] = {
    "unknown_daemon": 404,
    "daemon_offline": 503,
    "relay_down": 503,
    "forbidden": 403,
    "timeout": 504,
}

#: Error codes (and one-sentence details) for the HTTP errors raised by routing and Quart.
HTTP_ERRORS: Final[Mapping[int, tuple[str, str]]] = {
    400: ("bad_request", "The request could not be understood."),
    404: ("not_found", "There is nothing at this path."),
    405: ("method_not_allowed", "This path does not accept that method."),
    408: ("request_timeout", "The request took too long to arrive."),
    413: ("payload_too_large", "The request body is larger than this daemon accepts."),
    415: ("unsupported_media_type", "The request body must be sent as application/json."),
    500: ("internal_error", "The daemon failed to handle the request."),
}


class ApiError(Exception):
    """An error answer: raised by a handler, turned into a JSON response by the app."""

    def __init__(
        self, status: int, code: str, detail: str, extra: Mapping[str, object] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        #: Fields the answer carries beside ``error`` and ``detail`` (say, a message ``id``).
        self.extra: Mapping[str, object] = dict(extra or {})

    def to_json(self) -> dict[str, object]:
        return {"error": self.code, "detail": self.detail, **self.extra}

    def with_fields(self, **fields: object) -> ApiError:
        """The same error with more answer fields."""
        return ApiError(self.status, self.code, self.detail, {**self.extra, **fields})

    @classmethod
    def from_mesh(cls, error: MeshError) -> ApiError:
        return cls(MESH_ERROR_STATUS.get(error.code, 502), error.code, error.detail)


def http_error(status: int, description: str | None = None) -> ApiError:
    """The :class:`ApiError` for a plain HTTP status (from routing, body limits and so on)."""
    code, detail = HTTP_ERRORS.get(status, (f"http_{status}", "The request failed."))
    return ApiError(status, code, description or detail)


def dump_json(obj: object) -> str:
    """Compact JSON; refuses NaN and infinities, which browsers cannot parse."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes | str, what: str = "The request body") -> dict[str, object]:
    """Parse ``raw`` as one JSON object, or raise ``ApiError(400, "bad_request", ...)``."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, "bad_request", f"{what} is nested too deeply.") from None
    except ValueError as exc:
        # JSONDecodeError and UnicodeDecodeError both land here.
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "it is not UTF-8 text"
        raise ApiError(400, "bad_request", f"{what} is not valid JSON ({reason}).") from None
    if not isinstance(value, dict):
        raise ApiError(400, "bad_request", f"{what} must be a JSON object.")
    return value
