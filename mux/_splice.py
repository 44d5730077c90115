"""Copy bytes between two half-closeable streams, both directions, until both are done."""

from __future__ import annotations

from collections.abc import Callable

import trio

#: Bytes read per receive while splicing.
SPLICE_CHUNK = 256 * 1024


async def _copy(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.HalfCloseableStream,
    count: Callable[[int], None] | None,
) -> None:
    while True:
        data = await source.receive_some(SPLICE_CHUNK)
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
) -> None:
    """Pipe ``a`` and ``b`` into each other, propagating half-closes, until both directions
    have ended. If either side breaks, both are closed forcefully (the other end learns it
    through its own error) and the error is not raised: a broken splice is an ordinary end.
    Both streams are closed on return.
    """
    try:
        async with trio.open_nursery() as nursery:

            async def direction(
                source: trio.abc.HalfCloseableStream,
                sink: trio.abc.HalfCloseableStream,
                count: Callable[[int], None] | None,
            ) -> None:
                try:
                    await _copy(source, sink, count)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()

            nursery.start_soon(direction, a, b, count_a_to_b)
            nursery.start_soon(direction, b, a, count_b_to_a)
    finally:
        try:
            await trio.aclose_forcefully(a)
        finally:
            await trio.aclose_forcefully(b)
