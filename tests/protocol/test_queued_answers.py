"""What a peer can make the session queue for it: pongs, resets and window updates are bounded
(SPEC.md, "Queued answers"), so a peer that sends and never reads cannot grow the queue."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    ErrorCode,
    LocalProtocolError,
    PongReceived,
    RemoteProtocolError,
    Role,
    Session,
    SessionConfig,
    SessionState,
)

from .test_session import (
    DATA,
    FIN,
    GOAWAY,
    KIB,
    OPEN,
    PING,
    RESET,
    WINDOW_UPDATE,
    expect_error,
    frame,
    make_pair,
    parse_frames,
    raw_peer,
    u32,
    window_updates,
)

ACK = 0x2
_BASE = settings.get_profile("protocol-selected")


def pings(count: int, start: int = 0) -> bytes:
    return b"".join(frame(PING, 0, 0, struct.pack(">Q", start + n)) for n in range(count))


def refused_opens(count: int, first: int = 1) -> bytes:
    """OPENs of streams ``first``, ``first + 2``, ... from a connector (odd ids)."""
    return b"".join(frame(OPEN, 0, first + 2 * n) for n in range(count))


# ---------------------------------------------------------------- pings


def test_a_ping_beyond_the_pending_pongs_ends_the_session() -> None:
    session = raw_peer(Role.RELAY)
    # Up to the bound, every ping is answered, even when they all arrive at once.
    session.receive_data(pings(4))
    assert session.queued_control_frames == 4
    expect_error(session, pings(1, start=4), ErrorCode.ENHANCE_YOUR_CALM)


def test_a_flood_of_pings_in_one_message_queues_at_most_the_bound() -> None:
    session = raw_peer(Role.RELAY)
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_data(pings(100_000))
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM
    frames = parse_frames(session.data_to_send())
    # Four pongs, then the GOAWAY that says why; nothing for the other 99,996 pings.
    assert [(t, flags) for t, flags, _, _ in frames[:4]] == [(PING, ACK)] * 4
    assert len(frames) == 5


def test_pings_are_answered_without_limit_when_the_answers_are_read() -> None:
    session = raw_peer(Role.RELAY)
    for n in range(100):
        session.receive_data(pings(4, start=4 * n))
        assert len(parse_frames(session.data_to_send())) == 4
    assert session.state is SessionState.OPEN


def test_a_pong_counts_as_pending_until_it_is_handed_out_whole() -> None:
    session = raw_peer(Role.RELAY)
    session.receive_data(pings(4))
    head = session.data_to_send(19)  # all but the last byte of the first pong
    assert session.queued_control_frames == 4
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_data(pings(1, start=4))
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM
    frames = parse_frames(head + session.data_to_send())
    assert [t for t, _, _, _ in frames] == [PING] * 4 + [GOAWAY]


def test_a_sender_keeps_at_most_four_pings_unanswered() -> None:
    pair = make_pair()
    for n in range(4):
        pair.a.ping(struct.pack(">Q", n))
    assert not pair.a.can_ping()
    with pytest.raises(LocalProtocolError):
        pair.a.ping(b"one more")
    sent = pair.a.data_to_send()
    assert len(parse_frames(sent)) == 4 and b"one more" not in sent
    pair.b.receive_data(sent)
    at_a = pair.a.receive_data(pair.b.data_to_send())
    assert [type(e) for e in at_a] == [PongReceived] * 4
    assert pair.a.can_ping() and pair.a.unanswered_pings == 0


def test_max_pending_pongs_is_never_below_what_senders_may_send() -> None:
    with pytest.raises(ValueError):
        SessionConfig(max_pending_pongs=3)


# ---------------------------------------------------------------- refused opens and resets


def test_a_flood_of_refused_opens_ends_the_session() -> None:
    config = SessionConfig(max_concurrent_streams=0, max_queued_control_frames=8)
    session = raw_peer(Role.RELAY, config)
    session.receive_data(refused_opens(8))
    assert session.queued_control_frames == 8
    expect_error(session, refused_opens(1, first=17), ErrorCode.ENHANCE_YOUR_CALM)


def test_refused_opens_are_fine_when_the_resets_are_read() -> None:
    config = SessionConfig(max_concurrent_streams=0, max_queued_control_frames=8)
    session = raw_peer(Role.RELAY, config)
    for n in range(50):
        session.receive_data(refused_opens(8, first=1 + 16 * n))
        resets = parse_frames(session.data_to_send())
        assert [t for t, _, _, _ in resets] == [RESET] * 8
    assert session.state is SessionState.OPEN


def test_data_after_fin_floods_end_the_session() -> None:
    config = SessionConfig(max_queued_control_frames=16)
    session = raw_peer(Role.RELAY, config)
    flood = b"".join(
        frame(OPEN, 0, sid) + frame(DATA, FIN, sid) + frame(DATA, 0, sid, b"x")
        for sid in range(1, 40, 2)
    )
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_data(flood)
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM


def test_data_on_closed_streams_queues_one_session_grant() -> None:
    config = SessionConfig(initial_window_size=1024, session_window_size=64 * KIB)
    session = raw_peer(Role.RELAY, config)
    session.receive_data(frame(OPEN, 0, 1) + frame(RESET, 0, 1, u32(ErrorCode.CANCEL)))
    session.data_to_send()
    # Late DATA on the reset stream is credited straight back: the grants add up in one frame.
    session.receive_data(b"".join(frame(DATA, 0, 1, bytes(1000)) for _ in range(60)))
    assert window_updates(session.data_to_send()) == [(0, 60 * 1000)]


# ---------------------------------------------------------------- window updates


def test_window_updates_for_one_stream_are_coalesced_while_queued() -> None:
    pair = make_pair(b=SessionConfig(initial_window_size=8 * KIB))
    sid = pair.a.open_stream()
    pair.pump()
    pair.a.send_data(sid, bytes(8 * KIB))
    pair.b.receive_data(pair.a.data_to_send())
    for _ in range(8):
        pair.b.acknowledge_received_data(sid, KIB)
    # Two stream grants of 4 KiB each and the session's: one frame each, with the sums.
    updates = window_updates(pair.b.data_to_send())
    assert sorted(updates) == [(0, 8 * KIB), (sid, 8 * KIB)]
    pair.a.receive_data(b"".join(frame(WINDOW_UPDATE, 0, s, u32(n)) for s, n in updates))
    assert pair.a.local_flow_control_window(sid) == 8 * KIB


@settings(_BASE, max_examples=_BASE.max_examples * 2)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["ack", "drain"]), st.integers(0, 2), st.integers(1, 40)),
        max_size=60,
    )
)
def test_coalesced_grants_add_up_to_what_was_consumed(steps: list[tuple[str, int, int]]) -> None:
    """Acknowledgements and partial drains in any order: the WINDOW_UPDATEs that come out, read
    whole, credit each stream and the session exactly what was consumed past the thresholds,
    and at most one grant per stream is queued at a time."""
    config = SessionConfig(initial_window_size=64, session_window_size=1024)
    sender = Session(Role.CONNECTOR)
    receiver = Session(Role.RELAY, config)
    receiver.receive_data(sender.data_to_send())
    sender.receive_data(receiver.data_to_send())
    streams = [sender.open_stream() for _ in range(3)]
    for sid in streams:
        sender.send_data(sid, bytes(64))
    receiver.receive_data(sender.data_to_send())
    unacked = dict.fromkeys(streams, 64)
    consumed = dict.fromkeys(streams, 0)
    out = bytearray()
    for kind, pick, size in steps:
        if kind == "ack":
            sid = streams[pick]
            amount = min(size, unacked[sid])
            if amount:
                receiver.acknowledge_received_data(sid, amount)
                unacked[sid] -= amount
                consumed[sid] += amount
        else:
            out += receiver.data_to_send(size)
        assert receiver.queued_control_frames <= len(streams) + 1 + 1  # one may be cut
    out += receiver.data_to_send()
    credit = dict.fromkeys([0, *streams], 0)
    for sid, increment in window_updates(bytes(out)):
        credit[sid] += increment
    for sid in streams:
        # Credit goes back in steps of at least half the window (32 bytes), never more.
        assert consumed[sid] - 32 < credit[sid] <= consumed[sid]
    assert credit[0] <= sum(consumed.values())
    assert receiver.queued_control_bytes == 0 and receiver.queued_bytes == 0


@settings(_BASE, max_examples=_BASE.max_examples)
@given(
    kinds=st.lists(st.sampled_from(["ping", "open"]), min_size=1, max_size=300),
    splits=st.lists(st.integers(1, 64), min_size=1, max_size=20),
    drains=st.lists(st.integers(0, 400), min_size=1, max_size=20),
)
def test_a_flooding_peer_never_grows_the_queue_past_the_bounds(
    kinds: list[str], splits: list[int], drains: list[int]
) -> None:
    """Pings and refused opens fed in any byte split, with the output read now and then: the
    session either stays within its bounds or ends with ENHANCE_YOUR_CALM."""
    config = SessionConfig(max_concurrent_streams=0, max_queued_control_frames=32)
    session = raw_peer(Role.RELAY, config)
    wire = bytearray()
    next_id = 1
    for n, kind in enumerate(kinds):
        if kind == "ping":
            wire += pings(1, start=n)
        else:
            wire += refused_opens(1, first=next_id)
            next_id += 2
    offset = 0
    step = 0
    while offset < len(wire):
        piece = splits[step % len(splits)]
        try:
            session.receive_data(bytes(wire[offset : offset + piece]))
        except RemoteProtocolError as exc:
            assert exc.code == ErrorCode.ENHANCE_YOUR_CALM
            return
        offset += piece
        assert session.queued_control_frames <= 32
        assert session.queued_control_bytes <= 32 * 20
        session.data_to_send(drains[step % len(drains)])
        step += 1


def test_a_grant_is_never_added_to_a_frame_handed_out_in_part() -> None:
    pair = make_pair(b=SessionConfig(initial_window_size=8 * KIB))
    sid = pair.a.open_stream()
    pair.pump()
    pair.a.send_data(sid, bytes(8 * KIB))
    pair.b.receive_data(pair.a.data_to_send())
    pair.b.acknowledge_received_data(sid, 4 * KIB)  # a stream grant and a session grant
    head = pair.b.data_to_send(5)  # part of the stream grant's header
    assert pair.b.data_to_send(0) == b""
    pair.b.acknowledge_received_data(sid, 4 * KIB)
    updates = window_updates(head + pair.b.data_to_send())
    assert sum(n for s, n in updates if s == sid) == 8 * KIB
    assert sum(n for s, n in updates if s == 0) == 8 * KIB
