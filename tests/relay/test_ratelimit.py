"""The token-bucket rate limiter: bursts, refill, retry-after, and the bound on keys."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay._ratelimit import RateLimiter

T0 = 1_000.0


def test_a_burst_is_allowed_then_refused() -> None:
    limiter = RateLimiter(rate=1.0, burst=5)
    assert [limiter.allow("1.2.3.4", T0) for _ in range(7)] == [True] * 5 + [False] * 2


def test_tokens_refill_at_the_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    for _ in range(3):
        assert limiter.allow("a", T0)
    assert not limiter.allow("a", T0)
    assert not limiter.allow("a", T0 + 0.4)
    assert limiter.allow("a", T0 + 0.5)  # one token after 1/rate seconds
    assert not limiter.allow("a", T0 + 0.5)
    assert limiter.allow("a", T0 + 1.0)


def test_refill_stops_at_the_burst() -> None:
    limiter = RateLimiter(rate=10.0, burst=3)
    assert limiter.allow("a", T0)
    later = T0 + 3600
    assert [limiter.allow("a", later) for _ in range(4)] == [True, True, True, False]


def test_refusals_take_nothing() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.allow("a", T0)
    for step in range(10):
        assert not limiter.allow("a", T0 + step * 0.09)
    assert limiter.allow("a", T0 + 1.0)


def test_keys_are_independent() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.allow("a", T0)
    assert limiter.allow("a", T0)
    assert not limiter.allow("a", T0)
    assert limiter.allow("b", T0)
    assert limiter.allow("b", T0)
    assert not limiter.allow("b", T0)


def test_retry_after() -> None:
    limiter = RateLimiter(rate=4.0, burst=2)
    assert limiter.retry_after("never-seen", T0) == 0.0
    assert limiter.allow("a", T0)
    assert limiter.retry_after("a", T0) == 0.0
    assert limiter.allow("a", T0)
    wait = limiter.retry_after("a", T0)
    assert wait == pytest.approx(0.25)
    assert limiter.retry_after("a", T0 + 0.1) == pytest.approx(0.15)
    assert not limiter.allow("a", T0 + wait * 0.9)
    assert limiter.allow("a", T0 + wait)


@given(rate=st.floats(0.01, 1000), burst=st.integers(1, 50), start=st.floats(0, 1e9))
@settings(max_examples=200, deadline=None)
def test_waiting_retry_after_is_always_enough(rate: float, burst: int, start: float) -> None:
    limiter = RateLimiter(rate=rate, burst=burst)
    for _ in range(burst):
        assert limiter.allow("a", start)
    wait = limiter.retry_after("a", start)
    assert wait > 0
    assert limiter.allow("a", start + wait)


def test_retry_after_does_not_consume() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.retry_after("a", T0) == 0.0
    assert limiter.retry_after("a", T0) == 0.0
    assert limiter.allow("a", T0)


def test_time_going_backwards_grants_nothing() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.allow("a", T0)
    assert limiter.allow("a", T0)
    assert not limiter.allow("a", T0 - 100)
    assert not limiter.allow("a", T0 + 0.5)
    assert limiter.allow("a", T0 + 1.0)


@given(
    events=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 2)), min_size=1, max_size=200
    ),
    rate=st.floats(0.1, 20),
    burst=st.integers(1, 10),
)
@settings(max_examples=200, deadline=None)
def test_no_key_ever_exceeds_burst_plus_rate_times_time(
    events: list[tuple[str, float]], rate: float, burst: int
) -> None:
    limiter = RateLimiter(rate=rate, burst=burst)
    now = 0.0
    allowed: dict[str, int] = {}
    for key, step in events:
        now += step
        if limiter.allow(key, now):
            allowed[key] = allowed.get(key, 0) + 1
        # Over [0, now], a bucket starting full can have given at most this many tokens.
        assert allowed.get(key, 0) <= math.floor(burst + rate * now + 1e-6)


def test_the_number_of_keys_is_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=5, max_keys=10)
    for n in range(1000):
        limiter.allow(f"10.0.{n // 256}.{n % 256}", T0 + n * 0.001)
        assert len(limiter) <= 10
    assert len(limiter) >= 9


def test_idle_full_buckets_are_dropped_first_and_all_at_once() -> None:
    limiter = RateLimiter(rate=1.0, burst=2, max_keys=50)
    for n in range(50):
        assert limiter.allow(f"k{n}", T0)
    # An hour later every bucket is full again: they carry no state and all go together.
    assert limiter.allow("new", T0 + 3600)
    assert len(limiter) == 1


def test_churn_of_new_keys_cannot_free_a_limited_key() -> None:
    limiter = RateLimiter(rate=0.01, burst=5, max_keys=4)
    for _ in range(5):
        assert limiter.allow("abuser", T0)
    assert not limiter.allow("abuser", T0)
    # Many fresh addresses, each taking one token: their buckets stay fuller than the
    # abuser's, so they are the ones dropped.
    for n in range(200):
        assert limiter.allow(f"fresh-{n}", T0 + n * 0.01)
        assert len(limiter) <= 4
    assert not limiter.allow("abuser", T0 + 2.5)
    assert limiter.retry_after("abuser", T0 + 2.5) > 0


def test_the_fullest_partial_bucket_goes_first_when_none_is_idle() -> None:
    limiter = RateLimiter(rate=0.001, burst=10, max_keys=3)
    for key, spent in (("light", 1), ("heavy", 9), ("medium", 5)):
        for _ in range(spent):
            assert limiter.allow(key, T0)
    assert limiter.allow("newcomer", T0)
    assert len(limiter) == 3
    # "light" was dropped: it starts again from a full bucket of 10.
    assert [limiter.allow("light", T0) for _ in range(10)] == [True] * 10
    # "heavy" was kept: one token left.
    assert limiter.allow("heavy", T0)
    assert not limiter.allow("heavy", T0)


@pytest.mark.parametrize(
    ("rate", "burst", "max_keys"),
    [
        (0.0, 1, 10),
        (-1.0, 1, 10),
        (float("nan"), 1, 10),
        (float("inf"), 1, 10),
        (1.0, 0, 10),
        (1.0, 1, 0),
    ],
)
def test_bad_settings_are_refused(rate: float, burst: int, max_keys: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=rate, burst=burst, max_keys=max_keys)
