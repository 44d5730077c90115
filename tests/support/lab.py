"""The processes of one end-to-end test: relays and fault daemons, all stopped at the end.

:func:`open_lab` yields a :class:`Lab` whose processes are stopped with SIGTERM, then SIGKILL
after a bounded wait, whatever happens. Keys reach a fault daemon through its environment,
never its command line or a URL; nothing here prints a key or a cookie.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from .fault_daemon import FaultDaemon, start_fault_daemon
from .processes import ChildProcess, Cli, RelayProcess, create_key, stop_processes


class Lab:
    """The processes of one test. Use :func:`open_lab`, which stops them all at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        work = root / "work"
        work.mkdir(parents=True, exist_ok=True)
        self.cli = Cli(root / "home", work)
        self.children: list[ChildProcess] = []

    async def relay(self, name: str = "relay", *args: str) -> RelayProcess:
        """A started relay with its data directory ``root/name`` and extra flags ``args``."""
        relay = RelayProcess(self.cli, self.root / name, args, children=self.children)
        await relay.start()
        return relay

    async def key(self, relay: RelayProcess, label: str = "e2e") -> str:
        """A new scope's key, made with ``repowire relay keys create`` on the relay's store."""
        return await create_key(self.cli, relay.data_dir, label)

    async def fault_daemon(self, relay_url: str, key: str, daemon_id: str) -> FaultDaemon:
        """A fault daemon (:mod:`tests.support.fault_daemon`) linking to ``relay_url`` as
        ``daemon_id``, once its link is up."""
        return await start_fault_daemon(self.cli, relay_url, key, daemon_id, children=self.children)

    def output(self) -> str:
        """Everything every process of this lab wrote."""
        return "\n".join(child.stdout() + child.stderr() for child in self.children)

    def assert_no_secret(self, *secrets: str) -> None:
        """Fail if any process of this lab wrote one of ``secrets`` (keys, session ids); the
        message never repeats the secret."""
        output = self.output()
        for index, secret in enumerate(secrets):
            assert secret, "an empty secret proves nothing"
            assert secret not in output, f"secret #{index} appears in a process's output"

    async def stop_all(self) -> None:
        """SIGTERM every process still running, SIGKILL after a bounded wait (in parallel)."""
        await stop_processes(self.children)


@asynccontextmanager
async def open_lab(root: Path) -> AsyncIterator[Lab]:
    """A :class:`Lab` whose processes are all stopped on exit, even on cancellation."""
    lab = Lab(root)
    try:
        yield lab
    finally:
        await lab.stop_all()
