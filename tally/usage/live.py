"""Layout of the live counters in Redis (written by ingest, read by analytics).

Per event-time bucket, one hash: `tally:live:min:<epoch minute>`, `tally:live:hour:<epoch hour>`,
`tally:live:day:<YYYY-MM-DD in the configured timezone>`. Fields: `requests`, `tokens`, `cost`
(micro-units), and per dimension `k|<key id>|requests`, `k|<key id>|cost`,
`m|<provider>|<model>|requests`, `m|<provider>|<model>|cost`, `p|<provider>|requests`,
`p|<provider>|cost`. Only committed (accepted) events are counted. The counters are hot state:
everything in them can be recomputed from the rollups.

They are complete only from an instant on, kept in `SINCE_KEY` (epoch ms): a bucket starting
at or after it holds every committed event of its time; an earlier bucket may lack some (Redis
lost its data, an ingest process could not flush, or one died with unflushed counts), and its
readers compute it from the database instead. Ingest raises the instant, never lowers it, in
the first command of every flush (`ingest.aftercommit`):
- when the key is absent (Redis is new or lost its data), or another Redis process answers
  than at the last flush (`RUN_KEY`: a restart that reloaded an append-only file, which may lack
  the last second of writes, or a failover): to now + the future skew, past the event time of
  anything committed before (an event may be that far in the future);
- to past the last minute of counts it could not flush (Redis unreachable, queue full);
- when a replica's heartbeat in `REPLICAS_KEY` (instance -> last flush, epoch ms) is older than
  REPLICA_STALE_MS (it died, maybe with counts not flushed): to now + the future skew. A replica
  that stops cleanly flushes and removes itself.
Re-rating and data-subject deletes change stored events outside ingest: they raise the instant
and the floor past the changed events (`changed_before`).
After such a loss of counts of unknown events, the flush that raised the instant then lowers it
to the end of the minute of the latest event time in the database (every event stored before
the loss is at most that late; on an empty database, the epoch), unless something raised it
meanwhile, and never below the highest instant asked for by counts not flushed (`FLOOR_KEY`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

MINUTE_TTL_SECONDS = 2 * 3600
HOUR_TTL_SECONDS = 2 * 86400
DAY_TTL_SECONDS = 3 * 86400

# One hash tag: the flush script reads and writes both keys (also on a Redis Cluster).
SINCE_KEY = "{tally:live}:since"
REPLICAS_KEY = "{tally:live}:replicas"
RUN_KEY = "{tally:live}:run"  # the run id of the Redis process the last flush wrote to
FLOOR_KEY = "{tally:live}:floor"  # the highest instant asked for by counts not flushed
REPLICA_STALE_MS = 15_000

INGEST_STATS_KEY = "tally:ingest:stats"
RATE_TTL_SECONDS = 2 * 3600


def minute_key(at: datetime) -> str:
    return f"tally:live:min:{int(at.timestamp()) // 60}"


def hour_key(at: datetime) -> str:
    return f"tally:live:hour:{int(at.timestamp()) // 3600}"


def day_key(at: datetime, zone: ZoneInfo) -> str:
    return f"tally:live:day:{at.astimezone(zone).date().isoformat()}"


def rate_key(epoch_minute: int) -> str:
    """Accepted events per arrival minute (for ingestion rates)."""
    return f"tally:ingest:rate:{epoch_minute}"


def minute_end_ms(epoch_seconds: int) -> int:
    """The end (epoch ms) of the minute holding `epoch_seconds`: the earliest instant the live
    counters can be complete from when an event of that second may be missing."""
    return (epoch_seconds // 60 + 1) * 60_000


def complete(since: bytes | str | None, bucket_start: datetime) -> bool:
    """Whether the live hash of the bucket starting at `bucket_start` holds every committed event
    of its time (`since`: the value of SINCE_KEY)."""
    return since is not None and int(bucket_start.timestamp() * 1000) >= int(since)


# Raises the complete-since instant (if set) and the floor to ARGV[1]. KEYS: since, floor.
_RAISE = """
local bound = tonumber(ARGV[1])
if bound > (tonumber(redis.call('GET', KEYS[2])) or 0) then redis.call('SET', KEYS[2], ARGV[1]) end
local since = redis.call('GET', KEYS[1])
if since and tonumber(since) < bound then redis.call('SET', KEYS[1], ARGV[1]) end
"""


async def changed_before(redis: Any, until: datetime) -> None:
    """Stored events before `until` changed outside ingest (re-rated, deleted): the live counters
    of buckets before it no longer match the database, so they are taken as incomplete (readers
    compute those buckets from the database). Logged, not raised, when Redis cannot be reached."""
    try:
        await redis.eval(_RAISE, 2, SINCE_KEY, FLOOR_KEY, int(until.timestamp() * 1000))
    except Exception as exc:
        logging.getLogger("tally.usage.live").warning(
            "live counters may show changed events: redis unavailable", extra={"error": repr(exc)}
        )
