"""Analytics read latency over a loaded history, beside the same answers computed from raw events.

Loads `BENCH_ANALYTICS_EVENTS` events (default 10,000,000, about 10 minutes of loading here) of demo
traffic over 90 days through the real ingest API (`tally.demo`), then times every analytics
endpoint over gRPC (warm: 2 untimed calls, then `BENCH_ANALYTICS_RUNS` timed calls, default 20)
and the equivalent aggregation over the raw `usage_events` hypertable (3 timed runs), checking
that both give the same headline number. Rollups are append-only and ingest's compactor merges
them in the background, so the endpoints are timed twice: on the rollups as the load left them,
and after an exact merge of every bucket's rows into one per group in every rollup (the state
the compactor converges to).

Run with `make bench` (all benchmarks) or `python -m bench analytics`. Writes bench/results/analytics.json.
With `BENCH_ANALYTICS_KEEP=<folder>` the database is kept in that folder and a later run with the
same setting reuses it instead of loading again (for working on queries; its 90 days then end at
the time of the load, not now).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench.common import bench_stack, percentile, write_results
from tally.analytics.v1 import analytics_pb2 as pb
from tally.analytics.v1 import analytics_pb2_grpc
from tally.demo import load
from tally.runtime.config import ServiceName
from tally.usage import TOTAL_TOKENS_SQL
from tally.usage.histogram import bucket_of
from tally.usage.schema import MERGED_ROLLUPS, SMALL_INPUT_TOKENS

DAYS = 90


def _compact(conn: psycopg.Connection[Any]) -> dict[str, list[int]]:
    """Merges every rollup's delta rows into its merged table (and its daily rollup's: what the
    ingest compactor does on each pass; the sums are unchanged) and vacuums them."""
    counts: dict[str, list[int]] = {}
    for table in MERGED_ROLLUPS:
        grains = [table.name] if table.daily is None else [table.name, table.daily.name]
        before = [conn.execute(f"SELECT count(*) FROM {name}").fetchone() for name in grains]
        with conn.transaction():
            for statement in table.merge_statements():
                conn.execute(statement)
        for name, was in zip(grains, before, strict=True):
            now = conn.execute(f"SELECT count(*) FROM {name}").fetchone()
            counts[name] = [int(was[0]) if was else 0, int(now[0]) if now else 0]
        for name in table.tables:
            conn.execute(f"VACUUM ANALYZE {name}")
    return counts


def _calls(top_keys: list[str]) -> dict[str, Callable[[analytics_pb2_grpc.AnalyticsServiceStub, Any], Any]]:
    return {
        "live": lambda s, m: s.GetLiveUsage(pb.GetLiveUsageRequest(), metadata=m, timeout=30),
        "trends_7d_hour": lambda s, m: s.GetUsageTrends(
            pb.GetUsageTrendsRequest(period="7d", granularity="hour"), metadata=m, timeout=30
        ),
        "trends_90d_day": lambda s, m: s.GetUsageTrends(
            pb.GetUsageTrendsRequest(period="90d", granularity="day"), metadata=m, timeout=30
        ),
        "key_analytics_30d": lambda s, m: s.GetVirtualKeyAnalytics(
            pb.GetVirtualKeyAnalyticsRequest(key_id=top_keys[0], period="30d"), metadata=m, timeout=30
        ),
        "compare_7d": lambda s, m: s.CompareVirtualKeys(
            pb.CompareVirtualKeysRequest(key_ids=top_keys[:3], period="7d"), metadata=m, timeout=30
        ),
        "providers_30d": lambda s, m: s.GetProviderAnalytics(
            pb.GetProviderAnalyticsRequest(period="30d"), metadata=m, timeout=30
        ),
        "performance_7d": lambda s, m: s.GetPerformance(pb.GetPerformanceRequest(period="7d"), metadata=m, timeout=30),
        "patterns_30d": lambda s, m: s.GetUsagePatterns(
            pb.GetUsagePatternsRequest(period="30d"), metadata=m, timeout=30
        ),
        "cost_optimization_30d": lambda s, m: s.GetCostOptimization(
            pb.GetCostOptimizationRequest(period="30d"), metadata=m, timeout=30
        ),
        "budget_forecast_90d": lambda s, m: s.GetBudgetForecast(
            pb.GetBudgetForecastRequest(horizon="90d"), metadata=m, timeout=30
        ),
        "performance_metrics": lambda s, m: s.GetPerformanceMetrics(
            pb.GetPerformanceMetricsRequest(), metadata=m, timeout=30
        ),
    }


# SQL below is built from constants only.
# The same answers from the raw hypertable: every figure the endpoint returns, computed by plain
# SQL over `usage_events` (the statements run one after another; their total time is the raw
# time), and a function of the endpoint reply and the first statement's rows that returns
# (endpoint value, raw value) for the headline figure compared.
TOKENS = TOTAL_TOKENS_SQL
FAILED = "count(*) FILTER (WHERE http_status >= 400)"
END = "date_trunc('hour', %(now)s::timestamptz) + interval '1 hour'"
WINDOW = f"event_time >= {END} - %(w)s::interval AND event_time < {END}"
PREVIOUS = f"event_time >= {END} - 2 * %(w)s::interval AND event_time < {END} - %(w)s::interval"
DAYS_WINDOW = "event_time >= date_trunc('day', %(now)s::timestamptz) - interval '89 days'"
SMALL = f"input_tokens < {SMALL_INPUT_TOKENS} AND NOT tools_used AND operation IN ('chat.completions', 'completions')"
PERCENTILES = "ARRAY[0.5, 0.9, 0.95, 0.99]"
Compare = Callable[[Any, list[tuple[Any, ...]]], tuple[Any, Any]]
RAW: dict[str, tuple[tuple[str, ...], Compare]] = {
    "live": (
        (
            f"""SELECT count(*) FILTER (WHERE event_time >= date_trunc('minute', %(now)s::timestamptz)),
                sum({TOKENS}) FILTER (WHERE event_time >= date_trunc('minute', %(now)s::timestamptz)),
                sum(cost_micros) FILTER (WHERE event_time >= date_trunc('minute', %(now)s::timestamptz)),
                count(*) FILTER (WHERE event_time >= date_trunc('hour', %(now)s::timestamptz)),
                sum({TOKENS}) FILTER (WHERE event_time >= date_trunc('hour', %(now)s::timestamptz)),
                sum(cost_micros) FILTER (WHERE event_time >= date_trunc('hour', %(now)s::timestamptz)),
                count(*), sum(cost_micros)
                FROM usage_events WHERE event_time >= date_trunc('day', %(now)s::timestamptz, %(tz)s)""",
            """SELECT e.key_id, k.key_name, count(*), sum(cost_micros) FROM usage_events e
                JOIN virtual_keys k USING (key_id) WHERE event_time >= date_trunc('hour', %(now)s::timestamptz)
                GROUP BY 1, 2 ORDER BY 4 DESC, 3 DESC LIMIT 10""",
            """SELECT provider, model, count(*), sum(cost_micros) FROM usage_events
                WHERE event_time >= date_trunc('hour', %(now)s::timestamptz)
                GROUP BY 1, 2 ORDER BY 4 DESC, 3 DESC LIMIT 10""",
            """SELECT provider, count(*), sum(cost_micros) FROM usage_events
                WHERE event_time >= date_trunc('hour', %(now)s::timestamptz) GROUP BY 1""",
        ),
        lambda r, rows: (r.data.real_time_metrics.requests_today, rows[0][6]),
    ),
    "trends_7d_hour": (
        (
            f"""SELECT time_bucket('1 hour', event_time), count(*), sum({TOKENS}), sum(cost_micros), {FAILED},
                count(DISTINCT key_id) FROM usage_events WHERE {WINDOW} GROUP BY 1""",
            f"SELECT count(*), sum({TOKENS}), sum(cost_micros) FROM usage_events WHERE {PREVIOUS}",
        ),
        lambda r, rows: (r.data.metrics.total_requests, sum(row[1] for row in rows)),
    ),
    "trends_90d_day": (
        (
            f"""SELECT time_bucket('1 day', event_time), count(*), sum({TOKENS}), sum(cost_micros), {FAILED},
                count(DISTINCT key_id) FROM usage_events WHERE {DAYS_WINDOW} GROUP BY 1""",
            f"""SELECT max(n) FROM (SELECT time_bucket('1 hour', event_time), count(*) n FROM usage_events
                WHERE {DAYS_WINDOW} GROUP BY 1) h""",
            f"""SELECT count(*), sum({TOKENS}), sum(cost_micros) FROM usage_events
                WHERE event_time >= date_trunc('day', %(now)s::timestamptz) - interval '179 days'
                AND event_time < date_trunc('day', %(now)s::timestamptz) - interval '89 days'""",
        ),
        lambda r, rows: (r.data.metrics.total_requests, sum(row[1] for row in rows)),
    ),
    "key_analytics_30d": (
        (
            f"""SELECT time_bucket('1 hour', event_time), count(*), count(*) FILTER (WHERE http_status < 400),
                {FAILED}, sum({TOKENS}), sum(input_tokens), sum(output_tokens), sum(cost_micros), sum(latency_ms)
                FROM usage_events WHERE key_id = %(key)s::uuid AND {WINDOW} GROUP BY 1""",
            f"""SELECT model, operation, count(*), sum({TOKENS}), sum(cost_micros) FROM usage_events
                WHERE key_id = %(key)s::uuid AND {WINDOW} GROUP BY 1, 2""",
        ),
        lambda r, rows: (r.data.summary.total_requests, sum(row[1] for row in rows)),
    ),
    "compare_7d": (
        (
            f"""SELECT key_id, count(*), sum(cost_micros), sum(latency_ms), {FAILED}, sum({TOKENS})
                FROM usage_events WHERE key_id = ANY(%(keys)s::uuid[]) AND {WINDOW} GROUP BY 1""",
        ),
        lambda r, rows: (sum(k.values["requests"] for k in r.data.keys), sum(row[1] for row in rows)),
    ),
    "providers_30d": (
        (
            f"""SELECT provider, model, operation, count(*), sum(cost_micros), sum(latency_ms), {FAILED},
                sum(input_tokens), sum(output_tokens) FROM usage_events WHERE {WINDOW} GROUP BY 1, 2, 3""",
            f"""SELECT provider, count(*), count(*) FILTER (WHERE failed = n) FROM (
                SELECT provider, time_bucket('1 minute', event_time), count(*) n,
                count(*) FILTER (WHERE http_status >= 500) failed FROM usage_events WHERE {WINDOW} GROUP BY 1, 2) m
                GROUP BY 1""",
        ),
        lambda r, rows: (r.data.total_requests, sum(row[3] for row in rows)),
    ),
    "performance_7d": (
        (
            f"""SELECT provider, percentile_disc({PERCENTILES}) WITHIN GROUP (ORDER BY latency_ms),
                percentile_disc({PERCENTILES}) WITHIN GROUP (ORDER BY ttft_ms), count(*), {FAILED}
                FROM usage_events WHERE {WINDOW} GROUP BY GROUPING SETS ((), (provider)) ORDER BY 1 NULLS FIRST""",
            f"""SELECT provider, coalesce(error_type, 'unspecified'), count(*) FROM usage_events
                WHERE {WINDOW} AND http_status >= 400 GROUP BY 1, 2""",
        ),
        lambda r, rows: (
            bucket_of(r.data.overall.latency.p50 * 1000 - 1e-6),
            bucket_of(rows[0][1][0]) if rows[0][1] is not None else 0,
        ),
    ),
    "patterns_30d": (
        (
            f"""SELECT time_bucket('1 hour', event_time), count(*), sum(cost_micros), {FAILED}
                FROM usage_events WHERE {WINDOW} GROUP BY 1""",
            f"""SELECT key_id, model, event_time >= {END} - %(w)s::interval / 2, count(*), sum(cost_micros)
                FROM usage_events WHERE {WINDOW} GROUP BY 1, 2, 3""",
        ),
        lambda r, rows: (len(r.data.patterns.temporal_patterns.peak_hours) > 0, len(rows) > 0),
    ),
    "cost_optimization_30d": (
        (
            f"""SELECT provider, model, operation, count(*), sum(cost_micros), sum(input_tokens),
                sum(output_tokens), sum(cached_read_tokens), sum(cache_write_tokens), sum(reasoning_tokens),
                sum(images), sum(audio_seconds), count(*) FILTER (WHERE cost_source = 'unpriced'),
                count(*) FILTER (WHERE {SMALL}), sum(input_tokens) FILTER (WHERE {SMALL}),
                sum(output_tokens) FILTER (WHERE {SMALL}), sum(cost_micros) FILTER (WHERE {SMALL})
                FROM usage_events WHERE {WINDOW} GROUP BY 1, 2, 3""",
            f"""SELECT provider, model, key_id, count(*) FROM usage_events WHERE {WINDOW} AND {SMALL}
                GROUP BY 1, 2, 3""",
            f"SELECT model, operation, sum(cost_micros) FROM usage_events WHERE {PREVIOUS} GROUP BY 1, 2",
            f"""SELECT sum(r - 1), sum(c * (r - 1) / r), count(*) FROM (
                SELECT count(*) r, sum(cost_micros) c FROM usage_events
                WHERE event_time >= date_trunc('day', {END} - %(w)s::interval) AND event_time < {END}
                AND prompt_fingerprint IS NOT NULL GROUP BY prompt_fingerprint, provider, model) f
                WHERE r > 1""",
        ),
        lambda r, rows: (round(r.data.total_cost * 1_000_000), int(sum(row[4] or 0 for row in rows))),
    ),
    "budget_forecast_90d": (
        (
            """SELECT time_bucket('1 day', event_time), key_id, model, sum(cost_micros) FROM usage_events
                WHERE event_time >= date_trunc('day', %(now)s::timestamptz) - interval '90 days'
                AND event_time < date_trunc('day', %(now)s::timestamptz) GROUP BY 1, 2, 3""",
        ),
        lambda r, rows: (r.data.global_forecast.projected_spend >= 0, len(rows) > 0),
    ),
    "performance_metrics": (
        (
            """SELECT (SELECT max(event_time) FROM usage_events),
                (SELECT max(bucket) FROM usage_rollup_hourly_global),
                (SELECT max(bucket) FROM usage_rollup_daily_global)""",
        ),
        lambda r, rows: (
            r.data.rollup_freshness.last_raw_event_time.ToDatetime().isoformat(timespec="seconds"),
            rows[0][0].replace(tzinfo=None).isoformat(timespec="seconds"),
        ),
    ),
}
RAW_WINDOWS = {
    "trends_7d_hour": "7 days",
    "compare_7d": "7 days",
    "performance_7d": "7 days",
}


def _time_endpoints(address: str, key: str, top_keys: list[str], runs: int) -> dict[str, dict[str, Any]]:
    metadata = [("authorization", f"Bearer {key}")]
    out: dict[str, dict[str, Any]] = {}
    with grpc.insecure_channel(address) as channel:
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        for name, call in _calls(top_keys).items():
            for _ in range(2):
                reply = call(stub, metadata)
            samples = []
            for _ in range(runs):
                started = time.perf_counter()
                at = datetime.now(UTC)
                reply = call(stub, metadata)
                samples.append((time.perf_counter() - started) * 1000)
            out[name] = {
                "p50_ms": round(percentile(samples, 0.5), 2),
                "p95_ms": round(percentile(samples, 0.95), 2),
                "reply": reply,
                # When the kept reply was asked for: the raw side computes its answer as of then
                # (its windows end at the hour after it; minutes later an hour may have turned).
                "at": at,
            }
    return out


def _time_raw(
    conn: psycopg.Connection[Any], top_keys: list[str], zone: str, asked: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The raw side of every endpoint, as of the moment its compared reply was asked for."""
    out: dict[str, dict[str, Any]] = {}
    for name, (queries, _) in RAW.items():
        params = {
            "w": RAW_WINDOWS.get(name, "30 days"),
            "key": top_keys[0],
            "keys": top_keys[:3],
            "tz": zone,
            "now": asked[name]["at"],
        }
        samples = []
        rows: list[tuple[Any, ...]] = []
        for _ in range(3):
            started = time.perf_counter()
            for index, query in enumerate(queries):
                found = conn.execute(query, params).fetchall()
                if index == 0:
                    rows = found
            samples.append((time.perf_counter() - started) * 1000)
        out[name] = {"median_ms": round(statistics.median(samples), 2), "rows": rows}
    return out


def main() -> None:
    total = int(os.environ.get("BENCH_ANALYTICS_EVENTS", "10000000"))
    runs = int(os.environ.get("BENCH_ANALYTICS_RUNS", "20"))
    extra = {"INGEST_LATE_WINDOW_SECONDS": str((DAYS + 2) * 86400), "LOG_LEVEL": "WARNING"}
    keep = Path(os.environ["BENCH_ANALYTICS_KEEP"]) if os.environ.get("BENCH_ANALYTICS_KEEP") else None
    services = [ServiceName.BUDGET, ServiceName.INGEST, ServiceName.ANALYTICS]
    with bench_stack(services, extra, keep=keep) as suite:
        env = suite.env
        started = time.perf_counter()
        loaded = keep / "loaded.json" if keep is not None else None
        if loaded is not None and loaded.exists():
            accepted, load_seconds = json.loads(loaded.read_text())
            print(f"analytics: reusing the {accepted:,} events loaded in {keep}")
        else:
            accepted = asyncio.run(load(env["INGEST_ADDRESS"], env["ADMIN_MASTER_KEY"], total, DAYS))
            load_seconds = time.perf_counter() - started
            if loaded is not None:
                loaded.write_text(json.dumps([accepted, load_seconds]))
        time.sleep(1.0)
        with psycopg.connect(env["DATABASE_URL"], password=env["DATABASE_PASSWORD"], autocommit=True) as conn:
            conn.execute("ANALYZE")
            top = conn.execute(
                "SELECT key_id::text FROM usage_rollup_daily GROUP BY 1 ORDER BY sum(requests) DESC LIMIT 3"
            ).fetchall()
            top_keys = [r[0] for r in top]
            load_before = round(os.getloadavg()[0], 2)
            append_only = _time_endpoints(env["ANALYTICS_ADDRESS"], env["ADMIN_MASTER_KEY"], top_keys, runs)
            compaction = _compact(conn)
            compacted = _time_endpoints(env["ANALYTICS_ADDRESS"], env["ADMIN_MASTER_KEY"], top_keys, runs)
            raw = _time_raw(conn, top_keys, env.get("TIMEZONE", "UTC"), compacted)
    endpoints: dict[str, Any] = {}
    print(
        f"analytics: {accepted:,} events over {DAYS} days loaded through ingest in {load_seconds:.0f} s "
        f"({accepted / load_seconds:,.0f}/s)"
    )
    print(f"  rollup rows before -> after compaction: {compaction}")
    print(
        f"  {'endpoint':<24}{'p50 ms':>9}{'p95 ms':>9}{'(append-only p95)':>19}{'raw ms':>10}{'speed-up':>10}"
        "  same answer"
    )
    for name, timing in compacted.items():
        reply = timing.pop("reply")
        timing.pop("at")
        append_only[name].pop("reply", None)
        raw_ms = raw[name]["median_ms"]
        mine, theirs = RAW[name][1](reply, raw[name]["rows"])
        same = mine == theirs
        speedup = raw_ms / timing["p50_ms"] if timing["p50_ms"] else float("inf")
        endpoints[name] = {
            **timing,
            "append_only_p50_ms": append_only[name]["p50_ms"],
            "append_only_p95_ms": append_only[name]["p95_ms"],
            "raw_median_ms": raw_ms,
            "speedup_vs_raw": round(speedup, 1),
            "same_answer": same,
            "compared": [str(mine), str(theirs)],
        }
        print(
            f"  {name:<24}{timing['p50_ms']:>9.1f}{timing['p95_ms']:>9.1f}{append_only[name]['p95_ms']:>19.1f}"
            f"{raw_ms:>10.1f}{speedup:>9.1f}x  {same}"
        )
    figures = {
        "conditions": {
            "cpus": os.cpu_count(),
            "load_average_1m_before_timing": load_before,
            "load_average_1m_after_timing": round(os.getloadavg()[0], 2),
            "note": "warm timings over gRPC on a shared machine; other processes may be running",
        },
        "events": total,
        "accepted": accepted,
        "days": DAYS,
        "load_seconds": round(load_seconds, 1),
        "rollup_rows_before_after_compaction": compaction,
        "runs_per_endpoint": runs,
        "endpoints": endpoints,
        "targets": {"p95_ms": 150, "key_analytics_30d_p95_ms": 50, "speedup_vs_raw": 20},
    }
    path = write_results("analytics", figures)
    print(f"  -> {path}")


if __name__ == "__main__":
    main()
