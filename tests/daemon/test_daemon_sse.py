"""GET /events/stream: events written as they happen, resumable, kept alive, cleaned up."""

from __future__ import annotations

import trio
import trio.testing

from repowire.daemon import DaemonSettings, DaemonState
from tests.support.clients import SseReader, http_request, open_http_stream
from tests.support.daemons import DaemonFactory
from tests.support.waiting import eventually

JSON = [("Content-Type", "application/json")]


async def test_events_arrive_one_by_one_as_posted(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        daemon.state.add_peer("bob")
        async with open_http_stream(daemon.address, "GET", "/events/stream") as stream:
            assert stream.status == 200
            assert (stream.header("content-type") or "").startswith("text/event-stream")
            assert stream.header("cache-control") == "no-cache"
            reader = SseReader(stream)
            hint = await reader.next_message()
            assert hint is not None and hint.retry == "3000"
            for i in range(3):
                posted = await http_request(
                    daemon.address,
                    "POST",
                    "/notify",
                    json_body={"to": "bob", "text": f"message {i}"},
                )
                assert posted.status == 200
                # This event must arrive before the next one is even posted.
                message = await reader.next_event()
                assert message.event == "message"
                assert message.id == str(posted.json()["event_id"])
                assert message.json()["data"] == {"from": None, "to": "bob", "text": f"message {i}"}


async def test_stream_without_position_starts_with_new_events(
    daemon_factory: DaemonFactory,
) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        daemon.state.publish("message", {"old": True})
        async with open_http_stream(daemon.address, "GET", "/events/stream") as stream:
            reader = SseReader(stream)
            await reader.next_message()  # the retry hint: the subscription is live
            daemon.state.publish("peer_left", {"name": "new"})
            message = await reader.next_event()
    assert message.id == "2"
    assert message.event == "peer_left"


async def test_stream_resumes_after_last_event_id(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        for i in range(5):
            daemon.state.publish("message", {"i": i})
        async with open_http_stream(
            daemon.address,
            "GET",
            "/events/stream?after=1",
            headers=[("Last-Event-ID", "3")],
        ) as stream:
            reader = SseReader(stream)
            backlog = [await reader.next_event() for _ in range(2)]
            daemon.state.publish("message", {"i": 5})
            live = await reader.next_event()
    # The header wins over ?after=, and backlog joins live without a gap.
    assert [m.id for m in backlog] == ["4", "5"]
    assert live.id == "6"
    assert live.json() == {
        "id": 6,
        "type": "message",
        "time": 1_700_000_000.0,
        "data": {"i": 5},
    }


async def test_stream_resumes_after_query_parameter(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        for i in range(3):
            daemon.state.publish("message", {"i": i})
        async with open_http_stream(daemon.address, "GET", "/events/stream?after=1") as stream:
            reader = SseReader(stream)
            ids = [(await reader.next_event()).id for _ in range(2)]
    assert ids == ["2", "3"]


async def test_empty_last_event_id_falls_back_to_the_query(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        for i in range(3):
            daemon.state.publish("message", {"i": i})
        async with open_http_stream(
            daemon.address, "GET", "/events/stream?after=2", headers=[("Last-Event-ID", "")]
        ) as stream:
            message = await SseReader(stream).next_event()
    assert message.id == "3"


async def test_stream_bad_position_gets_400(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        by_header = await daemon.request(
            "GET", "/events/stream", headers=[("Last-Event-ID", "abc")]
        )
        by_query = await daemon.request("GET", "/events/stream?after=-4")
    for response in (by_header, by_query):
        assert response.status == 400
        assert response.json()["error"] == "bad_request"
    assert daemon.state.subscriber_count == 0


async def test_idle_stream_gets_keepalive_comments(daemon_factory: DaemonFactory) -> None:
    settings = DaemonSettings(sse_keepalive_interval=0.05)
    with trio.fail_after(10):
        daemon = await daemon_factory(settings=settings)
        async with open_http_stream(daemon.address, "GET", "/events/stream") as stream:
            reader = SseReader(stream)
            await reader.next_message()
            first = await reader.next_message()
            second = await reader.next_message()
            daemon.state.publish("message", {"after": "keepalive"})
            event = await reader.next_event()
    assert first is not None and first.comments == ("keepalive",)
    assert second is not None and second.comments == ("keepalive",)
    assert event.json()["data"] == {"after": "keepalive"}


async def test_client_going_away_releases_the_subscription(
    daemon_factory: DaemonFactory,
) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        for _ in range(3):
            async with open_http_stream(daemon.address, "GET", "/events/stream") as stream:
                await SseReader(stream).next_message()
                assert daemon.state.subscriber_count == 1
            # The socket is closed; the server notices, ends the generator, unsubscribes.
            await eventually(lambda: daemon.state.subscriber_count == 0)
        # Publishing afterwards reaches nobody and costs nothing.
        daemon.state.publish("message", {})
        assert daemon.state.subscriber_count == 0


async def test_slow_stream_is_dropped_without_blocking_others(
    daemon_factory: DaemonFactory,
) -> None:
    # Small queues and big events, so a client that stops reading falls behind quickly.
    state = DaemonState(subscriber_buffer=4)
    payload = "z" * 200_000
    total = 120
    with trio.fail_after(20):
        daemon = await daemon_factory(state=state)
        async with (
            open_http_stream(daemon.address, "GET", "/events/stream") as slow,
            open_http_stream(daemon.address, "GET", "/events/stream") as fast,
        ):
            slow_reader, fast_reader = SseReader(slow), SseReader(fast)
            await slow_reader.next_message()
            await fast_reader.next_message()
            await eventually(lambda: state.subscriber_count == 2)
            fast_ids: list[int] = []
            for i in range(total):
                event = state.publish("message", {"i": i, "pad": payload})
                # The fast reader keeps up with every event while the slow one reads nothing.
                fast_ids.append(int((await fast_reader.next_event()).id or 0))
                assert fast_ids[-1] == event.id
            assert state.subscriber_count == 1
            # The slow client now reads: a prefix of the events, then a clear end.
            slow_ids: list[int] = []
            while True:
                message = await slow_reader.next_message()
                assert message is not None, "the stream ended without saying why"
                if message.event == "dropped":
                    break
                if message.id is not None:
                    slow_ids.append(int(message.id))
            assert await slow_reader.next_message() is None  # the response ended
            dropped = message.json()
    assert fast_ids == list(range(1, total + 1))
    assert slow_ids == list(range(1, len(slow_ids) + 1))
    assert len(slow_ids) < total
    assert dropped["last_id"] == (slow_ids[-1] if slow_ids else 0)


async def test_many_streams_share_events(daemon_factory: DaemonFactory) -> None:
    with trio.fail_after(10):
        daemon = await daemon_factory()
        received: dict[int, list[str | None]] = {}

        async def listen(index: int, task_status: trio.TaskStatus[None]) -> None:
            async with open_http_stream(daemon.address, "GET", "/events/stream") as stream:
                reader = SseReader(stream)
                await reader.next_message()
                task_status.started()
                received[index] = [(await reader.next_event()).id for _ in range(3)]

        async with trio.open_nursery() as nursery:
            for index in range(5):
                await nursery.start(listen, index)
            for i in range(3):
                daemon.state.publish("message", {"i": i})
    assert received == {index: ["1", "2", "3"] for index in range(5)}
