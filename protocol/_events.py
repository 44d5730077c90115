"""Events returned by :meth:`Session.receive_data`: small, frozen, keyword-only."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ._errors import ErrorCode


@attrs.frozen(slots=True, kw_only=True)
class Event:
    """Base class of every event."""


@attrs.frozen(slots=True, kw_only=True)
class HandshakeCompleted(Event):
    """The peer's HELLO arrived: streams may now be opened and data sent."""

    version: int
    settings: Mapping[int, int]


@attrs.frozen(slots=True, kw_only=True)
class StreamOpened(Event):
    """The peer opened a stream. Call :meth:`Session.accept_stream` once the application has it."""

    stream_id: int
    metadata: Mapping[str, str]


@attrs.frozen(slots=True, kw_only=True)
class DataReceived(Event):
    """Stream data. Pass ``len(data)`` to :meth:`Session.acknowledge_received_data` once used."""

    stream_id: int
    data: bytes


@attrs.frozen(slots=True, kw_only=True)
class StreamEnded(Event):
    """The peer half-closed the stream: no more data will arrive on it."""

    stream_id: int


@attrs.frozen(slots=True, kw_only=True)
class StreamReset(Event):
    """The stream was aborted.

    ``remote`` is true when the peer sent the RESET, false when the session reset the stream
    itself (refused by a GOAWAY, refused because of a limit, data after a local close).
    """

    stream_id: int
    code: ErrorCode | int
    remote: bool


@attrs.frozen(slots=True, kw_only=True)
class WindowUpdated(Event):
    """The peer granted send credit. ``stream_id`` 0 means the session-level budget."""

    stream_id: int
    increment: int


@attrs.frozen(slots=True, kw_only=True)
class PingReceived(Event):
    """The peer pinged; the session has already queued the matching pong."""

    payload: bytes


@attrs.frozen(slots=True, kw_only=True)
class PongReceived(Event):
    """The answer to one of our pings."""

    payload: bytes


@attrs.frozen(slots=True, kw_only=True)
class GoAwayReceived(Event):
    """The peer is going away: it will process no stream of ours above ``last_stream_id``.

    Our streams above ``last_stream_id`` have been reset (each reported by its own
    :class:`StreamReset` with ``REFUSED_STREAM``); streams at or below it run to completion.
    """

    last_stream_id: int
    code: ErrorCode | int
    reason: str
