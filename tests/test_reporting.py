"""Reporting against real servers: its own TimescaleDB database and Redis, ingest, budget and
reporting services (and a second reporting replica), Envoy, an SMTP server (aiosmtpd) and HTTP
receivers, all on loopback ports."""

from __future__ import annotations

import base64
import csv
import io
import json
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import httpx
import psycopg
import pytest

from services.reporting.schedules import Schedule
from tally.devstack import ROOT, Postgres, Redis, Suite, free_port
from tally.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tally.notify import sign_webhook
from tally.runtime.config import ServiceName
from tests.conftest import stack_env
from tests.test_notify import HttpReceiver, SmtpServer, fresh_database, wait_until
from tests.usage_support import EventFactory, TestPrice, expected_cost_micros, recent

SECRET = "whsec_" + base64.b64encode(b"reporting-test-webhook-secret-0001").decode()
MICRO = Decimal(1_000_000)


# ---------------------------------------------------------------------------------------------- fixtures
@dataclass
class ReportingStack:
    env: dict[str, str]
    suite: Suite
    smtp: SmtpServer
    root: Path
    replicas: list[Suite] = field(default_factory=list)

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.env['GATEWAY_PORT']}",
            headers={"Authorization": f"Bearer {self.env['ADMIN_MASTER_KEY']}"},
            timeout=120,
        )

    def db(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.env["DATABASE_URL"], password=self.env["DATABASE_PASSWORD"], autocommit=True)

    def ingest(self, events: Sequence[ingest_pb2.UsageEvent]) -> None:
        with grpc.insecure_channel(self.env["INGEST_ADDRESS"]) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            for offset in range(0, len(events), 1000):
                reply = stub.RecordUsageBatch(
                    ingest_pb2.RecordUsageBatchRequest(events=events[offset : offset + 1000]),
                    timeout=60,
                    metadata=[("authorization", f"Bearer {self.env['ADMIN_MASTER_KEY']}")],
                )
                assert reply.success
                assert reply.data.accepted == len(events[offset : offset + 1000])

    def reporting_pid(self) -> int:
        return self.suite.processes["reporting"].pid

    def start_replica(self, name: str) -> Suite:
        env = dict(self.env)
        env.update({"REPORTING_ADDRESS": f"127.0.0.1:{free_port()}", "REPORTING_METRICS_PORT": str(free_port())})
        replica = Suite(env, log_dir=self.root / "logs" / name)
        replica.start_service(ServiceName.REPORTING)
        self.replicas.append(replica)
        return replica


@pytest.fixture(scope="module")
def rstack(infra: tuple[Postgres, Redis, Path]) -> Iterator[ReportingStack]:
    postgres, _shared_redis, shared_root = infra
    root = shared_root / f"reporting-{secrets.token_hex(3)}"
    redis_server = Redis(root / "redis", free_port())
    smtp = SmtpServer()
    env = stack_env(secrets.token_urlsafe(24))
    env.update(
        {
            "DATABASE_URL": fresh_database(postgres, "reporting"),
            "DATABASE_PASSWORD": postgres.password,
            "REDIS_URL": redis_server.url,
            "MIGRATE_ON_START": "false",
            "NOTIFY_POLL_SECONDS": "0.1",
            "NOTIFY_BACKOFF_MAX_SECONDS": "1",
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp.port),
            "REPORTING_WEBHOOK_POLL_SECONDS": "0.2",
            "REPORTING_SCHEDULE_REFRESH_SECONDS": "0.5",
            "REPORTING_EXPORT_CHUNK_BYTES": "65536",
        }
    )
    suite = Suite(env, log_dir=root / "logs")
    stack = ReportingStack(env, suite, smtp, root)
    try:
        redis_server.start()
        smtp.start()
        subprocess.run([sys.executable, "-m", "tally.runtime.migrate"], env=env, cwd=ROOT, check=True)
        for service in (ServiceName.INGEST, ServiceName.BUDGET, ServiceName.REPORTING):
            suite.start_service(service)
        suite.start_gateway()
        yield stack
    finally:
        for replica in stack.replicas:
            replica.stop_all()
        suite.stop_all()
        smtp.stop()
        redis_server.stop()


@pytest.fixture(scope="module")
def priced(rstack: ReportingStack) -> tuple[list[TestPrice], list[ingest_pb2.UsageEvent], list[str]]:
    """~600 ingested events over the last three days, four keys, two priced models."""
    suffix = uuid.uuid4().hex[:6]
    start = recent(hours=72)
    prices = [
        TestPrice("testai", f"alpha-{suffix}", start - timedelta(days=30), "2.5", "10", "1.25", "3.75", "10", "0.04",
                  "0.0001", "0.000123456"),
        TestPrice("otherai", f"beta-{suffix}", start - timedelta(days=30), "0.15", "0.6", "0.075"),
    ]  # fmt: skip
    with rstack.http() as client:
        for price in prices:
            assert client.put("/api/admin/model-prices", json={"price": price.as_json()}).status_code == 200
    factory = EventFactory(seed=61, models=[(p.provider, p.model) for p in prices])
    events = factory.events(600, start, timedelta(hours=71))
    rstack.ingest(events)
    with rstack.db() as conn:
        conn.execute("UPDATE virtual_keys SET key_name = 'Key ' || left(key_id::text, 8) WHERE key_id = ANY(%s)",
                     (factory.keys,))  # fmt: skip
        conn.execute("UPDATE virtual_keys SET is_test = true WHERE key_id = %s", (factory.keys[3],))
    return prices, events, factory.keys


def when(event: ingest_pb2.UsageEvent) -> datetime:
    return event.event_time.ToDatetime(tzinfo=UTC)


def tokens(event: ingest_pb2.UsageEvent) -> int:
    return (
        event.input_tokens
        + event.output_tokens
        + event.cached_read_tokens
        + event.cache_write_tokens
        + event.reasoning_tokens
    )


def raw_totals(
    stack: ReportingStack, start: datetime, end: datetime, *, exclude_test_keys: bool = False
) -> tuple[int, int]:
    """Requests and cost (micro-units) of the raw events of a window: the ground truth."""
    with stack.db() as conn:
        row = conn.execute(
            """SELECT count(*), coalesce(sum(cost_micros), 0) FROM usage_events e
               WHERE event_time >= %s AND event_time < %s
                 AND NOT (%s AND key_id IN (SELECT key_id FROM virtual_keys WHERE is_test))""",
            (start, end, exclude_test_keys),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def usd(micros: int) -> str:
    return str((Decimal(micros) / MICRO).quantize(Decimal("0.000001")))


# ---------------------------------------------------------------------------------------------- unit
def test_schedule_fire_times_follow_the_local_clock() -> None:
    zone = "America/New_York"
    daily = Schedule("daily", datetime(2000, 1, 1, 9, 0).time(), zone)
    # 2024-03-10: DST starts in New York; 09:00 local is 13:00 UTC that day, 14:00 UTC the day before.
    assert daily.next_after(datetime(2024, 3, 9, 15, 0, tzinfo=UTC)) == datetime(2024, 3, 10, 13, 0, tzinfo=UTC)
    assert daily.latest_at_or_before(datetime(2024, 3, 10, 12, 59, tzinfo=UTC)) == datetime(
        2024, 3, 9, 14, 0, tzinfo=UTC
    )
    monthly = Schedule("monthly", datetime(2000, 1, 1, 0, 30).time(), "UTC", day_of_month=31)
    assert monthly.next_after(datetime(2024, 2, 1, tzinfo=UTC)) == datetime(2024, 2, 29, 0, 30, tzinfo=UTC)
    weekly = Schedule("weekly", datetime(2000, 1, 1, 8, 0).time(), "Europe/Paris", day_of_week=0)
    assert weekly.next_after(datetime(2024, 1, 1, 7, 0, tzinfo=UTC)) == datetime(2024, 1, 8, 7, 0, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------- validation
def _violations(response: httpx.Response) -> set[str]:
    assert response.status_code == 400, response.text
    body = response.json()
    fields = set()
    for detail in body["error"].get("details", []):
        for violation in detail.get("fieldViolations", []):
            fields.add(violation["field"])
    return fields


def test_invalid_requests_are_400_naming_the_field(rstack: ReportingStack) -> None:
    with rstack.http() as client:
        export = {"format": "csv", "period": "30d", "includeFields": ["timestamp", "colour"]}
        assert _violations(client.post("/api/admin/analytics/export", json=export)) == {"includeFields[1]"}
        bad = {"format": "xml", "period": "3w", "granularity": "weekly", "filters": {"virtualKeys": ["nope"]}}
        assert _violations(client.post("/api/admin/analytics/export", json=bad)) == {
            "format", "period", "granularity", "filters.virtualKeys[0]"
        }  # fmt: skip
        both = {"format": "json", "period": "7d", "start": "2024-01-01T00:00:00Z", "end": "2024-01-02T00:00:00Z"}
        assert "period" in _violations(client.post("/api/admin/analytics/export", json=both))
        billing = {"billingCycle": "2024-13", "groupBy": "team"}
        assert _violations(client.post("/api/admin/analytics/billing-export", json=billing)) == {
            "billingCycle", "groupBy"
        }  # fmt: skip
        report = {
            "reportName": "",
            "period": "30d",
            "format": "docx",
            "sections": [{"type": "summary", "metrics": ["vibes"]}, {"type": "breakdown", "groupBy": "colour"}],
            "schedule": {"frequency": "hourly", "timezone": "Mars/Olympus", "recipients": ["not-an-address"]},
        }
        assert _violations(client.post("/api/admin/analytics/reports", json=report)) == {
            "reportName", "format", "sections[0].metrics[0]", "sections[1].groupBy", "schedule.frequency",
            "schedule.timezone", "schedule.recipients[0]",
        }  # fmt: skip
        scheduled = {
            "reports": [
                {"name": "A", "schedule": "weekly", "time": "25:00", "timezone": "Nowhere/City", "period": "7d",
                 "recipients": ["ops@company.com"], "format": "pdf", "sections": ["summary", "gossip"]},
            ]
        }  # fmt: skip
        assert _violations(client.put("/api/admin/analytics/scheduled-reports", json=scheduled)) == {
            "reports[0].time", "reports[0].timezone", "reports[0].dayOfWeek", "reports[0].sections[1]"
        }  # fmt: skip
        hooks = {"enabled": True, "endpoints": [{"url": "ftp://x", "events": ["usage.deleted"],
                                                 "retryPolicy": {"maxRetries": 99, "retryDelay": 5000}}]}  # fmt: skip
        assert _violations(client.put("/api/admin/analytics/webhooks", json=hooks)) == {
            "endpoints[0].url", "endpoints[0].events[0]", "endpoints[0].retryPolicy.maxRetries"
        }  # fmt: skip
        for size in (0, 1001):  # 0 given is not "not given" (which means 100)
            batching = {"enabled": True, "batchSettings": {"enabled": True, "batchSize": size}}
            assert _violations(client.put("/api/admin/analytics/webhooks", json=batching)) == {
                "batchSettings.batchSize"
            }


# ---------------------------------------------------------------------------------------------- export
def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_large_export_streams_with_flat_memory_and_parses_back(rstack: ReportingStack) -> None:
    rows = 200_000
    key = str(uuid.uuid4())
    start = datetime(2023, 6, 1, tzinfo=UTC)
    with rstack.db() as conn:
        conn.execute("INSERT INTO virtual_keys (key_id, key_name) VALUES (%s, 'Bulk, \"quoted\" key')", (key,))
        with conn.cursor().copy(
            "COPY usage_events (event_time, request_id, key_id, provider, model, operation, input_tokens, "
            "output_tokens, latency_ms, http_status, cost_micros, cost_source) FROM STDIN"
        ) as copy:
            for n in range(rows):
                copy.write_row(
                    (start + timedelta(seconds=n * 5), f"bulk-{n}", key, "bulkai", f"m{n % 7}", "chat.completions",
                     n % 5000, n % 300, 10 + n % 900, 500 if n % 50 == 0 else 200, 17 * n + 3, "computed")
                )  # fmt: skip
    pid = rstack.reporting_pid()
    baseline = _rss_kb(pid)
    peak = baseline
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
        "start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "end": (start + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "granularity": "raw",
        "filters": {"virtualKeys": [key]},
    }
    received = 0
    with tempfile.TemporaryFile("w+b") as sink, rstack.http() as client:
        with client.stream("POST", "/api/admin/analytics/export", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/csv")
            assert 'filename="usage-raw-' in response.headers["content-disposition"]
            for chunk in response.iter_bytes():
                sink.write(chunk)
                received += len(chunk)
        done.set()
        sampler.join()
        sink.seek(0)
        reader = csv.DictReader(io.TextIOWrapper(sink, encoding="utf-8", newline=""))
        count = 0
        for n, row in enumerate(reader):
            expected_time = start + timedelta(seconds=n * 5)
            assert row["timestamp"] == expected_time.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
            assert row["virtual_key_id"] == key
            assert row["virtual_key_name"] == 'Bulk, "quoted" key'
            assert row["model"] == f"m{n % 7}"
            assert int(row["tokens"]) == n % 5000 + n % 300
            assert row["cost"] == usd(17 * n + 3)
            assert Decimal(row["latency"]) * 1000 == 10 + n % 900  # seconds, as the analytics answers
            assert int(row["errors"]) == (1 if n % 50 == 0 else 0)
            count += 1
        assert count == rows
    growth_mb = (peak - baseline) / 1024
    # The export is ~25 MB; the service holds at most a few chunks of it at any moment.
    assert received > 20 * 1024 * 1024
    assert growth_mb < 15, f"reporting RSS grew by {growth_mb:.1f} MB while streaming {received / 1e6:.1f} MB"


def test_exports_in_every_format_match_the_events(
    rstack: ReportingStack, priced: tuple[list[TestPrice], list[ingest_pb2.UsageEvent], list[str]]
) -> None:
    prices, events, keys = priced
    start = min(when(e) for e in events).replace(minute=0, second=0, microsecond=0)
    end = max(when(e) for e in events) + timedelta(hours=1)
    chosen = [keys[0], keys[1]]
    wanted = [e for e in events if e.virtual_key_id in chosen and e.provider == "testai"]
    expected_cost = sum(expected_cost_micros(e, prices) or 0 for e in wanted)
    window = {"start": start.strftime("%Y-%m-%dT%H:%M:%SZ"), "end": end.strftime("%Y-%m-%dT%H:%M:%SZ")}
    filters = {"virtualKeys": chosen, "providers": ["testai"]}
    with rstack.http() as client:
        raw = client.post("/api/admin/analytics/export", json={"format": "ndjson", **window, "filters": filters})
        assert raw.status_code == 200
        assert raw.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in raw.text.splitlines()]
        assert len(lines) == len(wanted)
        assert sum(Decimal(str(line["cost"])) for line in lines) * MICRO == expected_cost
        assert sum(Decimal(str(line["latency"])) for line in lines) * 1000 == sum(e.latency_ms for e in wanted)
        assert sorted(line["timestamp"] for line in lines) == [line["timestamp"] for line in lines]
        for granularity in ("hourly", "daily"):
            body = {"format": "json", "granularity": granularity, **window, "filters": filters,
                    "includeFields": ["timestamp", "virtual_key_id", "requests", "tokens", "cost",
                                      "errors"]}  # fmt: skip
            response = client.post("/api/admin/analytics/export", json=body)
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            rows = response.json()
            assert set(rows[0]) == {"timestamp", "virtual_key_id", "requests", "tokens", "cost", "errors"}
            assert sum(r["requests"] for r in rows) == len(wanted)
            assert sum(r["tokens"] for r in rows) == sum(tokens(e) for e in wanted)
            assert sum(Decimal(str(r["cost"])) for r in rows) * MICRO == expected_cost
            assert sum(r["errors"] for r in rows) == sum(1 for e in wanted if e.http_status >= 400)
        # The seed's body, verbatim (minCost keeps hourly rows costing at least $1.00).
        seed = {
            "format": "csv",
            "period": "30d",
            "granularity": "hourly",
            "includeFields": ["timestamp", "virtual_key_id", "virtual_key_name", "provider", "model", "operation",
                              "requests", "tokens", "cost", "latency", "errors"],
            "filters": {"virtualKeys": [keys[0]], "providers": ["openai", "anthropic", "testai"], "minCost": 1.00},
        }  # fmt: skip
        response = client.post("/api/admin/analytics/export", json=seed)
        assert response.status_code == 200
        assert response.text.startswith("timestamp,virtual_key_id,virtual_key_name,provider,model,")
        assert all(Decimal(r["cost"]) >= 1 for r in csv.DictReader(io.StringIO(response.text)))
        cheaper = {**seed, "granularity": "daily", "filters": {**seed["filters"], "minCost": 0.05}}  # type: ignore[dict-item]
        rows = list(csv.DictReader(io.StringIO(client.post("/api/admin/analytics/export", json=cheaper).text)))
        assert rows and all(Decimal(r["cost"]) >= Decimal("0.05") for r in rows)
        assert {r["virtual_key_name"] for r in rows} == {f"Key {keys[0][:8]}"}


# ---------------------------------------------------------------------------------------------- billing
def test_billing_export_reconciles_and_taxes_inclusive_and_exclusive(
    rstack: ReportingStack, priced: tuple[list[TestPrice], list[ingest_pb2.UsageEvent], list[str]]
) -> None:
    prices, events, keys = priced
    with rstack.db() as conn:
        conn.execute(
            """INSERT INTO billing_entities (entity_id, name, tax_name, tax_rate, tax_inclusive) VALUES
               ('default', 'Company', 'VAT', 0.2, false), ('eu', 'EU subsidiary', 'MwSt', 0.19, true)
               ON CONFLICT DO NOTHING"""
        )
        conn.execute("INSERT INTO billing_entity_keys (key_id, entity_id) VALUES (%s, 'eu')", (keys[1],))
    cycle = max(when(e) for e in events).strftime("%Y-%m")
    month_start = datetime.strptime(cycle + "-01", "%Y-%m-%d").replace(tzinfo=UTC)
    in_cycle = [e for e in events if when(e) >= month_start]
    body = {"format": "json", "period": "monthly", "billingCycle": cycle, "groupBy": "virtual_key",
            "includeMetadata": True, "includeTaxCalculations": True}  # fmt: skip
    with rstack.http() as client:
        first = client.post("/api/admin/analytics/billing-export", json=body)
        second = client.post("/api/admin/analytics/billing-export", json=body)
        by_model = client.post("/api/admin/analytics/billing-export", json={**body, "groupBy": "model"})
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "application/json"
    assert f"billing-{cycle}-virtual_key.json" in first.headers["content-disposition"]
    assert first.content == second.content  # reproducible
    document = first.json()
    with rstack.db() as conn:
        rollup = conn.execute(
            "SELECT sum(cost_micros), sum(requests) FROM usage_rollup_daily WHERE bucket >= %s AND bucket < %s",
            (month_start, month_start + timedelta(days=32)),
        ).fetchone()
    assert rollup is not None
    expected = {
        key: sum(expected_cost_micros(e, prices) or 0 for e in in_cycle if e.virtual_key_id == key) for key in keys
    }
    assert Decimal(document["totals"]["cost"]) * MICRO == sum(expected.values()) == rollup[0]
    assert document["totals"]["requests"] == len(in_cycle) == rollup[1]
    assert Decimal(by_model.json()["totals"]["cost"]) == Decimal(document["totals"]["cost"])
    net = tax = gross = 0
    for item in document["lineItems"]:
        key = item["virtualKeyId"]
        cost = expected[key]
        assert Decimal(item["cost"]) * MICRO == cost
        if key == keys[1]:  # inclusive 19%: the tax is inside the cost
            line_tax = int((Decimal(cost) * Decimal("0.19") / Decimal("1.19")).quantize(Decimal(1), ROUND_HALF_EVEN))
            assert (item["tax"]["net"], item["tax"]["tax"], item["tax"]["gross"]) == (
                usd(cost - line_tax), usd(line_tax), usd(cost)
            )  # fmt: skip
            assert item["tax"]["lines"][0]["inclusive"] is True
            assert item["metadata"]["billingEntity"] == "eu"
        else:  # exclusive 20%: added on top
            line_tax = int((Decimal(cost) * Decimal("0.2")).quantize(Decimal(1), ROUND_HALF_EVEN))
            assert (item["tax"]["net"], item["tax"]["tax"], item["tax"]["gross"]) == (
                usd(cost), usd(line_tax), usd(cost + line_tax)
            )  # fmt: skip
        net += int(Decimal(item["tax"]["net"]) * MICRO)
        tax += int(Decimal(item["tax"]["tax"]) * MICRO)
        gross += int(Decimal(item["tax"]["gross"]) * MICRO)
    assert (document["totals"]["net"], document["totals"]["tax"], document["totals"]["gross"]) == (
        usd(net), usd(tax), usd(gross)
    )  # fmt: skip
    assert {t["entityId"] for t in document["taxSummary"]} == {"default", "eu"}


# ---------------------------------------------------------------------------------------------- webhooks
def _verify(received: Any, secret: str) -> None:
    signature = sign_webhook(secret, received.headers["webhook-id"], int(received.headers["webhook-timestamp"]),
                             received.body)  # fmt: skip
    assert received.headers["webhook-signature"] == signature


def test_webhooks_survive_a_receiver_outage_and_dead_letters_replay(
    rstack: ReportingStack, priced: tuple[list[TestPrice], list[ingest_pb2.UsageEvent], list[str]]
) -> None:
    prices, _events, keys = priced
    receiver = HttpReceiver()  # not started yet: connection refused
    failing = HttpReceiver(status=500)
    failing.start()
    config = {
        "enabled": True,
        "endpoints": [
            {
                "url": receiver.url + "/conduit",
                "events": ["usage.recorded", "cost.calculated", "budget.exceeded"],
                "authentication": {"type": "bearer", "token": "webhook-auth-token"},
                "retryPolicy": {"maxRetries": 12, "retryDelay": 200},
                "secret": SECRET,
            },
            {
                "url": failing.url + "/failing",
                "events": ["cost.calculated"],
                "retryPolicy": {"maxRetries": 1, "retryDelay": 100},
            },
        ],
        "batchSettings": {"enabled": True, "batchSize": 40, "flushInterval": 1},
    }
    try:
        with rstack.http() as client:
            stored = client.put("/api/admin/analytics/webhooks", json=config)
            assert stored.status_code == 200, stored.text
            data = stored.json()["data"]
            assert data["endpoints"][0]["secret"] == "whsec_****" + SECRET[-4:]
            assert data["endpoints"][0]["authentication"]["token"] == "****oken"
            assert data["endpoints"][1]["secret"].startswith("whsec_****")
            got = client.get("/api/admin/analytics/webhooks").json()["data"]
            assert got == data
            assert "webhook-auth-token" not in json.dumps(got) and SECRET not in json.dumps(got)
            # Re-sending what GET returned keeps the secrets.
            assert client.put("/api/admin/analytics/webhooks", json=got).json()["data"] == data
            failing_id = data["endpoints"][1]["id"]

            factory = EventFactory(seed=77, keys=[keys[0]], models=[(p.provider, p.model) for p in prices])
            new_events = factory.events(100, recent(hours=2), timedelta(hours=1))
            rstack.ingest(new_events)
            priced_count = sum(1 for e in new_events if expected_cost_micros(e, prices) is not None)

            def failed_attempts() -> bool:
                page = client.get("/api/admin/analytics/webhooks/deliveries",
                                  params={"endpointId": data["endpoints"][0]["id"]}).json()["data"]  # fmt: skip
                return any(d["attempts"] >= 1 and d["status"] == "pending" for d in page["deliveries"])

            wait_until(failed_attempts, timeout=60)
            receiver.start()
            expected_ids = len(new_events) + priced_count

            def all_received() -> set[str]:
                ids: set[str] = set()
                seen_ids: set[str] = set()
                for r in receiver.on_path("/conduit"):
                    if r.headers["webhook-id"] in seen_ids:  # the receiver's idempotency check
                        continue
                    seen_ids.add(r.headers["webhook-id"])
                    ids.update(e["id"] for e in r.json()["data"]["events"])
                return ids if len(ids) >= expected_ids else set()

            ids = wait_until(all_received, timeout=90)
            assert len(ids) == expected_ids
            for r in receiver.on_path("/conduit"):
                _verify(r, SECRET)
                assert r.headers["authorization"] == "Bearer webhook-auth-token"
                assert r.json()["type"] == "batch" and len(r.json()["data"]["events"]) <= 40
            request_ids = {e.request_id for e in new_events}
            recorded = [e for r in receiver.on_path("/conduit") for e in r.json()["data"]["events"]
                        if e["type"] == "usage.recorded"]  # fmt: skip
            assert {e["data"]["requestId"] for e in recorded} == request_ids

            def dead() -> list[dict[str, Any]]:
                page = client.get("/api/admin/analytics/webhooks/deliveries",
                                  params={"status": "dead_lettered",
                                          "endpointId": failing_id}).json()["data"]  # fmt: skip
                return list(page["deliveries"])

            dead_letters = wait_until(dead, timeout=60)
            assert all(d["attempts"] == 2 and d["lastStatusCode"] == 500 for d in dead_letters)
            failing.status = 200
            delivery_id = dead_letters[0]["deliveryId"]
            replay = client.post(f"/api/admin/analytics/webhooks/deliveries/{delivery_id}/replay", json={})
            assert replay.status_code == 200, replay.text
            assert replay.json()["data"]["status"] == "pending"

            def delivered() -> bool:
                page = client.get("/api/admin/analytics/webhooks/deliveries",
                                  params={"endpointId": failing_id}).json()["data"]  # fmt: skip
                return any(d["deliveryId"] == delivery_id and d["status"] == "delivered" for d in page["deliveries"])

            wait_until(delivered, timeout=30)
            replayed = [r for r in failing.on_path("/failing") if r.headers["webhook-id"] == delivery_id]
            assert len(replayed) == 3  # two attempts, then the replay, all with the same webhook-id
            again = client.post(f"/api/admin/analytics/webhooks/deliveries/{delivery_id}/replay", json={})
            assert again.status_code == 400  # FAILED_PRECONDITION: it is no longer dead-lettered
            assert client.post("/api/admin/analytics/webhooks/deliveries/msg_nope/replay", json={}).status_code == 404
            assert client.put("/api/admin/analytics/webhooks", json={"enabled": False}).status_code == 200
    finally:
        receiver.stop()
        failing.stop()


# ---------------------------------------------------------------------------------------------- reports
def _nonblank_pdf(pdf: bytes) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "report.pdf"
        path.write_bytes(pdf)
        subprocess.run(["pdftoppm", "-png", "-r", "40", "-f", "1", "-l", "1", str(path), str(Path(folder) / "page")],
                       check=True)  # fmt: skip
        (page,) = Path(folder).glob("page*.png")
        with Image.open(page) as image:
            dark = sum(image.convert("L").histogram()[:200])
    assert dark > 500, "the first page is blank"


def test_custom_report_in_the_seed_shape_runs_and_downloads(
    rstack: ReportingStack, priced: tuple[list[TestPrice], list[ingest_pb2.UsageEvent], list[str]]
) -> None:
    prices, events, keys = priced
    seed = {
        "reportName": "Monthly Executive Summary",
        "period": "30d",
        "sections": [
            {"type": "summary", "metrics": ["total_cost", "total_requests", "unique_users"]},
            {"type": "breakdown", "groupBy": "provider", "metrics": ["cost", "requests", "latency"]},
            {"type": "trends", "granularity": "daily", "metrics": ["cost", "requests"]},
            {"type": "top_items", "category": "virtual_keys", "sortBy": "cost", "limit": 10},
        ],
        "filters": {"excludeTestKeys": True, "minCost": 10.00},
        "schedule": {
            "frequency": "monthly",
            "dayOfMonth": 1,
            "recipients": ["admin@company.com", "finance@company.com"],
        },
    }
    with rstack.http() as client:
        created = client.post("/api/admin/analytics/reports", json=seed)
        assert created.status_code == 200, created.text
        report = created.json()["data"]
        run = report["latestRun"]
        assert run["status"] == "succeeded", run
        assert run["trigger"] == "on_demand" and run["format"] == "pdf"
        assert report["schedule"]["frequency"] == "monthly" and report["nextRunAt"]
        output = client.get(f"/api/admin/analytics/reports/{report['reportId']}/runs/{run['runId']}/output")
        assert output.status_code == 200
        assert output.headers["content-type"] == "application/pdf"
        assert run["filename"] in output.headers["content-disposition"]
        _nonblank_pdf(output.content)
        as_json = client.post("/api/admin/analytics/reports", json={**seed, "format": "json", "schedule": None})
        assert as_json.status_code == 200, as_json.text
        json_run = as_json.json()["data"]["latestRun"]
        document = client.get(
            f"/api/admin/analytics/reports/{as_json.json()['data']['reportId']}/runs/{json_run['runId']}/output"
        ).json()
        window_start = datetime.fromisoformat(json_run["windowStart"].replace("Z", "+00:00"))
        window_end = datetime.fromisoformat(json_run["windowEnd"].replace("Z", "+00:00"))
        count, cost = raw_totals(rstack, window_start, window_end, exclude_test_keys=True)
        assert document["totals"]["requests"] == count
        assert Decimal(document["totals"]["cost"]) * MICRO == cost
        counted = [e for e in events if when(e) >= window_start and e.virtual_key_id != keys[3]]
        assert cost >= sum(expected_cost_micros(e, prices) or 0 for e in counted) > 0
        top = next(s for s in document["sections"] if s["type"] == "top_items")
        assert all(Decimal(row[1]) >= 10 for row in top["rows"])
        listed = client.get("/api/admin/analytics/reports").json()["data"]["reports"]
        assert {r["reportId"] for r in listed} >= {report["reportId"], as_json.json()["data"]["reportId"]}
        runs = client.get(f"/api/admin/analytics/reports/{report['reportId']}/runs").json()["data"]["runs"]
        assert [r["runId"] for r in runs] == [run["runId"]]
        assert client.get(f"/api/admin/analytics/reports/{uuid.uuid4()}").status_code == 404


# ---------------------------------------------------------------------------------------------- scheduled
SEED_SCHEDULED = {
    "reports": [
        {"name": "Daily Operations Report", "schedule": "daily", "time": "09:00", "timezone": "UTC", "period": "24h",
         "recipients": ["ops@company.com"], "format": "pdf", "sections": ["summary", "alerts", "top_usage"]},
        {"name": "Weekly Cost Analysis", "schedule": "weekly", "dayOfWeek": "monday", "time": "08:00", "period": "7d",
         "recipients": ["finance@company.com"], "format": "excel",
         "sections": ["cost_breakdown", "trends", "forecasts"]},
    ]
}  # fmt: skip


def _runs(stack: ReportingStack, report_id: str) -> list[dict[str, Any]]:
    with stack.http() as client:
        response = client.get(f"/api/admin/analytics/reports/{report_id}/runs")
        assert response.status_code == 200
        return list(response.json()["data"]["runs"])


def _mail_for(stack: ReportingStack, name: str) -> list[EmailMessage]:
    return [m for m in stack.smtp.collector.messages if name in str(m["Subject"])]


def test_scheduled_reports_fire_in_their_timezone_once_with_two_replicas_and_after_a_restart(
    rstack: ReportingStack, priced: tuple[list[TestPrice], list[ingest_pb2.UsageEvent], list[str]]
) -> None:
    _prices, events, _keys = priced
    with rstack.http() as client:
        stored = client.put("/api/admin/analytics/scheduled-reports", json=SEED_SCHEDULED)
        assert stored.status_code == 200, stored.text
        again = client.put("/api/admin/analytics/scheduled-reports", json=SEED_SCHEDULED)
        assert again.json()["data"] == stored.json()["data"]  # idempotent by name
        listed = client.get("/api/admin/analytics/scheduled-reports").json()["data"]["reports"]
        assert [r["name"] for r in listed] == ["Daily Operations Report", "Weekly Cost Analysis"]
        assert listed[1]["dayOfWeek"] == "monday" and listed[1]["format"] == "excel" and listed[0]["nextRunAt"]

    replica = rstack.start_replica("reporting-2")
    zone = ZoneInfo("Asia/Kolkata")  # UTC+05:30
    fire = (datetime.now(UTC) + timedelta(seconds=8)).astimezone(zone).replace(microsecond=0)
    local_time = fire.strftime("%H:%M:%S")
    weekday = fire.strftime("%A").lower()
    body = {
        "reports": [
            {**SEED_SCHEDULED["reports"][0], "name": "Ops Kolkata", "time": local_time, "timezone": "Asia/Kolkata",
             "period": "72h", "recipients": ["ops@company.com"]},
            {**SEED_SCHEDULED["reports"][1], "name": "Cost Kolkata", "time": local_time, "timezone": "Asia/Kolkata",
             "dayOfWeek": weekday, "period": "72h"},
        ]
    }  # fmt: skip
    with rstack.http() as client:
        response = client.put("/api/admin/analytics/scheduled-reports", json=body)
        assert response.status_code == 200, response.text
        ops, cost = response.json()["data"]["reports"]
    assert datetime.fromisoformat(ops["nextRunAt"].replace("Z", "+00:00")) == fire.astimezone(UTC)

    wait_until(lambda: len(_mail_for(rstack, "Ops Kolkata")) >= 1 and len(_mail_for(rstack, "Cost Kolkata")) >= 1,
               timeout=90)  # fmt: skip
    time.sleep(2)  # let a duplicate, if any, show up
    for report in (ops, cost):
        runs = _runs(rstack, report["reportId"])
        assert len(runs) == 1, runs
        assert runs[0]["status"] == "succeeded" and runs[0]["trigger"] == "schedule"
        assert datetime.fromisoformat(runs[0]["scheduledFor"].replace("Z", "+00:00")) == fire.astimezone(UTC)
    assert len(_mail_for(rstack, "Ops Kolkata")) == 1 and len(_mail_for(rstack, "Cost Kolkata")) == 1

    (pdf_mail,) = _mail_for(rstack, "Ops Kolkata")
    (pdf,) = [part for part in pdf_mail.iter_attachments() if part.get_content_type() == "application/pdf"]
    _nonblank_pdf(pdf.get_content())
    (xlsx_mail,) = _mail_for(rstack, "Cost Kolkata")
    (sheet_part,) = list(xlsx_mail.iter_attachments())
    assert str(sheet_part.get_filename()).endswith(".xlsx")
    from openpyxl import load_workbook

    workbook = load_workbook(io.BytesIO(sheet_part.get_content()))
    totals = {row[0]: row[1] for row in workbook["Summary"].iter_rows(values_only=True) if row and row[0]}
    window_end = fire.astimezone(UTC)
    count, cost = raw_totals(rstack, window_end - timedelta(hours=72), window_end)
    assert totals["Total requests"] == count >= len(events)
    assert round(Decimal(str(totals["Total cost (USD)"])) * MICRO) == cost
    assert "Cost by provider" in workbook.sheetnames

    # Restart: both replicas down across the next fire, then up: it runs once (catch-up), never twice.
    fire2 = (datetime.now(UTC) + timedelta(seconds=6)).astimezone(zone).replace(microsecond=0)
    body["reports"][0]["time"] = fire2.strftime("%H:%M:%S")
    with rstack.http() as client:
        assert client.put("/api/admin/analytics/scheduled-reports", json=body).status_code == 200
    replica.stop_all()
    rstack.suite.stop("reporting")
    while datetime.now(UTC) < fire2 + timedelta(seconds=1):
        time.sleep(0.2)
    for _ in range(2):
        rstack.suite.start_service(ServiceName.REPORTING)
        wait_until(lambda: len(_runs(rstack, ops["reportId"])) >= 2, timeout=60)
        time.sleep(1)
        rstack.suite.stop("reporting")
    rstack.suite.start_service(ServiceName.REPORTING)
    runs = _runs(rstack, ops["reportId"])
    assert len(runs) == 2, runs
    assert runs[0]["trigger"] == "catch_up"
    assert datetime.fromisoformat(runs[0]["scheduledFor"].replace("Z", "+00:00")) == fire2.astimezone(UTC)
    wait_until(lambda: len(_mail_for(rstack, "Ops Kolkata")) == 2, timeout=60)
