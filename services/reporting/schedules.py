"""Report schedules: validation and fire-time arithmetic in the schedule's own timezone.

A schedule fires at a local time of day (`time`, "HH:MM", seconds optional) in `timezone`:
daily, weekly on `dayOfWeek`, or monthly on `dayOfMonth` (a month without that day fires on
its last day). Fire times are computed from local calendar dates, so DST changes move the UTC
instant, never the local time.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tally.runtime.validation import Violations

FREQUENCIES = ("daily", "weekly", "monthly")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_TIME = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?$")
_EMAIL = re.compile(r"^[^@\s,;<>\"]+@[^@\s,;<>\"]+\.[^@\s,;<>\".]+$")


@dataclass(frozen=True)
class Schedule:
    frequency: str
    at: time
    timezone: str
    day_of_week: int = 0  # Monday = 0
    day_of_month: int = 1

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def as_json(self) -> dict[str, Any]:
        return {
            "frequency": self.frequency,
            "time": self.at.strftime("%H:%M:%S" if self.at.second else "%H:%M"),
            "timezone": self.timezone,
            "dayOfWeek": WEEKDAYS[self.day_of_week] if self.frequency == "weekly" else "",
            "dayOfMonth": self.day_of_month if self.frequency == "monthly" else 0,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Schedule:
        hours, minutes, *seconds = (int(part) for part in data["time"].split(":"))
        return cls(
            frequency=data["frequency"],
            at=time(hours, minutes, seconds[0] if seconds else 0),
            timezone=data["timezone"],
            day_of_week=WEEKDAYS.index(data["dayOfWeek"]) if data.get("dayOfWeek") else 0,
            day_of_month=int(data.get("dayOfMonth") or 1),
        )

    def _fires_on(self, day: date) -> bool:
        if self.frequency == "daily":
            return True
        if self.frequency == "weekly":
            return day.weekday() == self.day_of_week
        last = calendar.monthrange(day.year, day.month)[1]
        return day.day == min(self.day_of_month, last)

    def _fire_on(self, day: date) -> datetime:
        return datetime.combine(day, self.at, tzinfo=self.zone)

    def next_after(self, after: datetime) -> datetime:
        """The first fire strictly after `after` (an aware instant)."""
        day = after.astimezone(self.zone).date() - timedelta(days=1)
        for _ in range(70):
            if self._fires_on(day):
                fire = self._fire_on(day)
                if fire > after:
                    return fire
            day += timedelta(days=1)
        raise AssertionError("a schedule fires at least every 31 days")

    def latest_at_or_before(self, at: datetime) -> datetime:
        """The last fire at or before `at`."""
        day = at.astimezone(self.zone).date() + timedelta(days=1)
        for _ in range(70):
            if self._fires_on(day):
                fire = self._fire_on(day)
                if fire <= at:
                    return fire
            day -= timedelta(days=1)
        raise AssertionError("a schedule fires at least every 31 days")


def valid_timezone(value: str) -> bool:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def parse_schedule(
    violations: Violations,
    where: str,
    *,
    frequency: str,
    time_text: str,
    timezone: str,
    day_of_week: str,
    day_of_month: int,
    frequency_field: str = "frequency",
) -> Schedule | None:
    """Validates one schedule; adds violations naming `where` + the field; None when invalid."""
    ok = True
    frequency = frequency.strip().lower()
    if frequency not in FREQUENCIES:
        violations.add(f"{where}{frequency_field}", "must be daily, weekly or monthly")
        ok = False
    match = _TIME.match(time_text.strip() or "00:00")
    if not match:
        violations.add(f"{where}time", f'must be a local time "HH:MM" (24 h), got {time_text[:16]!r}')
        ok = False
    zone = timezone.strip() or "UTC"
    if not valid_timezone(zone):
        violations.add(f"{where}timezone", f"unknown IANA timezone {timezone[:64]!r}")
        ok = False
    weekday = 0
    if day_of_week.strip():
        if day_of_week.strip().lower() not in WEEKDAYS:
            violations.add(f"{where}dayOfWeek", "must be monday .. sunday")
            ok = False
        else:
            weekday = WEEKDAYS.index(day_of_week.strip().lower())
            if frequency != "weekly":
                violations.add(f"{where}dayOfWeek", "only applies to weekly schedules")
                ok = False
    elif frequency == "weekly":
        violations.add(f"{where}dayOfWeek", "required for a weekly schedule (monday .. sunday)")
        ok = False
    if day_of_month:
        if not 1 <= day_of_month <= 31:
            violations.add(f"{where}dayOfMonth", "must be between 1 and 31")
            ok = False
        elif frequency != "monthly":
            violations.add(f"{where}dayOfMonth", "only applies to monthly schedules")
            ok = False
    if not ok or match is None:
        return None
    return Schedule(
        frequency=frequency,
        at=time(int(match[1]), int(match[2]), int(match[3] or 0)),
        timezone=zone,
        day_of_week=weekday,
        day_of_month=day_of_month or 1,
    )


def parse_recipients(violations: Violations, field: str, recipients: list[str]) -> list[str]:
    out = []
    if len(recipients) > 50:
        violations.add(field, "at most 50 recipients")
    for index, address in enumerate(recipients):
        address = address.strip()
        if not _EMAIL.match(address) or len(address) > 254:
            violations.add(f"{field}[{index}]", f"not an e-mail address: {address[:64]!r}")
        out.append(address)
    return list(dict.fromkeys(out))
