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
from tally.runtime.windows import HOUR, floor_to

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
    outbox_pending: int = 0
    outbox_dead: int = 0
    rollup_status: str = "unknown"  # consistent | inconsistent | unknown
    rollup_detail: str = ""


# The consistency check compares the last complete hour of raw events with the hourly rollups
# (requests and cost), which must be equal at every instant. It aggregates that hour's raw events,
# so it runs at most every ANALYTICS_CONSISTENCY_CHECK_SECONDS (ConsistencyCheck).
CONSISTENCY_HOURS = 1


async def check_outbox(db: Database) -> tuple[int, int]:
    row = await db.fetch_one(
        """SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                  count(*) FILTER (WHERE status = 'dead') AS dead
           FROM notification_outbox"""
    )
    return (int(row["pending"]), int(row["dead"])) if row else (0, 0)


async def check_rollup_consistency(db: Database) -> tuple[str, str]:
    # The bounds are parameters, not a CTE joined to the hypertable: with them as values the
    # planner excludes every other chunk and reads the time index (the CTE form scanned the whole
    # raw table, ~1 s at 5 M events and growing with retention).
    hi = floor_to(datetime.now(UTC), HOUR)
    rows = await db.fetch_all(
        """WITH raw AS (SELECT time_bucket('1 hour', event_time) AS bucket, count(*) AS requests,
                               coalesce(sum(cost_micros), 0) AS cost
                        FROM usage_events WHERE event_time >= %(lo)s AND event_time < %(hi)s GROUP BY 1),
                roll AS (SELECT bucket, sum(requests) AS requests, sum(cost_micros) AS cost
                         FROM usage_rollup_hourly WHERE bucket >= %(lo)s AND bucket < %(hi)s GROUP BY 1)
            SELECT coalesce(raw.bucket, roll.bucket) AS bucket, raw.requests AS raw_requests,
                   roll.requests AS rollup_requests, raw.cost AS raw_cost, roll.cost AS rollup_cost
            FROM raw FULL JOIN roll USING (bucket)
            WHERE raw.requests IS DISTINCT FROM roll.requests OR raw.cost IS DISTINCT FROM roll.cost""",
        {"lo": hi - CONSISTENCY_HOURS * HOUR, "hi": hi},
    )
    if not rows:
        return "consistent", "hourly rollups equal the raw events over the last complete hour"
    first = rows[0]
    return "inconsistent", (
        f"{len(rows)} hour(s) differ, e.g. {first['bucket'].isoformat()}: raw {first['raw_requests']} requests / "
        f"{first['raw_cost']} micro-USD, rollup {first['rollup_requests']} / {first['rollup_cost']}"
    )


class ConsistencyCheck:
    """The last result of the rollup consistency probe, refreshed in the background at most every
    `interval` seconds (the probe aggregates an hour of raw events: too much for every health
    call at a high rate). The first call waits for a result; later ones get the last one, with
    the time it was taken, and start a refresh when it is older than `interval`."""

    def __init__(self, db: Database, interval: float) -> None:
        self._db = db
        self._interval = interval
        self._result: tuple[str, str] | None = None
        self._taken = 0.0
        self._task: asyncio.Task[None] | None = None

    async def result(self) -> tuple[str, str]:
        if self._result is None or time.monotonic() - self._taken >= self._interval:
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._refresh())
            if self._result is None:
                await asyncio.shield(self._task)
        assert self._result is not None
        return self._result

    async def _refresh(self) -> None:
        try:
            status, detail = await check_rollup_consistency(self._db)
        except Exception as exc:  # a failed check is reported, not raised
            status, detail = "unknown", f"{type(exc).__name__}: {exc}"[:300]
        self._result = (status, f"{detail} (checked at {datetime.now(UTC).isoformat(timespec='seconds')})")
        self._taken = time.monotonic()


async def check_gateway(address: str) -> ComponentStatus:
    """Envoy answers on its REST listener (the OpenAPI document is served by Envoy itself)."""

    async def probe() -> tuple[str, str]:
        host, port = address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /api/admin/openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            await writer.drain()
            reply = await reader.read(200)
        finally:
            writer.close()
        status_line = reply.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 200 " not in status_line + " ":
            raise RuntimeError(f"envoy answered {status_line!r}")
        return "", "serving the REST listener"

    return await _timed(probe)


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
    db: Database,
    redis: RedisClient,
    services: Mapping[str, grpc.aio.Channel | None],
    consistency: ConsistencyCheck,
    gateway_address: str | None = None,
) -> PipelineHealthReport:
    """Runs every probe concurrently. `services` maps a name to its channel (None = this process)."""
    names = list(services)
    gateway = asyncio.create_task(check_gateway(gateway_address)) if gateway_address else None
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
    if gateway is not None:
        components["gateway"] = await gateway
    pending = dead = 0
    rollup_status, rollup_detail = "unknown", ""
    if postgres.status == "up":
        try:
            pending, dead = await check_outbox(db)
            rollup_status, rollup_detail = await consistency.result()
        except Exception as exc:  # a failed check is reported, not raised
            rollup_detail = f"{type(exc).__name__}: {exc}"[:300]
    if any(components[name].status != "up" for name in CRITICAL):
        overall = "unhealthy"
    elif any(c.status != "up" for c in components.values()):
        overall = "degraded"
    else:
        overall = "healthy"
    if overall == "healthy" and (rollup_status == "inconsistent" or dead > 0):
        overall = "degraded"
    return PipelineHealthReport(overall, datetime.now(UTC), components, pending, dead, rollup_status, rollup_detail)


async def _self_status() -> ComponentStatus:
    return ComponentStatus("up", 0.0, detail="SERVING")
