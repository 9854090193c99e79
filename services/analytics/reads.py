"""The analytics read endpoints: parameters in, the contract's shapes out.

Each method validates its parameters, runs the aggregations of `queries.py` (or reads the live
counters in Redis) and assembles the response message. Money is summed as integer micro-units
and converted to USD doubles only here. Derived metrics are defined in `model.py`; windows in
`periods.py`. Definitions specific to one endpoint are in its method's docs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from services.analytics import model
from services.analytics.periods import GRANULARITIES, bucket_window, choose, default_granularity, hour_window
from services.analytics.queries import LATENCY_SUMS, TTFT_SUMS, AnalyticsQueries, Rollup, Totals
from tally.analytics.v1 import analytics_pb2 as pb
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.runtime.clients import call_metadata
from tally.runtime.config import Settings
from tally.runtime.db import Database
from tally.runtime.errors import InvalidArgument, NotFound
from tally.runtime.redis import RedisClient
from tally.runtime.validation import require_uuid
from tally.runtime.windows import DAY, HOUR, Window, ceil_to, floor_to, parse_period
from tally.usage import live
from tally.usage.histogram import LATENCY_COLUMNS, TTFT_COLUMNS, percentile

log = logging.getLogger("tally.analytics.reads")

MICROS = 1_000_000
DEFAULT_PERIOD = "7d"
TOP_LIVE = 10
# The live view names its top keys from a cache: a renamed key shows its new name within this.
LIVE_NAME_TTL_SECONDS = 30.0
LIVE_NAME_CACHE_SIZE = 10_000
COMPARE_METRICS = ("requests", "cost", "latency", "errorRate", "tokens")
LOWER_IS_BETTER = frozenset({"latency", "errorRate"})
MAX_COMPARED_KEYS = 50
TIME_OF_DAY_BANDS = ("00-06", "06-12", "12-18", "18-24")
PEAK_HOURS = 6
FORECAST_CONFIDENCE = 0.85
FORECAST_TRAINING_DAYS = 90
KEY_FORECASTS = 20
COST_TREND_THRESHOLD = 0.05
SUBSTITUTION_OPERATIONS = ("chat.completions", "completions")
BUDGET_PERIOD_DAYS = {"daily": 1.0, "weekly": 7.0, "monthly": 30.4375}


def usd(micros: int | float | Decimal) -> float:
    return float(micros) / MICROS


def seconds(latency_ms_sum: int, requests: int) -> float:
    return latency_ms_sum / requests / 1000 if requests else 0.0


def _percentiles(counts: Sequence[int]) -> pb.LatencyPercentiles:
    values = [percentile(counts, q) for q in (0.5, 0.9, 0.95, 0.99)]
    p50, p90, p95, p99 = ((v or 0.0) / 1000 for v in values)
    return pb.LatencyPercentiles(p50=p50, p90=p90, p95=p95, p99=p99)


async def _ready(value: dict[str, int]) -> dict[str, int]:
    return value


RISK_ORDER = {"high": 0, "medium": 1, "low": 2}


def forecast_candidates(
    fits: Sequence[tuple[str, model.Forecast]], budgeted: Sequence[str], limit: int
) -> list[tuple[str, model.Forecast]]:
    """The keys a budget forecast lists: the `limit` with the highest projected spend, and the
    `limit` most utilized of those with a budget (`budgeted`, most utilized first) that have a
    spend history, each once."""
    ranked = sorted(fits, key=lambda kf: (-kf[1].projected, kf[0]))
    chosen = dict(ranked[:limit])
    by_key = dict(fits)
    for key_id in [k for k in budgeted if k in by_key][:limit]:
        chosen.setdefault(key_id, by_key[key_id])
    return list(chosen.items())


def _stamp(message: Any, field: str, at: datetime) -> None:
    getattr(message, field).FromDatetime(at.astimezone(UTC).replace(tzinfo=None))


def _price(row: dict[str, Any], name: str) -> Decimal:
    return Decimal(row[name] or 0)


@dataclass(frozen=True)
class BudgetView:
    max_budget_micros: int
    spent_micros: int
    period: str
    period_start: datetime
    period_end: datetime | None
    zone: ZoneInfo


class AnalyticsReads:
    def __init__(self, settings: Settings, db: Database, redis: RedisClient, budget: grpc.aio.Channel | None) -> None:
        self._settings = settings
        self._q = AnalyticsQueries(db)
        self._redis = redis
        self._budget = budget_pb2_grpc.BudgetServiceStub(budget) if budget is not None else None
        self._zone = settings.zone
        self._live_names: dict[str, tuple[str, float]] = {}

    def _period(self, value: str, field: str = "period") -> tuple[str, timedelta]:
        return parse_period(value, field, default=DEFAULT_PERIOD, max_days=self._settings.analytics_max_period_days)

    # ================================================================== live
    async def live_usage(self, now: datetime | None = None) -> pb.LiveUsage:
        """Current UTC minute and hour and the current day in the configured timezone, from the live
        counters ingest writes after each commit (`tally.usage.live`). `activeRequests` is the
        number of reservations in flight (authorized, not yet settled, released or expired) as
        the budget service counts them; 0 when it cannot answer. Top keys are named from a cache
        (a rename shows within LIVE_NAME_TTL_SECONDS)."""
        now = now or datetime.now(UTC)
        active = asyncio.ensure_future(self._open_reservations())
        try:
            *hashes, since = await self._read_live(now)
        except (RedisError, OSError):  # Redis is down: every bucket comes from the database
            log.warning("live view from the database: redis unavailable")
            hashes, since = [{}, {}, {}], None
        minute, hour, day = ({k.decode(): int(v) for k, v in raw.items()} for raw in hashes)
        minute_start, hour_start = floor_to(now, timedelta(minutes=1)), floor_to(now, HOUR)
        local = now.astimezone(self._zone)
        day_start = datetime.combine(local.date(), datetime.min.time(), self._zone).astimezone(UTC)
        day_end = datetime.combine(local.date() + DAY, datetime.min.time(), self._zone).astimezone(UTC)
        # A bucket whose live counters may lack events (see tally.usage.live) is read from the
        # database: the same figures, exactly, only slower.
        if not live.complete(since, day_start):
            minute, hour, day = await asyncio.gather(
                self._live_from_events(Window(minute_start, minute_start + timedelta(minutes=1)))
                if not live.complete(since, minute_start)
                else _ready(minute),
                self._live_hour_from_rollups(Window(hour_start, hour_start + HOUR))
                if not live.complete(since, hour_start)
                else _ready(hour),
                self._live_from_events(Window(day_start, day_end)),
            )
        data = pb.LiveUsage(
            real_time_metrics=pb.RealTimeMetrics(
                active_requests=await active,
                requests_this_minute=minute.get("requests", 0),
                requests_this_hour=hour.get("requests", 0),
                requests_today=day.get("requests", 0),
                tokens_this_minute=minute.get("tokens", 0),
                tokens_this_hour=hour.get("tokens", 0),
                cost_this_minute=usd(minute.get("cost", 0)),
                cost_this_hour=usd(hour.get("cost", 0)),
                cost_today=usd(day.get("cost", 0)),
            )
        )
        _stamp(data, "timestamp", now)
        hour_cost = hour.get("cost", 0)
        hour_requests = hour.get("requests", 0)
        keys: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        models: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        providers: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for name, value in hour.items():
            parts = name.split("|")
            slot = 0 if parts[-1] == "requests" else 1
            if parts[0] == "k" and len(parts) == 3:
                keys[parts[1]][slot] = value
            elif parts[0] == "m" and len(parts) == 4:
                models[(parts[1], parts[2])][slot] = value
            elif parts[0] == "p" and len(parts) == 3:
                providers[parts[1]][slot] = value
        top_keys = sorted(keys.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0]))[:TOP_LIVE]
        names = await self._names_for_live([k for k, _ in top_keys])
        for key_id, (requests, cost) in top_keys:
            data.top_virtual_keys.add(
                key_id=key_id,
                key_name=names.get(key_id, key_id),
                requests_this_hour=requests,
                cost_this_hour=usd(cost),
                percentage_of_total=model.ratio(cost, hour_cost),
            )
        for (provider, model_name), (requests, cost) in sorted(
            models.items(), key=lambda kv: (-kv[1][1], -kv[1][0], kv[0])
        )[:TOP_LIVE]:
            data.top_models.add(
                model=model_name,
                provider=provider,
                requests_this_hour=requests,
                cost_this_hour=usd(cost),
                percentage_of_total=model.ratio(cost, hour_cost),
            )
        for provider, (requests, cost) in providers.items():
            data.provider_distribution[provider].CopyFrom(
                pb.ProviderShare(requests=requests, cost=usd(cost), percentage=model.ratio(requests, hour_requests))
            )
        return data

    async def _read_live(self, now: datetime) -> list[Any]:
        """The minute, hour and day hashes and the complete-since instant, in one round trip;
        tried twice when the connection fails (a pooled connection to a Redis that restarted
        fails once; these reads change nothing, so a second try is safe)."""
        keys = (live.minute_key(now), live.hour_key(now), live.day_key(now, self._zone))
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            pipe.get(live.SINCE_KEY)
            try:
                return list(await pipe.execute())
            except RedisConnectionError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _live_from_events(self, window: Window) -> dict[str, int]:
        """Requests, tokens and cost of `window` as the live counters hold them, from the
        rollups for its whole hours and the raw events for the rest."""
        start, end = ceil_to(window.start, HOUR), floor_to(window.end, HOUR)
        parts = [self._q.raw_totals(window)] if start >= end else [self._q.totals(Window(start, end))]
        if start < end:
            parts += [self._q.raw_totals(w) for w in (Window(window.start, start), Window(end, window.end)) if w.length]
        total = sum(await asyncio.gather(*parts), Totals())
        return {"requests": total.requests, "tokens": total.tokens, "cost": total.cost_micros}

    async def _live_hour_from_rollups(self, window: Window) -> dict[str, int]:
        """The live counters' fields of one whole hour: totals, and requests and cost by key, by
        model and by provider."""
        by_key, by_model = await asyncio.gather(
            self._q.grouped(window, "key_id::text", rollup=Rollup.KEY), self._q.grouped(window, "provider, model")
        )
        fields: dict[str, int] = defaultdict(int)
        # Groups whose rows cancel out (a data-subject delete) are not shown, as the counters
        # would not have them.
        by_key = [row for row in by_key if int(row["requests"]) or int(row["cost_micros"])]
        by_model = [row for row in by_model if int(row["requests"]) or int(row["cost_micros"])]
        for row in by_key:
            fields[f"k|{row['g0']}|requests"] += int(row["requests"])
            fields[f"k|{row['g0']}|cost"] += int(row["cost_micros"])
        for row in by_model:
            fields[f"m|{row['g0']}|{row['g1']}|requests"] += int(row["requests"])
            fields[f"m|{row['g0']}|{row['g1']}|cost"] += int(row["cost_micros"])
            fields[f"p|{row['g0']}|requests"] += int(row["requests"])
            fields[f"p|{row['g0']}|cost"] += int(row["cost_micros"])
        total = Totals.total(by_model)
        fields.update(requests=total.requests, tokens=total.tokens, cost=total.cost_micros)
        return dict(fields)

    async def _names_for_live(self, key_ids: list[str]) -> dict[str, str]:
        """Key names, from the cache while fresh (LIVE_NAME_TTL_SECONDS), else from the database."""
        now = time.monotonic()
        cache = self._live_names
        stale = [k for k in key_ids if (hit := cache.get(k)) is None or hit[1] <= now]
        if stale:
            if len(cache) > LIVE_NAME_CACHE_SIZE:
                cache.clear()
            for key_id, name in (await self._q.key_names(stale)).items():
                cache[key_id] = (name, now + LIVE_NAME_TTL_SECONDS)
        return {k: cache[k][0] for k in key_ids if k in cache}

    # ================================================================== trends
    async def usage_trends(self, period: str, granularity: str, now: datetime | None = None) -> pb.UsageTrends:
        """A timeline of every bucket (zeros where empty) and growth versus the preceding window of
        equal length. `peakRequestsPerHour` is the busiest UTC clock hour inside the window;
        `averageRequestsPerHour` is requests / the window's hours; `activeVirtualKeys` counts the
        keys with at least one request in the bucket. Minute buckets come from the raw events
        (bounded by ANALYTICS_MAX_DATA_POINTS), hours from the hourly rollups, days and weeks
        from the daily rollups (measures from the global ones, active keys from the per-key ones)."""
        now = now or datetime.now(UTC)
        period_text, length = self._period(period)
        granularity = choose(granularity, "granularity", tuple(GRANULARITIES), default_granularity(length))
        window, points = bucket_window(length, granularity, now, self._settings.analytics_max_data_points)
        step = GRANULARITIES[granularity]
        previous_task = self._previous_totals(window, granularity)
        peak: int | None = None  # minute and hour timelines give it; day and week ask the hourly rollup
        if granularity == "minute":
            rows, previous = await asyncio.gather(self._q.minute_series(window), previous_task)
            active = {r["bucket"]: int(r["active_keys"]) for r in rows}
        elif granularity == "hour":
            rows, active, previous = await asyncio.gather(
                self._q.hourly_series(window), self._q.active_keys(window, "1 hour"), previous_task
            )
        else:
            width = "1 week" if granularity == "week" else "1 day"
            rows, active, previous, peak = await asyncio.gather(
                self._q.daily_series(window, width),
                self._q.active_keys(window, width),
                previous_task,
                self._q.peak_hour_requests(window),
            )
        by_bucket = {r["bucket"]: r for r in rows}
        data = pb.UsageTrends(period=period_text, granularity=granularity, total_data_points=points)
        total = Totals()
        hourly_requests: dict[datetime, int] = defaultdict(int)
        for index in range(points):
            start = window.start + index * step
            row = by_bucket.get(start)
            t = Totals.of(row)
            total += t
            point = data.timeline.add(
                requests=t.requests,
                tokens=t.tokens,
                cost=usd(t.cost_micros),
                active_virtual_keys=active.get(start, 0),
                error_rate=model.ratio(t.failures, t.requests),
            )
            _stamp(point, "timestamp", start)
            if granularity in ("minute", "hour"):
                hourly_requests[floor_to(start, HOUR)] += t.requests
        if peak is None:
            peak = max(hourly_requests.values(), default=0)
        data.metrics.CopyFrom(
            pb.UsageTrendMetrics(
                total_requests=total.requests,
                total_tokens=total.tokens,
                total_cost=usd(total.cost_micros),
                average_requests_per_hour=total.requests / window.hours,
                peak_requests_per_hour=peak,
                average_cost_per_request=usd(model.ratio(total.cost_micros, total.requests)),
            )
        )
        data.trends.CopyFrom(
            pb.UsageGrowth(
                request_growth=model.growth(total.requests, previous.requests),
                cost_growth=model.growth(total.cost_micros, previous.cost_micros),
                efficiency_improvement=model.efficiency_improvement(
                    total.cost_micros, total.tokens, previous.cost_micros, previous.tokens
                ),
            )
        )
        return data

    async def _previous_totals(self, window: Window, granularity: str) -> Totals:
        previous = window.previous()
        if granularity == "minute":
            rows = await self._q.minute_series(previous)
            sums = [sum(int(r[name] or 0) for r in rows) for name in Totals.__dataclass_fields__]
            return Totals(*sums)
        return await self._q.totals(previous)

    # ================================================================== one key
    async def key_analytics(
        self, key_id: str, period: str, breakdown: str, now: datetime | None = None
    ) -> pb.VirtualKeyAnalytics:
        """Summary and breakdowns over the hour-aligned window; time-of-day bands, daily trend dates
        and peak hours are in the configured timezone (whole-hour UTC offsets are exact)."""
        now = now or datetime.now(UTC)
        key = str(require_uuid(key_id, "keyId"))
        period_text, length = self._period(period)
        breakdown = choose(breakdown, "breakdown", ("daily", "hourly"), "daily")
        names = await self._q.key_names([key])
        if key not in names:
            raise NotFound(f"virtual key {key} is unknown", metadata={"keyId": key})
        window = hour_window(length, now)
        where = "key_id = %(key)s::uuid"
        # The key's hourly series (per-key rollup) gives the summary, bands and trends; only the
        # model and operation breakdowns need the full rollups (read through their key index).
        month = self._month_so_far(now)
        hours, model_ops, budget, month_spend = await asyncio.gather(
            self._q.hourly_series(window, where, Rollup.KEY, key=key),
            self._q.grouped(window, "model, operation", where, rollup=Rollup.FULL, columns=("key_id",), key=key),
            self._key_budget(key),
            self._q.totals(month, where, Rollup.KEY, columns=("key_id",), key=key),
        )
        total = Totals.total(hours)
        by_model: dict[str, Totals] = defaultdict(Totals)
        by_op: dict[str, Totals] = defaultdict(Totals)
        for row in model_ops:
            t = Totals.of(row)
            by_model[row["g0"]] += t
            by_op[row["g1"]] += t
        data = pb.VirtualKeyAnalytics(key_id=key, key_name=names[key], period=period_text)
        data.summary.CopyFrom(
            pb.VirtualKeyUsageSummary(
                total_requests=total.requests,
                successful_requests=total.successes,
                failed_requests=total.failures,
                total_tokens=total.tokens,
                input_tokens=total.input_tokens,
                output_tokens=total.output_tokens,
                total_cost=usd(total.cost_micros),
                average_latency=seconds(total.latency_ms_sum, total.requests),
                error_rate=model.ratio(total.failures, total.requests),
                cost_per_request=usd(model.ratio(total.cost_micros, total.requests)),
                cost_per_token=usd(model.ratio(total.cost_micros, total.tokens)),
            )
        )
        data.budget_status.CopyFrom(self._budget_status(budget, month_spend.cost_micros, now))
        usage = data.usage_breakdown
        for name, t in by_model.items():
            usage.by_model[name].CopyFrom(
                pb.ModelUsage(
                    requests=t.requests,
                    tokens=t.tokens,
                    cost=usd(t.cost_micros),
                    percentage=model.ratio(t.cost_micros, total.cost_micros),
                )
            )
        for name, t in by_op.items():
            usage.by_operation[name].CopyFrom(
                pb.OperationUsage(
                    requests=t.requests,
                    cost=usd(t.cost_micros),
                    percentage=model.ratio(t.cost_micros, total.cost_micros),
                )
            )
        bands: dict[str, list[int]] = {band: [0, 0] for band in TIME_OF_DAY_BANDS}
        days: dict[date, dict[str, Any]] = {}
        local_day = window.start.astimezone(self._zone).date()
        last_day = (window.end - timedelta(microseconds=1)).astimezone(self._zone).date()
        while local_day <= last_day:
            days[local_day] = {"requests": 0, "tokens": 0, "cost": 0, "errors": 0, "hours": defaultdict(int)}
            local_day += DAY
        for row in hours:
            local = row["bucket"].astimezone(self._zone)
            requests, cost = int(row["requests"]), int(row["cost_micros"])
            band = bands[TIME_OF_DAY_BANDS[local.hour // 6]]
            band[0] += requests
            band[1] += cost
            day = days[local.date()]
            day["requests"] += requests
            day["tokens"] += int(row["tokens"])
            day["cost"] += cost
            day["errors"] += int(row["failures"])
            day["hours"][local.hour] += requests
        if breakdown == "hourly":  # every hour of the window, as dailyTrend has every day
            by_hour = {row["bucket"]: row for row in hours}
            at = window.start
            while at < window.end:
                row = by_hour.get(at)
                point = data.hourly_trend.add()
                if row is not None:
                    point.requests, point.tokens = int(row["requests"]), int(row["tokens"])
                    point.cost, point.errors = usd(int(row["cost_micros"])), int(row["failures"])
                _stamp(point, "timestamp", at)
                at += HOUR
        for band_name, (requests, cost) in bands.items():
            usage.by_time_of_day[band_name].CopyFrom(pb.TimeOfDayUsage(requests=requests, cost=usd(cost)))
        if breakdown == "daily":
            for day_date, day in days.items():
                hours_of_day: dict[int, int] = day["hours"]
                peak = min(hours_of_day, key=lambda h: (-hours_of_day[h], h)) if hours_of_day else 0
                data.daily_trend.add(
                    date=day_date.isoformat(),
                    requests=day["requests"],
                    tokens=day["tokens"],
                    cost=usd(day["cost"]),
                    peak_hour=peak,
                    errors=day["errors"],
                )
        return data

    def _month_so_far(self, now: datetime) -> Window:
        """The current month in the configured timezone up to the end of the current hour (the
        month's start is rounded down to the hour for zones with a fractional offset)."""
        local = now.astimezone(self._zone)
        start = datetime.combine(local.date().replace(day=1), datetime.min.time(), self._zone).astimezone(UTC)
        return Window(floor_to(start, HOUR), floor_to(now, HOUR) + HOUR)

    def _budget_status(self, budget: BudgetView | None, month_spend: int, now: datetime) -> pb.VirtualKeyBudgetStatus:
        """projectedMonthlySpend = the key's spend so far this month (configured timezone) / the
        month's days so far (today included) x the month's days, as the global budget status
        projects, whatever period is analysed. With a budget: usedBudget is the spend in its
        current period, and onTrackForBudget holds when that spend's daily average over the
        period's days so far, kept for the whole period, stays within maxBudget (a 'total' budget:
        when the spend is within it). A key with no budget reports its spend this month as
        usedBudget, no maximum, and is on track."""
        local = now.astimezone(self._zone)
        month_first = local.date().replace(day=1)
        month_days = ((month_first + timedelta(days=32)).replace(day=1) - month_first).days
        projected_month = month_spend / (local.date().day) * month_days
        if budget is None:
            return pb.VirtualKeyBudgetStatus(
                used_budget=usd(month_spend),
                projected_monthly_spend=usd(round(projected_month)),
                on_track_for_budget=True,
            )
        on_track = budget.spent_micros <= budget.max_budget_micros
        if budget.period_end is not None:
            today = now.astimezone(budget.zone).date()
            elapsed = max(1, (today - budget.period_start.astimezone(budget.zone).date()).days + 1)
            last_day = (budget.period_end - timedelta(microseconds=1)).astimezone(budget.zone).date()
            period_days = elapsed + max(0, (last_day - today).days)
            on_track = budget.spent_micros / elapsed * period_days <= budget.max_budget_micros
        return pb.VirtualKeyBudgetStatus(
            max_budget=usd(budget.max_budget_micros),
            used_budget=usd(budget.spent_micros),
            remaining_budget=usd(max(0, budget.max_budget_micros - budget.spent_micros)),
            utilization_percentage=model.ratio(budget.spent_micros, budget.max_budget_micros),
            projected_monthly_spend=usd(round(projected_month)),
            on_track_for_budget=on_track,
        )

    async def _open_reservations(self) -> int:
        if self._budget is None:
            return 0
        try:
            reply = await self._budget.GetOpenReservations(
                budget_pb2.GetOpenReservationsRequest(),
                timeout=self._settings.analytics_budget_timeout_seconds,
                metadata=call_metadata(self._settings.admin_master_key),
            )
        except grpc.aio.AioRpcError:
            return 0  # the live counters answer without it
        return int(reply.open)

    async def _key_budget(self, key_id: str) -> BudgetView | None:
        """The key's budget from the budget service; None when it has none or cannot answer."""
        if self._budget is None:
            return None
        try:
            reply = await self._budget.GetVirtualKeyBudget(
                budget_pb2.GetVirtualKeyBudgetRequest(key_id=key_id),
                timeout=self._settings.analytics_budget_timeout_seconds,
                metadata=call_metadata(self._settings.admin_master_key),
            )
        except grpc.aio.AioRpcError:
            return None  # NOT_FOUND (no budget), UNIMPLEMENTED, UNAVAILABLE: answer without it
        budget = reply.data
        if budget.max_budget <= 0:
            return None
        end = budget.period_end.ToDatetime(tzinfo=UTC) if budget.HasField("period_end") else None
        start = budget.period_start.ToDatetime(tzinfo=UTC)
        try:
            zone = ZoneInfo(budget.timezone) if budget.timezone else self._zone
        except (ZoneInfoNotFoundError, ValueError):
            zone = self._zone
        return BudgetView(
            round(budget.max_budget * MICROS), round(budget.current_spend * MICROS), budget.period, start, end, zone
        )

    # ================================================================== compare
    async def compare_keys(
        self, key_ids: Sequence[str], period: str, metrics: Sequence[str], now: datetime | None = None
    ) -> pb.VirtualKeyComparison:
        """Values per key; ranks are competition ranks (ties share), highest first for requests, cost
        and tokens and lowest first for latency (mean seconds) and errorRate."""
        now = now or datetime.now(UTC)
        if len(key_ids) < 2:
            raise InvalidArgument.field("keyIds", "give at least two virtual key ids")
        if len(key_ids) > MAX_COMPARED_KEYS:
            raise InvalidArgument.field("keyIds", f"at most {MAX_COMPARED_KEYS} keys")
        keys = [str(require_uuid(k, f"keyIds[{i}]")) for i, k in enumerate(key_ids)]
        if len(set(keys)) != len(keys):
            raise InvalidArgument.field("keyIds", "each key may appear only once")
        chosen = list(metrics) or list(COMPARE_METRICS)
        for i, metric in enumerate(chosen):
            if metric not in COMPARE_METRICS:
                raise InvalidArgument.field(
                    f"metrics[{i}]", f"unknown metric {metric[:32]!r}; allowed: {', '.join(COMPARE_METRICS)}"
                )
        period_text, length = self._period(period)
        names = await self._q.key_names(keys)
        missing = [k for k in keys if k not in names]
        if missing:
            raise NotFound(f"unknown virtual keys: {', '.join(missing)}", metadata={"keyIds": ",".join(missing)})
        window = hour_window(length, now)
        rows = await self._q.grouped(
            window, "key_id::text", "key_id = ANY(%(keys)s::uuid[])", rollup=Rollup.KEY, keys=keys
        )
        by_key = {r["g0"]: Totals.of(r) for r in rows}
        values: dict[str, dict[str, float]] = {}
        for key in keys:
            t = by_key.get(key, Totals())
            every = {
                "requests": float(t.requests),
                "cost": usd(t.cost_micros),
                "latency": seconds(t.latency_ms_sum, t.requests),
                "errorRate": model.ratio(t.failures, t.requests),
                "tokens": float(t.tokens),
            }
            values[key] = {m: every[m] for m in chosen}
        data = pb.VirtualKeyComparison(period=period_text, metrics=chosen)
        ranks: dict[str, list[int]] = {
            m: model.competition_ranks([values[k][m] for k in keys], highest_first=m not in LOWER_IS_BETTER)
            for m in chosen
        }
        for index, key in enumerate(keys):
            entry = data.keys.add(key_id=key, key_name=names[key])
            for metric in chosen:
                entry.values[metric] = values[key][metric]
                entry.ranks[metric] = ranks[metric][index]
        for metric in chosen:
            data.leaders[metric] = keys[ranks[metric].index(1)]
        return data

    # ================================================================== providers
    async def provider_analytics(
        self, period: str, breakdown: str, now: datetime | None = None
    ) -> pb.ProviderAnalytics:
        """`breakdown=model` fills `models` and `operations` (as the contract's example shows);
        `operation` fills `operations` only. `uptime` = 1 - (minutes in which every request to the
        provider failed with a server-side (5xx) error) / (minutes with traffic to it), from the
        per-minute provider rollup."""
        now = now or datetime.now(UTC)
        period_text, length = self._period(period)
        breakdown = choose(breakdown, "breakdown", ("model", "operation"), "model")
        window = hour_window(length, now)
        rows, uptime_rows = await asyncio.gather(
            self._q.grouped(window, "provider, model, operation"), self._q.provider_down_minutes(window)
        )
        providers: dict[str, Totals] = defaultdict(Totals)
        models: dict[tuple[str, str], Totals] = defaultdict(Totals)
        operations: dict[tuple[str, str], Totals] = defaultdict(Totals)
        for row in rows:
            t = Totals.of(row)
            providers[row["g0"]] += t
            models[(row["g0"], row["g1"])] += t
            operations[(row["g0"], row["g2"])] += t
        total_cost = sum(t.cost_micros for t in providers.values())
        total_requests = sum(t.requests for t in providers.values())
        uptime = {r["provider"]: 1 - model.ratio(r["down_minutes"], r["minutes"]) for r in uptime_rows}
        data = pb.ProviderAnalytics(period=period_text, total_cost=usd(total_cost), total_requests=total_requests)
        for provider, t in providers.items():
            data.providers[provider].summary.CopyFrom(
                pb.ProviderSummary(
                    requests=t.requests,
                    cost=usd(t.cost_micros),
                    percentage=model.ratio(t.cost_micros, total_cost),
                    average_latency=seconds(t.latency_ms_sum, t.requests),
                    error_rate=model.ratio(t.failures, t.requests),
                    uptime=uptime.get(provider, 1.0),
                )
            )
        if breakdown == "model":
            for (provider, model_name), t in models.items():
                data.providers[provider].models[model_name].CopyFrom(
                    pb.ProviderModelStats(
                        requests=t.requests,
                        cost=usd(t.cost_micros),
                        input_tokens=t.input_tokens,
                        output_tokens=t.output_tokens,
                        average_latency=seconds(t.latency_ms_sum, t.requests),
                        cost_per_request=usd(model.ratio(t.cost_micros, t.requests)),
                        cost_per_token=usd(model.ratio(t.cost_micros, t.input_tokens + t.output_tokens)),
                    )
                )
        for (provider, operation), t in operations.items():
            data.providers[provider].operations[operation].CopyFrom(
                pb.ProviderOperationStats(requests=t.requests, cost=usd(t.cost_micros))
            )
        return data

    # ================================================================== performance
    async def performance(self, period: str, breakdown: str, now: datetime | None = None) -> pb.PerformanceAnalytics:
        """Latency and time-to-first-token percentiles from the rollups' fixed-bucket histograms
        (linear interpolation inside a bucket, so exact to within the bucket's width); TTFT covers
        the requests that reported one. Throughput = requests / the window's seconds. Failures by
        error type; a failure without a type is counted as `unspecified`."""
        now = now or datetime.now(UTC)
        period_text, length = self._period(period)
        breakdown = choose(breakdown, "breakdown", ("provider", "model", "virtual_key", "operation"), "provider")
        window = hour_window(length, now)
        extra = f", {LATENCY_SUMS}, {TTFT_SUMS}"
        histograms = (*LATENCY_COLUMNS, *TTFT_COLUMNS)
        errors_by_group: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        groups: list[dict[str, Any]]
        if breakdown == "virtual_key":
            # histograms per key from the per-key rollup; error types per key need the full one
            groups, errors = await asyncio.gather(
                self._q.grouped(window, "key_id::text", extra=extra, rollup=Rollup.KEY, columns=histograms),
                self._q.grouped(window, "key_id::text, error_type", "failures > 0", rollup=Rollup.FULL),
            )
            for row in errors:
                errors_by_group[row["g0"]][row["g1"] or "unspecified"] += int(row["failures"])
        else:
            # one pass over the global rollup by (dimension, error type), summed here per dimension
            rows = await self._q.grouped(window, f"{breakdown}, error_type", extra=extra, columns=histograms)
            merged: dict[str, dict[str, int]] = {}
            sums = (*Totals.__dataclass_fields__, *LATENCY_COLUMNS, *TTFT_COLUMNS)
            for row in rows:
                into = merged.setdefault(row["g0"], dict.fromkeys(sums, 0))
                for name in sums:
                    into[name] += int(row[name] or 0)
                if int(row["failures"] or 0) > 0:
                    errors_by_group[row["g0"]][row["g1"] or "unspecified"] += int(row["failures"])
            groups = [{"g0": name, **values} for name, values in merged.items()]
        data = pb.PerformanceAnalytics(period=period_text, breakdown=breakdown)
        overall_lat = [0] * len(LATENCY_COLUMNS)
        overall_ttft = [0] * len(TTFT_COLUMNS)
        overall = Totals()
        overall_errors: dict[str, int] = defaultdict(int)
        span = window.length.total_seconds()
        for row in groups:
            t = Totals.of(row)
            lat = [int(row[c] or 0) for c in LATENCY_COLUMNS]
            ttft = [int(row[c] or 0) for c in TTFT_COLUMNS]
            overall_lat = [a + b for a, b in zip(overall_lat, lat, strict=True)]
            overall_ttft = [a + b for a, b in zip(overall_ttft, ttft, strict=True)]
            overall += t
            stats = self._stats(t, lat, ttft, errors_by_group.get(row["g0"], {}), span)
            data.groups[row["g0"]].CopyFrom(stats)
            for name, count in errors_by_group.get(row["g0"], {}).items():
                overall_errors[name] += count
        data.overall.CopyFrom(self._stats(overall, overall_lat, overall_ttft, overall_errors, span))
        return data

    @staticmethod
    def _stats(
        t: Totals, lat: Sequence[int], ttft: Sequence[int], errors: dict[str, int], span: float
    ) -> pb.PerformanceStats:
        stats = pb.PerformanceStats(
            requests=t.requests,
            latency=_percentiles(lat),
            time_to_first_token=_percentiles(ttft),
            error_rate=model.ratio(t.failures, t.requests),
            throughput=t.requests / span if span else 0.0,
        )
        for name, count in errors.items():
            stats.errors_by_type[name] = count
        return stats

    # ================================================================== patterns
    async def usage_patterns(self, period: str, analysis: str, now: datetime | None = None) -> pb.UsagePatterns:
        """Over the hour-aligned window (hours of day and weekdays in the configured timezone):
        peakHours / lowUsageHours = the 6 hours of day with the highest / lowest mean requests per
        hour (ascending); weekday/weekend averages = requests per 24 hours of weekday / weekend time
        in the window; seasonality, key segments and anomalies as defined in `model.py`.
        modelPreferences: usage = share of requests; growthTrend compares the model's share in the
        second half of the window with the first half (> +10% relative: increasing, < -10%:
        decreasing); userSegments = the segments whose keys used the model (`all` when every
        non-empty segment did). `summary` lists the 5 most recent anomalies, `detailed` all."""
        now = now or datetime.now(UTC)
        period_text, length = self._period(period)
        analysis = choose(analysis, "analysis", ("summary", "detailed"), "summary")
        window = hour_window(length, now)
        middle = window.start + timedelta(hours=math.floor(window.hours / 2))
        hourly_rows, key_rows, key_models, first_half, second_half = await asyncio.gather(
            self._q.hourly_series(window),
            self._q.grouped(window, "key_id::text", rollup=Rollup.KEY),
            self._q.key_model_pairs(window),
            self._q.grouped(Window(window.start, middle), "model"),
            self._q.grouped(Window(middle, window.end), "model"),
        )
        by_bucket = {r["bucket"]: r for r in hourly_rows}
        hours = int(window.hours)
        starts = [window.start + i * HOUR for i in range(hours)]
        requests = [float(int(by_bucket[s]["requests"])) if s in by_bucket else 0.0 for s in starts]
        costs = [float(int(by_bucket[s]["cost_micros"])) if s in by_bucket else 0.0 for s in starts]
        failures = [float(int(by_bucket[s]["failures"])) if s in by_bucket else 0.0 for s in starts]
        local = [s.astimezone(self._zone) for s in starts]
        hour_of_day = [t.hour for t in local]
        # peak / low hours
        sums: dict[int, float] = defaultdict(float)
        counts: dict[int, int] = defaultdict(int)
        for value, h in zip(requests, hour_of_day, strict=True):
            sums[h] += value
            counts[h] += 1
        means = {h: sums[h] / counts[h] for h in counts}
        data = pb.UsagePatterns(period=period_text)
        temporal = data.patterns.temporal_patterns
        if sum(requests) > 0:
            ordered = sorted(means, key=lambda h: (-means[h], h))
            temporal.peak_hours.extend(sorted(ordered[:PEAK_HOURS]))
            temporal.low_usage_hours.extend(sorted(sorted(means, key=lambda h: (means[h], h))[:PEAK_HOURS]))
        weekday_requests = sum(v for v, t in zip(requests, local, strict=True) if t.weekday() < 5)
        weekend_requests = sum(v for v, t in zip(requests, local, strict=True) if t.weekday() >= 5)
        weekday_days = sum(1 for t in local if t.weekday() < 5) / 24
        weekend_days = sum(1 for t in local if t.weekday() >= 5) / 24
        weekday_average = model.ratio(weekday_requests, weekday_days)
        weekend_average = model.ratio(weekend_requests, weekend_days)
        temporal.weekday_vs_weekend.CopyFrom(
            pb.WeekdayVsWeekend(
                weekday_average=weekday_average,
                weekend_average=weekend_average,
                ratio=model.ratio(weekday_average, weekend_average),
            )
        )
        season = model.seasonality(requests, list(temporal.peak_hours), model.ratio(weekday_average, weekend_average))
        temporal.seasonality.CopyFrom(
            pb.Seasonality(detected=season.detected, pattern=season.pattern, strength=season.strength)
        )
        # key segments
        key_costs = {row["g0"]: int(row["cost_micros"]) for row in key_rows}
        keys_of_model: dict[str, list[str]] = defaultdict(list)
        for row in key_models:
            keys_of_model[row["model"]].append(row["key_id"])
        segments = model.segment_keys(dict(key_costs))
        total_cost = sum(key_costs.values())
        active = len(key_costs)
        distribution = data.patterns.usage_distribution
        segment_of: dict[str, str] = {}
        for name, members, target in (
            ("power_users", segments.power, distribution.power_users),
            ("medium_users", segments.medium, distribution.medium_users),
            ("light_users", segments.light, distribution.light_users),
        ):
            target.CopyFrom(
                pb.UserSegment(
                    count=len(members),
                    percentage=model.ratio(len(members), active),
                    cost_contribution=model.ratio(sum(key_costs[k] for k in members), total_cost),
                )
            )
            segment_of.update({k: name for k in members})
        non_empty = {segment_of[k] for k in key_costs}
        # model preferences
        first = {r["g0"]: int(r["requests"]) for r in first_half}
        second = {r["g0"]: int(r["requests"]) for r in second_half}
        first_total, second_total = sum(first.values()), sum(second.values())
        total_requests = first_total + second_total
        for model_name in sorted(set(first) | set(second)):
            share_first = model.ratio(first.get(model_name, 0), first_total)
            share_second = model.ratio(second.get(model_name, 0), second_total)
            change = model.growth(share_second, share_first) if share_first else (1.0 if share_second else 0.0)
            trend = "increasing" if change > 0.1 else "decreasing" if change < -0.1 else "stable"
            used_by = {segment_of[k] for k in keys_of_model.get(model_name, ())}
            segments_list = ["all"] if used_by == non_empty else sorted(used_by)
            data.patterns.model_preferences[model_name].CopyFrom(
                pb.ModelPreference(
                    usage=model.ratio(first.get(model_name, 0) + second.get(model_name, 0), total_requests),
                    growth_trend=trend,
                    user_segments=segments_list,
                )
            )
        # anomalies: each hour against the typical value of its hour of day, apart for weekend days
        # once the window holds two weeks (a quiet Saturday is not a drop); the current hour is
        # not over, so it is left out.
        weekly = window.days >= 14
        seasons = [(t.hour, weekly and t.weekday() >= 5) for t in local]
        done = sum(1 for start in starts if start + HOUR <= now)
        anomalies = self._anomalies(
            starts[:done], requests[:done], costs[:done], failures[:done], seasons[:done], weekly
        )
        anomalies.sort(key=lambda a: a[0], reverse=True)
        if analysis == "summary":
            anomalies = anomalies[:5]
        for at, kind, description, impact, level in anomalies:
            item = data.anomalies.add(type=kind, description=description, impact=impact, severity=level)
            _stamp(item, "timestamp", at)
        return data

    @staticmethod
    def _anomalies(
        starts: Sequence[datetime],
        requests: Sequence[float],
        costs: Sequence[float],
        failures: Sequence[float],
        seasons: Sequence[tuple[int, bool]],
        weekly: bool = False,
    ) -> list[tuple[datetime, str, str, str, str]]:
        """Outliers of each hourly series against the median of its season: (hour of day, weekend
        day or not: always False unless `weekly`)."""

        def typical(index: int) -> str:
            at = starts[index]
            if not weekly:
                return f"{at.hour:02d}:00 UTC hour"
            return f"{'weekend' if seasons[index][1] else 'weekday'} {at.hour:02d}:00 UTC hour"

        found: list[tuple[datetime, str, str, str, str]] = []
        for outlier in model.seasonal_outliers(requests, seasons, min_baseline=10):
            at = starts[outlier.index]
            change = model.growth(outlier.value, outlier.baseline)
            if outlier.z > 0:
                found.append(
                    (
                        at,
                        "usage_spike",
                        f"{change:.0%} more requests than the typical {typical(outlier.index)} "
                        f"({outlier.value:.0f} vs {outlier.baseline:.0f})",
                        "cost_increase",
                        model.severity(outlier.z),
                    )
                )
            else:
                found.append(
                    (
                        at,
                        "usage_drop",
                        f"{-change:.0%} fewer requests than the typical {typical(outlier.index)} "
                        f"({outlier.value:.0f} vs {outlier.baseline:.0f})",
                        "cost_decrease",
                        model.severity(outlier.z),
                    )
                )
        for outlier in model.seasonal_outliers(costs, seasons, min_baseline=MICROS):
            if outlier.z <= 0:
                continue
            at = starts[outlier.index]
            found.append(
                (
                    at,
                    "cost_spike",
                    f"spend of ${usd(outlier.value):.2f} against a typical ${usd(outlier.baseline):.2f} "
                    f"for the {typical(outlier.index)} ({model.growth(outlier.value, outlier.baseline):.0%} increase)",
                    "cost_increase",
                    model.severity(outlier.z),
                )
            )
        rates = [model.ratio(f, r) for f, r in zip(failures, requests, strict=True)]
        for outlier in model.seasonal_outliers(failures, seasons, min_baseline=5):
            if outlier.z <= 0:
                continue
            at = starts[outlier.index]
            found.append(
                (
                    at,
                    "error_spike",
                    f"{outlier.value:.0f} failed requests (error rate {rates[outlier.index]:.1%}) against a "
                    f"typical {outlier.baseline:.0f}",
                    "reliability",
                    model.severity(outlier.z),
                )
            )
        return found

    # ================================================================== cost optimization
    async def cost_optimization(self, period: str, now: datetime | None = None) -> pb.CostOptimization:
        """Recommendations from the window's usage and the prices in force now:

        - model_substitution: chat/completions requests with < 1,000 input tokens and no tool use
          (the rollups' small_input_* sums; the 10 keys sending most of them are listed) to a
          model for which the same provider prices a model with both a lower input and a lower
          output price (the dearest such model is proposed);
          savings = their cost - their input and output tokens (plus per-request price) at the
          cheaper model's price. confidence = 0.5 + 0.35 x min(1, affected / 1,000).
        - provider_routing: all traffic of a model that another provider prices lower for the same
          model name; savings = cost - the same token, image, audio and request volumes at the
          other provider's price. confidence 0.9 (same model, known prices).
        - caching: a prompt fingerprint seen r > 1 times in the window (whole UTC days, from the
          fingerprint rollup) would be served from cache r - 1 times; savings = its cost x (r-1)/r
          (integer micro-units, truncated), hit rate = those repeats / all requests of the window.
          confidence 0.7.
        costTrends: per model (`<model>_usage`) and per operation, cost versus the preceding window
        of equal length; growth above +5% is increasing (projectedMonthlyCost = the window's daily
        rate x 30 x (1 + growth)), below -5% decreasing (savings = previous - current)."""
        now = now or datetime.now(UTC)
        _, length = self._period(period)
        window = hour_window(length, now)
        day_start = floor_to(window.start, DAY)
        small, small_keys, usage_rows, before_rows, prices, repeats = await asyncio.gather(
            self._q.small_input_usage(window),
            self._q.small_input_keys(window),
            self._q.usage_by_provider_model(window),
            self._q.grouped(window.previous(), "model, operation"),
            self._q.current_prices(now),
            self._q.repeated_prompts(day_start, window.end),
        )
        # `usage_rows` are per (provider, model, operation): the totals, the per provider and model
        # usage of the routing analysis and the per model / operation cost trends all sum them.
        total = Totals.total(usage_rows)
        usage_sums: dict[tuple[str, str], dict[str, Any]] = {}
        for row in usage_rows:
            entry = usage_sums.setdefault((row["provider"], row["model"]), {})
            for name, value in row.items():
                if name in ("provider", "model", "operation"):
                    entry[name] = value
                else:
                    entry[name] = entry.get(name, 0) + (value or 0)
        usage = list(usage_sums.values())
        models_now = _cost_by(usage_rows, "model")
        ops_now = _cost_by(usage_rows, "operation")
        models_before = _cost_by(before_rows, "g0")
        ops_before = _cost_by(before_rows, "g1")
        price_of = {(r["provider"], r["model"]): r for r in prices}
        recommendations: list[pb.CostRecommendation] = []
        recommendations += self._substitutions(small, small_keys, price_of)
        recommendations += self._routings(usage, price_of)
        if repeats["repeats"] > 0 and repeats["repeat_cost"] > 0:
            recommendations.append(
                pb.CostRecommendation(
                    type="caching",
                    description=(
                        f"Enable response caching: {repeats['repeats']} requests repeated one of "
                        f"{repeats['fingerprints']} prompts already sent"
                    ),
                    estimated_savings=usd(repeats["repeat_cost"]),
                    confidence=0.7,
                    cache_hit_rate_projected=model.ratio(repeats["repeats"], total.requests),
                )
            )
        recommendations.sort(key=lambda r: -r.estimated_savings)
        potential = sum(round(r.estimated_savings * MICROS) for r in recommendations)
        data = pb.CostOptimization(
            total_cost=usd(total.cost_micros),
            potential_savings=usd(potential),
            savings_percentage=model.ratio(potential, total.cost_micros),
            recommendations=recommendations,
        )
        trends = data.cost_trends
        increasing: list[pb.IncreasingCost] = []
        decreasing: list[pb.DecreasingCost] = []
        for current, before, suffix in ((models_now, models_before, "_usage"), (ops_now, ops_before, "")):
            for name in sorted(set(before) | set(current)):
                cost, previous = current.get(name, 0), before.get(name, 0)
                if previous == 0:
                    continue
                change = model.growth(cost, previous)
                if change > COST_TREND_THRESHOLD:
                    increasing.append(
                        pb.IncreasingCost(
                            category=f"{name}{suffix}",
                            growth_rate=change,
                            projected_monthly_cost=usd(cost / window.days * 30 * (1 + change)),
                        )
                    )
                elif change < -COST_TREND_THRESHOLD:
                    decreasing.append(
                        pb.DecreasingCost(
                            category=f"{name}{suffix}", reduction_rate=-change, savings=usd(previous - cost)
                        )
                    )
        trends.increasing.extend(sorted(increasing, key=lambda c: -c.growth_rate))
        trends.decreasing.extend(sorted(decreasing, key=lambda c: -c.savings))
        return data

    @staticmethod
    def _substitutions(
        small: Iterable[dict[str, Any]],
        small_keys: Iterable[dict[str, Any]],
        price_of: dict[tuple[str, str], dict[str, Any]],
    ) -> list[pb.CostRecommendation]:
        per_model: dict[tuple[str, str], dict[str, Any]] = {}
        for row in small:
            per_model[(row["provider"], row["model"])] = {
                "requests": int(row["requests"]),
                "input": int(row["input_tokens"]),
                "output": int(row["output_tokens"]),
                "cost": int(row["cost_micros"]),
                "keys": defaultdict(int),
            }
        for row in small_keys:
            entry = per_model.get((row["provider"], row["model"]))
            if entry is not None:
                entry["keys"][row["key_id"]] += int(row["requests"])
        out = []
        for (provider, model_name), entry in sorted(per_model.items()):
            current = price_of.get((provider, model_name))
            if current is None:
                continue
            cheaper = [
                p
                for (prov, name), p in price_of.items()
                if prov == provider
                and name != model_name
                and _price(p, "output_per_million") > 0
                and _price(p, "input_per_million") < _price(current, "input_per_million")
                and _price(p, "output_per_million") < _price(current, "output_per_million")
            ]
            if not cheaper:
                continue
            target = max(
                cheaper, key=lambda p: (_price(p, "input_per_million") + _price(p, "output_per_million"), p["model"])
            )
            repriced = (
                Decimal(entry["input"]) * _price(target, "input_per_million")
                + Decimal(entry["output"]) * _price(target, "output_per_million")
            ) + Decimal(entry["requests"]) * _price(target, "per_request") * MICROS
            savings = entry["cost"] - int(repriced.to_integral_value())
            if savings <= 0:
                continue
            keys = sorted(entry["keys"], key=lambda k: (-entry["keys"][k], k))[:10]
            out.append(
                pb.CostRecommendation(
                    type="model_substitution",
                    description=f"Replace {model_name} with {target['model']} for simple tasks",
                    estimated_savings=usd(savings),
                    affected_requests=entry["requests"],
                    confidence=round(0.5 + 0.35 * min(1.0, entry["requests"] / 1000), 4),
                    implementation=pb.RecommendationImplementation(
                        virtual_keys=keys,
                        model_mapping=pb.ModelMapping(
                            from_model=model_name,
                            to_model=target["model"],
                            conditions=["input_tokens < 1000", "no_function_calls"],
                        ),
                    ),
                )
            )
        return out

    @staticmethod
    def _routings(
        usage: Iterable[dict[str, Any]], price_of: dict[tuple[str, str], dict[str, Any]]
    ) -> list[pb.CostRecommendation]:
        out = []
        for row in usage:
            provider, model_name = row["provider"], row["model"]
            priced_requests = int(row["requests"]) - int(row["unpriced_requests"])
            if priced_requests <= 0 or int(row["unpriced_requests"]):
                continue  # repricing needs every request's cost to compare with
            best: tuple[int, str] | None = None
            for (other, name), p in price_of.items():
                if name != model_name or other == provider:
                    continue
                repriced = (
                    Decimal(int(row["input_tokens"])) * _price(p, "input_per_million")
                    + Decimal(int(row["output_tokens"])) * _price(p, "output_per_million")
                    + Decimal(int(row["cached_read_tokens"])) * _price(p, "cached_read_per_million")
                    + Decimal(int(row["cache_write_tokens"])) * _price(p, "cache_write_per_million")
                    + Decimal(int(row["reasoning_tokens"])) * _price(p, "reasoning_per_million")
                    + (
                        Decimal(int(row["images"])) * _price(p, "per_image")
                        + Decimal(row["audio_seconds"] or 0) * _price(p, "per_audio_second")
                        + Decimal(int(row["requests"])) * _price(p, "per_request")
                    )
                    * MICROS
                )
                savings = int(row["cost_micros"]) - int(repriced.to_integral_value())
                if savings > 0 and (best is None or savings > best[0]):
                    best = (savings, other)
            if best is None:
                continue
            out.append(
                pb.CostRecommendation(
                    type="provider_routing",
                    description=f"Route {model_name} requests to {best[1]} instead of {provider}",
                    estimated_savings=usd(best[0]),
                    affected_requests=int(row["requests"]),
                    confidence=0.9,
                    implementation=pb.RecommendationImplementation(from_provider=provider, to_provider=best[1]),
                )
            )
        return out

    # ================================================================== forecast
    async def budget_forecast(self, horizon: str, now: datetime | None = None) -> pb.BudgetForecast:
        """Model (see `model.forecast_daily`): OLS trend plus day-of-week effects on the daily spend of
        the last 90 whole UTC days (from the first day with spend), 85% prediction intervals.
        budgetRequired = the interval's upper bound; recommendedBudget = the one-sided 80% quantile;
        overBudgetRisk = P(spend over the horizon > the global budget scaled to the horizon) (0
        without a global budget). Per key: the same model without seasonality on the key's daily
        spend; budgetRequired = its upper bound; riskLevel compares the key's projected spend in its
        current budget period (spend so far + daily forecast over the rest of the period) with its
        limit: >= 100% high, >= 80% medium, else low (and low for keys without a budget).
        growthFactors: per model, (mean daily spend of the last 14 days - of the 14 before) x
        horizon days, when positive."""
        now = now or datetime.now(UTC)
        horizon_text, length = parse_period(
            horizon, "horizon", default="30d", max_days=self._settings.analytics_max_period_days
        )
        horizon_days = max(1, math.ceil(length / DAY))
        today = floor_to(now, DAY)
        train_start = today - FORECAST_TRAINING_DAYS * DAY
        daily, per_key, per_model = await asyncio.gather(
            self._q.daily_cost(train_start, today),
            self._q.daily_cost(train_start, today, by_key=True),
            self._q.daily_cost_by_model(today - 28 * DAY, today),
        )
        spend = {r["bucket"]: int(r["cost_micros"]) for r in daily}
        first = min(spend) if spend else today
        days = [first + i * DAY for i in range(int((today - first) / DAY))]
        history = [spend.get(d, 0) / MICROS for d in days]
        fit = model.forecast_daily(history, first.date(), horizon_days, FORECAST_CONFIDENCE)
        global_budget = await self._global_budget_for(horizon_days)
        z80 = model.normal_quantile(0.8)
        data = pb.BudgetForecast(
            horizon=horizon_text,
            current_trend=model.trend_direction(fit.slope_per_day, fit.mean_daily),
            confidence_level=FORECAST_CONFIDENCE,
            model=(
                f"OLS linear trend + day-of-week effects on daily spend, trained on {len(history)} whole UTC days "
                f"since {first.date().isoformat()}; {FORECAST_CONFIDENCE:.0%} normal prediction intervals"
            ),
        )
        data.global_forecast.CopyFrom(
            pb.GlobalForecast(
                projected_spend=fit.projected,
                budget_required=fit.upper,
                over_budget_risk=(
                    model.probability_above(global_budget, fit.projected, fit.sd) if global_budget is not None else 0.0
                ),
                recommended_budget=fit.projected + z80 * fit.sd,
                lower_bound=fit.lower,
                upper_bound=fit.upper,
            )
        )
        z = model.normal_quantile(0.5 + FORECAST_CONFIDENCE / 2)
        months: dict[str, list[float]] = {}
        for offset, (value, sd) in enumerate(zip(fit.daily, fit.daily_sd, strict=True)):
            month = (today + offset * DAY).strftime("%Y-%m")
            entry = months.setdefault(month, [0.0, 0.0])
            entry[0] += value
            entry[1] += sd * sd
        for month, (value, variance) in months.items():
            half = z * math.sqrt(variance)
            factors = ["historical_trend"]
            if len(history) >= 21:
                factors.append("seasonal_adjustment")
            if data.current_trend == "increasing":
                factors.append("growth_trend")
            data.monthly_forecasts.add(
                month=month,
                projected_spend=value,
                confidence=max(0.0, min(1.0, 1 - model.ratio(half, value))) if value else 0.0,
                factors=factors,
                lower_bound=max(0.0, value - half),
                upper_bound=value + half,
            )
        await self._key_forecasts(data, per_key, first, today, now, horizon_days)
        recent: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for row in per_model:
            recent[row["model"]][0 if row["bucket"] >= today - 14 * DAY else 1] += int(row["cost_micros"])
        factors_list = []
        for model_name, (last, before) in recent.items():
            impact = (last - before) / 14 * horizon_days
            if impact > 0:
                slug = re.sub(r"[^a-z0-9]+", "", model_name.lower())
                confidence = round(min(0.95, 0.5 + 0.45 * model.ratio(last - before, last)), 4)
                factors_list.append(
                    pb.GrowthFactor(factor=f"increased_{slug}_usage", impact=usd(impact), confidence=confidence)
                )
        data.growth_factors.extend(sorted(factors_list, key=lambda f: -f.impact))
        return data

    async def _key_forecasts(
        self,
        data: pb.BudgetForecast,
        per_key: Sequence[dict[str, Any]],
        first: datetime,
        today: datetime,
        now: datetime,
        horizon_days: int,
    ) -> None:
        series: dict[str, dict[datetime, int]] = defaultdict(dict)
        for row in per_key:
            series[row["key_id"]][row["bucket"]] = int(row["cost_micros"])
        fits = []
        for key_id, values in series.items():
            start = min(values)
            days = [start + i * DAY for i in range(int((today - start) / DAY))]
            history = [values.get(d, 0) / MICROS for d in days]
            fit = model.forecast_daily(
                history[-FORECAST_TRAINING_DAYS:], start.date(), horizon_days, FORECAST_CONFIDENCE
            )
            fits.append((key_id, fit))
        chosen = forecast_candidates(fits, await self._budgeted_keys(), KEY_FORECASTS)
        names = await self._q.key_names([k for k, _ in chosen])
        budgets = await asyncio.gather(*(self._key_budget(k) for k, _ in chosen))
        rows = []
        for (key_id, fit), budget in zip(chosen, budgets, strict=True):
            risk = "low"
            if budget is not None:
                end = budget.period_end or (now + horizon_days * DAY)
                remaining_days = max(0.0, (end - now) / DAY)
                daily_rate = fit.projected / horizon_days
                projected_period = budget.spent_micros / MICROS + daily_rate * remaining_days
                share = model.ratio(projected_period, budget.max_budget_micros / MICROS)
                risk = "high" if share >= 1 else "medium" if share >= 0.8 else "low"
            rows.append((RISK_ORDER[risk], -fit.projected, key_id, fit, risk))
        for _, _, key_id, fit, risk in sorted(rows, key=lambda row: row[:3]):
            data.key_forecasts.add(
                key_id=key_id,
                key_name=names.get(key_id, key_id),
                projected_spend=fit.projected,
                budget_required=fit.upper,
                risk_level=risk,
            )

    async def _budgeted_keys(self) -> list[str]:
        """The keys that have a budget, most utilized first (empty when budget cannot answer)."""
        if self._budget is None:
            return []
        try:
            reply = await self._budget.GetBudgetStatus(
                budget_pb2.GetBudgetStatusRequest(),
                timeout=self._settings.analytics_budget_timeout_seconds,
                metadata=call_metadata(self._settings.admin_master_key),
            )
        except grpc.aio.AioRpcError:
            return []
        return [usage.key_id for usage in reply.data.budget_breakdown.by_virtual_key]

    async def _global_budget_for(self, horizon_days: int) -> float | None:
        """The global budget in USD scaled to the horizon (a `total` budget: what remains of it)."""
        if self._budget is None:
            return None
        try:
            reply = await self._budget.GetGlobalBudget(
                budget_pb2.GetGlobalBudgetRequest(),
                timeout=self._settings.analytics_budget_timeout_seconds,
                metadata=call_metadata(self._settings.admin_master_key),
            )
        except grpc.aio.AioRpcError:
            return None
        budget = reply.data
        if budget.max_budget <= 0:
            return None
        if budget.period in BUDGET_PERIOD_DAYS:
            return float(budget.max_budget * horizon_days / BUDGET_PERIOD_DAYS[budget.period])
        return max(0.0, float(budget.max_budget - budget.current_spend))

    # ================================================================== freshness
    async def freshness(self, now: datetime | None = None) -> pb.RollupFreshness:
        now = now or datetime.now(UTC)
        row = await self._q.freshness()
        data = pb.RollupFreshness()
        if row["raw"] is not None:
            _stamp(data, "last_raw_event_time", row["raw"])
            data.lag_seconds = max(0.0, (now - row["raw"]).total_seconds())
        if row["hourly"] is not None:
            _stamp(data, "last_hourly_rollup_time", row["hourly"])
        if row["daily"] is not None:
            _stamp(data, "last_daily_rollup_time", row["daily"])
        return data


def _cost_by(rows: Iterable[dict[str, Any]], column: str) -> dict[str, int]:
    """Cost (micro-units) per value of `column`."""
    out: dict[str, int] = defaultdict(int)
    for row in rows:
        out[row[column]] += int(row["cost_micros"])
    return dict(out)
