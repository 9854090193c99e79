"""Roles, API keys and the audit log (issue 7 items 1 and 2), through the real Envoy and services."""

from __future__ import annotations

import ipaddress
import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from services.reporting.governance import audit_message, short_operation
from tally.analytics.v1 import analytics_pb2
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.ingest.v1 import ingest_pb2
from tally.options.v1 import options_pb2
from tally.reporting.v1 import reporting_pb2
from tally.runtime.access import REQUEST_PATH_PERMISSIONS, ROLE_PERMISSIONS, ROLES, method_permissions
from tally.runtime.config import ServiceName
from tests.conftest import Stack

OPENAPI = Path(__file__).resolve().parent.parent / "gateway" / "openapi.json"
SERVICES = {
    d.services_by_name[name].name: d.services_by_name[name].full_name
    for d, name in (
        (analytics_pb2.DESCRIPTOR, "AnalyticsService"),
        (budget_pb2.DESCRIPTOR, "BudgetService"),
        (ingest_pb2.DESCRIPTOR, "IngestService"),
        (reporting_pb2.DESCRIPTOR, "ReportingService"),
    )
}
PERMISSIONS = method_permissions(SERVICES.values())

# Bodies that pass authorization but that the service refuses (400/404), so walking every route
# as an admin changes nothing other tests rely on. Path variables are "not-a-uuid" for the same
# reason. Routes not listed get {}.
HARMLESS_BODIES: dict[str, dict[str, Any]] = {
    "UpdateScheduledReports": {"reports": [{"name": ""}]},
    "UpdateWebhooks": {"enabled": True, "endpoints": [{"url": "not a url", "secret": "whsec_TOPSECRETVALUE"}]},
    "UpdateBudgetAlerts": {"globalBudgetAlerts": {"thresholds": [{"percentage": -5}]}},
    "UpdateGlobalBudget": {"maxBudget": -1},
    "ImportModelPrices": {"format": "bogus"},
    "UpsertModelPrice": {"price": {"provider": ""}},
    "CreateReport": {"reportName": ""},
    "CreateApiKey": {"name": "", "role": "nobody"},
    "DeleteDataSubject": {"endUserId": ""},
    "ExportDataSubject": {"endUserId": ""},
    "RecalculateCosts": {"startDate": "not-a-date"},
    "RecordUsageBatch": {"events": [{"requestId": ""}]},
}


# POST routes that only read (or, for usage, were rejected item by item): success is fine.
READS_BY_POST = {"ExportBilling", "ExportUsage", "CompareVirtualKeys", "ReconcileBudgets", "RecordUsageBatch"}


@dataclass(frozen=True)
class Route:
    verb: str
    path: str
    service: str
    method: str

    @property
    def full_method(self) -> str:
        return f"/{SERVICES[self.service]}/{self.method}"

    @property
    def permission(self) -> int:
        return PERMISSIONS[self.full_method]

    @property
    def url(self) -> str:
        return re.sub(r"\{[^}]+\}", "not-a-uuid", self.path)


def routes() -> list[Route]:
    document = json.loads(OPENAPI.read_text())
    found = []
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            service, _, method = operation["operationId"].partition(".")
            found.append(Route(verb.upper(), path, service, method))
    return found


def create_key(client: httpx.Client, role: str, **extra: Any) -> tuple[str, str]:
    response = client.post("/api/admin/api-keys", json={"name": f"test {role}", "role": role, **extra})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["apiKey"]["role"] == role
    assert data["secret"].startswith("tally_")
    return data["apiKey"]["apiKeyId"], data["secret"]


def audit_entries(client: httpx.Client, **filters: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    token = ""
    while True:
        params = {**filters, "pageSize": "1000", **({"pageToken": token} if token else {})}
        response = client.get("/api/admin/audit-log", params=params)
        assert response.status_code == 200, response.text
        page = response.json()["data"]
        entries.extend(page["entries"])
        token = page["nextPageToken"]
        if not token:
            return entries


def wait_for_audit(client: httpx.Client, correlation_ids: set[str], **filters: str) -> dict[str, dict[str, Any]]:
    """Entries by correlation id, once all of them were written (the writer flushes in batches)."""
    deadline = time.monotonic() + 15
    while True:
        entries = audit_entries(client, **filters)
        found = {e["correlationId"]: e for e in entries if e["correlationId"] in correlation_ids}
        if set(found) == correlation_ids or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_every_rpc_declares_a_permission() -> None:
    for service in SERVICES.values():
        for method in PERMISSIONS:
            if method.startswith(f"/{service}/"):
                assert PERMISSIONS[method] != options_pb2.PERMISSION_UNSPECIFIED, method
    assert len(PERMISSIONS) == sum(
        len(d.services_by_name[s.rsplit(".", 1)[1]].methods)
        for d, s in zip(
            (analytics_pb2.DESCRIPTOR, budget_pb2.DESCRIPTOR, ingest_pb2.DESCRIPTOR, reporting_pb2.DESCRIPTOR),
            SERVICES.values(),
            strict=True,
        )
    )


def test_every_route_with_every_role(stack: Stack) -> None:
    """Walks every REST route of the OpenAPI document as the master key and as a key of each role;
    403 exactly when the role lacks the route's declared permission. Then every admin call made
    appears in the audit log with the right principal, role and outcome."""
    all_routes = routes()
    assert len(all_routes) >= 50
    secrets = [stack.key]
    with stack.http() as admin:
        principals: dict[str, tuple[str, str, str]] = {"master": ("master", "admin", stack.key)}
        for role in ROLES:
            key_id, secret = create_key(admin, role)
            principals[role] = (key_id, role, secret)
            secrets.append(secret)
    calls: list[tuple[str, str, Route, int]] = []  # principal id, correlation id, route, HTTP status
    problems: list[str] = []
    for label, (principal_id, role, secret) in principals.items():
        with stack.http(key=secret) as client:
            for route in all_routes:
                allowed = route.permission in ROLE_PERMISSIONS[role]
                correlation_id = f"gov-{label}-{uuid.uuid4().hex}"
                body = HARMLESS_BODIES.get(route.method, {}) if route.verb in ("POST", "PUT") else None
                response = client.request(
                    route.verb,
                    route.url,
                    json=body,
                    headers={"x-correlation-id": correlation_id, "x-forwarded-for": "203.0.113.9"},
                )
                where = f"{label} {route.verb} {route.path} ({route.method}): {response.status_code}"
                where += f" {response.text[:300]}"
                if allowed:
                    if response.status_code in (401, 403):
                        problems.append(where)
                    # Only reads (and refused usage) may succeed here: mutations fail validation.
                    mutating = route.verb in ("PUT", "POST", "DELETE") and route.method not in READS_BY_POST
                    if mutating and response.status_code < 400:
                        problems.append("mutated: " + where)
                else:
                    error = response.json().get("error", {}) if response.status_code == 403 else {}
                    if error.get("status") != "PERMISSION_DENIED" or role not in error.get("message", ""):
                        problems.append(where)
                calls.append((principal_id, correlation_id, route, response.status_code))
    assert not problems, "\n".join(problems)

    # The audit log: every admin call (not the request path) with principal, role and outcome.
    audited = [c for c in calls if c[2].permission not in REQUEST_PATH_PERMISSIONS]
    with stack.http() as admin:
        for label, (principal_id, role, _) in principals.items():
            mine = {c[1]: c for c in audited if c[0] == principal_id}
            entries = wait_for_audit(admin, set(mine), principal=principal_id)
            missing = set(mine) - set(entries)
            assert not missing, f"{label}: {len(missing)} calls missing from the audit log"
            for correlation_id, (_, _, route, status) in mine.items():
                entry = entries[correlation_id]
                assert entry["principal"] == principal_id
                assert entry["role"] == role
                assert entry["operation"] == route.full_method.lstrip("/")
                expected = "success" if status < 400 else "denied" if status in (401, 403) else "error"
                assert entry["outcome"] == expected, (route.method, status, entry)
                # Envoy appends the peer address (a loopback peer becomes the host's own address);
                # what the client claimed in x-forwarded-for is not taken.
                assert ipaddress.ip_address(entry["clientIp"]), entry
                assert entry["clientIp"] != "203.0.113.9"
                # The same entry as an audit trail record (the seed's shape).
                assert entry["timestamp"] == entry["time"]
                assert entry["level"] == {"success": "Information", "denied": "Warning"}.get(expected, "Error")
                service, method = route.full_method.lstrip("/").split("/")
                properties = entry["properties"]
                assert properties["operation"] == service.split(".")[-1].removesuffix("Service") + "." + method
                assert properties["requestedBy"] == principal_id
                assert properties["ipAddress"] == entry["clientIp"]
                assert properties["correlationId"] == correlation_id
                assert properties["virtualKeyId"] == entry["parameters"].get("keyId", "")
                assert entry["message"] and (expected != "denied" or entry["message"].endswith("(denied)"))
        # Request-path calls are not audited.
        request_path = {c[1] for c in calls if c[2].permission in REQUEST_PATH_PERMISSIONS}
        assert request_path
        assert not request_path & {e["correlationId"] for e in audit_entries(admin, operation="RecordUsageBatch")}
        # Secret-like request fields are redacted in the stored parameters.
        webhook_entries = audit_entries(admin, operation="UpdateWebhooks", principal="master")
        assert webhook_entries
        assert all("TOPSECRETVALUE" not in json.dumps(e) for e in webhook_entries)
        text = json.dumps(audit_entries(admin))
    for secret in secrets:
        assert secret not in text
    assert_no_secret_in_logs(stack, secrets)


def assert_no_secret_in_logs(stack: Stack, secrets: list[str]) -> None:
    for name in (*(s.value for s in ServiceName), "gateway"):
        try:
            text = stack.log_text(name)
        except FileNotFoundError:
            continue
        for secret in secrets:
            assert secret not in text, f"a secret appears in the {name} log"
            # Also the random part of an API key (tally_<id>_<random>) on its own; the random part
            # may itself contain "_", so split at most twice.
            if secret.startswith("tally_") and secret.count("_") >= 2:
                random_part = secret.split("_", 2)[2]
                assert len(random_part) >= 16
                assert random_part not in text, f"part of a secret appears in the {name} log"


def test_api_key_create_use_revoke(stack: Stack) -> None:
    with stack.http() as admin:
        key_id, secret = create_key(admin, "analyst")
        listed = admin.get("/api/admin/api-keys").json()["data"]["apiKeys"]
        assert next(k for k in listed if k["apiKeyId"] == key_id)["keyPrefix"] == secret[:14]
        assert secret not in json.dumps(listed)
        with stack.http(key=secret) as analyst:
            assert analyst.get("/api/admin/analytics/usage/live").status_code == 200
            assert analyst.get("/api/admin/api-keys").status_code == 403
            revoked = admin.delete(f"/api/admin/api-keys/{key_id}")
            assert revoked.status_code == 200
            assert revoked.json()["data"]["revokedAt"]
            # At once: the very next call is refused.
            response = analyst.get("/api/admin/analytics/usage/live")
            assert response.status_code == 401
            assert response.json()["error"]["status"] == "UNAUTHENTICATED"
        # Idempotent revoke; unknown id 404; revoked keys hidden unless asked for.
        assert admin.delete(f"/api/admin/api-keys/{key_id}").status_code == 200
        assert admin.delete(f"/api/admin/api-keys/{uuid.uuid4()}").status_code == 404
        assert key_id not in {k["apiKeyId"] for k in admin.get("/api/admin/api-keys").json()["data"]["apiKeys"]}
        everything = admin.get("/api/admin/api-keys", params={"includeRevoked": "true"}).json()["data"]["apiKeys"]
        assert key_id in {k["apiKeyId"] for k in everything}
        # last_used_at is written with the next audit batch.
        deadline = time.monotonic() + 10
        while True:
            keys = admin.get("/api/admin/api-keys", params={"includeRevoked": "true"}).json()["data"]["apiKeys"]
            used = next(k for k in keys if k["apiKeyId"] == key_id).get("lastUsedAt")
            if used or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert used
        # A forged secret with a real key id is refused.
        with stack.http(key=secret[:-4] + "AAAA") as forged:
            assert forged.get("/api/admin/analytics/usage/live").status_code == 401
    assert_no_secret_in_logs(stack, [stack.key, secret])


def test_api_key_expiry(stack: Stack) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=2)
    with stack.http() as admin:
        past = admin.post(
            "/api/admin/api-keys",
            json={"name": "past", "role": "operator", "expiresAt": "2020-01-01T00:00:00Z"},
        )
        assert past.status_code == 400
        _, secret = create_key(admin, "operator", expiresAt=expires.isoformat().replace("+00:00", "Z"))
    with stack.http(key=secret) as operator:
        assert operator.get("/api/admin/analytics/ingestion-status").status_code == 200
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
        assert operator.get("/api/admin/analytics/ingestion-status").status_code == 401


def test_roles_over_grpc_and_the_request_path(stack: Stack) -> None:
    """A gateway-role key may authorize spend; an analyst key may not (PERMISSION_DENIED)."""
    with stack.http() as admin:
        _, gateway = create_key(admin, "gateway")
        _, analyst = create_key(admin, "analyst")
    with stack.channel(ServiceName.BUDGET) as channel:
        stub = budget_pb2_grpc.BudgetServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetGlobalBudget(
                budget_pb2.GetGlobalBudgetRequest(), timeout=5, metadata=[("authorization", f"Bearer {gateway}")]
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        request = budget_pb2.ReleaseRequest(request_id=str(uuid.uuid4()))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Release(request, timeout=5, metadata=[("authorization", f"Bearer {analyst}")])
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        code = grpc.StatusCode.OK
        try:
            stub.Release(request, timeout=5, metadata=[("authorization", f"Bearer {gateway}")])
        except grpc.RpcError as exc:  # the request's own validation, not authorization
            code = exc.code()
        assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def test_audit_log_filters_and_pagination(stack: Stack) -> None:
    with stack.http() as admin:
        marker = f"gov-page-{uuid.uuid4().hex}"
        ids = set()
        for i in range(5):
            cid = f"{marker}-{i}"
            ids.add(cid)
            admin.get("/api/admin/budgets/global", headers={"x-correlation-id": cid})
        entries = wait_for_audit(admin, ids, principal="master", operation="GetGlobalBudget", outcome="success")
        assert set(entries) == ids
        first = min(e["time"] for e in entries.values())
        pages: list[str] = []
        token = ""
        while True:
            params = {"pageSize": "2", "principal": "master", "operation": "GetGlobalBudget", "start": first}
            if token:
                params["pageToken"] = token
            page = admin.get("/api/admin/audit-log", params=params).json()["data"]
            pages.extend(e["correlationId"] for e in page["entries"])
            token = page["nextPageToken"]
            if not token:
                break
        assert ids <= set(pages)
        assert len(pages) == len(set(pages))
        assert admin.get("/api/admin/audit-log", params={"outcome": "maybe"}).status_code == 400
        nothing = admin.get("/api/admin/audit-log", params={"end": "2000-01-01T00:00:00Z"}).json()["data"]
        assert nothing["entries"] == []
        # No route changes audit entries.
        assert admin.delete("/api/admin/audit-log").status_code in (404, 405)
        assert admin.put("/api/admin/audit-log", json={}).status_code in (404, 405)


def test_audit_messages_say_what_happened() -> None:
    analytics = "tally.analytics.v1.AnalyticsService/GetVirtualKeyAnalytics"
    assert short_operation(analytics) == "Analytics.GetVirtualKeyAnalytics"
    assert audit_message(analytics, "success", "OK") == "Virtual key analytics accessed"
    alerts = "tally.budget.v1.BudgetService/UpdateBudgetAlerts"
    assert audit_message(alerts, "denied", "PERMISSION_DENIED") == "Budget alerts changed (denied)"
    assert audit_message(alerts, "error", "INVALID_ARGUMENT") == "Budget alerts changed (failed: INVALID_ARGUMENT)"
