"""One multiplexed stream as a :class:`trio.abc.HalfCloseableStream`."""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

from protocol import ErrorCode, StreamState

from ._errors import StreamResetError

if TYPE_CHECKING:
    from ._session import MuxSession

#: ``receive_some()`` without ``max_bytes`` returns at most this much.
DEFAULT_RECEIVE_SIZE = 256 * 1024


class MuxStream(trio.abc.HalfCloseableStream):
    """A stream of a :class:`~mux.MuxSession`.

    ``send_all`` waits while the peer's flow-control window is spent, so a reader that stops
    stops its sender and nothing else. ``aclose`` half-closes gracefully (the peer reads what was
    sent, then ``b""``) and stops reading: unread or later data makes the session reset the
    stream with ``CANCEL``, so the peer's sender fails instead of blocking forever. ``reset``
    aborts both directions with a code.

    Errors: :class:`trio.ClosedResourceError` after a local ``aclose``/``reset`` (or ``send_all``
    after ``send_eof``); :class:`trio.BrokenResourceError` (a :class:`~mux.StreamResetError`
    when the peer reset the stream) once the stream or the session is broken;
    :class:`trio.BusyResourceError` for concurrent sends or concurrent receives.
    """

    def __init__(
        self, session: MuxSession, stream_id: int, metadata: Mapping[str, str], local: bool
    ) -> None:
        self.session = session
        self.stream_id = stream_id
        self.metadata = metadata
        #: True when this side opened the stream.
        self.local = local
        self._accepted = local
        self._chunks: deque[bytes] = deque()
        self._eof_received = False
        self._eof_sent = False
        self._closed = False
        self._broken: trio.BrokenResourceError | None = None
        self._sending = False
        self._receiving = False
        self._send_waiter: trio.Event | None = None
        self._receive_waiter: trio.Event | None = None
        #: Bytes the session has grown this stream's receive window by, and whether the
        #: session has forgotten the stream: the growth goes back to the session's budget once
        #: both that is true and the buffer is empty (``MuxSession._release_growth``).
        self._window_growth = 0
        self._forgotten = False

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} {dict(self.metadata)!r}>"

    # ------------------------------------------------------------------ trio.abc.Stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_can_send()
            payload = data if type(data) is bytes else bytes(data)
            protocol = self.session.protocol
            offset, size = 0, len(payload)
            while offset < size:
                self._check_can_send()
                window = protocol.local_flow_control_window(self.stream_id)
                if window <= 0:
                    await self._wait_for_window()
                    continue
                end = min(size, offset + window)
                chunk = payload if (offset == 0 and end == size) else payload[offset:end]
                protocol.send_data(self.stream_id, chunk)
                offset = end
                self.session._wake_writer()
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_can_send()
            while self.session.protocol.local_flow_control_window(self.stream_id) <= 0:
                await self._wait_for_window()
                self._check_can_send()
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("cannot send_eof while another task sends")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if not self._eof_sent:
            if self._broken is not None:
                raise self._broken
            self._eof_sent = True
            self.session._end_stream(self)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._chunks:
                    data = self._take(max_bytes or DEFAULT_RECEIVE_SIZE)
                    self.session._acknowledge(self, len(data))
                    if self._forgotten:
                        self.session._release_growth(self)
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if self._eof_received:
                    # End of file arrived before any reset: the receive direction finished
                    # cleanly, whatever happened to the send direction since.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                if self._broken is not None:
                    raise self._broken
                waiter = self._receive_waiter = trio.Event()
                await waiter.wait()
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.session._close_stream(self)
            self._drop_unread()
            self._wake()
        await trio.lowlevel.checkpoint()

    def reset(self, code: int = ErrorCode.CANCEL) -> None:
        """Abort the stream in both directions, telling the peer ``code``. Idempotent."""
        if not self._closed:
            self._closed = True
            self.session._reset_stream(self, code)
            self._drop_unread()
            self._wake()

    # ------------------------------------------------------------------ introspection

    @property
    def state(self) -> StreamState:
        return self.session.protocol.stream_state(self.stream_id)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def window_growth(self) -> int:
        """Bytes the session has grown this stream's receive window by (a bulk transfer)."""
        return self._window_growth

    # ------------------------------------------------------------------ driver side

    def _take(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        first = chunks[0]
        if len(first) <= max_bytes:
            chunks.popleft()
            if len(chunks) == 0 or len(first) == max_bytes:
                return first
            # Coalesce small chunks (many tiny frames) up to max_bytes.
            parts, size = [first], len(first)
            while chunks and size + len(chunks[0]) <= max_bytes:
                chunk = chunks.popleft()
                parts.append(chunk)
                size += len(chunk)
            return b"".join(parts) if len(parts) > 1 else first
        chunks[0] = first[max_bytes:]
        return first[:max_bytes]

    def _buffered(self) -> int:
        return sum(len(chunk) for chunk in self._chunks)

    def _drop_unread(self) -> None:
        """Closed here: nothing buffered will be read. The session has credited it already,
        unless the session had ended (then there is nobody to credit)."""
        if self._chunks:
            self._discard_buffer()

    def _discard_buffer(self) -> int:
        size = self._buffered()
        self._chunks.clear()
        self.session._release_growth(self)
        return size

    def _check_can_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was called on this stream")
        if self._broken is not None:
            raise self._broken

    async def _wait_for_window(self) -> None:
        waiter = self._send_waiter = trio.Event()
        self.session._send_waiting.add(self)
        try:
            await waiter.wait()
        finally:
            self.session._send_waiting.discard(self)
        self._check_can_send()

    def _on_data(self, data: bytes) -> None:
        self._chunks.append(data)
        if self._receive_waiter is not None:
            self._receive_waiter.set()

    def _on_eof(self) -> None:
        self._eof_received = True
        if self._receive_waiter is not None:
            self._receive_waiter.set()

    def _on_break(self, error: trio.BrokenResourceError) -> None:
        if self._broken is None:
            self._broken = error
        self._wake()

    def _on_reset(self, code: int, remote: bool) -> None:
        who = "the peer" if remote else "the session"
        name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else str(code)
        self._on_break(StreamResetError(self.stream_id, code, f"stream reset by {who}: {name}"))

    def _wake_sender(self) -> None:
        if self._send_waiter is not None:
            self._send_waiter.set()

    def _wake(self) -> None:
        if self._receive_waiter is not None:
            self._receive_waiter.set()
        self._wake_sender()
