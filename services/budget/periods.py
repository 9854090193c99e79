"""Budget periods aligned to a timezone: counters are keyed by the period's start, so a new
period simply starts new counters and no reset job is needed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class PeriodKind(StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    TOTAL = "total"


# The 'total' period has one start for all time.
TOTAL_START = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Period:
    kind: PeriodKind
    start: datetime  # UTC instant of the local start
    end: datetime | None  # UTC instant of the next period's start; None for 'total'

    @property
    def start_epoch(self) -> int:
        return int(self.start.timestamp())


def zone_named(name: str, default: ZoneInfo) -> ZoneInfo:
    """The zone of a budget: its own when set, else the configured default."""
    return ZoneInfo(name) if name else default


def is_known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


def _first_of_next_month(day: date) -> date:
    return date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)


def period_at(kind: PeriodKind, zone: ZoneInfo, at: datetime) -> Period:
    """The period of `kind` containing the instant `at`, in `zone`."""
    if kind is PeriodKind.TOTAL:
        return Period(kind, TOTAL_START, None)
    local_day = at.astimezone(zone).date()
    if kind is PeriodKind.DAILY:
        first, after = local_day, local_day + timedelta(days=1)
    elif kind is PeriodKind.WEEKLY:
        first = local_day - timedelta(days=local_day.weekday())  # Monday
        after = first + timedelta(days=7)
    else:
        first = local_day.replace(day=1)
        after = _first_of_next_month(local_day)
    return Period(kind, _local_midnight(first, zone), _local_midnight(after, zone))


def previous_period(period: Period, zone: ZoneInfo) -> Period | None:
    if period.kind is PeriodKind.TOTAL:
        return None
    return period_at(period.kind, zone, period.start - timedelta(seconds=1))


def days_in_month(at: datetime, zone: ZoneInfo) -> int:
    day = at.astimezone(zone).date().replace(day=1)
    return (_first_of_next_month(day) - day).days
