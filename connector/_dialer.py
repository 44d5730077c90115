"""One link to the relay: dial (TCP, then TLS for ``wss``), the WebSocket handshake with the key
in the ``Authorization`` header, the multiplexed session over it, and why the link ended.

:func:`open_link` turns every way a link can fail or end (unreachable relay, TLS trouble, an
upgrade refused with an HTTP status, a close code from the relay, a lost connection) into a
:class:`LinkEnd`; what to do about it (retry, when, what the status says) is the caller's.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from mux import MuxSession, SessionClosed, WebSocketTransport, peer_message_limit
from protocol import PROTOCOL_VERSION, DisconnectReason, Role

from ._config import ConnectorConfig, link_url

#: Largest WebSocket message accepted from the relay.
LINK_MAX_MESSAGE = 4 * 1024 * 1024
#: WebSocket messages trio-websocket queues before its reader waits for us.
LINK_MESSAGE_QUEUE = 4
#: Bytes trio-websocket reads at a time (its default, 4 KiB, is far too little for bulk).
LINK_RECEIVE_BUFFER = 256 * 1024

RelayStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@attrs.frozen
class LinkEnd:
    """How one link ended, or why it never came up: the reason the backoff decides on, and one
    sentence for the status and the log (never a secret)."""

    reason: DisconnectReason
    detail: str


#: Called once the link is up with its running session, and a nursery for the work that
#: serves it (cancelled when the link ends).
LinkUp = Callable[[MuxSession, trio.Nursery], None]
#: Called once a link that was up has ended, before its connection is closed.
LinkDown = Callable[[LinkEnd], object]


async def open_link(config: ConnectorConfig, *, on_up: LinkUp, on_down: LinkDown) -> LinkEnd:
    """Dial the relay once and, if the link comes up, keep it until it ends. Returns how it
    ended.

    ``on_up`` is called when the session is running, ``on_down`` as soon as an up link has
    ended (so the status can say so while the dead connection is still being closed); neither
    is called for a link that never came up. Every failure is turned into the return value
    where it happens (inside the nurseries), so none escapes as an exception group; only
    cancellation and the callbacks' own errors propagate.
    """
    return await _Attempt(config, on_up, on_down).run()


class _Attempt:
    """One dial, with the relay's address worked out once."""

    def __init__(self, config: ConnectorConfig, on_up: LinkUp, on_down: LinkDown) -> None:
        self.config = config
        self.on_up = on_up
        self.on_down = on_down
        self.url = link_url(config.relay_url)
        parts = urlsplit(self.url)
        self.host = parts.hostname or ""
        self.secure = parts.scheme == "wss"
        self.port = parts.port or (443 if self.secure else 80)
        self.netloc = parts.netloc
        self.path = parts.path

    def headers(self) -> list[tuple[bytes, bytes]]:
        config = self.config
        return [
            (b"authorization", b"Bearer " + config.api_key.encode("ascii", "replace")),
            (b"repowire-daemon-id", config.daemon_id.encode("ascii", "replace")),
            (b"repowire-protocol", str(PROTOCOL_VERSION).encode()),
            (b"repowire-version", config.version.encode("ascii", "replace")),
        ]

    async def run(self) -> LinkEnd:
        opened = await self.open_stream()
        if isinstance(opened, LinkEnd):
            return opened
        # The TCP (or TLS) stream is ours to close: trio-websocket's own client can leave the
        # socket open when the server starts the close.
        outcome = LinkEnd(DisconnectReason.NETWORK, "link lost")
        async with opened:
            # trio-websocket raises a refused handshake from its reader task too, so failures
            # can also arrive as a group from this nursery.
            try:
                async with trio.open_nursery() as nursery:
                    outcome = await self.handshake_and_serve(nursery, opened)
                    nursery.cancel_scope.cancel()
            except* trio_websocket.ConnectionRejected as group:
                status = getattr(group.exceptions[0], "status_code", None)
                outcome = rejected(status, self.url)
            except* (
                trio_websocket.HandshakeError,
                trio_websocket.ConnectionClosed,
                trio.BrokenResourceError,
                OSError,
            ) as group:
                outcome = LinkEnd(DisconnectReason.NETWORK, f"link failed: {group.exceptions[0]}")
        return outcome

    async def open_stream(self) -> RelayStream | LinkEnd:
        """The connection to the relay, TLS done for ``wss``; or why there is none."""
        try:
            with trio.fail_after(self.config.connect_timeout):
                tcp = await trio.open_tcp_stream(self.host, self.port)
        except trio.TooSlowError:
            return LinkEnd(DisconnectReason.NETWORK, "timed out connecting to the relay")
        except OSError as exc:
            return LinkEnd(
                DisconnectReason.NETWORK, f"cannot reach the relay: {exc.strerror or exc}"
            )
        if not self.secure:
            return tcp
        return await self.start_tls(tcp)

    async def start_tls(self, tcp: trio.SocketStream) -> RelayStream | LinkEnd:
        """TLS over ``tcp`` (closed on failure), the handshake done."""
        ca_file = self.config.ca_file
        try:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            await tcp.aclose()
            return LinkEnd(DisconnectReason.NETWORK, f"cannot load the CA file: {exc}")
        stream = trio.SSLStream(tcp, context, server_hostname=self.host, https_compatible=True)
        # Handshake here rather than inside trio-websocket, so a certificate problem is
        # reported as such instead of as a timeout.
        try:
            with trio.fail_after(self.config.connect_timeout):
                await stream.do_handshake()
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            return LinkEnd(
                DisconnectReason.NETWORK, "timed out in the TLS handshake with the relay"
            )
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                return LinkEnd(
                    DisconnectReason.NETWORK,
                    f"TLS certificate of the relay not trusted: {cause.verify_message} "
                    "(set relay.ca_file for a private CA)",
                )
            return LinkEnd(
                DisconnectReason.NETWORK, f"TLS handshake with the relay failed: {cause}"
            )
        return stream

    async def handshake_and_serve(self, nursery: trio.Nursery, stream: RelayStream) -> LinkEnd:
        connection = await self.websocket(nursery, stream)
        if isinstance(connection, LinkEnd):
            return connection
        transport = WebSocketTransport(connection)
        try:
            return await self.serve(transport, peer_message_limit(connection.handshake_headers))
        finally:
            # The session closed the link already unless we are being cancelled; either way,
            # do not wait long for a peer that may be gone.
            with trio.move_on_after(self.config.mux.close_timeout) as scope:
                scope.shield = True
                await transport.aclose()

    async def websocket(
        self, nursery: trio.Nursery, stream: RelayStream
    ) -> trio_websocket.WebSocketConnection | LinkEnd:
        """The WebSocket upgrade on ``stream`` (its reader task runs in ``nursery``)."""
        try:
            with trio.fail_after(self.config.connect_timeout):
                return await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    self.netloc,
                    self.path,
                    extra_headers=self.headers(),
                    max_message_size=LINK_MAX_MESSAGE,
                    message_queue_size=LINK_MESSAGE_QUEUE,
                    receive_buffer_size=LINK_RECEIVE_BUFFER,
                )
        except trio.TooSlowError:
            return LinkEnd(DisconnectReason.NETWORK, "timed out in the handshake with the relay")
        except trio_websocket.ConnectionRejected as exc:
            return rejected(exc.status_code, f"{self.netloc}{self.path}")
        except trio_websocket.HandshakeError as exc:
            return LinkEnd(
                DisconnectReason.NETWORK,
                f"handshake with the relay failed: {type(exc).__name__}",
            )
        except (OSError, trio.BrokenResourceError, trio_websocket.ConnectionClosed) as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            if isinstance(cause, ssl.SSLError):
                return LinkEnd(
                    DisconnectReason.NETWORK, f"TLS handshake with the relay failed: {cause}"
                )
            return LinkEnd(
                DisconnectReason.NETWORK,
                f"cannot reach the relay: {cause or type(cause).__name__}",
            )

    async def serve(self, transport: WebSocketTransport, message_limit: int) -> LinkEnd:
        """The multiplexed session over ``transport``, from its handshake to its end; the
        messages it writes are at most ``message_limit`` bytes (what the relay reads)."""
        mux = self.config.mux
        if mux.max_message_size > message_limit:
            mux = attrs.evolve(mux, max_message_size=message_limit)
        session = MuxSession(transport, Role.CONNECTOR, mux)
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(session.run)
            except SessionClosed as exc:
                return refused_session(session, exc)
            self.on_up(session, nursery)
            await session.wait_ended()
            outcome = why_ended(session)
            # Report the loss now; closing the dead link may take a moment more.
            self.on_down(outcome)
            nursery.cancel_scope.cancel()
        return outcome


def refused_session(session: MuxSession, exc: SessionClosed) -> LinkEnd:
    """Why the session over an accepted WebSocket ended before its handshake was over."""
    closed = session.transport_closed
    if closed is not None and closed.code is not None:
        reason = closed.reason or exc.reason
        return LinkEnd(
            DisconnectReason.from_close_code(closed.code),
            f"relay closed the link ({closed.code}: {reason})",
        )
    return LinkEnd(DisconnectReason.NETWORK, exc.reason)


def why_ended(session: MuxSession) -> LinkEnd:
    """Why a session that was up has ended: the relay's close code, its GOAWAY, or a loss."""
    closed = session.transport_closed
    if closed is not None and closed.code is not None:
        reason = DisconnectReason.from_close_code(closed.code)
        return LinkEnd(
            reason, f"relay closed the link ({closed.code}: {closed.reason or 'no reason'})"
        )
    if session.peer_goaway is not None:
        return LinkEnd(DisconnectReason.SHUTTING_DOWN, "relay went away")
    return LinkEnd(DisconnectReason.NETWORK, session.close_reason or "link lost")


def rejected(status: int | None, where: str) -> LinkEnd:
    """Why the relay (or a proxy in front of it) answered the upgrade to ``where`` with an
    HTTP status, in words that tell a wrong URL (404) from a refused key (401, 403).
    503 and 429 mean busy, not down: back off as from ``CloseCode.TRY_AGAIN_LATER`` (1013)."""
    shown = status if status is not None else "?"
    if status == HTTPStatus.NOT_FOUND:
        detail = (
            f"no relay at {where} (HTTP 404 to the upgrade): check relay.url, which names the "
            "relay's root or its /ws/relay endpoint"
        )
    elif status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        detail = (
            f"the relay refused the API key (HTTP {shown} to the upgrade): run "
            "'repowire setup --relay --new-key' for a new key"
        )
    else:
        detail = f"relay refused the upgrade (HTTP {shown})"
    if status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE):
        return LinkEnd(DisconnectReason.RELAY_BUSY, detail)
    return LinkEnd(DisconnectReason.NETWORK, detail)
