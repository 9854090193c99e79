"""Ingest throughput: 1 M events in gRPC batches of 1,000 over 4 concurrent streams (each keeping
up to 4 batches unacknowledged), committed with rollups, beside a raw psycopg binary COPY of the
same rows into a bare hypertable, measured before the load and again after it (the ratio is
against their mean: this kind of machine's speed drifts within minutes).

Run with `make bench` (all benchmarks) or `python -m bench ingest`. Writes bench/results/ingest.json.
`BENCH_INGEST_EVENTS` changes the event count (default 1,000,000).
`BENCH_INGEST_WINDOW` the unacknowledged batches per stream (default 4; 8 gave 0 to 12% more
throughput at twice the batch latency).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import psycopg

from bench.common import bench_stack, cpu_seconds_by_group, peak_rss_mb, percentile, write_results
from tally.ingest.v1 import ingest_pb2
from tally.runtime.config import ServiceName

BATCH = 1000
STREAMS = 4
WINDOW = int(os.environ.get("BENCH_INGEST_WINDOW", "4"))  # unacknowledged batches per stream
MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-3-5-sonnet"),
    ("anthropic", "claude-3-haiku"),
    ("google", "gemini-1.5-flash"),
    ("openai", "text-embedding-3-small"),
]
OPERATIONS = ["chat.completions", "chat.completions", "chat.completions", "embeddings", "completions"]


def make_batches(total: int, seed: int = 7) -> list[bytes]:
    """Serialized StreamUsageRequest batches of live traffic: events of the last two minutes, 2% of
    them late by up to a day (a gateway flushing a backlog)."""
    rng = random.Random(seed)
    keys = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(200)]
    now = datetime.now(UTC)
    batches = []
    for number in range(total // BATCH):
        request = ingest_pb2.StreamUsageRequest(batch_id=f"batch-{number}")
        for _ in range(BATCH):
            provider, model = rng.choice(MODELS)
            status = 200 if rng.random() < 0.97 else rng.choice([429, 500, 503])
            event = request.events.add(
                request_id=uuid.UUID(int=rng.getrandbits(128)).hex,
                virtual_key_id=rng.choice(keys),
                provider=provider,
                model=model,
                operation=rng.choice(OPERATIONS),
                input_tokens=rng.randint(10, 4000),
                output_tokens=rng.randint(0, 1500),
                cached_read_tokens=rng.choice([0, 0, 0, rng.randint(0, 2000)]),
                latency_ms=rng.randint(80, 20000),
                time_to_first_token_ms=rng.randint(20, 2000),
                http_status=status,
                error_type="" if status == 200 else "provider_error",
                streaming=rng.random() < 0.6,
                tools_used=rng.random() < 0.15,
                end_user_id=f"user-{rng.randint(1, 5000)}",
                prompt_fingerprint=f"fp-{rng.randint(1, 3000)}",
            )
            late = rng.random() < 0.02
            event.event_time.FromDatetime(now - timedelta(seconds=rng.randint(0, 86400 if late else 120)))
        batches.append(request.SerializeToString())
    return batches


async def _drive(address: str, key: str, batches: list[bytes]) -> dict[str, Any]:
    metadata = [("authorization", f"Bearer {key}")]
    latencies: list[float] = []
    accepted = 0
    numbered = [(f"batch-{number}", payload) for number, payload in enumerate(batches)]
    shares = [numbered[i::STREAMS] for i in range(STREAMS)]
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]

    async def stream(share: list[tuple[str, bytes]]) -> None:
        nonlocal accepted
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            call = channel.stream_stream(
                "/tally.ingest.v1.IngestService/StreamUsage",
                request_serializer=lambda b: b,
                response_deserializer=ingest_pb2.StreamUsageResponse.FromString,
            )(metadata=metadata)
            # Up to WINDOW batches unacknowledged, as a high-rate gateway would keep; a batch's
            # latency is from its write to its acknowledgement (acks come in commit order).
            window = asyncio.Semaphore(WINDOW)
            sent: dict[str, float] = {}

            async def write() -> None:
                for batch_id, payload in share:
                    await window.acquire()
                    sent[batch_id] = time.perf_counter()
                    await call.write(payload)
                await call.done_writing()

            writer = asyncio.create_task(write())
            for _ in share:
                ack = await call.read()
                latencies.append(time.perf_counter() - sent.pop(ack.batch_id))
                accepted += ack.result.accepted
                window.release()
            await writer

    started = time.perf_counter()
    await asyncio.gather(*(stream(s) for s in shares))
    elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "accepted": accepted, "latencies": latencies}


def _load_process(address: str, key: str, total: int, out: Any, ready: Any, go: Any) -> None:
    batches = make_batches(total)
    ready.set()
    go.wait()
    out.put(asyncio.run(_drive(address, key, batches)))


def _baseline(dsn: str, password: str, total: int) -> float:
    """Rows/s of a raw binary COPY of the same rows into a bare hypertable (no dedup, no rollups)."""
    rows = []
    for payload in make_batches(total):
        for e in ingest_pb2.StreamUsageRequest.FromString(payload).events:
            rows.append(
                (
                    e.event_time.ToDatetime(tzinfo=UTC),
                    e.request_id,
                    uuid.UUID(e.virtual_key_id),
                    e.provider,
                    e.model,
                    e.operation,
                    e.input_tokens,
                    e.output_tokens,
                    e.cached_read_tokens,
                    0,
                    0,
                    0,
                    Decimal(0),
                    e.latency_ms,
                    e.time_to_first_token_ms,
                    e.http_status,
                    e.error_type or None,
                    e.streaming,
                    e.tools_used,
                    e.end_user_id,
                    e.prompt_fingerprint,
                    1000,
                    "computed",
                    None,
                    None,
                )
            )
    columns = (
        "event_time, request_id, key_id, provider, model, operation, input_tokens, output_tokens, "
        "cached_read_tokens, cache_write_tokens, reasoning_tokens, images, audio_seconds, latency_ms, ttft_ms, "
        "http_status, error_type, streaming, tools_used, end_user_hash, prompt_fingerprint, cost_micros, "
        "cost_source, price_id, tags"
    )
    types = [
        "timestamptz",
        "text",
        "uuid",
        "text",
        "text",
        "text",
        "int8",
        "int8",
        "int8",
        "int8",
        "int8",
        "int4",
        "numeric",
        "int4",
        "int4",
        "int2",
        "text",
        "bool",
        "bool",
        "text",
        "text",
        "int8",
        "text",
        "int8",
        "jsonb",
    ]
    with psycopg.connect(dsn, password=password, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_baseline")
        conn.execute("CREATE TABLE bench_baseline (LIKE usage_events INCLUDING DEFAULTS)")
        conn.execute(
            "SELECT create_hypertable('bench_baseline', 'event_time', chunk_time_interval => interval '1 day')"
        )
        started = time.perf_counter()
        for start in range(0, len(rows), BATCH):
            with (
                conn.transaction(),
                conn.cursor() as cur,
                cur.copy(f"COPY bench_baseline ({columns}) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.set_types(types)
                for row in rows[start : start + BATCH]:
                    copy.write_row(row)
        elapsed = time.perf_counter() - started
        conn.execute("DROP TABLE bench_baseline")
    return len(rows) / elapsed


def _wait_until_quiet(pids: dict[str, int], limit_seconds: float = 30.0) -> None:
    """Waits (at most `limit_seconds`) until the services, PostgreSQL and Redis together use less
    than a tenth of a core: the after-commit work and the compactor's merges are done."""
    deadline = time.monotonic() + limit_seconds
    before = sum(cpu_seconds_by_group(pids).values())
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = sum(cpu_seconds_by_group(pids).values())
        if now - before < 0.05:
            return
        before = now


def main() -> None:
    total = int(os.environ.get("BENCH_INGEST_EVENTS", "1000000"))
    # BENCH_NO_BUDGET=1 measures ingest alone (its settlements then fail fast and are counted).
    services = [ServiceName.INGEST] if os.environ.get("BENCH_NO_BUDGET") else [ServiceName.BUDGET, ServiceName.INGEST]
    with bench_stack(services) as suite:
        env = suite.env
        # The baseline runs on the idle machine, so nothing of the ingest run competes with it:
        # before the load and again after it (once the services are quiet), because this kind of
        # machine's speed drifts within minutes; the ratio is taken against their mean.
        baseline_before = _baseline(env["DATABASE_URL"], env["DATABASE_PASSWORD"], total)
        address = env["INGEST_ADDRESS"]
        ingest_pid = suite.processes["ingest"].pid
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        ready, go = context.Event(), context.Event()
        loader = context.Process(target=_load_process, args=(address, env["ADMIN_MASTER_KEY"], total, queue, ready, go))
        loader.start()
        ready.wait()  # events generated; only the load itself is measured
        pids = {name: process.pid for name, process in suite.processes.items()}
        pids["load generator"] = loader.pid or 0
        cpu_before = cpu_seconds_by_group(pids)
        go.set()
        result = queue.get()
        cpu = {k: round(v - cpu_before[k], 1) for k, v in cpu_seconds_by_group(pids).items()}
        loader.join()
        rss = peak_rss_mb(ingest_pid)
        _wait_until_quiet(pids)
        baseline_after = _baseline(env["DATABASE_URL"], env["DATABASE_PASSWORD"], total)
        baseline = (baseline_before + baseline_after) / 2
        with psycopg.connect(env["DATABASE_URL"], password=env["DATABASE_PASSWORD"]) as conn:
            stored = conn.execute("SELECT count(*) FROM usage_events").fetchone()
            rollup = conn.execute("SELECT sum(requests) FROM usage_rollup_hourly").fetchone()
    rate = result["accepted"] / result["elapsed"]
    latencies = result["latencies"]
    figures = {
        "events": total,
        "accepted": result["accepted"],
        "stored": stored[0] if stored else None,
        "rollup_requests": int(rollup[0]) if rollup and rollup[0] is not None else None,
        "events_per_second": round(rate),
        "batch_latency_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "batch_latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "ingest_peak_rss_mb": round(rss, 1),
        "baseline_copy_rows_per_second": round(baseline),
        "baseline_before_and_after_rows_per_second": [round(baseline_before), round(baseline_after)],
        "ratio_to_baseline": round(rate / baseline, 3),
        "targets": {"events_per_second": 50000, "ratio_to_baseline": 0.30, "ingest_peak_rss_mb": 300},
        "cpu_seconds_during_load": cpu,
        "streams": STREAMS,
        "batch": BATCH,
    }
    path = write_results("ingest", figures)
    print(
        f"ingest: {figures['events_per_second']:>9,} events/s committed with rollups "
        f"(target >= 50,000; {figures['ratio_to_baseline']:.0%} of baseline, target >= 30%)"
    )
    print(
        f"  baseline raw COPY into a bare hypertable: {figures['baseline_copy_rows_per_second']:>9,} rows/s "
        f"(mean of {round(baseline_before):,} before the load and {round(baseline_after):,} after it)"
    )
    print(
        f"  batch latency p50 {figures['batch_latency_p50_ms']} ms, p99 {figures['batch_latency_p99_ms']} ms; "
        f"ingest peak RSS {figures['ingest_peak_rss_mb']} MB (target < 300)"
    )
    print(f"  CPU seconds during the {result['elapsed']:.1f} s load (2 cores): {cpu}")
    print(f"  stored {figures['stored']:,} of {total:,}; rollups count {figures['rollup_requests']:,}; -> {path}")


if __name__ == "__main__":
    main()
