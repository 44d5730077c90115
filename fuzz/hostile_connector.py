"""Run the hostile-connector fuzzer against a relay process for as long as you like.

The same harness as ``tests/e2e/test_hostile_connector.py`` (``tests/support/hostile.py``):
a relay started with ``repowire relay start`` on loopback, a hostile connector holding a valid
key, and a second tenant requested through the relay throughout. Prints the summary line and
every failure (each names the seed and the scenarios running); exits with status 1 if any
pass criterion failed::

    python fuzz/hostile_connector.py --seconds 600 --seed 7
    python fuzz/hostile_connector.py --seconds 30 --scenario big_post_then_reset
    python fuzz/hostile_connector.py --list

``--keep DIR`` leaves the relay's data directory and every process's output in ``DIR``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# Run from a checkout without installing: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from tests.support.hostile import (
    DEFAULT_SEED,
    MIB,
    SCENARIOS,
    FuzzReport,
    fuzz_relay_process,
)
from tests.support.lab import open_lab

#: The pass criteria of the CI test (tests/e2e/test_hostile_connector.py).
MAX_RSS_GROWTH = 120 * MIB
MAX_TENANT_P99 = 0.5
#: Seconds on top of the fuzzing time for setup and teardown before the run is abandoned.
SETUP_ALLOWANCE = 60.0
#: Failures printed at most.
MAX_PRINTED = 10
#: Lines of the relay's stderr shown after a failed run.
STDERR_LINES = 40


def verdict(report: FuzzReport) -> list[str]:
    """Every pass criterion the run missed, as lines to print."""
    problems = [*report.failures, *report.tenant_failures]
    if report.growth >= MAX_RSS_GROWTH:
        problems.append(
            f"seed {report.seed}: RSS grew {report.growth / MIB:.1f} MiB "
            f"(peak during {', '.join(report.rss_peak_during)})"
        )
    if report.latencies and report.p(0.99) >= MAX_TENANT_P99:
        problems.append(f"seed {report.seed}: tenant p99 {report.p(0.99) * 1000:.0f} ms")
    return problems


async def run(root: Path, seed: int, seconds: float, names: Sequence[str] | None) -> int:
    async with open_lab(root) as lab:
        with trio.fail_after(seconds + SETUP_ALLOWANCE):
            report = await fuzz_relay_process(lab, seed=seed, seconds=seconds, names=names)
        relay_err = "\n".join(
            child.stderr() for child in lab.children if "relay" in child.stderr_path.name
        )
    print(report.summary())
    print("scenarios:", ", ".join(f"{name}={n}" for name, n in sorted(report.scenarios.items())))
    problems = verdict(report)
    for line in problems[:MAX_PRINTED]:
        print("FAIL", line)
    if len(problems) > MAX_PRINTED:
        print(f"... and {len(problems) - MAX_PRINTED} more")
    if problems:
        print("relay stderr (tail):")
        print("\n".join(relay_err.splitlines()[-STDERR_LINES:]))
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="fuzzing time (300)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="only these (repeatable)"
    )
    parser.add_argument("--keep", type=Path, help="keep the processes' files in this directory")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(SCENARIOS)))
        return 0
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return trio.run(run, args.keep, args.seed, args.seconds, args.scenario)
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        return trio.run(run, Path(tmp), args.seed, args.seconds, args.scenario)


if __name__ == "__main__":
    sys.exit(main())
