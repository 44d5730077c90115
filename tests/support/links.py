"""A daemon link to a relay's ``/ws/relay``, spoken by hand: its handshake and its frames.

- :func:`link_headers`: the ``/ws/relay`` handshake headers, each one replaceable or left out.
- :func:`open_link_websocket`: the WebSocket of a link, on a TCP stream this helper closes;
  :func:`link_refusal`: dial and return the close code the relay answers with.
- :func:`encode_frame`, :func:`open_frame` and :class:`Frame`: frames built and read byte by
  byte (a header can lie about its length).
- :func:`open_raw_link` and :class:`RawLink`: a link spoken frame by frame, for bad input.

A link served by the project's own driver, streams answered by the test, is
:mod:`tests.support.stand_in`.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import attrs
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from protocol import (
    HEADER_SIZE,
    PROTOCOL_VERSION,
    Flag,
    FrameType,
    Role,
    Session,
    SessionConfig,
    encode_metadata,
)

from .listener import Address
from .websocket import WS_CLOSE_TIMEOUT, open_client_websocket

#: Where daemons connect.
LINK_PATH = "/ws/relay"
#: Largest WebSocket message a link accepts (the relay writes at most 256 KiB at a time).
LINK_MAX_MESSAGE = 4 * 1024 * 1024
#: Messages trio-websocket queues for a link's reader (the session drains it continuously).
LINK_MESSAGE_QUEUE = 4

#: Header layout of every frame (protocol/_frames.py): type, flags, reserved, stream id, length.
_FRAME_HEADER = struct.Struct(">BBHII")


def link_headers(
    key: str | None,
    daemon_id: str | None,
    *,
    protocol: str | None = str(PROTOCOL_VERSION),
    version: str = "test",
) -> list[tuple[bytes, bytes]]:
    """The ``/ws/relay`` handshake headers a connector sends; ``None`` leaves one out."""
    headers: list[tuple[bytes, bytes]] = []
    if key is not None:
        headers.append((b"authorization", b"Bearer " + key.encode("latin-1")))
    if daemon_id is not None:
        headers.append((b"repowire-daemon-id", daemon_id.encode("latin-1")))
    if protocol is not None:
        headers.append((b"repowire-protocol", protocol.encode("latin-1")))
    headers.append((b"repowire-version", version.encode("latin-1")))
    return headers


@asynccontextmanager
async def open_link_websocket(
    address: Address, headers: Sequence[tuple[bytes, bytes]]
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket to ``/ws/relay`` whose TCP stream this helper owns and closes."""
    async with open_client_websocket(
        address,
        LINK_PATH,
        headers=headers,
        message_queue_size=LINK_MESSAGE_QUEUE,
        max_message_size=LINK_MAX_MESSAGE,
        close_timeout=WS_CLOSE_TIMEOUT,
    ) as ws:
        yield ws


async def link_refusal(address: Address, headers: Sequence[tuple[bytes, bytes]]) -> CloseReason:
    """Dial ``/ws/relay`` with ``headers`` and return how the relay closed the link.

    Fails if the relay sends anything first (a refused link must not get a session).
    """
    async with open_link_websocket(address, headers) as ws:
        try:
            message = await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            return exc.reason
        raise AssertionError(f"the relay sent {message!r} instead of closing the link")


@attrs.frozen(kw_only=True)
class Frame:
    """One frame as it came off the link."""

    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def code(self) -> int:
        """The error code of a RESET (first 4 bytes) or GOAWAY (bytes 4 to 8)."""
        if self.type == FrameType.RESET:
            return int(struct.unpack(">I", self.payload[:4])[0])
        if self.type == FrameType.GOAWAY:
            return int(struct.unpack(">I", self.payload[4:8])[0])
        raise AssertionError(f"frame type {self.type} carries no error code")


def encode_frame(
    frame_type: int, flags: int, stream_id: int, payload: bytes = b"", *, length: int | None = None
) -> bytes:
    """One frame; ``length`` overrides the header's length field (to lie about it)."""
    declared = len(payload) if length is None else length
    return _FRAME_HEADER.pack(frame_type, flags, 0, stream_id, declared) + payload


def open_frame(stream_id: int, metadata: Mapping[str, str]) -> bytes:
    return encode_frame(FrameType.OPEN, 0, stream_id, encode_metadata(metadata))


class RawLink:
    """A daemon link spoken frame by frame over a WebSocket (no session object in between).

    Pings from the relay are answered as they are read, so a raw link stays up between steps.
    """

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._buffer = bytearray()

    async def send(self, data: bytes) -> None:
        await self.ws.send_message(data)

    async def hello(self, config: SessionConfig | None = None) -> Frame:
        """Send a connector's HELLO and return the relay's."""
        await self.send(Session(Role.CONNECTOR, config).data_to_send())
        frame = await self.next_frame()
        if frame.type != FrameType.HELLO:
            raise AssertionError(f"expected the relay's HELLO, got {frame!r}")
        return frame

    async def next_frame(self) -> Frame:
        """The next frame other than a ping; raises ConnectionClosed when the link ends."""
        while True:
            if len(self._buffer) >= HEADER_SIZE:
                frame_type, flags, _, stream_id, length = _FRAME_HEADER.unpack_from(self._buffer)
                if len(self._buffer) >= HEADER_SIZE + length:
                    payload = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
                    del self._buffer[: HEADER_SIZE + length]
                    if frame_type == FrameType.PING and not flags & Flag.ACK:
                        await self.send(encode_frame(FrameType.PING, Flag.ACK, 0, payload))
                        continue
                    return Frame(type=frame_type, flags=flags, stream_id=stream_id, payload=payload)
            message = await self.ws.get_message()
            assert isinstance(message, bytes), "the relay sent a text message on the link"
            self._buffer += message

    async def frames_until_closed(self, limit: int = 1000) -> tuple[list[Frame], CloseReason]:
        """Read frames until the relay closes the link: ``(frames, close reason)``."""
        frames: list[Frame] = []
        for _ in range(limit):
            try:
                frames.append(await self.next_frame())
            except ConnectionClosed as exc:
                assert exc.reason is not None
                return frames, exc.reason
        raise AssertionError(f"the link was still open after {limit} frames")


@asynccontextmanager
async def open_raw_link(
    address: Address, key: str, daemon_id: str, *, handshake: bool = True
) -> AsyncIterator[RawLink]:
    """A :class:`RawLink` authenticated as ``daemon_id``; with ``handshake`` the HELLOs are
    already exchanged."""
    async with open_link_websocket(address, link_headers(key, daemon_id)) as ws:
        link = RawLink(ws)
        if handshake:
            await link.hello()
        yield link
