"""The transition tables (``protocol/_stream_states.py``, ``protocol/_session_states.py``).

Three things are checked: every pair absent from a table is refused with the right error and
changes nothing; the session does to a stream, for every state and every input, what the table
says; and the session only ever feeds the tables pairs they hold, apart from the two documented
violations (DATA after the peer's FIN, a second HELLO).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    SESSION_TRANSITIONS,
    STREAM_TABLE,
    STREAM_TRANSITIONS,
    DataReceived,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Role,
    Session,
    SessionInput,
    SessionState,
    StreamClosedError,
    StreamEnded,
    StreamInput,
    StreamReset,
    StreamState,
)
from protocol._errors import RemoteStreamError
from protocol._session_states import (
    GOAWAY_TRANSITIONS,
    GoAwayInput,
    GoAwayState,
    next_session_state,
)
from protocol._stream_states import RECEIVING, REMOTE_INPUTS, SENDING, Stream
from protocol._windows import Window

from .test_session import (
    DATA,
    FIN,
    GOAWAY,
    HELLO,
    OPEN,
    PING,
    RESET,
    frame,
    parse_frames,
    raw_peer,
    u32,
)

_BASE = settings.get_profile("protocol-selected")
SPEC = Path(__file__).resolve().parents[2] / "protocol" / "SPEC.md"
ALL_STREAM_PAIRS = list(itertools.product(StreamState, StreamInput))
ALL_SESSION_PAIRS = list(itertools.product(SessionState, SessionInput))


def a_stream(state: StreamState) -> Stream:
    """A stream record put in ``state`` the only way there is: through its table."""
    stream = Stream(5, local=True, window=Window(5, send=10, receive=10, step=5))
    path = {
        StreamState.OPEN: [],
        StreamState.HALF_CLOSED_LOCAL: [StreamInput.SEND_FIN],
        StreamState.HALF_CLOSED_REMOTE: [StreamInput.RECV_FIN],
        StreamState.CLOSED: [StreamInput.SEND_RESET],
    }[state]
    for step in path:
        stream.process(step)
    assert stream.state is state
    return stream


# ---------------------------------------------------------------- the stream table alone


def test_the_side_effect_free_table_is_the_public_one() -> None:
    assert {pair: nxt for pair, (_, nxt) in STREAM_TABLE.items()} == STREAM_TRANSITIONS


def test_data_without_fin_never_changes_a_state_so_the_hot_paths_may_skip_the_table() -> None:
    for states, event in ((SENDING, StreamInput.SEND_DATA), (RECEIVING, StreamInput.RECV_DATA)):
        holding = {s for s in StreamState if (s, event) in STREAM_TABLE}
        assert set(states) == holding
        for state in states:
            assert STREAM_TABLE[state, event] == (None, state)
    assert SENDING == (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
    assert RECEIVING == (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)


@pytest.mark.parametrize(
    ("state", "event"),
    [pair for pair in ALL_STREAM_PAIRS if pair not in STREAM_TABLE],
    ids=lambda value: value.name,
)
def test_every_pair_absent_from_the_stream_table_is_refused(
    state: StreamState, event: StreamInput
) -> None:
    stream = a_stream(state)
    expected = RemoteStreamError if event in REMOTE_INPUTS else StreamClosedError
    with pytest.raises(expected) as info:
        stream.process(event, ErrorCode.CANCEL)
    assert type(info.value) is expected
    assert info.value.stream_id == 5
    assert info.value.code == ErrorCode.STREAM_CLOSED
    assert stream.state is state
    # A refused remote input is a stream error, which a session that let it escape would
    # still treat as the peer's violation; a refused local one is the application's.
    assert isinstance(info.value, RemoteProtocolError) == (event in REMOTE_INPUTS)


@pytest.mark.parametrize(("state", "event"), list(STREAM_TABLE), ids=lambda value: value.name)
def test_every_pair_in_the_stream_table_moves_and_reports_as_listed(
    state: StreamState, event: StreamInput
) -> None:
    stream = a_stream(state)
    reported = stream.process(event, 0xBEEF)
    assert stream.state is STREAM_TRANSITIONS[state, event]
    expected = {
        StreamInput.RECV_FIN: StreamEnded(stream_id=5),
        StreamInput.RECV_RESET: StreamReset(stream_id=5, code=0xBEEF, remote=True),
        StreamInput.RECV_GOAWAY: StreamReset(
            stream_id=5, code=ErrorCode.REFUSED_STREAM, remote=False
        ),
    }
    assert reported == expected.get(event)


def test_nothing_leaves_closed_and_every_live_state_can_end() -> None:
    assert not [pair for pair in STREAM_TABLE if pair[0] is StreamState.CLOSED]
    for state in set(StreamState) - {StreamState.CLOSED}:
        for event in (StreamInput.SEND_RESET, StreamInput.RECV_RESET, StreamInput.RECV_GOAWAY):
            assert STREAM_TRANSITIONS[state, event] is StreamState.CLOSED


def spec_stream_table() -> dict[tuple[StreamState, StreamInput], str]:
    """The cells of the table in SPEC.md, "Stream states", by (state, input)."""
    text = SPEC.read_text()
    start = text.index("## Stream states")
    section = text[start : text.index("\n## ", start)]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    inputs = {event.value: event for event in StreamInput}
    states = {state.value: state for state in StreamState}
    cells = {}
    for row in rows[2:]:
        values = [cell.strip() for cell in row.strip("|").split("|")]
        for name, value in zip(header[1:], values[1:], strict=True):
            cells[states[values[0]], inputs[name.lower()]] = value
    return cells


def test_the_spec_lists_the_stream_table() -> None:
    cells = spec_stream_table()
    assert set(cells) == set(ALL_STREAM_PAIRS)
    for pair, cell in cells.items():
        if pair in STREAM_TRANSITIONS:
            assert cell == STREAM_TRANSITIONS[pair].value, pair
        elif pair[0] is StreamState.CLOSED:
            assert cell in ("ignored", "nothing sent", "not allowed"), pair
        else:
            assert cell == ("stream error" if pair[1] in REMOTE_INPUTS else "not allowed"), pair


# ---------------------------------------------------------------- the session against the table


def session_with_stream(state: StreamState, local: bool) -> tuple[Session, int]:
    """A session (connector) with a raw peer, and one stream in ``state``, its output drained.
    A closed stream is still tracked: it holds a byte the application has not read."""
    session = raw_peer(Role.CONNECTOR)
    if local:
        sid = session.open_stream()
    else:
        sid = 2
        session.receive_data(frame(OPEN, 0, sid))
        session.accept_stream(sid)
    if state is StreamState.HALF_CLOSED_LOCAL:
        session.end_stream(sid)
    elif state is StreamState.HALF_CLOSED_REMOTE:
        session.receive_data(frame(DATA, FIN, sid))
    elif state is StreamState.CLOSED:
        session.receive_data(frame(DATA, 0, sid, b"x"))
        session.end_stream(sid)
        session.receive_data(frame(DATA, FIN, sid))
    assert session.stream_state(sid) is state
    session.data_to_send()
    return session, sid


def apply(session: Session, sid: int, event: StreamInput) -> list[object]:
    """Feed ``event`` to the stream the way the session gets it: a call, or a frame."""
    actions: dict[StreamInput, Callable[[], object]] = {
        StreamInput.SEND_DATA: lambda: session.send_data(sid, b"y"),
        StreamInput.SEND_FIN: lambda: session.end_stream(sid),
        StreamInput.SEND_RESET: lambda: session.reset_stream(sid),
        StreamInput.RECV_DATA: lambda: session.receive_data(frame(DATA, 0, sid, b"z")),
        StreamInput.RECV_FIN: lambda: session.receive_data(frame(DATA, FIN, sid)),
        StreamInput.RECV_RESET: lambda: session.receive_data(frame(RESET, 0, sid, u32(7))),
        # A last stream id of 0 refuses every stream this side opened.
        StreamInput.RECV_GOAWAY: lambda: session.receive_data(frame(GOAWAY, 0, 0, bytes(8))),
    }
    result = actions[event]()
    return list(result) if isinstance(result, list) else []


@pytest.mark.parametrize(
    ("state", "event", "local"),
    [
        (state, event, local)
        for (state, event), local in itertools.product(ALL_STREAM_PAIRS, (True, False))
        # A GOAWAY refuses only streams the receiving side opened.
        if local or event is not StreamInput.RECV_GOAWAY
    ],
    ids=lambda value: value.name if isinstance(value, enum.Enum) else ("here", "peer")[not value],
)
def test_the_session_does_what_the_table_says(
    state: StreamState, event: StreamInput, local: bool
) -> None:
    session, sid = session_with_stream(state, local)
    if (state, event) in STREAM_TABLE:
        events = apply(session, sid, event)
        assert session.stream_state(sid) is STREAM_TRANSITIONS[state, event]
        effect, _ = STREAM_TABLE[state, event]
        stream_events = [e for e in events if getattr(e, "stream_id", None) == sid]
        if effect is None:
            assert not [e for e in stream_events if not isinstance(e, DataReceived)]
        else:
            assert stream_events[-1] == effect(sid, 7)
    elif event not in REMOTE_INPUTS:
        if state is StreamState.CLOSED and event is StreamInput.SEND_RESET:
            apply(session, sid, event)  # resetting a closed stream is a no-op
        else:
            with pytest.raises(StreamClosedError):
                apply(session, sid, event)
        assert session.stream_state(sid) is state
        assert session.data_to_send() == b""
    elif state is StreamState.CLOSED:
        # The peer sent before it learnt of the close: ignored, the session goes on.
        events = apply(session, sid, event)
        assert [e for e in events if getattr(e, "stream_id", None) == sid] == []
        assert session.state is SessionState.OPEN
    else:
        # The table's refusal is a stream error: the stream is reset, the session goes on.
        events = apply(session, sid, event)
        assert events == [StreamReset(stream_id=sid, code=ErrorCode.STREAM_CLOSED, remote=False)]
        assert session.stream_state(sid) is StreamState.CLOSED
        assert (RESET, 0, sid, u32(ErrorCode.STREAM_CLOSED)) in parse_frames(session.data_to_send())
        assert session.state is SessionState.OPEN


# ---------------------------------------------------------------- the session tables


@pytest.mark.parametrize(
    ("state", "event"),
    [pair for pair in ALL_SESSION_PAIRS if pair not in SESSION_TRANSITIONS],
    ids=lambda value: value.name,
)
def test_every_pair_absent_from_the_session_table_is_refused(
    state: SessionState, event: SessionInput
) -> None:
    expected = RemoteProtocolError if event is SessionInput.RECV_HELLO else LocalProtocolError
    with pytest.raises(expected) as info:
        next_session_state(state, event)
    assert type(info.value) is expected


def test_the_error_state_is_sticky_and_the_end_of_file_final() -> None:
    for event in SessionInput:
        assert (SessionState.ERROR, event) not in SESSION_TRANSITIONS
        assert (SessionState.CLOSED, event) not in SESSION_TRANSITIONS
    assert SESSION_TRANSITIONS[SessionState.HANDSHAKE, SessionInput.RECV_HELLO] is (
        SessionState.OPEN
    )


def trail(*feeds: bytes) -> list[SessionState]:
    """The states a fresh relay session goes through as it is fed ``feeds`` one by one."""
    session = Session(Role.RELAY)
    states = [session.state]
    for data in feeds:
        with contextlib.suppress(RemoteProtocolError):
            session.receive_data(data)
        states.append(session.state)
    return states


def test_the_session_takes_every_entry_of_its_table() -> None:
    hello = frame(HELLO, payload=b"\x00\x01")
    handshake, open_, closed, error = (
        SessionState.HANDSHAKE,
        SessionState.OPEN,
        SessionState.CLOSED,
        SessionState.ERROR,
    )
    assert trail(hello, b"") == [handshake, open_, closed]
    assert trail(b"") == [handshake, closed]
    assert trail(frame(DATA, 0, 1, b"x")) == [handshake, error]  # not a HELLO first
    assert trail(hello, frame(PING, 0, 1, bytes(8))) == [handshake, open_, error]
    # Absent from the table: a second HELLO is the peer's violation, and the session fails.
    assert trail(hello, hello) == [handshake, open_, error]
    with pytest.raises(RemoteProtocolError, match="HELLO received twice"):
        raw_peer().receive_data(hello)


def test_the_go_away_table_is_total_and_only_ever_adds_a_direction() -> None:
    assert set(GOAWAY_TRANSITIONS) == set(itertools.product(GoAwayState, GoAwayInput))
    sent = {GoAwayState.SENT, GoAwayState.BOTH}
    received = {GoAwayState.RECEIVED, GoAwayState.BOTH}
    for (state, event), nxt in GOAWAY_TRANSITIONS.items():
        assert (nxt in sent) == (state in sent or event is GoAwayInput.SEND)
        assert (nxt in received) == (state in received or event is GoAwayInput.RECV)


# ---------------------------------------------------------------- what the session feeds them


@attrs.define
class Fed:
    """The pairs the session fed each table, in order."""

    stream: list[tuple[StreamState, StreamInput]] = attrs.Factory(list)
    session: list[tuple[SessionState, SessionInput]] = attrs.Factory(list)
    goaway: list[tuple[GoAwayState, GoAwayInput]] = attrs.Factory(list)


@contextmanager
def spying() -> Iterator[Fed]:
    """Record every pair the session feeds the stream, session and go-away tables, by wrapping
    the drivers that look them up."""
    fed = Fed()
    process = Stream.process
    advance = Session._advance
    advance_goaway = Session._advance_goaway

    def spy_process(self: Stream, event: StreamInput, code: int = 0) -> object:
        fed.stream.append((self.state, event))
        return process(self, event, code)

    def spy_goaway(self: Session, event: GoAwayInput) -> None:
        fed.goaway.append((self._goaway, event))
        advance_goaway(self, event)

    def spy_advance(self: Session, event: SessionInput) -> None:
        fed.session.append((self.state, event))
        advance(self, event)

    Stream.process = spy_process  # type: ignore[method-assign,assignment]
    Session._advance = spy_advance  # type: ignore[method-assign]
    Session._advance_goaway = spy_goaway  # type: ignore[method-assign]
    try:
        yield fed
    finally:
        Stream.process = process  # type: ignore[method-assign]
        Session._advance = advance  # type: ignore[method-assign]
        Session._advance_goaway = advance_goaway  # type: ignore[method-assign]


#: What a scenario step does; the ones that end the session (a second HELLO, the end of the
#: transport) are rarer, so that scenarios get deep enough to reach every stream state.
_KINDS = [
    "open",
    "send",
    "send-fin",
    "end",
    "reset",
    "ack",
    "go-away",
    "peer-open",
    "peer-data",
    "peer-fin",
    "peer-reset",
    "peer-goaway",
    "drain",
]
_STEP = st.tuples(st.sampled_from(_KINDS * 5 + ["peer-hello", "eof"]), st.integers(0, 7))


def take_step(session: Session, kind: str, pick: int, known: list[int]) -> None:
    """One call of the application, or one frame of the peer, on one of the ``known`` streams
    (``pick`` chooses; it is also a byte count). Streams opened are added to ``known``."""
    sid = known[pick % len(known)] if known else 1
    if kind == "open":
        known.append(session.open_stream())
    elif kind == "peer-open":
        peer_id = 2 + 2 * sum(1 for s in known if s % 2 == 0)
        known.append(peer_id)
        session.receive_data(frame(OPEN, 0, peer_id))
    elif kind in ("send", "send-fin"):
        session.send_data(sid, b"abc", end_stream=kind == "send-fin")
    elif kind == "end":
        session.end_stream(sid)
    elif kind == "reset":
        session.reset_stream(sid)
    elif kind == "ack":
        session.acknowledge_received_data(sid, pick)
    elif kind == "go-away":
        session.go_away()
    elif kind == "drain":
        session.data_to_send()
    elif kind == "eof":
        session.receive_data(b"")
    else:
        session.receive_data(
            {
                "peer-data": lambda: frame(DATA, 0, sid, b"d" * pick),
                "peer-fin": lambda: frame(DATA, FIN, sid, b"d"),
                "peer-reset": lambda: frame(RESET, 0, sid, u32(8)),
                "peer-goaway": lambda: frame(GOAWAY, 0, 0, u32(pick) + u32(0)),
                "peer-hello": lambda: frame(HELLO, payload=b"\x00\x01"),
            }[kind]()
        )


@settings(_BASE, max_examples=_BASE.max_examples // 2)
@given(steps=st.lists(_STEP, max_size=40))
def test_the_tables_are_total_over_what_the_session_feeds_them(
    steps: list[tuple[str, int]],
) -> None:
    session = raw_peer(Role.CONNECTOR)
    with spying() as fed:
        # One stream opened by each side to begin with: frames on streams that were never
        # opened end the session at once, which would keep most scenarios shallow.
        known: list[int] = []
        take_step(session, "open", 0, known)
        take_step(session, "peer-open", 0, known)
        for kind, pick in steps:
            with contextlib.suppress(ProtocolError):
                # Misuse refused, or the peer's violation: either is fine here.
                take_step(session, kind, pick, known)
            if session.state in (SessionState.ERROR, SessionState.CLOSED):
                break
    # Local inputs are only fed where the table takes them: the calls check first, so a
    # refused call changes nothing. Of the peer's inputs, only DATA after its FIN is absent:
    # the stream error.
    stray = {pair for pair in fed.stream if pair not in STREAM_TABLE}
    assert stray <= {(StreamState.HALF_CLOSED_REMOTE, StreamInput.RECV_DATA)}
    # The session's life: only a second HELLO is absent (a session error).
    stray_session = {pair for pair in fed.session if pair not in SESSION_TRANSITIONS}
    assert stray_session <= {(SessionState.OPEN, SessionInput.RECV_HELLO)}
    assert all(pair in GOAWAY_TRANSITIONS for pair in fed.goaway)
