"""One error hierarchy for the protocol: local misuse vs remote violations.

Every error carries the :class:`ErrorCode` to put on the wire. Errors are sticky: once a
:class:`RemoteProtocolError` has been raised by :meth:`Session.receive_data`, the session stays in
its error state and raises the same error again on every later call.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Codes carried by RESET and GOAWAY frames (u32 on the wire)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x4
    FRAME_SIZE_ERROR = 0x5
    REFUSED_STREAM = 0x6
    CANCEL = 0x7
    VERSION_MISMATCH = 0x8
    PING_TIMEOUT = 0x9
    #: The peer makes this side queue more answers than it reads (pings, refused opens, ...).
    ENHANCE_YOUR_CALM = 0xA
    # Application codes (0x100 and up): used by the relay and the connector on stream resets.
    UNKNOWN_TARGET = 0x100
    TARGET_OFFLINE = 0x101
    FORBIDDEN = 0x102
    SHUTTING_DOWN = 0x103
    UPSTREAM_FAILED = 0x104

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode | int:
        """The enum member for a known code; unknown codes pass through as plain ints."""
        try:
            return cls(value)
        except ValueError:
            return value


class ProtocolError(Exception):
    """Base class. ``code`` is what goes on the wire for this error."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class LocalProtocolError(ProtocolError):
    """The local application asked for something the protocol forbids.

    The session state is unchanged by the refused call (except when the session was already in
    its error state, which is reported this way too).
    """


class StreamClosedError(LocalProtocolError):
    """The stream cannot take this operation any more (half-closed, reset, or unknown)."""

    def __init__(self, stream_id: int, message: str, code: ErrorCode = ErrorCode.STREAM_CLOSED):
        super().__init__(message, code)
        self.stream_id = stream_id


class FlowControlError(LocalProtocolError):
    """A send exceeded the flow-control window granted by the peer."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol. The session has queued a GOAWAY with ``code``."""


class RemoteStreamError(RemoteProtocolError):
    """The peer broke the protocol on one stream only (DATA after its FIN): a stream error.

    The session resets that stream with ``code`` and goes on; :meth:`Session.receive_data`
    never raises it. Should one escape all the same, it is still a :class:`RemoteProtocolError`
    and ends the session like one.
    """

    def __init__(self, stream_id: int, message: str, code: ErrorCode = ErrorCode.STREAM_CLOSED):
        super().__init__(message, code)
        self.stream_id = stream_id
