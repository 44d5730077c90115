"""The connector's settings, and the relay endpoint they name."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import attrs

from mux import MuxConfig, link_mux_config
from protocol import BackoffConfig

from ._daemon_pool import DEFAULT_MAX_IDLE

#: The daemon routes other daemons may reach through the mesh.
DEFAULT_MESH_ALLOWLIST: frozenset[tuple[str, str]] = frozenset(
    {("POST", "/notify"), ("POST", "/broadcast")}
)


def link_url(relay_url: str) -> str:
    """The daemon endpoint for a relay URL: ``wss://host`` → ``wss://host/ws/relay``."""
    parts = urlsplit(relay_url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"relay URL must start with ws:// or wss://, not {relay_url!r}")
    if not parts.hostname:
        raise ValueError(f"relay URL has no host: {relay_url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/ws/relay"):
        path += "/ws/relay"
    return f"{parts.scheme}://{parts.netloc}{path}"


@attrs.frozen(kw_only=True)
class ConnectorConfig:
    relay_url: str = attrs.field()
    api_key: str = attrs.field(repr=False)
    daemon_id: str
    daemon_host: str = "127.0.0.1"
    daemon_port: int = 8377
    #: A CA bundle to trust for a self-signed relay (system trust otherwise).
    ca_file: Path | None = None
    version: str = "0.0.0"
    backoff: BackoffConfig = attrs.field(factory=BackoffConfig)
    #: The link's session settings: the bulk-link windows of ``mux.link_mux_config``.
    mux: MuxConfig = attrs.field(factory=link_mux_config)
    connect_timeout: float = 10.0
    #: Seconds a mesh request may take before it fails with ``timeout``.
    mesh_timeout: float = 30.0
    mesh_allowlist: frozenset[tuple[str, str]] = DEFAULT_MESH_ALLOWLIST
    #: Idle kept-alive connections to the daemon, at most (0: a connection per request).
    daemon_pool_size: int = attrs.field(default=DEFAULT_MAX_IDLE, validator=attrs.validators.ge(0))

    @relay_url.validator
    def _check_url(self, attribute: object, value: str) -> None:
        link_url(value)
