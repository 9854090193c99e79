"""The REST admin API through the real Envoy: auth, envelopes, error bodies, routing."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from tally.usage.schema import HOURLY
from tests.conftest import Stack


def test_pipeline_health_reports_real_dependencies(stack: Stack) -> None:
    with stack.http() as client:
        response = client.get("/api/admin/analytics/pipeline-health")
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    data = body["data"]
    assert data["status"] == "healthy", json.dumps(data)
    components = data["components"]
    assert set(components) == {
        "postgres",
        "timescaledb",
        "redis",
        "ingest",
        "analytics",
        "budget",
        "reporting",
        "gateway",
    }
    assert all(c["status"] == "up" for c in components.values())
    assert components["postgres"]["version"].startswith("15.")
    assert components["timescaledb"]["version"].startswith("2.")
    assert "license=apache" in components["timescaledb"]["detail"]
    assert components["redis"]["version"]
    assert data["rollupConsistency"]["status"] == "consistent"
    assert set(data["outbox"]) == {"pending", "deadLettered"}


def test_pipeline_health_sees_a_stopped_redis(stack: Stack) -> None:
    """Reachability is probed for real: with Redis down the answer degrades. The live view then
    answers from the database."""
    stack.redis.stop()
    try:
        with stack.http() as client:
            data = client.get("/api/admin/analytics/pipeline-health").json()["data"]
            live = client.get("/api/admin/analytics/usage/live")
        assert data["components"]["redis"]["status"] == "down"
        assert data["status"] == "degraded"
        assert live.status_code == 200, live.text
        hour = datetime.fromisoformat(live.json()["data"]["timestamp"].replace("Z", "+00:00"))
        hour = hour.replace(minute=0, second=0, microsecond=0)
        with psycopg.connect(stack.postgres.url, password=stack.postgres.password) as conn:
            row = conn.execute(
                "SELECT count(*) FROM usage_events WHERE event_time >= %s AND event_time < %s",
                (hour, hour + timedelta(hours=1)),
            ).fetchone()
        assert row is not None and live.json()["data"]["realTimeMetrics"]["requestsThisHour"] == row[0]
    finally:
        stack.redis.start()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Bearer", "Basic dGFsbHk6eA==", "{key}"])
def test_missing_or_wrong_key_is_401_json(stack: Stack, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization.format(key=stack.key)}
    with stack.http(key=None) as client:
        response = client.get("/api/admin/analytics/pipeline-health", headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()
    assert error["success"] is False
    assert error["error"]["status"] == "UNAUTHENTICATED"
    assert error["error"]["httpStatus"] == 401
    assert "Bearer" in error["error"]["message"]
    assert stack.key not in response.text


def test_bearer_scheme_is_case_insensitive(stack: Stack) -> None:
    with stack.http(key=None) as client:
        response = client.get("/api/admin/analytics/pipeline-health", headers={"Authorization": f"bearer {stack.key}"})
    assert response.status_code == 200


def test_field_violation_is_400_naming_the_field(stack: Stack) -> None:
    with stack.http() as client:
        response = client.put("/api/admin/virtual-keys/not-a-uuid", json={"keyName": "x"})
        blank = client.put(f"/api/admin/virtual-keys/{uuid.uuid4()}", json={"keyName": "  "})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    bad_request = next(d for d in error["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    assert [(v["field"], v["description"]) for v in bad_request["fieldViolations"]] == [
        ("keyId", "must be a UUID, got 'not-a-uuid'")
    ]
    assert blank.status_code == 400
    assert "keyName" in blank.json()["error"]["message"]


def test_virtual_key_round_trip_and_not_found(stack: Stack) -> None:
    key_id = str(uuid.uuid4())
    with stack.http() as client:
        missing = client.get(f"/api/admin/virtual-keys/{key_id}")
        created = client.put(f"/api/admin/virtual-keys/{key_id}", json={"keyName": "Production API Key"})
        fetched = client.get(f"/api/admin/virtual-keys/{key_id}")
    assert missing.status_code == 404
    assert missing.json()["error"]["status"] == "NOT_FOUND"
    assert created.status_code == 200
    assert fetched.json() == created.json()
    data = fetched.json()["data"]
    assert data["keyId"] == key_id
    assert data["keyName"] == "Production API Key"
    assert data["enabled"] is True
    assert data["isTest"] is False  # zero values are printed, not dropped


def test_virtual_keys_paginate(stack: Stack) -> None:
    with stack.http() as client:
        for index in range(5):
            client.put(f"/api/admin/virtual-keys/{uuid.uuid4()}", json={"keyName": f"page-test-{index}"})
        seen: list[str] = []
        token = ""
        while True:
            params: dict[str, str | int] = {"pageSize": 2}
            if token:
                params["pageToken"] = token
            page = client.get("/api/admin/virtual-keys", params=params).json()["data"]
            seen += [k["keyName"] for k in page["keys"]]
            token = page["nextPageToken"]
            if not token:
                break
        bad = client.get("/api/admin/virtual-keys", params={"pageToken": "%%%"})
    assert [n for n in seen if n.startswith("page-test-")] == [f"page-test-{i}" for i in range(5)]
    assert seen == sorted(seen)
    assert bad.status_code == 400


def test_unknown_route_is_404_json(stack: Stack) -> None:
    with stack.http() as client:
        response = client.get("/api/admin/no/such/route")
        wrong_verb = client.delete("/api/admin/analytics/pipeline-health")
        wrong_verb_with_id = client.post(f"/api/admin/virtual-keys/{uuid.uuid4()}/budget", json={})
    assert response.status_code == 404
    assert response.json()["success"] is False
    assert response.json()["error"]["httpStatus"] == 404
    assert response.json()["error"]["status"] == "NOT_FOUND"
    # A known path with a method it does not take: 405, with the methods it does.
    for r, allowed in ((wrong_verb, "GET"), (wrong_verb_with_id, "GET, PUT")):
        assert r.status_code == 405
        assert r.headers["allow"] == allowed
        assert r.json()["success"] is False
        assert r.json()["error"]["status"] == "UNIMPLEMENTED"
        assert allowed in r.json()["error"]["message"]


def test_unknown_query_parameter_is_400_naming_it(stack: Stack) -> None:
    with stack.http() as client:
        response = client.get("/api/admin/analytics/usage/trends", params={"period": "7d", "colour": "blue"})
    assert response.status_code == 400
    error = response.json()
    assert error["success"] is False
    assert error["error"]["status"] == "INVALID_ARGUMENT"
    assert "colour" in error["error"]["message"]
    assert _field_violations(response) == ["colour"]


def test_a_value_of_the_wrong_type_is_400_naming_the_field_by_its_json_name(stack: Stack) -> None:
    """The transcoder refuses it naming the proto field (filters.min_cost); the answer's field
    violation names it as the JSON has it."""
    with stack.http() as client:
        response = client.post("/api/admin/analytics/export", json={"format": "csv", "filters": {"minCost": "abc"}})
    assert response.status_code == 400
    assert response.json()["success"] is False
    assert _field_violations(response) == ["filters.minCost"]


def _field_violations(response: httpx.Response) -> list[str]:
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    bad_request = next(d for d in error["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    return [v["field"] for v in bad_request["fieldViolations"]]


def test_unknown_body_field_is_400_naming_it_and_changes_nothing(stack: Stack) -> None:
    """The transcoder would drop a JSON field the request does not have; the gateway refuses the
    request instead, naming the field by its path (a typo must not wipe alerts, widen an export
    or bill nothing). Both JSON names of a field are accepted, and map keys are data."""
    key_id = str(uuid.uuid4())
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {"requestId": uuid.uuid4().hex, "eventTime": now, "virtualKeyId": key_id, "provider": "p", "model": "m",
             "operation": "chat.completions", "inputTokens": 10, "tags": {"anyKey": "x", "team": "y"}}  # fmt: skip
    with stack.http() as client:
        alerts = client.get("/api/admin/budgets/alerts").json()["data"]
        typo = client.put("/api/admin/budgets/alerts", json={"globalBudgetAlert": {"enabled": False}})
        assert client.get("/api/admin/budgets/alerts").json()["data"] == alerts
        nested = client.post(
            "/api/admin/analytics/export",
            json={"format": "csv", "period": "30d", "filters": {"virtualKey": [key_id]}},
        )
        batch = client.post("/api/admin/usage/batch", json={"events": [event, {**event, "inputTokenz": 5}]})
        assert client.get(f"/api/admin/virtual-keys/{key_id}").status_code == 404  # nothing stored
        good = client.post("/api/admin/usage/batch", json={"events": [{**event, "input_tokens": 10}]})
        named = client.put(f"/api/admin/virtual-keys/{key_id}", json={"key_name": "snake case works"})
    assert typo.status_code == 400
    assert _field_violations(typo) == ["globalBudgetAlert"]
    assert "globalBudgetAlert" in typo.json()["error"]["message"]
    assert nested.status_code == 400 and _field_violations(nested) == ["filters.virtualKey"]
    assert batch.status_code == 400 and _field_violations(batch) == ["events[1].inputTokenz"]
    assert good.status_code == 200, good.text
    assert good.json()["data"]["accepted"] == 1, good.text
    assert named.status_code == 200 and named.json()["data"]["keyName"] == "snake case works"


def test_malformed_json_body_is_400(stack: Stack) -> None:
    with stack.http() as client:
        response = client.put(
            f"/api/admin/virtual-keys/{uuid.uuid4()}",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["success"] is False


def test_unimplemented_handler_maps_to_unimplemented() -> None:
    """Every route is built now (the audit log was the last, issue 7), so no route answers 501
    any more; a handler raising NotImplementedError still becomes UNIMPLEMENTED (HTTP 501)."""
    from tally.runtime.interceptor import as_service_error

    error = as_service_error(NotImplementedError(), "/tally.x.v1.XService/Y")
    assert error is not None
    assert error.code.name == "UNIMPLEMENTED"
    assert "not implemented yet" in error.message


def test_openapi_document_is_served(stack: Stack) -> None:
    with stack.http(key=None) as client:
        response = client.get("/api/admin/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert "get" in document["paths"]["/api/admin/analytics/usage/live"]
    assert "post" in document["paths"]["/api/admin/virtual-keys/compare"]
    params = {p["name"] for p in document["paths"]["/api/admin/analytics/usage/trends"]["get"]["parameters"]}
    assert {"period", "granularity"} <= params


def test_correlation_id_is_logged(stack: Stack) -> None:
    correlation_id = f"test-{uuid.uuid4().hex}"
    with stack.http() as client:
        client.get("/api/admin/analytics/pipeline-health", headers={"x-correlation-id": correlation_id})
    lines = [json.loads(line) for line in stack.log_text("analytics").splitlines() if correlation_id in line]
    assert lines, "no log line carried the correlation id"
    assert all(line["correlationId"] == correlation_id for line in lines)


def test_pipeline_health_detects_a_rollup_that_disagrees_with_raw_events(stack: Stack) -> None:
    import psycopg

    from tally.usage.histogram import LATENCY_COLUMNS, TTFT_COLUMNS

    key = str(uuid.uuid4())
    sums = [
        "requests",
        "successes",
        "failures",
        "input_tokens",
        "output_tokens",
        "cached_read_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
        "images",
        "audio_seconds",
        "cost_micros",
        "provider_cost_requests",
        "unpriced_requests",
        "late_requests",
        "streaming_requests",
        "tool_requests",
        "small_input_requests",
        "small_input_input_tokens",
        "small_input_output_tokens",
        "small_input_cost_micros",
        "latency_ms_sum",
        "ttft_ms_sum",
        "ttft_count",
        *LATENCY_COLUMNS,
        *TTFT_COLUMNS,
    ]
    values = ["1" if c == "requests" else "0" for c in sums]
    with psycopg.connect(stack.postgres.url, password=stack.postgres.password, autocommit=True) as conn:
        conn.execute(
            f"""INSERT INTO usage_rollup_hourly_delta (bucket, key_id, provider, model, operation, status_class,
                    error_type, {", ".join(sums)})
                VALUES (date_trunc('hour', now()) - interval '1 hour', %s, 'ghost', 'ghost', 'chat.completions',
                        '2xx', '', {", ".join(values)})""",  # noqa: S608
            (key,),
        )
        try:
            # The check runs in the background every ANALYTICS_CONSISTENCY_CHECK_SECONDS (1 s here).
            deadline = time.monotonic() + 20
            with stack.http() as client:
                while True:
                    data = client.get("/api/admin/analytics/pipeline-health").json()["data"]
                    if data["rollupConsistency"]["status"] == "inconsistent" or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
        finally:
            for table in HOURLY.tables:
                conn.execute(f"DELETE FROM {table} WHERE key_id = %s", (key,))  # noqa: S608
    assert data["rollupConsistency"]["status"] == "inconsistent"
    assert data["status"] == "degraded"


def test_the_first_calls_after_the_database_dropped_every_connection_succeed(stack: Stack) -> None:
    """Pooled connections are checked when taken: after PostgreSQL dropped them all (a restart),
    the next call of every service gets a fresh one instead of failing with 503."""
    routes = [
        "/api/admin/analytics/usage/trends?period=24h",
        "/api/admin/budgets/status",
        "/api/admin/audit-log?pageSize=1",
        "/api/admin/analytics/ingestion-status",
    ]
    with stack.http() as client:
        assert [client.get(route).status_code for route in routes] == [200] * len(routes)
        with psycopg.connect(stack.postgres.url, password=stack.postgres.password, autocommit=True) as conn:
            dropped = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchone()
        assert dropped is not None and dropped[0] > 0
        assert [client.get(route).status_code for route in routes] == [200] * len(routes)
