"""PostgreSQL side of budgets: budget rows, the alert configuration, fired-alert dedup, closed
period totals, and exact spend sums over the usage rollups and raw events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.budget.events import BudgetEvent, record
from tally.runtime.db import Database

HOUR = timedelta(hours=1)
_BUDGET_COLUMNS = "scope, key_id, limit_micros, period, timezone, created_at, updated_at"


@dataclass(frozen=True)
class BudgetRow:
    scope: str
    key_id: uuid.UUID | None
    limit_micros: int
    period: str
    timezone: str
    created_at: datetime
    updated_at: datetime


def _floor_hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(at: datetime) -> datetime:
    floor = _floor_hour(at)
    return floor if floor == at else floor + HOUR


def _pieces(start: datetime, end: datetime | None) -> list[tuple[str, datetime, datetime | None]]:
    """Splits [start, end) into raw-event edges and whole hours answered by the hourly rollup."""
    first_hour = _ceil_hour(start)
    if end is not None and first_hour >= _floor_hour(end):
        return [("raw", start, end)]
    pieces: list[tuple[str, datetime, datetime | None]] = []
    if start < first_hour:
        pieces.append(("raw", start, first_hour))
    last_hour = None if end is None else _floor_hour(end)
    pieces.append(("rollup", first_hour, last_hour))
    if end is not None and last_hour is not None and last_hour < end:
        pieces.append(("raw", last_hour, end))
    return pieces


class BudgetRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ------------------------------------------------------------------ budgets
    async def budgets(self) -> list[BudgetRow]:
        rows = await self._db.fetch_all(f"SELECT {_BUDGET_COLUMNS} FROM budgets ORDER BY scope")  # noqa: S608
        return [BudgetRow(**row) for row in rows]

    async def budget(self, scope: str) -> BudgetRow | None:
        row = await self._db.fetch_one(
            f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE scope = %s",  # noqa: S608
            (scope,),
        )
        return None if row is None else BudgetRow(**row)

    async def put_budget(
        self, scope: str, key_id: uuid.UUID | None, limit_micros: int, period: str, timezone: str
    ) -> tuple[BudgetRow, BudgetRow | None]:
        """Upserts a budget (creating the key when unknown); returns (new, previous)."""
        async with self._db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            if key_id is not None:
                await cur.execute(
                    "INSERT INTO virtual_keys (key_id, key_name) VALUES (%s, %s) ON CONFLICT (key_id) DO NOTHING",
                    (key_id, str(key_id)),
                )
            await cur.execute(
                f"SELECT {_BUDGET_COLUMNS} FROM budgets WHERE scope = %s FOR UPDATE",  # noqa: S608
                (scope,),
            )
            previous = await cur.fetchone()
            await cur.execute(
                """INSERT INTO budgets (scope, key_id, limit_micros, period, timezone) VALUES (%s, %s, %s, %s, %s)
                   ON CONFLICT (scope) DO UPDATE SET limit_micros = EXCLUDED.limit_micros,
                       period = EXCLUDED.period, timezone = EXCLUDED.timezone, updated_at = now()
                   RETURNING scope, key_id, limit_micros, period, timezone, created_at, updated_at""",
                (scope, key_id, limit_micros, period, timezone),
            )
            row = await cur.fetchone()
            assert row is not None
            return BudgetRow(**row), (None if previous is None else BudgetRow(**previous))

    async def disabled_key_ids(self, conn: AsyncConnection[Any]) -> list[uuid.UUID]:
        """The disabled keys, read on `conn` (a rebuild's snapshot)."""
        cursor = await conn.execute("SELECT key_id FROM virtual_keys WHERE NOT enabled")
        return [row[0] for row in await cursor.fetchall()]

    @asynccontextmanager
    async def disabled_keys_locked(self, also: Sequence[uuid.UUID] = ()) -> AsyncIterator[list[uuid.UUID]]:
        """The disabled keys, their rows (and those of `also`) locked (FOR SHARE) until the block
        ends: an enable or disable of one of them (which writes Redis while its row is locked)
        waits, so what the block writes to Redis is never an older state over a newer one."""
        async with self._db.transaction() as conn:
            cursor = await conn.execute(
                """SELECT key_id, enabled FROM virtual_keys WHERE NOT enabled OR key_id = ANY(%s)
                   ORDER BY key_id FOR SHARE""",
                (list(also),),
            )
            yield [row[0] for row in await cursor.fetchall() if not row[1]]

    async def key_names(self, key_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
        if not key_ids:
            return {}
        rows = await self._db.fetch_all(
            "SELECT key_id, key_name FROM virtual_keys WHERE key_id = ANY(%s)", (list(key_ids),)
        )
        return {row["key_id"]: row["key_name"] for row in rows}

    async def set_key_enabled(
        self,
        key_id: uuid.UUID,
        enabled: bool,
        reason: str | None,
        event: BudgetEvent,
        apply: Callable[[], Awaitable[None]],
    ) -> int | None:
        """Enables or disables the key, records `event` with it and runs `apply` (the Redis write)
        before the commit, while the key's row is locked; returns the event's id, or None when
        the key is unknown (nothing done). If `apply` fails, nothing is changed."""
        async with self._db.transaction() as conn:
            if not await set_key_enabled(conn, key_id, enabled, reason):
                return None
            recorded = await record(conn, event)
            await apply()
            return recorded

    # ------------------------------------------------------------------ alert configuration
    async def alert_config(self) -> tuple[dict[str, Any], datetime] | None:
        row = await self._db.fetch_one("SELECT config, updated_at FROM budget_alert_config WHERE id = 1")
        return None if row is None else (row["config"], row["updated_at"])

    async def put_alert_config(self, config: dict[str, Any]) -> datetime:
        row = await self._db.fetch_one(
            """INSERT INTO budget_alert_config (id, config) VALUES (1, %s)
               ON CONFLICT (id) DO UPDATE SET config = EXCLUDED.config, updated_at = now()
               RETURNING updated_at""",
            (Jsonb(config),),
        )
        assert row is not None
        updated: datetime = row["updated_at"]
        return updated

    async def fired_thresholds(self, scope_periods: Sequence[tuple[str, datetime]]) -> list[dict[str, Any]]:
        """The highest threshold fired per scope in the given current periods."""
        if not scope_periods:
            return []
        return await self._db.fetch_all(
            """SELECT DISTINCT ON (f.scope) f.scope, f.kind, f.threshold::float8 AS threshold
               FROM budget_alerts_fired f
               JOIN unnest(%s::text[], %s::timestamptz[]) AS p(scope, period_start)
                 ON p.scope = f.scope AND p.period_start = f.period_start
               WHERE f.kind IN ('threshold', 'exceeded')
               ORDER BY f.scope, f.threshold DESC, f.kind""",
            ([s for s, _ in scope_periods], [p for _, p in scope_periods]),
        )

    # ------------------------------------------------------------------ spend from the database
    async def spend(
        self,
        start: datetime,
        end: datetime | None,
        *,
        group_by: str | None = None,
        key_ids: Sequence[uuid.UUID] | None = None,
        conn: AsyncConnection[Any] | None = None,
    ) -> dict[Any, int]:
        """Exact settled spend in [start, end): whole hours from the hourly rollup, edges from raw
        events. `group_by` is None (one total under key None), 'key_id' or 'provider'. With `conn`,
        the query runs in that connection's transaction (e.g. one snapshot for several sums)."""
        assert group_by in (None, "key_id", "provider")
        column = group_by or "NULL::text"
        key_filter = "" if key_ids is None else " AND key_id = ANY(%(keys)s)"
        parts = []
        params: dict[str, Any] = {"keys": list(key_ids or [])}
        for index, (source, lower, upper) in enumerate(_pieces(start, end)):
            params[f"lo{index}"] = lower
            params[f"hi{index}"] = upper
            if source == "rollup":
                upper_clause = "" if upper is None else f" AND bucket < %(hi{index})s"
                parts.append(
                    f"SELECT {column} AS g, sum(cost_micros) AS s FROM usage_rollup_hourly "  # noqa: S608
                    f"WHERE bucket >= %(lo{index})s{upper_clause}{key_filter} GROUP BY 1"
                )
            else:
                parts.append(
                    f"SELECT {column} AS g, sum(cost_micros) AS s FROM usage_events "  # noqa: S608
                    f"WHERE event_time >= %(lo{index})s AND event_time < %(hi{index})s "
                    f"AND cost_micros IS NOT NULL{key_filter} GROUP BY 1"
                )
        query = f"SELECT g, sum(s)::bigint AS s FROM ({' UNION ALL '.join(parts)}) AS pieces GROUP BY g"  # noqa: S608
        if conn is None:
            rows = await self._db.fetch_all(query, params)
        else:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(query, params)
                rows = await cur.fetchall()
        return {row["g"]: int(row["s"] or 0) for row in rows}

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[tuple[AsyncConnection[Any], str]]:
        """A read-only transaction on one snapshot, and that snapshot (`pg_current_snapshot()`
        as text, xmin:xmax:xip,...): every spend sum read in it holds exactly the transactions
        visible in the snapshot."""
        async with self._db.transaction(snapshot=True) as conn:
            cursor = await conn.execute("SELECT pg_current_snapshot()::text")
            row = await cursor.fetchone()
            assert row is not None
            yield conn, str(row[0])

    async def spike_windows(self, start: datetime, window: timedelta, windows: int) -> list[int]:
        """Spend of `windows` consecutive windows of the hourly rollup from `start` (the last may be partial)."""
        rows = await self._db.fetch_all(
            """SELECT floor(extract(epoch FROM bucket - %(start)s) / %(width)s)::int AS w, sum(cost_micros)::bigint AS s
               FROM usage_rollup_hourly WHERE bucket >= %(start)s AND bucket < %(end)s GROUP BY 1""",
            {"start": start, "width": window.total_seconds(), "end": start + window * windows},
        )
        spend = [0] * windows
        for row in rows:
            if 0 <= row["w"] < windows:
                spend[row["w"]] = int(row["s"] or 0)
        return spend

    # ------------------------------------------------------------------ closed periods
    async def record_period_total(
        self,
        *,
        scope: str,
        period: str,
        timezone: str,
        start: datetime,
        end: datetime,
        spend_micros: int,
        limit_micros: int,
    ) -> bool:
        row = await self._db.fetch_one(
            """INSERT INTO budget_period_totals
                   (period_start, period_end, scope, period, timezone, spend_micros, limit_micros)
               VALUES (%s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (scope, period, timezone, period_start) DO NOTHING RETURNING 1 AS inserted""",
            (start, end, scope, period, timezone, spend_micros, limit_micros),
        )
        return row is not None

    async def has_period_total(self, scope: str, period: str, timezone: str, start: datetime) -> bool:
        row = await self._db.fetch_one(
            """SELECT 1 AS found FROM budget_period_totals
               WHERE scope = %s AND period = %s AND timezone = %s AND period_start = %s""",
            (scope, period, timezone, start),
        )
        return row is not None


async def set_key_enabled(conn: AsyncConnection[Any], key_id: uuid.UUID, enabled: bool, reason: str | None) -> bool:
    cur = await conn.execute(
        """UPDATE virtual_keys SET enabled = %s, disabled_reason = %s, updated_at = now()
           WHERE key_id = %s RETURNING 1""",
        (enabled, None if enabled else reason, key_id),
    )
    return await cur.fetchone() is not None


async def insert_fired(
    conn: AsyncConnection[Any],
    *,
    scope: str,
    period_start: datetime,
    kind: str,
    threshold: float,
    spend_micros: int,
    limit_micros: int,
    actions: Sequence[str],
) -> bool:
    """The once-only gate: True for the one caller that records this alert first."""
    cur = await conn.execute(
        """INSERT INTO budget_alerts_fired (scope, period_start, kind, threshold, spend_micros, limit_micros, actions)
           VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1""",
        (scope, period_start, kind, threshold, spend_micros, limit_micros, list(actions)),
    )
    return await cur.fetchone() is not None
