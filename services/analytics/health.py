"""Pipeline health: real reachability of PostgreSQL, TimescaleDB, Redis and every service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tally.runtime.db import Database
from tally.runtime.redis import RedisClient

# A component whose probe takes longer than this counts as down.
PROBE_TIMEOUT_SECONDS = 2.0
CRITICAL = ("postgres", "timescaledb")


@dataclass(frozen=True)
class ComponentStatus:
    status: str  # up | down | degraded
    latency_ms: float
    version: str = ""
    detail: str = ""


@dataclass(frozen=True)
class PipelineHealthReport:
    status: str  # healthy | degraded | unhealthy
    checked_at: datetime
    components: dict[str, ComponentStatus]


async def _timed(probe: Callable[[], Awaitable[tuple[str, str]]]) -> ComponentStatus:
    started = time.perf_counter()
    try:
        version, detail = await asyncio.wait_for(probe(), PROBE_TIMEOUT_SECONDS)
    except Exception as exc:  # any failure of a probe is the component being down
        return ComponentStatus("down", _ms(started), detail=f"{type(exc).__name__}: {exc}"[:300])
    return ComponentStatus("up", _ms(started), version, detail)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


async def check_database(db: Database) -> tuple[ComponentStatus, ComponentStatus]:
    async def postgres() -> tuple[str, str]:
        row = await db.fetch_one("SELECT current_setting('server_version') AS version")
        assert row is not None
        return str(row["version"]), ""

    async def timescaledb() -> tuple[str, str]:
        row = await db.fetch_one(
            """SELECT extversion AS version, current_setting('timescaledb.license', true) AS license,
                      (SELECT count(*) FROM timescaledb_information.hypertables) AS hypertables
               FROM pg_extension WHERE extname = 'timescaledb'"""
        )
        if row is None:
            raise RuntimeError("the timescaledb extension is not installed in this database")
        return str(row["version"]), f"license={row['license']}; hypertables={row['hypertables']}"

    postgres_status, timescale_status = await asyncio.gather(_timed(postgres), _timed(timescaledb))
    return postgres_status, timescale_status


async def check_redis(redis: RedisClient) -> ComponentStatus:
    async def probe() -> tuple[str, str]:
        await redis.ping()
        info = await redis.info("server")
        version = info.get("redis_version", "") if isinstance(info, dict) else ""
        return str(version), ""

    return await _timed(probe)


async def check_service(channel: grpc.aio.Channel) -> ComponentStatus:
    async def probe() -> tuple[str, str]:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_SECONDS
        )
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"health says {status}")
        return "", status

    return await _timed(probe)


async def pipeline_health(
    db: Database, redis: RedisClient, services: Mapping[str, grpc.aio.Channel | None]
) -> PipelineHealthReport:
    """Runs every probe concurrently. `services` maps a name to its channel (None = this process)."""
    names = list(services)
    database = asyncio.create_task(check_database(db))
    redis_status = asyncio.create_task(check_redis(redis))
    service_statuses: list[ComponentStatus] = await asyncio.gather(
        *(check_service(ch) if ch is not None else _self_status() for ch in services.values())
    )
    postgres, timescale = await database
    components = {
        "postgres": postgres,
        "timescaledb": timescale,
        "redis": await redis_status,
        **dict(zip(names, service_statuses, strict=True)),
    }
    if any(components[name].status != "up" for name in CRITICAL):
        overall = "unhealthy"
    elif any(c.status != "up" for c in components.values()):
        overall = "degraded"
    else:
        overall = "healthy"
    return PipelineHealthReport(overall, datetime.now(UTC), components)


async def _self_status() -> ComponentStatus:
    return ComponentStatus("up", 0.0, detail="SERVING")
