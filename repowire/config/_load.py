"""Resolving the settings: flags > environment > config file > defaults.

:func:`read_settings` only reads. :func:`load_settings` is the same plus, when asked to persist
and no daemon id is known yet, the one write that keeps the id stable from run to run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import attrs

from common import looks_like_key

from ._daemon_id import check_daemon_id, generate_daemon_id
from ._edit import ensure_daemon_id
from ._errors import BAD_KEY_SHAPE, ConfigError, redact_secrets
from ._file import FileValues, file_values, parse, read_text, resolve_ca_file, valid_port
from ._model import (
    DEFAULT_DAEMON_HOST,
    DEFAULT_DAEMON_PORT,
    DEFAULT_RELAY_URL,
    DaemonConfig,
    Overrides,
    RelayConfig,
    Settings,
)
from ._paths import config_path, repowire_home
from ._urls import normalize_relay_url, relay_url_problem

ENV_RELAY_URL = "REPOWIRE_RELAY_URL"
ENV_API_KEY = "REPOWIRE_API_KEY"
ENV_RELAY_ENABLED = "REPOWIRE_RELAY_ENABLED"
ENV_DAEMON_PORT = "REPOWIRE_DAEMON_PORT"

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


@attrs.frozen(kw_only=True)
class _EnvValues:
    """The environment layer, checked; ``None`` where a variable is unset or empty."""

    relay_url: str | None
    api_key: str | None = attrs.field(repr=False)
    relay_enabled: bool | None
    daemon_port: int | None


def load_settings(
    home: Path | None = None,
    overrides: Overrides | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    persist: bool = True,
) -> Settings:
    """Resolve the settings: flags > environment > config file > defaults.

    ``home`` defaults to :func:`repowire_home`; ``environ`` to ``os.environ``. A missing config
    file is fine (defaults apply). When no daemon id is given on the command line or in the
    file, one is generated and written to the file (:func:`ensure_daemon_id`), so it stays
    the same from run to run. With ``persist=False`` (every read-only command) nothing is
    written: this is :func:`read_settings`.

    Raises :class:`ConfigError` for a malformed file, a malformed environment variable or a
    malformed override; the file is not modified in that case.
    """
    settings = read_settings(home, overrides, environ=environ)
    if not persist or not settings.daemon.id_is_temporary:
        return settings
    # Last, once everything is known to be valid: the only write a load may make.
    daemon = attrs.evolve(
        settings.daemon, daemon_id=ensure_daemon_id(settings.home), id_is_temporary=False
    )
    return attrs.evolve(settings, daemon=daemon)


def read_settings(
    home: Path | None = None,
    overrides: Overrides | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve the settings like :func:`load_settings`, without writing anything.

    A missing daemon id is generated for this call only (``daemon.id_is_temporary``), and a
    fresh home stays untouched (not even created). Raises :class:`ConfigError` as
    :func:`load_settings` does.
    """
    env = os.environ if environ is None else environ
    home = repowire_home(env) if home is None else home
    flags = Overrides() if overrides is None else overrides
    path = config_path(home)

    text = read_text(path)
    values = FileValues() if text is None else file_values(parse(text, path), path)
    if flags.daemon_id is not None:
        check_daemon_id(flags.daemon_id, "--daemon-id")
    from_env = _env_values(env)
    flag_url = _checked_flags(flags)

    ca_file: Path | None = flags.ca_file
    if ca_file is None and values.relay_ca_file is not None:
        ca_file = resolve_ca_file(values.relay_ca_file, home, path)

    known_id = _first_optional(flags.daemon_id, values.daemon_id)
    daemon = DaemonConfig(
        host=_first(flags.daemon_host, values.daemon_host, DEFAULT_DAEMON_HOST),
        port=_first(
            flags.daemon_port, from_env.daemon_port, values.daemon_port, DEFAULT_DAEMON_PORT
        ),
        daemon_id=known_id or generate_daemon_id(),
        id_is_temporary=known_id is None,
    )
    relay = RelayConfig(
        enabled=_first(flags.relay_enabled, from_env.relay_enabled, values.relay_enabled, False),
        url=_first(flag_url, from_env.relay_url, values.relay_url, DEFAULT_RELAY_URL),
        api_key=_first_optional(flags.api_key, from_env.api_key, values.relay_api_key),
        ca_file=ca_file,
        url_is_default=flag_url is None and from_env.relay_url is None and values.relay_url is None,
    )
    return Settings(home=home, config_path=path, daemon=daemon, relay=relay)


def _env_values(environ: Mapping[str, str]) -> _EnvValues:
    url = _env(environ, ENV_RELAY_URL)
    if url is not None:
        url = _check_relay_url(url, ENV_RELAY_URL)
    key = _env(environ, ENV_API_KEY)
    if key is not None and not looks_like_key(key):
        raise ConfigError(f"{ENV_API_KEY} {BAD_KEY_SHAPE}")
    return _EnvValues(
        relay_url=url,
        api_key=key,
        relay_enabled=_env_bool(environ, ENV_RELAY_ENABLED),
        daemon_port=_env_port(environ, ENV_DAEMON_PORT),
    )


def _checked_flags(flags: Overrides) -> str | None:
    """Check the overrides but the daemon id; returns ``--relay-url`` normalised (``None`` when
    not given)."""
    url = flags.relay_url
    if url is not None:
        url = _check_relay_url(url, "--relay-url")
    if flags.api_key is not None and not looks_like_key(flags.api_key):
        raise ConfigError(f"--api-key {BAD_KEY_SHAPE}")
    if flags.daemon_port is not None and not valid_port(flags.daemon_port):
        raise ConfigError(f"--port must be a port number 1-65535, got {flags.daemon_port}")
    if flags.daemon_host is not None and not flags.daemon_host:
        raise ConfigError("--host must not be empty")
    return url


_T = TypeVar("_T")


def _first(*candidates: _T | None) -> _T:
    for candidate in candidates:
        if candidate is not None:
            return candidate
    raise AssertionError("the last candidate is a default and never None")


def _first_optional(*candidates: str | None) -> str | None:
    for candidate in candidates:
        if candidate is not None:
            return candidate
    return None


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _env_bool(environ: Mapping[str, str], name: str) -> bool | None:
    value = _env(environ, name)
    if value is None:
        return None
    word = value.lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ConfigError(f"{name} must be 1/0/true/false/yes/no/on/off, got {value!r}")


def _env_port(environ: Mapping[str, str], name: str) -> int | None:
    value = _env(environ, name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or not valid_port(int(value)):
        raise ConfigError(f"{name} must be a port number 1-65535, got {value!r}")
    return int(value)


def _check_relay_url(url: str, source: str) -> str:
    """``url`` normalised (:func:`normalize_relay_url`); ConfigError naming ``source`` if bad."""
    url, _ = normalize_relay_url(url)
    problem = relay_url_problem(url)
    if problem is not None:
        raise ConfigError(f"{source}: relay URL {redact_secrets(url)!r} {problem}")
    return url
