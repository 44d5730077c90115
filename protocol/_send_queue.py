"""The send queue: bytes queued for the peer, and the count of the answers among them.

Frames go out in the order they were queued. The queue also keeps what SPEC.md, "Queued
answers", bounds: the control frames that reading the peer's frames made this side queue
(pongs, RESETs answering the peer, WINDOW_UPDATEs for its data) and not yet handed to the
transport. It only counts them; the session decides when a count is too high. And it coalesces
WINDOW_UPDATEs: a grant for a stream (or the session) whose previous WINDOW_UPDATE is still
queued adds to that frame instead of queueing another.
"""

from __future__ import annotations

import struct
from collections import deque

from ._frames import HEADER, HEADER_SIZE, Flag, FrameType

_DATA = int(FrameType.DATA)
_WINDOW_UPDATE = int(FrameType.WINDOW_UPDATE)
_WINDOW_UPDATE_SIZE = HEADER_SIZE + 4
#: A whole WINDOW_UPDATE frame, header and increment, in one pack.
_WINDOW_UPDATE_PACK = struct.Struct(HEADER.format + "I").pack
_HEADER_PACK = HEADER.pack
_FIN = int(Flag.FIN)


class SendQueue:
    """Frames for the peer, oldest first. :meth:`take` hands them out as bytes."""

    __slots__ = (
        "_control",
        "_front_cut",
        "_grants",
        "_taken",
        "_taken_chunks",
        "chunks",
        "control_bytes",
        "pending_pongs",
        "size",
    )

    def __init__(self) -> None:
        #: The queued bytes, in pieces; :attr:`size` bytes in all.
        self.chunks: list[bytes] = []
        self.size = 0
        #: Bytes of the queued control frames that answer the peer, and how many are pongs.
        self.control_bytes = 0
        self.pending_pongs = 0
        # Positions are offsets into everything ever queued: bytes and pieces taken off the
        # front. Kept up to date only while control frames are queued (a take that empties
        # the queue forgets them all), which is all the positions recorded below need.
        self._taken = 0
        self._taken_chunks = 0
        self._front_cut = False  # chunks[0] may be the rest of a piece handed out in part
        # (end position, size, is a pong) of each queued control frame, in queue order.
        self._control: deque[tuple[int, int, bool]] = deque()
        # stream id -> (absolute index in chunks, increment) of a queued WINDOW_UPDATE, so a
        # second grant for the stream adds to it instead of queueing another frame.
        self._grants: dict[int, tuple[int, int]] = {}

    @property
    def control_frames(self) -> int:
        """How many control frames answering the peer are queued."""
        return len(self._control)

    def queue(self, header: bytes, payload: bytes = b"") -> None:
        """Queue a frame this side sends on its own initiative: not counted as an answer."""
        self.chunks.append(header)
        if payload:
            self.chunks.append(payload)
        self.size += len(header) + len(payload)

    def queue_control(self, frame: bytes, *, pong: bool = False) -> None:
        """Queue a whole control frame that answers the peer, and count it."""
        self.chunks.append(frame)
        size = len(frame)
        self.size += size
        self._control.append((self._taken + self.size, size, pong))
        self.control_bytes += size
        if pong:
            self.pending_pongs += 1

    def queue_data(self, stream_id: int, data: bytes, end_stream: bool, max_frame: int) -> None:
        """Queue ``data`` on the stream as DATA frames of at most ``max_frame`` bytes, the
        last with FIN if ``end_stream``. The caller has checked the windows."""
        chunks = self.chunks
        size = len(data)
        if size <= max_frame:
            chunks.append(_HEADER_PACK(_DATA, _FIN if end_stream else 0, 0, stream_id, size))
            if size:
                chunks.append(data)
            self.size += HEADER_SIZE + size
            return
        view = memoryview(data)
        for start in range(0, size, max_frame):
            chunk = view[start : start + max_frame]
            last = start + max_frame >= size
            flags = _FIN if (end_stream and last) else 0
            chunks.append(_HEADER_PACK(_DATA, flags, 0, stream_id, len(chunk)))
            chunks.append(chunk.tobytes())
            self.size += HEADER_SIZE + len(chunk)

    def queue_grant(self, stream_id: int, increment: int) -> None:
        """Queue a WINDOW_UPDATE (an answer to the peer's data), or add ``increment`` to the
        one for the same stream still queued whole."""
        grants = self._grants
        if grants:
            queued = grants.get(stream_id)
            if queued is not None:
                index = queued[0] - self._taken_chunks
                # Still queued and whole (not the rest of a frame handed out in part): add the
                # credit to it. The peer gets the sum no later, never more than was granted.
                if index > 0 or (index == 0 and not self._front_cut):
                    total = queued[1] + increment
                    self.chunks[index] = _WINDOW_UPDATE_PACK(
                        _WINDOW_UPDATE, 0, 0, stream_id, 4, total
                    )
                    grants[stream_id] = (queued[0], total)
                    return
        # queue_control, inlined: this runs once per half window on every busy stream.
        chunks = self.chunks
        grants[stream_id] = (self._taken_chunks + len(chunks), increment)
        chunks.append(_WINDOW_UPDATE_PACK(_WINDOW_UPDATE, 0, 0, stream_id, 4, increment))
        size = self.size + _WINDOW_UPDATE_SIZE
        self.size = size
        self._control.append((self._taken + size, _WINDOW_UPDATE_SIZE, False))
        self.control_bytes += _WINDOW_UPDATE_SIZE

    def take(self, amount: int | None = None) -> bytes:
        """Return the oldest queued bytes (at most ``amount`` if given), and forget them."""
        chunks = self.chunks
        if not chunks:
            return b""
        if amount is None or self.size <= amount:
            data = b"".join(chunks)
            chunks.clear()
            self.size = 0
            # The positions (_taken, _taken_chunks) only need to move while control frames
            # are queued: everything queued is gone now, so are they, and this path stays as
            # cheap as before.
            if self._control:
                self._control.clear()
                self.control_bytes = 0
                self.pending_pongs = 0
                self._grants.clear()
            return data
        # Walk the queue and cut it once: popping pieces off the front one by one would make
        # draining a long queue of small frames quadratic.
        taken: list[bytes] = []
        size = 0
        index = 0
        count = len(chunks)
        cut = False
        while index < count and size < amount:
            chunk = chunks[index]
            room = amount - size
            if len(chunk) <= room:
                taken.append(chunk)
                size += len(chunk)
                index += 1
            else:
                taken.append(chunk[:room])
                chunks[index] = chunk[room:]
                size = amount
                cut = True
        if cut or index:
            # Otherwise nothing was taken (amount 0) and the front is as it was.
            self._front_cut = cut
        del chunks[:index]
        self._taken_chunks += index
        self.size -= size
        self._taken += size
        if self._control:
            self._forget_taken_control()
        return b"".join(taken)

    def _forget_taken_control(self) -> None:
        """Drop the control frames :meth:`take` has handed out in full."""
        control = self._control
        taken = self._taken
        while control and control[0][0] <= taken:
            _, size, pong = control.popleft()
            self.control_bytes -= size
            if pong:
                self.pending_pongs -= 1
        if not control:
            # Every queued WINDOW_UPDATE is a control frame: none is left to add to.
            self._grants.clear()
