"""The audit log writer: every admin API call, recorded off the call's path.

The interceptor hands each finished admin call to `AuditWriter.record` (a non-blocking put on a
bounded in-process queue); a background task writes what accumulated in one multi-row INSERT
every `AUDIT_FLUSH_SECONDS` (sooner when `AUDIT_BATCH_SIZE` entries wait). A batch the database
refuses (it is down) is tried again until it takes it, entries arriving meanwhile waiting in the
queue; a retry after a commit whose outcome was lost stores nothing twice (entries are unique).
Nothing is lost silently: an entry that finds the queue full, or a batch still refused when the
writer stops, is counted in `tally_audit_dropped_total{reason}` and logged. Request-path RPCs (those requiring a
request-path permission, see tally/runtime/access.py) are never audited, nor are health and
reflection.

Request parameters are the request message as JSON with secret-like fields (secrets, passwords,
tokens, routing keys, ...) and end-user identifiers replaced by "[REDACTED]".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from prometheus_client import Counter, Gauge
from psycopg.types.json import Jsonb

from tally.runtime.db import Database

log = logging.getLogger("tally.audit")

AUDIT_WRITTEN = Counter("tally_audit_written_total", "Audit log entries written to the database.")
AUDIT_DROPPED = Counter(
    "tally_audit_dropped_total", "Audit log entries that could not be written, by reason.", ["reason"]
)
AUDIT_QUEUE = Gauge("tally_audit_queue_depth", "Audit log entries waiting to be written.")

REDACTED = "[REDACTED]"
# Matched against JSON (camelCase) field names, case-insensitively.
_SECRET_FIELD = re.compile(
    r"(secret|password|passwd|credential|authorization|bearer|privatekey|routingkey|signing|apikey$|endUserId"
    r"|(?<!page)token)",
    re.IGNORECASE,
)


def redact(value: Any) -> Any:
    """A JSON value with secret-like fields replaced, recursively."""
    if isinstance(value, dict):
        return {k: (REDACTED if _SECRET_FIELD.search(k) else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def parameters_of(request: Any) -> dict[str, Any]:
    """The request message as redacted JSON ({} for a streamed request)."""
    if not isinstance(request, Message):
        return {}
    try:
        return dict(redact(MessageToDict(request)))
    except Exception:  # a parameter dump must never fail the call
        log.warning("could not render audit parameters", exc_info=True)
        return {}


def outcome_of(code_name: str) -> str:
    if code_name == "OK":
        return "success"
    if code_name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return "denied"
    return "error"


@dataclass(slots=True)
class AuditEntry:
    time: datetime
    operation: str
    principal: str
    role: str
    request: Any  # the request message; rendered (redacted JSON) by the writer, off the call's path
    client_ip: str
    correlation_id: str
    status_code: str
    duration_ms: float
    entry_id: uuid.UUID = field(default_factory=uuid.uuid4)


_INSERT = (
    "INSERT INTO audit_log (entry_id, time, operation, principal, role, parameters, client_ip, correlation_id,"
    " outcome, status_code, duration_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT DO NOTHING"
)
# A batch the database refuses is tried again after these waits (seconds), the last one repeated
# for as long as it takes; entries arriving meanwhile wait in the bounded queue. Once the writer
# is stopping, a batch gets STOP_ATTEMPTS tries in all.
RETRY_WAITS = (0.5, 1.0, 2.0, 5.0)
STOP_ATTEMPTS = 3


class AuditWriter:
    """Bounded queue + background batch writer. `record` never blocks and never raises."""

    def __init__(
        self, db: Database, *, queue_size: int = 10_000, batch_size: int = 500, flush_seconds: float = 0.2
    ) -> None:
        self._db = db
        self._queue: asyncio.Queue[AuditEntry] = asyncio.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._flush_seconds = flush_seconds
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._key_use: dict[str, datetime] = {}

    def record(self, entry: AuditEntry) -> None:
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            AUDIT_DROPPED.labels("queue_full").inc()
            log.warning("audit queue full: entry dropped", extra={"operation": entry.operation})

    def key_used(self, key_id: str) -> None:
        """Remembers an API key's last use; written with the next batch (last_used_at)."""
        self._key_use[key_id] = datetime.now(UTC)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def close(self) -> None:
        """Writes what is queued, then stops."""
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self._flush_seconds)
            while self._queue.qsize() or self._key_use:
                batch: list[AuditEntry] = []
                while len(batch) < self._batch_size and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                AUDIT_QUEUE.set(self._queue.qsize())
                await self._write(batch)
            if self._stopping.is_set():
                return

    async def _write(self, batch: list[AuditEntry]) -> None:
        used, self._key_use = self._key_use, {}
        rows = [
            (
                e.entry_id,
                e.time,
                e.operation,
                e.principal,
                e.role,
                Jsonb(parameters_of(e.request)),
                e.client_ip,
                e.correlation_id,
                outcome_of(e.status_code),
                e.status_code,
                e.duration_ms,
            )
            for e in batch
        ]
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._db.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                    if rows:
                        await cur.executemany(_INSERT, rows)
                    if used:
                        await cur.executemany(
                            "UPDATE api_keys SET last_used_at = greatest(last_used_at, %s) WHERE api_key_id = %s",
                            [(when, key_id) for key_id, when in used.items()],
                        )
                AUDIT_WRITTEN.inc(len(rows))
                return
            except Exception:
                log.warning("audit batch not written (attempt %d)", attempt, exc_info=attempt == 1)
                if self._stopping.is_set() and attempt >= STOP_ATTEMPTS:
                    break
                wait = RETRY_WAITS[min(attempt, len(RETRY_WAITS)) - 1]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=wait)
        AUDIT_DROPPED.labels("database").inc(len(rows))
        log.error("audit batch dropped: the database refused it until the writer stopped", extra={"entries": len(rows)})
