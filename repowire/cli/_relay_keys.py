"""``repowire relay keys create|list|revoke``: the API keys in a relay's key store.

Run on the relay's machine: they open its SQLite file directly.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from repowire.config import repowire_home

from ._errors import EXIT_OK, EXIT_USAGE, CommandError, needs, one_line
from ._times import local_time

if TYPE_CHECKING:
    from relay import KeyRecord, KeyStore

_T = TypeVar("_T")


def _store_path(args: argparse.Namespace) -> Path:
    data_dir: Path = args.data_dir if args.data_dir is not None else repowire_home() / "relay"
    return data_dir / "relay.sqlite3"


@contextmanager
def _opened_store(path: Path, *, create: bool) -> Iterator[KeyStore]:
    """The key store at ``path``, open for the block; :class:`CommandError` for a store error
    (and, unless ``create``, for a missing file)."""
    # Imported here: the relay package is not needed by the daemon's own commands.
    with needs("the relay key store"):
        from relay import KeyStore, StoreError
    if not create and not path.exists():
        raise CommandError(
            f"no key store at {path} (start the relay once, or create a key, or pass --data-dir)"
        )
    try:
        store = KeyStore.open(path)
    except StoreError as exc:
        raise CommandError(one_line(str(exc))) from None
    with store:
        try:
            yield store
        except StoreError as exc:
            raise CommandError(one_line(str(exc))) from None
        except ValueError as exc:
            raise CommandError(one_line(str(exc)), exit_code=EXIT_USAGE) from None


def keys_create_command(args: argparse.Namespace) -> int:
    """``repowire relay keys create [--label L] [--scope S]``: prints the new key once."""
    path = _store_path(args)
    with _opened_store(path, create=True) as store:
        now = time.time()
        if args.scope is None:
            record, key = store.create_scope(label=args.label, now=now)
            where = f"in a new scope {record.scope_id}"
        else:
            record, key = store.create_key(args.scope, label=args.label, now=now)
            where = f"in scope {record.scope_id}"
    print(f"Created key {record.key_id} {where} ({path})")
    print("API key (shown only now; store it safely):")
    # Printing the key is the purpose of this command; it is the only place a key is shown.
    print(key)
    return EXIT_OK


def keys_list_command(args: argparse.Namespace) -> int:
    """``repowire relay keys list [--scope S] [--json]``: never the keys themselves."""
    path = _store_path(args)
    with _opened_store(path, create=False) as store:
        records = store.list_keys(args.scope)
    if args.json:
        print(json.dumps({"keys": [_key_document(r) for r in records]}, indent=2))
    elif not records:
        print(f"No keys in {path}")
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
    path = _store_path(args)
    with _opened_store(path, create=False) as store:
        revoked = store.revoke_key(args.key_id, now=time.time())
    if not revoked:
        raise CommandError(f"no live key {args.key_id} in {path} (unknown or already revoked)")
    print(f"Revoked key {args.key_id}; its browser sessions are ended")
    return EXIT_OK
