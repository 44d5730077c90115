"""Small requests: GET of the daemon's ``/health`` (a small JSON document), direct vs the relay.

Run as ``python bench/small_requests.py [--quick] [--runs N] [--profile]``. Everything runs on
127.0.0.1: a relay (``repowire relay start``), the daemon with its connector linked to it, and the
bench's trivial target server. wrk (one thread) measures, at concurrency 1 and 32:

- ``ceiling``: wrk against the trivial server (``/small``): what the load generator can do on
  this machine while the others are idle; every other figure must sit well below it.
- ``direct``: wrk against the daemon's ``/health``.
- ``relay``: wrk against the relay's ``/d/<daemon id>/health`` with a browser session cookie,
  tunneled to the same daemon.

Each figure is the median of ``--runs`` runs (5 s each; ``--quick``: 3 runs of 2 s), the three
targets taking turns. The relay figures stand beside the direct ones as ratios (requests/s
relay/direct; latency relay/direct). Output: a table on stdout and
``bench/results/small_requests.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Bench,
    WrkResult,
    add_common_arguments,
    cpu_seconds,
    describe_machine,
    fmt,
    goal,
    machine_line,
    median,
    print_goals,
    print_table,
    ratio,
    resolve_runs,
    rounded,
    run_wrk,
    write_results,
)

NAME = "small_requests"
CONCURRENCIES = (1, 32)
DAEMON_ID = "bench-daemon"
PATHS = ("ceiling", "direct", "relay")
#: Seconds of wrk per target before measuring (connections, caches, the relay's session cache).
WARMUP_SECONDS = 1.0
#: Concurrency at which CPU time per request is recorded.
CPU_CONCURRENCY = 32
#: Goal at concurrency 32: the relay's requests/s at least this fraction of direct.
GOAL_RATIO = 0.5


def summarize(results: list[WrkResult]) -> dict[str, Any]:
    return {
        "requests_per_s": rounded(median([r.requests_per_s for r in results]), 1),
        "p50_ms": rounded(median([r.p50_ms for r in results])),
        "p99_ms": rounded(median([r.p99_ms for r in results])),
        "errors": sum(r.errors for r in results),
        "runs_requests_per_s": [round(r.requests_per_s, 1) for r in results],
        "runs_p50_ms": [round(r.p50_ms, 3) for r in results],
        "runs_p99_ms": [round(r.p99_ms, 3) for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    runs = resolve_runs(parser, args)
    duration = 2.0 if args.quick else 5.0
    machine = describe_machine()
    print(machine_line(machine))
    print(f"wrk: {machine['wrk']}; {runs} runs of {duration:g} s per figure, median shown")

    with Bench(NAME, profile=args.profile) as bench:
        relay = bench.start_relay()
        [credentials] = bench.credentials()
        _, target_port = bench.start_target()
        daemon = bench.start_daemon(relay, credentials, DAEMON_ID)
        targets: dict[str, tuple[str, str | None]] = {
            "ceiling": (f"http://127.0.0.1:{target_port}/small", None),
            "direct": (f"http://127.0.0.1:{daemon.port}/health", None),
            "relay": (f"{relay.http_url}/d/{DAEMON_ID}/health", credentials.cookie),
        }

        # CPU time each process spends per request: where a request's cost goes.
        cpu_per_request: dict[str, dict[str, list[float]]] = {
            name: {"relay": [], "daemon": []} for name in PATHS
        }

        def measure(name: str, connections: int, seconds: float) -> WrkResult:
            url, cookie = targets[name]
            before = {"relay": cpu_seconds(relay.pid), "daemon": cpu_seconds(daemon.pid)}
            result = run_wrk(
                url, connections=connections, duration=seconds, workdir=bench.tmp, cookie=cookie
            )
            if connections == CPU_CONCURRENCY and result.requests:
                for process, pid in (("relay", relay.pid), ("daemon", daemon.pid)):
                    spent = cpu_seconds(pid) - before[process]
                    cpu_per_request[name][process].append(spent / result.requests * 1e6)
            return result

        for name in PATHS:
            measure(name, 32, WARMUP_SECONDS)
        measured: dict[int, dict[str, list[WrkResult]]] = {}
        for connections in CONCURRENCIES:
            measured[connections] = {name: [] for name in PATHS}
            for run in range(runs):
                # Rotate the order so no target always runs right after another.
                order = PATHS[run % 3 :] + PATHS[: run % 3]
                for name in order:
                    measured[connections][name].append(measure(name, connections, duration))

    figures: dict[str, Any] = {}
    rows: list[list[str]] = []
    for connections in CONCURRENCIES:
        summary = {name: summarize(measured[connections][name]) for name in PATHS}
        direct, tunneled = summary["direct"], summary["relay"]
        rps_ratio = ratio(tunneled["requests_per_s"], direct["requests_per_s"])
        p50_ratio = ratio(tunneled["p50_ms"], direct["p50_ms"])
        p99_ratio = ratio(tunneled["p99_ms"], direct["p99_ms"])
        figures[str(connections)] = {
            **summary,
            "relay_vs_direct": {
                "requests_per_s": rounded(rps_ratio),
                "p50": rounded(p50_ratio),
                "p99": rounded(p99_ratio),
            },
            "direct_vs_ceiling": rounded(
                ratio(direct["requests_per_s"], summary["ceiling"]["requests_per_s"])
            ),
        }
        for name in PATHS:
            row = summary[name]
            is_relay = name == "relay"
            rows.append(
                [
                    f"c={connections} {name}",
                    fmt(row["requests_per_s"]),
                    fmt(row["p50_ms"], 2),
                    fmt(row["p99_ms"], 2),
                    str(row["errors"]),
                    fmt(rps_ratio, 2) if is_relay else "",
                    fmt(p50_ratio, 2) if is_relay else "",
                    fmt(p99_ratio, 2) if is_relay else "",
                ]
            )
    print()
    print_table(
        [
            "target",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "req/s relay/direct",
            "p50 relay/direct",
            "p99 relay/direct",
        ],
        rows,
    )
    cpu = {
        name: {process: rounded(median(values), 1) for process, values in spent.items() if values}
        for name, spent in cpu_per_request.items()
        if name != "ceiling"
    }
    print()
    print(f"CPU per request at c={CPU_CONCURRENCY}, microseconds (median):")
    print_table(
        ["target", "relay process", "daemon process (daemon + connector)"],
        [
            [name, fmt(cpu[name].get("relay") or 0.0, 0), fmt(cpu[name].get("daemon") or 0.0, 0)]
            for name in cpu
        ],
    )
    goals = [
        goal(
            "small requests c=32: relay req/s / direct req/s",
            figures["32"]["relay_vs_direct"]["requests_per_s"] or float("nan"),
            GOAL_RATIO,
            at_least=True,
        )
    ]
    print()
    print_goals(goals)
    if any(figures[str(c)][name]["errors"] for c in CONCURRENCIES for name in PATHS):
        print("warning: wrk counted errors (see the errors column); the figures are suspect")
    written = write_results(
        NAME,
        {
            "bench": NAME,
            "machine": machine,
            "quick": args.quick,
            "runs": runs,
            "duration_s": duration,
            "load_generator": "wrk -t1",
            "figures": figures,
            "cpu_us_per_request": cpu,
            "goals": goals,
        },
        args.output,
    )
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
