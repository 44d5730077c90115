"""A plain TCP forwarder: the benches' ceiling for what two Python hops can move.

Each accepted connection is dialled onward to ``127.0.0.1:<to_port>`` and bytes are piped both
ways with trio streams, 1 MiB reads, no framing and no parsing. Two of them in series, each in
its own process (as the relay and the connector are), carry a browser's request to the target:
what the tunnel would cost if relaying bytes were all it did. With a server-side TLS context the
forwarder terminates TLS on its listening side (the first hop of the ``--tls`` ceiling).

When either side of a connection ends (EOF or an error), both are closed: HTTP/1.1 clients and
servers here never half-close. Run it with ``await nursery.start(serve_forwarder, to_port)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import ssl
import sys
from collections.abc import Sequence
from functools import partial

import trio

#: Loopback only.
HOST = "127.0.0.1"
#: Bytes per receive on either side.
FORWARD_CHUNK = 1024 * 1024
#: Seconds a client gets to finish its TLS handshake.
HANDSHAKE_TIMEOUT = 30.0


async def _pump(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream) -> None:
    """Copy ``source`` into ``sink`` until EOF."""
    while data := await source.receive_some(FORWARD_CHUNK):
        await sink.send_all(data)


async def _forward(to_port: int, tls: ssl.SSLContext | None, accepted: trio.SocketStream) -> None:
    client: trio.abc.Stream = accepted
    try:
        if tls is not None:
            secured = trio.SSLStream(accepted, tls, server_side=True)
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await secured.do_handshake()
            client = secured
        upstream = await trio.open_tcp_stream(HOST, to_port)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        await trio.aclose_forcefully(client)
        return
    try:
        async with trio.open_nursery() as nursery:

            async def one_way(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
                # Whichever way ends first ends the connection.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await _pump(source, sink)
                nursery.cancel_scope.cancel()

            nursery.start_soon(one_way, client, upstream)
            nursery.start_soon(one_way, upstream, client)
    finally:
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)


async def serve_forwarder(
    to_port: int,
    tls: ssl.SSLContext | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward every connection accepted on 127.0.0.1 (a port the system picks, reported once
    listening) to ``to_port``, until cancelled."""
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, partial(_forward, to_port, tls), 0, host=HOST)
        )
        task_status.started(listeners[0].socket.getsockname()[1])


# -- failover: one preferred destination, the others when it refuses ----------------------


async def _dial_first(ports: Sequence[int], start: int) -> trio.SocketStream:
    """A connection to ``ports[0]``, else to the next port that accepts, trying the others
    from index ``start`` on (so refused clients spread over them). OSError if none does."""
    others = list(ports[1:])
    order = [ports[0], *others[start % len(others) :], *others[: start % len(others)]]
    failure: OSError | None = None
    for port in order:
        try:
            return await trio.open_tcp_stream(HOST, port)
        except OSError as exc:
            failure = exc
    assert failure is not None
    raise failure


async def _failover(ports: Sequence[int], counter: list[int], accepted: trio.SocketStream) -> None:
    counter[0] += 1
    try:
        upstream = await _dial_first(ports, counter[0])
    except OSError:
        await trio.aclose_forcefully(accepted)
        return
    try:
        async with trio.open_nursery() as nursery:

            async def one_way(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await _pump(source, sink)
                nursery.cancel_scope.cancel()

            nursery.start_soon(one_way, accepted, upstream)
            nursery.start_soon(one_way, upstream, accepted)
    finally:
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(accepted)


async def serve_failover(
    ports: Sequence[int], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Forward every connection accepted on 127.0.0.1 (a port the system picks, reported once
    listening) to ``ports[0]``, or, when that refuses, to the first of the others that
    accepts (round robin over them), until cancelled: the address a connector dials to stay
    with one replica of a cluster and move to another when that one is gone."""
    if len(ports) < 2:
        raise ValueError("a failover forwarder needs at least two ports")
    counter = [0]
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, partial(_failover, list(ports), counter), 0, host=HOST)
        )
        task_status.started(listeners[0].socket.getsockname()[1])


async def _failover_main(ports: Sequence[int]) -> None:
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(partial(serve_failover, ports))
        sys.stdout.write(json.dumps({"event": "ready", "port": port}) + "\n")
        sys.stdout.flush()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.forwarder --failover P1,P2,...``: a failover forwarder process
    (a JSON ``ready`` line with its port on stdout; stops at SIGTERM)."""
    parser = argparse.ArgumentParser(prog="python -m bench.forwarder")
    parser.add_argument("--failover", required=True, help="preferred port, then the others")
    args = parser.parse_args(argv)
    from bench.processes import raise_fd_limit

    raise_fd_limit()
    trio.run(_failover_main, [int(part) for part in args.failover.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
