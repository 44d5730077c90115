"""The session: streams, flow control, ping and go-away, for either role.

Four verbs, in the manner of h11: :meth:`Session.receive_data` (bytes in, events out),
:meth:`Session.data_to_send` (bytes out), the send-side calls (:meth:`open_stream`,
:meth:`send_data`, :meth:`end_stream`, :meth:`reset_stream`, :meth:`ping`, :meth:`go_away`) and
:meth:`acknowledge_received_data`, which returns flow-control credit once the application has
consumed what it received.

The session gives each frame its meaning and keeps the books; the parts it is built from each
do one job: :mod:`._reader` cuts the byte stream into checked frames, :mod:`._send_queue`
holds what goes out, :mod:`._windows` keeps the flow-control windows of a stream and of the
session, :mod:`._stream_states` and :mod:`._session_states` hold every state transition as
tables.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from ._errors import (
    ErrorCode,
    FlowControlError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    RemoteStreamError,
    StreamClosedError,
)
from ._events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HandshakeCompleted,
    PingReceived,
    PongReceived,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from ._frames import (
    MAX_STREAM_ID,
    MAX_UNANSWERED_PINGS,
    MAX_WINDOW,
    PING_PAYLOAD_SIZE,
    U32,
    Flag,
    FrameType,
    SettingId,
    decode_goaway,
    decode_hello,
    decode_metadata,
    encode_goaway,
    encode_hello,
    encode_metadata,
    pack_header,
)
from ._reader import FrameReader
from ._send_queue import SendQueue
from ._session_states import (
    GOAWAY_RECEIVED,
    GOAWAY_SENT,
    GOAWAY_TRANSITIONS,
    GoAwayInput,
    GoAwayState,
    SessionInput,
    SessionState,
    next_session_state,
)
from ._settings import (
    DEFAULT_INITIAL_WINDOW_SIZE,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_METADATA_SIZE,
    DEFAULT_SESSION_WINDOW_SIZE,
    MAX_FRAME_SIZE_LIMIT,
    MIN_FRAME_SIZE,
    PROTOCOL_VERSION,
    SessionConfig,
)
from ._stream_states import RECEIVING, SENDING, Stream, StreamInput, StreamState
from ._windows import Window, credit_step


class Role(enum.Enum):
    """Which end of the daemon link this session is. Stream ids are split by parity."""

    CONNECTOR = "connector"  # opens odd stream ids: 1, 3, 5, ...
    RELAY = "relay"  # opens even stream ids: 2, 4, 6, ...


# Module constants: the DATA paths read each with one global load.
_FIN = int(Flag.FIN)
_CLOSED = StreamState.CLOSED
_RECV_FIN = StreamInput.RECV_FIN


class Session:
    """One end of a multiplexed session. Not thread-safe; one per transport connection.

    The HELLO frame is queued at construction: call :meth:`data_to_send` and send it first.
    Streams may be opened once :class:`HandshakeCompleted` has been received.
    """

    def __init__(self, role: Role, config: SessionConfig | None = None) -> None:
        self.role = role
        self.config = config = config if config is not None else SessionConfig()
        self.state = SessionState.HANDSHAKE
        self._goaway = GoAwayState.NONE
        self._error: ProtocolError | None = None
        self._out = SendQueue()
        self._reader: FrameReader[Stream | None] = FrameReader(
            config, data_header=self._data_header, on_data=self._on_data, on_frame=self._on_frame
        )
        self._unanswered_pings = 0  # our PINGs not answered yet
        self._streams: dict[int, Stream] = {}
        self._next_local_id = 1 if role is Role.CONNECTOR else 2
        self._highest_local_id = 0
        self._highest_remote_id = 0
        self._remote_open = 0  # peer-opened streams not yet closed (counted against our limit)
        self._local_open = 0  # our streams not yet closed (counted against the peer's limit)
        self._backlog: set[int] = set()  # peer-opened streams not yet accepted
        self._grown = 0  # stream window growth held by streams in the session
        # Peer's settings; valid once the handshake completes.
        self._peer_initial_window = 0
        self._peer_max_frame = MIN_FRAME_SIZE
        self._peer_max_streams = 0
        self._peer_max_metadata = 0
        # Stream credit goes back once half the stream window is consumed.
        self._stream_step = credit_step(config.initial_window_size)
        # Session credit goes back in steps of half a stream window (half the session window
        # if that is smaller), not half the session window: bytes held by stalled readers plus
        # bytes consumed but not yet credited must never use up the shared budget, or live
        # streams stop for good. With the defaults, 255 stalled streams still leave twice this
        # step free (half the budget wedged the link from 129 on). SPEC.md, "Stalled streams
        # and the session budget", has the argument and the cases no threshold can help.
        # The send side starts empty: the peer's HELLO grants it.
        self._window = Window(
            0,
            send=0,
            receive=config.session_window_size,
            step=credit_step(min(config.session_window_size, config.initial_window_size)),
        )
        self._remote_last_stream_id = MAX_STREAM_ID  # from the peer's GOAWAY
        self._local_last_stream_id = MAX_STREAM_ID  # from our GOAWAY
        hello = encode_hello(PROTOCOL_VERSION, config.announced())
        self._out.queue(pack_header(FrameType.HELLO, 0, 0, len(hello)), hello)

    # ------------------------------------------------------------------ introspection

    @property
    def handshake_complete(self) -> bool:
        return self.state is not SessionState.HANDSHAKE

    @property
    def goaway_sent(self) -> bool:
        """Whether this side has sent a GOAWAY (it opens no more streams, and refuses the
        peer's above its last stream id)."""
        return self._goaway in GOAWAY_SENT

    @property
    def goaway_received(self) -> bool:
        """Whether the peer has sent a GOAWAY (this side opens no more streams)."""
        return self._goaway in GOAWAY_RECEIVED

    @property
    def open_streams(self) -> int:
        """Streams not yet closed, both directions counted."""
        return self._local_open + self._remote_open

    @property
    def queued_bytes(self) -> int:
        """Bytes queued for the peer and not yet taken by :meth:`data_to_send`."""
        return self._out.size

    @property
    def queued_control_bytes(self) -> int:
        """Bytes of control frames queued in answer to the peer (PONGs, RESETs answering the
        peer's frames, WINDOW_UPDATEs for the peer's data) among :attr:`queued_bytes`: what
        reading the peer's frames makes this side queue. DATA is left out: it is bounded by
        the windows the peer grants, not by what the peer sends; so are the frames the
        application queues on its own (its resets, a GOAWAY)."""
        return self._out.control_bytes

    @property
    def queued_control_frames(self) -> int:
        """How many control frames are queued in answer to the peer (see
        :attr:`queued_control_bytes`)."""
        return self._out.control_frames

    def stream_state(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else StreamState.CLOSED

    @property
    def window_growth_available(self) -> int:
        """Bytes of stream receive window :meth:`grow_stream_window` may still grant: the
        config's ``window_growth_budget`` less what streams still in the session hold of it."""
        return self.config.window_growth_budget - self._grown

    def receive_window(self, stream_id: int) -> tuple[int, int]:
        """The stream's receive window as ``(left, size)``: what the peer may still send on it
        now, and the window granted in all (the initial window plus its growth). ``(0, 0)``
        for a stream that no longer receives (the peer has sent its FIN, or it is closed)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in RECEIVING:
            return (0, 0)
        return (stream.window.recv_window, stream.window.size)

    def grow_stream_window(self, stream_id: int, increment: int) -> bool:
        """Let the peer send ``increment`` more bytes on the stream than the window it started
        with (SPEC.md, "Flow control", item 10): a WINDOW_UPDATE goes out at once, and credit
        comes back in steps of half the grown window from then on.

        The growth is taken from the config's ``window_growth_budget`` and returns to it when
        the stream leaves the session. Returns False, changing nothing, if the stream no longer
        receives, the budget has less than ``increment`` left, or the session has failed.
        Raises ValueError for an increment below 1.
        """
        if increment < 1:
            raise ValueError("a window grows by at least one byte")
        stream = self._streams.get(stream_id)
        if (
            self._error is not None
            or stream is None
            or stream.state not in RECEIVING
            or increment > self.window_growth_available
            or stream.window.size + increment > MAX_WINDOW
        ):
            return False
        self._out.queue_grant(stream_id, stream.window.grow(increment))
        self._grown += increment
        return True

    def local_flow_control_window(self, stream_id: int) -> int:
        """How many bytes :meth:`send_data` may send on this stream right now."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in SENDING:
            return 0
        return min(stream.window.send_window, self._window.send_window)

    def can_open_stream(self) -> bool:
        """Whether :meth:`open_stream` would succeed now (handshake done, under the peer's limit,
        no go-away in either direction, the error state not reached)."""
        return (
            self.state is SessionState.OPEN
            and self._goaway is GoAwayState.NONE
            and self._local_open < self._peer_max_streams
            and self._next_local_id <= MAX_STREAM_ID
        )

    # ------------------------------------------------------------------ sending

    def data_to_send(self, amount: int | None = None) -> bytes:
        """Return bytes to write to the transport (at most ``amount`` if given), and forget them."""
        out = self._out
        if not out.chunks:
            return b""
        return out.take(amount)

    def open_stream(self, metadata: Mapping[str, str] | None = None) -> int:
        """Open a stream and return its id.

        Raises :class:`LocalProtocolError` before the handshake, after a go-away in either
        direction, past the peer's concurrent-stream limit, or for metadata the peer would
        refuse; :class:`ValueError` for metadata keys or values that cannot be encoded.
        """
        self._check_usable()
        if self.state is SessionState.HANDSHAKE:
            raise LocalProtocolError("cannot open a stream before the handshake completes")
        if self.state is SessionState.CLOSED:
            raise LocalProtocolError("cannot open a stream: the transport has ended")
        if self._goaway is not GoAwayState.NONE:
            raise LocalProtocolError(
                "cannot open a stream after a go-away", ErrorCode.REFUSED_STREAM
            )
        if self._local_open >= self._peer_max_streams:
            raise LocalProtocolError(
                f"the peer allows {self._peer_max_streams} concurrent streams",
                ErrorCode.REFUSED_STREAM,
            )
        if self._next_local_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted; open a new session")
        payload = encode_metadata(metadata or {})
        if len(payload) > self._peer_max_metadata:
            raise LocalProtocolError(
                f"metadata of {len(payload)} bytes exceeds the peer's limit of "
                f"{self._peer_max_metadata}",
                ErrorCode.FRAME_SIZE_ERROR,
            )
        stream_id = self._next_local_id
        self._next_local_id += 2
        self._highest_local_id = stream_id
        self._streams[stream_id] = self._new_stream(stream_id, local=True)
        self._local_open += 1
        self._out.queue(pack_header(FrameType.OPEN, 0, stream_id, len(payload)), payload)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Take a peer-opened stream out of the accept backlog (the application now owns it)."""
        self._backlog.discard(stream_id)

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue ``data`` on the stream, split into frames no larger than the peer accepts.

        Raises :class:`StreamClosedError` if the stream cannot send, :class:`FlowControlError`
        if ``len(data)`` exceeds :meth:`local_flow_control_window`.
        """
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in SENDING:
            raise StreamClosedError(stream_id, f"stream {stream_id} cannot send any more")
        if type(data) is not bytes:
            data = bytes(data)
        size = len(data)
        window = stream.window
        session = self._window
        # Both levels are checked before either is spent: a refused send changes nothing.
        if size > window.send_window or size > session.send_window:
            raise FlowControlError(
                f"{size} bytes exceed the send window of stream {stream_id} "
                f"({min(window.send_window, session.send_window)} bytes)",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        if end_stream:
            stream.process(StreamInput.SEND_FIN)
        window.spend(size)
        session.spend(size)
        self._out.queue_data(stream_id, data, end_stream, self._peer_max_frame)
        if end_stream:
            self._after_close(stream)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: send FIN. Raises :class:`StreamClosedError` if already half-closed."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """Abort the stream in both directions. A no-op on a stream that is already closed.

        The RESET is the application's own: it is not counted among the control frames queued
        in answer to the peer (:attr:`queued_control_frames`)."""
        self._reset_stream(stream_id, code, answer=False)

    def acknowledge_received_data(self, stream_id: int, amount: int) -> None:
        """The application consumed ``amount`` bytes of this stream: return the credit.

        Credit goes back to the peer (WINDOW_UPDATE) once half the stream window has been
        consumed on the stream, and once half a stream window (or half the session window, if
        smaller) has been consumed on the session, from whichever streams. Acknowledging a
        stream that was reset is a no-op (its credit was returned by the reset). Raises
        :class:`LocalProtocolError` when ``amount`` is more than was received and not yet
        acknowledged. After a session error it does nothing, so the GOAWAY that reported the
        error stays the last frame sent.
        """
        if amount < 0:
            raise ValueError("amount must not be negative")
        if amount == 0 or self._error is not None:
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        window = stream.window
        if stream.state in RECEIVING:
            increment = window.acknowledge(amount)
            if increment is not None:
                self._out.queue_grant(stream_id, increment)
        else:
            # The peer has sent its FIN: no stream credit goes back, it will send no more.
            window.release(amount)
            if stream.state is _CLOSED and not window.unacked:
                self._drop(stream)
        self._credit_session(amount)

    @property
    def unanswered_pings(self) -> int:
        """Our PINGs whose answer has not arrived yet."""
        return self._unanswered_pings

    def can_ping(self) -> bool:
        """Whether :meth:`ping` would queue a PING now (fewer than ``MAX_UNANSWERED_PINGS``
        unanswered, the error state not reached)."""
        return self._error is None and self._unanswered_pings < MAX_UNANSWERED_PINGS

    def ping(self, payload: bytes) -> None:
        """Queue a PING. ``payload`` (8 bytes) comes back in a :class:`PongReceived`.

        Raises :class:`LocalProtocolError` (state unchanged) while ``MAX_UNANSWERED_PINGS``
        pings are unanswered: the peer may end the session past that (``ENHANCE_YOUR_CALM``).
        """
        self._check_usable()
        if len(payload) != PING_PAYLOAD_SIZE:
            raise ValueError(f"a ping payload is exactly {PING_PAYLOAD_SIZE} bytes")
        if self._unanswered_pings >= MAX_UNANSWERED_PINGS:
            raise LocalProtocolError(
                f"{MAX_UNANSWERED_PINGS} pings are unanswered; wait for an answer first"
            )
        self._unanswered_pings += 1
        self._out.queue(pack_header(FrameType.PING, 0, 0, PING_PAYLOAD_SIZE), bytes(payload))

    def go_away(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Queue a GOAWAY: no new stream from the peer above the last one seen will be served.

        Existing streams run to completion. Calling it again sends a fresh GOAWAY (useful to
        change the code), with the same last stream id.
        """
        self._check_usable()
        self._send_goaway(code, reason)

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the transport; return the events they complete.

        ``b""`` means the transport reached end of file. Raises :class:`RemoteProtocolError`
        when the peer broke the protocol; a GOAWAY carrying the error code is then queued, the
        session is in :attr:`SessionState.ERROR`, and every later call raises the same error.
        Events completed by the same call before the violation are discarded with it.
        """
        if self._error is not None:
            raise self._error
        if self.state is SessionState.CLOSED:
            if data:
                raise LocalProtocolError("receive_data after end of file")
            return []
        events: list[Event] = []
        try:
            if data:
                self._reader.feed(data, events)
            elif self._reader.mid_frame:
                raise RemoteProtocolError("transport closed in the middle of a frame")
            else:
                self._advance(SessionInput.RECV_EOF)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        return events

    # ------------------------------------------------------------------ frames from the peer

    def _data_header(self, stream_id: int, length: int) -> Stream | None:
        """Check a DATA header before its payload is buffered: the stream exists or has
        existed, both receive windows have room. Returns the stream, if still tracked."""
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id == 0:
                raise RemoteProtocolError("DATA on stream 0")
            self._check_known(stream_id, "DATA")
        self._window.check_received(length)
        if stream is not None:
            stream.window.check_received(length)
        return stream

    def _on_data(
        self, stream: Stream | None, stream_id: int, flags: int, payload: bytes, events: list[Event]
    ) -> None:
        """A whole DATA frame whose header passed :meth:`_data_header`."""
        size = len(payload)
        if stream is not None and stream.state in RECEIVING:
            self._window.received(size)
            stream.window.received(size)
            if size:
                events.append(DataReceived(stream_id=stream_id, data=payload))
            if flags & _FIN:
                ended = stream.process(_RECV_FIN)
                if ended is not None:
                    events.append(ended)
                self._after_close(stream)
            return
        # Not for the application. The bytes still count against the session budget: give
        # them straight back.
        self._window.received(size)
        self._credit_session(size)
        if stream is not None and stream.state is not _CLOSED:
            # Only a stream error is left (DATA after the peer's FIN): the table refuses it.
            try:
                stream.process(StreamInput.RECV_DATA)
            except RemoteStreamError as exc:
                self._reset_stream(stream_id, exc.code, answer=True)
                events.append(StreamReset(stream_id=stream_id, code=exc.code, remote=False))
        # Otherwise a stream we reset or finished: the peer sent before learning of it.
        self._check_control_backlog()

    def _on_frame(
        self, frame_type: int, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        """A whole frame other than DATA, its header checked by the reader."""
        if frame_type == FrameType.WINDOW_UPDATE:
            self._on_window_update(stream_id, U32.unpack(payload)[0], events)
        elif frame_type == FrameType.OPEN:
            self._on_open(stream_id, payload, events)
        elif frame_type == FrameType.RESET:
            self._on_reset(stream_id, U32.unpack(payload)[0], events)
        elif frame_type == FrameType.PING:
            self._on_ping(flags, payload, events)
        elif frame_type == FrameType.GOAWAY:
            self._on_goaway(payload, events)
        else:  # HELLO
            self._on_hello(payload, events)
        self._check_control_backlog()

    def _on_hello(self, payload: bytes, events: list[Event]) -> None:
        # First: a second HELLO is refused whatever its payload.
        self._advance(SessionInput.RECV_HELLO)
        version, settings = decode_hello(payload)
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"peer speaks protocol version {version}; this side speaks {PROTOCOL_VERSION}",
                ErrorCode.VERSION_MISMATCH,
            )
        window = settings.get(SettingId.INITIAL_WINDOW_SIZE, DEFAULT_INITIAL_WINDOW_SIZE)
        session_window = settings.get(SettingId.SESSION_WINDOW_SIZE, DEFAULT_SESSION_WINDOW_SIZE)
        max_frame = settings.get(SettingId.MAX_FRAME_SIZE, DEFAULT_MAX_FRAME_SIZE)
        if not 1 <= window <= MAX_WINDOW or not 1 <= session_window <= MAX_WINDOW:
            raise RemoteProtocolError("window setting out of range", ErrorCode.FLOW_CONTROL_ERROR)
        if not MIN_FRAME_SIZE <= max_frame <= MAX_FRAME_SIZE_LIMIT:
            raise RemoteProtocolError("MAX_FRAME_SIZE setting out of range")
        self._peer_initial_window = window
        self._window.credit(session_window)
        self._peer_max_frame = max_frame
        self._peer_max_streams = settings.get(
            SettingId.MAX_CONCURRENT_STREAMS, DEFAULT_MAX_CONCURRENT_STREAMS
        )
        self._peer_max_metadata = settings.get(
            SettingId.MAX_METADATA_SIZE, DEFAULT_MAX_METADATA_SIZE
        )
        events.append(HandshakeCompleted(version=version, settings=settings))

    def _on_open(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not self._is_remote_id(stream_id):
            raise RemoteProtocolError(f"OPEN with stream id {stream_id} of the wrong parity")
        if stream_id <= self._highest_remote_id:
            raise RemoteProtocolError(
                f"OPEN stream id {stream_id} is not above {self._highest_remote_id}"
            )
        metadata = decode_metadata(payload)
        self._highest_remote_id = stream_id
        refused = (
            (self.goaway_sent and stream_id > self._local_last_stream_id)
            or self._remote_open >= self.config.max_concurrent_streams
            or len(self._backlog) >= self.config.max_accept_backlog
        )
        if refused:
            # Refused without an event: the application never sees it.
            self._out.queue_control(
                pack_header(FrameType.RESET, 0, stream_id, 4) + U32.pack(ErrorCode.REFUSED_STREAM)
            )
            return
        self._streams[stream_id] = self._new_stream(stream_id, local=False)
        self._remote_open += 1
        self._backlog.add(stream_id)
        events.append(StreamOpened(stream_id=stream_id, metadata=metadata))

    def _on_window_update(self, stream_id: int, increment: int, events: list[Event]) -> None:
        if increment == 0:
            raise RemoteProtocolError("WINDOW_UPDATE with a zero increment")
        if stream_id == 0:
            self._window.credit(increment)
            events.append(WindowUpdated(stream_id=0, increment=increment))
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id, "WINDOW_UPDATE")
            return
        if stream.state not in SENDING:
            return  # we no longer send on it; the credit is moot
        stream.window.credit(increment)
        events.append(WindowUpdated(stream_id=stream_id, increment=increment))

    def _on_reset(self, stream_id: int, code: int, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id, "RESET")
            return
        if stream.state is _CLOSED:
            return
        reset = stream.process(StreamInput.RECV_RESET, code)
        self._after_close(stream, reset=True)
        if reset is not None:
            events.append(reset)

    def _on_ping(self, flags: int, payload: bytes, events: list[Event]) -> None:
        if flags & Flag.ACK:
            if self._unanswered_pings:
                self._unanswered_pings -= 1
            events.append(PongReceived(payload=payload))
            return
        pending = self._out.pending_pongs
        if pending >= self.config.max_pending_pongs:
            raise RemoteProtocolError(
                f"a PING with {pending} pongs still queued for a peer that does not read them",
                ErrorCode.ENHANCE_YOUR_CALM,
            )
        self._out.queue_control(
            pack_header(FrameType.PING, Flag.ACK, 0, len(payload)) + payload, pong=True
        )
        events.append(PingReceived(payload=payload))

    def _on_goaway(self, payload: bytes, events: list[Event]) -> None:
        last_stream_id, code, reason = decode_goaway(payload)
        self._advance_goaway(GoAwayInput.RECV)
        self._remote_last_stream_id = min(self._remote_last_stream_id, last_stream_id)
        for stream in list(self._streams.values()):
            refused = stream.local and stream.id > self._remote_last_stream_id
            if refused and stream.state is not _CLOSED:
                reset = stream.process(StreamInput.RECV_GOAWAY)
                self._after_close(stream, reset=True)
                if reset is not None:
                    events.append(reset)
        events.append(
            GoAwayReceived(
                last_stream_id=last_stream_id, code=ErrorCode.from_wire(code), reason=reason
            )
        )

    # ------------------------------------------------------------------ internals

    def _advance(self, event: SessionInput) -> None:
        """Apply ``event`` to the session's life (SESSION_TRANSITIONS): the one place that
        changes :attr:`state`. Raises as :func:`next_session_state` does, state unchanged."""
        self.state = next_session_state(self.state, event)

    def _advance_goaway(self, event: GoAwayInput) -> None:
        """Apply ``event`` to the go-away state (GOAWAY_TRANSITIONS, total)."""
        self._goaway = GOAWAY_TRANSITIONS[self._goaway, event]

    def _new_stream(self, stream_id: int, *, local: bool) -> Stream:
        window = Window(
            stream_id,
            send=self._peer_initial_window,
            receive=self.config.initial_window_size,
            step=self._stream_step,
        )
        return Stream(stream_id, local=local, window=window)

    def _reset_stream(self, stream_id: int, code: int, *, answer: bool) -> None:
        """:meth:`reset_stream`; ``answer`` if the RESET answers a frame of the peer's (it then
        counts toward the bounds of SPEC.md, "Queued answers")."""
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is _CLOSED:
            return
        stream.process(StreamInput.SEND_RESET)
        frame = pack_header(FrameType.RESET, 0, stream_id, 4) + U32.pack(int(code))
        if answer:
            self._out.queue_control(frame)
        else:
            # The application's own reset (say a browser went away): not an answer the peer
            # made us queue, so it does not count toward the peer's bounds (SPEC.md, "Queued
            # answers"); the application paces it, as it does its OPEN and DATA frames.
            self._out.queue(frame)
        # Whatever the application has not consumed is discarded with the stream.
        self._after_close(stream, reset=True)

    def _after_close(self, stream: Stream, *, reset: bool = False) -> None:
        """Bookkeeping once ``stream`` may have reached CLOSED."""
        if stream.state is not _CLOSED:
            return
        if stream.local:
            self._local_open -= 1
        else:
            self._remote_open -= 1
            self._backlog.discard(stream.id)
        if reset or not stream.window.unacked:
            self._drop(stream)
            # A reset stream's unconsumed data is discarded: give its budget back at once.
            discarded = stream.window.discard()
            if discarded:
                self._credit_session(discarded)

    def _drop(self, stream: Stream) -> None:
        """Forget ``stream``; what its window grew by returns to the growth budget."""
        if self._streams.pop(stream.id, None) is not None:
            self._grown -= stream.window.size - self.config.initial_window_size

    def _credit_session(self, amount: int) -> None:
        """``amount`` received bytes are done with: credit them to the session window, and
        queue the WINDOW_UPDATE once a step's worth is due."""
        increment = self._window.acknowledge(amount)
        if increment is not None:
            self._out.queue_grant(0, increment)

    def _send_goaway(self, code: int, reason: str) -> None:
        self._advance_goaway(GoAwayInput.SEND)
        self._local_last_stream_id = min(self._local_last_stream_id, self._highest_remote_id)
        payload = encode_goaway(self._local_last_stream_id, int(code), reason)
        # Sent once per session, on this side's own initiative: not counted as an answer.
        self._out.queue(pack_header(FrameType.GOAWAY, 0, 0, len(payload)), payload)

    def _fail(self, exc: ProtocolError) -> None:
        # Tell the peer why before giving up; this is the last frame we send.
        self._send_goaway(exc.code, exc.message)
        self._advance(SessionInput.FAIL)
        self._error = exc

    def _check_control_backlog(self) -> None:
        """After a peer frame: fail if it left more control frames queued than allowed."""
        if self._out.control_frames > self.config.max_queued_control_frames:
            raise RemoteProtocolError(
                f"more than {self.config.max_queued_control_frames} control frames queued "
                "for a peer that does not read them",
                ErrorCode.ENHANCE_YOUR_CALM,
            )

    def _check_usable(self) -> None:
        if self._error is not None:
            raise LocalProtocolError(
                f"the session failed earlier: {self._error.message}", self._error.code
            )

    def _is_remote_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == (self.role is Role.RELAY)

    def _check_known(self, stream_id: int, what: str) -> None:
        """For a frame on a stream we do not track: a violation if the stream never existed."""
        remote = self._is_remote_id(stream_id)
        highest = self._highest_remote_id if remote else self._highest_local_id
        if stream_id > highest:
            raise RemoteProtocolError(f"{what} on stream {stream_id}, which was never opened")
