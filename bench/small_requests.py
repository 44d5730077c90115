"""Small requests: GET of the daemon's ``/health`` (a small JSON document), direct, through two
plain forwarders (the ceiling) and through the relay.

Run as ``python -m bench.small_requests [--quick] [--runs N] [--tls] [--profile]`` from the
repository root. Everything runs on 127.0.0.1: a relay (``repowire relay start``), the daemon
with its connector linked to it, two forwarder processes in series in front of the daemon, and
the bench's trivial target server. wrk (one thread) measures, at concurrency 1 and 32:

- ``trivial``: wrk against the trivial server (``/small``): what the load generator can do on
  this machine while the others are idle; every other figure must sit well below it.
- ``direct``: wrk against the daemon's ``/health``.
- ``ceiling``: wrk against forwarder 1, which pipes to forwarder 2, which pipes to the daemon
  (each forwarder its own process, trio streams, no framing): two Python hops at their least.
- ``relay``: wrk against the relay's ``/d/<daemon id>/health`` with a browser session cookie,
  tunneled to the same daemon.

With ``--tls`` wrk speaks HTTPS to the relay (served with its own ``--certfile``) and to
forwarder 1 (which terminates it), the daemon's connector dials ``wss://`` trusting the run's
CA, and ``trivial`` and ``direct`` stay plain HTTP.

Each figure is the median of ``--runs`` runs (5 s each; ``--quick``: 3 runs of 2 s), the
targets taking turns. The ceiling and relay figures stand beside the direct ones as ratios, and
the relay's beside the ceiling's. Output: tables on stdout and
``bench/results/small_requests.json`` (``small_requests_tls.json`` with ``--tls``).
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.small_requests")

import argparse
import math
from pathlib import Path
from typing import Any

import attrs

from bench.harness import HOST, Bench
from bench.processes import cpu_seconds
from bench.report import (
    add_common_arguments,
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
    write_results,
)
from bench.wrk import WrkResult, run_wrk
from repowire.daemon._host import TUNNEL_HOST

NAME = "small_requests"
CONCURRENCIES = (1, 32)
DAEMON_ID = "bench-daemon"
PATHS = ("trivial", "direct", "ceiling", "relay")
#: The processes whose CPU time per request is recorded.
PROCESSES = ("relay", "forwarder_1", "forwarder_2", "daemon")
#: Seconds of wrk per target before measuring (connections, caches, the relay's session cache).
WARMUP_SECONDS = 1.0
#: Concurrency at which CPU time per request is recorded.
CPU_CONCURRENCY = 32
#: Goal at concurrency 32: the relay's requests/s at least this fraction of direct.
GOAL_RATIO = 0.5


@attrs.define(kw_only=True)
class Setup:
    """wrk's URL, cookie and Host header per path, the pids whose CPU is counted, and wrk's
    workdir."""

    targets: dict[str, tuple[str, str | None, str | None]]
    pids: dict[str, int]
    workdir: Path
    #: ``cpu[path][process]``: microseconds of CPU per request, one entry per run at c=32.
    cpu: dict[str, dict[str, list[float]]] = attrs.field(
        factory=lambda: {path: {process: [] for process in PROCESSES} for path in PATHS}
    )

    def measure(self, path: str, connections: int, seconds: float) -> WrkResult:
        url, cookie, host = self.targets[path]
        before = {process: cpu_seconds(pid) for process, pid in self.pids.items()}
        result = run_wrk(
            url,
            connections=connections,
            duration=seconds,
            workdir=self.workdir,
            cookie=cookie,
            host=host,
        )
        if connections == CPU_CONCURRENCY and result.requests:
            for process, pid in self.pids.items():
                spent = cpu_seconds(pid) - before[process]
                self.cpu[path][process].append(spent / result.requests * 1e6)
        return result


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


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, int]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--tls", action="store_true", help="HTTPS to the relay and the ceiling, wss:// link"
    )
    args = parser.parse_args(argv)
    return args, resolve_runs(parser, args)


def start(bench: Bench, tls: bool) -> Setup:
    """The relay, the daemon, the trivial server and the ceiling forwarders."""
    files = bench.tls_files() if tls else None
    relay = bench.start_relay(tls=files)
    [credentials] = bench.credentials()
    _, target_port = bench.start_target()
    daemon = bench.start_daemon(relay, credentials, DAEMON_ID)
    ceiling = bench.start_ceiling(daemon.port, tls=files)
    if files is not None:
        print(
            f"TLS (certificate made with {files.made_with}): wrk speaks HTTPS to the relay (its "
            "own --certfile) and to forwarder 1; the connector dials wss:// trusting the run's "
            "CA; trivial and direct stay plain HTTP. The relay path has TLS on two hops "
            "(wrk-relay, connector-relay), the ceiling on its first hop only."
        )
    return Setup(
        targets={
            "trivial": (f"http://{HOST}:{target_port}/small", None, None),
            "direct": (f"http://{HOST}:{daemon.port}/health", None, None),
            # The forwarders pass the request as it is, and the daemon answers only Host
            # values naming it: this one, which the relay sends too.
            "ceiling": (f"{ceiling.http_url}/health", None, TUNNEL_HOST),
            "relay": (f"{relay.http_url}/d/{DAEMON_ID}/health", credentials.cookie, None),
        },
        pids={
            "relay": relay.pid,
            "forwarder_1": ceiling.first.pid,
            "forwarder_2": ceiling.second.pid,
            "daemon": daemon.pid,
        },
        workdir=bench.tmp,
    )


def measure(setup: Setup, runs: int, duration: float) -> dict[int, dict[str, list[WrkResult]]]:
    """A warm-up per target, then ``runs`` rounds per concurrency, the targets' order
    rotating so no target always runs right after another."""
    for path in PATHS:
        setup.measure(path, 32, WARMUP_SECONDS)
    measured: dict[int, dict[str, list[WrkResult]]] = {}
    for connections in CONCURRENCIES:
        measured[connections] = {path: [] for path in PATHS}
        for run in range(runs):
            shift = run % len(PATHS)
            for path in PATHS[shift:] + PATHS[:shift]:
                measured[connections][path].append(setup.measure(path, connections, duration))
    return measured


def _ratios(tunnel: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    return {
        "requests_per_s": ratio(tunnel["requests_per_s"], base["requests_per_s"]),
        "p50": ratio(tunnel["p50_ms"], base["p50_ms"]),
        "p99": ratio(tunnel["p99_ms"], base["p99_ms"]),
    }


def _rounded_ratios(tunnel: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    return {key: rounded(value) for key, value in _ratios(tunnel, base).items()}


def _row(connections: int, path: str, summary: dict[str, dict[str, Any]]) -> list[str]:
    row = summary[path]
    tunnel = path in ("ceiling", "relay")
    to_direct = _ratios(row, summary["direct"])
    to_ceiling = _ratios(row, summary["ceiling"])
    return [
        f"c={connections} {path}",
        fmt(row["requests_per_s"]),
        fmt(row["p50_ms"], 2),
        fmt(row["p99_ms"], 2),
        str(row["errors"]),
        fmt(to_direct["requests_per_s"], 2) if tunnel else "",
        fmt(to_ceiling["requests_per_s"], 2) if path == "relay" else "",
        fmt(to_direct["p50"], 2) if tunnel else "",
        fmt(to_direct["p99"], 2) if tunnel else "",
    ]


def figures_and_rows(
    measured: dict[int, dict[str, list[WrkResult]]],
) -> tuple[dict[str, Any], list[list[str]]]:
    figures: dict[str, Any] = {}
    rows: list[list[str]] = []
    for connections in CONCURRENCIES:
        summary = {path: summarize(measured[connections][path]) for path in PATHS}
        figures[str(connections)] = {
            **summary,
            "relay_vs_direct": _rounded_ratios(summary["relay"], summary["direct"]),
            "ceiling_vs_direct": _rounded_ratios(summary["ceiling"], summary["direct"]),
            "relay_vs_ceiling": _rounded_ratios(summary["relay"], summary["ceiling"]),
            "direct_vs_trivial": rounded(
                ratio(summary["direct"]["requests_per_s"], summary["trivial"]["requests_per_s"])
            ),
        }
        rows += [_row(connections, path, summary) for path in PATHS]
    return figures, rows


def print_cpu(setup: Setup) -> dict[str, dict[str, float | None]]:
    """The CPU table (microseconds per request at c=32, per process); returns its figures."""
    cpu = {
        path: {process: rounded(median(values), 1) for process, values in spent.items() if values}
        for path, spent in setup.cpu.items()
        if path != "trivial"
    }
    print()
    print(f"CPU per request at c={CPU_CONCURRENCY}, microseconds (median):")
    print_table(
        ["target", "relay", "forwarder 1", "forwarder 2", "daemon process (daemon + connector)"],
        [[path, *(fmt(cpu[path].get(process), 0) for process in PROCESSES)] for path in cpu],
    )
    return cpu


def report(
    args: argparse.Namespace,
    runs: int,
    duration: float,
    machine: dict[str, Any],
    setup: Setup,
    measured: dict[int, dict[str, list[WrkResult]]],
) -> None:
    figures, rows = figures_and_rows(measured)
    print()
    print_table(
        [
            "target",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "req/s x direct",
            "req/s relay/ceiling",
            "p50 x direct",
            "p99 x direct",
        ],
        rows,
    )
    cpu = print_cpu(setup)
    label = " (TLS)" if args.tls else ""
    goals = [
        goal(
            f"small requests c=32{label}: relay req/s / direct req/s",
            figures["32"]["relay_vs_direct"]["requests_per_s"] or math.nan,
            GOAL_RATIO,
            at_least=True,
        )
    ]
    print()
    print_goals(goals)
    if any(figures[str(c)][path]["errors"] for c in CONCURRENCIES for path in PATHS):
        print("warning: wrk counted errors (see the errors column); the figures are suspect")
    name = f"{NAME}_tls" if args.tls else NAME
    payload = {
        "bench": name,
        "machine": machine,
        "quick": args.quick,
        "runs": runs,
        "duration_s": duration,
        "tls": args.tls,
        "load_generator": "wrk -t1",
        "figures": figures,
        "cpu_us_per_request": cpu,
        "goals": goals,
    }
    print(f"wrote {write_results(name, payload, args.output)}")


def main(argv: list[str] | None = None) -> int:
    args, runs = _parse(argv)
    duration = 2.0 if args.quick else 5.0
    machine = describe_machine()
    print(machine_line(machine))
    print(f"wrk: {machine['wrk']}; {runs} runs of {duration:g} s per figure, median shown")
    with Bench(NAME, profile=args.profile) as bench:
        setup = start(bench, args.tls)
        measured = measure(setup, runs, duration)
    report(args, runs, duration, machine, setup, measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
