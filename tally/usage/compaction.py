"""The rollups' compaction steps, shared by ingest's compactor and data-subject deletes."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from prometheus_client import Counter
from psycopg import sql

from tally.runtime.db import Database
from tally.usage.schema import MERGED_ROLLUPS, PROVIDER_MINUTES, PROVIDER_MINUTES_HOURS_PER_COMPACTION

COMPACTED = Counter("tally_rollup_buckets_compacted_total", "Provider-minute hours compacted.", ["table"])
MERGED = Counter("tally_rollup_groups_merged_total", "Rollup groups written by merges of delta rows.", ["table"])


async def merge_rollups(db: Database) -> int:
    """Moves every rollup's committed delta rows into its merged table and vacuums the delta
    tables; returns the number of groups written."""
    written = 0
    for table in MERGED_ROLLUPS:
        async with db.pool.connection() as conn, conn.transaction():
            *steps, upsert, delete = table.merge_statements()
            for statement in steps:
                await conn.execute(statement)
            cursor = await conn.execute(upsert)
            await conn.execute(delete)
            groups = max(cursor.rowcount, 0)
            written += groups
            MERGED.labels(table.name).inc(groups)
    # The deleted delta rows are dead tuples until vacuumed: without this, every read of a
    # rollup would scan a delta table grown with them between autovacuum runs.
    async with db.pool.connection() as conn:
        await conn.set_autocommit(True)
        try:
            for table in MERGED_ROLLUPS:
                await conn.execute(sql.SQL("VACUUM {}").format(sql.Identifier(table.delta)))
        finally:
            await conn.set_autocommit(False)
    return written


async def compact_provider_minutes(db: Database, hours: Iterable[datetime]) -> int:
    """Merges the provider minutes of `hours` (starts of hours) and rewrites their uptime
    summaries: up to PROVIDER_MINUTES_HOURS_PER_COMPACTION hours per transaction, in order.
    Returns the hours compacted. On a failure the transactions committed before it stay: the
    caller may retry every hour, as an hour compacted twice is unchanged."""
    ordered = sorted(set(hours))
    step = PROVIDER_MINUTES_HOURS_PER_COMPACTION
    for first in range(0, len(ordered), step):
        part = ordered[first : first + step]
        async with db.transaction() as conn:
            for statement, params in PROVIDER_MINUTES.compact_statements(part):
                await conn.execute(statement, params)
        COMPACTED.labels(PROVIDER_MINUTES.name).inc(len(part))
    return len(ordered)
