"""Time windows shared by the services that answer over a period: half-open UTC intervals,
relative periods ("24h", "30d") and bucket alignment."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tally.runtime.errors import InvalidArgument

_PERIOD = re.compile(r"^([1-9][0-9]{0,4})([hd])$")
PERIOD_HELP = "a positive whole number of hours or days such as 24h, 7d, 30d or 90d"
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
WEEK = timedelta(weeks=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Monday 2000-01-03 00:00 UTC: the origin TimescaleDB uses for week buckets.
WEEK_ORIGIN = datetime(2000, 1, 3, tzinfo=UTC)


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


def parse_period(value: str, field: str, *, max_days: int, default: str = "") -> tuple[str, timedelta]:
    """`24h` / `7d` -> (text, length); empty selects `default`; anything else is a 400 naming
    `field` and the allowed form."""
    text = value.strip() or default
    match = _PERIOD.match(text)
    if not match:
        raise InvalidArgument.field(field, f"unknown value {text[:32]!r}; allowed: {PERIOD_HELP} (at most {max_days}d)")
    amount = int(match[1])
    length = timedelta(hours=amount) if match[2] == "h" else timedelta(days=amount)
    if length > timedelta(days=max_days):
        raise InvalidArgument.field(field, f"{text} is longer than the limit of {max_days}d")
    return text, length


def floor_to(at: datetime, step: timedelta) -> datetime:
    """The start of the `step` bucket containing `at`: multiples of `step` since the epoch, except
    weeks, which start on Monday 00:00 UTC (as TimescaleDB's week buckets)."""
    origin = WEEK_ORIGIN if step == WEEK else EPOCH
    return origin + ((at - origin) // step) * step


def ceil_to(at: datetime, step: timedelta) -> datetime:
    floor = floor_to(at, step)
    return floor if floor == at else floor + step
