"""``repowire serve``: the local daemon in the foreground, with the relay connector when
relay access is on (the daemon itself is :mod:`repowire._serve`)."""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Any

import attrs

from common import mask_key
from repowire._runtime import DaemonAlreadyRunning, already_running_message, read_runtime
from repowire.config import Overrides, Settings, load_settings, repowire_home

from ._errors import EXIT_ALREADY_RUNNING, EXIT_OK, CommandError, needs
from ._foreground import run_trio, setup_command_logging
from ._relay_url import hosted_relay_note, relay_url_flag
from ._setup import obtain_api_key
from ._status import daemon_base_url


def serve_command(args: argparse.Namespace) -> int:
    """``repowire serve [--relay | --no-relay] [...]``: runs until Ctrl-C or SIGTERM."""
    home = repowire_home()
    # At once, before the config is touched or a key is registered. serve() checks again,
    # race-free, when it takes the home's lock.
    running = read_runtime(home)
    if running.alive:
        raise CommandError(already_running_message(running), exit_code=EXIT_ALREADY_RUNNING)
    setup_command_logging(args)
    settings = _with_api_key(load_settings(home, _overrides(args)))
    # Imported here: the daemon brings trio, the web app and the connector, which the short
    # commands do not need.
    with needs("the daemon"):
        from repowire._serve import serve
    try:
        run_trio(serve, settings)
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


def _overrides(args: argparse.Namespace) -> Overrides:
    enabled: bool | None = None
    if args.relay:
        enabled = True
    elif args.no_relay:
        enabled = False
    return Overrides(
        relay_enabled=enabled,
        relay_url=relay_url_flag(args.relay_url),
        daemon_host=args.host,
        daemon_port=args.port,
        daemon_id=args.daemon_id,
    )


def _with_api_key(settings: Settings) -> Settings:
    """``settings``, with a key registered and stored first when relay access is on and no key
    is configured. Says (on stderr) when the hosted relay is used for want of a URL."""
    relay = settings.relay
    if relay.enabled and relay.url_is_default:
        print(f"note: {hosted_relay_note(relay.url)}", file=sys.stderr)
    if not relay.enabled or relay.api_key is not None:
        return settings
    try:
        key = obtain_api_key(settings)
    except CommandError as exc:
        raise CommandError(
            f"cannot obtain an API key: {exc} (use --no-relay to serve locally only)"
        ) from None
    print(f"Registered with {relay.url}; API key {mask_key(key)} stored in {settings.config_path}")
    return attrs.evolve(settings, relay=attrs.evolve(relay, api_key=key))


def _serve_error(exc: OSError, settings: Settings) -> CommandError:
    message = f"cannot serve: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        where = daemon_base_url(settings.daemon)
        message += (
            f" ({where} is taken by another program, perhaps a daemon of another home; "
            "choose another port with --port)"
        )
    return CommandError(message)


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
