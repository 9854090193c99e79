"""Data-subject requests (issue 7): export and delete everything held about one end user.

End users are only stored as `end_user_hash` = HMAC-SHA256(END_USER_HASH_KEY, original id) (see
services/ingest/events.py); a request names the original id, which is hashed here and never
stored or logged. What is held about an end user: their raw usage events, in the hypertable and
in retention archives (retention.py), and their share of the rollups (which have no end-user
dimension).

Delete, in one transaction: `DELETE ... RETURNING` the user's raw events and append, from exactly
the rows deleted, negative delta rows to every rollup (the same aggregates ingest appends,
negated, for every sum column), so each rollup total equals the recomputation from the remaining
raw events at every instant. Events already archived by retention are removed from their archive
files and their share of the rollups is removed the same way. The touched buckets are then
compacted (so no per-user delta row lingers) and the budget service is asked to rebuild its
counters from the database. A second delete finds nothing and changes nothing.

Audit: both RPCs are admin calls, so the shared interceptor records them in the audit log
(tally/runtime/audit.py redacts `endUserId`); `_audit()` adds a log line with the subject's hash
and what was found, never the original id.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.api import httpbody_pb2
from psycopg.rows import dict_row

from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.reporting.v1 import reporting_pb2
from tally.runtime.clients import call_metadata, service_channel
from tally.runtime.config import ServiceName
from tally.runtime.errors import FailedPrecondition
from tally.runtime.server import Resources
from tally.runtime.validation import Violations
from tally.usage import live as live_counters
from tally.usage.compaction import compact_provider_minutes, merge_rollups
from tally.usage.identity import hash_end_user
from tally.usage.schema import (
    COLUMNS,
    FINGERPRINTS,
    HISTOGRAM_BOUNDS_SQL,
    HOURLY,
    ROLLUP_GROUP,
    ROLLUP_SUMS,
    derived_rollup_ctes,
    provider_minutes_cte,
    rollup_aggregates,
)

log = logging.getLogger("tally.reporting.datasubjects")

_BOUNDS = HISTOGRAM_BOUNDS_SQL
# Most provider-minute hours compacted after one deletion (beyond that the ingest compactor's
# sweep or a later pass merges them; the sums are exact either way).
_MAX_COMPACTIONS = 5000
EVENT_COLUMNS: tuple[str, ...] = (*COLUMNS, "ingested_at")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def negated_aggregates(late_threshold_seconds: int) -> list[str]:
    """Minus what ingest appends for the same rows (store.py `_rollup_insert`), per ROLLUP_SUMS column.

    Reads `ins`: the rows being removed, with histogram buckets `lb` and `tb`."""
    aggregates = rollup_aggregates(late_threshold_seconds)
    return [f"-({a})" for a in aggregates]


def removal_sql(source: str, late_threshold_seconds: int) -> str:
    """One statement: take the rows of `source` (a query over usage_events rows, e.g. a DELETE ...
    RETURNING *) and append negative delta rows to every rollup. Returns one row: events, cost,
    hours (the hourly buckets touched). Built from constants only."""
    full = ", ".join(("bucket", *ROLLUP_GROUP, *ROLLUP_SUMS))
    return f"""
    WITH gone AS ({source}),
    ins AS MATERIALIZED (
        SELECT *, width_bucket(latency_ms - 1, {_BOUNDS}) AS lb, width_bucket(ttft_ms - 1, {_BOUNDS}) AS tb
        FROM gone),
    hourly AS (
        INSERT INTO {HOURLY.delta} ({full})
        SELECT time_bucket('1 hour', event_time), key_id, provider, model, operation,
               (http_status / 100)::text || 'xx', coalesce(error_type, ''),
               {", ".join(negated_aggregates(late_threshold_seconds))}
        FROM ins GROUP BY 1, 2, 3, 4, 5, 6, 7
        RETURNING *),
    {derived_rollup_ctes()},
    fingerprints AS (
        INSERT INTO {FINGERPRINTS.delta} (bucket, prompt_fingerprint, provider, model, requests,
                                              input_tokens, cost_micros)
        SELECT time_bucket('1 day', event_time), prompt_fingerprint, provider, model,
               -count(*), -sum(input_tokens), -coalesce(sum(cost_micros), 0)
        FROM ins WHERE prompt_fingerprint IS NOT NULL GROUP BY 1, 2, 3, 4),
    {provider_minutes_cte("minutes", "ins", sign="-")}
    SELECT count(*) AS events, coalesce(sum(cost_micros), 0)::bigint AS cost,
           coalesce(array_agg(DISTINCT time_bucket('1 hour', event_time)), '{{}}') AS hours
    FROM ins
    """  # noqa: S608


_JSON_OBJECT = "json_build_object(" + ", ".join(f"'{_camel(c)}', {c}" for c in EVENT_COLUMNS) + ")::text"


@dataclass(frozen=True)
class Deletion:
    events: int
    cost_micros: int
    archived_events: int


def _audit(operation: str, subject_hash: str, outcome: str, **details: Any) -> None:
    """Audit hook: replace with the audit log writer when it exists (never pass the original id)."""
    log.info(
        "data-subject request",
        extra={"audit": True, "operation": operation, "subjectHash": subject_hash, "outcome": outcome, **details},
    )


class DataSubjects:
    def __init__(self, resources: Resources) -> None:
        self._db = resources.db
        self._redis = resources.redis
        self._settings = resources.settings
        self._channel: grpc.aio.Channel | None = None
        resources.closers.append(self.close)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)

    def subject_hash(self, end_user_id: str) -> str:
        violations = Violations()
        if not end_user_id:
            violations.add("endUserId", "required: the end user's id as sent in usage events")
        violations.raise_if_any()
        key = self._settings.end_user_hash_key
        if key is None:
            raise FailedPrecondition("END_USER_HASH_KEY is not configured: end users cannot be looked up")
        return hash_end_user(key.get_secret_value().encode(), end_user_id)

    # ------------------------------------------------------------------------------------ export
    async def export(self, end_user_id: str) -> AsyncIterator[bytes]:
        """One JSON document, streamed: the subject's hash and every event held (live and archived)."""
        subject = self.subject_hash(end_user_id)
        chunk_bytes = self._settings.reporting_export_chunk_bytes
        head = {"endUserHash": subject, "exportedAt": datetime.now(UTC).isoformat()}
        buffer = [json.dumps(head)[:-1], ', "events": [']
        size = count = 0
        async with self._db.transaction() as conn:
            await conn.execute("SELECT set_config('statement_timeout', '0', true)")
            async with conn.cursor(name="data_subject_export") as cur:
                await cur.execute(
                    f"SELECT {_JSON_OBJECT} FROM usage_events WHERE end_user_hash = %s ORDER BY event_time, request_id",  # noqa: S608
                    (subject,),
                )
                async for (text,) in cur:
                    buffer.append(("," if count else "") + text)
                    count += 1
                    size += len(text)
                    if size >= chunk_bytes:
                        yield "".join(buffer).encode()
                        buffer, size = [], 0
        from services.reporting import retention  # avoids an import cycle at module load

        archived = 0
        buffer.append('], "archivedEvents": [')
        rows = await asyncio.to_thread(lambda: list(retention.archived_rows(self._settings, subject)))
        for row in rows:
            text = json.dumps({_camel(k): v for k, v in row.items()})
            buffer.append(("," if archived else "") + text)
            archived += 1
            size += len(text)
            if size >= chunk_bytes:
                yield "".join(buffer).encode()
                buffer, size = [], 0
        buffer.append(f'], "eventCount": {count}, "archivedEventCount": {archived}}}')
        yield "".join(buffer).encode()
        _audit("ExportDataSubject", subject, "ok", events=count, archivedEvents=archived)

    # ------------------------------------------------------------------------------------ delete
    async def delete(self, end_user_id: str) -> Deletion:
        subject = self.subject_hash(end_user_id)
        late = self._settings.ingest_late_threshold_seconds
        async with self._db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await conn.execute("SELECT set_config('statement_timeout', '0', true)")
            await cur.execute(
                removal_sql("DELETE FROM usage_events WHERE end_user_hash = %s RETURNING *", late), (subject,)
            )
            live = await cur.fetchone()
        assert live is not None
        hours: set[datetime] = set(live["hours"])
        from services.reporting import retention

        archived = await retention.remove_subject_from_archives(self._db, self._settings, subject)
        hours |= archived.hours
        events = live["events"] + archived.events
        cost = live["cost"] + archived.cost_micros
        if hours:
            await self._compact(hours)
            await live_counters.changed_before(self._redis, max(hours) + timedelta(hours=1))
        note = ""
        if cost:
            note = await self._reconcile_budgets()
        _audit("DeleteDataSubject", subject, "ok", events=events, costMicros=cost, budgets=note or "rebuilt")
        return Deletion(events=live["events"], cost_micros=cost, archived_events=archived.events)

    async def _compact(self, hours: Iterable[datetime]) -> None:
        """Merges the rollups' delta rows and the touched provider-minute hours, so the negative
        rows do not stay visible as one user's usage."""
        await merge_rollups(self._db)
        await compact_provider_minutes(self._db, sorted(set(hours))[:_MAX_COMPACTIONS])

    async def _reconcile_budgets(self) -> str:
        if self._channel is None:
            self._channel = service_channel(self._settings.address_of(ServiceName.BUDGET))
        stub = budget_pb2_grpc.BudgetServiceStub(self._channel)
        try:
            await stub.ReconcileBudgets(
                budget_pb2.ReconcileBudgetsRequest(),
                timeout=60,
                metadata=call_metadata(self._settings.admin_master_key),
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("budget counters not rebuilt after a data-subject deletion", extra={"code": exc.code().name})
            return f"not rebuilt ({exc.code().name})"
        return ""


_instances: dict[int, DataSubjects] = {}


def for_resources(resources: Resources) -> DataSubjects:
    """One DataSubjects per service process (created on first use)."""
    found = _instances.get(id(resources))
    if found is None:
        found = _instances[id(resources)] = DataSubjects(resources)
    return found


async def export_bodies(
    resources: Resources, request: reporting_pb2.ExportDataSubjectRequest
) -> AsyncIterator[httpbody_pb2.HttpBody]:
    first = True
    async for chunk in for_resources(resources).export(request.end_user_id):
        yield httpbody_pb2.HttpBody(content_type="application/json" if first else "", data=chunk)
        first = False


async def delete_response(
    resources: Resources, request: reporting_pb2.DeleteDataSubjectRequest
) -> reporting_pb2.DeleteDataSubjectResponse:
    done = await for_resources(resources).delete(request.end_user_id)
    data = reporting_pb2.DataSubjectDeletion(
        events_deleted=done.events + done.archived_events, cost_removed=done.cost_micros / 1_000_000
    )
    data.completed_at.FromDatetime(datetime.now(UTC))
    return reporting_pb2.DeleteDataSubjectResponse(success=True, data=data)
