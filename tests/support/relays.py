"""The one way tests run a relay in-process: hypercorn on 127.0.0.1, under a nursery.

- :func:`relay_options`: settings of a test relay, :data:`FAST` timings and the bundled
  dashboard (as `repowire relay start` serves it) unless changed; ``dashboard_dir=None``
  serves none.
- :class:`RelayHandle`: a running relay: its address, its key store, and :meth:`new_scope` /
  :meth:`session_cookie` to mint keys and browser sessions without going through HTTP.
- :class:`RelayRunner`: a relay on a fixed data directory that can be stopped (gracefully, as
  on SIGTERM, or by cancellation) and started again on the same port; :func:`start_relay` is
  its one-shot form.
- :func:`running_relay` and :class:`RunningStack`: a relay and a nursery for the daemon links
  that talk to it, torn down links last; :func:`relay_stacks` runs as many as a test asks for
  (the relay tests' ``stacks`` fixture), :func:`scoped_relay` one with a scope's key and cookie.

Relays as processes (`repowire relay start`) are :mod:`tests.support.processes`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing

from relay import KeyRecord, RelaySettings, RunningRelay, Store, serve_relay
from repowire.dashboard import static_dir

from .listener import LoopbackUrls

#: Relay settings that keep tests fast: short grace, frequent pings.
FAST: dict[str, Any] = {"shutdown_grace": 1.0, "link_ping_interval": 2.0, "link_ping_timeout": 2.0}
#: Seconds a browser session minted by :meth:`RelayHandle.session_cookie` lasts.
SESSION_TTL = 3600
#: Seconds a relay gets, when a test ends, to close its links before they are cancelled.
STOP_TIMEOUT = 5.0
#: Seconds without any runnable task that count as "the links have taken the close in".
SETTLE_TIME = 0.02


def relay_options(**settings: Any) -> dict[str, Any]:
    """Settings of a test relay: the bundled dashboard, :data:`FAST`, then ``settings``."""
    return {"dashboard_dir": static_dir(), **FAST, **settings}


@attrs.define(kw_only=True)
class RelayHandle(LoopbackUrls):
    """A running relay (``address``, ``url`` and ``ws_url`` as :class:`LoopbackUrls`)."""

    running: RunningRelay

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def store(self) -> Store:
        """The relay's key store (scopes, keys, sessions; every call is awaited)."""
        return self.running.relay.store

    async def new_scope(self, label: str = "test") -> tuple[KeyRecord, str]:
        """A new user scope and its key, made in the relay's store."""
        return await self.store.create_scope(label=label, now=time.time())

    async def session_cookie(self, record: KeyRecord) -> tuple[str, str]:
        """A ``("Cookie", ...)`` header of a fresh browser session for ``record``'s scope."""
        session_id = await self.store.create_session(record, now=time.time(), ttl=SESSION_TTL)
        return ("Cookie", f"repowire_session={session_id}")


class RelayRunner:
    """A relay in ``nursery`` on a fixed data directory that tests can stop and start again.

    Settings are :func:`relay_options` of ``settings``. The first start binds a port the
    system picks; a restart takes the same port (and finds the same key store) unless told
    otherwise.
    """

    def __init__(self, nursery: trio.Nursery, data_dir: Path, **settings: Any) -> None:
        self._nursery = nursery
        self.data_dir = data_dir
        self.settings: dict[str, Any] = relay_options(**settings)
        self.handle: RelayHandle | None = None
        #: The port of the last start (0 before the first).
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    @property
    def running(self) -> bool:
        return self.handle is not None

    async def start(self, port: int | None = None) -> RelayHandle:
        """Start the relay on ``port`` (by default the port it had; 0 picks one) and return
        once it listens. Raises what :func:`relay.serve_relay` raises (ListenError...)."""
        assert self.handle is None, "the relay is already running"
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        chosen = self.port if port is None else port
        running: RunningRelay = await self._nursery.start(self._run, chosen)
        self.handle = RelayHandle(running=running)
        self.port = running.port
        return self.handle

    async def _run(self, port: int, *, task_status: trio.TaskStatus[RunningRelay]) -> None:
        assert self._scope is not None
        settings = RelaySettings(data_dir=self.data_dir, port=port, **self.settings)
        try:
            with self._scope:
                await serve_relay(settings, task_status=task_status)
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does: go-away, then close code 4503)."""
        assert self.handle is not None, "the relay is not running"
        self.handle.running.shutdown()

    async def wait_stopped(self) -> None:
        """Return once the relay's task has ended (however it was stopped)."""
        await self._stopped.wait()

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop the relay and wait until it is gone.

        ``graceful``: :meth:`shutdown`. Otherwise the relay's task is cancelled, as when its
        process is torn down.
        """
        assert self.handle is not None and self._scope is not None, "the relay is not running"
        if graceful:
            self.shutdown()
        else:
            self._scope.cancel()
        await self._stopped.wait()
        self.handle = None

    async def restart(self, *, graceful: bool = True) -> RelayHandle:
        """:meth:`stop`, then :meth:`start` on the same port."""
        await self.stop(graceful=graceful)
        return await self.start()


async def start_relay(nursery: trio.Nursery, data_dir: Path, **settings: Any) -> RelayHandle:
    """A running relay in ``nursery`` (a :class:`RelayRunner` started once)."""
    return await RelayRunner(nursery, data_dir, **settings).start()


@attrs.frozen(kw_only=True)
class RunningStack:
    """A relay and the nursery its daemon links (stand-ins, real connectors) run in."""

    relay: RelayHandle
    links: trio.Nursery
    runner: RelayRunner


@asynccontextmanager
async def running_relay(data_dir: Path, **settings: Any) -> AsyncIterator[RunningStack]:
    """A relay (:class:`RelayRunner` with ``settings``) and a nursery for links and daemons.

    On exit the relay shuts down gracefully first (go-away, links closed with 4503, as on
    SIGTERM) while the links still run, so their WebSockets close with a full handshake; once
    the relay has stopped and the links have taken that in, the links nursery is cancelled.
    (Cancelling a live link instead cancels trio-websocket's reader with it, and the session's
    close then waits out its whole timeout for an answer nobody reads.)
    """
    async with trio.open_nursery() as relay_nursery:
        runner = RelayRunner(relay_nursery, data_dir, **settings)
        relay = await runner.start()
        async with trio.open_nursery() as links:
            try:
                yield RunningStack(relay=relay, links=links, runner=runner)
            finally:
                relay.running.shutdown()
                with trio.move_on_after(STOP_TIMEOUT):
                    await runner.wait_stopped()
                    await trio.testing.wait_all_tasks_blocked(SETTLE_TIME)
                links.cancel_scope.cancel()


StackFactory = Callable[..., Awaitable[RunningStack]]


@asynccontextmanager
async def relay_stacks(base_dir: Path) -> AsyncIterator[StackFactory]:
    """Yield ``start``: ``await start(**settings)`` runs one more :func:`running_relay` (its
    data directory under ``base_dir``) in a task of this context, so any task may call it.
    Everything started is torn down on exit, each relay's links before the relay."""
    stop = trio.Event()
    started = 0

    async def run(
        data_dir: Path,
        settings: dict[str, Any],
        *,
        task_status: trio.TaskStatus[RunningStack],
    ) -> None:
        async with running_relay(data_dir, **settings) as stack:
            task_status.started(stack)
            await stop.wait()

    async with trio.open_nursery() as nursery:

        async def start(**settings: Any) -> RunningStack:
            nonlocal started
            started += 1
            stack: RunningStack = await nursery.start(run, base_dir / f"relay-{started}", settings)
            return stack

        try:
            yield start
        finally:
            stop.set()


async def scoped_relay(
    stacks: StackFactory, **settings: Any
) -> tuple[RunningStack, str, tuple[str, str]]:
    """A relay, a new scope's key and a browser session cookie for that scope."""
    stack = await stacks(**settings)
    record, key = await stack.relay.new_scope()
    return stack, key, await stack.relay.session_cookie(record)
