"""Times as the commands show them: local ISO 8601, with how long ago or how soon."""

from __future__ import annotations

import datetime
import math

from ._errors import one_line


def local_time(stamp: float | None) -> str:
    """``2025-01-02T03:04:05+01:00`` in local time, or ``-`` for no time."""
    if stamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")


def format_time(value: object, now: float) -> str:
    """``2025-01-02T03:04:05+01:00 (12 s ago)`` (or ``(in 5 s)``), in local time."""
    stamp = _timestamp(value)
    if stamp is None:
        return one_line(str(value))
    try:
        local = datetime.datetime.fromtimestamp(stamp).astimezone()
    except (OverflowError, OSError, ValueError):
        return one_line(str(value))
    delta = now - stamp
    relative = f"{_span(delta)} ago" if delta >= 0 else f"in {_span(delta)}"
    return f"{local.isoformat(timespec='seconds')} ({relative})"


def _timestamp(value: object) -> float | None:
    """Epoch seconds from a number or an ISO 8601 string; ``None`` if it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.astimezone()
        return parsed.timestamp()
    return None


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"
