"""Bulk transfers: a 256 MiB download and a 256 MiB upload, direct, through two plain
forwarders (the ceiling) and through the relay.

Run as ``python -m bench.bulk [--quick] [--runs N] [--size-mib N] [--tls] [--profile]`` from the
repository root. On 127.0.0.1: a relay (``repowire relay start``), the bench's target server (it
serves ``GET /bytes?n=N`` and consumes ``POST /sink``; the daemon has no bulk route), a
connector linking the target to the relay, and two forwarder processes in series in front of
the target. A client in this process, on blocking sockets (1 MiB reads and writes; the
request and response heads made and parsed by :mod:`tests.support.http_client`), times each
transfer from the first byte of the request to the last byte of the answer. Blocking, because a
trio reader would cap the direct figure (on the reference machine about 1.6 GB/s against
3.1 GB/s: trio passes through its scheduler at every receive):

- ``direct``: straight to the target server;
- ``ceiling``: through forwarder 1 and forwarder 2 (each its own process, piping bytes with
  trio streams, no framing) to the same server: what two Python hops cost at the least;
- ``relay``: to the relay's ``/d/<daemon id>/...`` with a browser session cookie, through the
  tunnel (one stream of the daemon's link) to the same server.

With ``--tls`` the browser side is HTTPS (the relay serves it with ``--certfile``, and the first
forwarder terminates it), the connector dials ``wss://`` trusting the run's own CA, and
``direct`` stays plain HTTP (the target speaks no TLS).

Figures are MB/s (10**6 bytes/s), the median of ``--runs`` runs (5; ``--quick``: 3 runs of
64 MiB), as ratios to direct and, for the relay, to the ceiling. The CPU seconds per GiB moved
of each hop's process (relay and connector; forwarder 1 and forwarder 2) are reported too: on a
machine with 2 cores the tunnel is CPU-bound, and that is where its time goes. Output: tables
on stdout and ``bench/results/bulk.json`` (``bulk_tls.json`` with ``--tls``).
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.bulk")

import argparse
import json
import socket
import ssl
import time
from typing import Any

import attrs

from bench.harness import HOST, Bench, wait_for_links
from bench.processes import WorkerError, cpu_seconds
from bench.report import (
    MB,
    MIB,
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
from tests.support.http_client import MAX_HEAD, ResponseHead, parse_response_head, request_head

NAME = "bulk"
DAEMON_ID = "bench-bulk"
PATHS = ("direct", "ceiling", "relay")
WAYS = ("download", "upload")
#: Goal: the relay's MB/s at least this fraction of direct, both directions.
GOAL_RATIO = 0.3
#: Bytes per client receive and send.
CLIENT_CHUNK = MIB
#: Largest answer to an upload read (a small JSON document).
UPLOAD_ANSWER_LIMIT = 64 * 1024
#: Seconds any one socket operation of a transfer may take.
TRANSFER_TIMEOUT = 60.0


@attrs.frozen(kw_only=True)
class Route:
    """Where a client sends one path's transfers, and the processes of its two hops."""

    port: int
    prefix: str = ""
    cookie: str | None = attrs.field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    #: The process ids of hop 1 and hop 2 (None for direct: no hop).
    hops: tuple[int, int] | None = None


def _connect(route: Route) -> socket.socket:
    """A blocking connection for one transfer (TCP_NODELAY; TLS handshake done)."""
    sock = socket.create_connection((HOST, route.port), timeout=TRANSFER_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if route.tls is None:
        return sock
    return route.tls.wrap_socket(sock, server_hostname=HOST)


def _read_head(sock: socket.socket, buffer: bytearray, what: str) -> ResponseHead:
    """Read a response head; what follows it is left in ``buffer``."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD:
            raise WorkerError(f"{what}: response head too large")
        data = sock.recv(65536)
        if not data:
            raise WorkerError(f"{what}: connection closed before a full response head")
        buffer += data
    head = parse_response_head(bytes(buffer[:end]))
    del buffer[: end + 4]
    return head


def _head(route: Route, method: str, path: str, length: int | None = None) -> bytes:
    return request_head(
        method,
        path,
        host=f"{HOST}:{route.port}",
        cookie=route.cookie,
        content_length=length,
        close=True,
    )


def download(route: Route, size: int) -> float:
    """GET ``size`` bytes; return the seconds from the request's first byte to the last
    byte of the answer."""
    path = f"{route.prefix}/bytes?n={size}"
    buffer = bytearray()
    with _connect(route) as sock:
        start = time.perf_counter()
        sock.sendall(_head(route, "GET", path))
        head = _read_head(sock, buffer, f"download {path}")
        if head.status != 200:
            raise WorkerError(f"download {path}: HTTP {head.status}: {bytes(buffer[:200])!r}")
        if head.header("content-length") != str(size):
            raise WorkerError(f"download {path}: expected a Content-Length of {size}")
        received = len(buffer)
        sink = memoryview(bytearray(CLIENT_CHUNK))
        while received < size:
            count = sock.recv_into(sink, min(CLIENT_CHUNK, size - received))
            if count == 0:
                raise WorkerError(f"download {path}: closed after {received} of {size} bytes")
            received += count
        return time.perf_counter() - start


def upload(route: Route, size: int) -> float:
    """POST ``size`` bytes; return the seconds until the whole answer arrived."""
    path = f"{route.prefix}/sink"
    buffer = bytearray()
    payload = memoryview(bytes(CLIENT_CHUNK))
    with _connect(route) as sock:
        start = time.perf_counter()
        sock.sendall(_head(route, "POST", path, size))
        remaining = size
        while remaining > 0:
            step = min(remaining, CLIENT_CHUNK)
            sock.sendall(payload[:step])
            remaining -= step
        head = _read_head(sock, buffer, f"upload {path}")
        length = int(head.header("content-length") or 0)
        while len(buffer) < min(length, UPLOAD_ANSWER_LIMIT):
            data = sock.recv(65536)
            if not data:
                break
            buffer += data
        elapsed = time.perf_counter() - start
    if head.status != 200:
        raise WorkerError(f"upload {path}: HTTP {head.status}: {bytes(buffer[:200])!r}")
    received = json.loads(bytes(buffer[:length])).get("received")
    if received != size:
        raise WorkerError(f"upload {path}: the server got {received} of {size}")
    return elapsed


TRANSFERS = {"download": download, "upload": upload}


@attrs.define
class Measured:
    """Seconds per transfer and CPU seconds per GiB of each hop, by way and path."""

    seconds: dict[str, dict[str, list[float]]] = attrs.field(
        factory=lambda: {way: {path: [] for path in PATHS} for way in WAYS}
    )
    #: ``cpu[way][path]`` is a list of (hop 1, hop 2) CPU seconds per GiB.
    cpu: dict[str, dict[str, list[tuple[float, float]]]] = attrs.field(
        factory=lambda: {way: {path: [] for path in PATHS} for way in WAYS}
    )


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, int, int]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--size-mib", type=int, default=None, help="MiB per transfer (256)")
    parser.add_argument(
        "--tls", action="store_true", help="HTTPS on the browser side, wss:// for the link"
    )
    args = parser.parse_args(argv)
    runs = resolve_runs(parser, args)
    size_mib = args.size_mib if args.size_mib is not None else (64 if args.quick else 256)
    if size_mib < 1:
        parser.error("--size-mib must be at least 1")
    return args, runs, size_mib


def start_routes(bench: Bench, tls: bool) -> dict[str, Route]:
    """The relay, target, connector and ceiling forwarders; a route for each path."""
    files = bench.tls_files() if tls else None
    relay = bench.start_relay(tls=files)
    [credentials] = bench.credentials()
    _, target_port = bench.start_target()
    connector = bench.start_connectors(relay, [(DAEMON_ID, credentials.key)], target_port)
    ceiling = bench.start_ceiling(target_port, tls=files)
    wait_for_links(relay, 1, 30)
    context = files.client_context() if files is not None else None
    routes = {
        "direct": Route(port=target_port),
        "ceiling": Route(
            port=ceiling.port, tls=context, hops=(ceiling.first.pid, ceiling.second.pid)
        ),
        "relay": Route(
            port=relay.port,
            prefix=f"/d/{DAEMON_ID}",
            cookie=credentials.cookie,
            tls=context,
            hops=(relay.pid, connector.pid),
        ),
    }
    return routes


def measure(routes: dict[str, Route], runs: int, size: int) -> Measured:
    """Small transfers first on every path (first-use costs outside the figures), then
    ``runs`` rounds of each way on each path, the paths' order rotating."""
    for route in routes.values():
        for transfer in TRANSFERS.values():
            transfer(route, MIB)
    measured = Measured()
    gib = size / 2**30
    for run in range(runs):
        for way, transfer in TRANSFERS.items():
            for path in PATHS[run % 3 :] + PATHS[: run % 3]:
                route = routes[path]
                hops = route.hops
                before = (cpu_seconds(hops[0]), cpu_seconds(hops[1])) if hops else (0.0, 0.0)
                measured.seconds[way][path].append(transfer(route, size))
                if hops is not None:
                    measured.cpu[way][path].append(
                        (
                            (cpu_seconds(hops[0]) - before[0]) / gib,
                            (cpu_seconds(hops[1]) - before[1]) / gib,
                        )
                    )
    return measured


def _rates(measured: Measured, way: str, size: int) -> dict[str, list[float]]:
    """MB/s of every run, by path."""
    return {path: [size / s / MB for s in measured.seconds[way][path]] for path in PATHS}


def summarize(measured: Measured, size: int) -> tuple[dict[str, Any], list[list[str]]]:
    """The JSON figures and the table rows, per way."""
    figures: dict[str, Any] = {}
    rows: list[list[str]] = []
    for way in WAYS:
        rates = _rates(measured, way, size)
        rate = {path: median(rates[path]) for path in PATHS}
        cpu = {
            path: (median([c[0] for c in spent]), median([c[1] for c in spent]))
            for path, spent in measured.cpu[way].items()
        }
        figures[way] = {
            "direct_mb_per_s": rounded(rate["direct"], 1),
            "relay_mb_per_s": rounded(rate["relay"], 1),
            "ceiling_mb_per_s": rounded(rate["ceiling"], 1),
            "relay_vs_direct": rounded(ratio(rate["relay"], rate["direct"])),
            "ceiling_vs_direct": rounded(ratio(rate["ceiling"], rate["direct"])),
            "relay_vs_ceiling": rounded(ratio(rate["relay"], rate["ceiling"])),
            "relay_cpu_s_per_gib": rounded(cpu["relay"][0], 2),
            "connector_cpu_s_per_gib": rounded(cpu["relay"][1], 2),
            "forwarder_1_cpu_s_per_gib": rounded(cpu["ceiling"][0], 2),
            "forwarder_2_cpu_s_per_gib": rounded(cpu["ceiling"][1], 2),
            **{f"runs_{path}_mb_per_s": [round(v, 1) for v in rates[path]] for path in PATHS},
        }
        for path in PATHS:
            hop1, hop2 = cpu.get(path, (float("nan"), float("nan")))
            rows.append(
                [
                    way,
                    path,
                    fmt(rate[path]),
                    fmt(ratio(rate[path], rate["direct"]), 3) if path != "direct" else "",
                    fmt(ratio(rate["relay"], rate["ceiling"]), 3) if path == "relay" else "",
                    fmt(hop1, 2) if path != "direct" else "",
                    fmt(hop2, 2) if path != "direct" else "",
                ]
            )
    return figures, rows


def report(
    args: argparse.Namespace, runs: int, size: int, machine: dict[str, Any], measured: Measured
) -> None:
    figures, rows = summarize(measured, size)
    print()
    print_table(
        [
            "transfer",
            "path",
            "MB/s",
            "x direct",
            "relay/ceiling",
            "hop 1 CPU s/GiB",
            "hop 2 CPU s/GiB",
        ],
        rows,
        left=2,
    )
    print("hop 1: the relay, or forwarder 1; hop 2: the connector, or forwarder 2")
    label = " (TLS)" if args.tls else ""
    goals = [
        goal(
            f"bulk {way}{label}: relay MB/s / direct MB/s",
            ratio(
                median(_rates(measured, way, size)["relay"]),
                median(_rates(measured, way, size)["direct"]),
            ),
            GOAL_RATIO,
            at_least=True,
        )
        for way in WAYS
    ]
    print()
    print_goals(goals)
    name = f"{NAME}_tls" if args.tls else NAME
    payload = {
        "bench": name,
        "machine": machine,
        "quick": args.quick,
        "runs": runs,
        "bytes_per_transfer": size,
        "tls": args.tls,
        "figures": figures,
        "goals": goals,
    }
    print(f"wrote {write_results(name, payload, args.output)}")


def main(argv: list[str] | None = None) -> int:
    args, runs, size_mib = _parse(argv)
    size = size_mib * MIB
    machine = describe_machine()
    print(machine_line(machine))
    print(f"{size_mib} MiB per transfer; {runs} runs per figure, median shown")
    with Bench(NAME, profile=args.profile) as bench:
        routes = start_routes(bench, args.tls)
        if args.tls:
            print(tls_note(bench))
        measured = measure(routes, runs, size)
    report(args, runs, size, machine, measured)
    return 0


def tls_note(bench: Bench) -> str:
    """What ``--tls`` covers, for the output."""
    return (
        f"TLS (certificate made with {bench.tls_files().made_with}): HTTPS to the relay (its "
        "own --certfile) and to forwarder 1; the connector dials wss:// trusting the run's CA; "
        "direct stays plain HTTP. The relay path has TLS on two hops (browser-relay, "
        "connector-relay), the ceiling on its first hop only."
    )


if __name__ == "__main__":
    sys.exit(main())
