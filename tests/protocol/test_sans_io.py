"""The protocol package stays sans-IO: no module in it imports a clock, randomness or I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import protocol

#: Top-level modules the protocol package must never import: event loops, sockets, clocks and
#: randomness. Time and entropy are arguments of the protocol's calls instead.
FORBIDDEN = frozenset({"trio", "socket", "time", "random", "asyncio"})

PACKAGE_DIR = Path(protocol.__file__).resolve().parent


def forbidden_imports(source: str, filename: str = "<source>") -> list[str]:
    """Every forbidden module that ``source`` imports, as ``"line: module"`` strings.

    Covers ``import x``, ``import x.y``, ``from x import y``, ``from x.y import z``, and
    ``__import__("x")`` / ``importlib.import_module("x")`` with a literal name. Relative imports
    (``from . import y``) stay inside the package and are allowed.
    """
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            first = node.args[0]
            if (
                called in {"__import__", "import_module"}
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                names = [first.value]
        line = getattr(node, "lineno", 0)
        found += [f"{line}: {name}" for name in names if name.split(".")[0] in FORBIDDEN]
    return found


def protocol_sources() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def test_the_walk_covers_the_package() -> None:
    names = {path.name for path in protocol_sources()}
    assert {"__init__.py", "_backoff.py"} <= names


@pytest.mark.parametrize("path", protocol_sources(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_protocol_module_is_sans_io(path: Path) -> None:
    assert forbidden_imports(path.read_text(encoding="utf-8"), str(path)) == []


@pytest.mark.parametrize(
    "source",
    [
        "import trio",
        "import trio.lowlevel",
        "import os, socket",
        "from time import monotonic",
        "from asyncio.events import get_event_loop",
        "import random as r",
        "def f():\n    import time\n",
        "__import__('socket')",
        "import importlib\nimportlib.import_module('random')",
    ],
)
def test_the_check_catches_forbidden_imports(source: str) -> None:
    assert forbidden_imports(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "import enum, struct, math",
        "from collections.abc import Mapping",
        "from . import _frames",
        "from ._settings import PROTOCOL_VERSION",
        "import attrs",
        "import timeit_like_name",
        "from randomness_free import x",
    ],
)
def test_the_check_allows_pure_imports(source: str) -> None:
    assert forbidden_imports(source) == []
