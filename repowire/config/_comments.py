"""Keeping the user's comments in place when keys are added to or removed from a mapping.

ruamel attaches the comment lines that follow an item (blank lines, a comment introducing the
next section) to that item, at the deepest last key of its value. Appending a key after it
would put the new key below that comment, i.e. under the next section's heading. So the
trailing lines move to the new last item, and a deleted item hands them to its predecessor.
"""

from __future__ import annotations

from typing import Any

from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken


def set_key(mapping: CommentedMap, key: str, value: object) -> None:
    """Set ``mapping[key]``; a new key goes last, above the comment lines that ended the
    mapping (they stay at its end)."""
    if key in mapping:
        mapping[key] = value
        return
    keys = list(mapping.keys())
    trailing = take_trailing(mapping, keys[-1]) if keys else ""
    mapping[key] = value
    give_trailing(mapping, key, trailing)


def delete_key(mapping: CommentedMap, key: str) -> str:
    """Delete ``key``; returns the comment lines that had no item left to go to."""
    keys = list(mapping.keys())
    index = keys.index(key)
    trailing = take_trailing(mapping, key)
    del mapping[key]
    _trailing_comment(mapping, key, forget=True)
    if not trailing:
        return ""
    if index > 0:
        give_trailing(mapping, keys[index - 1], trailing)
    elif mapping:
        # Nothing precedes it: keep the lines at the end of the mapping rather than lose them.
        give_trailing(mapping, list(mapping.keys())[-1], trailing)
    else:
        return trailing
    return ""


def take_trailing(mapping: CommentedMap, key: Any) -> str:
    """Remove and return the full comment lines after item ``key`` (its end-of-line part stays)."""
    return _trailing_comment(*_slot_after(mapping, key), "")


def give_trailing(mapping: CommentedMap, key: Any, lines: str) -> None:
    """Attach comment ``lines`` after item ``key`` (after those already there)."""
    if not lines:
        return
    holder, slot = _slot_after(mapping, key)
    _trailing_comment(holder, slot, _trailing_comment(holder, slot) + lines)


def _slot_after(mapping: CommentedMap, key: Any) -> tuple[CommentedMap, Any]:
    """The (mapping, key) whose comments hold the lines after item ``key``: the item itself,
    or the deepest last key of its value when that is a non-empty mapping."""
    value = mapping[key]
    while isinstance(value, CommentedMap) and value:
        mapping, key = value, list(value.keys())[-1]
        value = mapping[key]
    return mapping, key


def _trailing_comment(
    mapping: CommentedMap, key: Any, new: str | None = None, *, forget: bool = False
) -> str:
    """The full comment lines after item ``key``'s line (not its end-of-line comment).

    With ``new``, they are replaced by ``new``. With ``forget``, every comment of the item is
    dropped (the item was deleted). Returns the lines that were there.
    """
    # ruamel has no public API to read, move or drop these lines: it keeps them in the item's
    # end-of-line comment token (slot 2 of ``ca.items[key]``), after the token's first
    # newline. This function is the only place that touches that structure.
    items = mapping.ca.items
    entry = items.pop(key, None) if forget else items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    if not isinstance(token, CommentToken):
        if new:
            entry = items.setdefault(key, [None, None, None, None])
            entry.extend([None] * (3 - len(entry)))
            entry[2] = CommentToken("\n" + new, CommentMark(0), None)
        return ""
    end_of_line, newline, lines = token.value.partition("\n")
    if new is not None:
        token.value = end_of_line + newline + new
    return str(lines)
