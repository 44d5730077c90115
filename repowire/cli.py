"""The ``repowire`` command line.

Commands::

    repowire setup --relay [--relay-url URL] [--api-key KEY | --rotate-key | --new-key [--yes]]
                   [--ca-file F]
    repowire status [--json]
    repowire serve [--relay | --no-relay] [--host H] [--port P] [--relay-url URL] [--daemon-id ID]
                   [-v | -q] [--log-format text|json]
    repowire relay start [--host H] [--port P] [--data-dir DIR] [-v | -q] [--log-format F] ...
    repowire relay login-link [--json] [--no-qr]
    repowire relay keys create|list|revoke ...
    repowire completion bash|zsh|fish

Exit codes (also in ``repowire --help``):

====  =====================================================================================
0     success; for ``status``: the relay link is connected, or relay access is disabled
1     the command failed (relay unreachable or refusing, key store error, ...);
      for ``status``: the relay link is connecting or down
2     ``status``: the daemon is not running (or not answering)
3     configuration error: a malformed config file or environment variable
4     ``serve``: a daemon from this home is already running (its pid and URL are named)
64    usage error: unknown command or flag, or a bad flag value
130   interrupted (Ctrl-C), except ``serve``, for which Ctrl-C is the normal way to stop (0)
====  =====================================================================================

Every error is one line on stderr; no command prints a traceback (set ``REPOWIRE_DEBUG=1`` to
see one for an unexpected error; for ``serve`` and ``relay start`` it also counts as ``-v``).
Read-only commands (``status``, ``relay login-link``, ``completion``, ``--help``) never write
to the home: a fresh home stays empty. No command prints an API key, except ``relay keys create``,
whose purpose is to hand out a new key once.

Which daemon ``status`` asks: the one named by ``--host``/``--port`` when given; else the one
this home's ``repowire serve`` recorded in ``<home>/daemon.json`` (see :mod:`repowire._runtime`),
when it is still running; else the configured address (config file, environment, defaults).

The parsing and printing here are thin; the work is done by functions that take plain values
and can be tested on their own: :func:`setup_relay`, :func:`obtain_api_key`,
:func:`collect_status`, :func:`status_exit_code`, :func:`relay_settings_kwargs`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import getpass
import importlib
import importlib.metadata
import io
import ipaddress
import json
import math
import os
import sys
import time
import traceback
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs

import repowire
from common import looks_like_key, mask_key

from ._httpclient import HttpError, request_json
from ._logging import LOG_FORMATS, log_level, setup_logging
from ._runtime import (
    DaemonAlreadyRunning,
    RuntimeInfo,
    RuntimeState,
    already_running_message,
    local_url,
    read_runtime,
)
from .config import (
    DAEMON_ID_PATTERN,
    DEFAULT_RELAY_URL,
    ENV_API_KEY,
    ENV_RELAY_ENABLED,
    ENV_RELAY_URL,
    ConfigError,
    DaemonConfig,
    Overrides,
    Settings,
    check_writable,
    config_path,
    dashboard_url,
    http_base,
    load_settings,
    normalize_relay_url,
    redact_secrets,
    relay_url_problem,
    repowire_home,
    update_config,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_DAEMON_NOT_RUNNING = 2
EXIT_CONFIG = 3
EXIT_ALREADY_RUNNING = 4
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130

#: Seconds allowed for a request to the relay (register, rotate).
RELAY_REQUEST_TIMEOUT = 15.0
#: Seconds allowed for the local daemon's ``/health``: it is on this machine, so a slow answer
#: means something is wrong, and ``status`` should say so rather than hang.
DAEMON_REQUEST_TIMEOUT = 3.0
#: Where ``relay start`` serves ``/metrics`` unless told otherwise: loopback only, apart from
#: the public listener (the figures cover every tenant).
DEFAULT_METRICS_LISTEN = "127.0.0.1:9108"
#: Longest piece of a server's error text repeated in a message.
MAX_DETAIL_CHARS = 200
#: Environment variable that makes an unexpected error print its traceback.
ENV_DEBUG = "REPOWIRE_DEBUG"

RELAY_STATES = ("connected", "connecting", "down", "disabled")

#: Where ``status`` took the daemon's address from (``status --json``: ``daemon.source``).
SOURCE_FLAGS = "flags"
SOURCE_RUNTIME_FILE = "runtime_file"
SOURCE_CONFIG = "config"

_EXIT_CODES_HELP = """\
exit codes:
  0    success; status: relay connected, or relay access disabled
  1    the command failed; status: relay connecting or down
  2    status: the daemon is not running
  3    configuration error (config file or environment variable)
  4    serve: a daemon from this home is already running
  64   usage error (unknown command or flag, bad value)
  130  interrupted by Ctrl-C (serve and relay start: Ctrl-C is how they stop, exit 0)
"""

_LOGGING_HELP = """logging:
  Log lines go to stderr with their level; -v shows DEBUG, -q only warnings and errors;
  --log-format json writes one JSON object per line (time, level, logger, message).
  REPOWIRE_DEBUG=1 in the environment counts as -v.
"""


def hosted_relay_note(url: str = DEFAULT_RELAY_URL) -> str:
    """What is said (once) when no relay URL is configured and the hosted relay is used."""
    return (
        f"no relay URL configured: using the hosted relay {url} "
        "(self-hosting? pass --relay-url ws://HOST:PORT)"
    )


def package_version() -> str:
    """The installed version of repowire (``repowire.__version__``)."""
    # An editable install made while repowire/ had no __init__.py maps the package as a
    # namespace package whose __init__ never runs; the distribution metadata still knows.
    found = getattr(repowire, "__version__", None)
    return found if isinstance(found, str) else importlib.metadata.version("repowire")


class CommandError(Exception):
    """A command cannot complete. ``str(error)`` is one line; ``exit_code`` is what to exit with."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (and an exception, not an exit)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default shown after its help, unless the
    help names it already or there is none to show (a flag, or a value resolved later)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or isinstance(action, argparse._CountAction)
            or not action.option_strings
        ):
            return text
        return f"{text} (default %(default)s)"


# --------------------------------------------------------------------------------------------
# Talking to a relay


@attrs.frozen(kw_only=True)
class IssuedKey:
    """A key handed out by a relay (``scope_id`` is ``None`` for a rotation)."""

    api_key: str = attrs.field(repr=lambda key: repr(mask_key(key)))
    key_id: str
    scope_id: str | None = None


def _one_line(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    flat = " ".join(redact_secrets(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _detail(answer: Mapping[str, Any]) -> str:
    parts = [str(answer[name]) for name in ("error", "detail") if answer.get(name)]
    return _one_line(": ".join(parts)) if parts else "no reason given"


def _issued_key(answer: Mapping[str, Any], base: str, *, want_scope: bool) -> IssuedKey:
    api_key = answer.get("api_key")
    key_id = answer.get("key_id")
    scope_id = answer.get("scope_id")
    if not isinstance(api_key, str) or not looks_like_key(api_key):
        raise CommandError(f"the relay at {base} answered without a valid API key")
    if not isinstance(key_id, str) or not key_id:
        raise CommandError(f"the relay at {base} answered without a key id")
    if want_scope and (not isinstance(scope_id, str) or not scope_id):
        raise CommandError(f"the relay at {base} answered without a scope id")
    return IssuedKey(
        api_key=api_key, key_id=key_id, scope_id=scope_id if isinstance(scope_id, str) else None
    )


def _relay_request(
    method: str,
    base: str,
    route: str,
    *,
    body: dict[str, Any] | None,
    bearer: str | None,
    ca_file: Path | None,
    timeout: float,
) -> tuple[int, dict[str, Any]]:
    try:
        return request_json(
            method, base + route, body=body, bearer=bearer, ca_file=ca_file, timeout=timeout
        )
    except HttpError as exc:
        raise CommandError(f"relay request failed: {exc}") from None


def register_key(
    relay_url: str, *, label: str, ca_file: Path | None, timeout: float = RELAY_REQUEST_TIMEOUT
) -> IssuedKey:
    """Obtain a new key (in a new scope) with ``POST <http_base>/api/v1/register``.

    Raises :class:`CommandError` when the relay is unreachable, refuses (registration closed,
    rate limited) or answers something unexpected; :class:`~repowire.config.ConfigError` for
    a malformed relay URL.
    """
    base = http_base(relay_url)
    status, answer = _relay_request(
        "POST",
        base,
        "/api/v1/register",
        body={"label": label},
        bearer=None,
        ca_file=ca_file,
        timeout=timeout,
    )
    if status in (200, 201):
        return _issued_key(answer, base, want_scope=True)
    if status == 403:
        raise CommandError(
            f"registration is closed on the relay at {base}: ask its operator for a key, then "
            "run 'repowire setup --relay --api-key KEY'"
        )
    if status == 429:
        raise CommandError(f"the relay at {base} is limiting registrations; try again later")
    raise CommandError(f"the relay at {base} refused registration ({status}: {_detail(answer)})")


def rotate_key(
    relay_url: str, api_key: str, *, ca_file: Path | None, timeout: float = RELAY_REQUEST_TIMEOUT
) -> IssuedKey:
    """Replace ``api_key`` with a new key via ``POST <http_base>/api/v1/keys/rotate``.

    The old key is sent as ``Authorization: Bearer``. Raises :class:`CommandError` when the
    relay is unreachable, rejects the key, or answers something unexpected.
    """
    base = http_base(relay_url)
    status, answer = _relay_request(
        "POST",
        base,
        "/api/v1/keys/rotate",
        body={},
        bearer=api_key,
        ca_file=ca_file,
        timeout=timeout,
    )
    if status == 200:
        return _issued_key(answer, base, want_scope=False)
    if status == 401:
        raise CommandError(
            f"the relay at {base} rejected the current API key (unknown or revoked); "
            "run 'repowire setup --relay --api-key KEY' with a valid key"
        )
    if status == 429:
        raise CommandError(f"the relay at {base} is limiting requests; try again later")
    raise CommandError(f"the relay at {base} refused the rotation ({status}: {_detail(answer)})")


#: What :func:`check_key` found out about a key.
KEY_VALID = "valid"
KEY_UNCHECKED = "unchecked"


def check_key(
    relay_url: str, api_key: str, *, ca_file: Path | None, timeout: float = RELAY_REQUEST_TIMEOUT
) -> tuple[str, str | None]:
    """Ask the relay whether it knows ``api_key`` (``GET /api/v1/daemons`` with it as Bearer).

    Returns ``(KEY_VALID, None)`` when it does, ``(KEY_UNCHECKED, why)`` when the relay cannot
    be reached or gives no clear answer. Raises :class:`CommandError` when the relay rejects
    the key (401, 403) or when no relay answers at that URL (404).
    """
    base = http_base(relay_url)
    try:
        status, answer = request_json(
            "GET",
            base + "/api/v1/daemons",
            body=None,
            bearer=api_key,
            ca_file=ca_file,
            timeout=timeout,
        )
    except HttpError as exc:
        return KEY_UNCHECKED, f"could not reach the relay at {base} to check the key: {exc}"
    if status == 200:
        return KEY_VALID, None
    if status in (401, 403):
        raise CommandError(
            f"the relay at {base} does not accept this API key (unknown or revoked); nothing "
            "was stored. Register a new key for this daemon with "
            "'repowire setup --relay --new-key'"
        )
    if status == 404:
        raise CommandError(
            f"no Repowire relay answers at {base} (HTTP 404 for /api/v1/daemons); nothing was "
            "stored. Check --relay-url"
        )
    return (
        KEY_UNCHECKED,
        f"the relay at {base} could not check the key ({status}: {_detail(answer)})",
    )


def obtain_api_key(settings: Settings, *, timeout: float = RELAY_REQUEST_TIMEOUT) -> str:
    """Register with ``settings.relay.url`` (label: the daemon id), store the key, return it.

    The key is written to ``relay.api_key`` in the config file before it is returned. Raises
    :class:`CommandError` (relay unreachable or refusing) or
    :class:`~repowire.config.ConfigError` (the config file cannot be written).
    """
    issued = register_key(
        settings.relay.url,
        label=settings.daemon.daemon_id,
        ca_file=settings.relay.ca_file,
        timeout=timeout,
    )
    update_config(settings.home, {"relay": {"api_key": issued.api_key}})
    return issued.api_key


# --------------------------------------------------------------------------------------------
# setup


@attrs.frozen(kw_only=True)
class SetupResult:
    """What :func:`setup_relay` did. ``key_action``: registered, renewed (``new_key``),
    rotated, given or kept."""

    config_path: Path
    relay_url: str
    ca_file: Path | None
    key_action: str
    masked_key: str
    #: For a given key: :data:`KEY_VALID` or :data:`KEY_UNCHECKED` (then a note says why).
    key_check: str | None = None
    key_id: str | None
    scope_id: str | None
    notes: tuple[str, ...]


def setup_relay(
    home: Path,
    *,
    relay_url: str | None = None,
    api_key: str | None = None,
    rotate: bool = False,
    new_key: bool = False,
    ca_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    timeout: float = RELAY_REQUEST_TIMEOUT,
) -> SetupResult:
    """Enable relay access in ``<home>/config.yaml`` and make sure it holds an API key.

    Writes ``relay.enabled: true``, ``relay.url`` (``relay_url``, else the file's, else the
    default: the hosted relay, which a note then names), ``relay.ca_file`` (when given) and the
    key: ``api_key`` when given (its shape checked, then checked with the relay: a key the
    relay rejects is refused; when the relay cannot be reached it is stored and a note says
    so); a rotated one when ``rotate``; a newly registered one when ``new_key`` (the old key
    is left behind, with its scope: the caller confirms first); the file's own key when it
    has one; otherwise a new one registered with the relay (label: the daemon id). The file
    is edited in place (comments and other keys kept). Environment overrides are ignored here
    (this command writes the file) but reported in ``notes`` when they would override what
    was written.

    Nothing is written unless the whole command succeeds, except the daemon id when it is
    generated here (first use). Before a rotation (which kills the old key) the config file is
    checked writable, so the new key cannot be lost to an unwritable file.

    Raises :class:`~repowire.config.ConfigError` (malformed or unwritable file, bad value) or
    :class:`CommandError` (relay unreachable or refusing; nothing to rotate).
    """
    if sum((api_key is not None, rotate, new_key)) > 1:
        raise CommandError(
            "give only one of an API key, --rotate-key and --new-key", exit_code=EXIT_USAGE
        )
    if api_key is not None and not looks_like_key(api_key):
        raise CommandError(
            "the API key given does not look like a Repowire key ('rw_' followed by 43+ "
            "url-safe characters)",
            exit_code=EXIT_USAGE,
        )
    env = os.environ if environ is None else environ
    current = load_settings(home, Overrides(ca_file=ca_file), environ={})
    url = current.relay.url if relay_url is None else relay_url
    path = config_path(home)

    notes: list[str] = []
    if relay_url is None and current.relay.url_is_default:
        notes.append(hosted_relay_note(url))
    key_id: str | None = None
    scope_id: str | None = None
    key_check: str | None = None
    stored: str | None
    if api_key is not None:
        key_check, why = check_key(url, api_key, ca_file=current.relay.ca_file, timeout=timeout)
        if why is not None:
            notes.append(
                f"{why}; stored it anyway: 'repowire status' shows whether the relay accepts it"
            )
        stored = api_key
        action = "given"
    elif new_key:
        check_writable(home)
        issued = register_key(
            url,
            label=current.daemon.daemon_id,
            ca_file=current.relay.ca_file,
            timeout=timeout,
        )
        stored, key_id, scope_id, action = (
            issued.api_key,
            issued.key_id,
            issued.scope_id,
            "renewed",
        )
    elif rotate:
        if current.relay.api_key is None:
            raise CommandError(
                f"no API key in {path} to rotate; run 'repowire setup --relay' to obtain one"
            )
        check_writable(home)
        issued = rotate_key(
            url, current.relay.api_key, ca_file=current.relay.ca_file, timeout=timeout
        )
        stored, key_id, action = issued.api_key, issued.key_id, "rotated"
    elif current.relay.api_key is not None:
        stored, action = None, "kept"
        if relay_url is not None and relay_url != current.relay.url:
            notes.append(
                "the stored API key was issued for the previous relay URL; if the new relay "
                "rejects it, run 'repowire setup --relay --api-key KEY'"
            )
    else:
        issued = register_key(
            url, label=current.daemon.daemon_id, ca_file=current.relay.ca_file, timeout=timeout
        )
        stored, key_id, scope_id, action = (
            issued.api_key,
            issued.key_id,
            issued.scope_id,
            "registered",
        )

    relay_changes: dict[str, object] = {"enabled": True, "url": url}
    if ca_file is not None:
        relay_changes["ca_file"] = str(ca_file)
    if stored is not None:
        relay_changes["api_key"] = stored
    update_config(home, {"relay": relay_changes})
    stored_key = stored if stored is not None else current.relay.api_key
    assert stored_key is not None

    for name, what in (
        (ENV_RELAY_URL, "relay.url"),
        (ENV_API_KEY, "relay.api_key"),
        (ENV_RELAY_ENABLED, "relay.enabled"),
    ):
        if env.get(name, "").strip():
            notes.append(f"{name} is set and overrides {what} from the file at run time")

    return SetupResult(
        config_path=path,
        relay_url=url,
        ca_file=current.relay.ca_file,
        key_action=action,
        masked_key=mask_key(stored_key),
        key_id=key_id,
        scope_id=scope_id,
        notes=tuple(notes),
        key_check=key_check,
    )


def _relay_url_flag(args: argparse.Namespace) -> str | None:
    """``--relay-url`` normalised; says on stderr when ``http(s)://`` was taken as ``ws(s)://``."""
    given: str | None = args.relay_url
    if given is None:
        return None
    url, note = normalize_relay_url(given)
    if note is not None:
        print(f"note: {note} (a daemon's link to the relay is a WebSocket)", file=sys.stderr)
    return url


def _confirm_new_key(home: Path, args: argparse.Namespace) -> None:
    """Ask before ``--new-key`` replaces a configured key (``--yes`` skips the question).

    Raises :class:`CommandError` (usage) when there is no terminal to ask on, or when the
    answer is not yes.
    """
    if args.yes:
        return
    current = load_settings(home, persist=False)
    if current.relay.api_key is None:
        return
    question = (
        f"Register a new API key for this daemon and replace {mask_key(current.relay.api_key)}? "
        "The new key opens a new scope: browsers signed in with the old key and other daemons "
        "using it stay with the old scope. [y/N] "
    )
    if not sys.stdin.isatty():
        raise CommandError(
            "--new-key replaces the configured key and leaves its scope: confirm with --yes "
            "(no terminal to ask on)",
            exit_code=EXIT_USAGE,
        )
    if input(question).strip().lower() not in ("y", "yes"):
        raise CommandError("no new key registered (not confirmed)")


def _cmd_setup(args: argparse.Namespace) -> int:
    api_key: str | None = args.api_key
    if api_key == "-":
        # Read from stdin so the key stays out of the shell history and the process list;
        # on a terminal, without echo.
        if sys.stdin.isatty():
            api_key = getpass.getpass("API key: ").strip()
        else:
            api_key = sys.stdin.readline().strip()
    home = repowire_home()
    relay_url = _relay_url_flag(args)
    if args.new_key:
        _confirm_new_key(home, args)
    result = setup_relay(
        home,
        relay_url=relay_url,
        api_key=api_key,
        rotate=args.rotate_key,
        new_key=args.new_key,
        ca_file=args.ca_file,
    )
    how = {
        "registered": f"registered: new key {_one_line(str(result.key_id))} in scope "
        f"{_one_line(str(result.scope_id))}",
        "rotated": f"rotated: new key {_one_line(str(result.key_id))}; the old key no longer works",
        "renewed": f"registered a new key {_one_line(str(result.key_id))} in a new scope "
        f"{_one_line(str(result.scope_id))}; the old key is no longer used here",
        "given": "stored the key given"
        + (", the relay accepts it" if result.key_check == KEY_VALID else ""),
        "kept": "kept the key already configured",
    }[result.key_action]
    print(f"Relay access enabled in {result.config_path}")
    print(f"  url:      {result.relay_url}")
    print(f"  api key:  {result.masked_key} ({how})")
    if result.ca_file is not None:
        print(f"  ca file:  {result.ca_file}")
    print("Start or restart the daemon to use it: repowire serve")
    for note in result.notes:
        print(f"note: {note}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# status


@attrs.frozen(kw_only=True)
class DaemonTarget:
    """Which daemon to talk to, and how that was decided.

    ``source`` is :data:`SOURCE_FLAGS`, :data:`SOURCE_RUNTIME_FILE` or :data:`SOURCE_CONFIG`.
    ``runtime`` is what the home's runtime file said (whatever the source). ``expected_id``
    is the daemon id the runtime file recorded: the daemon must answer ``/health`` with it.
    """

    url: str
    source: str
    runtime: RuntimeInfo
    expected_id: str | None = None

    @property
    def pid(self) -> int | None:
        """The daemon's pid, when it came from the runtime file."""
        record = self.runtime.record
        return record.pid if self.source == SOURCE_RUNTIME_FILE and record is not None else None


@attrs.frozen(kw_only=True)
class StatusReport:
    """The relay configuration and, when the daemon answered, its ``/health`` document."""

    settings: Settings
    config_exists: bool
    daemon_url: str
    health: Mapping[str, Any] | None
    daemon_error: str | None
    target: DaemonTarget


def daemon_base_url(daemon: DaemonConfig) -> str:
    """``http://host:port`` for reaching the daemon (a wildcard listen address means loopback)."""
    return local_url(daemon.host, daemon.port)


def locate_daemon(
    settings: Settings, runtime: RuntimeInfo, *, flags_given: bool = False
) -> DaemonTarget:
    """Where the daemon is: the flags' address when ``flags_given``; else the running daemon
    recorded in the home's runtime file; else the configured address. Reads nothing itself."""
    if flags_given:
        return DaemonTarget(
            url=daemon_base_url(settings.daemon), source=SOURCE_FLAGS, runtime=runtime
        )
    if runtime.state is RuntimeState.RUNNING and runtime.record is not None:
        return DaemonTarget(
            url=runtime.record.url,
            source=SOURCE_RUNTIME_FILE,
            runtime=runtime,
            expected_id=runtime.record.daemon_id,
        )
    return DaemonTarget(url=daemon_base_url(settings.daemon), source=SOURCE_CONFIG, runtime=runtime)


def _not_running_note(target: DaemonTarget) -> str:
    """What the runtime file adds to "not running", e.g. a stale file that was ignored."""
    runtime = target.runtime
    if target.source == SOURCE_FLAGS:
        return ""
    if runtime.state is RuntimeState.STALE:
        left_by = f" left by pid {runtime.pid}" if runtime.pid is not None else ""
        return f" (ignored the stale runtime file {runtime.path}{left_by})"
    if runtime.state is RuntimeState.STARTING:
        pid = f" (pid {runtime.pid})" if runtime.pid is not None else ""
        return f" (a daemon from this home{pid} is starting; try again in a moment)"
    if runtime.state is RuntimeState.UNREADABLE:
        return f" (could not read this home's runtime files: {_one_line(str(runtime.detail))})"
    return ""


def collect_status(
    settings: Settings,
    *,
    target: DaemonTarget | None = None,
    timeout: float = DAEMON_REQUEST_TIMEOUT,
) -> StatusReport:
    """Ask the daemon at ``target`` for ``GET /health``; never raises for a daemon that is
    down or odd. ``target`` defaults to :func:`locate_daemon` without flags.

    Blocks for at most about ``timeout`` seconds (reading the runtime file never waits).
    """
    if target is None:
        target = locate_daemon(settings, read_runtime(settings.home))
    base = target.url
    health: Mapping[str, Any] | None = None
    error: str | None = None
    try:
        status, answer = request_json(
            "GET", base + "/health", body=None, bearer=None, ca_file=None, timeout=timeout
        )
    except HttpError as exc:
        if exc.unreachable and target.source == SOURCE_RUNTIME_FILE:
            error = (
                f"the daemon from this home (pid {target.pid}) is running but not answering "
                f"at {base}"
            )
        elif exc.unreachable:
            error = (
                f"the daemon is not running at {base}{_not_running_note(target)}; "
                "start it with 'repowire serve'"
            )
        else:
            error = f"the daemon at {base} is not answering properly: {_one_line(str(exc))}"
    else:
        answered_id = answer.get("daemon_id")
        if status != 200:
            error = f"the daemon at {base} answered /health with {status}: {_detail(answer)}"
        elif target.expected_id is not None and answered_id != target.expected_id:
            error = (
                f"the daemon at {base} answered as {_one_line(str(answered_id), 80)!r}, not as "
                f"{target.expected_id!r} recorded in {target.runtime.path}"
            )
        else:
            health = answer
    return StatusReport(
        settings=settings,
        config_exists=settings.config_path.exists(),
        daemon_url=base,
        health=health,
        daemon_error=error,
        target=target,
    )


def _relay_state(report: StatusReport) -> str | None:
    if report.health is None:
        return None
    relay = report.health.get("relay")
    if not isinstance(relay, Mapping):
        return None
    state = relay.get("state")
    return state if isinstance(state, str) else None


def status_exit_code(report: StatusReport) -> int:
    """0 connected or disabled; 1 connecting, down or unknown; 2 daemon not running."""
    if report.health is None:
        return EXIT_DAEMON_NOT_RUNNING
    state = _relay_state(report)
    return EXIT_OK if state in ("connected", "disabled") else EXIT_FAILED


def _timestamp(value: object) -> float | None:
    """Epoch seconds from a number or an ISO 8601 string; ``None`` if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.astimezone()
        return parsed.timestamp()
    return None


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def format_time(value: object, now: float) -> str:
    """``2025-01-02T03:04:05+01:00 (12 s ago)`` (or ``(in 5 s)``), in local time."""
    stamp = _timestamp(value)
    if stamp is None:
        return _one_line(str(value))
    try:
        local = datetime.datetime.fromtimestamp(stamp).astimezone()
    except (OverflowError, OSError, ValueError):
        return _one_line(str(value))
    delta = now - stamp
    relative = f"{_span(delta)} ago" if delta >= 0 else f"in {_span(delta)}"
    return f"{local.isoformat(timespec='seconds')} ({relative})"


def status_dashboard_url(report: StatusReport) -> str | None:
    """The daemon's dashboard through the relay, when relay access is on and the daemon id is
    known (from the running daemon, else from its runtime file)."""
    relay = report.settings.relay
    if not relay.enabled:
        return None
    daemon_id: object = None
    if report.health is not None:
        daemon_id = report.health.get("daemon_id")
    elif report.target.runtime.record is not None and report.target.runtime.alive:
        daemon_id = report.target.runtime.record.daemon_id
    if not isinstance(daemon_id, str) or DAEMON_ID_PATTERN.fullmatch(daemon_id) is None:
        return None
    try:
        return dashboard_url(relay.url, daemon_id)
    except ConfigError:
        return None


#: Close codes (as the connector reports them in ``last_error``) after which only a new key
#: helps: 4401 unknown key, 4403 revoked key. A rotation needs the old key to be valid.
_DEAD_KEY_MARKS = ("(4401:", "(4403:", "refused the API key")


def status_hints(report: StatusReport) -> list[str]:
    """Commands that help in the state reported, and only those (whole lines, never cut)."""
    if report.health is None:
        return []
    live = report.health.get("relay")
    if not isinstance(live, Mapping) or live.get("state") not in ("down", "connecting"):
        return []
    error = live.get("last_error")
    if not isinstance(error, str):
        return []
    if any(mark in error for mark in _DEAD_KEY_MARKS):
        return [
            "the relay does not accept this daemon's API key: register a new one with "
            "'repowire setup --relay --new-key', then restart 'repowire serve'"
        ]
    if "no relay at" in error:
        return [
            "no relay answers at the configured URL: fix it with "
            "'repowire setup --relay --relay-url URL', then restart 'repowire serve'"
        ]
    return []


def render_status(report: StatusReport, now: float) -> list[str]:
    """The human-readable report, one string per line (without the daemon error line)."""
    relay = report.settings.relay
    key = relay.api_key
    lines = [
        f"Relay configuration ({report.settings.config_path}"
        + ("" if report.config_exists else ", not created yet")
        + ")",
        f"  enabled:  {'yes' if relay.enabled else 'no'}",
        f"  url:      {relay.url}",
        f"  api key:  {'present, ' + mask_key(key) if key is not None else 'none'}",
    ]
    if relay.ca_file is not None:
        lines.append(f"  ca file:  {relay.ca_file}")
    if report.health is None:
        return lines
    daemon_id = report.health.get("daemon_id")
    version = report.health.get("version")
    about = ", ".join(
        part
        for part in (
            f"id {_one_line(str(daemon_id))}" if daemon_id else "",
            f"version {_one_line(str(version))}" if version else "",
            f"pid {report.target.pid}" if report.target.pid is not None else "",
        )
        if part
    )
    lines.append(f"Daemon at {report.daemon_url}: running" + (f" ({about})" if about else ""))
    dashboard = status_dashboard_url(report)
    if dashboard is not None:
        lines.append(f"  dashboard:       {dashboard}")
    live = report.health.get("relay")
    if not isinstance(live, Mapping):
        lines.append("  relay:           unknown (the daemon did not report it)")
        return lines
    state = live.get("state")
    shown_state = _one_line(str(state)) if state is not None else "unknown"
    if isinstance(state, str) and state not in RELAY_STATES:
        shown_state += " (unknown state)"
    lines.append(f"  relay:           {shown_state}")
    fields: tuple[tuple[str, str, bool], ...] = (
        ("connected_since", "connected since", True),
        ("last_error", "last error", False),
        ("last_error_at", "last error at", True),
        ("rtt_ms", "round trip", False),
        ("attempts", "attempts", False),
        ("next_retry_at", "next retry", True),
    )
    for name, label, is_time in fields:
        value = live.get(name)
        if value is None:
            continue
        if is_time:
            text = format_time(value, now)
        elif name == "rtt_ms" and isinstance(value, int | float) and not isinstance(value, bool):
            text = f"{value:.0f} ms"
        else:
            text = _one_line(str(value))
        lines.append(f"  {label + ':':<17}{text}")
    return lines + [f"hint: {hint}" for hint in status_hints(report)]


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact_secrets(value)
    if isinstance(value, Mapping):
        return {str(key): _redacted(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redacted(item) for item in value]
    return value


def status_document(report: StatusReport) -> dict[str, Any]:
    """The ``status --json`` document."""
    relay = report.settings.relay
    health = report.health
    return {
        "config": {
            "path": str(report.settings.config_path),
            "exists": report.config_exists,
            "enabled": relay.enabled,
            "url": relay.url,
            "api_key_present": relay.api_key is not None,
            "api_key_masked": None if relay.api_key is None else mask_key(relay.api_key),
            "ca_file": None if relay.ca_file is None else str(relay.ca_file),
        },
        "daemon": {
            "url": report.daemon_url,
            "source": report.target.source,
            "pid": report.target.pid,
            "runtime_file": {
                "path": str(report.target.runtime.path),
                "state": report.target.runtime.state.value,
            },
            "running": health is not None,
            "daemon_id": None if health is None else _redacted(health.get("daemon_id")),
            "version": None if health is None else _redacted(health.get("version")),
            "error": report.daemon_error,
        },
        "relay": None if health is None else _redacted(health.get("relay")),
        "dashboard_url": status_dashboard_url(report),
        "hints": status_hints(report),
        "exit_code": status_exit_code(report),
    }


def _cmd_status(args: argparse.Namespace) -> int:
    home = repowire_home()
    overrides = Overrides(daemon_host=args.host, daemon_port=args.port)
    # Reading must not write: no config file, no daemon id, not even the home is created.
    settings = load_settings(home, overrides, persist=False)
    flags_given = args.host is not None or args.port is not None
    report = collect_status(
        settings, target=locate_daemon(settings, read_runtime(home), flags_given=flags_given)
    )
    code = status_exit_code(report)
    if args.json:
        print(json.dumps(status_document(report), indent=2, sort_keys=False))
        return code
    for line in render_status(report, time.time()):
        print(line)
    if report.daemon_error is not None:
        sys.stdout.flush()
        _error(report.daemon_error)
    return code


# --------------------------------------------------------------------------------------------
# serve and relay start (long-running, under trio)


def _run_trio(function: Callable[[Any], Awaitable[object]], argument: object) -> None:
    """``trio.run(function, argument)``, with a Ctrl-C wrapped in exception groups unwrapped."""
    import trio

    try:
        trio.run(function, argument)
    except BaseExceptionGroup as group:
        interrupt, rest = group.split(KeyboardInterrupt)
        if interrupt is not None and rest is None:
            raise KeyboardInterrupt from None
        raise


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CommandError(f"{what} is not available in this installation ({exc})") from None


def _attribute(module: Any, name: str, what: str) -> Any:
    try:
        return getattr(module, name)
    except AttributeError:
        raise CommandError(
            f"{what} is not available in this installation ({module.__name__}.{name} is missing)"
        ) from None


def _serve_error(exc: OSError, settings: Settings) -> CommandError:
    message = f"cannot serve: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        where = daemon_base_url(settings.daemon)
        message += (
            f" ({where} is taken by another program, perhaps a daemon of another home; "
            "choose another port with --port)"
        )
    return CommandError(message)


def _cmd_serve(args: argparse.Namespace) -> int:
    home = repowire_home()
    # At once, before the config is touched or a key is registered. serve() checks again,
    # race-free, when it takes the home's lock.
    running = read_runtime(home)
    if running.alive:
        raise CommandError(already_running_message(running), exit_code=EXIT_ALREADY_RUNNING)
    enabled: bool | None = None
    if args.relay:
        enabled = True
    elif args.no_relay:
        enabled = False
    _setup_command_logging(args)
    overrides = Overrides(
        relay_enabled=enabled,
        relay_url=_relay_url_flag(args),
        daemon_host=args.host,
        daemon_port=args.port,
        daemon_id=args.daemon_id,
    )
    settings = load_settings(home, overrides)
    if settings.relay.enabled and settings.relay.url_is_default:
        print(f"note: {hosted_relay_note(settings.relay.url)}", file=sys.stderr)
    if settings.relay.enabled and settings.relay.api_key is None:
        try:
            key = obtain_api_key(settings)
        except CommandError as exc:
            raise CommandError(
                f"cannot obtain an API key: {exc} (use --no-relay to serve locally only)"
            ) from None
        settings = attrs.evolve(settings, relay=attrs.evolve(settings.relay, api_key=key))
        print(
            f"Registered with {settings.relay.url}; API key {mask_key(key)} stored in "
            f"{settings.config_path}"
        )
    serve_module = _import("repowire._serve", "the daemon")
    serve: Callable[[Settings], Awaitable[object]] = _attribute(serve_module, "serve", "the daemon")
    try:
        _run_trio(serve, settings)
    except KeyboardInterrupt:
        # Ctrl-C is how a foreground daemon is stopped: not an error.
        return EXIT_OK
    except DaemonAlreadyRunning as exc:
        raise CommandError(str(exc), exit_code=EXIT_ALREADY_RUNNING) from None
    except OSError as exc:
        raise _serve_error(exc, settings) from None
    except BaseExceptionGroup as group:
        # A failed bind surfaces from the daemon's nursery wrapped in a group.
        os_errors, rest = group.split(OSError)
        if rest is not None or os_errors is None:
            raise
        first = _first_leaf(os_errors)
        if not isinstance(first, OSError):
            raise
        raise _serve_error(first, settings) from None
    return EXIT_OK


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def relay_settings_kwargs(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    """Keyword arguments for ``relay.RelaySettings`` from ``relay start``'s flags.

    Always given: host, port, data_dir (default ``<home>/relay``), registration. The optional
    ones (dashboard_dir, public_url, certfile, keyfile, max_body_size, body_timeout,
    trusted_proxies) only
    when a flag gave them, so the relay's own defaults apply otherwise.
    """
    kwargs: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir if args.data_dir is not None else home / "relay",
        "registration": args.registration,
    }
    optional = {
        "dashboard_dir": args.dashboard_dir,
        "public_url": args.public_url,
        "certfile": args.certfile,
        "keyfile": args.keyfile,
        "max_body_size": args.max_body_size,
        "body_timeout": args.body_timeout,
        "trusted_proxies": tuple(args.trusted_proxy) if args.trusted_proxy else None,
        "max_links_per_scope": args.max_links_per_scope,
        "max_streams_per_scope": args.max_streams_per_scope,
        "max_scope_buffered": args.max_scope_buffer,
        "stream_open_timeout": args.stream_open_timeout,
        "max_websocket_message_size": args.max_websocket_message,
    }
    # Always given: "off" turns the metrics listener off (None to the relay).
    kwargs["metrics_listen"] = None if args.metrics_listen == "off" else args.metrics_listen
    kwargs.update({name: value for name, value in optional.items() if value is not None})
    return kwargs


def _setup_command_logging(args: argparse.Namespace) -> None:
    """Logging for a long-running command from its -v/-q/--log-format flags."""
    setup_logging(
        level=log_level(verbose=args.verbose, quiet=args.quiet, environ=os.environ),
        log_format=args.log_format,
    )


def _relay_start_error(exc: OSError) -> CommandError:
    """One line for a listener that cannot be bound (``relay.ListenError`` names the address)."""
    message = f"cannot start the relay: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        message += (
            " (another program holds that address, perhaps a relay already running; choose "
            "another port with --port, or --metrics-listen for the metrics listener)"
        )
    elif exc.errno == errno.EACCES:
        message += " (ports below 1024 need privileges; choose another port with --port)"
    return CommandError(message)


def _cmd_relay_start(args: argparse.Namespace) -> int:
    if (args.certfile is None) != (args.keyfile is None):
        raise CommandError(
            "repowire relay start: error: --certfile and --keyfile go together "
            "(see 'repowire relay start --help')",
            exit_code=EXIT_USAGE,
        )
    relay_module = _import("relay", "the relay server")
    settings_class = _attribute(relay_module, "RelaySettings", "the relay server")
    serve_relay_main = _attribute(relay_module, "serve_relay_main", "the relay server")
    try:
        settings = settings_class(**relay_settings_kwargs(args, repowire_home()))
    except (TypeError, ValueError) as exc:
        raise CommandError(f"cannot start the relay: {_one_line(str(exc))}") from None
    _setup_command_logging(args)
    try:
        _run_trio(serve_relay_main, settings)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        raise _relay_start_error(exc) from None
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# relay login-link


@attrs.frozen(kw_only=True)
class LoginLink:
    """A one-time sign-in link from the relay. ``url`` holds a single-use token, never a key."""

    url: str
    expires_at: float
    expires_in: float
    daemon_id: str | None


def request_login_link(
    relay_url: str,
    api_key: str,
    *,
    daemon_id: str | None,
    ca_file: Path | None,
    timeout: float = RELAY_REQUEST_TIMEOUT,
) -> LoginLink:
    """Ask the relay for a one-time sign-in link (``POST /api/v1/login-links``, the key as
    Bearer, ``{"daemon_id": ...}`` when given).

    Raises :class:`CommandError` when the relay is unreachable, rejects the key, does not know
    the daemon, limits requests or answers something unexpected.
    """
    base = http_base(relay_url)
    status, answer = _relay_request(
        "POST",
        base,
        "/api/v1/login-links",
        body={} if daemon_id is None else {"daemon_id": daemon_id},
        bearer=api_key,
        ca_file=ca_file,
        timeout=timeout,
    )
    if status in (200, 201):
        url = answer.get("url")
        expires_at = answer.get("expires_at")
        expires_in = answer.get("expires_in")
        scheme = urllib.parse.urlsplit(url).scheme if isinstance(url, str) else ""
        numbers = all(
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            for value in (expires_at, expires_in)
        )
        if scheme not in ("http", "https") or not numbers:
            raise CommandError(f"the relay at {base} answered without a valid sign-in link")
        assert isinstance(url, str)
        assert isinstance(expires_at, int | float) and isinstance(expires_in, int | float)
        return LoginLink(
            url=url,
            expires_at=float(expires_at),
            expires_in=float(expires_in),
            daemon_id=daemon_id,
        )
    if status == 401:
        raise CommandError(
            f"the relay at {base} does not accept this daemon's API key (unknown or revoked); "
            "register a new one with 'repowire setup --relay --new-key'"
        )
    if status == 404 and answer.get("error") == "unknown_daemon":
        raise CommandError(
            f"daemon {daemon_id} has not connected to the relay at {base} with this key yet: "
            "start it with 'repowire serve --relay', then ask again"
        )
    if status == 429:
        raise CommandError(f"the relay at {base} is limiting sign-in links; try again shortly")
    raise CommandError(
        f"the relay at {base} refused the sign-in link ({status}: {_detail(answer)})"
    )


def render_qr(text: str) -> str:
    """``text`` as a QR code of Unicode half blocks (two modules a character), light modules
    drawn, for a terminal's dark background; with the standard 4-module quiet zone."""
    import segno

    out = io.StringIO()
    segno.make(text).terminal(out=out, compact=True)
    return out.getvalue()


def _cmd_login_link(args: argparse.Namespace) -> int:
    home = repowire_home()
    settings = load_settings(home, persist=False)
    relay = settings.relay
    if relay.api_key is None:
        raise CommandError(
            f"no API key in {settings.config_path}: run 'repowire setup --relay' first"
        )
    # The running daemon's id first (it is the one the relay knows), else the stored one.
    running = read_runtime(home)
    daemon_id: str | None = None
    if running.state is RuntimeState.RUNNING and running.record is not None:
        daemon_id = running.record.daemon_id
    elif not settings.daemon.id_is_temporary:
        daemon_id = settings.daemon.daemon_id
    link = request_login_link(relay.url, relay.api_key, daemon_id=daemon_id, ca_file=relay.ca_file)
    if args.json:
        document = {
            "url": link.url,
            "expires_at": link.expires_at,
            "expires_in": link.expires_in,
            "daemon_id": link.daemon_id,
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    until = datetime.datetime.fromtimestamp(link.expires_at).astimezone()
    minutes = max(1, round(link.expires_in / 60))
    whom = f" to daemon {link.daemon_id}'s dashboard" if link.daemon_id else ""
    print(
        f"One-time sign-in link{whom}: works once, expires in {minutes} min "
        f"(at {until.isoformat(timespec='seconds')}). Scan it with a phone, or open it:"
    )
    if not args.no_qr:
        sys.stdout.write(render_qr(link.url))
    print(link.url)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# completion


def command_tree(
    parser: argparse.ArgumentParser,
) -> dict[tuple[str, ...], tuple[list[str], list[str]]]:
    """Every command path of ``parser`` (``()`` for the top, ``("relay", "keys")``, ...) with
    its subcommands and its option strings, in the parser's order."""
    tree: dict[tuple[str, ...], tuple[list[str], list[str]]] = {}

    def walk(node: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        commands: list[str] = []
        options: list[str] = []
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    commands.append(name)
                    walk(child, (*path, name))
            else:
                options.extend(action.option_strings)
        tree[path] = (commands, options)

    walk(parser, ())
    return tree


def _help_of(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> str:
    """The one-line help of the subcommand at ``path``."""
    node = parser
    help_text = ""
    for name in path:
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if choice.dest == name:
                        help_text = choice.help or ""
                node = action.choices[name]
                break
    return help_text


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """A completion script for ``shell`` (bash, zsh or fish) made from ``parser``."""
    tree = command_tree(parser)
    if shell == "fish":
        lines = ["# repowire completion for fish: repowire completion fish | source", ""]
        lines.append("complete -c repowire -f")
        for path, (commands, options) in tree.items():
            if path:
                condition = f"__fish_seen_subcommand_from {path[-1]}"
                if len(path) > 1:
                    condition = f"__fish_seen_subcommand_from {path[-2]}; and {condition}"
                if commands:
                    condition += f"; and not __fish_seen_subcommand_from {' '.join(commands)}"
            else:
                condition = "__fish_use_subcommand"
            for command in commands:
                description = _help_of(parser, (*path, command)).replace("'", "")
                lines.append(
                    f"complete -c repowire -n '{condition}' -a {command} -d '{description}'"
                )
            for option in options:
                flag = f"-l {option[2:]}" if option.startswith("--") else f"-s {option[1:]}"
                lines.append(f"complete -c repowire -n '{condition}' {flag}")
        return "\n".join(lines) + "\n"
    cases = []
    for path, (commands, options) in tree.items():
        words = " ".join([*commands, *options])
        cases.append(f'        "{" ".join(path)}") words="{words}" ;;')
    known = " ".join(f'"{" ".join(path)}"' for path in tree if path)
    body = f"""\
_repowire() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" word next i words=""
    local -a known=({known})
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        [[ "$word" == -* ]] && continue
        next="${{path:+$path }}$word"
        local k
        for k in "${{known[@]}}"; do
            [[ "$k" == "$next" ]] && path="$next" && break
        done
    done
    case "$path" in
{chr(10).join(cases)}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _repowire repowire
"""
    if shell == "zsh":
        return (
            '# repowire completion for zsh: eval "$(repowire completion zsh)"\n'
            "autoload -U +X bashcompinit && bashcompinit\n" + body
        )
    return '# repowire completion for bash: eval "$(repowire completion bash)"\n' + body


def _cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion_script(args.shell, build_parser()))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# relay keys


def _store_path(args: argparse.Namespace) -> Path:
    data_dir: Path = args.data_dir if args.data_dir is not None else repowire_home() / "relay"
    return data_dir / "relay.sqlite3"


def _open_store(path: Path, *, create: bool) -> Any:
    store_module = _import("relay._store", "the relay key store")
    if not create and not path.exists():
        raise CommandError(
            f"no key store at {path} (start the relay once, or create a key, or pass --data-dir)"
        )
    try:
        return store_module.KeyStore.open(path)
    except store_module.StoreError as exc:
        raise CommandError(_one_line(str(exc))) from None


def _store_call(store_module_error: type[Exception], call: Callable[[], Any]) -> Any:
    try:
        return call()
    except store_module_error as exc:
        raise CommandError(_one_line(str(exc))) from None
    except ValueError as exc:
        raise CommandError(_one_line(str(exc)), exit_code=EXIT_USAGE) from None


def _cmd_keys_create(args: argparse.Namespace) -> int:
    path = _store_path(args)
    store_error = _import("relay._store", "the relay key store").StoreError
    with _open_store(path, create=True) as store:
        now = time.time()
        if args.scope is None:
            record, key = _store_call(
                store_error, lambda: store.create_scope(label=args.label, now=now)
            )
            where = f"in a new scope {record.scope_id}"
        else:
            record, key = _store_call(
                store_error, lambda: store.create_key(args.scope, label=args.label, now=now)
            )
            where = f"in scope {record.scope_id}"
    print(f"Created key {record.key_id} {where} ({path})")
    print("API key (shown only now; store it safely):")
    # Printing the key is the purpose of this command; it is the only place a key is shown.
    print(key)
    return EXIT_OK


def _local_time(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")


def _cmd_keys_list(args: argparse.Namespace) -> int:
    path = _store_path(args)
    store_error = _import("relay._store", "the relay key store").StoreError
    with _open_store(path, create=False) as store:
        records = _store_call(store_error, lambda: store.list_keys(args.scope))
    if args.json:
        rows = [
            {
                "key_id": r.key_id,
                "scope_id": r.scope_id,
                "label": r.label,
                "created_at": r.created_at,
                "revoked_at": r.revoked_at,
            }
            for r in records
        ]
        print(json.dumps({"keys": rows}, indent=2))
        return EXIT_OK
    if not records:
        print(f"No keys in {path}")
        return EXIT_OK
    table = [("KEY ID", "SCOPE ID", "CREATED", "REVOKED", "LABEL")]
    for r in records:
        table.append(
            (
                r.key_id,
                r.scope_id,
                _local_time(r.created_at),
                _local_time(r.revoked_at),
                _one_line(r.label, 60),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[4]
        )
    return EXIT_OK


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    path = _store_path(args)
    store_error = _import("relay._store", "the relay key store").StoreError
    with _open_store(path, create=False) as store:
        revoked = _store_call(store_error, lambda: store.revoke_key(args.key_id, now=time.time()))
    if not revoked:
        raise CommandError(f"no live key {args.key_id} in {path} (unknown or already revoked)")
    print(f"Revoked key {args.key_id}; its browser sessions are ended")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# Argument types: each failure is a one-line message that never repeats a secret


def _relay_url_arg(text: str) -> str:
    """A relay URL, ``http(s)://`` allowed (returned as given: the command says how it maps)."""
    problem = relay_url_problem(normalize_relay_url(text)[0])
    if problem is not None:
        raise argparse.ArgumentTypeError(f"relay URL {redact_secrets(text)!r} {problem}")
    return text


def _api_key_arg(text: str) -> str:
    if text != "-" and not looks_like_key(text):
        raise argparse.ArgumentTypeError(
            "does not look like a Repowire API key ('rw_' followed by 43+ url-safe characters)"
        )
    return text


def _port_arg(text: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not text.isdigit() or not low <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number {low}-65535, got {text!r}")
    return int(text)


def _listen_port_arg(text: str) -> int:
    return _port_arg(text, allow_zero=True)


def _existing_file_arg(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a readable file")
    return path.resolve()


def _directory_arg(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return path.resolve()


def _existing_directory_arg(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return path.resolve()


def _public_url_arg(text: str) -> str:
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{redact_secrets(text)!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{redact_secrets(text)!r} must be an http(s):// URL")
    if parts.username is not None or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError("must not contain credentials, a query or a fragment")
    return text.rstrip("/")


def _byte_size_arg(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, got {text!r}")
    return int(text)


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _positive_int_arg(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _metrics_listen_arg(text: str) -> str:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) or ``off``."""
    if text == "off":
        return text
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        valid = sep == ":" and port.isdigit() and 0 <= int(port) <= 65535
    except ValueError:
        valid = host == "localhost" and port.isdigit() and 0 <= int(port) <= 65535
    if not valid:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT (such as 127.0.0.1:9108) or 'off'"
        )
    return text


def _address_arg(text: str) -> str:
    try:
        if "/" in text:
            return str(ipaddress.ip_network(text, strict=False))
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address or network (such as 10.0.0.1 or 10.0.0.0/8)"
        ) from None


def _daemon_id_arg(text: str) -> str:
    if DAEMON_ID_PATTERN.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(
            f"{_one_line(text, 80)!r} must be 1-64 characters of A-Z a-z 0-9 . _ -"
        )
    return text


def _key_id_arg(text: str) -> str:
    if looks_like_key(text) or text.startswith("rw_"):
        raise argparse.ArgumentTypeError(
            "that is an API key, not a key id (key ids look like key_0123abcd...; "
            "see 'repowire relay keys list')"
        )
    return text


def _label_arg(text: str) -> str:
    if looks_like_key(text):
        raise argparse.ArgumentTypeError("that looks like an API key; a label is a plain name")
    return text


# --------------------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    """The full ``repowire`` argument parser (its errors raise instead of exiting)."""
    common: dict[str, Any] = {"allow_abbrev": False, "formatter_class": _HelpFormatter}
    parser = _Parser(
        prog="repowire",
        description="Repowire: a local daemon for coding agents, reachable through a relay.",
        epilog=_EXIT_CODES_HELP
        + "\nconfig file: $REPOWIRE_HOME/config.yaml (default ~/.repowire/config.yaml)"
        + '\nshell completion: eval "$(repowire completion bash)" (or zsh, fish)',
        **common,
    )
    parser.add_argument(
        "-V", "--version", action="version", version=f"repowire {package_version()}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    setup = commands.add_parser(
        "setup",
        help="configure relay access in the config file",
        description="Enable relay access in the config file and make sure it holds an API key "
        "(registering with the relay when there is none). Comments and other keys are kept.",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    setup.add_argument(
        "--relay", action="store_true", required=True, help="set up relay access (required)"
    )
    setup.add_argument(
        "--relay-url",
        type=_relay_url_arg,
        metavar="URL",
        help="relay URL: ws(s)://HOST[:PORT], its root or /ws/relay; http(s):// is taken as "
        f"ws(s):// (default: the file's, else the hosted relay {DEFAULT_RELAY_URL})",
    )
    key_choice = setup.add_mutually_exclusive_group()
    key_choice.add_argument(
        "--api-key",
        type=_api_key_arg,
        metavar="KEY",
        help="use this API key ('-' reads it from stdin, keeping it out of shell history)",
    )
    key_choice.add_argument(
        "--rotate-key",
        action="store_true",
        help="replace the configured (valid) key with a new one in the same scope (the old key "
        "stops working)",
    )
    key_choice.add_argument(
        "--new-key",
        action="store_true",
        help="register a new key, in a new scope, for this daemon: the way out when the "
        "relay rejects the configured key (asks first; the old scope is left behind)",
    )
    setup.add_argument(
        "--yes", action="store_true", help="do not ask before --new-key replaces a key"
    )
    setup.add_argument(
        "--ca-file",
        type=_existing_file_arg,
        metavar="FILE",
        help="PEM file of a certificate authority to trust (for a self-signed relay; "
        "default: system trust)",
    )
    setup.set_defaults(handler=_cmd_setup)

    status = commands.add_parser(
        "status",
        help="show relay configuration and the daemon's live relay state",
        description="Show the relay configuration and the running daemon's relay link state "
        "(connected, connecting, down or disabled).\n\nThe daemon asked is the one given by "
        "--host/--port, else the one this home's 'repowire serve' is running\n(recorded in "
        "$REPOWIRE_HOME/daemon.json), else the configured address.",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument(
        "--host",
        metavar="H",
        help="the daemon's address (default: the running daemon of this home, else as configured)",
    )
    status.add_argument(
        "--port",
        type=_port_arg,
        metavar="P",
        help="the daemon's port (default: the running daemon of this home, else as configured)",
    )
    status.set_defaults(handler=_cmd_status)

    def _logging_options(sub: argparse.ArgumentParser) -> None:
        group = sub.add_argument_group("logging")
        volume = group.add_mutually_exclusive_group()
        volume.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=0,
            help="log more: DEBUG lines too (REPOWIRE_DEBUG=1 does the same)",
        )
        volume.add_argument(
            "-q",
            "--quiet",
            action="count",
            default=0,
            help="log less: only warnings and errors",
        )
        group.add_argument(
            "--log-format",
            choices=LOG_FORMATS,
            default="text",
            help="text lines, or one JSON object per line (time, level, logger, message)",
        )

    serve = commands.add_parser(
        "serve",
        help="run the local daemon (with the relay connector when enabled)",
        description="Run the local daemon in the foreground; Ctrl-C stops it. With relay "
        "access enabled and no API key configured, one is obtained from the relay first.\n\n"
        "One daemon per home: while it runs it is recorded in $REPOWIRE_HOME/daemon.json\n"
        "(pid, address, daemon id; no secret), and a second 'serve' in the same home is "
        "refused (exit code 4).",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    relay_choice = serve.add_mutually_exclusive_group()
    relay_choice.add_argument(
        "--relay", action="store_true", help="connect to the relay (default: relay.enabled)"
    )
    relay_choice.add_argument(
        "--no-relay", action="store_true", help="do not connect to the relay (local only)"
    )
    serve.add_argument(
        "--host", metavar="H", help="listen address (default: daemon.host, else 127.0.0.1)"
    )
    serve.add_argument(
        "--port",
        type=_port_arg,
        metavar="P",
        help="listen port (default: REPOWIRE_DAEMON_PORT, else daemon.port, else 8377)",
    )
    serve.add_argument(
        "--relay-url",
        type=_relay_url_arg,
        metavar="URL",
        help="relay URL, as for setup (default: REPOWIRE_RELAY_URL, else relay.url, else the "
        f"hosted relay {DEFAULT_RELAY_URL})",
    )
    serve.add_argument(
        "--daemon-id",
        type=_daemon_id_arg,
        metavar="ID",
        help="id announced to the relay (default: daemon.id, generated on first use)",
    )
    _logging_options(serve)
    serve.set_defaults(handler=_cmd_serve)

    relay = commands.add_parser(
        "relay",
        help="run a self-hosted relay, manage its keys, sign a phone in",
        description="Run a self-hosted relay, manage the API keys in its key store, and get "
        "a one-time sign-in link (with a QR code) for a browser or a phone.",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    relay_commands = relay.add_subparsers(dest="relay_command", metavar="COMMAND", required=True)

    start = relay_commands.add_parser(
        "start",
        help="start a relay server",
        description="Start a relay: auth form, dashboard, daemon endpoint and tunnel.",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    start.add_argument("--host", default="127.0.0.1", metavar="H", help="listen address")
    start.add_argument(
        "--port",
        type=_listen_port_arg,
        default=8000,
        metavar="P",
        help="listen port (0: any free port, printed at start)",
    )
    start.add_argument(
        "--data-dir",
        type=_directory_arg,
        metavar="DIR",
        help="key store directory (default $REPOWIRE_HOME/relay)",
    )
    start.add_argument(
        "--dashboard-dir",
        type=_existing_directory_arg,
        metavar="DIR",
        help="serve this dashboard export instead of the bundled one (default: the bundled one)",
    )
    start.add_argument(
        "--public-url",
        type=_public_url_arg,
        metavar="URL",
        help="the URL browsers use, for Origin checks, secure cookies and sign-in links "
        "(default: the address each request was sent to)",
    )
    start.add_argument(
        "--registration",
        choices=("open", "closed"),
        default="open",
        help="whether anyone may register for a key (rate-limited)",
    )
    start.add_argument(
        "--certfile",
        type=_existing_file_arg,
        metavar="F",
        help="TLS certificate chain (PEM), with --keyfile (default: plain HTTP)",
    )
    start.add_argument(
        "--keyfile",
        type=_existing_file_arg,
        metavar="F",
        help="TLS private key (PEM), with --certfile (default: plain HTTP)",
    )
    start.add_argument(
        "--max-body-size",
        type=_byte_size_arg,
        metavar="BYTES",
        help="largest request body (default 268435456, 256 MiB)",
    )
    start.add_argument(
        "--body-timeout",
        type=_seconds_arg,
        metavar="SECONDS",
        help="how long to wait for the next piece of a request body before answering 408 "
        "(default 60)",
    )
    start.add_argument(
        "--trusted-proxy",
        type=_address_arg,
        action="append",
        metavar="ADDR",
        help="a reverse proxy whose X-Forwarded-For is believed (repeatable; default: none)",
    )
    start.add_argument(
        "--metrics-listen",
        type=_metrics_listen_arg,
        default=DEFAULT_METRICS_LISTEN,
        metavar="HOST:PORT",
        help="where /metrics is served, apart from the public listener; 'off' to not serve it "
        f"(default {DEFAULT_METRICS_LISTEN})",
    )
    _logging_options(start)
    quotas = start.add_argument_group(
        "per-scope quotas", "what one key's scope may take of the relay at once"
    )
    quotas.add_argument(
        "--max-links-per-scope",
        type=_positive_int_arg,
        metavar="N",
        help="daemon links connected at once (default 16)",
    )
    quotas.add_argument(
        "--max-streams-per-scope",
        type=_positive_int_arg,
        metavar="N",
        help="streams open at once over all the scope's links (default 512)",
    )
    quotas.add_argument(
        "--max-scope-buffer",
        type=_byte_size_arg,
        metavar="BYTES",
        help=(
            "bytes the relay may hold for the scope; a WebSocket is charged 21 times the "
            "WebSocket message limit + 256 KiB (default 201326592, 192 MiB)"
        ),
    )
    quotas.add_argument(
        "--stream-open-timeout",
        type=_seconds_arg,
        metavar="SECONDS",
        help="how long a request waits for a free stream slot before 503 (default 5)",
    )
    quotas.add_argument(
        "--max-websocket-message",
        type=_byte_size_arg,
        metavar="BYTES",
        help="largest tunneled WebSocket message, either way (default 1048576, 1 MiB)",
    )
    start.set_defaults(handler=_cmd_relay_start)

    login_link = relay_commands.add_parser(
        "login-link",
        help="print a one-time sign-in link for a browser or phone, as text and a QR code",
        description="Ask the relay (with this daemon's API key, which is never printed) for a "
        "one-time, short-lived sign-in link to this daemon's dashboard, and print it as a QR "
        "code and as text. The link works once and expires within minutes; revoking the key "
        "revokes it.",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    login_link.add_argument(
        "--json", action="store_true", help="print one JSON document (url, expires_at, ...)"
    )
    login_link.add_argument("--no-qr", action="store_true", help="print the link as text only")
    login_link.set_defaults(handler=_cmd_login_link)

    keys = relay_commands.add_parser(
        "keys",
        help="manage API keys in the relay's key store",
        description="Create, list and revoke API keys in the relay's key store (a SQLite "
        "file in the relay's data directory). Run them on the relay's machine.",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    key_commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    def data_dir_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--data-dir",
            type=_directory_arg,
            metavar="DIR",
            help="the relay's data directory, holding relay.sqlite3 (default $REPOWIRE_HOME/relay)",
        )

    create = key_commands.add_parser(
        "create",
        help="create a key (in a new scope, or in --scope) and print it once",
        description="Create an API key and print it. This is the only time it is shown.",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    create.add_argument(
        "--label",
        type=_label_arg,
        default="",
        help="a name for the key, shown by list (default: none)",
    )
    create.add_argument(
        "--scope",
        metavar="SCOPE_ID",
        help="add the key to this existing scope, as shown by list (default: a new scope)",
    )
    data_dir_option(create)
    create.set_defaults(handler=_cmd_keys_create)

    listing = key_commands.add_parser(
        "list",
        help="list keys (never the keys themselves)",
        description="List the keys' ids, scopes, labels and dates. Keys are never shown.",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    listing.add_argument(
        "--scope", metavar="SCOPE_ID", help="only this scope's keys (default: every scope)"
    )
    listing.add_argument("--json", action="store_true", help="print one JSON document")
    data_dir_option(listing)
    listing.set_defaults(handler=_cmd_keys_list)

    revoke = key_commands.add_parser(
        "revoke",
        help="revoke a key and end its browser sessions",
        description="Revoke a key by its id; daemons and browsers using it are refused, "
        "and its unused sign-in links stop working.",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    revoke.add_argument(
        "key_id",
        type=_key_id_arg,
        metavar="KEY_ID",
        help="the key's id (key_...), as shown by list; never the key itself",
    )
    data_dir_option(revoke)
    revoke.set_defaults(handler=_cmd_keys_revoke)

    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        description="Print a completion script for the shell, made from this command line's "
        'own parser. Load it with: eval "$(repowire completion bash)" (zsh likewise), or '
        "repowire completion fish | source.",
        epilog=_EXIT_CODES_HELP,
        **common,
    )
    completion.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell")
    completion.set_defaults(handler=_cmd_completion)

    return parser


# --------------------------------------------------------------------------------------------
# Entry point


def _error(message: str) -> None:
    print(_one_line(message, limit=1000), file=sys.stderr)


def _describe_unexpected(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe_unexpected(inner) for inner in exc.exceptions)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _chosen_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The (sub)command parser ``args`` were parsed by: ``repowire relay keys list``'s for
    ``relay keys list ...``, so that its errors name it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if isinstance(chosen, str) and chosen in action.choices:
                return _chosen_parser(action.choices[chosen], args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            # argparse reports leftovers from the top parser ("repowire: error"); the
            # subcommand's own prog says which command did not know them.
            _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extras)}")
    except _UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:
        # --help and --version print and exit 0.
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        _error(f"repowire: configuration error: {exc}")
        return EXIT_CONFIG
    except CommandError as exc:
        message = str(exc)
        _error(message if message.startswith("repowire") else f"repowire: error: {message}")
        return exc.exit_code
    except KeyboardInterrupt:
        _error("repowire: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`repowire relay keys list | head`): nothing left to say.
        with contextlib.suppress(OSError):
            # So that the interpreter's final flush of stdout cannot fail again.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_FAILED
    except Exception as exc:
        if os.environ.get(ENV_DEBUG):
            traceback.print_exc()
        _error(f"repowire: unexpected error: {_describe_unexpected(exc)}")
        return EXIT_FAILED
