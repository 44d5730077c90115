"""``repowire status``: the relay configuration, and the running daemon's relay link state.

Which daemon is asked: the one named by ``--host``/``--port`` when given; else the one this
home's ``repowire serve`` recorded in ``<home>/daemon.json`` (see :mod:`repowire._runtime`),
when it is still running; else the configured address (config file, environment, defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

import attrs

from common import is_daemon_id, mask_key
from protocol import CloseCode
from repowire._httpclient import HttpError, request_json
from repowire._runtime import RuntimeInfo, RuntimeState, local_url, read_runtime
from repowire.config import (
    ConfigError,
    DaemonConfig,
    Overrides,
    Settings,
    dashboard_url,
    read_settings,
    redact_secrets,
    repowire_home,
)

from ._errors import (
    EXIT_DAEMON_NOT_RUNNING,
    EXIT_FAILED,
    EXIT_OK,
    answer_detail,
    one_line,
    print_error,
)
from ._times import format_time

#: Seconds allowed for the local daemon's ``/health``: it is on this machine, so a slow answer
#: means something is wrong, and ``status`` should say so rather than hang.
DAEMON_REQUEST_TIMEOUT = 3.0

RELAY_STATES = ("connected", "connecting", "down", "disabled")

#: Where ``status`` took the daemon's address from (``status --json``: ``daemon.source``).
SOURCE_FLAGS = "flags"
SOURCE_RUNTIME_FILE = "runtime_file"
SOURCE_CONFIG = "config"

#: Marks of a ``last_error`` (as the connector words it, with the close code in parentheses)
#: after which only a new key helps: the relay does not know the key, or revoked it. A
#: rotation needs the old key to be valid.
_DEAD_KEY_MARKS = (
    f"({CloseCode.INVALID_KEY.value}:",
    f"({CloseCode.KEY_REVOKED.value}:",
    "refused the API key",
)


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
        return f" (could not read this home's runtime files: {one_line(str(runtime.detail))})"
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
    health: Mapping[str, Any] | None = None
    error: str | None
    try:
        status, answer = request_json(
            "GET", target.url + "/health", body=None, bearer=None, ca_file=None, timeout=timeout
        )
    except HttpError as exc:
        error = _unreachable_error(target, exc)
    else:
        error = _health_error(target, status, answer)
        if error is None:
            health = answer
    return StatusReport(
        settings=settings,
        config_exists=settings.config_path.exists(),
        daemon_url=target.url,
        health=health,
        daemon_error=error,
        target=target,
    )


def _unreachable_error(target: DaemonTarget, exc: HttpError) -> str:
    base = target.url
    if exc.unreachable and target.source == SOURCE_RUNTIME_FILE:
        return (
            f"the daemon from this home (pid {target.pid}) is running but not answering at {base}"
        )
    if exc.unreachable:
        return (
            f"the daemon is not running at {base}{_not_running_note(target)}; "
            "start it with 'repowire serve'"
        )
    return f"the daemon at {base} is not answering properly: {one_line(str(exc))}"


def _health_error(target: DaemonTarget, status: int, answer: Mapping[str, Any]) -> str | None:
    """What is wrong with a ``/health`` answer, or ``None`` when it is this daemon's."""
    base = target.url
    answered_id = answer.get("daemon_id")
    if status != 200:
        return f"the daemon at {base} answered /health with {status}: {answer_detail(answer)}"
    if target.expected_id is not None and answered_id != target.expected_id:
        return (
            f"the daemon at {base} answered as {one_line(str(answered_id), 80)!r}, not as "
            f"{target.expected_id!r} recorded in {target.runtime.path}"
        )
    return None


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
    if not isinstance(daemon_id, str) or not is_daemon_id(daemon_id):
        return None
    try:
        return dashboard_url(relay.url, daemon_id)
    except ConfigError:
        return None


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
    lines = _config_lines(report)
    if report.health is None:
        return lines
    lines.append(_daemon_line(report, report.health))
    dashboard = status_dashboard_url(report)
    if dashboard is not None:
        lines.append(f"  dashboard:       {dashboard}")
    live = report.health.get("relay")
    if not isinstance(live, Mapping):
        lines.append("  relay:           unknown (the daemon did not report it)")
        return lines
    return lines + _link_lines(live, now) + [f"hint: {hint}" for hint in status_hints(report)]


def _config_lines(report: StatusReport) -> list[str]:
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
    return lines


def _daemon_line(report: StatusReport, health: Mapping[str, Any]) -> str:
    daemon_id = health.get("daemon_id")
    version = health.get("version")
    about = ", ".join(
        part
        for part in (
            f"id {one_line(str(daemon_id))}" if daemon_id else "",
            f"version {one_line(str(version))}" if version else "",
            f"pid {report.target.pid}" if report.target.pid is not None else "",
        )
        if part
    )
    return f"Daemon at {report.daemon_url}: running" + (f" ({about})" if about else "")


#: The link fields ``status`` shows: (name in /health, label, whether it is a time).
_LINK_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("connected_since", "connected since", True),
    ("last_error", "last error", False),
    ("last_error_at", "last error at", True),
    ("rtt_ms", "round trip", False),
    ("attempts", "attempts", False),
    ("next_retry_at", "next retry", True),
)


def _link_lines(live: Mapping[str, Any], now: float) -> list[str]:
    """The relay link's state and details, as the daemon reported them."""
    state = live.get("state")
    shown_state = one_line(str(state)) if state is not None else "unknown"
    if isinstance(state, str) and state not in RELAY_STATES:
        shown_state += " (unknown state)"
    lines = [f"  relay:           {shown_state}"]
    for name, label, is_time in _LINK_FIELDS:
        value = live.get(name)
        if value is None:
            continue
        if is_time:
            text = format_time(value, now)
        elif name == "rtt_ms" and isinstance(value, int | float) and not isinstance(value, bool):
            text = f"{value:.0f} ms"
        else:
            text = one_line(str(value))
        lines.append(f"  {label + ':':<17}{text}")
    return lines


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


def status_command(args: argparse.Namespace) -> int:
    """``repowire status [--json] [--host H] [--port P]``."""
    home = repowire_home()
    overrides = Overrides(daemon_host=args.host, daemon_port=args.port)
    # Reading must not write: no config file, no daemon id, not even the home is created.
    settings = read_settings(home, overrides)
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
        print_error(report.daemon_error)
    return code
