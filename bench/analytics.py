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
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc
import psycopg

from bench.common import bench_stack, percentile, write_results
from services.ingest.compaction import TABLES
from tally.analytics.v1 import analytics_pb2 as pb
from tally.analytics.v1 import analytics_pb2_grpc
from tally.demo import load
from tally.runtime.config import ServiceName
from tally.usage.histogram import bucket_of

DAYS = 90


def _compact(conn: psycopg.Connection[Any]) -> dict[str, list[int]]:
    """Merges each bucket's rows to one per group in every rollup (what the ingest compactor does
    bucket by bucket; the sums are unchanged: an exact rewrite)."""
    counts: dict[str, list[int]] = {}
    for table in TABLES:
        keys = ", ".join(("bucket", *table.group))
        sums = ", ".join(f"sum({c}) AS {c}" for c in table.sums)
        before = conn.execute(f"SELECT count(*) FROM {table.name}").fetchone()  # noqa: S608
        with conn.transaction():
            conn.execute(
                f"CREATE TEMP TABLE merged ON COMMIT DROP AS SELECT {keys}, {sums} FROM {table.name} GROUP BY {keys}"  # noqa: S608
            )
            conn.execute(f"DELETE FROM {table.name}")  # noqa: S608
            conn.execute(f"INSERT INTO {table.name} ({keys}, {', '.join(table.sums)}) SELECT * FROM merged")  # noqa: S608
        after = conn.execute(f"SELECT count(*) FROM {table.name}").fetchone()  # noqa: S608
        counts[table.name] = [int(before[0]) if before else 0, int(after[0]) if after else 0]
        conn.execute(f"VACUUM ANALYZE {table.name}")
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
# The same answers from the raw hypertable: (SQL, a function of the endpoint reply and the SQL rows
# that returns (endpoint value, raw value) to compare).
RAW: dict[str, tuple[str, Callable[[Any, list[tuple[Any, ...]]], tuple[Any, Any]]]] = {
    "live": (
        "SELECT count(*) FROM usage_events WHERE event_time >= date_trunc('hour', now())",
        lambda r, rows: (r.data.real_time_metrics.requests_this_hour, rows[0][0]),
    ),
    "trends_7d_hour": (
        """SELECT sum(n), sum(c) FROM (SELECT time_bucket('1 hour', event_time), count(*) n,
            sum(cost_micros) c FROM usage_events
            WHERE event_time >= date_trunc('hour', now()) + interval '1 hour' - %s::interval GROUP BY 1) h""",
        lambda r, rows: (r.data.metrics.total_requests, rows[0][0]),
    ),
    "trends_90d_day": (
        """SELECT sum(n) FROM (SELECT time_bucket('1 day', event_time), count(*) n, sum(cost_micros) c,
           count(DISTINCT key_id) FROM usage_events
           WHERE event_time >= date_trunc('day', now()) - interval '89 days' GROUP BY 1) d""",
        lambda r, rows: (r.data.metrics.total_requests, rows[0][0]),
    ),
    "key_analytics_30d": (
        """SELECT count(*), sum(cost_micros),
            sum(input_tokens + output_tokens + cached_read_tokens + cache_write_tokens + reasoning_tokens),
            avg(latency_ms)
            FROM usage_events WHERE key_id = %s::uuid
            AND event_time >= date_trunc('hour', now()) + interval '1 hour' - %s::interval""",
        lambda r, rows: (r.data.summary.total_requests, rows[0][0]),
    ),
    "compare_7d": (
        """SELECT key_id, count(*), sum(cost_micros), avg(latency_ms) FROM usage_events
            WHERE key_id = ANY(%s::uuid[])
            AND event_time >= date_trunc('hour', now()) + interval '1 hour' - %s::interval GROUP BY 1""",
        lambda r, rows: (sum(k.values["requests"] for k in r.data.keys), sum(row[1] for row in rows)),
    ),
    "providers_30d": (
        """SELECT provider, model, count(*), sum(cost_micros), avg(latency_ms) FROM usage_events
            WHERE event_time >= date_trunc('hour', now()) + interval '1 hour' - %s::interval GROUP BY 1, 2""",
        lambda r, rows: (r.data.total_requests, sum(row[2] for row in rows)),
    ),
    "performance_7d": (
        """SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY latency_ms), count(*) FROM usage_events
            WHERE event_time >= date_trunc('hour', now()) + interval '1 hour' - %s::interval""",
        lambda r, rows: (
            bucket_of(r.data.overall.latency.p50 * 1000 - 1e-6),
            bucket_of(rows[0][0]) if rows[0][0] is not None else 0,
        ),
    ),
    "patterns_30d": (
        """SELECT time_bucket('1 hour', event_time), count(*), sum(cost_micros) FROM usage_events
            WHERE event_time >= date_trunc('hour', now()) + interval '1 hour' - %s::interval GROUP BY 1""",
        lambda r, rows: (len(r.data.patterns.temporal_patterns.peak_hours) > 0, len(rows) > 0),
    ),
    "cost_optimization_30d": (
        """SELECT sum(cost_micros) FROM usage_events
           WHERE event_time >= date_trunc('hour', now()) + interval '1 hour' - %s::interval""",
        lambda r, rows: (round(r.data.total_cost * 1_000_000), int(rows[0][0] or 0)),
    ),
    "budget_forecast_90d": (
        """SELECT time_bucket('1 day', event_time), sum(cost_micros) FROM usage_events
           WHERE event_time >= date_trunc('day', now()) - interval '90 days' AND event_time < date_trunc('day', now())
           GROUP BY 1""",
        lambda r, rows: (r.data.global_forecast.projected_spend >= 0, len(rows) > 0),
    ),
    "performance_metrics": (
        "SELECT max(event_time) FROM usage_events",
        lambda r, rows: (
            r.data.rollup_freshness.last_raw_event_time.ToDatetime().isoformat(timespec="seconds"),
            rows[0][0].replace(tzinfo=None).isoformat(timespec="seconds"),
        ),
    ),
}
RAW_PARAMS: dict[str, Callable[[list[str]], tuple[Any, ...]]] = {
    "trends_7d_hour": lambda k: ("7 days",),
    "key_analytics_30d": lambda k: (k[0], "30 days"),
    "compare_7d": lambda k: (k[:3], "7 days"),
    "providers_30d": lambda k: ("30 days",),
    "performance_7d": lambda k: ("7 days",),
    "patterns_30d": lambda k: ("30 days",),
    "cost_optimization_30d": lambda k: ("30 days",),
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
                reply = call(stub, metadata)
                samples.append((time.perf_counter() - started) * 1000)
            out[name] = {
                "p50_ms": round(percentile(samples, 0.5), 2),
                "p95_ms": round(percentile(samples, 0.95), 2),
                "reply": reply,
            }
    return out


def _time_raw(conn: psycopg.Connection[Any], top_keys: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, (query, _) in RAW.items():
        params = RAW_PARAMS.get(name, lambda k: ())(top_keys)
        samples = []
        rows: list[tuple[Any, ...]] = []
        for _ in range(3):
            started = time.perf_counter()
            rows = conn.execute(query, params).fetchall()
            samples.append((time.perf_counter() - started) * 1000)
        out[name] = {"median_ms": round(statistics.median(samples), 2), "rows": rows}
    return out


def main() -> None:
    total = int(os.environ.get("BENCH_ANALYTICS_EVENTS", "10000000"))
    runs = int(os.environ.get("BENCH_ANALYTICS_RUNS", "20"))
    extra = {"INGEST_LATE_WINDOW_SECONDS": str((DAYS + 2) * 86400), "LOG_LEVEL": "WARNING"}
    with bench_stack([ServiceName.BUDGET, ServiceName.INGEST, ServiceName.ANALYTICS], extra) as suite:
        env = suite.env
        started = time.perf_counter()
        accepted = asyncio.run(load(env["INGEST_ADDRESS"], env["ADMIN_MASTER_KEY"], total, DAYS))
        load_seconds = time.perf_counter() - started
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
            raw = _time_raw(conn, top_keys)
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
