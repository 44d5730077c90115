"""What every bench reports: the machine, medians and ratios, tables, goals, JSON output.

- :func:`describe_machine` and :func:`machine_line`: cores, CPU model, memory, Python, wrk,
  the load average at the start and the code version; figures are only comparable between
  runs on the same machine and code.
- :func:`median`, :func:`percentile`, :func:`ratio`, :func:`rounded`, :func:`fmt`: figures.
- :func:`print_table`, :func:`goal`, :func:`print_goals`, :func:`write_results`: output.
- :func:`add_common_arguments`, :func:`resolve_runs`: the options every bench takes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: Where every bench writes its JSON.
RESULTS_DIR = REPO / "bench" / "results"
#: Where ``--profile`` runs write their cProfile dumps.
PROFILE_DIR = RESULTS_DIR / "profiles"
#: 10**6 bytes: every MB/s figure uses decimal megabytes.
MB = 1_000_000
MIB = 1024 * 1024


# -- the machine -------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    """Cores, CPU model, memory, Python, OS and wrk version of this machine."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory: int | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "wrk": wrk_version(),
        "load_average": load_average(),
        "code": code_version(),
    }


def code_version() -> str | None:
    """The checkout's commit, with ``+changes`` when tracked files outside ``bench/`` differ
    from it (None outside a git checkout). Figures are only comparable between runs of the
    same code."""
    git = shutil.which("git")
    if git is None:
        return None
    head = subprocess.run(
        [git, "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    if head.returncode != 0:
        return None
    changes = subprocess.run(
        [git, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() + ("+changes" if changes.stdout.strip() else "")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: a busy machine makes every figure noisier."""
    return [round(value, 2) for value in os.getloadavg()]


def machine_line(machine: dict[str, Any]) -> str:
    memory = machine.get("memory_bytes")
    memory_text = f", {memory / 2**30:.1f} GiB RAM" if isinstance(memory, int) else ""
    load = machine.get("load_average") or []
    load_text = f"; load average at start {load[0]:g}" if load else ""
    if machine.get("code"):
        load_text += f"; code {machine['code']}"
    return (
        f"machine: {machine['cores']} cores ({machine['cpu_model']}){memory_text}, "
        f"{machine['implementation']} {machine['python']}, {machine['platform']}{load_text}"
    )


def wrk_version() -> str | None:
    """wrk's version line, or None when wrk is not installed."""
    path = shutil.which("wrk")
    if path is None:
        return None
    # wrk prints its usage (version first) and exits 1 when asked for its version.
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].strip() if first else "wrk"


# -- figures -----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median of ``values``; NaN for an empty sequence."""
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(tunnel: float | None, direct: float | None) -> float:
    """``tunnel / direct``, NaN when either is missing or NaN, or direct is zero."""
    if tunnel is None or direct is None or not direct or math.isnan(direct) or math.isnan(tunnel):
        return math.nan
    return tunnel / direct


def rounded(value: float, digits: int = 3) -> float | None:
    """``value`` rounded for JSON (NaN becomes null)."""
    return None if math.isnan(value) else round(value, digits)


def fmt(value: float | None, digits: int = 1) -> str:
    """``value`` with thousands separators; ``-`` when missing or NaN."""
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


# -- output ------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> None:
    """Print rows as an aligned table: the first ``left`` columns left-aligned, the others
    right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    print(line(headers))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def goal(
    name: str, value: float, target: float, *, at_least: bool, unit: str = ""
) -> dict[str, Any]:
    """A goal record for the JSON output: ``met`` is None when the value is missing."""
    met: bool | None = None
    if not math.isnan(value):
        met = value >= target if at_least else value < target
    return {
        "goal": name,
        "value": rounded(value, 4),
        "target": f"{'>=' if at_least else '<'} {target:g}{unit}",
        "met": met,
    }


def print_goals(goals: Sequence[dict[str, Any]]) -> None:
    for record in goals:
        verdict = {True: "met", False: "MISSED", None: "no figure"}[record["met"]]
        value = record["value"]
        shown = "-" if value is None else f"{value:g}"
        print(f"goal: {record['goal']}: {shown} (target {record['target']}): {verdict}")


def write_results(name: str, payload: dict[str, Any], output: Path | None = None) -> Path:
    """Write ``payload`` as ``bench/results/<name>.json`` (or ``output``); return the path."""
    path = output if output is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# -- options -----------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, *, runs: int = 5) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs, smaller and shorter workloads"
    )
    parser.add_argument(
        "--runs", type=int, default=None, help=f"runs per figure (median; default {runs}, 3 quick)"
    )
    parser.add_argument("--output", type=Path, default=None, help="where to write the JSON")
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"run the relay and workers under cProfile (dumps in {PROFILE_DIR})",
    )


def resolve_runs(parser: argparse.ArgumentParser, args: argparse.Namespace, full: int = 5) -> int:
    runs: int = args.runs if args.runs is not None else (3 if args.quick else full)
    if runs < 1:
        parser.error("--runs must be at least 1")
    return runs
