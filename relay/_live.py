"""Live browser access, indexed so that revocation ends it at once.

Every tunneled request, SSE stream and WebSocket runs inside a cancel scope registered here
under the browser session that opened it and the key behind that session. Revoking or rotating
a key, or signing out, cancels those scopes: a stream opened before the revocation ends then,
without waiting for the browser's next request. Single-threaded (the relay's event loop).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio


@attrs.define(eq=False)
class LiveRequest:
    """One request in flight for a browser session. ``cancel_scope`` is cancelled when its
    access ends; ``ended_by`` then says why (``"revoked"`` or ``"signed_out"``)."""

    session_id: str
    key_id: str
    cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    ended_by: str | None = None


class LiveAccess:
    """The requests in flight, by session id and by key id."""

    def __init__(self) -> None:
        self._by_session: dict[str, set[LiveRequest]] = {}
        self._by_key: dict[str, set[LiveRequest]] = {}

    def __len__(self) -> int:
        return sum(len(requests) for requests in self._by_session.values())

    @contextmanager
    def hold(self, session_id: str, key_id: str) -> Iterator[LiveRequest]:
        """Run a request inside ``with access.hold(...) as live: with live.cancel_scope:``.

        The request is registered for the duration of the block; :meth:`end_session` and
        :meth:`end_key` cancel its scope.
        """
        live = LiveRequest(session_id, key_id)
        self._by_session.setdefault(session_id, set()).add(live)
        self._by_key.setdefault(key_id, set()).add(live)
        try:
            yield live
        finally:
            _discard(self._by_session, session_id, live)
            _discard(self._by_key, key_id, live)

    def end_session(self, session_id: str, why: str = "signed_out") -> int:
        """Cancel every request of the browser session ``session_id``; return how many."""
        return _cancel(self._by_session.get(session_id, ()), why)

    def end_key(self, key_id: str, why: str = "revoked") -> int:
        """Cancel every request of every session opened with key ``key_id``; return how many."""
        return _cancel(self._by_key.get(key_id, ()), why)


def _discard(index: dict[str, set[LiveRequest]], name: str, live: LiveRequest) -> None:
    requests = index.get(name)
    if requests is not None:
        requests.discard(live)
        if not requests:
            del index[name]


def _cancel(requests: set[LiveRequest] | tuple[()], why: str) -> int:
    count = 0
    for live in list(requests):
        if live.ended_by is None:
            live.ended_by = why
            live.cancel_scope.cancel()
            count += 1
    return count
