"""``repowire relay migrate-store --to URL``: copy a relay's SQLite key store into Redis."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from ._errors import EXIT_OK, CommandError, needs, one_line
from ._relay_store import namespace_of, run, store_path

if TYPE_CHECKING:
    from relay import MigrationReport


def migrate_store_command(args: argparse.Namespace) -> int:
    """``repowire relay migrate-store --to URL [--redis-namespace P] [--data-dir D]``:
    prints what was copied. Exit 1, nothing copied, if Redis holds a different record with
    the same id (:class:`relay.MigrationConflict`)."""
    path = store_path(args)
    if not path.exists():
        raise CommandError(f"no key store at {path} (pass the relay's --data-dir)")

    async def migrate(args: argparse.Namespace) -> MigrationReport:
        with needs("the relay key store"):
            from relay import KeyStore, RedisStore, StoreError, migrate_to_redis

        try:
            source = KeyStore.open(path)
        except StoreError as exc:
            raise CommandError(one_line(str(exc))) from None
        with source:
            async with RedisStore.open(args.redis_url, namespace=namespace_of(args)) as target:
                return await migrate_to_redis(source, target, now=time.time())

    report = run(migrate, args)
    into = f"Redis (namespace {namespace_of(args)})"
    if report.copied == 0:
        print(f"Nothing to copy: {into} holds every record of {path} already")
    else:
        print(f"Copied from {path} into {into}:")
    for name, tally in (
        ("scopes", report.scopes),
        ("keys", report.keys),
        ("browser sessions", report.sessions),
        ("daemon records", report.daemons),
    ):
        line = f"  {name}: {tally.copied} copied, {tally.same} already there"
        if tally.skipped:
            line += f", {tally.skipped} left behind (expired, ended or of a revoked key)"
        print(line)
    return EXIT_OK
