"""The delivery worker: claims due outbox rows, delivers them, records every attempt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge

from tally.notify.channels import Delivery, DeliveryResult, WebhookCredentials
from tally.runtime.config import Settings
from tally.runtime.db import Database

log = logging.getLogger("tally.notify")

DELIVERIES = Counter(
    "tally_notifications_attempts_total",
    "Notification delivery attempts, by channel and result.",
    ["channel", "result"],
)

OUTBOX = Gauge(
    "tally_notifications_outbox", "Notification outbox rows by status (pending backlog, dead letters).", ["status"]
)
# How often a worker refreshes the outbox gauges (one count query).
_GAUGE_SECONDS = 15.0

_CLAIM = """
UPDATE notification_outbox o
SET attempts = o.attempts + 1, locked_until = now() + make_interval(secs => %(lease)s)
FROM (
    SELECT id FROM notification_outbox
    WHERE status = 'pending' AND next_attempt_at <= now() AND (locked_until IS NULL OR locked_until < now())
    ORDER BY next_attempt_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) due
WHERE o.id = due.id
RETURNING o.id, o.message_id, o.channel, o.destination, o.subject, o.payload, o.attempts, o.max_attempts,
    o.retry_base_seconds, o.credentials_ref,
    (SELECT c.signing_secret FROM notification_credentials c WHERE c.ref = o.credentials_ref) AS signing_secret,
    (SELECT c.bearer_token FROM notification_credentials c WHERE c.ref = o.credentials_ref) AS bearer_token
"""


def backoff_seconds(attempt: int, base: float, maximum: float, *, jitter: float = 0.2) -> float:
    """Delay after failed attempt number `attempt` (1-based): base * 2^(attempt-1), capped, +/- jitter."""
    delay = min(maximum, base * 2.0 ** (attempt - 1))
    return max(0.0, delay * (1.0 + random.uniform(-jitter, jitter)))


def _credentials(row: dict[str, Any]) -> WebhookCredentials | None:
    """The row's own webhook credentials, when it names some (`credentials_ref`)."""
    if not row.get("credentials_ref"):
        return None
    return WebhookCredentials(row["credentials_ref"], row.get("signing_secret"), row.get("bearer_token"))


class DeliveryWorker:
    """Run as many as you like (in one process or many): claims never overlap."""

    def __init__(self, db: Database, settings: Settings, *, batch_size: int = 20, name: str | None = None) -> None:
        self._db = db
        self._settings = settings
        self._batch_size = batch_size
        self._delivery = Delivery(settings)
        self._wake = asyncio.Event()
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"

    def wake(self) -> None:
        """Look for due rows now (e.g. right after this process enqueued some)."""
        self._wake.set()

    async def close(self) -> None:
        await self._delivery.close()

    async def _refresh_gauges(self) -> None:
        row = await self._db.fetch_one(
            """SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                      count(*) FILTER (WHERE status = 'dead') AS dead FROM notification_outbox"""
        )
        if row is not None:
            OUTBOX.labels("pending").set(row["pending"])
            OUTBOX.labels("dead").set(row["dead"])

    async def run(self, stop: asyncio.Event) -> None:
        gauges_at = 0.0
        while not stop.is_set():
            if time.monotonic() - gauges_at > _GAUGE_SECONDS:
                gauges_at = time.monotonic()
                with contextlib.suppress(Exception):
                    await self._refresh_gauges()
            try:
                handled = await self.run_once()
            except Exception:
                log.exception("notification worker pass failed")
                handled = 0
            if handled:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first(stop), self._settings.notify_poll_seconds)

    async def _first(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def run_once(self) -> int:
        """One claim-and-deliver pass; returns how many rows it attempted."""
        rows = await self._db.fetch_all(
            _CLAIM, {"lease": self._settings.notify_lease_seconds, "limit": self._batch_size}
        )
        if rows:
            await asyncio.gather(*(self._attempt(row) for row in rows))
        return len(rows)

    async def _attempt(self, row: dict[str, Any]) -> None:
        started = datetime.now(UTC)
        try:
            result = await asyncio.wait_for(
                self._delivery.deliver(
                    row["channel"],
                    row["destination"],
                    row["subject"],
                    row["payload"],
                    row["message_id"],
                    credentials=_credentials(row),
                ),
                self._settings.notify_timeout_seconds + 5,
            )
        except TimeoutError:
            result = DeliveryResult(False, error="timed out")
        finished = datetime.now(UTC)
        attempt: int = row["attempts"]
        DELIVERIES.labels(row["channel"], "ok" if result.succeeded else "error").inc()
        async with self._db.transaction() as conn:
            await conn.execute(
                """INSERT INTO notification_attempts
                       (outbox_id, attempt, started_at, finished_at, succeeded, status_code, error, worker)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
                (row["id"], attempt, started, finished, result.succeeded, result.status_code, result.error, self.name),
            )
            if result.succeeded:
                await conn.execute(
                    """UPDATE notification_outbox SET status = 'delivered', delivered_at = now(),
                           locked_until = NULL, last_error = NULL WHERE id = %s""",
                    (row["id"],),
                )
            elif attempt >= row["max_attempts"]:
                log.error(
                    "notification dead-lettered",
                    extra={"outboxId": row["id"], "channel": row["channel"], "error": result.error},
                )
                await conn.execute(
                    """UPDATE notification_outbox SET status = 'dead', locked_until = NULL, last_error = %s
                       WHERE id = %s""",
                    (result.error, row["id"]),
                )
            else:
                delay = backoff_seconds(
                    attempt,
                    row.get("retry_base_seconds") or self._settings.notify_backoff_base_seconds,
                    self._settings.notify_backoff_max_seconds,
                )
                log.warning(
                    "notification attempt failed",
                    extra={
                        "outboxId": row["id"],
                        "attempt": attempt,
                        "retryInSeconds": round(delay, 3),
                        "error": result.error,
                    },
                )
                await conn.execute(
                    """UPDATE notification_outbox SET next_attempt_at = now() + make_interval(secs => %s),
                           locked_until = NULL, last_error = %s WHERE id = %s""",
                    (delay, result.error, row["id"]),
                )
