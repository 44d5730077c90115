"""The entry point: parse, run the command's handler, turn every failure into one line on
stderr and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from repowire.config import ConfigError

from ._errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    print_error,
)
from ._parser import UsageError, build_parser, chosen_parser

#: Environment variable that makes an unexpected error print its traceback.
ENV_DEBUG = "REPOWIRE_DEBUG"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see :mod:`repowire.cli`)."""
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            # argparse reports leftovers from the top parser ("repowire: error"); the
            # subcommand's own prog says which command did not know them.
            chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extras)}")
    except UsageError as exc:
        print_error(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:
        # --help and --version print and exit 0.
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print_error(f"repowire: configuration error: {exc}")
        return EXIT_CONFIG
    except CommandError as exc:
        message = str(exc)
        print_error(message if message.startswith("repowire") else f"repowire: error: {message}")
        return exc.exit_code
    except KeyboardInterrupt:
        print_error("repowire: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`repowire relay keys list | head`): nothing left to say.
        with contextlib.suppress(OSError):
            # So that the interpreter's final flush of stdout cannot fail again.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_FAILED
    except Exception as exc:
        if os.environ.get(ENV_DEBUG):
            traceback.print_exc()
        print_error(f"repowire: unexpected error: {_describe_unexpected(exc)}")
        return EXIT_FAILED


def _describe_unexpected(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe_unexpected(inner) for inner in exc.exceptions)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
