"""The installed distribution's version, for banners, ``--version`` and ``/health``."""

from __future__ import annotations

import importlib.metadata

#: The distribution every package of this repository ships in.
DISTRIBUTION: str = "repowire"


def package_version() -> str:
    """The installed version of :data:`DISTRIBUTION`, or ``0.0.0`` for a source tree never
    installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
