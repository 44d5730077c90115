"""The session state machine: streams, flow control, ping and go-away, for either role.

Four verbs, in the manner of h11: :meth:`Session.receive_data` (bytes in, events out),
:meth:`Session.data_to_send` (bytes out), the send-side calls (:meth:`open_stream`,
:meth:`send_data`, :meth:`end_stream`, :meth:`reset_stream`, :meth:`ping`, :meth:`go_away`) and
:meth:`acknowledge_received_data`, which returns flow-control credit once the application has
consumed what it received.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Mapping

from ._errors import (
    ErrorCode,
    FlowControlError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamClosedError,
)
from ._events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HandshakeCompleted,
    PingReceived,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from ._frames import (
    ALLOWED_FLAGS,
    FIXED_SIZES,
    HEADER,
    HEADER_SIZE,
    MAX_GOAWAY_REASON,
    MAX_HELLO_SIZE,
    MAX_STREAM_ID,
    MAX_UNANSWERED_PINGS,
    MAX_WINDOW,
    PING_PAYLOAD_SIZE,
    SESSION_FRAMES,
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


class Role(enum.Enum):
    """Which end of the daemon link this session is. Stream ids are split by parity."""

    CONNECTOR = "connector"  # opens odd stream ids: 1, 3, 5, ...
    RELAY = "relay"  # opens even stream ids: 2, 4, 6, ...


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"  # our HELLO is queued; the peer's has not arrived
    OPEN = "open"
    CLOSED = "closed"  # the transport ended (receive_data(b""))
    ERROR = "error"  # a protocol error happened; sticky


class StreamState(enum.Enum):
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"  # we sent FIN; the peer may still send
    HALF_CLOSED_REMOTE = "half-closed (remote)"  # the peer sent FIN; we may still send
    CLOSED = "closed"


class StreamInput(enum.Enum):
    SEND_DATA = "send data"
    SEND_FIN = "send fin"
    RECV_DATA = "receive data"
    RECV_FIN = "receive fin"
    SEND_RESET = "send reset"
    RECV_RESET = "receive reset"


_DATA = int(FrameType.DATA)
_WINDOW_UPDATE = int(FrameType.WINDOW_UPDATE)
_WINDOW_UPDATE_SIZE = HEADER_SIZE + 4
#: A whole WINDOW_UPDATE frame, header and increment, in one pack.
_WINDOW_UPDATE_PACK = struct.Struct(HEADER.format + "I").pack
_HEADER_PACK = HEADER.pack
_FIN = int(Flag.FIN)
_S = StreamState
_I = StreamInput
#: Every legal stream transition. A pair that is absent is a violation: local inputs raise
#: StreamClosedError, remote DATA on a half-closed (remote) stream resets that stream.
STREAM_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_FIN): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_FIN): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_FIN): _S.CLOSED,
    (_S.OPEN, _I.SEND_RESET): _S.CLOSED,
    (_S.OPEN, _I.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_RESET): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RECV_RESET): _S.CLOSED,
}


class _Stream:
    __slots__ = ("consumed", "id", "local", "recv_window", "send_window", "state", "unacked")

    def __init__(self, stream_id: int, local: bool, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.local = local  # opened by this side
        self.state = StreamState.OPEN
        self.send_window = send_window  # what the peer still lets us send
        self.recv_window = recv_window  # what we still let the peer send
        self.unacked = 0  # received, not yet acknowledged by the application
        self.consumed = 0  # acknowledged, not yet credited back to the peer


class Session:
    """One end of a multiplexed session. Not thread-safe; one per transport connection.

    The HELLO frame is queued at construction: call :meth:`data_to_send` and send it first.
    Streams may be opened once :class:`HandshakeCompleted` has been received.
    """

    def __init__(self, role: Role, config: SessionConfig | None = None) -> None:
        self.role = role
        self.config = config if config is not None else SessionConfig()
        self.state = SessionState.HANDSHAKE
        self._error: ProtocolError | None = None
        self._buffer = bytearray()
        self._outbound: list[bytes] = []
        self._outbound_size = 0  # bytes in _outbound, so a bounded read is cheap when all fit
        # What the peer has made us queue, so a peer that does not read cannot grow it without
        # bound (SPEC.md, "Queued answers"). Positions are offsets into the queue.
        # Bytes and elements taken off the front of _outbound. Kept up to date only while
        # control frames are queued (a drain that empties the queue forgets them all), which
        # is all the positions recorded below need.
        self._taken = 0
        self._taken_chunks = 0
        self._front_cut = False  # _outbound[0] may be the rest of a chunk handed out in part
        # (end position, size, is a pong) of each queued control frame, in queue order.
        self._control: deque[tuple[int, int, bool]] = deque()
        self._control_bytes = 0
        self._pending_pongs = 0
        self._unanswered_pings = 0  # our PINGs not answered yet
        # stream id -> (absolute index in _outbound, increment) of a queued WINDOW_UPDATE, so a
        # second grant for the stream adds to it instead of queueing another frame.
        self._queued_grants: dict[int, tuple[int, int]] = {}
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if role is Role.CONNECTOR else 2
        self._highest_local_id = 0
        self._highest_remote_id = 0
        self._remote_open = 0  # peer-opened streams not yet closed (counted against our limit)
        self._local_open = 0  # our streams not yet closed (counted against the peer's limit)
        self._backlog: set[int] = set()  # peer-opened streams not yet accepted
        # Peer's settings; valid once the handshake completes.
        self._peer_initial_window = 0
        self._peer_max_frame = MIN_FRAME_SIZE
        self._peer_max_streams = 0
        self._peer_max_metadata = 0
        # Session-level flow control.
        self._send_session_window = 0
        self._recv_session_window = self.config.session_window_size
        self._session_unacked = 0
        self._session_consumed = 0
        # Stream credit goes back once half the stream window is consumed; at least one byte,
        # so that a window of 1 never sends the zero increment a WINDOW_UPDATE may not carry.
        self._stream_credit_threshold = max(1, self.config.initial_window_size // 2)
        # Session credit goes back in steps of half a stream window (half the session window
        # if that is smaller), not half the session window: bytes held by stalled readers plus
        # bytes consumed but not yet credited must never use up the shared budget, or live
        # streams stop for good. With the defaults, 255 stalled streams still leave twice this
        # step free (half the budget wedged the link from 129 on). SPEC.md, "Stalled streams
        # and the session budget", has the argument and the cases no threshold can help.
        self._session_credit_threshold = max(
            1, min(self.config.session_window_size, self.config.initial_window_size) // 2
        )
        # Go-away bookkeeping.
        self.goaway_sent = False
        self.goaway_received = False
        self._remote_last_stream_id = MAX_STREAM_ID  # from the peer's GOAWAY
        self._local_last_stream_id = MAX_STREAM_ID  # from our GOAWAY
        hello = encode_hello(PROTOCOL_VERSION, self.config.announced())
        self._queue(pack_header(FrameType.HELLO, 0, 0, len(hello)), hello)

    # ------------------------------------------------------------------ introspection

    @property
    def handshake_complete(self) -> bool:
        return self.state is not SessionState.HANDSHAKE

    @property
    def open_streams(self) -> int:
        """Streams not yet closed, both directions counted."""
        return self._local_open + self._remote_open

    @property
    def queued_bytes(self) -> int:
        """Bytes queued for the peer and not yet taken by :meth:`data_to_send`."""
        return self._outbound_size

    @property
    def queued_control_bytes(self) -> int:
        """Bytes of control frames queued in answer to the peer (PONGs, RESETs answering the
        peer's frames, WINDOW_UPDATEs for the peer's data) among :attr:`queued_bytes`: what
        reading the peer's frames makes this side queue. DATA is left out: it is bounded by
        the windows the peer grants, not by what the peer sends; so are the frames the
        application queues on its own (its resets, a GOAWAY)."""
        return self._control_bytes

    @property
    def queued_control_frames(self) -> int:
        """How many control frames are queued in answer to the peer (see
        :attr:`queued_control_bytes`)."""
        return len(self._control)

    def stream_state(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else StreamState.CLOSED

    def local_flow_control_window(self, stream_id: int) -> int:
        """How many bytes :meth:`send_data` may send on this stream right now."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state in (_S.HALF_CLOSED_LOCAL, _S.CLOSED):
            return 0
        return min(stream.send_window, self._send_session_window)

    def can_open_stream(self) -> bool:
        """Whether :meth:`open_stream` would succeed now (handshake done, under the peer's limit,
        no go-away in either direction, the error state not reached)."""
        return (
            self.state is SessionState.OPEN
            and not self.goaway_sent
            and not self.goaway_received
            and self._local_open < self._peer_max_streams
            and self._next_local_id <= MAX_STREAM_ID
        )

    # ------------------------------------------------------------------ sending

    def data_to_send(self, amount: int | None = None) -> bytes:
        """Return bytes to write to the transport (at most ``amount`` if given), and forget them."""
        out = self._outbound
        if not out:
            return b""
        if amount is None or self._outbound_size <= amount:
            data = b"".join(out)
            out.clear()
            self._outbound_size = 0
            # The positions (_taken, _taken_chunks) only need to move while control frames
            # are queued: everything queued is gone now, so are they, and this path stays as
            # cheap as before.
            if self._control:
                self._control.clear()
                self._control_bytes = 0
                self._pending_pongs = 0
                self._queued_grants.clear()
            return data
        # Walk the queue and cut it once: popping chunks off the front one by one would make
        # draining a long queue of small frames quadratic.
        taken: list[bytes] = []
        size = 0
        index = 0
        count = len(out)
        cut = False
        while index < count and size < amount:
            chunk = out[index]
            room = amount - size
            if len(chunk) <= room:
                taken.append(chunk)
                size += len(chunk)
                index += 1
            else:
                taken.append(chunk[:room])
                out[index] = chunk[room:]
                size = amount
                cut = True
        if cut or index:
            # Otherwise nothing was taken (amount 0) and the front is as it was.
            self._front_cut = cut
        del out[:index]
        self._taken_chunks += index
        self._outbound_size -= size
        self._taken += size
        if self._control:
            self._forget_taken_control()
        return b"".join(taken)

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
        if self.goaway_sent or self.goaway_received:
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
        self._streams[stream_id] = _Stream(
            stream_id, True, self._peer_initial_window, self.config.initial_window_size
        )
        self._local_open += 1
        self._queue(pack_header(FrameType.OPEN, 0, stream_id, len(payload)), payload)
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
        if stream is None or stream.state is _S.HALF_CLOSED_LOCAL or stream.state is _S.CLOSED:
            raise StreamClosedError(stream_id, f"stream {stream_id} cannot send any more")
        if type(data) is not bytes:
            data = bytes(data)
        size = len(data)
        if size > stream.send_window or size > self._send_session_window:
            raise FlowControlError(
                f"{size} bytes exceed the send window of stream {stream_id} "
                f"({min(stream.send_window, self._send_session_window)} bytes)",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        if end_stream:
            self._transition(stream, StreamInput.SEND_FIN)
        stream.send_window -= size
        self._send_session_window -= size
        out = self._outbound
        limit = self._peer_max_frame
        if size <= limit:
            out.append(_HEADER_PACK(_DATA, _FIN if end_stream else 0, 0, stream_id, size))
            if size:
                out.append(data)
            self._outbound_size += HEADER_SIZE + size
        else:
            view = memoryview(data)
            for start in range(0, size, limit):
                chunk = view[start : start + limit]
                last = start + limit >= size
                flags = _FIN if (end_stream and last) else 0
                out.append(_HEADER_PACK(_DATA, flags, 0, stream_id, len(chunk)))
                out.append(chunk.tobytes())
                self._outbound_size += HEADER_SIZE + len(chunk)
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

    def _reset_stream(self, stream_id: int, code: int, *, answer: bool) -> None:
        """:meth:`reset_stream`; ``answer`` if the RESET answers a frame of the peer's (it then
        counts toward the bounds of SPEC.md, "Queued answers")."""
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is _S.CLOSED:
            return
        self._transition(stream, StreamInput.SEND_RESET)
        frame = pack_header(FrameType.RESET, 0, stream_id, 4) + U32.pack(int(code))
        if answer:
            self._queue_control(frame)
        else:
            # The application's own reset (say a browser went away): not an answer the peer
            # made us queue, so it does not count toward the peer's bounds (SPEC.md, "Queued
            # answers"); the application paces it, as it does its OPEN and DATA frames.
            self._queue(frame)
        # Whatever the application has not consumed is discarded with the stream.
        self._after_close(stream, reset=True)

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
        if amount > stream.unacked:
            raise LocalProtocolError(
                f"acknowledging {amount} bytes on stream {stream_id}; "
                f"only {stream.unacked} are unacknowledged"
            )
        stream.unacked -= amount
        if stream.state in (_S.OPEN, _S.HALF_CLOSED_LOCAL):
            stream.consumed += amount
            if stream.consumed >= self._stream_credit_threshold:
                self._grant(stream.id, stream.consumed)
                stream.recv_window += stream.consumed
                stream.consumed = 0
        elif stream.state is _S.CLOSED and stream.unacked == 0:
            del self._streams[stream_id]
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
        self._queue(pack_header(FrameType.PING, 0, 0, PING_PAYLOAD_SIZE), bytes(payload))

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
            if not data:
                if self._buffer:
                    raise RemoteProtocolError("transport closed in the middle of a frame")
                self.state = SessionState.CLOSED
                return events
            if type(data) is not bytes:
                data = bytes(data)
            offset = 0
            buffer = self._buffer
            # A frame cut by the previous call: complete it from the head of ``data``, taking
            # its header first (so it is checked before any payload is taken), then its payload.
            while buffer and offset < len(data):
                have = len(buffer)
                if have < HEADER_SIZE:
                    need = HEADER_SIZE - have
                else:
                    need = HEADER_SIZE + U32.unpack_from(buffer, 8)[0] - have  # the length field
                buffer += data[offset : offset + need]
                offset += need
                del buffer[: self._parse(buffer, 0, events)]
            if offset < len(data):
                # The rest is parsed where it lies; only a trailing partial frame is copied.
                end = self._parse(data, offset, events)
                buffer += data[end:]
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        return events

    # ------------------------------------------------------------------ internals

    def _queue(self, header: bytes, payload: bytes = b"") -> None:
        self._outbound.append(header)
        if payload:
            self._outbound.append(payload)
        self._outbound_size += len(header) + len(payload)

    def _queue_control(self, frame: bytes, *, pong: bool = False) -> None:
        """Queue a whole control frame and count it against the control-frame bounds."""
        self._outbound.append(frame)
        size = len(frame)
        self._outbound_size += size
        self._control.append((self._taken + self._outbound_size, size, pong))
        self._control_bytes += size
        if pong:
            self._pending_pongs += 1

    def _forget_taken_control(self) -> None:
        """Drop the control frames :meth:`data_to_send` has handed out in full."""
        control = self._control
        taken = self._taken
        while control and control[0][0] <= taken:
            _, size, pong = control.popleft()
            self._control_bytes -= size
            if pong:
                self._pending_pongs -= 1
        if not control:
            # Every queued WINDOW_UPDATE is a control frame: none is left to add to.
            self._queued_grants.clear()

    def _check_control_backlog(self) -> None:
        """After a peer frame: fail if it left more control frames queued than allowed."""
        if len(self._control) > self.config.max_queued_control_frames:
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

    def _transition(self, stream: _Stream, event: StreamInput) -> None:
        try:
            stream.state = STREAM_TRANSITIONS[stream.state, event]
        except KeyError:
            raise StreamClosedError(
                stream.id, f"stream {stream.id} is {stream.state.value}: cannot {event.value}"
            ) from None

    def _after_close(self, stream: _Stream, *, reset: bool = False) -> None:
        """Bookkeeping once ``stream`` may have reached CLOSED."""
        if stream.state is not _S.CLOSED:
            return
        if stream.local:
            self._local_open -= 1
        else:
            self._remote_open -= 1
            self._backlog.discard(stream.id)
        if reset or stream.unacked == 0:
            # A reset stream's unconsumed data is discarded: give its budget back at once.
            self._streams.pop(stream.id, None)
            if stream.unacked:
                unacked, stream.unacked = stream.unacked, 0
                self._credit_session(unacked)

    def _grant(self, stream_id: int, increment: int) -> None:
        grants = self._queued_grants
        if grants:
            queued = grants.get(stream_id)
            if queued is not None:
                index = queued[0] - self._taken_chunks
                # Still queued and whole (not the rest of a frame handed out in part): add the
                # credit to it. The peer gets the sum no later, never more than was granted.
                if index > 0 or (index == 0 and not self._front_cut):
                    total = queued[1] + increment
                    self._outbound[index] = _WINDOW_UPDATE_PACK(
                        _WINDOW_UPDATE, 0, 0, stream_id, 4, total
                    )
                    grants[stream_id] = (queued[0], total)
                    return
        # _queue_control, inlined: this runs once per half window on every busy stream.
        out = self._outbound
        grants[stream_id] = (self._taken_chunks + len(out), increment)
        out.append(_WINDOW_UPDATE_PACK(_WINDOW_UPDATE, 0, 0, stream_id, 4, increment))
        size = self._outbound_size + _WINDOW_UPDATE_SIZE
        self._outbound_size = size
        self._control.append((self._taken + size, _WINDOW_UPDATE_SIZE, False))
        self._control_bytes += _WINDOW_UPDATE_SIZE

    def _credit_session(self, amount: int) -> None:
        self._session_unacked -= amount
        self._session_consumed += amount
        if self._session_consumed >= self._session_credit_threshold:
            self._grant(0, self._session_consumed)
            self._recv_session_window += self._session_consumed
            self._session_consumed = 0

    def _send_goaway(self, code: int, reason: str) -> None:
        self.goaway_sent = True
        self._local_last_stream_id = min(self._local_last_stream_id, self._highest_remote_id)
        payload = encode_goaway(self._local_last_stream_id, int(code), reason)
        # Sent once per session, on this side's own initiative: not counted as an answer.
        self._queue(pack_header(FrameType.GOAWAY, 0, 0, len(payload)), payload)

    def _fail(self, exc: ProtocolError) -> None:
        if self.state is not SessionState.ERROR:
            # Tell the peer why before giving up; this is the last frame we send.
            self._send_goaway(exc.code, exc.message)
        self.state = SessionState.ERROR
        self._error = exc

    def _parse(self, buf: bytes | bytearray, offset: int, events: list[Event]) -> int:
        """Handle the whole frames in ``buf`` from ``offset``; return where the first incomplete
        frame starts. Every header is checked as soon as it is complete, payload or not."""
        end = len(buf)
        config = self.config
        while end - offset >= HEADER_SIZE:
            frame_type, flags, reserved, stream_id, length = HEADER.unpack_from(buf, offset)
            if frame_type == _DATA and not reserved and flags <= _FIN:
                # Hot path: validate against the limits before any payload is buffered.
                if length > config.max_frame_size:
                    raise RemoteProtocolError(
                        f"DATA frame of {length} bytes exceeds the maximum of "
                        f"{config.max_frame_size}",
                        ErrorCode.FRAME_SIZE_ERROR,
                    )
                stream = self._streams.get(stream_id)
                if stream is None:
                    self._check_data_target(stream_id)
                if length > self._recv_session_window:
                    raise RemoteProtocolError(
                        f"DATA frame of {length} bytes exceeds the session window of "
                        f"{self._recv_session_window}",
                        ErrorCode.FLOW_CONTROL_ERROR,
                    )
                if stream is not None and length > stream.recv_window:
                    raise RemoteProtocolError(
                        f"DATA frame of {length} bytes exceeds the window of stream "
                        f"{stream_id} ({stream.recv_window})",
                        ErrorCode.FLOW_CONTROL_ERROR,
                    )
                if end - offset - HEADER_SIZE < length:
                    break
                start = offset + HEADER_SIZE
                offset = start + length
                payload = buf[start:offset]
                if type(payload) is not bytes:
                    payload = bytes(payload)
                self._on_data(stream_id, flags, payload, events)
                continue
            self._check_header(frame_type, flags, reserved, stream_id, length)
            if end - offset - HEADER_SIZE < length:
                break
            start = offset + HEADER_SIZE
            offset = start + length
            self._on_frame(frame_type, flags, stream_id, bytes(buf[start:offset]), events)
            if len(self._control) > config.max_queued_control_frames:
                self._check_control_backlog()
        return offset

    def _check_header(
        self, frame_type: int, flags: int, reserved: int, stream_id: int, length: int
    ) -> None:
        """Validate a non-DATA header before its payload is buffered."""
        if frame_type not in ALLOWED_FLAGS:
            raise RemoteProtocolError(f"unknown frame type {frame_type:#x}")
        if flags & ~ALLOWED_FLAGS[frame_type]:
            raise RemoteProtocolError(
                f"flags {flags:#x} not allowed on {FrameType(frame_type).name}"
            )
        if reserved:
            raise RemoteProtocolError("reserved header bits are set")
        if stream_id > MAX_STREAM_ID:
            raise RemoteProtocolError(f"stream id {stream_id} is above 2**31 - 1")
        if self.state is SessionState.HANDSHAKE and frame_type != FrameType.HELLO:
            raise RemoteProtocolError(f"expected HELLO first, got {FrameType(frame_type).name}")
        if frame_type in SESSION_FRAMES:
            if stream_id != 0:
                raise RemoteProtocolError(f"{FrameType(frame_type).name} on stream {stream_id}")
        elif stream_id == 0 and frame_type != FrameType.WINDOW_UPDATE:
            raise RemoteProtocolError(f"{FrameType(frame_type).name} on stream 0")
        fixed = FIXED_SIZES.get(frame_type)
        if fixed is not None and length != fixed:
            raise RemoteProtocolError(
                f"{FrameType(frame_type).name} payload must be {fixed} bytes, not {length}",
                ErrorCode.FRAME_SIZE_ERROR,
            )
        if frame_type == FrameType.HELLO and length > MAX_HELLO_SIZE:
            raise RemoteProtocolError("HELLO payload too large", ErrorCode.FRAME_SIZE_ERROR)
        if frame_type == FrameType.OPEN and length > self.config.max_metadata_size:
            raise RemoteProtocolError(
                f"OPEN metadata of {length} bytes exceeds the maximum of "
                f"{self.config.max_metadata_size}",
                ErrorCode.FRAME_SIZE_ERROR,
            )
        if frame_type == FrameType.GOAWAY and length > 8 + MAX_GOAWAY_REASON:
            raise RemoteProtocolError("GOAWAY payload too large", ErrorCode.FRAME_SIZE_ERROR)

    def _is_remote_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == (self.role is Role.RELAY)

    def _check_known(self, stream_id: int, what: str) -> None:
        """For a frame on a stream we do not track: a violation if the stream never existed."""
        remote = self._is_remote_id(stream_id)
        highest = self._highest_remote_id if remote else self._highest_local_id
        if stream_id > highest:
            raise RemoteProtocolError(f"{what} on stream {stream_id}, which was never opened")

    def _check_data_target(self, stream_id: int) -> None:
        """DATA for a stream we do not track: fail on the header unless the stream has existed."""
        if self.state is SessionState.HANDSHAKE:
            raise RemoteProtocolError("expected HELLO first, got DATA")
        if stream_id == 0:
            raise RemoteProtocolError("DATA on stream 0")
        self._check_known(stream_id, "DATA")

    def _on_data(self, stream_id: int, flags: int, payload: bytes, events: list[Event]) -> None:
        """A whole DATA frame whose header passed the checks in :meth:`_parse`."""
        size = len(payload)
        self._recv_session_window -= size
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is _S.CLOSED:
            # A stream we reset or finished: the peer sent before learning of it. Its bytes
            # still count against the session budget; give them straight back.
            self._session_unacked += size
            self._credit_session(size)
            self._check_control_backlog()
            return
        if stream.state is _S.HALF_CLOSED_REMOTE:
            # The peer sent FIN and then more data: a stream-level error.
            self._session_unacked += size
            self._credit_session(size)
            self._reset_stream(stream_id, ErrorCode.STREAM_CLOSED, answer=True)
            self._check_control_backlog()
            events.append(
                StreamReset(stream_id=stream_id, code=ErrorCode.STREAM_CLOSED, remote=False)
            )
            return
        stream.recv_window -= size
        if size:
            stream.unacked += size
            self._session_unacked += size
            events.append(DataReceived(stream_id=stream_id, data=payload))
        if flags & _FIN:
            self._transition(stream, StreamInput.RECV_FIN)
            events.append(StreamEnded(stream_id=stream_id))
            self._after_close(stream)

    def _on_frame(
        self, frame_type: int, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if frame_type == FrameType.WINDOW_UPDATE:
            self._on_window_update(stream_id, U32.unpack(payload)[0], events)
        elif frame_type == FrameType.OPEN:
            self._on_open(stream_id, payload, events)
        elif frame_type == FrameType.RESET:
            self._on_reset(stream_id, U32.unpack(payload)[0], events)
        elif frame_type == FrameType.PING:
            if flags & Flag.ACK:
                if self._unanswered_pings:
                    self._unanswered_pings -= 1
                events.append(PongReceived(payload=payload))
            else:
                if self._pending_pongs >= self.config.max_pending_pongs:
                    raise RemoteProtocolError(
                        f"a PING with {self._pending_pongs} pongs still queued for a peer "
                        "that does not read them",
                        ErrorCode.ENHANCE_YOUR_CALM,
                    )
                self._queue_control(
                    pack_header(FrameType.PING, Flag.ACK, 0, len(payload)) + payload, pong=True
                )
                events.append(PingReceived(payload=payload))
        elif frame_type == FrameType.GOAWAY:
            self._on_goaway(payload, events)
        else:  # HELLO
            self._on_hello(payload, events)

    def _on_hello(self, payload: bytes, events: list[Event]) -> None:
        if self.state is not SessionState.HANDSHAKE:
            raise RemoteProtocolError("HELLO received twice")
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
        self._send_session_window = session_window
        self._peer_max_frame = max_frame
        self._peer_max_streams = settings.get(
            SettingId.MAX_CONCURRENT_STREAMS, DEFAULT_MAX_CONCURRENT_STREAMS
        )
        self._peer_max_metadata = settings.get(
            SettingId.MAX_METADATA_SIZE, DEFAULT_MAX_METADATA_SIZE
        )
        self.state = SessionState.OPEN
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
            self._queue_control(
                pack_header(FrameType.RESET, 0, stream_id, 4) + U32.pack(ErrorCode.REFUSED_STREAM)
            )
            return
        self._streams[stream_id] = _Stream(
            stream_id, False, self._peer_initial_window, self.config.initial_window_size
        )
        self._remote_open += 1
        self._backlog.add(stream_id)
        events.append(StreamOpened(stream_id=stream_id, metadata=metadata))

    def _on_window_update(self, stream_id: int, increment: int, events: list[Event]) -> None:
        if increment == 0:
            raise RemoteProtocolError("WINDOW_UPDATE with a zero increment")
        if stream_id == 0:
            self._send_session_window += increment
            if self._send_session_window > MAX_WINDOW:
                raise RemoteProtocolError(
                    "session window grew past 2**31 - 1", ErrorCode.FLOW_CONTROL_ERROR
                )
            events.append(WindowUpdated(stream_id=0, increment=increment))
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_known(stream_id, "WINDOW_UPDATE")
            return
        if stream.state in (_S.HALF_CLOSED_LOCAL, _S.CLOSED):
            return  # we no longer send on it; the credit is moot
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise RemoteProtocolError(
                f"window of stream {stream_id} grew past 2**31 - 1", ErrorCode.FLOW_CONTROL_ERROR
            )
        events.append(WindowUpdated(stream_id=stream_id, increment=increment))

    def _on_reset(self, stream_id: int, code: int, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is _S.CLOSED:
            if stream is None:
                self._check_known(stream_id, "RESET")
            return
        self._transition(stream, StreamInput.RECV_RESET)
        self._after_close(stream, reset=True)
        events.append(StreamReset(stream_id=stream_id, code=ErrorCode.from_wire(code), remote=True))

    def _on_goaway(self, payload: bytes, events: list[Event]) -> None:
        last_stream_id, code, reason = decode_goaway(payload)
        self.goaway_received = True
        self._remote_last_stream_id = min(self._remote_last_stream_id, last_stream_id)
        for stream in list(self._streams.values()):
            refused = stream.local and stream.id > self._remote_last_stream_id
            if refused and stream.state is not _S.CLOSED:
                stream.state = _S.CLOSED
                self._after_close(stream, reset=True)
                events.append(
                    StreamReset(stream_id=stream.id, code=ErrorCode.REFUSED_STREAM, remote=False)
                )
        events.append(
            GoAwayReceived(
                last_stream_id=last_stream_id, code=ErrorCode.from_wire(code), reason=reason
            )
        )
