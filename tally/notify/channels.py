"""Delivery over each channel: webhook (Standard Webhooks), email (SMTP), Slack, PagerDuty."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import smtplib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import httpx

from tally.runtime.config import Settings

_WHSEC = "whsec_"


@dataclass(frozen=True)
class DeliveryResult:
    succeeded: bool
    status_code: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class WebhookCredentials:
    """A webhook destination's own signing secret and bearer token (`notification_credentials`);
    `ref` is the row they were read from; neither set means the row is gone."""

    ref: str
    secret: str | None = None
    bearer_token: str | None = None


def _secret_bytes(secret: str) -> bytes:
    if secret.startswith(_WHSEC):
        return base64.b64decode(secret[len(_WHSEC) :])
    return secret.encode()


def sign_webhook(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` per the Standard Webhooks spec."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_headers(secret: str | None, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    headers = {"content-type": "application/json", "webhook-id": message_id, "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = sign_webhook(secret, message_id, timestamp, body)
    return headers


def _body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


class Delivery:
    """Sends one outbox row. Secrets (signing key, bearer token, routing key, SMTP password) come
    from the settings at delivery time, so they are never stored in the outbox."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._timeout = settings.notify_timeout_seconds
        self._http = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        self._clock = clock

    async def close(self) -> None:
        await self._http.aclose()

    def _now(self) -> int:
        return int(self._clock())

    async def deliver(
        self,
        channel: str,
        destination: str,
        subject: str,
        payload: dict[str, Any],
        message_id: str,
        *,
        credentials: WebhookCredentials | None = None,
    ) -> DeliveryResult:
        try:
            if channel == "webhook":
                return await self._webhook(destination, payload, message_id, credentials)
            if channel == "slack":
                return await self._post(destination, _body(payload), {"content-type": "application/json"})
            if channel == "pagerduty":
                return await self._pagerduty(destination, payload)
            if channel == "email":
                return await self._email(destination, subject, payload)
        except (httpx.HTTPError, OSError, smtplib.SMTPException, ValueError) as exc:
            return DeliveryResult(False, error=f"{type(exc).__name__}: {exc}"[:1000])
        return DeliveryResult(False, error=f"unknown channel {channel!r}")

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> DeliveryResult:
        response = await self._http.post(url, content=body, headers=headers)
        if 200 <= response.status_code < 300:
            return DeliveryResult(True, response.status_code)
        return DeliveryResult(False, response.status_code, f"HTTP {response.status_code}: {response.text[:500]}")

    async def _webhook(
        self, url: str, payload: dict[str, Any], message_id: str, credentials: WebhookCredentials | None = None
    ) -> DeliveryResult:
        body = _body(payload)
        if credentials is not None:
            if credentials.secret is None and credentials.bearer_token is None:
                return DeliveryResult(False, error=f"webhook credentials {credentials.ref!r} not found")
            secret_text, token_text = credentials.secret, credentials.bearer_token
        else:
            secret, token = self._settings.notify_webhook_secret, self._settings.notify_webhook_bearer_token
            secret_text = secret.get_secret_value() if secret else None
            token_text = token.get_secret_value() if token else None
        headers = webhook_headers(secret_text, message_id, self._now(), body)
        if token_text:
            headers["authorization"] = f"Bearer {token_text}"
        return await self._post(url, body, headers)

    async def _pagerduty(self, url: str, payload: dict[str, Any]) -> DeliveryResult:
        key = self._settings.notify_pagerduty_routing_key
        event = {**payload, "routing_key": key.get_secret_value() if key else ""}
        return await self._post(url, _body(event), {"content-type": "application/json"})

    async def _email(self, recipients: str, subject: str, payload: dict[str, Any]) -> DeliveryResult:
        message = EmailMessage()
        message["From"] = self._settings.smtp_from
        message["To"] = recipients
        message["Subject"] = subject
        message.set_content(str(payload.get("text", "")))
        for attachment in payload.get("attachments") or []:
            maintype, _, subtype = str(attachment.get("contentType", "application/octet-stream")).partition("/")
            message.add_attachment(
                base64.b64decode(attachment["contentBase64"]),
                maintype=maintype,
                subtype=subtype or "octet-stream",
                filename=str(attachment.get("filename", "attachment")),
            )
        await asyncio.to_thread(self._send_mail, message)
        return DeliveryResult(True, 250)

    def _send_mail(self, message: EmailMessage) -> None:
        settings = self._settings
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=self._timeout) as smtp:
            if settings.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if settings.smtp_username:
                password = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
                smtp.login(settings.smtp_username, password)
            smtp.send_message(message)
