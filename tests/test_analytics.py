"""Analytics against a private suite (its own database and Redis, TIMEZONE=Asia/Tokyo): every
endpoint's numbers are checked against an independent computation from the generated events."""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import httpx
import pytest
import redis

from services.analytics import model
from services.analytics.reads import AnalyticsReads, forecast_candidates
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.devstack import Postgres, Redis, Suite
from tally.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tally.usage import live
from tally.usage.histogram import UPPER_BOUNDS_MS, bucket_of
from tests.conftest import private_suite
from tests.usage_support import EventFactory, TestPrice, expected_cost_micros

ZONE = ZoneInfo("Asia/Tokyo")
SFX = uuid.uuid4().hex[:6]
ALPHA, BETA = f"alpha{SFX}", f"beta{SFX}"
BIG, SMALL = f"big-{SFX}", f"small-{SFX}"


@dataclass
class AnalyticsStack:
    env: dict[str, str]
    suite: Suite

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.env['GATEWAY_PORT']}",
            headers={"Authorization": f"Bearer {self.env['ADMIN_MASTER_KEY']}"},
            timeout=60,
        )

    def get(self, path: str, **params: str) -> dict[str, Any]:
        with self.http() as client:
            response = client.get(f"/api/admin{path}", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["success"] is True
        data: dict[str, Any] = body["data"]
        return data

    def error(self, path: str, method: str = "GET", **kwargs: Any) -> httpx.Response:
        with self.http() as client:
            return client.request(method, f"/api/admin{path}", **kwargs)


@pytest.fixture(scope="module")
def astack(infra: tuple[Postgres, Redis, Path]) -> Iterator[AnalyticsStack]:
    extra = {"TIMEZONE": "Asia/Tokyo", "INGEST_LATE_WINDOW_SECONDS": str(40 * 86400)}
    with private_suite(infra, "analytics", extra) as (env, suite, _root):
        yield AnalyticsStack(env, suite)


# ------------------------------------------------------------------------------------ the dataset
PRICES = [
    TestPrice(ALPHA, BIG, datetime(2020, 1, 1, tzinfo=UTC), "30", "60", "15", "37.5", "60", "0.04", "0.006", "0.0001"),
    TestPrice(ALPHA, SMALL, datetime(2020, 1, 1, tzinfo=UTC), "0.5", "1.5", "0.25", "0.5", "1.5"),
    TestPrice(BETA, BIG, datetime(2020, 1, 1, tzinfo=UTC), "20", "40", "10", "25", "40", "0.03", "0.004"),
]


@dataclass
class Dataset:
    events: list[ingest_pb2.UsageEvent]  # every accepted event
    current: list[ingest_pb2.UsageEvent]  # inside the 7d window (with margins of 2 h)
    previous: list[ingest_pb2.UsageEvent]  # inside the preceding 7d window
    keys: list[str]
    budget_key: str
    budget_set: bool


def at(event: ingest_pb2.UsageEvent) -> datetime:
    return event.event_time.ToDatetime(tzinfo=UTC)


def cost(event: ingest_pb2.UsageEvent) -> int:
    return expected_cost_micros(event, PRICES) or 0


def tokens(e: ingest_pb2.UsageEvent) -> int:
    return e.input_tokens + e.output_tokens + e.cached_read_tokens + e.cache_write_tokens + e.reasoning_tokens


def failed(e: ingest_pb2.UsageEvent) -> bool:
    return e.http_status >= 400


def micros(usd: float) -> int:
    return round(usd * 1_000_000)


@pytest.fixture(scope="module")
def dataset(astack: AnalyticsStack) -> Dataset:
    with astack.http() as client:
        for price in PRICES:
            assert client.put("/api/admin/model-prices", json={"price": price.as_json()}).status_code == 200
    factory = EventFactory(seed=505, models=[(ALPHA, BIG), (ALPHA, SMALL), (BETA, BIG)])
    factory.keys = [str(uuid.UUID(int=factory.rng.getrandbits(128))) for _ in range(6)]
    now = datetime.now(UTC)
    current = factory.events(2400, now - timedelta(days=7) + timedelta(hours=2), timedelta(days=7, hours=-4))
    previous = factory.events(900, now - timedelta(days=14) + timedelta(hours=2), timedelta(days=7, hours=-4))
    live_events = [factory.event(now - timedelta(seconds=factory.rng.uniform(0, 3))) for _ in range(120)]
    current += live_events
    # A spike: 400 requests in one hour three days ago (for the anomaly detector).
    spike_hour = (now - timedelta(days=3)).replace(minute=0, second=0, microsecond=0)
    current += [factory.event(spike_hour + timedelta(seconds=factory.rng.uniform(0, 3599))) for _ in range(400)]
    events = current + previous
    with grpc.insecure_channel(astack.env["INGEST_ADDRESS"]) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        auth = [("authorization", f"Bearer {astack.env['ADMIN_MASTER_KEY']}")]
        for start in range(0, len(events), 1000):
            reply = stub.RecordUsageBatch(
                ingest_pb2.RecordUsageBatchRequest(events=events[start : start + 1000]), timeout=60, metadata=auth
            )
            assert reply.data.rejected == 0, [r for r in reply.data.results if r.status == "rejected"][:3]
    budget_key = factory.keys[0]
    with astack.http() as client:
        client.put(f"/api/admin/virtual-keys/{budget_key}", json={"keyName": "Production API Key"})
        budget = client.put(
            f"/api/admin/virtual-keys/{budget_key}/budget", json={"maxBudget": 5000.0, "period": "monthly"}
        )
    time.sleep(1.5)  # live counters are flushed every 0.5 s after commit
    return Dataset(events, current, previous, factory.keys, budget_key, budget.status_code == 200)


# ------------------------------------------------------------------------------------ empty database
def test_empty_database_gives_well_formed_zeros(astack: AnalyticsStack) -> None:
    live = astack.get("/analytics/usage/live")
    assert live["realTimeMetrics"]["requestsToday"] == 0
    assert live["topVirtualKeys"] == [] and live["providerDistribution"] == {}
    trends = astack.get("/analytics/usage/trends", period="7d", granularity="day")
    assert trends["totalDataPoints"] == 7 and len(trends["timeline"]) == 7
    assert trends["metrics"]["totalRequests"] == 0 and trends["trends"]["requestGrowth"] == 0
    assert all(p["requests"] == 0 and p["errorRate"] == 0 for p in trends["timeline"])
    providers = astack.get("/providers/analytics", period="30d")
    assert providers["totalRequests"] == 0 and providers["providers"] == {}
    performance = astack.get("/analytics/performance", period="7d")
    assert performance["overall"]["requests"] == 0 and performance["overall"]["latency"]["p50"] == 0
    patterns = astack.get("/analytics/patterns", period="30d", analysis="detailed")
    assert patterns["patterns"]["temporalPatterns"]["peakHours"] == []
    assert patterns["patterns"]["usageDistribution"]["powerUsers"]["count"] == 0
    optimization = astack.get("/analytics/cost-optimization", period="30d")
    assert optimization["totalCost"] == 0 and optimization["recommendations"] == []
    forecast = astack.get("/analytics/budget-forecast", horizon="90d")
    assert forecast["globalForecast"]["projectedSpend"] == 0 and forecast["keyForecasts"] == []
    metrics = astack.get("/analytics/performance-metrics")
    assert "GetUsageTrends" in metrics["endpoints"]


def test_bad_parameters_are_400s_naming_the_field(astack: AnalyticsStack) -> None:
    cases = [
        ("/analytics/usage/trends", {"period": "7x"}, "period"),
        ("/analytics/usage/trends", {"period": "7d", "granularity": "fortnight"}, "granularity"),
        ("/analytics/usage/trends", {"period": "90d", "granularity": "minute"}, "granularity"),
        ("/providers/analytics", {"breakdown": "colour"}, "breakdown"),
        ("/analytics/performance", {"breakdown": "region"}, "breakdown"),
        ("/analytics/patterns", {"analysis": "deep"}, "analysis"),
        ("/analytics/budget-forecast", {"horizon": "soon"}, "horizon"),
        (f"/virtual-keys/{uuid.uuid4()}/analytics", {"breakdown": "weekly"}, "breakdown"),
        ("/virtual-keys/not-a-uuid/analytics", {}, "keyId"),
    ]
    for path, params, field in cases:
        response = astack.error(path, params=params)
        assert response.status_code == 400, (path, params, response.text)
        error = response.json()["error"]
        violations = [v for d in error["details"] for v in d.get("fieldViolations", [])]
        assert [v["field"] for v in violations] == [field], (path, error)
    minute = astack.error("/analytics/usage/trends", params={"period": "90d", "granularity": "minute"}).json()
    assert "129600" in minute["error"]["message"] and "2500" in minute["error"]["message"]
    unknown = astack.error("/analytics/usage/trends", params={"period": "7d", "granularity": "fortnight"}).json()
    assert "minute, hour, day, week" in unknown["error"]["message"]
    metric = astack.error(
        "/virtual-keys/compare",
        method="POST",
        json={"keyIds": [str(uuid.uuid4()), str(uuid.uuid4())], "metrics": ["requests", "vibes"]},
    )
    assert metric.status_code == 400 and "metrics[1]" in metric.text and "errorRate" in metric.text
    assert astack.error(f"/virtual-keys/{uuid.uuid4()}/analytics").status_code == 404


# ------------------------------------------------------------------------------------ live
def test_live_active_requests_are_the_reservations_in_flight(astack: AnalyticsStack) -> None:
    """activeRequests counts what Authorize reserved and nothing settled or released yet."""
    metadata = [("authorization", f"Bearer {astack.env['ADMIN_MASTER_KEY']}")]
    key_id = str(uuid.uuid4())
    request_ids = [uuid.uuid4().hex for _ in range(3)]
    with grpc.insecure_channel(astack.env["BUDGET_ADDRESS"]) as channel:
        stub = budget_pb2_grpc.BudgetServiceStub(channel)
        for request_id in request_ids:
            stub.Authorize(
                budget_pb2.AuthorizeRequest(key_id=key_id, request_id=request_id, estimated_cost_micros=1000),
                metadata=metadata,
                timeout=10,
            )
        assert astack.get("/analytics/usage/live")["realTimeMetrics"]["activeRequests"] == 3
        stub.Release(budget_pb2.ReleaseRequest(request_id=request_ids[0]), metadata=metadata, timeout=10)
        stub.Settle(
            budget_pb2.SettleRequest(request_id=request_ids[1], key_id=key_id, actual_cost_micros=0),
            metadata=metadata,
            timeout=10,
        )
        assert astack.get("/analytics/usage/live")["realTimeMetrics"]["activeRequests"] == 1
        stub.Release(budget_pb2.ReleaseRequest(request_id=request_ids[2]), metadata=metadata, timeout=10)
    assert astack.get("/analytics/usage/live")["realTimeMetrics"]["activeRequests"] == 0


def test_live_usage_matches_the_events(astack: AnalyticsStack, dataset: Dataset) -> None:
    assert_live_matches(astack, dataset)


def test_live_usage_reads_the_database_for_buckets_the_counters_may_lack(
    astack: AnalyticsStack, dataset: Dataset
) -> None:
    """The live view reads the Redis counters of a bucket only when they are complete for it
    (tally.usage.live); otherwise it computes the bucket from the database, with the same result."""
    client = redis.Redis.from_url(astack.env["REDIS_URL"])
    hour_key = live.hour_key(datetime.now(UTC))
    try:
        client.set(live.SINCE_KEY, 0)  # complete since the epoch: the counters are read
        client.hincrby(hour_key, "requests", 1000)
        assert astack.get("/analytics/usage/live")["realTimeMetrics"]["requestsThisHour"] >= 1000
        client.hincrby(hour_key, "requests", -1000)
        assert_live_matches(astack, dataset)
        # Redis lost every counter: the answer is computed from the database.
        client.delete(live.SINCE_KEY, *client.keys("tally:live:*"))
        assert_live_matches(astack, dataset)
    finally:
        client.delete(live.SINCE_KEY)  # incomplete until ingest's next flush sets it again


def test_live_usage_answers_right_after_redis_dropped_its_connections(astack: AnalyticsStack) -> None:
    """The live view's pooled connection to a Redis that restarted (here: that dropped every
    client) fails once; the read is tried again on a new one instead of answering 503."""
    assert astack.get("/analytics/usage/live")["timestamp"]
    client = redis.Redis.from_url(astack.env["REDIS_URL"])
    assert client.client_kill_filter(_type="normal", skipme=True) >= 1
    assert astack.get("/analytics/usage/live")["timestamp"]


def assert_live_matches(astack: AnalyticsStack, dataset: Dataset) -> None:
    view = astack.get("/analytics/usage/live")
    now = datetime.fromisoformat(view["timestamp"].replace("Z", "+00:00"))
    minute = [e for e in dataset.events if int(at(e).timestamp()) // 60 == int(now.timestamp()) // 60]
    hour = [e for e in dataset.events if int(at(e).timestamp()) // 3600 == int(now.timestamp()) // 3600]
    today = [e for e in dataset.events if at(e).astimezone(ZONE).date() == now.astimezone(ZONE).date()]
    metrics = view["realTimeMetrics"]
    assert metrics["activeRequests"] == 0
    assert metrics["requestsThisMinute"] == len(minute)
    assert metrics["requestsThisHour"] == len(hour)
    assert metrics["requestsToday"] == len(today)
    assert metrics["tokensThisMinute"] == sum(tokens(e) for e in minute)
    assert metrics["tokensThisHour"] == sum(tokens(e) for e in hour)
    assert micros(metrics["costThisMinute"]) == sum(cost(e) for e in minute)
    assert micros(metrics["costThisHour"]) == sum(cost(e) for e in hour)
    assert micros(metrics["costToday"]) == sum(cost(e) for e in today)
    hour_cost = sum(cost(e) for e in hour)
    by_key: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in hour:
        by_key[e.virtual_key_id][0] += 1
        by_key[e.virtual_key_id][1] += cost(e)
    assert {k["keyId"]: [k["requestsThisHour"], micros(k["costThisHour"])] for k in view["topVirtualKeys"]} == by_key
    names = {k["keyId"]: k["keyName"] for k in view["topVirtualKeys"]}
    if dataset.budget_set:
        assert names[dataset.budget_key] == "Production API Key"
    for k in view["topVirtualKeys"]:
        assert k["percentageOfTotal"] == pytest.approx(by_key[k["keyId"]][1] / hour_cost)
    by_provider = Counter(e.provider for e in hour)
    assert {p: v["requests"] for p, v in view["providerDistribution"].items()} == dict(by_provider)
    by_model = Counter((e.provider, e.model) for e in hour)
    assert {(m["provider"], m["model"]): m["requestsThisHour"] for m in view["topModels"]} == dict(by_model)


# ------------------------------------------------------------------------------------ trends
def _hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def test_trends_hourly_timeline_totals_and_growth(astack: AnalyticsStack, dataset: Dataset) -> None:
    data = astack.get("/analytics/usage/trends", period="7d", granularity="hour")
    assert (data["period"], data["granularity"], data["totalDataPoints"]) == ("7d", "hour", 168)
    assert len(data["timeline"]) == 168
    buckets: dict[datetime, list[ingest_pb2.UsageEvent]] = defaultdict(list)
    for e in dataset.current:
        buckets[_hour(at(e))].append(e)
    for point in data["timeline"]:
        start = datetime.fromisoformat(point["timestamp"].replace("Z", "+00:00"))
        events = buckets.pop(start, [])
        assert point["requests"] == len(events)
        assert point["tokens"] == sum(tokens(e) for e in events)
        assert micros(point["cost"]) == sum(cost(e) for e in events)
        assert point["activeVirtualKeys"] == len({e.virtual_key_id for e in events})
        assert point["errorRate"] == pytest.approx(sum(map(failed, events)) / len(events) if events else 0)
    assert not buckets  # every event fell in a timeline bucket
    metrics = data["metrics"]
    total_cost = sum(cost(e) for e in dataset.current)
    assert metrics["totalRequests"] == len(dataset.current)
    assert metrics["totalTokens"] == sum(tokens(e) for e in dataset.current)
    assert micros(metrics["totalCost"]) == total_cost
    assert metrics["averageRequestsPerHour"] == pytest.approx(len(dataset.current) / 168)
    assert metrics["peakRequestsPerHour"] == max(Counter(_hour(at(e)) for e in dataset.current).values())
    assert metrics["averageCostPerRequest"] == pytest.approx(total_cost / len(dataset.current) / 1e6)
    previous_cost = sum(cost(e) for e in dataset.previous)
    growth = data["trends"]
    assert growth["requestGrowth"] == pytest.approx(len(dataset.current) / len(dataset.previous) - 1)
    assert growth["costGrowth"] == pytest.approx(total_cost / previous_cost - 1)
    cpt = total_cost / sum(tokens(e) for e in dataset.current)
    previous_cpt = previous_cost / sum(tokens(e) for e in dataset.previous)
    assert growth["efficiencyImprovement"] == pytest.approx((previous_cpt - cpt) / previous_cpt)


def test_trends_day_week_and_minute_granularities(astack: AnalyticsStack, dataset: Dataset) -> None:
    days = astack.get("/analytics/usage/trends", period="30d", granularity="day")
    assert days["totalDataPoints"] == 30 and len(days["timeline"]) == 30
    per_day = Counter(at(e).date() for e in dataset.events)
    for point in days["timeline"]:
        assert point["requests"] == per_day.pop(date.fromisoformat(point["timestamp"][:10]), 0)
    assert not per_day
    assert days["metrics"]["peakRequestsPerHour"] == max(Counter(_hour(at(e)) for e in dataset.events).values())
    weeks = astack.get("/analytics/usage/trends", period="30d", granularity="week")
    assert weeks["totalDataPoints"] == 5
    assert sum(p["requests"] for p in weeks["timeline"]) == len(dataset.events)
    assert all(datetime.fromisoformat(p["timestamp"][:10]).weekday() == 0 for p in weeks["timeline"])
    minutes = astack.get("/analytics/usage/trends", period="1h", granularity="minute")
    assert minutes["totalDataPoints"] == 60
    first = datetime.fromisoformat(minutes["timeline"][0]["timestamp"].replace("Z", "+00:00"))
    inside = [e for e in dataset.events if first <= at(e) < first + timedelta(hours=1)]
    assert minutes["metrics"]["totalRequests"] == len(inside)
    assert micros(minutes["metrics"]["totalCost"]) == sum(cost(e) for e in inside)


# ------------------------------------------------------------------------------------ one key
def test_virtual_key_analytics(astack: AnalyticsStack, dataset: Dataset) -> None:
    key = dataset.budget_key
    data = astack.get(f"/virtual-keys/{key}/analytics", period="30d", breakdown="daily")
    events = [e for e in dataset.events if e.virtual_key_id == key]
    total_cost = sum(cost(e) for e in events)
    summary = data["summary"]
    assert (data["keyId"], data["period"]) == (key, "30d")
    assert summary["totalRequests"] == len(events)
    assert summary["failedRequests"] == sum(map(failed, events))
    assert summary["successfulRequests"] == len(events) - summary["failedRequests"]
    assert summary["totalTokens"] == sum(tokens(e) for e in events)
    assert summary["inputTokens"] == sum(e.input_tokens for e in events)
    assert summary["outputTokens"] == sum(e.output_tokens for e in events)
    assert micros(summary["totalCost"]) == total_cost
    assert summary["averageLatency"] == pytest.approx(sum(e.latency_ms for e in events) / len(events) / 1000)
    assert summary["costPerToken"] == pytest.approx(total_cost / 1e6 / summary["totalTokens"])
    breakdown = data["usageBreakdown"]
    for name, entry in breakdown["byModel"].items():
        of_model = [e for e in events if e.model == name]
        assert entry["requests"] == len(of_model) and micros(entry["cost"]) == sum(cost(e) for e in of_model)
        assert entry["tokens"] == sum(tokens(e) for e in of_model)
    assert sum(v["requests"] for v in breakdown["byOperation"].values()) == len(events)
    bands: dict[str, list[int]] = {b: [0, 0] for b in ("00-06", "06-12", "12-18", "18-24")}
    for e in events:
        band = ("00-06", "06-12", "12-18", "18-24")[at(e).astimezone(ZONE).hour // 6]
        bands[band][0] += 1
        bands[band][1] += cost(e)
    assert {b: [v["requests"], micros(v["cost"])] for b, v in breakdown["byTimeOfDay"].items()} == bands
    by_date: dict[str, list[ingest_pb2.UsageEvent]] = defaultdict(list)
    for e in events:
        by_date[at(e).astimezone(ZONE).date().isoformat()].append(e)
    assert len(data["dailyTrend"]) in (30, 31)
    for point in data["dailyTrend"]:
        day = by_date.pop(point["date"], [])
        assert point["requests"] == len(day) and micros(point["cost"]) == sum(cost(e) for e in day)
        assert point["errors"] == sum(map(failed, day)) and point["tokens"] == sum(tokens(e) for e in day)
        hours = Counter(at(e).astimezone(ZONE).hour for e in day)
        expected_peak = min(hours, key=lambda h: (-hours[h], h)) if hours else 0
        assert point["peakHour"] == expected_peak
    assert not by_date
    if dataset.budget_set:
        budget = data["budgetStatus"]
        assert budget["maxBudget"] == 5000.0
        assert budget["remainingBudget"] == pytest.approx(5000.0 - budget["usedBudget"])
    hourly = astack.get(f"/virtual-keys/{key}/analytics", period="7d", breakdown="hourly")
    assert hourly["dailyTrend"] == []
    assert len(hourly["hourlyTrend"]) == 7 * 24  # every hour, zeros where empty
    assert sum(p["requests"] for p in hourly["hourlyTrend"]) == len(
        [e for e in dataset.current if e.virtual_key_id == key]
    )


def test_key_budget_status_projects_the_month_whatever_the_period(astack: AnalyticsStack, dataset: Dataset) -> None:
    """budgetStatus is in every key's answer: projectedMonthlySpend is the month's spend so far
    (configured timezone) / its days so far x its days, the same for every analysed period; a key
    with no budget reports its spend this month, no maximum, and is on track."""
    now = datetime.now(UTC)
    local = now.astimezone(ZONE)
    month_start = datetime.combine(local.date().replace(day=1), datetime.min.time(), ZONE)
    month_days = ((local.date().replace(day=1) + timedelta(days=32)).replace(day=1) - local.date().replace(day=1)).days
    for key in (dataset.keys[1], dataset.budget_key):
        month = sum(cost(e) for e in dataset.events if e.virtual_key_id == key and at(e) >= month_start)
        answers = [
            astack.get(f"/virtual-keys/{key}/analytics", period=period)["budgetStatus"] for period in ("24h", "90d")
        ]
        assert answers[0] == answers[1]
        status = answers[0]
        assert micros(status["projectedMonthlySpend"]) == round(month / local.day * month_days)
        if key == dataset.keys[1]:
            assert micros(status["usedBudget"]) == month
            assert (status["maxBudget"], status["remainingBudget"], status["utilizationPercentage"]) == (0, 0, 0)
            assert status["onTrackForBudget"] is True
        elif dataset.budget_set:
            assert status["maxBudget"] == 5000.0 and status["onTrackForBudget"] is True


def test_compare_virtual_keys(astack: AnalyticsStack, dataset: Dataset) -> None:
    keys = dataset.keys[:3]
    with astack.http() as client:
        response = client.post("/api/admin/virtual-keys/compare", json={"keyIds": keys, "period": "7d"})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["metrics"] == ["requests", "cost", "latency", "errorRate", "tokens"]
    expected: dict[str, dict[str, float]] = {}
    for key in keys:
        events = [e for e in dataset.current if e.virtual_key_id == key]
        expected[key] = {
            "requests": len(events),
            "cost": sum(cost(e) for e in events),
            "latency": sum(e.latency_ms for e in events) / len(events) / 1000,
            "errorRate": sum(map(failed, events)) / len(events),
            "tokens": sum(tokens(e) for e in events),
        }
    assert [k["keyId"] for k in data["keys"]] == keys
    for entry in data["keys"]:
        values = entry["values"]
        want = expected[entry["keyId"]]
        assert values["requests"] == want["requests"] and values["tokens"] == want["tokens"]
        assert micros(values["cost"]) == want["cost"]
        assert values["latency"] == pytest.approx(want["latency"])
        assert values["errorRate"] == pytest.approx(want["errorRate"])
    for metric in data["metrics"]:
        lower = metric in ("latency", "errorRate")
        ordered = sorted(keys, key=lambda k: expected[k][metric], reverse=not lower)
        ranks = {e["keyId"]: e["ranks"][metric] for e in data["keys"]}
        assert [ranks[k] for k in ordered] == sorted(ranks.values())
        assert ranks[data["leaders"][metric]] == 1


# ------------------------------------------------------------------------------------ providers
def test_provider_analytics(astack: AnalyticsStack, dataset: Dataset) -> None:
    data = astack.get("/providers/analytics", period="30d", breakdown="model")
    events = dataset.events
    assert data["totalRequests"] == len(events)
    total_cost = sum(cost(e) for e in events)
    assert micros(data["totalCost"]) == total_cost
    assert set(data["providers"]) == {ALPHA, BETA}
    for provider, detail in data["providers"].items():
        mine = [e for e in events if e.provider == provider]
        summary = detail["summary"]
        assert summary["requests"] == len(mine)
        assert micros(summary["cost"]) == sum(cost(e) for e in mine)
        assert summary["percentage"] == pytest.approx(sum(cost(e) for e in mine) / total_cost)
        assert summary["errorRate"] == pytest.approx(sum(map(failed, mine)) / len(mine))
        assert summary["averageLatency"] == pytest.approx(sum(e.latency_ms for e in mine) / len(mine) / 1000)
        # Uptime: the share of minutes with traffic in which not every request failed with a 5xx.
        minutes: dict[int, list[int]] = defaultdict(list)
        for e in mine:
            minutes[e.event_time.seconds // 60].append(e.http_status)
        down = sum(1 for statuses in minutes.values() if all(500 <= s < 600 for s in statuses))
        assert 0 < down < len(minutes)  # the dataset has both (else this checks little)
        assert summary["uptime"] == pytest.approx(1 - down / len(minutes))
        for name, stats in detail["models"].items():
            of_model = [e for e in mine if e.model == name]
            assert stats["requests"] == len(of_model)
            assert micros(stats["cost"]) == sum(cost(e) for e in of_model)
            assert stats["inputTokens"] == sum(e.input_tokens for e in of_model)
            assert stats["outputTokens"] == sum(e.output_tokens for e in of_model)
            io_tokens = stats["inputTokens"] + stats["outputTokens"]
            assert stats["costPerToken"] == pytest.approx(sum(cost(e) for e in of_model) / 1e6 / io_tokens)
        for name, stats in detail["operations"].items():
            of_op = [e for e in mine if e.operation == name]
            assert stats["requests"] == len(of_op) and micros(stats["cost"]) == sum(cost(e) for e in of_op)
    only_ops = astack.get("/providers/analytics", period="30d", breakdown="operation")
    assert all(d["models"] == {} and d["operations"] for d in only_ops["providers"].values())


# ------------------------------------------------------------------------------------ performance
def _check_percentile(reported_s: float, values: Sequence[int], q: float) -> None:
    ordered = sorted(values)
    true = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
    index = bucket_of(true)
    lower = 0.0 if index == 0 else UPPER_BOUNDS_MS[index - 1]
    upper = UPPER_BOUNDS_MS[index]
    assert lower - 1e-6 <= reported_s * 1000 <= (upper if math.isfinite(upper) else lower) + 1e-6, (q, true, reported_s)


def test_performance_percentiles_errors_and_throughput(astack: AnalyticsStack, dataset: Dataset) -> None:
    data = astack.get("/analytics/performance", period="7d", breakdown="model")
    events = dataset.current
    overall = data["overall"]
    assert overall["requests"] == len(events)
    assert overall["throughput"] == pytest.approx(len(events) / (168 * 3600))
    for q, name in ((0.5, "p50"), (0.9, "p90"), (0.95, "p95"), (0.99, "p99")):
        _check_percentile(overall["latency"][name], [e.latency_ms for e in events], q)
        ttft = [e.time_to_first_token_ms for e in events if e.time_to_first_token_ms]
        _check_percentile(overall["timeToFirstToken"][name], ttft, q)
    errors = Counter(e.error_type or "unspecified" for e in events if failed(e))
    assert overall["errorsByType"] == dict(errors)
    for model_name, stats in data["groups"].items():
        mine = [e for e in events if e.model == model_name]
        assert stats["requests"] == len(mine)
        _check_percentile(stats["latency"]["p95"], [e.latency_ms for e in mine], 0.95)
        assert stats["errorRate"] == pytest.approx(sum(map(failed, mine)) / len(mine))
    by_key = astack.get("/analytics/performance", period="7d", breakdown="virtual_key")
    assert sum(g["requests"] for g in by_key["groups"].values()) == len(events)


# ------------------------------------------------------------------------------------ patterns
def test_usage_patterns(astack: AnalyticsStack, dataset: Dataset) -> None:
    data = astack.get("/analytics/patterns", period="7d", analysis="detailed")
    events = dataset.current
    temporal = data["patterns"]["temporalPatterns"]
    # mean requests per local hour of day over the 168 hours of the window
    first = _hour(datetime.now(UTC)) + timedelta(hours=1) - timedelta(hours=168)
    starts = [first + timedelta(hours=i) for i in range(168)]
    per_hour = Counter(_hour(at(e)) for e in events)
    sums: dict[int, float] = defaultdict(float)
    for s in starts:
        sums[s.astimezone(ZONE).hour] += per_hour.get(s, 0)
    means = {h: sums[h] / 7 for h in range(24)}
    assert temporal["peakHours"] == sorted(sorted(means, key=lambda h: (-means[h], h))[:6])
    assert temporal["lowUsageHours"] == sorted(sorted(means, key=lambda h: (means[h], h))[:6])
    weekday = sum(per_hour.get(s, 0) for s in starts if s.astimezone(ZONE).weekday() < 5)
    weekday_days = sum(1 for s in starts if s.astimezone(ZONE).weekday() < 5) / 24
    assert temporal["weekdayVsWeekend"]["weekdayAverage"] == pytest.approx(weekday / weekday_days)
    assert temporal["seasonality"]["pattern"] in ("business_hours", "daily", "weekly", "none")
    key_cost: dict[str, int] = defaultdict(int)
    for e in events:
        key_cost[e.virtual_key_id] += cost(e)
    total = sum(key_cost.values())
    ordered = sorted(key_cost, key=lambda k: (-key_cost[k], k))
    power, running = [], 0
    for k in ordered:
        if running >= 0.6 * total:
            break
        power.append(k)
        running += key_cost[k]
    distribution = data["patterns"]["usageDistribution"]
    assert distribution["powerUsers"]["count"] == len(power)
    assert distribution["powerUsers"]["costContribution"] == pytest.approx(running / total)
    counts = [distribution[s]["count"] for s in ("powerUsers", "mediumUsers", "lightUsers")]
    assert sum(counts) == len(key_cost)
    usage = Counter(e.model for e in events)
    prefs = data["patterns"]["modelPreferences"]
    assert {m: p["usage"] for m, p in prefs.items()} == pytest.approx({m: n / len(events) for m, n in usage.items()})
    spike = max(per_hour, key=lambda h: per_hour[h])
    found = [a for a in data["anomalies"] if a["type"] == "usage_spike"]
    assert any(datetime.fromisoformat(a["timestamp"].replace("Z", "+00:00")) == spike for a in found), data["anomalies"]
    assert all(a["severity"] in ("low", "medium", "high", "critical") for a in data["anomalies"])


def test_anomaly_detector_finds_an_injected_spike() -> None:
    series = [100.0 + 50 * math.sin(i / 24 * 2 * math.pi) + (i % 7) for i in range(24 * 14)]
    series[200] *= 4
    hours = [i % 24 for i in range(len(series))]
    found = model.seasonal_outliers(series, hours)
    assert [o.index for o in found] == [200] and found[0].z > 0
    assert model.severity(found[0].z) in ("high", "critical")


def test_quiet_weekends_are_not_anomalies_once_the_window_holds_two_weeks() -> None:
    """Four weeks of hourly traffic with weekends at 40% of weekdays and one real spike: only the
    spike is an anomaly (against the median of the same hour on all days, every weekend hour of
    working time was a drop)."""
    start = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
    starts = [start + timedelta(hours=i) for i in range(24 * 28)]
    requests = [(100.0 + 40 * math.sin(t.hour / 24 * 2 * math.pi)) * (0.4 if t.weekday() >= 5 else 1) for t in starts]
    requests[300] *= 5
    zeros = [0.0] * len(starts)
    weekly = [(t.hour, t.weekday() >= 5) for t in starts]
    found = AnalyticsReads._anomalies(starts, requests, zeros, zeros, weekly, weekly=True)
    assert [(at, kind) for at, kind, *_ in found] == [(starts[300], "usage_spike")]
    assert "typical weekend 12:00 UTC hour" in found[0][2]  # hour 300 is a Saturday noon
    by_hour_only = AnalyticsReads._anomalies(starts, requests, zeros, zeros, [(t.hour, False) for t in starts])
    assert sum(1 for _, kind, *_ in by_hour_only if kind == "usage_drop") > 0


# ------------------------------------------------------------------------------------ cost optimization
def _price(provider: str, name: str) -> TestPrice:
    return next(p for p in PRICES if (p.provider, p.model) == (provider, name))


def test_cost_optimization(astack: AnalyticsStack, dataset: Dataset) -> None:
    data = astack.get("/analytics/cost-optimization", period="30d")
    events = dataset.events
    total = sum(cost(e) for e in events)
    assert micros(data["totalCost"]) == total
    recommendations = {r["type"] + ":" + r["description"]: r for r in data["recommendations"]}
    # model substitution: alpha big -> alpha small for small chat/completions requests
    small = [
        e
        for e in events
        if (e.provider, e.model) == (ALPHA, BIG)
        and e.operation in ("chat.completions", "completions")
        and e.input_tokens < 1000
        and not e.tools_used
    ]
    target = _price(ALPHA, SMALL)
    repriced = sum(
        Decimal(e.input_tokens) * Decimal(target.input_per_million)
        + Decimal(e.output_tokens) * Decimal(target.output_per_million)
        for e in small
    ) + Decimal(0)
    substitution = recommendations[f"model_substitution:Replace {BIG} with {SMALL} for simple tasks"]
    expected = sum(cost(e) for e in small) - int(repriced.to_integral_value(rounding=ROUND_HALF_EVEN))
    assert micros(substitution["estimatedSavings"]) == expected
    assert substitution["affectedRequests"] == len(small)
    assert substitution["implementation"]["modelMapping"] == {
        "from": BIG,
        "to": SMALL,
        "conditions": ["input_tokens < 1000", "no_function_calls"],
    }
    # provider routing: alpha big costs more than beta big
    alpha_big = [e for e in events if (e.provider, e.model) == (ALPHA, BIG)]
    beta = _price(BETA, BIG)
    million = Decimal(1_000_000)
    rerated = sum(
        Decimal(e.input_tokens) * Decimal(beta.input_per_million)
        + Decimal(e.output_tokens) * Decimal(beta.output_per_million)
        + Decimal(e.cached_read_tokens) * Decimal(beta.cached_read_per_million)
        + Decimal(e.cache_write_tokens) * Decimal(beta.cache_write_per_million)
        + Decimal(e.reasoning_tokens) * Decimal(beta.reasoning_per_million)
        + (Decimal(e.images) * Decimal(beta.per_image) + Decimal(round(e.audio_seconds * 1000)) / 1000
           * Decimal(beta.per_audio_second)) * million
        for e in alpha_big
    ) + Decimal(0)  # fmt: skip
    routing = recommendations[f"provider_routing:Route {BIG} requests to {BETA} instead of {ALPHA}"]
    assert micros(routing["estimatedSavings"]) == sum(cost(e) for e in alpha_big) - int(
        rerated.to_integral_value(rounding=ROUND_HALF_EVEN)
    )
    assert routing["affectedRequests"] == len(alpha_big)
    # caching: repeats of a fingerprint within the window
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for e in events:
        if e.prompt_fingerprint:
            groups[(e.prompt_fingerprint, e.provider, e.model)][0] += 1
            groups[(e.prompt_fingerprint, e.provider, e.model)][1] += cost(e)
    repeats = sum(n - 1 for n, _ in groups.values() if n > 1)
    savings = sum(c * (n - 1) // n for n, c in groups.values() if n > 1)
    caching = next(r for r in data["recommendations"] if r["type"] == "caching")
    assert micros(caching["estimatedSavings"]) == savings
    assert caching["cacheHitRateProjected"] == pytest.approx(repeats / len(events))
    assert "affectedRequests" not in caching
    potential = sum(micros(r["estimatedSavings"]) for r in data["recommendations"])
    assert micros(data["potentialSavings"]) == potential
    assert data["savingsPercentage"] == pytest.approx(potential / total)
    assert [r["estimatedSavings"] for r in data["recommendations"]] == sorted(
        (r["estimatedSavings"] for r in data["recommendations"]), reverse=True
    )


# ------------------------------------------------------------------------------------ forecast
def test_forecast_backtest_on_series_with_known_trend() -> None:
    """Backtest over 60 seeded series (trend + weekly pattern + noise, 90 days of training): the
    next 30 days' spend falls inside the 85% interval about 85% of the time and the point
    forecast is within 2%."""
    import random

    weekly = [12.0, 14.0, 13.0, 11.0, 10.0, -25.0, -35.0]
    start = date(2024, 1, 1)

    def truth(t: int) -> float:
        return 200 + 3 * t + weekly[(start + timedelta(days=t)).weekday()]

    covered, errors = 0, []
    for seed in range(60):
        rng = random.Random(seed)
        history = [truth(t) + rng.gauss(0, 5) for t in range(90)]
        fit = model.forecast_daily(history, start, 30, 0.85)
        actual = sum(truth(t) + rng.gauss(0, 5) for t in range(90, 120))
        covered += fit.lower <= actual <= fit.upper
        errors.append(abs(fit.projected - actual) / actual)
        assert fit.slope_per_day == pytest.approx(3, abs=0.1)
        assert model.trend_direction(fit.slope_per_day, fit.mean_daily) == "increasing"
    assert 0.7 <= covered / 60 <= 0.97
    assert max(errors) < 0.02
    rng = random.Random(99)
    flat = model.forecast_daily([100.0 + rng.gauss(0, 1) for _ in range(60)], start, 7, 0.85)
    assert model.trend_direction(flat.slope_per_day, flat.mean_daily) == "stable"
    assert flat.projected == pytest.approx(700, rel=0.02)


def test_budget_forecast(astack: AnalyticsStack, dataset: Dataset) -> None:
    data = astack.get("/analytics/budget-forecast", horizon="90d")
    assert data["horizon"] == "90d" and data["confidenceLevel"] == 0.85
    assert data["currentTrend"] in ("increasing", "stable", "decreasing")
    forecast = data["globalForecast"]
    assert forecast["lowerBound"] <= forecast["projectedSpend"] <= forecast["upperBound"]
    assert forecast["budgetRequired"] == forecast["upperBound"]
    assert sum(m["projectedSpend"] for m in data["monthlyForecasts"]) == pytest.approx(forecast["projectedSpend"])
    assert len(data["monthlyForecasts"]) in (3, 4)
    assert {k["keyId"] for k in data["keyForecasts"]} <= set(dataset.keys)
    assert all(k["riskLevel"] in ("low", "medium", "high") for k in data["keyForecasts"])
    # the training series is the daily spend of whole UTC days: check it against the events
    today = datetime.now(UTC).date()
    daily: Counter[date] = Counter()
    for e in dataset.events:
        if at(e).date() < today:
            daily[at(e).date()] += cost(e)
    first = min(daily)
    history = [daily.get(first + timedelta(days=i), 0) / 1e6 for i in range((today - first).days)]
    expected = model.forecast_daily(history, first, 90, 0.85)
    assert forecast["projectedSpend"] == pytest.approx(expected.projected)


# ------------------------------------------------------------------------------------ own metrics
def test_performance_metrics_and_freshness(astack: AnalyticsStack, dataset: Dataset) -> None:
    astack.get("/analytics/usage/trends", period="24h")
    data = astack.get("/analytics/performance-metrics")
    trends = data["endpoints"]["GetUsageTrends"]
    assert trends["count"] >= 1 and trends["p50Ms"] <= trends["p95Ms"] <= trends["p99Ms"]
    freshness = data["rollupFreshness"]
    newest = max(at(e) for e in dataset.events)
    reported = datetime.fromisoformat(freshness["lastRawEventTime"].replace("Z", "+00:00"))
    assert abs((reported - newest).total_seconds()) < 0.001
    assert freshness["lagSeconds"] >= 0
    hourly_end = datetime.fromisoformat(freshness["lastHourlyRollupTime"].replace("Z", "+00:00"))
    assert hourly_end == _hour(newest) + timedelta(hours=1)


# ------------------------------------------------------------------------------------ narrow rollups
def _week(t: datetime) -> date:
    day = t.date()
    return day - timedelta(days=day.weekday())


def test_per_key_and_per_dimension_answers_match_the_events(astack: AnalyticsStack, dataset: Dataset) -> None:
    """The answers that combine the global, per-key and full rollups: active keys per day and week,
    error types per key and per provider, model preferences' key segments, substitution keys and
    a key's operations, each against the events."""
    days = astack.get("/analytics/usage/trends", period="30d", granularity="day")
    keys_per_day: dict[date, set[str]] = defaultdict(set)
    for e in dataset.events:
        keys_per_day[at(e).date()].add(e.virtual_key_id)
    for point in days["timeline"]:
        assert point["activeVirtualKeys"] == len(keys_per_day.pop(date.fromisoformat(point["timestamp"][:10]), set()))
    assert not keys_per_day
    weeks = astack.get("/analytics/usage/trends", period="30d", granularity="week")
    keys_per_week: dict[date, set[str]] = defaultdict(set)
    for e in dataset.events:
        keys_per_week[_week(at(e))].add(e.virtual_key_id)
    for point in weeks["timeline"]:
        assert point["activeVirtualKeys"] == len(keys_per_week.pop(date.fromisoformat(point["timestamp"][:10]), set()))
    assert not keys_per_week

    events = dataset.current
    by_key = astack.get("/analytics/performance", period="7d", breakdown="virtual_key")
    assert set(by_key["groups"]) == {e.virtual_key_id for e in events}
    for key, stats in by_key["groups"].items():
        mine = [e for e in events if e.virtual_key_id == key]
        assert stats["requests"] == len(mine)
        assert stats["errorRate"] == pytest.approx(sum(map(failed, mine)) / len(mine))
        assert stats.get("errorsByType", {}) == dict(Counter(e.error_type or "unspecified" for e in mine if failed(e)))
        _check_percentile(stats["latency"]["p90"], [e.latency_ms for e in mine], 0.9)
    by_provider = astack.get("/analytics/performance", period="7d", breakdown="provider")
    for provider, stats in by_provider["groups"].items():
        mine = [e for e in events if e.provider == provider]
        assert stats["requests"] == len(mine)
        assert stats.get("errorsByType", {}) == dict(Counter(e.error_type or "unspecified" for e in mine if failed(e)))
    assert by_provider["overall"]["errorsByType"] == by_key["overall"]["errorsByType"]

    patterns = astack.get("/analytics/patterns", period="7d", analysis="summary")
    key_cost: dict[str, int] = defaultdict(int)
    for e in events:
        key_cost[e.virtual_key_id] += cost(e)
    segments = model.segment_keys(dict(key_cost))
    segment_of = {k: name for name, members in (
        ("power_users", segments.power), ("medium_users", segments.medium), ("light_users", segments.light)
    ) for k in members}  # fmt: skip
    non_empty = set(segment_of.values())
    for name, preference in patterns["patterns"]["modelPreferences"].items():
        used_by = {segment_of[e.virtual_key_id] for e in events if e.model == name}
        assert preference["userSegments"] == (["all"] if used_by == non_empty else sorted(used_by)), name

    optimization = astack.get("/analytics/cost-optimization", period="30d")
    small = Counter(
        e.virtual_key_id
        for e in dataset.events
        if (e.provider, e.model) == (ALPHA, BIG)
        and e.operation in ("chat.completions", "completions")
        and e.input_tokens < 1000
        and not e.tools_used
    )
    substitution = next(r for r in optimization["recommendations"] if r["type"] == "model_substitution")
    assert substitution["implementation"]["virtualKeys"] == sorted(small, key=lambda k: (-small[k], k))[:10]

    key = dataset.keys[1]
    data = astack.get(f"/virtual-keys/{key}/analytics", period="30d")
    mine = [e for e in dataset.events if e.virtual_key_id == key]
    total = sum(cost(e) for e in mine)
    operations = data["usageBreakdown"]["byOperation"]
    assert set(operations) == {e.operation for e in mine}
    for name, entry in operations.items():
        of_op = [e for e in mine if e.operation == name]
        assert entry["requests"] == len(of_op) and micros(entry["cost"]) == sum(cost(e) for e in of_op)
        assert entry["percentage"] == pytest.approx(sum(cost(e) for e in of_op) / total)


def test_budget_forecast_lists_top_spenders_and_the_most_utilized_budgeted_keys() -> None:
    """A key with a budget is forecast even when it is not among the top spenders (its risk is
    what the forecast is for); each key once, top spenders first."""

    def fit(projected: float) -> model.Forecast:
        return model.Forecast(projected, projected, projected, 0.0, [], [], 0.0, 0.0)

    fits = [(f"k{i:02d}", fit(float(i))) for i in range(30)]
    budgeted = ["k01", "k28", "k25", "k00", "no-history", "k02"]
    chosen = [key for key, _ in forecast_candidates(fits, budgeted, limit=3)]
    assert chosen == ["k29", "k28", "k27", "k01", "k25"]  # the 3 most utilized with a history: k01, k28, k25
