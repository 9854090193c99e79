"""Writes usage batches to TimescaleDB: raw events and their rollups in one transaction.

Per batch: binary COPY into a session temp table, then one statement that inserts into the
hypertable with `ON CONFLICT DO NOTHING` (idempotency on (request_id, event_time)) and, from
exactly the rows really inserted, appends one rollup row per group to the hourly and daily
rollups (full dimensions, global without the key, and per key only) and the fingerprint rollup,
and registers unknown keys. So a replayed event changes nothing anywhere.
Rollups are append-only (no row is updated, so concurrent batches never wait on each other);
the compactor (compaction.py) later merges each bucket to one row per group. Events are inserted
in sorted order so concurrent batches take unique-index locks in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from services.ingest.events import ValidEvent
from tally.runtime.db import Database
from tally.usage.schema import (
    COLUMNS,
    COPY_TYPES,
    HISTOGRAM_BOUNDS_SQL,
    ROLLUP_GROUP,
    ROLLUP_SUMS,
    derived_rollup_ctes,
    rollup_aggregates,
)

log = logging.getLogger("tally.ingest.store")

_RETRIES = 3

_BOUNDS = HISTOGRAM_BOUNDS_SQL
_SUM_COLUMNS = ROLLUP_SUMS

_ROLLUP_COLUMNS = ", ".join(("bucket", *ROLLUP_GROUP, *_SUM_COLUMNS))
# The daily, global and per-key rows of a batch are sums of its hourly rows (cheaper than
# re-aggregating events): see tally.usage.schema.derived_rollup_ctes.

SETUP_SQL = """
CREATE TEMP TABLE IF NOT EXISTS ingest_staging (LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
"""


def _rollup_insert(name: str, table: str, width: str, late_threshold_seconds: int) -> str:
    """A CTE appending one row per group of the inserted events (`ins`, with histogram buckets)."""
    aggregates = rollup_aggregates(late_threshold_seconds)
    columns = ", ".join(("bucket", *ROLLUP_GROUP, *_SUM_COLUMNS))
    # Built from constants only (no input reaches this text).
    return f"""{name} AS (
        INSERT INTO {table} ({columns})
        SELECT time_bucket('{width}', event_time), key_id, provider, model, operation,
               (http_status / 100)::text || 'xx', coalesce(error_type, ''), {", ".join(aggregates)}
        FROM ins GROUP BY 1, 2, 3, 4, 5, 6, 7
        RETURNING *)"""  # noqa: S608


def _batch_sql(late_threshold_seconds: int) -> str:
    """One statement: insert new events, append their rollups, register keys, return what was new."""
    return f"""
    WITH new AS (
        INSERT INTO usage_events SELECT * FROM ingest_staging ORDER BY request_id, event_time
        ON CONFLICT DO NOTHING RETURNING *),
    ins AS MATERIALIZED (
        SELECT *, width_bucket(latency_ms - 1, {_BOUNDS}) AS lb, width_bucket(ttft_ms - 1, {_BOUNDS}) AS tb
        FROM new),
    {_rollup_insert("hourly", "usage_rollup_hourly", "1 hour", late_threshold_seconds)},
    {derived_rollup_ctes()},
    fingerprints AS (
        INSERT INTO prompt_fingerprint_daily (bucket, prompt_fingerprint, provider, model, requests,
                                              input_tokens, cost_micros)
        SELECT time_bucket('1 day', event_time), prompt_fingerprint, provider, model,
               count(*), sum(input_tokens), coalesce(sum(cost_micros), 0)
        FROM ins WHERE prompt_fingerprint IS NOT NULL GROUP BY 1, 2, 3, 4),
    keys AS (
        INSERT INTO virtual_keys (key_id, key_name)
        SELECT k.key_id, k.key_id::text FROM (SELECT DISTINCT key_id FROM ins) k ORDER BY k.key_id
        ON CONFLICT (key_id) DO NOTHING)
    SELECT request_id, event_time FROM ins
    """  # noqa: S608


_COLUMN_LIST = ", ".join(COLUMNS)


async def prepare_connection(conn: AsyncConnection[Any]) -> None:
    """Creates the session temp tables once per pooled connection."""
    await conn.execute(SETUP_SQL)
    await conn.commit()


class UsageStore:
    def __init__(self, db: Database, late_threshold_seconds: int) -> None:
        self._db = db
        self._batch_sql = _batch_sql(late_threshold_seconds)
        self._copy_sql = sql.SQL("COPY ingest_staging ({}) FROM STDIN (FORMAT BINARY)").format(sql.SQL(_COLUMN_LIST))

    async def write(self, events: Sequence[ValidEvent]) -> set[tuple[str, datetime]]:
        """Stores the events; returns the identities inserted now (the others were duplicates)."""
        if not events:
            return set()
        for attempt in range(1, _RETRIES + 1):
            try:
                return await self._write_once(events)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == _RETRIES:
                    raise
                log.warning("batch write retried after a lock conflict", extra={"attempt": attempt})
        raise AssertionError("unreachable")

    async def _write_once(self, events: Sequence[ValidEvent]) -> set[tuple[str, datetime]]:
        async with self._db.transaction() as conn, conn.cursor() as cur:
            async with cur.copy(self._copy_sql) as copy:
                copy.set_types(list(COPY_TYPES))
                for event in events:
                    await copy.write_row(event.row)
            await cur.execute(self._batch_sql)
            return {(row[0], row[1]) for row in await cur.fetchall()}
