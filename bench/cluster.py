"""The relay as a cluster: a request forwarded between replicas against one served where the
daemon is linked, and idle links spread over three replicas when one of them dies.

Run as ``python -m bench.cluster [--quick] [--runs N] [--links N] [--size-mib N] [--profile]``
from the repository root. On 127.0.0.1: a private ``redis-server`` (``--save "" --appendonly
no``), a cluster secret file (mode 0600, 32 random bytes) and three replicas, each ``repowire
relay start --redis-url ... --replica-id relay-x --advertise-url http://127.0.0.1:P
--cluster-secret-file ...`` with ``/metrics`` on a port of its own. Keys and browser sessions
are minted in Redis. No load balancer: each client dials the replica it means.

1. Forwarding. The daemon (with its connector) and a connector in front of the bench's target
   server are linked to replica A. Measured on two paths to the same daemon:

   - ``local``: the browser side on A, which holds the link;
   - ``forwarded``: the browser side on B, which forwards to A over the replica link.

   Small requests: wrk (one thread) on ``/d/<id>/health`` at concurrency 1 and 32 (req/s,
   p50, p99; the cookie in a private Lua script, as in :mod:`bench.small_requests`); the
   added p50 of forwarded over local. Bulk: a download of 256 MiB (64 MiB with ``--quick``)
   as :mod:`bench.bulk` times it. Ratios forwarded / local; goal: forwarded at least 0.7 of
   local, for c=32 req/s and for download MB/s.

2. Idle links. N connectors (1,000; 300 with ``--quick``; one scope each, production
   defaults), a third per replica. Each connector dials a failover forwarder
   (``python -m bench.forwarder --failover``) that passes its connection to its replica, or
   to another live replica when its own refuses: a connector has one relay URL, and this is
   what lets it move (in production, nginx's ``proxy_next_upstream``). RSS per link of each
   replica: (RSS with its links - RSS before) / its links. Then SIGKILL replica C and time
   until the links it held are all up on A and B again (the replicas'
   ``repowire_relay_daemons_connected``), from the kill. The dead replica is started again
   and the connectors restarted between runs; median of the runs (1 with ``--quick``).

Output: tables on stdout and ``bench/results/cluster.json``.
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.cluster")

import argparse
import math
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.bulk import Route, download
from bench.harness import HOST, Bench, Credentials, RelayProcess, relay_daemons_connected
from bench.processes import (
    READY_TIMEOUT,
    Worker,
    WorkerError,
    raise_fd_limit,
    rss_bytes,
    write_secret_file,
)
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
from bench.wrk import WrkResult, run_wrk
from relay import SESSION_COOKIE
from tests.support.processes import free_port

NAME = "cluster"
REPLICAS = ("relay-a", "relay-b", "relay-c")
DAEMON_ID = "bench-cluster-daemon"
BULK_ID = "bench-cluster-bulk"
PATHS = ("local", "forwarded")
CONCURRENCIES = (1, 32)
#: Goal: forwarded figures at least this fraction of local ones.
GOAL_RATIO = 0.7
#: Seconds of wrk per path before measuring.
WARMUP_SECONDS = 1.0
#: Idle connectors, full and quick.
LINKS = 1000
QUICK_LINKS = 300
#: Connectors started per second, all processes together.
RAMP_RATE = 500.0
#: Seconds after all links are up before RSS is read.
SETTLE = 5.0
#: Seconds all links get to come up, beyond the ramp, and to come back after a kill.
CONNECT_SLACK = 120.0
MOVE_TIMEOUT = 180.0
#: Seconds between polls of the replicas' /metrics.
POLL = 0.1
#: Bytes of randomness in the cluster secret.
SECRET_BYTES = 32
#: The port idle connectors would pipe streams to: nothing is tunneled to them.
UNUSED_TARGET_PORT = 9

_LISTENING = re.compile(r"repowire relay listening on https?://[^\s:]+:(\d+)")
_METRICS = re.compile(r"metrics served on http://[^\s:]+:(\d+)/metrics")


@attrs.define(kw_only=True)
class Cluster:
    """Redis, the secret and the replicas' fixed ports; the replicas now running."""

    bench: Bench
    redis_port: int
    secret: Path
    ports: list[int]
    replicas: list[RelayProcess | None]

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"

    def start_replica(self, index: int) -> RelayProcess:
        port = self.ports[index]
        data_dir = self.bench.tmp / f"data-{REPLICAS[index]}"
        data_dir.mkdir(exist_ok=True)
        worker = self.bench.spawn(
            REPLICAS[index],
            [
                *("repowire", "relay", "start", "--host", HOST, "--port", str(port)),
                *("--data-dir", str(data_dir), "--redis-url", self.redis_url),
                *("--replica-id", REPLICAS[index], "--advertise-url", f"http://{HOST}:{port}"),
                *("--cluster-secret-file", str(self.secret), "--metrics-listen", f"{HOST}:0"),
                # Links come and go by the thousand here: a line each is noise.
                "--quiet",
            ],
        )

        def port_in(pattern: re.Pattern[str]) -> int:
            def pick(line: str) -> int | None:
                match = pattern.search(line)
                return int(match.group(1)) if match else None

            return worker.expect(pick, READY_TIMEOUT, f"line matching {pattern.pattern!r}")

        bound = port_in(_LISTENING)
        metrics = port_in(_METRICS)
        relay = RelayProcess(worker=worker, port=bound, metrics_port=metrics, data_dir=data_dir)
        self.replicas[index] = relay
        return relay

    def replica(self, index: int) -> RelayProcess:
        relay = self.replicas[index]
        if relay is None:
            raise WorkerError(f"{REPLICAS[index]} is not running")
        return relay

    def kill(self, index: int) -> float:
        """SIGKILL a replica; the monotonic time of the signal."""
        relay = self.replica(index)
        killed = time.monotonic()
        relay.worker.process.kill()
        relay.worker.wait()
        relay.worker.stop()
        self.bench.forget(relay.worker)
        self.replicas[index] = None
        return killed

    def links(self) -> list[int | None]:
        """Links each replica counts (None: not running or not answering)."""
        counts: list[int | None] = []
        for relay in self.replicas:
            try:
                counts.append(None if relay is None else relay_daemons_connected(relay, 5.0))
            except (OSError, WorkerError):
                counts.append(None)
        return counts


def _start_redis(bench: Bench) -> tuple[Worker, int]:
    """A private redis-server, nothing persisted, and its port once it answers PING. Not one
    of the bench's workers: it is stopped after them (replicas leave Redis as they stop)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise WorkerError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    worker = Worker(
        "redis",
        [
            binary,
            *("--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"),
            *("--dir", str(bench.tmp), "--protected-mode", "yes"),
        ],
        log_dir=bench.logs,
        env=bench.env,
    )
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(64).startswith(b"+PONG"):
                    return worker, port
        except OSError:
            pass
        if not worker.alive() or time.monotonic() > deadline:
            worker.stop()
            raise WorkerError(f"redis-server did not answer on {port}; see {worker.log_path}")
        time.sleep(0.05)


def _new_cluster(bench: Bench, redis_port: int) -> Cluster:
    secret = write_secret_file(bench.tmp / "cluster.secret", secrets.token_urlsafe(SECRET_BYTES))
    cluster = Cluster(
        bench=bench,
        redis_port=redis_port,
        secret=secret,
        # Chosen before each replica starts: a replica advertises its own port.
        ports=[free_port() for _ in REPLICAS],
        replicas=[None for _ in REPLICAS],
    )
    for index in range(len(REPLICAS)):
        cluster.start_replica(index)
    return cluster


def mint(redis_url: str, count: int) -> list[Credentials]:
    """``count`` new scopes in the cluster's Redis, each with its key and a browser session."""
    from relay._redis_store import RedisStore

    async def run() -> list[Credentials]:
        out: list[Credentials] = []
        now = time.time()
        async with RedisStore.open(redis_url) as store:
            for index in range(count):
                record, key = await store.create_scope(label=f"bench-{index}", now=now)
                session = await store.create_session(record, now=now, ttl=24 * 3600)
                out.append(
                    Credentials(record=record, key=key, cookie=f"{SESSION_COOKIE}={session}")
                )
        return out

    return trio.run(run)


def wait_counts(
    cluster: Cluster, wanted: dict[int, int], timeout: float, what: str
) -> tuple[float, list[int | None]]:
    """Poll until each replica index in ``wanted`` counts at least its links; the monotonic
    time seen and the counts."""
    deadline = time.monotonic() + timeout
    while True:
        counts = cluster.links()
        now = time.monotonic()
        if all((counts[i] or 0) >= n for i, n in wanted.items()):
            return now, counts
        if now > deadline:
            raise WorkerError(f"{what}: links per replica {counts}, wanted {wanted}")
        time.sleep(POLL)


def wait_total(cluster: Cluster, indexes: list[int], total: int, timeout: float) -> float:
    """Poll until the replicas ``indexes`` count ``total`` links together; the monotonic time."""
    deadline = time.monotonic() + timeout
    while True:
        counts = cluster.links()
        now = time.monotonic()
        if sum(counts[i] or 0 for i in indexes) >= total:
            return now
        if now > deadline:
            raise WorkerError(f"links per replica {counts}: {total} wanted on {indexes}")
        time.sleep(POLL)


# -- part 1: local against forwarded -------------------------------------------------------


@attrs.define(kw_only=True)
class Paths:
    """Where each path's requests go."""

    health: dict[str, str]
    bulk: dict[str, Route]
    cookie: str = attrs.field(repr=False)


def start_forwarding(bench: Bench, cluster: Cluster) -> Paths:
    """The daemon and a connector to the target, both linked to replica A."""
    [credentials] = mint(cluster.redis_url, 1)
    a, b = cluster.replica(0), cluster.replica(1)
    bench.start_daemon(a, credentials, DAEMON_ID)
    _, target_port = bench.start_target()
    bench.start_connectors(a, [(BULK_ID, credentials.key)], target_port, name="bulk-connector")
    wait_counts(cluster, {0: 2}, 30.0, "the daemon and the bulk connector on relay-a")
    return Paths(
        health={
            "local": f"{a.http_url}/d/{DAEMON_ID}/health",
            "forwarded": f"{b.http_url}/d/{DAEMON_ID}/health",
        },
        bulk={
            "local": Route(port=a.port, prefix=f"/d/{BULK_ID}", cookie=credentials.cookie),
            "forwarded": Route(port=b.port, prefix=f"/d/{BULK_ID}", cookie=credentials.cookie),
        },
        cookie=credentials.cookie,
    )


def measure_forwarding(
    bench: Bench, paths: Paths, runs: int, duration: float, size: int
) -> tuple[dict[int, dict[str, list[WrkResult]]], dict[str, list[float]]]:
    """wrk rounds per concurrency and bulk downloads, the paths' order alternating."""

    def wrk(path: str, connections: int, seconds: float) -> WrkResult:
        return run_wrk(
            paths.health[path],
            connections=connections,
            duration=seconds,
            workdir=bench.tmp,
            cookie=paths.cookie,
        )

    for path in PATHS:
        wrk(path, 32, WARMUP_SECONDS)
        download(paths.bulk[path], MIB)
    small: dict[int, dict[str, list[WrkResult]]] = {}
    for connections in CONCURRENCIES:
        small[connections] = {path: [] for path in PATHS}
        for run in range(runs):
            for path in PATHS[run % 2 :] + PATHS[: run % 2]:
                small[connections][path].append(wrk(path, connections, duration))
    bulk: dict[str, list[float]] = {path: [] for path in PATHS}
    for run in range(runs):
        for path in PATHS[run % 2 :] + PATHS[: run % 2]:
            bulk[path].append(size / download(paths.bulk[path], size) / MB)
    return small, bulk


def _small_summary(results: list[WrkResult]) -> dict[str, Any]:
    return {
        "requests_per_s": rounded(median([r.requests_per_s for r in results]), 1),
        "p50_ms": rounded(median([r.p50_ms for r in results])),
        "p99_ms": rounded(median([r.p99_ms for r in results])),
        "errors": sum(r.errors for r in results),
        "runs_requests_per_s": [round(r.requests_per_s, 1) for r in results],
    }


def forwarding_figures(
    small: dict[int, dict[str, list[WrkResult]]], bulk: dict[str, list[float]]
) -> tuple[dict[str, Any], list[list[str]]]:
    figures: dict[str, Any] = {"small": {}, "download": {}}
    rows: list[list[str]] = []
    for connections in CONCURRENCIES:
        summary = {path: _small_summary(small[connections][path]) for path in PATHS}
        local, forwarded = summary["local"], summary["forwarded"]
        added = (forwarded["p50_ms"] or math.nan) - (local["p50_ms"] or math.nan)
        figures["small"][str(connections)] = {
            **summary,
            "forwarded_vs_local": rounded(
                ratio(forwarded["requests_per_s"], local["requests_per_s"])
            ),
            "added_p50_ms": rounded(added),
        }
        for path in PATHS:
            row = summary[path]
            rows.append(
                [
                    f"GET /health c={connections}",
                    path,
                    f"{fmt(row['requests_per_s'])} req/s",
                    fmt(row["p50_ms"], 2),
                    fmt(row["p99_ms"], 2),
                    str(row["errors"]),
                    fmt(ratio(row["requests_per_s"], local["requests_per_s"]), 2)
                    if path == "forwarded"
                    else "",
                    f"+{fmt(added, 2)}" if path == "forwarded" else "",
                ]
            )
    rate = {path: median(bulk[path]) for path in PATHS}
    figures["download"] = {
        "local_mb_per_s": rounded(rate["local"], 1),
        "forwarded_mb_per_s": rounded(rate["forwarded"], 1),
        "forwarded_vs_local": rounded(ratio(rate["forwarded"], rate["local"])),
        **{f"runs_{path}_mb_per_s": [round(v, 1) for v in bulk[path]] for path in PATHS},
    }
    for path in PATHS:
        rows.append(
            [
                "download",
                path,
                f"{fmt(rate[path])} MB/s",
                "",
                "",
                "",
                fmt(ratio(rate[path], rate["local"]), 2) if path == "forwarded" else "",
                "",
            ]
        )
    return figures, rows


# -- part 2: idle links over three replicas, one killed --------------------------------------


def _start_failovers(bench: Bench, cluster: Cluster) -> list[int]:
    """A failover forwarder per replica: its replica first, the others when it refuses."""
    ports: list[int] = []
    for index in range(len(REPLICAS)):
        order = [cluster.ports[index]] + [
            port for other, port in enumerate(cluster.ports) if other != index
        ]
        worker = bench.spawn(
            f"failover-{REPLICAS[index]}",
            ["bench.forwarder", "--failover", ",".join(map(str, order))],
        )
        ports.append(int(worker.expect_event("ready")["port"]))
    return ports


def idle_run(
    bench: Bench,
    cluster: Cluster,
    failover_ports: list[int],
    keys: list[str],
    victim: int,
) -> dict[str, Any]:
    """Connectors spread over the replicas (through the failover forwarders), RSS per link,
    then SIGKILL of ``victim`` and the time until its links are all up elsewhere."""
    before_counts = cluster.links()
    before_rss = [rss_bytes(cluster.replica(i).pid) for i in range(len(REPLICAS))]
    shares = [keys[index :: len(REPLICAS)] for index in range(len(REPLICAS))]
    workers: list[Worker] = []
    started = time.monotonic()
    for index, share in enumerate(shares):
        entry = RelayProcess(
            worker=cluster.replica(index).worker,
            port=failover_ports[index],
            metrics_port=cluster.replica(index).metrics_port,
            data_dir=cluster.replica(index).data_dir,
        )
        pairs = [(f"bench-idle-{index}-{n:05d}", key) for n, key in enumerate(share)]
        workers.append(
            bench.start_connectors(
                entry,
                pairs,
                UNUSED_TARGET_PORT,
                rate=RAMP_RATE / len(REPLICAS),
                name=f"idle-{REPLICAS[index]}",
            )
        )
    record: dict[str, Any] = {}
    try:
        wanted = {i: (before_counts[i] or 0) + len(shares[i]) for i in range(len(REPLICAS))}
        up, counts = wait_counts(
            cluster, wanted, len(keys) / RAMP_RATE * 3 + CONNECT_SLACK, "idle links"
        )
        record["seconds_to_connect"] = round(up - started, 2)
        time.sleep(SETTLE)
        rss = [rss_bytes(cluster.replica(i).pid) for i in range(len(REPLICAS))]
        record["links_per_replica"] = counts
        record["idle_links_per_replica"] = [len(share) for share in shares]
        record["rss_bytes"] = rss
        record["bytes_per_link"] = [
            round((rss[i] - before_rss[i]) / len(shares[i])) for i in range(len(REPLICAS))
        ]
        survivors = [i for i in range(len(REPLICAS)) if i != victim]
        total = sum(counts[i] or 0 for i in range(len(REPLICAS)))
        moving = counts[victim] or 0
        killed = cluster.kill(victim)
        back = wait_total(cluster, survivors, total, MOVE_TIMEOUT)
        record["links_moved"] = moving
        record["all_back_s"] = round(back - killed, 2)
        record["links_after"] = cluster.links()
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.stop()
            bench.forget(worker)
        if cluster.replicas[victim] is None:
            cluster.start_replica(victim)
    # Every idle link gone before the next run: only part 1's two links remain, on relay-a.
    deadline = time.monotonic() + MOVE_TIMEOUT
    while sum(c or 0 for c in cluster.links()) > sum(c or 0 for c in before_counts):
        if time.monotonic() > deadline:
            raise WorkerError(
                f"idle links still counted after their connectors stopped: {cluster.links()}"
            )
        time.sleep(POLL * 5)
    return record


def idle_figures(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[list[str]]]:
    figures: dict[str, Any] = {"runs": records}
    rows: list[list[str]] = []
    if not records:
        return figures, rows
    per_link = [median([r["bytes_per_link"][i] for r in records]) for i in range(len(REPLICAS))]
    rss = [median([r["rss_bytes"][i] for r in records]) for i in range(len(REPLICAS))]
    back = median([r["all_back_s"] for r in records])
    figures.update(
        {
            "bytes_per_link": dict(zip(REPLICAS, [round(v) for v in per_link], strict=True)),
            "rss_bytes": dict(zip(REPLICAS, [round(v) for v in rss], strict=True)),
            "all_back_after_kill_s": round(back, 2),
            "links_moved": records[0]["links_moved"],
            "seconds_to_connect": median([r["seconds_to_connect"] for r in records]),
        }
    )
    for i, name in enumerate(REPLICAS):
        rows.append(
            [
                name,
                str(records[0]["idle_links_per_replica"][i]),
                fmt(rss[i] / 2**20),
                fmt(per_link[i] / 1024),
            ]
        )
    return figures, rows


# -- the run -----------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, int, int, int]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--links", type=int, default=None, help=f"idle connectors ({LINKS})")
    parser.add_argument("--size-mib", type=int, default=None, help="MiB per download (256)")
    args = parser.parse_args(argv)
    runs = resolve_runs(parser, args)
    links = args.links if args.links is not None else (QUICK_LINKS if args.quick else LINKS)
    if links < len(REPLICAS):
        parser.error(f"--links must be at least {len(REPLICAS)}")
    size_mib = args.size_mib if args.size_mib is not None else (64 if args.quick else 256)
    if size_mib < 1:
        parser.error("--size-mib must be at least 1")
    return args, runs, links, size_mib


def main(argv: list[str] | None = None) -> int:
    args, runs, links, size_mib = _parse(argv)
    size = size_mib * MIB
    duration = 2.0 if args.quick else 5.0
    kill_runs = 1 if args.quick else min(runs, 3)
    machine = describe_machine()
    print(machine_line(machine))
    print(
        f"3 replicas and Redis; wrk {runs} runs of {duration:g} s, {runs} downloads of "
        f"{size_mib} MiB; {links} idle links, {kill_runs} kill(s); medians shown"
    )
    raise_fd_limit()
    records: list[dict[str, Any]] = []
    with Bench(NAME, profile=args.profile) as bench:
        redis, redis_port = _start_redis(bench)
        try:
            cluster = _new_cluster(bench, redis_port)
            paths = start_forwarding(bench, cluster)
            small, bulk = measure_forwarding(bench, paths, runs, duration, size)
            keys = [c.key for c in mint(cluster.redis_url, links)]
            failover_ports = _start_failovers(bench, cluster)
            for _ in range(kill_runs):
                records.append(idle_run(bench, cluster, failover_ports, keys, victim=2))
        finally:
            # The replicas first (they leave Redis as they stop), Redis last.
            bench.close()
            redis.stop()
    forwarding, rows = forwarding_figures(small, bulk)
    print()
    print_table(
        ["workload", "path", "rate", "p50 ms", "p99 ms", "errors", "x local", "added p50 ms"],
        rows,
        left=2,
    )
    print("local: browser on relay-a, which holds the link; forwarded: on relay-b, via relay-a")
    idle, idle_rows = idle_figures(records)
    print()
    print_table(["replica", "idle links", "RSS MiB", "KiB per link"], idle_rows)
    print(
        f"SIGKILL of relay-c: its {idle.get('links_moved')} links all up on relay-a and "
        f"relay-b {fmt(idle.get('all_back_after_kill_s'), 2)} s after the kill (median)"
    )
    goals = [
        goal(
            "cluster small requests c=32: forwarded req/s / local req/s",
            forwarding["small"]["32"]["forwarded_vs_local"] or math.nan,
            GOAL_RATIO,
            at_least=True,
        ),
        goal(
            "cluster download: forwarded MB/s / local MB/s",
            forwarding["download"]["forwarded_vs_local"] or math.nan,
            GOAL_RATIO,
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
        "duration_s": duration,
        "bytes_per_download": size,
        "idle_links": links,
        "kill_runs": kill_runs,
        "load_generator": "wrk -t1",
        "forwarding": forwarding,
        "idle": idle,
        "goals": goals,
    }
    print(f"wrote {write_results(NAME, payload, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
