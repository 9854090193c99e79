"""CSV export throughput: 1 M raw usage rows streamed through Envoy (POST /analytics/export) by
the reporting service, beside a raw psycopg `COPY (<the same SELECT>) TO STDOUT` of the same rows
in the same run. The reporting service's RSS is sampled while it streams (flat memory).

Run with `make bench` (all benchmarks) or `python -m bench export`. Writes bench/results/export.json.
`BENCH_EXPORT_ROWS` changes the row count (default 1,000,000).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from bench.common import bench_stack, write_results
from services.reporting.exports import DEFAULT_FIELDS, ExportPlan, select_sql
from tally.runtime.config import ServiceName
from tally.runtime.windows import Window

START = datetime(2024, 1, 1, tzinfo=UTC)
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "claude-3-haiku", "gemini-1.5-flash"]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _load(conn: psycopg.Connection[tuple[object, ...]], rows: int) -> list[str]:
    keys = [str(uuid.UUID(int=n + 1)) for n in range(50)]
    with conn.cursor() as cur:
        for number, key in enumerate(keys):
            cur.execute("INSERT INTO virtual_keys (key_id, key_name) VALUES (%s, %s)", (key, f"Bench key {number}"))
        with cur.copy(
            "COPY usage_events (event_time, request_id, key_id, provider, model, operation, input_tokens, "
            "output_tokens, latency_ms, http_status, cost_micros, cost_source) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(
                ["timestamptz", "text", "uuid", "text", "text", "text", "int8", "int8", "int4", "int2", "int8", "text"]
            )
            for n in range(rows):
                copy.write_row(
                    (
                        START + timedelta(milliseconds=n * 700),
                        f"bench-{n}",
                        uuid.UUID(keys[n % 50]),
                        "openai" if n % 3 else "anthropic",
                        MODELS[n % 5],
                        "chat.completions",
                        n % 4000,
                        n % 1500,
                        80 + n % 20000,
                        200 if n % 40 else 500,
                        (n % 4000) * 3 + 11,
                        "computed",
                    )
                )
    conn.commit()
    return keys


def main() -> None:
    rows = int(os.environ.get("BENCH_EXPORT_ROWS", "1000000"))
    end = START + timedelta(milliseconds=rows * 700 + 1)
    with bench_stack([ServiceName.REPORTING]) as suite:
        suite.start_gateway()
        env = suite.env
        with psycopg.connect(env["DATABASE_URL"], password=env["DATABASE_PASSWORD"]) as conn:
            print(f"loading {rows:,} usage events ...", flush=True)
            _load(conn, rows)
            conn.autocommit = True
            conn.execute("VACUUM ANALYZE usage_events")

            # Baseline: PostgreSQL's own COPY of exactly the rows and columns the export streams.
            plan = ExportPlan("csv", "raw", Window(START, end), DEFAULT_FIELDS, (), (), (), (), 0)
            query, params = select_sql(plan)
            started = time.perf_counter()
            copied = 0
            with (
                conn.cursor() as cur,
                cur.copy(f"COPY ({query}) TO STDOUT WITH (FORMAT csv, HEADER true)", params) as copy,
            ):
                for data in copy:
                    copied += len(data)
            baseline_seconds = time.perf_counter() - started

        pid = suite.processes["reporting"].pid
        rss_before = _rss_kb(pid)
        peak = rss_before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_kb(pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        body = {
            "format": "csv",
            "start": START.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "end": end.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "granularity": "raw",
        }
        url = f"http://127.0.0.1:{env['GATEWAY_PORT']}/api/admin/analytics/export"
        headers = {"Authorization": f"Bearer {env['ADMIN_MASTER_KEY']}"}
        received = lines = 0
        started = time.perf_counter()
        first_byte = None
        with httpx.stream("POST", url, json=body, headers=headers, timeout=600) as response:
            response.raise_for_status()
            for chunk in response.iter_raw():
                if first_byte is None:
                    first_byte = time.perf_counter() - started
                received += len(chunk)
                lines += chunk.count(b"\n")
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    exported = lines - 1  # header line
    assert exported == rows, f"exported {exported} rows, expected {rows}"
    assert received == copied, f"the export ({received} bytes) differs from COPY's output ({copied} bytes)"
    figures = {
        "rows": rows,
        "bytes": received,
        "export_seconds": round(seconds, 3),
        "export_rows_per_second": round(rows / seconds),
        "time_to_first_byte_ms": round((first_byte or 0) * 1000, 1),
        "baseline_copy_seconds": round(baseline_seconds, 3),
        "baseline_copy_rows_per_second": round(rows / baseline_seconds),
        "ratio_to_baseline": round(baseline_seconds / seconds, 3),
        "reporting_rss_before_mb": round(rss_before / 1024, 1),
        "reporting_rss_peak_mb": round(peak / 1024, 1),
        "reporting_rss_growth_mb": round((peak - rss_before) / 1024, 1),
        "path": "REST through Envoy (grpc_json_transcoder, HttpBody stream) -> reporting -> COPY TO STDOUT",
        "targets": {"export_rows_per_second": 100_000, "reporting_rss_growth_mb": "flat (a few chunks)"},
    }
    path = write_results("export", figures)
    for name, value in figures.items():
        print(f"  {name}: {value}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
