"""Summaries of measured durations, for assertions and the test output."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def describe(values: Sequence[float]) -> str:
    """``min, quartiles, max`` (and p10/p90) of ``values`` in seconds, for the test output."""
    ordered = sorted(values)
    if len(ordered) < 2:
        return f"n={len(ordered)} values={ordered}"
    deciles = statistics.quantiles(ordered, n=10, method="inclusive")
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive")
    return (
        f"n={len(ordered)} min={ordered[0]:.3f} p10={deciles[0]:.3f} q1={quartiles[0]:.3f} "
        f"median={quartiles[1]:.3f} q3={quartiles[2]:.3f} p90={deciles[-1]:.3f} "
        f"max={ordered[-1]:.3f}"
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (linear interpolation)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
