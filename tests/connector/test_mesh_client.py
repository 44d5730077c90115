"""Mesh calls (``connector._mesh_client.MeshClient``) over an in-memory link.

The test plays the relay's side of a real multiplexed session: it accepts the client's
streams, checks what arrives and answers, resets or stays silent.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import h11
import pytest
import trio
import trio.testing

from connector import MeshClient, MeshDirectory, MeshError, MeshResponse
from connector._mesh_client import MAX_MESH_RESPONSE
from mux import MuxConfig, MuxSession, MuxStream, memory_transport_pair
from protocol import ErrorCode, Role
from tests.support.fake_relay import fake_relay_config

#: Seconds any test here may take (in the autojump tests: of virtual time).
TEST_TIMEOUT = 15
#: No keepalive pings: nothing runs that a test did not ask for.
QUIET = MuxConfig(keepalive_interval=math.inf)
#: What a mesh request waits for an answer (virtual seconds).
MESH_TIMEOUT = 5.0

Answer = Callable[[MuxStream], Awaitable[None]]


@attrs.define
class Link:
    """The client's side of the link (``session``, swappable) and the relay's (``relay``)."""

    relay: MuxSession
    session: MuxSession | None
    client: MeshClient = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        config = fake_relay_config("ws://127.0.0.1:1", mesh_timeout=MESH_TIMEOUT)
        self.client = MeshClient(lambda: self.session, lambda: config)

    async def answer_next(self, answer: Answer) -> dict[str, str]:
        """Accept the client's next stream, run ``answer`` on it; its metadata."""
        stream = await self.relay.accept_stream()
        await answer(stream)
        return dict(stream.metadata)


@asynccontextmanager
async def link() -> AsyncIterator[Link]:
    relay_end, connector_end = memory_transport_pair()
    relay = MuxSession(relay_end, Role.RELAY, QUIET)
    connector = MuxSession(connector_end, Role.CONNECTOR, QUIET)
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as starting:
            starting.start_soon(nursery.start, relay.run)
            starting.start_soon(nursery.start, connector.run)
        try:
            yield Link(relay=relay, session=connector)
        finally:
            nursery.cancel_scope.cancel()


async def read_request(stream: MuxStream) -> tuple[h11.Request, bytes]:
    """One whole HTTP request from ``stream``."""
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some())
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, bytes(body)
        else:
            raise AssertionError(f"unexpected {event!r}")


async def test_without_a_link_every_call_is_relay_down() -> None:
    client = MeshClient(lambda: None, lambda: fake_relay_config("ws://127.0.0.1:1"))
    with trio.fail_after(TEST_TIMEOUT):
        for call in (
            client.open_stream("desk"),
            client.request("desk", "POST", "/notify"),
            client.directory(),
            client.other_daemons(),
        ):
            with pytest.raises(MeshError) as caught:
                await call
            assert caught.value.code == "relay_down"


async def test_a_request_goes_out_framed_by_the_mesh_and_comes_back_whole() -> None:
    seen: list[tuple[h11.Request, bytes]] = []

    async def answer(stream: MuxStream) -> None:
        seen.append(await read_request(stream))
        await stream.send_all(
            b"HTTP/1.1 201 Created\r\nX-Answer: yes\r\nContent-Length: 5\r\n\r\nhello"
        )
        await stream.send_eof()

    with trio.fail_after(TEST_TIMEOUT):
        async with link() as up, trio.open_nursery() as nursery:
            metadata: list[dict[str, str]] = []

            async def relay_side() -> None:
                metadata.append(await up.answer_next(answer))

            nursery.start_soon(relay_side)
            response = await up.client.request(
                "desk",
                "POST",
                "/notify",
                body=b'{"to": "bob"}',
                headers=[
                    ("Content-Type", "application/json"),
                    ("Host", "evil.example"),
                    ("Content-Length", "999"),
                    ("Connection", "keep-alive"),
                ],
            )
    assert response == MeshResponse(
        status=201, headers=[("x-answer", "yes"), ("content-length", "5")], body=b"hello"
    )
    assert metadata == [{"kind": "mesh", "target": "desk"}]
    ((request, body),) = seen
    assert (request.method, request.target, body) == (b"POST", b"/notify", b'{"to": "bob"}')
    # The mesh's own host, connection and length; the caller's other headers as given.
    assert list(request.headers) == [
        (b"host", b"repowire-daemon"),
        (b"connection", b"close"),
        (b"content-type", b"application/json"),
        (b"content-length", b"13"),
    ]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ErrorCode.UNKNOWN_TARGET, "unknown_daemon"),
        (ErrorCode.TARGET_OFFLINE, "daemon_offline"),
        (ErrorCode.FORBIDDEN, "forbidden"),
        (ErrorCode.INTERNAL_ERROR, "relay_down"),
    ],
)
async def test_a_stream_the_relay_resets_is_the_matching_mesh_error(
    code: ErrorCode, expected: str
) -> None:
    async def reset(stream: MuxStream) -> None:
        await read_request(stream)
        stream.reset(code)

    with trio.fail_after(TEST_TIMEOUT):
        async with link() as up, trio.open_nursery() as nursery:
            nursery.start_soon(up.answer_next, reset)
            with pytest.raises(MeshError) as caught:
                await up.client.request("desk", "POST", "/notify")
    assert caught.value.code == expected
    assert "desk" in caught.value.detail


async def test_a_daemon_that_never_answers_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def silent(stream: MuxStream) -> None:
        await read_request(stream)

    with trio.fail_after(TEST_TIMEOUT):
        async with link() as up, trio.open_nursery() as nursery:
            nursery.start_soon(up.answer_next, silent)
            start = trio.current_time()
            with pytest.raises(MeshError) as caught:
                await up.client.request("desk", "POST", "/notify")
            waited = trio.current_time() - start
    assert caught.value.code == "timeout"
    assert caught.value.detail == "desk did not answer within 5 s."
    assert waited == pytest.approx(MESH_TIMEOUT)


async def test_a_response_cut_short_is_relay_down() -> None:
    async def cut(stream: MuxStream) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await stream.send_eof()

    with trio.fail_after(TEST_TIMEOUT):
        async with link() as up, trio.open_nursery() as nursery:
            nursery.start_soon(up.answer_next, cut)
            with pytest.raises(MeshError) as caught:
                await up.client.request("desk", "POST", "/notify")
    assert caught.value.code == "relay_down"


def listing(document: object) -> Answer:
    """An answer that sends ``document`` (bytes as they are, anything else as JSON)."""
    data = document if isinstance(document, bytes) else json.dumps(document).encode()

    async def send(stream: MuxStream) -> None:
        await stream.send_all(data)
        await stream.send_eof()

    return send


async def directory_from(answer: Answer) -> tuple[MeshDirectory | MeshError, dict[str, str]]:
    """What :meth:`MeshClient.directory` returns (or raises) when the relay runs ``answer``;
    and the metadata of the stream it opened."""
    found: MeshDirectory | MeshError
    with trio.fail_after(TEST_TIMEOUT):
        async with link() as up, trio.open_nursery() as nursery:
            metadata: list[dict[str, str]] = []

            async def relay_side() -> None:
                metadata.append(await up.answer_next(answer))

            nursery.start_soon(relay_side)
            try:
                found = await up.client.directory()
            except MeshError as exc:
                found = exc
    return found, metadata[0]


async def test_the_directory_leaves_this_daemon_out() -> None:
    # fake_relay_config's daemon id is "laptop".
    found, metadata = await directory_from(
        listing(
            {
                "daemons": [{"daemon_id": "desk"}, {"daemon_id": "laptop"}],
                "offline": [{"daemon_id": "old"}, {"daemon_id": "laptop"}],
            }
        )
    )
    assert metadata == {"kind": "directory"}
    assert found == MeshDirectory(online=("desk",), offline=("old",))


async def test_an_older_relay_without_offline_daemons_lists_none() -> None:
    found, _ = await directory_from(listing({"daemons": [{"daemon_id": "desk"}]}))
    assert found == MeshDirectory(online=("desk",), offline=())


@pytest.mark.parametrize(
    "document",
    [b"not json", {"online": []}, {"daemons": [{"id": "desk"}]}, [1, 2], {"daemons": 3}],
)
async def test_a_malformed_directory_is_relay_down(document: object) -> None:
    found, _ = await directory_from(listing(document))
    assert isinstance(found, MeshError)
    assert found.code == "relay_down"
    assert found.detail == "The relay sent a malformed daemon list."


async def test_a_directory_past_the_limit_is_refused() -> None:
    async def flood(stream: MuxStream) -> None:
        chunk = b" " * (1024 * 1024)
        try:
            for _ in range(MAX_MESH_RESPONSE // len(chunk) + 2):
                await stream.send_all(chunk)
        except trio.BrokenResourceError:
            pass  # the client stopped reading and closed the stream

    found, _ = await directory_from(flood)
    assert isinstance(found, MeshError)
    assert found.code == "relay_down"
    assert found.detail == "The relay's daemon list is too large."


async def test_the_client_follows_the_connectors_current_session() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with link() as up, trio.open_nursery() as nursery:
            live = up.session
            up.session = None
            with pytest.raises(MeshError):
                await up.client.directory()
            up.session = live
            nursery.start_soon(up.answer_next, listing({"daemons": [{"daemon_id": "desk"}]}))
            assert await up.client.other_daemons() == ["desk"]
