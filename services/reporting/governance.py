"""API keys (create, list, revoke) and reading the audit log: the governance routes of issue 7.

Verification of keys on every call lives in tally/runtime/access.py (all services); writing the
audit log in tally/runtime/audit.py. The audit log is read-only through the API.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from tally.reporting.v1 import reporting_pb2
from tally.runtime.access import ROLES, display_prefix, new_token
from tally.runtime.db import Database
from tally.runtime.errors import NotFound
from tally.runtime.validation import Violations, decode_page_token, encode_page_token, page_size, require_uuid

_KEY_COLUMNS = "api_key_id, name, role, key_prefix, created_at, expires_at, revoked_at, last_used_at"
_OUTCOMES = ("success", "denied", "error")


def _ts(at: datetime | None) -> timestamp_pb2.Timestamp | None:
    if at is None:
        return None
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(at)
    return value


def _api_key(row: dict[str, Any]) -> reporting_pb2.ApiKey:
    return reporting_pb2.ApiKey(
        api_key_id=str(row["api_key_id"]),
        name=row["name"],
        role=row["role"],
        key_prefix=row["key_prefix"],
        created_at=_ts(row["created_at"]),
        expires_at=_ts(row["expires_at"]),
        revoked_at=_ts(row["revoked_at"]),
        last_used_at=_ts(row["last_used_at"]),
    )


def _position(token: str) -> tuple[str, str] | None:
    position = decode_page_token(token)
    if position is None:
        return None
    violations = Violations()
    if len(position) != 2 or not all(isinstance(p, str) for p in position):
        violations.add("pageToken", "not a token returned by this API")
    violations.raise_if_any()
    return str(position[0]), str(position[1])


class ApiKeyStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, request: reporting_pb2.CreateApiKeyRequest) -> reporting_pb2.CreatedApiKey:
        violations = Violations()
        name = request.name.strip()
        if not name:
            violations.add("name", "required")
        elif len(name) > 200:
            violations.add("name", "must be at most 200 characters")
        role = request.role.strip().lower()
        if role not in ROLES:
            violations.add("role", f"must be one of {', '.join(ROLES)}")
        expires_at = request.expires_at.ToDatetime(UTC) if request.HasField("expires_at") else None
        if expires_at is not None and expires_at <= datetime.now(UTC):
            violations.add("expiresAt", "must be in the future")
        violations.raise_if_any()
        key_id = uuid.uuid4()
        token, digest = new_token(key_id)
        row = await self._db.fetch_one(
            f"""INSERT INTO api_keys (api_key_id, name, role, key_prefix, secret_sha256, expires_at)
                VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_KEY_COLUMNS}""",  # noqa: S608
            (key_id, name, role, display_prefix(token), digest, expires_at),
        )
        assert row is not None
        return reporting_pb2.CreatedApiKey(api_key=_api_key(row), secret=token)

    async def list_keys(self, request: reporting_pb2.ListApiKeysRequest) -> reporting_pb2.ApiKeyPage:
        size = page_size(request.page_size)
        position = _position(request.page_token)
        clauses = ["TRUE"]
        params: dict[str, Any] = {"limit": size + 1}
        if not request.include_revoked:
            clauses.append("revoked_at IS NULL")
        if position is not None:
            clauses.append("(created_at, api_key_id) < (%(after_at)s::timestamptz, %(after_id)s::uuid)")
            params["after_at"], params["after_id"] = position
        rows = await self._db.fetch_all(
            f"""SELECT {_KEY_COLUMNS} FROM api_keys WHERE {" AND ".join(clauses)}
                ORDER BY created_at DESC, api_key_id DESC LIMIT %(limit)s""",  # noqa: S608
            params,
        )
        page = reporting_pb2.ApiKeyPage(api_keys=[_api_key(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            page.next_page_token = encode_page_token([last["created_at"].isoformat(), str(last["api_key_id"])])
        return page

    async def revoke(self, api_key_id: str) -> reporting_pb2.ApiKey:
        key_id = require_uuid(api_key_id, "apiKeyId")
        row = await self._db.fetch_one(
            f"""UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE api_key_id = %s
                RETURNING {_KEY_COLUMNS}""",  # noqa: S608
            (key_id,),
        )
        if row is None:
            raise NotFound(f"API key {key_id} not found", metadata={"apiKeyId": str(key_id)})
        return _api_key(row)


class AuditLogReader:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def list_entries(self, request: reporting_pb2.ListAuditLogRequest) -> reporting_pb2.AuditLogPage:
        size = page_size(request.page_size)
        position = _position(request.page_token)
        violations = Violations()
        outcome = request.outcome.strip().lower()
        if outcome and outcome not in _OUTCOMES:
            violations.add("outcome", "must be success, denied or error")
        start = request.start.ToDatetime(UTC) if request.HasField("start") else None
        end = request.end.ToDatetime(UTC) if request.HasField("end") else None
        if start is not None and end is not None and end <= start:
            violations.add("end", "must be after start")
        violations.raise_if_any()
        clauses = ["TRUE"]
        params: dict[str, Any] = {"limit": size + 1}
        if request.principal:
            clauses.append("principal = %(principal)s")
            params["principal"] = request.principal.strip()
        if request.operation:
            # Either the full "package.Service/Method" or just the method name.
            clauses.append("(operation = %(operation)s OR operation LIKE %(suffix)s)")
            params["operation"] = request.operation.strip().lstrip("/")
            params["suffix"] = "%/" + request.operation.strip().replace("%", "").replace("_", r"\_")
        if outcome:
            clauses.append("outcome = %(outcome)s")
            params["outcome"] = outcome
        if start is not None:
            clauses.append("time >= %(start)s")
            params["start"] = start
        if end is not None:
            clauses.append("time < %(end)s")
            params["end"] = end
        if position is not None:
            clauses.append("(time, entry_id) < (%(after_at)s::timestamptz, %(after_id)s::uuid)")
            params["after_at"], params["after_id"] = position
        rows = await self._db.fetch_all(
            f"""SELECT entry_id, time, operation, principal, role, parameters, client_ip, correlation_id,
                       outcome, status_code, duration_ms
                FROM audit_log WHERE {" AND ".join(clauses)}
                ORDER BY time DESC, entry_id DESC LIMIT %(limit)s""",  # noqa: S608
            params,
        )
        page = reporting_pb2.AuditLogPage()
        for row in rows[:size]:
            parameters = struct_pb2.Struct()
            parameters.update(row["parameters"] or {})
            page.entries.append(
                reporting_pb2.AuditLogEntry(
                    entry_id=str(row["entry_id"]),
                    time=_ts(row["time"]),
                    operation=row["operation"],
                    principal=row["principal"],
                    role=row["role"],
                    parameters=parameters,
                    client_ip=row["client_ip"],
                    correlation_id=row["correlation_id"],
                    outcome=row["outcome"],
                    status_code=row["status_code"],
                    duration_ms=row["duration_ms"],
                    timestamp=_ts(row["time"]),
                    level=_LEVELS.get(row["outcome"], "Error"),
                    message=audit_message(row["operation"], row["outcome"], row["status_code"]),
                    properties=reporting_pb2.AuditProperties(
                        operation=short_operation(row["operation"]),
                        virtual_key_id=str(_first(row["parameters"], "keyId", "virtualKeyId")),
                        period=str(_first(row["parameters"], "period")),
                        requested_by=row["principal"],
                        ip_address=row["client_ip"],
                        correlation_id=row["correlation_id"],
                    ),
                )
            )
        if len(rows) > size:
            last = rows[size - 1]
            page.next_page_token = encode_page_token([last["time"].isoformat(), str(last["entry_id"])])
        return page


_LEVELS = {"success": "Information", "denied": "Warning", "error": "Error"}
_VERBS = {
    "Get": "accessed", "List": "listed", "Update": "changed", "Upsert": "changed", "Create": "created",
    "Delete": "deleted", "Export": "exported", "Import": "imported", "Run": "run", "Replay": "replayed",
    "Enable": "enabled", "Disable": "disabled", "Reconcile": "reconciled", "Recalculate": "recalculated",
    "Compare": "compared", "Record": "recorded",
}  # fmt: skip


def short_operation(operation: str) -> str:
    """ "tally.analytics.v1.AnalyticsService/GetUsageTrends" -> "Analytics.GetUsageTrends"."""
    service, _, method = operation.rpartition("/")
    return f"{service.rsplit('.', 1)[-1].removesuffix('Service')}.{method}"


def audit_message(operation: str, outcome: str, status_code: str) -> str:
    """A sentence for an audit entry: "GetVirtualKeyAnalytics" -> "Virtual key analytics accessed";
    " (denied)" or " (failed: <status>)" unless it succeeded."""
    method = operation.rpartition("/")[2]
    words = re.findall(r"[A-Z][a-z0-9]*|[a-z0-9]+", method)
    verb = words[0] if words else ""
    done = _VERBS.get(verb)
    rest = " ".join(w.lower() for w in (words[1:] if done else words)) or method
    text = f"{rest[:1].upper()}{rest[1:]} {done or 'called'}"
    if outcome == "denied":
        return f"{text} (denied)"
    if outcome != "success":
        return f"{text} (failed: {status_code})"
    return text


def _first(parameters: dict[str, Any] | None, *names: str) -> Any:
    for name in names:
        value = (parameters or {}).get(name)
        if isinstance(value, str) and value:
            return value
    return ""
