"""Re-rating: recompute the cost of stored events with the prices now in force.

A job covers UTC days `start_date`..`end_date` (inclusive), optionally some keys, and runs in the
ingest process that accepted it, a day at a time in slices of at most RECALC_SLICE events in
(event_time, request_id) order, one transaction per slice (memory and the time the event loop
is held stay bounded however large a day is): it locks the slice's events (provider-reported
costs are authoritative and are left alone), prices them with the same integer code as ingest,
updates the changed ones and appends delta rows (zero requests, cost and unpriced differences)
to every rollup, so the rollups stay equal to the raw events throughout. Running
the same job again changes nothing. When it finishes, the budget service is asked to rebuild its
counters from the database. Jobs are resumable: a job whose runner died (stale heartbeat) is
claimed again by any ingest process and restarted from its first day, which is harmless because
re-rating is idempotent. Ingest keeps working meanwhile (it only inserts new events).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
from psycopg.rows import dict_row
from pydantic import SecretStr

from services.ingest.compaction import Compactor
from services.ingest.prices import PriceRepository
from services.ingest.pricing import cost_micros
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.ingest.v1 import ingest_pb2
from tally.runtime.clients import call_metadata
from tally.runtime.db import Database
from tally.runtime.errors import NotFound
from tally.runtime.redis import RedisClient
from tally.runtime.validation import Violations, require_uuid
from tally.usage import live
from tally.usage.schema import (
    FINGERPRINTS,
    HOURLY,
    HOURLY_GLOBAL,
    HOURLY_KEY,
    ROLLUP_SUMS,
    SMALL_INPUT_TOKENS,
    MergedRollup,
)

log = logging.getLogger("tally.ingest.recalc")

MAX_DAYS = 400
MAX_KEYS = 1000
STALE_AFTER = timedelta(seconds=60)
# Events re-rated per transaction (a day is done in slices of at most this many).
RECALC_SLICE = 5_000
_JOB_COLUMNS = """job_id, status, start_date, end_date, virtual_keys, days_total, days_done, events_scanned,
    events_changed, cost_before, cost_after, error, created_at, started_at, finished_at"""
_DELTA_COLUMNS = {"cost_micros": "sum(new_cost - old_cost)",
                  "unpriced_requests": "sum(new_unpriced::int - old_unpriced::int)",
                  "small_input_cost_micros": "coalesce(sum(new_cost - old_cost) FILTER (WHERE small), 0)"}  # fmt: skip
_STATUS_CLASS = "(http_status / 100)::text || 'xx'"
_GROUP_SQL = {"status_class": _STATUS_CLASS, "error_type": "coalesce(error_type, '')"}


@dataclass(frozen=True)
class JobSpec:
    start: date
    end: date
    keys: tuple[uuid.UUID, ...]


def parse_request(request: ingest_pb2.RecalculateCostsRequest) -> JobSpec:
    violations = Violations()
    parsed: dict[str, date] = {}
    for field, text in (("startDate", request.start_date), ("endDate", request.end_date)):
        if not text:
            violations.add(field, "required (YYYY-MM-DD)")
            continue
        try:
            parsed[field] = date.fromisoformat(text)
        except ValueError:
            violations.add(field, f"must be a date YYYY-MM-DD, got {text[:20]!r}")
    if len(parsed) == 2:
        if parsed["endDate"] < parsed["startDate"]:
            violations.add("endDate", "must not be before startDate")
        elif (parsed["endDate"] - parsed["startDate"]).days + 1 > MAX_DAYS:
            violations.add("endDate", f"a job covers at most {MAX_DAYS} days")
    if len(request.virtual_keys) > MAX_KEYS:
        violations.add("virtualKeys", f"at most {MAX_KEYS} keys")
    violations.raise_if_any()
    keys = tuple(sorted({require_uuid(k, f"virtualKeys[{i}]") for i, k in enumerate(request.virtual_keys)}))
    return JobSpec(parsed["startDate"], parsed["endDate"], keys)


def job_message(row: dict[str, Any]) -> ingest_pb2.RecalculationJob:
    job = ingest_pb2.RecalculationJob(
        job_id=str(row["job_id"]),
        status=row["status"],
        progress=row["days_done"] / row["days_total"] if row["days_total"] else 1.0,
        events_scanned=row["events_scanned"],
        events_changed=row["events_changed"],
        cost_before=row["cost_before"] / 1_000_000,
        cost_after=row["cost_after"] / 1_000_000,
        error=row["error"] or "",
        start_date=row["start_date"].isoformat(),
        end_date=row["end_date"].isoformat(),
        virtual_keys=[str(k) for k in row["virtual_keys"]],
    )
    for field in ("created_at", "started_at", "finished_at"):
        if row[field] is not None:
            getattr(job, field).FromDatetime(row[field])
    return job


def _delta_insert(rollup: MergedRollup) -> str:
    """Appends the cost changes to an hourly rollup (its daily rollup follows it)."""
    group_exprs = [_GROUP_SQL.get(g, g) for g in rollup.group]
    sums = [_DELTA_COLUMNS.get(c, "0") for c in ROLLUP_SUMS]
    columns = ", ".join(("bucket", *rollup.group, *ROLLUP_SUMS))
    by = ", ".join(str(i + 1) for i in range(len(rollup.group) + 1))
    return f"""INSERT INTO {rollup.delta} ({columns})
        SELECT time_bucket('1 hour', event_time), {", ".join(group_exprs)}, {", ".join(sums)}
        FROM recalc_changes GROUP BY {by}"""  # noqa: S608 (constants)


_DELTA_SQL = [
    _delta_insert(HOURLY),
    _delta_insert(HOURLY_GLOBAL),
    _delta_insert(HOURLY_KEY),
    f"""INSERT INTO {FINGERPRINTS.delta} (bucket, prompt_fingerprint, provider, model, requests, input_tokens,
                                             cost_micros)
       SELECT time_bucket('1 day', event_time), prompt_fingerprint, provider, model, 0, 0, sum(new_cost - old_cost)
       FROM recalc_changes WHERE prompt_fingerprint IS NOT NULL GROUP BY 1, 2, 3, 4""",  # noqa: S608 (constants)
]
_CHANGES_TABLE = """CREATE TEMP TABLE recalc_changes (
    event_time timestamptz, request_id text, key_id uuid, provider text, model text, operation text,
    http_status smallint, error_type text, prompt_fingerprint text, small boolean,
    old_cost bigint, new_cost bigint, old_unpriced boolean, new_unpriced boolean, new_source text, price_id bigint
) ON COMMIT DROP"""
_CHANGE_COLUMNS = ("event_time", "request_id", "key_id", "provider", "model", "operation", "http_status",
                   "error_type", "prompt_fingerprint", "small", "old_cost", "new_cost", "old_unpriced",
                   "new_unpriced", "new_source", "price_id")  # fmt: skip


class Recalculator:
    def __init__(
        self, db: Database, prices: PriceRepository, compactor: Compactor, budget: grpc.aio.Channel,
        master_key: SecretStr, redis: RedisClient | None = None,
    ) -> None:  # fmt: skip
        self._db = db
        self._redis = redis
        self._prices = prices
        self._compactor = compactor
        self._budget = budget_pb2_grpc.BudgetServiceStub(budget)
        self._master_key = master_key
        self._wake = asyncio.Event()

    async def submit(self, spec: JobSpec) -> ingest_pb2.RecalculationJob:
        days = (spec.end - spec.start).days + 1
        async with self._db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"""INSERT INTO recalculation_jobs (job_id, status, start_date, end_date, virtual_keys, days_total)
                    VALUES (%s, 'queued', %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING {_JOB_COLUMNS}""",  # noqa: S608
                (uuid.uuid4(), spec.start, spec.end, list(spec.keys), days),
            )
            row = await cur.fetchone()
            if row is None:  # the same job is already queued or running: join it
                await cur.execute(
                    f"""SELECT {_JOB_COLUMNS} FROM recalculation_jobs
                        WHERE start_date = %s AND end_date = %s AND virtual_keys = %s
                          AND status IN ('queued', 'running')""",  # noqa: S608
                    (spec.start, spec.end, list(spec.keys)),
                )
                row = await cur.fetchone()
        assert row is not None
        self._wake.set()
        return job_message(row)

    async def get(self, job_id: uuid.UUID) -> ingest_pb2.RecalculationJob:
        query = f"SELECT {_JOB_COLUMNS} FROM recalculation_jobs WHERE job_id = %s"  # noqa: S608 (constants)
        row = await self._db.fetch_one(query, (job_id,))
        if row is None:
            raise NotFound(f"recalculation job {job_id} does not exist", metadata={"jobId": str(job_id)})
        return job_message(row)

    async def run_forever(self, poll_seconds: float = 2.0) -> None:
        while True:
            try:
                job = await self._claim()
                if job is not None:
                    await self._run(job)
                    continue
            except Exception:
                log.exception("recalculation runner failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll_seconds)

    async def _claim(self) -> dict[str, Any] | None:
        """Takes a queued job, or a running one whose runner stopped sending heartbeats."""
        return await self._db.fetch_one(
            f"""UPDATE recalculation_jobs SET status = 'running', started_at = coalesce(started_at, now()),
                       heartbeat_at = now(), days_done = 0, events_scanned = 0, events_changed = 0,
                       cost_before = 0, cost_after = 0
                WHERE job_id = (
                    SELECT job_id FROM recalculation_jobs
                    WHERE status = 'queued' OR (status = 'running' AND heartbeat_at < now() - %s)
                    ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
                RETURNING {_JOB_COLUMNS}""",  # noqa: S608
            (STALE_AFTER,),
        )

    async def _run(self, job: dict[str, Any]) -> None:
        log.info("recalculation started", extra={"jobId": str(job["job_id"])})
        try:
            await self._prices.reload()
            day: date = job["start_date"]
            while day <= job["end_date"]:
                await self._run_day(job["job_id"], day, list(job["virtual_keys"]))
                day += timedelta(days=1)
        except Exception as exc:
            log.exception("recalculation failed", extra={"jobId": str(job["job_id"])})
            await self._db.fetch_one(
                "UPDATE recalculation_jobs SET status = 'failed', error = %s, finished_at = now() "
                "WHERE job_id = %s RETURNING job_id",
                (f"{type(exc).__name__}: {exc}"[:500], job["job_id"]),
            )
            return
        note = None
        try:
            await self._budget.ReconcileBudgets(
                budget_pb2.ReconcileBudgetsRequest(), timeout=60, metadata=call_metadata(self._master_key)
            )
        except grpc.aio.AioRpcError as exc:
            note = f"costs re-rated; budget counters not rebuilt yet (budget service: {exc.code().name})"
        await self._db.fetch_one(
            "UPDATE recalculation_jobs SET status = 'succeeded', error = %s, finished_at = now() "
            "WHERE job_id = %s RETURNING job_id",
            (note, job["job_id"]),
        )
        log.info("recalculation finished", extra={"jobId": str(job["job_id"])})

    async def _run_day(self, job_id: uuid.UUID, day: date, keys: list[uuid.UUID]) -> None:
        """Re-rates one UTC day in slices of at most RECALC_SLICE events, each in a transaction of
        its own, in (event_time, request_id) order: memory stays bounded and the event loop free,
        however many events the day holds."""
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        after: tuple[datetime, str] | None = None
        while True:
            after = await self._run_slice(job_id, start, start + timedelta(days=1), keys, after)
            if after is None:
                break
        await self._db.fetch_one(
            "UPDATE recalculation_jobs SET days_done = days_done + 1, heartbeat_at = now() WHERE job_id = %s "
            "RETURNING job_id",
            (job_id,),
        )

    async def _run_slice(
        self,
        job_id: uuid.UUID,
        start: datetime,
        end: datetime,
        keys: list[uuid.UUID],
        after: tuple[datetime, str] | None,
    ) -> tuple[datetime, str] | None:
        """Re-rates the next slice of `[start, end)` after `after`; returns the last event of the
        slice, or None when the day is done."""
        book = self._prices.book
        following = "AND (event_time, request_id) > (%s, %s)" if after is not None else ""
        async with self._db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"""SELECT event_time, request_id, key_id, provider, model, operation, http_status, error_type,
                          prompt_fingerprint, input_tokens, output_tokens, cached_read_tokens, cache_write_tokens,
                          reasoning_tokens, images, audio_seconds, tools_used, cost_micros, cost_source
                   FROM usage_events
                   WHERE event_time >= %s AND event_time < %s AND cost_source <> 'provider'
                     AND (cardinality(%s::uuid[]) = 0 OR key_id = ANY(%s::uuid[])) {following}
                   ORDER BY event_time, request_id LIMIT {RECALC_SLICE} FOR UPDATE""",  # noqa: S608 (constants)
                (start, end, keys, keys, *(after or ())),
            )
            rows = await cur.fetchall()
            changes = []
            before = after_cost = 0
            for row in rows:
                price = book.lookup(row["provider"], row["model"], row["event_time"])
                new_cost = None
                if price is not None:
                    new_cost = cost_micros(
                        price,
                        input_tokens=row["input_tokens"],
                        output_tokens=row["output_tokens"],
                        cached_read_tokens=row["cached_read_tokens"],
                        cache_write_tokens=row["cache_write_tokens"],
                        reasoning_tokens=row["reasoning_tokens"],
                        images=row["images"],
                        audio_ms=int(Decimal(row["audio_seconds"]) * 1000),
                    )
                old_cost = row["cost_micros"]
                before += old_cost or 0
                after_cost += new_cost or 0
                if new_cost == old_cost:
                    continue
                changes.append((
                    row["event_time"], row["request_id"], row["key_id"], row["provider"], row["model"],
                    row["operation"], row["http_status"], row["error_type"], row["prompt_fingerprint"],
                    row["input_tokens"] < SMALL_INPUT_TOKENS and not row["tools_used"], old_cost or 0,
                    new_cost or 0, old_cost is None, new_cost is None,
                    "unpriced" if new_cost is None else "computed", None if price is None else price.price_id,
                ))  # fmt: skip
            if changes:
                await cur.execute(_CHANGES_TABLE)
                async with cur.copy(f"COPY recalc_changes ({', '.join(_CHANGE_COLUMNS)}) FROM STDIN") as copy:
                    for change in changes:
                        await copy.write_row(change)
                await cur.execute(
                    """UPDATE usage_events e SET cost_micros = CASE WHEN c.new_unpriced THEN NULL ELSE c.new_cost END,
                              cost_source = c.new_source, price_id = c.price_id
                       FROM recalc_changes c WHERE e.request_id = c.request_id AND e.event_time = c.event_time"""
                )
                for statement in _DELTA_SQL:
                    await cur.execute(statement)
            await cur.execute(
                """UPDATE recalculation_jobs SET events_scanned = events_scanned + %s,
                          events_changed = events_changed + %s, cost_before = cost_before + %s,
                          cost_after = cost_after + %s, heartbeat_at = now()
                   WHERE job_id = %s""",
                (len(rows), len(changes), before, after_cost, job_id),
            )
        if changes:
            self._compactor.mark(int(c[0].timestamp()) for c in changes)
            if self._redis is not None:
                await live.changed_before(self._redis, max(c[0] for c in changes) + timedelta(minutes=1))
        if len(rows) < RECALC_SLICE:
            return None
        return rows[-1]["event_time"], rows[-1]["request_id"]
