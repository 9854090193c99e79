"""The notification outbox and delivery workers against a real PostgreSQL, a real SMTP server
(aiosmtpd) and real HTTP receivers, all on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiosmtpd.controller import Controller

from tally.devstack import Postgres, Redis, free_port
from tally.notify import DeliveryWorker, Notification, backoff_seconds, enqueue, sign_webhook
from tally.runtime.config import Settings
from tally.runtime.db import Database
from tally.runtime.migrate import apply_migrations


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpReceiver:
    """A loopback HTTP server recording every POST; it can be stopped and started on the same port."""

    def __init__(self, port: int | None = None, status: int = 200) -> None:
        self.port = port or free_port()
        self.status = status
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            request_queue_size = 256

        self._server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def on_path(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]


@dataclass
class MailCollector:
    messages: list[EmailMessage] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        from email import message_from_bytes, policy

        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 Message accepted for delivery"


class SmtpServer:
    """aiosmtpd on a loopback port, collecting messages in memory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.collector = MailCollector()
        self._controller = Controller(self.collector, hostname="127.0.0.1", port=self.port)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Polls until `predicate()` is truthy (the test fails on timeout, never on timing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


async def async_wait_until(predicate: Any, within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def fresh_database(postgres: Postgres, prefix: str) -> str:
    """A new empty database in the shared server; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(
        f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/postgres", password=postgres.password, autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/{name}"


# Test vector of the Standard Webhooks reference libraries.
def test_signature_matches_the_standard_webhooks_vector() -> None:
    signature = sign_webhook(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(n, 2, 60, jitter=0) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert 1.6 <= backoff_seconds(1, 2, 60) <= 2.4


SECRET = "whsec_" + base64.b64encode(b"tally-test-signing-key-0123456789").decode()


@pytest.fixture(scope="module")
def receivers() -> Iterator[tuple[HttpReceiver, SmtpServer]]:
    http = HttpReceiver()
    http.start()
    smtp = SmtpServer()
    smtp.start()
    try:
        yield http, smtp
    finally:
        http.stop()
        smtp.stop()


@pytest.fixture(scope="module")
async def notify_db(
    infra: tuple[Postgres, Redis, Path], receivers: tuple[HttpReceiver, SmtpServer]
) -> AsyncIterator[tuple[Database, Settings]]:
    postgres, _redis, _root = infra
    _http, smtp = receivers
    settings = Settings.model_validate(
        {
            "admin_master_key": "x",
            "database_url": fresh_database(postgres, "notify"),
            "database_password": postgres.password,
            "notify_webhook_secret": SECRET,
            "notify_webhook_bearer_token": "receiver-token",
            "notify_pagerduty_routing_key": "routing-key-1",
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp.port,
            "notify_max_attempts": 3,
            "notify_backoff_base_seconds": 0.05,
            "notify_backoff_max_seconds": 0.2,
            "notify_poll_seconds": 0.05,
            "notify_timeout_seconds": 2,
        }
    )
    await apply_migrations(settings)
    db = Database(settings, min_size=1, max_size=8)
    await db.open()
    try:
        yield db, settings
    finally:
        await db.close()


async def _enqueue(db: Database, items: list[Notification], max_attempts: int = 3) -> None:
    async with db.transaction() as conn:
        await enqueue(conn, items, max_attempts=max_attempts)


async def _row(db: Database, message_id: str) -> dict[str, Any]:
    row = await db.fetch_one("SELECT * FROM notification_outbox WHERE message_id = %s", (message_id,))
    assert row is not None
    return row


async def _drain(worker: DeliveryWorker, db: Database, message_ids: list[str], states: set[str]) -> None:
    async def settled() -> bool:
        await worker.run_once()
        rows = [await _row(db, m) for m in message_ids]
        return all(r["status"] in states for r in rows)

    await async_wait_until(settled)


async def test_webhook_down_then_up_is_delivered_signed(
    notify_db: tuple[Database, Settings], receivers: tuple[HttpReceiver, SmtpServer]
) -> None:
    db, settings = notify_db
    down = HttpReceiver()  # not started yet: connection refused
    path = f"/hooks/{uuid.uuid4().hex}"
    item = Notification("webhook", down.url + path, {"type": "budget.test", "data": {"n": 1}}, "test", "s")
    await _enqueue(db, [item], max_attempts=50)
    worker = DeliveryWorker(db, settings, name="w1")
    try:
        await async_wait_until(lambda: _failed_attempts(worker, db, item.message_id))
        down.start()
        await _drain(worker, db, [item.message_id], {"delivered"})
    finally:
        down.stop()
        await worker.close()
    (delivery,) = down.on_path(path)
    headers = delivery.headers
    assert headers["webhook-id"] == item.message_id
    expected = sign_webhook(SECRET, item.message_id, int(headers["webhook-timestamp"]), delivery.body)
    assert headers["webhook-signature"] == expected
    assert headers["authorization"] == "Bearer receiver-token"
    assert delivery.json() == {"type": "budget.test", "data": {"n": 1}}
    attempts = await db.fetch_all(
        "SELECT attempt, succeeded, error FROM notification_attempts a JOIN notification_outbox o ON o.id = a.outbox_id"
        " WHERE o.message_id = %s ORDER BY attempt",
        (item.message_id,),
    )
    assert len(attempts) >= 2
    assert [a["succeeded"] for a in attempts] == [False] * (len(attempts) - 1) + [True]
    assert [a["attempt"] for a in attempts] == list(range(1, len(attempts) + 1))
    assert attempts[0]["error"]


async def _failed_attempts(worker: DeliveryWorker, db: Database, message_id: str) -> bool:
    await worker.run_once()
    row = await db.fetch_one(
        "SELECT count(*) AS n FROM notification_attempts a JOIN notification_outbox o ON o.id = a.outbox_id"
        " WHERE o.message_id = %s AND NOT a.succeeded",
        (message_id,),
    )
    return row is not None and row["n"] >= 1


async def test_email_arrives_at_the_smtp_server(
    notify_db: tuple[Database, Settings], receivers: tuple[HttpReceiver, SmtpServer]
) -> None:
    db, settings = notify_db
    _http, smtp = receivers
    subject = f"[Tally] test {uuid.uuid4().hex}"
    item = Notification("email", "ops@example.com, cfo@example.com", {"text": "Budget at 80%\n"}, "test", subject)
    await _enqueue(db, [item])
    worker = DeliveryWorker(db, settings)
    try:
        await _drain(worker, db, [item.message_id], {"delivered"})
    finally:
        await worker.close()
    (message,) = [m for m in smtp.collector.messages if m["Subject"] == subject]
    assert message["To"] == "ops@example.com, cfo@example.com"
    assert message["From"] == settings.smtp_from
    assert message.get_content().replace("\r\n", "\n") == "Budget at 80%\n"


async def test_failures_are_dead_lettered_after_max_attempts(notify_db: tuple[Database, Settings]) -> None:
    db, settings = notify_db
    failing = HttpReceiver(status=500)
    failing.start()
    item = Notification("slack", failing.url + "/slack", {"text": "x"}, "test")
    await _enqueue(db, [item], max_attempts=3)
    worker = DeliveryWorker(db, settings)
    try:
        await _drain(worker, db, [item.message_id], {"dead"})
    finally:
        failing.stop()
        await worker.close()
    row = await _row(db, item.message_id)
    assert row["attempts"] == 3
    assert "HTTP 500" in row["last_error"]
    assert len(failing.on_path("/slack")) == 3
    attempts = await db.fetch_all(
        "SELECT succeeded, status_code FROM notification_attempts WHERE outbox_id = %s", (row["id"],)
    )
    assert [(a["succeeded"], a["status_code"]) for a in attempts] == [(False, 500)] * 3


async def test_concurrent_workers_deliver_each_row_once(
    notify_db: tuple[Database, Settings], receivers: tuple[HttpReceiver, SmtpServer]
) -> None:
    db, settings = notify_db
    http, _smtp = receivers
    path = f"/many/{uuid.uuid4().hex}"
    items = [Notification("webhook", http.url + path, {"n": n}, "test") for n in range(60)]
    await _enqueue(db, items)
    workers = [DeliveryWorker(db, settings, batch_size=7, name=f"w{n}") for n in range(4)]
    try:
        ids = [i.message_id for i in items]

        async def all_delivered() -> bool:
            await asyncio.gather(*(w.run_once() for w in workers))
            rows = await db.fetch_all("SELECT status FROM notification_outbox WHERE message_id = ANY(%s)", (ids,))
            return all(r["status"] == "delivered" for r in rows)

        await async_wait_until(all_delivered)
    finally:
        for worker in workers:
            await worker.close()
    received = http.on_path(path)
    assert sorted(r.json()["n"] for r in received) == list(range(60))
    assert len({r.headers["webhook-id"] for r in received}) == 60
    rows = await db.fetch_all(
        "SELECT count(DISTINCT a.worker) AS workers, count(*) FILTER (WHERE a.succeeded) AS attempts"
        " FROM notification_attempts a"
        " JOIN notification_outbox o ON o.id = a.outbox_id WHERE o.message_id = ANY(%s)",
        ([i.message_id for i in items],),
    )
    assert rows[0]["attempts"] == 60
    assert rows[0]["workers"] > 1


async def test_pagerduty_gets_the_routing_key_and_enqueue_is_idempotent(
    notify_db: tuple[Database, Settings], receivers: tuple[HttpReceiver, SmtpServer]
) -> None:
    db, settings = notify_db
    http, _smtp = receivers
    path = f"/pd/{uuid.uuid4().hex}"
    item = Notification("pagerduty", http.url + path, {"event_action": "trigger", "payload": {"summary": "s"}}, "test")
    await _enqueue(db, [item, item])
    worker = DeliveryWorker(db, settings)
    try:
        await _drain(worker, db, [item.message_id], {"delivered"})
    finally:
        await worker.close()
    (event,) = http.on_path(path)
    assert event.json() == {"event_action": "trigger", "payload": {"summary": "s"}, "routing_key": "routing-key-1"}
