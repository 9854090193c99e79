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
    """

    channel: Channel
    destination: str
    payload: dict[str, Any]
    source: str
    subject: str = ""
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")


async def enqueue(conn: AsyncConnection[Any], notifications: Iterable[Notification], *, max_attempts: int) -> int:
    """Adds notifications inside the caller's transaction; returns how many were new
    (a repeated `message_id` is ignored, so enqueueing is idempotent)."""
    added = 0
    for item in notifications:
        cur = await conn.execute(
            """INSERT INTO notification_outbox
                   (message_id, source, channel, destination, subject, payload, max_attempts)
               VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (message_id) DO NOTHING RETURNING id""",
            (
                item.message_id,
                item.source,
                item.channel,
                item.destination,
                item.subject,
                Jsonb(item.payload),
                max_attempts,
            ),
        )
        if await cur.fetchone() is not None:
            added += 1
    return added
