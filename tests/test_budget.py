"""Budget enforcement against real servers: a budget service (and replicas) over its own
TimescaleDB database and Redis, a 3-master Redis Cluster, Envoy, an SMTP server and an HTTP
receiver, all on loopback ports."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import httpx
import psycopg
import pytest
import redis as redis_py
import redis.asyncio as redis_asyncio
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from services.budget.alerts import AlertConfig
from services.budget.app import _utc
from services.budget.evaluator import Evaluator, ScopeSpend
from services.budget.events import BudgetEvent, EventStream, record
from services.budget.periods import PeriodKind, period_at
from services.budget.repository import BudgetRepository
from services.budget.store import DISABLED_KEY, EVENTS_KEY, config_key, key_scope
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.clients.request_path import RequestPathClient, RequestPathError, RequestPathUnavailable
from tally.devstack import (
    ROOT,
    Postgres,
    Redis,
    RedisClusterNodes,
    Suite,
    free_cluster_port,
    free_port,
)
from tally.notify import sign_webhook
from tally.runtime.config import ServiceName, Settings
from tally.runtime.db import Database
from tally.usage.schema import HOURLY
from tests.conftest import stack_env
from tests.test_notify import HttpReceiver, SmtpServer, fresh_database, wait_until

USD = 1_000_000
SECRET = "whsec_" + base64.b64encode(b"budget-test-webhook-secret-000000").decode()
ALERTS = {
    "globalBudgetAlerts": {
        "enabled": True,
        "thresholds": [
            {
                "percentage": 0.7,
                "actions": ["webhook", "email"],
                "recipients": ["admin@company.com"],
                "message": "Global budget 70% utilized",
            },
            {
                "percentage": 0.9,
                "actions": ["webhook", "email", "slack", "pagerduty"],
                "recipients": ["admin@company.com"],
                "channels": ["#alerts"],
                "urgency": "high",
                "message": "Global budget 90% utilized - immediate attention required",
            },
        ],
    },
    "virtualKeyBudgetAlerts": {
        "enabled": True,
        "defaultThresholds": [0.5, 0.8, 0.95],
        "actions": {"0.5": ["webhook"], "0.8": ["webhook", "email"], "0.95": ["webhook", "email", "disable_key"]},
    },
    "costSpikesDetection": {"enabled": True, "thresholdMultiplier": 3.0, "timeWindow": 3600, "actions": ["webhook"]},
}


# ---------------------------------------------------------------------------------------------- periods (unit)
def test_periods_align_to_the_timezone() -> None:
    zone = ZoneInfo("America/New_York")
    at = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)  # the day DST starts in New York
    daily = period_at(PeriodKind.DAILY, zone, at)
    assert daily.start == datetime(2024, 3, 10, 5, 0, tzinfo=UTC)
    assert daily.end == datetime(2024, 3, 11, 4, 0, tzinfo=UTC)  # a 23-hour day
    weekly = period_at(PeriodKind.WEEKLY, zone, at)
    assert weekly.start == datetime(2024, 3, 4, 5, 0, tzinfo=UTC)  # Monday, local midnight
    monthly = period_at(PeriodKind.MONTHLY, zone, datetime(2024, 3, 1, 3, 0, tzinfo=UTC))
    assert monthly.start == datetime(2024, 2, 1, 5, 0, tzinfo=UTC)  # still February in New York
    assert monthly.end == datetime(2024, 3, 1, 5, 0, tzinfo=UTC)
    total = period_at(PeriodKind.TOTAL, zone, at)
    assert total.end is None
    december = period_at(PeriodKind.MONTHLY, ZoneInfo("UTC"), datetime(2024, 12, 31, 23, 59, tzinfo=UTC))
    assert december.end == datetime(2025, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------- fixtures
@dataclass
class BudgetStack:
    env: dict[str, str]
    suite: Suite
    redis: Redis
    webhook: HttpReceiver
    smtp: SmtpServer
    root: Path
    replicas: list[tuple[Suite, str]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.env["BUDGET_ADDRESS"]

    def auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.env['ADMIN_MASTER_KEY']}")]

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.env['GATEWAY_PORT']}",
            headers={"Authorization": f"Bearer {self.env['ADMIN_MASTER_KEY']}"},
            timeout=30,
        )

    def stub(self, address: str | None = None) -> budget_pb2_grpc.BudgetServiceStub:
        return budget_pb2_grpc.BudgetServiceStub(grpc.insecure_channel(address or self.address))

    def db(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.env["DATABASE_URL"], password=self.env["DATABASE_PASSWORD"], autocommit=True)

    def redis_client(self) -> redis_py.Redis:
        return redis_py.Redis.from_url(self.redis.url)

    def start_replica(self, name: str, **overrides: str) -> tuple[Suite, str]:
        """Another budget process on its own ports (same database and Redis unless overridden)."""
        env = dict(self.env)
        address = f"127.0.0.1:{free_port()}"
        env.update({"BUDGET_ADDRESS": address, "BUDGET_METRICS_PORT": str(free_port()), **overrides})
        suite = Suite(env, log_dir=self.root / "logs" / name)
        suite.start_service(ServiceName.BUDGET)
        self.replicas.append((suite, address))
        return suite, address


@pytest.fixture(scope="module")
def budget_stack(infra: tuple[Postgres, Redis, Path]) -> Iterator[BudgetStack]:
    postgres, _shared_redis, shared_root = infra
    root = shared_root / f"budget-{secrets.token_hex(3)}"
    redis_server = Redis(root / "redis", free_port())
    webhook = HttpReceiver()
    smtp = SmtpServer()
    env = stack_env(secrets.token_urlsafe(24))
    env.update(
        {
            "DATABASE_URL": fresh_database(postgres, "budget"),
            "DATABASE_PASSWORD": postgres.password,
            "REDIS_URL": redis_server.url,
            "MIGRATE_ON_START": "true",
            "NOTIFY_WEBHOOK_URL": webhook.url + "/webhook",
            "NOTIFY_WEBHOOK_SECRET": SECRET,
            "NOTIFY_SLACK_WEBHOOK_URL": webhook.url + "/slack",
            "NOTIFY_PAGERDUTY_EVENTS_URL": webhook.url + "/pagerduty",
            "NOTIFY_PAGERDUTY_ROUTING_KEY": "pd-routing-key",
            "NOTIFY_EMAIL_RECIPIENTS": "budget-owner@example.com",
            "NOTIFY_POLL_SECONDS": "0.1",
            "NOTIFY_BACKOFF_BASE_SECONDS": "0.1",
            "NOTIFY_BACKOFF_MAX_SECONDS": "0.5",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp.port),
            "BUDGET_SPIKE_CHECK_SECONDS": "0.3",
            "BUDGET_DRIFT_CHECK_SECONDS": "0.5",
            "BUDGET_MAINTENANCE_SECONDS": "0.5",
        }
    )
    suite = Suite(env, log_dir=root / "logs")
    stack = BudgetStack(env, suite, redis_server, webhook, smtp, root)
    try:
        redis_server.start()
        webhook.start()
        smtp.start()
        subprocess.run([sys.executable, "-m", "tally.runtime.migrate"], env=env, cwd=ROOT, check=True)
        suite.start_service(ServiceName.BUDGET)
        suite.start_gateway()
        with stack.http() as client:
            assert client.put("/api/admin/budgets/alerts", json=ALERTS).status_code == 200
        yield stack
    finally:
        for replica, _address in stack.replicas:
            replica.stop_all()
        suite.stop_all()
        smtp.stop()
        webhook.stop()
        redis_server.stop()


# ---------------------------------------------------------------------------------------------- helpers
def new_key(stack: BudgetStack, limit_usd: float | None = None, period: str = "monthly", name: str = "") -> str:
    key_id = str(uuid.uuid4())
    with stack.http() as client:
        assert (
            client.put(f"/api/admin/virtual-keys/{key_id}", json={"keyName": name or f"key {key_id[:8]}"}).status_code
            == 200
        )
        if limit_usd is not None:
            reply = client.put(
                f"/api/admin/virtual-keys/{key_id}/budget", json={"maxBudget": limit_usd, "period": period}
            )
            assert reply.status_code == 200, reply.text
    return key_id


def status_of(error: grpc.RpcError) -> tuple[error_details_pb2.QuotaFailure | None, dict[str, str]]:
    status = rpc_status.from_call(error)
    assert status is not None
    failure: error_details_pb2.QuotaFailure | None = None
    metadata: dict[str, str] = {}
    for detail in status.details:
        quota = error_details_pb2.QuotaFailure()
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(quota):
            failure = quota
        elif detail.Unpack(info):
            metadata = dict(info.metadata)
    return failure, metadata


def authorize(
    stub: budget_pb2_grpc.BudgetServiceStub, stack: BudgetStack, key_id: str, micros: int, request_id: str | None = None
) -> budget_pb2.AuthorizeResponse:
    return stub.Authorize(  # type: ignore[no-any-return]
        budget_pb2.AuthorizeRequest(
            key_id=key_id, request_id=request_id or uuid.uuid4().hex, estimated_cost_micros=micros
        ),
        timeout=10,
        metadata=stack.auth(),
    )


def settle_request(
    key_id: str, micros: int, request_id: str | None = None, provider: str = "openai", at: datetime | None = None
) -> budget_pb2.SettleRequest:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at or datetime.now(UTC))
    return budget_pb2.SettleRequest(
        request_id=request_id or uuid.uuid4().hex,
        key_id=key_id,
        actual_cost_micros=micros,
        event_time=stamp,
        provider=provider,
    )


def record_usage(
    conn: psycopg.Connection[Any], key_id: str, micros: int, *, provider: str = "openai", at: datetime | None = None
) -> str:
    """What ingest commits for one request: the raw event and its hourly rollup row."""
    at = at or datetime.now(UTC)
    request_id = uuid.uuid4().hex
    with conn.transaction():
        conn.execute(
            """INSERT INTO usage_events (event_time, request_id, key_id, provider, model, operation, cost_micros,
                   cost_source) VALUES (%s, %s, %s, %s, 'gpt-4', 'chat.completions', %s, 'provider')""",
            (at, request_id, key_id, provider, micros),
        )
        add_rollup(conn, key_id, micros, provider=provider, bucket=at.replace(minute=0, second=0, microsecond=0))
    return request_id


def add_rollup(conn: psycopg.Connection[Any], key_id: str, micros: int, *, provider: str, bucket: datetime) -> None:
    conn.execute(
        """INSERT INTO usage_rollup_hourly_delta (bucket, key_id, provider, model, operation, status_class, error_type,
               requests, successes, failures, input_tokens, output_tokens, cached_read_tokens, cache_write_tokens,
               reasoning_tokens, images, audio_seconds, cost_micros, provider_cost_requests, unpriced_requests,
               late_requests, streaming_requests, tool_requests, small_input_requests, small_input_input_tokens,
               small_input_output_tokens, small_input_cost_micros, latency_ms_sum, ttft_ms_sum, ttft_count)
           VALUES (%s, %s, %s, 'gpt-4', 'chat.completions', '2xx', '', 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, %s, 1, 0, 0,
                   0, 0, 0, 0, 0, 0, 0, 0, 0)""",
        (bucket, key_id, provider, micros),
    )


def ingest(stack: BudgetStack, stub: budget_pb2_grpc.BudgetServiceStub, key_id: str, micros: int, **kw: Any) -> None:
    """Commit usage to the database, then settle it (as the ingest service does)."""
    with stack.db() as conn:
        request_id = record_usage(conn, key_id, micros, **kw)
    stub.Settle(settle_request(key_id, micros, request_id, **kw), timeout=10, metadata=stack.auth())


class StreamReader:
    """A WatchBudgetEvents subscriber in a thread, collecting events until cancelled."""

    def __init__(self, stack: BudgetStack, after_id: str, address: str | None = None) -> None:
        self._channel = grpc.insecure_channel(address or stack.address)
        stub = budget_pb2_grpc.BudgetServiceStub(self._channel)
        self._call = stub.WatchBudgetEvents(
            budget_pb2.WatchBudgetEventsRequest(after_id=after_id), metadata=stack.auth(), timeout=120
        )
        self.events: list[budget_pb2.WatchBudgetEventsResponse] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._call:
                self.events.append(event)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(10)
        self._channel.close()

    def of(self, key_id: str) -> list[budget_pb2.WatchBudgetEventsResponse]:
        return [e for e in self.events if e.key_id == key_id]


def last_event_id(stack: BudgetStack) -> str:
    with stack.redis_client() as client:
        last = client.xrevrange("{tally:budget}:events", count=1)
    return last[0][0].decode() if last else "0"


# ---------------------------------------------------------------------------------------------- request path
async def _concurrent_authorizations(
    address: str, stack: BudgetStack, key_id: str, count: int, micros: int
) -> list[Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = budget_pb2_grpc.BudgetServiceStub(channel)

        async def one() -> Any:
            try:
                return await stub.Authorize(
                    budget_pb2.AuthorizeRequest(
                        key_id=key_id, request_id=uuid.uuid4().hex, estimated_cost_micros=micros
                    ),
                    timeout=60,
                    metadata=stack.auth(),
                )
            except grpc.aio.AioRpcError as exc:
                return exc

        return list(await asyncio.gather(*(one() for _ in range(count))))


def _check_exactly_200(results: list[Any], subject: str) -> None:
    allowed = [r for r in results if isinstance(r, budget_pb2.AuthorizeResponse)]
    denied = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(allowed) == 200
    assert len(denied) == 300
    assert all(r.allowed for r in allowed)
    assert {d.code() for d in denied} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    failure, metadata = status_of(denied[0])
    assert failure is not None
    assert [v.subject for v in failure.violations] == [subject]
    reason = "DENIAL_REASON_GLOBAL_BUDGET_EXHAUSTED" if subject == "global" else "DENIAL_REASON_KEY_BUDGET_EXHAUSTED"
    assert metadata["denialReason"] == reason


async def test_500_concurrent_authorizations_of_5_cents_on_10_dollars_admit_exactly_200(
    budget_stack: BudgetStack,
) -> None:
    key_id = new_key(budget_stack, 10.00)
    results = await _concurrent_authorizations(budget_stack.address, budget_stack, key_id, 500, 50_000)
    _check_exactly_200(results, f"key:{key_id}")
    with budget_stack.http() as client:
        budget = client.get(f"/api/admin/virtual-keys/{key_id}/budget").json()["data"]
    assert budget["reserved"] == 10.0
    assert budget["currentSpend"] == 0
    assert budget["remainingBudget"] == 0


async def test_global_budget_admits_exactly_200(budget_stack: BudgetStack) -> None:
    """The global scope is shared: its limit is set to what is committed now plus $10."""
    key_id = new_key(budget_stack)
    stub = budget_stack.stub()
    with budget_stack.http() as client:
        assert client.put("/api/admin/budgets/global", json={"maxBudget": 1e6, "period": "monthly"}).status_code == 200
        committed = next(
            s for s in authorize(stub, budget_stack, key_id, 0).remaining if s.scope == "global"
        ).committed_micros
        limit = (committed + 10 * USD) / USD
        assert (
            client.put("/api/admin/budgets/global", json={"maxBudget": limit, "period": "monthly"}).status_code == 200
        )
    try:
        results = await _concurrent_authorizations(budget_stack.address, budget_stack, key_id, 500, 50_000)
        _check_exactly_200(results, "global")
    finally:
        with budget_stack.http() as client:
            client.put("/api/admin/budgets/global", json={"maxBudget": 1e6, "period": "monthly"})


async def _stream_calls(
    stack: BudgetStack, stub: budget_pb2_grpc.BudgetServiceStub, messages: list[list[budget_pb2.RequestPathCall]]
) -> dict[int, budget_pb2.RequestPathAnswer]:
    """Sends every message, then reads every answer (by call id) until the server ends the stream."""
    call = stub.StreamRequestPath(metadata=stack.auth(), timeout=60)
    for calls in messages:
        await call.write(budget_pb2.StreamRequestPathRequest(calls=calls))
    await call.done_writing()
    answers: dict[int, budget_pb2.RequestPathAnswer] = {}
    async for reply in call:
        for answer in reply.answers:
            assert answer.call_id not in answers
            answers[answer.call_id] = answer
    return answers


async def test_request_path_stream_answers_every_call_by_id_with_the_unary_semantics(
    budget_stack: BudgetStack,
) -> None:
    """500 authorizations of 5 cents on $10 over 4 streams, 25 calls per message (all in flight
    at once), admit exactly 200; denials and invalid calls are answered with their call's error,
    the unary RPC's status and details, and the stream goes on; settle and release work too."""
    key_id = new_key(budget_stack, 10.00)
    request_ids = [uuid.uuid4().hex for _ in range(500)]

    def authorize_call(n: int, request_id: str) -> budget_pb2.RequestPathCall:
        return budget_pb2.RequestPathCall(
            call_id=n,
            authorize=budget_pb2.AuthorizeRequest(key_id=key_id, request_id=request_id, estimated_cost_micros=50_000),
        )

    async with grpc.aio.insecure_channel(budget_stack.address) as channel:
        stub = budget_pb2_grpc.BudgetServiceStub(channel)
        streams = [[authorize_call(n, request_ids[n]) for n in range(s, 500, 4)] for s in range(4)]
        messages = [[calls[i : i + 25] for i in range(0, len(calls), 25)] for calls in streams]
        parts = await asyncio.gather(*(_stream_calls(budget_stack, stub, m) for m in messages))
        answers = {k: v for part in parts for k, v in part.items()}
        assert sorted(answers) == list(range(500))
        allowed = [n for n, a in answers.items() if a.WhichOneof("result") == "authorize"]
        denied = [n for n, a in answers.items() if a.WhichOneof("result") == "error"]
        assert (len(allowed), len(denied)) == (200, 300)
        error = answers[denied[0]].error
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        quota = error_details_pb2.QuotaFailure()
        assert any(detail.Unpack(quota) for detail in error.details)
        assert [v.subject for v in quota.violations] == [f"key:{key_id}"]

        first, second = request_ids[allowed[0]], request_ids[allowed[1]]
        follow_up = await _stream_calls(
            budget_stack,
            stub,
            [
                [
                    budget_pb2.RequestPathCall(call_id=1, settle=settle_request(key_id, 80_000, first)),
                    budget_pb2.RequestPathCall(call_id=2, release=budget_pb2.ReleaseRequest(request_id=second)),
                    budget_pb2.RequestPathCall(call_id=3),
                ],
                [
                    budget_pb2.RequestPathCall(
                        call_id=4, authorize=budget_pb2.AuthorizeRequest(key_id=key_id, estimated_cost_micros=1)
                    ),
                    authorize_call(5, request_ids[allowed[2]]),  # a retry: replayed, not reserved again
                ],
            ],
        )
    assert follow_up[1].settle.overspend_micros == 30_000
    # calls on one stream run concurrently: the release may be counted before or after the settle
    assert follow_up[1].settle.remaining[0].committed_micros in (200 * 50_000 + 30_000, 199 * 50_000 + 30_000)
    assert follow_up[2].release.released
    for n, field_name in ((3, "call"), (4, "requestId")):
        assert follow_up[n].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        bad = error_details_pb2.BadRequest()
        assert any(detail.Unpack(bad) for detail in follow_up[n].error.details)
        assert [v.field for v in bad.field_violations] == [field_name]
    assert follow_up[5].authorize.replayed
    with budget_stack.http() as client:
        budget = client.get(f"/api/admin/virtual-keys/{key_id}/budget").json()["data"]
    assert budget["currentSpend"] == 0.08
    assert budget["reserved"] == 9.9  # 198 reservations of 5 cents

    async with grpc.aio.insecure_channel(budget_stack.address) as channel:
        call = budget_pb2_grpc.BudgetServiceStub(channel).StreamRequestPath(timeout=10)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_request_path_stream_answers_more_calls_than_its_in_flight_window(budget_stack: BudgetStack) -> None:
    """3,000 calls on one stream, one per message (the server reads at most 1,024 calls ahead of
    its answers), written and read at the same time: every call answered once."""
    key_id = new_key(budget_stack, 1000.00)
    async with grpc.aio.insecure_channel(budget_stack.address) as channel:
        call = budget_pb2_grpc.BudgetServiceStub(channel).StreamRequestPath(metadata=budget_stack.auth(), timeout=120)

        async def write() -> None:
            for n in range(3000):
                authorize = budget_pb2.AuthorizeRequest(
                    key_id=key_id, request_id=f"window-{key_id}-{n}", estimated_cost_micros=1_000
                )
                one = budget_pb2.RequestPathCall(call_id=n, authorize=authorize)
                await call.write(budget_pb2.StreamRequestPathRequest(calls=[one]))
            await call.done_writing()

        writer = asyncio.create_task(write())
        answered = [a.call_id async for reply in call for a in reply.answers if a.authorize.allowed]
        await writer
    assert sorted(answered) == list(range(3000))


async def test_request_path_client_multiplexes_concurrent_callers_on_one_stream(budget_stack: BudgetStack) -> None:
    """The gateway client: 500 concurrent authorizations of 5 cents on $10 on one stream admit
    exactly 200, denials raise with the unary RPC's status; settle and release; a refused stream
    fails its calls as unavailable, and the client backs off before opening another."""
    key_id = new_key(budget_stack, 10.00)
    async with grpc.aio.insecure_channel(budget_stack.address) as channel:
        client = RequestPathClient(channel, metadata=budget_stack.auth())

        async def one(n: int) -> budget_pb2.AuthorizeResponse | RequestPathError:
            try:
                return await client.authorize(key_id, f"client-{key_id}-{n}", 50_000)
            except RequestPathError as exc:
                return exc

        results = await asyncio.gather(*(one(n) for n in range(500)))
        allowed = [n for n, r in enumerate(results) if isinstance(r, budget_pb2.AuthorizeResponse)]
        denied = [r for r in results if isinstance(r, RequestPathError)]
        assert (len(allowed), len(denied)) == (200, 300)
        assert {d.code for d in denied} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        failure = denied[0].quota_failure()
        assert failure is not None and [v.subject for v in failure.violations] == [f"key:{key_id}"]
        assert denied[0].metadata()["denialReason"] == "DENIAL_REASON_KEY_BUDGET_EXHAUSTED"
        settled = await client.settle(settle_request(key_id, 20_000, f"client-{key_id}-{allowed[0]}"))
        assert settled.remaining[0].committed_micros == 200 * 50_000 - 30_000
        assert (await client.release(f"client-{key_id}-{allowed[1]}")).released
        await client.close()

        # A refused stream fails its calls; for a back-off (50 ms after a first failure) calls fail
        # at once without opening another stream; then the next call tries a new one.
        refused = RequestPathClient(channel, metadata=[("authorization", "Bearer wrong")])
        with pytest.raises(RequestPathUnavailable, match="UNAUTHENTICATED"):
            await refused.authorize(key_id, uuid.uuid4().hex, 1)
        with pytest.raises(RequestPathUnavailable, match="next attempt"):
            await refused.authorize(key_id, uuid.uuid4().hex, 1)
        assert refused.streams_opened == 1
        await asyncio.sleep(0.2)
        with pytest.raises(RequestPathUnavailable, match="UNAUTHENTICATED"):
            await refused.authorize(key_id, uuid.uuid4().hex, 1)
        assert refused.streams_opened == 2
    with budget_stack.http() as http:
        budget = http.get(f"/api/admin/virtual-keys/{key_id}/budget").json()["data"]
    assert (budget["currentSpend"], budget["reserved"]) == (0.02, 9.9)


def test_settle_below_and_above_the_estimate(budget_stack: BudgetStack) -> None:
    key_id = new_key(budget_stack, 10.00)
    stub = budget_stack.stub()
    below = authorize(stub, budget_stack, key_id, 1 * USD, "below-" + key_id)
    assert below.allowed and not below.replayed
    key_remaining = below.remaining[0]
    assert (key_remaining.scope, key_remaining.limit_micros, key_remaining.committed_micros) == (
        f"key:{key_id}",
        10 * USD,
        1 * USD,
    )
    settled = stub.Settle(settle_request(key_id, 600_000, "below-" + key_id), timeout=10, metadata=budget_stack.auth())
    assert not settled.already_settled
    assert settled.overspend_micros == 0
    assert settled.remaining[0].committed_micros == 600_000

    authorize(stub, budget_stack, key_id, 1 * USD, "above-" + key_id)
    above = stub.Settle(settle_request(key_id, 1_500_000, "above-" + key_id), timeout=10, metadata=budget_stack.auth())
    assert above.overspend_micros == 500_000
    assert above.remaining[0].committed_micros == 2_100_000
    again = stub.Settle(settle_request(key_id, 1_500_000, "above-" + key_id), timeout=10, metadata=budget_stack.auth())
    assert again.already_settled
    assert again.remaining[0].committed_micros == 2_100_000

    # No reservation: the spend is simply recorded.
    bare = stub.Settle(settle_request(key_id, 400_000), timeout=10, metadata=budget_stack.auth())
    assert bare.remaining[0].committed_micros == 2_500_000
    batch = stub.SettleBatch(
        budget_pb2.SettleBatchRequest(
            items=[settle_request(key_id, 100_000, "b1-" + key_id), settle_request(key_id, 100_000, "b1-" + key_id)]
        ),
        timeout=10,
        metadata=budget_stack.auth(),
    )
    assert (batch.settled, batch.already_settled) == (1, 1)
    with budget_stack.http() as client:
        budget = client.get(f"/api/admin/virtual-keys/{key_id}/budget").json()["data"]
    assert budget["currentSpend"] == 2.6
    assert budget["reserved"] == 0
    assert budget["remainingBudget"] == 7.4


def test_large_settle_batch_takes_few_round_trips_and_keeps_every_semantic(budget_stack: BudgetStack) -> None:
    """811 items (several script chunks in one pipeline): reservations given back, overspend
    reported, key-less items resolved from their reservation, duplicates settled once, the period
    taken from the event time, and the threshold crossed by the batch fired once."""
    key_id = new_key(budget_stack, 100.00)
    stub = budget_stack.stub()
    reserved = [f"big-{key_id}-{n}" for n in range(100)]
    for request_id in reserved:
        assert authorize(stub, budget_stack, key_id, 200_000, request_id).allowed
    items = [settle_request(key_id, 100_000 if n < 50 else 300_000, rid) for n, rid in enumerate(reserved)]
    for item in items[:5]:
        item.key_id = ""  # the key comes from the reservation
    items += [settle_request(key_id, 50_000) for _ in range(700)]
    last_month = period_at(PeriodKind.MONTHLY, ZoneInfo("UTC"), datetime.now(UTC)).start - timedelta(days=3)
    items.append(settle_request(key_id, 5 * USD, at=last_month))
    items += [settle_request(key_id, 50_000, items[n].request_id) for n in range(0, 800, 80)]  # 10 repeats
    reader = StreamReader(budget_stack, last_event_id(budget_stack))
    with budget_stack.redis_client() as client:
        before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        batch = stub.SettleBatch(budget_pb2.SettleBatchRequest(items=items), timeout=30, metadata=budget_stack.auth())
        after = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    try:
        assert (batch.settled, batch.already_settled) == (801, 10)
        assert batch.overspend_micros == 50 * 100_000 + 700 * 50_000 + 5 * USD  # no reservation: all of it
        assert after - before <= 20  # a handful of chunked script runs, not one per item
        with budget_stack.http() as client:
            budget = client.get(f"/api/admin/virtual-keys/{key_id}/budget").json()["data"]
        assert budget["currentSpend"] == 55.0  # 5 + 15 + 35; last month's $5 is not in this period
        assert budget["reserved"] == 0
        wait_until(lambda: reader.of(key_id))
        time.sleep(0.5)
    finally:
        reader.close()
    crossed = [e for e in reader.of(key_id) if e.type == budget_pb2.BUDGET_EVENT_TYPE_THRESHOLD_CROSSED]
    assert [e.threshold for e in crossed] == [0.5]
    again = stub.SettleBatch(budget_pb2.SettleBatchRequest(items=items), timeout=30, metadata=budget_stack.auth())
    assert (again.settled, again.already_settled, again.overspend_micros) == (0, 811, 0)


def test_settle_batch_remembers_unauthorized_requests_briefly(budget_stack: BudgetStack) -> None:
    """Ingest's hand-off (SettleBatch) of usage the gateway never authorized is remembered only
    for BUDGET_HANDOFF_SETTLED_TTL_SECONDS (a record per event for days would fill Redis), still
    long enough for a retried direct Settle to be recognised; a settled reservation keeps the
    long BUDGET_SETTLED_TTL_SECONDS."""
    key_id = new_key(budget_stack, 100.00)
    stub = budget_stack.stub()
    reserved, bare = f"handoff-r-{key_id}", f"handoff-b-{key_id}"
    assert authorize(stub, budget_stack, key_id, 200_000, reserved).allowed
    batch = stub.SettleBatch(
        budget_pb2.SettleBatchRequest(
            items=[settle_request(key_id, 100_000, reserved), settle_request(key_id, 50_000, bare)]
        ),
        timeout=10,
        metadata=budget_stack.auth(),
    )
    assert (batch.settled, batch.already_settled) == (2, 0)
    with budget_stack.redis_client() as client:
        reserved_ttl = client.pttl(f"{{tally:budget}}:r:{reserved}")
        bare_ttl = client.pttl(f"{{tally:budget}}:r:{bare}")
    brief = Settings.model_fields["budget_handoff_settled_ttl_seconds"].default * 1000
    long = Settings.model_fields["budget_settled_ttl_seconds"].default * 1000
    assert brief - 60_000 < bare_ttl <= brief
    assert long - 60_000 < reserved_ttl <= long
    again = stub.Settle(settle_request(key_id, 50_000, bare), timeout=10, metadata=budget_stack.auth())
    assert again.already_settled
    assert again.remaining[0].committed_micros == 150_000


def _handoff(
    key_id: str, requests: list[tuple[str, int, int]], *, handoff_id: str = ""
) -> budget_pb2.SettleBatchRequest:
    """SettleBatch in ingest's compact form: (request id, cost, group) with two spend groups of
    the key (group 0 now from provider "openai"; group 1 last month from "anthropic")."""
    request = budget_pb2.SettleBatchRequest(handoff_id=handoff_id or uuid.uuid4().hex)
    now = datetime.now(UTC)
    for provider, at in (("openai", now), ("anthropic", now - timedelta(days=now.day + 3))):
        group = request.groups.add(key_id=key_id, provider=provider)
        group.event_time.FromDatetime(at)
    for request_id, cost, group_index in requests:
        request.request_ids.append(request_id)
        request.actual_cost_micros.append(cost)
        request.group_index.append(group_index)
    return request


def test_ingest_handoff_settles_each_request_once_and_leaves_no_record_for_unauthorized_ones(
    budget_stack: BudgetStack,
) -> None:
    """SettleBatch's compact form (ingest's hand-off): a reservation is settled (overspend
    reported), a request settled directly before is not counted again, spend lands in the
    period of its group's time, a retried hand-off changes nothing, and a request never
    authorized leaves no record of its own yet a later direct Settle of it is recognised."""
    key_id = new_key(budget_stack, 100.00)
    stub = budget_stack.stub()
    reserved, direct, bare, old = (f"{name}-{key_id}" for name in ("hr", "hd", "hb", "ho"))
    assert authorize(stub, budget_stack, key_id, 200_000, reserved).allowed
    stub.Settle(settle_request(key_id, 50_000, direct), timeout=10, metadata=budget_stack.auth())
    handoff = _handoff(key_id, [(reserved, 300_000, 0), (direct, 50_000, 0), (bare, 100_000, 0), (old, 20_000, 1)])
    batch = stub.SettleBatch(handoff, timeout=10, metadata=budget_stack.auth())
    assert (batch.settled, batch.already_settled) == (3, 1)
    assert batch.overspend_micros == 100_000 + 100_000 + 20_000  # above the reservation, and no reservation
    with budget_stack.http() as client:
        budget = client.get(f"/api/admin/virtual-keys/{key_id}/budget").json()["data"]
    assert budget["currentSpend"] == 0.45  # 0.05 direct + 0.30 + 0.10; last month's 0.02 is not in this period
    assert budget["reserved"] == 0

    again = stub.SettleBatch(handoff, timeout=10, metadata=budget_stack.auth())
    assert (again.settled, again.already_settled, again.overspend_micros) == (0, 4, 0)
    with budget_stack.redis_client() as client:
        assert client.exists(f"{{tally:budget}}:r:{bare}") == 0
        assert client.hget(f"{{tally:budget}}:r:{reserved}", "st") == b"s"
    late = stub.Settle(settle_request(key_id, 100_000, bare), timeout=10, metadata=budget_stack.auth())
    assert late.already_settled
    assert late.remaining[0].committed_micros == 450_000
    items = stub.SettleBatch(
        budget_pb2.SettleBatchRequest(items=[settle_request(key_id, 100_000, bare)]),
        timeout=10,
        metadata=budget_stack.auth(),
    )
    assert (items.settled, items.already_settled) == (0, 1)


def test_ingest_handoff_keeps_the_records_it_settles_only_briefly(budget_stack: BudgetStack) -> None:
    """A direct Settle's record waits BUDGET_SETTLED_TTL_SECONDS (days) for ingest's hand-off of
    the request; once the hand-off has settled a request, or found it settled, its record is kept
    only BUDGET_HANDOFF_SETTLED_TTL_SECONDS (never lengthened), still long enough for a late
    direct Settle to be recognised. A reservation's record outlives its lapse by as long."""
    key_id = new_key(budget_stack, 100.00)
    stub = budget_stack.stub()
    reserved, direct, short, lapsing = (f"{name}-{key_id}" for name in ("kr", "kd", "ks", "kl"))
    for request_id in (reserved, direct, short, lapsing):
        assert authorize(stub, budget_stack, key_id, 200_000, request_id).allowed
    for request_id in (direct, short):
        stub.Settle(settle_request(key_id, 100_000, request_id), timeout=10, metadata=budget_stack.auth())
    brief = Settings.model_fields["budget_handoff_settled_ttl_seconds"].default * 1000
    long = Settings.model_fields["budget_settled_ttl_seconds"].default * 1000
    reservation = int(Settings.model_fields["budget_reservation_ttl_seconds"].default * 1000)
    record = "{{tally:budget}}:r:{}".format
    with budget_stack.redis_client() as client:
        assert long - 60_000 < client.pttl(record(direct)) <= long
        assert reservation + brief - 60_000 < client.pttl(record(lapsing)) <= reservation + brief
        client.pexpire(record(short), 30_000)
    stub.Release(budget_pb2.ReleaseRequest(request_id=lapsing), timeout=10, metadata=budget_stack.auth())

    handoff = _handoff(key_id, [(reserved, 150_000, 0), (direct, 100_000, 0), (short, 100_000, 0)])
    batch = stub.SettleBatch(handoff, timeout=10, metadata=budget_stack.auth())
    assert (batch.settled, batch.already_settled) == (1, 2)
    with budget_stack.redis_client() as client:
        for request_id in (reserved, direct):
            assert client.hget(record(request_id), "st") == b"s"
            assert brief - 60_000 < client.pttl(record(request_id)) <= brief
        assert 0 < client.pttl(record(short)) <= 30_000
    for request_id in (reserved, direct):
        late = stub.Settle(settle_request(key_id, 100_000, request_id), timeout=10, metadata=budget_stack.auth())
        assert late.already_settled
        assert late.remaining[0].committed_micros == 350_000


def test_a_handoff_of_only_unauthorized_requests_settles_each_once(budget_stack: BudgetStack) -> None:
    """A hand-off chunk in which no request has a record (none was authorized or settled
    directly: the script then skips every per-request lookup) still settles each request,
    remembers each for a later direct Settle, and changes nothing when retried."""
    key_id = new_key(budget_stack, 100.00)
    stub = budget_stack.stub()
    first, second = (f"{name}-{key_id}" for name in ("ua", "ub"))
    handoff = _handoff(key_id, [(first, 70_000, 0), (second, 30_000, 0)])
    batch = stub.SettleBatch(handoff, timeout=10, metadata=budget_stack.auth())
    assert (batch.settled, batch.already_settled, batch.overspend_micros) == (2, 0, 100_000)
    again = stub.SettleBatch(handoff, timeout=10, metadata=budget_stack.auth())
    assert (again.settled, again.already_settled) == (0, 2)
    late = stub.Settle(settle_request(key_id, 30_000, second), timeout=10, metadata=budget_stack.auth())
    assert late.already_settled
    assert late.remaining[0].committed_micros == 100_000
    with budget_stack.redis_client() as client:
        assert client.exists(f"{{tally:budget}}:r:{first}", f"{{tally:budget}}:r:{second}") == 0


@pytest.mark.parametrize(
    ("change", "field_name"),
    [
        (lambda r: r.group_index.append(0), "groupIndex"),
        (lambda r: r.actual_cost_micros.__setitem__(0, -1), "actualCostMicros"),
        (lambda r: r.group_index.__setitem__(0, 2), "groupIndex"),
        (lambda r: r.request_ids.__setitem__(0, ""), "requestIds"),
        (lambda r: r.groups[0].__setattr__("key_id", "not-a-key"), "groups[0].keyId"),
        (lambda r: r.ClearField("handoff_id"), "handoffId"),
    ],
)
def test_invalid_handoff_is_refused_naming_the_field(budget_stack: BudgetStack, change: Any, field_name: str) -> None:
    key_id = new_key(budget_stack, 100.00)
    request = _handoff(key_id, [(f"bad-{uuid.uuid4().hex}", 1_000, 0)])
    change(request)
    with pytest.raises(grpc.RpcError) as caught:
        budget_stack.stub().SettleBatch(request, timeout=10, metadata=budget_stack.auth())
    status = rpc_status.from_call(caught.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    assert [v.field for v in bad.field_violations] == [field_name]
    with budget_stack.http() as client:
        assert client.get(f"/api/admin/virtual-keys/{key_id}/budget").json()["data"]["currentSpend"] == 0


def test_retried_authorize_reserves_once_and_release_gives_back(budget_stack: BudgetStack) -> None:
    key_id = new_key(budget_stack, 1.00)
    stub = budget_stack.stub()
    first = authorize(stub, budget_stack, key_id, 700_000, "retry-" + key_id)
    retried = authorize(stub, budget_stack, key_id, 700_000, "retry-" + key_id)
    assert first.allowed and retried.allowed
    assert (first.replayed, retried.replayed) == (False, True)
    assert retried.expires_at == first.expires_at
    assert retried.remaining[0].committed_micros == 700_000
    with pytest.raises(grpc.RpcError) as denied:
        authorize(stub, budget_stack, key_id, 400_000)
    assert denied.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    released = stub.Release(
        budget_pb2.ReleaseRequest(request_id="retry-" + key_id), timeout=10, metadata=budget_stack.auth()
    )
    assert released.released
    again = stub.Release(
        budget_pb2.ReleaseRequest(request_id="retry-" + key_id), timeout=10, metadata=budget_stack.auth()
    )
    assert not again.released
    assert authorize(stub, budget_stack, key_id, 400_000).remaining[0].committed_micros == 400_000


def test_expiry_releases_a_reservation(budget_stack: BudgetStack) -> None:
    """A replica with a short reservation TTL: its reservation lapses and the budget is free again."""
    _suite, address = budget_stack.start_replica("short-ttl", BUDGET_RESERVATION_TTL_SECONDS="0.5")
    key_id = new_key(budget_stack, 1.00)
    short = budget_stack.stub(address)
    assert authorize(short, budget_stack, key_id, 800_000).allowed
    main = budget_stack.stub()
    with pytest.raises(grpc.RpcError):
        authorize(main, budget_stack, key_id, 800_000)

    def admitted() -> bool:
        try:
            return authorize(main, budget_stack, key_id, 800_000).allowed
        except grpc.RpcError:
            return False

    wait_until(admitted, timeout=20, interval=0.2)


def test_invalid_request_path_arguments_are_400_naming_fields(budget_stack: BudgetStack) -> None:
    stub = budget_stack.stub()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Authorize(
            budget_pb2.AuthorizeRequest(key_id=str(uuid.uuid4()), request_id="", estimated_cost_micros=-1),
            timeout=10,
            metadata=budget_stack.auth(),
        )
    status = rpc_status.from_call(caught.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details)
    assert [v.field for v in bad.field_violations] == ["requestId", "estimatedCostMicros"]


# ---------------------------------------------------------------------------------------------- alerts
def _fired(stack: BudgetStack, scope: str) -> list[tuple[str, float]]:
    with stack.db() as conn:
        rows = conn.execute(
            "SELECT kind, threshold::float8 FROM budget_alerts_fired WHERE scope = %s ORDER BY threshold, kind",
            (scope,),
        ).fetchall()
    return [(kind, float(threshold)) for kind, threshold in rows]


def _webhooks_for(stack: BudgetStack, key_id: str) -> list[dict[str, Any]]:
    return [r.json() for r in stack.webhook.on_path("/webhook") if r.json()["data"].get("keyId") == key_id]


def test_thresholds_fire_once_each_with_two_replicas_and_not_again_after_a_restart(budget_stack: BudgetStack) -> None:
    replica_suite, replica_address = budget_stack.start_replica("replica-b")
    key_id = new_key(budget_stack, 10.00, name="Production API Key")
    stubs = [budget_stack.stub(), budget_stack.stub(replica_address)]
    reader = StreamReader(budget_stack, last_event_id(budget_stack))
    try:
        # 46 settles of $0.20 ($9.20 = 92%), alternating replicas, 8 at a time.
        def settle(n: int) -> None:
            ingest(budget_stack, stubs[n % 2], key_id, 200_000)

        threads = [threading.Thread(target=settle, args=(n,)) for n in range(46)]
        for start in range(0, len(threads), 8):
            for thread in threads[start : start + 8]:
                thread.start()
            for thread in threads[start : start + 8]:
                thread.join()
        assert _fired(budget_stack, f"key:{key_id}") == [("threshold", 0.5), ("threshold", 0.8)]

        replica_suite.stop_all()  # a restart of replica B: its fired-cache is gone, the database is not
        replica_suite.start_service(ServiceName.BUDGET)
        restarted = budget_stack.stub(replica_address)
        for _ in range(2):
            ingest(budget_stack, restarted, key_id, 100_000)  # 94%
        assert _fired(budget_stack, f"key:{key_id}") == [("threshold", 0.5), ("threshold", 0.8)]
        ingest(budget_stack, restarted, key_id, 100_000)  # 95%
        ingest(budget_stack, stubs[0], key_id, 100_000)  # 96%
        assert _fired(budget_stack, f"key:{key_id}") == [("threshold", 0.5), ("threshold", 0.8), ("threshold", 0.95)]

        crossed = wait_until(
            lambda: (
                events
                if len(
                    events := [e for e in reader.of(key_id) if e.type == budget_pb2.BUDGET_EVENT_TYPE_THRESHOLD_CROSSED]
                )
                >= 3
                else None
            )
        )
        hooks = wait_until(lambda: h if len(h := _webhooks_for(budget_stack, key_id)) >= 3 else None)
    finally:
        reader.close()
    assert [e.threshold for e in crossed] == [0.5, 0.8, 0.95]
    assert crossed[0].message == "Virtual key 'Production API Key' has reached 50% of budget"
    assert sorted(h["data"]["threshold"] for h in hooks) == [0.5, 0.8, 0.95]
    assert all(h["type"] == "budget.threshold_crossed" for h in hooks)
    # Emails for 0.8 and 0.95 (key alerts have no recipients: the configured default receives them).
    mails = wait_until(
        lambda: (
            m
            if len(m := [x for x in budget_stack.smtp.collector.messages if "Production API Key" in str(x["Subject"])])
            >= 2
            else None
        )
    )
    assert {str(m["To"]) for m in mails} == {"budget-owner@example.com"}
    # Deliveries are signed per Standard Webhooks.
    delivery = next(r for r in budget_stack.webhook.on_path("/webhook") if r.json()["data"].get("keyId") == key_id)
    headers = delivery.headers
    assert headers["webhook-signature"] == sign_webhook(
        SECRET, headers["webhook-id"], int(headers["webhook-timestamp"]), delivery.body
    )
    with budget_stack.db() as conn:
        notifications = conn.execute(
            "SELECT channel, count(*) FROM notification_outbox WHERE payload->'data'->>'keyId' = %s"
            " OR (channel = 'email' AND subject LIKE %s) GROUP BY channel ORDER BY channel",
            (key_id, "%Production API Key%"),
        ).fetchall()
    assert notifications == [("email", 2), ("webhook", 3)]


def test_disable_key_end_to_end(budget_stack: BudgetStack) -> None:
    key_id = new_key(budget_stack, 1.00)
    stub = budget_stack.stub()
    reader = StreamReader(budget_stack, last_event_id(budget_stack))
    try:
        assert authorize(stub, budget_stack, key_id, 100_000, "first-" + key_id).allowed
        stub.Settle(settle_request(key_id, 960_000, "first-" + key_id), timeout=10, metadata=budget_stack.auth())
        with budget_stack.http() as client:
            key = client.get(f"/api/admin/virtual-keys/{key_id}").json()["data"]
        assert key["enabled"] is False
        assert "disable_key" in key["disabledReason"]
        assert key["budget"]["currentSpend"] == 0.96
        with pytest.raises(grpc.RpcError) as denied:
            authorize(stub, budget_stack, key_id, 10_000)
        assert denied.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        failure, metadata = status_of(denied.value)
        assert metadata["denialReason"] == "DENIAL_REASON_KEY_DISABLED"
        assert failure is not None and failure.violations[0].subject == f"key:{key_id}"
        wait_until(lambda: any(e.type == budget_pb2.BUDGET_EVENT_TYPE_KEY_DISABLED for e in reader.of(key_id)))

        with budget_stack.http() as client:
            enabled = client.post(f"/api/admin/virtual-keys/{key_id}/enable", json={})
        assert enabled.status_code == 200
        assert enabled.json()["data"]["enabled"] is True
        assert authorize(stub, budget_stack, key_id, 10_000).allowed
        wait_until(lambda: any(e.type == budget_pb2.BUDGET_EVENT_TYPE_KEY_ENABLED for e in reader.of(key_id)))
    finally:
        reader.close()
    types = [e.type for e in reader.of(key_id)]
    assert types == [
        budget_pb2.BUDGET_EVENT_TYPE_THRESHOLD_CROSSED,
        budget_pb2.BUDGET_EVENT_TYPE_THRESHOLD_CROSSED,
        budget_pb2.BUDGET_EVENT_TYPE_THRESHOLD_CROSSED,
        budget_pb2.BUDGET_EVENT_TYPE_KEY_DISABLED,
        budget_pb2.BUDGET_EVENT_TYPE_KEY_ENABLED,
    ]


def test_stream_subscriber_resumes_from_its_last_id(budget_stack: BudgetStack) -> None:
    key_id = new_key(budget_stack)
    start = last_event_id(budget_stack)
    first = StreamReader(budget_stack, start)
    watcher = StreamReader(budget_stack, start)  # a second subscriber, connected throughout
    try:
        with budget_stack.http() as client:
            client.post(f"/api/admin/virtual-keys/{key_id}/disable", json={"reason": "step 0"})
        wait_until(lambda: first.of(key_id))
    finally:
        first.close()
    last_seen = first.of(key_id)[-1].event_id
    with budget_stack.http() as client:  # while disconnected
        for step in range(1, 7):
            action = "enable" if step % 2 else "disable"
            assert client.post(f"/api/admin/virtual-keys/{key_id}/{action}", json={}).status_code == 200
    resumed = StreamReader(budget_stack, last_seen)
    try:
        wait_until(lambda: len(resumed.of(key_id)) >= 6 and len(watcher.of(key_id)) >= 7)
    finally:
        resumed.close()
        watcher.close()
    expected = [
        budget_pb2.BUDGET_EVENT_TYPE_KEY_ENABLED if step % 2 else budget_pb2.BUDGET_EVENT_TYPE_KEY_DISABLED
        for step in range(1, 7)
    ]
    assert [e.type for e in resumed.of(key_id)] == expected
    assert [e.event_id for e in watcher.of(key_id)][1:] == [e.event_id for e in resumed.of(key_id)]
    ids = [tuple(int(p) for p in e.event_id.split("-")) for e in watcher.of(key_id)]
    assert ids == sorted(ids)


def test_cost_spike_is_detected_on_schedule_once(budget_stack: BudgetStack) -> None:
    # Spikes are deduplicated per (window, multiplier): a multiplier of this test's own keeps a
    # spike that other tests' spend may already have fired in this hour from hiding this one.
    multiplier = round(3.0 + uuid.uuid4().int % 997 / 1000, 3)
    with budget_stack.http() as client:
        config = client.get("/api/admin/budgets/alerts").json()["data"]
        config.pop("updatedAt", None)
        config["costSpikesDetection"].update(enabled=True, thresholdMultiplier=multiplier, timeWindow=3600)
        assert client.put("/api/admin/budgets/alerts", json=config).status_code == 200
    key_id = new_key(budget_stack)
    reader = StreamReader(budget_stack, last_event_id(budget_stack))
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    try:
        with budget_stack.db() as conn:
            add_rollup(conn, key_id, 24 * USD, provider="spike-test", bucket=hour - timedelta(hours=5))
            # The current hour (and the next, in case the hour turns during the test).
            add_rollup(conn, key_id, 1000 * USD, provider="spike-test", bucket=hour)
            add_rollup(conn, key_id, 1000 * USD, provider="spike-test", bucket=hour + timedelta(hours=1))
        spike = wait_until(
            lambda: [
                e
                for e in reader.events
                if e.type == budget_pb2.BUDGET_EVENT_TYPE_COST_SPIKE and abs(e.threshold - multiplier) < 1e-9
            ],
            timeout=30,
        )
    finally:
        reader.close()
        with budget_stack.db() as conn:
            for table in HOURLY.tables:
                conn.execute(f"DELETE FROM {table} WHERE key_id = %s", (key_id,))  # noqa: S608
    assert spike[0].scope == "global"
    assert spike[0].spend_micros >= 1000 * USD
    assert "Cost spike" in spike[0].message
    with budget_stack.db() as conn:
        spikes = conn.execute(
            "SELECT count(*) FROM budget_alerts_fired WHERE kind = 'spike' AND threshold = %s", (multiplier,)
        ).fetchone()
    assert spikes == (1,)


# ---------------------------------------------------------------------------------------------- reconciliation
def test_flushall_then_totals_are_rebuilt_exactly_from_the_database(budget_stack: BudgetStack) -> None:
    key_id = new_key(budget_stack, 100.00)
    stub = budget_stack.stub()
    for micros in (1_234_567, 2_000_001, 3):
        ingest(budget_stack, stub, key_id, micros, provider="reconcile-provider")
    # An hour ago too (raw event and rollup), and spend that only Redis knows (drift).
    with budget_stack.db() as conn:
        record_usage(conn, key_id, 5 * USD, provider="reconcile-provider", at=datetime.now(UTC) - timedelta(hours=1))
    stub.Settle(settle_request(key_id, 777), timeout=10, metadata=budget_stack.auth())

    with budget_stack.http() as client:
        before = client.get(f"/api/admin/virtual-keys/{key_id}/budget").json()["data"]
    assert before["currentSpend"] == 3.235348  # the hour-old row reached the database only

    with budget_stack.redis_client() as client:
        client.flushall()
    after = authorize(stub, budget_stack, key_id, 1)
    expected_key = 1_234_567 + 2_000_001 + 3 + 5 * USD
    assert after.remaining[0].committed_micros == expected_key + 1
    with budget_stack.db() as conn:
        month = period_at(PeriodKind.MONTHLY, ZoneInfo("UTC"), datetime.now(UTC))
        (expected_global,) = conn.execute(
            "SELECT coalesce(sum(cost_micros), 0) FROM usage_events WHERE event_time >= %s", (month.start,)
        ).fetchone() or (0,)
    assert after.remaining[1].committed_micros == expected_global + 1  # FLUSHALL dropped every reservation
    with budget_stack.http() as client:
        status = client.get("/api/admin/budgets/status").json()["data"]
        stub.Settle(settle_request(key_id, 500), timeout=10, metadata=budget_stack.auth())
        reconciled = client.post("/api/admin/budgets/reconcile", json={}).json()["data"]
    assert status["budgetBreakdown"]["byProvider"]["reconcile-provider"]["spend"] == expected_key / USD
    assert reconciled["drift"] == 2 * 500 / USD  # the Redis-only settle, in the key's and the global scope
    metrics = httpx.get(f"http://127.0.0.1:{budget_stack.env['BUDGET_METRICS_PORT']}/metrics", timeout=5).text
    assert 'tally_budget_drift_micros{scope_kind="keys"}' in metrics
    assert 'tally_budget_reconciles_total{trigger="not_loaded"} 1.0' in metrics


def test_counters_are_rebuilt_when_redis_restarted_since_they_were_loaded(budget_stack: BudgetStack) -> None:
    """A Redis that restarts from its append-only file keeps the `loaded` marker but may lack its
    last second of writes: the budget service sees the marker was set in another Redis process
    (run id) and rebuilds the counters from the database within seconds."""
    key_id = new_key(budget_stack, 100.00)
    stub = budget_stack.stub()
    ingest(budget_stack, stub, key_id, 1_500_000, provider="restart-provider")
    with budget_stack.redis_client() as client:
        (counter,) = client.keys(f"{{tally:budget}}:c:key:{key_id}:*")
        run = client.info("server")["run_id"]
        marker = client.get("{tally:budget}:loaded")
        assert marker is not None and marker.decode().startswith(f"{run}|")
        client.hset(counter, "s", 1)  # the settle the reloaded file lacked
        client.set("{tally:budget}:loaded", b"0" * 40 + b"|" + marker.split(b"|", 1)[1])  # loaded elsewhere
        # Rebuilt (by whichever budget replica saw it first): the marker names this Redis again.
        wait_until(lambda: client.get("{tally:budget}:loaded").decode().startswith(f"{run}|"), timeout=10)
        assert client.hget(counter, "s") == b"1500000"


async def test_a_recorded_budget_event_reaches_the_stream_once_whatever_fails(
    database: Database, tmp_path: Path
) -> None:
    """Budget events are recorded in the decision's transaction. With Redis down the immediate add
    fails (logged, not raised: an alert's other thresholds are still evaluated) and the relay adds
    them when Redis is back, oldest first. The immediate path, retries and a second replica's relay
    add each event once, even when its row was not marked as added."""
    server = Redis(tmp_path / "redis", free_port())
    server.start()
    crossed = BudgetEvent(budget_pb2.BUDGET_EVENT_TYPE_THRESHOLD_CROSSED, "key:k", "k", 0.5, 50, 100, "50%")
    disabled = BudgetEvent(budget_pb2.BUDGET_EVENT_TYPE_KEY_DISABLED, "key:k", "k", 0.5, 50, 100, "disabled")
    try:
        async with database.transaction() as conn:
            ids = [await record(conn, crossed), await record(conn, disabled)]
        down = redis_asyncio.Redis.from_url(server.url)
        server.stop()
        waiting = EventStream(down, down, 1000, database)
        await waiting.deliver(ids)  # logged, not raised
        assert await waiting.relay() == 0  # logged once, not raised
        assert REGISTRY.get_sample_value("tally_budget_events_pending") == 2
        await down.aclose()
        server.start()
        client = redis_asyncio.Redis.from_url(server.url)
        stream, other_replica = (EventStream(client, client, 1000, database) for _ in range(2))
        assert await stream.relay() == 2
        assert REGISTRY.get_sample_value("tally_budget_events_pending") == 0
        await stream.deliver(ids)
        assert await other_replica.relay() == 0
        async with database.transaction() as conn:  # as if marking them had failed after the add
            await conn.execute("UPDATE budget_event_outbox SET published_at = NULL, stream_id = NULL")
        assert await other_replica.relay() == 2
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(EVENTS_KEY)  # type: ignore[assignment]
        assert [(e[1][b"type"], e[1][b"message"]) for e in entries] == [
            (str(crossed.type).encode(), b"50%"),
            (str(disabled.type).encode(), b"disabled"),
        ]
        rows = await database.fetch_all("SELECT stream_id FROM budget_event_outbox ORDER BY id")
        assert [r["stream_id"] for r in rows] == [e[0].decode() for e in entries]
        # A key's events keep their order: adding a later one adds an earlier one still pending
        # first (its immediate add failed; an enable was decided after it).
        enabled = BudgetEvent(budget_pb2.BUDGET_EVENT_TYPE_KEY_ENABLED, "key:k", "k", 0.0, 0, 0, "enabled")
        async with database.transaction() as conn:
            pending = await record(conn, disabled)
        async with database.transaction() as conn:
            later = await record(conn, enabled)
        await stream.deliver([later])
        tail: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(EVENTS_KEY)  # type: ignore[assignment]
        assert [e[1][b"message"] for e in tail[2:]] == [b"disabled", b"enabled"]
        assert pending < later
        await client.aclose()
    finally:
        server.stop()


def test_an_admin_disable_while_redis_is_down_changes_nothing_until_retried(budget_stack: BudgetStack) -> None:
    """The database and Redis change together: with Redis down the disable fails (503) and the key
    stays enabled, with no event; retried once Redis is back it is disabled, with KEY_DISABLED."""
    key_id = new_key(budget_stack, 100.00)
    budget_stack.redis.stop()
    try:
        with budget_stack.http() as client:
            reply = client.post(f"/api/admin/virtual-keys/{key_id}/disable", json={"reason": "during an outage"})
    finally:
        budget_stack.redis.start()
    assert reply.status_code == 503, reply.text

    def events() -> list[int]:
        with budget_stack.redis_client() as client:
            entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(EVENTS_KEY)
            return [int(fields[b"type"]) for _, fields in entries if fields[b"key"].decode() == key_id]

    with budget_stack.db() as conn:
        assert conn.execute("SELECT enabled FROM virtual_keys WHERE key_id = %s", (key_id,)).fetchone() == (True,)
    time.sleep(1.5)  # a relay pass
    assert events() == []
    with budget_stack.http() as client:
        retried = wait_until(
            lambda: (r := client.post(f"/api/admin/virtual-keys/{key_id}/disable", json={})).status_code == 200 and r,
            timeout=15,
        )
        assert retried.json()["data"]["enabled"] is False
        # At once, or by the relay when the first add hit a connection from before the restart.
        wait_until(lambda: events() == [budget_pb2.BUDGET_EVENT_TYPE_KEY_DISABLED], timeout=10)
        assert client.post(f"/api/admin/virtual-keys/{key_id}/enable", json={}).status_code == 200
        assert client.post("/api/admin/budgets/reconcile", json={}).status_code == 200


def test_a_key_left_disabled_in_redis_alone_is_enabled_by_the_sync(budget_stack: BudgetStack) -> None:
    """A disable whose Redis write went through but whose reply was lost is rolled back in the
    database and left in Redis: the periodic sync enables the key in Redis again."""
    key_id = new_key(budget_stack, 100.00)
    scope = key_scope(key_id)
    with budget_stack.redis_client() as client:
        client.hset(config_key(scope), "dis", "1")
        client.sadd(DISABLED_KEY, scope)

    def authorized() -> bool:
        try:
            reply = budget_stack.stub().Authorize(
                budget_pb2.AuthorizeRequest(key_id=key_id, request_id=uuid.uuid4().hex, estimated_cost_micros=1_000),
                timeout=10,
                metadata=budget_stack.auth(),
            )
        except grpc.RpcError as denied:
            if denied.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # only "disabled" until the sync
                raise
            return False
        return bool(reply.allowed)

    wait_until(authorized, timeout=15)
    with budget_stack.redis_client() as client:
        assert client.hget(config_key(scope), "dis") is None
        assert not client.sismember(DISABLED_KEY, scope)
        # A disabled key is both flagged and listed.
        with budget_stack.http() as http:
            assert http.post(f"/api/admin/virtual-keys/{key_id}/disable", json={}).status_code == 200
        assert client.hget(config_key(scope), "dis") == b"1"
        assert client.sismember(DISABLED_KEY, scope)
        with budget_stack.http() as http:
            assert http.post(f"/api/admin/virtual-keys/{key_id}/enable", json={}).status_code == 200


async def test_a_disable_key_alert_fires_even_when_redis_refuses_the_disable(database: Database) -> None:
    """The key is disabled in the database with its alert and events, even if Redis refuses the
    disable (the sync applies it there); a failed threshold would not stop the next ones."""

    class RefusingStore:
        async def set_disabled(self, scope: str, disabled: bool) -> None:
            raise redis_py.ConnectionError("Connection refused")

    class Events:
        def __init__(self) -> None:
            self.delivered: list[int] = []

        async def deliver(self, ids: list[int]) -> None:
            self.delivered.extend(ids)

    repository = BudgetRepository(database)
    key_id = uuid.uuid4()
    async with database.transaction() as conn:
        await conn.execute("INSERT INTO virtual_keys (key_id, key_name) VALUES (%s, 'k')", (key_id,))
    events = Events()
    store: Any = RefusingStore()
    stream: Any = events
    evaluator = Evaluator(Settings(), database, repository, store, stream, lambda: None)
    config = AlertConfig(key_enabled=True, key_thresholds=(0.5, 0.8), key_actions={"0.5": ("disable_key",)})
    evaluator.use_config(config)
    period = period_at(PeriodKind.MONTHLY, ZoneInfo("UTC"), datetime.now(UTC))
    scope = key_scope(str(key_id))
    await evaluator.on_spend(ScopeSpend(scope, str(key_id), period, 85, 100))
    fired = await database.fetch_all(
        "SELECT threshold::float8 AS threshold FROM budget_alerts_fired WHERE scope = %s ORDER BY 1", (scope,)
    )
    assert [row["threshold"] for row in fired] == [0.5, 0.8]
    enabled = await database.fetch_one("SELECT enabled FROM virtual_keys WHERE key_id = %s", (key_id,))
    assert enabled == {"enabled": False}
    recorded = await database.fetch_all("SELECT type FROM budget_event_outbox ORDER BY id")
    assert [row["type"] for row in recorded] == [
        budget_pb2.BUDGET_EVENT_TYPE_THRESHOLD_CROSSED,
        budget_pb2.BUDGET_EVENT_TYPE_KEY_DISABLED,
        budget_pb2.BUDGET_EVENT_TYPE_THRESHOLD_CROSSED,
    ]
    assert len(events.delivered) == 3


async def test_the_disabled_keys_sync_and_an_enable_never_interleave(database: Database) -> None:
    """Maintenance writes the disabled keys to Redis with their rows locked, and an enable writes
    Redis before its commit: so an enable made meanwhile waits and writes after the sync (before,
    the sync could write an enabled key's old state over the enable's)."""
    repository = BudgetRepository(database)
    key_id = uuid.uuid4()
    async with database.transaction() as conn:
        await conn.execute("INSERT INTO virtual_keys (key_id, key_name, enabled) VALUES (%s, 'k', false)", (key_id,))
    written: list[str] = []

    async def enable_written() -> None:
        written.append("enable")

    event = BudgetEvent(budget_pb2.BUDGET_EVENT_TYPE_KEY_ENABLED, key_scope(str(key_id)), str(key_id))
    async with repository.disabled_keys_locked() as disabled:
        assert key_id in disabled
        enable = asyncio.create_task(repository.set_key_enabled(key_id, True, None, event, enable_written))
        await asyncio.sleep(0.3)
        written.append("sync")  # the sync's Redis write of the key as disabled
    assert await enable is not None
    assert written == ["sync", "enable"]
    # A rebuild also locks the enabled keys it rewrites (those with a budget): a disable waits.
    disable = BudgetEvent(budget_pb2.BUDGET_EVENT_TYPE_KEY_DISABLED, key_scope(str(key_id)), str(key_id))

    async def disable_written() -> None:
        written.append("disable")

    async with repository.disabled_keys_locked(also=[key_id]) as disabled:
        assert key_id not in disabled
        task = asyncio.create_task(repository.set_key_enabled(key_id, False, "r", disable, disable_written))
        await asyncio.sleep(0.3)
        written.append("rebuild")
    assert await task is not None
    assert written == ["sync", "enable", "rebuild", "disable"]


def test_budget_reads_answer_from_the_database_while_redis_is_down(budget_stack: BudgetStack) -> None:
    """With Redis unreachable, Authorize follows the failure policy, but the budget reads still
    answer: settled spend from the database (reservations, held in Redis only, as 0)."""
    key_id = new_key(budget_stack, 100.00)
    stub = budget_stack.stub()
    ingest(budget_stack, stub, key_id, 2_500_000, provider="outage-provider")
    budget_stack.redis.stop()
    try:
        with budget_stack.http() as client:
            key = client.get(f"/api/admin/virtual-keys/{key_id}/budget")
            status = client.get("/api/admin/budgets/status")
    finally:
        budget_stack.redis.start()
        with budget_stack.http() as client:  # counters loaded again before the next test
            assert client.post("/api/admin/budgets/reconcile", json={}).status_code == 200
    assert key.status_code == 200, key.text
    assert key.json()["data"]["currentSpend"] == 2.5
    assert status.status_code == 200, status.text
    data = status.json()["data"]
    with budget_stack.db() as conn:
        month = period_at(PeriodKind.MONTHLY, ZoneInfo("UTC"), datetime.now(UTC))
        (stored,) = conn.execute(
            "SELECT coalesce(sum(cost_micros), 0) FROM usage_events WHERE event_time >= %s", (month.start,)
        ).fetchone() or (0,)
    assert round(data["globalBudget"]["currentSpend"] * USD) == stored  # the database's, not Redis'
    assert data["budgetBreakdown"]["byProvider"]["outage-provider"]["spend"] == 2.5
    mine = next(k for k in data["budgetBreakdown"]["byVirtualKey"] if k["keyId"] == key_id)
    assert mine["currentSpend"] == 2.5


def _commit_usage(conn: psycopg.Connection[Any], key_id: str, micros: int) -> tuple[str, int]:
    """Commits one event and its rollup as ingest does; its request id and transaction id."""
    at = datetime.now(UTC)
    request_id = uuid.uuid4().hex
    with conn.transaction():
        conn.execute(
            """INSERT INTO usage_events (event_time, request_id, key_id, provider, model, operation, cost_micros,
                   cost_source) VALUES (%s, %s, %s, 'openai', 'gpt-4', 'chat.completions', %s, 'provider')""",
            (at, request_id, key_id, micros),
        )
        add_rollup(conn, key_id, micros, provider="openai", bucket=at.replace(minute=0, second=0, microsecond=0))
        row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
    assert row is not None
    return request_id, int(row[0])


def test_spend_settled_after_a_rebuild_that_counted_it_is_not_doubled(budget_stack: BudgetStack) -> None:
    key_id = new_key(budget_stack, 50.00)
    stub = budget_stack.stub()
    with budget_stack.db() as conn:
        request_id, transaction_id = _commit_usage(conn, key_id, 2 * USD)
    # A rebuild runs before ingest's hand-off arrives: it reads the committed spend.
    with budget_stack.http() as client:
        assert client.post("/api/admin/budgets/reconcile", json={}).status_code == 200
    request = settle_request(key_id, 2 * USD, request_id)
    request.database_transaction_id = transaction_id
    reply: budget_pb2.SettleResponse = stub.Settle(request, timeout=10, metadata=budget_stack.auth())
    assert reply.remaining[0].committed_micros == 2 * USD  # not 4
    # Later usage is counted as usual.
    with budget_stack.db() as conn:
        later_id, later_transaction = _commit_usage(conn, key_id, 3 * USD)
    later = settle_request(key_id, 3 * USD, later_id)
    later.database_transaction_id = later_transaction
    reply = stub.Settle(later, timeout=10, metadata=budget_stack.auth())
    assert reply.remaining[0].committed_micros == 5 * USD
    with budget_stack.http() as client:
        view = client.get(f"/api/admin/virtual-keys/{key_id}/budget").json()["data"]
    assert view["currentSpend"] == 5.0


# ---------------------------------------------------------------------------------------------- failure policy
@pytest.mark.parametrize("policy", ["open", "closed"])
def test_unreachable_redis_answers_with_the_failure_policy_within_the_deadline(
    budget_stack: BudgetStack, policy: str
) -> None:
    paused = Redis(budget_stack.root / f"paused-{policy}", free_port())
    paused.start()
    _suite, address = budget_stack.start_replica(
        f"policy-{policy}", REDIS_URL=paused.url, BUDGET_FAILURE_POLICY=policy, BUDGET_RECONCILE_ON_START="false"
    )
    assert paused.process is not None
    paused.process.send_signal(signal.SIGSTOP)  # reachable but silent: every call would hang
    try:
        stub = budget_stack.stub(address)
        request = budget_pb2.AuthorizeRequest(key_id=str(uuid.uuid4()), request_id="x", estimated_cost_micros=5)
        if policy == "open":
            reply = stub.Authorize(request, timeout=1.0, metadata=budget_stack.auth())
            assert reply.allowed and reply.failure_policy_applied
        else:
            with pytest.raises(grpc.RpcError) as denied:
                stub.Authorize(request, timeout=1.0, metadata=budget_stack.auth())
            assert denied.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            _failure, metadata = status_of(denied.value)
            assert metadata["denialReason"] == "DENIAL_REASON_BUDGET_STORE_UNAVAILABLE"
        port = _suite.env["BUDGET_METRICS_PORT"]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert f'tally_budget_failure_policy_total{{operation="authorize",policy="{policy}"}} 1.0' in metrics
    finally:
        paused.process.send_signal(signal.SIGCONT)
        _suite.stop_all()
        paused.stop()
    assert "redis unreachable" in (budget_stack.root / "logs" / f"policy-{policy}" / "budget.log").read_text()


# ------------------------------------------------------------------------------------- admin REST (seed shapes)
def test_budget_status_has_exactly_the_seed_shape(budget_stack: BudgetStack) -> None:
    stub = budget_stack.stub()
    key_id = new_key(budget_stack, 5000.00, name="Status Key")
    provider = f"status-{uuid.uuid4().hex[:6]}"
    ingest(budget_stack, stub, key_id, 4000 * USD, provider=provider)  # 80%: the warning threshold fires
    with budget_stack.http() as client:
        assert client.put("/api/admin/budgets/global", json={"maxBudget": 1e6, "period": "monthly"}).status_code == 200
        reply = client.get("/api/admin/budgets/status")
    assert reply.status_code == 200
    body = reply.json()
    assert set(body) == {"success", "data"} and body["success"] is True
    data = body["data"]
    assert set(data) == {"globalBudget", "budgetAlerts", "budgetBreakdown"}
    g = data["globalBudget"]
    assert set(g) == {
        "maxBudget",
        "currentSpend",
        "remainingBudget",
        "utilizationPercentage",
        "projectedMonthlySpend",
        "onTrack",
        "daysRemaining",
        "averageDailySpend",
    }
    assert g["maxBudget"] == 1e6
    assert g["remainingBudget"] == pytest.approx(g["maxBudget"] - g["currentSpend"])
    assert g["utilizationPercentage"] == pytest.approx(g["currentSpend"] / g["maxBudget"])
    assert isinstance(g["daysRemaining"], int) and isinstance(g["onTrack"], bool)
    assert g["currentSpend"] >= 4000
    alert = next(a for a in data["budgetAlerts"] if a["keyId"] == key_id)
    assert alert == {
        "level": "warning",
        "message": "Virtual key 'Status Key' has reached 80% of budget",
        "keyId": key_id,
        "percentage": 0.8,
        "remainingBudget": 1000.0,
    }
    breakdown = data["budgetBreakdown"]
    assert set(breakdown) == {"byVirtualKey", "byProvider"}
    usage = next(u for u in breakdown["byVirtualKey"] if u["keyId"] == key_id)
    assert usage == {
        "keyId": key_id,
        "keyName": "Status Key",
        "maxBudget": 5000.0,
        "currentSpend": 4000.0,
        "utilizationPercentage": 0.8,
    }
    utilizations = [u["utilizationPercentage"] for u in breakdown["byVirtualKey"]]
    assert utilizations == sorted(utilizations, reverse=True)
    share = breakdown["byProvider"][provider]
    assert set(share) == {"spend", "percentage"}
    assert share["spend"] == 4000.0
    assert sum(p["percentage"] for p in breakdown["byProvider"].values()) == pytest.approx(1.0)


def test_budget_alerts_round_trip_in_the_seed_shape(budget_stack: BudgetStack) -> None:
    with budget_stack.http() as client:
        put = client.put("/api/admin/budgets/alerts", json=ALERTS)
        got = client.get("/api/admin/budgets/alerts")
    assert put.status_code == 200 and got.status_code == 200
    assert got.json() == put.json()
    data = got.json()["data"]
    assert data.pop("updatedAt").endswith("Z")
    # The seed's body comes back as sent; fields it left out print as their empty values.
    sent = json.loads(json.dumps(ALERTS))
    sent["globalBudgetAlerts"]["thresholds"][0].update({"channels": [], "urgency": ""})
    assert data == sent


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda c: c["globalBudgetAlerts"]["thresholds"][1].update(percentage=1.5),
            "globalBudgetAlerts.thresholds[1].percentage",
        ),
        (
            lambda c: c["globalBudgetAlerts"]["thresholds"][0].update(actions=["fax"]),
            "globalBudgetAlerts.thresholds[0].actions[0]",
        ),
        (
            lambda c: c["globalBudgetAlerts"]["thresholds"][0].update(recipients=["nobody"]),
            "globalBudgetAlerts.thresholds[0].recipients[0]",
        ),
        (
            lambda c: c["globalBudgetAlerts"]["thresholds"][1].update(urgency="urgent"),
            "globalBudgetAlerts.thresholds[1].urgency",
        ),
        (
            lambda c: c["virtualKeyBudgetAlerts"].update(defaultThresholds=[0.5, 0.8, 0.95, 0]),
            "virtualKeyBudgetAlerts.defaultThresholds[3]",
        ),
        (
            lambda c: c["virtualKeyBudgetAlerts"]["actions"].update({"0.7": ["webhook"]}),
            'virtualKeyBudgetAlerts.actions["0.7"]',
        ),
        (
            lambda c: c["virtualKeyBudgetAlerts"]["actions"].update({"0.5": ["explode"]}),
            'virtualKeyBudgetAlerts.actions["0.5"][0]',
        ),
        (lambda c: c["costSpikesDetection"].update(thresholdMultiplier=0.5), "costSpikesDetection.thresholdMultiplier"),
        (lambda c: c["costSpikesDetection"].update(timeWindow=5), "costSpikesDetection.timeWindow"),
    ],
)
def test_invalid_alert_configuration_is_400_naming_the_field(
    budget_stack: BudgetStack, change: Any, field: str
) -> None:
    config = json.loads(json.dumps(ALERTS))
    change(config)
    with budget_stack.http() as client:
        reply = client.put("/api/admin/budgets/alerts", json=config)
        stored = client.get("/api/admin/budgets/alerts").json()["data"]
    assert reply.status_code == 400
    error = reply.json()["error"]
    bad = next(d for d in error["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    assert [v["field"] for v in bad["fieldViolations"]] == [field]
    stored.pop("updatedAt")
    assert stored["virtualKeyBudgetAlerts"] == ALERTS["virtualKeyBudgetAlerts"]  # nothing was changed


def test_budgets_are_validated_and_read_back(budget_stack: BudgetStack) -> None:
    key_id = new_key(budget_stack)
    with budget_stack.http() as client:
        missing = client.get(f"/api/admin/virtual-keys/{key_id}/budget")
        bad = client.put(
            f"/api/admin/virtual-keys/{key_id}/budget",
            json={"maxBudget": -1, "period": "hourly", "timezone": "Mars/Olympus"},
        )
        put = client.put(
            f"/api/admin/virtual-keys/{key_id}/budget",
            json={"maxBudget": 250.5, "period": "weekly", "timezone": "Europe/Paris"},
        )
        global_budget = client.get("/api/admin/budgets/global")
    assert missing.status_code == 404
    assert bad.status_code == 400
    bad_request = next(d for d in bad.json()["error"]["details"] if d["@type"].endswith("BadRequest"))
    assert [v["field"] for v in bad_request["fieldViolations"]] == ["maxBudget", "period", "timezone"]
    assert put.status_code == 200
    budget = put.json()["data"]
    assert (budget["maxBudget"], budget["period"], budget["timezone"]) == (250.5, "weekly", "Europe/Paris")
    start = datetime.fromisoformat(budget["periodStart"].replace("Z", "+00:00"))
    assert start.astimezone(ZoneInfo("Europe/Paris")).weekday() == 0
    assert start.astimezone(ZoneInfo("Europe/Paris")).hour == 0
    assert global_budget.status_code == 200
    assert set(global_budget.json()["data"]) >= {"maxBudget", "period", "currentSpend", "reserved", "remainingBudget"}


# ---------------------------------------------------------------------------------------------- Redis Cluster
@pytest.fixture(scope="module")
def cluster_replica(budget_stack: BudgetStack) -> Iterator[tuple[str, RedisClusterNodes]]:
    """A budget process on a real 3-master Redis Cluster (same database)."""
    cluster = RedisClusterNodes(budget_stack.root / "cluster", [free_cluster_port() for _ in range(3)])
    try:
        cluster.start()
        suite, address = budget_stack.start_replica("cluster", REDIS_URL=cluster.url, REDIS_CLUSTER="true")
        yield address, cluster
        suite.stop_all()
    finally:
        cluster.stop()


def _set_budget(stack: BudgetStack, address: str, key_id: str, usd: float) -> None:
    stack.stub(address).UpdateVirtualKeyBudget(
        budget_pb2.UpdateVirtualKeyBudgetRequest(key_id=key_id, max_budget=usd, period="daily"),
        timeout=10,
        metadata=stack.auth(),
    )


async def test_cluster_500_concurrent_authorizations_admit_exactly_200(
    budget_stack: BudgetStack, cluster_replica: tuple[str, RedisClusterNodes]
) -> None:
    address, _cluster = cluster_replica
    key_id = new_key(budget_stack)
    _set_budget(budget_stack, address, key_id, 10.00)
    results = await _concurrent_authorizations(address, budget_stack, key_id, 500, 50_000)
    _check_exactly_200(results, f"key:{key_id}")


def test_cluster_settle_events_and_flushall_rebuild(
    budget_stack: BudgetStack, cluster_replica: tuple[str, RedisClusterNodes]
) -> None:
    address, cluster = cluster_replica
    key_id = new_key(budget_stack)
    _set_budget(budget_stack, address, key_id, 2.00)
    stub = budget_stack.stub(address)
    reader = StreamReader(budget_stack, "", address=address)
    try:
        assert authorize(stub, budget_stack, key_id, 1 * USD, "c1-" + key_id).allowed
        ingest_micros = 1_100_000
        with budget_stack.db() as conn:
            request_id = record_usage(conn, key_id, ingest_micros)
        # The reservation was for another request id: settle both (one with no reservation).
        stub.Settle(settle_request(key_id, ingest_micros, request_id), timeout=10, metadata=budget_stack.auth())
        released = stub.Release(
            budget_pb2.ReleaseRequest(request_id="c1-" + key_id), timeout=10, metadata=budget_stack.auth()
        )
        assert released.released
        wait_until(lambda: any(e.threshold == 0.5 for e in reader.of(key_id)))  # 55%
        # The batch hand-off (one script run per chunk) on the cluster: a reserved and a bare item.
        assert authorize(stub, budget_stack, key_id, 100_000, "c2-" + key_id).allowed
        batch = stub.SettleBatch(
            budget_pb2.SettleBatchRequest(
                items=[settle_request(key_id, 150_000, "c2-" + key_id), settle_request(key_id, 50_000)]
            ),
            timeout=10,
            metadata=budget_stack.auth(),
        )
        assert (batch.settled, batch.already_settled, batch.overspend_micros) == (2, 0, 100_000)
        assert authorize(stub, budget_stack, key_id, 0).remaining[0].committed_micros == ingest_micros + 200_000
        # Ingest's compact hand-off (lua.SETTLE_HANDOFF) on the cluster too.
        assert authorize(stub, budget_stack, key_id, 100_000, "c3-" + key_id).allowed
        compact = stub.SettleBatch(
            _handoff(key_id, [("c3-" + key_id, 50_000, 0), ("c4-" + key_id, 30_000, 0)]),
            timeout=10,
            metadata=budget_stack.auth(),
        )
        assert (compact.settled, compact.already_settled, compact.overspend_micros) == (2, 0, 30_000)
        committed = authorize(stub, budget_stack, key_id, 0).remaining[0].committed_micros
        assert committed == ingest_micros + 200_000 + 80_000
    finally:
        reader.close()
    keys = _cluster_scan(cluster)
    assert any(k.startswith("{tally:budget}:c:key:") for k in keys)
    assert all(k.startswith("{tally:budget}:") for k in keys)  # one hash tag: one slot
    for port in cluster.ports:
        with redis_py.Redis(port=port) as node:
            node.flushall()
    after = authorize(stub, budget_stack, key_id, 1)
    assert after.remaining[0].committed_micros == ingest_micros + 1


def _cluster_scan(cluster: RedisClusterNodes) -> list[str]:
    keys: list[str] = []
    for port in cluster.ports:
        with redis_py.Redis(port=port) as node:
            keys += [k.decode() for k in node.scan_iter(count=1000)]
    return keys


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, 0), (1_700_000_000, 999_999_999), (1_700_000_000, 1_999), (-86_400 * 365, 500), (253_402_300_799, 0)],
)
def test_handoff_timestamps_convert_as_protobuf_converts_them(seconds: int, nanos: int) -> None:
    stamp = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)
    assert _utc(stamp) == stamp.ToDatetime(UTC)
    assert _utc(stamp).utcoffset() == timedelta(0)
