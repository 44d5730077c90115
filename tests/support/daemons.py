"""In-process daemons for tests: the real app under hypercorn on 127.0.0.1, port 0.

- :func:`write_dashboard`: a dashboard directory with an ``index.html`` (the ``dashboard_dir``
  fixture of the root conftest.py).
- :func:`start_daemon` and :class:`RunningDaemon`: a daemon under a nursery, its clock a
  :class:`FixedClock` the test may set; :data:`DaemonFactory` is the type of the daemon tests'
  ``daemon_factory`` fixture.
- :class:`LoopbackMesh`: a MeshClient that reaches other in-process daemons directly, adding
  the ``Repowire-Mesh-From`` header as the connector does.

A daemon together with its connector and a relay is :mod:`tests.support.stack`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from repowire.daemon import (
    MESH_FROM_HEADER,
    DaemonSettings,
    DaemonState,
    MeshClient,
    MeshDirectory,
    MeshError,
    MeshResponse,
    create_app,
    serve_daemon,
)

from .clients import Address, HttpResponse, http_request

#: Seconds a server gets to finish open connections at the end of a test.
TEST_GRACEFUL_TIMEOUT = 0.5
#: The version a test daemon reports.
TEST_VERSION = "0.0.test"


def write_dashboard(root: Path) -> Path:
    """Create ``root`` as a dashboard directory holding an ``index.html``; return it."""
    root.mkdir()
    (root / "index.html").write_text("<!doctype html><title>dashboard</title>")
    return root


class FixedClock:
    """A clock callable for DaemonState: returns ``now``, which tests may set."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@attrs.define(kw_only=True)
class RunningDaemon:
    daemon_id: str
    address: Address
    state: DaemonState
    clock: FixedClock

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    async def request(self, method: str, path: str, **kwargs: Any) -> HttpResponse:
        return await http_request(self.address, method, path, **kwargs)


async def start_daemon(
    nursery: trio.Nursery,
    *,
    daemon_id: str = "alpha",
    dashboard_dir: Path,
    mesh: MeshClient | None = None,
    relay_status: Callable[[], Mapping[str, object]] | None = None,
    settings: DaemonSettings | None = None,
    state: DaemonState | None = None,
    clock: FixedClock | None = None,
) -> RunningDaemon:
    """Serve a new daemon app on 127.0.0.1, port 0, under ``nursery``."""
    clock = clock or FixedClock()
    state = state or DaemonState(clock=clock)
    app = create_app(
        daemon_id=daemon_id,
        version=TEST_VERSION,
        state=state,
        mesh=mesh,
        relay_status=relay_status,
        dashboard_dir=dashboard_dir,
        settings=settings,
    )
    address: Address = await nursery.start(
        partial(serve_daemon, app, host="127.0.0.1", port=0, graceful_timeout=TEST_GRACEFUL_TIMEOUT)
    )
    return RunningDaemon(daemon_id=daemon_id, address=address, state=state, clock=clock)


#: The type of the ``daemon_factory`` fixture (see tests/daemon/conftest.py).
DaemonFactory = Callable[..., Awaitable[RunningDaemon]]


class LoopbackMesh:
    """A MeshClient for daemon ``own_id`` that reaches the daemons in ``peers`` directly.

    Requests carry ``Repowire-Mesh-From: own_id``, as the connector adds it. A daemon id not
    in ``peers`` raises ``MeshError("unknown_daemon")``; ids in ``offline`` raise
    ``daemon_offline``. ``calls`` records ``(daemon_id, method, path, body)``.
    """

    def __init__(self, own_id: str) -> None:
        self.own_id = own_id
        self.peers: dict[str, Address] = {}
        self.offline: set[str] = set()
        self.calls: list[tuple[str, str, str, bytes]] = []

    async def request(
        self,
        daemon_id: str,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> MeshResponse:
        self.calls.append((daemon_id, method, path, body))
        if daemon_id in self.offline:
            raise MeshError("daemon_offline", f"Daemon {daemon_id!r} is not connected.")
        if daemon_id not in self.peers:
            raise MeshError("unknown_daemon", f"No daemon {daemon_id!r} in this scope.")
        sent = [(k, v) for k, v in headers if k.lower() != MESH_FROM_HEADER.lower()]
        sent.append((MESH_FROM_HEADER, self.own_id))
        response = await http_request(self.peers[daemon_id], method, path, body=body, headers=sent)
        return MeshResponse(status=response.status, headers=response.headers, body=response.body)

    async def directory(self) -> MeshDirectory:
        return MeshDirectory(online=tuple(sorted(self.peers)))
