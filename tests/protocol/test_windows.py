"""The flow-control window (``protocol/_windows.py``), one class for a stream and the session.

Exact increments and errors first, then a Hypothesis model check: whatever the sequence of
calls, credit never goes negative, never exceeds 2**31 - 1, and a refused call changes nothing.
"""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import ErrorCode, FlowControlError, LocalProtocolError, RemoteProtocolError
from protocol._frames import MAX_WINDOW
from protocol._windows import Window, credit_step

_BASE = settings.get_profile("protocol-selected")


def snapshot(window: Window) -> tuple[int, int, int, int]:
    return window.send_window, window.recv_window, window.unacked, window.pending


@pytest.mark.parametrize(
    ("size", "step"), [(1, 1), (2, 1), (3, 1), (8, 4), (9, 4), (256 * 1024, 128 * 1024)]
)
def test_the_credit_step_is_half_the_window_and_never_zero(size: int, step: int) -> None:
    assert credit_step(size) == step


def test_credit_goes_back_once_a_step_is_consumed_all_at_once() -> None:
    window = Window(5, send=0, receive=10, step=5)
    window.received(3)
    assert (window.recv_window, window.unacked) == (7, 3)
    assert window.acknowledge(3) is None  # 3 consumed: below the step of 5
    assert window.recv_window == 7  # nothing goes back before the WINDOW_UPDATE
    window.received(4)
    assert window.acknowledge(1) is None
    assert window.acknowledge(1) == 5  # 3 + 1 + 1: everything consumed since the last update
    assert snapshot(window) == (0, 8, 2, 0)
    assert window.acknowledge(2) is None
    window.received(8)  # the whole window, exactly
    assert window.recv_window == 0
    assert window.acknowledge(8) == 10
    assert snapshot(window) == (0, 10, 0, 0)


def test_a_step_of_one_byte_returns_every_byte() -> None:
    window = Window(0, send=0, receive=1, step=credit_step(1))
    window.received(1)
    assert window.acknowledge(1) == 1
    window.received(0)
    assert window.acknowledge(0) is None  # never a zero increment


@pytest.mark.parametrize(
    ("stream_id", "message"),
    [
        (7, "DATA frame of 11 bytes exceeds the window of stream 7 (10)"),
        (0, "DATA frame of 11 bytes exceeds the session window of 10"),
    ],
)
def test_data_beyond_the_receive_window_is_a_flow_control_error(
    stream_id: int, message: str
) -> None:
    window = Window(stream_id, send=0, receive=10, step=5)
    window.check_received(10)
    for call in (window.check_received, window.received):
        with pytest.raises(RemoteProtocolError) as info:
            call(11)
        assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
        assert info.value.message == message
    assert snapshot(window) == (0, 10, 0, 0)


def test_acknowledging_more_than_was_received_is_refused_and_changes_nothing() -> None:
    window = Window(3, send=0, receive=10, step=5)
    window.received(4)
    for call in (window.acknowledge, window.release):
        with pytest.raises(LocalProtocolError) as info:
            call(5)
        assert info.value.message == "acknowledging 5 bytes on stream 3; only 4 are unacknowledged"
    assert snapshot(window) == (0, 6, 4, 0)


def test_released_bytes_are_never_credited_back() -> None:
    # After the peer's FIN: the application's reads return no stream credit.
    window = Window(3, send=0, receive=10, step=1)
    window.received(6)
    window.release(6)
    assert snapshot(window) == (0, 4, 0, 0)


def test_discard_forgets_the_unacknowledged_bytes_and_says_how_many() -> None:
    window = Window(3, send=0, receive=10, step=5)
    window.received(6)
    assert window.acknowledge(2) is None
    assert window.discard() == 4
    assert snapshot(window) == (0, 4, 0, 2)
    assert window.discard() == 0


@pytest.mark.parametrize(
    ("stream_id", "message"),
    [(9, "window of stream 9 grew past 2**31 - 1"), (0, "session window grew past 2**31 - 1")],
)
def test_credit_past_the_maximum_window_is_a_flow_control_error(
    stream_id: int, message: str
) -> None:
    window = Window(stream_id, send=MAX_WINDOW - 10, receive=1, step=1)
    window.credit(10)  # exactly the maximum is allowed
    assert window.send_window == MAX_WINDOW
    window.spend(1)
    with pytest.raises(RemoteProtocolError) as info:
        window.credit(2)
    assert (info.value.code, info.value.message) == (ErrorCode.FLOW_CONTROL_ERROR, message)
    assert window.send_window == MAX_WINDOW - 1


def test_spending_more_than_the_send_window_is_refused_and_changes_nothing() -> None:
    window = Window(5, send=10, receive=1, step=1)
    window.spend(4)
    with pytest.raises(FlowControlError) as info:
        window.spend(7)
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    assert window.send_window == 6
    window.spend(6)
    assert window.send_window == 0


@pytest.mark.parametrize(
    "arguments",
    [
        {"send": -1, "receive": 1, "step": 1},
        {"send": 0, "receive": MAX_WINDOW + 1, "step": 1},
        {"send": 0, "receive": 1, "step": 0},
    ],
)
def test_a_window_out_of_range_cannot_be_made(arguments: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Window(1, **arguments)


# ---------------------------------------------------------------- the model check


@attrs.define
class Model:
    """What the window must hold, computed the plain way."""

    size: int
    step: int
    send: int
    recv: int
    unacked: int = 0
    pending: int = 0


_AMOUNTS = st.one_of(
    st.integers(0, 64),
    st.integers(0, MAX_WINDOW),
    st.integers(MAX_WINDOW - 64, MAX_WINDOW + 64),
)
_CALLS = st.lists(
    st.tuples(
        st.sampled_from(
            ["check", "received", "acknowledge", "release", "discard", "credit", "spend"]
        ),
        _AMOUNTS,
    ),
    max_size=60,
)


@settings(_BASE)
@given(
    size=st.one_of(st.integers(1, 64), st.integers(1, MAX_WINDOW)),
    send=st.one_of(st.integers(0, 64), st.integers(0, MAX_WINDOW)),
    calls=_CALLS,
)
def test_credit_never_goes_negative_nor_past_the_maximum(
    size: int, send: int, calls: list[tuple[str, int]]
) -> None:
    step = credit_step(size)
    window = Window(1, send=send, receive=size, step=step)
    model = Model(size=size, step=step, send=send, recv=size)
    for name, amount in calls:
        before = snapshot(window)
        try:
            result = getattr(window, {"check": "check_received"}.get(name, name))(
                *(() if name == "discard" else (amount,))
            )
        except (RemoteProtocolError, LocalProtocolError) as exc:
            assert snapshot(window) == before, f"{name}({amount}) failed half-way"
            refused = {
                "check": amount > model.recv,
                "received": amount > model.recv,
                "acknowledge": amount > model.unacked,
                "release": amount > model.unacked,
                "credit": model.send + amount > MAX_WINDOW,
                "spend": amount > model.send,
            }
            assert refused.get(name), f"{name}({amount}) refused wrongly: {exc}"
            assert exc.code == (
                ErrorCode.PROTOCOL_ERROR
                if name in ("acknowledge", "release")
                else ErrorCode.FLOW_CONTROL_ERROR
            )
        else:
            if name == "received":
                assert amount <= model.recv
                model.recv -= amount
                model.unacked += amount
            elif name == "acknowledge":
                assert amount <= model.unacked
                model.unacked -= amount
                model.pending += amount
                if model.pending >= step:
                    assert result == model.pending
                    model.recv += model.pending
                    model.pending = 0
                else:
                    assert result is None
            elif name == "release":
                model.unacked -= amount
            elif name == "discard":
                assert result == model.unacked
                model.unacked = 0
            elif name == "credit":
                model.send += amount
            elif name == "spend":
                model.send -= amount
            else:
                assert amount <= model.recv
        assert snapshot(window) == (model.send, model.recv, model.unacked, model.pending)
        assert 0 <= window.send_window <= MAX_WINDOW
        assert 0 <= window.recv_window <= size
        assert 0 <= window.pending < step
        # The peer never gets more room than the window it started with.
        assert window.recv_window + window.unacked + window.pending <= size
