"""``repowire relay login-link``: a one-time sign-in link for a browser or a phone."""

from __future__ import annotations

import argparse
import io
import json
import sys

from repowire._runtime import RuntimeState, read_runtime
from repowire.config import read_settings, repowire_home

from ._errors import EXIT_OK, CommandError
from ._relay_api import LoginLink, request_login_link
from ._times import local_time


def render_qr(text: str) -> str:
    """``text`` as a QR code of Unicode half blocks (two modules a character), light modules
    drawn, for a terminal's dark background; with the standard 4-module quiet zone."""
    import segno

    out = io.StringIO()
    segno.make(text).terminal(out=out, compact=True)
    return out.getvalue()


def login_link_command(args: argparse.Namespace) -> int:
    """``repowire relay login-link [--json] [--no-qr]``: asks the relay with this daemon's key,
    which is never printed."""
    home = repowire_home()
    settings = read_settings(home)
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
        print(json.dumps(_link_document(link), indent=2))
    else:
        _print_link(link, qr=not args.no_qr)
    return EXIT_OK


def _link_document(link: LoginLink) -> dict[str, object]:
    return {
        "url": link.url,
        "expires_at": link.expires_at,
        "expires_in": link.expires_in,
        "daemon_id": link.daemon_id,
    }


def _print_link(link: LoginLink, *, qr: bool) -> None:
    minutes = max(1, round(link.expires_in / 60))
    whom = f" to daemon {link.daemon_id}'s dashboard" if link.daemon_id else ""
    print(
        f"One-time sign-in link{whom}: works once, expires in {minutes} min "
        f"(at {local_time(link.expires_at)}). Scan it with a phone, or open it:"
    )
    if qr:
        sys.stdout.write(render_qr(link.url))
    print(link.url)
