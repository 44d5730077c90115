"""The ``repowire`` command line.

Commands::

    repowire setup --relay [--relay-url URL] [--api-key KEY | --rotate-key | --new-key [--yes]]
                   [--ca-file F]
    repowire status [--json]
    repowire serve [--relay | --no-relay] [--host H] [--port P] [--relay-url URL] [--daemon-id ID]
                   [-v | -q] [--log-format text|json]
    repowire relay start [--host H] [--port P] [--data-dir DIR] [-v | -q] [--log-format F] ...
    repowire relay login-link [--json] [--no-qr]
    repowire relay keys create|list|revoke|rotate ... [--redis-url URL]
    repowire relay migrate-store --to URL [--data-dir DIR]
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

The parsing (``_parser``) and printing are thin; the work is done by functions that take plain
values and can be tested on their own: :func:`setup_relay`, :func:`obtain_api_key`,
:func:`collect_status`, :func:`status_exit_code`, :func:`relay_settings_kwargs`. One module a
command (``_setup``, ``_status``, ``_serve_command``, ``_relay_start``, ``_relay_keys``,
``_relay_migrate``, ``_login_link``); ``_relay_store`` opens a relay's key store (SQLite or
Redis) for them; ``_relay_api`` talks to a relay over HTTP; ``_errors`` holds the exit codes.
"""

from ._completion import command_tree as command_tree
from ._completion import completion_script as completion_script
from ._errors import EXIT_ALREADY_RUNNING as EXIT_ALREADY_RUNNING
from ._errors import EXIT_CONFIG as EXIT_CONFIG
from ._errors import EXIT_DAEMON_NOT_RUNNING as EXIT_DAEMON_NOT_RUNNING
from ._errors import EXIT_FAILED as EXIT_FAILED
from ._errors import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from ._errors import EXIT_OK as EXIT_OK
from ._errors import EXIT_USAGE as EXIT_USAGE
from ._errors import MAX_DETAIL_CHARS as MAX_DETAIL_CHARS
from ._errors import CommandError as CommandError
from ._login_link import render_qr as render_qr
from ._main import ENV_DEBUG as ENV_DEBUG
from ._main import main as main
from ._parser import build_parser as build_parser
from ._relay_api import KEY_UNCHECKED as KEY_UNCHECKED
from ._relay_api import KEY_VALID as KEY_VALID
from ._relay_api import RELAY_REQUEST_TIMEOUT as RELAY_REQUEST_TIMEOUT
from ._relay_api import IssuedKey as IssuedKey
from ._relay_api import LoginLink as LoginLink
from ._relay_api import check_key as check_key
from ._relay_api import register_key as register_key
from ._relay_api import request_login_link as request_login_link
from ._relay_api import rotate_key as rotate_key
from ._relay_start import DEFAULT_METRICS_LISTEN as DEFAULT_METRICS_LISTEN
from ._relay_start import relay_settings_kwargs as relay_settings_kwargs
from ._relay_url import hosted_relay_note as hosted_relay_note
from ._setup import SetupResult as SetupResult
from ._setup import obtain_api_key as obtain_api_key
from ._setup import setup_relay as setup_relay
from ._status import DAEMON_REQUEST_TIMEOUT as DAEMON_REQUEST_TIMEOUT
from ._status import RELAY_STATES as RELAY_STATES
from ._status import SOURCE_CONFIG as SOURCE_CONFIG
from ._status import SOURCE_FLAGS as SOURCE_FLAGS
from ._status import SOURCE_RUNTIME_FILE as SOURCE_RUNTIME_FILE
from ._status import DaemonTarget as DaemonTarget
from ._status import StatusReport as StatusReport
from ._status import collect_status as collect_status
from ._status import daemon_base_url as daemon_base_url
from ._status import locate_daemon as locate_daemon
from ._status import render_status as render_status
from ._status import status_dashboard_url as status_dashboard_url
from ._status import status_document as status_document
from ._status import status_exit_code as status_exit_code
from ._status import status_hints as status_hints
from ._times import format_time as format_time
