"""Stream states: every transition of one stream in one table, and the record that runs it.

The table is role-agnostic: "send" and "receive" are from this side's view, and nothing in it
depends on which side opened the stream. Each entry maps ``(state, input)`` to ``(side effect,
next state)``; the side effect, if any, makes the event that tells the application about the
transition. A pair that is absent is a violation:

- a local input (``SEND_*``) raises :class:`StreamClosedError`: the application's call is
  refused and nothing changes;
- a remote input (``RECV_*``) raises :class:`RemoteStreamError`, a stream error: the session
  resets the stream with ``STREAM_CLOSED`` and goes on (DATA after the peer's FIN).

Inputs for a stream that is closed never reach the table: the session ignores them (SPEC.md,
"Stream states", the closed row).

Only :meth:`Stream.process` changes a stream's state. Sending or receiving DATA without FIN
leaves the state as it is, so those hot paths do not look the pair up: they test the state
against :data:`SENDING` and :data:`RECEIVING`, derived from this table (the tests check that
those pairs are exactly the side-effect-free self-loops).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ._errors import ErrorCode, RemoteStreamError, StreamClosedError
from ._events import Event, StreamEnded, StreamReset
from ._windows import Window


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
    #: The peer's GOAWAY names a last stream id below this stream, one this side opened: the
    #: peer will not process it (SPEC.md, "Go-away and draining").
    RECV_GOAWAY = "receive goaway"


#: What makes the event for a transition: called with the stream id and the code the input
#: carried (a RESET's), it returns the event the application is told.
SideEffect = Callable[[int, int], Event]


def _ended(stream_id: int, code: int) -> Event:
    return StreamEnded(stream_id=stream_id)


def _reset_by_peer(stream_id: int, code: int) -> Event:
    return StreamReset(stream_id=stream_id, code=ErrorCode.from_wire(code), remote=True)


def _refused(stream_id: int, code: int) -> Event:
    return StreamReset(stream_id=stream_id, code=ErrorCode.REFUSED_STREAM, remote=False)


_S = StreamState
_I = StreamInput

#: Every legal stream transition: ``(state, input) -> (side effect or None, next state)``.
STREAM_TABLE: dict[tuple[StreamState, StreamInput], tuple[SideEffect | None, StreamState]] = {
    (_S.OPEN, _I.SEND_DATA): (None, _S.OPEN),
    (_S.OPEN, _I.RECV_DATA): (None, _S.OPEN),
    (_S.OPEN, _I.SEND_FIN): (None, _S.HALF_CLOSED_LOCAL),
    (_S.OPEN, _I.RECV_FIN): (_ended, _S.HALF_CLOSED_REMOTE),
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): (None, _S.HALF_CLOSED_LOCAL),
    (_S.HALF_CLOSED_LOCAL, _I.RECV_FIN): (_ended, _S.CLOSED),
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): (None, _S.HALF_CLOSED_REMOTE),
    (_S.HALF_CLOSED_REMOTE, _I.SEND_FIN): (None, _S.CLOSED),
    (_S.OPEN, _I.SEND_RESET): (None, _S.CLOSED),
    (_S.OPEN, _I.RECV_RESET): (_reset_by_peer, _S.CLOSED),
    (_S.OPEN, _I.RECV_GOAWAY): (_refused, _S.CLOSED),
    (_S.HALF_CLOSED_LOCAL, _I.SEND_RESET): (None, _S.CLOSED),
    (_S.HALF_CLOSED_LOCAL, _I.RECV_RESET): (_reset_by_peer, _S.CLOSED),
    (_S.HALF_CLOSED_LOCAL, _I.RECV_GOAWAY): (_refused, _S.CLOSED),
    (_S.HALF_CLOSED_REMOTE, _I.SEND_RESET): (None, _S.CLOSED),
    (_S.HALF_CLOSED_REMOTE, _I.RECV_RESET): (_reset_by_peer, _S.CLOSED),
    (_S.HALF_CLOSED_REMOTE, _I.RECV_GOAWAY): (_refused, _S.CLOSED),
}

#: The same table without the side effects: ``(state, input) -> next state``.
STREAM_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    pair: next_state for pair, (_, next_state) in STREAM_TABLE.items()
}

#: Inputs that come from the peer; an absent pair with one of them is a stream error.
REMOTE_INPUTS = frozenset({_I.RECV_DATA, _I.RECV_FIN, _I.RECV_RESET, _I.RECV_GOAWAY})

#: States that take DATA sent, and DATA received, without a change: the hot paths test these
#: by identity instead of looking the pair up.
SENDING: tuple[StreamState, ...] = tuple(
    s for s in StreamState if (s, _I.SEND_DATA) in STREAM_TABLE
)
RECEIVING: tuple[StreamState, ...] = tuple(
    s for s in StreamState if (s, _I.RECV_DATA) in STREAM_TABLE
)


class Stream:
    """One stream as the session tracks it: its id, whether this side opened it, its state and
    its flow-control windows. Only :meth:`process` changes :attr:`state`."""

    __slots__ = ("id", "local", "state", "window")

    def __init__(self, stream_id: int, *, local: bool, window: Window) -> None:
        self.id = stream_id
        self.local = local
        self.window = window
        self.state = StreamState.OPEN  # a stream is open on both sides once it exists

    def process(self, event: StreamInput, code: int = 0) -> Event | None:
        """Apply ``event`` (``code``: the code of the RESET received, if that is the input) and
        return the event to tell the application, if any.

        Raises :class:`StreamClosedError` for a local input and :class:`RemoteStreamError` for
        a remote one that the current state does not take; the state is then unchanged.
        """
        try:
            effect, self.state = STREAM_TABLE[self.state, event]
        except KeyError:
            message = f"stream {self.id} is {self.state.value}: cannot {event.value}"
            if event in REMOTE_INPUTS:
                raise RemoteStreamError(self.id, message) from None
            raise StreamClosedError(self.id, message) from None
        return None if effect is None else effect(self.id, code)
