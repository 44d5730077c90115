"""WebSocket close codes of the daemon link (``/ws/relay``), shared by relay and connector."""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    #: RFC 6455's "try again later": the relay is working on too many link handshakes.
    TRY_AGAIN_LATER = 1013
    PROTOCOL_ERROR = 4400
    INVALID_KEY = 4401
    REPLACED = 4409
    INCOMPATIBLE_VERSION = 4426
    SHUTTING_DOWN = 4503
