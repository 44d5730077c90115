"""A download's stream window grows on the relay, and the growth is charged to the scope's own
growth quota (``max_scope_window_growth``), apart from the bytes its streams are charged
(``max_scope_buffered``): taken while the stream holds it, refused past the quota without
failing the transfer, and given back when the stream ends."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from mux import BULK_SPLICE_CHUNK, MAX_STREAM_WINDOW, SPLICE_CHUNK, MuxStream
from protocol import DEFAULT_INITIAL_WINDOW_SIZE
from relay._quota import ScopeCounter, StreamScopeBudget
from relay._settings import RelaySettings, stream_cost
from tests.relay.test_tunnel_http import browser, pattern
from tests.support.relays import StackFactory
from tests.support.scripted import ScriptedHttp
from tests.support.stand_in import start_stand_in
from tests.support.waiting import eventually

MIB = 1024 * 1024
BODY = 24 * MIB
PIECE = 64 * 1024
HTTP_COST = stream_cost(RelaySettings(data_dir="unused"), "http")
GROWTH = MAX_STREAM_WINDOW - DEFAULT_INITIAL_WINDOW_SIZE
#: What reading a grown download in bulk pieces adds to the scope's growth.
BULK_EXTRA = BULK_SPLICE_CHUNK - SPLICE_CHUNK


async def download(stack: Any) -> tuple[int, list[tuple[int, int]]]:
    """A ``BODY``-byte download from a stand-in daemon. Returns the bytes the browser got
    (checked) and, after every piece it read, the scope's (bytes held, growth held)."""
    relay = stack.relay
    record, key = await relay.new_scope()
    cookie = await relay.session_cookie(record)
    state = relay.running.relay
    seen: list[tuple[int, int]] = []

    async def handler(stream: MuxStream) -> None:
        exchange = ScriptedHttp(stream)
        await exchange.receive_request()
        await exchange.read_body()
        await exchange.send_head(
            200, [("content-type", "application/octet-stream"), ("content-length", str(BODY))]
        )
        for offset in range(0, BODY, PIECE):
            await exchange.send_data(pattern(offset, PIECE))
        await exchange.finish()

    await start_stand_in(stack.links, relay.address, key, "laptop", handler)
    async with browser(relay.address) as client:
        await client.send_head("GET", "/download", [cookie])
        await client.end()
        head = await client.response()
        assert head.status_code == 200
        while (piece := await client.body_piece()) is not None:
            offset = client.received - len(piece)
            assert piece == pattern(offset, len(piece)), f"bad bytes at {offset}"
            seen.append(
                (state.scope_bytes.held(record.scope_id), state.scope_growth.held(record.scope_id))
            )
    await eventually(
        lambda: (
            (state.scope_bytes.held(record.scope_id), state.scope_growth.held(record.scope_id))
            == (0, 0)
        )
    )
    return int(client.received), seen


async def test_a_download_grows_its_window_and_the_scope_pays_for_it_while_it_lasts(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(60):
        received, seen = await download(await stacks())
    assert received == BODY
    # The stream's own cost throughout; its growth on top, up to the largest window, and the
    # larger pieces it is then read in.
    assert {held for held, _ in seen} == {HTTP_COST}
    assert max(growth for _, growth in seen) == GROWTH + BULK_EXTRA


async def test_growth_and_bulk_reads_stop_at_the_quota(stacks: StackFactory) -> None:
    with trio.fail_after(60):
        # Room for one doubling and the bulk reads, not for the second doubling.
        quota = DEFAULT_INITIAL_WINDOW_SIZE + BULK_EXTRA
        received, seen = await download(await stacks(max_scope_window_growth=quota))
    assert received == BODY
    assert max(growth for _, growth in seen) == quota


async def test_a_scope_without_room_for_growth_still_downloads_at_the_initial_window(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(60):
        # Less than one doubling: every growth is refused.
        stack = await stacks(max_scope_window_growth=DEFAULT_INITIAL_WINDOW_SIZE // 2)
        received, seen = await download(stack)
    assert received == BODY
    assert {growth for _, growth in seen} == {0}


async def test_growth_turned_off_grows_nothing(stacks: StackFactory) -> None:
    with trio.fail_after(60):
        received, seen = await download(await stacks(max_scope_window_growth=0))
    assert received == BODY
    assert {growth for _, growth in seen} == {0}


@pytest.mark.parametrize("value", [-1, 1.5, True, "64"])
def test_the_growth_quota_is_a_whole_number_of_at_least_zero(value: object) -> None:
    with pytest.raises(ValueError, match="max_scope_window_growth"):
        RelaySettings(data_dir="unused", max_scope_window_growth=value)  # type: ignore[arg-type]


class _Stream:
    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata = metadata


def test_a_replica_link_charges_each_streams_own_scope_and_a_stream_naming_none_grows_nothing() -> (
    None
):
    counter = ScopeCounter("bytes of window growth", 100)
    budget = StreamScopeBudget(counter)
    alice, bob = _Stream({"scope": "alice"}), _Stream({"scope": "bob"})
    assert budget.try_take(alice, 60)
    assert not budget.try_take(alice, 41)  # alice's quota, not the link's
    assert budget.try_take(bob, 100)
    assert not budget.try_take(_Stream({}), 1)
    assert not budget.try_take(_Stream({"scope": ""}), 1)
    budget.give_back(alice, 60)
    assert (counter.held("alice"), counter.held("bob")) == (0, 100)


async def test_a_bulk_mesh_stream_grows_and_gives_every_byte_back(stacks: StackFactory) -> None:
    """Both sides of a spliced mesh stream may grow and read in bulk pieces; all of it is the
    scope's while the stream lasts, and none of it afterwards."""
    total = 16 * MIB
    received: list[int] = []
    peaks: list[int] = []

    async def sink(stream: MuxStream) -> None:
        got = 0
        while data := await stream.receive_some(PIECE):
            got += len(data)
        received.append(got)
        await stream.aclose()

    with trio.fail_after(60):
        stack = await stacks()
        relay = stack.relay
        record, key = await relay.new_scope()
        growth = relay.running.relay.scope_growth
        await start_stand_in(stack.links, relay.address, key, "target", sink)
        source = await start_stand_in(stack.links, relay.address, key, "source", sink)
        stream = await source.session.open_stream({"kind": "mesh", "target": "target"})
        piece = pattern(0, PIECE)
        for _ in range(total // PIECE):
            await stream.send_all(piece)
            peaks.append(growth.held(record.scope_id))
        await stream.send_eof()
        await eventually(lambda: received == [total])
        await eventually(lambda: growth.held(record.scope_id) == 0)
    assert max(peaks) > 0  # the relay's receiving side grew
    assert max(peaks) <= GROWTH + BULK_EXTRA
