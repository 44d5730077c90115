"""What a relay knows of its key store's health.

:class:`StoreHealth` is up or down: down from the first :class:`StoreUnavailable` a request or
the probe (:meth:`StoreHealth.probe`, a ping every :data:`PROBE_INTERVAL` seconds) meets, up
again when the probe reaches the store. ``/health`` and the ``repowire_relay_store_up`` gauge
report it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

from ._store import StoreError
from ._store_api import Store, StoreUnavailable

log = logging.getLogger("repowire.relay.store")

#: Seconds between two pings of the store by :meth:`StoreHealth.probe`: how soon ``/health``
#: sees an outage nobody's request met, and its end.
PROBE_INTERVAL: Final = 1.0
#: Seconds one probe ping may take before it counts as a failure (the store's own io timeout
#: also bounds it).
PROBE_TIMEOUT: Final = 2.0


class StoreHealth:
    """Whether the store answers, as last seen. ``on_change`` is called with the new state
    (the metrics gauge). Starts up; single-threaded (the relay's event loop)."""

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self._up = True
        self._on_change = on_change
        self._changed = trio.Event()
        if on_change is not None:
            on_change(True)

    @property
    def up(self) -> bool:
        return self._up

    async def wait_until(self, *, up: bool) -> None:
        """Return once the store is seen up (or down); at once if it is. The caller bounds
        the wait."""
        while self._up != up:
            await self._changed.wait()

    def _set(self, up: bool) -> None:
        self._up = up
        self._changed.set()
        self._changed = trio.Event()
        if self._on_change is not None:
            self._on_change(up)

    def failed(self, error: BaseException) -> None:
        """The store could not be reached (logged once per outage, without a secret: store
        messages never hold one)."""
        if self._up:
            # The text only: a log record holding the exception would keep its traceback
            # (and the failed connection it points to) alive for as long as it is kept.
            log.warning("key store unavailable: %s", str(error))
            self._set(False)

    def answered(self) -> None:
        """The store answered."""
        if not self._up:
            log.info("key store reachable again")
            self._set(True)

    async def probe(
        self,
        store: Store,
        interval: float = PROBE_INTERVAL,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled, ping ``store`` every ``interval`` seconds and record the answer.
        Reports started after the first ping. Never raises for a failing store."""
        started = False
        while True:
            try:
                with trio.fail_after(PROBE_TIMEOUT):
                    await store.ping()
            except (StoreError, trio.TooSlowError) as exc:
                self.failed(exc if isinstance(exc, StoreError) else StoreUnavailable("no answer"))
            else:
                self.answered()
            if not started:
                started = True
                task_status.started()
            await trio.sleep(interval)
