"""Custom and scheduled reports: definitions, runs, output, e-mail, and the scheduler.

A run is one row of `report_runs`. A scheduled fire is claimed by inserting its row with the
fire time as `scheduled_for`: the unique index makes that insert the lock, so with any number
of replicas (each running APScheduler over the same schedules) and across restarts each fire
runs once. At start a replica runs, once, the latest fire it missed within the grace window
(trigger "catch_up"); fires from before a schedule was set are never run. Output is kept in the
run row and, when the report has recipients, mailed as an attachment through the outbox.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]
from apscheduler.triggers.base import BaseTrigger  # type: ignore[import-untyped]
from google.protobuf import timestamp_pb2
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.reporting import reportdata as rd
from services.reporting.exports import usd_to_micros
from services.reporting.render import CONTENT_TYPES, EXTENSIONS, FORMATS, render
from services.reporting.schedules import Schedule, parse_recipients, parse_schedule
from tally.notify import Notification, enqueue
from tally.reporting.v1 import reporting_pb2
from tally.runtime.config import Settings
from tally.runtime.db import Database
from tally.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from tally.runtime.validation import Violations, decode_page_token, encode_page_token, page_size
from tally.runtime.windows import Window, parse_period

log = logging.getLogger("tally.reporting.reports")

SOURCE = "reporting.reports"
SECTION_TYPES = ("summary", "breakdown", "trends", "top_items")
SCHEDULED_SECTIONS = ("summary", "alerts", "top_usage", "cost_breakdown", "trends", "forecasts")
FORMAT_ALIASES = {"xlsx": "excel"}


def _ts(at: datetime | None) -> timestamp_pb2.Timestamp | None:
    if at is None:
        return None
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(at.astimezone(UTC))
    return value


def _format(value: str, field: str, violations: Violations) -> str:
    fmt = FORMAT_ALIASES.get(value.strip().lower(), value.strip().lower()) or "pdf"
    if fmt not in FORMATS:
        violations.add(field, f"must be pdf, excel, csv or json, got {value[:32]!r}")
    return fmt


def _period(value: str, field: str, violations: Violations, max_days: int) -> str:
    try:
        parse_period(value, field, max_days=max_days)
    except InvalidArgument as exc:
        for violation in exc.violations:
            violations.add(violation.field, violation.description)
    return value.strip()


# ---------------------------------------------------------------------------------------------- definitions
def validate_custom(request: reporting_pb2.CreateReportRequest, settings: Settings) -> dict[str, Any]:
    """The stored form of a custom report (sections, filters, schedule), or a 400 naming the field."""
    v = Violations()
    name = request.report_name.strip()
    if not name:
        v.add("reportName", "required")
    elif len(name) > 200:
        v.add("reportName", "at most 200 characters")
    period = _period(request.period, "period", v, settings.reporting_export_max_days)
    fmt = _format(request.format, "format", v)
    if not request.sections:
        v.add("sections", f"at least one section ({', '.join(SECTION_TYPES)})")
    if len(request.sections) > 20:
        v.add("sections", "at most 20 sections")
    sections = []
    for index, section in enumerate(request.sections):
        where = f"sections[{index}]"
        kind = section.type.strip().lower()
        item: dict[str, Any] = {"type": kind}
        if kind not in SECTION_TYPES:
            v.add(f"{where}.type", f"must be one of {', '.join(SECTION_TYPES)}, got {section.type[:32]!r}")
            continue
        allowed = rd.SUMMARY_METRICS if kind == "summary" else rd.TABLE_METRICS
        for position, metric in enumerate(section.metrics):
            if metric not in allowed:
                v.add(f"{where}.metrics[{position}]", f"unknown metric {metric[:32]!r}; known: {', '.join(allowed)}")
        default_metrics = {
            "summary": ["total_cost", "total_requests", "total_tokens", "unique_users"],
            "breakdown": ["cost", "requests", "tokens"],
            "trends": ["cost", "requests"],
            "top_items": ["cost", "requests", "tokens"],
        }[kind]
        item["metrics"] = list(dict.fromkeys(section.metrics)) or default_metrics
        if kind == "breakdown":
            if section.group_by not in rd.DIMENSIONS:
                v.add(f"{where}.groupBy", f"must be one of {', '.join(rd.DIMENSIONS)}")
            item["groupBy"] = section.group_by
        if kind == "trends":
            granularity = section.granularity.strip().lower() or "daily"
            if granularity not in rd.GRANULARITIES:
                v.add(f"{where}.granularity", "must be hourly, daily or weekly")
            item["granularity"] = granularity
        if kind == "top_items":
            if section.category not in rd.CATEGORIES:
                v.add(f"{where}.category", f"must be one of {', '.join(rd.CATEGORIES)}")
            sort_by = section.sort_by.strip().lower() or "cost"
            if sort_by not in rd.SORT_METRICS:
                v.add(f"{where}.sortBy", "must be cost, requests or tokens")
            if not 0 <= section.limit <= 100:
                v.add(f"{where}.limit", "must be between 1 and 100")
            item.update({"category": section.category, "sortBy": sort_by, "limit": section.limit or 10})
        sections.append(item)
    filters = request.filters
    key_ids = []
    for index, value in enumerate(filters.virtual_keys):
        try:
            key_ids.append(str(uuid.UUID(value)))
        except ValueError:
            v.add(f"filters.virtualKeys[{index}]", f"must be a UUID, got {value[:64]!r}")
    min_cost = usd_to_micros(filters.min_cost, "filters.minCost", v)
    schedule = None
    recipients: list[str] = []
    if request.HasField("schedule"):
        s = request.schedule
        schedule = parse_schedule(
            v,
            "schedule.",
            frequency=s.frequency,
            time_text=s.time,
            timezone=s.timezone,
            day_of_week=s.day_of_week,
            day_of_month=s.day_of_month,
        )
        recipients = parse_recipients(v, "schedule.recipients", list(s.recipients))
    v.raise_if_any()
    return {
        "name": name,
        "period": period,
        "format": fmt,
        "definition": {
            "sections": sections,
            "filters": rd.Filters(
                exclude_test_keys=filters.exclude_test_keys,
                min_cost_micros=min_cost,
                key_ids=tuple(key_ids),
                providers=tuple(p.strip() for p in filters.providers if p.strip()),
                models=tuple(m.strip() for m in filters.models if m.strip()),
            ).as_json(),
        },
        "schedule": schedule.as_json() if schedule else None,
        "recipients": recipients,
    }


def validate_scheduled(
    request: reporting_pb2.UpdateScheduledReportsRequest, settings: Settings
) -> list[dict[str, Any]]:
    v = Violations()
    out: list[dict[str, Any]] = []
    names: set[str] = set()
    if len(request.reports) > 100:
        v.add("reports", "at most 100 scheduled reports")
    for index, report in enumerate(request.reports):
        where = f"reports[{index}]."
        name = report.name.strip()
        if not name:
            v.add(f"{where}name", "required")
        elif name in names:
            v.add(f"{where}name", f"{name[:64]!r} is used twice; names are unique")
        names.add(name)
        report_id = None
        if report.report_id:
            try:
                report_id = uuid.UUID(report.report_id)
            except ValueError:
                v.add(f"{where}reportId", "must be a UUID")
        schedule = parse_schedule(
            v,
            where,
            frequency=report.schedule,
            time_text=report.time,
            timezone=report.timezone,
            day_of_week=report.day_of_week,
            day_of_month=report.day_of_month,
            frequency_field="schedule",
        )
        period = _period(report.period, f"{where}period", v, settings.reporting_export_max_days)
        fmt = _format(report.format, f"{where}format", v)
        recipients = parse_recipients(v, f"{where}recipients", list(report.recipients))
        if not report.sections:
            v.add(f"{where}sections", f"at least one of {', '.join(SCHEDULED_SECTIONS)}")
        for position, section in enumerate(report.sections):
            if section not in SCHEDULED_SECTIONS:
                v.add(f"{where}sections[{position}]", f"unknown section {section[:32]!r}")
        out.append(
            {
                "report_id": report_id,
                "name": name,
                "period": period,
                "format": fmt,
                "definition": {"sections": list(dict.fromkeys(report.sections))},
                "schedule": schedule.as_json() if schedule else None,
                "recipients": recipients,
            }
        )
    v.raise_if_any()
    return out


# ---------------------------------------------------------------------------------------------- documents
async def build_document(db: Database, report: dict[str, Any], window: Window, timezone: str) -> rd.ReportDocument:
    definition = report["definition"]
    filters = rd.Filters.from_json(definition.get("filters", {}))
    queries = rd.ReportQueries(db, window, filters)
    totals = await queries.totals()
    sections: list[rd.Section] = []
    if report["kind"] == "custom":
        for item in definition["sections"]:
            sections.extend(await _custom_section(queries, item, totals))
    else:
        for name in definition["sections"]:
            sections.extend(await _scheduled_section(queries, name, totals, window))
    return rd.ReportDocument(
        name=report["name"],
        window=window,
        timezone=timezone,
        sections=sections,
        totals={
            "cost": rd.usd(totals["cost_micros"]),
            "requests": totals["requests"],
            "tokens": totals["tokens"],
            "errors": totals["failures"],
        },
    )


def _table(
    rows: list[dict[str, Any]], first: str, metrics: Sequence[str], label_key: str = "label"
) -> tuple[list[str], list[list[Any]]]:
    columns = [first, *(rd.METRIC_LABELS[m] for m in metrics)]
    return columns, [[row[label_key], *(rd.metric_value(m, row) for m in metrics)] for row in rows]


async def _custom_section(queries: rd.ReportQueries, item: dict[str, Any], totals: dict[str, Any]) -> list[rd.Section]:
    kind = item["type"]
    if kind == "summary":
        users = await queries.unique_users() if "unique_users" in item["metrics"] else None
        return [rd.Section("summary", "Summary", "metrics", metrics=rd.summary_metrics(item["metrics"], totals, users))]
    if kind == "breakdown":
        rows = await queries.grouped(item["groupBy"])
        title = f"Breakdown by {item['groupBy'].replace('_', ' ')}"
        columns, table = _table(rows, item["groupBy"].replace("_", " ").title(), item["metrics"])
        return [
            rd.Section(
                "breakdown", title, "table", columns=columns, rows=table, chart="bar", chart_columns=columns[1:2]
            )
        ]
    if kind == "trends":
        granularity = item["granularity"]
        rows = await queries.series(granularity)
        for row in rows:
            row["label"] = rd.bucket_label(row["at"], granularity)
        columns, table = _table(rows, "Period (UTC)", item["metrics"])
        return [
            rd.Section(
                "trends",
                f"{granularity.title()} trends",
                "table",
                columns=columns,
                rows=table,
                chart="line",
                chart_columns=columns[1:3],
            )
        ]
    dimension = rd.CATEGORIES[item["category"]]
    order = {"cost": "cost_micros", "requests": "requests", "tokens": "tokens"}[item["sortBy"]]
    rows = await queries.grouped(dimension, order=order, limit=item["limit"])
    metrics = ["cost", "requests", "tokens"]
    columns, table = _table(rows, dimension.replace("_", " ").title(), metrics)
    chart_column = rd.METRIC_LABELS[item["sortBy"]]
    title = f"Top {item['limit']} {item['category'].replace('_', ' ')} by {item['sortBy']}"
    return [
        rd.Section("top_items", title, "table", columns=columns, rows=table, chart="bar", chart_columns=[chart_column])
    ]


async def _scheduled_section(
    queries: rd.ReportQueries, name: str, totals: dict[str, Any], window: Window
) -> list[rd.Section]:
    if name == "summary":
        users = await queries.unique_users()
        return [
            rd.Section(
                "summary", "Summary", "metrics", metrics=rd.summary_metrics(list(rd.SUMMARY_METRICS), totals, users)
            )
        ]
    if name == "alerts":
        rows = await queries.alerts()
        return [
            rd.Section(
                "alerts",
                "Budget alerts",
                "table",
                columns=["Fired at (UTC)", "Scope", "Kind", "Threshold", "Spend (USD)", "Limit (USD)"],
                rows=[
                    [r["fired_at"].strftime("%Y-%m-%d %H:%M:%S"), r["scope"], r["kind"], Decimal(r["threshold"]),
                     rd.usd(r["spend_micros"]), rd.usd(r["limit_micros"])]
                    for r in rows
                ],
            )
        ]  # fmt: skip
    if name == "top_usage":
        rows = await queries.grouped("virtual_key", limit=10)
        columns, table = _table(rows, "Virtual key", ["cost", "requests", "tokens"])
        return [
            rd.Section(
                "top_usage",
                "Top virtual keys by cost",
                "table",
                columns=columns,
                rows=table,
                chart="bar",
                chart_columns=columns[1:2],
            )
        ]
    if name == "cost_breakdown":
        out = []
        for dimension in ("provider", "model"):
            rows = await queries.grouped(dimension)
            columns, table = _table(rows, dimension.title(), ["cost", "requests", "tokens"])
            out.append(
                rd.Section(
                    "cost_breakdown",
                    f"Cost by {dimension}",
                    "table",
                    columns=columns,
                    rows=table,
                    chart="bar",
                    chart_columns=columns[1:2],
                )
            )
        return out
    if name == "trends":
        granularity = rd.trend_granularity(window)
        rows = await queries.series(granularity)
        for row in rows:
            row["label"] = rd.bucket_label(row["at"], granularity)
        columns, table = _table(rows, "Period (UTC)", ["cost", "requests"])
        return [
            rd.Section(
                "trends",
                f"{granularity.title()} trends",
                "table",
                columns=columns,
                rows=table,
                chart="line",
                chart_columns=columns[1:3],
            )
        ]
    # forecasts: a linear run-rate over the window
    days = Decimal(window.length.total_seconds()) / Decimal(86400)
    per_day = (rd.usd(totals["cost_micros"]) / days).quantize(Decimal("0.000001")) if days else Decimal(0)
    requests_per_day = (Decimal(totals["requests"]) / days).quantize(Decimal("0.1")) if days else Decimal(0)
    return [
        rd.Section(
            "forecasts",
            "Forecast",
            "metrics",
            metrics=[
                ("Cost per day, run rate (USD)", per_day),
                ("Projected cost, next 7 days (USD)", (per_day * 7).quantize(Decimal("0.01"))),
                ("Projected cost, next 30 days (USD)", (per_day * 30).quantize(Decimal("0.01"))),
                ("Requests per day, run rate", requests_per_day),
            ],
            note="Linear projection of the spend rate over the report window.",
        )
    ]


# ---------------------------------------------------------------------------------------------- runs
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "report"


@dataclass(frozen=True)
class Claim:
    trigger: str
    scheduled_for: datetime | None


class ReportRunner:
    def __init__(self, db: Database, settings: Settings, wake_worker: Callable[[], None]) -> None:
        self._db = db
        self._settings = settings
        self._wake_worker = wake_worker
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"

    async def run(self, report: dict[str, Any], claim: Claim, now: datetime | None = None) -> uuid.UUID | None:
        """Runs a report once; for a scheduled fire, only if this call claims it. Returns the run id."""
        end = claim.scheduled_for or now or datetime.now(UTC)
        _, span = parse_period(report["period"], "period", max_days=100_000)
        window = Window(end - span, end)
        run_id = uuid.uuid4()
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                """INSERT INTO report_runs (run_id, report_id, status, trigger, scheduled_for, window_start,
                                            window_end, started_at, format, recipients, worker)
                   VALUES (%s, %s, 'running', %s, %s, %s, %s, now(), %s, %s, %s)
                   ON CONFLICT (report_id, scheduled_for) WHERE scheduled_for IS NOT NULL DO NOTHING
                   RETURNING run_id""",
                (
                    run_id,
                    report["report_id"],
                    claim.trigger,
                    claim.scheduled_for,
                    window.start,
                    window.end,
                    report["format"],
                    report["recipients"],
                    self.worker_name,
                ),
            )
            if await cur.fetchone() is None:
                return None  # another replica (or an earlier start) has this fire
        started = time.perf_counter()
        timezone = (report["schedule"] or {}).get("timezone") or self._settings.timezone
        try:
            document = await build_document(self._db, report, window, timezone)
            output = await asyncio.to_thread(render, document, report["format"])
        except Exception as exc:
            log.exception("report run failed", extra={"reportId": str(report["report_id"]), "runId": str(run_id)})
            await self._db.fetch_all(
                """UPDATE report_runs SET status = 'failed', finished_at = now(), duration_seconds = %s, error = %s
                   WHERE run_id = %s RETURNING 1""",
                (time.perf_counter() - started, f"{type(exc).__name__}: {exc}"[:2000], run_id),
            )
            return run_id
        local_end = window.end.astimezone(document_zone(timezone))
        filename = f"{_slug(report['name'])}-{local_end.strftime('%Y-%m-%d-%H%M')}.{EXTENSIONS[report['format']]}"
        content_type = CONTENT_TYPES[report["format"]]
        async with self._db.transaction() as conn:
            message_id = None
            if report["recipients"]:
                message_id = f"msg_report_{run_id.hex}"
                await enqueue(conn, [self._mail(report, window, filename, content_type, output, message_id)],
                              max_attempts=self._settings.notify_max_attempts)  # fmt: skip
            await conn.execute(
                """UPDATE report_runs SET status = 'succeeded', finished_at = now(), duration_seconds = %s,
                       content_type = %s, filename = %s, output = %s, email_message_id = %s WHERE run_id = %s""",
                (time.perf_counter() - started, content_type, filename, output, message_id, run_id),
            )
        if report["recipients"]:
            self._wake_worker()
        log.info("report run succeeded", extra={"reportId": str(report["report_id"]), "trigger": claim.trigger})
        return run_id

    def _mail(
        self, report: dict[str, Any], window: Window, filename: str, content_type: str, output: bytes, message_id: str
    ) -> Notification:
        text = (
            f"{report['name']}\n\nPeriod: {window.start.isoformat()} to {window.end.isoformat()} (UTC).\n"
            f"The report is attached ({filename}).\n"
        )
        return Notification(
            channel="email",
            destination=", ".join(report["recipients"]),
            payload={
                "text": text,
                "attachments": [
                    {
                        "filename": filename,
                        "contentType": content_type.split(";")[0],
                        "contentBase64": base64.b64encode(output).decode(),
                    }
                ],
            },
            source=SOURCE,
            subject=f"[Tally] {report['name']} ({window.end.strftime('%Y-%m-%d')})",
            message_id=message_id,
        )


def document_zone(timezone: str) -> Any:
    from zoneinfo import ZoneInfo

    return ZoneInfo(timezone)


# ---------------------------------------------------------------------------------------------- storage
_REPORT_COLUMNS = (
    "report_id, kind, name, position, period, format, definition, schedule, recipients, schedule_since, created_at"
)
_RUN_SELECT = """
SELECT r.run_id, r.report_id, r.status, r.trigger, r.scheduled_for, r.window_start, r.window_end, r.started_at,
       r.finished_at, r.duration_seconds, r.format, r.content_type, r.filename, octet_length(r.output) AS size_bytes,
       r.error, r.recipients, r.email_message_id, r.created_at, o.status AS email_outbox_status
FROM report_runs r LEFT JOIN notification_outbox o ON o.message_id = r.email_message_id
"""


def run_message(row: dict[str, Any]) -> reporting_pb2.ReportRun:
    if not row["recipients"]:
        email = "not_requested"
    elif row["email_outbox_status"] == "delivered":
        email = "sent"
    elif row["email_outbox_status"] == "dead" or row["status"] == "failed":
        email = "failed"
    else:
        email = "pending"
    return reporting_pb2.ReportRun(
        run_id=str(row["run_id"]),
        report_id=str(row["report_id"]),
        status=row["status"],
        trigger=row["trigger"],
        scheduled_for=_ts(row["scheduled_for"]),
        window_start=_ts(row["window_start"]),
        window_end=_ts(row["window_end"]),
        started_at=_ts(row["started_at"]),
        finished_at=_ts(row["finished_at"]),
        duration_seconds=row["duration_seconds"] if row["finished_at"] else 0.0,
        format=row["format"],
        content_type=row["content_type"],
        filename=row["filename"],
        size_bytes=float(row["size_bytes"] or 0),
        error=row["error"],
        recipients=row["recipients"],
        email_status=email,
    )


class ReportStore:
    def __init__(self, db: Database, settings: Settings, runner: ReportRunner, on_change: Callable[[], None]) -> None:
        self._db = db
        self._settings = settings
        self._runner = runner
        self._on_change = on_change

    async def report_row(self, report_id: uuid.UUID, conn: AsyncConnection[Any] | None = None) -> dict[str, Any] | None:
        query = f"SELECT {_REPORT_COLUMNS} FROM reports WHERE report_id = %s AND deleted_at IS NULL"  # noqa: S608
        if conn is None:
            return await self._db.fetch_one(query, (report_id,))
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, (report_id,))
            return await cur.fetchone()

    async def latest_runs(self, report_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
        rows = await self._db.fetch_all(
            f"""SELECT DISTINCT ON (r.report_id) * FROM ({_RUN_SELECT}) r
                WHERE r.report_id = ANY(%s) ORDER BY r.report_id, r.created_at DESC, r.run_id DESC""",  # noqa: S608
            (report_ids,),
        )
        return {row["report_id"]: row for row in rows}

    async def last_started(self, report_ids: list[uuid.UUID]) -> dict[uuid.UUID, datetime]:
        rows = await self._db.fetch_all(
            "SELECT report_id, max(started_at) AS at FROM report_runs WHERE report_id = ANY(%s) GROUP BY report_id",
            (report_ids,),
        )
        return {row["report_id"]: row["at"] for row in rows if row["at"] is not None}

    def report_message(self, row: dict[str, Any], latest: dict[str, Any] | None) -> reporting_pb2.Report:
        definition = row["definition"]
        filters = rd.Filters.from_json(definition.get("filters", {}))
        report = reporting_pb2.Report(
            report_id=str(row["report_id"]),
            report_name=row["name"],
            period=row["period"],
            format=row["format"],
            created_at=_ts(row["created_at"]),
            filters=reporting_pb2.ReportFilters(
                exclude_test_keys=filters.exclude_test_keys,
                min_cost=filters.min_cost_micros / 1_000_000,
                virtual_keys=filters.key_ids,
                providers=filters.providers,
                models=filters.models,
            ),
        )
        for item in definition["sections"]:
            if isinstance(item, str):
                report.sections.append(reporting_pb2.ReportSection(type=item))
                continue
            report.sections.append(
                reporting_pb2.ReportSection(
                    type=item["type"],
                    metrics=item.get("metrics", []),
                    group_by=item.get("groupBy", ""),
                    granularity=item.get("granularity", ""),
                    category=item.get("category", ""),
                    sort_by=item.get("sortBy", ""),
                    limit=item.get("limit", 0),
                )
            )
        if row["schedule"]:
            schedule = row["schedule"]
            report.schedule.CopyFrom(
                reporting_pb2.ReportSchedule(
                    frequency=schedule["frequency"],
                    day_of_month=schedule.get("dayOfMonth") or 0,
                    day_of_week=schedule.get("dayOfWeek") or "",
                    time=schedule["time"],
                    timezone=schedule["timezone"],
                    recipients=row["recipients"],
                )
            )
            next_run = Schedule.from_json(schedule).next_after(datetime.now(UTC))
            report.next_run_at.FromDatetime(next_run.astimezone(UTC))
        if latest is not None:
            report.latest_run.CopyFrom(run_message(latest))
        return report

    async def create(self, request: reporting_pb2.CreateReportRequest) -> reporting_pb2.Report:
        data = validate_custom(request, self._settings)
        report_id = uuid.uuid4()
        await self._db.fetch_all(
            """INSERT INTO reports (report_id, kind, name, period, format, definition, schedule, recipients)
               VALUES (%s, 'custom', %s, %s, %s, %s, %s, %s) RETURNING 1""",
            (
                report_id,
                data["name"],
                data["period"],
                data["format"],
                Jsonb(data["definition"]),
                Jsonb(data["schedule"]) if data["schedule"] else None,
                data["recipients"],
            ),
        )
        row = await self.report_row(report_id)
        assert row is not None
        # The first run, now; its failure is recorded in the run, the report still exists.
        await self._runner.run(row, Claim("on_demand", None))
        if data["schedule"]:
            self._on_change()
        latest = await self.latest_runs([report_id])
        return self.report_message(row, latest.get(report_id))

    async def list_reports(self, request: reporting_pb2.ListReportsRequest) -> reporting_pb2.ReportPage:
        size = page_size(request.page_size)
        position = decode_page_token(request.page_token)
        params: dict[str, Any] = {"limit": size + 1}
        after = ""
        if position is not None:
            after = "AND (created_at, report_id) < (%(at)s::timestamptz, %(id)s::uuid)"
            params.update({"at": position[0], "id": position[1]})
        rows = await self._db.fetch_all(
            f"""SELECT {_REPORT_COLUMNS} FROM reports WHERE kind = 'custom' AND deleted_at IS NULL {after}
                ORDER BY created_at DESC, report_id DESC LIMIT %(limit)s""",  # noqa: S608
            params,
        )
        latest = await self.latest_runs([row["report_id"] for row in rows[:size]])
        page = reporting_pb2.ReportPage(
            reports=[self.report_message(row, latest.get(row["report_id"])) for row in rows[:size]]
        )
        if len(rows) > size:
            last = rows[size - 1]
            page.next_page_token = encode_page_token([last["created_at"].isoformat(), str(last["report_id"])])
        return page

    async def get(self, report_id: str) -> reporting_pb2.Report:
        row = await self.report_row(_report_id(report_id))
        if row is None:
            raise NotFound(f"no report {report_id}")
        latest = await self.latest_runs([row["report_id"]])
        return self.report_message(row, latest.get(row["report_id"]))

    async def runs(self, request: reporting_pb2.ListReportRunsRequest) -> reporting_pb2.ReportRunPage:
        report_id = _report_id(request.report_id)
        size = page_size(request.page_size)
        position = decode_page_token(request.page_token)
        exists = await self._db.fetch_one("SELECT 1 FROM reports WHERE report_id = %s", (report_id,))
        if exists is None:
            raise NotFound(f"no report {request.report_id}")
        params: dict[str, Any] = {"report": report_id, "limit": size + 1}
        after = ""
        if position is not None:
            after = "AND (r.created_at, r.run_id) < (%(at)s::timestamptz, %(id)s::uuid)"
            params.update({"at": position[0], "id": position[1]})
        rows = await self._db.fetch_all(
            f"""{_RUN_SELECT} WHERE r.report_id = %(report)s {after}
                ORDER BY r.created_at DESC, r.run_id DESC LIMIT %(limit)s""",
            params,
        )
        page = reporting_pb2.ReportRunPage(runs=[run_message(row) for row in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            page.next_page_token = encode_page_token([last["created_at"].isoformat(), str(last["run_id"])])
        return page

    async def output(self, report_id: str, run_id: str) -> dict[str, Any]:
        report_uuid = _report_id(report_id)
        try:
            run_uuid = uuid.UUID(run_id)
        except ValueError:
            raise InvalidArgument.field("runId", "must be a UUID") from None
        row = await self._db.fetch_one(
            "SELECT status, content_type, filename, output FROM report_runs WHERE report_id = %s AND run_id = %s",
            (report_uuid, run_uuid),
        )
        if row is None:
            raise NotFound(f"no run {run_id} of report {report_id}")
        if row["status"] != "succeeded" or row["output"] is None:
            raise FailedPrecondition(f"the run is {row['status']}; only a succeeded run has output")
        return row

    # ------------------------------------------------------------------------------------------ scheduled
    async def scheduled(self) -> reporting_pb2.ScheduledReports:
        rows = await self._db.fetch_all(
            f"""SELECT {_REPORT_COLUMNS} FROM reports WHERE kind = 'scheduled' AND deleted_at IS NULL
                ORDER BY position, name"""  # noqa: S608
        )
        last = await self.last_started([row["report_id"] for row in rows])
        now = datetime.now(UTC)
        out = reporting_pb2.ScheduledReports()
        for row in rows:
            schedule = row["schedule"]
            out.reports.append(
                reporting_pb2.ScheduledReport(
                    report_id=str(row["report_id"]),
                    name=row["name"],
                    schedule=schedule["frequency"],
                    time=schedule["time"],
                    timezone=schedule["timezone"],
                    day_of_week=schedule.get("dayOfWeek") or "",
                    day_of_month=schedule.get("dayOfMonth") or 0,
                    period=row["period"],
                    recipients=row["recipients"],
                    format=row["format"],
                    sections=row["definition"]["sections"],
                    next_run_at=_ts(Schedule.from_json(schedule).next_after(now)),
                    last_run_at=_ts(last.get(row["report_id"])),
                )
            )
        return out

    async def replace_scheduled(
        self, request: reporting_pb2.UpdateScheduledReportsRequest
    ) -> reporting_pb2.ScheduledReports:
        items = validate_scheduled(request, self._settings)
        async with self._db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (0x7A11_0610,))
            await cur.execute(
                f"SELECT {_REPORT_COLUMNS} FROM reports WHERE kind = 'scheduled' AND deleted_at IS NULL"  # noqa: S608
            )
            existing = await cur.fetchall()
            by_id = {row["report_id"]: row for row in existing}
            by_name = {row["name"]: row for row in existing}
            kept: list[uuid.UUID] = []
            for position, item in enumerate(items):
                if item["report_id"] is not None:
                    current = by_id.get(item["report_id"])
                    if current is None:
                        raise InvalidArgument.field(f"reports[{position}].reportId", "no such scheduled report")
                else:
                    current = by_name.get(item["name"])
                report_id = current["report_id"] if current else uuid.uuid4()
                kept.append(report_id)
                if current is None:
                    await cur.execute(
                        """INSERT INTO reports (report_id, kind, name, position, period, format, definition, schedule,
                                                recipients)
                           VALUES (%s, 'scheduled', %s, %s, %s, %s, %s, %s, %s)""",
                        (report_id, item["name"], position, item["period"], item["format"], Jsonb(item["definition"]),
                         Jsonb(item["schedule"]), item["recipients"]),
                    )  # fmt: skip
                    continue
                await cur.execute(
                    """UPDATE reports SET name = %s, position = %s, period = %s, format = %s, definition = %s,
                           schedule = %s, recipients = %s, updated_at = now(),
                           schedule_since = CASE WHEN schedule = %s THEN schedule_since ELSE now() END
                       WHERE report_id = %s""",
                    (item["name"], position, item["period"], item["format"], Jsonb(item["definition"]),
                     Jsonb(item["schedule"]), item["recipients"], Jsonb(item["schedule"]), report_id),
                )  # fmt: skip
            await cur.execute(
                """UPDATE reports SET deleted_at = now()
                   WHERE kind = 'scheduled' AND deleted_at IS NULL AND NOT (report_id = ANY(%s))""",
                (kept,),
            )
        self._on_change()
        return await self.scheduled()


def _report_id(value: str) -> uuid.UUID:
    if not value:
        raise InvalidArgument.field("reportId", "required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument.field("reportId", "must be a UUID") from None


# ---------------------------------------------------------------------------------------------- scheduler
class ScheduleTrigger(BaseTrigger):  # type: ignore[misc]
    """APScheduler trigger over `Schedule` (handles "last day of the month" and DST the same way)."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        if previous_fire_time is not None:
            return self.schedule.next_after(previous_fire_time)
        return self.schedule.next_after(now - timedelta(microseconds=1))


class ReportScheduler:
    """APScheduler jobs for every schedule in the database, refreshed periodically."""

    def __init__(self, db: Database, settings: Settings, store: ReportStore, runner: ReportRunner) -> None:
        self._db = db
        self._settings = settings
        self._store = store
        self._runner = runner
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._jobs: dict[str, str] = {}  # job id -> schedule fingerprint
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    def changed(self) -> None:
        self._changed.set()

    async def _scheduled_rows(self) -> list[dict[str, Any]]:
        return await self._db.fetch_all(
            f"SELECT {_REPORT_COLUMNS} FROM reports WHERE schedule IS NOT NULL AND deleted_at IS NULL"  # noqa: S608
        )

    async def run(self, stop: asyncio.Event) -> None:
        self._scheduler.start()
        try:
            await self.catch_up()
            while not stop.is_set():
                try:
                    await self.refresh()
                except Exception:
                    log.exception("schedule refresh failed")
                self._changed.clear()
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._changed.wait())]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED),
                        self._settings.reporting_schedule_refresh_seconds,
                    )
                for waiter in waiters:
                    waiter.cancel()
        finally:
            self._scheduler.shutdown(wait=False)
            for task in list(self._tasks):
                task.cancel()

    async def refresh(self) -> None:
        rows = await self._scheduled_rows()
        wanted = {}
        for row in rows:
            fingerprint = f"{row['schedule']}|{row['schedule_since'].isoformat()}"
            wanted[str(row["report_id"])] = (fingerprint, Schedule.from_json(row["schedule"]))
        for job_id in list(self._jobs):
            if job_id not in wanted:
                with contextlib.suppress(Exception):
                    self._scheduler.remove_job(job_id)
                del self._jobs[job_id]
        for job_id, (fingerprint, schedule) in wanted.items():
            if self._jobs.get(job_id) == fingerprint:
                continue
            self._scheduler.add_job(
                self._fire,
                ScheduleTrigger(schedule),
                args=[job_id],
                id=job_id,
                replace_existing=True,
                misfire_grace_time=max(1, self._settings.reporting_schedule_grace_seconds),
                coalesce=True,
                max_instances=3,
            )
            self._jobs[job_id] = fingerprint

    async def catch_up(self, now: datetime | None = None) -> int:
        """Runs, once each, the latest fires missed while no replica ran (within the grace window)."""
        now = now or datetime.now(UTC)
        grace = timedelta(seconds=self._settings.reporting_schedule_grace_seconds)
        ran = 0
        for row in await self._scheduled_rows():
            schedule = Schedule.from_json(row["schedule"])
            fire = schedule.latest_at_or_before(now)
            if fire < row["schedule_since"] or now - fire > grace:
                continue
            done = await self._db.fetch_one(
                "SELECT 1 FROM report_runs WHERE report_id = %s AND scheduled_for = %s", (row["report_id"], fire)
            )
            if done is None and await self._runner.run(row, Claim("catch_up", fire)) is not None:
                ran += 1
        return ran

    async def _fire(self, report_id: str) -> None:
        row = await self._store.report_row(uuid.UUID(report_id))
        if row is None or not row["schedule"]:
            return
        schedule = Schedule.from_json(row["schedule"])
        fire = schedule.latest_at_or_before(datetime.now(UTC) + timedelta(seconds=2))
        if fire < row["schedule_since"]:
            return
        await self._runner.run(row, Claim("schedule", fire))
