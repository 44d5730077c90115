"""Repowire: a local daemon for coding agents, reachable from anywhere through a relay.

The command line lives in :mod:`repowire.cli`, the config file in :mod:`repowire.config`.
"""

from __future__ import annotations

import importlib.metadata


def _package_version() -> str:
    try:
        return importlib.metadata.version("repowire")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source tree that was never installed.
        return "0.0.0"


__version__: str = _package_version()

__all__ = ["__version__"]
