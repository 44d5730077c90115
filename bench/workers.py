"""The processes a bench starts: ``python -m bench.workers <role> ...`` from the repository root.

Roles:

- ``target``: the benches' tiny HTTP server (:mod:`bench.target`);
- ``daemon``: the local daemon with its connector, as ``repowire serve --relay`` runs them, plus
  an event publisher driven by JSON command lines on stdin;
- ``connectors``: any number of bare connectors (production defaults), each linking one daemon
  id to one port;
- ``forwarder``: a plain TCP forwarder (:mod:`bench.forwarder`), optionally terminating TLS.

A worker says what the bench waits for as one JSON object per line on stdout (``{"event":
"ready", ...}``); its logs (warnings only) go to stderr, which the bench sends to a file. Keys
arrive in files only the owner can read, never on the command line. SIGTERM or SIGINT ends a
worker normally (so ``--profile`` dumps are written).
"""

from __future__ import annotations

import sys

if not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.workers")

import argparse
import collections
import gc
import json
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.forwarder import serve_forwarder
from bench.processes import READY_TIMEOUT, raise_fd_limit
from bench.target import HOST, serve_target
from bench.tls import server_context

#: Seconds between progress lines of the ``connectors`` worker.
PROGRESS_INTERVAL = 1.0


def emit(message: dict[str, Any]) -> None:
    """One JSON line on stdout, for the bench."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _until_sigterm() -> None:
    """Return at SIGTERM or SIGINT, so the worker ends normally (and cProfile can dump)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


def _read_keys(path: Path) -> list[tuple[str, str]]:
    pairs = json.loads(path.read_text())
    return [(str(daemon_id), str(key)) for daemon_id, key in pairs]


# -- target and forwarder -----------------------------------------------------------------


async def target_main(args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_target)
        emit({"event": "ready", "port": port})
        await _until_sigterm()
        nursery.cancel_scope.cancel()


async def forwarder_main(args: argparse.Namespace) -> None:
    tls = None if args.certfile is None else server_context(args.certfile, args.keyfile)
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_forwarder, args.to_port, tls)
        emit({"event": "ready", "port": port})
        await _until_sigterm()
        nursery.cancel_scope.cancel()


# -- daemon -------------------------------------------------------------------------------


async def _commands() -> AsyncIterator[dict[str, Any]]:
    """JSON command lines from stdin (an async generator of dicts); ends at EOF."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = bytearray()
    async with stream:
        while True:
            newline = buffer.find(b"\n")
            if newline >= 0:
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                if line.strip():
                    yield json.loads(line)
                continue
            data = await stream.receive_some(4096)
            if not data:
                return
            buffer += data


async def _publish(state: Any, rate: float, count: int) -> dict[str, Any]:
    """Publish ``count`` ``message`` events at ``rate`` per second, on a fixed schedule (so a
    late wake-up is caught up, not carried over)."""
    start = trio.current_time()
    first = state.last_event_id + 1
    for index in range(count):
        await trio.sleep_until(start + index / rate)
        state.publish("message", {"seq": index, "text": "bench"})
    return {
        "event": "published",
        "count": count,
        "first_id": first,
        "last_id": state.last_event_id,
        "seconds": trio.current_time() - start,
    }


async def _serve_commands(state: Any) -> None:
    async for command in _commands():
        if command.get("cmd") == "publish":
            emit(await _publish(state, float(command["rate"]), int(command["count"])))
        else:
            emit({"event": "error", "detail": f"unknown command {command.get('cmd')!r}"})


async def daemon_main(args: argparse.Namespace) -> None:
    """The daemon and its connector, built as ``repowire._serve.run_daemon`` builds them, with
    the daemon's state kept here so that events can be published on command."""
    from connector import LinkState
    from repowire import __version__
    from repowire._serve import build_connector
    from repowire.config import DaemonConfig, RelayConfig, Settings
    from repowire.daemon import DaemonState, create_app, serve_daemon
    from repowire.dashboard import STATIC_DIR

    [(daemon_id, key)] = _read_keys(args.keys)
    home = Path(os.environ.get("REPOWIRE_HOME", tempfile.gettempdir()))
    settings = Settings(
        home=home,
        config_path=home / "config.yaml",
        daemon=DaemonConfig(host=HOST, port=0, daemon_id=daemon_id),
        relay=RelayConfig(enabled=True, url=args.relay_url, api_key=key, ca_file=args.ca_file),
    )
    connector = build_connector(settings)
    assert connector is not None
    state = DaemonState()
    app = create_app(
        daemon_id=daemon_id,
        version=__version__,
        state=state,
        mesh=connector,
        relay_status=lambda: connector.status().to_json(),
        dashboard_dir=STATIC_DIR,
    )
    async with trio.open_nursery() as nursery:
        address: tuple[str, int] = await nursery.start(
            lambda task_status: serve_daemon(app, host=HOST, port=0, task_status=task_status)
        )
        connector.config = attrs.evolve(connector.config, daemon_port=address[1])
        await nursery.start(connector.run)
        with trio.fail_after(READY_TIMEOUT):
            await connector.wait_state(LinkState.CONNECTED)
        emit({"event": "ready", "port": address[1]})
        nursery.start_soon(_serve_commands, state)
        await _until_sigterm()
        nursery.cancel_scope.cancel()


# -- connectors ---------------------------------------------------------------------------


async def _report_progress(connectors: Sequence[Any]) -> None:
    """A progress line whenever the count of connected connectors changed, with why the
    others are not connected (their last errors: never secrets)."""
    from connector import LinkState

    last = -1
    while True:
        statuses = [c.status() for c in connectors]
        connected = sum(1 for st in statuses if st.state is LinkState.CONNECTED)
        if connected != last:
            reasons = collections.Counter(
                (st.last_error or st.state.value)[:120]
                for st in statuses
                if st.state is not LinkState.CONNECTED
            )
            emit(
                {
                    "event": "progress",
                    "connected": connected,
                    "total": len(connectors),
                    "not_connected_because": dict(reasons.most_common(3)),
                }
            )
            last = connected
        await trio.sleep(PROGRESS_INTERVAL)


async def connectors_main(args: argparse.Namespace) -> None:
    """Bare connectors (production defaults), each pointing its streams at ``target_port``."""
    from connector import Connector, ConnectorConfig
    from mux import link_mux_config
    from relay._server import GC_THRESHOLDS

    raise_fd_limit()
    # Thousands of connectors in one process: the relay's collector thresholds (see
    # relay._server.GC_THRESHOLDS), or this process pauses for seconds in full collections
    # that no real daemon, with its single connector, ever has.
    gc.set_threshold(*GC_THRESHOLDS)
    mux = link_mux_config()  # what ConnectorConfig uses unless told otherwise
    if args.keepalive is not None:
        mux = attrs.evolve(mux, keepalive_interval=args.keepalive)
    connectors = [
        Connector(
            ConnectorConfig(
                relay_url=args.relay_url,
                api_key=key,
                daemon_id=daemon_id,
                daemon_port=args.target_port,
                ca_file=args.ca_file,
                version="bench",
                mux=mux,
            )
        )
        for daemon_id, key in _read_keys(args.keys)
    ]
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        for index, connector in enumerate(connectors):
            await trio.sleep_until(start + index / args.rate)
            await nursery.start(connector.run)
        emit({"event": "started", "count": len(connectors)})
        nursery.start_soon(_report_progress, connectors)
        await _until_sigterm()
        nursery.cancel_scope.cancel()


# -- entry --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.workers", description="Processes started by the tunnel benchmarks."
    )
    roles = parser.add_subparsers(dest="role", required=True)
    roles.add_parser("target", help="the tiny HTTP server: /small, /bytes?n=N, POST /sink")
    daemon = roles.add_parser("daemon", help="the daemon and its connector")
    daemon.add_argument("--relay-url", required=True)
    daemon.add_argument("--keys", type=Path, required=True, help="[[daemon_id, key]] (private)")
    daemon.add_argument("--ca-file", type=Path, default=None, help="CA to trust for wss://")
    connectors = roles.add_parser("connectors", help="bare connectors pointing at one port")
    connectors.add_argument("--relay-url", required=True)
    connectors.add_argument("--keys", type=Path, required=True, help="[[daemon_id, key], ...]")
    connectors.add_argument("--target-port", type=int, required=True)
    connectors.add_argument("--rate", type=float, default=1000.0, help="connectors started/s")
    connectors.add_argument("--ca-file", type=Path, default=None, help="CA to trust for wss://")
    connectors.add_argument(
        "--keepalive",
        type=float,
        default=None,
        help="seconds between each connector's keepalive pings (default: the product's)",
    )
    forwarder = roles.add_parser("forwarder", help="a plain TCP forwarder to one port")
    forwarder.add_argument("--to-port", type=int, required=True)
    forwarder.add_argument("--certfile", type=Path, default=None, help="terminate TLS: chain")
    forwarder.add_argument("--keyfile", type=Path, default=None, help="terminate TLS: key")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    main_for_role: dict[str, Callable[[argparse.Namespace], Any]] = {
        "target": target_main,
        "daemon": daemon_main,
        "connectors": connectors_main,
        "forwarder": forwarder_main,
    }
    # Worker logs (stderr, into the bench's log file) are warnings only: per-link INFO lines
    # would cost CPU at thousands of links and say nothing the bench needs.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    trio.run(main_for_role[args.role], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
