"""Writing the config file: a locked, validated, atomic read-modify-write of the YAML document.

Round-trip editing keeps comments, key order and keys this package does not know. The file is
written to a temporary file in the same directory and renamed over the old one, with mode 0600
because it holds an API key. A malformed file is never rewritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ruamel.yaml.comments import CommentedMap

from ._comments import delete_key, give_trailing, set_key
from ._daemon_id import generate_daemon_id
from ._errors import ConfigError
from ._file import (
    file_values,
    parse,
    read_text,
    resolve_ca_file,
    round_trip_yaml,
    section,
    type_name,
)
from ._paths import LOCK_FILE_NAME, config_path

_FILE_MODE = 0o600
_HOME_MODE = 0o700
_NEW_FILE_HEADER = (
    "# Repowire configuration. 'repowire setup' edits this file in place and keeps\n"
    "# comments and keys it does not know.\n"
)

#: What :func:`update_config` accepts: ``{section: {key: value}}``, ``None`` to remove a key.
Changes = Mapping[str, Mapping[str, object]]


def update_config(home: Path, changes: Changes) -> None:
    """Set the given keys in ``<home>/config.yaml``, creating the file (and ``home``) if needed.

    ``changes`` maps a section to ``{key: value}``, e.g. ``{"relay": {"enabled": True}}``.
    A value of ``None`` removes the key; a :class:`~pathlib.Path` is written as a string. Every
    other key, comment and the key order are kept. The write is atomic (temporary file in the
    same directory, then rename) and leaves the file with mode 0600.

    Raises :class:`ConfigError` when the existing file is malformed, when the result would be
    (a bad URL, a key of the wrong shape, a value of an unsupported type), or when the file
    cannot be written. In every such case the file is left untouched.
    """
    plain = _plain_changes(home, changes)

    def apply(document: CommentedMap) -> bool:
        changed = False
        for section_name, section_changes in plain.items():
            changed = _apply_section(document, section_name, section_changes) or changed
        return changed

    _edit(home, apply)


def _plain_changes(home: Path, changes: Changes) -> dict[str, dict[str, object]]:
    """``changes`` with paths as strings; ConfigError for a value YAML scalars cannot hold."""
    plain: dict[str, dict[str, object]] = {}
    for section_name, section_changes in changes.items():
        plain[section_name] = {}
        for key, value in section_changes.items():
            if isinstance(value, Path):
                value = str(value)
            if value is not None and not isinstance(value, str | int | float | bool):
                raise ConfigError(
                    f"{config_path(home)}: cannot store {type_name(value)} in {section_name}.{key}"
                )
            plain[section_name][key] = value
    return plain


def _apply_section(document: CommentedMap, name: str, changes: Mapping[str, object]) -> bool:
    """Apply one section's changes to ``document``; returns whether anything changed."""
    existing = document.get(name)
    target = existing if isinstance(existing, CommentedMap) else CommentedMap()
    changed = False
    orphans = ""
    for key, value in changes.items():
        if value is None:
            if key in target:
                orphans += delete_key(target, key)
                changed = True
        elif not _same(target.get(key), value):
            set_key(target, key, value)
            changed = True
    if not changed:
        return False
    if target is not existing:
        # Filled before it is attached, so comments moved onto it land inside it.
        set_key(document, name, target)
    elif not target:
        # Emptied by deletions: drop the heading rather than leave `name: {}`.
        orphans += delete_key(document, name)
        if orphans and document:
            give_trailing(document, list(document.keys())[-1], orphans)
    return True


def _same(old: object, new: object) -> bool:
    # True == 1 in Python, but `enabled: 1` and `enabled: true` are different YAML. A quoted
    # string loads as a str subclass that compares equal, and is kept with its quotes.
    if old is None or isinstance(old, bool) != isinstance(new, bool):
        return False
    return old == new


def ensure_daemon_id(home: Path) -> str:
    """The daemon id stored in ``<home>/config.yaml``; generated and written on first use.

    Raises :class:`ConfigError` when the file is malformed or cannot be written.
    """
    result: list[str] = []

    def apply(document: CommentedMap) -> bool:
        existing = section(document, "daemon", config_path(home)).get("id")
        if isinstance(existing, str):
            result.append(str(existing))
            return False
        daemon_id = generate_daemon_id()
        result.append(daemon_id)
        daemon = document.get("daemon")
        if not isinstance(daemon, CommentedMap):
            daemon = CommentedMap()
            set_key(document, "daemon", daemon)
        set_key(daemon, "id", daemon_id)
        return True

    _edit(home, apply)
    return result[0]


def check_writable(home: Path) -> None:
    """Make sure a new config file can be written into ``home`` (creating ``home`` if needed).

    Raises :class:`ConfigError` when it cannot. Used before an action whose result must be
    stored, such as a key rotation, which cannot be undone.
    """
    with _locked(home):
        target = config_path(home)
        target = target.resolve() if target.is_symlink() else target
        try:
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        except OSError as exc:
            raise ConfigError(f"{target}: cannot write: {exc.strerror or exc}") from None
        os.close(fd)
        os.unlink(name)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<home>/.config.lock``, creating ``home`` if needed."""
    try:
        home.mkdir(mode=_HOME_MODE, parents=True, exist_ok=True)
        fd = os.open(home / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"{home}: cannot create or lock: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _edit(home: Path, apply: Callable[[CommentedMap], bool]) -> None:
    """Read, validate, change (``apply`` returns whether it changed anything), validate, write."""
    path = config_path(home)
    with _locked(home):
        text = read_text(path)
        document = None if text is None else parse(text, path)
        file_values(document, path)
        target = CommentedMap() if document is None else document
        if not apply(target):
            return
        values = file_values(target, path)
        if values.relay_ca_file is not None:
            resolve_ca_file(values.relay_ca_file, home, path)
        new_text = _new_text(target, text, had_mapping=document is not None)
        # Never write what could not be read back: a malformed result is a bug, not the user's.
        try:
            file_values(parse(new_text, path), path)
        except ConfigError:
            raise ConfigError(
                f"{path}: refusing to write: the edited file would not read back; "
                "the file is unchanged"
            ) from None
        _write_atomically(path, new_text)


def _new_text(document: CommentedMap, old_text: str | None, *, had_mapping: bool) -> str:
    """The file's new text: ``document`` dumped, with a header for a new file."""
    buffer = io.StringIO()
    round_trip_yaml().dump(document, buffer)
    if old_text is None:
        return _NEW_FILE_HEADER + buffer.getvalue()
    if not had_mapping:
        # A file of only comments loads as nothing: keep its text and append the mapping.
        return (old_text.rstrip("\n") + "\n" if old_text.strip() else "") + buffer.getvalue()
    return buffer.getvalue()


def _write_atomically(path: Path, text: str) -> None:
    # Rename over the real file, not over a symlink pointing at it.
    target = path.resolve() if path.is_symlink() else path
    try:
        fd, temp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
        )
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), _FILE_MODE)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
