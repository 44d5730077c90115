"""Where the configuration lives: the home directory and the files in it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_HOME = "REPOWIRE_HOME"

CONFIG_FILE_NAME = "config.yaml"
#: Held (``flock``) around every read-modify-write so two commands never lose each other's edit.
LOCK_FILE_NAME = ".config.lock"


def repowire_home(environ: Mapping[str, str] | None = None) -> Path:
    """The home directory: ``$REPOWIRE_HOME`` if set and non-empty, else ``~/.repowire``."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_HOME, "")
    return Path(value).expanduser() if value else Path.home() / ".repowire"


def config_path(home: Path) -> Path:
    """The config file inside ``home``."""
    return home / CONFIG_FILE_NAME
