"""SQL over the rollups (and, for minute buckets, the raw hypertable). Every statement aggregates.

The rollups are append-only (a group may have several rows per bucket until compaction), so
every query sums and groups; none assumes one row per group. Period windows are read from the
daily rollup for the whole UTC days they contain and from the hourly rollup for the hours at
either edge (`rollup_source`), so the totals are exact for the hour-aligned window while a
90-day query reads ~90 daily buckets instead of ~2,160 hourly ones.

Each question reads the narrowest rollup that answers it exactly (`Rollup`): GLOBAL (grouped by
provider, model, operation, status class and error type; no key) for everything that does not
name a key, KEY (grouped by key only) for per-key totals and active-key counts, and FULL (every
dimension) only when a key must be crossed with a model, operation or error type, filtered by
key where the question allows (both full rollups are indexed on (key_id, bucket)). All three
are written by ingest from the same rows in one statement, so they give identical sums.

SQL text here is built from constants only; values always travel as bound parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from tally.runtime.db import Database
from tally.runtime.windows import DAY, Window, ceil_to, floor_to
from tally.usage import TOTAL_TOKENS_SQL
from tally.usage.histogram import LATENCY_COLUMNS, TTFT_COLUMNS

LATENCY_SUMS = ", ".join(f"sum({c})::bigint AS {c}" for c in LATENCY_COLUMNS)
TTFT_SUMS = ", ".join(f"sum({c})::bigint AS {c}" for c in TTFT_COLUMNS)
# The common measures of a group, named the same everywhere.
MEASURES = f"""sum(requests)::bigint AS requests, sum(successes)::bigint AS successes,
    sum(failures)::bigint AS failures, sum(input_tokens)::bigint AS input_tokens,
    sum(output_tokens)::bigint AS output_tokens, sum({TOTAL_TOKENS_SQL})::bigint AS tokens,
    sum(cost_micros)::bigint AS cost_micros, sum(latency_ms_sum)::bigint AS latency_ms_sum"""

# The rollup columns MEASURES reads.
MEASURE_COLUMNS = (
    "requests", "successes", "failures", "input_tokens", "output_tokens", "cached_read_tokens",
    "cache_write_tokens", "reasoning_tokens", "cost_micros", "latency_ms_sum",
)  # fmt: skip

SMALL_INPUT_WHERE = "operation IN ('chat.completions', 'completions')"
SMALL_INPUT_COLUMNS = (
    "provider", "model", "operation", "small_input_requests", "small_input_input_tokens",
    "small_input_output_tokens", "small_input_cost_micros",
)  # fmt: skip
PRICED_COLUMNS = (
    "provider", "model", "operation", *MEASURE_COLUMNS, "images", "audio_seconds", "unpriced_requests",
)  # fmt: skip

DIMENSIONS = {"provider": "provider", "model": "model", "virtual_key": "key_id::text", "operation": "operation"}


class Rollup(Enum):
    """A family of rollups: (hourly table, daily table). Same sum columns in all of them."""

    FULL = ("usage_rollup_hourly", "usage_rollup_daily")  # bucket x key x provider x model x ...
    GLOBAL = ("usage_rollup_hourly_global", "usage_rollup_daily_global")  # no key
    KEY = ("usage_rollup_hourly_key", "usage_rollup_daily_key")  # key only

    @property
    def hourly(self) -> str:
        return self.value[0]

    @property
    def daily(self) -> str:
        return self.value[1]


def rollup_source(window: Window, columns: Iterable[str], where: str = "TRUE", rollup: Rollup = Rollup.GLOBAL) -> str:
    """A FROM item `r` with `columns` of the rollup rows of exactly `[start, end)` (hour-aligned).

    Only the named columns are selected (the rows are wide: ~80 columns), so give every column
    the outer query and `where` use. Uses the parameters `ws`, `we`, `d0`, `d1` (see
    `source_params`) plus any used by `where`.
    """
    names = ", ".join(dict.fromkeys(columns))
    return f"""(
        SELECT {names} FROM {rollup.daily} WHERE bucket >= %(d0)s AND bucket < %(d1)s AND ({where})
        UNION ALL
        SELECT {names} FROM {rollup.hourly} WHERE bucket >= %(ws)s AND bucket < %(d0)s AND ({where})
        UNION ALL
        SELECT {names} FROM {rollup.hourly} WHERE bucket >= %(d1)s AND bucket < %(we)s AND ({where})
    ) AS r"""  # noqa: S608


def source_params(window: Window, **extra: Any) -> dict[str, Any]:
    d0 = ceil_to(window.start, DAY)
    d1 = floor_to(window.end, DAY)
    if d0 >= d1:  # no whole day inside: everything comes from the hourly rollup
        d0 = d1 = window.end
    return {"ws": window.start, "we": window.end, "d0": d0, "d1": d1, **extra}


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    successes: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    tokens: int = 0
    cost_micros: int = 0
    latency_ms_sum: int = 0

    @classmethod
    def of(cls, row: dict[str, Any] | None) -> Totals:
        if row is None:
            return cls()
        return cls(**{name: int(row.get(name) or 0) for name in cls.__dataclass_fields__})

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(getattr(self, n) + getattr(other, n) for n in Totals.__dataclass_fields__))

    @classmethod
    def total(cls, rows: Iterable[dict[str, Any]]) -> Totals:
        """The sum of the measures of `rows`."""
        out = cls()
        for row in rows:
            out += cls.of(row)
        return out


class AnalyticsQueries:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ------------------------------------------------------------------ generic
    async def totals(
        self,
        window: Window,
        where: str = "TRUE",
        rollup: Rollup = Rollup.GLOBAL,
        columns: Sequence[str] = (),
        **params: Any,
    ) -> Totals:
        """The measures over the window; `columns`: those `where` reads."""
        row = await self._db.fetch_one(
            f"SELECT {MEASURES} FROM {rollup_source(window, (*MEASURE_COLUMNS, *columns), where, rollup)}",  # noqa: S608
            source_params(window, **params),
        )
        return Totals.of(row)

    async def grouped(
        self,
        window: Window,
        group: str,
        where: str = "TRUE",
        extra: str = "",
        rollup: Rollup = Rollup.GLOBAL,
        columns: Sequence[str] = (),
        **params: Any,
    ) -> list[dict[str, Any]]:
        """Measures per `group` (an SQL expression list named g0, g1, ...); `columns`: the ones
        `where` and `extra` read besides the group's and the measures'."""
        parts = [p.strip() for p in group.split(",")]
        needed = (*(p.split("::")[0] for p in parts), *MEASURE_COLUMNS, *columns)
        select = ", ".join(f"{p} AS g{i}" for i, p in enumerate(parts))
        by = ", ".join(str(i + 1) for i in range(len(parts)))
        return await self._db.fetch_all(
            f"SELECT {select}, {MEASURES}{extra} FROM {rollup_source(window, needed, where, rollup)} GROUP BY {by}",  # noqa: S608
            source_params(window, **params),
        )

    async def hourly_series(
        self, window: Window, where: str = "TRUE", rollup: Rollup = Rollup.GLOBAL, **params: Any
    ) -> list[dict[str, Any]]:
        """Measures per hourly bucket (only buckets with rows), oldest first."""
        return await self._db.fetch_all(
            f"""SELECT bucket, {MEASURES}
                FROM {rollup.hourly} WHERE bucket >= %(ws)s AND bucket < %(we)s AND ({where})
                GROUP BY bucket ORDER BY bucket""",  # noqa: S608
            {"ws": window.start, "we": window.end, **params},
        )

    async def active_keys(self, window: Window, width: str = "1 hour") -> dict[datetime, int]:
        """Keys with requests per `width` bucket (hour, day or week) of `window` (aligned to `width`).

        Counted from the per-key rollups: a key is active in a bucket when its rows there sum to
        more than zero requests (the rows are grouped first, so append-only duplicates count once).
        """
        table = Rollup.KEY.hourly if width == "1 hour" else Rollup.KEY.daily
        rows = await self._db.fetch_all(
            f"""SELECT b AS bucket, count(*)::int AS active_keys FROM (
                    SELECT time_bucket(%(width)s::interval, bucket) AS b, key_id FROM {table}
                    WHERE bucket >= %(ws)s AND bucket < %(we)s
                    GROUP BY 1, 2 HAVING sum(requests) > 0) k
                GROUP BY 1""",  # noqa: S608
            {"ws": window.start, "we": window.end, "width": width},
        )
        return {r["bucket"]: int(r["active_keys"]) for r in rows}

    async def daily_series(self, window: Window, width: str = "1 day") -> list[dict[str, Any]]:
        """Measures per day (or week: `width='1 week'`) from the daily rollup; window day-aligned."""
        return await self._db.fetch_all(
            f"""SELECT time_bucket(%(width)s::interval, bucket) AS bucket, {MEASURES}
                FROM {Rollup.GLOBAL.daily} WHERE bucket >= %(ws)s AND bucket < %(we)s
                GROUP BY 1 ORDER BY 1""",  # noqa: S608
            {"ws": window.start, "we": window.end, "width": width},
        )

    async def raw_totals(self, window: Window) -> Totals:
        """Requests, tokens and cost of the raw events in the window (short windows only)."""
        row = await self._db.fetch_one(
            f"""SELECT count(*)::bigint AS requests, coalesce(sum({TOTAL_TOKENS_SQL}), 0)::bigint AS tokens,
                       coalesce(sum(cost_micros), 0)::bigint AS cost_micros
                FROM usage_events WHERE event_time >= %(ws)s AND event_time < %(we)s""",  # noqa: S608
            {"ws": window.start, "we": window.end},
        )
        return Totals.of(row)

    async def minute_series(self, window: Window) -> list[dict[str, Any]]:
        """Per-minute measures straight from the raw events (short windows only)."""
        return await self._db.fetch_all(
            f"""SELECT time_bucket('1 minute', event_time) AS bucket, count(*)::bigint AS requests,
                       count(*) FILTER (WHERE http_status < 400)::bigint AS successes,
                       count(*) FILTER (WHERE http_status >= 400)::bigint AS failures,
                       sum(input_tokens)::bigint AS input_tokens, sum(output_tokens)::bigint AS output_tokens,
                       sum({TOTAL_TOKENS_SQL})::bigint AS tokens,
                       coalesce(sum(cost_micros), 0)::bigint AS cost_micros,
                       sum(latency_ms)::bigint AS latency_ms_sum, count(DISTINCT key_id)::int AS active_keys
                FROM usage_events WHERE event_time >= %(ws)s AND event_time < %(we)s
                GROUP BY 1 ORDER BY 1""",  # noqa: S608
            {"ws": window.start, "we": window.end},
        )

    async def peak_hour_requests(self, window: Window) -> int:
        row = await self._db.fetch_one(
            f"""SELECT coalesce(max(n), 0)::bigint AS peak FROM (
                   SELECT sum(requests) AS n FROM {Rollup.GLOBAL.hourly}
                   WHERE bucket >= %(ws)s AND bucket < %(we)s GROUP BY bucket) h""",  # noqa: S608
            {"ws": window.start, "we": window.end},
        )
        return int(row["peak"]) if row else 0

    # ------------------------------------------------------------------ keys
    async def key_model_pairs(self, window: Window) -> list[dict[str, Any]]:
        """The (key, model) pairs with requests in the window (the only key x model question of
        the patterns: which key segments used each model)."""
        return await self._db.fetch_all(
            f"""SELECT key_id::text AS key_id, model
                FROM {rollup_source(window, ("key_id", "model", "requests"), "TRUE", Rollup.FULL)}
                GROUP BY key_id, model HAVING sum(requests) > 0""",  # noqa: S608
            source_params(window),
        )

    async def key_names(self, key_ids: list[str]) -> dict[str, str]:
        if not key_ids:
            return {}
        rows = await self._db.fetch_all(
            "SELECT key_id::text AS key_id, key_name FROM virtual_keys WHERE key_id = ANY(%s::uuid[])", (key_ids,)
        )
        return {r["key_id"]: r["key_name"] for r in rows}

    # ------------------------------------------------------------------ providers
    async def provider_down_minutes(self, window: Window) -> list[dict[str, Any]]:
        """Per provider: minutes with traffic, and minutes in which every request failed with a 5xx.
        Hours the compactor summarised come from provider_uptime_hourly; hours changed since
        (marked dirty in the same transactions as their minute rows) from the minute rows."""
        return await self._db.fetch_all(
            """WITH dirty AS (SELECT DISTINCT bucket FROM provider_minutes_dirty
                              WHERE bucket >= %(ws)s AND bucket < %(we)s),
               summarised AS (
                   SELECT provider, minutes, down_minutes FROM provider_uptime_hourly
                   WHERE bucket >= %(ws)s AND bucket < %(we)s AND bucket NOT IN (SELECT bucket FROM dirty)),
               recent AS (
                   SELECT provider, count(*) AS minutes,
                          count(*) FILTER (WHERE server_failures = requests) AS down_minutes
                   FROM (SELECT m.provider, m.bucket, sum(m.requests) AS requests,
                                sum(m.server_failures) AS server_failures
                         FROM dirty d JOIN provider_minutes m
                           ON m.bucket >= d.bucket AND m.bucket < d.bucket + interval '1 hour'
                         GROUP BY 1, 2) x
                   WHERE requests > 0 GROUP BY provider)
               SELECT provider, sum(minutes)::int AS minutes, sum(down_minutes)::int AS down_minutes
               FROM (SELECT * FROM summarised UNION ALL SELECT * FROM recent) u GROUP BY provider""",
            {"ws": window.start, "we": window.end},
        )

    # ------------------------------------------------------------------ cost optimization
    async def small_input_usage(self, window: Window) -> list[dict[str, Any]]:
        """Requests with < 1,000 input tokens and no tool use, per provider and model (global)."""
        return await self._db.fetch_all(
            f"""SELECT provider, model, sum(small_input_requests)::bigint AS requests,
                       sum(small_input_input_tokens)::bigint AS input_tokens,
                       sum(small_input_output_tokens)::bigint AS output_tokens,
                       sum(small_input_cost_micros)::bigint AS cost_micros
                FROM {rollup_source(window, SMALL_INPUT_COLUMNS, SMALL_INPUT_WHERE)}
                GROUP BY 1, 2 HAVING sum(small_input_requests) > 0""",  # noqa: S608
            source_params(window),
        )

    async def small_input_keys(self, window: Window) -> list[dict[str, Any]]:
        """The same requests per key, provider and model (full rollups: only the request counts)."""
        return await self._db.fetch_all(
            f"""SELECT key_id::text AS key_id, provider, model, sum(small_input_requests)::bigint AS requests
                FROM {rollup_source(window, ("key_id", *SMALL_INPUT_COLUMNS[:4]), SMALL_INPUT_WHERE, Rollup.FULL)}
                GROUP BY 1, 2, 3 HAVING sum(small_input_requests) > 0""",  # noqa: S608
            source_params(window),
        )

    async def usage_by_provider_model(self, window: Window) -> list[dict[str, Any]]:
        """Usage per provider, model and operation: the measures plus every priced quantity."""
        return await self._db.fetch_all(
            f"""SELECT provider, model, operation, {MEASURES},
                       sum(cached_read_tokens)::bigint AS cached_read_tokens,
                       sum(cache_write_tokens)::bigint AS cache_write_tokens,
                       sum(reasoning_tokens)::bigint AS reasoning_tokens, sum(images)::bigint AS images,
                       sum(audio_seconds) AS audio_seconds, sum(unpriced_requests)::bigint AS unpriced_requests
                FROM {rollup_source(window, PRICED_COLUMNS)} GROUP BY 1, 2, 3""",  # noqa: S608
            source_params(window),
        )

    async def current_prices(self, at: datetime) -> list[dict[str, Any]]:
        """The price in force at `at` for every provider and model."""
        return await self._db.fetch_all(
            """SELECT DISTINCT ON (provider, model) provider, model, input_per_million, output_per_million,
                      cached_read_per_million, cache_write_per_million, reasoning_per_million, per_image,
                      per_audio_second, per_request
               FROM model_prices WHERE effective_from <= %s
               ORDER BY provider, model, effective_from DESC""",
            (at,),
        )

    async def repeated_prompts(self, day_start: datetime, day_end: datetime) -> dict[str, int]:
        """Repeats (requests beyond the first) of each prompt fingerprint and their cost share."""
        row = await self._db.fetch_one(
            """SELECT coalesce(sum(requests - 1), 0)::bigint AS repeats,
                      coalesce(sum(cost_micros * (requests - 1) / requests), 0)::bigint AS repeat_cost,
                      count(*)::bigint AS fingerprints
               FROM (SELECT sum(requests)::bigint AS requests, sum(cost_micros)::bigint AS cost_micros
                     FROM prompt_fingerprint_daily WHERE bucket >= %s AND bucket < %s
                     GROUP BY prompt_fingerprint, provider, model) f
               WHERE requests > 1""",
            (day_start, day_end),
        )
        assert row is not None
        return {k: int(v) for k, v in row.items()}

    # ------------------------------------------------------------------ forecast
    async def daily_cost(self, start: datetime, end: datetime, by_key: bool = False) -> list[dict[str, Any]]:
        group = "bucket, key_id::text" if by_key else "bucket"
        select = "bucket, key_id::text AS key_id" if by_key else "bucket"
        table = Rollup.KEY.daily if by_key else Rollup.GLOBAL.daily
        return await self._db.fetch_all(
            f"""SELECT {select}, sum(cost_micros)::bigint AS cost_micros
                FROM {table} WHERE bucket >= %s AND bucket < %s GROUP BY {group} ORDER BY bucket""",  # noqa: S608
            (start, end),
        )

    async def daily_cost_by_model(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return await self._db.fetch_all(
            f"""SELECT bucket, model, sum(cost_micros)::bigint AS cost_micros
               FROM {Rollup.GLOBAL.daily} WHERE bucket >= %s AND bucket < %s GROUP BY 1, 2""",  # noqa: S608
            (start, end),
        )

    # ------------------------------------------------------------------ freshness
    async def freshness(self) -> dict[str, Any]:
        row = await self._db.fetch_one(
            """SELECT (SELECT max(event_time) FROM usage_events) AS raw,
                      (SELECT max(bucket) + interval '1 hour' FROM usage_rollup_hourly_global) AS hourly,
                      (SELECT max(bucket) + interval '1 day' FROM usage_rollup_daily_global) AS daily"""
        )
        assert row is not None
        return row
