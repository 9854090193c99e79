"""The shape of usage data in TimescaleDB, shared by every service that reads or corrects it.

Ingest writes `usage_events` and the rollups; analytics, reporting (data-subject deletes,
retention) and re-rating read or correct them. Every reader sums rollup rows, and every writer
appends delta rows: to `<rollup>_delta`, which the compactor merges into `<rollup>_merged` (one
row per bucket and group); readers read the view `<rollup>`, the union of both (migration 0016).
Daily rollups have no delta table: they follow their hourly rollups (DailyRollup, migration 0018).
Provider minutes are append-only in one table, merged by the hour (several hours per statement).
This module is data definition only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from tally.usage.histogram import LATENCY_COLUMNS, TTFT_COLUMNS, UPPER_BOUNDS_MS

# Requests with fewer input tokens than this and no tool use are "small input" (candidates for a
# cheaper model); the rollups keep their counts, tokens and cost apart.
SMALL_INPUT_TOKENS = 1000

# Column order of the rows below; also the COPY column list.
COLUMNS: tuple[str, ...] = (
    "event_time", "request_id", "key_id", "provider", "model", "operation",
    "input_tokens", "output_tokens", "cached_read_tokens", "cache_write_tokens", "reasoning_tokens",
    "images", "audio_seconds", "latency_ms", "ttft_ms", "http_status", "error_type", "streaming",
    "tools_used", "end_user_hash", "prompt_fingerprint", "cost_micros", "cost_source", "price_id", "tags",
)  # fmt: skip
COPY_TYPES: tuple[str, ...] = (
    "timestamptz", "text", "uuid", "text", "text", "text",
    "int8", "int8", "int8", "int8", "int8",
    "int4", "numeric", "int4", "int4", "int2", "text", "bool",
    "bool", "text", "text", "int8", "text", "int8", "jsonb",
)  # fmt: skip

ROLLUP_SUMS: tuple[str, ...] = (
    "requests", "successes", "failures", "input_tokens", "output_tokens", "cached_read_tokens",
    "cache_write_tokens", "reasoning_tokens", "images", "audio_seconds", "cost_micros",
    "provider_cost_requests", "unpriced_requests", "late_requests", "streaming_requests", "tool_requests",
    "small_input_requests", "small_input_input_tokens", "small_input_output_tokens", "small_input_cost_micros",
    "latency_ms_sum", "ttft_ms_sum", "ttft_count", *LATENCY_COLUMNS, *TTFT_COLUMNS,
)  # fmt: skip
ROLLUP_GROUP = ("key_id", "provider", "model", "operation", "status_class", "error_type")
GLOBAL_GROUP = ("provider", "model", "operation", "status_class", "error_type")
KEY_GROUP = ("key_id",)
FINGERPRINT_GROUP = ("prompt_fingerprint", "provider", "model")
FINGERPRINT_SUMS = ("requests", "input_tokens", "cost_micros")


# Sum columns that are not bigint (summed with sum(); the others with tally_sum8, migration 0017).
_NUMERIC_SUMS = frozenset({"audio_seconds"})


def total(column: str) -> str:
    """The SQL sum of a bigint rollup column (or of `audio_seconds`, numeric)."""
    return f"sum({column})" if column in _NUMERIC_SUMS else f"tally_sum8({column})"


@dataclass(frozen=True)
class DailyRollup:
    """A daily rollup: the day sums of an hourly rollup, read as the view `name`. It has no
    delta table of its own: each merge of its hourly rollup adds the day sums of the rows it
    moves to `merged` (one row per day and group), and the view adds the hourly rollup's delta
    rows, moved to their day (migration 0018). Writers append hourly rows only."""

    name: str
    group: tuple[str, ...]
    sums: tuple[str, ...]

    @property
    def merged(self) -> str:
        return f"{self.name}_merged"


def _upsert(table: str, keys: str, group: tuple[str, ...], sums: tuple[str, ...], rows: str) -> str:
    """INSERT of `rows` (`keys` then `sums`, one row per key) into `table` (alias m), adding the
    sums of a group already there. In key order: concurrent upserts take row locks in one order."""
    added = ", ".join(f"{c} = m.{c} + excluded.{c}" for c in sums)
    return f"""INSERT INTO {table} AS m ({keys}, {", ".join(sums)}) {rows}
        ON CONFLICT ({", ".join((*group, "bucket"))}) DO UPDATE SET {added}"""


@dataclass(frozen=True)
class MergedRollup:
    """A rollup read as the view `name`: `merged` (one row per bucket and group, unique) plus
    `delta` (rows appended by writers since the last merge). An hourly rollup feeds its `daily`
    one when merged."""

    name: str
    group: tuple[str, ...]
    sums: tuple[str, ...]
    daily: DailyRollup | None = None

    @property
    def delta(self) -> str:
        return f"{self.name}_delta"

    @property
    def merged(self) -> str:
        return f"{self.name}_merged"

    @property
    def tables(self) -> tuple[str, ...]:
        """Every table holding this rollup's rows or their day sums: delta, merged, daily merged."""
        return (self.delta, self.merged, *((self.daily.merged,) if self.daily else ()))

    def merge_statements(self) -> list[str]:
        """One merge, run in order in a transaction of its own: it moves every delta row
        committed before it into the merged table (and their day sums into the daily rollup's).
        Readers see the same sums before and after. The statement before last is the upsert
        (its row count: the groups written), the last one the delete.

        REPEATABLE READ: the upsert reads, and the delete removes, exactly the delta rows of one
        snapshot; rows committed later stay for the next merge. Merges of one rollup run one at a
        time: the lock is taken before the first query fixes the snapshot (a utility statement
        takes none), so a merge that waited sees everything the one before it did. The lock lets
        writers append and readers read. Reading the delta table directly, rather than through
        a `DELETE ... RETURNING` CTE, spares materializing every delta row (about a third of a
        merge's cost)."""
        keys = ", ".join(("bucket", *self.group))
        named = ", ".join(f"{total(c)} AS {c}" for c in self.sums)
        # `moved`: the delta rows grouped; inlined into the upsert unless the daily upsert reads
        # it too (a CTE read twice is materialized once).
        ctes = [f"moved AS (SELECT {keys}, {named} FROM {self.delta} GROUP BY {keys})"]  # noqa: S608 (constants)
        if self.daily is not None:
            positions = ", ".join(str(i + 1) for i in range(len(self.group) + 1))
            days = f"""SELECT time_bucket('1 day', bucket), {", ".join(self.group)}, {", ".join(map(total, self.sums))}
                FROM moved GROUP BY {positions} ORDER BY {positions}"""  # noqa: S608 (constants)
            ctes.append(f"daily AS ({_upsert(self.daily.merged, keys, self.group, self.sums, days)})")
        hours = f"SELECT * FROM moved ORDER BY {keys}"  # noqa: S608 (constants)
        upsert = f"WITH {', '.join(ctes)} {_upsert(self.merged, keys, self.group, self.sums, hours)}"
        return [
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            # Sorting a pass's delta rows (tens of thousands, ~70 columns) spilled to disk at the
            # default work_mem; the planner's estimate of the just-vacuumed table is one row.
            "SET LOCAL work_mem = '256MB'",
            f"LOCK TABLE {self.delta} IN SHARE UPDATE EXCLUSIVE MODE",
            upsert,
            f"DELETE FROM {self.delta}",  # noqa: S608 (constants)
        ]


DAILY = DailyRollup("usage_rollup_daily", ROLLUP_GROUP, ROLLUP_SUMS)
DAILY_GLOBAL = DailyRollup("usage_rollup_daily_global", GLOBAL_GROUP, ROLLUP_SUMS)
DAILY_KEY = DailyRollup("usage_rollup_daily_key", KEY_GROUP, ROLLUP_SUMS)
HOURLY = MergedRollup("usage_rollup_hourly", ROLLUP_GROUP, ROLLUP_SUMS, DAILY)
HOURLY_GLOBAL = MergedRollup("usage_rollup_hourly_global", GLOBAL_GROUP, ROLLUP_SUMS, DAILY_GLOBAL)
HOURLY_KEY = MergedRollup("usage_rollup_hourly_key", KEY_GROUP, ROLLUP_SUMS, DAILY_KEY)
FINGERPRINTS = MergedRollup("prompt_fingerprint_daily", FINGERPRINT_GROUP, FINGERPRINT_SUMS)
# The rollups with delta tables, each merged by its own merge (the daily rollups by their hourly's).
MERGED_ROLLUPS = (HOURLY, FINGERPRINTS, HOURLY_GLOBAL, HOURLY_KEY)
# Compactions that must not run concurrently take this advisory lock (pg_advisory_xact_lock).
COMPACTION_LOCK = 7_406_391_044

# Merges hours of provider minutes and, in the same statement, rewrites each hour's uptime
# summary from exactly the rows merged and clears the hours' dirty marks: minute rows (and marks)
# committed after the statement's snapshot stay, so their hour stays dirty and readers keep using
# its minute rows. %(hours)s holds distinct hours; %(lo)s and %(hi)s bound them (chunk exclusion
# at plan time). One compaction at a time (two racing ones could each write a summary).
_PROVIDER_MINUTES_COMPACT = """
    WITH hours AS (SELECT unnest(%(hours)s::timestamptz[]) AS bucket),
    marks AS (DELETE FROM provider_minutes_dirty WHERE bucket = ANY(%(hours)s::timestamptz[])),
    old AS (DELETE FROM provider_minutes m USING hours h
            WHERE m.bucket >= %(lo)s AND m.bucket < %(hi)s
              AND m.bucket >= h.bucket AND m.bucket < h.bucket + interval '1 hour' RETURNING m.*),
    merged AS (INSERT INTO provider_minutes (bucket, provider, requests, server_failures)
               SELECT bucket, provider, sum(requests), sum(server_failures) FROM old GROUP BY 1, 2
               RETURNING *),
    stale AS (DELETE FROM provider_uptime_hourly WHERE bucket = ANY(%(hours)s::timestamptz[]))
    INSERT INTO provider_uptime_hourly (bucket, provider, minutes, down_minutes)
    SELECT time_bucket('1 hour', bucket), provider, count(*), count(*) FILTER (WHERE server_failures = requests)
    FROM merged WHERE requests > 0 GROUP BY 1, 2
"""
# Most hours one compaction statement merges (a backfill marks thousands of hours at once).
PROVIDER_MINUTES_HOURS_PER_COMPACTION = 168


@dataclass(frozen=True)
class ProviderMinutes:
    """Provider minutes: append-only in one table (`provider_minutes`, one row per minute and
    provider per batch); ingest marks the hours it appended to in `provider_minutes_dirty`, and
    a compaction merges a set of hours, one compaction at a time (under COMPACTION_LOCK)."""

    name: str = "provider_minutes"

    def compact_statements(self, hours: Sequence[datetime]) -> list[tuple[str, dict[str, object]]]:
        """What one compaction of `hours` (starts of hours, UTC) runs, in order, in one transaction."""
        starts = sorted(set(hours))
        bounds = {"hours": starts, "lo": starts[0], "hi": starts[-1] + timedelta(hours=1)}
        return [
            ("SELECT pg_advisory_xact_lock(%(lock)s)", {"lock": COMPACTION_LOCK}),
            (_PROVIDER_MINUTES_COMPACT, bounds),
        ]

    def duplicated_buckets_sql(self) -> str:
        """The hours (from %(since)s on) holding more than one row of some minute and provider,
        and those marked dirty."""
        return """
            SELECT time_bucket(interval '1 hour', bucket) AS bucket FROM provider_minutes
            WHERE bucket >= %(since)s GROUP BY 1 HAVING count(*) > count(DISTINCT (bucket, provider))
            UNION SELECT bucket FROM provider_minutes_dirty WHERE bucket >= %(since)s"""


PROVIDER_MINUTES = ProviderMinutes()


def provider_minutes_cte(name: str, source: str, sign: str = "") -> str:
    """CTEs appending, per minute and provider of the usage_events rows of `source`, their
    requests and 5xx answers (`sign` "-" appends their negation, for rows being removed), and
    marking their hours dirty (their uptime summary is stale until the compactor redoes it)."""
    return f"""{name} AS (
        INSERT INTO provider_minutes (bucket, provider, requests, server_failures)
        SELECT time_bucket('1 minute', event_time), provider, {sign}count(*),
               {sign}count(*) FILTER (WHERE http_status >= 500)
        FROM {source} GROUP BY 1, 2),
    {name}_dirty AS (
        INSERT INTO provider_minutes_dirty (bucket)
        SELECT DISTINCT time_bucket('1 hour', event_time) FROM {source})"""  # noqa: S608 (constants)


def rollup_aggregates(late_threshold_seconds: int) -> list[str]:
    """The SQL aggregate of each ROLLUP_SUMS column over usage_events rows (in that order).

    The rows must carry the histogram bucket numbers `lb` and `tb`:
    `width_bucket(latency_ms - 1, bounds)` and `width_bucket(ttft_ms - 1, bounds)`. Ingest appends
    these aggregates for inserted rows; a data-subject delete appends their negation."""
    small = f"input_tokens < {SMALL_INPUT_TOKENS} AND NOT tools_used"
    aggregates = [
        "count(*)",
        "count(*) FILTER (WHERE http_status < 400)",
        "count(*) FILTER (WHERE http_status >= 400)",
        total("input_tokens"), total("output_tokens"), total("cached_read_tokens"), total("cache_write_tokens"),
        total("reasoning_tokens"), "sum(images)", "sum(audio_seconds)", f"coalesce({total('cost_micros')}, 0)",
        "count(*) FILTER (WHERE cost_source = 'provider')",
        "count(*) FILTER (WHERE cost_source = 'unpriced')",
        f"count(*) FILTER (WHERE ingested_at - event_time > make_interval(secs => {late_threshold_seconds}))",
        "count(*) FILTER (WHERE streaming)",
        "count(*) FILTER (WHERE tools_used)",
        f"count(*) FILTER (WHERE {small})",
        f"coalesce({total('input_tokens')} FILTER (WHERE {small}), 0)",
        f"coalesce({total('output_tokens')} FILTER (WHERE {small}), 0)",
        f"coalesce({total('cost_micros')} FILTER (WHERE {small}), 0)",
        "sum(latency_ms)", "coalesce(sum(ttft_ms), 0)", "count(ttft_ms)",
        *(f"count(*) FILTER (WHERE lb = {i})" for i in range(len(LATENCY_COLUMNS))),
        *(f"count(*) FILTER (WHERE tb = {i})" for i in range(len(TTFT_COLUMNS))),
    ]  # fmt: skip
    assert len(aggregates) == len(ROLLUP_SUMS)
    return aggregates


# The histogram bounds as an SQL array, for `width_bucket(latency_ms - 1, ...)` (see rollup_aggregates).
HISTOGRAM_BOUNDS_SQL = "ARRAY[" + ",".join(str(int(b)) for b in UPPER_BOUNDS_MS[:-1]) + "]"


def derived_rollup_ctes() -> str:
    """CTEs appending the global and per-key hourly rollup rows derived from a CTE `hourly` that
    holds the full hourly rollup rows just appended (`INSERT ... RETURNING *`). Whatever those
    rows are (a batch's sums, or a delete's negated sums), the derived rows are their sums, so
    every grain stays equal to the raw events (the daily rollups follow their hourly ones: see
    DailyRollup). Ends without a trailing comma."""
    sums = ", ".join(total(c) for c in ROLLUP_SUMS)
    glob = ", ".join(("bucket", *GLOBAL_GROUP, *ROLLUP_SUMS))
    key = ", ".join(("bucket", *KEY_GROUP, *ROLLUP_SUMS))
    return f"""hourly_global AS (
        INSERT INTO {HOURLY_GLOBAL.delta} ({glob})
        SELECT bucket, {", ".join(GLOBAL_GROUP)}, {sums} FROM hourly GROUP BY 1, 2, 3, 4, 5, 6),
    hourly_key AS (
        INSERT INTO {HOURLY_KEY.delta} ({key})
        SELECT bucket, key_id, {sums} FROM hourly GROUP BY 1, 2)"""  # noqa: S608
