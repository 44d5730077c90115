"""Waiting for state that changes on someone else's schedule, where there is no event to wait on.

- :func:`eventually`: check a condition (sync or async) every few milliseconds, for state this
  process changes (a subscription released after the client left).
- :func:`poll`: the same at the pace for another process's state (a daemon's ``/health``).

Both fail with AssertionError after a bounded number of checks; callers still wrap them in
``trio.fail_after``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from functools import partial

import trio

Check = Callable[[], Awaitable[bool] | bool]

#: Checks and seconds between them of :func:`eventually` (5 s in all).
DEFAULT_TRIES = 1000
DEFAULT_INTERVAL = 0.005
#: Checks and seconds between them of :func:`poll` (15 s in all).
PROCESS_TRIES = 300
PROCESS_INTERVAL = 0.05


async def eventually(
    check: Check,
    *,
    tries: int = DEFAULT_TRIES,
    interval: float = DEFAULT_INTERVAL,
    what: str = "the condition",
) -> None:
    """Return once ``check()`` (or what it returns, if awaitable) is true; raise AssertionError
    naming ``what`` after ``tries`` checks ``interval`` seconds apart."""
    for _ in range(tries):
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await trio.sleep(interval)
    raise AssertionError(f"{what} still did not hold after {tries} checks")


#: :func:`eventually` at the pace for another process's state (a check costs a request).
poll = partial(eventually, tries=PROCESS_TRIES, interval=PROCESS_INTERVAL)
