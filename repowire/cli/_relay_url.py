"""The relay URL as ``setup`` and ``serve`` take it: the flag, and the note naming the hosted
relay."""

from __future__ import annotations

import sys

from repowire.config import DEFAULT_RELAY_URL, normalize_relay_url


def hosted_relay_note(url: str = DEFAULT_RELAY_URL) -> str:
    """What is said (once) when no relay URL is configured and the hosted relay is used."""
    return (
        f"no relay URL configured: using the hosted relay {url} "
        "(self-hosting? pass --relay-url ws://HOST:PORT)"
    )


def relay_url_flag(given: str | None) -> str | None:
    """``--relay-url`` normalised; says on stderr when ``http(s)://`` was taken as ``ws(s)://``."""
    if given is None:
        return None
    url, note = normalize_relay_url(given)
    if note is not None:
        print(f"note: {note} (a daemon's link to the relay is a WebSocket)", file=sys.stderr)
    return url
