"""Per-scope quotas on the daemon endpoint: links per scope, and the mesh streams they open.

A key holder is not a friend: one scope may hold at most ``max_links_per_scope`` links (more
are refused with 4429 and a reason naming the limit; a link replacing one of the same daemon
id is not), its spliced mesh streams count against ``max_streams_per_scope``, and a mesh
stream waits at most ``stream_open_timeout`` for a slot on its target's link.
"""

from __future__ import annotations

import math
from pathlib import Path

import trio
import trio.testing

from connector import LinkState
from mux import MuxConfig, MuxStream, StreamResetError
from protocol import CloseCode, ErrorCode, SessionConfig
from tests.support.links import link_headers, link_refusal
from tests.support.relays import StackFactory
from tests.support.stack import start_connected_daemon
from tests.support.stand_in import StandIn, identity_handler, start_stand_in
from tests.support.waiting import eventually

#: The quota of links these tests run with.
LINKS = 3


async def hold(stream: MuxStream) -> None:
    """A daemon's mesh handler that keeps the stream open until the peer ends it."""
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass


async def reset_code(stream: MuxStream) -> int | None:
    """The code the relay reset ``stream`` with, or None if it was not reset."""
    try:
        await stream.send_all(b"hello")
        await stream.receive_some()
    except StreamResetError as exc:
        return exc.code
    return None


# ---------------------------------------------------------------------- links per scope


async def test_a_link_beyond_the_scope_quota_is_refused_with_4429(stacks: StackFactory) -> None:
    with trio.fail_after(20):
        stack = await stacks(max_links_per_scope=LINKS)
        relay = stack.relay
        _, key = await relay.new_scope()
        links = [
            await start_stand_in(stack.links, relay.address, key, f"d{i}", identity_handler("x"))
            for i in range(LINKS)
        ]
        refusal = await link_refusal(relay.address, link_headers(key, "one-too-many"))
        assert refusal.code == CloseCode.TOO_MANY_LINKS
        assert refusal.reason is not None and str(LINKS) in refusal.reason
        assert "quota" in refusal.reason
        # Another key's scope is not affected.
        _, other_key = await relay.new_scope()
        other = await start_stand_in(
            stack.links, relay.address, other_key, "d0", identity_handler("o")
        )
        assert not other.session.ended
        # A link that ends gives its slot back.
        await links[0].close()
        again = await start_stand_in(stack.links, relay.address, key, "late", identity_handler("l"))
        assert not again.session.ended
        metrics = relay.running.relay.metrics.render().decode()
        assert 'repowire_relay_links_refused_total{quota="links_per_scope"} 1.0' in metrics


async def test_a_replacing_link_is_not_refused_for_the_quota_and_the_count_stays_right(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(20):
        stack = await stacks(max_links_per_scope=LINKS)
        relay = stack.relay
        record, key = await relay.new_scope()
        counter = relay.running.relay.scope_links
        first: list[StandIn] = [
            await start_stand_in(stack.links, relay.address, key, f"d{i}", identity_handler("x"))
            for i in range(LINKS)
        ]
        # The scope is full, yet a new link of d0 (a daemon restarting) takes d0's place.
        replacement = await start_stand_in(
            stack.links, relay.address, key, "d0", identity_handler("new")
        )
        await first[0].finished.wait()
        assert first[0].close_code == CloseCode.REPLACED
        assert not replacement.session.ended
        await eventually(lambda: counter.held(record.scope_id) == LINKS)
        refusal = await link_refusal(relay.address, link_headers(key, "d9"))
        assert refusal.code == CloseCode.TOO_MANY_LINKS
        for stand_in in [replacement, *first[1:]]:
            await stand_in.close()
        await eventually(lambda: counter.held(record.scope_id) == 0)


async def test_a_connector_refused_for_the_quota_backs_off_and_says_why(
    stacks: StackFactory, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        stack = await stacks(max_links_per_scope=1)
        _, key = await stack.relay.new_scope()
        await start_stand_in(stack.links, stack.relay.address, key, "first", identity_handler("x"))
        dashboard = tmp_path / "dashboard"
        dashboard.mkdir()
        daemon = await start_connected_daemon(
            stack.links, stack.relay, key, "second", dashboard, wait=False
        )
        await daemon.connector.wait_state(LinkState.DOWN)
        status = daemon.connector.status()
        assert status.retrying is True
        assert status.last_error is not None
        assert "4429" in status.last_error and "too many links" in status.last_error
        assert status.next_retry_at is not None and status.last_error_at is not None
        cap = daemon.connector.config.backoff.cap
        assert status.next_retry_at - status.last_error_at >= cap / 2


# ---------------------------------------------------------------------- mesh streams


async def test_mesh_streams_count_against_the_scope_stream_quota(stacks: StackFactory) -> None:
    with trio.fail_after(20):
        stack = await stacks(max_streams_per_scope=2)
        relay = stack.relay
        record, key = await relay.new_scope()
        alpha = await start_stand_in(stack.links, relay.address, key, "alpha", hold)
        beta = await start_stand_in(stack.links, relay.address, key, "beta", hold)
        held = [await alpha.session.open_stream({"kind": "mesh", "target": "beta"}) for _ in "ab"]
        for stream in held:
            await stream.send_all(b"spliced")
        await eventually(lambda: len(beta.accepted) == 2)
        counter = relay.running.relay.scope_streams
        assert counter.held(record.scope_id) == 2
        refused = await alpha.session.open_stream({"kind": "mesh", "target": "beta"})
        assert await reset_code(refused) == ErrorCode.REFUSED_STREAM
        assert len(beta.accepted) == 2
        # Spliced streams that end give their slots back.
        for stream in held:
            await trio.aclose_forcefully(stream)
        await eventually(lambda: counter.held(record.scope_id) == 0)
        metrics = relay.running.relay.metrics.render().decode()
        assert 'repowire_relay_streams_refused_total{kind="mesh"} 1.0' in metrics


async def test_a_mesh_stream_waits_for_its_target_at_most_the_stream_open_timeout(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(20):
        timeout = 0.5
        stack = await stacks(stream_open_timeout=timeout)
        relay = stack.relay
        record, key = await relay.new_scope()
        alpha = await start_stand_in(stack.links, relay.address, key, "alpha", hold)
        # beta takes one stream at a time: the second waits for a slot that never frees.
        beta = await start_stand_in(
            stack.links,
            relay.address,
            key,
            "beta",
            hold,
            mux_config=MuxConfig(
                protocol=SessionConfig(max_concurrent_streams=1),
                keepalive_interval=math.inf,
                handshake_timeout=5.0,
            ),
        )
        first = await alpha.session.open_stream({"kind": "mesh", "target": "beta"})
        await first.send_all(b"spliced")
        await eventually(lambda: len(beta.accepted) == 1)
        started = trio.current_time()
        waiting = await alpha.session.open_stream({"kind": "mesh", "target": "beta"})
        assert await reset_code(waiting) == ErrorCode.REFUSED_STREAM
        waited = trio.current_time() - started
        assert timeout * 0.9 <= waited < timeout + 1.0
        assert len(beta.accepted) == 1
        # The refused stream gave its quota slot back; the spliced one still holds its own.
        await eventually(lambda: relay.running.relay.scope_streams.held(record.scope_id) == 1)
        await trio.aclose_forcefully(first)
