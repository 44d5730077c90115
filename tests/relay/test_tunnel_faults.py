"""The relay's request path never falls over: hostile daemons, faults at every await.

A connector stand-in with a valid key answers the relay's streams with sequences no honest
daemon sends (a large answer and a reset, an answer, its end and a reset, a head announcing
more than it sends), and a fault is injected at each await of the tunnel path in turn. After
each, the relay must still answer ``/health`` and the next tunneled request: the failure of
one request ends that request, never the server.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import pytest
import trio

import relay._app
import relay._tunnel
from mux import MuxStream
from protocol import ErrorCode
from tests.support.clients import Address, http_request, open_http_stream
from tests.support.relays import StackFactory, scoped_relay
from tests.support.scripted import ScriptedHttp
from tests.support.stand_in import StreamHandler, identity_handler, start_stand_in
from tests.support.waiting import eventually

KIB = 1024
MIB = 1024 * KIB
#: Body of the hostile answers: several stream windows, so it is in flight when the reset comes.
HOSTILE_BODY = 3 * MIB
#: Body of the browser's POST to a hostile daemon: larger than what the relay reads before
#: the answer comes back, so the upload is still going when the daemon resets.
REQUEST_BODY = 4 * MIB
#: Requests per hostile sequence: the relay used to fall over within a few.
ROUNDS = 6


#: hypercorn's error log: "Error in ASGI Framework" there means an exception left a request's
#: task and reached hypercorn, which is what must never happen.
HYPERCORN_LOG = "repowire.relay.http"


def assert_nothing_escaped(caplog: pytest.LogCaptureFixture) -> None:
    escaped = [
        r.getMessage()
        for r in caplog.records
        if r.name == HYPERCORN_LOG and r.levelno >= logging.ERROR
    ]
    assert escaped == [], f"exceptions reached hypercorn: {escaped}"


async def assert_relay_serves(address: Address, cookie: tuple[str, str]) -> None:
    """``/health`` and a tunneled request (to the daemon ``healthy``) both answer 200."""
    health = await http_request(address, "GET", "/health")
    assert health.status == 200
    tunneled = await http_request(address, "GET", "/d/healthy/ping", headers=[cookie])
    assert tunneled.status == 200, tunneled.body


async def post_and_read(address: Address, cookie: tuple[str, str], path: str) -> int | None:
    """POST a small body; return the status, or None if the connection ended mid-response (an
    aborted response is what the browser must see then)."""
    status: int | None = None
    try:
        async with open_http_stream(
            address, "POST", path, body=b"x" * REQUEST_BODY, headers=[cookie]
        ) as response:
            await response.read_all(limit=16 * MIB)
            status = response.status
    except* (h11.RemoteProtocolError, trio.BrokenResourceError):
        pass
    return status


def tolerant(handler: StreamHandler) -> StreamHandler:
    """``handler``, ending quietly when the relay gives up on its stream half-way (as it does
    when a fault is injected): the stand-in must outlive every request."""

    async def run(stream: MuxStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, AssertionError, h11.ProtocolError):
            await handler(stream)

    return run


async def big_answer_then_reset(stream: MuxStream) -> None:
    exchange = ScriptedHttp(stream)
    await exchange.receive_request()
    await exchange.send_head(200, [("content-length", str(HOSTILE_BODY))])
    with contextlib.suppress(trio.BrokenResourceError):
        await exchange.send_data(b"a" * HOSTILE_BODY)
    stream.reset(ErrorCode.INTERNAL_ERROR)


async def answer_fin_then_reset(stream: MuxStream) -> None:
    exchange = ScriptedHttp(stream)
    await exchange.receive_request()
    await exchange.respond(200, b"b" * HOSTILE_BODY)
    stream.reset(ErrorCode.INTERNAL_ERROR)


async def short_body_then_reset(stream: MuxStream) -> None:
    exchange = ScriptedHttp(stream)
    await exchange.receive_request()
    await exchange.send_head(200, [("content-length", str(10 * HOSTILE_BODY))])
    await exchange.send_data(b"c" * HOSTILE_BODY)
    stream.reset(ErrorCode.INTERNAL_ERROR)


async def answer_reset_before_request_end(stream: MuxStream) -> None:
    exchange = ScriptedHttp(stream)
    await exchange.receive_request()
    await exchange.receive_data()
    await exchange.send_head(200, [("content-length", "5")])
    await exchange.send_data(b"early")
    stream.reset(ErrorCode.INTERNAL_ERROR)


@pytest.mark.parametrize(
    "hostile",
    [big_answer_then_reset, answer_fin_then_reset, short_body_then_reset],
    ids=["answer-reset", "answer-fin-reset", "short-body-reset"],
)
async def test_a_hostile_daemon_never_stops_the_relay(
    stacks: StackFactory, hostile: StreamHandler, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(60):
        stack, key, cookie = await scoped_relay(stacks)
        address = stack.relay.address
        await start_stand_in(stack.links, address, key, "hostile", tolerant(hostile))
        await start_stand_in(stack.links, address, key, "healthy", identity_handler("ok"))
        for _ in range(ROUNDS):
            await post_and_read(address, cookie, "/d/hostile/upload")
            await assert_relay_serves(address, cookie)
        assert_nothing_escaped(caplog)


async def test_an_answer_and_reset_before_the_request_ended_never_stops_the_relay(
    stacks: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(60):
        stack, key, cookie = await scoped_relay(stacks)
        address = stack.relay.address
        await start_stand_in(
            stack.links, address, key, "hostile", tolerant(answer_reset_before_request_end)
        )
        await start_stand_in(stack.links, address, key, "healthy", identity_handler("ok"))
        for _ in range(ROUNDS):
            stream = await trio.open_tcp_stream(*address)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                head = h11.Request(
                    method="POST",
                    target="/d/hostile/upload",
                    headers=[("host", "relay"), ("transfer-encoding", "chunked"), cookie],
                )
                await stream.send_all(conn.send(head) + conn.send(h11.Data(data=b"x" * 4096)))
                # The request never ends: the daemon answers and resets first.
                with trio.move_on_after(2), contextlib.suppress(trio.BrokenResourceError):
                    while await stream.receive_some(64 * KIB):
                        pass
            await assert_relay_serves(address, cookie)
        assert_nothing_escaped(caplog)


# ---------------------------------------------------------------------- injected faults


#: The daemon (and its path prefix) whose requests get the injected faults.
FAULTY_DAEMON = "target"
FAULTY_PREFIX = f"/d/{FAULTY_DAEMON}/"


class InjectedFault(Exception):
    """Raised by the fault injector at the chosen await."""


class FaultPlan:
    """Counts the awaits of one tunneled request (browser side and stream side alike) and
    raises :class:`InjectedFault` at await number ``fail_at`` (never, if 0)."""

    def __init__(self, fail_at: int = 0) -> None:
        self.fail_at = fail_at
        self.count = 0

    def step(self) -> None:
        self.count += 1
        if self.count == self.fail_at:
            raise InjectedFault(f"fault at await {self.count}")

    def wrap(self, call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.step()
            result = await call(*args, **kwargs)
            self.step()
            return result

        return wrapped


class FaultyStream:
    """A tunnel stream whose awaits go through a :class:`FaultPlan`."""

    def __init__(self, stream: MuxStream, plan: FaultPlan) -> None:
        self._stream = stream
        self.send_all = plan.wrap(stream.send_all)
        self.receive_some = plan.wrap(stream.receive_some)
        self.send_eof = plan.wrap(stream.send_eof)
        self.aclose = stream.aclose

    def reset(self, code: int) -> None:
        self._stream.reset(code)

    @property
    def window_growth(self) -> int:
        return self._stream.window_growth


def inject_faults(monkeypatch: pytest.MonkeyPatch, plans: list[FaultPlan]) -> None:
    """Route the tunnel's ASGI send/receive and its stream, for requests to
    :data:`FAULTY_DAEMON`, through the plan last in ``plans`` when the request starts (the
    tasks of an earlier request that are still winding down keep their own plan)."""
    tunnel = relay._tunnel.tunnel_http
    opener = relay._tunnel.open_tunnel_stream

    async def faulty_tunnel(relay_: Any, scope: Any, receive: Any, send: Any, *rest: Any) -> None:
        if scope["path"].startswith(FAULTY_PREFIX):
            plan = plans[-1]
            receive, send = plan.wrap(receive), plan.wrap(send)
        await tunnel(relay_, scope, receive, send, *rest)

    async def faulty_open(link: Any, kind: str) -> Any:
        stream = await opener(link, kind)
        if stream is None or link.daemon_id != FAULTY_DAEMON:
            return stream
        return FaultyStream(stream, plans[-1])

    monkeypatch.setattr(relay._app, "tunnel_http", faulty_tunnel)
    monkeypatch.setattr(relay._tunnel, "open_tunnel_stream", faulty_open)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_fault_at_any_await_of_the_tunnel_ends_only_that_request(
    stacks: StackFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    method: str,
) -> None:
    caplog.set_level(logging.INFO, logger="repowire.relay")
    with trio.fail_after(100):
        stack, key, cookie = await scoped_relay(stacks)
        address = stack.relay.address
        await start_stand_in(stack.links, address, key, "target", tolerant(identity_handler("t")))
        await start_stand_in(stack.links, address, key, "healthy", identity_handler("ok"))
        body = b"y" * 100 if method == "POST" else None
        plans = [FaultPlan()]
        inject_faults(monkeypatch, plans)
        clean = await http_request(address, method, "/d/target/x", body=body, headers=[cookie])
        assert clean.status == 200
        await eventually(lambda: not stack.relay.running.relay.live_access)
        total = plans[0].count
        assert total >= 8, f"only {total} awaits counted: the injector is not in the path"
        outcomes: dict[int, int | None] = {}
        for fail_at in range(1, total + 1):
            plans.append(FaultPlan(fail_at))
            # None: aborted after the head, the honest signal then.
            outcomes[fail_at] = None
            try:
                response = await http_request(
                    address, method, "/d/target/x", body=body, headers=[cookie]
                )
                outcomes[fail_at] = response.status
            except* (h11.RemoteProtocolError, trio.BrokenResourceError):
                pass
            await assert_relay_serves(address, cookie)
        print(f"\n{method}: {total} awaits; outcomes {outcomes}")
        assert_nothing_escaped(caplog)
        # Each failure is one line in the relay's log, without a traceback.
        failures = [r for r in caplog.records if "InjectedFault" in r.getMessage()]
        assert failures and all(r.exc_info is None for r in failures)
        # Nothing is left open behind the failed requests.
        registry = stack.relay.running.relay.metrics.registry
        await eventually(lambda: registry.get_sample_value("repowire_relay_streams_open") == 0)
