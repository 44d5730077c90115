"""The frame codec: the 12-byte header, frame types, flags and the small payload formats.

Everything here is a pure function of bytes. The header layout (big-endian)::

    0        1        2                 4                                8                     12
    +--------+--------+-----------------+--------------------------------+---------------------+
    |  type  | flags  | reserved (0)    | stream id (u32)                | payload length (u32)|
    +--------+--------+-----------------+--------------------------------+---------------------+
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping

from ._errors import ErrorCode, RemoteProtocolError

HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size  # 12
U32 = struct.Struct(">I")
PING_PAYLOAD_SIZE = 8
MAX_STREAM_ID = 2**31 - 1
MAX_WINDOW = 2**31 - 1
#: The largest HELLO payload accepted (a version and up to 42 settings).
MAX_HELLO_SIZE = 256
#: The largest GOAWAY reason, in bytes of UTF-8.
MAX_GOAWAY_REASON = 1024
#: PINGs a side may have sent and not seen answered: a receiver may end the session when more
#: arrive than it has answered and written (SPEC.md, "Queued answers").
MAX_UNANSWERED_PINGS = 4


class FrameType(enum.IntEnum):
    HELLO = 0x0
    OPEN = 0x1
    DATA = 0x2
    WINDOW_UPDATE = 0x3
    RESET = 0x4
    PING = 0x5
    GOAWAY = 0x6


class Flag(enum.IntFlag):
    NONE = 0x0
    FIN = 0x1  # DATA: the sender half-closes the stream after this payload
    ACK = 0x2  # PING: this is the answer (pong)


class SettingId(enum.IntEnum):
    INITIAL_WINDOW_SIZE = 0x1
    MAX_FRAME_SIZE = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    MAX_METADATA_SIZE = 0x4
    SESSION_WINDOW_SIZE = 0x5


#: Flags each frame type may carry; any other bit is a protocol error.
ALLOWED_FLAGS: dict[int, int] = {
    FrameType.HELLO: 0,
    FrameType.OPEN: 0,
    FrameType.DATA: int(Flag.FIN),
    FrameType.WINDOW_UPDATE: 0,
    FrameType.RESET: 0,
    FrameType.PING: int(Flag.ACK),
    FrameType.GOAWAY: 0,
}
#: Frame types that address the session (stream id 0) rather than one stream.
SESSION_FRAMES = frozenset({FrameType.HELLO, FrameType.PING, FrameType.GOAWAY})
#: Exact payload sizes of fixed-size frames.
FIXED_SIZES: dict[int, int] = {
    FrameType.WINDOW_UPDATE: 4,
    FrameType.RESET: 4,
    FrameType.PING: PING_PAYLOAD_SIZE,
}

_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")
_KEY_LEN = struct.Struct(">B")
_VALUE_LEN = struct.Struct(">H")


def pack_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(frame_type, flags, 0, stream_id, length)


def encode_hello(version: int, settings: Mapping[int, int]) -> bytes:
    parts = [struct.pack(">H", version)]
    parts.extend(_SETTING.pack(key, value) for key, value in sorted(settings.items()))
    return b"".join(parts)


def decode_hello(payload: bytes) -> tuple[int, dict[int, int]]:
    """Return ``(version, settings)``. Unknown setting ids are kept; callers ignore them."""
    if len(payload) < 2 or (len(payload) - 2) % _SETTING.size:
        raise RemoteProtocolError("malformed HELLO payload", ErrorCode.PROTOCOL_ERROR)
    (version,) = struct.unpack_from(">H", payload, 0)
    settings: dict[int, int] = {}
    for offset in range(2, len(payload), _SETTING.size):
        key, value = _SETTING.unpack_from(payload, offset)
        if key in settings:
            raise RemoteProtocolError(f"setting {key} repeated in HELLO")
        settings[key] = value
    return version, settings


def encode_goaway(last_stream_id: int, code: int, reason: str) -> bytes:
    raw = reason.encode("utf-8")[:MAX_GOAWAY_REASON]
    # Cutting UTF-8 may split a character: drop the partial tail so the peer can decode it.
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return _GOAWAY.pack(last_stream_id, code) + raw


def decode_goaway(payload: bytes) -> tuple[int, int, str]:
    if len(payload) < _GOAWAY.size:
        raise RemoteProtocolError("GOAWAY payload shorter than 8 bytes")
    last_stream_id, code = _GOAWAY.unpack_from(payload, 0)
    try:
        reason = payload[_GOAWAY.size :].decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("GOAWAY reason is not UTF-8") from None
    return last_stream_id, code, reason


def _valid_key(key: str) -> bool:
    return 0 < len(key) <= 64 and key.isascii() and all(c.isalnum() or c in "-_." for c in key)


def encode_metadata(metadata: Mapping[str, str]) -> bytes:
    """Encode a stream's metadata: for each entry, ``u8 key length, key, u16 value length, value``.

    Raises :class:`ValueError` for a key outside ``[A-Za-z0-9._-]{1,64}`` or a value over 65535
    bytes of UTF-8.
    """
    parts: list[bytes] = []
    for key, value in metadata.items():
        if not _valid_key(key):
            raise ValueError(f"invalid metadata key {key!r}")
        raw_key = key.encode("ascii")
        raw_value = value.encode("utf-8")
        if len(raw_value) > 0xFFFF:
            raise ValueError(f"metadata value for {key!r} longer than 65535 bytes")
        parts += (_KEY_LEN.pack(len(raw_key)), raw_key, _VALUE_LEN.pack(len(raw_value)), raw_value)
    return b"".join(parts)


def decode_metadata(payload: bytes) -> dict[str, str]:
    metadata: dict[str, str] = {}
    offset, end = 0, len(payload)
    while offset < end:
        key_len = payload[offset]
        offset += 1
        if offset + key_len + 2 > end:
            raise RemoteProtocolError("truncated metadata entry in OPEN")
        try:
            key = payload[offset : offset + key_len].decode("ascii")
        except UnicodeDecodeError:
            raise RemoteProtocolError("metadata key is not ASCII") from None
        if not _valid_key(key):
            raise RemoteProtocolError(f"invalid metadata key {key!r} in OPEN")
        if key in metadata:
            raise RemoteProtocolError(f"metadata key {key!r} repeated in OPEN")
        offset += key_len
        (value_len,) = _VALUE_LEN.unpack_from(payload, offset)
        offset += 2
        if offset + value_len > end:
            raise RemoteProtocolError("truncated metadata value in OPEN")
        try:
            metadata[key] = payload[offset : offset + value_len].decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"metadata value for {key!r} is not UTF-8") from None
        offset += value_len
    return metadata
