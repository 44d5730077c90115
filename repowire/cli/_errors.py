"""How a command fails: the exit codes, :class:`CommandError`, and one-line error messages."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from repowire.config import redact_secrets

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_DAEMON_NOT_RUNNING = 2
EXIT_CONFIG = 3
EXIT_ALREADY_RUNNING = 4
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130

#: Longest piece of a server's error text repeated in a message.
MAX_DETAIL_CHARS = 200


class CommandError(Exception):
    """A command cannot complete. ``str(error)`` is one line; ``exit_code`` is what to exit with."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` on one line, secrets masked, cut to ``limit`` characters (an ellipsis ends a
    cut)."""
    flat = " ".join(redact_secrets(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def answer_detail(answer: Mapping[str, Any]) -> str:
    """The ``error`` and ``detail`` of a JSON error answer, as one short line."""
    parts = [str(answer[name]) for name in ("error", "detail") if answer.get(name)]
    return one_line(": ".join(parts)) if parts else "no reason given"


def print_error(message: str) -> None:
    """Print ``message`` to stderr as one line (secrets masked)."""
    print(one_line(message, limit=1000), file=sys.stderr)


@contextlib.contextmanager
def needs(what: str) -> Iterator[None]:
    """Turn an ImportError inside the block into a :class:`CommandError` saying that ``what``
    is not available in this installation."""
    try:
        yield
    except ImportError as exc:
        raise CommandError(f"{what} is not available in this installation ({exc})") from None
