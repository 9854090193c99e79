"""Budget authorize benchmark: 32 concurrent callers in a separate process drive Authorize and
Settle over gRPC against a real budget service; the baseline is raw redis-py EVALSHA of the same
scripts (Authorize, then Settle), 32 concurrent callers, measured in the same run under the same
conditions.

Two kinds of run, each beside its baseline:
- closed loop (saturation): every caller sends its next call as soon as the previous one
  answered, so the figures show the most the stack can do, and the latency at that load;
- open loop (latency at the target rate): the callers together send a fixed offered rate
  (BENCH_BUDGET_RATE, 5,000 Authorize+Settle pairs per second; and BENCH_BUDGET_LOW_RATE,
  1,000, to show latency below saturation; and 5,000 Authorize calls per second alone, the
  design's own statement of the target, as a gateway whose usage reaches budget through ingest
  never calls Settle) on a schedule, whatever the
  answers' latency. Latency is measured from each call's *scheduled* start, so a stack that
  falls behind shows it (no coordinated omission).
Each run is made twice over gRPC: with the unary RPCs (one call per Authorize and per Settle), and
on the request-path stream (StreamRequestPath through its gateway client: one long-lived stream
shared by the callers, the calls made together sent in one message).
A third reference, the gRPC transport floor, is the same callers calling the service's health
check (no work at all): what the gRPC client and server alone cost on this machine.

`python -m bench budget` (or `make bench`); figures also in bench/results/budget.json.
Targets (design): Authorize p50 <= 1 ms, p99 <= 3 ms, >= 5,000 authorizations/s.
Note: with 32 callers back to back, Little's law ties the two: 32 callers at p50 1 ms would be
32,000 calls/s, so the latency targets are judged at the target rate (open loop) and the
throughput target at saturation (closed loop).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from bench.common import bench_stack, percentile, process_cpu_seconds, write_results
from tally.runtime.config import ServiceName

CALLERS = int(os.environ.get("BENCH_BUDGET_CALLERS", "32"))
SECONDS = float(os.environ.get("BENCH_BUDGET_SECONDS", "10"))
RATE = float(os.environ.get("BENCH_BUDGET_RATE", "5000"))  # offered Authorize+Settle pairs per second
# A second open-loop rate the stack can sustain on a small machine: latency below saturation.
LOW_RATE = float(os.environ.get("BENCH_BUDGET_LOW_RATE", "1000"))
WARMUP_SECONDS = 1.5
ESTIMATE = 2_000  # $0.002
ACTUAL = 1_500
TARGETS = {"p50_ms": 1.0, "p99_ms": 3.0, "per_second": 5000}
# Optional subsets (comma-separated), for quick runs while working on one path: phase names
# (closed_authorize_only, closed_authorize_plus_settle, open_authorize_only, open_authorize_plus_settle,
# open_authorize_plus_settle_low_rate, closed_grpc_transport_floor) and sides (grpc, grpc_stream,
# baseline_redis_evalsha). Default: all of them.
PHASES = [p for p in os.environ.get("BENCH_BUDGET_PHASES", "").split(",") if p]
# BENCH_STREAM_INFLIGHT: the stream client's bound on unanswered messages (its default: 3), for
# comparing bounds back to back.
SIDES_RUN = [s for s in os.environ.get("BENCH_BUDGET_SIDES", "").split(",") if s]


def _schedule(index: int, begin: float, rate: float | None) -> tuple[float, float]:
    """(first start, interval) of caller `index`: open loop spreads the callers evenly."""
    if rate is None:
        return begin, 0.0
    interval = CALLERS / rate
    return begin + interval * index / CALLERS, interval


async def _drive(call: Any, seconds: float, rate: float | None, watch: dict[str, int] | None = None) -> dict[str, Any]:
    """Runs CALLERS coroutines of `call(index, n) -> (authorize seconds, pair seconds) | None`
    for a warm-up and then `seconds`, closed loop (rate None) or open loop at `rate` per second.
    Also the CPU seconds used during the measured part by this process (the load generator) and
    by each process of `watch` (name -> pid: the budget service, Redis)."""
    pids = {"load": os.getpid(), **(watch or {})}
    authorize_ms: list[float] = []
    pair_ms: list[float] = []
    errors = 0
    late = 0
    measuring = False
    numbers = itertools.count()  # unique across phases: every call is a new request id

    async def caller(index: int, begin: float, stop_at: float) -> None:
        nonlocal errors, late
        start, interval = _schedule(index, begin, rate)
        while start < stop_at:
            now = time.perf_counter()
            if interval:
                if start > now:
                    await asyncio.sleep(start - now)
                elif now - start > interval:
                    late += measuring
            else:
                start = now
            times = await call(index, next(numbers))
            if times is None:
                errors += measuring
            elif measuring:
                authorized, done = times
                authorize_ms.append((authorized - start) * 1000)
                pair_ms.append((done - start) * 1000)
            start = start + interval if interval else time.perf_counter()

    begin = time.perf_counter()
    await asyncio.gather(*(caller(i, begin, begin + WARMUP_SECONDS) for i in range(CALLERS)))
    measuring = True
    cpu_before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    begin = time.perf_counter()
    await asyncio.gather(*(caller(i, begin, begin + seconds) for i in range(CALLERS)))
    elapsed = time.perf_counter() - begin
    cpu = {name: process_cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    return {
        "authorize_ms": authorize_ms,
        "pair_ms": pair_ms,
        "elapsed": elapsed,
        "errors": errors,
        "late": late,
        "cpu_seconds": cpu,
    }


def _grpc_load(
    address: str,
    master_key: str,
    key_id: str,
    seconds: float,
    settle: bool,
    rate: float | None,
    watch: dict[str, int],
    out: Any,
) -> None:
    """Runs in a child process: CALLERS coroutines doing Authorize (then Settle, with `settle`)."""
    import grpc

    from tally.budget.v1 import budget_pb2, budget_pb2_grpc

    async def run() -> dict[str, Any]:
        metadata = [("authorization", f"Bearer {master_key}")]
        async with grpc.aio.insecure_channel(address) as channel:
            stub = budget_pb2_grpc.BudgetServiceStub(channel)
            tag = uuid.uuid4().hex[:8]

            async def call(index: int, n: int) -> tuple[float, float] | None:
                request_id = f"{tag}-{index}-{n}"
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
                    return None
                return authorized, time.perf_counter()

            return await _drive(call, seconds, rate, watch)

    out.put(asyncio.run(run()))


def _stream_load(
    address: str,
    master_key: str,
    key_id: str,
    seconds: float,
    settle: bool,
    rate: float | None,
    watch: dict[str, int],
    out: Any,
) -> None:
    """Runs in a child process: the same callers through the gateway client of the request-path
    stream (tally.clients.request_path): one stream for all of them, as one gateway process has."""
    import grpc

    from tally.budget.v1 import budget_pb2
    from tally.clients.request_path import MAX_MESSAGES_IN_FLIGHT, RequestPathClient, RequestPathError

    async def run() -> dict[str, Any]:
        metadata = [("authorization", f"Bearer {master_key}")]
        async with grpc.aio.insecure_channel(address) as channel:
            bound = int(os.environ.get("BENCH_STREAM_INFLIGHT", MAX_MESSAGES_IN_FLIGHT))
            client = RequestPathClient(channel, metadata=metadata, max_messages_in_flight=bound)
            tag = uuid.uuid4().hex[:8]

            async def call(index: int, n: int) -> tuple[float, float] | None:
                request_id = f"{tag}-{index}-{n}"
                try:
                    async with asyncio.timeout(5):
                        await client.authorize(key_id, request_id, ESTIMATE)
                        authorized = time.perf_counter()
                        if settle:
                            await client.settle(
                                budget_pb2.SettleRequest(
                                    request_id=request_id, key_id=key_id, actual_cost_micros=ACTUAL, provider="bench"
                                )
                            )
                except (RequestPathError, TimeoutError):
                    return None
                return authorized, time.perf_counter()

            result = await _drive(call, seconds, rate, watch)
            await client.close()
            return result

    out.put(asyncio.run(run()))


def _floor_load(address: str, seconds: float, watch: dict[str, int], out: Any) -> None:
    """Runs in a child process: the same callers calling the service's gRPC health check, which
    does no work: the cost of the gRPC transport alone (client and server) on this machine."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def run() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()

            async def call(index: int, n: int) -> tuple[float, float] | None:
                await stub.Check(request, timeout=5)
                done = time.perf_counter()
                return done, done

            return await _drive(call, seconds, None, watch)

    out.put(asyncio.run(run()))


def _evalsha_load(
    redis_url: str, key_id: str, seconds: float, settle: bool, rate: float | None, watch: dict[str, int], out: Any
) -> None:
    """Runs in a child process: CALLERS coroutines calling EVALSHA of the Authorize (and Settle)
    script directly, with the arguments the service passes."""
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
        provider_key,
        reservation_key,
    )

    async def run() -> dict[str, Any]:
        client = Redis.from_url(redis_url, max_connections=CALLERS)
        authorize_sha = await client.script_load(lua.AUTHORIZE)
        settle_sha = await client.script_load(lua.SETTLE)
        month = period_at(PeriodKind.MONTHLY, ZoneInfo("UTC"), datetime.now(UTC))
        key_counter = counter_key(key_scope(key_id), month, "UTC")
        global_counter = counter_key(GLOBAL_SCOPE, month, "UTC")
        providers = provider_key(month, "UTC")
        expire_at = int(month.end.timestamp()) + 86400 if month.end else 0
        tag = uuid.uuid4().hex[:8]
        fixed = (LOADED_KEY, EXPIRY_KEY, config_key(key_scope(key_id)), config_key(GLOBAL_SCOPE))
        counters = (key_counter, global_counter)
        periods = ("monthly", "UTC", "monthly", "UTC")
        defaults = ("monthly", "UTC")

        async def call(index: int, n: int) -> tuple[float, float] | None:
            """One item per EVALSHA, the same layout the service sends (KEYS: the two fixed keys,
            then the key table; the items as JSON referring to keys by index)."""
            request_id = f"raw-{tag}-{index}-{n}"
            reserve = reservation_key(request_id)
            item = [request_id, key_id, str(ESTIMATE), 3, 4, 5, 6, 7, *periods, str(expire_at), str(expire_at)]
            reply = await client.evalsha(
                authorize_sha,
                7,
                *fixed,
                *counters,
                reserve,
                *defaults,
                RESERVATION_PREFIX,
                SWEEP_LIMIT,
                300_000,
                300_000 + 691_200_000,
                json.dumps([item]),
            )
            authorized = time.perf_counter()
            assert int(reply[0]) == 1 and int(reply[1][0]) == 3, reply
            if settle:
                item = [request_id, key_id, str(ACTUAL), 3, 4, 5, 6, 7, 8, *periods, str(expire_at), str(expire_at)]
                reply = await client.evalsha(
                    settle_sha,
                    8,
                    *fixed,
                    *counters,
                    reserve,
                    providers,
                    *defaults,
                    691_200_000,
                    json.dumps([[*item, "bench"]]),
                )
                assert int(reply[0]) == 1 and int(reply[1][0]) == 3, reply
            return authorized, time.perf_counter()

        result = await _drive(call, seconds, rate, watch)
        await client.aclose()
        return result

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


def _phase(run: dict[str, Any]) -> dict[str, Any]:
    """Latency figures, and CPU microseconds per measured call (pair) of each watched process."""
    count = max(1, len(run["pair_ms"]))
    return {
        "authorize": _summary(run["authorize_ms"], run["elapsed"]),
        "authorize_plus_settle": _summary(run["pair_ms"], run["elapsed"]),
        "errors": run["errors"],
        "late_starts": run["late"],
        "cpu_us_per_call": {name: round(used * 1e6 / count, 1) for name, used in run["cpu_seconds"].items()},
    }


def measure(
    address: str,
    master_key: str,
    redis_url: str,
    key_id: str,
    seconds: float = SECONDS,
    watch: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Every phase (or those of BENCH_BUDGET_PHASES) against a running service; gRPC phase then
    its EVALSHA baseline. `watch`: processes whose CPU time per call is reported (name -> pid)."""
    watch = watch or {}
    phases: dict[str, Any] = {}
    if not PHASES or "closed_grpc_transport_floor" in PHASES:
        phases["closed_grpc_transport_floor"] = _phase(_in_child(_floor_load, address, seconds, watch))
    for name, settle, rate in (
        ("closed_authorize_only", False, None),
        ("closed_authorize_plus_settle", True, None),
        ("open_authorize_only", False, RATE),
        ("open_authorize_plus_settle", True, RATE),
        ("open_authorize_plus_settle_low_rate", True, LOW_RATE),
    ):
        if PHASES and name not in PHASES:
            continue
        runs = {
            "grpc": (_grpc_load, address, master_key, key_id, seconds, settle, rate, watch),
            "grpc_stream": (_stream_load, address, master_key, key_id, seconds, settle, rate, watch),
            "baseline_redis_evalsha": (_evalsha_load, redis_url, key_id, seconds, settle, rate, watch),
        }
        phases[name] = {
            side: _phase(_in_child(*run)) for side, run in runs.items() if not SIDES_RUN or side in SIDES_RUN
        }
    return phases


SIDES = {"grpc": "gRPC", "grpc_stream": "gRPC stream", "baseline_redis_evalsha": "EVALSHA"}


def _meets(phases: dict[str, Any], side: str) -> dict[str, bool]:
    """Throughput at saturation (closed loop, Authorize then Settle: authorizations per second) and
    Authorize latency at the target rate (open loop)."""
    closed = phases["closed_authorize_plus_settle"][side]["authorize"]
    opened = phases["open_authorize_plus_settle"][side]["authorize"]
    alone = phases["open_authorize_only"][side]["authorize"]
    return {
        "throughput_closed_loop_with_settle": closed["per_second"] >= TARGETS["per_second"],
        "latency_at_target_rate": opened["p50_ms"] <= TARGETS["p50_ms"] and opened["p99_ms"] <= TARGETS["p99_ms"],
        "latency_at_target_rate_authorize_only": alone["p50_ms"] <= TARGETS["p50_ms"]
        and alone["p99_ms"] <= TARGETS["p99_ms"],
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
        import redis

        with redis.Redis.from_url(suite.env["REDIS_URL"]) as client:
            redis_pid = int(client.info("server")["process_id"])
        watch = {"budget": suite.processes[ServiceName.BUDGET.value].pid, "redis": redis_pid}
        phases = measure(address, master_key, suite.env["REDIS_URL"], key_id, watch=watch)

    errors = sum(
        phase[side]["errors"] for phase in phases.values() for side in ("grpc", "grpc_stream") if side in phase
    )
    figures = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "callers": CALLERS,
        "seconds": SECONDS,
        "offered_pairs_per_second": RATE,
        "offered_pairs_per_second_low_rate": LOW_RATE,
        "cpus": os.cpu_count(),
        **phases,
        "grpc_errors": errors,
        "targets": TARGETS,
    }
    complete = not PHASES and not SIDES_RUN
    if complete:
        figures["meets_targets"] = {side: _meets(phases, side) for side in ("grpc", "grpc_stream")}
    # A partial run (BENCH_BUDGET_PHASES / _SIDES) keeps the full run's figures file as it is.
    path = write_results("budget" if complete else "budget-partial", figures)
    cpu_names = ["load", *sorted(watch)]
    cpu_head = " ".join(f"{name + ' us':>10}" for name in cpu_names)
    print(f"{'':66} {'per second':>11} {'p50 ms':>8} {'p99 ms':>8} {'late':>6} {cpu_head}")

    def cpu_cells(figure: dict[str, Any]) -> str:
        return " ".join(f"{figure['cpu_us_per_call'].get(name, float('nan')):>10.1f}" for name in cpu_names)

    if "closed_grpc_transport_floor" in phases:
        floor = phases["closed_grpc_transport_floor"]
        row = floor["authorize"]
        label = "closed gRPC health check (transport floor, no work)"
        print(
            f"{label:66} {row['per_second']:>11,.0f} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} {'':>6} "
            f"{cpu_cells(floor)}"
        )
    for name, phase in phases.items():
        if name == "closed_grpc_transport_floor":
            continue
        for side in ("grpc", "grpc_stream", "baseline_redis_evalsha"):
            if side not in phase:
                continue
            for part in ("authorize", "authorize_plus_settle"):
                if name == "closed_authorize_only" and part == "authorize_plus_settle":
                    continue
                row = phase[side][part]
                label = f"{name} {SIDES[side]} {part}"
                late = phase[side]["late_starts"] if name.startswith("open") else ""
                cells = (
                    cpu_cells(phase[side]) if part == "authorize_plus_settle" or name == "closed_authorize_only" else ""
                )
                print(
                    f"{label:66} {row['per_second']:>11,.0f} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} {late:>6} "
                    f"{cells}"
                )
    print(
        f"{CALLERS} concurrent callers in a separate process, {SECONDS:g}s per phase, open loop offered "
        f"{RATE:,.0f} and {LOW_RATE:,.0f} pairs/s; gRPC errors: {errors}; CPU us per call (pair) of the "
        f"load generator, the budget service and Redis during the measured part"
    )
    if complete:
        met = figures["meets_targets"]
        print(f"targets: p50 <= 1 ms, p99 <= 3 ms (at the target rate), >= 5,000/s (closed loop) -> {met}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
