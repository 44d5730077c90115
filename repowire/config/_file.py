"""Reading the config file: its bytes, its YAML, and the type checks of the keys we know.

Nothing here writes. Every problem is a :class:`~repowire.config.ConfigError` naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from common import looks_like_key

from ._daemon_id import check_daemon_id
from ._errors import BAD_KEY_SHAPE, ConfigError, redact_secrets
from ._urls import normalize_relay_url, relay_url_problem

#: A config file larger than this is refused unread: it cannot be a hand-written settings file,
#: and the bound keeps a mistaken path (a log, a binary) from being parsed into memory.
MAX_CONFIG_BYTES = 1024 * 1024


@attrs.frozen(kw_only=True)
class FileValues:
    """The known keys of a config file, type-checked; ``None`` where the file has no value."""

    daemon_host: str | None = None
    daemon_port: int | None = None
    daemon_id: str | None = None
    relay_enabled: bool | None = None
    relay_url: str | None = None
    relay_api_key: str | None = attrs.field(default=None, repr=False)
    relay_ca_file: str | None = None


def round_trip_yaml() -> YAML:
    """The YAML reader and writer: round-trip mode, so comments and key order survive an edit."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    # Never fold long values (URLs, keys) onto a second line.
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def read_text(path: Path) -> str | None:
    """The file's text, or ``None`` when it does not exist."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a config file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None


def parse(text: str, path: Path) -> CommentedMap | None:
    """The document's top-level mapping, or ``None`` for an empty (or comments-only) file."""
    try:
        document = round_trip_yaml().load(text)
    except DuplicateKeyError as exc:
        # The library's message quotes both values, which may be keys: name the line only.
        raise ConfigError(f"{path}: invalid YAML at {_where(exc)}: duplicate key") from None
    except MarkedYAMLError as exc:
        problem = redact_secrets(" ".join(str(exc.problem or exc.context or "syntax").split()))
        raise ConfigError(f"{path}: invalid YAML at {_where(exc)}: {problem}") from None
    except YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {type(exc).__name__}") from None
    if document is None:
        return None
    if not isinstance(document, CommentedMap):
        raise ConfigError(f"{path}: the top level must be a mapping (daemon:, relay:, ...)")
    return document


def _where(exc: MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return "an unknown position"
    return f"line {mark.line + 1}, column {mark.column + 1}"


def section(document: CommentedMap | None, name: str, path: Path) -> Mapping[Any, Any]:
    """The mapping under top-level key ``name`` (empty when absent); ConfigError if not one."""
    if document is None:
        return {}
    found = document.get(name)
    if found is None:
        return {}
    if not isinstance(found, Mapping):
        raise ConfigError(f"{path}: '{name}' must be a mapping, got {type_name(found)}")
    return found


def type_name(value: object) -> str:
    """How a value's YAML type is named in a message (never the value itself)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def valid_port(port: int) -> bool:
    """Whether ``port`` is a TCP port a daemon can listen on (1-65535)."""
    return 1 <= port <= 65535


def resolve_ca_file(value: str, home: Path, path: Path) -> Path:
    """``relay.ca_file`` as a path (relative to ``home``); ConfigError unless it is a file."""
    ca_file = Path(value).expanduser()
    if not ca_file.is_absolute():
        # A relative path in the file is relative to the directory holding the file.
        ca_file = home / ca_file
    if not ca_file.is_file():
        raise ConfigError(f"{path}: relay.ca_file {str(ca_file)!r} is not a readable file")
    return ca_file


def _get_str(values: Mapping[Any, Any], name: str, key: str, path: Path) -> str | None:
    value = values.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {name}.{key} must be a string, got {type_name(value)}")
    return str(value)


def file_values(document: CommentedMap | None, path: Path) -> FileValues:
    """Type-check the keys this package knows; every other key is left alone."""
    daemon = section(document, "daemon", path)
    relay = section(document, "relay", path)
    host, port, daemon_id = _daemon_values(daemon, path)
    enabled = relay.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise ConfigError(f"{path}: relay.enabled must be true or false, got {type_name(enabled)}")

    url = _get_str(relay, "relay", "url", path)
    if url is not None:
        url, _ = normalize_relay_url(url)
        problem = relay_url_problem(url)
        if problem is not None:
            raise ConfigError(f"{path}: relay.url {redact_secrets(url)!r} {problem}")

    api_key = relay.get("api_key")
    if api_key is not None and not (isinstance(api_key, str) and looks_like_key(api_key)):
        raise ConfigError(f"{path}: relay.api_key {BAD_KEY_SHAPE}")

    ca_file = _get_str(relay, "relay", "ca_file", path)
    if ca_file is not None and not ca_file.strip():
        raise ConfigError(f"{path}: relay.ca_file must not be empty (remove the key instead)")

    return FileValues(
        daemon_host=host,
        daemon_port=port,
        daemon_id=daemon_id,
        relay_enabled=None if enabled is None else bool(enabled),
        relay_url=url,
        relay_api_key=None if api_key is None else str(api_key),
        relay_ca_file=ca_file,
    )


def _daemon_values(
    daemon: Mapping[Any, Any], path: Path
) -> tuple[str | None, int | None, str | None]:
    """``daemon.host``, ``daemon.port`` and ``daemon.id``, type-checked."""
    host = _get_str(daemon, "daemon", "host", path)
    if host is not None and not host.strip():
        raise ConfigError(f"{path}: daemon.host must not be empty")

    port = daemon.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not valid_port(port)
    ):
        shown = repr(port) if isinstance(port, int | str) else type_name(port)
        raise ConfigError(f"{path}: daemon.port must be a port number 1-65535, got {shown}")

    daemon_id = _get_str(daemon, "daemon", "id", path)
    if daemon_id is not None:
        check_daemon_id(daemon_id, f"{path}: daemon.id")
    return host, None if port is None else int(port), daemon_id
