"""Budget authorize benchmark: 32 concurrent callers in a separate process drive Authorize and
Settle over gRPC against a real budget service; the baseline is raw redis-py EVALSHA of the
same Authorize script, 32 concurrent callers, measured in the same run.

`python -m bench budget` (or `make bench`); figures also in bench/results/budget.json.
Targets (design): Authorize p50 <= 1 ms, p99 <= 3 ms, >= 5,000 authorizations/s.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from bench.common import bench_stack, percentile, write_results
from tally.runtime.config import ServiceName

CALLERS = int(os.environ.get("BENCH_BUDGET_CALLERS", "32"))
SECONDS = float(os.environ.get("BENCH_BUDGET_SECONDS", "10"))
WARMUP_SECONDS = 1.5
ESTIMATE = 2_000  # $0.002
ACTUAL = 1_500


def _grpc_load(address: str, master_key: str, key_id: str, seconds: float, settle: bool, out: Any) -> None:
    """Runs in a child process: CALLERS coroutines doing Authorize (then Settle, with `settle`)."""
    import grpc

    from tally.budget.v1 import budget_pb2, budget_pb2_grpc

    async def run() -> dict[str, Any]:
        metadata = [("authorization", f"Bearer {master_key}")]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = budget_pb2_grpc.BudgetServiceStub(channel)
            authorize_ms: list[float] = []
            pair_ms: list[float] = []
            errors = 0
            measuring = False

            async def caller(index: int, stop_at: float) -> None:
                nonlocal errors
                n = 0
                while time.perf_counter() < stop_at:
                    request_id = f"{index}-{n}-{uuid.uuid4().hex[:8]}"
                    n += 1
                    started = time.perf_counter()
                    try:
                        await stub.Authorize(
                            budget_pb2.AuthorizeRequest(
                                key_id=key_id, request_id=request_id, estimated_cost_micros=ESTIMATE
                            ),
                            metadata=metadata,
                            timeout=5,
                        )
                        authorized = time.perf_counter()
                        if settle:
                            await stub.Settle(
                                budget_pb2.SettleRequest(
                                    request_id=request_id, key_id=key_id, actual_cost_micros=ACTUAL, provider="bench"
                                ),
                                metadata=metadata,
                                timeout=5,
                            )
                    except grpc.aio.AioRpcError:
                        errors += 1
                        continue
                    if measuring:
                        authorize_ms.append((authorized - started) * 1000)
                        pair_ms.append((time.perf_counter() - started) * 1000)

            warm_end = time.perf_counter() + WARMUP_SECONDS
            await asyncio.gather(*(caller(i, warm_end) for i in range(CALLERS)))
            measuring = True
            begin = time.perf_counter()
            await asyncio.gather(*(caller(i, begin + seconds) for i in range(CALLERS)))
            elapsed = time.perf_counter() - begin
            return {"authorize_ms": authorize_ms, "pair_ms": pair_ms, "elapsed": elapsed, "errors": errors}

    out.put(asyncio.run(run()))


def _evalsha_load(redis_url: str, key_id: str, seconds: float, out: Any) -> None:
    """Runs in a child process: CALLERS coroutines calling EVALSHA of the Authorize script directly."""
    from redis.asyncio import Redis

    from services.budget import lua
    from services.budget.periods import PeriodKind, period_at
    from services.budget.store import (
        EXPIRY_KEY,
        GLOBAL_SCOPE,
        LOADED_KEY,
        RESERVATION_PREFIX,
        SWEEP_LIMIT,
        config_key,
        counter_key,
        key_scope,
        reservation_key,
    )

    async def run() -> dict[str, Any]:
        client = Redis.from_url(redis_url)
        sha = await client.script_load(lua.AUTHORIZE)
        month = period_at(PeriodKind.MONTHLY, ZoneInfo("UTC"), datetime.now(UTC))
        key_counter = counter_key(key_scope(key_id), month, "UTC")
        global_counter = counter_key(GLOBAL_SCOPE, month, "UTC")
        expire_at = int(month.end.timestamp()) + 86400 if month.end else 0
        latencies: list[float] = []
        measuring = False

        async def caller(index: int, stop_at: float) -> None:
            n = 0
            while time.perf_counter() < stop_at:
                request_id = f"raw-{index}-{n}-{uuid.uuid4().hex[:8]}"
                n += 1
                started = time.perf_counter()
                reply = await client.evalsha(
                    sha,
                    7,
                    LOADED_KEY,
                    config_key(key_scope(key_id)),
                    config_key(GLOBAL_SCOPE),
                    key_counter,
                    global_counter,
                    reservation_key(request_id),
                    EXPIRY_KEY,
                    request_id,
                    key_id,
                    ESTIMATE,
                    "monthly",
                    "UTC",
                    "monthly",
                    "UTC",
                    "monthly",
                    "UTC",
                    300_000,
                    expire_at,
                    expire_at,
                    300_000,
                    RESERVATION_PREFIX,
                    SWEEP_LIMIT,
                )
                if measuring:
                    latencies.append((time.perf_counter() - started) * 1000)
                assert int(reply[0]) == 3, reply

        warm_end = time.perf_counter() + WARMUP_SECONDS
        await asyncio.gather(*(caller(i, warm_end) for i in range(CALLERS)))
        measuring = True
        begin = time.perf_counter()
        await asyncio.gather(*(caller(i, begin + seconds) for i in range(CALLERS)))
        elapsed = time.perf_counter() - begin
        await client.aclose()
        return {"authorize_ms": latencies, "elapsed": elapsed}

    out.put(asyncio.run(run()))


def _in_child(target: Any, *args: Any) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result: dict[str, Any] = queue.get(timeout=SECONDS * 4 + 120)
    process.join(30)
    return result


def _summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    return {
        "count": len(latencies),
        "per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
    }


def main() -> None:
    import grpc

    from tally.budget.v1 import budget_pb2, budget_pb2_grpc

    env = {"TIMEZONE": "UTC", "BUDGET_RECONCILE_ON_START": "true"}
    with bench_stack([ServiceName.BUDGET], env) as suite:
        address = suite.env["BUDGET_ADDRESS"]
        master_key = suite.env["ADMIN_MASTER_KEY"]
        key_id = str(uuid.uuid4())
        with grpc.insecure_channel(address) as channel:
            stub = budget_pb2_grpc.BudgetServiceStub(channel)
            stub.UpdateVirtualKeyBudget(
                budget_pb2.UpdateVirtualKeyBudgetRequest(key_id=key_id, max_budget=1e8, period="monthly"),
                metadata=[("authorization", f"Bearer {master_key}")],
                timeout=10,
            )
        grpc_run = _in_child(_grpc_load, address, master_key, key_id, SECONDS, True)
        only_run = _in_child(_grpc_load, address, master_key, key_id, SECONDS, False)
        raw_run = _in_child(_evalsha_load, suite.env["REDIS_URL"], key_id, SECONDS)

    authorize = _summary(grpc_run["authorize_ms"], grpc_run["elapsed"])
    authorize_only = _summary(only_run["authorize_ms"], only_run["elapsed"])
    pairs = _summary(grpc_run["pair_ms"], grpc_run["elapsed"])
    raw = _summary(raw_run["authorize_ms"], raw_run["elapsed"])
    figures = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "callers": CALLERS,
        "seconds": SECONDS,
        "cpus": os.cpu_count(),
        "grpc_authorize": authorize,
        "grpc_authorize_plus_settle": pairs,
        "grpc_authorize_only": authorize_only,
        "grpc_errors": grpc_run["errors"] + only_run["errors"],
        "baseline_redis_evalsha_authorize": raw,
        "targets": {"p50_ms": 1.0, "p99_ms": 3.0, "per_second": 5000},
        "meets_targets": authorize["p50_ms"] <= 1.0 and authorize["p99_ms"] <= 3.0 and authorize["per_second"] >= 5000,
    }
    path = write_results("budget", figures)
    print(f"{'':38} {'per second':>12} {'p50 ms':>8} {'p99 ms':>8}")
    rows = [
        ("Authorize over gRPC (in Authorize+Settle)", authorize),
        ("Authorize+Settle pairs over gRPC", pairs),
        ("Authorize only over gRPC", authorize_only),
        ("baseline: redis-py EVALSHA (Authorize)", raw),
    ]
    for label, row in rows:
        print(f"{label:38} {row['per_second']:>12,.0f} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f}")
    print(
        f"{CALLERS} concurrent callers in a separate process, {SECONDS:g}s per phase; errors: {figures['grpc_errors']}"
    )
    print(f"targets: p50 <= 1 ms, p99 <= 3 ms, >= 5,000/s -> {'met' if figures['meets_targets'] else 'NOT met'}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
