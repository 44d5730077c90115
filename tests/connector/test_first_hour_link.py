"""The connector's first-hour fixes (issue 14): what its status and log say.

``retrying`` is false while connected (item 11); an upgrade refused with 404 reads "no relay
at this path", with 401 "the key" (item 4); a link that stays down is summed up in the log
instead of one line per retry (item 9).
"""

from __future__ import annotations

import logging

import pytest
import trio

from connector import Connector, LinkState
from connector._connector import LINK_DOWN_SUMMARY_EVERY
from tests.support.fake_http import FakeHttpServer, Reply, serve_fake
from tests.support.fake_relay import fake_relay_config, start_fake_relay

#: Seconds any test here may take.
TEST_TIMEOUT = 15


async def test_status_is_not_retrying_while_connected(nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        fake = await start_fake_relay(nursery)
        connector = Connector(fake_relay_config(fake.ws_url))
        await nursery.start(connector.run)
        await connector.wait_state(LinkState.CONNECTED)
        status = connector.status()
        assert status.retrying is False
        assert status.to_json()["retrying"] is False
        # Once the link is lost, a retry is coming again.
        session = await fake.session()
        await session.aclose(1011, "test")
        await connector.wait_state(LinkState.DOWN)
        assert connector.status().retrying is True


async def first_error(connector: Connector, nursery: trio.Nursery) -> str:
    await nursery.start(connector.run)
    await connector.wait_state(LinkState.DOWN)
    error = connector.status().last_error
    assert error is not None
    return error


async def test_a_wrong_path_is_not_reported_as_a_bad_key(nursery: trio.Nursery) -> None:
    # A web server that is not a relay: every path answers 404, the upgrade too.
    with trio.fail_after(TEST_TIMEOUT):
        async with serve_fake(FakeHttpServer()) as server:
            error = await first_error(Connector(fake_relay_config(server.ws_url)), nursery)
    assert "no relay at" in error
    assert "404" in error
    assert "key" not in error.split(";")[0]


async def test_a_refused_key_says_so_and_names_the_way_out(nursery: trio.Nursery) -> None:
    server = FakeHttpServer()
    server.reply_raw("GET", "/ws/relay", Reply(status=401, body=b"{}"))
    with trio.fail_after(TEST_TIMEOUT):
        async with serve_fake(server):
            error = await first_error(Connector(fake_relay_config(server.ws_url)), nursery)
    assert "refused the API key (HTTP 401" in error
    assert "repowire setup --relay --new-key" in error


async def test_repeated_failures_are_summed_up_in_the_log(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="repowire.connector")
    server = FakeHttpServer()
    server.reply_raw("GET", "/ws/relay", Reply(status=500, body=b"{}"))
    attempts = 2 * LINK_DOWN_SUMMARY_EVERY
    with trio.fail_after(TEST_TIMEOUT):
        async with serve_fake(server):
            connector = Connector(fake_relay_config(server.ws_url))
            await nursery.start(connector.run)
            # Polled: each attempt passes CONNECTING and DOWN faster than a waiter may see.
            while connector.status().attempts <= attempts:  # noqa: ASYNC110
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    lines = [
        record.getMessage()
        for record in caplog.records
        if record.name == "repowire.connector" and record.levelno >= logging.INFO
    ]
    assert lines[0].startswith("relay link down (relay refused the upgrade (HTTP 500))")
    summaries = [line for line in lines if line.startswith("relay link still down after")]
    assert all("last error: relay refused the upgrade (HTTP 500)" in s for s in summaries)
    assert [s.split(" attempts")[0] for s in summaries[:2]] == [
        f"relay link still down after {LINK_DOWN_SUMMARY_EVERY}",
        f"relay link still down after {2 * LINK_DOWN_SUMMARY_EVERY}",
    ]
    # One line for the first failure, one per summary: not one per retry.
    assert len(lines) == 1 + len(summaries)
