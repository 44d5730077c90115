"""The connector: keeps one outbound link to the relay and serves the streams it carries.

Dialling one link is :mod:`connector._dialer`'s; mesh calls are :mod:`connector._mesh_client`'s.
This module holds the reconnect loop around them, the status it reports, a clean shutdown, and
the streams the relay opens towards the daemon.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

import trio

from mux import MuxSession, MuxStream, SessionClosed, install_fast_masking
from protocol import Backoff, CloseCode, Decision, ErrorCode

from ._config import ConnectorConfig
from ._daemon_pool import DaemonPool
from ._dialer import LinkEnd, open_link
from ._mesh_client import MeshClient
from ._mesh_types import MeshDirectory, MeshResponse
from ._pipe import pipe_to_daemon
from ._status import ConnectorStatus, LinkState

log = logging.getLogger("repowire.connector")

#: While the link stays down, one log line (INFO) per this many failed attempts sums them up
#: ("still down after 5 attempts, last error ..."); the retries between are logged at DEBUG.
LINK_DOWN_SUMMARY_EVERY = 5
#: Seconds a stopping daemon lets the streams in flight finish after telling the relay it is
#: going away (GOAWAY), before it closes the link (:meth:`Connector.shutdown`).
SHUTDOWN_GRACE = 2.0
#: WebSocket close code "going away" (RFC 6455, 1001): the endpoint is shutting down.


class Connector:
    """The outbound side of relay access.

    ``await nursery.start(connector.run)`` returns at once (state ``connecting``); the
    connector then dials, serves the link, and reconnects with the protocol's backoff machine
    until cancelled, or until the relay says the versions are incompatible (then it stays
    ``down`` and says why). A link the relay ends because another connection with the same
    daemon id replaced it (``CloseCode.REPLACED``, 4409), because the key was revoked
    (``KEY_REVOKED``, 4403) or because the key's scope holds its quota of links
    (``TOO_MANY_LINKS``, 4429) is retried after a long delay (see
    ``protocol.DisconnectReason``), and the status says why meanwhile. :meth:`status` is a
    snapshot at any moment. Mesh calls (:attr:`mesh`, and the same methods here) fail with
    :class:`MeshError`, never silently.
    """

    def __init__(
        self,
        config: ConnectorConfig,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self._clock = clock
        self._rand = rand
        self._backoff = Backoff(config.backoff)
        self._session: MuxSession | None = None
        self._state = LinkState.CONNECTING
        self._connected_since: float | None = None
        self._last_connected_at: float | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._attempts = 0
        self._next_retry_at: float | None = None
        self._retrying = True
        self._ended_with: Decision | None = None
        self._state_changed = trio.Event()
        self._pool: DaemonPool | None = None
        #: Attempts that failed since the link was last up (for the log's summary lines).
        self._failures_in_a_row = 0
        #: Set by :meth:`shutdown`: the loop dials no more.
        self._stopping = False
        #: Set once the loop has stopped dialling after :meth:`shutdown` (the link, if any, is
        #: closed by then).
        self._idle = trio.Event()
        #: Requests to other daemons, over whichever link is up when they are made.
        self.mesh = MeshClient(lambda: self._session, lambda: self.config)

    # ------------------------------------------------------------------ status

    def status(self) -> ConnectorStatus:
        session = self._session
        rtt = session.rtt if session is not None and session.rtt is not None else None
        return ConnectorStatus(
            state=self._state,
            relay_url=self.config.relay_url,
            daemon_id=self.config.daemon_id,
            connected_since=self._connected_since,
            last_connected_at=self._last_connected_at,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
            rtt_ms=round(rtt * 1000, 3) if rtt is not None else None,
            attempts=self._attempts,
            next_retry_at=self._next_retry_at,
            # Only a link that is not up can be retrying.
            retrying=self._retrying and self._state is not LinkState.CONNECTED,
        )

    async def wait_state(self, state: LinkState) -> None:
        """Wait until the connector is in ``state`` (for tests and tools)."""
        while self._state is not state:
            await self._state_changed.wait()

    def _set_state(self, state: LinkState) -> None:
        self._state = state
        # Wake every waiter, then arm a fresh event for the next change.
        changed, self._state_changed = self._state_changed, trio.Event()
        changed.set()

    # ------------------------------------------------------------------ the reconnect loop

    async def run(
        self, *, task_status: trio.TaskStatus[Connector] = trio.TASK_STATUS_IGNORED
    ) -> None:
        install_fast_masking()  # the connector masks every byte it sends (see mux/_masking.py)
        task_status.started(self)
        try:
            while True:
                self._attempts += 1
                self._next_retry_at = None
                self._ended_with = None
                self._set_state(LinkState.CONNECTING)
                end = await open_link(self.config, on_up=self._link_up, on_down=self._record_end)
                decision = self._ended_with or self._record_end(end)
                if self._stopping:
                    self._idle.set()
                    await trio.sleep_forever()
                if not decision.retry:
                    await trio.sleep_forever()
                await trio.sleep(decision.delay)
        finally:
            if self._pool is not None:
                with trio.CancelScope(shield=True):
                    await self._pool.aclose()

    async def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Leave the relay cleanly, as a stopping daemon does: send GOAWAY (the relay opens no
        new streams), give the open streams up to ``grace`` seconds, then close the WebSocket
        with ``CloseCode.GOING_AWAY`` (1001) and wait for the closing handshake (bounded by the mux
        ``close_timeout``). Returns at once when no link is up. The connector dials no more
        afterwards; the caller still cancels :meth:`run`. The caller bounds the whole wait.
        """
        self._stopping = True
        session = self._session
        if session is None or session.ended:
            return
        await session.drain(grace, reason="daemon shutting down")
        await session.aclose(CloseCode.GOING_AWAY, "daemon shutting down")
        await self._idle.wait()

    def _link_up(self, session: MuxSession, nursery: trio.Nursery) -> None:
        """The link is up: report it, and serve the streams the relay opens (in ``nursery``,
        which ends with the link)."""
        self._session = session
        now = self._clock()
        self._connected_since = now
        self._last_connected_at = now
        self._backoff.connected(trio.current_time())
        self._failures_in_a_row = 0
        self._set_state(LinkState.CONNECTED)
        log.info("relay link up: %s as %s", self.config.relay_url, self.config.daemon_id)
        nursery.start_soon(self._accept_streams, session)

    def _record_end(self, end: LinkEnd) -> Decision:
        """The link is down: decide on the retry and report it in the status at once."""
        now = self._clock()
        decision = self._backoff.disconnected(trio.current_time(), end.reason, self._rand())
        self._ended_with = decision
        detail = end.detail
        self._last_error = f"{detail}; {decision.message}" if detail else decision.message
        self._last_error_at = now
        self._connected_since = None
        self._session = None
        self._retrying = decision.retry
        self._next_retry_at = now + decision.delay if decision.retry else None
        self._set_state(LinkState.DOWN)
        self._failures_in_a_row += 1
        self._log_end(detail, decision)
        return decision

    def _log_end(self, detail: str, decision: Decision) -> None:
        """One line for the first failure in a row, a summary every
        :data:`LINK_DOWN_SUMMARY_EVERY`, DEBUG between; WARNING when the connector stops."""
        failures = self._failures_in_a_row
        if not decision.retry:
            log.warning("relay link stopped: %s", self._last_error)
        elif failures == 1:
            log.info("relay link down (%s); retrying in %.1f s", detail, decision.delay)
        elif failures % LINK_DOWN_SUMMARY_EVERY == 0:
            log.info(
                "relay link still down after %d attempts, last error: %s; next retry in %.1f s",
                failures,
                detail,
                decision.delay,
            )
        else:
            log.debug("relay link down (%s); retrying in %.1f s", detail, decision.delay)

    # ------------------------------------------------------------------ streams to the daemon

    @property
    def daemon_pool(self) -> DaemonPool | None:
        """The kept-alive connections to the daemon (``None`` before the first stream)."""
        return self._pool

    def _daemon_pool(self) -> DaemonPool:
        """The pool of connections to the configured daemon (a new one if the address
        changed; the old one's idle connections are closed)."""
        config = self.config
        pool = self._pool
        if pool is None or (pool.host, pool.port) != (config.daemon_host, config.daemon_port):
            if pool is not None:
                pool.close_idle()
            pool = self._pool = DaemonPool(
                config.daemon_host, config.daemon_port, max_idle=config.daemon_pool_size
            )
        return pool

    async def _accept_streams(self, session: MuxSession) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await session.accept_stream()
                except SessionClosed:
                    return
                nursery.start_soon(self._serve_stream, stream)

    async def _serve_stream(self, stream: MuxStream) -> None:
        """One stream; a failure here is this stream's alone, never the link's."""
        config = self.config
        try:
            await pipe_to_daemon(
                stream,
                pool=self._daemon_pool(),
                mesh_allowlist=config.mesh_allowlist,
            )
        except Exception:
            log.exception("stream %d failed", stream.stream_id)
            stream.reset(ErrorCode.INTERNAL_ERROR)

    # ------------------------------------------------------------------ mesh (see MeshClient)

    async def open_mesh_stream(self, daemon_id: str) -> MuxStream:
        """:meth:`MeshClient.open_stream` over this connector's link."""
        return await self.mesh.open_stream(daemon_id)

    async def request(
        self,
        daemon_id: str,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> MeshResponse:
        """:meth:`MeshClient.request` over this connector's link."""
        return await self.mesh.request(daemon_id, method, path, body=body, headers=headers)

    async def other_daemons(self) -> list[str]:
        """:meth:`MeshClient.other_daemons` over this connector's link."""
        return await self.mesh.other_daemons()

    async def directory(self) -> MeshDirectory:
        """:meth:`MeshClient.directory` over this connector's link."""
        return await self.mesh.directory()
