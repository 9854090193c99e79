"""Ingest against real TimescaleDB and Redis: idempotency, validation, pricing, rollups."""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import httpx
import psycopg
import pytest
import redis

from tally.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tally.runtime.config import ServiceName
from tally.usage import live
from tests.conftest import Stack
from tests.usage_support import EventFactory, TestPrice, expected_cost_micros, recent


@pytest.fixture(scope="module")
def prices(stack: Stack) -> list[TestPrice]:
    """Two models of a test provider, one with a price change in the middle of the test window."""
    suffix = uuid.uuid4().hex[:8]
    change = recent(hours=30)
    table = [
        TestPrice("testai", f"alpha-{suffix}", change - timedelta(days=30), "2.5", "10", "1.25", "3.75", "10",
                  "0.04", "0.0001", "0.000123456"),
        TestPrice("testai", f"alpha-{suffix}", change, "3.000000001", "12", "1.5", "4", "12", "0.05", "0.00015"),
        TestPrice("testai", f"beta-{suffix}", change - timedelta(days=30), "0.15", "0.6", "0.075"),
    ]  # fmt: skip
    with stack.http() as client:
        for price in table:
            response = client.put("/api/admin/model-prices", json={"price": price.as_json()})
            assert response.status_code == 200, response.text
    return table


@pytest.fixture
def stub(stack: Stack) -> Iterator[ingest_pb2_grpc.IngestServiceStub]:
    with stack.channel(ServiceName.INGEST) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)


def factory_for(prices: Sequence[TestPrice], seed: int, unpriced: bool = False) -> EventFactory:
    models = sorted({(p.provider, p.model) for p in prices})
    if unpriced:
        models.append(("testai", f"unpriced-{seed}"))
    return EventFactory(seed=seed, models=models)


def send(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, events: Sequence[ingest_pb2.UsageEvent]
) -> ingest_pb2.RecordUsageBatchResult:
    reply: ingest_pb2.RecordUsageBatchResponse = stub.RecordUsageBatch(
        ingest_pb2.RecordUsageBatchRequest(events=events), timeout=60, metadata=stack.auth()
    )
    assert reply.success
    return reply.data


def db(stack: Stack) -> psycopg.Connection[Any]:
    return psycopg.connect(stack.postgres.url, password=stack.postgres.password, autocommit=True)


def raw_totals(stack: Stack, keys: Sequence[str]) -> tuple[int, int, int]:
    with db(stack) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(cost_micros), 0), coalesce(sum(input_tokens), 0) "
            "FROM usage_events WHERE key_id = ANY(%s::uuid[])",
            (list(keys),),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def test_replayed_batch_changes_nothing(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=1)
    events = factory.events(300, recent(hours=3), timedelta(hours=2))
    first = send(stack, stub, events)
    assert (first.accepted, first.duplicate, first.rejected) == (300, 0, 0)
    totals = raw_totals(stack, factory.keys)
    expected_cost = sum(expected_cost_micros(e, prices) or 0 for e in events)
    assert totals == (300, expected_cost, sum(e.input_tokens for e in events))
    for _ in range(2):
        again = send(stack, stub, events)
        assert (again.accepted, again.duplicate, again.rejected) == (0, 300, 0)
        assert {r.status for r in again.results} == {"duplicate"}
        assert raw_totals(stack, factory.keys) == totals


def test_repeats_inside_one_batch_count_once_per_request_id_and_event_time(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    """An identity is (request id, event time): the same id at another time is another event."""
    factory = factory_for(prices, seed=14)
    t1 = recent(hours=1).replace(microsecond=0)  # whole seconds: equal times share one object
    t2 = t1 + timedelta(microseconds=250)
    a1, a2, b1 = factory.event(t1), factory.event(t2), factory.event(t1)
    a2.request_id = a1.request_id
    batch = [a1, a1, a2, a2, b1, a1]
    result = send(stack, stub, batch)
    assert [r.status for r in result.results] == [
        "accepted", "duplicate", "accepted", "duplicate", "accepted", "duplicate"
    ]  # fmt: skip
    assert (result.accepted, result.duplicate) == (3, 3)
    again = send(stack, stub, batch)
    assert (again.accepted, again.duplicate) == (0, 6)


def test_bad_items_are_rejected_precisely_and_the_rest_stored(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=2)
    events = factory.events(1000, recent(hours=2), timedelta(hours=1))
    events[10].request_id = ""
    events[500].input_tokens = -5
    events[999].operation = "Chat Completions!"
    result = send(stack, stub, events)
    assert (result.accepted, result.duplicate, result.rejected) == (997, 0, 3)
    rejected = {r.index: (r.field, r.reason) for r in result.results if r.status == "rejected"}
    assert rejected == {
        10: ("requestId", "required"),
        500: ("inputTokens", "must not be negative"),
        999: ("operation", "must be dotted lower-case words, e.g. chat.completions"),
    }
    assert raw_totals(stack, factory.keys)[0] == 997


def test_time_window_validation(stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]) -> None:
    factory = factory_for(prices, seed=3)
    now = datetime.now(UTC)
    events = [
        factory.event(now + timedelta(hours=1)),  # future beyond skew
        factory.event(now - timedelta(days=8)),  # older than the late window
        factory.event(now + timedelta(seconds=30)),  # within the skew
        factory.event(now - timedelta(days=6, hours=23)),  # late but within the window
        factory.event(now, virtual_key_id="not-a-uuid"),
        ingest_pb2.UsageEvent(
            request_id="no-time", virtual_key_id=factory.keys[0], provider="p", model="m", operation="chat.completions"
        ),
    ]
    result = send(stack, stub, events)
    statuses = [(r.status, r.field) for r in result.results]
    assert statuses == [
        ("rejected", "eventTime"),
        ("rejected", "eventTime"),
        ("accepted", ""),
        ("accepted", ""),
        ("rejected", "virtualKeyId"),
        ("rejected", "eventTime"),
    ]


def test_concurrent_overlapping_batches_store_each_event_once(stack: Stack, prices: list[TestPrice]) -> None:
    factory = factory_for(prices, seed=4)
    pool = factory.events(2000, recent(hours=5), timedelta(hours=4))
    rng = factory.rng
    batches = [rng.sample(pool, 700) for _ in range(8)]

    def post(batch: list[ingest_pb2.UsageEvent]) -> ingest_pb2.RecordUsageBatchResult:
        with stack.channel(ServiceName.INGEST) as channel:
            return send(stack, ingest_pb2_grpc.IngestServiceStub(channel), batch)

    with concurrent.futures.ThreadPoolExecutor(8) as executor:
        results = list(executor.map(post, batches))
    distinct = {e.request_id: e for batch in batches for e in batch}
    assert sum(r.accepted for r in results) == len(distinct)
    assert sum(r.duplicate for r in results) == sum(len(b) for b in batches) - len(distinct)
    count, cost, _ = raw_totals(stack, factory.keys)
    assert count == len(distinct)
    assert cost == sum(expected_cost_micros(e, prices) or 0 for e in distinct.values())


def test_price_change_mid_period_and_unpriced_models(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=5, unpriced=True)
    change = prices[1].effective_from
    before = [
        factory.event(change - timedelta(minutes=m), provider="testai", model=prices[0].model) for m in range(1, 40)
    ]
    after = [
        factory.event(change + timedelta(minutes=m), provider="testai", model=prices[0].model) for m in range(0, 40)
    ]
    unpriced = [
        factory.event(recent(hours=1), provider="testai", model=f"unpriced-{uuid.uuid4().hex[:6]}") for _ in range(7)
    ]
    reported = [
        factory.event(
            recent(hours=1), provider="testai", model=f"unpriced-{uuid.uuid4().hex[:6]}", provider_cost_micros=123_456
        )
        for _ in range(3)
    ]
    with stack.http() as client:
        status_before = client.get("/api/admin/analytics/ingestion-status").json()["data"]
    send(stack, stub, before + after + unpriced + reported)
    with db(stack) as conn:
        rows = conn.execute(
            "SELECT request_id, cost_micros, cost_source, price_id FROM usage_events WHERE key_id = ANY(%s::uuid[])",
            (factory.keys,),
        ).fetchall()
    stored = {r[0]: (r[1], r[2]) for r in rows}
    for event in before + after:
        expected = expected_cost_micros(event, prices)
        assert stored[event.request_id] == (expected, "computed")
    # The two sides of the change really are priced differently.
    assert expected_cost_micros(after[0], prices) != expected_cost_micros(
        after[0], [p for p in prices if p.effective_from < change]
    )
    assert all(stored[e.request_id] == (None, "unpriced") for e in unpriced)
    assert all(stored[e.request_id] == (123_456, "provider") for e in reported)
    with stack.http() as client:
        status_after = client.get("/api/admin/analytics/ingestion-status").json()["data"]
    assert status_after["counts"]["unpriced"] - status_before["counts"]["unpriced"] == 7
    assert status_after["counts"]["accepted"] - status_before["counts"]["accepted"] == len(before + after) + 10


def rollup_mismatches(stack: Stack, table: str, width: str) -> list[Any]:
    """Groups where the rollup differs from an aggregation of the raw events (any column)."""
    columns = [
        "count(*)",
        "count(*) FILTER (WHERE http_status < 400)",
        "sum(input_tokens)",
        "sum(output_tokens)",
        "sum(cached_read_tokens)",
        "sum(cache_write_tokens)",
        "sum(reasoning_tokens)",
        "sum(images)",
        "sum(audio_seconds)",
        "coalesce(sum(cost_micros), 0)",
        "count(*) FILTER (WHERE cost_source = 'unpriced')",
        "sum(latency_ms)",
        "count(ttft_ms)",
    ]
    rollup = [
        "requests",
        "successes",
        "input_tokens",
        "output_tokens",
        "cached_read_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "images",
        "audio_seconds",
        "cost_micros",
        "unpriced_requests",
        "latency_ms_sum",
        "ttft_count",
    ]
    query = f"""
        WITH raw AS (
            SELECT time_bucket('{width}', event_time) AS bucket, key_id, provider, model, operation,
                   (http_status / 100)::text || 'xx' AS status_class, coalesce(error_type, '') AS error_type,
                   {", ".join(f"{c} AS c{i}" for i, c in enumerate(columns))}
            FROM usage_events GROUP BY 1, 2, 3, 4, 5, 6, 7),
        roll AS (  -- append-only: a group may have several rows until compacted
            SELECT bucket, key_id, provider, model, operation, status_class, error_type,
                   {", ".join(f"sum({c}) AS c{i}" for i, c in enumerate(rollup))},
                   sum({" + ".join(f"lat_{i:02d}" for i in range(24))}) AS lat_total
            FROM {table} GROUP BY 1, 2, 3, 4, 5, 6, 7)
        SELECT * FROM raw FULL JOIN roll USING (bucket, key_id, provider, model, operation, status_class, error_type)
        WHERE {" OR ".join(f"raw.c{i} IS DISTINCT FROM roll.c{i}" for i in range(len(columns)))}
           OR roll.lat_total IS DISTINCT FROM raw.c0
    """  # noqa: S608
    with db(stack) as conn:
        return conn.execute(query).fetchall()


def provider_minute_mismatches(stack: Stack) -> list[Any]:
    """Minutes and providers where the uptime rollup differs from the raw events."""
    with db(stack) as conn:
        return conn.execute(
            """WITH raw AS (SELECT time_bucket('1 minute', event_time) AS bucket, provider, count(*) AS requests,
                                   count(*) FILTER (WHERE http_status >= 500) AS failures
                            FROM usage_events GROUP BY 1, 2),
                    roll AS (SELECT bucket, provider, sum(requests) AS requests, sum(server_failures) AS failures
                             FROM provider_minutes GROUP BY 1, 2)
               SELECT * FROM raw FULL JOIN roll USING (bucket, provider)
               WHERE raw.requests IS DISTINCT FROM roll.requests OR raw.failures IS DISTINCT FROM roll.failures"""
        ).fetchall()


def uptime_summary_mismatches(stack: Stack, hours: Sequence[datetime]) -> list[Any]:
    """Hours (of `hours`) whose uptime summary differs from the raw events, or is still marked dirty."""
    with db(stack) as conn:
        return conn.execute(
            """WITH raw AS (SELECT time_bucket('1 hour', m) AS bucket, provider, count(*) AS minutes,
                                   count(*) FILTER (WHERE failures = requests) AS down
                            FROM (SELECT time_bucket('1 minute', event_time) AS m, provider, count(*) AS requests,
                                         count(*) FILTER (WHERE http_status >= 500) AS failures
                                  FROM usage_events WHERE time_bucket('1 hour', event_time) = ANY(%(h)s)
                                  GROUP BY 1, 2) x GROUP BY 1, 2),
                    summary AS (SELECT bucket, provider, sum(minutes) AS minutes, sum(down_minutes) AS down
                                FROM provider_uptime_hourly WHERE bucket = ANY(%(h)s) GROUP BY 1, 2)
               SELECT * FROM raw FULL JOIN summary USING (bucket, provider)
               WHERE raw.minutes IS DISTINCT FROM summary.minutes OR raw.down IS DISTINCT FROM summary.down
               UNION ALL SELECT bucket, 'dirty', 0, 0, 0, 0 FROM provider_minutes_dirty WHERE bucket = ANY(%(h)s)""",
            {"h": list(hours)},
        ).fetchall()


def provider_minute_rows_per_group(stack: Stack, minutes: Sequence[datetime]) -> int:
    with db(stack) as conn:
        row = conn.execute(
            """SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM provider_minutes
               WHERE bucket = ANY(%s) GROUP BY bucket, provider) g""",
            (list(minutes),),
        ).fetchone()
    assert row is not None
    return int(row[0])


def rows_per_group(stack: Stack, table: str, keys: Sequence[str]) -> int:
    with db(stack) as conn:
        row = conn.execute(
            f"""SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM {table} WHERE key_id = ANY(%s::uuid[])
                GROUP BY bucket, key_id, provider, model, operation, status_class, error_type) g""",  # noqa: S608
            (list(keys),),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_rollups_equal_raw_events_before_and_after_compaction(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=6, unpriced=True)
    factory.keys = factory.keys[:1]
    factory.models = factory.models[:1]
    minutes: set[datetime] = set()
    for _ in range(4):  # several batches append several rows for the same groups
        events = factory.events(400, recent(hours=70), timedelta(hours=69))
        minutes |= {datetime.fromtimestamp(e.event_time.seconds // 60 * 60, UTC) for e in events}
        send(stack, stub, events)
    assert rollup_mismatches(stack, "usage_rollup_hourly", "1 hour") == []
    assert rollup_mismatches(stack, "usage_rollup_daily", "1 day") == []
    assert narrow_rollup_mismatches(stack) == []
    assert provider_minute_mismatches(stack) == []
    deadline = datetime.now(UTC) + timedelta(seconds=30)  # the compactor runs every second in tests
    while datetime.now(UTC) < deadline and (
        rows_per_group(stack, "usage_rollup_daily", factory.keys) > 1
        or rows_per_group(stack, "usage_rollup_hourly", factory.keys) > 1
        or provider_minute_rows_per_group(stack, sorted(minutes)) > 1
    ):
        time.sleep(0.2)
    assert rows_per_group(stack, "usage_rollup_hourly", factory.keys) == 1
    assert rows_per_group(stack, "usage_rollup_daily", factory.keys) == 1
    assert provider_minute_rows_per_group(stack, sorted(minutes)) == 1
    hours = sorted({m.replace(minute=0) for m in minutes})
    while datetime.now(UTC) < deadline and uptime_summary_mismatches(stack, hours):
        time.sleep(0.2)
    assert uptime_summary_mismatches(stack, hours) == []
    assert rollup_mismatches(stack, "usage_rollup_hourly", "1 hour") == []
    assert rollup_mismatches(stack, "usage_rollup_daily", "1 day") == []
    assert narrow_rollup_mismatches(stack) == []
    assert provider_minute_mismatches(stack) == []


def narrow_rollup_mismatches(stack: Stack) -> list[Any]:
    """The global (no key) and per-key rollups against the raw events, per bucket and group."""
    problems = []
    with db(stack) as conn:
        for table, width, group in (
            ("usage_rollup_hourly_global", "1 hour", "provider, model, operation"),
            ("usage_rollup_daily_global", "1 day", "provider, model, operation"),
            ("usage_rollup_hourly_key", "1 hour", "key_id"),
            ("usage_rollup_daily_key", "1 day", "key_id"),
        ):
            problems += conn.execute(
                f"""WITH raw AS (SELECT time_bucket('{width}', event_time) AS bucket, {group}, count(*) AS n,
                                        coalesce(sum(cost_micros), 0) AS cost, sum(output_tokens) AS output
                                 FROM usage_events GROUP BY 1, {group}),
                         roll AS (SELECT bucket, {group}, sum(requests) AS n, sum(cost_micros) AS cost,
                                         sum(output_tokens) AS output FROM {table} GROUP BY 1, {group})
                    SELECT '{table}', * FROM raw FULL JOIN roll USING (bucket, {group})
                    WHERE raw.n IS DISTINCT FROM roll.n OR raw.cost IS DISTINCT FROM roll.cost
                       OR raw.output IS DISTINCT FROM roll.output"""  # noqa: S608
            ).fetchall()
    return problems


def test_random_windows_match_an_independent_computation(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=7)
    events = factory.events(1200, recent(hours=48), timedelta(hours=47))
    send(stack, stub, events)
    rng = factory.rng
    with db(stack) as conn:
        for _ in range(20):
            # Hour-aligned windows: the hourly rollup answers exactly for whole hours.
            start = recent(hours=48).replace(minute=0, second=0) + timedelta(hours=rng.randint(0, 40))
            end = start + timedelta(hours=rng.randint(1, 8))
            key = rng.choice(factory.keys)
            model = rng.choice(factory.models)[1]
            chosen = [
                e
                for e in events
                if e.virtual_key_id == key and e.model == model and start <= e.event_time.ToDatetime(tzinfo=UTC) < end
            ]
            row = conn.execute(
                """SELECT coalesce(sum(requests), 0), coalesce(sum(cost_micros), 0), coalesce(sum(output_tokens), 0)
                   FROM usage_rollup_hourly WHERE key_id = %s AND model = %s AND bucket >= %s AND bucket < %s""",
                (key, model, start, end),
            ).fetchone()
            assert row == (
                len(chosen),
                sum(expected_cost_micros(e, prices) or 0 for e in chosen),
                sum(e.output_tokens for e in chosen),
            )


def test_end_user_ids_are_hashed_never_stored(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=8)
    secret_user = f"alice-{uuid.uuid4().hex}@example.com"
    event = factory.event(recent(hours=1), end_user_id=secret_user)
    send(stack, stub, [event])
    with db(stack) as conn:
        row = conn.execute(
            "SELECT end_user_hash, to_jsonb(e)::text FROM usage_events e WHERE request_id = %s", (event.request_id,)
        ).fetchone()
    assert row is not None
    assert len(row[0]) == 64 and secret_user not in row[1]


def test_unknown_keys_are_registered(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=9)
    key = str(uuid.uuid4())
    send(stack, stub, [factory.event(recent(hours=1), virtual_key_id=key)])
    with stack.http() as client:
        response = client.get(f"/api/admin/virtual-keys/{key}")
    assert response.status_code == 200
    assert response.json()["data"]["keyName"] == key


def test_rest_batch_route_and_single_record(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=10)
    request_id = f"rest-{uuid.uuid4()}"
    body = {
        "events": [
            {
                "requestId": request_id,
                "eventTime": recent(hours=1).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "virtualKeyId": factory.keys[0],
                "provider": "testai",
                "model": prices[2].model,
                "operation": "chat.completions",
                "inputTokens": 1000,
                "outputTokens": 500,
            },
            {"requestId": "", "virtualKeyId": factory.keys[0]},
        ]
    }
    with stack.http() as client:
        response = client.post("/api/admin/usage/batch", json=body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert (data["accepted"], data["rejected"]) == (1, 1)
    assert data["results"][1] == {
        "index": 1,
        "requestId": "",
        "status": "rejected",
        "reason": "required",
        "field": "requestId",
    }
    # 1000 x 0.15 + 500 x 0.6 per million = 150 + 300 micro-USD
    assert raw_totals(stack, [factory.keys[0]])[1] == 450
    single = factory.event(recent(hours=1))
    reply = stub.RecordUsage(ingest_pb2.RecordUsageRequest(event=single), timeout=10, metadata=stack.auth())
    assert reply.result.status == "accepted"
    single.input_tokens = -1
    single.request_id = "other"
    with pytest.raises(grpc.RpcError) as caught:
        stub.RecordUsage(ingest_pb2.RecordUsageRequest(event=single), timeout=10, metadata=stack.auth())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_acknowledges_each_committed_batch(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=11)
    batches = [factory.events(100, recent(hours=2), timedelta(hours=1)) for _ in range(5)]
    requests = iter([ingest_pb2.StreamUsageRequest(batch_id=f"b{i}", events=b) for i, b in enumerate(batches)])
    acks = list(stub.StreamUsage(requests, timeout=60, metadata=stack.auth()))
    # Batches are stored concurrently: acknowledgements are matched by batch id, not position.
    assert sorted(a.batch_id for a in acks) == [f"b{i}" for i in range(5)]
    assert all(a.result.accepted == 100 for a in acks)
    assert raw_totals(stack, factory.keys)[0] == 500


def test_stream_acknowledges_batches_taken_in_before_an_invalid_one(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=13)
    batches = [factory.events(50, recent(hours=2), timedelta(hours=1)) for _ in range(4)]
    requests = [ingest_pb2.StreamUsageRequest(batch_id=f"b{i}", events=b) for i, b in enumerate(batches)]
    requests.append(ingest_pb2.StreamUsageRequest(events=factory.events(5, recent(hours=2), timedelta(hours=1))))
    acks: list[ingest_pb2.StreamUsageResponse] = []
    answers = stub.StreamUsage(iter(requests), timeout=60, metadata=stack.auth())
    with pytest.raises(grpc.RpcError) as caught:
        acks.extend(answers)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batchId" in (caught.value.details() or "")
    # Every valid batch read before the invalid one was stored and acknowledged; the invalid one
    # stored nothing.
    assert sorted(a.batch_id for a in acks) == ["b0", "b1", "b2", "b3"]
    assert raw_totals(stack, factory.keys)[0] == 200


def test_oversized_batch_is_refused(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=12)
    event = factory.event(recent(hours=1))
    with pytest.raises(grpc.RpcError) as caught:
        stub.RecordUsageBatch(
            ingest_pb2.RecordUsageBatchRequest(events=[event] * 10_001), timeout=60, metadata=stack.auth()
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10000" in (caught.value.details() or "")


def test_live_counters_follow_commits(
    stack: Stack, stub: ingest_pb2_grpc.IngestServiceStub, prices: list[TestPrice]
) -> None:
    factory = factory_for(prices, seed=13)
    key = str(uuid.uuid4())
    at = recent(hours=0).replace(second=0) - timedelta(minutes=2)  # 50 events inside one minute (and hour)
    events = [factory.event(at + timedelta(seconds=i), virtual_key_id=key) for i in range(50)]
    send(stack, stub, events)
    send(stack, stub, events)  # duplicates must not count
    client = redis.Redis.from_url(stack.redis.url)
    expected_cost = sum(expected_cost_micros(e, prices) or 0 for e in events)
    hour_key = live.hour_key(at)
    deadline = datetime.now(UTC) + timedelta(seconds=10)
    while datetime.now(UTC) < deadline:
        values = client.hmget(hour_key, [f"k|{key}|requests", f"k|{key}|cost"])
        if values[0] is not None and int(values[0]) >= 50:
            break
        time.sleep(0.1)
    assert [int(v or 0) for v in values] == [50, expected_cost]
    assert 0 < client.ttl(hour_key) <= live.HOUR_TTL_SECONDS  # each flush renews the hash's expiry
    fields = [f"k|{key}|requests", f"k|{key}|cost"]
    assert [int(v or 0) for v in client.hmget(live.minute_key(at), fields)] == [50, expected_cost]
    assert [int(v or 0) for v in client.hmget(live.day_key(at, ZoneInfo("UTC")), fields)] == [50, expected_cost]

    # Events older than a minute hash lives (2 h) count in their hour and day hashes only.
    old_key = str(uuid.uuid4())
    old = recent(hours=0).replace(minute=30, second=0) - timedelta(hours=3)
    old_events = [factory.event(old + timedelta(seconds=i), virtual_key_id=old_key) for i in range(20)]
    send(stack, stub, old_events)
    old_cost = sum(expected_cost_micros(e, prices) or 0 for e in old_events)
    old_fields = [f"k|{old_key}|requests", f"k|{old_key}|cost"]
    while datetime.now(UTC) < deadline + timedelta(seconds=10):
        if client.hget(live.hour_key(old), old_fields[0]) is not None:
            break
        time.sleep(0.1)
    assert [int(v or 0) for v in client.hmget(live.hour_key(old), old_fields)] == [20, old_cost]
    assert [int(v or 0) for v in client.hmget(live.day_key(old, ZoneInfo("UTC")), old_fields)] == [20, old_cost]
    assert client.hmget(live.minute_key(old), old_fields) == [None, None]


def test_live_counters_are_complete_only_from_when_none_can_be_missing(stack: Stack) -> None:
    """Ingest's flushes keep the instant from which the live counters hold every committed event
    (readers compute earlier buckets from the database). After Redis lost it, when another Redis
    process answers (a restart from an append-only file), or once a replica stopped heartbeating
    (it died, maybe with counts unflushed), every event stored before may be missing: the instant
    becomes the end of the minute of the latest event time stored (and never less than what counts
    not flushed asked for); otherwise it never moves. A dead replica also makes budget rebuild."""
    client = redis.Redis.from_url(stack.redis.url)

    def expected() -> int:
        with db(stack) as conn:
            row = conn.execute("SELECT max(event_time) FROM usage_events").fetchone()
        assert row is not None
        latest = 0 if row[0] is None else (int(row[0].timestamp()) // 60 + 1) * 60_000
        return max(latest, int(client.get(live.FLOOR_KEY) or 0))

    def settles_at(value: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            since = client.get(live.SINCE_KEY)
            if since is not None and int(since) == value:
                time.sleep(0.6)  # and stays there
                assert int(client.get(live.SINCE_KEY) or 0) == value
                return
            time.sleep(0.05)
        raise AssertionError(f"{live.SINCE_KEY} is {client.get(live.SINCE_KEY)!r}, not {value}")

    client.delete(live.SINCE_KEY)
    settles_at(expected())

    client.set(live.SINCE_KEY, 1)
    time.sleep(1.5)  # three flushes: nothing is missing, nothing moves
    assert client.get(live.SINCE_KEY) == b"1"

    client.set(live.RUN_KEY, "the run id of a Redis process before a restart")
    settles_at(expected())

    # A replica that died may also have had spend committed and not handed over: budget rebuilds.
    metrics_url = f"http://127.0.0.1:{stack.env['BUDGET_METRICS_PORT']}/metrics"

    def manual_rebuilds() -> float:
        for line in httpx.get(metrics_url, timeout=5).text.splitlines():
            if line.startswith('tally_budget_reconciles_total{trigger="manual"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    rebuilds = manual_rebuilds()
    client.set(live.SINCE_KEY, 1)
    client.zadd(live.REPLICAS_KEY, {"dead-replica": time.time() * 1000 - live.REPLICA_STALE_MS - 1000})
    settles_at(expected())
    assert client.zscore(live.REPLICAS_KEY, "dead-replica") is None
    assert client.zcard(live.REPLICAS_KEY) >= 1  # the running ingest's own heartbeat
    deadline = time.monotonic() + 20
    while manual_rebuilds() == rebuilds and time.monotonic() < deadline:
        time.sleep(0.2)
    assert manual_rebuilds() > rebuilds


def test_price_api_validation_and_import(stack: Stack) -> None:
    model = f"imported-{uuid.uuid4().hex[:6]}"
    csv_text = (
        "provider,model,effectiveFrom,inputPerMillion,outputPerMillion\n"
        f"testai,{model},2024-01-01T00:00:00Z,1.5,2\n"
        f"testai,{model},2024-06-01T00:00:00Z,-1,2\n"
        f"testai,{model},not-a-date,1,2\n"
        f"testai,{model},2024-09-01T00:00:00Z,0.0000000001,2\n"
    )
    with stack.http() as client:
        imported = client.post("/api/admin/model-prices/import", json={"format": "csv", "csv": csv_text}).json()["data"]
        again = client.post("/api/admin/model-prices/import", json={"format": "csv", "csv": csv_text}).json()["data"]
        bad_format = client.post("/api/admin/model-prices/import", json={"format": "xml"})
        bad_price = client.put(
            "/api/admin/model-prices",
            json={
                "price": {
                    "provider": "testai",
                    "model": model,
                    "effectiveFrom": "2024-01-01T00:00:00Z",
                    "outputPerMillion": "abc",
                }
            },
        )
        listed = client.get("/api/admin/model-prices", params={"provider": "testai", "model": model}).json()["data"]
        at = client.get("/api/admin/model-prices", params={"model": model, "at": "2024-03-01T00:00:00Z"}).json()
        json_import = client.post(
            "/api/admin/model-prices/import",
            json={
                "format": "json",
                "prices": [
                    {
                        "provider": "testai",
                        "model": model,
                        "effectiveFrom": "2025-01-01T00:00:00Z",
                        "inputPerMillion": "9",
                    }
                ],
            },
        )
        price_id = listed["prices"][0]["priceId"]
        deleted = client.delete(f"/api/admin/model-prices/{price_id}")
        missing = client.delete(f"/api/admin/model-prices/{price_id}")
    assert (imported["imported"], imported["updated"], imported["rejected"]) == (1, 0, 3)
    assert {(e["row"], e["field"]) for e in imported["errors"]} == {
        (2, "inputPerMillion"),
        (3, "effectiveFrom"),
        (4, "inputPerMillion"),
    }
    assert (again["imported"], again["updated"]) == (0, 1)
    assert bad_format.status_code == 400 and "format" in bad_format.text
    assert bad_price.status_code == 400
    assert bad_price.json()["error"]["details"][0]["fieldViolations"][0]["field"] == "price.outputPerMillion"
    assert listed["prices"][0]["inputPerMillion"] == "1.5"
    assert [p["inputPerMillion"] for p in at["data"]["prices"]] == ["1.5"]
    assert json_import.json()["data"]["imported"] == 1
    assert deleted.status_code == 200
    assert missing.status_code == 404


def test_default_price_list_is_seeded(stack: Stack) -> None:
    with stack.http() as client:
        data = client.get("/api/admin/model-prices", params={"provider": "openai", "model": "gpt-4o"}).json()["data"]
    assert data["prices"][0]["inputPerMillion"] == "2.5"
    assert data["prices"][0]["effectiveFrom"] == "2024-01-01T00:00:00Z"


def test_ingestion_status_shape(stack: Stack) -> None:
    with stack.http() as client:
        response = client.get("/api/admin/analytics/ingestion-status")
    assert response.status_code == 200
    data = response.json()["data"]
    assert set(data["counts"]) == {"accepted", "duplicate", "rejected", "unpriced", "late"}
    assert data["counts"]["duplicate"] > 0 and data["counts"]["rejected"] > 0
    assert "lastEventTime" in data and data["eventsPerMinute60m"] > 0
    assert json.dumps(data)  # plain JSON numbers, no int64 strings
    assert isinstance(data["counts"]["accepted"], int | float)
    assert Counter(type(v).__name__ for v in data["counts"].values())["str"] == 0
