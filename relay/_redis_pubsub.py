"""A Redis pub/sub channel followed through outages, and the Redis failures it rides out.

Presence (``relay._presence``) and the Redis key store (``relay._redis_store``) each announce
events on a channel: a claimed daemon link, a revoked key. :func:`follow_channel` is how a
replica hears them: one subscription, opened again with backoff whenever Redis cannot be
reached, each message parsed in a reader task and handed to the caller's handler in order.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, TypeVar

import coredis
import coredis.exceptions
import trio
from coredis.response.types import PubSubMessage

from ._store import StoreError
from ._store_api import StoreUnavailable

T = TypeVar("T")

#: Events read from Redis but not yet handled; past it the reader stops reading.
QUEUE_SIZE: Final = 1000
#: Bounds of the pause between attempts while Redis is unreachable (doubling).
RETRY_MIN: Final = 0.1
RETRY_MAX: Final = 5.0
#: Seconds without traffic on a subscription before it is checked with a PING, so that a
#: silently dead connection is noticed and replaced.
KEEPALIVE: Final = 5.0

#: Errors that mean "Redis cannot be reached now", as opposed to "Redis refused this".
UNAVAILABLE: Final = (
    coredis.exceptions.ConnectionError,  # also ProtocolError, BusyLoadingError (LOADING)
    coredis.exceptions.ReadOnlyError,  # a replica, during a failover
    coredis.exceptions.ClusterDownError,
    TimeoutError,
    OSError,
)
#: Every error a Redis call may fail with.
REDIS_ERRORS: Final = (coredis.exceptions.RedisError, *UNAVAILABLE)

#: Called after each (re)subscription, before any message is read, with whether this is the
#: first attempt of the watch: the events to announce first (what was missed meanwhile).
CatchUp = Callable[[bool], Awaitable[Iterable[T]]]


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside ``error``, groups flattened (``[error]`` for a plain one)."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def describe(error: BaseException) -> str:
    """One line naming ``error``: its type and the first line of its message, at most 200
    characters. Redis never sees a raw key, session id or token, so its messages cannot
    quote one; a connection URL (and its password) is never part of them."""
    lines = str(error).strip().splitlines()
    text = type(error).__name__ + (f": {lines[0]}" if lines else "")
    return text if len(text) <= 200 else text[:199] + "…"


async def follow_channel(
    client: coredis.Redis[bytes],
    channel: str,
    handler: Callable[[T], Awaitable[None]],
    *,
    parse: Callable[[PubSubMessage], T | None],
    catch_up: CatchUp[T] | None = None,
    name: str,
    logger: logging.Logger,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Until cancelled, call ``handler`` with each event published on ``channel`` after the
    subscription started (as ``parse`` reads it; None is passed over), one at a time.

    ``await nursery.start(follow_channel, ...)`` returns once subscribed (and ``catch_up``,
    if given, has answered), or after the first attempt failed: then it keeps retrying with
    backoff (:data:`RETRY_MIN` doubling to :data:`RETRY_MAX`). After each subscription the
    events ``catch_up`` returns are handled before any message. Messages published while
    the subscription is down are lost: ``catch_up`` is how a caller makes up for them.

    A Redis failure, or a :class:`StoreError` from ``catch_up``, never ends the watch: each
    outage is logged once on ``logger`` as ``name`` (the failure's type and first line), and
    its end once. An exception from ``handler`` ends the watch and propagates as it is.
    """
    send, receive = trio.open_memory_channel[T](QUEUE_SIZE)
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(_read, client, channel, send, parse, catch_up, name, logger)
        task_status.started()
        async with receive:
            async for event in receive:
                try:
                    await handler(event)
                except Exception as exc:
                    # Raised below, outside the nursery, as the handler raised it.
                    failure = exc
                    break
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _read(
    client: coredis.Redis[bytes],
    channel: str,
    send: trio.MemorySendChannel[T],
    parse: Callable[[PubSubMessage], T | None],
    catch_up: CatchUp[T] | None,
    name: str,
    logger: logging.Logger,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The reader task of :func:`follow_channel`: subscribe, catch up, then read messages
    into ``send``, until cancelled; after a failure, the same again with backoff."""
    started = False
    failing = False
    delay = RETRY_MIN
    async with send:
        while True:
            try:
                async with client.pubsub(
                    channels=[channel],
                    ignore_subscribe_messages=True,
                    retry_policy=None,  # reconnections are ours: each needs a catch-up
                    max_idle_seconds=KEEPALIVE,
                ) as subscription:
                    missed = await catch_up(not started) if catch_up is not None else ()
                    if failing:
                        logger.info("%s: Redis is reachable again", name)
                        failing = False
                    delay = RETRY_MIN
                    if not started:
                        started = True
                        task_status.started()
                    for event in missed:
                        await send.send(event)
                    async for message in subscription:
                        parsed = parse(message)
                        if parsed is not None:
                            await send.send(parsed)
            except* (*REDIS_ERRORS, StoreError) as group:
                if not failing:
                    failing = True
                    logger.warning(
                        "%s: cannot reach Redis (%s); retrying", name, describe(leaves(group)[0])
                    )
            if not started:
                started = True
                task_status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)


def translate_failure(
    error: BaseException, action: str, *, unreachable: str, failed: str
) -> StoreError | None:
    """The StoreError to raise for a Redis failure while ``action``, or None if ``error`` is
    not one: :class:`~relay._store_api.StoreUnavailable` ("``unreachable`` (Redis) cannot be
    reached while ...") when every failure in it is one of :data:`UNAVAILABLE`, else
    StoreError ("``failed`` (Redis) while ...") naming the first other one."""
    failures = leaves(error)
    if not failures or not all(isinstance(leaf, REDIS_ERRORS) for leaf in failures):
        return None
    if all(isinstance(leaf, UNAVAILABLE) for leaf in failures):
        return StoreUnavailable(
            f"{unreachable} (Redis) cannot be reached while {action}: {describe(failures[0])}"
        )
    first = next(leaf for leaf in failures if not isinstance(leaf, UNAVAILABLE))
    return StoreError(f"{failed} (Redis) while {action}: {describe(first)}")
