"""The daemon's WebSocket (``GET /ws``): a live event feed plus notify requests.

Two tasks share the connection: the pusher sends events as they are published, the reader
keeps receiving client messages meanwhile. Sends go through one lock, so messages are never
interleaved.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import attrs
import trio

from protocol import CloseCode

from ._errors import ApiError, dump_json, parse_json_object
from ._state import DaemonState, FeedDropped, Subscription

Notify = Callable[[Mapping[str, object]], Awaitable[tuple[int, dict[str, object]]]]


@attrs.frozen(kw_only=True)
class WebSocketLink:
    """What the session needs from a WebSocket (Quart's ``websocket`` methods fit)."""

    receive: Callable[[], Awaitable[str | bytes]]
    send: Callable[[str], Awaitable[None]]
    close: Callable[[int, str], Awaitable[None]]


class WebSocketSession:
    """One client connection. :meth:`run` returns when the feed ends; the server cancels it
    when the client goes away."""

    def __init__(
        self,
        link: WebSocketLink,
        *,
        state: DaemonState,
        notify: Notify,
        after: int | None,
        final_send_timeout: float,
    ) -> None:
        self._link = link
        self._state = state
        self._notify = notify
        self._final_send_timeout = final_send_timeout
        self._send_lock = trio.Lock()
        # Taken now, so nothing published while the tasks start is missed.
        self._subscription: Subscription = state.subscribe(after=after)
        self._resubscribe_after: int | None = None
        self._wait_scope: trio.CancelScope | None = None

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                await self._push()
                nursery.cancel_scope.cancel()
        finally:
            self._subscription.close()

    async def _send(self, message: Mapping[str, object]) -> None:
        async with self._send_lock:
            await self._link.send(dump_json(message))

    # -- pusher -------------------------------------------------------------------------

    async def _push(self) -> None:
        while True:
            if self._resubscribe_after is not None:
                self._subscription.close()
                self._subscription = self._state.subscribe(after=self._resubscribe_after)
                self._resubscribe_after = None
            dropped: FeedDropped | None = None
            # Only the wait is cancellable by a resubscribe; a send is never cut in half.
            with trio.CancelScope() as scope:
                self._wait_scope = scope
                try:
                    event = await self._subscription.receive()
                except FeedDropped as exc:
                    dropped = exc
                finally:
                    self._wait_scope = None
            if dropped is not None:
                await self._end_dropped(dropped.last_id)
                return
            if scope.cancelled_caught:
                continue
            await self._send({"type": "event", "event": event.to_json()})

    async def _end_dropped(self, last_id: int) -> None:
        with trio.move_on_after(self._final_send_timeout):
            await self._send(
                {
                    "type": "error",
                    "error": "feed_dropped",
                    "detail": "This feed fell too far behind and was ended; reconnect and "
                    "subscribe after last_id to resume.",
                    "last_id": last_id,
                }
            )
            # "Try again later": the client fell behind; it may reconnect and resume.
            await self._link.close(CloseCode.TRY_AGAIN_LATER, "feed dropped")

    def _resubscribe(self, after: int) -> None:
        self._resubscribe_after = after
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    # -- reader -------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            raw = await self._link.receive()
            try:
                message = parse_json_object(raw, "The message")
                await self._handle(message)
            except ApiError as exc:
                await self._send({"type": "error", **exc.to_json()})

    async def _handle(self, message: dict[str, object]) -> None:
        kind = message.get("type")
        if kind == "notify":
            try:
                status, answer = await self._notify(message)
            except ApiError as exc:
                status, answer = exc.status, exc.to_json()
            await self._send(
                {**answer, "type": "result", "ok": 200 <= status < 300, "status": status}
            )
        elif kind == "subscribe":
            after = message.get("after", 0)
            if not isinstance(after, int) or isinstance(after, bool) or after < 0:
                raise ApiError(
                    400, "bad_request", "The field 'after' must be an integer of at least 0."
                )
            self._resubscribe(after)
        else:
            raise ApiError(
                400,
                "bad_request",
                "The field 'type' must be 'notify' or 'subscribe'.",
            )
