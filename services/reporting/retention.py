"""Retention of raw usage events: archive old chunks as gzip CSV with a manifest, then drop them.

A pass (every RETENTION_CHECK_SECONDS in the reporting service, or `python -m
services.reporting.retention run`) handles the `usage_events` chunks whose whole time range ends
at or before now - RETENTION_RAW_DAYS, oldest first, one chunk per transaction:

1. `pg_try_advisory_xact_lock` (one pass at a time across replicas: another replica that finds
   the lock taken records a `skipped` run and stops);
2. the chunk is locked against writes, counted, and copied with `COPY chunk TO STDOUT (FORMAT
   csv, HEADER)` into `<RETENTION_ARCHIVE_DIR>/usage_events/<start>_<end>.csv.gz` (written to a
   temporary name, fsynced, renamed), next to `<same>.manifest.json` (chunk, time range, row
   count, sha256 of the file, columns with types);
3. `drop_chunks('usage_events', older_than => range end, newer_than => range start)` drops exactly
   that chunk, and the transaction commits. A failure before the commit leaves the chunk in place
   (the next pass archives it again, overwriting the same files).

Rollups (hourly, daily, global, per key, fingerprints) are never dropped. Each pass is a row of
`retention_runs` and a log line. Restore: `python -m services.reporting.retention restore
MANIFEST...` verifies the checksum and loads the rows back (see README).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from services.reporting.datasubjects import removal_sql
from tally.runtime.config import Settings, load_settings
from tally.runtime.db import Database
from tally.runtime.server import Resources

log = logging.getLogger("tally.reporting.retention")

HYPERTABLE = "usage_events"
# pg_advisory_xact_lock key of the retention job (and of archive rewrites by data-subject deletes).
LOCK_KEY = 0x7A11_0013
_WRITE_BLOCK = 1 << 20
NULL = "\\N"  # how archives write NULL (an empty field is an empty string)


@dataclass
class RunReport:
    run_id: uuid.UUID
    status: str
    cutoff: datetime
    archives: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def rows(self) -> int:
        return sum(int(a["rowCount"]) for a in self.archives)


def archive_dir(settings: Settings) -> Path:
    return Path(settings.retention_archive_dir) / HYPERTABLE


def manifests(settings: Settings) -> list[Path]:
    folder = archive_dir(settings)
    return sorted(folder.glob("*.manifest.json")) if folder.is_dir() else []


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_WRITE_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- the job
async def _columns(cur: Any) -> list[dict[str, str]]:
    await cur.execute(
        """SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type
           FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
           ORDER BY a.attnum""",
        (HYPERTABLE,),
    )
    return [{"name": r["name"], "type": r["type"]} for r in await cur.fetchall()]


async def _archive_one(db: Database, settings: Settings, run_id: uuid.UUID, cutoff: datetime) -> dict[str, Any] | str:
    """Archives and drops the oldest expired chunk; returns its manifest, or 'done' / 'locked'."""
    async with db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT set_config('statement_timeout', '0', true)")
        await cur.execute("SELECT pg_try_advisory_xact_lock(%s) AS locked", (LOCK_KEY,))
        row = await cur.fetchone()
        if row is None or not row["locked"]:
            return "locked"
        await cur.execute(
            """SELECT chunk_schema, chunk_name, range_start, range_end FROM timescaledb_information.chunks
               WHERE hypertable_schema = current_schema() AND hypertable_name = %s AND range_end <= %s
               ORDER BY range_start LIMIT 1""",
            (HYPERTABLE, cutoff),
        )
        chunk = await cur.fetchone()
        if chunk is None:
            return "done"
        table = sql.Identifier(chunk["chunk_schema"], chunk["chunk_name"])
        await cur.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(table))
        await cur.execute(sql.SQL("SELECT count(*) AS n FROM {}").format(table))
        counted = await cur.fetchone()
        assert counted is not None
        columns = await _columns(cur)
        folder = archive_dir(settings)
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        # Named by time range, not chunk: a range restored and archived again replaces its file.
        stem = (
            f"{chunk['range_start'].astimezone(UTC):%Y%m%dT%H%M%SZ}_{chunk['range_end'].astimezone(UTC):%Y%m%dT%H%M%SZ}"
        )
        data_path = folder / f"{stem}.csv.gz"
        tmp = data_path.with_name(data_path.name + ".tmp")
        copy_sql = sql.SQL("COPY {} ({}) TO STDOUT (FORMAT csv, HEADER true, NULL '\\N')").format(
            table, sql.SQL(", ").join(sql.Identifier(c["name"]) for c in columns)
        )
        handle = await asyncio.to_thread(gzip.open, tmp, "wb", 6)
        try:
            pending = bytearray()
            async with cur.copy(copy_sql) as copy:
                async for data in copy:
                    pending += data
                    if len(pending) >= _WRITE_BLOCK:
                        await asyncio.to_thread(handle.write, bytes(pending))
                        pending.clear()
            await asyncio.to_thread(handle.write, bytes(pending))
        finally:
            await asyncio.to_thread(handle.close)
        await asyncio.to_thread(_fsync_and_rename, tmp, data_path)
        manifest = {
            "hypertable": HYPERTABLE,
            "chunk": f"{chunk['chunk_schema']}.{chunk['chunk_name']}",
            "rangeStart": chunk["range_start"].astimezone(UTC).isoformat(),
            "rangeEnd": chunk["range_end"].astimezone(UTC).isoformat(),
            "rowCount": counted["n"],
            "file": data_path.name,
            "format": "csv+gzip (header row; NULL written as \\N)",
            "sha256": await asyncio.to_thread(sha256_of, data_path),
            "bytes": data_path.stat().st_size,
            "columns": columns,
            "archivedAt": datetime.now(UTC).isoformat(),
            "runId": str(run_id),
            "redactedRows": 0,
        }
        await asyncio.to_thread(_write_json, folder / f"{stem}.manifest.json", manifest)
        await cur.execute(
            "SELECT count(*) AS n FROM drop_chunks(%s, older_than => %s, newer_than => %s)",
            (HYPERTABLE, chunk["range_end"], chunk["range_start"]),
        )
        await cur.execute(
            """UPDATE retention_runs SET chunks_archived = chunks_archived + 1, rows_archived = rows_archived + %s,
                      archives = archives || jsonb_build_array(%s::jsonb)
               WHERE run_id = %s""",
            (
                counted["n"],
                json.dumps({k: manifest[k] for k in ("chunk", "rangeStart", "rangeEnd", "rowCount", "file", "sha256")}),
                run_id,
            ),
        )
        return manifest


def _fsync_and_rename(tmp: Path, final: Path) -> None:
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(final)


async def run_once(db: Database, settings: Settings, now: datetime | None = None) -> RunReport:
    """One retention pass; returns (and records in retention_runs) what it did."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.retention_raw_days)
    report = RunReport(uuid.uuid4(), "running", cutoff)
    await db.fetch_one(
        "INSERT INTO retention_runs (run_id, status, cutoff, host) VALUES (%s, 'running', %s, %s) RETURNING run_id",
        (report.run_id, cutoff, socket.gethostname()),
    )
    try:
        while True:
            outcome = await _archive_one(db, settings, report.run_id, cutoff)
            if outcome == "locked":
                report.status = "skipped" if not report.archives else "succeeded"
                break
            if outcome == "done":
                report.status = "succeeded"
                break
            assert isinstance(outcome, dict)
            report.archives.append(outcome)
            log.info("raw chunk archived and dropped", extra={k: outcome[k] for k in ("chunk", "rowCount", "file")})
    except Exception as exc:
        report.status, report.error = "failed", f"{type(exc).__name__}: {exc}"[:500]
        log.exception("retention pass failed")
    await db.fetch_one(
        "UPDATE retention_runs SET status = %s, error = %s, finished_at = now() WHERE run_id = %s RETURNING run_id",
        (report.status, report.error, report.run_id),
    )
    log.info(
        "retention pass finished",
        extra={"runId": str(report.run_id), "status": report.status, "cutoff": cutoff.isoformat(),
               "chunks": len(report.archives), "rows": report.rows},
    )  # fmt: skip
    return report


async def run_forever(db: Database, settings: Settings, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if settings.retention_raw_days > 0:
            try:
                await run_once(db, settings)
            except Exception:
                log.exception("retention pass failed; will retry")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.retention_check_seconds)


def install(resources: Resources) -> None:
    """Starts the periodic retention job in this (reporting) process; stopped on shutdown."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_forever(resources.db, resources.settings, stop), name="retention")

    async def close() -> None:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)

    resources.closers.append(close)


# ---------------------------------------------------------------------------------------------- archives
def read_archive(manifest_path: Path, *, verify: bool = True) -> tuple[dict[str, Any], list[dict[str, str | None]]]:
    """The manifest and the rows of one archive (values as text; NULL as None)."""
    manifest = json.loads(manifest_path.read_text())
    data_path = manifest_path.with_name(manifest["file"])
    if verify and sha256_of(data_path) != manifest["sha256"]:
        raise ValueError(f"{data_path}: sha256 does not match its manifest")
    return manifest, list(_rows(data_path))


def _rows(data_path: Path) -> Iterator[dict[str, str | None]]:
    with gzip.open(data_path, "rt", newline="") as handle:
        for row in csv.DictReader(handle):
            yield {k: (None if v == NULL else v) for k, v in row.items()}


def archived_rows(settings: Settings, subject_hash: str) -> Iterator[dict[str, str | None]]:
    """Every archived event of one end user."""
    for path in manifests(settings):
        manifest = json.loads(path.read_text())
        for row in _rows(path.with_name(manifest["file"])):
            if row.get("end_user_hash") == subject_hash:
                yield row


@dataclass
class ArchiveRemoval:
    events: int = 0
    cost_micros: int = 0
    hours: set[datetime] = field(default_factory=set)


async def remove_subject_from_archives(db: Database, settings: Settings, subject_hash: str) -> ArchiveRemoval:
    """Removes one end user's rows from every archive and their share of the rollups.

    Per archive, under the retention lock: the rewritten file is written to a temporary name, the
    rollup deltas commit, then the file replaces the old one (and the manifest is updated)."""
    result = ArchiveRemoval()
    late = settings.ingest_late_threshold_seconds
    for path in manifests(settings):
        manifest = json.loads(path.read_text())
        data_path = path.with_name(manifest["file"])
        header, kept, removed = await asyncio.to_thread(_split_archive, data_path, subject_hash)
        if not removed:
            continue
        tmp = data_path.with_name(data_path.name + ".redact")
        await asyncio.to_thread(_write_csv_gz, tmp, header, kept)
        async with db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            await cur.execute("CREATE TEMP TABLE subject_archived (LIKE usage_events) ON COMMIT DROP")
            columns = sql.SQL(", ").join(sql.Identifier(c) for c in header)
            async with cur.copy(
                sql.SQL("COPY subject_archived ({}) FROM STDIN (FORMAT csv, NULL '\\N')").format(columns)
            ) as copy:
                await copy.write(_csv_text(removed))
            await cur.execute(removal_sql("SELECT * FROM subject_archived", late))
            done = await cur.fetchone()
            assert done is not None
        await asyncio.to_thread(_fsync_and_rename, tmp, data_path)  # after the deltas committed
        manifest["rowCount"] = len(kept)
        manifest["sha256"] = await asyncio.to_thread(sha256_of, data_path)
        manifest["bytes"] = data_path.stat().st_size
        manifest["redactedRows"] = int(manifest.get("redactedRows", 0)) + len(removed)
        await asyncio.to_thread(_write_json, path, manifest)
        result.events += done["events"]
        result.cost_micros += done["cost"]
        result.hours |= set(done["hours"])
    return result


def _split_archive(data_path: Path, subject_hash: str) -> tuple[list[str], list[list[str]], list[list[str]]]:
    with gzip.open(data_path, "rt", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        column = header.index("end_user_hash")
        kept: list[list[str]] = []
        removed: list[list[str]] = []
        for row in reader:
            (removed if row[column] == subject_hash else kept).append(row)
    return header, kept, removed


def _csv_text(rows: list[list[str]]) -> str:
    """CSV as COPY reads it with NULL '\\N' (an empty field is an empty string)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def _write_csv_gz(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------- restore
async def restore(db: Database, manifest_paths: list[Path], table: str = HYPERTABLE) -> int:
    """Loads archives back (checksums verified); returns the rows inserted. Into usage_events,
    rows already present are skipped (ON CONFLICT DO NOTHING); the rollups are not touched (they
    were kept, so they already count these rows). Another table is created LIKE usage_events."""
    inserted = 0
    for path in manifest_paths:
        manifest = json.loads(path.read_text())
        data_path = path.with_name(manifest["file"])
        if await asyncio.to_thread(sha256_of, data_path) != manifest["sha256"]:
            raise ValueError(f"{data_path}: sha256 does not match its manifest")
        columns = sql.SQL(", ").join(sql.Identifier(c["name"]) for c in manifest["columns"])
        async with db.transaction() as conn, conn.cursor() as cur:
            await cur.execute("SELECT set_config('statement_timeout', '0', true)")
            if table != HYPERTABLE:
                await cur.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} (LIKE usage_events INCLUDING DEFAULTS INCLUDING INDEXES)"
                    ).format(sql.Identifier(table))
                )
            await cur.execute("CREATE TEMP TABLE restore_staging (LIKE usage_events) ON COMMIT DROP")
            copy_sql = sql.SQL("COPY restore_staging ({}) FROM STDIN (FORMAT csv, HEADER true, NULL '\\N')").format(
                columns
            )
            async with cur.copy(copy_sql) as copy:
                with gzip.open(data_path, "rb") as handle:
                    while block := handle.read(_WRITE_BLOCK):
                        await copy.write(block)
            await cur.execute(
                sql.SQL("INSERT INTO {} ({}) SELECT {} FROM restore_staging ON CONFLICT DO NOTHING").format(
                    sql.Identifier(table), columns, columns
                )
            )
            inserted += cur.rowcount
        log.info("archive restored", extra={"file": manifest["file"], "rows": manifest["rowCount"], "table": table})
    return inserted


async def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.reporting.retention")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run one retention pass now (archive and drop expired raw chunks)")
    loader = commands.add_parser("restore", help="load archives back")
    loader.add_argument("manifests", nargs="+", type=Path, help="*.manifest.json files")
    loader.add_argument(
        "--table", default=HYPERTABLE, help="target table (created LIKE usage_events if not usage_events)"
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    db = Database(settings, min_size=1, max_size=2)
    await db.open()
    try:
        if args.command == "run":
            report = await run_once(db, settings)
            print(json.dumps({"runId": str(report.run_id), "status": report.status, "cutoff": report.cutoff.isoformat(),
                              "archives": report.archives, "error": report.error}, default=str, indent=2))  # fmt: skip
            return 0 if report.status != "failed" else 1
        rows = await restore(db, args.manifests, args.table)
        print(json.dumps({"rowsInserted": rows, "table": args.table}))
        return 0
    finally:
        await db.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(asyncio.run(_main(sys.argv[1:])))
