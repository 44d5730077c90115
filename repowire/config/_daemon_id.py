"""The daemon id as the config file holds it: checked, and generated on first use."""

from __future__ import annotations

import re
import secrets
import socket

from common import MAX_DAEMON_ID_LENGTH, is_daemon_id

from ._errors import ConfigError

#: Longest hostname-derived part of a generated daemon id (the random suffix adds 7 characters).
DAEMON_ID_HOST_PART_MAX = 40
#: Random bytes in a generated daemon id's suffix (shown as hex).
DAEMON_ID_RANDOM_BYTES = 3


def check_daemon_id(daemon_id: str, source: str) -> None:
    """Raise :class:`ConfigError` naming ``source`` unless ``daemon_id`` is a valid daemon id."""
    if not is_daemon_id(daemon_id):
        raise ConfigError(
            f"{source}: daemon id {daemon_id!r} must be 1-{MAX_DAEMON_ID_LENGTH} characters of "
            "A-Z a-z 0-9 . _ -"
        )


def make_daemon_id(hostname: str, suffix: str) -> str:
    """A daemon id from a hostname and a suffix: ``My_Laptop.local`` -> ``my-laptop-<suffix>``.

    The hostname is lowercased, every run of characters outside ``[a-z0-9]`` becomes one ``-``,
    and it is cut to :data:`DAEMON_ID_HOST_PART_MAX` characters (``daemon`` when nothing is
    left). ``suffix`` must itself be ``[a-z0-9]+``.
    """
    host_part = re.sub(r"[^a-z0-9]+", "-", hostname.lower()).strip("-")
    host_part = host_part[:DAEMON_ID_HOST_PART_MAX].rstrip("-") or "daemon"
    return f"{host_part}-{suffix}"


def generate_daemon_id() -> str:
    """A fresh daemon id: this machine's hostname, sanitised, plus 6 random hex digits."""
    return make_daemon_id(socket.gethostname(), secrets.token_hex(DAEMON_ID_RANDOM_BYTES))
