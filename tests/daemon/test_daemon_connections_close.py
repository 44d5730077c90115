"""The local daemon closes its connections as HTTP says it must (as the relay does).

quart-trio cancels its request task when hypercorn reports the disconnect inside the app's
last send; that cancel used to land in hypercorn's own close and idle-timer code, so after
any page the connection stayed open for ever: neither ``Connection: close`` nor the
keep-alive idle timeout ended it.
"""

from __future__ import annotations

import pytest
import trio

from tests.relay.test_connections_close import PROMPT, request_then_eof
from tests.support.daemons import DaemonFactory

#: hypercorn's default keep-alive idle timeout, which the daemon keeps (seconds).
DAEMON_IDLE_TIMEOUT = 5.0
#: Daemon pages asked for: JSON routes, a 404, the dashboard.
PAGES = ("/health", "/peers", "/no-such-page", "/dashboard/")


@pytest.mark.parametrize("path", PAGES)
async def test_a_connection_close_request_gets_eof_at_once(
    daemon_factory: DaemonFactory, path: str
) -> None:
    daemon = await daemon_factory()
    with trio.fail_after(5):
        status, _, took = await request_then_eof(daemon.address, path, close=True)
    assert status in (200, 404)
    assert took < PROMPT, f"EOF {took:.2f} s after the response"


async def test_an_idle_keep_alive_connection_ends_after_the_idle_timeout(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = await daemon_factory()
    with trio.fail_after(DAEMON_IDLE_TIMEOUT + 5):
        status, _, took = await request_then_eof(daemon.address, "/health", close=False)
    assert status == 200
    assert took < DAEMON_IDLE_TIMEOUT + PROMPT, f"EOF {took:.2f} s after the response"
