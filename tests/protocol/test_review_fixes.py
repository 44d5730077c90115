"""Frames a side queues on its own initiative (its application's resets, its GOAWAY) are not
answers the peer made it queue: they never count toward ``max_queued_control_frames`` nor
toward :attr:`Session.queued_control_bytes` (what the mux reader pauses on), so a stalled
writer plus many local resets (a relay resetting streams as browsers go away) cannot end an
honest peer's session with ENHANCE_YOUR_CALM. SPEC.md, "Queued answers"."""

from __future__ import annotations

import struct

import pytest

from protocol import ErrorCode, RemoteProtocolError, SessionConfig, SessionState

from .test_session import OPEN, PING, RESET, frame, make_pair, parse_frames

#: A small bound, so the test resets many times more streams than it allows.
BOUND = 8
#: Local resets made while the writer is stalled: far past :data:`BOUND`.
LOCAL_RESETS = 20 * BOUND


def test_local_resets_with_a_stalled_writer_do_not_end_the_session() -> None:
    pair = make_pair(a=SessionConfig(max_queued_control_frames=BOUND))
    # Side a's writer is stalled: nothing it queues is taken while it opens and resets streams.
    opened = []
    for _ in range(LOCAL_RESETS):
        sid = pair.a.open_stream()
        pair.a.reset_stream(sid, ErrorCode.CANCEL)
        opened.append(sid)
    assert pair.a.queued_control_frames == 0
    assert pair.a.queued_control_bytes == 0
    # The peer's frames still arrive and are read: a ping is answered, not blamed on the peer.
    pair.b.ping(struct.pack(">Q", 1))
    pair.a.receive_data(pair.b.data_to_send())
    assert pair.a.state is SessionState.OPEN
    assert pair.a.queued_control_frames == 1  # the pong: an answer, counted
    # Once the writer moves, the peer gets every OPEN and its RESET, and the pong.
    frames = parse_frames(pair.a.data_to_send())
    assert [sid for t, _, sid, _ in frames if t == RESET] == opened
    assert [sid for t, _, sid, _ in frames if t == OPEN] == opened
    assert [t for t, _, _, _ in frames].count(PING) == 1
    pair.b.receive_data(b"".join(frame(t, f, s, p) for t, f, s, p in frames))
    assert pair.b.state is SessionState.OPEN


def test_a_local_go_away_is_not_counted_as_an_answer() -> None:
    pair = make_pair(a=SessionConfig(max_queued_control_frames=BOUND))
    pair.a.go_away(ErrorCode.NO_ERROR, "draining")
    assert pair.a.queued_control_frames == 0


def test_answers_to_the_peer_are_still_bounded_beside_local_resets() -> None:
    """The peer-flood bound holds, with all its room, when local resets are queued too."""
    pair = make_pair(a=SessionConfig(max_concurrent_streams=0, max_queued_control_frames=BOUND))
    for _ in range(LOCAL_RESETS):
        pair.a.reset_stream(pair.a.open_stream(), ErrorCode.CANCEL)
    # OPENs from the relay side (even ids), each refused with a RESET: an answer, counted.
    refused = b"".join(frame(OPEN, 0, 2 * (n + 1)) for n in range(BOUND))
    pair.a.receive_data(refused)
    assert pair.a.queued_control_frames == BOUND
    with pytest.raises(RemoteProtocolError) as info:
        pair.a.receive_data(frame(OPEN, 0, 2 * (BOUND + 1)))
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM
