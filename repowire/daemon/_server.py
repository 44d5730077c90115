"""Run the daemon's app under hypercorn's trio worker, inside the caller's nursery."""

from __future__ import annotations

import logging
import socket
from typing import Final

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from relay import AsgiGuard

from ._settings import MAX_JSON_BODY

#: The daemon's usual address.
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8377

#: Seconds open connections (SSE streams, WebSockets, requests in flight) get to finish once
#: the server is asked to stop; then they are cancelled.
GRACEFUL_SHUTDOWN_TIMEOUT: Final = 2.0

#: Seconds a client may accept no data at all (a zero receive window, or no acknowledgement)
#: before the kernel aborts its connection (TCP_USER_TIMEOUT, where the platform has it).
#: hypercorn's socket writes cannot be cancelled, so without this a client that stops reading
#: holds its response task -- and the daemon's shutdown -- for as long as it likes.
STALLED_CLIENT_TIMEOUT: Final = 30.0

#: Pending connections the kernel queues before the server accepts them.
LISTEN_BACKLOG: Final = 128

#: hypercorn's own messages (startup, errors) go here. There is no access log: request lines
#: can carry query strings, and nothing here logs headers or bodies.
server_logger = logging.getLogger("repowire.daemon.server")


def make_config(host: str, port: int, *, graceful_timeout: float) -> Config:
    """The hypercorn configuration the daemon runs with."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = server_logger
    config.graceful_timeout = graceful_timeout
    config.websocket_max_message_size = MAX_JSON_BODY
    config.include_server_header = False
    config.backlog = LISTEN_BACKLOG
    return config


def _listen(host: str, port: int, *, stalled_timeout: float) -> socket.socket:
    """A listening TCP socket on ``host:port``; closed again if binding fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            # Inherited by accepted connections: see STALLED_CLIENT_TIMEOUT.
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(stalled_timeout * 1000))
            )
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_daemon(
    app: QuartTrio,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    graceful_timeout: float = GRACEFUL_SHUTDOWN_TIMEOUT,
    stalled_client_timeout: float = STALLED_CLIENT_TIMEOUT,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled.

    Use with ``await nursery.start(serve_daemon, app)``: it reports the bound ``(host, port)``
    (the real port when ``port`` is 0) once the socket listens. On cancellation it stops
    accepting, gives open connections ``graceful_timeout`` seconds, then cancels them and
    lets the cancellation through; a connection stuck writing to a client that reads nothing
    ends within ``stalled_client_timeout`` seconds. Raises OSError (before reporting) if the
    address cannot be bound.
    """
    config = make_config(host, port, graceful_timeout=graceful_timeout)
    # The socket is ours, so it is closed on every path, a failed bind included.
    with _listen(host, port, stalled_timeout=stalled_client_timeout) as sock:
        bound_host, bound_port = sock.getsockname()[:2]
        stop = trio.Event()
        # The server runs shielded so the caller's cancellation becomes a graceful stop
        # (below) instead of cutting every connection at once.
        server_scope = trio.CancelScope(shield=True)
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus[list[str]]) -> None:
                with server_scope:
                    await worker_serve(
                        # The guard shields the sends that end a response: quart-trio cancels
                        # its request task when hypercorn reports the disconnect during that
                        # send, which otherwise lands in hypercorn's own close and idle-timer
                        # code and leaves the connection open for ever.
                        wrap_app(
                            AsgiGuard(app, "daemon", server_logger),  # type: ignore[arg-type]
                            config.wsgi_max_body_size,
                            "asgi",
                        ),
                        config,
                        sockets=Sockets(
                            secure_sockets=[], insecure_sockets=[sock], quic_sockets=[]
                        ),
                        shutdown_trigger=stop.wait,
                        task_status=task_status,
                    )
                # The server only ends by itself if something stopped it; then so do we.
                nursery.cancel_scope.cancel()

            await nursery.start(run)
            task_status.started((bound_host, bound_port))
            try:
                await trio.sleep_forever()
            finally:
                stop.set()
                # hypercorn cancels connections after graceful_timeout itself; this is the
                # backstop in case its own shutdown (the app's lifespan) hangs.
                server_scope.deadline = trio.current_time() + graceful_timeout + 1.0
