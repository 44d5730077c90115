"""The resolved settings, the command-line overrides, and the defaults behind them."""

from __future__ import annotations

from pathlib import Path

import attrs

from common import mask_key

DEFAULT_DAEMON_HOST = "127.0.0.1"
DEFAULT_DAEMON_PORT = 8377
DEFAULT_RELAY_URL = "wss://repowire.io"


def _mask_optional(key: str | None) -> str:
    return "None" if key is None else repr(mask_key(key))


@attrs.frozen(kw_only=True)
class DaemonConfig:
    """Where the local daemon listens, and the stable id it announces to the relay."""

    host: str
    port: int
    daemon_id: str
    #: True when ``daemon_id`` was generated for this read only (``persist=False`` and no id
    #: stored yet): another run would get another one, so it must not be shown as this
    #: daemon's id.
    id_is_temporary: bool = False


@attrs.frozen(kw_only=True)
class RelayConfig:
    """Whether and how the daemon connects to a relay. ``repr`` masks the key."""

    enabled: bool
    url: str
    api_key: str | None = attrs.field(repr=_mask_optional)
    ca_file: Path | None
    #: True when no flag, variable or file named the URL, so :data:`DEFAULT_RELAY_URL` (the
    #: hosted relay) applies: commands say so once, for a self-hoster who forgot to set it.
    url_is_default: bool = False


@attrs.frozen(kw_only=True)
class Settings:
    """Fully resolved settings: every layer applied, every value validated."""

    home: Path
    config_path: Path
    daemon: DaemonConfig
    relay: RelayConfig


@attrs.frozen(kw_only=True)
class Overrides:
    """Values given on the command line; ``None`` means "not given"."""

    relay_enabled: bool | None = None
    relay_url: str | None = None
    api_key: str | None = attrs.field(default=None, repr=_mask_optional)
    ca_file: Path | None = None
    daemon_host: str | None = None
    daemon_port: int | None = None
    daemon_id: str | None = None
