"""The frame reader: the peer's byte stream cut into frames, each header checked on arrival.

Bytes arrive in pieces cut anywhere (SPEC.md, "Transport"). The reader keeps the frame a piece
ends in until the next piece completes it, and parses everything else where it lies. Every
header is checked as soon as its 12 bytes are in, before any of its payload is buffered or
waited for: the rules that need nothing but the header and the local limits are checked here
(:func:`check_header`), the flow-control windows of a DATA header by the session's
``data_header`` hook. Whole frames go to the session's handlers; what a frame means is the
session's business.

The reader also owns the first rule of the handshake: the first frame must be a HELLO.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from ._errors import ErrorCode, RemoteProtocolError
from ._events import Event
from ._frames import (
    ALLOWED_FLAGS,
    FIXED_SIZES,
    HEADER,
    HEADER_SIZE,
    MAX_GOAWAY_REASON,
    MAX_HELLO_SIZE,
    MAX_STREAM_ID,
    SESSION_FRAMES,
    U32,
    Flag,
    FrameType,
)
from ._settings import SessionConfig

_DATA = int(FrameType.DATA)
_FIN = int(Flag.FIN)
_UNPACK_HEADER = HEADER.unpack_from

#: What the session's ``data_header`` hook returns for a DATA header it accepts (its stream),
#: handed back with the payload to ``on_data``.
Target = TypeVar("Target")


def check_header(
    frame_type: int,
    flags: int,
    reserved: int,
    stream_id: int,
    length: int,
    *,
    first: bool,
    max_metadata_size: int,
) -> None:
    """Check a header for what it alone can break (a DATA header that passed the fast checks of
    :meth:`FrameReader.feed` does not come here). ``first``: no frame has been read before it.
    Raises :class:`RemoteProtocolError`."""
    if frame_type not in ALLOWED_FLAGS:
        raise RemoteProtocolError(f"unknown frame type {frame_type:#x}")
    if flags & ~ALLOWED_FLAGS[frame_type]:
        raise RemoteProtocolError(f"flags {flags:#x} not allowed on {FrameType(frame_type).name}")
    if reserved:
        raise RemoteProtocolError("reserved header bits are set")
    if stream_id > MAX_STREAM_ID:
        raise RemoteProtocolError(f"stream id {stream_id} is above 2**31 - 1")
    if first and frame_type != FrameType.HELLO:
        raise RemoteProtocolError(f"expected HELLO first, got {FrameType(frame_type).name}")
    if frame_type in SESSION_FRAMES:
        if stream_id != 0:
            raise RemoteProtocolError(f"{FrameType(frame_type).name} on stream {stream_id}")
    elif stream_id == 0 and frame_type != FrameType.WINDOW_UPDATE:
        raise RemoteProtocolError(f"{FrameType(frame_type).name} on stream 0")
    fixed = FIXED_SIZES.get(frame_type)
    if fixed is not None and length != fixed:
        raise RemoteProtocolError(
            f"{FrameType(frame_type).name} payload must be {fixed} bytes, not {length}",
            ErrorCode.FRAME_SIZE_ERROR,
        )
    if frame_type == FrameType.HELLO and length > MAX_HELLO_SIZE:
        raise RemoteProtocolError("HELLO payload too large", ErrorCode.FRAME_SIZE_ERROR)
    if frame_type == FrameType.OPEN and length > max_metadata_size:
        raise RemoteProtocolError(
            f"OPEN metadata of {length} bytes exceeds the maximum of {max_metadata_size}",
            ErrorCode.FRAME_SIZE_ERROR,
        )
    if frame_type == FrameType.GOAWAY and length > 8 + MAX_GOAWAY_REASON:
        raise RemoteProtocolError("GOAWAY payload too large", ErrorCode.FRAME_SIZE_ERROR)


class FrameReader(Generic[Target]):
    """Feeds whole frames from the peer's byte stream to the session's handlers.

    - ``data_header(stream_id, length)`` checks a DATA header against the session's state
      (the stream exists or has existed, the windows have room) and returns its target; it may
      be called again for the same header when its payload comes in a later piece.
    - ``on_data(target, stream_id, flags, payload, events)`` takes a whole DATA frame.
    - ``on_frame(frame_type, flags, stream_id, payload, events)`` takes any other whole frame.

    Whatever a check or a handler raises propagates out of :meth:`feed`.
    """

    __slots__ = ("_buffer", "_data_header", "_first", "_limits", "_on_data", "_on_frame")

    def __init__(
        self,
        config: SessionConfig,
        *,
        data_header: Callable[[int, int], Target],
        on_data: Callable[[Target, int, int, bytes, list[Event]], None],
        on_frame: Callable[[int, int, int, bytes, list[Event]], None],
    ) -> None:
        self._buffer = bytearray()  # the start of a frame the last piece ended in
        self._first = True  # no frame read yet: the next must be a HELLO
        self._limits = config
        self._data_header = data_header
        self._on_data = on_data
        self._on_frame = on_frame

    @property
    def mid_frame(self) -> bool:
        """Whether the bytes so far end in the middle of a frame."""
        return bool(self._buffer)

    def feed(self, data: bytes, events: list[Event]) -> None:
        """Read the frames ``data`` (non-empty) completes, appending their events."""
        if type(data) is not bytes:
            data = bytes(data)
        offset = 0
        buffer = self._buffer
        # A frame cut by the previous piece: complete it from the head of ``data``, taking its
        # header first (so it is checked before any payload is taken), then its payload.
        while buffer and offset < len(data):
            have = len(buffer)
            if have < HEADER_SIZE:
                need = HEADER_SIZE - have
            else:
                need = HEADER_SIZE + U32.unpack_from(buffer, 8)[0] - have  # the length field
            buffer += data[offset : offset + need]
            offset += need
            del buffer[: self._parse(buffer, 0, events)]
        if offset < len(data):
            # The rest is parsed where it lies; only a trailing partial frame is copied.
            end = self._parse(data, offset, events)
            buffer += data[end:]

    def _parse(self, buf: bytes | bytearray, offset: int, events: list[Event]) -> int:
        """Handle the whole frames in ``buf`` from ``offset``; return where the first incomplete
        frame starts. Every header is checked as soon as it is complete, payload or not."""
        end = len(buf)
        limits = self._limits
        while end - offset >= HEADER_SIZE:
            frame_type, flags, reserved, stream_id, length = _UNPACK_HEADER(buf, offset)
            if frame_type == _DATA and not reserved and flags <= _FIN:
                # Hot path: validate against the limits before any payload is buffered.
                if length > limits.max_frame_size:
                    raise RemoteProtocolError(
                        f"DATA frame of {length} bytes exceeds the maximum of "
                        f"{limits.max_frame_size}",
                        ErrorCode.FRAME_SIZE_ERROR,
                    )
                if self._first:
                    raise RemoteProtocolError("expected HELLO first, got DATA")
                target = self._data_header(stream_id, length)
                if end - offset - HEADER_SIZE < length:
                    break
                start = offset + HEADER_SIZE
                offset = start + length
                payload = buf[start:offset]
                if type(payload) is not bytes:
                    payload = bytes(payload)
                self._on_data(target, stream_id, flags, payload, events)
                continue
            check_header(
                frame_type,
                flags,
                reserved,
                stream_id,
                length,
                first=self._first,
                max_metadata_size=limits.max_metadata_size,
            )
            if end - offset - HEADER_SIZE < length:
                break
            start = offset + HEADER_SIZE
            offset = start + length
            self._first = False
            self._on_frame(frame_type, flags, stream_id, bytes(buf[start:offset]), events)
        return offset
