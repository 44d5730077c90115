"""The daemon's in-memory state: registered peers and a bounded, subscribable event log.

Nothing here does I/O or reads the wall clock directly: time comes from the ``clock`` callable
given at construction, so tests can fix it. Everything is synchronous except waiting on a
subscription, which means a publisher can never be blocked by a reader.
"""

from __future__ import annotations

import collections
import itertools
import re
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Final, Literal

import attrs
import trio

#: Peer names must match this whole. Daemon ids follow their own rule
#: (``common.DAEMON_ID_PATTERN``); both have this alphabet, and neither holds the ``@`` that
#: joins them in a ``peer@daemon`` target.
NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

#: How many events the log keeps; older ones fall off the front of the ring.
MAX_EVENTS: Final = 10_000

#: How many undelivered events one subscriber may have queued before it is dropped.
SUBSCRIBER_BUFFER: Final = 256

#: How many peers may be registered at once.
MAX_PEERS: Final = 1_000

EventType = Literal["message", "peer_joined", "peer_left"]


def is_valid_name(name: object) -> bool:
    """Whether ``name`` is a string usable as a peer name (daemon ids: ``common.is_daemon_id``)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


class InvalidPeerName(ValueError):
    """The peer name does not match :data:`NAME_PATTERN`."""


class UnknownPeer(LookupError):
    """No peer of that name is registered."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no peer named {name!r} is registered")
        self.name = name


class TooManyPeers(Exception):
    """Registering another peer would exceed the state's ``max_peers``."""


class FeedDropped(Exception):
    """The subscriber fell more than its buffer behind the log and was dropped.

    Every event up to and including ``last_id`` was delivered before the drop (0 if none was);
    a reader can resume with ``subscribe(after=last_id)`` for as long as the ring still holds
    the events after it.
    """

    def __init__(self, last_id: int) -> None:
        super().__init__(f"subscriber fell behind and was dropped after event {last_id}")
        self.last_id = last_id


@attrs.frozen(kw_only=True)
class Peer:
    """A registered peer. ``meta`` is the JSON object given at registration."""

    name: str
    registered_at: float
    meta: Mapping[str, object]

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "registered_at": self.registered_at, "meta": dict(self.meta)}


@attrs.frozen(kw_only=True)
class DaemonEvent:
    """One entry of the event log. Ids start at 1 and increase by 1 per event."""

    id: int
    type: EventType
    time: float
    data: Mapping[str, object]

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "type": self.type, "time": self.time, "data": dict(self.data)}


class Subscription:
    """A feed of events: first the backlog asked for at subscription, then live events.

    Use as a context manager (or call :meth:`close`) so the state forgets the subscriber.
    :meth:`receive` raises :class:`FeedDropped` once the buffered events of a dropped
    subscriber are consumed, and :class:`trio.ClosedResourceError` after :meth:`close`.
    """

    def __init__(
        self,
        state: DaemonState,
        backlog: list[DaemonEvent],
        send: trio.MemorySendChannel[DaemonEvent],
        receive: trio.MemoryReceiveChannel[DaemonEvent],
        last_id: int,
    ) -> None:
        self._state = state
        self._backlog = collections.deque(backlog)
        self._send = send
        self._receive = receive
        self._dropped = False
        # The id of the last event handed to the reader (or the subscription point).
        self.last_id = last_id

    @property
    def dropped(self) -> bool:
        """Whether the publisher dropped this subscriber for falling behind."""
        return self._dropped

    async def receive(self) -> DaemonEvent:
        """Wait for and return the next event."""
        if self._backlog:
            event = self._backlog.popleft()
        else:
            try:
                event = await self._receive.receive()
            except trio.EndOfChannel:
                raise FeedDropped(self.last_id) from None
        self.last_id = event.id
        return event

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> DaemonEvent:
        try:
            return await self.receive()
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop the feed. Idempotent."""
        self._state._unsubscribe(self)
        self._send.close()
        self._receive.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Called by the state only.
    def _offer(self, event: DaemonEvent) -> bool:
        """Queue ``event`` without blocking; False if this subscriber must be dropped."""
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._dropped = True
            self._send.close()
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


class DaemonState:
    """Peers and the event log of one daemon.

    ``clock`` gives the time (seconds since the epoch) stamped on peers and events.
    ``max_events`` bounds the ring, ``subscriber_buffer`` each subscriber's queue and
    ``max_peers`` the peer table.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        max_events: int = MAX_EVENTS,
        subscriber_buffer: int = SUBSCRIBER_BUFFER,
        max_peers: int = MAX_PEERS,
    ) -> None:
        if max_events < 1 or subscriber_buffer < 1 or max_peers < 1:
            raise ValueError("max_events, subscriber_buffer and max_peers must be at least 1")
        self._clock = clock
        self._events: collections.deque[DaemonEvent] = collections.deque(maxlen=max_events)
        self._next_id = 1
        self._subscriber_buffer = subscriber_buffer
        self._subscribers: set[Subscription] = set()
        self._max_peers = max_peers
        self._peers: dict[str, Peer] = {}

    # -- peers ---------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """All peers, in registration order."""
        return list(self._peers.values())

    def get_peer(self, name: str) -> Peer | None:
        return self._peers.get(name)

    def add_peer(self, name: str, meta: Mapping[str, object] | None = None) -> tuple[Peer, bool]:
        """Register (or re-register) a peer and publish ``peer_joined``.

        Returns the record and whether the name was new. Re-registering replaces the record
        (new time, new meta). Raises :class:`InvalidPeerName` or :class:`TooManyPeers`, in
        which case nothing changes.
        """
        if not is_valid_name(name):
            # Only the start of an overlong name is echoed back.
            shown = name if len(name) <= 80 else name[:80] + "..."
            raise InvalidPeerName(
                f"peer name {shown!r} must be 1 to 64 characters from A-Z, a-z, 0-9, '.', '_', '-'"
            )
        created = name not in self._peers
        if created and len(self._peers) >= self._max_peers:
            raise TooManyPeers(f"at most {self._max_peers} peers may be registered")
        peer = Peer(name=name, registered_at=self._clock(), meta=dict(meta or {}))
        if not created:
            # Re-registration moves the peer to the end, as if it were new.
            del self._peers[name]
        self._peers[name] = peer
        self.publish("peer_joined", peer.to_json(), time=peer.registered_at)
        return peer, created

    def remove_peer(self, name: str) -> Peer:
        """Unregister a peer and publish ``peer_left``. Raises :class:`UnknownPeer`."""
        try:
            peer = self._peers.pop(name)
        except KeyError:
            raise UnknownPeer(name) from None
        self.publish("peer_left", {"name": name})
        return peer

    # -- events --------------------------------------------------------------------------

    @property
    def last_event_id(self) -> int:
        """The id of the newest event, or 0 if none was published yet."""
        return self._next_id - 1

    def publish(
        self, type: EventType, data: Mapping[str, object], *, time: float | None = None
    ) -> DaemonEvent:
        """Append an event to the log and offer it to every subscriber; never blocks.

        A subscriber whose queue is full is dropped (its feed ends with :class:`FeedDropped`).
        """
        event = DaemonEvent(
            id=self._next_id,
            type=type,
            time=self._clock() if time is None else time,
            data=dict(data),
        )
        self._next_id += 1
        self._events.append(event)
        for subscriber in list(self._subscribers):
            if not subscriber._offer(event):
                self._subscribers.discard(subscriber)
        return event

    def events_after(self, after_id: int, limit: int) -> list[DaemonEvent]:
        """Up to ``limit`` logged events with ids greater than ``after_id``, oldest first.

        Events that fell off the ring are silently absent. An ``after_id`` beyond the newest
        id was handed out by an earlier run of the daemon (ids restart at 1), so it reads as 0.
        Raises ValueError if ``after_id`` is negative or ``limit`` is less than 1.
        """
        if after_id < 0:
            raise ValueError("after_id must be at least 0")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if after_id > self.last_event_id:
            after_id = 0
        if not self._events:
            return []
        # Ids in the ring are contiguous, so the position of after_id + 1 is arithmetic.
        start = max(0, after_id + 1 - self._events[0].id)
        return list(itertools.islice(self._events, start, start + limit))

    def subscribe(self, *, after: int | None = None) -> Subscription:
        """Start a feed of events with ids greater than ``after`` (default: only new events).

        The backlog and the live feed join without a gap or a duplicate, because both are
        taken in the same synchronous step. As in :meth:`events_after`, an ``after`` beyond the
        newest id reads as 0. Raises ValueError if ``after`` is negative.
        """
        if after is not None and after < 0:
            raise ValueError("after must be at least 0")
        last_id = self.last_event_id
        if after is None:
            after = last_id
        elif after > last_id:
            after = 0
        backlog = self.events_after(after, len(self._events)) if after < last_id else []
        send, receive = trio.open_memory_channel[DaemonEvent](self._subscriber_buffer)
        subscription = Subscription(self, backlog, send, receive, after)
        self._subscribers.add(subscription)
        return subscription

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
