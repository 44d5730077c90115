"""Stream windows that grow under bulk transfers (``mux.link_mux_config``): a reader that keeps
up gets a larger window, a stalled one never does, and every byte of growth is charged to the
session's :class:`mux.WindowBudget` and given back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from mux import (
    MAX_STREAM_WINDOW,
    MuxSession,
    MuxStream,
    link_mux_config,
    memory_transport_pair,
)
from protocol import DEFAULT_INITIAL_WINDOW_SIZE, Role

TOTAL = 8 * 1024 * 1024


class Budget:
    """A :class:`mux.WindowBudget` with a limit, recording what is held."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0

    def try_take(self, stream: MuxStream, amount: int) -> bool:
        if self.held + amount > self.limit:
            self.refused += 1
            return False
        self.held += amount
        return True

    def give_back(self, stream: MuxStream, amount: int) -> None:
        assert amount <= self.held
        self.held -= amount


@asynccontextmanager
async def link(budget: Budget | None = None) -> AsyncIterator[tuple[MuxSession, MuxSession]]:
    """A relay-role session (growing windows, charging ``budget``) and a connector."""
    relay_end, connector_end = memory_transport_pair()
    config = link_mux_config()
    async with trio.open_nursery() as nursery:
        relay = MuxSession(relay_end, Role.RELAY, config, window_budget=budget)
        connector = MuxSession(connector_end, Role.CONNECTOR, config)
        nursery.start_soon(connector.run)
        await nursery.start(relay.run)
        try:
            yield relay, connector
        finally:
            nursery.cancel_scope.cancel()


async def send_bulk(stream: MuxStream, total: int) -> None:
    """Send ``total`` bytes and FIN; stops quietly if the session or stream breaks first (the
    tests that end them expect that)."""
    piece = b"z" * (64 * 1024)
    with contextlib.suppress(trio.BrokenResourceError):
        for _ in range(total // len(piece)):
            await stream.send_all(piece)
        await stream.send_eof()


async def read_all(stream: MuxStream, sizes: list[int]) -> int:
    got = 0
    while data := await stream.receive_some():
        got += len(data)
        sizes.append(stream.session.protocol.receive_window(stream.stream_id)[1])
    return got


async def test_a_reader_that_keeps_up_grows_its_window_to_the_maximum_and_pays_it_back() -> None:
    budget = Budget(limit=64 * 1024 * 1024)
    sizes: list[int] = []
    with trio.fail_after(20):
        async with link(budget) as (relay, connector):
            async with trio.open_nursery() as nursery:
                inbound = await connector.open_stream()
                nursery.start_soon(send_bulk, inbound, TOTAL)
                stream = await relay.accept_stream()
                assert await read_all(stream, sizes) == TOTAL
                grown = max(sizes)
                assert grown == MAX_STREAM_WINDOW
                # Charged while the stream lives: exactly the growth.
                assert budget.held == MAX_STREAM_WINDOW - DEFAULT_INITIAL_WINDOW_SIZE
                await stream.aclose()
            assert budget.held == 0
            assert (
                relay.protocol.window_growth_available == relay.config.protocol.window_growth_budget
            )


async def test_a_stalled_reader_never_grows_its_window() -> None:
    budget = Budget(limit=64 * 1024 * 1024)
    with trio.fail_after(20):
        async with link(budget) as (relay, connector), trio.open_nursery() as nursery:
            inbound = await connector.open_stream()
            nursery.start_soon(send_bulk, inbound, TOTAL)
            stream = await relay.accept_stream()
            # Nobody reads: the sender fills the initial window and waits for credit.
            await trio.testing.wait_all_tasks_blocked()
            assert stream._buffered() == DEFAULT_INITIAL_WINDOW_SIZE
            assert relay.protocol.receive_window(stream.stream_id) == (
                0,
                DEFAULT_INITIAL_WINDOW_SIZE,
            )
            assert budget.held == 0
            nursery.cancel_scope.cancel()


async def test_growth_stops_where_the_budget_does_and_the_transfer_still_completes() -> None:
    budget = Budget(limit=DEFAULT_INITIAL_WINDOW_SIZE)  # one doubling, never the second
    sizes: list[int] = []
    with trio.fail_after(20):
        async with link(budget) as (relay, connector):
            async with trio.open_nursery() as nursery:
                inbound = await connector.open_stream()
                nursery.start_soon(send_bulk, inbound, TOTAL)
                stream = await relay.accept_stream()
                assert await read_all(stream, sizes) == TOTAL
                assert max(sizes) == 2 * DEFAULT_INITIAL_WINDOW_SIZE
                assert budget.refused > 0
                assert budget.held == DEFAULT_INITIAL_WINDOW_SIZE
                await stream.aclose()
            assert budget.held == 0  # the stream ended: its growth is back


async def grown_stream(
    relay: MuxSession,
    connector: MuxSession,
    budget: Budget,
    nursery: trio.Nursery,
    *,
    ends: bool = False,
) -> tuple[MuxStream, MuxStream]:
    """A connector-opened stream sending bulk, read at the relay until its window has grown to
    the maximum, then left unread; with ``ends`` the sender stops at what the window takes
    and sends its FIN. Returns (the relay's end, the connector's end)."""
    inbound = await connector.open_stream()
    if ends:

        async def send_then_fin() -> None:
            piece = b"z" * (64 * 1024)
            with contextlib.suppress(trio.BrokenResourceError):
                while budget.held < MAX_STREAM_WINDOW - DEFAULT_INITIAL_WINDOW_SIZE:
                    await inbound.send_all(piece)
                room = connector.protocol.local_flow_control_window(inbound.stream_id)
                await inbound.send_all(b"z" * room)
                await inbound.send_eof()

        nursery.start_soon(send_then_fin)
    else:
        nursery.start_soon(send_bulk, inbound, TOTAL)
    stream = await relay.accept_stream()
    while budget.held < MAX_STREAM_WINDOW - DEFAULT_INITIAL_WINDOW_SIZE:
        assert await stream.receive_some()
    # The sender fills what is left of the grown window: it stays buffered, unread.
    await trio.testing.wait_all_tasks_blocked()
    assert stream._buffered() > 0
    return stream, inbound


async def test_growth_is_held_while_bytes_stay_buffered_after_the_session_ends() -> None:
    budget = Budget(limit=64 * 1024 * 1024)
    with trio.fail_after(20):
        async with link(budget) as (relay, connector), trio.open_nursery() as nursery:
            stream, _ = await grown_stream(relay, connector, budget, nursery)
            await relay.aclose()
            # The session is gone, its buffered bytes are not: still charged.
            assert budget.held == MAX_STREAM_WINDOW - DEFAULT_INITIAL_WINDOW_SIZE
            while stream._buffered():
                assert await stream.receive_some()
                if stream._buffered():
                    assert budget.held > 0
            assert budget.held == 0  # read out: given back
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()
            nursery.cancel_scope.cancel()


async def test_closing_a_stream_of_an_ended_session_gives_its_growth_back() -> None:
    budget = Budget(limit=64 * 1024 * 1024)
    with trio.fail_after(20):
        async with link(budget) as (relay, connector), trio.open_nursery() as nursery:
            stream, _ = await grown_stream(relay, connector, budget, nursery)
            await relay.aclose()
            assert budget.held > 0
            await stream.aclose()
            assert budget.held == 0
            nursery.cancel_scope.cancel()


async def test_growth_is_held_after_fin_both_ways_until_the_buffer_is_read() -> None:
    budget = Budget(limit=64 * 1024 * 1024)
    with trio.fail_after(20):
        async with link(budget) as (relay, connector), trio.open_nursery() as nursery:
            stream, _ = await grown_stream(relay, connector, budget, nursery, ends=True)
            await stream.send_eof()
            await trio.testing.wait_all_tasks_blocked()
            # FIN both ways: the session has forgotten the stream, its bytes are unread.
            assert stream.stream_id not in relay._streams
            assert budget.held > 0
            while await stream.receive_some():
                if stream._buffered():
                    assert budget.held > 0
            assert budget.held == 0


async def test_growth_is_held_after_a_fin_then_a_reset_until_the_stream_is_closed() -> None:
    budget = Budget(limit=64 * 1024 * 1024)
    with trio.fail_after(20):
        async with link(budget) as (relay, connector), trio.open_nursery() as nursery:
            stream, inbound = await grown_stream(relay, connector, budget, nursery, ends=True)
            inbound.reset()  # after its FIN: the bytes sent stay readable
            await trio.testing.wait_all_tasks_blocked()
            assert stream.stream_id not in relay._streams
            assert stream._buffered() > 0
            assert budget.held > 0
            await stream.aclose()
            assert budget.held == 0


async def test_the_default_driver_settings_never_grow_a_window() -> None:
    relay_end, connector_end = memory_transport_pair()
    sizes: list[int] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            connector = MuxSession(connector_end, Role.CONNECTOR)
            nursery.start_soon(connector.run)
            relay = await nursery.start(MuxSession(relay_end, Role.RELAY).run)
            inbound = await connector.open_stream()
            nursery.start_soon(send_bulk, inbound, 2 * 1024 * 1024)
            stream = await relay.accept_stream()
            assert await read_all(stream, sizes) == 2 * 1024 * 1024
            assert set(sizes) <= {DEFAULT_INITIAL_WINDOW_SIZE, 0}
            nursery.cancel_scope.cancel()


def test_the_message_limit_comes_from_the_peers_header_and_never_goes_below_the_floor() -> None:
    from mux import LINK_MESSAGE_FLOOR, MAX_MESSAGE_HEADER, peer_message_limit

    assert peer_message_limit([]) == LINK_MESSAGE_FLOOR
    assert peer_message_limit([(b"Repowire-Max-Message", b" 1048576 ")]) == 1048576
    assert peer_message_limit([(MAX_MESSAGE_HEADER, b"4096")]) == LINK_MESSAGE_FLOOR
    for unusable in (b"", b"-1", b"1e9", b"0x100000", b"9" * 13, b"\xff", b"\xb2", b"1\xb9"):
        assert peer_message_limit([(MAX_MESSAGE_HEADER, unusable)]) == LINK_MESSAGE_FLOOR


class _Source:
    def __init__(self, growth: int) -> None:
        self.window_growth = growth


def test_splice_reads_grow_for_a_bulk_source_once_the_budget_takes_the_extra() -> None:
    from mux import BULK_SPLICE_CHUNK, SPLICE_CHUNK, GrowingChunks

    extra = BULK_SPLICE_CHUNK - SPLICE_CHUNK
    budget = Budget(limit=extra)
    payer = object()
    chunks = GrowingChunks(budget, payer)  # type: ignore[arg-type]
    quiet, bulk, other_bulk = _Source(0), _Source(1), _Source(1)
    assert chunks(quiet) == SPLICE_CHUNK  # no growth: small, nothing taken
    assert budget.held == 0
    assert chunks(bulk) == BULK_SPLICE_CHUNK
    assert chunks(bulk) == BULK_SPLICE_CHUNK  # charged once per source
    assert budget.held == extra
    assert chunks(other_bulk) == SPLICE_CHUNK  # the budget is full: stays small
    assert chunks(other_bulk) == SPLICE_CHUNK
    assert budget.refused == 1  # and does not ask again
    chunks.release()
    chunks.release()
    assert budget.held == 0
