"""Daemon ids: the name a daemon goes by on the relay, in mesh metadata and in the config file."""

from __future__ import annotations

import re
from typing import Final

#: Longest daemon id accepted anywhere.
MAX_DAEMON_ID_LENGTH: Final = 64

#: What a daemon id may hold: 1 to 64 characters of ``A-Z a-z 0-9 . _ -``. Use ``fullmatch``.
DAEMON_ID_PATTERN: Final = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_DAEMON_ID_LENGTH}}}")


def is_daemon_id(text: object) -> bool:
    """Whether ``text`` is a valid daemon id. Never raises, whatever ``text`` is."""
    return isinstance(text, str) and DAEMON_ID_PATTERN.fullmatch(text) is not None
