"""Checks that no API key leaked into a text (process output, a page, a log).

A failure names where the key was, never the key itself.
"""

from __future__ import annotations

import re

from common import KEY_PREFIX, SECRET_TEXT_LENGTH

# A full key anywhere in a text: the key prefix and 43+ characters of the url-safe alphabet
# (`looks_like_key` checks a whole string; this finds one inside a text).
FULL_KEY = re.compile(re.escape(KEY_PREFIX) + rf"[A-Za-z0-9_-]{{{SECRET_TEXT_LENGTH},}}")


def assert_no_full_key(*texts: str) -> None:
    """No text contains anything shaped like a whole API key."""
    for text in texts:
        assert FULL_KEY.search(text) is None, f"a key leaked into: {text!r}"


def mask_keys(text: str) -> str:
    """``text`` with anything shaped like an API key masked, for failure messages."""
    return FULL_KEY.sub("rw_<masked>", text)


def printed_key(output: str) -> str | None:
    """The API key a command printed (``relay keys create``), or None if it printed none."""
    found = FULL_KEY.search(output)
    return None if found is None else found.group(0)
