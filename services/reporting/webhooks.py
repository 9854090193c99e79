"""Webhooks: configuration, event producers, batching into the shared outbox, deliveries.

Flow: producers put events into `webhook_events` (one row per subscribed endpoint and event);
a flush pass moves them, batchSize at a time (or one by one without batching), into one outbox
row per delivery (tally/notify), and the delivery workers sign (Standard Webhooks, with the
endpoint's own secret read from `notification_credentials`), send, retry per the endpoint's
retryPolicy and dead-letter. Each hand-over happens in one transaction, so an event is never
lost between stages, and a delivery keeps its webhook-id across retries and replays so
receivers can deduplicate (at-least-once delivery).

Producers, each run by one replica at a time (PostgreSQL advisory locks):
- usage.recorded / cost.calculated: a poller over `usage_events` by `ingested_at`, behind a
  horizon no uncommitted row can precede (the start of the oldest open transaction), with a
  (ingested_at, request_id, event_time) cursor. Ingest is untouched and never waits for it.
- budget.*: the budget service's resumable enforcement event stream (WatchBudgetEvents), its
  last stream id stored with the events it produced.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import grpc
import psycopg
from google.protobuf import timestamp_pb2
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.notify import Notification, enqueue, requeue_dead
from tally.reporting.v1 import reporting_pb2
from tally.runtime.config import Settings
from tally.runtime.db import Database, connection_kwargs
from tally.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from tally.runtime.validation import Violations, decode_page_token, encode_page_token, page_size

log = logging.getLogger("tally.reporting.webhooks")

SOURCE = "reporting.webhooks"
USAGE_TYPES = ("usage.recorded", "cost.calculated")
BUDGET_TYPES = {
    budget_pb2.BUDGET_EVENT_TYPE_THRESHOLD_CROSSED: "budget.threshold_crossed",
    budget_pb2.BUDGET_EVENT_TYPE_BUDGET_EXCEEDED: "budget.exceeded",
    budget_pb2.BUDGET_EVENT_TYPE_KEY_DISABLED: "budget.key_disabled",
    budget_pb2.BUDGET_EVENT_TYPE_KEY_ENABLED: "budget.key_enabled",
    budget_pb2.BUDGET_EVENT_TYPE_COST_SPIKE: "budget.cost_spike",
}
EVENT_TYPES = (*USAGE_TYPES, *BUDGET_TYPES.values(), "budget.*")
DEFAULT_RETRY_DELAY_MS = 5000
DEFAULT_BATCH_SIZE = 100
_USAGE_LOCK = 0x7A11_0601
_BUDGET_LOCK = 0x7A11_0602
_FLUSH_LOCK = 0x7A11_0603
_MASK = "****"
_WHSEC = "whsec_"


def credentials_ref(endpoint_id: uuid.UUID | str) -> str:
    return f"webhook_endpoint:{endpoint_id}"


def mask_token(token: str | None) -> str:
    return f"{_MASK}{token[-4:]}" if token else ""


def mask_secret(secret: str | None) -> str:
    return f"{_WHSEC}{_MASK}{secret[-4:]}" if secret else ""


def new_secret() -> str:
    return _WHSEC + base64.b64encode(secrets.token_bytes(24)).decode()


def subscribes(events: Sequence[str], event_type: str) -> bool:
    return event_type in events or (event_type.startswith("budget.") and "budget.*" in events)


def _ts(at: datetime | None) -> timestamp_pb2.Timestamp | None:
    if at is None:
        return None
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(at.astimezone(UTC))
    return value


# ---------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class EndpointInput:
    endpoint_id: uuid.UUID
    is_new: bool
    url: str
    events: list[str]
    auth_type: str
    token: str | None  # None = keep the stored one
    secret: str | None  # None = keep the stored one (a new endpoint gets a generated one)
    max_retries: int
    retry_delay_ms: int


def _valid_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _valid_secret(secret: str) -> bool:
    if not secret.startswith(_WHSEC):
        return False
    try:
        return len(base64.b64decode(secret[len(_WHSEC) :], validate=True)) >= 16
    except (binascii.Error, ValueError):
        return False


class WebhookStore:
    def __init__(self, db: Database, settings: Settings, wake: Callable[[], None]) -> None:
        self._db = db
        self._settings = settings
        self._wake = wake

    async def get(self) -> reporting_pb2.WebhookConfig:
        async with self._db.transaction() as conn:
            return await self._read(conn)

    async def _read(self, conn: AsyncConnection[Any]) -> reporting_pb2.WebhookConfig:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT * FROM webhook_settings WHERE id = 1")
            settings_row = await cur.fetchone()
            await cur.execute(
                """SELECT e.*, c.signing_secret, c.bearer_token FROM webhook_endpoints e
                   LEFT JOIN notification_credentials c ON c.ref = 'webhook_endpoint:' || e.endpoint_id::text
                   WHERE e.removed_at IS NULL ORDER BY e.position"""
            )
            endpoints = await cur.fetchall()
        config = reporting_pb2.WebhookConfig()
        if settings_row is not None:
            config.enabled = settings_row["enabled"]
            config.batch_settings.enabled = settings_row["batch_enabled"]
            config.batch_settings.batch_size = settings_row["batch_size"]
            config.batch_settings.flush_interval = settings_row["flush_interval"]
        for row in endpoints:
            config.endpoints.append(
                reporting_pb2.WebhookEndpoint(
                    id=str(row["endpoint_id"]),
                    url=row["url"],
                    events=row["events"],
                    authentication=reporting_pb2.WebhookAuthentication(
                        type=row["auth_type"], token=mask_token(row["bearer_token"])
                    ),
                    retry_policy=reporting_pb2.WebhookRetryPolicy(
                        max_retries=row["max_retries"], retry_delay=row["retry_delay_ms"]
                    ),
                    secret=mask_secret(row["signing_secret"]),
                )
            )
        return config

    def _validate(self, request: reporting_pb2.UpdateWebhooksRequest, existing: set[uuid.UUID]) -> list[EndpointInput]:
        violations = Violations()
        out: list[EndpointInput] = []
        seen: set[uuid.UUID] = set()
        batch = request.batch_settings
        if batch.HasField("batch_size") and not 1 <= batch.batch_size <= 1000:
            violations.add("batchSettings.batchSize", "must be between 1 and 1000")
        if batch.flush_interval < 0 or batch.flush_interval > 86400:
            violations.add("batchSettings.flushInterval", "must be between 0 and 86400 seconds")
        if len(request.endpoints) > 50:
            violations.add("endpoints", "at most 50 endpoints")
        for index, endpoint in enumerate(request.endpoints):
            where = f"endpoints[{index}]"
            endpoint_id = uuid.uuid4()
            is_new = True
            if endpoint.id:
                try:
                    endpoint_id = uuid.UUID(endpoint.id)
                except ValueError:
                    violations.add(f"{where}.id", f"must be a UUID, got {endpoint.id[:64]!r}")
                else:
                    if endpoint_id not in existing:
                        violations.add(f"{where}.id", "no such endpoint; leave id out to create one")
                    elif endpoint_id in seen:
                        violations.add(f"{where}.id", "listed twice")
                    is_new = False
                    seen.add(endpoint_id)
            url = endpoint.url.strip()
            if not url:
                violations.add(f"{where}.url", "required")
            elif not _valid_url(url) or len(url) > 2048:
                violations.add(f"{where}.url", f"must be an http(s) URL, got {url[:64]!r}")
            if not endpoint.events:
                violations.add(f"{where}.events", f"at least one of {', '.join(EVENT_TYPES)}")
            for position, event in enumerate(endpoint.events):
                if event not in EVENT_TYPES:
                    violations.add(f"{where}.events[{position}]", f"unknown event {event[:64]!r}")
            auth_type = endpoint.authentication.type.strip().lower() or "none"
            token: str | None = endpoint.authentication.token
            if auth_type not in ("none", "bearer"):
                violations.add(f"{where}.authentication.type", "must be bearer or none")
            if not token or token.startswith(_MASK):
                token = None
            if auth_type == "bearer" and token is None and is_new:
                violations.add(f"{where}.authentication.token", "required with type bearer")
            secret: str | None = endpoint.secret.strip()
            if not secret or secret.startswith(_WHSEC + _MASK):
                secret = None
            elif not _valid_secret(secret):
                violations.add(f"{where}.secret", 'must be "whsec_" followed by base64 of at least 16 bytes')
            retry = endpoint.retry_policy
            if not 0 <= retry.max_retries <= 20:
                violations.add(f"{where}.retryPolicy.maxRetries", "must be between 0 and 20")
            if not 0 <= retry.retry_delay <= 3_600_000:
                violations.add(f"{where}.retryPolicy.retryDelay", "must be between 1 and 3600000 milliseconds")
            out.append(
                EndpointInput(
                    endpoint_id=endpoint_id,
                    is_new=is_new,
                    url=url,
                    events=list(dict.fromkeys(endpoint.events)),
                    auth_type=auth_type,
                    token=token,
                    secret=secret,
                    max_retries=retry.max_retries if endpoint.HasField("retry_policy") else 3,
                    retry_delay_ms=retry.retry_delay or DEFAULT_RETRY_DELAY_MS,
                )
            )
        violations.raise_if_any()
        return out

    async def update(self, request: reporting_pb2.UpdateWebhooksRequest) -> reporting_pb2.WebhookConfig:
        async with self._db.transaction() as conn:
            # One writer at a time: the whole configuration is replaced.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_FLUSH_LOCK + 100,))
            cur = await conn.execute("SELECT endpoint_id FROM webhook_endpoints WHERE removed_at IS NULL")
            existing = {row[0] for row in await cur.fetchall()}
            endpoints = self._validate(request, existing)
            batch = request.batch_settings
            size = batch.batch_size if batch.HasField("batch_size") else DEFAULT_BATCH_SIZE
            await conn.execute(
                """INSERT INTO webhook_settings (id, enabled, batch_enabled, batch_size, flush_interval)
                   VALUES (1, %s, %s, %s, %s)
                   ON CONFLICT (id) DO UPDATE SET enabled = EXCLUDED.enabled,
                       batch_enabled = EXCLUDED.batch_enabled, batch_size = EXCLUDED.batch_size,
                       flush_interval = EXCLUDED.flush_interval, updated_at = now()""",
                (request.enabled, batch.enabled, size, batch.flush_interval),
            )
            kept = [e.endpoint_id for e in endpoints]
            await conn.execute(
                """UPDATE webhook_endpoints SET removed_at = now()
                   WHERE removed_at IS NULL AND NOT (endpoint_id = ANY(%s))""",
                (kept,),
            )
            for position, endpoint in enumerate(endpoints):
                await conn.execute(
                    """INSERT INTO webhook_endpoints
                           (endpoint_id, position, url, events, auth_type, max_retries, retry_delay_ms)
                       VALUES (%s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (endpoint_id) DO UPDATE SET position = EXCLUDED.position, url = EXCLUDED.url,
                           events = EXCLUDED.events, auth_type = EXCLUDED.auth_type,
                           max_retries = EXCLUDED.max_retries, retry_delay_ms = EXCLUDED.retry_delay_ms,
                           updated_at = now()""",
                    (
                        endpoint.endpoint_id,
                        position,
                        endpoint.url,
                        endpoint.events,
                        endpoint.auth_type,
                        endpoint.max_retries,
                        endpoint.retry_delay_ms,
                    ),
                )
                secret = endpoint.secret or (new_secret() if endpoint.is_new else None)
                await conn.execute(
                    """INSERT INTO notification_credentials (ref, signing_secret, bearer_token) VALUES (%s, %s, %s)
                       ON CONFLICT (ref) DO UPDATE SET
                           signing_secret = coalesce(EXCLUDED.signing_secret, notification_credentials.signing_secret),
                           bearer_token = CASE WHEN %s = 'none' THEN NULL
                               ELSE coalesce(EXCLUDED.bearer_token, notification_credentials.bearer_token) END,
                           updated_at = now()""",
                    (
                        credentials_ref(endpoint.endpoint_id),
                        secret,
                        endpoint.token if endpoint.auth_type == "bearer" else None,
                        endpoint.auth_type,
                    ),
                )
            config = await self._read(conn)
        self._wake()
        return config

    # ------------------------------------------------------------------------------------------ deliveries
    async def list_deliveries(
        self, request: reporting_pb2.ListWebhookDeliveriesRequest
    ) -> reporting_pb2.WebhookDeliveryPage:
        size = page_size(request.page_size)
        position = decode_page_token(request.page_token)
        violations = Violations()
        status = request.status.strip().lower()
        if status and status not in ("pending", "delivered", "dead_lettered"):
            violations.add("status", "must be pending, delivered or dead_lettered")
        endpoint_id = None
        if request.endpoint_id:
            try:
                endpoint_id = uuid.UUID(request.endpoint_id)
            except ValueError:
                violations.add("endpointId", "must be a UUID")
        violations.raise_if_any()
        clauses = ["TRUE"]
        params: dict[str, Any] = {"limit": size + 1}
        if status:
            clauses.append("o.status = %(status)s")
            params["status"] = {"dead_lettered": "dead"}.get(status, status)
        if endpoint_id is not None:
            clauses.append("d.endpoint_id = %(endpoint)s")
            params["endpoint"] = endpoint_id
        if position is not None:
            clauses.append("(d.created_at, d.delivery_id) < (%(after_at)s::timestamptz, %(after_id)s)")
            params["after_at"], params["after_id"] = position[0], position[1]
        rows = await self._db.fetch_all(
            f"""{_DELIVERY_SELECT} WHERE {" AND ".join(clauses)}
                ORDER BY d.created_at DESC, d.delivery_id DESC LIMIT %(limit)s""",
            params,
        )
        page = reporting_pb2.WebhookDeliveryPage(deliveries=[_delivery(row) for row in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            page.next_page_token = encode_page_token([last["created_at"].isoformat(), last["delivery_id"]])
        return page

    async def replay(self, delivery_id: str) -> reporting_pb2.WebhookDelivery:
        if not delivery_id:
            raise InvalidArgument.field("deliveryId", "required")
        async with self._db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                """SELECT d.delivery_id, e.max_retries FROM webhook_deliveries d
                   JOIN webhook_endpoints e USING (endpoint_id) WHERE d.delivery_id = %s""",
                (delivery_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no webhook delivery {delivery_id[:80]!r}")
            if not await requeue_dead(conn, delivery_id, extra_attempts=row["max_retries"] + 1):
                raise FailedPrecondition("only a dead-lettered delivery can be replayed")
            await cur.execute(f"{_DELIVERY_SELECT} WHERE d.delivery_id = %s", (delivery_id,))
            replayed = await cur.fetchone()
        self._wake()
        assert replayed is not None
        return _delivery(replayed)


_DELIVERY_SELECT = """
SELECT d.delivery_id, d.endpoint_id, d.url, d.event_types, d.event_count, d.created_at,
       o.status, o.attempts, o.next_attempt_at, o.delivered_at, o.last_error,
       a.started_at AS last_attempt_at, a.status_code AS last_status_code, a.error AS attempt_error
FROM webhook_deliveries d
JOIN notification_outbox o ON o.message_id = d.delivery_id
LEFT JOIN LATERAL (
    SELECT started_at, status_code, error FROM notification_attempts
    WHERE outbox_id = o.id ORDER BY attempt DESC, id DESC LIMIT 1) a ON TRUE
"""


def _delivery(row: dict[str, Any]) -> reporting_pb2.WebhookDelivery:
    status = {"dead": "dead_lettered"}.get(row["status"], row["status"])
    delivery = reporting_pb2.WebhookDelivery(
        delivery_id=row["delivery_id"],
        endpoint_id=str(row["endpoint_id"]),
        url=row["url"],
        event_types=row["event_types"],
        event_count=row["event_count"],
        status=status,
        attempts=row["attempts"],
        last_status_code=row["last_status_code"] or 0,
        last_error=(row["attempt_error"] or row["last_error"] or "") if status != "delivered" else "",
        created_at=_ts(row["created_at"]),
        last_attempt_at=_ts(row["last_attempt_at"]),
        delivered_at=_ts(row["delivered_at"]) if status == "delivered" else None,
        next_attempt_at=_ts(row["next_attempt_at"]) if status == "pending" else None,
    )
    return delivery


# ---------------------------------------------------------------------------------------------- producers
# No row can still appear with ingested_at (= its transaction's start) before the start of the
# oldest transaction open now. Read in its own statement, before the scan's snapshot is taken:
# a transaction that ends in between is then visible to the scan.
_HORIZON = """
SELECT least(now(), coalesce(min(xact_start), now())) FROM pg_stat_activity
WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""

_SCAN = """
WITH batch AS MATERIALIZED (
    SELECT e.* FROM usage_events e
    WHERE e.ingested_at >= %(at)s AND e.ingested_at < %(horizon)s
      AND (e.ingested_at, e.request_id, e.event_time) > (%(at)s, %(rid)s, %(et)s)
      AND e.event_time >= %(at)s - make_interval(secs => %(late)s)
      AND e.event_time < %(horizon)s + make_interval(secs => %(skew)s)
    ORDER BY e.ingested_at, e.request_id, e.event_time
    LIMIT %(limit)s
),
subscriptions AS (
    SELECT * FROM unnest(%(endpoints)s::uuid[], %(types)s::text[]) AS s(endpoint_id, event_type)
),
queued AS (
    INSERT INTO webhook_events (endpoint_id, event_id, event_type, body)
    SELECT s.endpoint_id, ev.id, s.event_type,
           jsonb_build_object('id', ev.id, 'type', s.event_type,
               'timestamp', to_char(b.event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               'data', CASE WHEN s.event_type = 'usage.recorded' THEN jsonb_build_object(
                   'requestId', b.request_id, 'virtualKeyId', b.key_id, 'provider', b.provider, 'model', b.model,
                   'operation', b.operation, 'inputTokens', b.input_tokens, 'outputTokens', b.output_tokens,
                   'cachedReadTokens', b.cached_read_tokens, 'cacheWriteTokens', b.cache_write_tokens,
                   'reasoningTokens', b.reasoning_tokens,
                   'totalTokens', b.input_tokens + b.output_tokens + b.cached_read_tokens + b.cache_write_tokens
                       + b.reasoning_tokens,
                   'latencyMs', b.latency_ms, 'httpStatus', b.http_status, 'streaming', b.streaming,
                   'priced', b.cost_micros IS NOT NULL)
               ELSE jsonb_build_object(
                   'requestId', b.request_id, 'virtualKeyId', b.key_id, 'provider', b.provider, 'model', b.model,
                   'operation', b.operation, 'cost', round(b.cost_micros::numeric / 1000000, 6)::text,
                   'costMicros', b.cost_micros, 'costSource', b.cost_source) END)
    FROM batch b
    JOIN subscriptions s ON s.event_type = 'usage.recorded' OR b.cost_micros IS NOT NULL
    CROSS JOIN LATERAL (
        SELECT 'evt_' || md5(s.event_type || '|' || b.request_id || '|' || b.event_time::text) AS id) ev
    ON CONFLICT (endpoint_id, event_id) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM queued) AS queued, (SELECT count(*) FROM batch) AS scanned,
       l.ingested_at, l.request_id, l.event_time
FROM (SELECT 1) one
LEFT JOIN LATERAL (
    SELECT ingested_at, request_id, event_time FROM batch
    ORDER BY ingested_at DESC, request_id DESC, event_time DESC LIMIT 1) l ON TRUE
"""


@dataclass(frozen=True)
class Subscription:
    endpoint_id: uuid.UUID
    events: list[str]


async def _subscriptions(conn: AsyncConnection[Any]) -> list[Subscription]:
    cur = await conn.execute(
        """SELECT e.endpoint_id, e.events FROM webhook_endpoints e JOIN webhook_settings s ON s.enabled
           WHERE e.removed_at IS NULL ORDER BY e.position"""
    )
    return [Subscription(row[0], row[1]) for row in await cur.fetchall()]


class WebhookPipeline:
    """The producers and the flush pass, as background tasks of the reporting service."""

    def __init__(self, db: Database, settings: Settings, wake_worker: Callable[[], None], budget_address: str) -> None:
        self._db = db
        self._settings = settings
        self._wake_worker = wake_worker
        self._budget_address = budget_address
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        budget = asyncio.create_task(self._budget_loop(stop), name="webhook-budget-events")
        try:
            while not stop.is_set():
                try:
                    while await self.scan_usage_once() >= self._settings.reporting_webhook_scan_limit:
                        await self.flush_once()
                    await self.flush_once()
                except (psycopg.Error, OSError):
                    log.exception("webhook pass failed")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_either(stop, self._wake), self._settings.reporting_webhook_poll_seconds)
        finally:
            budget.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await budget

    async def scan_usage_once(self) -> int:
        """Turns newly committed usage events into webhook events; returns how many it scanned."""
        async with self._db.transaction() as conn:
            cur = await conn.execute(_HORIZON)
            horizon_row = await cur.fetchone()
            assert horizon_row is not None
            horizon: datetime = horizon_row[0]
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_USAGE_LOCK,))
            row = await cur.fetchone()
            if row is None or not row[0]:
                return 0
            pairs = [
                (s.endpoint_id, event_type)
                for s in await _subscriptions(conn)
                for event_type in USAGE_TYPES
                if subscribes(s.events, event_type)
            ]
            cur = await conn.execute("SELECT position FROM webhook_cursors WHERE name = 'usage_events'")
            cursor_row = await cur.fetchone()
            if not pairs:
                # Nobody listens: forget the position, so a new subscriber starts from now.
                await conn.execute("DELETE FROM webhook_cursors WHERE name = 'usage_events'")
                return 0
            if cursor_row is None:
                await conn.execute(
                    """INSERT INTO webhook_cursors (name, position)
                       VALUES ('usage_events', jsonb_build_array(now(), '', now())::text)"""
                )
                return 0
            at, rid, et = json.loads(cursor_row[0])
            cur = await conn.execute(
                _SCAN,
                {
                    "at": datetime.fromisoformat(at),
                    "rid": rid,
                    "et": datetime.fromisoformat(et),
                    "horizon": horizon,
                    "late": self._settings.ingest_late_window_seconds + 3600,
                    "skew": self._settings.ingest_future_skew_seconds + 3600,
                    "limit": self._settings.reporting_webhook_scan_limit,
                    "endpoints": [p[0] for p in pairs],
                    "types": [p[1] for p in pairs],
                },
            )
            result = await cur.fetchone()
            assert result is not None
            queued, scanned, last_at, last_rid, last_et = result
            if scanned:
                await conn.execute(
                    "UPDATE webhook_cursors SET position = %s, updated_at = now() WHERE name = 'usage_events'",
                    (json.dumps([last_at.isoformat(), last_rid, last_et.isoformat()]),),
                )
        if queued:
            log.debug("usage events queued for webhooks", extra={"scanned": scanned, "queued": queued})
        return int(scanned)

    async def flush_once(self) -> int:
        """Moves due events into deliveries (outbox rows); returns how many deliveries it made."""
        made = 0
        endpoints = await self._db.fetch_all(
            """SELECT e.endpoint_id, e.url, e.max_retries, e.retry_delay_ms, s.batch_enabled, s.batch_size,
                      s.flush_interval
               FROM webhook_endpoints e CROSS JOIN webhook_settings s
               WHERE EXISTS (SELECT 1 FROM webhook_events w WHERE w.endpoint_id = e.endpoint_id)"""
        )
        for endpoint in endpoints:
            size = endpoint["batch_size"] if endpoint["batch_enabled"] else 1
            while True:
                taken = await self._flush_batch(endpoint, size)
                made += taken > 0
                if taken < size:
                    break
        if made:
            self._wake_worker()
        return made

    async def _flush_batch(self, endpoint: dict[str, Any], size: int) -> int:
        async with self._db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                """SELECT id, event_id, event_type, body, created_at, now() - created_at AS age
                   FROM webhook_events WHERE endpoint_id = %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED""",
                (endpoint["endpoint_id"], size),
            )
            rows = await cur.fetchall()
            if not rows:
                return 0
            partial = endpoint["batch_enabled"] and len(rows) < size
            if partial and rows[0]["age"].total_seconds() < endpoint["flush_interval"]:
                return 0  # a partial batch waits until flushInterval after its oldest event
            types = sorted({row["event_type"] for row in rows})
            if endpoint["batch_enabled"]:
                payload: dict[str, Any] = {
                    "type": "batch",
                    "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                    "data": {"count": len(rows), "events": [row["body"] for row in rows]},
                }
            else:
                payload = rows[0]["body"]
            delivery_id = f"msg_{uuid.uuid4().hex}"
            notification = Notification(
                channel="webhook",
                destination=endpoint["url"],
                payload=payload,
                source=SOURCE,
                subject=",".join(types),
                message_id=delivery_id,
                credentials_ref=credentials_ref(endpoint["endpoint_id"]),
                retry_base_seconds=endpoint["retry_delay_ms"] / 1000,
            )
            await enqueue(conn, [notification], max_attempts=endpoint["max_retries"] + 1)
            await cur.execute(
                """INSERT INTO webhook_deliveries (delivery_id, endpoint_id, url, event_types, event_count)
                   VALUES (%s, %s, %s, %s, %s)""",
                (delivery_id, endpoint["endpoint_id"], endpoint["url"], types, len(rows)),
            )
            await cur.execute("DELETE FROM webhook_events WHERE id = ANY(%s)", ([row["id"] for row in rows],))
            return len(rows)

    # ------------------------------------------------------------------------------------------ budget events
    async def _budget_loop(self, stop: asyncio.Event) -> None:
        """Follows the budget event stream while some endpoint subscribes and this replica holds the lock."""
        delay = 1.0
        while not stop.is_set():
            try:
                await self._follow_budget(stop)
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a stream or database failure: retry with backoff
                log.warning("budget event stream interrupted", extra={"error": repr(exc)[:300]})
                delay = min(30.0, delay * 2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _budget_subscribers(self) -> list[Subscription]:
        async with self._db.transaction() as conn:
            return [
                s for s in await _subscriptions(conn) if any(subscribes(s.events, t) for t in BUDGET_TYPES.values())
            ]

    async def _follow_budget(self, stop: asyncio.Event) -> None:
        if not await self._budget_subscribers():
            await self._db.fetch_all("DELETE FROM webhook_cursors WHERE name = 'budget_events' RETURNING 1")
            return
        lock = await psycopg.AsyncConnection.connect(
            self._settings.database_url, autocommit=True, **connection_kwargs(self._settings)
        )
        async with lock:
            cur = await lock.execute("SELECT pg_try_advisory_lock(%s)", (_BUDGET_LOCK,))
            row = await cur.fetchone()
            if row is None or not row[0]:
                return  # another replica follows the stream
            cursor = await self._db.fetch_one("SELECT position FROM webhook_cursors WHERE name = 'budget_events'")
            after = cursor["position"] if cursor else ""
            metadata = [("authorization", f"Bearer {self._settings.admin_master_key.get_secret_value()}")]
            async with grpc.aio.insecure_channel(self._budget_address) as channel:
                stub = budget_pb2_grpc.BudgetServiceStub(channel)
                stream = stub.WatchBudgetEvents(budget_pb2.WatchBudgetEventsRequest(after_id=after), metadata=metadata)
                stopper = asyncio.create_task(stop.wait())
                try:
                    async for event in _until(stream, stopper):
                        await self._queue_budget_event(event)
                finally:
                    stopper.cancel()
                    stream.cancel()

    async def _queue_budget_event(self, event: budget_pb2.WatchBudgetEventsResponse) -> None:
        event_type = BUDGET_TYPES.get(event.type)
        async with self._db.transaction() as conn:
            if event_type is not None:
                subscribers = [s for s in await _subscriptions(conn) if subscribes(s.events, event_type)]
                body = {
                    "id": f"evt_budget_{event.event_id}",
                    "type": event_type,
                    "timestamp": event.time.ToDatetime(tzinfo=UTC).isoformat().replace("+00:00", "Z"),
                    "data": {
                        "scope": event.scope,
                        "virtualKeyId": event.key_id,
                        "threshold": event.threshold,
                        "spend": str(round(event.spend_micros / 1_000_000, 6)),
                        "maxBudget": str(round(event.limit_micros / 1_000_000, 6)),
                        "message": event.message,
                    },
                }
                for subscriber in subscribers:
                    await conn.execute(
                        """INSERT INTO webhook_events (endpoint_id, event_id, event_type, body)
                           VALUES (%s, %s, %s, %s) ON CONFLICT (endpoint_id, event_id) DO NOTHING""",
                        (subscriber.endpoint_id, body["id"], event_type, Jsonb(body)),
                    )
            await conn.execute(
                """INSERT INTO webhook_cursors (name, position) VALUES ('budget_events', %s)
                   ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = now()""",
                (event.event_id,),
            )
        self.wake()


async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _until(stream: Any, stopper: asyncio.Task[Any]) -> AsyncIterator[Any]:
    """Items of a gRPC response stream until `stopper` finishes."""
    iterator = stream.__aiter__()
    while True:
        item = asyncio.ensure_future(iterator.__anext__())
        done, _ = await asyncio.wait([item, stopper], return_when=asyncio.FIRST_COMPLETED)
        if item not in done:
            item.cancel()
            return
        try:
            yield item.result()
        except StopAsyncIteration:
            return
