"""Background work of a budget process: notification delivery, cost-spike checks, the drift
gauge, sweeping lapsed reservations, syncing disabled keys, recording closed periods, and relaying
recorded budget events to the stream.
Every replica runs them; each is safe to run concurrently (SKIP LOCKED, ON CONFLICT, Lua)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from services.budget.engine import BudgetEngine
from services.budget.events import RELAY_SECONDS, EventStream
from services.budget.periods import previous_period
from services.budget.store import GLOBAL_SCOPE, key_scope
from tally.notify import DeliveryWorker
from tally.runtime.config import Settings

RESTART_CHECK_SECONDS = 1.0
log = logging.getLogger("tally.budget.tasks")


class BackgroundTasks:
    def __init__(self, settings: Settings, engine: BudgetEngine, worker: DeliveryWorker, events: EventStream) -> None:
        self._settings = settings
        self._engine = engine
        self._events = events
        self._worker = worker
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        s = self._settings
        self._tasks = [
            asyncio.create_task(self._worker.run(self._stop), name="notify-worker"),
            asyncio.create_task(self._every(s.budget_spike_check_seconds, self._spikes), name="spikes"),
            asyncio.create_task(self._every(s.budget_drift_check_seconds, self._drift), name="drift"),
            asyncio.create_task(self._every(s.budget_maintenance_seconds, self.maintenance), name="maintenance"),
            asyncio.create_task(self._every(RESTART_CHECK_SECONDS, self._redis_restarted), name="redis-restart"),
            asyncio.create_task(self._every(RELAY_SECONDS, self._events.relay), name="event-relay"),
        ]

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _every(self, seconds: float, work: Callable[[], Awaitable[object]]) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)
            if self._stop.is_set():
                return
            try:
                await work()
            except Exception:
                log.exception("background task failed", extra={"task": getattr(work, "__name__", "?")})

    async def _spikes(self) -> None:
        await self._engine.evaluator.check_spikes()

    async def _redis_restarted(self) -> None:
        """Rebuilds the counters when Redis restarted (or failed over) since they were loaded: it
        may have come back from an append-only file without its last second of writes, and with
        its `loaded` marker, so nothing else would rebuild them."""
        if await self._engine.store.loaded_elsewhere():
            log.warning("redis restarted since the budget counters were loaded: rebuilding them")
            await self._engine.reconcile(trigger="redis_restarted")

    async def _drift(self) -> None:
        if await self._engine.store.is_loaded():
            await self._engine.measure_drift()

    async def maintenance(self) -> None:
        engine = self._engine
        await engine.store.sweep()
        await self._events.prune()
        # Redis's disabled keys follow the database's: the disabled ones disabled (after Redis lost
        # them), and one left disabled in Redis but enabled in the database (a write whose reply
        # was lost) enabled. With their rows locked, so a change meanwhile waits and is not
        # overwritten.
        in_redis = {scope for scope in await engine.store.disabled_scopes() if scope.startswith("key:")}
        stale_ids = []
        for scope in in_redis:
            with contextlib.suppress(ValueError):
                stale_ids.append(uuid.UUID(scope.removeprefix("key:")))
        async with engine.repository.disabled_keys_locked(also=stale_ids) as disabled:
            scopes = {key_scope(str(key_id)) for key_id in disabled}
            for scope in scopes - in_redis:  # a listed scope has its flag (one script sets both)
                await engine.store.set_disabled(scope, True)
            for scope in in_redis - scopes:
                log.warning("a key enabled in the database was disabled in Redis: enabled", extra={"scope": scope})
                await engine.store.set_disabled(scope, False)
        now = datetime.now(UTC)
        for row in await engine.repository.budgets():
            config = engine.config_of(row)
            zone = engine.zone(config.tz)
            closed = previous_period(engine.period(config, now), zone)
            if closed is None or closed.end is None:
                continue
            if closed.end <= row.created_at or await engine.repository.has_period_total(
                row.scope, row.period, config.tz, closed.start
            ):
                continue
            key_ids = None if row.key_id is None else [row.key_id]
            spend = (await engine.repository.spend(closed.start, closed.end, key_ids=key_ids)).get(None, 0)
            await engine.repository.record_period_total(
                scope=row.scope if row.scope != GLOBAL_SCOPE else GLOBAL_SCOPE,
                period=row.period,
                timezone=config.tz,
                start=closed.start,
                end=closed.end,
                spend_micros=spend,
                limit_micros=row.limit_micros,
            )
