"""Throughput of the sans-IO session: two sessions in one process, bytes pumped by hand, no I/O.

Run as ``python -m bench.protocol_core`` (``--runs N``, ``--quick``) from the repository root.
Each workload pushes bytes on one stream from a connector session to a relay session, which
acknowledges what it receives as it goes and sends its window updates back. Output is drained
as the trio driver drains it, in transport messages of at most 1 MiB (``data_to_send(1 MiB)``).
Workloads:

- ``write_64KiB``: 64 KiB writes (as much as the window allows), pumped after every write.
- ``write_100B``: 100-byte writes, pumped after every write: per-frame costs dominate.
- ``write_100B_batched_64``: 100-byte writes, 64 per pump, as a driver that gathers a burst of
  small writes into one transport message does.
- ``write_100B_backlog``: 100-byte writes filling a 16 MiB window before anything is pumped, as
  when the transport is slower than the writers: the queue is long when it is drained.

Each workload runs ``--runs`` times; the median is reported, as MB/s (10**6 bytes of payload per
second) and DATA frames/s, with the machine's description, on stdout and in
``bench/results/protocol_core.json``.
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.protocol_core")

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from protocol import DataReceived, Role, Session, SessionConfig

RESULTS = Path(__file__).resolve().parent / "results" / "protocol_core.json"


#: Largest transport message, as the trio driver sends them.
MESSAGE_LIMIT = 1024 * 1024


def _handshaken_pair(config: SessionConfig | None) -> tuple[Session, Session]:
    sender = Session(Role.CONNECTOR)
    receiver = Session(Role.RELAY, config)
    receiver.receive_data(sender.data_to_send())
    sender.receive_data(receiver.data_to_send())
    return sender, receiver


def _push(
    write_size: int, total: int, writes_per_pump: int, config: SessionConfig | None = None
) -> tuple[float, int]:
    """Push ``total`` payload bytes in writes of ``write_size``; return (seconds, DATA frames)."""
    sender, receiver = _handshaken_pair(config)
    stream_id = sender.open_stream({"kind": "bench"})
    receiver.receive_data(sender.data_to_send())
    receiver.accept_stream(stream_id)
    chunk = bytes(write_size)
    received = 0
    frames = 0
    # Local bindings: the loop below is the measurement, keep attribute lookups out of it.
    send = sender.send_data
    window = sender.local_flow_control_window
    out_a = sender.data_to_send
    in_a = sender.receive_data
    out_b = receiver.data_to_send
    in_b = receiver.receive_data
    ack = receiver.acknowledge_received_data
    limit = MESSAGE_LIMIT
    started = time.perf_counter()
    sent = 0
    while received < total:
        queued = 0
        while queued < writes_per_pump and sent < total:
            room = window(stream_id)
            if room == 0:
                break
            size = min(write_size, room, total - sent)
            send(stream_id, chunk if size == write_size else chunk[:size])
            sent += size
            queued += 1
        while message := out_a(limit):
            for event in in_b(message):
                if type(event) is DataReceived:
                    size = len(event.data)
                    received += size
                    frames += 1
                    ack(stream_id, size)
        while message := out_b(limit):
            in_a(message)
    elapsed = time.perf_counter() - started
    return elapsed, frames


def _measure(
    runs: int, run: Callable[[], tuple[float, int]], total: int
) -> dict[str, float | int | list[float]]:
    mbps: list[float] = []
    fps: list[float] = []
    frames = 0
    for _ in range(runs):
        elapsed, frames = run()
        mbps.append(total / elapsed / 1e6)
        fps.append(frames / elapsed)
    return {
        "mb_per_s": round(statistics.median(mbps), 1),
        "frames_per_s": round(statistics.median(fps)),
        "runs_mb_per_s": [round(value, 1) for value in mbps],
        "frames_per_run": frames,
        "bytes_per_run": total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="runs per workload (median reported)")
    parser.add_argument(
        "--quick", action="store_true", help="a tenth of the bytes, for a smoke run"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    scale = 10 if args.quick else 1
    big_total = 512 * 1024 * 1024 // scale
    small_total = 100 * 300_000 // scale
    # Windows large enough for every small write to queue before the first pump.
    backlog_config = SessionConfig(
        initial_window_size=32 * 1024 * 1024, session_window_size=32 * 1024 * 1024
    )
    workloads = {
        "write_64KiB": (lambda: _push(64 * 1024, big_total, 1), big_total),
        "write_100B": (lambda: _push(100, small_total, 1), small_total),
        "write_100B_batched_64": (lambda: _push(100, small_total, 64), small_total),
        "write_100B_backlog": (
            lambda: _push(100, small_total, 1 << 30, backlog_config),
            small_total,
        ),
    }
    machine = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    print(
        f"machine: {machine['cores']} cores, {machine['implementation']} {machine['python']}, "
        f"{machine['platform']}"
    )
    results: dict[str, object] = {"machine": machine, "runs": args.runs, "workloads": {}}
    workload_results: dict[str, object] = {}
    for name, (run, total) in workloads.items():
        figures = _measure(args.runs, run, total)
        workload_results[name] = figures
        print(
            f"{name:>24}: {figures['mb_per_s']:>9.1f} MB/s  "
            f"{figures['frames_per_s']:>11,} frames/s  (median of {args.runs})"
        )
    results["workloads"] = workload_results
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
