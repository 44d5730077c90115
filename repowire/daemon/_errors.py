"""The daemon's error shape: every error answer is ``{"error": code, "detail": sentence}``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from common import MESH_ERROR_STATUS as MESH_ERROR_STATUS
from common import http_error_code, mesh_error_status

from ._mesh import MeshError

#: The one-sentence detail of each HTTP error raised by routing and Quart (its code is
#: :func:`common.http_error_code`'s).
HTTP_ERROR_DETAILS: Final[Mapping[int, str]] = {
    400: "The request could not be understood.",
    404: "There is nothing at this path.",
    405: "This path does not accept that method.",
    408: "The request took too long to arrive.",
    413: "The request body is larger than this daemon accepts.",
    415: "The request body must be sent as application/json.",
    500: "The daemon failed to handle the request.",
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
        return cls(mesh_error_status(error.code), error.code, error.detail)


def http_error(status: int, description: str | None = None) -> ApiError:
    """The :class:`ApiError` for a plain HTTP status (from routing, body limits and so on)."""
    detail = HTTP_ERROR_DETAILS.get(status, "The request failed.")
    return ApiError(status, http_error_code(status), description or detail)


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
