"""Fairness: 100 concurrent downloads from one daemon, one of whose readers stops.

Run as ``python -m bench.fairness [--quick] [--runs N] [--streams N] [--profile]`` from the
repository root. On 127.0.0.1: a relay (``repowire relay start``), the bench's target server
and a connector linking it to the relay. A trio client in this process
(:mod:`tests.support.http_client`) opens ``--streams`` (100) concurrent endless
downloads (``GET /bytes?n=-1``) and counts what each receives during a measurement window that
starts after a warm-up. Two kinds of round:

- ``baseline``: every reader reads;
- ``stalled``: reader 0 reads its first 64 KiB and then stops reading (its connection stays
  open), for the whole round.

The figure is the aggregate throughput of readers 1..N-1 (the same streams in both kinds), in
MB/s; the stall's cost is ``1 - stalled / baseline``. Through the relay all downloads are
streams of one daemon link, so a stalled stream must cost the others nothing but its own
flow-control window. The same rounds run ``direct`` (to the target server) for comparison.
During relay rounds the relay's RSS is sampled from /proc every 0.25 s: a stalled reader must
not make it grow. Each figure is the median of ``--runs`` runs (5; ``--quick``: 3, shorter).

Then a stall-tolerance sweep (relay only: direct connections share nothing): for K stalled
readers (downloads whose readers never read a byte of body), wait for their buffers to fill,
then time one small request through the same daemon link; a request that gets no answer within
5 s counts as hung. The design brief says a stalled stream never delays the others: below the
relay's per-link stream limit none may hang. At the limit every slot is taken, so the probe
waiting for one is expected and reported apart.
After each K the bench waits for the relay's open-stream gauge to return to zero (nothing
leaked). Output: tables on stdout and ``bench/results/fairness.json``.
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.fairness")

import argparse
import math
import time
from typing import Any

import attrs
import trio

from bench.harness import HOST, Bench, RelayProcess, relay_metric, wait_for_links
from bench.processes import WorkerError, rss_bytes
from bench.report import (
    MB,
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
from relay import RelaySettings
from tests.support.http_client import HttpConnection, HttpError, connect, request

NAME = "fairness"
DAEMON_ID = "bench-fair"
#: The stalled reader reads this much of its body, then stops.
STALL_AFTER = 64 * 1024
#: Bytes per receive of each reader.
RECEIVE_SIZE = 256 * 1024
#: Seconds all streams of a round get to receive their response heads.
OPEN_TIMEOUT = 60.0
#: Seconds between RSS samples.
SAMPLE_INTERVAL = 0.25
#: The relay's limit on concurrent streams per daemon link (its default setting): the sweep
#: goes up to it. At the limit every slot is held by a stalled reader, so a new request waits
#: for a slot: that step is expected to hang and is reported apart.
STREAM_LIMIT = int(attrs.fields(RelaySettings).max_streams_per_link.default or 0)
#: Stalled-reader counts of the sweep, full and quick (the limit minus one leaves the probe a
#: slot).
SWEEP = tuple(
    sorted({1, 16, 32, 48, 64, 96, 128, STREAM_LIMIT // 2, STREAM_LIMIT - 1, STREAM_LIMIT})
)
SWEEP_QUICK = tuple(sorted({1, 64, STREAM_LIMIT - 1, STREAM_LIMIT}))
#: Seconds the stalled readers' buffers get to fill before the probe: a base, plus a share
#: per stalled reader (each holds its stream window and socket buffers).
SWEEP_SETTLE = 3.0
SWEEP_SETTLE_PER_READER = 0.02
#: A probe not answered within this many seconds counts as hung.
PROBE_TIMEOUT = 5.0
#: Seconds the relay gets to close every stream of a sweep step.
DRAIN_TIMEOUT = 20.0
#: Goal: the stalled reader costs the others less than this fraction of their throughput.
GOAL_COST = 0.10


@attrs.frozen(kw_only=True)
class Round:
    """One round: healthy readers' aggregate and per-stream MB/s, RSS samples (bytes)."""

    aggregate_mb_per_s: float
    slowest_mb_per_s: float
    median_stream_mb_per_s: float
    rss_samples: list[int]
    connector_rss_samples: list[int]


async def _round(
    port: int,
    prefix: str,
    cookie: str | None,
    streams: int,
    stall: bool,
    warmup: float,
    window: float,
    pids: tuple[int, int] | None,
) -> Round:
    counts = [0] * streams
    # All readers open at once and read as soon as their head is in: opened one after the
    # other, the last ones would wait behind bodies already flowing. (Holding every body back
    # until all are open is no better: unread streams hold the link's session window, see
    # the stall-tolerance sweep.)
    heads = [0]
    all_heads = trio.Event()

    async def reader(index: int) -> None:
        connection = await connect((HOST, port), cookie=cookie)
        async with connection:
            await connection.send_request("GET", f"{prefix}/bytes?n=-1", close=True)
            head = await connection.read_head()
            if head.status != 200:
                raise WorkerError(f"stream {index}: HTTP {head.status}")
            heads[0] += 1
            if heads[0] == streams:
                all_heads.set()
            if stall and index == 0:
                await _read_then_stall(connection)
            while True:
                data = await connection.receive_body(RECEIVE_SIZE)
                if not data:
                    raise WorkerError(f"stream {index}: the download ended")
                counts[index] += len(data)

    rss: list[int] = []
    connector_rss: list[int] = []
    async with trio.open_nursery() as nursery:
        for index in range(streams):
            nursery.start_soon(reader, index)
        with trio.fail_after(OPEN_TIMEOUT):
            await all_heads.wait()
        await trio.sleep(warmup)
        start_counts = list(counts)
        started = trio.current_time()
        deadline = started + window
        while True:
            if pids is not None:
                rss.append(rss_bytes(pids[0]))
                connector_rss.append(rss_bytes(pids[1]))
            now = trio.current_time()
            if now >= deadline:
                break
            await trio.sleep(min(SAMPLE_INTERVAL, deadline - now))
        elapsed = trio.current_time() - started
        end_counts = list(counts)
        nursery.cancel_scope.cancel()
    rates = [(end_counts[i] - start_counts[i]) / elapsed / MB for i in range(1, streams)]
    return Round(
        aggregate_mb_per_s=sum(rates),
        slowest_mb_per_s=min(rates),
        median_stream_mb_per_s=median(rates),
        rss_samples=rss,
        connector_rss_samples=connector_rss,
    )


async def _read_then_stall(connection: HttpConnection) -> None:
    """Read the first :data:`STALL_AFTER` bytes of the body, then never read again."""
    body = 0
    while body < STALL_AFTER:
        body += len(await connection.receive_body(STALL_AFTER - body))
    await trio.sleep_forever()


async def _probe_with_stalled(port: int, prefix: str, cookie: str | None, stalled: int) -> float:
    """Open ``stalled`` downloads never read, then time one ``/small`` request; returns the
    seconds it took, or NaN if it got no answer within :data:`PROBE_TIMEOUT`."""
    connections: list[HttpConnection] = []
    try:
        for _ in range(stalled):
            connection = await connect((HOST, port), cookie=cookie)
            connections.append(connection)
            await connection.send_request("GET", f"{prefix}/bytes?n=-1", close=True)
        await trio.sleep(SWEEP_SETTLE + SWEEP_SETTLE_PER_READER * stalled)
        started = trio.current_time()
        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                answer = await request((HOST, port), "GET", f"{prefix}/small", cookie=cookie)
            except HttpError as exc:
                raise WorkerError(f"the probe's answer was broken: {exc}") from None
            if answer.status != 200:
                raise WorkerError(f"the probe got HTTP {answer.status}")
            return trio.current_time() - started
        return float("nan")
    finally:
        for connection in connections:
            await trio.aclose_forcefully(connection.stream)


def _wait_streams_closed(relay: RelayProcess) -> float:
    """Wait until the relay has no stream open; return the seconds it took."""
    started = time.monotonic()
    while relay_metric(relay, "repowire_relay_streams_open") > 0:
        if time.monotonic() - started > DRAIN_TIMEOUT:
            raise WorkerError(
                f"relay streams still open {DRAIN_TIMEOUT:g} s after the clients left"
            )
        time.sleep(0.1)
    return time.monotonic() - started


@attrs.frozen(kw_only=True)
class Paths:
    """The relay and the connector, and where each path's downloads go."""

    relay: RelayProcess
    connector_pid: int
    #: ``(port, path prefix, cookie)`` per path.
    routes: dict[str, tuple[int, str, str | None]]


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, int]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--streams", type=int, default=100, help="concurrent downloads (100)")
    args = parser.parse_args(argv)
    runs = resolve_runs(parser, args)
    if args.streams < 2:
        parser.error("--streams must be at least 2")
    return args, runs


def start(bench: Bench) -> Paths:
    relay = bench.start_relay()
    [credentials] = bench.credentials()
    _, target_port = bench.start_target()
    connector = bench.start_connectors(relay, [(DAEMON_ID, credentials.key)], target_port)
    wait_for_links(relay, 1, 30)
    return Paths(
        relay=relay,
        connector_pid=connector.pid,
        routes={
            "direct": (target_port, "", None),
            "relay": (relay.port, f"/d/{DAEMON_ID}", credentials.cookie),
        },
    )


def run_rounds(
    paths: Paths, runs: int, streams: int, warmup: float, window: float
) -> dict[tuple[str, str], list[Round]]:
    """``runs`` baseline and stalled rounds on each path (the kinds' order alternating)."""
    rounds: dict[tuple[str, str], list[Round]] = {
        (path, kind): [] for path in ("direct", "relay") for kind in ("baseline", "stalled")
    }
    for run in range(runs):
        kinds = ["baseline", "stalled"] if run % 2 == 0 else ["stalled", "baseline"]
        for path in ("direct", "relay"):
            port, prefix, cookie = paths.routes[path]
            pids = (paths.relay.pid, paths.connector_pid) if path == "relay" else None
            for kind in kinds:
                rounds[(path, kind)].append(
                    trio.run(
                        _round,
                        port,
                        prefix,
                        cookie,
                        streams,
                        kind == "stalled",
                        warmup,
                        window,
                        pids,
                    )
                )
    return rounds


@attrs.frozen(kw_only=True)
class Sweep:
    """Per stalled-reader count: each probe's seconds (NaN: hung) and the relay's peak RSS;
    and the seconds the relay took to close every stream after each step."""

    probes: dict[int, list[float]]
    rss: dict[int, int]
    drains: list[float]


def run_sweep(paths: Paths, quick: bool) -> Sweep:
    relay = paths.relay
    port, prefix, cookie = paths.routes["relay"]
    counts = SWEEP_QUICK if quick else SWEEP
    probes: dict[int, list[float]] = {count: [] for count in counts}
    rss: dict[int, int] = {}
    drains: list[float] = []
    for _ in range(1 if quick else 2):
        for count in counts:
            probes[count].append(trio.run(_probe_with_stalled, port, prefix, cookie, count))
            rss[count] = max(rss.get(count, 0), rss_bytes(relay.pid))
            drains.append(_wait_streams_closed(relay))
    return Sweep(probes=probes, rss=rss, drains=drains)


def _relay_rss(
    entry: dict[str, Any], base: list[Round], stalled: list[Round], idle: int, final: int
) -> str:
    """Add the relay's and the connector's RSS figures to ``entry``; return the table cell."""
    for kind, group in (("baseline", base), ("stalled", stalled)):
        peaks = [max(r.rss_samples) for r in group]
        growth = [r.rss_samples[-1] - r.rss_samples[0] for r in group]
        entry[f"{kind}_relay_rss_peak_bytes"] = max(peaks)
        entry[f"{kind}_relay_rss_growth_in_window_bytes"] = [int(g) for g in growth]
        entry[f"{kind}_connector_rss_peak_bytes"] = max(max(r.connector_rss_samples) for r in group)
    entry["relay_rss_idle_bytes"] = idle
    entry["relay_rss_after_bytes"] = final
    mib = [
        idle / 2**20,
        entry["baseline_relay_rss_peak_bytes"] / 2**20,
        entry["stalled_relay_rss_peak_bytes"] / 2**20,
    ]
    return " / ".join(f"{value:.0f}" for value in mib)


def throughput_figures(
    rounds: dict[tuple[str, str], list[Round]], idle_rss: int, final_rss: int
) -> tuple[dict[str, Any], list[list[str]], dict[str, float]]:
    """The JSON figures, the table rows and the stall's cost per path."""
    costs: dict[str, float] = {}
    figures: dict[str, Any] = {}
    rows: list[list[str]] = []
    for path in ("direct", "relay"):
        base = rounds[(path, "baseline")]
        stalled = rounds[(path, "stalled")]
        base_rate = median([r.aggregate_mb_per_s for r in base])
        stalled_rate = median([r.aggregate_mb_per_s for r in stalled])
        cost = 1 - ratio(stalled_rate, base_rate)
        costs[path] = cost
        entry: dict[str, Any] = {
            "baseline_mb_per_s": rounded(base_rate, 1),
            "stalled_mb_per_s": rounded(stalled_rate, 1),
            "stall_cost": rounded(cost),
            "baseline_slowest_stream_mb_per_s": rounded(median([r.slowest_mb_per_s for r in base])),
            "stalled_slowest_stream_mb_per_s": rounded(
                median([r.slowest_mb_per_s for r in stalled])
            ),
            "stalled_median_stream_mb_per_s": rounded(
                median([r.median_stream_mb_per_s for r in stalled])
            ),
            "runs_baseline_mb_per_s": [round(r.aggregate_mb_per_s, 1) for r in base],
            "runs_stalled_mb_per_s": [round(r.aggregate_mb_per_s, 1) for r in stalled],
        }
        rss_note = ""
        if path == "relay":
            rss_note = _relay_rss(entry, base, stalled, idle_rss, final_rss)
        figures[path] = entry
        rows.append(
            [
                path,
                fmt(base_rate),
                fmt(stalled_rate),
                fmt(cost * 100, 1) + " %",
                fmt(entry["stalled_slowest_stream_mb_per_s"], 3),
                rss_note,
            ]
        )
    figures["relay_vs_direct_baseline"] = rounded(
        ratio(figures["relay"]["baseline_mb_per_s"], figures["direct"]["baseline_mb_per_s"])
    )
    return figures, rows, costs


def sweep_figures(sweep: Sweep) -> tuple[dict[str, Any], list[list[str]]]:
    rows: list[list[str]] = []
    steps: dict[str, Any] = {}
    first_hung: int | None = None
    for count, results in sweep.probes.items():
        hung = sum(math.isnan(value) for value in results)
        answered = [value * 1000 for value in results if not math.isnan(value)]
        if hung and first_hung is None and count < STREAM_LIMIT:
            first_hung = count
        steps[str(count)] = {
            "probes": len(results),
            "hung": hung,
            "probe_ms": [None if math.isnan(v) else round(v * 1000, 2) for v in results],
            "relay_rss_peak_bytes": sweep.rss[count],
        }
        rows.append(
            [
                f"{count} (the stream limit)" if count == STREAM_LIMIT else str(count),
                f"{hung}/{len(results)}",
                fmt(median(answered), 1),
                f"{sweep.rss[count] / 2**20:.0f}",
            ]
        )
    figures = {
        "steps": steps,
        "stream_limit": STREAM_LIMIT,
        "first_stalled_count_with_a_hung_probe": first_hung,
        "probe_timeout_s": PROBE_TIMEOUT,
        "settle_s": [SWEEP_SETTLE, SWEEP_SETTLE_PER_READER, "base, per stalled reader"],
        "max_seconds_to_close_all_streams": rounded(max(sweep.drains)),
    }
    return figures, rows


def print_figures(
    throughput_rows: list[list[str]], baseline_ratio: float | None, sweep_rows: list[list[str]]
) -> None:
    print()
    print_table(
        [
            "path",
            "baseline MB/s",
            "stalled MB/s",
            "stall cost",
            "slowest stream MB/s (stalled)",
            "relay RSS MiB (idle/peak base/peak stalled)",
        ],
        throughput_rows,
    )
    print(f"relay/direct baseline throughput: {fmt(baseline_ratio, 3)}")
    print()
    print("stall tolerance: K stalled readers on the link, then one small request through it")
    print_table(["stalled readers", "probe hung", "probe ms (median)", "relay RSS MiB"], sweep_rows)


def fairness_goals(relay_cost: float, probes: dict[int, list[float]]) -> list[dict[str, Any]]:
    below_limit = [v for k, r in probes.items() if k < STREAM_LIMIT for v in r]
    return [
        goal(
            "fairness: throughput the stalled reader costs the other streams (relay)",
            relay_cost,
            GOAL_COST,
            at_least=False,
        ),
        goal(
            "design brief: share of probes answered with up to "
            f"{STREAM_LIMIT - 1} stalled readers on the link",
            sum(not math.isnan(v) for v in below_limit) / len(below_limit),
            1.0,
            at_least=True,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args, runs = _parse(argv)
    warmup = 1.0
    window = 2.0 if args.quick else 5.0
    machine = describe_machine()
    print(machine_line(machine))
    print(
        f"{args.streams} streams; warm-up {warmup:g} s, window {window:g} s; {runs} runs, "
        "median shown"
    )
    with Bench(NAME, profile=args.profile) as bench:
        paths = start(bench)
        idle_rss = rss_bytes(paths.relay.pid)
        rounds = run_rounds(paths, runs, args.streams, warmup, window)
        final_rss = rss_bytes(paths.relay.pid)
        sweep = run_sweep(paths, args.quick)
    figures, rows, costs = throughput_figures(rounds, idle_rss, final_rss)
    figures["stall_sweep"], sweep_rows = sweep_figures(sweep)
    print_figures(rows, figures["relay_vs_direct_baseline"], sweep_rows)
    print(
        f"every stream closed after each step (relay's open-stream gauge back to 0 within "
        f"{max(sweep.drains):.1f} s); at the stream limit ({STREAM_LIMIT}) a new request waits "
        "for a slot by design"
    )
    goals = fairness_goals(costs["relay"], sweep.probes)
    print()
    print_goals(goals)
    payload = {
        "bench": NAME,
        "machine": machine,
        "quick": args.quick,
        "runs": runs,
        "streams": args.streams,
        "warmup_s": warmup,
        "window_s": window,
        "figures": figures,
        "goals": goals,
    }
    print(f"wrote {write_results(NAME, payload, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
