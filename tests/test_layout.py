"""The repository's layout: which package may import which, and what the built wheel ships.

The rules are the table in docs/ARCHITECTURE.md ("Packages"); this test reads the source with
:mod:`ast` (nothing is imported) and fails on the first import that goes against them, naming
the file, the line and the rule.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The project's import packages, lowest layer first.
PACKAGES = ("common", "protocol", "mux", "relay", "connector", "repowire")

#: Which of the project's packages each package may import (its own always allowed).
MAY_IMPORT: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "protocol": frozenset(),
    "mux": frozenset({"common", "protocol"}),
    "relay": frozenset({"common", "protocol", "mux"}),
    "connector": frozenset({"common", "protocol", "mux"}),
    "repowire": frozenset({"common", "protocol", "mux", "relay", "connector"}),
}

#: Third-party imports the sans-IO core may use: no I/O library, no clock, no randomness.
PROTOCOL_THIRD_PARTY = frozenset({"attrs"})

#: Standard-library modules the sans-IO core must not import.
PROTOCOL_FORBIDDEN_STDLIB = frozenset(
    {"socket", "ssl", "select", "selectors", "asyncio", "threading", "time", "random", "secrets"}
)


def _modules(package: str) -> Iterator[Path]:
    yield from sorted((ROOT / package).rglob("*.py"))


#: A string that names a private module of the project, as ``importlib.import_module`` takes
#: it (logger names such as ``repowire.relay`` are public words, not imports).
_MODULE_NAME = re.compile(rf"(?:{'|'.join(PACKAGES)})(?:\.\w+)*\._\w+(?:\.\w+)*")


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every absolute module name ``path`` imports (relative imports resolved), with its line.

    A string constant shaped like a dotted name of one of the project's private modules counts
    too: an import through ``importlib`` is still an import.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # The package a relative import starts from: the module's own folder.
    here = path.relative_to(ROOT).parent.parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                # ``from relay import _store`` reaches a private module as surely as
                # ``import relay._store`` does.
                yield node.lineno, f"{module}.{alias.name}"
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_NAME.fullmatch(node.value)
        ):
            yield node.lineno, node.value


def _violations(package: str) -> Iterator[str]:
    allowed = MAY_IMPORT[package] | {package}
    for path in _modules(package):
        where = path.relative_to(ROOT)
        for line, module in _imports(path):
            top, _, rest = module.partition(".")
            if top in PACKAGES and top not in allowed:
                yield f"{where}:{line} imports {module}: {package} may not import {top}"
            elif (
                top in PACKAGES
                and top != package
                and any(part.startswith("_") for part in rest.split(".") if part)
            ):
                yield f"{where}:{line} imports {module}: a private module of another package"
            elif package == "protocol" and top in PROTOCOL_FORBIDDEN_STDLIB:
                yield f"{where}:{line} imports {module}: protocol/ does no I/O and reads no clock"
            elif (
                package == "protocol"
                and top not in PACKAGES
                and top not in sys.stdlib_module_names
                and top not in PROTOCOL_THIRD_PARTY
            ):
                yield f"{where}:{line} imports {module}: protocol/ uses the stdlib and attrs only"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_layering(package: str) -> None:
    assert list(_violations(package)) == []


def test_the_rules_catch_an_import_against_them(tmp_path: Path) -> None:
    """The checker itself: a private import across packages and an upward import are found."""
    sample = ROOT / "connector" / "_layout_probe_for_test.py"
    sample.write_text(
        "import importlib\n"
        "from relay import KeyStore\n"
        "import repowire.cli\n"
        "store = importlib.import_module('mux._session')\n",
        encoding="utf-8",
    )
    try:
        found = list(_violations("connector"))
    finally:
        sample.unlink()
    assert any("connector may not import relay" in line for line in found), found
    assert any("connector may not import repowire" in line for line in found), found
    assert any("mux._session: a private module" in line for line in found), found


def test_architecture_doc_states_the_same_rules() -> None:
    """docs/ARCHITECTURE.md's table names, for each package, exactly the packages it may import."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| `(\w+)/` \|.*\| ([^|]*) \|$", text, re.MULTILINE)
    }
    for package in PACKAGES:
        assert package in rows, f"docs/ARCHITECTURE.md has no row for {package}/"
        named = {word for word in re.findall(r"\w+", rows[package]) if word in PACKAGES}
        assert named == set(MAY_IMPORT[package]), (package, rows[package])


def _readme_packages() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## How it is built", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)/` \|", section, re.MULTILINE))


def test_wheel_ships_exactly_the_packages_the_readme_names(tmp_path: Path) -> None:
    """Built from this checkout, the wheel's top level holds the README's packages, no more."""
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources, and files
    # left there by an earlier build would end up in the next wheel.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "*.egg-info",
            "__pycache__",
            "*.pyc",
            "test-artifacts",
            ".mypy_cache",
            ".ruff_cache",
            ".pytest_cache",
            "results",
            "node_modules",
        ),
    )
    wheels = tmp_path / "wheels"
    # setuptools and wheel come with the dev extra, so the build needs no network.
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("repowire-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    packages = {top for top in tops if not top.endswith((".dist-info", ".data"))}
    assert packages == _readme_packages()
    assert packages == set(PACKAGES)


def test_architecture_doc_names_every_module() -> None:
    """docs/ARCHITECTURE.md's "Layout" lists every module of every package, and no module that
    is gone: a newcomer reading it finds the whole tree."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed: set[str] = set()
    folder = None
    for line in layout.splitlines():
        heading = re.fullmatch(r"\*\*`([\w/]+)/`\*\*", line.strip())
        if heading:
            folder = heading.group(1)
        entry = re.match(r"- `(\w+\.py)`:", line)
        if entry and folder is not None:
            listed.add(f"{folder}/{entry.group(1)}")
    present = {
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py") and "static" not in path.parts
    }
    assert listed == present
