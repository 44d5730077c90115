"""Server-Sent Events: latency of the daemon's event feed at 1,000 events/s, direct vs the relay.

Run as ``python bench/sse.py [--quick] [--runs N] [--rate R] [--seconds S] [--profile]``. On
127.0.0.1: a relay (``repowire relay start``) and the daemon with its connector. The daemon
publishes ``message`` events into its own event log at ``--rate`` per second on a fixed
schedule; each event carries the time it was published (the daemon's ``time`` field, from
``time.time()``). A client in this process reads ``GET /events/stream`` and notes, for every
event, when its ``data:`` line arrived, on the same clock (same machine):

- ``direct``: the daemon's ``/events/stream``;
- ``relay``: the relay's ``/d/<daemon id>/events/stream`` with a browser session cookie.

Per run, one phase of each (order alternating) of ``--seconds`` seconds (5; ``--quick``: 2);
the first 100 events of a phase are a warm-up and not counted. Reported: latency p50, p99 and
max per path, and the relay's *added* latency (relay minus direct, per run), each the median of
``--runs`` runs. Output: a table on stdout and ``bench/results/sse.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from pathlib import Path
from typing import Any

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    HOST,
    Bench,
    DaemonProcess,
    RelayProcess,
    WorkerError,
    add_common_arguments,
    cpu_seconds,
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

NAME = "sse"
DAEMON_ID = "bench-sse"
#: Events at the start of each phase not counted (connection and code paths warming up).
WARMUP_EVENTS = 100
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


def run_phase(
    relay: RelayProcess,
    daemon: DaemonProcess,
    port: int,
    path: str,
    cookie: str | None,
    rate: float,
    count: int,
) -> Phase:
    """Subscribe, have the daemon publish ``count`` events, time each one's arrival.

    A feed the daemon drops (the subscriber fell more than its buffer behind) ends the phase
    early with ``dropped`` set; the latencies up to the drop are kept.
    """
    cpu_before = (cpu_seconds(relay.pid), cpu_seconds(daemon.worker.pid))
    dropped = False
    connection = http.client.HTTPConnection(HOST, port, timeout=30 + count / rate)
    try:
        headers = {"Accept": "text/event-stream"}
        if cookie is not None:
            headers["Cookie"] = cookie
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            raise WorkerError(f"{path}: HTTP {response.status}: {response.read(200)!r}")
        # The feed opens with a "retry:" hint: once it is here, the subscription is live.
        while response.readline() not in (b"\n", b""):
            pass
        daemon.worker.send({"cmd": "publish", "rate": rate, "count": count})
        latencies: list[float] = []
        seen = 0
        while seen < count:
            line = response.readline()
            if not line:
                raise WorkerError(f"{path}: the feed ended after {seen} of {count} events")
            if line.startswith(b"event: dropped"):
                dropped = True
                break
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
        daemon.worker.expect_event("published", 30 + count / rate)
    finally:
        connection.close()
    thousands = max(seen, 1) / 1000.0
    return Phase(
        latencies_ms=latencies,
        events=seen,
        dropped=dropped,
        relay_cpu_per_1000=(cpu_seconds(relay.pid) - cpu_before[0]) / thousands,
        daemon_cpu_per_1000=(cpu_seconds(daemon.worker.pid) - cpu_before[1]) / thousands,
    )


def main(argv: list[str] | None = None) -> int:
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
    machine = describe_machine()
    print(machine_line(machine))
    print(
        f"{args.rate:g} events/s for {seconds:g} s per phase ({count} events, first "
        f"{WARMUP_EVENTS} not counted); {runs} runs, median shown"
    )

    phases: dict[str, list[Phase]] = {"direct": [], "relay": []}
    with Bench(NAME, profile=args.profile) as bench:
        relay = bench.start_relay()
        [credentials] = bench.credentials()
        daemon = bench.start_daemon(relay, credentials, DAEMON_ID)
        targets: dict[str, tuple[int, str, str | None]] = {
            "direct": (daemon.port, "/events/stream", None),
            "relay": (relay.port, f"/d/{DAEMON_ID}/events/stream", credentials.cookie),
        }
        # One short phase each first: code paths and connections warm up outside the figures.
        for port, path, cookie in targets.values():
            run_phase(relay, daemon, port, path, cookie, args.rate, WARMUP_EVENTS + 1)
        for run in range(runs):
            order = ["direct", "relay"] if run % 2 == 0 else ["relay", "direct"]
            for name in order:
                port, path, cookie = targets[name]
                phases[name].append(run_phase(relay, daemon, port, path, cookie, args.rate, count))

    added_p50 = [r.p50 - d.p50 for d, r in zip(phases["direct"], phases["relay"], strict=True)]
    added_p99 = [r.p99 - d.p99 for d, r in zip(phases["direct"], phases["relay"], strict=True)]
    summary: dict[str, dict[str, float]] = {
        name: {
            "p50_ms": median([p.p50 for p in phases[name]]),
            "p99_ms": median([p.p99 for p in phases[name]]),
            "max_ms": median([p.max for p in phases[name]]),
            "relay_cpu_s_per_1000_events": median([p.relay_cpu_per_1000 for p in phases[name]]),
            "daemon_cpu_s_per_1000_events": median([p.daemon_cpu_per_1000 for p in phases[name]]),
        }
        for name in phases
    }
    drops = {name: sum(p.dropped for p in phases[name]) for name in phases}
    rows = [
        [
            name,
            fmt(summary[name]["p50_ms"], 3),
            fmt(summary[name]["p99_ms"], 3),
            fmt(summary[name]["max_ms"], 3),
            f"{drops[name]}/{runs}",
            fmt(summary[name]["relay_cpu_s_per_1000_events"], 3),
            fmt(summary[name]["daemon_cpu_s_per_1000_events"], 3),
            fmt(median(added_p50), 3) if name == "relay" else "",
            fmt(median(added_p99), 3) if name == "relay" else "",
            fmt(ratio(summary["relay"]["p50_ms"], summary["direct"]["p50_ms"]), 2)
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
    if any(drops.values()):
        print(
            "note: a dropped feed fell more than the daemon's subscriber buffer behind: that "
            "path did not keep up with the rate (its latencies are those up to the drop)"
        )
    goals = [
        goal(
            "SSE added latency p50 (ms)",
            median(added_p50),
            GOAL_ADDED_P50_MS,
            at_least=False,
            unit=" ms",
        ),
        goal(
            f"SSE feeds through the relay that kept up with {args.rate:g} events/s",
            (runs - drops["relay"]) / runs,
            1.0,
            at_least=True,
        ),
    ]
    print()
    print_goals(goals)
    figures: dict[str, Any] = {
        name: {
            **{key: rounded(value) for key, value in summary[name].items()},
            "feeds_dropped": drops[name],
            "runs_p50_ms": [round(p.p50, 3) for p in phases[name]],
            "runs_p99_ms": [round(p.p99, 3) for p in phases[name]],
            "runs_events": [p.events for p in phases[name]],
        }
        for name in phases
    }
    figures["added"] = {
        "p50_ms": rounded(median(added_p50)),
        "p99_ms": rounded(median(added_p99)),
        "runs_p50_ms": [round(v, 3) for v in added_p50],
        "runs_p99_ms": [round(v, 3) for v in added_p99],
    }
    figures["relay_vs_direct_p50"] = rounded(
        ratio(summary["relay"]["p50_ms"], summary["direct"]["p50_ms"])
    )
    written = write_results(
        NAME,
        {
            "bench": NAME,
            "machine": machine,
            "quick": args.quick,
            "runs": runs,
            "rate_per_s": args.rate,
            "events_per_phase": count,
            "warmup_events": WARMUP_EVENTS,
            "figures": figures,
            "goals": goals,
        },
        args.output,
    )
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
