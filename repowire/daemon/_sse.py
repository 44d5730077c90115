"""The Server-Sent Events feed of the event log (``GET /events/stream``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import trio

from ._state import DaemonEvent, DaemonState, FeedDropped

KEEPALIVE: bytes = b": keepalive\n\n"


def format_event(event: DaemonEvent) -> bytes:
    """One SSE message: ``id``, ``event`` (the type) and ``data`` (the event as JSON).

    The JSON is ASCII-only and single-line, so it cannot break the SSE framing.
    """
    data = json.dumps(event.to_json(), separators=(",", ":"), allow_nan=False)
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode("ascii")


def format_dropped(last_id: int) -> bytes:
    """The message that ends a feed which fell behind; it has no ``id`` so that an
    EventSource reconnects with ``Last-Event-ID`` set to the last event it really got."""
    data = json.dumps(
        {
            "last_id": last_id,
            "detail": "This feed fell too far behind and was ended; reconnect to resume.",
        },
        separators=(",", ":"),
    )
    return f"event: dropped\ndata: {data}\n\n".encode("ascii")


async def event_stream(
    state: DaemonState, *, after: int, keepalive_interval: float, retry_ms: int
) -> AsyncIterator[bytes]:
    """Yield the SSE body: a ``retry`` hint, the events after ``after``, then live ones.

    A ``: keepalive`` comment goes out after ``keepalive_interval`` seconds without an
    event. If the subscriber falls behind, the stream ends with a ``dropped`` message. The
    subscription is taken when iteration starts and released when the generator ends or is
    closed (the server closes it when the client goes away).
    """
    with state.subscribe(after=after) as subscription:
        # Sent at once so the response headers leave now, not with the first event.
        yield f"retry: {retry_ms}\n\n".encode("ascii")
        while True:
            event: DaemonEvent | None = None
            try:
                # The wait is scoped, the yield is not: a generator must not yield inside
                # a cancel scope.
                with trio.move_on_after(keepalive_interval):
                    event = await subscription.receive()
            except FeedDropped as exc:
                yield format_dropped(exc.last_id)
                return
            yield KEEPALIVE if event is None else format_event(event)
