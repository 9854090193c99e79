"""Layout of the live counters in Redis (written by ingest, read by analytics).

Per event-time bucket, one hash: `tally:live:min:<epoch minute>`, `tally:live:hour:<epoch hour>`,
`tally:live:day:<YYYY-MM-DD in the configured timezone>`. Fields: `requests`, `tokens`, `cost`
(micro-units), and per dimension `k|<key id>|requests`, `k|<key id>|cost`,
`m|<provider>|<model>|requests`, `m|<provider>|<model>|cost`, `p|<provider>|requests`,
`p|<provider>|cost`. Only committed (accepted) events are counted. The counters are hot state:
everything in them can be recomputed from the rollups.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

MINUTE_TTL_SECONDS = 2 * 3600
HOUR_TTL_SECONDS = 2 * 86400
DAY_TTL_SECONDS = 3 * 86400

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
