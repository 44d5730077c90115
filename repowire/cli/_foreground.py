"""What the long-running commands (``serve``, ``relay start``) share: logging set from their
flags, the allocator settings, and running under trio with Ctrl-C surfacing as
KeyboardInterrupt."""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from repowire._allocator import tune_allocator
from repowire._logging import log_level, setup_logging

_T = TypeVar("_T")


def setup_command_logging(args: argparse.Namespace) -> None:
    """Logging for a long-running command from its -v/-q/--log-format flags."""
    setup_logging(
        level=log_level(verbose=args.verbose, quiet=args.quiet, environ=os.environ),
        log_format=args.log_format,
    )


def run_trio(function: Callable[[_T], Awaitable[object]], argument: _T) -> None:
    """``trio.run(function, argument)``, with a Ctrl-C wrapped in exception groups unwrapped,
    after :func:`repowire._allocator.tune_allocator` (the process moves large buffers)."""
    # Imported here: the short commands (status, setup) never start an event loop.
    import trio

    tune_allocator()

    try:
        trio.run(function, argument)
    except BaseExceptionGroup as group:
        interrupt, rest = group.split(KeyboardInterrupt)
        if interrupt is not None and rest is None:
            raise KeyboardInterrupt from None
        raise
