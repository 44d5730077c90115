"""The one error of the configuration, and the scrubbing that keeps secrets out of messages."""

from __future__ import annotations

import re

from common import KEY_PREFIX, mask_key

#: How a value that should be an API key and is not is described (never quoting the value).
BAD_KEY_SHAPE = "does not look like a Repowire API key ('rw_' followed by 43+ url-safe characters)"

# The key prefix followed by any run of url-safe characters: wider than a whole key on purpose,
# since a truncated or mistyped key is still a secret and must not reach a message.
_KEYISH = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """The configuration cannot be read, resolved or written.

    ``str(error)`` is one line naming the source (the file, an environment variable or a
    command-line flag) and the problem. It never contains an API key.
    """


def redact_secrets(text: str) -> str:
    """``text`` with everything shaped like an API key replaced by its masked form."""
    return _KEYISH.sub(lambda match: mask_key(match.group(0)), text)
