"""Merges the append-only rollups: each dirty bucket is rewritten as one row per group.

Ingest appends one rollup row per group per batch (no row is ever updated on the write path).
The compactor rewrites a bucket in a single statement, `DELETE ... RETURNING` feeding an
aggregated `INSERT`, so the sums are unchanged at every instant: rows appended concurrently are
not in the statement's snapshot and stay as they are, and two compactors racing on one bucket
each re-aggregate only the rows they deleted. Buckets are remembered as ingest dirties them;
at start, recent buckets with more than one row per group are swept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter

from tally.runtime.db import Database
from tally.usage.schema import DAILY, HOURLY, TABLES, RollupTable

log = logging.getLogger("tally.ingest.compaction")
COMPACTED = Counter("tally_ingest_rollup_buckets_compacted_total", "Rollup buckets compacted.", ["table"])


class Compactor:
    def __init__(self, db: Database, interval_seconds: float, late_window: timedelta) -> None:
        self._db = db
        self._interval = interval_seconds
        self._late_window = late_window
        self._dirty: dict[RollupTable, set[datetime]] = {table: set() for table in TABLES}

    def mark(self, epoch_seconds: Iterable[int]) -> None:
        """Remembers the buckets a committed batch appended to (event times as Unix seconds)."""
        hours = {datetime.fromtimestamp(h * 3600, UTC) for h in {s // 3600 for s in epoch_seconds}}
        days = {DAILY.bucket_of(h) for h in hours}
        for table in TABLES:
            self._dirty[table] |= hours if table.width == HOURLY.width else days

    async def sweep(self, now: datetime) -> None:
        """Finds recent buckets left with several rows per group (e.g. by a crash) and compacts them."""
        since = now - self._late_window - timedelta(days=1)
        for table in TABLES:
            rows = await self._db.fetch_all(table.duplicated_buckets_sql(), {"since": since})
            self._dirty[table] |= {row["bucket"] for row in rows}
        await self.compact()

    async def compact(self) -> int:
        done = 0
        for table in TABLES:
            buckets, self._dirty[table] = self._dirty[table], set()
            for bucket in sorted(buckets):
                try:
                    async with self._db.transaction() as conn:
                        for statement, params in table.compact_statements(bucket):
                            await conn.execute(statement, params)
                except Exception:
                    self._dirty[table].add(bucket)  # try again next round
                    raise
                COMPACTED.labels(table.name).inc()
                done += 1
        return done

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.compact()
            except Exception:
                log.exception("rollup compaction failed; will retry")
