"""Copy bytes between two half-closeable streams, both directions, until both are done."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ._session import WindowBudget
    from ._stream import MuxStream

#: Bytes read per receive while splicing, unless the caller says otherwise. A piece read is
#: out of its source's flow-control window until the sink takes it: a relay splicing streams
#: of many tenants keeps it small (it is not charged to any quota); a connector may read more.
SPLICE_CHUNK = 64 * 1024
#: Bytes read per receive from a source that moves bulk, when :class:`GrowingChunks` allows.
BULK_SPLICE_CHUNK = 256 * 1024


ChunkSize = int | Callable[[trio.abc.ReceiveStream], int]


class GrowingChunks:
    """Read sizes that start at :data:`SPLICE_CHUNK` and become :data:`BULK_SPLICE_CHUNK`
    for a source whose receive window has grown (it moves bulk: ``window_growth``), once
    ``budget`` takes the extra bytes, charged for ``payer``. Call it with the stream about to
    be read (or pass it as ``splice(..., chunk=...)``), and :meth:`release` when the reading
    is over."""

    def __init__(self, budget: WindowBudget, payer: MuxStream) -> None:
        self._budget = budget
        self._payer = payer
        self._extra = BULK_SPLICE_CHUNK - SPLICE_CHUNK
        self._large: set[int] = set()  # id() of the sources read in bulk
        self._refused: set[int] = set()

    def __call__(self, source: object) -> int:
        key = id(source)
        if key in self._large:
            return BULK_SPLICE_CHUNK
        growth: int = getattr(source, "window_growth", 0)
        if growth and key not in self._refused:
            if self._budget.try_take(self._payer, self._extra):
                self._large.add(key)
                return BULK_SPLICE_CHUNK
            self._refused.add(key)  # asked once: stay small
        return SPLICE_CHUNK

    def release(self) -> None:
        """Give back what the larger reads took (once)."""
        taken, self._large = len(self._large), set()
        if taken:
            self._budget.give_back(self._payer, taken * self._extra)


async def _copy(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.HalfCloseableStream,
    count: Callable[[int], None] | None,
    chunk: ChunkSize,
) -> None:
    while True:
        data = await source.receive_some(chunk if isinstance(chunk, int) else chunk(source))
        if not data:
            await sink.send_eof()
            return
        if count is not None:
            count(len(data))
        await sink.send_all(data)


async def splice(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    *,
    count_a_to_b: Callable[[int], None] | None = None,
    count_b_to_a: Callable[[int], None] | None = None,
    chunk: ChunkSize = SPLICE_CHUNK,
) -> None:
    """Pipe ``a`` and ``b`` into each other, propagating half-closes, until both directions
    have ended, reading up to ``chunk`` bytes at a time (or what ``chunk(source)`` says,
    a :class:`GrowingChunks`, say). If either side breaks, both are
    closed forcefully (the other end learns it through its own error) and the error is not
    raised: a broken splice is an ordinary end. Both streams are closed on return.
    """
    try:
        async with trio.open_nursery() as nursery:

            async def direction(
                source: trio.abc.HalfCloseableStream,
                sink: trio.abc.HalfCloseableStream,
                count: Callable[[int], None] | None,
            ) -> None:
                try:
                    await _copy(source, sink, count, chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()

            nursery.start_soon(direction, a, b, count_a_to_b)
            nursery.start_soon(direction, b, a, count_b_to_a)
    finally:
        try:
            await trio.aclose_forcefully(a)
        finally:
            await trio.aclose_forcefully(b)
