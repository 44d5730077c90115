"""The daemon's tunable bounds and intervals, in one place."""

from __future__ import annotations

from typing import Final

import attrs

#: Largest request body accepted by the JSON routes (and largest WebSocket message), in bytes.
MAX_JSON_BODY: Final = 1024 * 1024

#: Seconds between ``: keepalive`` comment lines on an idle SSE stream, so proxies that close
#: quiet connections keep it open.
SSE_KEEPALIVE_INTERVAL: Final = 15.0

#: The reconnection delay suggested to EventSource clients (the SSE ``retry:`` field), in ms.
SSE_RETRY_MS: Final = 3000

#: Seconds to wait for another daemon's answer (or the list of daemons) over the mesh before
#: answering ``504 timeout``; the connector should time out first, this is the backstop.
MESH_REQUEST_TIMEOUT: Final = 30.0

#: How many daemons a broadcast contacts at the same time.
MESH_FANOUT_LIMIT: Final = 8

#: Seconds allowed for the last messages to a WebSocket client whose feed is being ended.
WS_FINAL_SEND_TIMEOUT: Final = 5.0

#: ``GET /events``: the page size when ``limit`` is absent, and the largest accepted.
EVENTS_DEFAULT_LIMIT: Final = 100
EVENTS_MAX_LIMIT: Final = 1000

#: Longest accepted ``from`` (sender) field of a message, in characters.
MAX_SENDER_LENGTH: Final = 256

#: Message ids (``POST /notify``'s ``id``): up to this many characters from
#: A-Z, a-z, 0-9, '.', '_', ':', '-' (a UUID fits, and so does a generated id).
MAX_MESSAGE_ID_LENGTH: Final = 128

#: How many delivered message ids a daemon remembers, to answer a retry of the same message
#: without delivering it again; the oldest is forgotten first.
MESSAGE_ID_MEMORY: Final = 10_000

#: Seconds a delivered message id is remembered (whichever of this and MESSAGE_ID_MEMORY is
#: reached first ends the memory of an id). A retry after that delivers again.
MESSAGE_ID_TTL: Final = 24 * 3600.0

#: How many other daemons of the scope a daemon remembers having seen (in the relay's
#: directory or over the mesh), so a broadcast can name the ones now offline; the one seen
#: longest ago is forgotten first.
MAX_KNOWN_DAEMONS: Final = 256


@attrs.frozen(kw_only=True)
class DaemonSettings:
    """Bounds and intervals of the daemon's HTTP service; defaults are the module constants."""

    max_body_bytes: int = MAX_JSON_BODY
    sse_keepalive_interval: float = SSE_KEEPALIVE_INTERVAL
    sse_retry_ms: int = SSE_RETRY_MS
    mesh_request_timeout: float = MESH_REQUEST_TIMEOUT
    mesh_fanout_limit: int = MESH_FANOUT_LIMIT
    ws_final_send_timeout: float = WS_FINAL_SEND_TIMEOUT
    message_id_memory: int = MESSAGE_ID_MEMORY
    message_id_ttl: float = MESSAGE_ID_TTL
    max_known_daemons: int = MAX_KNOWN_DAEMONS
