"""The trio driver: a protocol session running over a message transport.

One reader task feeds transport messages to the protocol and dispatches events to streams; it
never blocks on the application (stream buffers are bounded by the flow-control windows), so
pings are answered however slow a stream's reader is. It only waits for the writer: while the
control frames the protocol has queued in answer to the peer pass ``control_high_water``, it
reads nothing more, so a peer that does not read cannot make it buffer without bound. One
writer task moves the protocol's output to the transport. A keepalive task pings and declares
the link dead when no pong comes back in time. All three live in the nursery of
:meth:`MuxSession.run`.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Mapping
from typing import Protocol

import attrs
import trio

from protocol import (
    CloseCode,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    HandshakeCompleted,
    LocalProtocolError,
    PongReceived,
    RemoteProtocolError,
    Role,
    Session,
    SessionConfig,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowUpdated,
)

from ._errors import SessionClosed, TransportClosed
from ._stream import MuxStream
from ._transport import MessageTransport


@attrs.frozen(kw_only=True)
class MuxConfig:
    """Driver settings. The protocol's own limits live in ``protocol``'s :class:`SessionConfig`."""

    protocol: SessionConfig = attrs.field(factory=SessionConfig)
    #: Seconds of silence on the link before a keepalive ping; ``math.inf`` turns it off.
    keepalive_interval: float = 10.0
    #: A ping unanswered this long means the link is dead.
    keepalive_timeout: float = 5.0
    #: Seconds to wait for the peer's HELLO.
    handshake_timeout: float = 10.0
    #: Largest transport message written (the WebSocket peer's maximum must be larger).
    max_message_size: int = 256 * 1024
    #: Bytes of control frames (pongs, resets, window updates, go-aways: what reading the peer's
    #: frames makes the protocol queue) above which the reader stops reading until the writer
    #: has sent them. A peer that never reads its end is then no longer read either, and its
    #: unanswered keepalive ends the link. DATA is not counted: the windows the peer granted
    #: bound it, and a reader that waited on it would deadlock two peers both sending bulk.
    control_high_water: int = 16 * 1024
    #: Largest receive window a stream may grow to (see :meth:`MuxSession._acknowledge`);
    #: growth also needs the protocol's ``window_growth_budget``. None: no stream grows.
    max_stream_window: int | None = None
    #: Seconds allowed for the final flush and close when the session ends.
    close_timeout: float = 2.0
    #: The same when the session is cancelled (the process is stopping): the close frame goes
    #: out, but the peer's answer is usually unreadable by then, so do not wait for it long.
    cancelled_close_timeout: float = 0.25


class WindowBudget(Protocol):
    """Where a session takes the bytes a stream's grown receive window may make it hold, beyond
    the protocol's own budget (a relay charges them to the stream's scope). What a stream took
    is given back once the session has forgotten the stream and its buffer is empty: until
    then the bytes may still be held."""

    def try_take(self, stream: MuxStream, amount: int) -> bool:
        """Take ``amount`` for ``stream`` and return True, or return False having taken
        nothing."""
        ...

    def give_back(self, stream: MuxStream, amount: int) -> None:
        """Return ``amount`` taken for ``stream`` by :meth:`try_take`."""
        ...


class MuxSession:
    """A multiplexed session over one transport, for either role.

    Start it with ``session = await nursery.start(MuxSession(transport, role).run)``: ``start``
    returns once both HELLOs are exchanged (or raises :class:`SessionClosed` if that fails).
    Then :meth:`open_stream` and :meth:`accept_stream`. ``run`` returns once the session has
    ended, for whatever reason (see :attr:`close_reason`); cancelling it closes the transport.
    """

    def __init__(
        self,
        transport: MessageTransport,
        role: Role,
        config: MuxConfig | None = None,
        *,
        window_budget: WindowBudget | None = None,
    ) -> None:
        self.transport = transport
        self.role = role
        self.config = config if config is not None else MuxConfig()
        self.protocol = Session(role, self.config.protocol)
        self._window_budget = window_budget
        # Stream windows may grow up to this (no growth when it is the initial window).
        self._max_stream_window = max(
            self.config.max_stream_window or 0, self.config.protocol.initial_window_size
        )
        #: Round-trip time of the last answered keepalive ping, in seconds.
        self.rtt: float | None = None
        #: Why the session ended (one line), once it has.
        self.close_reason: str | None = None
        #: The transport's close code and reason, when the transport ended the session.
        self.transport_closed: TransportClosed | None = None
        #: The peer's GOAWAY, if one arrived.
        self.peer_goaway: GoAwayReceived | None = None
        self._streams: dict[int, MuxStream] = {}
        self._send_waiting: set[MuxStream] = set()
        # Peer-opened streams not yet accepted; bounded by the protocol's accept backlog (a
        # stream reset before it is accepted leaves the queue at once).
        self._accept_queue: deque[MuxStream] = deque()
        self._accept_event = trio.Event()
        #: The chunk the writer took from the protocol and has not finished sending.
        self._unsent = b""
        # Set by the writer after each send while the reader waits for it (see _reader).
        self._sent_waiter: trio.Event | None = None
        self._handshake_done = trio.Event()
        self._ended = trio.Event()
        self._writer_event = trio.Event()
        self._slot_event = trio.Event()
        self._stream_closed_event = trio.Event()
        self._pongs: dict[bytes, trio.Event] = {}
        #: When the last transport message arrived (trio clock); set when ``run`` starts.
        self._last_received = 0.0
        self._ping_counter = 0
        self._close_code = 1000

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self, *, task_status: trio.TaskStatus[MuxSession] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Drive the session until it ends. See the class docstring."""
        self._last_received = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                with trio.move_on_after(self.config.handshake_timeout):
                    await self._wait_either(self._handshake_done, self._ended)
                if not self._handshake_done.is_set():
                    self._end(self.close_reason or "no HELLO from the peer in time", 4400)
                    nursery.cancel_scope.cancel()
                else:
                    task_status.started(self)
                    if math.isfinite(self.config.keepalive_interval):
                        nursery.start_soon(self._keepalive)
                    await self._ended.wait()
                    nursery.cancel_scope.cancel()
        finally:
            cancelled = not self._ended.is_set()
            self._end("session cancelled", 1001)
            await self._shutdown_transport(
                self.config.cancelled_close_timeout if cancelled else self.config.close_timeout
            )
        if not self._handshake_done.is_set():
            raise SessionClosed(self.close_reason or "session ended during the handshake")

    async def aclose(self, code: int = 1000, reason: str = "closed") -> None:
        """End the session now: every stream breaks, the transport closes with ``code``."""
        self._end(reason, code)
        await trio.lowlevel.checkpoint()

    async def drain(self, grace: float, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Graceful go-away: send GOAWAY (refusing new streams) and wait up to ``grace`` seconds
        for the open streams to finish. The session stays up: end it with :meth:`aclose`."""
        if not self._ended.is_set():
            self.protocol.go_away(code, reason)
            self._wake_writer()
        with trio.move_on_after(grace):
            while self.protocol.open_streams and not self._ended.is_set():
                await self._wait_either(self._stream_closed_event, self._ended)

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    # ------------------------------------------------------------------ streams

    async def open_stream(self, metadata: Mapping[str, str] | None = None) -> MuxStream:
        """Open a stream, waiting for a slot while the peer's concurrent-stream limit is reached.

        Raises :class:`SessionClosed` if the session ended or a go-away was sent or received.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        protocol = self.protocol
        while True:
            if self._ended.is_set():
                raise SessionClosed(self.close_reason or "session ended")
            if protocol.goaway_received or protocol.goaway_sent:
                raise SessionClosed("the session is going away")
            if protocol.can_open_stream():
                break
            await self._wait_either(self._slot_event, self._ended)
        stream_id = protocol.open_stream(metadata)
        stream = MuxStream(self, stream_id, dict(metadata or {}), local=True)
        self._streams[stream_id] = stream
        self._wake_writer()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return stream

    async def accept_stream(self) -> MuxStream:
        """The next stream opened by the peer. Raises :class:`SessionClosed` once the session
        has ended and no accepted stream is left."""
        while not self._accept_queue:
            if self._ended.is_set():
                raise SessionClosed(self.close_reason or "session ended")
            await self._wait_either(self._accept_event, self._ended)
        stream = self._accept_queue.popleft()
        stream._accepted = True
        self.protocol.accept_stream(stream.stream_id)
        await trio.lowlevel.checkpoint()
        return stream

    async def ping(self) -> float:
        """Ping the peer and return the round-trip time in seconds (bounded by the keepalive
        timeout: raises :class:`trio.TooSlowError` past it, :class:`SessionClosed` if the
        session ends first, :class:`trio.BusyResourceError` while the protocol's limit of
        unanswered pings is reached)."""
        if not self._ended.is_set() and not self.protocol.can_ping():
            raise trio.BusyResourceError("too many pings are waiting for an answer")
        self._ping_counter += 1
        payload = self._ping_counter.to_bytes(8, "big")
        answered = self._pongs[payload] = trio.Event()
        start = trio.current_time()
        try:
            self._protocol_call(self.protocol.ping, payload)
            with trio.fail_after(self.config.keepalive_timeout):
                await self._wait_either(answered, self._ended)
        finally:
            self._pongs.pop(payload, None)
        if not answered.is_set():
            raise SessionClosed(self.close_reason or "session ended")
        self.rtt = trio.current_time() - start
        return self.rtt

    # ------------------------------------------------------------------ tasks

    async def _reader(self) -> None:
        protocol = self.protocol
        transport = self.transport
        try:
            while True:
                message = await transport.receive_message()
                self._last_received = trio.current_time()
                if not message:
                    # An empty message carries nothing (to the protocol, b"" would mean EOF).
                    continue
                events = protocol.receive_data(message)
                for event in events:
                    # DataReceived is by far the most common event: test it first.
                    if type(event) is DataReceived:
                        self._on_data(event)
                    else:
                        self._dispatch(event)
                self._wake_writer()
                if protocol.queued_control_bytes > self.config.control_high_water:
                    await self._wait_for_writer()
        except TransportClosed as exc:
            self.transport_closed = exc
            self._end(f"link closed: {exc}", exc.code or 1006)
        except RemoteProtocolError as exc:
            self._wake_writer()  # the GOAWAY with the error code goes out first
            self._end(f"protocol error from the peer: {exc.message}", CloseCode.PROTOCOL_ERROR)

    async def _wait_for_writer(self) -> None:
        """Wait until the protocol's queued control bytes are back under the high-water mark
        (the writer has sent them) or the session ends. Only this link's reader waits; the
        keepalive runs on, and ends the link if the peer does not answer meanwhile."""
        protocol = self.protocol
        high_water = self.config.control_high_water
        try:
            while protocol.queued_control_bytes > high_water and not self._ended.is_set():
                waiter = self._sent_waiter = trio.Event()
                await self._wait_either(waiter, self._ended)
        finally:
            self._sent_waiter = None

    async def _writer(self) -> None:
        protocol = self.protocol
        limit = self.config.max_message_size
        try:
            while True:
                data = protocol.data_to_send(limit)
                if data:
                    # Kept until sent: if this send is cancelled, the final flush sends it.
                    self._unsent = data
                    await self.transport.send_message(data)
                    self._unsent = b""
                    if self._sent_waiter is not None:
                        self._sent_waiter.set()
                else:
                    event = self._writer_event = trio.Event()
                    await event.wait()
        except TransportClosed as exc:
            self.transport_closed = exc
            self._end(f"link closed: {exc}", exc.code or 1006)

    async def _keepalive(self) -> None:
        """Ping once the link has been quiet for ``keepalive_interval``.

        Anything received proves the peer alive, so a busy link (or one whose peer pings more
        often) sends no pings of its own: a relay with thousands of idle links answers its
        connectors' pings instead of doubling them.
        """
        interval = self.config.keepalive_interval
        while True:
            while True:
                quiet_until = self._last_received + interval
                if trio.current_time() >= quiet_until:
                    break
                await trio.sleep_until(quiet_until)
            try:
                await self.ping()
            except trio.TooSlowError:
                self._end(f"no answer to a ping within {self.config.keepalive_timeout:g} s", 1011)
                return
            except SessionClosed:
                return

    # ------------------------------------------------------------------ event dispatch

    def _on_data(self, event: DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream.closed:
            # Nobody will read it: give the credit back and tell the peer to stop.
            self.protocol.acknowledge_received_data(event.stream_id, len(event.data))
            self.protocol.reset_stream(event.stream_id, ErrorCode.CANCEL)
            self._forget(event.stream_id)
            return
        stream._on_data(event.data)

    def _dispatch(self, event: object) -> None:
        stream: MuxStream | None
        if isinstance(event, StreamOpened):
            stream = MuxStream(self, event.stream_id, event.metadata, local=False)
            self._streams[event.stream_id] = stream
            self._accept_queue.append(stream)
            self._notify("_accept_event")
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                for waiting in list(self._send_waiting):
                    waiting._wake_sender()
            else:
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._wake_sender()
        elif isinstance(event, StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_eof()
                if stream._eof_sent:
                    self._forget(event.stream_id)
        elif isinstance(event, StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                if not stream._eof_received:
                    # An aborted transfer: drop what was buffered and give its budget back.
                    self.protocol.acknowledge_received_data(
                        event.stream_id, stream._discard_buffer()
                    )
                stream._on_reset(int(event.code), event.remote)
            self._forget(event.stream_id)
        elif isinstance(event, PongReceived):
            waiter = self._pongs.get(event.payload)
            if waiter is not None:
                waiter.set()
        elif isinstance(event, GoAwayReceived):
            self.peer_goaway = event
            self._notify("_slot_event")
        elif isinstance(event, HandshakeCompleted):
            self._handshake_done.set()
            self._notify("_slot_event")
        # PingReceived: the protocol has queued the pong already.

    # ------------------------------------------------------------------ called by streams

    def _wake_writer(self) -> None:
        self._writer_event.set()

    def _acknowledge(self, stream: MuxStream, amount: int) -> None:
        """The application consumed ``amount`` bytes of ``stream``: return the credit, and grow
        the stream's window if the peer had run out of it.

        When the reader takes data while half the window or more is outstanding (received or
        on its way, not credited back), the peer has been sending as fast as the window lets
        it: the window may be what sets the pace. Such a window doubles, up to
        ``max_stream_window``, while the protocol's growth budget and the session's
        :class:`WindowBudget` allow. A trickle (an event stream) never has half its window
        outstanding, and a reader that has stopped consumes nothing, so neither grows.
        """
        if self._ended.is_set():
            return
        protocol = self.protocol
        left, size = protocol.receive_window(stream.stream_id)
        protocol.acknowledge_received_data(stream.stream_id, amount)
        if size and size < self._max_stream_window and left * 2 <= size:
            self._grow_window(stream, min(size, self._max_stream_window - size))
        self._wake_writer()

    def _grow_window(self, stream: MuxStream, increment: int) -> None:
        if increment > self.protocol.window_growth_available:
            return
        budget = self._window_budget
        if budget is not None and not budget.try_take(stream, increment):
            return
        if self.protocol.grow_stream_window(stream.stream_id, increment):
            stream._window_growth += increment
        elif budget is not None:
            budget.give_back(stream, increment)

    def _release_growth(self, stream: MuxStream) -> None:
        """Give ``stream``'s window growth back to the :class:`WindowBudget` once the session
        has forgotten it and nothing of it is buffered any more (each byte of growth once)."""
        if not stream._forgotten or stream._chunks or not stream._window_growth:
            return
        growth, stream._window_growth = stream._window_growth, 0
        if self._window_budget is not None:
            self._window_budget.give_back(stream, growth)

    def _end_stream(self, stream: MuxStream) -> None:
        if self._ended.is_set():
            raise trio.BrokenResourceError(self.close_reason or "session ended")
        if self.protocol.stream_state(stream.stream_id) in (
            StreamState.OPEN,
            StreamState.HALF_CLOSED_REMOTE,
        ):
            self.protocol.end_stream(stream.stream_id)
            self._wake_writer()
        if stream._eof_received:
            self._forget(stream.stream_id)

    def _close_stream(self, stream: MuxStream) -> None:
        """Local aclose: FIN if not sent yet; if the peer may still send, also RESET (CANCEL).

        The FIN goes first, so the peer still reads everything we sent and then end of file;
        the RESET only fails its sends, which would otherwise wait forever for credit from a
        reader that is gone.
        """
        if self._ended.is_set():
            return
        unread = stream._discard_buffer()
        if unread:
            self.protocol.acknowledge_received_data(stream.stream_id, unread)
        state = self.protocol.stream_state(stream.stream_id)
        if state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
            self.protocol.end_stream(stream.stream_id)
        if state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            self.protocol.reset_stream(stream.stream_id, ErrorCode.CANCEL)
        self._wake_writer()
        self._forget(stream.stream_id)

    def _reset_stream(self, stream: MuxStream, code: int) -> None:
        if self._ended.is_set():
            return
        self.protocol.acknowledge_received_data(stream.stream_id, stream._discard_buffer())
        self.protocol.reset_stream(stream.stream_id, code)
        self._wake_writer()
        self._forget(stream.stream_id)

    # ------------------------------------------------------------------ internals

    def _protocol_call(self, method: object, *args: object) -> None:
        if self._ended.is_set():
            raise SessionClosed(self.close_reason or "session ended")
        try:
            method(*args)  # type: ignore[operator]
        except LocalProtocolError as exc:
            raise SessionClosed(exc.message) from exc
        self._wake_writer()

    def _forget(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream._forgotten = True
            self._release_growth(stream)
            if not stream.local and not stream._accepted:
                # Reset before anyone accepted it: it must not wait in the accept queue.
                with contextlib.suppress(ValueError):
                    self._accept_queue.remove(stream)
            self._notify("_slot_event")
            self._notify("_stream_closed_event")

    def _notify(self, name: str) -> None:
        """Wake every task waiting on the event ``name`` and arm a fresh one."""
        event: trio.Event = getattr(self, name)
        setattr(self, name, trio.Event())
        event.set()

    def _end(self, reason: str, code: int) -> None:
        if self._ended.is_set():
            return
        self.close_reason = reason
        self._close_code = code
        self._ended.set()
        error = SessionClosed(reason)
        for stream in list(self._streams.values()):
            stream._forgotten = True
            self._release_growth(stream)
            stream._on_break(error)
        self._streams.clear()
        self._notify("_slot_event")
        self._notify("_stream_closed_event")
        self._notify("_accept_event")
        self._writer_event.set()

    async def _shutdown_transport(self, allowed: float) -> None:
        deadline = trio.current_time() + allowed
        with trio.CancelScope(shield=True):
            if self.transport_closed is None:
                with trio.CancelScope(deadline=deadline):
                    try:
                        # Flush what is queued (a GOAWAY saying why), then close.
                        data = self._unsent + self.protocol.data_to_send()
                        self._unsent = b""
                        if data:
                            await self.transport.send_message(data)
                    except TransportClosed:
                        pass
            if self.transport_closed is None:
                # Closed even when the flush used up the time (a peer that does not read): the
                # close gets a short grace of its own, or the link would outlive the session.
                grace = trio.current_time() + self.config.cancelled_close_timeout
                with trio.CancelScope(deadline=max(deadline, grace)):
                    await self.transport.aclose(self._close_code, (self.close_reason or "")[:120])

    @staticmethod
    async def _wait_either(first: trio.Event, second: trio.Event) -> None:
        if first.is_set() or second.is_set():
            await trio.lowlevel.checkpoint()
            return
        async with trio.open_nursery() as nursery:

            async def wait(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait, first)
            nursery.start_soon(wait, second)
