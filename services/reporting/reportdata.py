"""What a report contains: sections of metrics and tables computed exactly for a window.

Sums come from the append-only rollups (always `sum() GROUP BY`): whole UTC days from the daily
rollup where the section allows, whole hours from the hourly rollup, and the partial hours at
either edge from the raw events, so every total equals the raw events of exactly the window.
Money stays integer micro-units until it becomes a Decimal in USD for presentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from services.reporting.windows import iso
from tally.runtime.db import Database
from tally.runtime.windows import DAY, HOUR, Window, ceil_to, floor_to

MICRO = Decimal(1_000_000)
DIMENSIONS = {"provider": "provider", "model": "model", "virtual_key": "key_id", "operation": "operation"}
CATEGORIES = {"virtual_keys": "virtual_key", "models": "model", "providers": "provider", "operations": "operation"}
SUMMARY_METRICS = (
    "total_cost", "total_requests", "total_tokens", "unique_users", "error_rate", "success_rate",
    "avg_latency", "avg_cost_per_request",
)  # fmt: skip
TABLE_METRICS = ("cost", "requests", "tokens", "latency", "errors", "error_rate")
GRANULARITIES = ("hourly", "daily", "weekly")
SORT_METRICS = ("cost", "requests", "tokens")
TOKENS = "(input_tokens + output_tokens + cached_read_tokens + cache_write_tokens + reasoning_tokens)"
METRIC_LABELS = {
    "total_cost": "Total cost (USD)",
    "total_requests": "Total requests",
    "total_tokens": "Total tokens",
    "unique_users": "Unique users",
    "error_rate": "Error rate",
    "success_rate": "Success rate",
    "avg_latency": "Average latency (ms)",
    "avg_cost_per_request": "Average cost per request (USD)",
    "cost": "Cost (USD)",
    "requests": "Requests",
    "tokens": "Tokens",
    "latency": "Avg latency (ms)",
    "errors": "Errors",
}


def usd(micros: int) -> Decimal:
    return (Decimal(micros) / MICRO).quantize(Decimal("0.000001"))


@dataclass(frozen=True)
class Filters:
    exclude_test_keys: bool = False
    min_cost_micros: int = 0
    key_ids: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "excludeTestKeys": self.exclude_test_keys,
            "minCostMicros": self.min_cost_micros,
            "virtualKeys": list(self.key_ids),
            "providers": list(self.providers),
            "models": list(self.models),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Filters:
        return cls(
            exclude_test_keys=bool(data.get("excludeTestKeys")),
            min_cost_micros=int(data.get("minCostMicros", 0)),
            key_ids=tuple(data.get("virtualKeys", ())),
            providers=tuple(data.get("providers", ())),
            models=tuple(data.get("models", ())),
        )


@dataclass
class Section:
    """`kind` "metrics": `metrics` [(label, value)]; "table": `columns`, `rows` and an optional chart
    (`chart` = "bar" or "line" over the first column, plotting `chart_columns`)."""

    key: str
    title: str
    kind: str
    metrics: list[tuple[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    chart: str = ""
    chart_columns: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class ReportDocument:
    name: str
    window: Window
    timezone: str
    sections: list[Section]
    # Exact totals of the whole filtered window (what every format reports as "totals").
    totals: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        def value(v: Any) -> Any:
            return str(v) if isinstance(v, Decimal) else v

        sections = []
        for section in self.sections:
            item: dict[str, Any] = {"type": section.key, "title": section.title}
            if section.kind == "metrics":
                item["metrics"] = {label: value(v) for label, v in section.metrics}
            else:
                item["columns"] = section.columns
                item["rows"] = [[value(v) for v in row] for row in section.rows]
            if section.note:
                item["note"] = section.note
            sections.append(item)
        return {
            "reportName": self.name,
            "windowStart": iso(self.window.start),
            "windowEnd": iso(self.window.end),
            "timezone": self.timezone,
            "totals": {k: value(v) for k, v in self.totals.items()},
            "sections": sections,
        }


def usage_source(window: Window, *, days: bool, where: str) -> tuple[str, dict[str, Any]]:
    """A FROM item `u` (bucket, key_id, provider, model, operation, requests, failures, tokens,
    cost_micros, latency_ms_sum) covering exactly `[start, end)`."""
    start, end = window.start, window.end
    h0, h1 = ceil_to(start, HOUR), floor_to(end, HOUR)
    params: dict[str, Any] = {"s": start, "e": end}
    raw_cols = f"""time_bucket('1 hour', event_time) AS bucket, key_id, provider, model, operation,
        1::bigint AS requests, (http_status >= 400)::int::bigint AS failures, {TOKENS}::bigint AS tokens,
        coalesce(cost_micros, 0) AS cost_micros, latency_ms::bigint AS latency_ms_sum"""
    roll_cols = f"""bucket, key_id, provider, model, operation, requests, failures, {TOKENS} AS tokens, cost_micros,
        latency_ms_sum"""

    def part(table: str, low: str, high: str) -> str:
        columns, time_column = (raw_cols, "event_time") if table == "usage_events" else (roll_cols, "bucket")
        return (
            f"SELECT {columns} FROM {table} WHERE {time_column} >= %({low})s AND {time_column} < %({high})s AND {where}"  # noqa: S608
        )

    parts: list[str] = []
    if h0 >= h1:
        parts.append(part("usage_events", "s", "e"))
    else:
        params.update({"h0": h0, "h1": h1})
        parts += [part("usage_events", "s", "h0"), part("usage_events", "h1", "e")]
        d0, d1 = ceil_to(h0, DAY), floor_to(h1, DAY)
        if days and d0 < d1:
            params.update({"d0": d0, "d1": d1})
            parts += [
                part("usage_rollup_daily", "d0", "d1"),
                part("usage_rollup_hourly", "h0", "d0"),
                part("usage_rollup_hourly", "d1", "h1"),
            ]
        else:
            parts.append(part("usage_rollup_hourly", "h0", "h1"))
    return "(" + "\nUNION ALL\n".join(parts) + ") AS u", params


def filter_sql(filters: Filters) -> tuple[str, dict[str, Any]]:
    clauses = ["TRUE"]
    params: dict[str, Any] = {}
    if filters.exclude_test_keys:
        clauses.append("key_id NOT IN (SELECT key_id FROM virtual_keys WHERE is_test)")
    if filters.key_ids:
        clauses.append("key_id = ANY(%(f_keys)s::uuid[])")
        params["f_keys"] = list(filters.key_ids)
    if filters.providers:
        clauses.append("provider = ANY(%(f_providers)s::text[])")
        params["f_providers"] = list(filters.providers)
    if filters.models:
        clauses.append("model = ANY(%(f_models)s::text[])")
        params["f_models"] = list(filters.models)
    return " AND ".join(clauses), params


class ReportQueries:
    """The SQL behind every section type."""

    def __init__(self, db: Database, window: Window, filters: Filters) -> None:
        self._db = db
        self.window = window
        self.filters = filters
        self._where, self._params = filter_sql(filters)

    async def _rows(self, select: str, *, days: bool = True, tail: str = "") -> list[dict[str, Any]]:
        source, params = usage_source(self.window, days=days, where=self._where)
        return await self._db.fetch_all(f"SELECT {select} FROM {source} {tail}", {**params, **self._params})  # noqa: S608

    async def totals(self) -> dict[str, Any]:
        rows = await self._rows(
            """coalesce(sum(requests), 0)::bigint AS requests, coalesce(sum(failures), 0)::bigint AS failures,
               coalesce(sum(tokens), 0)::bigint AS tokens, coalesce(sum(cost_micros), 0)::bigint AS cost_micros,
               coalesce(sum(latency_ms_sum), 0)::bigint AS latency_ms_sum"""
        )
        row = rows[0]
        return {
            "requests": int(row["requests"]),
            "failures": int(row["failures"]),
            "tokens": int(row["tokens"]),
            "cost_micros": int(row["cost_micros"]),
            "latency_ms_sum": int(row["latency_ms_sum"]),
        }

    async def unique_users(self) -> int:
        row = await self._db.fetch_one(
            f"""SELECT count(DISTINCT end_user_hash) AS users FROM usage_events
                WHERE event_time >= %(s)s AND event_time < %(e)s AND {self._where}""",  # noqa: S608
            {"s": self.window.start, "e": self.window.end, **self._params},
        )
        return int(row["users"]) if row else 0

    async def grouped(
        self, dimension: str, *, order: str = "cost_micros", limit: int | None = None
    ) -> list[dict[str, Any]]:
        column = DIMENSIONS[dimension]
        having = "HAVING sum(cost_micros) >= %(min_cost)s" if self.filters.min_cost_micros else ""
        tail = f"GROUP BY {column} {having} ORDER BY {order} DESC, {column}"
        if limit:
            tail += f" LIMIT {int(limit)}"
        source, params = usage_source(self.window, days=True, where=self._where)
        params = {**params, **self._params, "min_cost": self.filters.min_cost_micros}
        rows = await self._db.fetch_all(
            f"""SELECT {column}::text AS item, sum(requests)::bigint AS requests, sum(failures)::bigint AS failures,
                       sum(tokens)::bigint AS tokens, sum(cost_micros)::bigint AS cost_micros,
                       sum(latency_ms_sum)::bigint AS latency_ms_sum
                FROM {source} {tail}""",  # noqa: S608
            params,
        )
        if dimension == "virtual_key" and rows:
            names = await self._db.fetch_all(
                "SELECT key_id::text AS id, key_name FROM virtual_keys WHERE key_id = ANY(%s::uuid[])",
                ([row["item"] for row in rows],),
            )
            by_id = {n["id"]: n["key_name"] for n in names}
            for row in rows:
                row["label"] = by_id.get(row["item"], row["item"])
        else:
            for row in rows:
                row["label"] = row["item"]
        return rows

    async def series(self, granularity: str) -> list[dict[str, Any]]:
        days = granularity != "hourly"
        if granularity == "hourly":
            bucket = "bucket"
        elif granularity == "daily":
            bucket = "time_bucket('1 day', bucket)"
        else:
            bucket = "time_bucket('7 days', bucket, '2000-01-03'::timestamptz)"  # weeks from Monday (UTC)
        return await self._rows(
            f"""{bucket} AS at, sum(requests)::bigint AS requests, sum(failures)::bigint AS failures,
                sum(tokens)::bigint AS tokens, sum(cost_micros)::bigint AS cost_micros,
                sum(latency_ms_sum)::bigint AS latency_ms_sum""",
            days=days,
            tail="GROUP BY 1 ORDER BY 1",
        )

    async def alerts(self) -> list[dict[str, Any]]:
        """Budget alerts fired in the window (the budget service's dedup table, read only)."""
        return await self._db.fetch_all(
            """SELECT fired_at, scope, kind, threshold, spend_micros, limit_micros FROM budget_alerts_fired
               WHERE fired_at >= %s AND fired_at < %s ORDER BY fired_at""",
            (self.window.start, self.window.end),
        )


def metric_value(metric: str, row: dict[str, Any]) -> Any:
    requests = int(row["requests"])
    if metric == "cost":
        return usd(int(row["cost_micros"]))
    if metric == "requests":
        return requests
    if metric == "tokens":
        return int(row["tokens"])
    if metric == "latency":
        return (Decimal(int(row["latency_ms_sum"])) / requests).quantize(Decimal("0.1")) if requests else Decimal(0)
    if metric == "errors":
        return int(row["failures"])
    if metric == "error_rate":
        return (Decimal(int(row["failures"])) / requests).quantize(Decimal("0.0001")) if requests else Decimal(0)
    raise ValueError(metric)


def summary_metrics(metrics: list[str], totals: dict[str, Any], unique_users: int | None) -> list[tuple[str, Any]]:
    requests = totals["requests"]
    out: list[tuple[str, Any]] = []
    for metric in metrics:
        if metric == "total_cost":
            value: Any = usd(totals["cost_micros"])
        elif metric == "total_requests":
            value = requests
        elif metric == "total_tokens":
            value = totals["tokens"]
        elif metric == "unique_users":
            value = unique_users or 0
        elif metric == "error_rate":
            value = (Decimal(totals["failures"]) / requests).quantize(Decimal("0.0001")) if requests else Decimal(0)
        elif metric == "success_rate":
            ok = requests - totals["failures"]
            value = (Decimal(ok) / requests).quantize(Decimal("0.0001")) if requests else Decimal(0)
        elif metric == "avg_latency":
            value = (Decimal(totals["latency_ms_sum"]) / requests).quantize(Decimal("0.1")) if requests else Decimal(0)
        else:  # avg_cost_per_request
            value = (usd(totals["cost_micros"]) / requests).quantize(Decimal("0.000001")) if requests else Decimal(0)
        out.append((METRIC_LABELS[metric], value))
    return out


def bucket_label(at: datetime, granularity: str) -> str:
    return at.strftime("%Y-%m-%d %H:00") if granularity == "hourly" else at.strftime("%Y-%m-%d")


def trend_granularity(window: Window) -> str:
    return "hourly" if window.length <= timedelta(hours=48) else "daily"
