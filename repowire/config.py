"""The configuration file (``<home>/config.yaml``) and the settings resolved from it.

Home directory: ``$REPOWIRE_HOME`` when set, else ``~/.repowire``. The file is YAML::

    daemon:
      host: 127.0.0.1
      port: 8377
      id: laptop-3f9c0a        # generated on first use, then kept
    relay:
      enabled: false
      url: wss://repowire.io
      api_key: rw_...
      ca_file: /path/to/ca.pem # optional: trust a self-signed relay

Every value is resolved with this precedence, highest first:

1. command-line flags (:class:`Overrides`);
2. environment: ``REPOWIRE_RELAY_URL``, ``REPOWIRE_API_KEY``, ``REPOWIRE_RELAY_ENABLED``
   (``1``/``0``/``true``/``false``/``yes``/``no``/``on``/``off``), ``REPOWIRE_DAEMON_PORT``;
   an empty variable counts as unset;
3. the config file;
4. the defaults below.

Writes go through :func:`update_config`: a round-trip edit that keeps comments, key order and
keys this module does not know, done under a lock, written to a temporary file in the same
directory and renamed over the old one, with mode 0600 because the file holds an API key.
A malformed file is never rewritten: every function raises :class:`ConfigError` with one line
naming the file and the problem, and leaves the file byte-for-byte as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import secrets
import socket
import tempfile
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import CommentMark, MarkedYAMLError, YAMLError
from ruamel.yaml.tokens import CommentToken

from common import looks_like_key, mask_key

ENV_HOME = "REPOWIRE_HOME"
ENV_RELAY_URL = "REPOWIRE_RELAY_URL"
ENV_API_KEY = "REPOWIRE_API_KEY"
ENV_RELAY_ENABLED = "REPOWIRE_RELAY_ENABLED"
ENV_DAEMON_PORT = "REPOWIRE_DAEMON_PORT"

CONFIG_FILE_NAME = "config.yaml"
#: Held (``flock``) around every read-modify-write so two commands never lose each other's edit.
LOCK_FILE_NAME = ".config.lock"

DEFAULT_DAEMON_HOST = "127.0.0.1"
DEFAULT_DAEMON_PORT = 8377
DEFAULT_RELAY_URL = "wss://repowire.io"
#: The relay's daemon endpoint. A relay URL names the relay's root or this path, nothing else.
RELAY_LINK_PATH = "/ws/relay"
#: How an ``http(s)://`` relay URL is taken: the daemon's link to a relay is a WebSocket.
_HTTP_TO_WS = {"http": "ws", "https": "wss"}

#: A config file larger than this is refused unread: it cannot be a hand-written settings file,
#: and the bound keeps a mistaken path (a log, a binary) from being parsed into memory.
MAX_CONFIG_BYTES = 1024 * 1024

#: The daemon id as the relay accepts it (``Repowire-Daemon-Id`` header).
DAEMON_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Longest hostname-derived part of a generated daemon id (the random suffix adds 7 characters).
DAEMON_ID_HOST_PART_MAX = 40
#: Random bytes in a generated daemon id's suffix (shown as hex).
DAEMON_ID_RANDOM_BYTES = 3

_FILE_MODE = 0o600
_HOME_MODE = 0o700
_NEW_FILE_HEADER = (
    "# Repowire configuration. 'repowire setup' edits this file in place and keeps\n"
    "# comments and keys it does not know.\n"
)
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
# Anything shaped like a key prefix plus secret text; used to scrub messages of stray keys.
_KEYISH = re.compile(r"rw_[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """The configuration cannot be read, resolved or written.

    ``str(error)`` is one line naming the source (the file, an environment variable or a
    command-line flag) and the problem. It never contains an API key.
    """


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


def _mask_optional(key: str | None) -> str:
    return "None" if key is None else repr(mask_key(key))


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


@attrs.frozen(kw_only=True)
class _FileValues:
    """The known keys of a config file, type-checked; ``None`` where the file has no value."""

    daemon_host: str | None = None
    daemon_port: int | None = None
    daemon_id: str | None = None
    relay_enabled: bool | None = None
    relay_url: str | None = None
    relay_api_key: str | None = attrs.field(default=None, repr=False)
    relay_ca_file: str | None = None


# --------------------------------------------------------------------------------------------
# Small public helpers


def repowire_home(environ: Mapping[str, str] | None = None) -> Path:
    """The home directory: ``$REPOWIRE_HOME`` if set and non-empty, else ``~/.repowire``."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_HOME, "")
    return Path(value).expanduser() if value else Path.home() / ".repowire"


def config_path(home: Path) -> Path:
    """The config file inside ``home``."""
    return home / CONFIG_FILE_NAME


def redact_secrets(text: str) -> str:
    """``text`` with everything shaped like an API key replaced by its masked form."""
    return _KEYISH.sub(lambda match: mask_key(match.group(0)), text)


def relay_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a relay URL, or ``None`` when it can.

    A relay URL is ``ws://`` or ``wss://`` with a host, an optional port, no credentials, query
    or fragment (a secret must never travel in a URL), and a path that is empty, ``/`` or
    :data:`RELAY_LINK_PATH` (any other path reaches no relay, and the relay's answer to it
    would read like a refused key). ``http(s)://`` is refused here: see
    :func:`normalize_relay_url`, which maps it first.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("ws", "wss"):
        return "must start with ws:// or wss://"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials (the API key goes in relay.api_key)"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "must not contain a query or a fragment"
    if port == 0:
        return "has port 0"
    if parts.path.rstrip("/") not in ("", RELAY_LINK_PATH):
        return (
            f"names the path {parts.path!r}: a relay URL names the relay's root (such as "
            f"{parts.scheme}://{parts.netloc}) or its {RELAY_LINK_PATH} endpoint"
        )
    return None


def normalize_relay_url(url: str) -> tuple[str, str | None]:
    """``url`` as a relay URL, and a note when it was changed to get there.

    ``http://`` becomes ``ws://`` and ``https://`` becomes ``wss://`` (the relay serves both
    on one origin); nothing else changes. The result may still have a
    :func:`relay_url_problem`.
    """
    scheme, sep, rest = url.partition("://")
    mapped = _HTTP_TO_WS.get(scheme.lower()) if sep else None
    if mapped is None:
        return url, None
    new = f"{mapped}://{rest}"
    return new, f"relay URL {redact_secrets(url)!r} taken as {redact_secrets(new)!r}"


def dashboard_url(relay_url: str, daemon_id: str) -> str:
    """Where a browser finds this daemon's dashboard through the relay:
    ``wss://relay.example`` -> ``https://relay.example/d/<daemon id>/dashboard/``.

    Raises :class:`ConfigError` when ``relay_url`` is not a valid relay URL.
    """
    return f"{http_base(relay_url)}/d/{urllib.parse.quote(daemon_id, safe='')}/dashboard/"


def http_base(relay_url: str) -> str:
    """The relay's HTTP origin: ``wss://h/p`` -> ``https://h``, ``ws://h:8000`` -> ``http://h:8000``.

    Raises :class:`ConfigError` when ``relay_url`` is not a valid relay URL.
    """
    problem = relay_url_problem(relay_url)
    if problem is not None:
        raise ConfigError(f"relay URL {redact_secrets(relay_url)!r} {problem}")
    parts = urllib.parse.urlsplit(relay_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    # netloc holds no userinfo here (refused above), so it is exactly host[:port].
    return f"{scheme}://{parts.netloc}"


def make_daemon_id(hostname: str, suffix: str) -> str:
    """A daemon id from a hostname and a suffix: ``My_Laptop.local`` -> ``my-laptop-<suffix>``.

    The hostname is lowercased, every run of characters outside ``[a-z0-9]`` becomes one ``-``,
    and it is cut to :data:`DAEMON_ID_HOST_PART_MAX` characters (``daemon`` when nothing is
    left). ``suffix`` must itself be ``[a-z0-9]+``.
    """
    host_part = re.sub(r"[^a-z0-9]+", "-", hostname.lower()).strip("-")
    host_part = host_part[:DAEMON_ID_HOST_PART_MAX].rstrip("-") or "daemon"
    return f"{host_part}-{suffix}"


def generate_daemon_id() -> str:
    """A fresh daemon id: this machine's hostname, sanitised, plus 6 random hex digits."""
    return make_daemon_id(socket.gethostname(), secrets.token_hex(DAEMON_ID_RANDOM_BYTES))


# --------------------------------------------------------------------------------------------
# Loading


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
    written: a missing daemon id is generated for this call only, and a fresh home stays
    untouched (not even created).

    Raises :class:`ConfigError` for a malformed file, a malformed environment variable or a
    malformed override; the file is not modified in that case.
    """
    env = os.environ if environ is None else environ
    home = repowire_home(env) if home is None else home
    flags = Overrides() if overrides is None else overrides
    path = config_path(home)

    text = _read_text(path)
    values = _FileValues() if text is None else _file_values(_parse(text, path), path)

    if flags.daemon_id is not None:
        _check_daemon_id(flags.daemon_id, "--daemon-id")
    env_url = _env(env, ENV_RELAY_URL)
    if env_url is not None:
        env_url = _check_relay_url(env_url, ENV_RELAY_URL)
    env_key = _env(env, ENV_API_KEY)
    if env_key is not None and not looks_like_key(env_key):
        raise ConfigError(f"{ENV_API_KEY} {_BAD_KEY_SHAPE}")
    env_enabled = _env_bool(env, ENV_RELAY_ENABLED)
    env_port = _env_port(env, ENV_DAEMON_PORT)

    flag_url = flags.relay_url
    if flag_url is not None:
        flag_url = _check_relay_url(flag_url, "--relay-url")
    if flags.api_key is not None and not looks_like_key(flags.api_key):
        raise ConfigError(f"--api-key {_BAD_KEY_SHAPE}")
    if flags.daemon_port is not None and not _valid_port(flags.daemon_port):
        raise ConfigError(f"--port must be a port number 1-65535, got {flags.daemon_port}")
    if flags.daemon_host is not None and not flags.daemon_host:
        raise ConfigError("--host must not be empty")

    ca_file: Path | None = flags.ca_file
    if ca_file is None and values.relay_ca_file is not None:
        ca_file = _resolve_ca_file(values.relay_ca_file, home, path)

    # Last, once everything else is known to be valid: this may write the file.
    known_id = _first_optional(flags.daemon_id, values.daemon_id)
    daemon_id = known_id or (ensure_daemon_id(home) if persist else generate_daemon_id())

    daemon = DaemonConfig(
        host=_first(flags.daemon_host, values.daemon_host, DEFAULT_DAEMON_HOST),
        port=_first(flags.daemon_port, env_port, values.daemon_port, DEFAULT_DAEMON_PORT),
        daemon_id=daemon_id,
        id_is_temporary=known_id is None and not persist,
    )
    relay = RelayConfig(
        enabled=_first(flags.relay_enabled, env_enabled, values.relay_enabled, False),
        url=_first(flag_url, env_url, values.relay_url, DEFAULT_RELAY_URL),
        api_key=_first_optional(flags.api_key, env_key, values.relay_api_key),
        ca_file=ca_file,
        url_is_default=flag_url is None and env_url is None and values.relay_url is None,
    )
    return Settings(home=home, config_path=path, daemon=daemon, relay=relay)


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


_BAD_KEY_SHAPE = "does not look like a Repowire API key ('rw_' followed by 43+ url-safe characters)"


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
    if not value.isdigit() or not _valid_port(int(value)):
        raise ConfigError(f"{name} must be a port number 1-65535, got {value!r}")
    return int(value)


def _valid_port(port: int) -> bool:
    return 1 <= port <= 65535


def _check_relay_url(url: str, source: str) -> str:
    """``url`` normalised (:func:`normalize_relay_url`); ConfigError naming ``source`` if bad."""
    url, _ = normalize_relay_url(url)
    problem = relay_url_problem(url)
    if problem is not None:
        raise ConfigError(f"{source}: relay URL {redact_secrets(url)!r} {problem}")
    return url


def _check_daemon_id(daemon_id: str, source: str) -> None:
    if DAEMON_ID_PATTERN.fullmatch(daemon_id) is None:
        raise ConfigError(
            f"{source}: daemon id {daemon_id!r} must be 1-64 characters of A-Z a-z 0-9 . _ -"
        )


def _resolve_ca_file(value: str, home: Path, path: Path) -> Path:
    ca_file = Path(value).expanduser()
    if not ca_file.is_absolute():
        # A relative path in the file is relative to the directory holding the file.
        ca_file = home / ca_file
    if not ca_file.is_file():
        raise ConfigError(f"{path}: relay.ca_file {str(ca_file)!r} is not a readable file")
    return ca_file


# --------------------------------------------------------------------------------------------
# Parsing and validating the file


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    # Never fold long values (URLs, keys) onto a second line.
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _read_text(path: Path) -> str | None:
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


def _parse(text: str, path: Path) -> CommentedMap | None:
    """The document's top-level mapping, or ``None`` for an empty (or comments-only) file."""
    try:
        document = _yaml().load(text)
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


def _section(document: CommentedMap | None, name: str, path: Path) -> Mapping[Any, Any]:
    if document is None:
        return {}
    section = document.get(name)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{path}: '{name}' must be a mapping, got {_type_name(section)}")
    return section


def _type_name(value: object) -> str:
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


def _get_str(section: Mapping[Any, Any], name: str, key: str, path: Path) -> str | None:
    value = section.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {name}.{key} must be a string, got {_type_name(value)}")
    return str(value)


def _file_values(document: CommentedMap | None, path: Path) -> _FileValues:
    """Type-check the keys this module knows; every other key is left alone."""
    daemon = _section(document, "daemon", path)
    relay = _section(document, "relay", path)

    host = _get_str(daemon, "daemon", "host", path)
    if host is not None and not host.strip():
        raise ConfigError(f"{path}: daemon.host must not be empty")

    port = daemon.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not _valid_port(port)
    ):
        shown = repr(port) if isinstance(port, int | str) else _type_name(port)
        raise ConfigError(f"{path}: daemon.port must be a port number 1-65535, got {shown}")

    daemon_id = _get_str(daemon, "daemon", "id", path)
    if daemon_id is not None:
        _check_daemon_id(daemon_id, f"{path}: daemon.id")

    enabled = relay.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise ConfigError(f"{path}: relay.enabled must be true or false, got {_type_name(enabled)}")

    url = _get_str(relay, "relay", "url", path)
    if url is not None:
        url, _ = normalize_relay_url(url)
        problem = relay_url_problem(url)
        if problem is not None:
            raise ConfigError(f"{path}: relay.url {redact_secrets(url)!r} {problem}")

    api_key = relay.get("api_key")
    if api_key is not None and not (isinstance(api_key, str) and looks_like_key(api_key)):
        raise ConfigError(f"{path}: relay.api_key {_BAD_KEY_SHAPE}")

    ca_file = _get_str(relay, "relay", "ca_file", path)
    if ca_file is not None and not ca_file.strip():
        raise ConfigError(f"{path}: relay.ca_file must not be empty (remove the key instead)")

    return _FileValues(
        daemon_host=host,
        daemon_port=None if port is None else int(port),
        daemon_id=daemon_id,
        relay_enabled=None if enabled is None else bool(enabled),
        relay_url=url,
        relay_api_key=None if api_key is None else str(api_key),
        relay_ca_file=ca_file,
    )


# --------------------------------------------------------------------------------------------
# Writing


def update_config(home: Path, changes: Mapping[str, Mapping[str, object]]) -> None:
    """Set the given keys in ``<home>/config.yaml``, creating the file (and ``home``) if needed.

    ``changes`` maps a section to ``{key: value}``, e.g. ``{"relay": {"enabled": True}}``.
    A value of ``None`` removes the key; a :class:`~pathlib.Path` is written as a string. Every
    other key, comment and the key order are kept. The write is atomic (temporary file in the
    same directory, then rename) and leaves the file with mode 0600.

    Raises :class:`ConfigError` when the existing file is malformed, when the result would be
    (a bad URL, a key of the wrong shape, a value of an unsupported type), or when the file
    cannot be written. In every such case the file is left untouched.
    """
    plain: dict[str, dict[str, object]] = {}
    for section_name, section_changes in changes.items():
        plain[section_name] = {}
        for key, value in section_changes.items():
            if isinstance(value, Path):
                value = str(value)
            if value is not None and not isinstance(value, str | int | float | bool):
                raise ConfigError(
                    f"{config_path(home)}: cannot store {_type_name(value)} in {section_name}.{key}"
                )
            plain[section_name][key] = value

    def apply(document: CommentedMap) -> bool:
        changed = False
        for section_name, section_changes in plain.items():
            existing = document.get(section_name)
            section = existing if isinstance(existing, CommentedMap) else CommentedMap()
            section_changed = False
            orphans = ""
            for key, value in section_changes.items():
                if value is None:
                    if key in section:
                        orphans += _delete_key(section, key)
                        section_changed = True
                elif not _same(section.get(key), value):
                    _set_key(section, key, value)
                    section_changed = True
            if not section_changed:
                continue
            changed = True
            if section is not existing:
                # Filled before it is attached, so comments moved onto it land inside it.
                _set_key(document, section_name, section)
            elif not section:
                # Emptied by deletions: drop the heading rather than leave `name: {}`.
                orphans += _delete_key(document, section_name)
                if orphans and document:
                    _give_trailing(document, list(document.keys())[-1], orphans)
        return changed

    _edit(home, apply)


def _same(old: object, new: object) -> bool:
    # True == 1 in Python, but `enabled: 1` and `enabled: true` are different YAML. A quoted
    # string loads as a str subclass that compares equal, and is kept with its quotes.
    if old is None or isinstance(old, bool) != isinstance(new, bool):
        return False
    return old == new


def ensure_daemon_id(home: Path) -> str:
    """The daemon id stored in ``<home>/config.yaml``; generated and written on first use.

    Raises :class:`ConfigError` when the file is malformed or cannot be written.
    """
    result: list[str] = []

    def apply(document: CommentedMap) -> bool:
        daemon = _section(document, "daemon", config_path(home))
        existing = daemon.get("id")
        if isinstance(existing, str):
            result.append(str(existing))
            return False
        daemon_id = generate_daemon_id()
        result.append(daemon_id)
        section = document.get("daemon")
        if not isinstance(section, CommentedMap):
            section = CommentedMap()
            _set_key(document, "daemon", section)
        _set_key(section, "id", daemon_id)
        return True

    _edit(home, apply)
    return result[0]


def check_writable(home: Path) -> None:
    """Make sure a new config file can be written into ``home`` (creating ``home`` if needed).

    Raises :class:`ConfigError` when it cannot. Used before an action whose result must be
    stored, such as a key rotation, which cannot be undone.
    """
    with _locked(home):
        target = config_path(home)
        target = target.resolve() if target.is_symlink() else target
        try:
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        except OSError as exc:
            raise ConfigError(f"{target}: cannot write: {exc.strerror or exc}") from None
        os.close(fd)
        os.unlink(name)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<home>/.config.lock``, creating ``home`` if needed."""
    try:
        home.mkdir(mode=_HOME_MODE, parents=True, exist_ok=True)
        fd = os.open(home / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"{home}: cannot create or lock: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _edit(home: Path, apply: Callable[[CommentedMap], bool]) -> None:
    """Read, validate, change (``apply`` returns whether it changed anything), validate, write."""
    path = config_path(home)
    with _locked(home):
        text = _read_text(path)
        document = None if text is None else _parse(text, path)
        _file_values(document, path)
        target = CommentedMap() if document is None else document
        if not apply(target):
            return
        values = _file_values(target, path)
        if values.relay_ca_file is not None:
            _resolve_ca_file(values.relay_ca_file, home, path)
        buffer = io.StringIO()
        _yaml().dump(target, buffer)
        if text is None:
            new_text = _NEW_FILE_HEADER + buffer.getvalue()
        elif document is None:
            # A file of only comments loads as nothing: keep its text and append the mapping.
            new_text = (text.rstrip("\n") + "\n" if text.strip() else "") + buffer.getvalue()
        else:
            new_text = buffer.getvalue()
        # Never write what could not be read back: a malformed result is a bug, not the user's.
        try:
            _file_values(_parse(new_text, path), path)
        except ConfigError:
            raise ConfigError(
                f"{path}: refusing to write: the edited file would not read back; "
                "the file is unchanged"
            ) from None
        _write_atomically(path, new_text)


def _write_atomically(path: Path, text: str) -> None:
    # Rename over the real file, not over a symlink pointing at it.
    target = path.resolve() if path.is_symlink() else path
    try:
        fd, temp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), _FILE_MODE)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------------------------
# Keeping comments in place
#
# ruamel attaches the comment lines that follow an item (blank lines, a comment introducing
# the next section) to that item, at the deepest last key of its value. Appending a key after
# it would put the new key below that comment, i.e. under the next section's heading. So the
# trailing lines move to the new last item, and a deleted item hands them to its predecessor.


def _last_slot(mapping: CommentedMap) -> tuple[CommentedMap, Any] | None:
    """The (mapping, key) holding the comments after ``mapping``'s last line."""
    if not mapping:
        return None
    key = list(mapping.keys())[-1]
    value = mapping[key]
    if isinstance(value, CommentedMap) and value:
        deeper = _last_slot(value)
        if deeper is not None:
            return deeper
    return mapping, key


def _take_trailing(mapping: CommentedMap, key: Any) -> str:
    """Remove and return the full comment lines after item ``key`` (its end-of-line part stays)."""
    value = mapping[key]
    if isinstance(value, CommentedMap) and value:
        slot = _last_slot(value)
        if slot is not None and slot != (mapping, key):
            return _take_trailing(*slot)
    entry = mapping.ca.items.get(key)
    if not entry or len(entry) < 3 or not isinstance(entry[2], CommentToken):
        return ""
    token = entry[2]
    first, newline, rest = token.value.partition("\n")
    if not rest:
        return ""
    token.value = first + newline
    return rest


def _give_trailing(mapping: CommentedMap, key: Any, lines: str) -> None:
    """Attach comment ``lines`` after item ``key`` (at the deepest last key of its value)."""
    if not lines:
        return
    value = mapping[key]
    if isinstance(value, CommentedMap) and value:
        slot = _last_slot(value)
        if slot is not None:
            mapping, key = slot
    entry = mapping.ca.items.setdefault(key, [None, None, None, None])
    while len(entry) < 3:
        entry.append(None)
    token = entry[2]
    if isinstance(token, CommentToken):
        token.value = token.value + lines
    else:
        entry[2] = CommentToken("\n" + lines, CommentMark(0), None)


def _set_key(mapping: CommentedMap, key: str, value: object) -> None:
    if key in mapping:
        mapping[key] = value
        return
    keys = list(mapping.keys())
    trailing = _take_trailing(mapping, keys[-1]) if keys else ""
    mapping[key] = value
    _give_trailing(mapping, key, trailing)


def _delete_key(mapping: CommentedMap, key: str) -> str:
    """Delete ``key``; returns the comment lines that had no item left to go to."""
    keys = list(mapping.keys())
    index = keys.index(key)
    trailing = _take_trailing(mapping, key)
    del mapping[key]
    mapping.ca.items.pop(key, None)
    if not trailing:
        return ""
    if index > 0:
        _give_trailing(mapping, keys[index - 1], trailing)
    elif mapping:
        # Nothing precedes it: keep the lines at the end of the mapping rather than lose them.
        _give_trailing(mapping, list(mapping.keys())[-1], trailing)
    else:
        return trailing
    return ""
