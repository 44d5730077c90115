"""The relay's own pages close their connections as HTTP says they must.

After a page the relay serves itself (Quart: ``/``, ``/health``, a 404, ``/static/...``), a
``Connection: close`` request's connection ends at once and a keep-alive one within the idle
timeout (``header_timeout``); 1,000 requests leave no descriptor behind. quart-trio cancels its
request task when hypercorn reports the disconnect inside the app's last send, which used to
land in hypercorn's own close and idle-timer code and leave the connection open for ever.
An early answer to a request whose body the relay does not read (401, 413) says
``Connection: close`` and the connection ends, so a client still sending learns it at once.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest
import trio

from tests.support.clients import Address
from tests.support.relays import RelayHandle, start_relay

#: Idle timeout of the relays here (``header_timeout``): a keep-alive connection ends then.
IDLE_TIMEOUT = 1.0
#: Slack for "at once" and for the idle timer's own scheduling.
PROMPT = 0.5
#: Sequential requests of the descriptor test, and the descriptors they may leave open.
REQUESTS = 1000
FD_MARGIN = 5
#: The mix of relay pages those requests ask for (a 404 included).
PAGES = ("/health", "/", "/api/v1/no-such-page", "/static/relay.css")
#: Body the early-answer test keeps sending after the answer (it must never get through).
ENDLESS_BODY = 256 * 1024 * 1024
CHUNK = 64 * 1024


@pytest.fixture
async def relay(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[RelayHandle]:
    yield await start_relay(nursery, tmp_path / "relay", header_timeout=IDLE_TIMEOUT)


async def request_then_eof(
    address: Address, path: str, *, close: bool, method: str = "GET"
) -> tuple[int, dict[bytes, bytes], float]:
    """Send one request on a new connection, read the response (by its framing, not by the
    end of the connection), then wait for the server to close it. Returns the status, the
    headers and the seconds from the end of the response to EOF."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        headers = [("host", f"{address[0]}:{address[1]}")]
        if close:
            headers.append(("connection", "close"))
        await stream.send_all(
            conn.send(h11.Request(method=method, target=path, headers=headers))
            + conn.send(h11.EndOfMessage())
        )
        status = 0
        head: dict[bytes, bytes] = {}
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(CHUNK))
            elif isinstance(event, h11.Response):
                status, head = event.status_code, dict(event.headers)
            elif isinstance(event, h11.EndOfMessage):
                break
        ended = trio.current_time()
        # Bounded: the caller's fail_after stops a server that never closes.
        while await stream.receive_some(CHUNK):
            pass
        return status, head, trio.current_time() - ended


@pytest.mark.parametrize("path", PAGES)
async def test_a_connection_close_request_gets_eof_at_once(relay: RelayHandle, path: str) -> None:
    with trio.fail_after(5):
        status, _, took = await request_then_eof(relay.address, path, close=True)
    assert status in (200, 404)
    assert took < PROMPT, f"EOF {took:.2f} s after the response"


@pytest.mark.parametrize("path", PAGES)
async def test_an_idle_keep_alive_connection_ends_after_the_idle_timeout(
    relay: RelayHandle, path: str
) -> None:
    with trio.fail_after(5):
        _, _, took = await request_then_eof(relay.address, path, close=False)
    assert took < IDLE_TIMEOUT + PROMPT, f"EOF {took:.2f} s after the response"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_thousand_relay_pages_leave_no_descriptor_behind(relay: RelayHandle) -> None:
    with trio.fail_after(120):
        await request_then_eof(relay.address, "/health", close=True)  # warm up
        baseline = open_fds()
        for number in range(REQUESTS):
            await request_then_eof(relay.address, PAGES[number % len(PAGES)], close=True)
        # The last connection's server side closes just after its EOF reached us.
        for _ in range(100):
            if open_fds() <= baseline + FD_MARGIN:
                break
            await trio.sleep(0.01)
        left = open_fds() - baseline
        print(f"\n{REQUESTS} requests: {left} descriptors more than at the start")
        assert left <= FD_MARGIN


@pytest.mark.parametrize("case", ["401", "503"])
async def test_an_early_answer_closes_the_connection_of_a_client_still_sending(
    tmp_path: Path, nursery: trio.Nursery, case: str
) -> None:
    with trio.fail_after(15):
        relay = await start_relay(nursery, tmp_path / "relay", header_timeout=IDLE_TIMEOUT)
        headers = [("host", "relay")]
        if case == "503":  # signed in, but no daemon is connected
            record, _ = await relay.new_scope()
            headers.append(await relay.session_cookie(record))
        stream = await trio.open_tcp_stream(*relay.address)
        sent = [0]
        async with stream, trio.open_nursery() as inner:
            conn = h11.Connection(h11.CLIENT)
            headers.append(("transfer-encoding", "chunked"))
            await stream.send_all(
                conn.send(h11.Request(method="POST", target="/upload", headers=headers))
            )

            async def blast() -> None:
                try:
                    while sent[0] < ENDLESS_BODY:
                        await stream.send_all(conn.send(h11.Data(data=b"z" * CHUNK)))
                        sent[0] += CHUNK
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            inner.start_soon(blast)
            head: h11.Response | None = None
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(CHUNK)
                        if not data:
                            break
                        conn.receive_data(data)
                    elif isinstance(event, h11.Response):
                        head = event
                    elif isinstance(event, h11.EndOfMessage):
                        answered = trio.current_time()
                        while await stream.receive_some(CHUNK):
                            pass
                        closed_after = trio.current_time() - answered
                        break
            except trio.BrokenResourceError:
                closed_after = 0.0  # reset: the close reached us as a RST
            inner.cancel_scope.cancel()
        assert head is not None
        assert head.status_code == int(case)
        assert dict(head.headers).get(b"connection") == b"close"
        assert closed_after < PROMPT
        assert sent[0] < ENDLESS_BODY // 4, "the relay read on and on after its answer"
