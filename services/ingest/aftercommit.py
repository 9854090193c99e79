"""What happens after a batch commits: live counters and stats in Redis, spend to the budget service.

None of it may slow or fail ingest: batches are queued to one background task. If Redis or the
budget service is down, the work is dropped, not retried; the database already holds the truth.
Spend that could not be handed over is remembered (oldest first) and the budget service is asked
to reconcile its counters from TimescaleDB as soon as it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

import grpc
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge
from pydantic import SecretStr

from services.ingest.events import ValidEvent
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.runtime.clients import call_metadata
from tally.runtime.redis import RedisClient
from tally.usage import live

log = logging.getLogger("tally.ingest.aftercommit")

DROPPED = PromCounter("tally_ingest_aftercommit_dropped_total", "After-commit work dropped.", ["stage", "reason"])
QUEUE_DEPTH = Gauge("tally_ingest_aftercommit_queue_depth", "Committed batches waiting for after-commit work.")
SETTLE_BATCH = 1000
SETTLE_TIMEOUT_SECONDS = 2.0


@dataclass
class Outcome:
    """One committed batch: the events inserted now, and how many items were duplicates/rejected."""

    accepted: Sequence[ValidEvent]
    duplicate: int
    rejected: int
    arrived: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Unreconciled:
    request_id: str
    event_time: datetime
    reason: str


class AfterCommit:
    def __init__(
        self,
        redis: RedisClient,
        budget: grpc.aio.Channel,
        master_key: SecretStr,
        zone: ZoneInfo,
        queue_size: int = 2000,
    ) -> None:
        self._redis = redis
        self._budget = budget_pb2_grpc.BudgetServiceStub(budget)
        self._master_key = master_key
        self._zone = zone
        self._queue: asyncio.Queue[Outcome] = asyncio.Queue(queue_size)
        self.oldest_unreconciled: Unreconciled | None = None
        self.redis_ok = True
        self._failures = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._reconcile_loop())]

    async def stop(self) -> None:
        """Drains what is queued (bounded), then stops."""
        try:
            await asyncio.wait_for(self._queue.join(), 5)
        except TimeoutError:
            log.warning("after-commit queue not drained at shutdown", extra={"left": self._queue.qsize()})
        for task in self._tasks:
            task.cancel()

    def submit(self, outcome: Outcome) -> None:
        try:
            self._queue.put_nowait(outcome)
        except asyncio.QueueFull:
            DROPPED.labels("queue", "full").inc()
            self._mark_unreconciled(outcome.accepted, "after-commit queue full")
        QUEUE_DEPTH.set(self._queue.qsize())

    async def _run(self) -> None:
        while True:
            outcome = await self._queue.get()
            try:
                await self._count(outcome)
                await self._settle(outcome.accepted)
            except Exception:
                log.exception("after-commit work failed")
            finally:
                self._queue.task_done()
                QUEUE_DEPTH.set(self._queue.qsize())

    async def _count(self, outcome: Outcome) -> None:
        per_bucket: dict[str, Counter[str]] = {}
        ttl: dict[str, int] = {}
        unpriced = late = 0
        for event in outcome.accepted:
            cost = event.cost_micros or 0
            unpriced += event.unpriced
            late += event.late
            for key, seconds in (
                (live.minute_key(event.event_time), live.MINUTE_TTL_SECONDS),
                (live.hour_key(event.event_time), live.HOUR_TTL_SECONDS),
                (live.day_key(event.event_time, self._zone), live.DAY_TTL_SECONDS),
            ):
                fields = per_bucket.setdefault(key, Counter())
                ttl[key] = seconds
                fields["requests"] += 1
                fields["tokens"] += event.tokens
                fields["cost"] += cost
                fields[f"k|{event.key_id}|requests"] += 1
                fields[f"k|{event.key_id}|cost"] += cost
                fields[f"m|{event.provider}|{event.model}|requests"] += 1
                fields[f"m|{event.provider}|{event.model}|cost"] += cost
                fields[f"p|{event.provider}|requests"] += 1
                fields[f"p|{event.provider}|cost"] += cost
        minute = int(outcome.arrived) // 60
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key, fields in per_bucket.items():
                for name, amount in fields.items():
                    pipe.hincrby(key, name, amount)
                pipe.expire(key, ttl[key])
            stats = live.INGEST_STATS_KEY
            pipe.hsetnx(stats, "since", int(outcome.arrived))
            for name, amount in (
                ("accepted", len(outcome.accepted)),
                ("duplicate", outcome.duplicate),
                ("rejected", outcome.rejected),
                ("unpriced", unpriced),
                ("late", late),
            ):
                if amount:
                    pipe.hincrby(stats, name, amount)
            pipe.hset(stats, "last_ingest", int(outcome.arrived * 1000))
            pipe.incrby(live.rate_key(minute), len(outcome.accepted))
            pipe.expire(live.rate_key(minute), live.RATE_TTL_SECONDS)
            await pipe.execute()
            self.redis_ok = True
        except Exception as exc:
            self.redis_ok = False
            DROPPED.labels("redis", type(exc).__name__).inc()
            log.warning("live counters not updated: redis unavailable", extra={"error": repr(exc)})

    async def _settle(self, events: Sequence[ValidEvent]) -> None:
        priced = [e for e in events if e.cost_micros]
        for start in range(0, len(priced), SETTLE_BATCH):
            chunk = priced[start : start + SETTLE_BATCH]
            request = budget_pb2.SettleBatchRequest()
            for event in chunk:
                item = request.items.add(
                    request_id=event.request_id,
                    key_id=str(event.key_id),
                    actual_cost_micros=event.cost_micros,
                    provider=event.provider,
                )
                item.event_time.FromDatetime(event.event_time)
            try:
                await self._budget.SettleBatch(
                    request, timeout=SETTLE_TIMEOUT_SECONDS, metadata=call_metadata(self._master_key)
                )
            except grpc.aio.AioRpcError as exc:
                DROPPED.labels("settle", exc.code().name).inc()
                self._mark_unreconciled(chunk, f"budget service: {exc.code().name}")

    def _mark_unreconciled(self, events: Sequence[ValidEvent], reason: str) -> None:
        if not events:
            return
        self._failures += 1
        first = min(events, key=lambda e: e.event_time)
        if self.oldest_unreconciled is None or first.event_time < self.oldest_unreconciled.event_time:
            self.oldest_unreconciled = Unreconciled(first.request_id, first.event_time, reason)

    async def _reconcile_loop(self, interval: float = 5.0) -> None:
        """When spend could not be handed over, ask budget to rebuild from the database."""
        while True:
            await asyncio.sleep(interval)
            pending = self.oldest_unreconciled
            if pending is None:
                continue
            failures_before = self._failures
            try:
                await self._budget.ReconcileBudgets(
                    budget_pb2.ReconcileBudgetsRequest(), timeout=30, metadata=call_metadata(self._master_key)
                )
            except grpc.aio.AioRpcError as exc:
                log.info("budget reconciliation still pending", extra={"code": exc.code().name})
                continue
            if self._failures == failures_before:  # no hand-off failed while reconciling
                self.oldest_unreconciled = None
            log.info("budget reconciled after missed settlements", extra={"since": pending.event_time.isoformat()})
