"""WebSocket close codes: those of the daemon link (``/ws/relay``), shared by relay and connector,
and the RFC 6455 codes the relay and the daemon send to browsers."""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    #: RFC 6455 "going away": the endpoint is shutting down or the page navigated away.
    GOING_AWAY = 1001
    #: RFC 6455 "policy violation": access ended (revoked key, signed out) or was refused.
    POLICY_VIOLATION = 1008
    #: RFC 6455 "message too big".
    MESSAGE_TOO_BIG = 1009
    #: RFC 6455 "internal error": the far side (the daemon, its link) failed.
    INTERNAL_ERROR = 1011
    #: RFC 6455's "try again later": the relay is working on too many link handshakes.
    TRY_AGAIN_LATER = 1013
    PROTOCOL_ERROR = 4400
    INVALID_KEY = 4401
    #: The key was revoked or rotated while the link was up (the relay ends every link of it).
    KEY_REVOKED = 4403
    REPLACED = 4409
    #: The key's scope holds its quota of links (``max_links_per_scope``): back off.
    TOO_MANY_LINKS = 4429
    INCOMPATIBLE_VERSION = 4426
    SHUTTING_DOWN = 4503
