"""Time windows of exports and reports: relative periods ("24h", "30d"), explicit ranges, months."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from google.protobuf import timestamp_pb2

from tally.runtime.errors import InvalidArgument
from tally.runtime.windows import Window

_MONTH = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")


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
