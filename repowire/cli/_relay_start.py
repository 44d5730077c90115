"""``repowire relay start``: a self-hosted relay in the foreground."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import Any

from repowire.config import repowire_home

from ._errors import EXIT_OK, EXIT_USAGE, CommandError, needs, one_line
from ._foreground import run_trio, setup_command_logging

#: Where ``relay start`` serves ``/metrics`` unless told otherwise: loopback only, apart from
#: the public listener (the figures cover every tenant).
DEFAULT_METRICS_LISTEN = "127.0.0.1:9108"


def relay_settings_kwargs(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    """Keyword arguments for :class:`relay.RelaySettings` from ``relay start``'s flags.

    Always given: host, port, data_dir (default ``<home>/relay``), registration,
    metrics_listen (``None`` for ``off``) and dashboard_dir (``--dashboard-dir``, else the
    dashboard bundled with repowire: the relay has no dashboard of its own). The other ones
    (public_url, certfile, keyfile, max_body_size, body_timeout, trusted_proxies, the quotas)
    only when a flag gave them, so the relay's own defaults apply otherwise.

    Raises :class:`CommandError` when the bundled dashboard is missing (a broken installation).
    """
    kwargs: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "data_dir": args.data_dir if args.data_dir is not None else home / "relay",
        "registration": args.registration,
        # "off" turns the metrics listener off (None to the relay).
        "metrics_listen": None if args.metrics_listen == "off" else args.metrics_listen,
        "dashboard_dir": (
            args.dashboard_dir if args.dashboard_dir is not None else _bundled_dashboard()
        ),
    }
    optional = {
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
    kwargs.update({name: value for name, value in optional.items() if value is not None})
    return kwargs


def _bundled_dashboard() -> Path:
    from repowire.dashboard import static_dir

    try:
        return static_dir()
    except FileNotFoundError as exc:
        raise CommandError(f"cannot start the relay: {one_line(str(exc))}") from None


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


def relay_start_command(args: argparse.Namespace) -> int:
    """``repowire relay start [...]``: runs until Ctrl-C or SIGTERM."""
    if (args.certfile is None) != (args.keyfile is None):
        raise CommandError(
            "repowire relay start: error: --certfile and --keyfile go together "
            "(see 'repowire relay start --help')",
            exit_code=EXIT_USAGE,
        )
    # Imported here: the relay server (hypercorn, Quart) is not needed by any other command.
    with needs("the relay server"):
        from relay import RelaySettings, serve_relay_main
    try:
        settings = RelaySettings(**relay_settings_kwargs(args, repowire_home()))
    except (TypeError, ValueError) as exc:
        raise CommandError(f"cannot start the relay: {one_line(str(exc))}") from None
    setup_command_logging(args)
    try:
        run_trio(serve_relay_main, settings)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        raise _relay_start_error(exc) from None
    return EXIT_OK
