"""The ingest store's group commit against real TimescaleDB: batches that wait while a writer is
busy are committed together, and each event is still stored and reported new exactly once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg._copy_base import format_row_binary
from psycopg.adapt import Transformer
from psycopg.pq import Format
from pydantic import SecretStr
from redis.asyncio import Redis as AsyncRedis

from services.ingest import recalc
from services.ingest.aftercommit import AfterCommit, Outcome
from services.ingest.app import Ingestor
from services.ingest.compaction import Compactor
from services.ingest.events import MAX_COUNT, IngestPolicy, Rejected, ValidEvent, validate
from services.ingest.prices import PriceRepository
from services.ingest.pricing import PriceBook
from services.ingest.store import RowEncoder, UsageStore, Written, _Waiting, prepare_connection
from tally.devstack import Postgres, Redis
from tally.ingest.v1 import ingest_pb2
from tally.runtime.config import Settings
from tally.runtime.db import Database
from tally.runtime.migrate import apply_migrations
from tally.usage import live
from tally.usage.compaction import compact_provider_minutes, merge_rollups
from tally.usage.schema import COPY_TYPES, HOURLY, MERGED_ROLLUPS, ROLLUP_SUMS
from tests.conftest import settings_for_new_database
from tests.usage_support import EventFactory, recent

MODELS = [("openai", "gpt-4o"), ("anthropic", "claude-3-haiku")]


def valid_events(factory: EventFactory, count: int) -> list[ValidEvent]:
    policy = IngestPolicy(
        late_window=timedelta(days=7),
        future_skew=timedelta(minutes=5),
        late_threshold=timedelta(minutes=5),
        end_user_key=b"store-test-secret",
    )
    now = datetime.now(UTC)
    book = PriceBook([])  # unpriced: cost plays no part in what is tested here
    return [validate(e, now, policy, book) for e in factory.events(count, recent(hours=3), timedelta(hours=2))]


def accepted_of(batch: Sequence[ValidEvent], not_new: set[tuple[str, datetime]]) -> list[ValidEvent]:
    """What the ingest service reports as accepted (the same rule as Ingestor.record)."""
    seen: set[tuple[str, datetime]] = set()
    out = []
    for event in batch:
        if event.identity not in not_new and event.identity not in seen:
            seen.add(event.identity)
            out.append(event)
    return out


async def test_waiting_batches_commit_together_and_each_event_counts_once(database: Database) -> None:
    factory = EventFactory(seed=31, models=MODELS)
    pool = valid_events(factory, 3000)
    rng = factory.rng
    # 12 batches drawn from one pool: identities repeat within and across batches.
    batches = [[rng.choice(pool) for _ in range(400)] for _ in range(12)]
    store = UsageStore(database, late_threshold_seconds=300, writers=1, group_events=2000)
    transactions: list[int] = []
    write_group = store._write_group

    async def counting(group: list[_Waiting]) -> tuple[set[tuple[str, datetime]], int]:
        transactions.append(sum(len(waiting.events) for waiting in group))
        return await write_group(group)

    store._write_group = counting  # type: ignore[method-assign]
    answers = await asyncio.gather(*(store.write(batch) for batch in batches))

    # One writer: the first batch alone, then the ones that waited, at most 2,000 events a group.
    assert len(transactions) < len(batches)
    assert max(transactions) <= 2000
    accepted = [e for batch, w in zip(batches, answers, strict=True) for e in accepted_of(batch, w.not_new)]
    # Batches committed together carry their group's transaction id.
    assert len({w.transaction_id for w in answers}) == len(transactions)
    distinct = {e.identity for batch in batches for e in batch}
    assert sorted(e.identity for e in accepted) == sorted(distinct)  # each event new exactly once

    # The same batches again: nothing is new, nothing changes.
    again = await asyncio.gather(*(store.write(batch) for batch in batches))
    assert all(accepted_of(batch, w.not_new) == [] for batch, w in zip(batches, again, strict=True))
    async with database.transaction() as conn:
        stored = await (await conn.execute("SELECT count(*), sum(input_tokens) FROM usage_events")).fetchone()
        hourly = await (
            await conn.execute("SELECT sum(requests), sum(input_tokens) FROM usage_rollup_hourly")
        ).fetchone()
        daily_key = await (await conn.execute("SELECT sum(requests) FROM usage_rollup_daily_key")).fetchone()
    assert stored is not None and hourly is not None and daily_key is not None
    expected_tokens = sum({e.identity: e.row[6] for e in accepted}.values())
    assert (stored[0], stored[1]) == (len(distinct), expected_tokens)
    assert (hourly[0], hourly[1]) == (len(distinct), expected_tokens)
    assert daily_key[0] == len(distinct)


def groups(path: str) -> float:
    return REGISTRY.get_sample_value("tally_ingest_groups_total", {"path": path}) or 0.0


async def raw_and_rollup_totals(database: Database) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(count, input tokens) of the raw events and the same sums of the hourly rollup."""
    async with database.transaction() as conn:
        raw = await (await conn.execute("SELECT count(*), sum(input_tokens) FROM usage_events")).fetchone()
        hourly = await (
            await conn.execute("SELECT sum(requests), sum(input_tokens) FROM usage_rollup_hourly")
        ).fetchone()
    assert raw is not None and hourly is not None
    return tuple(raw), tuple(hourly)


async def test_new_events_are_copied_and_a_group_with_a_stored_one_is_conflict_checked(database: Database) -> None:
    """A group of new events goes into usage_events by COPY; one holding an event already stored
    fails that copy as a whole and is written again with the conflict check, which stores the
    rest and reports the stored one; a batch repeating a request id is conflict-checked at once."""
    factory = EventFactory(seed=35, models=MODELS)
    events = valid_events(factory, 1200)
    store = UsageStore(database, late_threshold_seconds=300, writers=1)
    write_once = store._write_once
    calls: list[tuple[bool, str]] = []

    async def recording(
        encoded: list[bytearray], new_keys: set[Any], copied: bool
    ) -> tuple[set[tuple[str, datetime]], int]:
        try:
            written = await write_once(encoded, new_keys, copied)
        except Exception as exc:
            calls.append((copied, type(exc).__name__))
            raise
        calls.append((copied, "ok"))
        return written

    store._write_once = recording  # type: ignore[method-assign]
    first = await store.write(events[:500])
    assert (calls, first.not_new) == ([(True, "ok")], set())

    calls.clear()
    retried = events[300:800]  # 200 stored, 300 new
    second = await store.write(retried)
    assert calls == [(True, "UniqueViolation"), (False, "ok")]
    assert second.not_new == {e.identity for e in events[300:500]}

    calls.clear()
    repeating = [*events[800:1000], events[900]]  # the same event twice in one batch
    third = await store.write(repeating)
    assert calls == [(False, "ok")]
    assert accepted_of(repeating, third.not_new) == events[800:1000]

    stored = events[:1000]
    expected = (len(stored), sum(e.row[6] for e in stored))
    raw, hourly = await raw_and_rollup_totals(database)
    assert raw[0] == hourly[0] == expected[0]
    assert raw[1] == hourly[1] == expected[1]


async def test_concurrent_copies_sharing_events_store_each_once(database: Database) -> None:
    """Two stores (as two ingest replicas) with two writers each get batches without repeats
    inside, drawn from one pool: groups copy, collide on shared events (a unique violation or a
    deadlock), fall back, and every event is accepted once and counted once in the rollups."""
    factory = EventFactory(seed=36, models=MODELS)
    pool = valid_events(factory, 2000)
    rng = factory.rng
    batches = [rng.sample(pool, 300) for _ in range(16)]
    stores = [UsageStore(database, late_threshold_seconds=300, writers=2) for _ in range(2)]
    before = {path: groups(path) for path in ("copied", "conflict_checked")}
    answers = await asyncio.gather(*(stores[n % 2].write(batch) for n, batch in enumerate(batches)))
    assert groups("copied") > before["copied"]
    assert groups("conflict_checked") > before["conflict_checked"]
    accepted = [e.identity for batch, w in zip(batches, answers, strict=True) for e in accepted_of(batch, w.not_new)]
    distinct = {e.identity: e for batch in batches for e in batch}
    assert sorted(accepted) == sorted(distinct)
    raw, hourly = await raw_and_rollup_totals(database)
    tokens = sum(e.row[6] for e in distinct.values())
    assert raw[:2] == hourly[:2] == (len(distinct), tokens)


async def test_a_failed_group_fails_each_of_its_callers_and_the_next_group_proceeds(database: Database) -> None:
    factory = EventFactory(seed=32, models=MODELS)
    events = valid_events(factory, 300)
    store = UsageStore(database, late_threshold_seconds=300, writers=1)
    write_group = store._write_group
    calls = 0

    async def failing_first(group: list[_Waiting]) -> tuple[set[tuple[str, datetime]], int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise psycopg.OperationalError("connection lost")
        return await write_group(group)

    store._write_group = failing_first  # type: ignore[method-assign]
    first = await asyncio.gather(store.write(events[:100]), return_exceptions=True)
    assert isinstance(first[0], psycopg.OperationalError)
    assert (await store.write(events[100:])).not_new == set()
    async with database.transaction() as conn:
        row: Any = await (await conn.execute("SELECT count(*) FROM usage_events")).fetchone()
    assert row[0] == 200


async def test_a_group_registers_only_keys_not_yet_registered_by_a_committed_group(database: Database) -> None:
    """Unknown keys are registered in the group's transaction; the store then remembers them and
    later groups pass none of them again. A group that fails leaves its keys unremembered, so
    the next group with them registers them."""
    factory = EventFactory(seed=34, models=MODELS)
    events = valid_events(factory, 300)
    keys = {e.key_id for e in events}
    store = UsageStore(database, late_threshold_seconds=300, writers=1)
    write_once = store._write_once
    passed: list[set[Any]] = []

    async def recording(
        encoded: list[bytearray], new_keys: set[Any], copied: bool
    ) -> tuple[set[tuple[str, datetime]], int]:
        passed.append(set(new_keys))
        if len(passed) == 1:
            raise psycopg.OperationalError("connection lost")
        return await write_once(encoded, new_keys, copied)

    async def registered() -> set[Any]:
        async with database.transaction() as conn:
            cursor = await conn.execute("SELECT key_id FROM virtual_keys WHERE key_id = ANY(%s)", (list(keys),))
            return {row[0] for row in await cursor.fetchall()}

    store._write_once = recording  # type: ignore[method-assign]
    failed = await asyncio.gather(store.write(events[:100]), return_exceptions=True)
    assert isinstance(failed[0], psycopg.OperationalError)
    assert await registered() == set()
    await store.write(events[100:200])
    await store.write(events[200:])
    assert len(keys) == 4  # the factory's keys, each in every slice of 100 events
    assert passed == [keys, keys, set()]  # the failed group's keys are passed again, then none
    assert await registered() == keys


async def test_merged_rollups_migration_keeps_every_sum(
    infra: tuple[Postgres, Redis, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 0016 on a database holding append-only rollups with several rows per group:
    afterwards each rollup (now a view) has the same sums, its merged table one row per group,
    and new delta rows are merged in by the compactor's statement."""
    postgres = infra[0]
    settings = settings_for_new_database(postgres, "merge_migration", monkeypatch)
    await apply_migrations(settings, until=15)
    hour = datetime(2026, 11, 3, 10, tzinfo=UTC)
    sums = ", ".join(ROLLUP_SUMS)
    rows = [  # (hour offset, key, requests, cost): key k1 twice in hour 0, k2 once, k1 once in hour 1
        (0, "00000000-0000-0000-0000-000000000001", 3, 1_000),
        (0, "00000000-0000-0000-0000-000000000001", 2, 250),
        (0, "00000000-0000-0000-0000-000000000002", 1, 7),
        (1, "00000000-0000-0000-0000-000000000001", 5, 40),
    ]
    async with await psycopg.AsyncConnection.connect(settings.database_url, password=postgres.password) as conn:
        for offset, key, requests, cost in rows:
            values = ", ".join(
                str(requests if c == "requests" else cost if c == "cost_micros" else 0) for c in ROLLUP_SUMS
            )
            await conn.execute(
                f"""INSERT INTO usage_rollup_hourly (bucket, key_id, provider, model, operation, status_class,
                        error_type, {sums}) VALUES (%s, %s, 'p', 'm', 'chat.completions', '2xx', '', {values})""",  # noqa: S608
                (hour + timedelta(hours=offset), key),
            )
            await conn.execute(
                """INSERT INTO prompt_fingerprint_daily (bucket, prompt_fingerprint, provider, model, requests,
                       input_tokens, cost_micros) VALUES (%s, 'fp', 'p', 'm', %s, 0, %s)""",
                (hour.replace(hour=0), requests, cost),
            )
        await conn.commit()
    assert await apply_migrations(settings, until=17) == [16, 17]

    async with await psycopg.AsyncConnection.connect(settings.database_url, password=postgres.password) as conn:

        async def one(query: str) -> tuple[Any, ...]:
            row = await (await conn.execute(query)).fetchone()
            assert row is not None
            return tuple(row)

        totals = "SELECT sum(requests), sum(cost_micros), count(*) FROM {}"
        assert await one(totals.format("usage_rollup_hourly")) == (11, 1_297, 3)
        assert await one(totals.format("usage_rollup_hourly_merged")) == (11, 1_297, 3)
        assert await one(totals.format("prompt_fingerprint_daily")) == (11, 1_297, 1)
        assert await one("SELECT count(*) FROM usage_rollup_hourly_delta") == (0,)
        # A writer's delta row, then the compactor's merge: same sums, still one row per group.
        await conn.execute(
            f"""INSERT INTO usage_rollup_hourly_delta (bucket, key_id, provider, model, operation, status_class,
                    error_type, {sums}) SELECT bucket, key_id, provider, model, operation, status_class, error_type,
                    {sums} FROM usage_rollup_hourly_merged WHERE bucket = %s""",  # noqa: S608
            (hour,),
        )
        assert await one(totals.format("usage_rollup_hourly")) == (17, 2_554, 5)
        await conn.commit()
        for statement in HOURLY.merge_statements():
            await conn.execute(statement)
        await conn.commit()
        assert await one(totals.format("usage_rollup_hourly")) == (17, 2_554, 3)
        assert await one("SELECT count(*) FROM usage_rollup_hourly_delta") == (0,)


async def test_daily_rollups_follow_their_hourly_rollups(
    infra: tuple[Postgres, Redis, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 0018 merges the delta rows pending in both grains (written by the ingest of
    before: hourly rows and their daily copies) without counting any twice; afterwards hourly
    delta rows show in the daily view at once, moved to their day, and a merge moves their day
    sums into the daily merged table: the daily sums stay the same throughout."""
    postgres = infra[0]
    settings = settings_for_new_database(postgres, "daily_follows", monkeypatch)
    await apply_migrations(settings, until=17)
    day = datetime(2026, 11, 3, tzinfo=UTC)
    sums = ", ".join(ROLLUP_SUMS)
    key = "00000000-0000-0000-0000-0000000000d1"

    def values(requests: int) -> str:
        return ", ".join(str(requests if c in ("requests", "cost_micros") else 0) for c in ROLLUP_SUMS)

    async with await psycopg.AsyncConnection.connect(settings.database_url, password=postgres.password) as conn:

        async def append(table: str, bucket: datetime, requests: int) -> None:
            await conn.execute(
                f"""INSERT INTO {table} (bucket, key_id, provider, model, operation, status_class, error_type,
                        {sums}) VALUES (%s, %s, 'p', 'm', 'chat.completions', '2xx', '', {values(requests)})""",  # noqa: S608
                (bucket, key),
            )

        async def by_day(table: str) -> list[tuple[Any, ...]]:
            cursor = await conn.execute(
                f"SELECT bucket, sum(requests), sum(cost_micros), count(*) FROM {table} GROUP BY 1 ORDER BY 1"  # noqa: S608
            )
            return [tuple(row) for row in await cursor.fetchall()]

        # Before 0018: what an ingest of then wrote, hourly rows and their daily copies.
        for hours, requests in ((10, 3), (11, 4), (24 + 2, 5)):
            await append("usage_rollup_hourly_delta", day + timedelta(hours=hours), requests)
            await append("usage_rollup_daily_delta", day + timedelta(hours=hours // 24 * 24), requests)
        await conn.commit()
        assert await apply_migrations(settings, until=18) == [18]
        expected = [(day, 7, 7, 1), (day + timedelta(days=1), 5, 5, 1)]
        assert await by_day("usage_rollup_daily") == expected
        assert await by_day("usage_rollup_daily_merged") == expected
        assert [row[1:3] for row in await by_day("usage_rollup_hourly")] == [(3, 3), (4, 4), (5, 5)]

        # Now writers append hourly rows only; the daily view shows them moved to their day.
        await append(HOURLY.delta, day + timedelta(hours=13), 6)
        await append(HOURLY.delta, day + timedelta(hours=14), 1)
        await conn.commit()
        expected = [(day, 14, 14, 3), (day + timedelta(days=1), 5, 5, 1)]
        assert await by_day("usage_rollup_daily") == expected
        # The merge moves their day sums into the daily merged table: one row per day again.
        await conn.commit()
        for statement in HOURLY.merge_statements():
            await conn.execute(statement)
        await conn.commit()
        expected = [(day, 14, 14, 1), (day + timedelta(days=1), 5, 5, 1)]
        assert await by_day("usage_rollup_daily") == expected
        assert await by_day("usage_rollup_daily_merged") == expected
        assert await by_day(HOURLY.delta) == []
        # The daily and hourly views have the same columns, in the same order.
        cursor = await conn.execute(
            "SELECT sum(requests) FROM (SELECT * FROM usage_rollup_daily UNION ALL SELECT * FROM usage_rollup_hourly) u"
        )
        assert await cursor.fetchone() == (38,)


async def test_events_stored_before_the_time_first_index_stay_idempotent(
    infra: tuple[Postgres, Redis, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 0019 replaces the raw table's two B-trees (unique (request_id, event_time) and
    the default event_time index) by one unique (event_time, request_id): events stored before
    it are still recognised when sent again, and time reads use the new index."""
    postgres = infra[0]
    settings = settings_for_new_database(postgres, "time_first_index", monkeypatch)
    await apply_migrations(settings, until=18)
    factory = EventFactory(seed=19, models=MODELS)
    events = valid_events(factory, 300)
    before, after = events[:200], events[100:]  # 100 events in both
    db = Database(settings, configure=prepare_connection)
    await db.open()
    try:
        first = await UsageStore(db, late_threshold_seconds=300).write(before)
        assert first.not_new == set()
    finally:
        await db.close()
    assert await apply_migrations(settings, until=19) == [19]

    db = Database(settings, configure=prepare_connection)
    await db.open()
    try:
        second = await UsageStore(db, late_threshold_seconds=300).write(after)
        assert second.not_new == {e.identity for e in events[100:200]}
        stored = await db.fetch_one(
            "SELECT count(*) AS n, count(DISTINCT (request_id, event_time)) AS d FROM usage_events"
        )
        assert stored is not None and stored["n"] == stored["d"] == len({e.identity for e in events})
        rows = await db.fetch_all(
            """SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'usage_events' ORDER BY 1"""
        )
        assert [(r["indexname"], "UNIQUE" in r["indexdef"]) for r in rows] == [
            ("usage_events_ingested_brin", False),
            ("usage_events_time_request_uq", True),
        ]
        async with db.transaction() as conn:
            await conn.execute("SET LOCAL enable_seqscan = off")
            plan = await (await conn.execute("EXPLAIN SELECT max(event_time) FROM usage_events")).fetchall()
            assert "usage_events_time_request_uq" in "\n".join(row[0] for row in plan)
    finally:
        await db.close()


async def test_merged_rollup_tables_and_their_chunks_keep_room_for_hot_updates(
    infra: tuple[Postgres, Redis, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 0020 sets fillfactor 70 on every merged rollup table: on the chunks that exist
    (written before it) and on those created after it, so merges update rows in place (HOT)."""
    postgres = infra[0]
    settings = settings_for_new_database(postgres, "merged_fillfactor", monkeypatch)
    await apply_migrations(settings, until=19)
    merged = [table for rollup in MERGED_ROLLUPS for table in rollup.tables if not table.endswith("_delta")]
    sums = ", ".join(ROLLUP_SUMS)
    zeros = ", ".join("0" for _ in ROLLUP_SUMS)
    key = "00000000-0000-0000-0000-0000000000f1"
    async with await psycopg.AsyncConnection.connect(settings.database_url, password=postgres.password) as conn:

        async def merge_hour(bucket: datetime) -> None:
            await conn.execute(
                f"""INSERT INTO {HOURLY.delta} (bucket, key_id, provider, model, operation, status_class,
                        error_type, {sums}) VALUES (%s, %s, 'p', 'm', 'chat.completions', '2xx', '', {zeros})""",  # noqa: S608
                (bucket, key),
            )
            await conn.commit()
            for statement in HOURLY.merge_statements():
                await conn.execute(statement)
            await conn.commit()

        async def fillfactors(table: str) -> set[str]:
            cursor = await conn.execute(
                """SELECT coalesce(array_to_string(c.reloptions, ','), '') FROM pg_class c
                   WHERE c.oid = ANY(ARRAY[%s::regclass] || ARRAY(SELECT show_chunks(%s::regclass)))""",
                (table, table),
            )
            return {row[0] for row in await cursor.fetchall()}

        before = datetime(2026, 11, 3, 10, tzinfo=UTC)
        await merge_hour(before)  # chunks written before 0020
        assert await fillfactors(HOURLY.merged) == {""}
        assert await apply_migrations(settings, until=20) == [20]
        await merge_hour(before + timedelta(days=30))  # chunks created after 0020
        for table in merged:
            assert await fillfactors(table) == {"fillfactor=70"}, table
        cursor = await conn.execute("SELECT count(*) FROM show_chunks(%s::regclass)", (HOURLY.merged,))
        assert await cursor.fetchone() == (2,)


async def test_provider_minutes_of_many_hours_compact_in_a_few_statements(database: Database) -> None:
    """A backfill marks hundreds of hours dirty at once: one compaction merges them all, a week of
    hours per statement, into one row per minute and provider, with each hour's uptime summary
    equal to a computation from the minute rows, and no mark left for the hours compacted."""
    start = datetime(2026, 9, 1, tzinfo=UTC)
    hours = [start + timedelta(hours=h) for h in range(0, 400, 2)]  # 200 hours, over two statements
    rows = []
    for number, hour in enumerate(hours):
        for minute in (0, 1, 59):
            at = hour + timedelta(minutes=minute)
            # Two rows for one minute of `a` (two batches); `b` fails every request in minute 1.
            rows += [(at, "a", 2, 0), (at, "a", 1, number % 2), (at, "b", 3, 3 if minute == 1 else 0)]
    async with database.transaction() as conn:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO provider_minutes (bucket, provider, requests, server_failures) VALUES (%s, %s, %s, %s)",
                rows,
            )
        await conn.execute("INSERT INTO provider_minutes_dirty (bucket) SELECT unnest(%s::timestamptz[])", (hours,))
    expected = await database.fetch_all(
        """SELECT time_bucket('1 hour', bucket) AS hour, provider, count(*) AS minutes,
                  count(*) FILTER (WHERE failures = requests) AS down
           FROM (SELECT bucket, provider, sum(requests) AS requests, sum(server_failures) AS failures
                 FROM provider_minutes GROUP BY 1, 2) m GROUP BY 1, 2 ORDER BY 1, 2"""
    )
    assert len(expected) == 400

    assert await compact_provider_minutes(database, reversed(hours)) == 200

    summaries = await database.fetch_all(
        """SELECT bucket AS hour, provider, minutes, down_minutes AS down FROM provider_uptime_hourly
           ORDER BY 1, 2"""
    )
    assert summaries == expected
    per_minute = await database.fetch_one(
        """SELECT max(n) AS most, count(*) AS groups, sum(r) AS requests FROM (
               SELECT count(*) AS n, sum(requests) AS r FROM provider_minutes GROUP BY bucket, provider) g"""
    )
    assert per_minute == {"most": 1, "groups": 200 * 3 * 2, "requests": 200 * 3 * 6}
    assert await database.fetch_one("SELECT count(*) AS n FROM provider_minutes_dirty") == {"n": 0}


async def test_a_merge_that_waited_for_another_merges_only_what_that_one_left(
    database: Database, infra: tuple[Postgres, Redis, Path]
) -> None:
    """Two merges of one rollup in a row: the second, blocked while the first holds the lock,
    must not see the delta rows the first moved (nor miss rows committed while it waited)."""
    conninfo, password = Settings().database_url, infra[0].password  # the database fixture's
    sums = ", ".join(ROLLUP_SUMS)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)

    async def append(conn: psycopg.AsyncConnection[Any], requests: int) -> None:
        values = ", ".join(str(requests if c == "requests" else 0) for c in ROLLUP_SUMS)
        await conn.execute(
            f"""INSERT INTO {HOURLY.delta} (bucket, key_id, provider, model, operation, status_class, error_type,
                    {sums}) VALUES (%s, '00000000-0000-0000-0000-0000000000a1', 'p', 'm', 'chat.completions',
                    '2xx', '', {values})""",  # noqa: S608
            (hour,),
        )
        await conn.commit()

    async with (
        await psycopg.AsyncConnection.connect(conninfo, password=password) as first,
        await psycopg.AsyncConnection.connect(conninfo, password=password) as writer,
    ):
        await append(writer, 5)
        for statement in HOURLY.merge_statements():  # the first merge, left uncommitted
            await first.execute(statement)
        second = asyncio.create_task(merge_rollups(database))
        for _ in range(500):  # until the second merge waits for the lock
            waiting = await (
                await writer.execute(
                    "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND NOT granted", (HOURLY.delta,)
                )
            ).fetchone()
            await writer.commit()
            if waiting and waiting[0]:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the second merge never waited for the first")
        await append(writer, 7)  # committed while the second merge waits
        await first.commit()
        await second
        total = await (await writer.execute(f"SELECT sum(requests) FROM {HOURLY.name}")).fetchone()  # noqa: S608
        merged = await (await writer.execute(f"SELECT sum(requests), count(*) FROM {HOURLY.merged}")).fetchone()  # noqa: S608
        left = await (await writer.execute(f"SELECT count(*) FROM {HOURLY.delta}")).fetchone()  # noqa: S608
    assert total == (12,)
    assert merged == (12, 1)
    assert left == (0,)


def test_row_encoder_writes_what_psycopg_writes() -> None:
    """The batch encoder (with its remembered numeric encodings) gives the bytes psycopg's own
    binary COPY encoding gives, for repeated and new audio-second values alike."""
    factory = EventFactory(seed=33, models=MODELS)
    events = valid_events(factory, 40)
    seconds = [Decimal("0.000"), Decimal("1.500"), Decimal("0.000"), Decimal("12345.678"), Decimal("1.500")]
    rows = [(*e.row[:12], seconds[i % len(seconds)], *e.row[13:]) for i, e in enumerate(events)]
    plain = Transformer()
    plain.set_dumper_types([psycopg.adapters.types.get_oid(t) for t in COPY_TYPES], Format.BINARY)
    expected = bytearray()
    for row in rows:
        format_row_binary(row, plain, expected)
    encoder = RowEncoder()
    for _ in range(2):  # the second pass answers from the remembered encodings
        assert encoder.encode([replace(e, row=row) for e, row in zip(events, rows, strict=True)]) == expected


# The policy of the bound tests: 7-day late window, 5 minutes of future skew and of late threshold.
BOUNDS_POLICY = IngestPolicy(timedelta(days=7), timedelta(minutes=5), timedelta(minutes=5), b"bounds")


def bounds_event(at: datetime) -> ingest_pb2.UsageEvent:
    event = ingest_pb2.UsageEvent(
        request_id="bounds",
        virtual_key_id="00000000-0000-0000-0000-00000000000b",
        provider="openai",
        model="gpt-4o",
        operation="chat.completions",
    )
    event.event_time.FromDatetime(at)
    return event


@pytest.mark.parametrize(
    ("changes", "rejected"),
    [
        ({}, None),
        ({"input_tokens": MAX_COUNT, "reasoning_tokens": MAX_COUNT, "latency_ms": 2**31 - 1}, None),
        ({"output_tokens": 2**39 + 1, "cached_read_tokens": MAX_COUNT - 1}, None),  # above the OR check's bound
        ({"cache_write_tokens": MAX_COUNT + 1}, ("cacheWriteTokens", f"must be at most {MAX_COUNT}")),
        ({"input_tokens": 5, "output_tokens": -1}, ("outputTokens", "must not be negative")),
        ({"images": -3, "reasoning_tokens": -1}, ("reasoningTokens", "must not be negative")),
        ({"time_to_first_token_ms": -1}, ("timeToFirstTokenMs", "must not be negative")),
        ({"latency_ms": -1, "time_to_first_token_ms": -1}, ("latencyMs", "must not be negative")),
        ({"provider_cost_micros": -1}, ("providerCostMicros", "must not be negative")),
        ({"provider_cost_micros": MAX_COUNT}, None),
    ],
)
def test_counts_are_checked_exactly_at_their_bounds(changes: dict[str, int], rejected: tuple[str, str] | None) -> None:
    """Every count is in [0, MAX_COUNT]; a bad one is named (the first bad one in field order)."""
    now = datetime.now(UTC)
    event = bounds_event(now)
    for name, value in ({"input_tokens": 10, "output_tokens": 5, "latency_ms": 100} | changes).items():
        setattr(event, name, value)
    if rejected is None:
        valid = validate(event, now, BOUNDS_POLICY, PriceBook([]))
        assert valid.row[6:11] == (
            event.input_tokens,
            event.output_tokens,
            event.cached_read_tokens,
            event.cache_write_tokens,
            event.reasoning_tokens,
        )
    else:
        with pytest.raises(Rejected) as caught:
            validate(event, now, BOUNDS_POLICY, PriceBook([]))
        assert (caught.value.field, caught.value.reason) == rejected


async def test_hand_offs_carry_at_most_the_settle_batch_and_every_priced_event_once() -> None:
    """Ingest hands spend to budget in SettleBatch requests of at most `settle_batch` requests
    (budget refuses more than INGEST_MAX_BATCH), each event of a cost in exactly one of them,
    in the spend group of its key and provider."""
    factory = EventFactory(seed=37, models=MODELS)
    events = [replace(e, cost_micros=n % 7 * 100) for n, e in enumerate(valid_events(factory, 1000))]
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never used: nothing is flushed
    after = AfterCommit(None, channel, SecretStr("k"), ZoneInfo("UTC"), settle_batch=300)  # type: ignore[arg-type]
    for start in range(0, 1000, 250):
        after._fold(Outcome.of(events[start : start + 250], 0, 0, transaction_id=start // 500 + 1))
    requests = [handoff.request for handoff in after._settlements]
    assert max(len(r.request_ids) for r in requests) <= 300
    handed = {
        rid: (cost, r.groups[g].key_id, r.groups[g].provider)
        for r in requests
        for rid, cost, g in zip(r.request_ids, r.actual_cost_micros, r.group_index, strict=True)
    }
    assert sum(len(r.request_ids) for r in requests) == len(handed)
    assert handed == {e.request_id: (e.cost_micros, e.key_text, e.provider) for e in events if e.cost_micros}
    await channel.close()


@pytest.mark.parametrize(
    ("age", "outcome"),
    [
        (-timedelta(minutes=5), "on time"),  # exactly the allowed future skew
        (-timedelta(minutes=5, microseconds=1), "eventTime"),
        (timedelta(minutes=5), "on time"),  # exactly the late threshold: not late yet
        (timedelta(minutes=5, microseconds=1), "late"),
        (timedelta(days=7), "late"),  # exactly the late window: still accepted
        (timedelta(days=7, microseconds=1), "eventTime"),
    ],
)
def test_time_bounds_are_exact_to_the_microsecond(age: timedelta, outcome: str) -> None:
    """The window checks and the late flag, at their bounds; the same `now` validated against two
    policies in a row uses each policy's own bounds."""
    now = datetime(2026, 12, 6, 12, 0, 0, 500_000, tzinfo=UTC)
    event = bounds_event(now - age)
    wide = IngestPolicy(timedelta(days=30), timedelta(days=1), timedelta(days=1), b"bounds")
    assert not validate(event, now, wide, PriceBook([])).late or age > timedelta(days=1)
    if outcome == "eventTime":
        with pytest.raises(Rejected) as caught:
            validate(event, now, BOUNDS_POLICY, PriceBook([]))
        assert caught.value.field == "eventTime"
    else:
        assert validate(event, now, BOUNDS_POLICY, PriceBook([])).late == (outcome == "late")


async def test_live_counts_not_flushed_make_their_buckets_incomplete(infra: tuple[Postgres, Redis, Path]) -> None:
    """Counts lost to an unreachable Redis or to a full after-commit queue make every bucket up
    to their last minute incomplete: the next flush that reaches Redis raises the live counters'
    complete-since instant past that minute (never lowers it), and only then forgets it."""
    factory = EventFactory(seed=41, models=MODELS)
    events = valid_events(factory, 300)
    first, second = events[:200], events[200:]
    end_of = {
        name: (max(e.epoch_seconds for e in part) // 60 + 1) * 60_000 for name, part in (("a", first), ("b", second))
    }
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never used: nothing is settled
    down = AsyncRedis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=1)  # nothing listens there
    after = AfterCommit(down, channel, SecretStr("k"), ZoneInfo("UTC"), queue_size=1)
    after._fold(Outcome.of(first, 0, 0, transaction_id=1))
    await after._flush_counters()
    assert not after.redis_ok
    assert after._live_floor_ms == end_of["a"]
    after.submit(Outcome.of([], 0, 0))  # fills the queue (nothing folds it here)
    after.submit(Outcome.of(second, 0, 0, transaction_id=2))  # dropped
    assert after._live_floor_ms == max(end_of.values())

    up = AsyncRedis.from_url(infra[1].url.rsplit("/", 1)[0] + "/9")  # a database of its own
    try:
        await up.set(live.SINCE_KEY, 1)
        await up.set(live.RUN_KEY, (await up.info("server"))["run_id"])  # the same Redis as before
        after._redis = up
        await after._flush_counters()
        assert after.redis_ok and after._live_floor_ms == 0
        assert int(await up.get(live.SINCE_KEY)) == max(end_of.values())
        await up.set(live.SINCE_KEY, 10**15)
        await after._flush_counters()
        assert int(await up.get(live.SINCE_KEY)) == 10**15  # never lowered
    finally:
        await up.flushdb()
        await up.aclose()
        await down.aclose()
        await channel.close()


async def test_after_counts_of_unknown_events_were_lost_the_instant_is_the_latest_stored_event(
    database: Database, infra: tuple[Postgres, Redis, Path]
) -> None:
    """A Redis with no complete-since instant (new, or it lost its data): every event stored
    before has an event time at most the latest one stored, so the counters are complete from
    the end of that event's minute (from the start on an empty database), and never from before
    what counts not flushed asked for."""
    up = AsyncRedis.from_url(infra[1].url.rsplit("/", 1)[0] + "/10")  # a database of its own
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never used: nothing is settled
    after = AfterCommit(up, channel, SecretStr("k"), ZoneInfo("UTC"), db=database)
    try:
        await after._flush_counters()
        assert await up.get(live.SINCE_KEY) == b"0"  # an empty database: nothing can be missing
        events = valid_events(EventFactory(seed=43, models=MODELS), 50)
        await UsageStore(database, 300).write(events)
        await up.delete(live.SINCE_KEY)
        await after._flush_counters()
        latest = max(e.epoch_seconds for e in events)
        assert int(await up.get(live.SINCE_KEY) or -1) == (latest // 60 + 1) * 60_000
        await up.set(live.FLOOR_KEY, 10**13)  # a replica could not flush counts up to then
        await up.delete(live.SINCE_KEY)
        await after._flush_counters()
        assert int(await up.get(live.SINCE_KEY) or -1) == 10**13
    finally:
        await up.flushdb()
        await up.aclose()
        await channel.close()


async def test_recalculation_rates_a_day_in_slices_and_keeps_rollups_equal(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A day is re-rated in slices of RECALC_SLICE events (each its own transaction, in
    (event_time, request_id) order): every event of the day once, none of another day, and the
    rollups still equal the raw events."""
    monkeypatch.setattr(recalc, "RECALC_SLICE", 7)
    events = valid_events(EventFactory(seed=47, models=MODELS), 100)  # unpriced when stored
    await UsageStore(database, 300).write(events)
    day = events[0].event_time.astimezone(UTC).date()
    of_day = [e for e in events if e.event_time.astimezone(UTC).date() == day]
    for provider, model in MODELS:  # $0.001 per request from long before
        await database.fetch_one(
            "INSERT INTO model_prices (provider, model, effective_from, per_request) "
            "VALUES (%s, %s, '2020-01-01', 0.001) RETURNING price_id",
            (provider, model),
        )
    prices = PriceRepository(database)
    await prices.reload()
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never used here
    runner = recalc.Recalculator(database, prices, Compactor(database, 10, timedelta(days=7)), channel, SecretStr("k"))
    job = await runner.submit(recalc.JobSpec(day, day, ()))
    await runner._run_day(uuid.UUID(job.job_id), day, [])
    row = await database.fetch_one(
        "SELECT days_done, events_scanned, events_changed, cost_after FROM recalculation_jobs WHERE job_id = %s",
        (job.job_id,),
    )
    assert row is not None
    assert (row["days_done"], row["events_scanned"], row["events_changed"]) == (1, len(of_day), len(of_day))
    assert row["cost_after"] == 1000 * len(of_day)
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    raw = await database.fetch_one(
        "SELECT count(*) FILTER (WHERE cost_micros = 1000) AS priced, coalesce(sum(cost_micros), 0) AS cost "
        "FROM usage_events WHERE event_time >= %s AND event_time < %s",
        (start, start + timedelta(days=1)),
    )
    rolled = await database.fetch_one(
        "SELECT coalesce(sum(cost_micros), 0) AS cost FROM usage_rollup_hourly WHERE bucket >= %s AND bucket < %s",
        (start, start + timedelta(days=1)),
    )
    assert raw is not None and rolled is not None
    assert (raw["priced"], raw["cost"], rolled["cost"]) == (len(of_day), 1000 * len(of_day), 1000 * len(of_day))
    await channel.close()


async def test_a_write_whose_commit_is_unknown_counts_as_lost_for_live_counters_and_budget(
    database: Database,
) -> None:
    """The connection failing during a write may come after the commit: the events would be
    stored, never counted, and a retry would find them stored. So their minutes' live counters
    are taken as incomplete and budget is asked to rebuild, and the caller gets the error."""

    class FailingStore:
        async def write(self, events: Sequence[ValidEvent]) -> None:
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    factory = EventFactory(seed=53, models=MODELS)
    events = factory.events(20, recent(hours=1), timedelta(minutes=30))
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never used: nothing is flushed
    after = AfterCommit(None, channel, SecretStr("k"), ZoneInfo("UTC"))  # type: ignore[arg-type]
    prices = PriceRepository(database)
    ingestor = Ingestor(
        FailingStore(),  # type: ignore[arg-type]
        prices,
        BOUNDS_POLICY,
        after,
        Compactor(database, 10, timedelta(days=7)),
        max_batch=1000,
    )
    with pytest.raises(psycopg.OperationalError):
        await ingestor.record(events)
    last = max(int(e.event_time.ToDatetime(tzinfo=UTC).timestamp()) for e in events)
    assert after._live_floor_ms == (last // 60 + 1) * 60_000
    assert after.oldest_unreconciled is not None
    assert after.oldest_unreconciled.reason == "commit outcome unknown"
    await channel.close()


async def test_a_batch_whose_caller_goes_away_is_still_written_and_counted(database: Database) -> None:
    """A caller that gives up (a deadline) while its batch is being written: the write goes on,
    and its events are counted after the commit (live counters, budget), so a retry, finding them
    stored, loses nothing."""

    class SlowStore:
        def __init__(self) -> None:
            self.written: list[ValidEvent] = []

        async def write(self, events: Sequence[ValidEvent]) -> Written:
            await asyncio.sleep(0.2)
            self.written += events
            return Written(set(), 7)

    events = EventFactory(seed=59, models=MODELS).events(20, recent(hours=1), timedelta(minutes=30))
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never used: nothing is flushed
    after = AfterCommit(None, channel, SecretStr("k"), ZoneInfo("UTC"))  # type: ignore[arg-type]
    store = SlowStore()
    compactor = Compactor(database, 10, timedelta(days=7))
    ingestor = Ingestor(store, PriceRepository(database), BOUNDS_POLICY, after, compactor, max_batch=1000)  # type: ignore[arg-type]
    caller = asyncio.create_task(ingestor.record(events))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0.4)
    assert len(store.written) == 20
    outcome = after._queue.get_nowait()
    assert (len(outcome.accepted), outcome.transaction_id) == (20, 7)
    await channel.close()
