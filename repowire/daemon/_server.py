"""Run the daemon's app under hypercorn's trio worker, inside the caller's nursery."""

from __future__ import annotations

import logging
from typing import Final
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

from ._settings import MAX_JSON_BODY

#: The daemon's usual address.
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8377

#: Seconds open connections (SSE streams, WebSockets, requests in flight) get to finish once
#: the server is asked to stop; then they are cancelled.
GRACEFUL_SHUTDOWN_TIMEOUT: Final = 2.0

#: hypercorn's own messages (startup, errors) go here, never an access log: request lines can
#: carry query strings and headers are not logged by design.
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
    return config


async def serve_daemon(
    app: QuartTrio,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    graceful_timeout: float = GRACEFUL_SHUTDOWN_TIMEOUT,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled.

    Use with ``await nursery.start(serve_daemon, app)``: it reports the bound ``(host, port)``
    (the real port when ``port`` is 0) once the socket listens. On cancellation it stops
    accepting, gives open connections ``graceful_timeout`` seconds, then cancels them and
    returns (re-raising the cancellation). Raises OSError if the address cannot be bound.
    """
    config = make_config(host, port, graceful_timeout=graceful_timeout)
    stop = trio.Event()
    # The server runs shielded so the caller's cancellation becomes a graceful stop (below)
    # instead of cutting every connection at once; the deadline bounds how long that takes.
    server_scope = trio.CancelScope(shield=True)

    async with trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            with server_scope:
                await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
            # The server only ends by itself if something stopped it; then so do we.
            nursery.cancel_scope.cancel()

        binds: list[str] = await nursery.start(run)
        task_status.started(_bound_address(binds, host))
        try:
            await trio.sleep_forever()
        finally:
            stop.set()
            # hypercorn cancels connections after graceful_timeout itself; this is a backstop
            # in case its own shutdown (the app's lifespan) hangs.
            server_scope.deadline = trio.current_time() + graceful_timeout + 1.0


def _bound_address(binds: list[str], host: str) -> tuple[str, int]:
    """The ``(host, port)`` of hypercorn's first bind, e.g. from ``http://127.0.0.1:51234``."""
    for bind in binds:
        parts = urlsplit(bind)
        if parts.port is not None:
            return parts.hostname or host, parts.port
    raise RuntimeError(f"the server reported no usable address: {binds!r}")
