"""Notifications through a PostgreSQL outbox, shared by the budget and reporting services.

A service writes `Notification`s with `enqueue()` inside the transaction that decided to send
them, so a notification exists exactly when its cause committed. `DeliveryWorker`s (any number,
in any process) claim due rows with `FOR UPDATE SKIP LOCKED`, deliver them over webhook
(Standard Webhooks signatures), email (SMTP), Slack or PagerDuty, record every attempt, retry
with exponential backoff and dead-letter after the configured attempts.
"""

from tally.notify.channels import Delivery, DeliveryResult, WebhookCredentials, sign_webhook, webhook_headers
from tally.notify.outbox import Notification, enqueue, requeue_dead
from tally.notify.worker import DeliveryWorker, backoff_seconds

__all__ = [
    "Delivery",
    "DeliveryResult",
    "DeliveryWorker",
    "Notification",
    "WebhookCredentials",
    "backoff_seconds",
    "enqueue",
    "requeue_dead",
    "sign_webhook",
    "webhook_headers",
]
