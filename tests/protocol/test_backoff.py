"""The reconnect backoff machine: growth, jitter, resets, fatal closes, restarts, bad input."""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol._backoff import (
    POLICIES,
    Backoff,
    BackoffConfig,
    Decision,
    DisconnectReason,
    Policy,
)
from protocol._close_codes import CloseCode

R = DisconnectReason
NEAR_ONE = 0.999
CAP = 60.0
DEFAULT_BOUNDS = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
#: The same counts inside a restart window: kept within [restart_spread, restart_cap] = [2, 15].
RESTART_BOUNDS = [2.0, 2.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0, 15.0, 15.0]
#: Seconds a restart window lasts by default.
WINDOW = 60.0


def fail_times(backoff: Backoff, count: int, *, now: float = 0.0) -> None:
    for _ in range(count):
        backoff.disconnected(now, R.NETWORK, 0.5)


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": 0.0},
        {"base": -1.0},
        {"base": math.nan},
        {"base": math.inf},
        {"cap": 0.0},
        {"cap": math.inf},
        {"base": 10.0, "cap": 5.0},
        {"multiplier": 0.5},
        {"multiplier": 0.0},
        {"multiplier": math.nan},
        {"multiplier": math.inf},
        {"stable_after": 0.0},
        {"stable_after": -30.0},
        {"restart_spread": 0.0},
        {"restart_spread": 61.0},
        {"restart_window": 0.0},
        {"restart_window": -1.0},
        {"restart_window": math.nan},
        {"restart_window": math.inf},
        {"restart_cap": 0.0},
        {"restart_cap": math.inf},
        {"restart_cap": 1.0},  # below the default restart_spread of 2 s
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError) as info:
        BackoffConfig(**kwargs)
    # The message names the setting at fault.
    assert any(name in str(info.value) for name in kwargs)


def test_config_accepts_edges() -> None:
    config = BackoffConfig(base=5.0, cap=5.0, multiplier=1.0, restart_spread=5.0, restart_cap=5.0)
    assert [config.bound(n) for n in range(4)] == [5.0, 5.0, 5.0, 5.0]
    assert [config.restart_bound(n) for n in range(4)] == [5.0, 5.0, 5.0, 5.0]
    flat = BackoffConfig(base=1.0, cap=10.0, multiplier=1.0)
    assert flat.bound(10_000) == 1.0


def test_bound_growth_sequence() -> None:
    config = BackoffConfig()
    assert [config.bound(n) for n in range(10)] == DEFAULT_BOUNDS


@pytest.mark.parametrize(
    ("multiplier", "failures"),
    [
        (2.0, 1_100),  # 2.0 ** 1100 alone would overflow a float
        (2.0, 10_000),
        (2.0, 10**30),
        (1e6, 60),
        (1e6, 10**9),
        (1.000001, 10**9),  # slow growth still reaches the cap
        (1.000001, 10**30),
    ],
)
def test_bound_does_not_overflow(multiplier: float, failures: int) -> None:
    config = BackoffConfig(multiplier=multiplier)
    assert config.bound(failures) == config.cap


def test_bound_refuses_negative_count() -> None:
    with pytest.raises(ValueError, match="failures"):
        BackoffConfig().bound(-1)
    with pytest.raises(ValueError, match="failures"):
        BackoffConfig().restart_bound(-1)


def test_restart_bound_sequence() -> None:
    config = BackoffConfig()
    assert [config.restart_bound(n) for n in range(10)] == RESTART_BOUNDS


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # A cap below restart_cap wins: no delay is above the cap, restart or not.
        ({"cap": 4.0}, [2.0, 2.0, 2.0, 4.0, 4.0]),
        # A restart_cap above the cap changes nothing beyond the cap either.
        ({"cap": 10.0, "restart_cap": 30.0}, [2.0, 2.0, 2.0, 4.0, 8.0]),
        ({"restart_spread": 0.3, "restart_cap": 0.3}, [0.5, 0.3, 0.3, 0.3, 0.3]),
    ],
)
def test_restart_bound_respects_cap_and_restart_cap(
    kwargs: dict[str, float], expected: list[float]
) -> None:
    config = BackoffConfig(**kwargs)
    bounds = [config.restart_bound(n) for n in range(5)]
    assert bounds[1:] == expected[1:]
    # The first: max(base, spread) unless restart_cap is lower.
    assert bounds[0] == min(max(config.base, config.restart_spread), config.restart_cap, config.cap)


# -- growth and bounds ---------------------------------------------------------------------------


def test_growth_sequence_with_rand_near_one() -> None:
    backoff = Backoff()
    delays = []
    for expected_failures in range(1, 11):
        decision = backoff.disconnected(0.0, R.NETWORK, NEAR_ONE)
        assert decision.retry
        assert decision.reason is R.NETWORK
        assert backoff.failures == expected_failures
        delays.append(decision.delay)
    assert delays == pytest.approx([NEAR_ONE * bound for bound in DEFAULT_BOUNDS])


def test_closed_grows_like_network() -> None:
    backoff = Backoff()
    delays = [backoff.disconnected(0.0, R.CLOSED, NEAR_ONE).delay for _ in range(4)]
    assert delays == pytest.approx([NEAR_ONE * b for b in DEFAULT_BOUNDS[:4]])
    assert backoff.failures == 4


def test_rand_zero_gives_zero_delay() -> None:
    backoff = Backoff()
    fail_times(backoff, 5)
    assert backoff.disconnected(0.0, R.NETWORK, 0.0).delay == 0.0


def test_thousands_of_failures_stay_within_cap() -> None:
    backoff = Backoff()
    rng = random.Random(7)
    for _ in range(5_000):
        decision = backoff.disconnected(0.0, R.NETWORK, rng.random())
        assert 0.0 <= decision.delay <= CAP
    assert backoff.failures == 5_000
    assert backoff.disconnected(0.0, R.NETWORK, NEAR_ONE).delay == pytest.approx(NEAR_ONE * CAP)


def quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4)


def test_jitter_spreads_over_the_whole_window_at_the_cap() -> None:
    rng = random.Random(20240601)
    backoff = Backoff()
    fail_times(backoff, 20)
    delays = [backoff.disconnected(0.0, R.NETWORK, rng.random()).delay for _ in range(10_000)]
    # Full jitter is uniform on [0, cap): quartiles at cap/4, cap/2, 3cap/4.
    assert quartiles(delays) == pytest.approx([15.0, 30.0, 45.0], abs=0.02 * CAP)
    assert min(delays) < 0.01 * CAP
    assert max(delays) > 0.99 * CAP
    # No clumping anywhere: each tenth of the window holds about a tenth of the draws.
    counts = [0] * 10
    for delay in delays:
        counts[min(int(delay / CAP * 10), 9)] += 1
    assert all(850 <= count <= 1150 for count in counts), counts


def test_jitter_of_the_first_retry_spreads_below_base() -> None:
    rng = random.Random(99)
    delays = [Backoff().disconnected(0.0, R.NETWORK, rng.random()).delay for _ in range(10_000)]
    assert all(0.0 <= delay < 0.5 for delay in delays)
    assert quartiles(delays) == pytest.approx([0.125, 0.25, 0.375], abs=0.01)


# -- stable links --------------------------------------------------------------------------------


def test_stable_link_resets_the_count() -> None:
    backoff = Backoff()
    fail_times(backoff, 6)
    backoff.connected(100.0)
    decision = backoff.disconnected(130.0, R.NETWORK, NEAR_ONE)
    assert decision.delay == pytest.approx(NEAR_ONE * 0.5)
    assert backoff.failures == 1


def test_short_link_does_not_reset_the_count() -> None:
    backoff = Backoff()
    fail_times(backoff, 7)
    backoff.connected(100.0)
    decision = backoff.disconnected(129.9, R.NETWORK, NEAR_ONE)
    assert decision.delay == pytest.approx(NEAR_ONE * 60.0)
    assert backoff.failures == 8


def test_time_between_failed_dials_is_not_a_stable_link() -> None:
    backoff = Backoff()
    fail_times(backoff, 7, now=0.0)
    # Hours pass between dials, but no link was ever up.
    decision = backoff.disconnected(10_000.0, R.NETWORK, NEAR_ONE)
    assert decision.delay == pytest.approx(NEAR_ONE * 60.0)
    assert backoff.failures == 8


def test_stable_after_is_configurable() -> None:
    backoff = Backoff(BackoffConfig(stable_after=5.0))
    fail_times(backoff, 3)
    backoff.connected(10.0)
    backoff.disconnected(15.0, R.CLOSED, 0.5)
    assert backoff.failures == 1


# -- fatal closes --------------------------------------------------------------------------------


def test_invalid_key_slows_to_the_cap() -> None:
    backoff = Backoff()
    low = backoff.disconnected(0.0, R.INVALID_KEY, 0.0)
    high = backoff.disconnected(0.0, R.INVALID_KEY, NEAR_ONE)
    assert low.retry and high.retry
    # Even the very first refusal waits at least half the cap.
    assert low.delay == CAP / 2
    assert high.delay == pytest.approx(CAP / 2 + NEAR_ONE * CAP / 2)
    assert high.delay < CAP
    assert backoff.failures == 2
    assert low.reason is R.INVALID_KEY
    assert "invalid API key" in low.message
    assert "repowire setup --relay --new-key" in low.message
    assert "relay.api_key" in low.message


def test_invalid_key_delays_spread_over_the_upper_half() -> None:
    rng = random.Random(5)
    backoff = Backoff()
    delays = [backoff.disconnected(0.0, R.INVALID_KEY, rng.random()).delay for _ in range(10_000)]
    assert all(CAP / 2 <= delay <= CAP for delay in delays)
    assert quartiles(delays) == pytest.approx([37.5, 45.0, 52.5], abs=0.02 * CAP)


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        (R.INCOMPATIBLE_VERSION, ["incompatible version", "upgrade", "not reconnecting"]),
    ],
)
def test_stop_reasons_do_not_retry(reason: DisconnectReason, words: list[str]) -> None:
    backoff = Backoff()
    fail_times(backoff, 3)
    backoff.connected(1.0)
    decision = backoff.disconnected(2.0, reason, 0.7)
    assert decision == Decision(retry=False, delay=0.0, reason=reason, message=decision.message)
    assert backoff.failures == 3
    for word in words:
        assert word in decision.message


@pytest.mark.parametrize("rand", [0.0, 0.5, NEAR_ONE])
def test_a_replaced_link_is_retried_after_the_long_replaced_delay(rand: float) -> None:
    backoff = Backoff()
    fail_times(backoff, 3)
    backoff.connected(1.0)
    decision = backoff.disconnected(2.0, R.REPLACED, rand)
    config = backoff.config
    assert decision.retry
    assert config.replaced_delay == 300.0
    # Never sooner than the documented delay, whatever the draw: two connectors sharing a
    # daemon id trade the link at most once per replaced_delay.
    assert config.replaced_delay <= decision.delay < 1.5 * config.replaced_delay
    assert decision.delay == pytest.approx(config.replaced_delay * (1 + rand / 2))
    assert backoff.failures == 3
    assert "replaced by another connection using this key" in decision.message


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        (R.KEY_REVOKED, ["key revoked", "repowire setup --relay --new-key"]),
        (R.TOO_MANY_LINKS, ["too many links", "quota"]),
    ],
)
def test_revoked_keys_and_link_quotas_slow_down_to_the_cap(
    reason: DisconnectReason, words: list[str]
) -> None:
    backoff = Backoff()
    low = backoff.disconnected(0.0, reason, 0.0)
    high = backoff.disconnected(0.0, reason, NEAR_ONE)
    assert low.retry and high.retry
    assert low.delay == CAP / 2
    assert CAP / 2 <= high.delay < CAP
    assert backoff.failures == 2
    for word in words:
        assert word in low.message


@pytest.mark.parametrize("reason", list(R))
def test_messages_are_one_clear_line(reason: DisconnectReason) -> None:
    backoff = Backoff()
    for _ in range(2):  # the second SHUTTING_DOWN takes the other branch
        message = backoff.disconnected(0.0, reason, 0.5).message
        assert message.strip() == message
        assert message
        assert "\n" not in message
        assert "\r" not in message


def test_every_reason_has_a_policy() -> None:
    assert set(POLICIES) == set(R)


# -- relay restarts ------------------------------------------------------------------------------


def test_shutting_down_reconnects_promptly_without_growth() -> None:
    backoff = Backoff()
    fail_times(backoff, 8)
    backoff.connected(10.0)
    decision = backoff.disconnected(11.0, R.SHUTTING_DOWN, NEAR_ONE)
    assert decision.retry
    assert decision.delay == pytest.approx(NEAR_ONE * 2.0)
    assert backoff.failures == 8
    assert "restarting" in decision.message


def test_shutting_down_spread() -> None:
    rng = random.Random(4503)
    delays = [
        Backoff().disconnected(0.0, R.SHUTTING_DOWN, rng.random()).delay for _ in range(10_000)
    ]
    assert all(0.0 <= delay < 2.0 for delay in delays)
    assert quartiles(delays) == pytest.approx([0.5, 1.0, 1.5], abs=0.04)


def test_repeated_shutting_down_without_stable_link_falls_back_to_growth() -> None:
    backoff = Backoff()
    first = backoff.disconnected(0.0, R.SHUTTING_DOWN, NEAR_ONE)
    assert first.delay == pytest.approx(NEAR_ONE * 2.0)
    assert backoff.failures == 0
    # A short link in between does not earn another prompt reconnect.
    backoff.connected(2.0)
    delays = [backoff.disconnected(3.0, R.SHUTTING_DOWN, NEAR_ONE).delay]
    delays += [backoff.disconnected(3.0, R.SHUTTING_DOWN, NEAR_ONE).delay for _ in range(9)]
    # Still inside the restart window the first announcement opened: restart bounds.
    assert delays == pytest.approx([NEAR_ONE * bound for bound in RESTART_BOUNDS])
    assert backoff.failures == 10
    assert "again" in backoff.disconnected(3.0, R.SHUTTING_DOWN, 0.5).message


# -- the restart window --------------------------------------------------------------------------


@pytest.mark.parametrize("reason", [R.NETWORK, R.CLOSED, R.SHUTTING_DOWN])
def test_failures_inside_a_restart_window_stay_between_spread_and_restart_cap(
    reason: DisconnectReason,
) -> None:
    backoff = Backoff()
    backoff.disconnected(0.0, R.SHUTTING_DOWN, 0.5)
    assert backoff.in_restart_window(0.0)
    low = [backoff.disconnected(1.0 + n, reason, 0.0).delay for n in range(3)]
    assert low == [0.0, 0.0, 0.0]  # full jitter: the floor raises the bound, not the draw
    backoff.reset()
    backoff.disconnected(0.0, R.SHUTTING_DOWN, 0.5)
    high = [backoff.disconnected(1.0 + n, reason, NEAR_ONE).delay for n in range(10)]
    assert high == pytest.approx([NEAR_ONE * bound for bound in RESTART_BOUNDS])
    assert backoff.failures == 10


def test_the_window_ends_after_restart_window_seconds_and_growth_goes_on() -> None:
    backoff = Backoff()
    backoff.disconnected(100.0, R.SHUTTING_DOWN, 0.5)
    fail_times(backoff, 6, now=100.0 + WINDOW - 0.001)
    assert backoff.in_restart_window(100.0 + WINDOW - 0.001)
    assert not backoff.in_restart_window(100.0 + WINDOW)
    # The count kept growing inside the window; past it the usual bound for that count.
    decision = backoff.disconnected(100.0 + WINDOW, R.NETWORK, NEAR_ONE)
    assert decision.delay == pytest.approx(NEAR_ONE * DEFAULT_BOUNDS[6])
    assert backoff.failures == 7


def test_restart_window_is_configurable() -> None:
    backoff = Backoff(BackoffConfig(restart_window=5.0, restart_cap=4.0))
    backoff.disconnected(0.0, R.SHUTTING_DOWN, 0.5)
    fail_times(backoff, 5, now=1.0)
    inside = backoff.disconnected(4.9, R.NETWORK, NEAR_ONE)
    outside = backoff.disconnected(5.0, R.NETWORK, NEAR_ONE)
    assert inside.delay == pytest.approx(NEAR_ONE * 4.0)
    assert outside.delay == pytest.approx(NEAR_ONE * DEFAULT_BOUNDS[6])


def test_no_window_without_an_announced_restart() -> None:
    # A relay that vanished without a word (a crash): the usual growth from the first failure.
    backoff = Backoff()
    backoff.connected(0.0)
    delays = [backoff.disconnected(40.0, R.NETWORK, NEAR_ONE).delay for _ in range(10)]
    assert delays == pytest.approx([NEAR_ONE * bound for bound in DEFAULT_BOUNDS])
    assert not backoff.in_restart_window(40.0)


def test_a_stable_link_ends_the_window() -> None:
    backoff = Backoff()
    backoff.disconnected(0.0, R.SHUTTING_DOWN, 0.5)
    backoff.connected(1.0)
    decision = backoff.disconnected(31.0, R.NETWORK, NEAR_ONE)
    assert not backoff.in_restart_window(31.0)
    assert decision.delay == pytest.approx(NEAR_ONE * DEFAULT_BOUNDS[0])


def test_a_short_link_keeps_the_window() -> None:
    backoff = Backoff()
    backoff.disconnected(0.0, R.SHUTTING_DOWN, 0.5)
    backoff.connected(1.0)
    decision = backoff.disconnected(5.0, R.NETWORK, NEAR_ONE)
    assert backoff.in_restart_window(5.0)
    assert decision.delay == pytest.approx(NEAR_ONE * RESTART_BOUNDS[0])


def test_messages_inside_the_window_say_the_relay_is_not_back() -> None:
    backoff = Backoff()
    backoff.disconnected(0.0, R.SHUTTING_DOWN, 0.5)
    message = backoff.disconnected(1.0, R.NETWORK, 0.5).message
    assert "not back yet after its restart" in message
    assert "1 failure" in message


def test_a_herd_after_a_restart_never_waits_past_restart_cap_in_the_window() -> None:
    """Ten thousand daemons told of a restart, each failing every dial for the whole window:
    no delay above restart_cap, and their redials spread instead of bunching at the floor."""
    rng = random.Random(1013)
    config = BackoffConfig()
    for _ in range(10_000):
        backoff = Backoff(config)
        now = 0.0
        now += backoff.disconnected(now, R.SHUTTING_DOWN, rng.random()).delay
        while True:
            decision = backoff.disconnected(now, R.NETWORK, rng.random())
            if now >= WINDOW:
                break
            assert decision.delay <= config.restart_cap
            now += decision.delay
    # Spot check of the spread at the cap inside the window: uniform on [0, restart_cap).
    backoff = Backoff(config)
    backoff.disconnected(0.0, R.SHUTTING_DOWN, 0.5)
    fail_times(backoff, 20, now=1.0)
    delays = [backoff.disconnected(1.0, R.NETWORK, rng.random()).delay for _ in range(10_000)]
    assert quartiles(delays) == pytest.approx([3.75, 7.5, 11.25], abs=0.3)


# -- a busy relay --------------------------------------------------------------------------------


def test_relay_busy_waits_in_the_upper_half_of_a_bound_of_at_least_the_spread() -> None:
    backoff = Backoff()
    low = [backoff.disconnected(0.0, R.RELAY_BUSY, 0.0).delay for _ in range(8)]
    # Bounds max(2, 0.5 * 2**n): 2, 2, 2, 4, 8, 16, 32, 60; the delay starts at half of each.
    assert low == [1.0, 1.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert backoff.failures == 8
    backoff.reset()
    high = [backoff.disconnected(0.0, R.RELAY_BUSY, NEAR_ONE).delay for _ in range(8)]
    assert high == pytest.approx([b / 2 + NEAR_ONE * b / 2 for b in [2, 2, 2, 4, 8, 16, 32, 60]])
    assert all(delay < CAP for delay in high)


def test_relay_busy_inside_a_restart_window_stays_within_restart_cap() -> None:
    backoff = Backoff()
    backoff.disconnected(0.0, R.SHUTTING_DOWN, 0.5)
    delays = [backoff.disconnected(1.0, R.RELAY_BUSY, NEAR_ONE).delay for _ in range(10)]
    assert delays == pytest.approx([b / 2 + NEAR_ONE * b / 2 for b in RESTART_BOUNDS])
    assert max(delays) < 15.0


def test_relay_busy_spread() -> None:
    rng = random.Random(503)
    delays = [Backoff().disconnected(0.0, R.RELAY_BUSY, rng.random()).delay for _ in range(10_000)]
    assert all(1.0 <= delay < 2.0 for delay in delays)
    assert quartiles(delays) == pytest.approx([1.25, 1.5, 1.75], abs=0.03)


def test_relay_busy_message_says_so() -> None:
    decision = Backoff().disconnected(0.0, R.RELAY_BUSY, 0.5)
    assert decision.retry
    assert decision.reason is R.RELAY_BUSY
    assert "busy" in decision.message
    assert "1 failure" in decision.message


def test_stable_link_earns_another_prompt_reconnect() -> None:
    backoff = Backoff()
    backoff.disconnected(0.0, R.SHUTTING_DOWN, 0.5)
    fail_times(backoff, 4, now=1.0)
    backoff.connected(2.0)
    decision = backoff.disconnected(32.0, R.SHUTTING_DOWN, NEAR_ONE)
    assert decision.delay == pytest.approx(NEAR_ONE * 2.0)
    assert backoff.failures == 0


def test_reset_earns_another_prompt_reconnect() -> None:
    backoff = Backoff()
    backoff.disconnected(0.0, R.SHUTTING_DOWN, 0.5)
    backoff.reset()
    assert not backoff.in_restart_window(0.0)
    decision = backoff.disconnected(0.0, R.SHUTTING_DOWN, NEAR_ONE)
    assert decision.delay == pytest.approx(NEAR_ONE * 2.0)


# -- reset ---------------------------------------------------------------------------------------


def test_reset_forgets_failures_link_and_clock() -> None:
    backoff = Backoff()
    fail_times(backoff, 5, now=100.0)
    backoff.connected(100.0)
    backoff.reset()
    assert backoff.failures == 0
    # The link is no longer marked up, and an earlier clock is accepted again.
    backoff.connected(1.0)
    assert backoff.disconnected(1.0, R.NETWORK, NEAR_ONE).delay == pytest.approx(NEAR_ONE * 0.5)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rand", [-0.1, 1.0, 1.5, math.nan, math.inf, -math.inf])
def test_rand_outside_unit_interval_is_refused(rand: float) -> None:
    backoff = Backoff()
    fail_times(backoff, 2)
    with pytest.raises(ValueError, match=r"rand must be drawn from \[0, 1\)"):
        backoff.disconnected(1.0, R.NETWORK, rand)
    assert backoff.failures == 2


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_non_finite_now_is_refused(now: float) -> None:
    backoff = Backoff()
    with pytest.raises(ValueError, match="finite"):
        backoff.connected(now)
    with pytest.raises(ValueError, match="finite"):
        backoff.disconnected(now, R.NETWORK, 0.5)
    assert backoff.failures == 0


def test_now_going_backwards_is_refused_and_loses_nothing() -> None:
    backoff = Backoff()
    fail_times(backoff, 3, now=50.0)
    with pytest.raises(ValueError, match="backwards"):
        backoff.connected(49.0)
    backoff.connected(60.0)
    with pytest.raises(ValueError, match="backwards"):
        backoff.disconnected(59.0, R.NETWORK, 0.5)
    assert backoff.failures == 3
    # The link is still marked up since 60: ending it at 90 is a stable link.
    backoff.disconnected(90.0, R.NETWORK, 0.5)
    assert backoff.failures == 1


def test_equal_times_are_accepted() -> None:
    backoff = Backoff()
    backoff.connected(5.0)
    backoff.disconnected(5.0, R.NETWORK, 0.5)
    backoff.disconnected(5.0, R.NETWORK, 0.5)
    assert backoff.failures == 2


def test_connected_twice_is_refused() -> None:
    backoff = Backoff()
    fail_times(backoff, 3)
    backoff.connected(1.0)
    with pytest.raises(ValueError, match="already up"):
        backoff.connected(40.0)
    # The first start time is kept: the link has been up 30 s at 31, long enough to reset.
    backoff.disconnected(31.0, R.NETWORK, 0.5)
    assert backoff.failures == 1


def test_unknown_reason_is_refused() -> None:
    backoff = Backoff()
    bad: Any = "network"
    with pytest.raises(ValueError, match="DisconnectReason"):
        backoff.disconnected(0.0, bad, 0.5)
    assert backoff.failures == 0


# -- close codes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (CloseCode.NORMAL, R.CLOSED),
        (CloseCode.PROTOCOL_ERROR, R.CLOSED),
        (CloseCode.INVALID_KEY, R.INVALID_KEY),
        (CloseCode.REPLACED, R.REPLACED),
        (CloseCode.KEY_REVOKED, R.KEY_REVOKED),
        (CloseCode.TOO_MANY_LINKS, R.TOO_MANY_LINKS),
        (4403, R.KEY_REVOKED),
        (4429, R.TOO_MANY_LINKS),
        (CloseCode.INCOMPATIBLE_VERSION, R.INCOMPATIBLE_VERSION),
        (CloseCode.SHUTTING_DOWN, R.SHUTTING_DOWN),
        (4401, R.INVALID_KEY),
        (1001, R.SHUTTING_DOWN),
        (1012, R.SHUTTING_DOWN),
        (1013, R.RELAY_BUSY),
        (1006, R.NETWORK),
        (1011, R.CLOSED),
        (4999, R.CLOSED),
    ],
)
def test_reason_from_close_code(code: int, reason: DisconnectReason) -> None:
    assert R.from_close_code(code) is reason


# -- property: random sequences of calls ---------------------------------------------------------


@st.composite
def configs(draw: st.DrawFn) -> BackoffConfig:
    base = draw(st.floats(0.001, 10.0))
    cap = draw(st.floats(base, 1_000.0))
    restart_spread = draw(st.floats(0.001, cap))
    return BackoffConfig(
        base=base,
        cap=cap,
        multiplier=draw(st.floats(1.0, 10.0)),
        stable_after=draw(st.floats(0.01, 100.0)),
        restart_spread=restart_spread,
        restart_window=draw(st.floats(0.01, 200.0)),
        restart_cap=draw(st.floats(restart_spread, 2_000.0)),
        replaced_delay=draw(st.floats(0.001, 1_000.0)),
    )


@attrs.define
class Model:
    """The documented rules, tracked independently of the machine under test."""

    failures: int = 0
    up_since: float | None = None
    prompt_available: bool = True
    restart_until: float | None = None


connect_op = st.tuples(st.just("connect"), st.floats(0.0, 50.0))
disconnect_op = st.tuples(
    st.just("disconnect"),
    st.floats(0.0, 50.0),
    st.sampled_from(list(R)),
    st.floats(0.0, 1.0, exclude_max=True),
)
ops = st.lists(st.one_of(connect_op, disconnect_op), max_size=80)


@given(config=configs(), operations=ops)
def test_random_call_sequences_follow_the_rules(
    config: BackoffConfig, operations: list[tuple[Any, ...]]
) -> None:
    backoff = Backoff(config)
    model = Model()
    now = 0.0
    for op in operations:
        now += op[1]
        if op[0] == "connect":
            if model.up_since is not None:
                with pytest.raises(ValueError):
                    backoff.connected(now)
            else:
                backoff.connected(now)
                model.up_since = now
            continue
        _, _, reason, rand = op
        if model.up_since is not None:
            if now - model.up_since >= config.stable_after:
                model.failures = 0
                model.prompt_available = True
                model.restart_until = None
            model.up_since = None
        before = model.failures
        restarting = model.restart_until is not None and now < model.restart_until
        decision = backoff.disconnected(now, reason, rand)

        assert decision.reason is reason
        assert decision.delay >= 0.0
        assert decision.delay <= config.cap or reason is R.REPLACED
        assert "\n" not in decision.message
        policy = POLICIES[reason]
        if policy is Policy.STOP:
            assert not decision.retry
            assert decision.delay == 0.0
        elif policy is Policy.REPLACED:
            assert decision.retry
            assert config.replaced_delay <= decision.delay <= 1.5 * config.replaced_delay
        elif policy is Policy.SLOW:
            assert decision.retry
            assert config.cap / 2 <= decision.delay <= config.cap
            model.failures += 1
        elif policy is Policy.PROMPT and model.prompt_available:
            assert decision.retry
            assert decision.delay == pytest.approx(rand * config.restart_spread)
            model.prompt_available = False
            model.restart_until = now + config.restart_window
        else:
            assert decision.retry
            bound = config.bound(before)
            if restarting:
                bound = min(max(bound, config.restart_spread), config.restart_cap, config.cap)
                assert decision.delay <= config.restart_cap * (1 + 1e-12)
            if policy is Policy.BUSY:
                bound = max(bound, config.restart_spread)
                assert decision.delay == pytest.approx(bound / 2 + rand * bound / 2)
                assert decision.delay >= config.restart_spread / 2 * (1 - 1e-12)
            else:
                assert decision.delay == pytest.approx(rand * bound)
            assert decision.delay <= config.cap * (1 + 1e-12)
            model.failures += 1
        assert backoff.failures == model.failures
        window_open = model.restart_until is not None and now < model.restart_until
        assert backoff.in_restart_window(now) is window_open


@given(config=configs(), failures=st.integers(0, 10**6))
def test_bound_is_monotonic_and_capped(config: BackoffConfig, failures: int) -> None:
    assert config.base <= config.bound(failures) <= config.cap
    assert config.bound(failures) <= config.bound(failures + 1)
