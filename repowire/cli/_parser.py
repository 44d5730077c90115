"""The ``repowire`` argument parser: one small function per command.

Each command's parser sets ``handler``: the function that runs it, given the parsed
arguments, returning the exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from common import package_version
from repowire._logging import LOG_FORMATS
from repowire.config import DEFAULT_RELAY_URL

from . import _argtypes as types
from ._completion import completion_script
from ._errors import EXIT_OK
from ._login_link import login_link_command
from ._relay_keys import (
    keys_create_command,
    keys_list_command,
    keys_revoke_command,
    keys_rotate_command,
)
from ._relay_migrate import migrate_store_command
from ._relay_start import DEFAULT_METRICS_LISTEN, relay_start_command
from ._relay_store import ENV_REDIS_URL
from ._serve_command import serve_command
from ._setup import setup_command
from ._status import status_command

EXIT_CODES_HELP = """\
exit codes:
  0    success; status: relay connected, or relay access disabled
  1    the command failed; status: relay connecting or down
  2    status: the daemon is not running
  3    configuration error (config file or environment variable)
  4    serve: a daemon from this home is already running
  64   usage error (unknown command or flag, bad value)
  130  interrupted by Ctrl-C (serve and relay start: Ctrl-C is how they stop, exit 0)
"""


class UsageError(Exception):
    """The command line cannot be parsed; ``str(error)`` is the one-line message."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (and an exception, not an exit)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


#: A subcommand list: what ``add_subparsers`` returns.
_Commands: TypeAlias = "argparse._SubParsersAction[_Parser]"


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


#: Keyword arguments every parser of the tree is made with.
_COMMON: dict[str, Any] = {
    "allow_abbrev": False,
    "formatter_class": _HelpFormatter,
    "epilog": EXIT_CODES_HELP,
}


def build_parser() -> argparse.ArgumentParser:
    """The full ``repowire`` argument parser (its errors raise instead of exiting)."""
    parser = _Parser(
        prog="repowire",
        description="Repowire: a local daemon for coding agents, reachable through a relay.",
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
        epilog=EXIT_CODES_HELP
        + "\nconfig file: $REPOWIRE_HOME/config.yaml (default ~/.repowire/config.yaml)"
        + '\nshell completion: eval "$(repowire completion bash)" (or zsh, fish)',
    )
    parser.add_argument(
        "-V", "--version", action="version", version=f"repowire {package_version()}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_setup(commands)
    _add_status(commands)
    _add_serve(commands)
    _add_relay(commands)
    _add_completion(commands)
    return parser


def chosen_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The (sub)command parser ``args`` were parsed by: ``repowire relay keys list``'s for
    ``relay keys list ...``, so that its errors name it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if isinstance(chosen, str) and chosen in action.choices:
                return chosen_parser(action.choices[chosen], args)
    return parser


# --------------------------------------------------------------------------------------------
# setup, status, serve


def _add_setup(commands: _Commands) -> None:
    setup = commands.add_parser(
        "setup",
        help="configure relay access in the config file",
        description="Enable relay access in the config file and make sure it holds an API key "
        "(registering with the relay when there is none). Comments and other keys are kept.",
        **_COMMON,
    )
    setup.add_argument(
        "--relay", action="store_true", required=True, help="set up relay access (required)"
    )
    setup.add_argument(
        "--relay-url",
        type=types.relay_url_arg,
        metavar="URL",
        help="relay URL: ws(s)://HOST[:PORT], its root or /ws/relay; http(s):// is taken as "
        f"ws(s):// (default: the file's, else the hosted relay {DEFAULT_RELAY_URL})",
    )
    key_choice = setup.add_mutually_exclusive_group()
    key_choice.add_argument(
        "--api-key",
        type=types.api_key_arg,
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
        type=types.existing_file_arg,
        metavar="FILE",
        help="PEM file of a certificate authority to trust (for a self-signed relay; "
        "default: system trust)",
    )
    setup.set_defaults(handler=setup_command)


def _add_status(commands: _Commands) -> None:
    status = commands.add_parser(
        "status",
        help="show relay configuration and the daemon's live relay state",
        description="Show the relay configuration and the running daemon's relay link state "
        "(connected, connecting, down or disabled).\n\nThe daemon asked is the one given by "
        "--host/--port, else the one this home's 'repowire serve' is running\n(recorded in "
        "$REPOWIRE_HOME/daemon.json), else the configured address.",
        **_COMMON,
    )
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument(
        "--host",
        metavar="H",
        help="the daemon's address (default: the running daemon of this home, else as configured)",
    )
    status.add_argument(
        "--port",
        type=types.port_arg,
        metavar="P",
        help="the daemon's port (default: the running daemon of this home, else as configured)",
    )
    status.set_defaults(handler=status_command)


def _add_logging_options(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group("logging")
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


def _add_serve(commands: _Commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the local daemon (with the relay connector when enabled)",
        description="Run the local daemon in the foreground; Ctrl-C stops it. With relay "
        "access enabled and no API key configured, one is obtained from the relay first.\n\n"
        "One daemon per home: while it runs it is recorded in $REPOWIRE_HOME/daemon.json\n"
        "(pid, address, daemon id; no secret), and a second 'serve' in the same home is "
        "refused (exit code 4).",
        **_COMMON,
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
        type=types.port_arg,
        metavar="P",
        help="listen port (default: REPOWIRE_DAEMON_PORT, else daemon.port, else 8377)",
    )
    serve.add_argument(
        "--relay-url",
        type=types.relay_url_arg,
        metavar="URL",
        help="relay URL, as for setup (default: REPOWIRE_RELAY_URL, else relay.url, else the "
        f"hosted relay {DEFAULT_RELAY_URL})",
    )
    serve.add_argument(
        "--daemon-id",
        type=types.daemon_id_arg,
        metavar="ID",
        help="id announced to the relay (default: daemon.id, generated on first use)",
    )
    _add_logging_options(serve)
    serve.set_defaults(handler=serve_command)


# --------------------------------------------------------------------------------------------
# relay start, login-link, keys


def _add_relay(commands: _Commands) -> None:
    relay = commands.add_parser(
        "relay",
        help="run a self-hosted relay, manage its keys, sign a phone in",
        description="Run a self-hosted relay, manage the API keys in its key store, and get "
        "a one-time sign-in link (with a QR code) for a browser or a phone.",
        **_COMMON,
    )
    relay_commands = relay.add_subparsers(dest="relay_command", metavar="COMMAND", required=True)
    _add_relay_start(relay_commands)
    _add_login_link(relay_commands)
    _add_keys(relay_commands)
    _add_migrate_store(relay_commands)


def _add_relay_start(commands: _Commands) -> None:
    start = commands.add_parser(
        "start",
        help="start a relay server",
        description="Start a relay: auth form, dashboard, daemon endpoint and tunnel.",
        **_COMMON,
    )
    _add_relay_site_options(start)
    _add_relay_network_options(start)
    _add_logging_options(start)
    _add_relay_quota_options(start)
    _add_relay_cluster_options(start)
    start.set_defaults(handler=relay_start_command)


def _add_relay_site_options(start: argparse.ArgumentParser) -> None:
    """Where the relay listens, what it serves, and who may register."""
    start.add_argument("--host", default="127.0.0.1", metavar="H", help="listen address")
    start.add_argument(
        "--port",
        type=types.listen_port_arg,
        default=8000,
        metavar="P",
        help="listen port (0: any free port, printed at start)",
    )
    start.add_argument(
        "--data-dir",
        type=types.directory_arg,
        metavar="DIR",
        help="key store directory (default $REPOWIRE_HOME/relay)",
    )
    start.add_argument(
        "--dashboard-dir",
        type=types.existing_directory_arg,
        metavar="DIR",
        help="serve this dashboard export instead of the bundled one (default: the bundled one)",
    )
    start.add_argument(
        "--public-url",
        type=types.public_url_arg,
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


def _add_relay_network_options(start: argparse.ArgumentParser) -> None:
    """TLS, request limits, proxies and the metrics listener."""
    start.add_argument(
        "--certfile",
        type=types.existing_file_arg,
        metavar="F",
        help="TLS certificate chain (PEM), with --keyfile (default: plain HTTP)",
    )
    start.add_argument(
        "--keyfile",
        type=types.existing_file_arg,
        metavar="F",
        help="TLS private key (PEM), with --certfile (default: plain HTTP)",
    )
    start.add_argument(
        "--max-body-size",
        type=types.byte_size_arg,
        metavar="BYTES",
        help="largest request body (default 268435456, 256 MiB)",
    )
    start.add_argument(
        "--body-timeout",
        type=types.seconds_arg,
        metavar="SECONDS",
        help="how long to wait for the next piece of a request body before answering 408 "
        "(default 60)",
    )
    start.add_argument(
        "--trusted-proxy",
        type=types.address_arg,
        action="append",
        metavar="ADDR",
        help="a reverse proxy whose X-Forwarded-For is believed (repeatable; default: none)",
    )
    start.add_argument(
        "--metrics-listen",
        type=types.metrics_listen_arg,
        default=DEFAULT_METRICS_LISTEN,
        metavar="HOST:PORT",
        help="where /metrics is served, apart from the public listener; 'off' to not serve it "
        f"(default {DEFAULT_METRICS_LISTEN})",
    )


def _add_relay_quota_options(start: argparse.ArgumentParser) -> None:
    quotas = start.add_argument_group(
        "per-scope quotas", "what one key's scope may take of the relay at once"
    )
    quotas.add_argument(
        "--max-links-per-scope",
        type=types.positive_int_arg,
        metavar="N",
        help="daemon links connected at once (default 16)",
    )
    quotas.add_argument(
        "--max-streams-per-scope",
        type=types.positive_int_arg,
        metavar="N",
        help="streams open at once over all the scope's links (default 512)",
    )
    quotas.add_argument(
        "--max-scope-buffer",
        type=types.byte_size_arg,
        metavar="BYTES",
        help=(
            "bytes the relay may hold for the scope; a WebSocket is charged 17 times the "
            "WebSocket message limit + 256 KiB (default 201326592, 192 MiB)"
        ),
    )
    quotas.add_argument(
        "--max-scope-window-growth",
        type=types.byte_count_arg,
        metavar="BYTES",
        help=(
            "bytes of window growth the scope's bulk streams may hold on top of that "
            "(each grows from 256 KiB to 1 MiB); 0 turns growth off (default 67108864, 64 MiB)"
        ),
    )
    quotas.add_argument(
        "--stream-open-timeout",
        type=types.seconds_arg,
        metavar="SECONDS",
        help="how long a request waits for a free stream slot before 503 (default 5)",
    )
    quotas.add_argument(
        "--max-websocket-message",
        type=types.byte_size_arg,
        metavar="BYTES",
        help="largest tunneled WebSocket message, either way (default 1048576, 1 MiB)",
    )


def _add_redis_options(command: argparse._ActionsContainer, *, what: str) -> None:
    """Where a relay's key store is when it is in Redis; ``what`` the URL's help."""
    command.add_argument(
        "--redis-url",
        type=types.redis_url_arg,
        metavar="URL",
        help=f"{what} (redis://, rediss:// or unix://) instead of SQLite (default: "
        f"{ENV_REDIS_URL}, which keeps a password out of the process list, else SQLite in "
        "the data directory)",
    )
    command.add_argument(
        "--redis-namespace",
        type=types.redis_namespace_arg,
        metavar="PREFIX",
        help="prefix of the relay's Redis keys, so several relays can share one Redis "
        "(default repowire:)",
    )


def _add_relay_cluster_options(start: argparse.ArgumentParser) -> None:
    cluster = start.add_argument_group(
        "cluster",
        "replicas of one relay behind a load balancer, sharing a Redis; one replica needs "
        "only --redis-url, several need --redis-url, --advertise-url and --cluster-secret-file",
    )
    _add_redis_options(
        cluster,
        what="keep keys, sessions, sign-in links and rate limits in this Redis, shared by "
        "every replica of a cluster,",
    )
    cluster.add_argument(
        "--replica-id",
        type=types.replica_id_arg,
        metavar="ID",
        help="this replica's name in the cluster (default: the host name and a short random "
        "suffix)",
    )
    cluster.add_argument(
        "--advertise-url",
        type=types.advertise_url_arg,
        metavar="URL",
        help="http(s)://HOST:PORT where the other replicas reach this one (default: none, "
        "a single replica)",
    )
    cluster.add_argument(
        "--cluster-secret-file",
        type=Path,
        metavar="FILE",
        help="file holding the secret the replicas share (32 bytes or more, mode 600; read "
        "at startup, never logged; default: none, a single replica)",
    )
    cluster.add_argument(
        "--store-outage-grace",
        type=types.seconds_or_zero_arg,
        metavar="SECONDS",
        help="how long a browser session this replica has seen stays usable while Redis is "
        "unreachable (default 60)",
    )


def _add_login_link(commands: _Commands) -> None:
    login_link = commands.add_parser(
        "login-link",
        help="print a one-time sign-in link for a browser or phone, as text and a QR code",
        description="Ask the relay (with this daemon's API key, which is never printed) for a "
        "one-time, short-lived sign-in link to this daemon's dashboard, and print it as a QR "
        "code and as text. The link works once and expires within minutes; revoking the key "
        "revokes it.",
        **_COMMON,
    )
    login_link.add_argument(
        "--json", action="store_true", help="print one JSON document (url, expires_at, ...)"
    )
    login_link.add_argument("--no-qr", action="store_true", help="print the link as text only")
    login_link.set_defaults(handler=login_link_command)


def _add_keys(commands: _Commands) -> None:
    keys = commands.add_parser(
        "keys",
        help="manage API keys in the relay's key store",
        description="Create, list, revoke and rotate API keys in the relay's key store: a "
        "SQLite file in the relay's data directory (run them on the relay's machine), or, "
        "with --redis-url, the Redis a relay cluster shares. A running relay applies a "
        "revocation or rotation within a second.",
        **_COMMON,
    )
    key_commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    _add_keys_create(key_commands)
    _add_keys_list(key_commands)
    _add_keys_revoke(key_commands)
    _add_keys_rotate(key_commands)


def _add_data_dir_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--data-dir",
        type=types.directory_arg,
        metavar="DIR",
        help="the relay's data directory, holding relay.sqlite3 (default $REPOWIRE_HOME/relay)",
    )
    _add_redis_options(command, what="the keys of a relay that keeps them in this Redis")


def _add_keys_create(commands: _Commands) -> None:
    create = commands.add_parser(
        "create",
        help="create a key (in a new scope, or in --scope) and print it once",
        description="Create an API key and print it. This is the only time it is shown.",
        **_COMMON,
    )
    create.add_argument(
        "--label",
        type=types.label_arg,
        default="",
        help="a name for the key, shown by list (default: none)",
    )
    create.add_argument(
        "--scope",
        metavar="SCOPE_ID",
        help="add the key to this existing scope, as shown by list (default: a new scope)",
    )
    _add_data_dir_option(create)
    create.set_defaults(handler=keys_create_command)


def _add_keys_list(commands: _Commands) -> None:
    listing = commands.add_parser(
        "list",
        help="list keys (never the keys themselves)",
        description="List the keys' ids, scopes, labels and dates. Keys are never shown.",
        **_COMMON,
    )
    listing.add_argument(
        "--scope", metavar="SCOPE_ID", help="only this scope's keys (default: every scope)"
    )
    listing.add_argument("--json", action="store_true", help="print one JSON document")
    _add_data_dir_option(listing)
    listing.set_defaults(handler=keys_list_command)


def _add_keys_revoke(commands: _Commands) -> None:
    revoke = commands.add_parser(
        "revoke",
        help="revoke a key and end its browser sessions",
        description="Revoke a key by its id; daemons and browsers using it are refused, "
        "and its unused sign-in links stop working.",
        **_COMMON,
    )
    revoke.add_argument(
        "key_id",
        type=types.key_id_arg,
        metavar="KEY_ID",
        help="the key's id (key_...), as shown by list; never the key itself",
    )
    _add_data_dir_option(revoke)
    revoke.set_defaults(handler=keys_revoke_command)


def _add_keys_rotate(commands: _Commands) -> None:
    rotate = commands.add_parser(
        "rotate",
        help="replace a key with a new one in the same scope and print it once",
        description="Replace a key by its id: a new key, with the same scope and label, is "
        "printed (the only time it is shown); the old key, its browser sessions and its "
        "daemon links end.",
        **_COMMON,
    )
    rotate.add_argument(
        "key_id",
        type=types.key_id_arg,
        metavar="KEY_ID",
        help="the key's id (key_...), as shown by list; never the key itself",
    )
    _add_data_dir_option(rotate)
    rotate.set_defaults(handler=keys_rotate_command)


def _add_migrate_store(commands: _Commands) -> None:
    migrate = commands.add_parser(
        "migrate-store",
        help="copy the relay's SQLite key store into Redis, for a cluster",
        description="Copy every scope, key (its hash: keys are never stored), live browser "
        "session and daemon record from the relay's SQLite key store into Redis. Safe to run "
        "again: records Redis holds already are left alone, and a different record with the "
        "same id is never overwritten (nothing is copied then). The SQLite file is only read.",
        **_COMMON,
    )
    migrate.add_argument(
        "--to",
        dest="redis_url",
        type=types.redis_url_arg,
        required=True,
        metavar="URL",
        help="the Redis to copy into: redis://, rediss:// or unix:// (required)",
    )
    migrate.add_argument(
        "--redis-namespace",
        type=types.redis_namespace_arg,
        metavar="PREFIX",
        help="prefix of the relay's Redis keys, as the relays will use it (default repowire:)",
    )
    migrate.add_argument(
        "--data-dir",
        type=types.directory_arg,
        metavar="DIR",
        help="the relay's data directory, holding relay.sqlite3 (default $REPOWIRE_HOME/relay)",
    )
    migrate.set_defaults(handler=migrate_store_command)


# --------------------------------------------------------------------------------------------
# completion


def _add_completion(commands: _Commands) -> None:
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        description="Print a completion script for the shell, made from this command line's "
        'own parser. Load it with: eval "$(repowire completion bash)" (zsh likewise), or '
        "repowire completion fish | source.",
        **_COMMON,
    )
    completion.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell")
    completion.set_defaults(handler=_completion_command)


def _completion_command(args: argparse.Namespace) -> int:
    """``repowire completion bash|zsh|fish``: the script is made from this very parser."""
    sys.stdout.write(completion_script(args.shell, build_parser()))
    return EXIT_OK
