"""Session states: the session's life and its go-away, each a table of transitions.

Two independent tables, because the two move independently:

- :data:`SESSION_TRANSITIONS`, the life of the session: the handshake, open, the transport's
  end, the error state (sticky: nothing leaves it).
- :data:`GOAWAY_TRANSITIONS`, who has said go-away. A GOAWAY may be sent during the handshake
  or after the transport ended, and streams keep running while the session drains, so going
  away is not a step of the session's life but a second state beside it.

A pair absent from a table is a violation: :func:`next_session_state` raises
:class:`RemoteProtocolError` for the peer's input (a second HELLO) and
:class:`LocalProtocolError` otherwise. Only the session's drivers assign these states.
"""

from __future__ import annotations

import enum

from ._errors import LocalProtocolError, RemoteProtocolError


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"  # our HELLO is queued; the peer's has not arrived
    OPEN = "open"
    CLOSED = "closed"  # the transport ended (receive_data(b""))
    ERROR = "error"  # a protocol error happened; sticky


class SessionInput(enum.Enum):
    RECV_HELLO = "receive HELLO"
    RECV_EOF = "receive end of file"
    #: The peer broke the protocol; the GOAWAY that says so is queued.
    FAIL = "fail"


_S = SessionState
_I = SessionInput

#: Every legal change of :class:`SessionState`.
SESSION_TRANSITIONS: dict[tuple[SessionState, SessionInput], SessionState] = {
    (_S.HANDSHAKE, _I.RECV_HELLO): _S.OPEN,
    (_S.HANDSHAKE, _I.RECV_EOF): _S.CLOSED,
    (_S.HANDSHAKE, _I.FAIL): _S.ERROR,
    (_S.OPEN, _I.RECV_EOF): _S.CLOSED,
    (_S.OPEN, _I.FAIL): _S.ERROR,
}


def next_session_state(state: SessionState, event: SessionInput) -> SessionState:
    """The state after ``event``. Raises :class:`RemoteProtocolError` for a HELLO the state
    does not take (every state but the handshake has seen one), :class:`LocalProtocolError`
    for any other absent pair."""
    try:
        return SESSION_TRANSITIONS[state, event]
    except KeyError:
        if event is SessionInput.RECV_HELLO:
            raise RemoteProtocolError("HELLO received twice") from None
        raise LocalProtocolError(f"the session is {state.value}: cannot {event.value}") from None


class GoAwayState(enum.Enum):
    NONE = "none"
    SENT = "sent"  # we went away: OPENs above our last stream id are refused
    RECEIVED = "received"  # the peer went away: it serves none of our streams above its id
    BOTH = "both"


class GoAwayInput(enum.Enum):
    SEND = "send GOAWAY"  # may repeat, to change the code
    RECV = "receive GOAWAY"  # may repeat; the lowest last stream id holds


_G = GoAwayState
_GI = GoAwayInput

#: Every change of :class:`GoAwayState`. Total: a GOAWAY may always be sent or received again.
GOAWAY_TRANSITIONS: dict[tuple[GoAwayState, GoAwayInput], GoAwayState] = {
    (_G.NONE, _GI.SEND): _G.SENT,
    (_G.NONE, _GI.RECV): _G.RECEIVED,
    (_G.SENT, _GI.SEND): _G.SENT,
    (_G.SENT, _GI.RECV): _G.BOTH,
    (_G.RECEIVED, _GI.SEND): _G.BOTH,
    (_G.RECEIVED, _GI.RECV): _G.RECEIVED,
    (_G.BOTH, _GI.SEND): _G.BOTH,
    (_G.BOTH, _GI.RECV): _G.BOTH,
}

#: The go-away states in which this side has sent, and has received, a GOAWAY.
GOAWAY_SENT = (_G.SENT, _G.BOTH)
GOAWAY_RECEIVED = (_G.RECEIVED, _G.BOTH)
