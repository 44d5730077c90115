"""Revoking or rotating a key, or signing out, ends live access within a second, on its own.

- A key revoked with ``repowire relay keys revoke`` (a separate process writing the same
  SQLite store) closes its daemon links with 4403 and ends the SSE streams and tunneled
  WebSockets of its browser sessions, and its sessions are refused from then on (no cached
  session outlives the revocation).
- Rotation through ``POST /api/v1/keys/rotate`` does the same for the old key.
- Signing out ends that session's streams, and no other session's.
"""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import h11
import trio
from trio_websocket import ConnectionClosed

from mux import MuxStream
from protocol import CloseCode
from relay import KeyRecord
from tests.support.clients import http_request, open_browser_websocket, open_http_stream
from tests.support.processes import Cli
from tests.support.relays import RunningStack, StackFactory
from tests.support.scripted import ScriptedHttp, ScriptedWebSocket
from tests.support.stand_in import StandIn, start_stand_in

#: What the brief promises: access ends this soon after the revocation, rotation or sign-out.
PROMPT = 1.0


async def event_stream(stream: MuxStream) -> None:
    """A daemon's SSE endpoint: one comment, then the stream stays open."""
    exchange = ScriptedHttp(stream)
    try:
        await exchange.receive_request()
        await exchange.read_body()
        await exchange.send_head(200, [("content-type", "text/event-stream")])
        await exchange.send_data(b": connected\n\n")
        await trio.sleep_forever()
    except trio.BrokenResourceError:
        return


async def websocket(stream: MuxStream) -> None:
    """A daemon's WebSocket endpoint: accepts, then waits for the close."""
    socket = ScriptedWebSocket(stream)
    try:
        await socket.accept()
        while True:
            if not isinstance(await socket.receive(), (str, bytes)):
                return
    except trio.BrokenResourceError:
        return


@attrs.define(eq=False)
class Watched:
    """A browser's stream, watched until it ends."""

    what: str
    ended_at: float | None = None
    ended: trio.Event = attrs.field(factory=trio.Event)

    def end(self) -> None:
        self.ended_at = time.monotonic()
        self.ended.set()

    def ended_within(self, since: float, seconds: float) -> bool:
        return self.ended_at is not None and self.ended_at - since < seconds


async def watch_sse(
    stack: RunningStack,
    path: str,
    cookie: tuple[str, str],
    *,
    task_status: trio.TaskStatus[Watched],
) -> None:
    watched = Watched(f"SSE {path}")
    async with open_http_stream(stack.relay.address, "GET", path, headers=[cookie]) as response:
        assert response.status == 200
        assert await response.read_chunk() == b": connected\n\n"
        task_status.started(watched)
        try:
            while await response.read_chunk() is not None:
                pass
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
    watched.end()


async def watch_websocket(
    stack: RunningStack,
    path: str,
    cookie: tuple[str, str],
    *,
    task_status: trio.TaskStatus[Watched],
) -> None:
    watched = Watched(f"WebSocket {path}")
    origin = ("Origin", f"http://127.0.0.1:{stack.relay.address[1]}")
    async with open_browser_websocket(stack.relay.address, path, [cookie, origin]) as ws:
        task_status.started(watched)
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed:
            pass
    watched.end()


@attrs.frozen(kw_only=True)
class Scene:
    """Daemons ``events`` (SSE) and ``sockets`` (WebSocket) linked with ``daemon_key``."""

    stack: RunningStack
    record: KeyRecord
    daemon_key: str
    links: tuple[StandIn, StandIn]


async def scene(stack: RunningStack) -> Scene:
    record, key = await stack.relay.new_scope()
    address = stack.relay.address
    events = await start_stand_in(stack.links, address, key, "events", event_stream)
    sockets = await start_stand_in(stack.links, address, key, "sockets", websocket)
    return Scene(stack=stack, record=record, daemon_key=key, links=(events, sockets))


async def open_streams(
    nursery: trio.Nursery, stack: RunningStack, cookie: tuple[str, str]
) -> list[Watched]:
    sse: Watched = await nursery.start(watch_sse, stack, "/d/events/stream", cookie)
    ws: Watched = await nursery.start(watch_websocket, stack, "/d/sockets/ws", cookie)
    return [sse, ws]


async def wait_ended(watched: list[Watched], links: list[StandIn], seconds: float) -> None:
    """Wait up to ``seconds`` for every stream and link to end (the caller then checks)."""
    with trio.move_on_after(seconds):
        for event in [w.ended for w in watched] + [link.finished for link in links]:
            await event.wait()


async def cli_revoke(stack: RunningStack, tmp_path: Path, key_id: str) -> float:
    """``repowire relay keys revoke KEY_ID`` as a separate process on the relay's data
    directory; returns when it exited (``time.monotonic()``)."""
    work = tmp_path / "cli-work"
    work.mkdir(exist_ok=True)
    cli = Cli(tmp_path / "cli-home", work)
    data_dir = stack.relay.running.relay.settings.data_dir
    result = await cli.run("relay", "keys", "revoke", key_id, "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    return time.monotonic()


# ---------------------------------------------------------------------- revocation by the CLI


async def test_a_key_revoked_by_the_cli_ends_its_links_and_streams_within_a_second(
    stacks: StackFactory, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        stack = await stacks()
        seen = await scene(stack)
        cookie = await stack.relay.session_cookie(seen.record)
        async with trio.open_nursery() as nursery:
            watched = await open_streams(nursery, stack, cookie)
            revoked_at = await cli_revoke(stack, tmp_path, seen.record.key_id)
            await wait_ended(watched, list(seen.links), PROMPT)
            for link in seen.links:
                assert link.finished.is_set(), f"link {link.daemon_id} still up"
                assert link.close_code == CloseCode.KEY_REVOKED
            for w in watched:
                assert w.ended_within(revoked_at, PROMPT), f"{w.what} still open"
        refused = await http_request(
            stack.relay.address, "GET", "/api/v1/daemons", headers=[cookie]
        )
        assert refused.status == 401


async def test_a_browser_key_revoked_by_the_cli_ends_its_sessions_streams_not_the_links(
    stacks: StackFactory, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        stack = await stacks()
        seen = await scene(stack)
        # The browser signed in with a second key of the scope: revoking it ends the browser's
        # access, while the daemons (linked with the first key) stay up.
        store = stack.relay.running.relay.store
        browser_record, _ = await store.create_key(
            seen.record.scope_id, label="phone", now=time.time()
        )
        cookie = await stack.relay.session_cookie(browser_record)
        # Cached now: a cached session must not outlive the revocation either.
        listed = await http_request(stack.relay.address, "GET", "/api/v1/daemons", headers=[cookie])
        assert listed.status == 200
        async with trio.open_nursery() as nursery:
            watched = await open_streams(nursery, stack, cookie)
            revoked_at = await cli_revoke(stack, tmp_path, browser_record.key_id)
            await wait_ended(watched, [], PROMPT)
            for w in watched:
                assert w.ended_within(revoked_at, PROMPT), f"{w.what} still open"
        refused = await http_request(
            stack.relay.address, "GET", "/api/v1/daemons", headers=[cookie]
        )
        assert refused.status == 401
        assert time.monotonic() - revoked_at < PROMPT + 1.0
        for link in seen.links:
            assert not link.session.ended


# ---------------------------------------------------------------------- rotation and sign-out


async def test_rotation_through_the_api_ends_the_old_keys_links_and_streams(
    stacks: StackFactory,
) -> None:
    with trio.fail_after(30):
        stack = await stacks()
        seen = await scene(stack)
        cookie = await stack.relay.session_cookie(seen.record)
        async with trio.open_nursery() as nursery:
            watched = await open_streams(nursery, stack, cookie)
            rotated_at = time.monotonic()
            answer = await http_request(
                stack.relay.address,
                "POST",
                "/api/v1/keys/rotate",
                headers=[("Authorization", f"Bearer {seen.daemon_key}")],
            )
            assert answer.status == 200
            await wait_ended(watched, list(seen.links), PROMPT)
            for link in seen.links:
                assert link.close_code == CloseCode.KEY_REVOKED
            for w in watched:
                assert w.ended_within(rotated_at, PROMPT), f"{w.what} still open"


async def test_signing_out_ends_that_sessions_streams_and_no_other(stacks: StackFactory) -> None:
    with trio.fail_after(30):
        stack = await stacks()
        seen = await scene(stack)
        leaving = await stack.relay.session_cookie(seen.record)
        staying = await stack.relay.session_cookie(seen.record)
        origin = ("Origin", f"http://127.0.0.1:{stack.relay.address[1]}")
        async with trio.open_nursery() as nursery:
            gone = await open_streams(nursery, stack, leaving)
            kept = await open_streams(nursery, stack, staying)
            signed_out_at = time.monotonic()
            answer = await http_request(
                stack.relay.address, "POST", "/logout", headers=[leaving, origin]
            )
            assert answer.status == 303
            await wait_ended(gone, [], PROMPT)
            for w in gone:
                assert w.ended_within(signed_out_at, PROMPT), f"{w.what} still open"
            await trio.sleep(0.2)
            assert all(w.ended_at is None for w in kept)
            for link in seen.links:
                assert not link.session.ended
            nursery.cancel_scope.cancel()
