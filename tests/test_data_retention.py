"""Data-subject export/delete and raw-event retention, against a private suite (its own database,
Redis and archive folder, RETENTION_RAW_DAYS=30), because it drops chunks and checks exact totals.

Order matters (module-scoped data): the delete test runs while every event is still raw; the
retention test then archives and drops the old chunks; the last test deletes an end user whose
events are only in archives."""

from __future__ import annotations

import gzip
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
import pytest
import redis

from services.reporting import retention
from tally.devstack import ROOT, Postgres, Redis, Suite
from tally.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tally.runtime.config import Settings
from tally.usage import live
from tally.usage.histogram import LATENCY_COLUMNS, TTFT_COLUMNS, UPPER_BOUNDS_MS
from tests.conftest import private_suite
from tests.usage_support import EventFactory

RETENTION_DAYS = 30
ALICE = f"alice-{secrets.token_hex(4)}@example.com"  # recent and old events
BOB = f"bob-{secrets.token_hex(4)}@example.com"  # old events only (archived before his deletion)


@dataclass
class PrivateStack:
    env: dict[str, str]
    suite: Suite
    archive: Path

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.env['GATEWAY_PORT']}",
            headers={"Authorization": f"Bearer {self.env['ADMIN_MASTER_KEY']}"},
            timeout=60,
        )

    def db(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.env["DATABASE_URL"], password=self.env["DATABASE_PASSWORD"], autocommit=True)

    def settings(self) -> Settings:
        return Settings.model_validate(
            {k.lower(): v for k, v in self.env.items() if k.lower() in Settings.model_fields}
        )

    def cli(self, *args: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "services.reporting.retention", *args],
            env=self.env, cwd=ROOT, check=True, capture_output=True, text=True,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(done.stdout)
        return result


@pytest.fixture(scope="module")
def rstack(infra: tuple[Postgres, Redis, Path]) -> Iterator[PrivateStack]:
    archive = infra[2] / f"retention-archive-{secrets.token_hex(3)}"
    extra = {
        "INGEST_LATE_WINDOW_SECONDS": str(60 * 86400),
        "RETENTION_RAW_DAYS": str(RETENTION_DAYS),
        "RETENTION_ARCHIVE_DIR": str(archive),
        "RETENTION_CHECK_SECONDS": "86400",
    }
    with private_suite(infra, "retention", extra) as (env, suite, _root):
        yield PrivateStack(env, suite, archive)


@dataclass
class Data:
    events: list[ingest_pb2.UsageEvent]
    now: datetime


@pytest.fixture(scope="module")
def data(rstack: PrivateStack) -> Data:
    now = datetime.now(UTC).replace(microsecond=0)
    factory = EventFactory(seed=7013, models=[("acme", "big"), ("acme", "small"), ("other", "big")])
    events = factory.events(600, now - timedelta(days=3), timedelta(days=3) - timedelta(minutes=5))
    events += factory.events(400, now - timedelta(days=RETENTION_DAYS + 12), timedelta(days=8))
    for i, event in enumerate(events):
        if i % 2 == 0:
            event.provider_cost_micros = 1000 + i * 37  # half provider-priced, half unpriced
        if i % 9 == 0:
            event.end_user_id = ALICE
        elif i % 13 == 0 and i >= 600:
            event.end_user_id = BOB
    with grpc.insecure_channel(rstack.env["INGEST_ADDRESS"]) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        auth = [("authorization", f"Bearer {rstack.env['ADMIN_MASTER_KEY']}")]
        for start in range(0, len(events), 250):
            reply = stub.RecordUsageBatch(
                ingest_pb2.RecordUsageBatchRequest(events=events[start : start + 250]), timeout=60, metadata=auth
            )
            assert reply.data.accepted == len(events[start : start + 250]), reply
    return Data(events, now)


# ------------------------------------------------------------------ recomputation of every rollup from raw
_BOUNDS = "ARRAY[" + ",".join(str(int(b)) for b in UPPER_BOUNDS_MS[:-1]) + "]"
_SMALL = "input_tokens < 1000 AND NOT tools_used"
_RAW_SUMS = {
    "requests": "count(*)", "successes": "count(*) FILTER (WHERE http_status < 400)",
    "failures": "count(*) FILTER (WHERE http_status >= 400)", "input_tokens": "sum(input_tokens)",
    "output_tokens": "sum(output_tokens)", "cached_read_tokens": "sum(cached_read_tokens)",
    "cache_write_tokens": "sum(cache_write_tokens)", "reasoning_tokens": "sum(reasoning_tokens)",
    "images": "sum(images)", "audio_seconds": "sum(audio_seconds)", "cost_micros": "coalesce(sum(cost_micros), 0)",
    "provider_cost_requests": "count(*) FILTER (WHERE cost_source = 'provider')",
    "unpriced_requests": "count(*) FILTER (WHERE cost_source = 'unpriced')",
    "late_requests": "count(*) FILTER (WHERE ingested_at - event_time > interval '300 seconds')",
    "streaming_requests": "count(*) FILTER (WHERE streaming)", "tool_requests": "count(*) FILTER (WHERE tools_used)",
    "small_input_requests": f"count(*) FILTER (WHERE {_SMALL})",
    "small_input_input_tokens": f"coalesce(sum(input_tokens) FILTER (WHERE {_SMALL}), 0)",
    "small_input_output_tokens": f"coalesce(sum(output_tokens) FILTER (WHERE {_SMALL}), 0)",
    "small_input_cost_micros": f"coalesce(sum(cost_micros) FILTER (WHERE {_SMALL}), 0)",
    "latency_ms_sum": "sum(latency_ms)", "ttft_ms_sum": "coalesce(sum(ttft_ms), 0)", "ttft_count": "count(ttft_ms)",
    **{col: f"count(*) FILTER (WHERE width_bucket(latency_ms - 1, {_BOUNDS}) = {i})"
       for i, col in enumerate(LATENCY_COLUMNS)},
    **{c: f"count(*) FILTER (WHERE width_bucket(ttft_ms - 1, {_BOUNDS}) = {i})" for i, c in enumerate(TTFT_COLUMNS)},
}  # fmt: skip
_FULL = {"key_id": "key_id", "provider": "provider", "model": "model", "operation": "operation",
         "status_class": "(http_status / 100)::text || 'xx'", "error_type": "coalesce(error_type, '')"}  # fmt: skip
_GLOBAL = {k: v for k, v in _FULL.items() if k != "key_id"}
_TABLES: list[tuple[str, str, dict[str, str], dict[str, str]]] = [
    ("usage_rollup_hourly", "1 hour", _FULL, _RAW_SUMS),
    ("usage_rollup_daily", "1 day", _FULL, _RAW_SUMS),
    ("usage_rollup_hourly_global", "1 hour", _GLOBAL, _RAW_SUMS),
    ("usage_rollup_daily_global", "1 day", _GLOBAL, _RAW_SUMS),
    ("usage_rollup_hourly_key", "1 hour", {"key_id": "key_id"}, _RAW_SUMS),
    ("usage_rollup_daily_key", "1 day", {"key_id": "key_id"}, _RAW_SUMS),
    (
        "prompt_fingerprint_daily", "1 day",
        {"prompt_fingerprint": "prompt_fingerprint", "provider": "provider", "model": "model"},
        {"requests": "count(*)", "input_tokens": "sum(input_tokens)", "cost_micros": "coalesce(sum(cost_micros), 0)"},
    ),
]  # fmt: skip


def _nonzero(rows: list[tuple[Any, ...]], width: int) -> dict[tuple[Any, ...], tuple[Decimal, ...]]:
    out = {}
    for row in rows:
        sums = tuple(Decimal(v or 0) for v in row[width:])
        if any(sums):
            out[tuple(str(v) for v in row[:width])] = sums
    return out


def rollups(conn: psycopg.Connection[Any], since: datetime | None = None) -> dict[str, dict[Any, Any]]:
    """Every rollup, summed per group (rows whose sums are all zero are left out)."""
    out = {}
    for table, _width, group, sums in _TABLES:
        where = "" if since is None else "WHERE bucket >= %(since)s"
        rows = conn.execute(
            f"""SELECT bucket, {", ".join(group)}, {", ".join(f"sum({c})" for c in sums)} FROM {table} {where}
                GROUP BY {", ".join(str(i + 1) for i in range(len(group) + 1))}""",  # noqa: S608
            {"since": since},
        ).fetchall()
        out[table] = _nonzero(rows, len(group) + 1)
    return out


def recomputed(conn: psycopg.Connection[Any], since: datetime | None = None) -> dict[str, dict[Any, Any]]:
    """The same, recomputed from the raw events."""
    out = {}
    for table, width, group, sums in _TABLES:
        where = "WHERE prompt_fingerprint IS NOT NULL" if table == "prompt_fingerprint_daily" else "WHERE true"
        if since is not None:
            where += " AND event_time >= %(since)s"
        rows = conn.execute(
            f"""SELECT time_bucket('{width}', event_time), {", ".join(group.values())}, {", ".join(sums.values())}
                FROM usage_events {where} GROUP BY {", ".join(str(i + 1) for i in range(len(group) + 1))}""",  # noqa: S608
            {"since": since},
        ).fetchall()
        out[table] = _nonzero(rows, len(group) + 1)
    return out


def _post(rstack: PrivateStack, path: str, end_user_id: str) -> httpx.Response:
    with rstack.http() as client:
        return client.post(f"/api/admin/data-subjects/{path}", json={"endUserId": end_user_id})


# ------------------------------------------------------------------------------------------------ tests
def test_data_subject_export_and_delete(rstack: PrivateStack, data: Data) -> None:
    with rstack.db() as conn:
        assert rollups(conn) == recomputed(conn)  # the starting point: rollups equal the raw events
        totals_before = conn.execute("SELECT count(*), coalesce(sum(cost_micros), 0) FROM usage_events").fetchone()
    mine = sorted(e.request_id for e in data.events if e.end_user_id == ALICE)
    assert len(mine) > 50

    response = _post(rstack, "export", ALICE)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    exported = response.json()
    assert sorted(e["requestId"] for e in exported["events"]) == mine
    assert exported["eventCount"] == len(mine) and exported["archivedEvents"] == []
    assert all(e["endUserHash"] == exported["endUserHash"] for e in exported["events"])
    first = next(e for e in data.events if e.request_id == exported["events"][0]["requestId"])
    assert exported["events"][0]["inputTokens"] == first.input_tokens

    with rstack.http() as client:  # a global budget over all time: its spend is every event's cost
        assert client.put("/api/admin/budgets/global", json={"maxBudget": 1e6, "period": "total"}).status_code == 200
        assert client.post("/api/admin/budgets/reconcile", json={}).status_code == 200
        spend_before = round(client.get("/api/admin/budgets/global").json()["data"]["currentSpend"] * 1_000_000)
    assert totals_before is not None and spend_before == totals_before[1]

    live_redis = redis.Redis.from_url(rstack.env["REDIS_URL"])
    live_redis.set(live.SINCE_KEY, 0)  # the live counters taken as complete until now
    response = _post(rstack, "delete", ALICE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["data"]["eventsDeleted"] == len(mine)
    # The live counters still hold her events: up to the end of her last event's hour they are
    # no longer taken as complete (the live view computes those buckets from the database).
    last_hour = max(e.event_time.ToDatetime(tzinfo=UTC) for e in data.events if e.end_user_id == ALICE)
    last_hour = last_hour.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    assert int(live_redis.get(live.SINCE_KEY) or 0) >= int(last_hour.timestamp() * 1000)
    removed_cost = sum(e.provider_cost_micros for e in data.events if e.end_user_id == ALICE)
    assert round(body["data"]["costRemoved"] * 1_000_000) == removed_cost

    with rstack.db() as conn:
        assert conn.execute("SELECT count(*) FROM usage_events WHERE end_user_hash = %s",
                            (exported["endUserHash"],)).fetchone() == (0,)  # fmt: skip
        # every rollup (full, global, per key; hourly and daily; fingerprints) equals the raw events left
        assert rollups(conn) == recomputed(conn)
        totals = conn.execute("SELECT count(*), coalesce(sum(cost_micros), 0) FROM usage_events").fetchone()
        assert totals_before is not None and totals == (totals_before[0] - len(mine), totals_before[1] - removed_cost)
        # the original id is stored nowhere
        for table in ("usage_events", "usage_rollup_hourly", "prompt_fingerprint_daily"):
            found = conn.execute(f"SELECT count(*) FROM {table} t WHERE t::text LIKE %s", (f"%{ALICE}%",)).fetchone()  # noqa: S608
            assert found == (0,), table
        if conn.execute("SELECT to_regclass('audit_log')").fetchone() != (None,):
            found = conn.execute("SELECT count(*) FROM audit_log t WHERE t::text LIKE %s", (f"%{ALICE}%",)).fetchone()
            assert found == (0,)

    with rstack.http() as client:  # the budget counters were rebuilt without her events
        spend = round(client.get("/api/admin/budgets/global").json()["data"]["currentSpend"] * 1_000_000)
    assert spend == spend_before - removed_cost

    # idempotent: a second delete finds nothing and changes nothing; the export is now empty
    with rstack.db() as conn:
        before = rollups(conn)
    again = _post(rstack, "delete", ALICE).json()
    assert again["success"] is True and again["data"].get("eventsDeleted", 0) == 0
    assert _post(rstack, "export", ALICE).json()["events"] == []
    with rstack.db() as conn:
        assert rollups(conn) == before
    for name in ("reporting", "ingest", "budget"):
        assert ALICE not in rstack.suite.log_dir.joinpath(f"{name}.log").read_text()  # type: ignore[union-attr]


def test_data_subject_request_needs_an_id(rstack: PrivateStack) -> None:
    response = _post(rstack, "delete", "")
    assert response.status_code == 400, response.text
    assert "endUserId" in response.text


def _raw_rows(
    conn: psycopg.Connection[Any], columns: list[str], start: datetime, end: datetime
) -> list[dict[str, Any]]:
    cur = conn.execute(
        f"""SELECT {", ".join(f"{c}::text" for c in columns)} FROM usage_events
            WHERE event_time >= %s AND event_time < %s""",  # noqa: S608
        (start, end),
    )
    return [_text(dict(zip(columns, row, strict=True))) for row in cur.fetchall()]


def _text(row: dict[str, Any]) -> dict[str, Any]:
    """`bool::text` says true/false where COPY says t/f."""
    return {k: {"true": "t", "false": "f"}.get(v, v) if k in ("streaming", "tools_used") else v for k, v in row.items()}


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return (row["request_id"], row["event_time"])


def test_retention_archives_then_drops_old_chunks(rstack: PrivateStack, data: Data) -> None:
    cutoff = datetime.now(UTC) - timedelta(days=RETENTION_DAYS)
    with rstack.db() as conn:
        expired = conn.execute(
            """SELECT chunk_name, range_start, range_end FROM timescaledb_information.chunks
               WHERE hypertable_name = 'usage_events' AND range_end <= %s ORDER BY range_start""",
            (cutoff,),
        ).fetchall()
        assert len(expired) >= 5
        columns = [r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'usage_events'::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum").fetchall()]  # fmt: skip
        before = {_key(r): r for r in _raw_rows(conn, columns, expired[0][1], expired[-1][2])}
        recent_before = conn.execute("SELECT count(*) FROM usage_events WHERE event_time >= %s", (cutoff,)).fetchone()
        rollups_before = rollups(conn)
    assert len(before) > 300

    result = rstack.cli("run")
    assert result["status"] == "succeeded", result
    assert sorted(a["chunk"].split(".")[1] for a in result["archives"]) == sorted(c[0] for c in expired)

    with rstack.db() as conn:
        # dropped: no expired chunk and no old raw row left; newer raw rows and every rollup untouched
        left = conn.execute("SELECT count(*) FROM show_chunks('usage_events', older_than => %s)", (cutoff,)).fetchone()
        assert left == (0,)
        assert conn.execute(
            "SELECT count(*) FROM usage_events WHERE event_time < %s", (expired[-1][2],)
        ).fetchone() == (0,)
        assert (
            conn.execute("SELECT count(*) FROM usage_events WHERE event_time >= %s", (cutoff,)).fetchone()
            == recent_before
        )
        assert rollups(conn) == rollups_before
        run = conn.execute("SELECT status, chunks_archived, rows_archived FROM retention_runs WHERE run_id = %s",
                           (result["runId"],)).fetchone()  # fmt: skip
        assert run == ("succeeded", len(expired), len(before))

    # the archives read back to the same rows, with a manifest each
    archived: dict[tuple[str, str], dict[str, Any]] = {}
    paths = retention.manifests(rstack.settings())
    assert len(paths) == len(expired)
    for path in paths:
        manifest, rows = retention.read_archive(path)  # verifies the sha256
        assert manifest["rowCount"] == len(rows)
        assert [c["name"] for c in manifest["columns"]] == columns
        assert manifest["rangeStart"] < manifest["rangeEnd"]
        with gzip.open(path.with_name(manifest["file"])) as handle:
            handle.read(1)  # a real gzip file
        archived.update({_key(r): r for r in rows})
    diffs = {c: (r[c], before[k][c]) for k, r in archived.items() for c in columns if r[c] != before.get(k, {}).get(c)}
    assert diffs == {}
    assert archived == before

    # a second pass finds nothing; a restore loads the same rows back (into a separate table here)
    assert rstack.cli("run")["archives"] == []
    restored = rstack.cli("restore", "--table", "restored_events", *map(str, paths))
    assert restored["rowsInserted"] == len(before)
    with rstack.db() as conn:
        cur = conn.execute(f"SELECT {', '.join(f'{c}::text' for c in columns)} FROM restored_events")  # noqa: S608
        assert {_key(r): r for r in (_text(dict(zip(columns, row, strict=True))) for row in cur.fetchall())} == before
        assert rstack.cli("restore", "--table", "restored_events", *map(str, paths))["rowsInserted"] == 0

    # the documented path: back into usage_events; the next pass archives that range again, same file
    manifest, rows = retention.read_archive(paths[0])
    assert rstack.cli("restore", str(paths[0]))["rowsInserted"] == len(rows) > 0
    with rstack.db() as conn:
        back = conn.execute(
            "SELECT count(*) FROM usage_events WHERE event_time >= %s AND event_time < %s",
            (manifest["rangeStart"], manifest["rangeEnd"]),
        ).fetchone()
        assert back == (len(rows),)
        assert rollups(conn) == rollups_before  # rollups are not touched by a restore
    again = rstack.cli("run")
    assert [a["file"] for a in again["archives"]] == [manifest["file"]]
    assert retention.manifests(rstack.settings()) == paths
    assert retention.read_archive(paths[0])[1] == rows


def test_data_subject_delete_reaches_the_archives(rstack: PrivateStack, data: Data) -> None:
    bobs = sorted(e.request_id for e in data.events if e.end_user_id == BOB)
    assert bobs
    exported = _post(rstack, "export", BOB).json()
    assert exported["events"] == []
    assert sorted(e["requestId"] for e in exported["archivedEvents"]) == bobs
    with rstack.db() as conn:
        totals = conn.execute("SELECT sum(requests), sum(cost_micros) FROM usage_rollup_daily_global").fetchone()
    body = _post(rstack, "delete", BOB).json()
    assert body["data"]["eventsDeleted"] == len(bobs)
    bob_cost = sum(e.provider_cost_micros for e in data.events if e.end_user_id == BOB)
    with rstack.db() as conn:
        for table in ("usage_rollup_daily_global", "usage_rollup_hourly", "usage_rollup_daily_key"):
            after = conn.execute(f"SELECT sum(requests), sum(cost_micros) FROM {table}").fetchone()  # noqa: S608
            assert totals is not None and after == (totals[0] - len(bobs), totals[1] - bob_cost), table
        # the raw part of the rollups still equals the raw events
        since = (data.now - timedelta(days=RETENTION_DAYS - 1)).replace(hour=0, minute=0, second=0)
        assert rollups(conn, since) == recomputed(conn, since)
    subject = exported["endUserHash"]
    for path in retention.manifests(rstack.settings()):
        manifest, rows = retention.read_archive(path)
        assert all(r["end_user_hash"] != subject for r in rows)
        assert manifest["rowCount"] == len(rows)
    assert _post(rstack, "export", BOB).json()["archivedEvents"] == []
    assert _post(rstack, "delete", BOB).json()["data"].get("eventsDeleted", 0) == 0


def test_one_retention_pass_at_a_time(rstack: PrivateStack) -> None:
    """Another replica holding the retention lock: this pass records itself as skipped."""
    with rstack.db() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (retention.LOCK_KEY,))
        result = rstack.cli("run")
    assert result["status"] == "skipped" and result["archives"] == []
    with rstack.db() as conn:
        row = conn.execute("SELECT status FROM retention_runs WHERE run_id = %s", (result["runId"],)).fetchone()
    assert row == ("skipped",)
