"""Writes usage batches to TimescaleDB: raw events and their rollups in one transaction.

Group commit: batches that arrive while the store's writers (`INGEST_WRITERS`) are busy wait in
a queue, and the next free writer commits all of them (up to `INGEST_GROUP_EVENTS` events) in one
transaction. Each caller still gets its answer only after that commit. One transaction per group
instead of per batch costs the database far less per event: fewer statements and commits, and
fewer rollup rows (a group's events share more rollup groups than one batch's).

Per transaction: binary COPY into a session temp table (the staging table). When no request id
is in the group twice, the same rows are then copied straight into the `usage_events`
hypertable (COPY inserts rows in bulk; INSERT ... ON CONFLICT checks and inserts them one at a
time, at about twice the cost), and one statement appends the rollups of the staged rows. The
hypertable's unique index on (event_time, request_id) is what keeps this idempotent: if any
event is already stored (a retried batch), the COPY fails with a unique violation, nothing of
the transaction remains, and the group is written again the conflict-checking way: one
statement that inserts into the hypertable with `ON CONFLICT DO NOTHING` and, from exactly the
rows really inserted, appends the rollups and returns the identities that were not new. Either
way the rollups get one row per group of the new events in the hourly rollups (full
dimensions, global without the key, and per key only), the daily fingerprint rollup and the
provider minutes, and unknown keys are registered. So a replayed event changes nothing anywhere.
Rollup rows are appended to the rollups' delta tables (plain tables: no row is updated, so
concurrent batches never wait on each other); the compactor (compaction.py) merges them into
the merged tables, and the hourly rows' day sums into the daily rollups. The conflict-checking
insert goes in the unique index's order so concurrent batches take its locks in the same order
(copies may deadlock each other on shared identities: PostgreSQL detects it and the group is
retried).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from prometheus_client import Counter as PromCounter
from psycopg import AsyncConnection, sql
from psycopg._copy_base import format_row_binary  # psycopg's own (C) row encoder; psycopg is pinned
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap, Transformer
from psycopg.pq import Format
from psycopg.types.numeric import DecimalBinaryDumper

from services.ingest.events import ValidEvent
from tally.runtime.db import Database
from tally.usage.schema import (
    COLUMNS,
    COPY_TYPES,
    FINGERPRINTS,
    HISTOGRAM_BOUNDS_SQL,
    HOURLY,
    ROLLUP_GROUP,
    ROLLUP_SUMS,
    derived_rollup_ctes,
    provider_minutes_cte,
    rollup_aggregates,
)

log = logging.getLogger("tally.ingest.store")

GROUPS = PromCounter(
    "tally_ingest_groups_total",
    "Transactions of usage batches, by how the events reached usage_events: copied (straight"
    " COPY), conflict_checked (INSERT ... ON CONFLICT DO NOTHING, after a copy hit an event"
    " already stored or when a batch repeats a request id).",
    ["path"],
)

_RETRIES = 3
# Most keys remembered as registered (beyond it the memory starts again).
_REGISTERED_LIMIT = 1_000_000

_BOUNDS = HISTOGRAM_BOUNDS_SQL
_SUM_COLUMNS = ROLLUP_SUMS

# The global and per-key rows of a batch are sums of its hourly rows (cheaper than
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


# What the rollups, key registration and the answer read of the inserted rows (not the tags,
# end-user hash or price id, which would only be copied along).
_RETURNED = ", ".join(
    ("event_time", "request_id", "key_id", "provider", "model", "operation", "input_tokens", "output_tokens",
     "cached_read_tokens", "cache_write_tokens", "reasoning_tokens", "images", "audio_seconds", "latency_ms",
     "ttft_ms", "http_status", "error_type", "streaming", "tools_used", "prompt_fingerprint", "cost_micros",
     "cost_source", "ingested_at")
)  # fmt: skip


_BUCKETS = f"width_bucket(latency_ms - 1, {_BOUNDS}) AS lb, width_bucket(ttft_ms - 1, {_BOUNDS}) AS tb"


def _rollup_ctes(late_threshold_seconds: int) -> str:
    """CTEs appending the rollups of `ins` (the new events, with their histogram buckets) and
    registering the keys in %(new_keys)s (those of the group not known to be registered)."""
    return f"""
    {_rollup_insert("hourly", HOURLY.delta, "1 hour", late_threshold_seconds)},
    {derived_rollup_ctes()},
    fingerprints AS (
        INSERT INTO {FINGERPRINTS.delta} (bucket, prompt_fingerprint, provider, model, requests,
                                              input_tokens, cost_micros)
        SELECT time_bucket('1 day', event_time), prompt_fingerprint, provider, model,
               count(*), tally_sum8(input_tokens), coalesce(tally_sum8(cost_micros), 0)
        FROM ins WHERE prompt_fingerprint IS NOT NULL GROUP BY 1, 2, 3, 4),
    {provider_minutes_cte("minutes", "ins")},
    keys AS (
        INSERT INTO virtual_keys (key_id, key_name)
        SELECT k.id, k.id::text FROM unnest(%(new_keys)s::uuid[]) AS k (id) ORDER BY 1
        ON CONFLICT (key_id) DO NOTHING)"""  # noqa: S608


def _batch_sql(late_threshold_seconds: int) -> str:
    """One statement: insert the staged events that are new, append their rollups, register
    the new keys, and return the identities that were not inserted (already stored)."""
    return f"""
    WITH ins AS (
        INSERT INTO usage_events SELECT * FROM ingest_staging ORDER BY event_time, request_id
        ON CONFLICT DO NOTHING
        RETURNING {_RETURNED}, {_BUCKETS}),
    {_rollup_ctes(late_threshold_seconds)}
    SELECT s.request_id, s.event_time FROM ingest_staging s
    WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.request_id = s.request_id AND ins.event_time = s.event_time)
    """  # noqa: S608


def _copied_sql(late_threshold_seconds: int) -> str:
    """After the staged events were also copied straight into usage_events (all of them new):
    append their rollups and register the new keys."""
    return f"""
    WITH ins AS MATERIALIZED (SELECT {_RETURNED}, {_BUCKETS} FROM ingest_staging),
    {_rollup_ctes(late_threshold_seconds)}
    SELECT 1 WHERE false
    """  # noqa: S608


_COLUMN_LIST = ", ".join(COLUMNS)
# Binary COPY framing (PostgreSQL's COPY binary format): the header once, then rows, then the trailer.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\0" + b"\0\0\0\0" + b"\0\0\0\0"
_COPY_TRAILER = b"\xff\xff"


class _MemoDecimalBinaryDumper(DecimalBinaryDumper):
    """psycopg's binary numeric dumper, remembering the encodings of recent values: encoding a
    Decimal was two thirds of a row's encoding, and nearly every event has the same audio seconds
    (0.000). Equal Decimals may differ in scale (1.5, 1.500); the column's numeric(20, 3) stores
    them alike."""

    _memo: dict[Decimal, bytes] = {}

    def dump(self, obj: Decimal) -> Buffer | None:
        encoded = self._memo.get(obj)
        if encoded is None:
            dumped = super().dump(obj)
            if dumped is None:
                return None
            encoded = bytes(dumped)
            if len(self._memo) < 1000:
                self._memo[obj] = encoded
        return encoded


class RowEncoder:
    """Encodes event rows as binary COPY data, as `Copy.write_row` would, but in one synchronous
    pass per batch: a batch is encoded as soon as it is validated (in its caller's task), so the
    writer's transaction only streams finished bytes. Row by row inside the transaction, every
    `await write_row` let the event loop run other work while the transaction stayed open."""

    def __init__(self) -> None:
        adapters = AdaptersMap(psycopg.adapters)
        adapters.register_dumper(Decimal, _MemoDecimalBinaryDumper)
        self._transformer = Transformer(adapters)
        oids = [adapters.types.get_oid(name) for name in COPY_TYPES]
        self._transformer.set_dumper_types(oids, Format.BINARY)

    def encode(self, events: Sequence[ValidEvent]) -> bytearray:
        out = bytearray()
        transformer = self._transformer
        for event in events:
            format_row_binary(event.row, transformer, out)
        return out


async def prepare_connection(conn: AsyncConnection[Any]) -> None:
    """Creates the session temp tables once per pooled connection."""
    await conn.execute(SETUP_SQL)
    # A group's hourly rollup aggregates thousands of groups of ~60 sums: with the default
    # work_mem (4 MB) that hash aggregate spilled to disk.
    await conn.execute("SET work_mem = '64MB'")
    await conn.commit()


Identity = tuple[str, datetime]


@dataclass(frozen=True)
class Written:
    """What a write did: the identities not stored now (stored before), and the id of the
    transaction that committed the batch (budget uses it to tell spend a counter rebuild from
    the database already holds)."""

    not_new: set[Identity]
    transaction_id: int


@dataclass
class _Waiting:
    events: Sequence[ValidEvent]
    encoded: bytearray
    done: asyncio.Future[Written]
    request_ids: set[str]
    not_new: set[Identity] = field(default_factory=set)

    @property
    def distinct(self) -> bool:
        """No request id (so no identity) is in the batch twice."""
        return len(self.request_ids) == len(self.events)


class UsageStore:
    def __init__(self, db: Database, late_threshold_seconds: int, writers: int = 2, group_events: int = 10_000) -> None:
        self._db = db
        self._batch_sql = _batch_sql(late_threshold_seconds)
        self._copied_sql = _copied_sql(late_threshold_seconds)
        copy = "COPY {} ({}) FROM STDIN (FORMAT BINARY)"
        self._copy_sql = sql.SQL(copy).format(sql.Identifier("ingest_staging"), sql.SQL(_COLUMN_LIST))
        self._copy_events_sql = sql.SQL(copy).format(sql.Identifier("usage_events"), sql.SQL(_COLUMN_LIST))
        self._writers = writers
        self._group_events = group_events
        self._encoder = RowEncoder()
        # Keys known to be in virtual_keys (registered by a committed group; keys are never
        # deleted): a group registers only its other keys, usually none, instead of one
        # conflicting insert per key and group.
        self._registered: set[uuid.UUID] = set()
        self._queue: deque[_Waiting] = deque()
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, events: Sequence[ValidEvent]) -> Written:
        """Stores the events; returns the identities not stored now (already stored before).
        An identity given twice in `events` is stored once; telling the copies apart is the
        caller's (the first is new unless returned)."""
        if not events:
            return Written(set(), 0)
        waiting = _Waiting(
            events,
            self._encoder.encode(events),
            asyncio.get_running_loop().create_future(),
            {event.request_id for event in events},
        )
        self._queue.append(waiting)
        if self._active < self._writers:
            self._active += 1
            # A fresh context: the group's transaction must not inherit this caller's deadline.
            task = asyncio.create_task(self._drain(), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await waiting.done

    async def _drain(self) -> None:
        try:
            while self._queue:
                group = self._take_group()
                if not group:
                    continue
                try:
                    db_not_new, transaction_id = await self._write_group(group)
                except BaseException as exc:
                    for waiting in group:
                        if not waiting.done.done():
                            waiting.done.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for waiting in group:
                    if db_not_new:
                        waiting.not_new |= {e.identity for e in waiting.events} & db_not_new
                    if not waiting.done.done():
                        waiting.done.set_result(Written(waiting.not_new, transaction_id))
        finally:
            self._active -= 1

    def _take_group(self) -> list[_Waiting]:
        """Waiting batches in arrival order, up to the group size (always at least one);
        batches whose caller has gone (cancelled) are dropped unwritten."""
        group: list[_Waiting] = []
        count = 0
        while self._queue:
            waiting = self._queue[0]
            if waiting.done.done():
                self._queue.popleft()
                continue
            if group and count + len(waiting.events) > self._group_events:
                break
            self._queue.popleft()
            group.append(waiting)
            count += len(waiting.events)
        return group

    async def _write_group(self, group: list[_Waiting]) -> tuple[set[Identity], int]:
        """Writes the group in one transaction. An identity in several batches of the group is
        written with the first; the later batches are told it was not new."""
        encoded = [waiting.encoded for waiting in group]
        if len(group) > 1 and _request_ids_overlap(group):
            owner: dict[Identity, int] = {}
            combined: list[ValidEvent] = []
            for number, waiting in enumerate(group):
                for event in waiting.events:
                    identity = event.identity
                    first = owner.setdefault(identity, number)
                    if first == number:
                        combined.append(event)
                    else:
                        waiting.not_new.add(identity)
            encoded = [self._encoder.encode(combined)]
        new_keys = {event.key_id for waiting in group for event in waiting.events} - self._registered
        # Each identity is in the encoded rows once, so they can go straight into usage_events
        # (a COPY: far cheaper than INSERT ... ON CONFLICT) unless one is already stored there.
        copied = all(waiting.distinct for waiting in group)
        attempt = 1
        while True:
            try:
                written = await self._write_once(encoded, new_keys, copied)
            except psycopg.errors.UniqueViolation:
                if not copied:
                    raise
                # An event of the group is already stored (a retried batch, or one committed by a
                # concurrent group): the conflict-checking insert stores the others and tells which.
                copied = False
                continue
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == _RETRIES:
                    raise
                log.warning("batch write retried after a lock conflict", extra={"attempt": attempt})
                attempt += 1
                continue
            GROUPS.labels("copied" if copied else "conflict_checked").inc()
            if len(self._registered) + len(new_keys) > _REGISTERED_LIMIT:
                self._registered.clear()
            self._registered |= new_keys
            return written

    async def _write_once(
        self, encoded: list[bytearray], new_keys: set[uuid.UUID], copied: bool
    ) -> tuple[set[Identity], int]:
        """Returns the identities not inserted and the transaction's id. With `copied`, the rows
        are copied into usage_events as they are (an identity already stored raises
        UniqueViolation and nothing is written); otherwise only the new ones are inserted."""
        async with self._db.transaction() as conn, conn.cursor() as cur:
            await _copy_rows(cur, self._copy_sql, encoded)
            if copied:
                await _copy_rows(cur, self._copy_events_sql, encoded)
                await cur.execute(self._copied_sql, {"new_keys": list(new_keys)})
                not_new: set[Identity] = set()
            else:
                await cur.execute(self._batch_sql, {"new_keys": list(new_keys)})
                not_new = {(row[0], row[1]) for row in await cur.fetchall()}
            await cur.execute("SELECT pg_current_xact_id()::text")
            row = await cur.fetchone()
            assert row is not None
            return not_new, int(row[0])


async def _copy_rows(cur: psycopg.AsyncCursor[Any], statement: sql.Composed, encoded: list[bytearray]) -> None:
    async with cur.copy(statement) as copy:
        await copy.write(_COPY_HEADER)
        for rows in encoded:
            await copy.write(rows)
        await copy.write(_COPY_TRAILER)


def _request_ids_overlap(group: list[_Waiting]) -> bool:
    """Whether a request id is in more than one batch of the group (then an identity may be)."""
    seen: set[str] = set()
    total = 0
    for waiting in group:
        total += len(waiting.request_ids)
        seen |= waiting.request_ids
        if len(seen) < total:
            return True
    return False
