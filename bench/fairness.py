"""Fairness: 100 concurrent downloads from one daemon, one of whose readers stops.

Run as ``python bench/fairness.py [--quick] [--runs N] [--streams N] [--profile]``. On
127.0.0.1: a relay (``repowire relay start``), the bench's target server and a connector linking
it to the relay. A trio client in this process opens ``--streams`` (100) concurrent endless
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

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    HOST,
    MB,
    Bench,
    RelayProcess,
    WorkerError,
    add_common_arguments,
    describe_machine,
    fmt,
    goal,
    machine_line,
    median,
    parse_response_head,
    print_goals,
    print_table,
    ratio,
    relay_metric,
    request_head,
    resolve_runs,
    rounded,
    rss_bytes,
    wait_for_links,
    write_results,
)
from relay import RelaySettings

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
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            await stream.send_all(request_head("GET", f"{prefix}/bytes?n=-1", cookie=cookie))
            buffer = bytearray()
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                data = await stream.receive_some(65536)
                if not data:
                    raise WorkerError(f"stream {index}: closed before the response head")
                buffer += data
            status, _ = parse_response_head(bytes(buffer[:end]))
            if status != 200:
                raise WorkerError(f"stream {index}: HTTP {status}")
            body = len(buffer) - end - 4
            heads[0] += 1
            if heads[0] == streams:
                all_heads.set()
            if stall and index == 0:
                while body < STALL_AFTER:
                    body += len(await stream.receive_some(STALL_AFTER))
                await trio.sleep_forever()
            while True:
                data = await stream.receive_some(RECEIVE_SIZE)
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


async def _probe_with_stalled(port: int, prefix: str, cookie: str | None, stalled: int) -> float:
    """Open ``stalled`` downloads never read, then time one ``/small`` request; returns the
    seconds it took, or NaN if it got no answer within :data:`PROBE_TIMEOUT`."""
    streams: list[trio.SocketStream] = []
    try:
        for _ in range(stalled):
            stream = await trio.open_tcp_stream(HOST, port)
            streams.append(stream)
            await stream.send_all(request_head("GET", f"{prefix}/bytes?n=-1", cookie=cookie))
        await trio.sleep(SWEEP_SETTLE + SWEEP_SETTLE_PER_READER * stalled)
        started = trio.current_time()
        with trio.move_on_after(PROBE_TIMEOUT):
            probe = await trio.open_tcp_stream(HOST, port)
            async with probe:
                await probe.send_all(request_head("GET", f"{prefix}/small", cookie=cookie))
                buffer = bytearray()
                while (end := buffer.find(b"\r\n\r\n")) < 0:
                    data = await probe.receive_some(65536)
                    if not data:
                        raise WorkerError("the probe's connection closed before an answer")
                    buffer += data
                status, headers = parse_response_head(bytes(buffer[:end]))
                if status != 200:
                    raise WorkerError(f"the probe got HTTP {status}")
                length = int(headers.get(b"content-length", b"0"))
                while len(buffer) - end - 4 < length:
                    data = await probe.receive_some(65536)
                    if not data:
                        raise WorkerError("the probe's answer was cut short")
                    buffer += data
                return trio.current_time() - started
        return float("nan")
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--streams", type=int, default=100, help="concurrent downloads (100)")
    args = parser.parse_args(argv)
    runs = resolve_runs(parser, args)
    if args.streams < 2:
        parser.error("--streams must be at least 2")
    warmup = 1.0
    window = 2.0 if args.quick else 5.0
    machine = describe_machine()
    print(machine_line(machine))
    print(
        f"{args.streams} streams; warm-up {warmup:g} s, window {window:g} s; {runs} runs, "
        "median shown"
    )

    rounds: dict[tuple[str, str], list[Round]] = {
        (path, kind): [] for path in ("direct", "relay") for kind in ("baseline", "stalled")
    }
    with Bench(NAME, profile=args.profile) as bench:
        relay = bench.start_relay()
        [credentials] = bench.credentials()
        _, target_port = bench.start_target()
        connector = bench.start_connectors(relay, [(DAEMON_ID, credentials.key)], target_port)
        wait_for_links(relay, 1, 30)
        idle_rss = rss_bytes(relay.pid)
        targets: dict[str, tuple[int, str, str | None]] = {
            "direct": (target_port, "", None),
            "relay": (relay.port, f"/d/{DAEMON_ID}", credentials.cookie),
        }
        for run in range(runs):
            kinds = ["baseline", "stalled"] if run % 2 == 0 else ["stalled", "baseline"]
            for path in ("direct", "relay"):
                port, prefix, cookie = targets[path]
                pids = (relay.pid, connector.pid) if path == "relay" else None
                for kind in kinds:
                    rounds[(path, kind)].append(
                        trio.run(
                            _round,
                            port,
                            prefix,
                            cookie,
                            args.streams,
                            kind == "stalled",
                            warmup,
                            window,
                            pids,
                        )
                    )
        final_rss = rss_bytes(relay.pid)
        sweep = SWEEP_QUICK if args.quick else SWEEP
        passes = 1 if args.quick else 2
        probes: dict[int, list[float]] = {count: [] for count in sweep}
        drains: list[float] = []
        sweep_rss: dict[int, int] = {}
        for _ in range(passes):
            for count in sweep:
                probes[count].append(
                    trio.run(
                        _probe_with_stalled,
                        relay.port,
                        f"/d/{DAEMON_ID}",
                        credentials.cookie,
                        count,
                    )
                )
                sweep_rss[count] = max(sweep_rss.get(count, 0), rss_bytes(relay.pid))
                drains.append(_wait_streams_closed(relay))

    figures: dict[str, Any] = {}
    rows: list[list[str]] = []
    costs: dict[str, float] = {}
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
            for kind, group in (("baseline", base), ("stalled", stalled)):
                peaks = [max(r.rss_samples) for r in group]
                growth = [r.rss_samples[-1] - r.rss_samples[0] for r in group]
                entry[f"{kind}_relay_rss_peak_bytes"] = max(peaks)
                entry[f"{kind}_relay_rss_growth_in_window_bytes"] = [int(g) for g in growth]
                entry[f"{kind}_connector_rss_peak_bytes"] = max(
                    max(r.connector_rss_samples) for r in group
                )
            entry["relay_rss_idle_bytes"] = idle_rss
            entry["relay_rss_after_bytes"] = final_rss
            mib = [
                idle_rss / 2**20,
                entry["baseline_relay_rss_peak_bytes"] / 2**20,
                entry["stalled_relay_rss_peak_bytes"] / 2**20,
            ]
            rss_note = " / ".join(f"{value:.0f}" for value in mib)
        figures[path] = entry
        rows.append(
            [
                path,
                fmt(base_rate),
                fmt(stalled_rate),
                fmt(cost * 100, 1) + " %",
                fmt(entry["stalled_slowest_stream_mb_per_s"] or float("nan"), 3),
                rss_note,
            ]
        )
    figures["relay_vs_direct_baseline"] = rounded(
        ratio(figures["relay"]["baseline_mb_per_s"], figures["direct"]["baseline_mb_per_s"])
    )
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
        rows,
    )
    baseline_ratio = figures["relay_vs_direct_baseline"]
    print(f"relay/direct baseline throughput: {fmt(baseline_ratio or math.nan, 3)}")
    sweep_rows: list[list[str]] = []
    sweep_figures: dict[str, Any] = {}
    first_hung: int | None = None
    for count, results in probes.items():
        hung = sum(math.isnan(value) for value in results)
        answered = [value * 1000 for value in results if not math.isnan(value)]
        if hung and first_hung is None and count < STREAM_LIMIT:
            first_hung = count
        sweep_figures[str(count)] = {
            "probes": len(results),
            "hung": hung,
            "probe_ms": [None if math.isnan(v) else round(v * 1000, 2) for v in results],
            "relay_rss_peak_bytes": sweep_rss[count],
        }
        sweep_rows.append(
            [
                f"{count} (the stream limit)" if count == STREAM_LIMIT else str(count),
                f"{hung}/{len(results)}",
                fmt(median(answered), 1),
                f"{sweep_rss[count] / 2**20:.0f}",
            ]
        )
    figures["stall_sweep"] = {
        "steps": sweep_figures,
        "stream_limit": STREAM_LIMIT,
        "first_stalled_count_with_a_hung_probe": first_hung,
        "probe_timeout_s": PROBE_TIMEOUT,
        "settle_s": [SWEEP_SETTLE, SWEEP_SETTLE_PER_READER, "base, per stalled reader"],
        "max_seconds_to_close_all_streams": rounded(max(drains)),
    }
    print()
    print("stall tolerance: K stalled readers on the link, then one small request through it")
    print_table(["stalled readers", "probe hung", "probe ms (median)", "relay RSS MiB"], sweep_rows)
    print(
        f"every stream closed after each step (relay's open-stream gauge back to 0 within "
        f"{max(drains):.1f} s); at the stream limit ({STREAM_LIMIT}) a new request waits for a "
        "slot by design"
    )
    goals = [
        goal(
            "fairness: throughput the stalled reader costs the other streams (relay)",
            costs["relay"],
            GOAL_COST,
            at_least=False,
        ),
        goal(
            "design brief: share of probes answered with up to "
            f"{STREAM_LIMIT - 1} stalled readers on the link",
            sum(not math.isnan(v) for k, r in probes.items() if k < STREAM_LIMIT for v in r)
            / sum(len(r) for k, r in probes.items() if k < STREAM_LIMIT),
            1.0,
            at_least=True,
        ),
    ]
    print()
    print_goals(goals)
    path_written = write_results(
        NAME,
        {
            "bench": NAME,
            "machine": machine,
            "quick": args.quick,
            "runs": runs,
            "streams": args.streams,
            "warmup_s": warmup,
            "window_s": window,
            "figures": figures,
            "goals": goals,
        },
        args.output,
    )
    print(f"wrote {path_written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
