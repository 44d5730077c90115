"""Server-Sent Events: latency of the daemon's event feed at 1,000 events/s, direct vs the relay.

Run as ``python -m bench.sse [--quick] [--runs N] [--rate R] [--seconds S] [--profile]`` from
the repository root. On 127.0.0.1: a relay (``repowire relay start``) and the daemon with its
connector. The daemon publishes ``message`` events into its own event log at ``--rate`` per
second on a fixed schedule; each event carries the time it was published (the daemon's
``time`` field, from ``time.time()``). A trio client in this process
(:mod:`tests.support.http_client`) reads ``GET /events/stream`` and notes, for every event,
when its ``data:`` line arrived, on the same clock (same machine):

- ``direct``: the daemon's ``/events/stream``;
- ``relay``: the relay's ``/d/<daemon id>/events/stream`` with a browser session cookie.

Per run, one phase of each (order alternating) of ``--seconds`` seconds (5; ``--quick``: 2);
the first 100 events of a phase are a warm-up and not counted. Reported: latency p50, p99 and
max per path, and the relay's *added* latency (relay minus direct, per run), each the median of
``--runs`` runs. Output: a table on stdout and ``bench/results/sse.json``.
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.sse")

import argparse
import json
import time
from typing import Any

import attrs
import trio

from bench.harness import HOST, Bench, DaemonProcess, RelayProcess
from bench.processes import WorkerError, cpu_seconds
from bench.report import (
    add_common_arguments,
    describe_machine,
    fmt,
    goal,
    machine_line,
    median,
    percentile,
    print_goals,
    print_table,
    ratio,
    resolve_runs,
    rounded,
    write_results,
)
from tests.support.http_client import HttpConnection, connect

NAME = "sse"
DAEMON_ID = "bench-sse"
#: Events at the start of each phase not counted (connection and code paths warming up).
WARMUP_EVENTS = 100
#: Seconds a phase may take beyond its events' schedule before it fails.
PHASE_SLACK = 30.0
#: Goal: the relay adds less than this much latency at the median, in ms.
GOAL_ADDED_P50_MS = 5.0


@attrs.frozen(kw_only=True)
class Phase:
    """One phase: the latency of every counted event, in ms, in arrival order."""

    latencies_ms: list[float]
    events: int
    #: True when the daemon ended the feed because this subscriber fell too far behind.
    dropped: bool
    #: CPU seconds per 1,000 events of the relay and of the daemon process (daemon and
    #: connector), during the phase.
    relay_cpu_per_1000: float
    daemon_cpu_per_1000: float

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def max(self) -> float:
        return max(self.latencies_ms) if self.latencies_ms else float("nan")


async def _read_events(
    connection: HttpConnection, path: str, count: int
) -> tuple[list[float], int, bool]:
    """Read ``count`` ``message`` events; return (latencies in ms of the counted ones, events
    seen, whether the daemon dropped the feed first)."""
    latencies: list[float] = []
    seen = 0
    while seen < count:
        line = await connection.read_line()
        if line is None:
            raise WorkerError(f"{path}: the feed ended after {seen} of {count} events")
        if line.startswith(b"event: dropped"):
            return latencies, seen, True
        if not line.startswith(b"data: "):
            continue
        arrived = time.time()
        event = json.loads(line[6:])
        if event.get("type") != "message":
            continue
        if event["data"]["seq"] != seen:
            raise WorkerError(f"{path}: event {event['data']['seq']} came as number {seen}")
        seen += 1
        if seen > WARMUP_EVENTS:
            latencies.append((arrived - float(event["time"])) * 1000.0)
    return latencies, seen, False


async def _subscribe_and_time(
    daemon: DaemonProcess, route: tuple[int, str, str | None], rate: float, count: int
) -> tuple[list[float], int, bool]:
    port, path, cookie = route
    with trio.fail_after(PHASE_SLACK + count / rate):
        connection = await connect((HOST, port), cookie=cookie)
        async with connection:
            await connection.send_request("GET", path, headers=[("Accept", "text/event-stream")])
            head = await connection.read_head()
            if head.status != 200:
                raise WorkerError(f"{path}: HTTP {head.status}")
            # The feed opens with a "retry:" hint: once it is here, the subscription is live.
            while await connection.read_line():
                pass
            daemon.worker.send({"cmd": "publish", "rate": rate, "count": count})
            timed = await _read_events(connection, path, count)
            await trio.to_thread.run_sync(
                daemon.worker.expect_event, "published", PHASE_SLACK + count / rate
            )
            return timed


def run_phase(
    relay: RelayProcess,
    daemon: DaemonProcess,
    route: tuple[int, str, str | None],
    rate: float,
    count: int,
) -> Phase:
    """Subscribe at ``route`` (port, path, cookie), have the daemon publish ``count`` events,
    time each one's arrival.

    A feed the daemon drops (the subscriber fell more than its buffer behind) ends the phase
    early with ``dropped`` set; the latencies up to the drop are kept.
    """
    cpu_before = (cpu_seconds(relay.pid), cpu_seconds(daemon.worker.pid))
    latencies, seen, dropped = trio.run(_subscribe_and_time, daemon, route, rate, count)
    thousands = max(seen, 1) / 1000.0
    return Phase(
        latencies_ms=latencies,
        events=seen,
        dropped=dropped,
        relay_cpu_per_1000=(cpu_seconds(relay.pid) - cpu_before[0]) / thousands,
        daemon_cpu_per_1000=(cpu_seconds(daemon.worker.pid) - cpu_before[1]) / thousands,
    )


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, int, float, int]:
    """The options, the runs, the seconds per phase and the events per phase."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second (1000)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per phase (5)")
    args = parser.parse_args(argv)
    runs = resolve_runs(parser, args)
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 5.0)
    if args.rate <= 0 or seconds <= 0:
        parser.error("--rate and --seconds must be positive")
    count = max(WARMUP_EVENTS + 1, round(args.rate * seconds))
    return args, runs, seconds, count


def measure(bench: Bench, runs: int, rate: float, count: int) -> dict[str, list[Phase]]:
    """The relay and the daemon; a short warm-up phase per path, then ``runs`` phases of each
    (order alternating)."""
    relay = bench.start_relay()
    [credentials] = bench.credentials()
    daemon = bench.start_daemon(relay, credentials, DAEMON_ID)
    routes: dict[str, tuple[int, str, str | None]] = {
        "direct": (daemon.port, "/events/stream", None),
        "relay": (relay.port, f"/d/{DAEMON_ID}/events/stream", credentials.cookie),
    }
    # One short phase each first: code paths and connections warm up outside the figures.
    for route in routes.values():
        run_phase(relay, daemon, route, rate, WARMUP_EVENTS + 1)
    phases: dict[str, list[Phase]] = {"direct": [], "relay": []}
    for run in range(runs):
        order = ["direct", "relay"] if run % 2 == 0 else ["relay", "direct"]
        for name in order:
            phases[name].append(run_phase(relay, daemon, routes[name], rate, count))
    return phases


@attrs.frozen(kw_only=True)
class Summary:
    """The medians per path, the relay's added latency per run, and the dropped feeds."""

    paths: dict[str, dict[str, float]]
    added_p50: list[float]
    added_p99: list[float]
    drops: dict[str, int]


def summarize(phases: dict[str, list[Phase]]) -> Summary:
    pairs = list(zip(phases["direct"], phases["relay"], strict=True))
    return Summary(
        paths={
            name: {
                "p50_ms": median([p.p50 for p in phases[name]]),
                "p99_ms": median([p.p99 for p in phases[name]]),
                "max_ms": median([p.max for p in phases[name]]),
                "relay_cpu_s_per_1000_events": median([p.relay_cpu_per_1000 for p in phases[name]]),
                "daemon_cpu_s_per_1000_events": median(
                    [p.daemon_cpu_per_1000 for p in phases[name]]
                ),
            }
            for name in phases
        },
        added_p50=[r.p50 - d.p50 for d, r in pairs],
        added_p99=[r.p99 - d.p99 for d, r in pairs],
        drops={name: sum(p.dropped for p in phases[name]) for name in phases},
    )


def print_summary(summary: Summary, runs: int) -> None:
    paths = summary.paths
    rows = [
        [
            name,
            fmt(paths[name]["p50_ms"], 3),
            fmt(paths[name]["p99_ms"], 3),
            fmt(paths[name]["max_ms"], 3),
            f"{summary.drops[name]}/{runs}",
            fmt(paths[name]["relay_cpu_s_per_1000_events"], 3),
            fmt(paths[name]["daemon_cpu_s_per_1000_events"], 3),
            fmt(median(summary.added_p50), 3) if name == "relay" else "",
            fmt(median(summary.added_p99), 3) if name == "relay" else "",
            fmt(ratio(paths["relay"]["p50_ms"], paths["direct"]["p50_ms"]), 2)
            if name == "relay"
            else "",
        ]
        for name in ("direct", "relay")
    ]
    print()
    print_table(
        [
            "path",
            "p50 ms",
            "p99 ms",
            "max ms",
            "feeds dropped",
            "relay CPU s/1k ev",
            "daemon CPU s/1k ev",
            "added p50 ms",
            "added p99 ms",
            "p50 relay/direct",
        ],
        rows,
    )
    if any(summary.drops.values()):
        print(
            "note: a dropped feed fell more than the daemon's subscriber buffer behind: that "
            "path did not keep up with the rate (its latencies are those up to the drop)"
        )


def figures_of(phases: dict[str, list[Phase]], summary: Summary) -> dict[str, Any]:
    figures: dict[str, Any] = {
        name: {
            **{key: rounded(value) for key, value in summary.paths[name].items()},
            "feeds_dropped": summary.drops[name],
            "runs_p50_ms": [round(p.p50, 3) for p in phases[name]],
            "runs_p99_ms": [round(p.p99, 3) for p in phases[name]],
            "runs_events": [p.events for p in phases[name]],
        }
        for name in phases
    }
    figures["added"] = {
        "p50_ms": rounded(median(summary.added_p50)),
        "p99_ms": rounded(median(summary.added_p99)),
        "runs_p50_ms": [round(v, 3) for v in summary.added_p50],
        "runs_p99_ms": [round(v, 3) for v in summary.added_p99],
    }
    figures["relay_vs_direct_p50"] = rounded(
        ratio(summary.paths["relay"]["p50_ms"], summary.paths["direct"]["p50_ms"])
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    args, runs, seconds, count = _parse(argv)
    machine = describe_machine()
    print(machine_line(machine))
    print(
        f"{args.rate:g} events/s for {seconds:g} s per phase ({count} events, first "
        f"{WARMUP_EVENTS} not counted); {runs} runs, median shown"
    )
    with Bench(NAME, profile=args.profile) as bench:
        phases = measure(bench, runs, args.rate, count)
    summary = summarize(phases)
    print_summary(summary, runs)
    goals = [
        goal(
            "SSE added latency p50 (ms)",
            median(summary.added_p50),
            GOAL_ADDED_P50_MS,
            at_least=False,
            unit=" ms",
        ),
        goal(
            f"SSE feeds through the relay that kept up with {args.rate:g} events/s",
            (runs - summary.drops["relay"]) / runs,
            1.0,
            at_least=True,
        ),
    ]
    print()
    print_goals(goals)
    payload = {
        "bench": NAME,
        "machine": machine,
        "quick": args.quick,
        "runs": runs,
        "rate_per_s": args.rate,
        "events_per_phase": count,
        "warmup_events": WARMUP_EVENTS,
        "figures": figures_of(phases, summary),
        "goals": goals,
    }
    print(f"wrote {write_results(NAME, payload, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
