"""Growing a stream's receive window (SPEC.md, "Flow control", item 10): the receiver grants
more than was consumed, within a local budget that streams give back when they leave."""

from __future__ import annotations

import pytest

from protocol import ErrorCode, RemoteProtocolError, SessionConfig, StreamState

from .test_session import DATA, Pair, frame, make_pair, received, window_updates

KIB = 1024
WINDOW = 16 * KIB


def growing_pair(budget: int = 64 * KIB) -> Pair:
    """``b`` (the relay) may grow its receive windows by ``budget`` in all."""
    receiver = SessionConfig(
        initial_window_size=WINDOW,
        session_window_size=4 * WINDOW + budget,
        max_frame_size=4 * KIB,
        window_growth_budget=budget,
    )
    pair = make_pair(SessionConfig(initial_window_size=WINDOW), receiver)
    pair.pump()
    return pair


def open_stream(pair: Pair) -> int:
    stream_id = pair.a.open_stream()
    pair.pump()
    pair.b.accept_stream(stream_id)
    return stream_id


def test_a_grown_window_lets_the_peer_send_that_much_more_and_no_more() -> None:
    pair = growing_pair()
    stream_id = open_stream(pair)
    assert pair.b.receive_window(stream_id) == (WINDOW, WINDOW)
    assert pair.b.grow_stream_window(stream_id, WINDOW)
    grant = pair.b.data_to_send()
    assert window_updates(grant) == [(stream_id, WINDOW)]
    pair.a.receive_data(grant)
    assert pair.a.local_flow_control_window(stream_id) == 2 * WINDOW
    assert pair.b.receive_window(stream_id) == (2 * WINDOW, 2 * WINDOW)
    assert pair.b.window_growth_available == 64 * KIB - WINDOW
    # The sender may now have twice the initial window in flight, unread.
    pair.a.send_data(stream_id, b"x" * 2 * WINDOW)
    _, at_b = pair.pump()
    assert len(received(at_b, stream_id)) == 2 * WINDOW
    assert pair.b.receive_window(stream_id) == (0, 2 * WINDOW)
    # One byte more than the grown window is the peer's flow-control error.
    with pytest.raises(RemoteProtocolError) as error:
        pair.b.receive_data(frame(DATA, 0, stream_id, b"y"))
    assert error.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_credit_steps_follow_the_grown_window() -> None:
    pair = growing_pair()
    stream_id = open_stream(pair)
    assert pair.b.grow_stream_window(stream_id, 3 * WINDOW)
    pair.pump()
    pair.a.send_data(stream_id, b"x" * 4 * WINDOW)
    pair.pump()
    # Half the grown window (2 x WINDOW) is the step: one WINDOW below it returns nothing.
    pair.b.acknowledge_received_data(stream_id, WINDOW)
    assert (stream_id, WINDOW) not in window_updates(pair.b.data_to_send())
    pair.b.acknowledge_received_data(stream_id, WINDOW)
    assert (stream_id, 2 * WINDOW) in window_updates(pair.b.data_to_send())


def test_consumed_bytes_waiting_for_their_step_go_out_with_the_growth() -> None:
    pair = growing_pair()
    stream_id = open_stream(pair)
    pair.a.send_data(stream_id, b"x" * WINDOW)
    pair.pump()
    pair.b.acknowledge_received_data(stream_id, 1000)  # below the step: nothing yet
    assert pair.b.grow_stream_window(stream_id, WINDOW)
    assert window_updates(pair.b.data_to_send()) == [(stream_id, WINDOW + 1000)]
    assert pair.b.receive_window(stream_id) == (WINDOW + 1000, 2 * WINDOW)


def test_the_budget_bounds_growth_and_closed_streams_give_theirs_back() -> None:
    pair = growing_pair(budget=2 * WINDOW)
    first, second = open_stream(pair), open_stream(pair)
    assert pair.b.grow_stream_window(first, 2 * WINDOW)
    assert pair.b.window_growth_available == 0
    assert not pair.b.grow_stream_window(second, 1)  # refused: nothing changes
    assert window_updates(pair.b.data_to_send()) == [(first, 2 * WINDOW)]  # the first only
    assert pair.b.receive_window(second) == (WINDOW, WINDOW)
    pair.a.reset_stream(first)
    pair.pump()
    assert pair.b.stream_state(first) is StreamState.CLOSED
    assert pair.b.window_growth_available == 2 * WINDOW
    assert pair.b.grow_stream_window(second, WINDOW)


def test_a_stream_closed_gracefully_gives_its_growth_back_once_its_data_is_read() -> None:
    pair = growing_pair(budget=WINDOW)
    stream_id = open_stream(pair)
    assert pair.b.grow_stream_window(stream_id, WINDOW)
    pair.pump()
    pair.a.send_data(stream_id, b"x" * 100, end_stream=True)
    pair.b.end_stream(stream_id)
    pair.pump()
    assert pair.b.window_growth_available == 0  # 100 bytes still unread
    pair.b.acknowledge_received_data(stream_id, 100)
    assert pair.b.window_growth_available == WINDOW


def test_a_stream_that_no_longer_receives_does_not_grow() -> None:
    pair = growing_pair()
    stream_id = open_stream(pair)
    pair.a.end_stream(stream_id)
    pair.pump()
    assert pair.b.receive_window(stream_id) == (0, 0)
    assert not pair.b.grow_stream_window(stream_id, WINDOW)
    assert not pair.b.grow_stream_window(999, WINDOW)  # unknown
    assert pair.b.window_growth_available == 64 * KIB
    assert pair.b.data_to_send() == b""


def test_without_a_budget_no_window_grows() -> None:
    pair = make_pair()
    pair.pump()
    stream_id = open_stream(pair)
    assert SessionConfig().window_growth_budget == 0
    assert not pair.b.grow_stream_window(stream_id, 1)


@pytest.mark.parametrize("increment", [0, -1])
def test_a_window_grows_by_at_least_one_byte(increment: int) -> None:
    pair = growing_pair()
    stream_id = open_stream(pair)
    with pytest.raises(ValueError, match="at least one byte"):
        pair.b.grow_stream_window(stream_id, increment)
