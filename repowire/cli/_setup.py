"""``repowire setup --relay``: turn relay access on in the config file, with an API key."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import attrs

from common import looks_like_key, mask_key
from repowire.config import (
    ENV_API_KEY,
    ENV_RELAY_ENABLED,
    ENV_RELAY_URL,
    Overrides,
    Settings,
    check_writable,
    config_path,
    load_settings,
    read_settings,
    repowire_home,
    update_config,
)

from ._errors import EXIT_OK, EXIT_USAGE, CommandError, one_line
from ._relay_api import (
    KEY_VALID,
    RELAY_REQUEST_TIMEOUT,
    check_key,
    register_key,
    rotate_key,
)
from ._relay_url import hosted_relay_note, relay_url_flag


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


@attrs.frozen(kw_only=True)
class _KeyChoice:
    """Which key setup stores, and how it came by it."""

    action: str
    #: The key to write, or ``None`` to keep the one the file holds.
    stored: str | None = attrs.field(repr=False)
    key_id: str | None = None
    scope_id: str | None = None
    key_check: str | None = None
    note: str | None = None


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
    _check_key_options(api_key, rotate=rotate, new_key=new_key)
    env = os.environ if environ is None else environ
    current = load_settings(home, Overrides(ca_file=ca_file), environ={})
    url = current.relay.url if relay_url is None else relay_url
    notes: list[str] = []
    if relay_url is None and current.relay.url_is_default:
        notes.append(hosted_relay_note(url))
    choice = _choose_key(
        current,
        url,
        api_key=api_key,
        rotate=rotate,
        new_key=new_key,
        url_changed=relay_url is not None and relay_url != current.relay.url,
        timeout=timeout,
    )
    if choice.note is not None:
        notes.append(choice.note)

    _write_relay(home, url, ca_file=ca_file, api_key=choice.stored)
    stored_key = choice.stored if choice.stored is not None else current.relay.api_key
    assert stored_key is not None
    notes.extend(_override_notes(env))
    return SetupResult(
        config_path=config_path(home),
        relay_url=url,
        ca_file=current.relay.ca_file,
        key_action=choice.action,
        masked_key=mask_key(stored_key),
        key_id=choice.key_id,
        scope_id=choice.scope_id,
        notes=tuple(notes),
        key_check=choice.key_check,
    )


def _write_relay(home: Path, url: str, *, ca_file: Path | None, api_key: str | None) -> None:
    """Write ``relay.enabled: true`` and ``relay.url``, and ``ca_file`` and ``api_key`` when
    given, keeping the rest of the file."""
    changes: dict[str, object] = {"enabled": True, "url": url}
    if ca_file is not None:
        changes["ca_file"] = str(ca_file)
    if api_key is not None:
        changes["api_key"] = api_key
    update_config(home, {"relay": changes})


def _check_key_options(api_key: str | None, *, rotate: bool, new_key: bool) -> None:
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


def _choose_key(
    current: Settings,
    url: str,
    *,
    api_key: str | None,
    rotate: bool,
    new_key: bool,
    url_changed: bool,
    timeout: float,
) -> _KeyChoice:
    """The key to store: given, rotated, kept, or registered (see :func:`setup_relay`)."""
    relay = current.relay
    if api_key is not None:
        key_check, why = check_key(url, api_key, ca_file=relay.ca_file, timeout=timeout)
        note = None
        if why is not None:
            note = f"{why}; stored it anyway: 'repowire status' shows whether the relay accepts it"
        return _KeyChoice(action="given", stored=api_key, key_check=key_check, note=note)
    if rotate:
        if relay.api_key is None:
            raise CommandError(
                f"no API key in {current.config_path} to rotate; run 'repowire setup --relay' "
                "to obtain one"
            )
        check_writable(current.home)
        rotated = rotate_key(url, relay.api_key, ca_file=relay.ca_file, timeout=timeout)
        return _KeyChoice(action="rotated", stored=rotated.api_key, key_id=rotated.key_id)
    if relay.api_key is not None and not new_key:
        note = None
        if url_changed:
            note = (
                "the stored API key was issued for the previous relay URL; if the new relay "
                "rejects it, run 'repowire setup --relay --api-key KEY'"
            )
        return _KeyChoice(action="kept", stored=None, note=note)
    if new_key:
        check_writable(current.home)
    issued = register_key(
        url, label=current.daemon.daemon_id, ca_file=relay.ca_file, timeout=timeout
    )
    return _KeyChoice(
        action="renewed" if new_key else "registered",
        stored=issued.api_key,
        key_id=issued.key_id,
        scope_id=issued.scope_id,
    )


def _override_notes(environ: Mapping[str, str]) -> list[str]:
    """Notes for the environment variables that override what setup wrote."""
    return [
        f"{name} is set and overrides {what} from the file at run time"
        for name, what in (
            (ENV_RELAY_URL, "relay.url"),
            (ENV_API_KEY, "relay.api_key"),
            (ENV_RELAY_ENABLED, "relay.enabled"),
        )
        if environ.get(name, "").strip()
    ]


def _confirm_new_key(home: Path, args: argparse.Namespace) -> None:
    """Ask before ``--new-key`` replaces a configured key (``--yes`` skips the question).

    Raises :class:`CommandError` (usage) when there is no terminal to ask on, or when the
    answer is not yes.
    """
    if args.yes:
        return
    current = read_settings(home)
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


def _api_key_from(args: argparse.Namespace) -> str | None:
    api_key: str | None = args.api_key
    if api_key == "-":
        # Read from stdin so the key stays out of the shell history and the process list;
        # on a terminal, without echo.
        if sys.stdin.isatty():
            return getpass.getpass("API key: ").strip()
        return sys.stdin.readline().strip()
    return api_key


def _how(result: SetupResult) -> str:
    """How the key came to be, as the setup summary says it."""
    key_id, scope_id = one_line(str(result.key_id)), one_line(str(result.scope_id))
    return {
        "registered": f"registered: new key {key_id} in scope {scope_id}",
        "rotated": f"rotated: new key {key_id}; the old key no longer works",
        "renewed": f"registered a new key {key_id} in a new scope {scope_id}; the old key is "
        "no longer used here",
        "given": "stored the key given"
        + (", the relay accepts it" if result.key_check == KEY_VALID else ""),
        "kept": "kept the key already configured",
    }[result.key_action]


def setup_command(args: argparse.Namespace) -> int:
    """``repowire setup --relay [...]``."""
    api_key = _api_key_from(args)
    home = repowire_home()
    relay_url = relay_url_flag(args.relay_url)
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
    print(f"Relay access enabled in {result.config_path}")
    print(f"  url:      {result.relay_url}")
    print(f"  api key:  {result.masked_key} ({_how(result)})")
    if result.ca_file is not None:
        print(f"  ca file:  {result.ca_file}")
    print("Start or restart the daemon to use it: repowire serve")
    for note in result.notes:
        print(f"note: {note}")
    return EXIT_OK
