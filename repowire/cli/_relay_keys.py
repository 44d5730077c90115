"""``repowire relay keys create|list|revoke|rotate``: the API keys in a relay's key store.

The store is the relay's SQLite file (run them on the relay's machine), or with
``--redis-url`` the Redis a relay cluster shares. A running relay applies a revocation or a
rotation made here within a second (it watches the store's changes).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from ._errors import EXIT_OK, CommandError, one_line
from ._relay_store import opened_store, run, where
from ._times import local_time

if TYPE_CHECKING:
    from relay import KeyRecord

__all__ = [
    "keys_create_command",
    "keys_list_command",
    "keys_revoke_command",
    "keys_rotate_command",
]


def keys_create_command(args: argparse.Namespace) -> int:
    """``repowire relay keys create [--label L] [--scope S]``: prints the new key once."""

    async def create(args: argparse.Namespace) -> tuple[KeyRecord, str, str]:
        async with opened_store(args, create=True) as store:
            now = time.time()
            if args.scope is None:
                record, key = await store.create_scope(label=args.label, now=now)
                return record, key, f"in a new scope {record.scope_id}"
            record, key = await store.create_key(args.scope, label=args.label, now=now)
            return record, key, f"in scope {record.scope_id}"

    record, key, scope = run(create, args)
    print(f"Created key {record.key_id} {scope} ({where(args)})")
    print("API key (shown only now; store it safely):")
    # Printing the key is the purpose of this command; it is the only place a key is shown.
    print(key)
    return EXIT_OK


def keys_list_command(args: argparse.Namespace) -> int:
    """``repowire relay keys list [--scope S] [--json]``: never the keys themselves."""

    async def listing(args: argparse.Namespace) -> list[KeyRecord]:
        async with opened_store(args, create=False) as store:
            return await store.list_keys(args.scope)

    records = run(listing, args)
    if args.json:
        print(json.dumps({"keys": [_key_document(r) for r in records]}, indent=2))
    elif not records:
        print(f"No keys in {where(args)}")
    else:
        _print_table(records)
    return EXIT_OK


def _key_document(record: KeyRecord) -> dict[str, object]:
    return {
        "key_id": record.key_id,
        "scope_id": record.scope_id,
        "label": record.label,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
    }


def _print_table(records: list[KeyRecord]) -> None:
    table = [("KEY ID", "SCOPE ID", "CREATED", "REVOKED", "LABEL")]
    for r in records:
        table.append(
            (
                r.key_id,
                r.scope_id,
                local_time(r.created_at),
                local_time(r.revoked_at),
                one_line(r.label, 60),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[4]
        )


def keys_revoke_command(args: argparse.Namespace) -> int:
    """``repowire relay keys revoke KEY_ID``: ends the key's sessions too."""

    async def revoke(args: argparse.Namespace) -> bool:
        async with opened_store(args, create=False) as store:
            return await store.revoke_key(args.key_id, now=time.time())

    if not run(revoke, args):
        raise CommandError(
            f"no live key {args.key_id} in {where(args)} (unknown or already revoked)"
        )
    print(f"Revoked key {args.key_id}; its browser sessions are ended")
    return EXIT_OK


def keys_rotate_command(args: argparse.Namespace) -> int:
    """``repowire relay keys rotate KEY_ID``: prints the new key once; the old one ends."""

    async def rotate(args: argparse.Namespace) -> tuple[KeyRecord, str] | None:
        from relay import UnknownRecordError

        async with opened_store(args, create=False) as store:
            try:
                return await store.rotate_key(args.key_id, now=time.time())
            except UnknownRecordError:
                return None

    rotated = run(rotate, args)
    if rotated is None:
        raise CommandError(
            f"no live key {args.key_id} in {where(args)} (unknown or already revoked)"
        )
    record, key = rotated
    print(
        f"Rotated key {args.key_id} to {record.key_id} in scope {record.scope_id} "
        f"({where(args)}); the old key and its browser sessions are ended"
    )
    print("API key (shown only now; store it safely):")
    print(key)
    return EXIT_OK
