"""Request parameters of the analytics routes and the time windows they select.

Windows are half-open `[start, end)` and aligned to rollup buckets, so every total equals the
sum of the raw events whose event time falls inside the window:

- A period without a granularity (`30d`) covers the last N whole hours ending with the current,
  still-open UTC hour: `[floor_hour(now) + 1h - N, floor_hour(now) + 1h)`.
- A trends window at granularity g covers `ceil(N / g)` buckets ending with the current bucket;
  days are UTC days and weeks are ISO weeks starting on Monday 00:00 UTC (TimescaleDB's
  `time_bucket('1 week')` origin).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from tally.runtime.errors import InvalidArgument
from tally.runtime.windows import DAY, HOUR, WEEK, Window, floor_to

GRANULARITIES: dict[str, timedelta] = {
    "minute": timedelta(minutes=1),
    "hour": HOUR,
    "day": DAY,
    "week": WEEK,
}


def choose(value: str, field: str, allowed: tuple[str, ...], default: str) -> str:
    """One of `allowed` (empty selects `default`); otherwise a 400 listing the allowed values."""
    text = value or default
    if text not in allowed:
        raise InvalidArgument.field(field, f"unknown value {text[:32]!r}; allowed: {', '.join(allowed)}")
    return text


def hour_window(length: timedelta, now: datetime) -> Window:
    """The last `length` (rounded up to whole hours) ending with the current, open hour."""
    end = floor_to(now, HOUR) + HOUR
    hours = max(1, math.ceil(length / HOUR))
    return Window(end - hours * HOUR, end)


def default_granularity(length: timedelta) -> str:
    if length <= timedelta(hours=2):
        return "minute"
    if length <= timedelta(days=14):
        return "hour"
    return "day"


def bucket_window(length: timedelta, granularity: str, now: datetime, max_points: int) -> tuple[Window, int]:
    """`ceil(length / g)` buckets ending with the current one; a 400 when there are too many."""
    step = GRANULARITIES[granularity]
    points = max(1, math.ceil(length / step))
    if points > max_points:
        raise InvalidArgument.field(
            "granularity",
            f"{granularity} buckets over this period give {points} data points; the limit is {max_points}"
            " (choose a coarser granularity or a shorter period)",
        )
    end = floor_to(now, step) + step
    return Window(end - points * step, end), points
