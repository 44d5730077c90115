"""Repowire: a local daemon for coding agents, reachable from anywhere through a relay.

The command line lives in :mod:`repowire.cli`, the config file in :mod:`repowire.config`.
"""

from __future__ import annotations

from common import package_version

__version__: str = package_version()

__all__ = ["__version__"]
