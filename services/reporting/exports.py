"""Usage export (POST /analytics/export): csv, json or ndjson, streamed in constant memory.

PostgreSQL formats every row itself and streams it with `COPY (SELECT ...) TO STDOUT`; this
process only concatenates the COPY data into chunks of REPORTING_EXPORT_CHUNK_BYTES and yields
them as `google.api.HttpBody` messages, so memory stays flat whatever the row count, and a slow
client slows the COPY down (gRPC and HTTP/2 flow control) instead of filling a buffer.

- csv: COPY's CSV (RFC 4180 quoting) with a header line of the requested field names.
- ndjson: one JSON object per line, built by `json_build_object`; COPY runs in CSV mode with a
  quote and delimiter byte that JSON text never contains, so the JSON passes through verbatim.
- json: the same objects as one array, "[", objects separated by ",", "]".

Raw rows come from `usage_events`; hourly and daily rows sum the append-only rollups per
(bucket, key, provider, model, operation). Money is exact: micro-units / 10^6 with six decimals.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from psycopg import AsyncConnection, sql

from services.reporting.windows import timestamp
from tally.reporting.v1 import reporting_pb2
from tally.runtime import context
from tally.runtime.config import Settings
from tally.runtime.db import Database
from tally.runtime.errors import InvalidArgument
from tally.runtime.validation import Violations
from tally.runtime.windows import DAY, HOUR, Window, floor_to, parse_period
from tally.usage import TOTAL_TOKENS_SQL

log = logging.getLogger("tally.reporting.export")

FORMATS = {"csv": "text/csv; charset=utf-8", "json": "application/json", "ndjson": "application/x-ndjson"}
GRANULARITIES = ("raw", "hourly", "daily")
ISO_US = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'
ISO_S = 'YYYY-MM-DD"T"HH24:MI:SS"Z"'

# Field -> (raw expression over usage_events e, rollup expression over the grouped rows g).
FIELDS: dict[str, tuple[str, str]] = {
    "timestamp": (
        f"to_char(e.event_time AT TIME ZONE 'UTC', '{ISO_US}')",
        f"to_char(g.bucket AT TIME ZONE 'UTC', '{ISO_S}')",
    ),
    "virtual_key_id": ("e.key_id::text", "g.key_id::text"),
    "virtual_key_name": ("coalesce(k.key_name, '')", "coalesce(k.key_name, '')"),
    "provider": ("e.provider", "g.provider"),
    "model": ("e.model", "g.model"),
    "operation": ("e.operation", "g.operation"),
    "requests": ("1", "g.requests"),
    "tokens": (
        "(e.input_tokens + e.output_tokens + e.cached_read_tokens + e.cache_write_tokens + e.reasoning_tokens)",
        "g.tokens",
    ),
    "cost": ("round(e.cost_micros::numeric / 1000000, 6)", "round(g.cost_micros::numeric / 1000000, 6)"),
    # Seconds, as the analytics answers give latency (averageLatency); to the millisecond.
    "latency": (
        "round(e.latency_ms::numeric / 1000, 3)",
        "round(g.latency_ms_sum::numeric / nullif(g.requests, 0) / 1000, 6)",
    ),
    "errors": ("(e.http_status >= 400)::int", "g.failures"),
}  # fmt: skip
DEFAULT_FIELDS = tuple(FIELDS)
# JSON text never contains these bytes raw (json escapes control characters), so a CSV COPY
# with them as quote and delimiter passes each JSON object through unchanged.
_JSON_COPY = "(FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"


@dataclass(frozen=True)
class ExportPlan:
    format: str
    granularity: str
    window: Window
    fields: tuple[str, ...]
    key_ids: tuple[str, ...]
    providers: tuple[str, ...]
    models: tuple[str, ...]
    operations: tuple[str, ...]
    min_cost_micros: int

    @property
    def content_type(self) -> str:
        return FORMATS[self.format]

    @property
    def filename(self) -> str:
        start = self.window.start.strftime("%Y%m%dT%H%M%SZ")
        end = self.window.end.strftime("%Y%m%dT%H%M%SZ")
        return f"usage-{self.granularity}-{start}-{end}.{self.format}"


def usd_to_micros(value: float, field: str, violations: Violations) -> int:
    if math.isnan(value) or math.isinf(value) or value < 0:
        violations.add(field, "must be a non-negative amount in USD")
        return 0
    try:
        return math.ceil(Decimal(repr(value)) * 1_000_000)
    except InvalidOperation:
        violations.add(field, "must be a non-negative amount in USD")
        return 0


def _names(values: Sequence[str], field: str, violations: Violations) -> tuple[str, ...]:
    out = []
    for index, value in enumerate(values):
        if not value.strip():
            violations.add(f"{field}[{index}]", "must not be empty")
        out.append(value.strip())
    return tuple(out)


def plan_export(
    request: reporting_pb2.ExportUsageRequest, settings: Settings, now: datetime | None = None
) -> ExportPlan:
    """Validates the request (every violation at once, each naming its camelCase field)."""
    violations = Violations()
    fmt = request.format.strip().lower()
    if not fmt:
        violations.add("format", "required: csv, json or ndjson")
    elif fmt not in FORMATS:
        violations.add("format", f"must be csv, json or ndjson, got {request.format[:32]!r}")
    granularity = request.granularity.strip().lower() or "raw"
    if granularity not in GRANULARITIES:
        violations.add("granularity", f"must be raw, hourly or daily, got {request.granularity[:32]!r}")
    fields: list[str] = []
    for index, name in enumerate(request.include_fields):
        if name not in FIELDS:
            violations.add(f"includeFields[{index}]", f"unknown field {name[:64]!r}; known: {', '.join(FIELDS)}")
        elif name in fields:
            violations.add(f"includeFields[{index}]", f"{name!r} is listed twice")
        else:
            fields.append(name)
    now = now or datetime.now(UTC)
    window = Window(now, now)
    has_range = request.HasField("start") or request.HasField("end")
    if request.period and has_range:
        violations.add("period", "give either period or start and end, not both")
    elif request.period:
        try:
            _, span = parse_period(request.period, "period", max_days=settings.reporting_export_max_days)
            window = Window(now - span, now)
        except InvalidArgument as exc:  # fold into the others
            for violation in exc.violations:
                violations.add(violation.field, violation.description)
    elif has_range:
        if not request.HasField("start"):
            violations.add("start", "required with end")
        if not request.HasField("end"):
            violations.add("end", "required with start")
        if request.HasField("start") and request.HasField("end"):
            window = Window(timestamp(request.start), timestamp(request.end))
            if window.end <= window.start:
                violations.add("end", "must be after start")
            elif window.length.days > settings.reporting_export_max_days:
                violations.add("end", f"the window must be at most {settings.reporting_export_max_days} days")
    else:
        violations.add("period", 'required: a period such as "30d", or start and end')
    filters = request.filters
    key_ids = []
    for index, value in enumerate(filters.virtual_keys):
        try:
            key_ids.append(str(uuid.UUID(value)))
        except ValueError:
            violations.add(f"filters.virtualKeys[{index}]", f"must be a UUID, got {value[:64]!r}")
    min_cost = usd_to_micros(filters.min_cost, "filters.minCost", violations)
    plan = ExportPlan(
        format=fmt,
        granularity=granularity,
        window=window,
        fields=tuple(fields) or DEFAULT_FIELDS,
        key_ids=tuple(key_ids),
        providers=_names(filters.providers, "filters.providers", violations),
        models=_names(filters.models, "filters.models", violations),
        operations=_names(filters.operations, "filters.operations", violations),
        min_cost_micros=min_cost,
    )
    violations.raise_if_any()
    return plan


def _where(plan: ExportPlan, alias: str, time_column: str) -> tuple[list[str], dict[str, Any]]:
    clauses = [f"{alias}.{time_column} >= %(start)s", f"{alias}.{time_column} < %(end)s"]
    params: dict[str, Any] = {"start": plan.window.start, "end": plan.window.end}
    if plan.key_ids:
        clauses.append(f"{alias}.key_id = ANY(%(keys)s::uuid[])")
        params["keys"] = list(plan.key_ids)
    for name, values in (("provider", plan.providers), ("model", plan.models), ("operation", plan.operations)):
        if values:
            clauses.append(f"{alias}.{name} = ANY(%({name}s)s::text[])")
            params[f"{name}s"] = list(values)
    return clauses, params


def select_sql(plan: ExportPlan) -> tuple[str, dict[str, Any]]:
    """The SELECT whose rows are the export, with named columns (the field names)."""
    raw = plan.granularity == "raw"
    exprs = [(name, FIELDS[name][0 if raw else 1]) for name in plan.fields]
    join_keys = "virtual_key_name" in plan.fields
    if raw:
        clauses, params = _where(plan, "e", "event_time")
        if plan.min_cost_micros > 0:
            clauses.append("e.cost_micros >= %(min_cost)s")
            params["min_cost"] = plan.min_cost_micros
        join = "LEFT JOIN virtual_keys k ON k.key_id = e.key_id" if join_keys else ""
        columns = ", ".join(f'{expr} AS "{name}"' for name, expr in exprs)
        query = f"""SELECT {columns} FROM usage_events e {join}
                    WHERE {" AND ".join(clauses)} ORDER BY e.event_time, e.request_id"""  # noqa: S608
        return query, params
    width = HOUR if plan.granularity == "hourly" else DAY
    table = "usage_rollup_hourly" if plan.granularity == "hourly" else "usage_rollup_daily"
    clauses, params = _where(plan, "r", "bucket")
    # Whole buckets overlapping the window.
    params["start"] = floor_to(plan.window.start, width)
    having = "HAVING sum(r.cost_micros) >= %(min_cost)s" if plan.min_cost_micros > 0 else ""
    if having:
        params["min_cost"] = plan.min_cost_micros
    join = "LEFT JOIN virtual_keys k ON k.key_id = g.key_id" if join_keys else ""
    columns = ", ".join(f'{expr} AS "{name}"' for name, expr in exprs)
    query = f"""SELECT {columns} FROM (
                    SELECT r.bucket, r.key_id, r.provider, r.model, r.operation,
                           sum(r.requests)::bigint AS requests, sum({TOTAL_TOKENS_SQL})::bigint AS tokens,
                           sum(r.cost_micros)::bigint AS cost_micros, sum(r.latency_ms_sum)::bigint AS latency_ms_sum,
                           sum(r.failures)::bigint AS failures
                    FROM {table} r WHERE {" AND ".join(clauses)}
                    GROUP BY r.bucket, r.key_id, r.provider, r.model, r.operation {having}) g {join}
                ORDER BY g.bucket, g.key_id, g.provider, g.model, g.operation"""  # noqa: S608
    return query, params


def copy_sql(plan: ExportPlan) -> tuple[str, dict[str, Any]]:
    query, params = select_sql(plan)
    if plan.format == "csv":
        return f"COPY ({query}) TO STDOUT WITH (FORMAT csv, HEADER true)", params
    pairs = ", ".join(f"'{name}', s.\"{name}\"" for name in plan.fields)
    if plan.format == "ndjson":
        copy = f"COPY (SELECT json_build_object({pairs})::text FROM ({query}) s) TO STDOUT WITH {_JSON_COPY}"  # noqa: S608
        return copy, params
    first = "CASE WHEN row_number() OVER () = 1 THEN '' ELSE ',' END"
    return (
        f"COPY (SELECT {first} || json_build_object({pairs})::text FROM ({query}) s) TO STDOUT WITH {_JSON_COPY}",  # noqa: S608
        params,
    )


@asynccontextmanager
async def streaming_transaction(db: Database, settings: Settings) -> AsyncIterator[AsyncConnection[Any]]:
    """A read-only transaction for a long stream: bounded by the call's deadline when it has one,
    otherwise unbounded (a stream lasts as long as the client reads; a disconnect cancels it)."""
    remaining = context.seconds_remaining()
    timeout_ms = 0 if remaining is None else max(1, int(remaining * 1000))
    async with db.pool.connection(timeout=30) as conn, conn.transaction():
        await conn.execute("SET TRANSACTION READ ONLY")
        await conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(timeout_ms),))
        yield conn


async def copy_chunks(
    db: Database, settings: Settings, query: str, params: dict[str, Any], *, prefix: bytes = b"", suffix: bytes = b""
) -> AsyncIterator[bytes]:
    """Runs a COPY ... TO STDOUT and yields its output in chunks of about the configured size."""
    chunk_size = settings.reporting_export_chunk_bytes
    buffer = bytearray(prefix)
    async with streaming_transaction(db, settings) as conn:
        cursor = conn.cursor()
        try:
            async with cursor.copy(sql.SQL(query), params) as copy:
                async for data in copy:
                    buffer += data
                    if len(buffer) >= chunk_size:
                        yield bytes(buffer)
                        buffer.clear()
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away mid-stream: stop the COPY on the server, then let the
            # transaction roll back so the connection returns to the pool clean.
            await conn.cancel_safe()
            raise
    buffer += suffix
    if buffer:
        yield bytes(buffer)


async def export_chunks(db: Database, settings: Settings, plan: ExportPlan) -> AsyncIterator[bytes]:
    query, params = copy_sql(plan)
    prefix, suffix = (b"[\n", b"]\n") if plan.format == "json" else (b"", b"")
    async for chunk in copy_chunks(db, settings, query, params, prefix=prefix, suffix=suffix):
        yield chunk
