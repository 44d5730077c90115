"""The name ``fuzz/hostile_connector.py`` imports from here, kept until that import moves to
:mod:`tests.support.lab` (where it lives now); nothing in tests/ imports this module."""

from __future__ import annotations

from tests.support.lab import open_lab as open_lab
