"""Ingestion status: what arrived, how fast, what was refused, and what is not yet reconciled.

Accepted, unpriced and late counts come from the rollups (facts about stored data, exact and
durable); duplicate and rejected counts, rates and the last ingest time from the Redis counters
(facts about requests, which the database does not keep).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from services.ingest.aftercommit import AfterCommit
from tally.ingest.v1 import ingest_pb2
from tally.runtime.db import Database
from tally.runtime.redis import RedisClient
from tally.usage import live

log = logging.getLogger("tally.ingest.status")


async def ingestion_status(
    db: Database, redis: RedisClient, after: AfterCommit, now: float
) -> ingest_pb2.IngestionStatus:
    status = ingest_pb2.IngestionStatus(status="healthy")
    row = await db.fetch_one("SELECT max(event_time) AS t FROM usage_events")
    if row and row["t"] is not None:
        status.last_event_time.FromDatetime(row["t"])
    totals = await db.fetch_one(
        """SELECT coalesce(sum(requests), 0) AS accepted, coalesce(sum(unpriced_requests), 0) AS unpriced,
                  coalesce(sum(late_requests), 0) AS late, min(bucket) AS since
           FROM usage_rollup_daily"""
    )
    assert totals is not None
    counts = status.counts
    counts.accepted, counts.unpriced, counts.late = totals["accepted"], totals["unpriced"], totals["late"]
    if totals["since"] is not None:
        status.counts_since.FromDatetime(totals["since"])
    try:
        stats = await redis.hgetall(live.INGEST_STATS_KEY)
        minute = int(now) // 60
        rates = await redis.mget([live.rate_key(m) for m in range(minute - 59, minute + 1)])
    except Exception as exc:
        log.warning("ingestion status without redis", extra={"error": repr(exc)})
        status.status = "degraded"
    else:
        counts.duplicate = int(stats.get(b"duplicate", 0))
        counts.rejected = int(stats.get(b"rejected", 0))
        if b"last_ingest" in stats:
            status.last_ingest_time.FromDatetime(datetime.fromtimestamp(int(stats[b"last_ingest"]) / 1000, UTC))
        per_minute = [int(v) if v else 0 for v in rates]
        status.events_per_minute_5m = sum(per_minute[-5:]) / 5
        status.events_per_minute_60m = sum(per_minute) / 60
    if not after.redis_ok:
        status.status = "degraded"
    if (pending := after.oldest_unreconciled) is not None:
        status.status = "degraded"
        item = status.oldest_unreconciled
        item.request_id, item.reason = pending.request_id, pending.reason
        item.event_time.FromDatetime(pending.event_time)
    return status
