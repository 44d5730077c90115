"""A connector displaced by another link with the same daemon id (close 4409).

Policy: neither give up for good (a stolen key, or a stale second process, would otherwise
leave the daemon unreachable until someone restarts it) nor fight (two daemons sharing an id
would displace each other in a tight loop). The displaced connector says so in its status and
redials only after ``BackoffConfig.replaced_delay``; once the other link is gone it is back.
"""

from __future__ import annotations

import trio

from connector import LinkState
from protocol import BackoffConfig
from tests.support.stack import Stack
from tests.support.stand_in import identity_handler, start_stand_in

#: The displaced connector's long delay, shortened for the test.
REPLACED_DELAY = 1.0
#: ``tests.support.stack.fast_connector_config``'s backoff, with that delay.
BACKOFF = BackoffConfig(
    base=0.05, cap=1.0, stable_after=5.0, restart_spread=0.2, replaced_delay=REPLACED_DELAY
)


async def test_a_displaced_connector_waits_the_replaced_delay_then_takes_its_link_back(
    stack: Stack,
) -> None:
    with trio.fail_after(20):
        relay = await stack.start_relay()
        _, key = await relay.new_scope()
        laptop = await stack.start_daemon(relay, key, "laptop", backoff=BACKOFF)
        connector = laptop.connector

        # Someone else connects with the same key and daemon id.
        intruder = await start_stand_in(
            stack.relays, relay.address, key, "laptop", identity_handler("intruder")
        )
        await connector.wait_state(LinkState.DOWN)
        displaced_at = trio.current_time()
        status = connector.status()
        assert status.retrying is True
        assert status.last_error is not None
        assert "4409" in status.last_error
        assert "replaced by another connection using this key" in status.last_error
        assert status.next_retry_at is not None and status.last_error_at is not None
        assert status.next_retry_at - status.last_error_at >= REPLACED_DELAY

        # No fight: nothing is dialled before the delay (its other delays are 50 ms).
        await trio.sleep(REPLACED_DELAY * 0.9)
        assert connector.status().attempts == 1
        assert not intruder.session.ended

        # The intruder leaves; the daemon comes back on its own, after the delay.
        await intruder.close()
        await connector.wait_state(LinkState.CONNECTED)
        assert trio.current_time() - displaced_at >= REPLACED_DELAY
        assert connector.status().attempts == 2


async def test_two_connectors_sharing_an_id_trade_the_link_at_most_once_per_delay(
    stack: Stack,
) -> None:
    with trio.fail_after(20):
        relay = await stack.start_relay()
        _, key = await relay.new_scope()
        first = await stack.start_daemon(relay, key, "laptop", backoff=BACKOFF)
        second = await stack.start_daemon(relay, key, "laptop", backoff=BACKOFF)
        window = 2.5 * REPLACED_DELAY
        await trio.sleep(window)
        dials = first.connector.status().attempts + second.connector.status().attempts
        # Each dial after the first two follows a displacement by at least REPLACED_DELAY.
        assert dials <= 2 + window / REPLACED_DELAY + 1
        # One of them holds the link at any time; neither has given up.
        assert len(relay.running.relay.links) == 1
        for handle in (first, second):
            status = handle.connector.status()
            assert status.state is LinkState.CONNECTED or status.retrying
