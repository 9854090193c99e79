"""Writing notifications into the outbox (`notification_outbox`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

Channel = Literal["webhook", "email", "slack", "pagerduty"]


@dataclass(frozen=True)
class Notification:
    """One message to one destination.

    `destination` is the URL (webhook, slack, pagerduty) or comma-separated recipients (email).
    `payload` is the JSON body for HTTP channels; for email, {"text": ...} is the body.
    `message_id` stays the same across retries (the `webhook-id` receivers deduplicate on).
    `credentials_ref` (webhook only) names a `notification_credentials` row whose signing secret and
    bearer token replace the settings' ones; `retry_base_seconds` replaces the first retry delay.
    `payload["attachments"]` (email only): [{"filename", "contentType", "contentBase64"}].
    """

    channel: Channel
    destination: str
    payload: dict[str, Any]
    source: str
    subject: str = ""
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    credentials_ref: str | None = None
    retry_base_seconds: float | None = None


async def enqueue(conn: AsyncConnection[Any], notifications: Iterable[Notification], *, max_attempts: int) -> int:
    """Adds notifications inside the caller's transaction; returns how many were new
    (a repeated `message_id` is ignored, so enqueueing is idempotent)."""
    added = 0
    for item in notifications:
        cur = await conn.execute(
            """INSERT INTO notification_outbox
                   (message_id, source, channel, destination, subject, payload, max_attempts,
                    credentials_ref, retry_base_seconds)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (message_id) DO NOTHING RETURNING id""",
            (
                item.message_id,
                item.source,
                item.channel,
                item.destination,
                item.subject,
                Jsonb(item.payload),
                max_attempts,
                item.credentials_ref,
                item.retry_base_seconds,
            ),
        )
        if await cur.fetchone() is not None:
            added += 1
    return added


async def requeue_dead(conn: AsyncConnection[Any], message_id: str, *, extra_attempts: int) -> bool:
    """Queues a dead-lettered notification again (same message_id) with `extra_attempts` more
    attempts; earlier attempts stay recorded. False when it is not dead-lettered."""
    cur = await conn.execute(
        """UPDATE notification_outbox
           SET status = 'pending', max_attempts = attempts + %s, next_attempt_at = now(), locked_until = NULL
           WHERE message_id = %s AND status = 'dead' RETURNING id""",
        (extra_attempts, message_id),
    )
    return await cur.fetchone() is not None
