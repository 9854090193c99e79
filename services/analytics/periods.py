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
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tally.runtime.errors import InvalidArgument

_PERIOD = re.compile(r"^([1-9][0-9]{0,4})([hd])$")
PERIOD_HELP = "a positive whole number of hours or days such as 24h, 7d, 30d or 90d"

GRANULARITIES: dict[str, timedelta] = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(weeks=1),
}
# Monday 2000-01-03 00:00 UTC: the origin TimescaleDB uses for week buckets.
WEEK_ORIGIN = datetime(2000, 1, 3, tzinfo=UTC)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


@dataclass(frozen=True)
class Window:
    """A half-open UTC interval `[start, end)`."""

    start: datetime
    end: datetime

    @property
    def length(self) -> timedelta:
        return self.end - self.start

    @property
    def hours(self) -> float:
        return self.length / HOUR

    @property
    def days(self) -> float:
        return self.length / DAY

    def previous(self) -> Window:
        """The window of equal length immediately before this one."""
        return Window(self.start - self.length, self.start)


def parse_period(value: str, field: str, *, default: str, max_days: int) -> tuple[str, timedelta]:
    """`24h` / `7d` -> (text, length); anything else is a 400 naming `field` and the allowed form."""
    text = value or default
    match = _PERIOD.match(text)
    if not match:
        raise InvalidArgument.field(field, f"unknown value {text[:32]!r}; allowed: {PERIOD_HELP} (at most {max_days}d)")
    amount = int(match[1])
    length = timedelta(hours=amount) if match[2] == "h" else timedelta(days=amount)
    if length > timedelta(days=max_days):
        raise InvalidArgument.field(field, f"{text} is longer than the limit of {max_days}d")
    return text, length


def choose(value: str, field: str, allowed: tuple[str, ...], default: str) -> str:
    """One of `allowed` (empty selects `default`); otherwise a 400 listing the allowed values."""
    text = value or default
    if text not in allowed:
        raise InvalidArgument.field(field, f"unknown value {text[:32]!r}; allowed: {', '.join(allowed)}")
    return text


def floor_to(at: datetime, step: timedelta) -> datetime:
    """The start of the `step` bucket containing `at` (weeks start on Monday, UTC)."""
    origin = WEEK_ORIGIN if step == GRANULARITIES["week"] else datetime(1970, 1, 1, tzinfo=UTC)
    steps = (at - origin) // step
    return origin + steps * step


def ceil_to(at: datetime, step: timedelta) -> datetime:
    floor = floor_to(at, step)
    return floor if floor == at else floor + step


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
