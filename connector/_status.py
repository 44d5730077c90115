"""The connector's state, as `repowire status` and the daemon's /health report it."""

from __future__ import annotations

import enum
from typing import Any

import attrs


class LinkState(enum.Enum):
    CONNECTED = "connected"
    CONNECTING = "connecting"  # dialling now
    DOWN = "down"  # not connected: waiting to retry, or stopped (see last_error)
    DISABLED = "disabled"  # relay access is off


@attrs.frozen(kw_only=True)
class ConnectorStatus:
    """A snapshot. Times are epoch seconds. Never holds a secret."""

    state: LinkState
    relay_url: str
    daemon_id: str
    connected_since: float | None = None
    last_connected_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    rtt_ms: float | None = None
    attempts: int = 0
    next_retry_at: float | None = None
    #: True while the link is not up and a retry will come (dialling now, or scheduled at
    #: ``next_retry_at``); False while connected, and once the connector gave up
    #: (incompatible version).
    retrying: bool = True

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["state"] = self.state.value
        return data
