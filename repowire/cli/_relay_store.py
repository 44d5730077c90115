"""What the commands on a relay's key store share (``relay keys``, ``relay migrate-store``):
which store, opening it, and running under trio with its failures as one line."""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from repowire.config import repowire_home

from ._errors import EXIT_USAGE, CommandError, needs, one_line

if TYPE_CHECKING:
    from relay import Store

_T = TypeVar("_T")

#: Environment variable read when ``--redis-url`` is not given: a URL holding a password stays
#: out of the process list.
ENV_REDIS_URL = "REPOWIRE_REDIS_URL"
#: File of the SQLite key store in a relay's data directory (as ``relay._server.STORE_FILE``).
STORE_FILE = "relay.sqlite3"


def redis_url_of(args: argparse.Namespace) -> str | None:
    """``--redis-url``, else :data:`ENV_REDIS_URL`, else None (the SQLite store). Raises a
    usage :class:`CommandError` for a variable that is not a Redis URL (never repeated)."""
    given: str | None = getattr(args, "redis_url", None)
    if given is not None:
        return given
    from_env = os.environ.get(ENV_REDIS_URL, "").strip()
    if not from_env:
        return None
    if from_env.split("://", 1)[0] not in ("redis", "rediss", "unix") or "://" not in from_env:
        raise CommandError(
            f"{ENV_REDIS_URL} must be a redis://, rediss:// or unix:// URL (not shown: it may "
            "hold a password)",
            exit_code=EXIT_USAGE,
        )
    return from_env


def store_path(args: argparse.Namespace) -> Path:
    """The SQLite file of ``--data-dir`` (default ``$REPOWIRE_HOME/relay``)."""
    data_dir: Path = args.data_dir if args.data_dir is not None else repowire_home() / "relay"
    return data_dir / STORE_FILE


def namespace_of(args: argparse.Namespace) -> str:
    given: str | None = getattr(args, "redis_namespace", None)
    return given if given is not None else "repowire:"


@asynccontextmanager
async def opened_store(args: argparse.Namespace, *, create: bool) -> AsyncIterator[Store]:
    """The key store the command's flags name, open for the block: Redis (``--redis-url``),
    else the SQLite file of ``--data-dir`` (unless ``create``, it must exist). Store failures
    and bad values inside the block become :class:`CommandError`s (see :func:`run`)."""
    # Imported here: the relay package is not needed by the daemon's own commands.
    with needs("the relay key store"):
        from relay import RedisStore, SqliteStore, StoreError

    url = redis_url_of(args)
    if url is not None:
        try:
            async with RedisStore.open(url, namespace=namespace_of(args)) as redis:
                yield redis
        except ValueError as exc:
            raise CommandError(one_line(str(exc)), exit_code=EXIT_USAGE) from None
        return
    path = store_path(args)
    if not create and not path.exists():
        raise CommandError(
            f"no key store at {path} (start the relay once, or create a key, or pass --data-dir)"
        )
    try:
        sqlite = SqliteStore.open(path)
    except StoreError as exc:
        raise CommandError(one_line(str(exc))) from None
    async with sqlite:
        yield sqlite


def where(args: argparse.Namespace) -> str:
    """The store the flags name, for a message: the SQLite file, or Redis and its namespace
    (never the URL: it may hold a password)."""
    if redis_url_of(args) is not None:
        return f"Redis, namespace {namespace_of(args)}"
    return str(store_path(args))


def run(command: Callable[[argparse.Namespace], Awaitable[_T]], args: argparse.Namespace) -> _T:
    """``trio.run(command, args)``, with what a store raises turned into one-line
    :class:`CommandError`s: StoreError (and StoreUnavailable: Redis unreachable) exit 1,
    ValueError (a bad label, id or URL) exit 64. The Redis client runs a task group, so
    errors may come wrapped in exception groups: they are unwrapped here."""
    import trio

    with needs("the relay key store"):
        from relay import StoreError, StoreUnavailable

    try:
        return trio.run(command, args)
    except BaseException as exc:
        failure = _leaf(exc)
        if isinstance(failure, CommandError):
            raise failure from None
        if isinstance(failure, StoreUnavailable):
            raise CommandError(f"cannot reach the key store: {one_line(str(failure))}") from None
        if isinstance(failure, StoreError):
            raise CommandError(one_line(str(failure))) from None
        if isinstance(failure, ValueError):
            raise CommandError(one_line(str(failure)), exit_code=EXIT_USAGE) from None
        if isinstance(failure, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise


def _leaf(error: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (``error`` itself otherwise)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
