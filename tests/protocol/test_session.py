"""The session state machine: two sessions back to back, and raw frames for what a peer may break.

In a :class:`Pair`, ``a`` is the connector (odd stream ids) and ``b`` the relay (even ids).
"""

from __future__ import annotations

import struct

import attrs
import pytest

from protocol import (
    STREAM_TRANSITIONS,
    DataReceived,
    ErrorCode,
    Event,
    FlowControlError,
    GoAwayReceived,
    HandshakeCompleted,
    LocalProtocolError,
    PingReceived,
    PongReceived,
    RemoteProtocolError,
    Role,
    Session,
    SessionConfig,
    SessionState,
    StreamClosedError,
    StreamEnded,
    StreamInput,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowUpdated,
)

KIB = 1024
HELLO, OPEN, DATA, WINDOW_UPDATE, RESET, PING, GOAWAY = range(7)
FIN, ACK = 0x1, 0x2


# ---------------------------------------------------------------- helpers


@attrs.define
class Pair:
    """Two sessions back to back; :meth:`pump` moves bytes both ways until both are quiet."""

    a: Session
    b: Session

    def pump(self, max_rounds: int = 100) -> tuple[list[Event], list[Event]]:
        """Return ``(events at a, events at b)``. Bounded: fails if the sides never go quiet."""
        at_a: list[Event] = []
        at_b: list[Event] = []
        for _ in range(max_rounds):
            to_b = self.a.data_to_send()
            to_a = self.b.data_to_send()
            if not to_a and not to_b:
                return at_a, at_b
            if to_b:
                at_b += self.b.receive_data(to_b)
            if to_a:
                at_a += self.a.receive_data(to_a)
        raise AssertionError(f"the sessions were still talking after {max_rounds} rounds")


def make_pair(a: SessionConfig | None = None, b: SessionConfig | None = None) -> Pair:
    pair = Pair(Session(Role.CONNECTOR, a), Session(Role.RELAY, b))
    at_a, at_b = pair.pump()
    assert [type(e) for e in at_a] == [HandshakeCompleted]
    assert [type(e) for e in at_b] == [HandshakeCompleted]
    return pair


@pytest.fixture
def pair() -> Pair:
    return make_pair()


def frame(frame_type: int, flags: int = 0, stream_id: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">BBHII", frame_type, flags, 0, stream_id, len(payload)) + payload


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    frames = []
    offset = 0
    while offset < len(data):
        frame_type, flags, _, stream_id, length = struct.unpack_from(">BBHII", data, offset)
        frames.append((frame_type, flags, stream_id, data[offset + 12 : offset + 12 + length]))
        offset += 12 + length
    return frames


def window_updates(data: bytes) -> list[tuple[int, int]]:
    return [(sid, struct.unpack(">I", p)[0]) for t, _, sid, p in parse_frames(data) if t == 3]


def raw_peer(role: Role = Role.CONNECTOR, config: SessionConfig | None = None) -> Session:
    """A session handshaken with a raw peer that announced only the defaults."""
    session = Session(role, config)
    session.data_to_send()
    session.receive_data(frame(HELLO, payload=b"\x00\x01"))
    return session


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes that differ by position (and by ``seed``), so loss or reordering shows."""
    block = bytes((seed + i) % 251 for i in range(251))
    return (block * (size // 251 + 1))[:size]


def transfer(
    sender: Session, receiver: Session, streams: list[int], size: int, read_size: int = 0
) -> tuple[dict[int, bytes], list[tuple[int, int]]]:
    """Send ``size`` bytes on each stream as the credit allows, the receiver consuming all it
    gets at once, ``read_size`` bytes per acknowledgement (0: a whole frame at a time).

    Returns what arrived on each stream and the WINDOW_UPDATEs the receiver sent, in order.
    Bounded: stops once a round moves nothing, whether because every byte arrived or because
    the sender has no credit and none is coming (a wedge).
    """
    payloads = {sid: pattern(size, sid) for sid in streams}
    sent = dict.fromkeys(streams, 0)
    got = {sid: bytearray() for sid in streams}
    updates: list[tuple[int, int]] = []
    for _ in range(10_000):
        for sid in streams:
            room = min(sender.local_flow_control_window(sid), size - sent[sid])
            if room:
                sender.send_data(sid, payloads[sid][sent[sid] : sent[sid] + room])
                sent[sid] += room
        data = sender.data_to_send()
        for event in receiver.receive_data(data) if data else []:
            if isinstance(event, DataReceived) and event.stream_id in got:
                got[event.stream_id] += event.data
                step = read_size or len(event.data)
                for start in range(0, len(event.data), step):
                    amount = min(step, len(event.data) - start)
                    receiver.acknowledge_received_data(event.stream_id, amount)
        back = receiver.data_to_send()
        updates += window_updates(back)
        if back:
            sender.receive_data(back)
        if not data and not back:
            return {sid: bytes(got[sid]) for sid in streams}, updates
    raise AssertionError("the transfer was still moving after 10,000 rounds")


def received(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def expect_error(session: Session, data: bytes, code: ErrorCode) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_data(data)
    assert info.value.code == code, info.value.message
    assert session.state is SessionState.ERROR
    goaways = [p for t, _, _, p in parse_frames(session.data_to_send()) if t == GOAWAY]
    assert len(goaways) == 1 and struct.unpack_from(">II", goaways[0])[1] == code
    return info.value


# ---------------------------------------------------------------- handshake


def test_handshake_exchanges_settings() -> None:
    a_config = SessionConfig(initial_window_size=1000, max_concurrent_streams=3)
    pair = Pair(Session(Role.CONNECTOR, a_config), Session(Role.RELAY))
    assert not pair.a.handshake_complete
    assert not pair.a.can_open_stream()
    with pytest.raises(LocalProtocolError):
        pair.a.open_stream()
    at_a, at_b = pair.pump()
    assert at_b == [HandshakeCompleted(version=1, settings=a_config.announced())]
    assert at_a == [HandshakeCompleted(version=1, settings=SessionConfig().announced())]
    assert pair.a.state is SessionState.OPEN and pair.b.handshake_complete
    stream_id = pair.b.open_stream()
    assert pair.b.local_flow_control_window(stream_id) == 1000


def test_ping_before_the_handshake_goes_out_after_hello() -> None:
    pair = Pair(Session(Role.CONNECTOR), Session(Role.RELAY))
    pair.a.ping(b"early!!!")
    at_a, at_b = pair.pump()
    assert at_b == [
        HandshakeCompleted(version=1, settings=SessionConfig().announced()),
        PingReceived(payload=b"early!!!"),
    ]
    assert at_a[-1] == PongReceived(payload=b"early!!!")


# ---------------------------------------------------------------- streams


def test_open_with_metadata_and_ids_by_parity(pair: Pair) -> None:
    ids_a = [pair.a.open_stream({"kind": "mesh", "target": "d-2"}) for _ in range(3)]
    ids_b = [pair.b.open_stream({"kind": "http", "from": "browser"}) for _ in range(3)]
    assert ids_a == [1, 3, 5] and ids_b == [2, 4, 6]
    at_a, at_b = pair.pump()
    assert at_b == [
        StreamOpened(stream_id=i, metadata={"kind": "mesh", "target": "d-2"}) for i in ids_a
    ]
    assert at_a == [
        StreamOpened(stream_id=i, metadata={"kind": "http", "from": "browser"}) for i in ids_b
    ]
    assert pair.a.open_streams == pair.b.open_streams == 6
    assert all(pair.a.stream_state(i) is StreamState.OPEN for i in ids_a + ids_b)


def test_data_both_ways_and_half_close_each_direction(pair: Pair) -> None:
    sid = pair.a.open_stream()
    pair.a.send_data(sid, b"request ")
    pair.a.send_data(sid, b"body", end_stream=True)
    assert pair.a.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL
    assert pair.a.local_flow_control_window(sid) == 0
    at_a, at_b = pair.pump()
    assert at_b == [
        StreamOpened(stream_id=sid, metadata={}),
        DataReceived(stream_id=sid, data=b"request "),
        DataReceived(stream_id=sid, data=b"body"),
        StreamEnded(stream_id=sid),
    ]
    assert pair.b.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    # The other direction stays open after the first half-close.
    pair.b.send_data(sid, b"response")
    at_a, at_b = pair.pump()
    assert at_a == [DataReceived(stream_id=sid, data=b"response")]
    pair.b.end_stream(sid)
    assert pair.b.stream_state(sid) is StreamState.CLOSED
    at_a, _ = pair.pump()
    assert at_a == [StreamEnded(stream_id=sid)]
    assert pair.a.stream_state(sid) is StreamState.CLOSED
    assert pair.a.open_streams == pair.b.open_streams == 0


def test_half_close_from_the_opened_side_first(pair: Pair) -> None:
    sid = pair.b.open_stream()
    pair.pump()
    pair.a.send_data(sid, b"early answer", end_stream=True)
    at_a, at_b = pair.pump()
    assert at_b == [DataReceived(stream_id=sid, data=b"early answer"), StreamEnded(stream_id=sid)]
    pair.b.send_data(sid, b"late request")
    at_a, _ = pair.pump()
    assert at_a == [DataReceived(stream_id=sid, data=b"late request")]
    pair.b.end_stream(sid)
    at_a, _ = pair.pump()
    assert at_a == [StreamEnded(stream_id=sid)]


@pytest.mark.parametrize("resetter", ["a", "b"])
def test_reset_from_either_side(pair: Pair, resetter: str) -> None:
    sid = pair.a.open_stream()
    pair.a.send_data(sid, b"x")
    pair.pump()
    side, other = (pair.a, pair.b) if resetter == "a" else (pair.b, pair.a)
    side.reset_stream(sid, ErrorCode.UPSTREAM_FAILED)
    assert side.stream_state(sid) is StreamState.CLOSED
    at_a, at_b = pair.pump()
    at_other = at_b if resetter == "a" else at_a
    assert at_other == [StreamReset(stream_id=sid, code=ErrorCode.UPSTREAM_FAILED, remote=True)]
    assert other.stream_state(sid) is StreamState.CLOSED
    assert pair.a.open_streams == pair.b.open_streams == 0
    for session in (pair.a, pair.b):
        with pytest.raises(StreamClosedError):
            session.send_data(sid, b"more")
        session.reset_stream(sid)  # a no-op on a closed stream
    assert pair.pump() == ([], [])


def test_unknown_reset_codes_pass_through(pair: Pair) -> None:
    sid = pair.a.open_stream()
    pair.pump()
    pair.a.reset_stream(sid, 0xBEEF)
    _, at_b = pair.pump()
    assert at_b == [StreamReset(stream_id=sid, code=0xBEEF, remote=True)]


def test_ping_and_pong(pair: Pair) -> None:
    pair.a.ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    pair.b.ping(b"from-b!!")
    at_a, at_b = pair.pump()
    assert PingReceived(payload=b"from-b!!") in at_a
    assert PongReceived(payload=b"\x00\x01\x02\x03\x04\x05\x06\x07") in at_a
    assert PingReceived(payload=b"\x00\x01\x02\x03\x04\x05\x06\x07") in at_b
    assert PongReceived(payload=b"from-b!!") in at_b
    with pytest.raises(ValueError):
        pair.a.ping(b"short")
    with pytest.raises(ValueError):
        pair.a.ping(b"nine bytes")


def test_stream_transition_table_matches_the_state_diagram() -> None:
    closed = {k for k, v in STREAM_TRANSITIONS.items() if v is StreamState.CLOSED}
    # Every live state can be reset from either side; nothing leaves CLOSED.
    for state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE):
        assert (state, StreamInput.SEND_RESET) in closed
        assert (state, StreamInput.RECV_RESET) in closed
    assert not any(state is StreamState.CLOSED for state, _ in STREAM_TRANSITIONS)
    assert (StreamState.HALF_CLOSED_LOCAL, StreamInput.SEND_DATA) not in STREAM_TRANSITIONS
    assert (StreamState.HALF_CLOSED_REMOTE, StreamInput.RECV_DATA) not in STREAM_TRANSITIONS


def test_data_to_send_in_pieces(pair: Pair) -> None:
    sid = pair.a.open_stream({"kind": "http"})
    pair.a.send_data(sid, bytes(range(256)) * 10)
    pair.a.ping(b"12345678")
    pieces = []
    for _ in range(1000):
        piece = pair.a.data_to_send(7)
        if not piece:
            break
        assert len(piece) <= 7
        pieces.append(piece)
    events = pair.b.receive_data(b"".join(pieces))
    assert received(events, sid) == bytes(range(256)) * 10
    assert pair.a.data_to_send() == b""


# ---------------------------------------------------------------- go-away


def test_goaway_drains_streams_at_or_below_last_stream_id(pair: Pair) -> None:
    kept = pair.a.open_stream()
    pair.pump()
    # The connector opens another stream while the relay decides to go away: the two cross.
    refused = pair.a.open_stream()
    pair.a.send_data(refused, b"lost")
    pair.b.go_away(ErrorCode.SHUTTING_DOWN, "restart")
    assert not pair.b.can_open_stream()
    with pytest.raises(LocalProtocolError) as info:
        pair.b.open_stream()
    assert info.value.code == ErrorCode.REFUSED_STREAM
    at_a, at_b = pair.pump()
    assert at_a == [
        StreamReset(stream_id=refused, code=ErrorCode.REFUSED_STREAM, remote=False),
        GoAwayReceived(last_stream_id=kept, code=ErrorCode.SHUTTING_DOWN, reason="restart"),
    ]
    assert at_b == []  # the relay refused the late stream without telling its application
    assert pair.a.stream_state(refused) is StreamState.CLOSED
    assert not pair.a.can_open_stream()
    with pytest.raises(LocalProtocolError):
        pair.a.open_stream()
    # The stream at the last id completes normally, in both directions.
    pair.a.send_data(kept, b"request", end_stream=True)
    pair.b.send_data(kept, b"response", end_stream=True)
    at_a, at_b = pair.pump()
    assert at_b == [DataReceived(stream_id=kept, data=b"request"), StreamEnded(stream_id=kept)]
    assert at_a == [DataReceived(stream_id=kept, data=b"response"), StreamEnded(stream_id=kept)]
    assert pair.a.open_streams == pair.b.open_streams == 0


def test_goaway_refuses_every_stream_above_last_id_and_repeats_it(pair: Pair) -> None:
    first = pair.a.open_stream()
    pair.pump()
    pair.b.go_away()
    pair.b.go_away(ErrorCode.SHUTTING_DOWN, "second")
    frames = [p for t, _, _, p in parse_frames(pair.b.data_to_send()) if t == GOAWAY]
    assert [struct.unpack_from(">II", p) for p in frames] == [(first, 0), (first, 0x103)]
    # A peer that ignores the GOAWAY and opens anyway is refused, stream by stream.
    late = frame(OPEN, 0, first + 2) + frame(OPEN, 0, first + 4)
    assert pair.b.receive_data(late) == []
    resets = [(sid, p) for t, _, sid, p in parse_frames(pair.b.data_to_send()) if t == RESET]
    assert resets == [(first + 2, u32(ErrorCode.REFUSED_STREAM)), (first + 4, u32(6))]


def test_goaway_last_stream_id_never_grows(pair: Pair) -> None:
    for _ in range(3):
        pair.a.open_stream()
    pair.pump()
    data = frame(GOAWAY, payload=u32(3) + u32(0)) + frame(GOAWAY, payload=u32(5) + u32(0))
    events = pair.a.receive_data(data)
    assert events == [
        StreamReset(stream_id=5, code=ErrorCode.REFUSED_STREAM, remote=False),
        GoAwayReceived(last_stream_id=3, code=ErrorCode.NO_ERROR, reason=""),
        GoAwayReceived(last_stream_id=5, code=ErrorCode.NO_ERROR, reason=""),
    ]
    assert pair.a.stream_state(3) is StreamState.OPEN
    assert pair.a.stream_state(5) is StreamState.CLOSED


# ---------------------------------------------------------------- errors: stream ids


@pytest.mark.parametrize(
    "data",
    [
        frame(DATA, 0, 2, b"x"),  # the peer's parity, never opened
        frame(DATA, 0, 1, b"x"),  # our parity, never opened
        frame(WINDOW_UPDATE, 0, 4, u32(1)),
        frame(WINDOW_UPDATE, 0, 3, u32(1)),
        frame(RESET, 0, 2, u32(0)),
        frame(RESET, 0, 5, u32(0)),
    ],
)
def test_frames_on_idle_streams_are_session_errors(data: bytes) -> None:
    error = expect_error(raw_peer(), data, ErrorCode.PROTOCOL_ERROR)
    assert "never opened" in error.message


def test_frames_on_closed_streams_are_ignored() -> None:
    session = raw_peer(config=SessionConfig(session_window_size=1024, initial_window_size=1024))
    session.receive_data(frame(OPEN, 0, 2))
    session.reset_stream(2)
    session.data_to_send()
    # Sent by the peer before it learnt of the reset: discarded, not errors.
    late = (
        frame(DATA, 0, 2, bytes(600))
        + frame(WINDOW_UPDATE, 0, 2, u32(5))
        + frame(RESET, 0, 2, u32(0))
    )
    assert session.receive_data(late) == []
    # The discarded bytes still counted against the session budget and were given back.
    assert window_updates(session.data_to_send()) == [(0, 600)]


def test_skipped_stream_ids_count_as_closed() -> None:
    session = raw_peer(config=SessionConfig(session_window_size=64, initial_window_size=64))
    assert len(session.receive_data(frame(OPEN, 0, 2) + frame(OPEN, 0, 8))) == 2
    session.data_to_send()
    # 4 and 6 were skipped: frames on them are late frames for closed streams, not violations.
    late = frame(DATA, 0, 4, bytes(40)) + frame(RESET, 0, 6, u32(0))
    assert session.receive_data(late) == []
    assert window_updates(session.data_to_send()) == [(0, 40)]
    expect_error(session, frame(DATA, 0, 10, b"x"), ErrorCode.PROTOCOL_ERROR)


def test_open_with_the_wrong_parity() -> None:
    error = expect_error(raw_peer(Role.CONNECTOR), frame(OPEN, 0, 1), ErrorCode.PROTOCOL_ERROR)
    assert "parity" in error.message
    expect_error(raw_peer(Role.RELAY), frame(OPEN, 0, 2), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("second", [2, 4])
def test_open_ids_must_increase(second: int) -> None:
    session = raw_peer()
    session.receive_data(frame(OPEN, 0, 4))
    expect_error(session, frame(OPEN, 0, second), ErrorCode.PROTOCOL_ERROR)


def test_malformed_metadata_is_a_session_error() -> None:
    expect_error(raw_peer(), frame(OPEN, 0, 2, b"\x04kind\x00\x09http"), ErrorCode.PROTOCOL_ERROR)


def test_data_after_fin_resets_the_stream() -> None:
    session = raw_peer(config=SessionConfig(session_window_size=8, initial_window_size=8))
    session.receive_data(frame(OPEN, 0, 2) + frame(DATA, FIN, 2, b"done"))
    session.data_to_send()
    events = session.receive_data(frame(DATA, 0, 2, b"more"))
    assert events == [StreamReset(stream_id=2, code=ErrorCode.STREAM_CLOSED, remote=False)]
    assert session.state is SessionState.OPEN and session.open_streams == 0
    # "more" is discarded and its budget returned; so is that of "done", never acknowledged.
    # Both grants go out as one WINDOW_UPDATE: the second is added to the one still queued.
    assert parse_frames(session.data_to_send()) == [
        (WINDOW_UPDATE, 0, 0, u32(8)),
        (RESET, 0, 2, u32(ErrorCode.STREAM_CLOSED)),
    ]


def test_window_update_rules() -> None:
    session = raw_peer()
    session.open_stream()
    expect_error(session, frame(WINDOW_UPDATE, 0, 1, u32(0)), ErrorCode.PROTOCOL_ERROR)
    session = raw_peer()
    session.open_stream()
    overflow = 2**31 - 1 - 256 * KIB + 1
    expect_error(session, frame(WINDOW_UPDATE, 0, 1, u32(overflow)), ErrorCode.FLOW_CONTROL_ERROR)
    session = raw_peer()
    overflow = 2**31 - 1 - 16 * KIB * KIB + 1
    expect_error(session, frame(WINDOW_UPDATE, 0, 0, u32(overflow)), ErrorCode.FLOW_CONTROL_ERROR)
    session = raw_peer()
    sid = session.open_stream()
    events = session.receive_data(
        frame(WINDOW_UPDATE, 0, 0, u32(10)) + frame(WINDOW_UPDATE, 0, sid, u32(7))
    )
    assert events == [
        WindowUpdated(stream_id=0, increment=10),
        WindowUpdated(stream_id=sid, increment=7),
    ]
    assert session.local_flow_control_window(sid) == 256 * KIB + 7


# ---------------------------------------------------------------- errors: flow control


def test_stream_window_violation_across_frames() -> None:
    session = raw_peer(config=SessionConfig(initial_window_size=1024))
    session.receive_data(frame(OPEN, 0, 2) + frame(DATA, 0, 2, bytes(600)))
    # 600 + 600 > 1024: the second frame's header alone is enough.
    expect_error(session, frame(DATA, 0, 2, bytes(600))[:12], ErrorCode.FLOW_CONTROL_ERROR)


def test_session_window_violation_across_streams() -> None:
    config = SessionConfig(session_window_size=4096, initial_window_size=4096)
    session = raw_peer(config=config)
    session.receive_data(frame(OPEN, 0, 2) + frame(OPEN, 0, 4) + frame(DATA, 0, 2, bytes(3000)))
    expect_error(session, frame(DATA, 0, 4, bytes(1100)), ErrorCode.FLOW_CONTROL_ERROR)


def test_credit_is_returned_at_half_the_window(pair: Pair) -> None:
    sid = pair.b.open_stream()
    pair.b.send_data(sid, bytes(200 * KIB))
    at_a, _ = pair.pump()
    assert len(received(at_a, sid)) == 200 * KIB
    assert pair.b.local_flow_control_window(sid) == 56 * KIB
    pair.a.acknowledge_received_data(sid, 128 * KIB - 1)
    assert window_updates(pair.a.data_to_send()) == []
    pair.a.acknowledge_received_data(sid, 1)
    credit = pair.a.data_to_send()
    # Half a stream window is also the session's step, so under one stream both go together.
    assert window_updates(credit) == [(sid, 128 * KIB), (0, 128 * KIB)]
    assert pair.b.receive_data(credit) == [
        WindowUpdated(stream_id=sid, increment=128 * KIB),
        WindowUpdated(stream_id=0, increment=128 * KIB),
    ]
    assert pair.b.local_flow_control_window(sid) == 184 * KIB


def test_session_credit_is_returned_in_steps_of_half_a_stream_window() -> None:
    # A 64 KiB budget over 16 KiB stream windows: the session's step is 8 KiB, whichever
    # streams the bytes were consumed from, not half the budget (32 KiB).
    pair = make_pair(a=SessionConfig(session_window_size=64 * KIB, initial_window_size=16 * KIB))
    streams = [pair.b.open_stream() for _ in range(4)]
    for sid in streams:
        pair.b.send_data(sid, bytes(16 * KIB))
    pair.pump()
    late = pair.b.open_stream()
    assert pair.b.local_flow_control_window(late) == 0  # the budget is spent
    pair.a.acknowledge_received_data(streams[0], 5 * KIB)
    assert window_updates(pair.a.data_to_send()) == []
    pair.a.acknowledge_received_data(streams[1], 3 * KIB - 1)
    assert window_updates(pair.a.data_to_send()) == []
    pair.a.acknowledge_received_data(streams[1], 1)
    # 8 KiB over two streams: session credit, while neither stream reached its own 8 KiB.
    credit = pair.a.data_to_send()
    assert window_updates(credit) == [(0, 8 * KIB)]
    pair.b.receive_data(credit)
    assert pair.b.local_flow_control_window(late) == 8 * KIB
    assert pair.b.local_flow_control_window(streams[0]) == 0


def test_session_credit_step_is_half_the_session_window_when_that_is_smaller() -> None:
    pair = make_pair(a=SessionConfig(session_window_size=8 * KIB, initial_window_size=64 * KIB))
    sid = pair.b.open_stream()
    pair.b.send_data(sid, bytes(8 * KIB))
    pair.pump()
    pair.a.acknowledge_received_data(sid, 4 * KIB - 1)
    assert window_updates(pair.a.data_to_send()) == []
    pair.a.acknowledge_received_data(sid, 1)
    assert window_updates(pair.a.data_to_send()) == [(0, 4 * KIB)]


def test_sender_stalls_at_exactly_the_window(pair: Pair) -> None:
    sid = pair.a.open_stream()
    pair.a.send_data(sid, bytes(256 * KIB))
    assert pair.a.local_flow_control_window(sid) == 0
    queued = pair.a.data_to_send()
    with pytest.raises(FlowControlError) as info:
        pair.a.send_data(sid, b"x")
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    assert pair.a.data_to_send() == b""  # the refused call queued nothing
    events = pair.b.receive_data(queued)
    assert len(received(events, sid)) == 256 * KIB


def test_session_budget_bounds_buffered_data_across_many_streams() -> None:
    budget = 256 * KIB
    pair = make_pair(a=SessionConfig(session_window_size=budget, initial_window_size=64 * KIB))
    streams = [pair.b.open_stream() for _ in range(16)]  # 16 x 64 KiB of stream windows
    pushed = 0
    for _ in range(100):
        progress = False
        for sid in streams:
            room = pair.b.local_flow_control_window(sid)
            if room:
                pair.b.send_data(sid, bytes(room))
                pushed += room
                progress = True
        pair.pump()
        if not progress:
            break
    # Nothing acknowledged: the receiver buffers at most its session budget.
    assert pushed == budget
    assert sum(pair.b.local_flow_control_window(sid) for sid in streams) == 0
    pair.a.acknowledge_received_data(streams[0], 64 * KIB)
    pair.a.acknowledge_received_data(streams[1], 64 * KIB)
    pair.pump()
    # Both stream windows reopened, but only the session credit lets bytes move again.
    assert pair.b.local_flow_control_window(streams[0]) == 64 * KIB
    assert pair.b.local_flow_control_window(streams[2]) == 0


def test_no_stream_credit_after_the_peers_fin(pair: Pair) -> None:
    sid = pair.b.open_stream()
    pair.b.send_data(sid, bytes(200 * KIB), end_stream=True)
    pair.pump()
    pair.a.acknowledge_received_data(sid, 200 * KIB)
    # The peer sends nothing more on the stream; the bytes go back to the shared budget only.
    assert window_updates(pair.a.data_to_send()) == [(0, 200 * KIB)]


STALL_CONFIGS = [
    SessionConfig(
        initial_window_size=4 * KIB, session_window_size=32 * KIB, max_concurrent_streams=8
    ),
    SessionConfig(),  # 255 stalled streams of 256 KiB, as in the fairness benchmark
]


@pytest.mark.parametrize("config", STALL_CONFIGS, ids=["8-streams", "defaults"])
def test_stalled_streams_do_not_wedge_a_live_stream(config: SessionConfig) -> None:
    """The peer fills the window of every stream it may open but one, and nobody reads them:
    the last stream still moves data both ways, well past what was left of the budget."""
    window = config.initial_window_size
    limit = config.max_concurrent_streams
    assert config.session_window_size == limit * window  # as the defaults are sized
    step = min(config.session_window_size, window) // 2
    pair = make_pair(config, config)
    receiver, peer = pair.a, pair.b
    # The worst start: just under one step consumed and not yet credited back.
    early = peer.open_stream()
    peer.send_data(early, bytes(step - 1), end_stream=True)
    at_receiver, _ = pair.pump()
    receiver.accept_stream(early)
    receiver.acknowledge_received_data(early, len(received(at_receiver, early)))
    receiver.end_stream(early)
    out = receiver.data_to_send()
    assert window_updates(out) == []
    peer.receive_data(out)
    assert peer.open_streams == receiver.open_streams == 0

    stalled: list[int] = []
    while len(stalled) < limit - 1:
        # In batches the accept backlog holds: the application takes the streams, then never
        # reads them.
        batch = [
            peer.open_stream()
            for _ in range(min(config.max_accept_backlog, limit - 1 - len(stalled)))
        ]
        for sid in batch:
            peer.send_data(sid, pattern(window, sid))
        at_receiver, _ = pair.pump()
        for sid in batch:
            receiver.accept_stream(sid)
            assert received(at_receiver, sid) == pattern(window, sid)
        stalled += batch

    live = peer.open_stream()
    pair.pump()
    receiver.accept_stream(live)
    # Four windows: far more than the budget had left (one window less the uncredited bytes),
    # so this only completes if consuming on the live stream brings session credit back.
    size = 4 * window
    assert peer.local_flow_control_window(live) < size
    got, updates = transfer(peer, receiver, [live], size)
    assert len(got[live]) == size, "the live stream wedged: no session credit came back"
    assert got[live] == pattern(size, live)
    assert sum(increment for sid, increment in updates if sid == 0) >= size - step
    got, updates = transfer(receiver, peer, [live], size)
    assert got[live] == pattern(size, live)
    assert any(sid == 0 for sid, _ in updates)

    # The stalled streams' bytes were kept all along; consuming them now returns the budget.
    peer.end_stream(live)
    receiver.end_stream(live)
    for sid in stalled:
        receiver.acknowledge_received_data(sid, window)
    pair.pump()
    late = peer.open_stream()
    assert peer.local_flow_control_window(late) == window
    assert peer.state is SessionState.OPEN and receiver.state is SessionState.OPEN


@pytest.mark.parametrize("read_size", [1000, 16 * KIB, 0])
def test_session_credit_goes_out_once_per_stream_credit_under_one_busy_stream(
    read_size: int,
) -> None:
    pair = make_pair()
    sid = pair.b.open_stream()
    pair.pump()
    size = 8 * 1024 * KIB
    got, updates = transfer(pair.b, pair.a, [sid], size, read_size)
    assert got[sid] == pattern(size, sid)
    session = [increment for stream_id, increment in updates if stream_id == 0]
    stream = [increment for stream_id, increment in updates if stream_id == sid]
    # The two counters move in step: one session WINDOW_UPDATE per stream WINDOW_UPDATE, each
    # for at least half a stream window (128 KiB): at most 64 of each for 8 MiB, 2 KiB of
    # frames in all.
    assert session == stream
    assert all(increment >= 128 * KIB for increment in session)
    assert len(session) <= size // (128 * KIB)
    assert sum(session) > size - 128 * KIB  # and less than a step is ever held back


def test_session_credit_steps_under_many_busy_streams() -> None:
    pair = make_pair()
    streams = [pair.b.open_stream() for _ in range(8)]
    pair.pump()
    size = 1024 * KIB
    got, updates = transfer(pair.b, pair.a, streams, size, 10 * KIB)
    assert got == {sid: pattern(size, sid) for sid in streams}
    session = [increment for stream_id, increment in updates if stream_id == 0]
    stream = [increment for stream_id, increment in updates if stream_id != 0]
    # Session credit never goes out in steps below half a stream window, so never more often
    # than the streams' own credit, give or take one per stream (each may hold back a rest).
    assert all(increment >= 128 * KIB for increment in session)
    assert len(session) <= len(stream) + len(streams)
    assert sum(session) > 8 * size - 128 * KIB


@pytest.mark.parametrize("resetter", ["local", "remote"])
def test_reset_returns_the_session_credit_of_unconsumed_data(resetter: str) -> None:
    pair = make_pair(a=SessionConfig(session_window_size=64 * KIB, initial_window_size=64 * KIB))
    sid = pair.b.open_stream()
    pair.b.send_data(sid, bytes(40 * KIB))
    pair.pump()
    if resetter == "local":
        pair.a.reset_stream(sid)
    else:
        pair.a.receive_data(frame(RESET, 0, sid, u32(ErrorCode.CANCEL)))
    # The 40 KiB were never acknowledged and never will be: the budget comes back at once.
    assert (0, 40 * KIB) in window_updates(pair.a.data_to_send())
    pair.a.acknowledge_received_data(sid, 40 * KIB)  # a late acknowledgement is a no-op
    assert pair.a.data_to_send() == b""


def test_data_on_a_refused_stream_gives_its_budget_back() -> None:
    session = raw_peer(config=SessionConfig(max_concurrent_streams=0, session_window_size=2048))
    session.receive_data(frame(OPEN, 0, 2) + frame(DATA, FIN, 2, bytes(1024)))
    assert parse_frames(session.data_to_send()) == [
        (RESET, 0, 2, u32(ErrorCode.REFUSED_STREAM)),
        (WINDOW_UPDATE, 0, 0, u32(1024)),
    ]


# ---------------------------------------------------------------- limits and refusals


def test_concurrent_stream_limit_refuses_extra_streams() -> None:
    session = raw_peer(config=SessionConfig(max_concurrent_streams=2))
    session.data_to_send()
    events = session.receive_data(frame(OPEN, 0, 2) + frame(OPEN, 0, 4) + frame(OPEN, 0, 6))
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == [2, 4]
    assert parse_frames(session.data_to_send()) == [(RESET, 0, 6, u32(ErrorCode.REFUSED_STREAM))]
    assert session.state is SessionState.OPEN
    # Once one closes, there is room again.
    session.receive_data(frame(RESET, 0, 2, u32(0)))
    assert session.receive_data(frame(OPEN, 0, 8)) == [StreamOpened(stream_id=8, metadata={})]


def test_opener_respects_the_peers_limit() -> None:
    pair = make_pair(b=SessionConfig(max_concurrent_streams=1))
    sid = pair.a.open_stream()
    assert not pair.a.can_open_stream()
    with pytest.raises(LocalProtocolError) as info:
        pair.a.open_stream()
    assert info.value.code == ErrorCode.REFUSED_STREAM
    pair.a.reset_stream(sid)
    assert pair.a.can_open_stream()


def test_accept_backlog_refuses_streams_nobody_takes() -> None:
    session = raw_peer(config=SessionConfig(max_accept_backlog=2))
    session.data_to_send()
    events = session.receive_data(frame(OPEN, 0, 2) + frame(OPEN, 0, 4) + frame(OPEN, 0, 6))
    assert len(events) == 2
    assert parse_frames(session.data_to_send()) == [(RESET, 0, 6, u32(ErrorCode.REFUSED_STREAM))]
    session.accept_stream(2)
    assert session.receive_data(frame(OPEN, 0, 8)) == [StreamOpened(stream_id=8, metadata={})]
    # A reset while waiting in the backlog frees its place too.
    session.receive_data(frame(RESET, 0, 4, u32(0)))
    assert len(session.receive_data(frame(OPEN, 0, 10))) == 1


def test_metadata_over_the_peers_limit_is_refused_locally() -> None:
    pair = make_pair(b=SessionConfig(max_metadata_size=16))
    with pytest.raises(LocalProtocolError) as info:
        pair.a.open_stream({"kind": "x" * 20})
    assert info.value.code == ErrorCode.FRAME_SIZE_ERROR
    with pytest.raises(ValueError):
        pair.a.open_stream({"bad key": "x"})
    assert pair.a.data_to_send() == b"" and pair.a.open_streams == 0
    assert pair.a.open_stream({"kind": "http"}) == 1  # ids were not consumed by the refusals


# ---------------------------------------------------------------- local misuse


def test_local_misuse_is_refused_and_changes_nothing(pair: Pair) -> None:
    sid = pair.a.open_stream()
    pair.a.end_stream(sid)
    pair.pump()
    with pytest.raises(StreamClosedError) as closed:
        pair.a.send_data(sid, b"after fin")
    assert closed.value.stream_id == sid
    with pytest.raises(StreamClosedError):
        pair.a.end_stream(sid)
    with pytest.raises(StreamClosedError):
        pair.a.send_data(99, b"no such stream")
    other = pair.a.open_stream()
    with pytest.raises(FlowControlError):
        pair.a.send_data(other, bytes(256 * KIB + 1), end_stream=True)
    assert pair.a.stream_state(other) is StreamState.OPEN  # the FIN was not taken either
    assert pair.a.local_flow_control_window(other) == 256 * KIB
    pair.pump()
    pair.b.send_data(other, b"abc")
    pair.pump()
    with pytest.raises(LocalProtocolError):
        pair.a.acknowledge_received_data(other, 4)
    with pytest.raises(ValueError):
        pair.a.acknowledge_received_data(other, -1)
    pair.a.acknowledge_received_data(other, 3)
    with pytest.raises(LocalProtocolError):
        pair.a.acknowledge_received_data(other, 1)
    assert pair.a.state is SessionState.OPEN and pair.b.state is SessionState.OPEN


# ---------------------------------------------------------------- the sticky error


def test_errors_are_sticky_and_the_goaway_carries_the_code(pair: Pair) -> None:
    sid = pair.b.open_stream()
    pair.b.send_data(sid, bytes(200 * KIB))
    pair.pump()
    bad = frame(WINDOW_UPDATE, 0, sid, u32(0))
    with pytest.raises(RemoteProtocolError) as info:
        pair.a.receive_data(bad)
    error = info.value
    goaway = pair.a.data_to_send()
    frames = parse_frames(goaway)
    assert [(t, sid_) for t, _, sid_, _ in frames] == [(GOAWAY, 0)]
    last, code = struct.unpack_from(">II", frames[0][3])
    assert (last, code) == (sid, ErrorCode.PROTOCOL_ERROR)
    # The same error again, whatever comes next, valid or not, and no second GOAWAY.
    for data in (frame(PING, 0, 0, bytes(8)), b"", bad):
        with pytest.raises(RemoteProtocolError) as again:
            pair.a.receive_data(data)
        assert again.value is error
    assert pair.a.data_to_send() == b""
    for call in (
        lambda: pair.a.open_stream(),
        lambda: pair.a.send_data(sid, b"x"),
        lambda: pair.a.reset_stream(sid),
        lambda: pair.a.ping(bytes(8)),
        lambda: pair.a.go_away(),
    ):
        with pytest.raises(LocalProtocolError) as local:
            call()
        assert local.value.code == ErrorCode.PROTOCOL_ERROR
    assert not pair.a.can_open_stream()
    # Consuming data after the error returns no credit: the GOAWAY stays the last frame.
    pair.a.acknowledge_received_data(sid, 200 * KIB)
    assert pair.a.data_to_send() == b""
    # The peer learns why.
    events = pair.b.receive_data(goaway)
    assert events == [
        GoAwayReceived(last_stream_id=sid, code=ErrorCode.PROTOCOL_ERROR, reason=error.message)
    ]


def test_error_after_a_goaway_sends_a_second_goaway_with_the_code() -> None:
    session = raw_peer()
    session.go_away()
    session.data_to_send()
    expect_error(session, frame(OPEN, 0, 3), ErrorCode.PROTOCOL_ERROR)


# ---------------------------------------------------------------- end of file


def test_end_of_file(pair: Pair) -> None:
    assert pair.a.receive_data(b"") == []
    assert pair.a.state is SessionState.CLOSED
    assert pair.a.receive_data(b"") == []
    with pytest.raises(LocalProtocolError):
        pair.a.receive_data(b"\x00")
    assert not pair.a.can_open_stream()
    with pytest.raises(LocalProtocolError):
        pair.a.open_stream()


def test_end_of_file_in_the_middle_of_a_frame(pair: Pair) -> None:
    pair.a.receive_data(frame(PING, 0, 0, bytes(8))[:5])
    expect_error(pair.a, b"", ErrorCode.PROTOCOL_ERROR)


def test_empty_data_never_returns_a_zero_credit() -> None:
    # With windows of one byte, half a window rounds down to zero; an empty DATA frame must
    # still not produce a WINDOW_UPDATE, whose increment may never be zero.
    config = SessionConfig(session_window_size=1, initial_window_size=1)
    session = raw_peer(config=config)
    session.receive_data(frame(OPEN, 0, 2) + frame(OPEN, 0, 4))
    session.reset_stream(2)
    session.data_to_send()
    assert session.receive_data(frame(DATA, 0, 2) + frame(DATA, 0, 4)) == []
    assert session.data_to_send() == b""
    session.receive_data(frame(DATA, 0, 4, b"x"))
    session.acknowledge_received_data(4, 1)
    assert window_updates(session.data_to_send()) == [(4, 1), (0, 1)]
