"""Merges the rollups: delta rows into the merged tables, and provider minutes by the hour.

Writers append rollup rows to each rollup's delta table; every pass moves all committed delta
rows into the merged table (`MergedRollup.merge_statements`: one transaction on one snapshot, so
the sums readers see never change) and vacuums the delta table, which therefore stays small: a
pass costs what was appended since the last one, whatever the size of the buckets. Delta rows a
crash left behind are merged by the first pass.

Provider minutes stay append-only in one table: ingest marks the hours it appended to, and the
compactor rewrites those hours, up to a week of them per statement (DELETE ... RETURNING feeding
an aggregated INSERT), together with their uptime summaries; at start, recent hours with more
than one row per minute are swept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from tally.runtime.db import Database
from tally.usage.compaction import compact_provider_minutes, merge_rollups
from tally.usage.schema import PROVIDER_MINUTES

log = logging.getLogger("tally.ingest.compaction")


class Compactor:
    def __init__(self, db: Database, interval_seconds: float, late_window: timedelta) -> None:
        self._db = db
        self._interval = interval_seconds
        self._late_window = late_window
        self._dirty_hours: set[datetime] = set()

    def mark(self, epoch_seconds: Iterable[int]) -> None:
        """Remembers the hours a committed batch appended provider minutes to (event times as
        Unix seconds)."""
        self._dirty_hours |= {datetime.fromtimestamp(h * 3600, UTC) for h in {s // 3600 for s in epoch_seconds}}

    async def sweep(self, now: datetime) -> None:
        """Finds recent hours left with several provider-minute rows per minute (e.g. by a crash)
        and compacts them, with the rollups' delta rows."""
        since = now - self._late_window - timedelta(days=1)
        rows = await self._db.fetch_all(PROVIDER_MINUTES.duplicated_buckets_sql(), {"since": since})
        self._dirty_hours |= {row["bucket"] for row in rows}
        await self.compact()

    async def compact(self) -> int:
        done = await merge_rollups(self._db)
        hours, self._dirty_hours = self._dirty_hours, set()
        try:
            done += await compact_provider_minutes(self._db, hours)
        except Exception:
            self._dirty_hours |= hours  # try again next round (an hour compacted twice is unchanged)
            raise
        return done

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.compact()
            except Exception:
                log.exception("rollup compaction failed; will retry")
