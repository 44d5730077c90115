"""A key revoked or rotated while one of its daemon links is still in its handshake ends that
link with 4403, and the link is never registered.

Each test holds a stand-in's HELLO back (``hello_delay``) so the relay is in the link's
handshake when the key goes, then checks the link is closed with ``KEY_REVOKED`` well before
the HELLO would have been sent, and that the relay never lists it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from protocol import CloseCode
from relay import Relay
from tests.support.clients import http_request
from tests.support.relays import RunningStack, running_relay
from tests.support.stand_in import StandIn, hold_stream, start_stand_in

#: Seconds the stand-in holds its HELLO back: the relay is in the handshake that long.
HELLO_DELAY = 3.0
#: Seconds within which the revoked link must be closed (well under :data:`HELLO_DELAY`).
PROMPT = 1.5
#: Hard stop for one test, relay start and teardown included.
TEST_LIMIT = 30


async def _arriving_link(stack: RunningStack, daemon_id: str) -> tuple[Relay, str, str, StandIn]:
    """A scope and a stand-in link of it, still in its handshake on the relay's side."""
    relay = stack.relay.running.relay
    record, key = await stack.relay.new_scope(daemon_id)
    stand_in = await start_stand_in(
        stack.links, stack.relay.address, key, daemon_id, hold_stream, hello_delay=HELLO_DELAY
    )
    assert relay.links.is_arriving(record.scope_id, daemon_id)
    return relay, record.key_id, key, stand_in


async def _assert_revoked_and_never_registered(
    relay: Relay, key_id: str, stand_in: StandIn
) -> None:
    with trio.fail_after(PROMPT):
        await stand_in.finished.wait()
    assert stand_in.close_code == CloseCode.KEY_REVOKED
    # Past the moment the HELLO would have gone out: nothing of the key is (or was) listed.
    await trio.sleep(HELLO_DELAY)
    assert relay.links.for_key(key_id) == []
    assert relay.links.all() == []


async def test_a_key_revoked_by_the_store_during_a_link_handshake_ends_that_link(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with running_relay(tmp_path / "relay") as stack:
            relay, key_id, _, stand_in = await _arriving_link(stack, "revoked")
            await relay.store.revoke_key(key_id, now=time.time())  # the watcher takes it from here
            await _assert_revoked_and_never_registered(relay, key_id, stand_in)


async def test_end_key_access_ends_links_still_in_their_handshake(tmp_path: Path) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with running_relay(tmp_path / "relay") as stack:
            relay, key_id, _, stand_in = await _arriving_link(stack, "ended")
            await relay.end_key_access(key_id, "revoked")
            await _assert_revoked_and_never_registered(relay, key_id, stand_in)


async def test_rotation_through_the_api_during_a_link_handshake_ends_that_link(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with running_relay(tmp_path / "relay") as stack:
            relay, key_id, key, stand_in = await _arriving_link(stack, "rotated")
            answer = await http_request(
                stack.relay.address,
                "POST",
                "/api/v1/keys/rotate",
                headers=[("Authorization", f"Bearer {key}")],
            )
            assert answer.status == 200
            await _assert_revoked_and_never_registered(relay, key_id, stand_in)


async def test_a_link_whose_key_went_unseen_during_its_handshake_is_refused_at_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The revocation lands where no watcher pass ends the link (as when the watcher looked
    just before the link was tracked): the check before registration refuses it."""
    with trio.fail_after(TEST_LIMIT):
        async with running_relay(tmp_path / "relay") as stack:
            relay, key_id, _, stand_in = await _arriving_link(stack, "unseen")

            async def watcher_missed_it(key_id: str, why: str) -> None:
                await trio.lowlevel.checkpoint()

            monkeypatch.setattr(relay, "end_key_access", watcher_missed_it)
            await relay.store.revoke_key(key_id, now=time.time())
            with trio.fail_after(HELLO_DELAY + PROMPT):
                await stand_in.finished.wait()
            assert stand_in.close_code == CloseCode.KEY_REVOKED
            assert relay.links.all() == []
