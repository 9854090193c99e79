"""Time windows of exports and reports: relative periods ("24h", "30d"), explicit ranges, months."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from google.protobuf import timestamp_pb2

from tally.runtime.errors import InvalidArgument

_PERIOD = re.compile(r"^([1-9][0-9]{0,4})([hd])$")
_MONTH = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


@dataclass(frozen=True)
class Window:
    """`[start, end)` in UTC."""

    start: datetime
    end: datetime

    @property
    def span(self) -> timedelta:
        return self.end - self.start


def parse_period(value: str, field: str, *, max_days: int) -> timedelta:
    """ "<n>h" or "<n>d" as a duration; anything else is a 400 naming `field`."""
    match = _PERIOD.match(value.strip())
    if not match:
        raise InvalidArgument.field(field, f'must look like "24h" or "30d", got {value[:32]!r}')
    amount = int(match[1])
    span = timedelta(hours=amount) if match[2] == "h" else timedelta(days=amount)
    if span > timedelta(days=max_days):
        raise InvalidArgument.field(field, f"must be at most {max_days} days")
    return span


def floor_to(at: datetime, width: timedelta) -> datetime:
    """Floors a UTC instant to a multiple of `width` since the epoch (hours, days)."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((at - epoch) // width) * width


def ceil_to(at: datetime, width: timedelta) -> datetime:
    floored = floor_to(at, width)
    return floored if floored == at else floored + width


def timestamp(value: timestamp_pb2.Timestamp) -> datetime:
    return value.ToDatetime(tzinfo=UTC)


def month_window(value: str, field: str, zone: ZoneInfo) -> Window:
    """A calendar month "YYYY-MM" in `zone`, as UTC instants."""
    match = _MONTH.match(value.strip())
    if not match:
        raise InvalidArgument.field(field, f'must be a month "YYYY-MM", got {value[:32]!r}')
    year, month = int(match[1]), int(match[2])
    start = datetime(year, month, 1, tzinfo=zone)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=zone)
    return Window(start.astimezone(UTC), end.astimezone(UTC))


def iso(at: datetime) -> str:
    """RFC 3339 in UTC with a Z, seconds precision unless there are microseconds."""
    text = at.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")
