"""Bulk transfers: a 256 MiB download and a 256 MiB upload, direct vs through the relay.

Run as ``python bench/bulk.py [--quick] [--runs N] [--size-mib N] [--profile]``. On 127.0.0.1: a
relay (``repowire relay start``), the bench's target server (it serves ``GET /bytes?n=N`` and
consumes ``POST /sink``; the daemon has no bulk route) and a connector linking the target to the
relay. A raw-socket client in this process times each transfer from the first byte of the
request to the last byte of the answer:

- ``direct``: straight to the target server;
- ``relay``: to the relay's ``/d/<daemon id>/...`` with a browser session cookie, through the
  tunnel (one stream of the daemon's link) to the same server.

Figures are MB/s (10**6 bytes/s), the median of ``--runs`` runs (5; ``--quick``: 3 runs of
64 MiB), with the relay's figure beside the direct one as a ratio. The CPU seconds the relay and
the connector processes spent per GiB moved are reported too: on a machine with 2 cores the
tunnel is CPU-bound, and that is where its time goes. Output: a table on stdout and
``bench/results/bulk.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    MB,
    MIB,
    Bench,
    WorkerError,
    add_common_arguments,
    connect_socket,
    cpu_seconds,
    describe_machine,
    fmt,
    goal,
    machine_line,
    median,
    print_goals,
    print_table,
    ratio,
    read_response_head,
    request_head,
    resolve_runs,
    rounded,
    wait_for_links,
    write_results,
)

NAME = "bulk"
DAEMON_ID = "bench-bulk"
#: Goal: the relay's MB/s at least this fraction of direct, both directions.
GOAL_RATIO = 0.3
#: Bytes per client receive and send.
CLIENT_CHUNK = MIB


def download(port: int, path: str, size: int, cookie: str | None) -> float:
    """GET ``path`` (``size`` bytes expected); return the seconds it took."""
    buffer = bytearray()
    with connect_socket(port) as sock:
        start = time.perf_counter()
        sock.sendall(request_head("GET", path, cookie=cookie))
        status, headers = read_response_head(sock, buffer)
        if status != 200:
            raise WorkerError(f"download {path}: HTTP {status}: {bytes(buffer[:200])!r}")
        if int(headers.get(b"content-length", b"-1")) != size:
            raise WorkerError(f"download {path}: expected a Content-Length of {size}")
        received = len(buffer)
        sink = memoryview(bytearray(CLIENT_CHUNK))
        while received < size:
            count = sock.recv_into(sink)
            if count == 0:
                raise WorkerError(f"download {path}: closed after {received} of {size} bytes")
            received += count
        return time.perf_counter() - start


def upload(port: int, path: str, size: int, cookie: str | None) -> float:
    """POST ``size`` bytes to ``path``; return the seconds until the whole answer arrived."""
    buffer = bytearray()
    payload = memoryview(bytes(CLIENT_CHUNK))
    with connect_socket(port) as sock:
        start = time.perf_counter()
        sock.sendall(request_head("POST", path, cookie=cookie, length=size))
        remaining = size
        while remaining > 0:
            step = min(remaining, CLIENT_CHUNK)
            sock.sendall(payload[:step])
            remaining -= step
        status, headers = read_response_head(sock, buffer)
        length = int(headers.get(b"content-length", b"0"))
        while len(buffer) < length:
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
        elapsed = time.perf_counter() - start
    if status != 200:
        raise WorkerError(f"upload {path}: HTTP {status}: {bytes(buffer[:200])!r}")
    answer = json.loads(bytes(buffer[:length]))
    if answer.get("received") != size:
        raise WorkerError(f"upload {path}: the server got {answer.get('received')} of {size}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--size-mib", type=int, default=None, help="MiB per transfer (256)")
    args = parser.parse_args(argv)
    runs = resolve_runs(parser, args)
    size_mib = args.size_mib if args.size_mib is not None else (64 if args.quick else 256)
    if size_mib < 1:
        parser.error("--size-mib must be at least 1")
    size = size_mib * MIB
    machine = describe_machine()
    print(machine_line(machine))
    print(f"{size_mib} MiB per transfer; {runs} runs per figure, median shown")

    seconds: dict[str, dict[str, list[float]]] = {
        way: {"direct": [], "relay": []} for way in ("download", "upload")
    }
    cpu: dict[str, dict[str, list[float]]] = {
        way: {"relay": [], "connector": []} for way in ("download", "upload")
    }
    with Bench(NAME, profile=args.profile) as bench:
        relay = bench.start_relay()
        [credentials] = bench.credentials()
        _, target_port = bench.start_target()
        connector = bench.start_connectors(relay, [(DAEMON_ID, credentials.key)], target_port)
        wait_for_links(relay, 1, 30)
        cookie = credentials.cookie
        # Small transfers first, so no path pays its first-use costs in a measured run.
        for port, prefix, jar in ((target_port, "", None), (relay.port, f"/d/{DAEMON_ID}", cookie)):
            download(port, f"{prefix}/bytes?n={MIB}", MIB, jar)
            upload(port, f"{prefix}/sink", MIB, jar)
        for run in range(runs):
            for way, transfer in (("download", download), ("upload", upload)):
                paths = ["direct", "relay"] if run % 2 == 0 else ["relay", "direct"]
                for name in paths:
                    if name == "direct":
                        port, path, jar = target_port, "", None
                    else:
                        port, path, jar = relay.port, f"/d/{DAEMON_ID}", cookie
                    path += f"/bytes?n={size}" if way == "download" else "/sink"
                    before = (cpu_seconds(relay.pid), cpu_seconds(connector.pid))
                    seconds[way][name].append(transfer(port, path, size, jar))
                    if name == "relay":
                        gib = size / 2**30
                        cpu[way]["relay"].append((cpu_seconds(relay.pid) - before[0]) / gib)
                        cpu[way]["connector"].append((cpu_seconds(connector.pid) - before[1]) / gib)

    figures: dict[str, Any] = {}
    rows: list[list[str]] = []
    for way in ("download", "upload"):
        rates = {name: [size / s / MB for s in seconds[way][name]] for name in seconds[way]}
        direct, tunneled = median(rates["direct"]), median(rates["relay"])
        figures[way] = {
            "direct_mb_per_s": rounded(direct, 1),
            "relay_mb_per_s": rounded(tunneled, 1),
            "relay_vs_direct": rounded(ratio(tunneled, direct)),
            "relay_cpu_s_per_gib": rounded(median(cpu[way]["relay"]), 2),
            "connector_cpu_s_per_gib": rounded(median(cpu[way]["connector"]), 2),
            "runs_direct_mb_per_s": [round(v, 1) for v in rates["direct"]],
            "runs_relay_mb_per_s": [round(v, 1) for v in rates["relay"]],
        }
        rows.append(
            [
                way,
                fmt(direct),
                fmt(tunneled),
                fmt(ratio(tunneled, direct), 3),
                fmt(median(cpu[way]["relay"]), 2),
                fmt(median(cpu[way]["connector"]), 2),
            ]
        )
    print()
    print_table(
        [
            "transfer",
            "direct MB/s",
            "relay MB/s",
            "relay/direct",
            "relay CPU s/GiB",
            "connector CPU s/GiB",
        ],
        rows,
    )
    goals = [
        goal(
            f"bulk {way}: relay MB/s / direct MB/s",
            ratio(
                median([size / s for s in seconds[way]["relay"]]),
                median([size / s for s in seconds[way]["direct"]]),
            ),
            GOAL_RATIO,
            at_least=True,
        )
        for way in ("download", "upload")
    ]
    print()
    print_goals(goals)
    written = write_results(
        NAME,
        {
            "bench": NAME,
            "machine": machine,
            "quick": args.quick,
            "runs": runs,
            "bytes_per_transfer": size,
            "figures": figures,
            "goals": goals,
        },
        args.output,
    )
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
