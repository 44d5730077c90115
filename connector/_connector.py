"""The connector: keeps one outbound link to the relay and serves the streams it carries."""

from __future__ import annotations

import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import h11
import trio
import trio_websocket

from mux import (
    MuxConfig,
    MuxSession,
    MuxStream,
    SessionClosed,
    StreamResetError,
    WebSocketTransport,
)
from protocol import (
    PROTOCOL_VERSION,
    Backoff,
    BackoffConfig,
    Decision,
    DisconnectReason,
    ErrorCode,
    Role,
)

from ._daemon_pool import DEFAULT_MAX_IDLE, DaemonPool
from ._mesh_types import MeshDirectory, MeshError, MeshResponse
from ._pipe import pipe_to_daemon
from ._status import ConnectorStatus, LinkState

log = logging.getLogger("repowire.connector")

#: The daemon routes other daemons may reach through the mesh.
DEFAULT_MESH_ALLOWLIST: frozenset[tuple[str, str]] = frozenset(
    {("POST", "/notify"), ("POST", "/broadcast")}
)
#: Largest WebSocket message accepted from the relay.
LINK_MAX_MESSAGE = 4 * 1024 * 1024
#: Largest mesh response body read by :meth:`Connector.request`.
MAX_MESH_RESPONSE = 8 * 1024 * 1024
#: While the link stays down, one log line (INFO) per this many failed attempts sums them up
#: ("still down after 5 attempts, last error ..."); the retries between are logged at DEBUG.
LINK_DOWN_SUMMARY_EVERY = 5
#: Seconds a stopping daemon lets the streams in flight finish after telling the relay it is
#: going away (GOAWAY), before it closes the link (:meth:`Connector.shutdown`).
SHUTDOWN_GRACE = 2.0
#: WebSocket close code "going away" (RFC 6455): the endpoint is shutting down.
GOING_AWAY = 1001


def link_url(relay_url: str) -> str:
    """The daemon endpoint for a relay URL: ``wss://host`` → ``wss://host/ws/relay``."""
    parts = urlsplit(relay_url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"relay URL must start with ws:// or wss://, not {relay_url!r}")
    if not parts.hostname:
        raise ValueError(f"relay URL has no host: {relay_url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/ws/relay"):
        path += "/ws/relay"
    return f"{parts.scheme}://{parts.netloc}{path}"


@attrs.frozen(kw_only=True)
class ConnectorConfig:
    relay_url: str = attrs.field()
    api_key: str = attrs.field(repr=False)
    daemon_id: str
    daemon_host: str = "127.0.0.1"
    daemon_port: int = 8377
    #: A CA bundle to trust for a self-signed relay (system trust otherwise).
    ca_file: Path | None = None
    version: str = "0.0.0"
    backoff: BackoffConfig = attrs.field(factory=BackoffConfig)
    mux: MuxConfig = attrs.field(factory=MuxConfig)
    connect_timeout: float = 10.0
    #: Seconds a mesh request may take before it fails with ``timeout``.
    mesh_timeout: float = 30.0
    mesh_allowlist: frozenset[tuple[str, str]] = DEFAULT_MESH_ALLOWLIST
    #: Idle kept-alive connections to the daemon, at most (0: a connection per request).
    daemon_pool_size: int = attrs.field(default=DEFAULT_MAX_IDLE, validator=attrs.validators.ge(0))

    @relay_url.validator
    def _check_url(self, attribute: object, value: str) -> None:
        link_url(value)


class Connector:
    """The outbound side of relay access.

    ``await nursery.start(connector.run)`` returns at once (state ``connecting``); the
    connector then dials, serves the link, and reconnects with the protocol's backoff machine
    until cancelled, or until the relay says the versions are incompatible (then it stays
    ``down`` and says why). A link the relay ends because another connection with the same
    daemon id replaced it (4409), because the key was revoked (4403) or because the key's scope
    holds its quota of links (4429) is retried after a long delay (see
    ``protocol.DisconnectReason``), and the status says why meanwhile. :meth:`status` is a
    snapshot at any moment. Mesh calls fail with :class:`MeshError`, never silently.
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
        task_status.started(self)
        try:
            while True:
                self._attempts += 1
                self._next_retry_at = None
                self._ended_with = None
                self._set_state(LinkState.CONNECTING)
                reason, detail = await self._connect_once()
                decision = self._ended_with or self._record_end(reason, detail)
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
        with 1001 (going away) and wait for the closing handshake (bounded by the mux
        ``close_timeout``). Returns at once when no link is up. The connector dials no more
        afterwards; the caller still cancels :meth:`run`. The caller bounds the whole wait.
        """
        self._stopping = True
        session = self._session
        if session is None or session.ended:
            return
        await session.drain(grace, reason="daemon shutting down")
        await session.aclose(GOING_AWAY, "daemon shutting down")
        await self._idle.wait()

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

    def _record_end(self, reason: DisconnectReason, detail: str) -> Decision:
        """The link is down: decide on the retry and report it in the status at once."""
        now = self._clock()
        decision = self._backoff.disconnected(trio.current_time(), reason, self._rand())
        self._ended_with = decision
        self._last_error = f"{detail}; {decision.message}" if detail else decision.message
        self._last_error_at = now
        self._connected_since = None
        self._session = None
        self._retrying = decision.retry
        self._next_retry_at = now + decision.delay if decision.retry else None
        self._set_state(LinkState.DOWN)
        self._failures_in_a_row += 1
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
        return decision

    async def _connect_once(self) -> tuple[DisconnectReason, str]:
        """One dial and, if it works, the link's whole life. Returns why it ended.

        Every failure is turned into a return value where it happens (inside the nurseries),
        so none escapes as an exception group and brings the daemon down.
        """
        config = self.config
        url = link_url(config.relay_url)
        headers = [
            (b"authorization", b"Bearer " + config.api_key.encode("ascii", "replace")),
            (b"repowire-daemon-id", config.daemon_id.encode("ascii", "replace")),
            (b"repowire-protocol", str(PROTOCOL_VERSION).encode()),
            (b"repowire-version", config.version.encode("ascii", "replace")),
        ]
        parts = urlsplit(url)
        host = parts.hostname or ""
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        try:
            with trio.fail_after(config.connect_timeout):
                tcp = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            return DisconnectReason.NETWORK, "timed out connecting to the relay"
        except OSError as exc:
            return DisconnectReason.NETWORK, f"cannot reach the relay: {exc.strerror or exc}"
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
        if secure:
            try:
                context = ssl.create_default_context(
                    cafile=str(config.ca_file) if config.ca_file else None
                )
            except (OSError, ssl.SSLError) as exc:
                await tcp.aclose()
                return DisconnectReason.NETWORK, f"cannot load the CA file: {exc}"
            stream = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
            # Handshake here rather than inside trio-websocket, so a certificate problem is
            # reported as such instead of as a timeout.
            try:
                with trio.fail_after(config.connect_timeout):
                    await stream.do_handshake()
            except trio.TooSlowError:
                await trio.aclose_forcefully(stream)
                return DisconnectReason.NETWORK, "timed out in the TLS handshake with the relay"
            except trio.BrokenResourceError as exc:
                await trio.aclose_forcefully(stream)
                cause = exc.__cause__
                if isinstance(cause, ssl.SSLCertVerificationError):
                    return (
                        DisconnectReason.NETWORK,
                        f"TLS certificate of the relay not trusted: {cause.verify_message} "
                        "(set relay.ca_file for a private CA)",
                    )
                return DisconnectReason.NETWORK, f"TLS handshake with the relay failed: {cause}"
        # The TCP (or TLS) stream is ours to close: trio-websocket's own client can leave the
        # socket open when the server starts the close.
        outcome: tuple[DisconnectReason, str] = (DisconnectReason.NETWORK, "link lost")
        async with stream:
            # trio-websocket raises a refused handshake from its reader task too, so failures
            # can also arrive as a group from this nursery.
            try:
                async with trio.open_nursery() as nursery:
                    outcome = await self._handshake_and_serve(
                        nursery, stream, parts.netloc, parts.path, headers
                    )
                    nursery.cancel_scope.cancel()
            except* trio_websocket.ConnectionRejected as group:
                status = getattr(group.exceptions[0], "status_code", None)
                outcome = _rejected(status, url)
            except* (
                trio_websocket.HandshakeError,
                trio_websocket.ConnectionClosed,
                trio.BrokenResourceError,
                OSError,
            ) as group:
                outcome = DisconnectReason.NETWORK, f"link failed: {group.exceptions[0]}"
        return outcome

    async def _handshake_and_serve(
        self,
        nursery: trio.Nursery,
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
        netloc: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
    ) -> tuple[DisconnectReason, str]:
        try:
            with trio.fail_after(self.config.connect_timeout):
                connection = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    netloc,
                    path,
                    extra_headers=headers,
                    max_message_size=LINK_MAX_MESSAGE,
                    message_queue_size=4,
                    # trio-websocket reads 4 KiB at a time by default: far too little for bulk.
                    receive_buffer_size=256 * 1024,
                )
        except trio.TooSlowError:
            return DisconnectReason.NETWORK, "timed out in the handshake with the relay"
        except trio_websocket.ConnectionRejected as exc:
            return _rejected(exc.status_code, f"{netloc}{path}")
        except trio_websocket.HandshakeError as exc:
            return (
                DisconnectReason.NETWORK,
                f"handshake with the relay failed: {type(exc).__name__}",
            )
        except (OSError, trio.BrokenResourceError, trio_websocket.ConnectionClosed) as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            if isinstance(cause, ssl.SSLError):
                return DisconnectReason.NETWORK, f"TLS handshake with the relay failed: {cause}"
            return (
                DisconnectReason.NETWORK,
                f"cannot reach the relay: {cause or type(cause).__name__}",
            )
        transport = WebSocketTransport(connection)
        try:
            return await self._serve_link(transport)
        finally:
            # The session closed the link already unless we are being cancelled; either way,
            # do not wait long for a peer that may be gone.
            with trio.move_on_after(self.config.mux.close_timeout) as scope:
                scope.shield = True
                await transport.aclose()

    async def _serve_link(self, transport: WebSocketTransport) -> tuple[DisconnectReason, str]:
        session = MuxSession(transport, Role.CONNECTOR, self.config.mux)
        outcome: tuple[DisconnectReason, str]
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(session.run)
            except SessionClosed as exc:
                closed = session.transport_closed
                if closed is not None and closed.code is not None:
                    reason = closed.reason or exc.reason
                    return (
                        DisconnectReason.from_close_code(closed.code),
                        f"relay closed the link ({closed.code}: {reason})",
                    )
                return DisconnectReason.NETWORK, exc.reason
            self._session = session
            now = self._clock()
            self._connected_since = now
            self._last_connected_at = now
            self._backoff.connected(trio.current_time())
            self._failures_in_a_row = 0
            self._set_state(LinkState.CONNECTED)
            log.info("relay link up: %s as %s", self.config.relay_url, self.config.daemon_id)
            nursery.start_soon(self._accept_streams, session)
            await session.wait_ended()
            outcome = self._why_ended(session)
            # Report the loss now; closing the dead link may take a moment more.
            self._record_end(*outcome)
            nursery.cancel_scope.cancel()
        return outcome

    @staticmethod
    def _why_ended(session: MuxSession) -> tuple[DisconnectReason, str]:
        closed = session.transport_closed
        if closed is not None and closed.code is not None:
            reason = DisconnectReason.from_close_code(closed.code)
            return reason, f"relay closed the link ({closed.code}: {closed.reason or 'no reason'})"
        if session.peer_goaway is not None:
            return DisconnectReason.SHUTTING_DOWN, "relay went away"
        return DisconnectReason.NETWORK, session.close_reason or "link lost"

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

    # ------------------------------------------------------------------ mesh

    def _live_session(self) -> MuxSession:
        session = self._session
        if session is None or session.ended:
            raise MeshError("relay_down", "The relay link is down; see `repowire status`.")
        return session

    async def open_mesh_stream(self, daemon_id: str) -> MuxStream:
        """A raw stream to another daemon of this scope (the relay splices it)."""
        session = self._live_session()
        try:
            return await session.open_stream({"kind": "mesh", "target": daemon_id})
        except SessionClosed:
            raise MeshError("relay_down", "The relay link closed; see `repowire status`.") from None

    async def request(
        self,
        daemon_id: str,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> MeshResponse:
        """One HTTP request to another daemon of the scope, answered whole.

        Raises :class:`MeshError`: ``unknown_daemon``, ``daemon_offline``, ``forbidden`` (the
        target's allowlist or the relay refused), ``relay_down``, ``timeout``.
        """
        with trio.move_on_after(self.config.mesh_timeout) as scope:
            stream = await self.open_mesh_stream(daemon_id)
            try:
                return await _http_exchange(stream, method, path, body, headers)
            except StreamResetError as exc:
                raise _mesh_error(exc.code, daemon_id) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                raise MeshError(
                    "relay_down", f"The link to {daemon_id} broke during the request."
                ) from None
            finally:
                await trio.aclose_forcefully(stream)
        assert scope.cancelled_caught
        raise MeshError(
            "timeout", f"{daemon_id} did not answer within {self.config.mesh_timeout:g} s."
        )

    async def other_daemons(self) -> list[str]:
        """Ids of the other daemons of this scope that are online now (asked of the relay)."""
        return list((await self.directory()).online)

    async def directory(self) -> MeshDirectory:
        """The other daemons of this scope, online now and seen before (asked of the relay).
        Raises :class:`MeshError` (``relay_down``, ``timeout``) when the list cannot be had."""
        session = self._live_session()
        try:
            stream = await session.open_stream({"kind": "directory"})
        except SessionClosed:
            raise MeshError("relay_down", "The relay link closed; see `repowire status`.") from None
        try:
            with trio.fail_after(self.config.mesh_timeout):
                data = bytearray()
                while chunk := await stream.receive_some():
                    data += chunk
                    if len(data) > MAX_MESH_RESPONSE:
                        raise MeshError("relay_down", "The relay's daemon list is too large.")
        except trio.TooSlowError:
            raise MeshError("timeout", "The relay did not list the daemons in time.") from None
        except trio.BrokenResourceError:
            raise MeshError("relay_down", "The relay link broke while listing daemons.") from None
        finally:
            await trio.aclose_forcefully(stream)
        try:
            listing = json.loads(data)
            online = [str(d["daemon_id"]) for d in listing["daemons"]]
            # Older relays send no "offline": nothing is known of those then.
            offline = [str(d["daemon_id"]) for d in listing.get("offline", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise MeshError("relay_down", "The relay sent a malformed daemon list.") from None
        own = self.config.daemon_id
        return MeshDirectory(
            online=tuple(d for d in online if d != own),
            offline=tuple(d for d in offline if d != own),
        )


def _rejected(status: int | None, where: str) -> tuple[DisconnectReason, str]:
    """Why the relay (or a proxy in front of it) answered the upgrade to ``where`` with an
    HTTP status, in words that tell a wrong URL (404) from a refused key (401, 403).
    503 and 429 mean busy, not down: back off as from a 1013."""
    shown = status if status is not None else "?"
    if status == 404:
        detail = (
            f"no relay at {where} (HTTP 404 to the upgrade): check relay.url, which names the "
            "relay's root or its /ws/relay endpoint"
        )
    elif status in (401, 403):
        detail = (
            f"the relay refused the API key (HTTP {shown} to the upgrade): run "
            "'repowire setup --relay --new-key' for a new key"
        )
    else:
        detail = f"relay refused the upgrade (HTTP {shown})"
    if status in (429, 503):
        return DisconnectReason.RELAY_BUSY, detail
    return DisconnectReason.NETWORK, detail


def _mesh_error(code: int, daemon_id: str) -> MeshError:
    if code == ErrorCode.UNKNOWN_TARGET:
        return MeshError("unknown_daemon", f"No daemon {daemon_id} in this scope.")
    if code == ErrorCode.TARGET_OFFLINE:
        return MeshError("daemon_offline", f"Daemon {daemon_id} is offline.")
    if code == ErrorCode.FORBIDDEN:
        return MeshError("forbidden", f"The relay refused the stream to {daemon_id}.")
    return MeshError("relay_down", f"The stream to {daemon_id} was reset (code {code}).")


async def _http_exchange(
    stream: MuxStream,
    method: str,
    path: str,
    body: bytes,
    headers: Sequence[tuple[str, str]],
) -> MeshResponse:
    conn = h11.Connection(h11.CLIENT)
    request_headers = [("host", "repowire-daemon"), ("connection", "close")]
    request_headers += [
        (k, v) for k, v in headers if k.lower() not in ("host", "connection", "content-length")
    ]
    request_headers.append(("content-length", str(len(body))))
    data = conn.send(h11.Request(method=method, target=path, headers=request_headers)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
    status = 0
    response_headers: list[tuple[str, str]] = []
    response_body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some())
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            response_headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers
            ]
        elif isinstance(event, h11.Data):
            response_body += event.data
            if len(response_body) > MAX_MESH_RESPONSE:
                raise h11.RemoteProtocolError("mesh response too large")
        elif isinstance(event, h11.EndOfMessage):
            return MeshResponse(status=status, headers=response_headers, body=bytes(response_body))
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("the stream ended before the response")
