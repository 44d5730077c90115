"""Scale: thousands of idle daemon links on one relay process, and a relay restart.

Run as ``python -m bench.scale [--quick] [--runs N] [--sizes 1000,5000,10000] [--profile]
[--keep]`` from the repository root. For each size N, on 127.0.0.1: a fresh relay
(``repowire relay start``, embedded defaults) and two connector processes with N/2 connectors
each (production defaults; each daemon has its own scope and key), started at a steady rate.
Measured, with nothing tunneled:

- memory per daemon link: (relay RSS with N links - relay RSS with none) / N, from /proc;
- CPU at idle: relay CPU seconds (user + system) over a 10 s window with all N links up
  (keepalive pings both ways are all that happens), median of ``--runs`` windows; the
  connector processes' CPU beside it;
- time until all are back after a relay restart: SIGTERM to the relay (graceful: go-away and
  close 4503 to every link), the old process exits, a new relay starts on the same port; the
  time from the new relay listening, and from the SIGTERM, until it counts N links again
  (``repowire_relay_daemons_connected``). Median of ``--runs`` restarts. Each restart's JSON
  record also has the links counted over time and how the new relay's ``/health`` answered
  meanwhile (polled once a second by a separate client: latency, or unanswered within 10 s).

There is no direct figure to put beside these: a direct connection has no relay.

The file descriptor limit is raised to its hard limit (children inherit it); a size needing more
descriptors than that, or more loopback ports than the ephemeral range, is skipped with the
reason, and the largest size reached is reported. Default sizes 1,000 / 5,000 / 10,000, 3 runs
(``--quick``: 500 / 1,000, 1 run, 5 s windows). Output: a table on stdout and
``bench/results/scale.json``.
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.scale")

import argparse
import collections
import http.client
import math
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import Bench, RelayProcess, http_get, wait_for_links
from bench.processes import Worker, WorkerError, cpu_seconds, raise_fd_limit, rss_bytes
from bench.report import (
    add_common_arguments,
    describe_machine,
    fmt,
    goal,
    machine_line,
    median,
    print_goals,
    print_table,
    resolve_runs,
    rounded,
    write_results,
)

NAME = "scale"
SIZES = (1000, 5000, 10000)
QUICK_SIZES = (500, 1000)
CONNECTOR_PROCESSES = 2
#: Connectors started per second, all processes together (the initial ramp, not the restart).
RAMP_RATE = 500.0
#: Seconds of the CPU-at-idle window.
IDLE_WINDOW = 10.0
QUICK_IDLE_WINDOW = 5.0
#: Seconds to wait after all links are up before measuring memory (pings settle, handshake
#: garbage is collected).
SETTLE = 5.0
#: Descriptors kept free beyond one per link in every process (listeners, SQLite, epoll, pipes).
FD_MARGIN = 512
#: Seconds beyond three times the ramp that all links get to come up (connectors whose first
#: dial failed wait out their backoff, up to its 60 s cap, before trying again).
CONNECT_SLACK = 300.0
#: Seconds a restart may take before the bench gives up on that size.
RESTART_TIMEOUT = 300.0
#: The port connectors would pipe streams to: nothing is tunneled in this bench.
UNUSED_TARGET_PORT = 9
#: Shares of the links whose return after a restart is timed.
RECONNECT_SHARES = (0.5, 0.9, 0.99)
#: Goal: relay RSS for 10,000 idle links under 1 GiB.
GOAL_BYTES_10K = 2**30
#: Seconds between the /health polls made while the links come back after a restart.
HEALTH_INTERVAL = 1.0
#: Seconds a /health poll may take before it counts as unanswered.
HEALTH_TIMEOUT = 10.0
#: Most points of the links-over-time series kept per restart in the JSON.
PROGRESS_POINTS = 60


def _poll_interval(size: int) -> float:
    """Seconds between polls of the relay's /metrics: rarer when the relay is busy with many
    links, so the polls do not add to its load."""
    return 0.2 if size <= 2000 else 0.5


def _ephemeral_ports() -> int:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 28_000
    return high - low + 1


def _why_not(size: int, fd_limit: int) -> str | None:
    """Why ``size`` links cannot be tried on this machine, or None."""
    if size + FD_MARGIN > fd_limit:
        return (
            f"{size} links need about {size + FD_MARGIN} file descriptors in the relay; "
            f"RLIMIT_NOFILE allows {fd_limit} (hard limit)"
        )
    ports = _ephemeral_ports()
    if size > ports // 2:
        return f"{size} links (twice over, across a restart) exceed {ports} ephemeral ports"
    return None


def _measure_size(
    bench: Bench,
    size: int,
    keys: list[str],
    runs: int,
    idle_window: float,
    keepalive: float | None,
) -> dict[str, Any]:
    """A fresh relay, ``size`` connectors ramped up, then memory, idle CPU and restarts."""
    relay = bench.start_relay(data_dir=bench.relay_data_dir())
    http_get(relay.port, "/health")
    time.sleep(1.0)
    idle_rss = rss_bytes(relay.pid)
    pairs = [(f"bench-{index:05d}", keys[index]) for index in range(size)]
    started = time.monotonic()
    workers: list[Worker] = [
        bench.start_connectors(
            relay,
            pairs[part::CONNECTOR_PROCESSES],
            UNUSED_TARGET_PORT,
            rate=RAMP_RATE / CONNECTOR_PROCESSES,
            name=f"connectors-{size}-{part}",
            keepalive=keepalive,
        )
        for part in range(CONNECTOR_PROCESSES)
    ]
    result: dict[str, Any] = {"links": size, "relay_rss_idle_bytes": idle_rss}
    try:
        all_up = _wait_connected(relay, workers, size, started)
        result["seconds_to_connect_at_ramp"] = round(all_up - started, 2)
        time.sleep(SETTLE)
        rss = rss_bytes(relay.pid)
        result["relay_rss_bytes"] = rss
        result["relay_bytes_per_link"] = round((rss - idle_rss) / size)
        result["connector_rss_bytes_per_link"] = round(
            sum(rss_bytes(w.pid) for w in workers) / size
        )
        result.update(_idle_cpu(relay, workers, runs, idle_window))
        relay = _restarts(bench, relay, workers, size, runs, result)
    finally:
        for worker in [*workers, relay.worker]:
            worker.terminate()
        for worker in [*workers, relay.worker]:
            worker.stop()
            bench.forget(worker)
    return result


def _wait_connected(relay: RelayProcess, workers: list[Worker], size: int, started: float) -> float:
    """Wait for ``size`` links; the monotonic time they were all up. Raises
    :class:`WorkerError` saying why not."""
    cpu_at_start = cpu_seconds(relay.pid)
    try:
        return wait_for_links(
            relay, size, timeout=size / RAMP_RATE * 3 + CONNECT_SLACK, poll=_poll_interval(size)
        )
    except WorkerError as exc:
        # Say why: the relay's CPU share (a process near a full core cannot take more
        # links) and what the connectors left out report as their last error.
        share = (cpu_seconds(relay.pid) - cpu_at_start) / (time.monotonic() - started)
        raise WorkerError(
            f"{exc}; the relay process used {share:.0%} of a core on average meanwhile"
            + _left_out(workers)
        ) from None


def _idle_cpu(
    relay: RelayProcess, workers: list[Worker], runs: int, idle_window: float
) -> dict[str, Any]:
    """CPU seconds per 10 s of the relay and of the connector processes, all links idle."""
    cpu: list[float] = []
    connector_cpu: list[float] = []
    for _ in range(runs):
        before = cpu_seconds(relay.pid), [cpu_seconds(w.pid) for w in workers]
        time.sleep(idle_window)
        cpu.append((cpu_seconds(relay.pid) - before[0]) * IDLE_WINDOW / idle_window)
        connector_cpu.append(
            sum(cpu_seconds(w.pid) - b for w, b in zip(workers, before[1], strict=True))
            * IDLE_WINDOW
            / idle_window
        )
    return {
        "relay_cpu_s_per_10s_idle": round(median(cpu), 3),
        "runs_relay_cpu_s_per_10s_idle": [round(v, 3) for v in cpu],
        "connectors_cpu_s_per_10s_idle": round(median(connector_cpu), 3),
    }


def _restarts(
    bench: Bench,
    relay: RelayProcess,
    workers: list[Worker],
    size: int,
    runs: int,
    result: dict[str, Any],
) -> RelayProcess:
    """``runs`` relay restarts, their figures added to ``result`` (or ``restart_failed``);
    returns the relay now running."""
    restarts: list[dict[str, Any]] = []
    result["restarts"] = restarts
    for _ in range(runs):
        try:
            record, relay = _restart(bench, relay, size)
        except WorkerError as exc:
            # What was measured before stays; the failure is a figure too.
            result["restart_failed"] = f"{exc}{_left_out(workers)}"
            print(f"  {size} links: restart: {result['restart_failed']}", flush=True)
            return relay
        restarts.append(record)
    result["restart_back_after_listen_s"] = round(
        median([r["back_after_listen_s"] for r in restarts]), 2
    )
    result["restart_back_after_sigterm_s"] = round(
        median([r["back_after_sigterm_s"] for r in restarts]), 2
    )
    for share in RECONNECT_SHARES:
        key = f"{round(share * 100)}pct_after_listen_s"
        result[f"restart_{key}"] = round(median([r[key] for r in restarts]), 2)
    result["restart_health_unanswered"] = sum(r["health_unanswered"] for r in restarts)
    slowest = [r["health_max_ms"] for r in restarts if r["health_max_ms"] is not None]
    result["restart_health_max_ms"] = max(slowest) if slowest else None
    time.sleep(SETTLE)
    result["relay_rss_after_restart_bytes"] = rss_bytes(relay.pid)
    return relay


def _left_out(workers: list[Worker]) -> str:
    """What the connectors not connected report as their last errors (most common first)."""
    reasons: collections.Counter[str] = collections.Counter()
    for worker in workers:
        latest = worker.latest_event("progress") or {}
        reasons.update(latest.get("not_connected_because") or {})
    told = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(3))
    return f"; the connectors left out say: {told}" if told else ""


class HealthWatch:
    """Polls a relay's ``/health`` from a thread, once per :data:`HEALTH_INTERVAL`, and keeps
    each poll's latency (None when it went unanswered within :data:`HEALTH_TIMEOUT`)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(HEALTH_TIMEOUT + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, _ = http_get(self.port, "/health", timeout=HEALTH_TIMEOUT)
            except (OSError, http.client.HTTPException):
                self.latencies.append(None)
            else:
                self.latencies.append(time.monotonic() - started if status == 200 else None)
            self._stop.wait(max(0.0, HEALTH_INTERVAL - (time.monotonic() - started)))

    def summary(self) -> dict[str, Any]:
        answered = sorted(v for v in self.latencies if v is not None)
        return {
            "health_polls": len(self.latencies),
            "health_unanswered": len(self.latencies) - len(answered),
            "health_p50_ms": round(median(answered) * 1000, 1) if answered else None,
            "health_max_ms": round(answered[-1] * 1000, 1) if answered else None,
        }


def _thinned(progress: list[tuple[float, int]], origin: float) -> list[list[float]]:
    """At most :data:`PROGRESS_POINTS` of ``(seconds after origin, links)``, the last kept."""
    step = max(1, math.ceil(len(progress) / PROGRESS_POINTS))
    kept = progress[::step]
    if progress and kept[-1] is not progress[-1]:
        kept.append(progress[-1])
    return [[round(t - origin, 2), seen] for t, seen in kept]


def _restart(bench: Bench, relay: RelayProcess, size: int) -> tuple[dict[str, Any], RelayProcess]:
    """SIGTERM ``relay``, start a new one on its port, wait for every link to come back."""
    term = time.monotonic()
    relay.worker.stop(timeout=RESTART_TIMEOUT)
    bench.forget(relay.worker)
    exited = time.monotonic()
    fresh = bench.start_relay(port=relay.port, data_dir=relay.data_dir)
    listening = time.monotonic()
    progress: list[tuple[float, int]] = []
    with HealthWatch(fresh.port) as health:
        try:
            back = wait_for_links(
                fresh, size, timeout=RESTART_TIMEOUT, poll=_poll_interval(size), progress=progress
            )
        except WorkerError as exc:
            summary = health.summary()
            raise WorkerError(
                f"{exc}; meanwhile /health went unanswered {summary['health_unanswered']} of "
                f"{summary['health_polls']} times"
            ) from None
    record: dict[str, Any] = {
        "shutdown_s": round(exited - term, 2),
        "start_s": round(listening - exited, 2),
        "back_after_listen_s": round(back - listening, 2),
        "back_after_sigterm_s": round(back - term, 2),
    }
    # How the herd comes back: seconds after listening until each share of the links is up.
    for share in RECONNECT_SHARES:
        first = next((t for t, seen in progress if seen >= share * size), back)
        record[f"{round(share * 100)}pct_after_listen_s"] = round(first - listening, 2)
    record.update(health.summary())
    record["links_after_listen"] = _thinned(progress, listening)
    return record, fresh


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, int, tuple[int, ...]]:
    """The options, the runs and the sizes."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sizes", default=None, help="comma-separated link counts")
    parser.add_argument(
        "--connector-keepalive",
        type=float,
        default=None,
        help="what-if: seconds between each connector's pings (default: the product's)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the bench's temporary directory (the relay's and the workers' logs)",
    )
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        parser.error("--runs must be at least 1")
    resolve_runs(parser, args)
    try:
        sizes = (
            tuple(int(part) for part in args.sizes.split(","))
            if args.sizes
            else (QUICK_SIZES if args.quick else SIZES)
        )
    except ValueError:
        parser.error("--sizes takes comma-separated integers, e.g. 1000,5000")
    if any(size < CONNECTOR_PROCESSES for size in sizes):
        parser.error(f"every size must be at least {CONNECTOR_PROCESSES}")
    return args, runs, sizes


def measure_sizes(
    args: argparse.Namespace, runs: int, sizes: tuple[int, ...], fd_limit: int, idle_window: float
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Each size the machine allows, smallest first, until one fails; the figures per size,
    and why a size was not measured."""
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with Bench(NAME, profile=args.profile, keep=args.keep) as bench:
        usable = [size for size in sizes if _why_not(size, fd_limit) is None]
        for size in sizes:
            reason = _why_not(size, fd_limit)
            if reason is not None:
                skipped[str(size)] = reason
        keys = bench.keys(max(usable)) if usable else []
        for size in usable:
            print(f"measuring {size} links ...", flush=True)
            try:
                results.append(
                    _measure_size(bench, size, keys, runs, idle_window, args.connector_keepalive)
                )
            except WorkerError as exc:
                skipped[str(size)] = f"failed: {exc}"
                print(f"  {size} links: {exc}", flush=True)
                break
    return results, skipped


def _cell(record: dict[str, Any], key: str, scale: float = 1.0, digits: int = 1) -> str:
    value = record.get(key)
    return fmt(value / scale, digits) if isinstance(value, int | float) else "-"


def print_sizes(results: list[dict[str, Any]], skipped: dict[str, str]) -> None:
    rows = [
        [
            str(r["links"]),
            _cell(r, "seconds_to_connect_at_ramp"),
            _cell(r, "relay_rss_bytes", 2**20, 0),
            _cell(r, "relay_bytes_per_link", 1024),
            _cell(r, "relay_cpu_s_per_10s_idle", digits=2),
            _cell(r, "connectors_cpu_s_per_10s_idle", digits=2),
            _cell(r, "restart_50pct_after_listen_s"),
            _cell(r, "restart_90pct_after_listen_s"),
            _cell(r, "restart_back_after_listen_s"),
            _cell(r, "restart_back_after_sigterm_s"),
            _cell(r, "restart_health_max_ms", 1000),
            _cell(r, "relay_rss_after_restart_bytes", 2**20, 0),
        ]
        for r in results
    ]
    print()
    print_table(
        [
            "links",
            "connect s",
            "relay RSS MiB",
            "KiB/link",
            "relay CPU s/10 s idle",
            "connectors CPU s/10 s",
            "50% back s",
            "90% back s",
            "all back s",
            "back after SIGTERM s",
            "/health max s (restart)",
            "RSS after restart MiB",
        ],
        rows,
    )
    for label, reason in skipped.items():
        print(f"not measured: {label} links: {reason}")
    for r in results:
        if "restart_failed" in r:
            print(f"restart of the relay with {r['links']} links: {r['restart_failed']}")


def memory_goal(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Relay RSS at 10,000 links: measured, or projected from the largest size measured."""
    at_10k = next((r for r in results if r["links"] == 10_000), None)
    projected = math.nan
    if at_10k is not None:
        projected = float(at_10k["relay_rss_bytes"])
    elif results:
        projected = float(
            results[-1]["relay_rss_idle_bytes"] + 10_000 * results[-1]["relay_bytes_per_link"]
        )
    return goal(
        "relay RSS with 10,000 idle links, MiB"
        + ("" if at_10k is not None else " (projected from the largest size measured)"),
        projected / 2**20,
        GOAL_BYTES_10K / 2**20,
        at_least=False,
        unit=" MiB",
    )


def main(argv: list[str] | None = None) -> int:
    args, runs, sizes = _parse(argv)
    idle_window = QUICK_IDLE_WINDOW if args.quick else IDLE_WINDOW
    fd_limit = raise_fd_limit()
    machine = describe_machine()
    print(machine_line(machine))
    if args.connector_keepalive is not None:
        print(f"what-if: connectors ping every {args.connector_keepalive:g} s")
    print(
        f"sizes {', '.join(map(str, sizes))}; {CONNECTOR_PROCESSES} connector processes, ramp "
        f"{RAMP_RATE:g}/s; idle CPU over {idle_window:g} s windows (shown per 10 s); {runs} "
        f"runs; RLIMIT_NOFILE {fd_limit}"
    )
    results, skipped = measure_sizes(args, runs, sizes, fd_limit, idle_window)
    print_sizes(results, skipped)
    largest = max((r["links"] for r in results), default=0)
    print(f"largest size measured: {largest} links")
    per_link = [r["relay_bytes_per_link"] for r in results]
    goals = [memory_goal(results)]
    print()
    print_goals(goals)
    payload = {
        "bench": NAME,
        "machine": machine,
        "quick": args.quick,
        "runs": runs,
        "fd_limit": fd_limit,
        "connector_processes": CONNECTOR_PROCESSES,
        "ramp_per_s": RAMP_RATE,
        "idle_window_s": idle_window,
        "connector_keepalive_s": args.connector_keepalive,
        "sizes": results,
        "skipped": skipped,
        "largest_measured": largest,
        "goals": goals,
        "relay_rss_per_link_bytes": rounded(median(per_link), 0) if per_link else None,
    }
    print(f"wrote {write_results(NAME, payload, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
