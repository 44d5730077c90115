"""Run every benchmark, one after the other, and write one summary.

Run as ``python -m bench.run_all [--quick] [--runs N] [--only a,b]`` from the repository root.
Each bench runs in its own process (``python -m bench.<module>`` from the repository root, with
``--quick`` and ``--runs`` passed on) and writes its own ``bench/results/<name>.json``; bulk
and small requests run twice, plain and with ``--tls`` (``bulk_tls``, ``small_requests_tls``).
Then this script reads them all and writes ``bench/results/summary.json``: the machine, every
goal with its value and verdict, the headline figures of each bench, and how long each took. A
bench that fails is recorded as failed and the others still run; the exit code is 1 if any
failed. ``--quick`` runs the whole set in a few minutes. ``--results-dir`` puts every JSON
elsewhere (a quick check that must not replace the figures of a full run); ``--no-run`` only
rebuilds the summary from the results already there.
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.run_all")

import argparse
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from bench.report import (
    REPO,
    RESULTS_DIR,
    describe_machine,
    machine_line,
    print_goals,
    print_table,
    write_results,
)

#: ``(name, module, extra arguments)`` in the order they run: the protocol alone first, the
#: heaviest (scale) last. A bench's results are ``<name>.json``.
BENCHES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("protocol_core", "protocol_core", ()),
    ("small_requests", "small_requests", ()),
    ("small_requests_tls", "small_requests", ("--tls",)),
    ("bulk", "bulk", ()),
    ("bulk_tls", "bulk", ("--tls",)),
    ("sse", "sse", ()),
    ("fairness", "fairness", ()),
    ("scale", "scale", ()),
    ("cluster", "cluster", ()),
)
NAMES = tuple(name for name, _, _ in BENCHES)
MODULES = {name: module for name, module, _ in BENCHES}


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any, digits: int = 1) -> str:
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return "-"


def _protocol(data: dict[str, Any]) -> list[tuple[str, str]]:
    workloads = data.get("workloads") or {}
    return [
        (f"protocol {name}", f"{_num(_get(figures, 'mb_per_s'))} MB/s")
        for name, figures in workloads.items()
    ]


def _tls(data: dict[str, Any]) -> str:
    return " (TLS)" if data.get("tls") else ""


def _small(data: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for concurrency in ("1", "32"):
        figures = _get(data, "figures", concurrency)
        rows.append(
            (
                f"small requests c={concurrency}{_tls(data)} (req/s)",
                f"wrk on a trivial server {_num(_get(figures, 'trivial', 'requests_per_s'))}, "
                f"direct {_num(_get(figures, 'direct', 'requests_per_s'))}, "
                f"ceiling {_num(_get(figures, 'ceiling', 'requests_per_s'))}, "
                f"relay {_num(_get(figures, 'relay', 'requests_per_s'))} "
                f"(x{_num(_get(figures, 'relay_vs_direct', 'requests_per_s'), 3)} direct, "
                f"x{_num(_get(figures, 'relay_vs_ceiling', 'requests_per_s'), 3)} ceiling); "
                f"p50 ms direct {_num(_get(figures, 'direct', 'p50_ms'), 2)}, "
                f"relay {_num(_get(figures, 'relay', 'p50_ms'), 2)}; p99 ms "
                f"direct {_num(_get(figures, 'direct', 'p99_ms'), 2)}, "
                f"relay {_num(_get(figures, 'relay', 'p99_ms'), 2)}",
            )
        )
    return rows


def _bulk(data: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (
            f"bulk {way}{_tls(data)} (MB/s)",
            f"direct {_num(_get(data, 'figures', way, 'direct_mb_per_s'))}, "
            f"ceiling {_num(_get(data, 'figures', way, 'ceiling_mb_per_s'))}, "
            f"relay {_num(_get(data, 'figures', way, 'relay_mb_per_s'))} "
            f"(x{_num(_get(data, 'figures', way, 'relay_vs_direct'), 3)} direct, "
            f"x{_num(_get(data, 'figures', way, 'relay_vs_ceiling'), 3)} ceiling)",
        )
        for way in ("download", "upload")
    ]


def _sse(data: dict[str, Any]) -> list[tuple[str, str]]:
    figures = data.get("figures") or {}
    return [
        (
            f"SSE latency at {_num(data.get('rate_per_s'), 0)}/s (ms)",
            f"p50 direct {_num(_get(figures, 'direct', 'p50_ms'), 3)}, "
            f"relay {_num(_get(figures, 'relay', 'p50_ms'), 3)}, "
            f"added {_num(_get(figures, 'added', 'p50_ms'), 3)}; p99 added "
            f"{_num(_get(figures, 'added', 'p99_ms'), 3)}; relay feeds dropped "
            f"{_get(figures, 'relay', 'feeds_dropped')}",
        )
    ]


def _fairness(data: dict[str, Any]) -> list[tuple[str, str]]:
    relay = _get(data, "figures", "relay") or {}
    direct = _get(data, "figures", "direct") or {}
    sweep = _get(data, "figures", "stall_sweep") or {}
    first_hung = sweep.get("first_stalled_count_with_a_hung_probe") or "none"
    return [
        (
            "fairness, 99 readers beside a stalled one (MB/s)",
            f"relay {_num(relay.get('baseline_mb_per_s'))} -> "
            f"{_num(relay.get('stalled_mb_per_s'))} "
            f"(cost {_num((relay.get('stall_cost') or 0) * 100)} %); direct "
            f"{_num(direct.get('baseline_mb_per_s'))} -> {_num(direct.get('stalled_mb_per_s'))}",
        ),
        (
            "fairness, stalled readers until a new request on the link hangs",
            f"{first_hung} (swept up to the link's stream limit, {sweep.get('stream_limit')})",
        ),
    ]


def _scale(data: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        (
            f"scale {size['links']} idle links",
            f"{_num(size.get('relay_bytes_per_link', 0) / 1024)} KiB/link, relay RSS "
            f"{_num(size.get('relay_rss_bytes', 0) / 2**20, 0)} MiB, idle CPU "
            f"{_num(size.get('relay_cpu_s_per_10s_idle'), 2)} s/10 s, back after restart "
            f"{_num(size.get('restart_back_after_listen_s'))} s (from listening), "
            f"{_num(size.get('restart_back_after_sigterm_s'))} s (from SIGTERM)",
        )
        for size in data.get("sizes") or []
    ]
    rows += [
        (f"scale {size['links']} links: restart", f"not all back: {size['restart_failed']}")
        for size in data.get("sizes") or []
        if "restart_failed" in size
    ]
    rows += [
        (f"scale {size} links", reason) for size, reason in (data.get("skipped") or {}).items()
    ]
    return rows


def _cluster(data: dict[str, Any]) -> list[tuple[str, str]]:
    small = _get(data, "forwarding", "small", "32") or {}
    download = _get(data, "forwarding", "download") or {}
    idle = data.get("idle") or {}
    per_link = idle.get("bytes_per_link") or {}
    return [
        (
            "cluster, forwarded / local",
            f"c=32 req/s {_num(_get(small, 'forwarded', 'requests_per_s'))} / "
            f"{_num(_get(small, 'local', 'requests_per_s'))} "
            f"(x{_num(small.get('forwarded_vs_local'), 2)}, added p50 "
            f"{_num(small.get('added_p50_ms'), 2)} ms); download MB/s "
            f"{_num(download.get('forwarded_mb_per_s'))} / {_num(download.get('local_mb_per_s'))} "
            f"(x{_num(download.get('forwarded_vs_local'), 2)})",
        ),
        (
            f"cluster, {data.get('idle_links')} idle links over 3 replicas",
            "KiB/link "
            + ", ".join(f"{name} {_num(value / 1024)}" for name, value in per_link.items())
            + f"; all back after a SIGKILL {_num(idle.get('all_back_after_kill_s'), 2)} s",
        ),
    ]


HEADLINES: dict[str, Callable[[dict[str, Any]], list[tuple[str, str]]]] = {
    "protocol_core": _protocol,
    "small_requests": _small,
    "bulk": _bulk,
    "sse": _sse,
    "fairness": _fairness,
    "scale": _scale,
    "cluster": _cluster,
}


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every bench in its quick form")
    parser.add_argument("--runs", type=int, default=None, help="passed on to every bench")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated subset of: {', '.join(NAMES)}"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"where every bench writes its JSON and this script the summary ({RESULTS_DIR})",
    )
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="run nothing: summarize the results already in --results-dir",
    )
    args = parser.parse_args(argv)
    selected = list(NAMES)
    if args.only:
        selected = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in selected if name not in NAMES]
        if unknown:
            parser.error(f"unknown bench: {', '.join(unknown)}")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args, selected


def run_bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one bench as ``python -m bench.<module>`` from the repository root; its exit code,
    seconds, and results (or why there are none)."""
    result_path = args.results_dir / f"{name}.json"
    if args.no_run:
        if result_path.exists():
            return {"results": json.loads(result_path.read_text())}
        return {"failed": f"no results in {result_path}"}
    _, module, extra = next(bench for bench in BENCHES if bench[0] == name)
    argv = [sys.executable, "-m", f"bench.{module}", *extra, "--output", str(result_path)]
    if args.quick:
        argv.append("--quick")
    if args.runs is not None:
        argv += ["--runs", str(args.runs)]
    print(f"\n=== {name} ===", flush=True)
    previous = result_path.stat().st_mtime if result_path.exists() else None
    started = time.monotonic()
    code = subprocess.run(argv, cwd=REPO, check=False).returncode
    entry: dict[str, Any] = {"exit_code": code, "seconds": round(time.monotonic() - started, 1)}
    fresh = result_path.exists() and result_path.stat().st_mtime != previous
    if code == 0 and fresh:
        entry["results"] = json.loads(result_path.read_text())
    else:
        entry["failed"] = f"exit code {code}" if code != 0 else "it wrote no new results file"
    return entry


@attrs.define
class Summary:
    rows: list[list[str]] = attrs.field(factory=list)
    goals: list[dict[str, Any]] = attrs.field(factory=list)
    headlines: dict[str, list[dict[str, str]]] = attrs.field(factory=dict)

    def add(self, key: str, module: str, data: dict[str, Any], label: str = "") -> None:
        lines = HEADLINES[module](data)
        self.headlines[key] = [{"figure": figure, "value": value} for figure, value in lines]
        self.rows += [[figure + label, value] for figure, value in lines]
        self.goals += [
            {"bench": key, **record, "goal": record["goal"] + label}
            for record in data.get("goals") or []
        ]


def summarize(runs: dict[str, dict[str, Any]], selected: list[str], results_dir: Path) -> Summary:
    summary = Summary()
    for name, entry in runs.items():
        if "failed" in entry:
            summary.rows.append([name, f"FAILED ({entry['failed']})"])
        else:
            summary.add(name, MODULES[name], entry["results"])
    # Separate runs of a bench kept beside its main results (e.g. ``scale_10000.json``, one
    # size measured alone): summarized too, labelled with their file name. The results of
    # another bench of this set (``bulk_tls.json`` beside ``bulk.json``) are not among them.
    for name in selected:
        for extra in sorted(results_dir.glob(f"{name}_*.json")):
            if extra.stem not in NAMES:
                data = json.loads(extra.read_text())
                summary.add(extra.stem, MODULES[name], data, f" [{extra.name}]")
    return summary


def main(argv: list[str] | None = None) -> int:
    args, selected = _parse(argv)
    machine = describe_machine()
    print(machine_line(machine), flush=True)
    runs = {name: run_bench(name, args) for name in selected}
    print("\n=== summary ===")
    print(machine_line(machine))
    summary = summarize(runs, selected, args.results_dir)
    print_table(["figure", "value"], summary.rows, left=2)
    print()
    print_goals(summary.goals)
    written = write_results(
        "summary",
        {
            "machine": machine,
            "quick": args.quick,
            "summarized_only": args.no_run,
            "benches": {
                name: {k: v for k, v in entry.items() if k != "results"}
                for name, entry in runs.items()
            },
            "headlines": summary.headlines,
            "goals": summary.goals,
        },
        args.results_dir / "summary.json",
    )
    print(f"wrote {written}")
    return 1 if any("failed" in entry for entry in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
