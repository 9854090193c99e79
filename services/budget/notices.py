"""Turns a fired alert into outbox notifications for its actions (webhook, email, slack, pagerduty)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tally.notify import Notification
from tally.runtime.config import Settings

log = logging.getLogger("tally.budget.notices")
SOURCE = "budget"


@dataclass(frozen=True)
class Alert:
    """What happened, in the words every channel uses."""

    event_type: str  # budget.threshold_crossed | budget.exceeded | budget.cost_spike
    dedup: str  # identifies the alert (scope, period, kind, threshold)
    summary: str
    data: dict[str, Any]
    recipients: Sequence[str] = ()
    channels: Sequence[str] = ()
    urgency: str = ""
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _message_id(alert: Alert, channel: str, destination: str) -> str:
    digest = hashlib.sha256(f"{alert.dedup}|{channel}|{destination}".encode()).hexdigest()[:32]
    return f"msg_{digest}"


def notifications_for(alert: Alert, actions: Sequence[str], settings: Settings) -> list[Notification]:
    """Only destinations an admin configured receive anything; a missing one is logged and skipped."""
    out: list[Notification] = []
    timestamp = alert.at.isoformat().replace("+00:00", "Z")
    for action in actions:
        if action == "webhook":
            url = settings.notify_webhook_url
            if not url:
                log.warning("webhook action skipped: NOTIFY_WEBHOOK_URL is not set", extra={"alert": alert.dedup})
                continue
            body = {"type": alert.event_type, "timestamp": timestamp, "data": {**alert.data, "message": alert.summary}}
            out.append(Notification("webhook", url, body, SOURCE, alert.summary, _message_id(alert, action, url)))
        elif action == "email":
            recipients = list(alert.recipients) or [
                r.strip() for r in settings.notify_email_recipients.split(",") if r.strip()
            ]
            if not recipients:
                log.warning("email action skipped: no recipients", extra={"alert": alert.dedup})
                continue
            lines = [alert.summary, ""] + [f"{key}: {value}" for key, value in sorted(alert.data.items())]
            destination = ", ".join(recipients)
            out.append(
                Notification(
                    "email",
                    destination,
                    {"text": "\n".join(lines) + "\n"},
                    SOURCE,
                    f"[Tally] {alert.summary}",
                    _message_id(alert, action, destination),
                )
            )
        elif action == "slack":
            url = settings.notify_slack_webhook_url
            if not url:
                log.warning("slack action skipped: NOTIFY_SLACK_WEBHOOK_URL is not set", extra={"alert": alert.dedup})
                continue
            for channel in alert.channels or [""]:
                message: dict[str, Any] = {"text": f":rotating_light: {alert.summary}"}
                if channel:
                    message["channel"] = channel
                out.append(
                    Notification(
                        "slack", url, message, SOURCE, alert.summary, _message_id(alert, f"slack{channel}", url)
                    )
                )
        elif action == "pagerduty":
            url = settings.notify_pagerduty_events_url
            if not url:
                log.warning(
                    "pagerduty action skipped: NOTIFY_PAGERDUTY_EVENTS_URL is not set", extra={"alert": alert.dedup}
                )
                continue
            body = {
                "event_action": "trigger",
                "dedup_key": alert.dedup,
                "payload": {
                    "summary": alert.summary[:1024],
                    "source": "tally-budget",
                    "severity": "critical" if alert.urgency == "high" else "warning",
                    "timestamp": timestamp,
                    "custom_details": alert.data,
                },
            }
            out.append(Notification("pagerduty", url, body, SOURCE, alert.summary, _message_id(alert, action, url)))
    return out
