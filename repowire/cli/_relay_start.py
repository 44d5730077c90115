"""``repowire relay start``: a self-hosted relay in the foreground."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import Any

from repowire.config import repowire_home

from ._errors import EXIT_OK, EXIT_USAGE, CommandError, needs, one_line
from ._foreground import run_trio, setup_command_logging
from ._relay_store import redis_url_of

#: Where ``relay start`` serves ``/metrics`` unless told otherwise: loopback only, apart from
#: the public listener (the figures cover every tenant).
DEFAULT_METRICS_LISTEN = "127.0.0.1:9108"


def relay_settings_kwargs(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    """Keyword arguments for :class:`relay.RelaySettings` from ``relay start``'s flags.

    Always given: host, port, data_dir (default ``<home>/relay``), registration,
    metrics_listen (``None`` for ``off``) and dashboard_dir (``--dashboard-dir``, else the
    dashboard bundled with repowire: the relay has no dashboard of its own). The other ones
    (public_url, certfile, keyfile, max_body_size, body_timeout, trusted_proxies, the quotas,
    the cluster's: redis_url from ``--redis-url`` or ``REPOWIRE_REDIS_URL``, redis_namespace,
    replica_id, advertise_url, cluster_secret read from ``--cluster-secret-file``,
    store_outage_grace) only when a flag gave them, so the relay's own defaults apply
    otherwise.

    Raises :class:`CommandError` when the bundled dashboard is missing (a broken installation),
    or the cluster secret file cannot be used (one line, never its content), or
    ``--redis-namespace`` comes without a Redis URL (a usage error).
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
        "max_scope_window_growth": args.max_scope_window_growth,
        "stream_open_timeout": args.stream_open_timeout,
        "max_websocket_message_size": args.max_websocket_message,
    }
    kwargs.update({name: value for name, value in optional.items() if value is not None})
    kwargs.update(_cluster_kwargs(args))
    return kwargs


def _cluster_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    redis_url = redis_url_of(args)
    problem = None
    if (args.advertise_url is None) != (args.cluster_secret_file is None):
        problem = "--advertise-url and --cluster-secret-file go together"
    elif redis_url is None and args.advertise_url is not None:
        problem = "a cluster (--advertise-url, --cluster-secret-file) needs --redis-url"
    elif redis_url is None and args.redis_namespace is not None:
        problem = "--redis-namespace needs --redis-url"
    if problem is not None:
        raise CommandError(
            f"repowire relay start: error: {problem} (see 'repowire relay start --help')",
            exit_code=EXIT_USAGE,
        )
    cluster: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_namespace": args.redis_namespace,
        "replica_id": args.replica_id,
        "advertise_url": args.advertise_url,
        "store_outage_grace": args.store_outage_grace,
    }
    if args.cluster_secret_file is not None:
        with needs("the relay server"):
            from relay import read_cluster_secret
        try:
            cluster["cluster_secret"] = read_cluster_secret(args.cluster_secret_file)
        except ValueError as exc:
            raise CommandError(f"cannot start the relay: {one_line(str(exc))}") from None
    return {name: value for name, value in cluster.items() if value is not None}


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
