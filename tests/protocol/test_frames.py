"""The wire format: the codec, every header rule, and the worked example in ``protocol/SPEC.md``.

Frames are built here with :mod:`struct` straight from the spec, not with the package's own
encoder, so a change to the encoder that breaks the wire format fails these tests.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from protocol import (
    HEADER_SIZE,
    PING_PAYLOAD_SIZE,
    PROTOCOL_VERSION,
    CloseCode,
    DataReceived,
    ErrorCode,
    Event,
    Flag,
    FrameType,
    GoAwayReceived,
    HandshakeCompleted,
    PingReceived,
    PongReceived,
    RemoteProtocolError,
    Role,
    Session,
    SessionConfig,
    SessionState,
    SettingId,
    StreamEnded,
    StreamOpened,
    decode_metadata,
    encode_metadata,
)
from protocol._frames import (
    MAX_GOAWAY_REASON,
    MAX_HELLO_SIZE,
    decode_goaway,
    decode_hello,
    encode_goaway,
    encode_hello,
    pack_header,
)

SPEC = Path(__file__).resolve().parents[2] / "protocol" / "SPEC.md"

HELLO, OPEN, DATA, WINDOW_UPDATE, RESET, PING, GOAWAY = range(7)
FIN, ACK = 0x1, 0x2


def frame(
    frame_type: int,
    flags: int = 0,
    stream_id: int = 0,
    payload: bytes = b"",
    *,
    length: int | None = None,
    reserved: int = 0,
) -> bytes:
    """A frame as SPEC.md lays it out; ``length`` overrides the payload's length in the header."""
    size = len(payload) if length is None else length
    return struct.pack(">BBHII", frame_type, flags, reserved, stream_id, size) + payload


def hello(version: int = 1, **settings: int) -> bytes:
    payload = struct.pack(">H", version)
    for name, value in settings.items():
        payload += struct.pack(">HI", SettingId[name], value)
    return frame(HELLO, payload=payload)


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split bytes into ``(type, flags, stream_id, payload)``; the bytes must be whole frames."""
    frames = []
    offset = 0
    while offset < len(data):
        frame_type, flags, reserved, stream_id, length = struct.unpack_from(">BBHII", data, offset)
        assert reserved == 0
        payload = data[offset + 12 : offset + 12 + length]
        assert len(payload) == length, "truncated frame in output"
        frames.append((frame_type, flags, stream_id, payload))
        offset += 12 + length
    return frames


def opened(role: Role = Role.CONNECTOR, config: SessionConfig | None = None) -> Session:
    """A session whose handshake completed against a raw peer announcing no settings."""
    session = Session(role, config)
    session.data_to_send()
    events = session.receive_data(hello())
    assert [type(e) for e in events] == [HandshakeCompleted]
    return session


def expect_error(session: Session, data: bytes, code: ErrorCode) -> RemoteProtocolError:
    """Feed ``data``: it must fail with ``code``, leave the session in ERROR and queue a GOAWAY
    carrying ``code`` as the last frame."""
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_data(data)
    assert info.value.code == code, info.value.message
    assert session.state is SessionState.ERROR
    frames = parse_frames(session.data_to_send())
    assert frames, "no GOAWAY queued"
    frame_type, flags, stream_id, payload = frames[-1]
    assert (frame_type, flags, stream_id) == (GOAWAY, 0, 0)
    _, wire_code = struct.unpack_from(">II", payload)
    assert wire_code == code
    assert payload[8:].decode() == info.value.message
    return info.value


# ---------------------------------------------------------------- constants pinned to the spec


def test_wire_constants_match_the_spec() -> None:
    assert HEADER_SIZE == 12
    assert PING_PAYLOAD_SIZE == 8
    assert PROTOCOL_VERSION == 1
    assert {t.name: t.value for t in FrameType} == {
        "HELLO": 0,
        "OPEN": 1,
        "DATA": 2,
        "WINDOW_UPDATE": 3,
        "RESET": 4,
        "PING": 5,
        "GOAWAY": 6,
    }
    assert (Flag.FIN, Flag.ACK) == (1, 2)
    assert {s.name: s.value for s in SettingId} == {
        "INITIAL_WINDOW_SIZE": 1,
        "MAX_FRAME_SIZE": 2,
        "MAX_CONCURRENT_STREAMS": 3,
        "MAX_METADATA_SIZE": 4,
        "SESSION_WINDOW_SIZE": 5,
    }
    assert {c.name: c.value for c in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "TRY_AGAIN_LATER": 1013,
        "PROTOCOL_ERROR": 4400,
        "INVALID_KEY": 4401,
        "KEY_REVOKED": 4403,
        "REPLACED": 4409,
        "TOO_MANY_LINKS": 4429,
        "INCOMPATIBLE_VERSION": 4426,
        "SHUTTING_DOWN": 4503,
    }


def test_error_codes_match_the_spec_table() -> None:
    table = _spec_table("Error codes")
    assert {name: int(value, 16) for value, name in table} == {c.name: c.value for c in ErrorCode}


def test_close_codes_match_the_spec_table() -> None:
    table = _spec_table("WebSocket close codes")
    assert {name: int(value) for value, name in table} == {c.name: c.value for c in CloseCode}


def _spec_table(heading: str) -> list[tuple[str, str]]:
    """The first two cells (value, `NAME`) of each row of the table under ``heading``."""
    text = SPEC.read_text()
    start = text.index(f"## {heading}")
    section = text[start : text.find("\n## ", start + 3)]
    return re.findall(r"^\| `?(0x[0-9A-Fa-f]+|\d+)`? \| `([A-Z_]+)` \|", section, re.MULTILINE)


def test_header_layout() -> None:
    assert pack_header(FrameType.DATA, Flag.FIN, 0x01020304, 0x0A0B0C0D) == bytes.fromhex(
        "02 01 0000 01020304 0a0b0c0d"
    )


def test_error_code_from_wire_keeps_unknown_codes() -> None:
    assert ErrorCode.from_wire(0x7) is ErrorCode.CANCEL
    assert ErrorCode.from_wire(0xDEAD) == 0xDEAD


def test_session_config_rejects_out_of_range_settings() -> None:
    for bad in (
        {"initial_window_size": 0},
        {"initial_window_size": 2**31},
        {"session_window_size": 0},
        {"max_frame_size": 1023},
        {"max_frame_size": 16 * 1024 * 1024 + 1},
        {"max_concurrent_streams": -1},
        {"max_metadata_size": 2**32},
        {"max_accept_backlog": -1},
    ):
        with pytest.raises(ValueError):
            SessionConfig(**bad)


# ---------------------------------------------------------------- payload codecs


def test_metadata_encoding_is_exact() -> None:
    encoded = encode_metadata({"kind": "http", "from": "brówser"})
    assert encoded == (b"\x04kind\x00\x04http" + b"\x04from\x00\x08" + "brówser".encode())
    assert decode_metadata(encoded) == {"kind": "http", "from": "brówser"}
    assert encode_metadata({}) == b""
    assert decode_metadata(b"") == {}
    longest = {"k" * 64: "v" * 0xFFFF}
    assert decode_metadata(encode_metadata(longest)) == longest


@pytest.mark.parametrize(
    "metadata",
    [
        {"": "x"},
        {"k" * 65: "x"},
        {"a b": "x"},
        {"ключ": "x"},
        {"key\n": "x"},
        {"big": "v" * 0x10000},
        {"big": "é" * 0x8000},  # 65536 bytes of UTF-8 from 32768 characters
        {"surrogate": "\udc80"},
    ],
)
def test_encode_metadata_rejects_what_it_cannot_encode(metadata: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        encode_metadata(metadata)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x04kin",  # key cut short
        b"\x04kind\x00",  # value length cut short
        b"\x04kind\x00\x05http",  # value cut short
        b"\x00\x00\x00",  # empty key
        b"\x03a b\x00\x00",  # key outside the alphabet
        b"\x02\xc3\xa9\x00\x00",  # key not ASCII
        b"\x01k\x00\x01\xff",  # value not UTF-8
        b"\x01k\x00\x00\x01k\x00\x00",  # key repeated
        b"\x41" + b"k" * 65 + b"\x00\x00",  # key longer than 64
    ],
)
def test_decode_metadata_rejects_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_metadata(payload)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR


def test_hello_codec() -> None:
    payload = encode_hello(1, {SettingId.MAX_FRAME_SIZE: 2048, SettingId.INITIAL_WINDOW_SIZE: 7})
    # Settings go out sorted by id.
    assert payload == bytes.fromhex("00010001 000000070002 00000800")
    assert decode_hello(payload) == (1, {1: 7, 2: 2048})
    assert decode_hello(b"\x00\x02") == (2, {})
    for bad in (b"", b"\x00", b"\x00\x01\x00\x01\x00\x00\x00", b"\x00\x01" + b"\x00\x01" * 6):
        with pytest.raises(RemoteProtocolError):
            decode_hello(bad)


def test_goaway_codec_truncates_the_reason_on_a_character_boundary() -> None:
    payload = encode_goaway(5, ErrorCode.NO_ERROR, "é" * 600)  # 1200 bytes of UTF-8
    assert len(payload) == 8 + MAX_GOAWAY_REASON
    assert decode_goaway(payload) == (5, 0, "é" * 512)
    odd = encode_goaway(5, 0, "x" + "é" * 600)  # the cut falls inside a character
    assert decode_goaway(odd) == (5, 0, "x" + "é" * 511)
    with pytest.raises(RemoteProtocolError):
        decode_goaway(b"\x00" * 7)
    with pytest.raises(RemoteProtocolError):
        decode_goaway(b"\x00" * 8 + b"\xff")


# ---------------------------------------------------------------- the handshake


def test_hello_without_settings_means_the_defaults() -> None:
    session = opened()
    stream_id = session.open_stream()
    assert session.local_flow_control_window(stream_id) == 256 * 1024
    # Default MAX_FRAME_SIZE 64 KiB: a 100 KiB write goes out as two frames.
    session.data_to_send()
    session.send_data(stream_id, bytes(100 * 1024))
    sizes = [len(p) for t, _, _, p in parse_frames(session.data_to_send()) if t == DATA]
    assert sizes == [64 * 1024, 36 * 1024]


def test_unknown_settings_are_ignored() -> None:
    session = Session(Role.CONNECTOR)
    events = session.receive_data(frame(HELLO, payload=bytes.fromhex("0001 00ff 00000001")))
    assert events == [HandshakeCompleted(version=1, settings={0xFF: 1})]


def test_peer_settings_are_obeyed() -> None:
    session = Session(Role.CONNECTOR)
    session.receive_data(
        hello(INITIAL_WINDOW_SIZE=5000, MAX_FRAME_SIZE=1024, MAX_CONCURRENT_STREAMS=1)
    )
    stream_id = session.open_stream()
    assert not session.can_open_stream()
    assert session.local_flow_control_window(stream_id) == 5000
    session.data_to_send()
    session.send_data(stream_id, bytes(2500))
    sizes = [len(p) for t, _, _, p in parse_frames(session.data_to_send()) if t == DATA]
    assert sizes == [1024, 1024, 452]


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_version_mismatch(version: int) -> None:
    error = expect_error(Session(Role.RELAY), hello(version), ErrorCode.VERSION_MISMATCH)
    assert str(version) in error.message


@pytest.mark.parametrize(
    ("settings", "code"),
    [
        ({"INITIAL_WINDOW_SIZE": 0}, ErrorCode.FLOW_CONTROL_ERROR),
        ({"INITIAL_WINDOW_SIZE": 2**31}, ErrorCode.FLOW_CONTROL_ERROR),
        ({"SESSION_WINDOW_SIZE": 0}, ErrorCode.FLOW_CONTROL_ERROR),
        ({"SESSION_WINDOW_SIZE": 2**31}, ErrorCode.FLOW_CONTROL_ERROR),
        ({"MAX_FRAME_SIZE": 1023}, ErrorCode.PROTOCOL_ERROR),
        ({"MAX_FRAME_SIZE": 16 * 1024 * 1024 + 1}, ErrorCode.PROTOCOL_ERROR),
    ],
)
def test_settings_out_of_range(settings: dict[str, int], code: ErrorCode) -> None:
    expect_error(Session(Role.RELAY), hello(**settings), code)


def test_malformed_hello() -> None:
    expect_error(
        Session(Role.RELAY), frame(HELLO, payload=b"\x00\x01\x00"), ErrorCode.PROTOCOL_ERROR
    )
    repeated = b"\x00\x01" + bytes.fromhex("0001 00000010") * 2
    expect_error(Session(Role.RELAY), frame(HELLO, payload=repeated), ErrorCode.PROTOCOL_ERROR)


def test_hello_twice() -> None:
    expect_error(opened(), hello(), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "first",
    [
        frame(PING, payload=bytes(8)),
        frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)),
        frame(GOAWAY, payload=bytes(8)),
        frame(OPEN, 0, 2),
        frame(RESET, 0, 2, bytes(4)),
    ],
)
def test_anything_before_hello_is_refused(first: bytes) -> None:
    expect_error(Session(Role.CONNECTOR), first, ErrorCode.PROTOCOL_ERROR)


def test_data_before_hello_is_refused_from_the_header_alone() -> None:
    header = frame(DATA, 0, 2, length=100)
    error = expect_error(Session(Role.CONNECTOR), header, ErrorCode.PROTOCOL_ERROR)
    assert "HELLO" in error.message


# ---------------------------------------------------------------- header rules


@pytest.mark.parametrize("frame_type", [7, 0x10, 0xFF])
def test_unknown_frame_type(frame_type: int) -> None:
    expect_error(opened(), frame(frame_type, 0, 0), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("frame_type", "flags", "stream_id", "payload"),
    [
        (HELLO, FIN, 0, b"\x00\x01"),
        (OPEN, FIN, 2, b""),
        (DATA, ACK, 1, b""),
        (DATA, 0x80, 1, b""),
        (WINDOW_UPDATE, FIN, 0, struct.pack(">I", 1)),
        (RESET, ACK, 1, bytes(4)),
        (PING, FIN, 0, bytes(8)),
        (PING, 0x4, 0, bytes(8)),
        (GOAWAY, ACK, 0, bytes(8)),
    ],
)
def test_flags_not_allowed(frame_type: int, flags: int, stream_id: int, payload: bytes) -> None:
    session = opened()
    session.open_stream()
    expect_error(session, frame(frame_type, flags, stream_id, payload), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("frame_type", [DATA, WINDOW_UPDATE, PING])
def test_reserved_bits_set(frame_type: int) -> None:
    session = opened()
    session.open_stream()
    stream_id = 0 if frame_type == PING else 1
    header = frame(frame_type, 0, stream_id, length=8 if frame_type == PING else 4, reserved=1)
    expect_error(session, header, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("frame_type", [HELLO, PING, GOAWAY])
def test_session_frames_on_a_stream(frame_type: int) -> None:
    session = opened()
    session.open_stream()
    length = {HELLO: 2, PING: 8, GOAWAY: 8}[frame_type]
    expect_error(session, frame(frame_type, 0, 1, length=length), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("frame_type", [OPEN, DATA, RESET])
def test_stream_frames_on_stream_zero(frame_type: int) -> None:
    length = 4 if frame_type == RESET else 0
    expect_error(opened(), frame(frame_type, 0, 0, length=length), ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("frame_type", "length"),
    [(WINDOW_UPDATE, 3), (WINDOW_UPDATE, 5), (RESET, 0), (RESET, 8), (PING, 7), (PING, 9)],
)
def test_fixed_size_frames_with_the_wrong_length(frame_type: int, length: int) -> None:
    session = opened()
    session.open_stream()
    stream_id = 0 if frame_type == PING else 1
    # The header alone is enough to reject them.
    expect_error(
        session, frame(frame_type, 0, stream_id, length=length), ErrorCode.FRAME_SIZE_ERROR
    )


@pytest.mark.parametrize("frame_type", [OPEN, DATA, WINDOW_UPDATE, RESET])
def test_stream_ids_above_2_to_the_31_are_refused(frame_type: int) -> None:
    length = 4 if frame_type in (WINDOW_UPDATE, RESET) else 0
    session = opened()
    expect_error(session, frame(frame_type, 0, 2**31 + 2, length=length), ErrorCode.PROTOCOL_ERROR)


# ---------------------------------------------------------------- oversized frames: header alone


def test_oversized_data_is_refused_from_the_header_alone() -> None:
    session = opened(config=SessionConfig(max_frame_size=4096, initial_window_size=65536))
    session.receive_data(frame(OPEN, 0, 2))
    # Only the 12 header bytes: the payload never arrives, the error is immediate.
    error = expect_error(session, frame(DATA, 0, 2, length=4097), ErrorCode.FRAME_SIZE_ERROR)
    assert "4097" in error.message


def test_data_over_the_stream_window_is_refused_from_the_header_alone() -> None:
    session = opened(config=SessionConfig(initial_window_size=1024))
    session.receive_data(frame(OPEN, 0, 2))
    expect_error(session, frame(DATA, 0, 2, length=1025), ErrorCode.FLOW_CONTROL_ERROR)


def test_data_over_the_session_window_is_refused_from_the_header_alone() -> None:
    session = opened(config=SessionConfig(session_window_size=2048, initial_window_size=65536))
    session.receive_data(frame(OPEN, 0, 2))
    expect_error(session, frame(DATA, 0, 2, length=2049), ErrorCode.FLOW_CONTROL_ERROR)


def test_oversized_open_is_refused_from_the_header_alone() -> None:
    session = opened(config=SessionConfig(max_metadata_size=100))
    expect_error(session, frame(OPEN, 0, 2, length=101), ErrorCode.FRAME_SIZE_ERROR)


def test_oversized_hello_is_refused_from_the_header_alone() -> None:
    expect_error(
        Session(Role.RELAY), frame(HELLO, length=MAX_HELLO_SIZE + 1), ErrorCode.FRAME_SIZE_ERROR
    )


def test_oversized_goaway_is_refused_from_the_header_alone() -> None:
    header = frame(GOAWAY, length=8 + MAX_GOAWAY_REASON + 1)
    expect_error(opened(), header, ErrorCode.FRAME_SIZE_ERROR)


def test_frames_at_the_limits_are_accepted() -> None:
    config = SessionConfig(max_frame_size=4096, initial_window_size=4096, max_metadata_size=70)
    session = opened(config=config)
    metadata = encode_metadata({"k" * 64: "v"})  # 1 + 64 + 2 + 1 = 68 bytes
    events = session.receive_data(frame(OPEN, 0, 2, metadata) + frame(DATA, 0, 2, bytes(4096)))
    assert [type(e) for e in events] == [StreamOpened, DataReceived]
    reason = "r" * MAX_GOAWAY_REASON
    events = session.receive_data(frame(GOAWAY, payload=struct.pack(">II", 0, 0) + reason.encode()))
    assert events == [GoAwayReceived(last_stream_id=0, code=ErrorCode.NO_ERROR, reason=reason)]


def test_malformed_goaway_payloads() -> None:
    expect_error(opened(), frame(GOAWAY, payload=bytes(4)), ErrorCode.PROTOCOL_ERROR)
    expect_error(opened(), frame(GOAWAY, payload=bytes(8) + b"\xc3"), ErrorCode.PROTOCOL_ERROR)


def test_ping_is_answered_with_the_same_payload() -> None:
    session = opened()
    session.data_to_send()
    events = session.receive_data(frame(PING, payload=b"12345678"))
    assert events == [PingReceived(payload=b"12345678")]
    assert session.data_to_send() == frame(PING, ACK, 0, b"12345678")
    assert session.receive_data(frame(PING, ACK, 0, b"abcdefgh")) == [
        PongReceived(payload=b"abcdefgh")
    ]
    assert session.data_to_send() == b""


def test_frames_split_anywhere_give_the_same_events() -> None:
    wire = (
        hello()
        + frame(OPEN, 0, 2, encode_metadata({"kind": "http"}))
        + frame(DATA, 0, 2, b"hello")
        + frame(PING, 0, 0, b"pingpong")
        + frame(DATA, FIN, 2, b"!")
    )
    whole = Session(Role.CONNECTOR).receive_data(wire)
    byte_by_byte: list[Event] = []
    session = Session(Role.CONNECTOR)
    for index in range(len(wire)):
        byte_by_byte += session.receive_data(wire[index : index + 1])
    assert byte_by_byte == whole
    assert [type(e) for e in whole] == [
        HandshakeCompleted,
        StreamOpened,
        DataReceived,
        PingReceived,
        DataReceived,
        StreamEnded,
    ]


# ---------------------------------------------------------------- the worked example in SPEC.md

EXAMPLE_BEGIN = "<!-- worked-example:begin -->"
EXAMPLE_END = "<!-- worked-example:end -->"

_NAMES = {t.value: t.name for t in FrameType}


def _describe(frame_type: int, flags: int, stream_id: int, payload: bytes) -> str:
    name = _NAMES[frame_type] + ("+FIN" if flags & FIN else "") + ("+ACK" if flags & ACK else "")
    if frame_type == HELLO:
        version, settings = decode_hello(payload)
        text = ", ".join(f"{SettingId(k).name}={v}" for k, v in settings.items())
        return f"{name} version={version} {text}"
    if frame_type == OPEN:
        return f"{name} stream={stream_id} metadata={decode_metadata(payload)}"
    if frame_type == DATA:
        return f"{name} stream={stream_id} {payload!r}"
    if frame_type == WINDOW_UPDATE:
        return f"{name} stream={stream_id} increment={struct.unpack('>I', payload)[0]}"
    if frame_type == RESET:
        return f"{name} stream={stream_id} code={ErrorCode(struct.unpack('>I', payload)[0]).name}"
    if frame_type == PING:
        return f"{name} payload={payload!r}"
    last, code, reason = decode_goaway(payload)
    return f"{name} last_stream_id={last} code={ErrorCode(code).name} reason={reason!r}"


def _payload_fields(frame_type: int, payload: bytes) -> list[bytes]:
    """Cut a payload at its field boundaries, so the hex shows the layout."""
    if frame_type == HELLO:
        return [payload[:2]] + [payload[i : i + 6] for i in range(2, len(payload), 6)]
    if frame_type == OPEN:
        fields, offset = [], 0
        while offset < len(payload):
            key_end = offset + 1 + payload[offset]
            value_end = key_end + 2 + int.from_bytes(payload[key_end : key_end + 2], "big")
            fields += [payload[offset:key_end], payload[key_end:value_end]]
            offset = value_end
        return fields
    if frame_type == GOAWAY:
        return [payload[:4], payload[4:8], payload[8:]]
    return [payload]


def _hex(frame_type: int, flags: int, stream_id: int, payload: bytes) -> str:
    header = pack_header(frame_type, flags, stream_id, len(payload)).hex()
    fields = f"{header[0:2]} {header[2:4]} {header[4:8]} {header[8:16]} {header[16:24]}"
    body = " ".join(f.hex() for f in _payload_fields(frame_type, payload) if f)
    return f"{fields} | {body or '(empty)'}"


def render_worked_example() -> str:
    """Run a short exchange between two real sessions and render every frame on the wire."""
    config = SessionConfig(initial_window_size=8, max_frame_size=1024, session_window_size=64)
    connector = Session(Role.CONNECTOR, config)
    relay = Session(Role.RELAY, config)
    lines: list[str] = []

    def move(source: Session, target: Session) -> None:
        arrow = "connector -> relay" if source is connector else "relay -> connector"
        data = source.data_to_send()
        for parsed in parse_frames(data):
            lines.append(f"{arrow}: {_describe(*parsed)}")
            lines.append(f"    {_hex(*parsed)}")
        target.receive_data(data)

    move(connector, relay)
    move(relay, connector)
    stream_id = relay.open_stream({"kind": "http", "from": "browser"})
    relay.send_data(stream_id, b"GET /")
    move(relay, connector)
    connector.accept_stream(stream_id)
    # At least half the stream window of 8, which is also the session's step: both credits.
    connector.acknowledge_received_data(stream_id, 5)
    connector.send_data(stream_id, b"200 OK", end_stream=True)
    move(connector, relay)
    relay.acknowledge_received_data(stream_id, 6)  # after the peer's FIN: session credit only
    relay.end_stream(stream_id)
    relay.ping(b"keepaliv")
    move(relay, connector)
    move(connector, relay)
    relay.go_away(ErrorCode.NO_ERROR, "bye")
    move(relay, connector)
    return "\n".join(lines)


def test_spec_worked_example_is_what_the_code_sends() -> None:
    text = SPEC.read_text()
    start = text.index(EXAMPLE_BEGIN) + len(EXAMPLE_BEGIN)
    end = text.index(EXAMPLE_END)
    block = text[start:end].strip()
    assert block.startswith("```text\n") and block.endswith("\n```")
    expected = render_worked_example()
    assert block[len("```text\n") : -len("\n```")] == expected, (
        "protocol/SPEC.md's worked example is stale; regenerate it with "
        "render_worked_example() in tests/protocol/test_frames.py"
    )
