"""Re-rating after a price correction: exactly the affected events change, and rollups, budget
counters and the raw events agree afterwards."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import redis

from tally.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tally.runtime.config import ServiceName
from tally.usage import live
from tests.conftest import Stack
from tests.test_ingest import narrow_rollup_mismatches, rollup_mismatches
from tests.usage_support import EventFactory, TestPrice, expected_cost_micros


def wait_for_job(stack: Stack, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    with stack.http() as client:
        while True:
            job: dict[str, Any] = client.get(f"/api/admin/analytics/recalculate-costs/{job_id}").json()["data"]
            if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
                return job
            time.sleep(0.2)


def test_recalculation_after_a_price_correction(stack: Stack) -> None:
    model = f"rerate-{uuid.uuid4().hex[:8]}"
    day0 = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=3)
    wrong = TestPrice("testai", model, day0 - timedelta(days=30), "2", "8")
    right = TestPrice("testai", model, day0 - timedelta(days=30), "2.5", "10", per_request="0.0001")
    factory = EventFactory(seed=21, models=[("testai", model), ("testai", f"unpriced-{model}")])
    key, other_key = factory.keys[0], factory.keys[1]
    with stack.http() as client:
        assert client.put("/api/admin/model-prices", json={"price": wrong.as_json()}).status_code == 200
        assert (
            client.put(
                f"/api/admin/virtual-keys/{key}/budget", json={"maxBudget": 100000, "period": "total"}
            ).status_code
            == 200
        )
    in_range = [
        factory.event(day0 + timedelta(hours=h, minutes=m), virtual_key_id=key) for h in range(0, 48) for m in (5, 35)
    ]
    outside = [factory.event(day0 + timedelta(days=2, hours=h), virtual_key_id=key) for h in range(1, 10)]
    other = [factory.event(day0 + timedelta(hours=h), virtual_key_id=other_key) for h in range(0, 20)]
    reported = [
        factory.event(
            day0 + timedelta(hours=3), virtual_key_id=key, model=model, provider="testai", provider_cost_micros=777
        )
    ]
    events = in_range + outside + other + reported
    with stack.channel(ServiceName.INGEST) as channel:
        reply = ingest_pb2_grpc.IngestServiceStub(channel).RecordUsageBatch(
            ingest_pb2.RecordUsageBatchRequest(events=events), timeout=60, metadata=stack.auth()
        )
    assert reply.data.accepted == len(events)
    # Ingest hands spend to the budget service about half a second after commit; re-rate only after
    # that landed (a rebuild racing an in-flight hand-off can count it twice: a known limit).
    settled = sum(expected_cost_micros(e, [wrong]) or 0 for e in events if e.virtual_key_id == key)
    deadline = time.monotonic() + 20
    with stack.http() as client:
        while time.monotonic() < deadline:
            spend = client.get(f"/api/admin/virtual-keys/{key}/budget").json()["data"]["currentSpend"]
            if round(spend * 1_000_000) == settled:
                break
            time.sleep(0.2)
    assert round(spend * 1_000_000) == settled

    # The correction, and a price for the model that had none.
    with stack.http() as client:
        assert client.put("/api/admin/model-prices", json={"price": right.as_json()}).status_code == 200
        newly_priced = TestPrice("testai", f"unpriced-{model}", day0 - timedelta(days=1), "1", "1")
        assert client.put("/api/admin/model-prices", json={"price": newly_priced.as_json()}).status_code == 200
        body = {
            "startDate": day0.date().isoformat(),
            "endDate": (day0 + timedelta(days=1)).date().isoformat(),
            "virtualKeys": [key],
        }
        live_redis = redis.Redis.from_url(stack.redis.url)
        live_redis.set(live.FLOOR_KEY, 0)
        first = client.post("/api/admin/analytics/recalculate-costs", json=body)
        bad = client.post("/api/admin/analytics/recalculate-costs", json={"startDate": "2024-02-30", "endDate": "x"})
    assert first.status_code == 200, first.text
    assert bad.status_code == 400
    assert {v["field"] for v in bad.json()["error"]["details"][0]["fieldViolations"]} == {"startDate", "endDate"}
    job = wait_for_job(stack, first.json()["data"]["jobId"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1
    # The live counters of the re-rated events' buckets are no longer taken as complete.
    last = max(e.event_time.ToDatetime(tzinfo=UTC) for e in in_range)
    assert int(live_redis.get(live.FLOOR_KEY) or 0) >= int(last.timestamp() * 1000)

    old_prices, new_prices = [wrong], [right, newly_priced]
    expected_changed = [
        e for e in in_range if expected_cost_micros(e, old_prices) != expected_cost_micros(e, new_prices)
    ]
    assert job["eventsScanned"] == len(in_range)
    assert job["eventsChanged"] == len(expected_changed)
    assert round(job["costBefore"] * 1_000_000) == sum(expected_cost_micros(e, old_prices) or 0 for e in in_range)
    assert round(job["costAfter"] * 1_000_000) == sum(expected_cost_micros(e, new_prices) or 0 for e in in_range)

    with psycopg.connect(stack.postgres.url, password=stack.postgres.password) as conn:
        rows = conn.execute(
            "SELECT request_id, cost_micros FROM usage_events WHERE key_id = ANY(%s::uuid[])", (factory.keys,)
        ).fetchall()
    stored: dict[str, int | None] = {str(r[0]): r[1] for r in rows}
    for event in in_range:
        assert stored[event.request_id] == expected_cost_micros(event, new_prices)
    for event in outside + other:  # outside the dates or the keys: untouched
        assert stored[event.request_id] == expected_cost_micros(event, old_prices)
    assert stored[reported[0].request_id] == 777
    assert rollup_mismatches(stack, "usage_rollup_hourly", "1 hour") == []
    assert rollup_mismatches(stack, "usage_rollup_daily", "1 day") == []
    assert narrow_rollup_mismatches(stack) == []

    # Budget counters follow: the key's total-period spend equals the events' costs.
    with stack.http() as client:
        budget = client.get(f"/api/admin/virtual-keys/{key}/budget").json()["data"]
        again = client.post("/api/admin/analytics/recalculate-costs", json=body).json()["data"]
    expected_spend = sum((stored[e.request_id] or 0) for e in in_range + outside + reported)
    assert round(budget["currentSpend"] * 1_000_000) == expected_spend
    rerun = wait_for_job(stack, again["jobId"])
    assert rerun["status"] == "succeeded"
    assert rerun["eventsChanged"] == 0  # idempotent
