"""The shared service runtime against real servers: health, reflection, auth over gRPC,
metrics, deadlines as statement timeouts, graceful shutdown, migrations."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from tally.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.devstack import Suite, free_port, wait_for_grpc_health
from tally.reporting.v1 import reporting_pb2, reporting_pb2_grpc
from tally.runtime import context
from tally.runtime.audit import AuditEntry, AuditWriter
from tally.runtime.config import ServiceName
from tally.runtime.db import Database
from tally.runtime.migrate import apply_migrations, discover
from tests.conftest import Stack

SERVICE_NAMES = {
    ServiceName.INGEST: "tally.ingest.v1.IngestService",
    ServiceName.ANALYTICS: "tally.analytics.v1.AnalyticsService",
    ServiceName.BUDGET: "tally.budget.v1.BudgetService",
    ServiceName.REPORTING: "tally.reporting.v1.ReportingService",
}


@pytest.mark.parametrize("service", list(ServiceName))
def test_health_serving_and_reflection(stack: Stack, service: ServiceName) -> None:
    with stack.channel(service) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAMES[service]):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        )
    listed = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE_NAMES[service], "grpc.health.v1.Health"} <= listed


def test_grpc_auth(stack: Stack) -> None:
    with stack.channel(ServiceName.ANALYTICS) as channel:
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        request = analytics_pb2.GetPipelineHealthRequest()
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetPipelineHealth(request, timeout=5)
        with pytest.raises(grpc.RpcError) as wrong:
            stub.GetPipelineHealth(request, timeout=5, metadata=[("authorization", "Bearer nope")])
        reply = stub.GetPipelineHealth(request, timeout=10, metadata=stack.auth())
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reply.success
    assert reply.data.status == "healthy"


def test_rich_error_details_over_grpc(stack: Stack) -> None:
    with stack.channel(ServiceName.BUDGET) as channel:
        stub = budget_pb2_grpc.BudgetServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpdateVirtualKey(
                budget_pb2.UpdateVirtualKeyRequest(key_id="x", key_name=""), timeout=5, metadata=stack.auth()
            )
    status = rpc_status.from_call(caught.value)
    assert status is not None
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in status.details)
    assert [v.field for v in bad_request.field_violations] == ["keyId"]


def test_audit_log_over_grpc(stack: Stack) -> None:
    """The audit log (issue 7; UNIMPLEMENTED before it) answers over gRPC with the master key."""
    with stack.channel(ServiceName.REPORTING) as channel:
        stub = reporting_pb2_grpc.ReportingServiceStub(channel)
        reply = stub.ListAuditLog(reporting_pb2.ListAuditLogRequest(page_size=1), timeout=5, metadata=stack.auth())
    assert reply.success


def test_metrics_endpoint_counts_calls_by_method_and_code(stack: Stack) -> None:
    with stack.channel(ServiceName.BUDGET) as channel:
        stub = budget_pb2_grpc.BudgetServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.GetVirtualKey(
                budget_pb2.GetVirtualKeyRequest(key_id=str(uuid.uuid4())), timeout=5, metadata=stack.auth()
            )
    port = stack.env["BUDGET_METRICS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert (
        'grpc_server_handled_total{grpc_code="NOT_FOUND",grpc_method="GetVirtualKey",'
        'grpc_service="tally.budget.v1.BudgetService"}'
    ) in text
    assert 'grpc_server_handling_seconds_bucket{grpc_method="GetVirtualKey"' in text


async def test_deadline_becomes_statement_timeout(stack: Stack) -> None:
    db = Database(stack.settings(), min_size=1, max_size=2)
    await db.open()
    try:
        token = context.deadline.set(time.monotonic() + 0.3)
        try:
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                async with db.transaction() as conn:
                    await conn.execute("SELECT pg_sleep(5)")
            assert time.monotonic() - started < 2
        finally:
            context.deadline.reset(token)
        async with db.transaction() as conn:  # no deadline: the default timeout applies
            cur = await conn.execute("SHOW statement_timeout")
            row = await cur.fetchone()
            assert row is not None
            assert row[0] == "30s"
    finally:
        await db.close()


async def test_migrations_are_idempotent(stack: Stack) -> None:
    settings = stack.settings()
    assert await apply_migrations(settings) == []
    assert await apply_migrations(settings) == []
    async with await psycopg.AsyncConnection.connect(settings.database_url, password=stack.postgres.password) as conn:
        cur = await conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        versions = [row[0] for row in await cur.fetchall()]
        cur = await conn.execute(
            "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'usage_events'"
        )
        hypertables = await cur.fetchone()
    assert versions == [m.version for m in discover()]
    assert hypertables == (1,)


async def test_concurrent_migrations_apply_once(stack: Stack) -> None:
    """Several services starting at once: the advisory lock makes them apply each file once."""
    settings = stack.settings()
    results = await asyncio.gather(*(apply_migrations(settings) for _ in range(4)))
    assert all(r == [] for r in results)


def test_graceful_shutdown_finishes_in_flight_calls(stack: Stack) -> None:
    """SIGTERM: health turns NOT_SERVING, new calls are refused, the in-flight call completes."""
    env = dict(stack.env)
    address = f"127.0.0.1:{free_port()}"
    env.update({"ANALYTICS_ADDRESS": address, "ANALYTICS_METRICS_PORT": str(free_port())})
    suite = Suite(env, log_dir=stack.root / "logs-shutdown")
    process = suite._spawn("analytics", "services.analytics")
    wait_for_grpc_health(address, 60, process)
    locker = psycopg.connect(stack.postgres.url, password=stack.postgres.password, autocommit=False)
    try:
        # Hold a lock that the pipeline-health query needs, so the call stays in flight.
        locker.execute("LOCK TABLE pg_extension IN ACCESS EXCLUSIVE MODE")
        result: dict[str, object] = {}
        channel = grpc.insecure_channel(address)
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)

        def call() -> None:
            try:
                result["reply"] = stub.GetPipelineHealth(
                    analytics_pb2.GetPipelineHealthRequest(), timeout=20, metadata=stack.auth()
                )
            except grpc.RpcError as exc:
                result["error"] = exc

        worker = threading.Thread(target=call)
        worker.start()
        time.sleep(0.5)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=20)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(0.3)
        assert worker.is_alive(), "the in-flight call must still be running"
        locker.rollback()  # release the lock: the in-flight call can finish
        worker.join(15)
        reply = result.get("reply")
        assert isinstance(reply, analytics_pb2.GetPipelineHealthResponse), result
        assert reply.success
        assert process.wait(15) == 0
        channel.close()
    finally:
        locker.close()
        if process.poll() is None:
            process.kill()
        subprocess.run(["true"], check=True)


def test_free_port_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Components pick ports before binding them, so the kernel may offer a picked port again:
    free_port() skips the ports it handed out before."""
    import tally.devstack as devstack

    offered = iter([47_001, 47_001, 47_001, 47_002])

    class Offering:
        def __enter__(self) -> Offering:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, address: tuple[str, int]) -> None:
            assert address == ("127.0.0.1", 0)

        def getsockname(self) -> tuple[str, int]:
            return "127.0.0.1", next(offered)

    monkeypatch.setattr(devstack, "_handed_out", set())
    monkeypatch.setattr("tally.devstack.socket.socket", Offering)
    assert (devstack.free_port(), devstack.free_port()) == (47_001, 47_002)


async def test_audit_entries_wait_out_a_database_outage_and_are_stored_once(database: Database) -> None:
    """A batch the database refuses is tried again until it takes it (nothing dropped while the
    writer runs), and writing the same batch twice (a retry after a lost commit) stores it once."""

    class DownThenUp:
        """The database's pool, refusing its first `failures` connections."""

        def __init__(self, failures: int) -> None:
            self.failures = failures
            self.pool = self
            self.up = asyncio.Event()

        def connection(self) -> Any:
            if self.failures:
                self.failures -= 1
                raise psycopg.OperationalError("connection refused")
            self.up.set()
            return database.pool.connection()

    flaky = DownThenUp(failures=3)
    writer = AuditWriter(flaky, flush_seconds=0.05)  # type: ignore[arg-type]
    entry = AuditEntry(datetime.now(UTC), "tally.x.v1.X/Y", "master", "admin", None, "127.0.0.1", "c-1", "OK", 1.0)
    dropped = REGISTRY.get_sample_value("tally_audit_dropped_total", {"reason": "database"}) or 0.0
    writer.start()
    writer.record(entry)
    await asyncio.wait_for(flaky.up.wait(), 30)
    await writer.close()
    await writer._write([entry])  # the same entry again
    rows = await database.fetch_all("SELECT entry_id FROM audit_log WHERE correlation_id = 'c-1'")
    assert [r["entry_id"] for r in rows] == [entry.entry_id]
    assert (REGISTRY.get_sample_value("tally_audit_dropped_total", {"reason": "database"}) or 0.0) == dropped
