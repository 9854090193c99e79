"""Alert evaluation: thresholds on settled spend, budget exceeded, cost spikes.

Each alert fires once per (scope, period, kind, threshold): the row in `budget_alerts_fired` is
the gate, inserted in the same transaction as the outbox rows of its actions (and the key's
disabling for `disable_key`), so replicas and restarts can never fire it twice."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.exceptions import RedisError

from services.budget import metrics
from services.budget.alerts import AlertConfig
from services.budget.events import BudgetEvent, EventStream, record
from services.budget.notices import Alert, notifications_for
from services.budget.periods import Period
from services.budget.repository import BudgetRepository, insert_fired, set_key_enabled
from services.budget.store import GLOBAL_SCOPE, BudgetStore, key_scope
from tally.budget.v1 import budget_pb2
from tally.notify import enqueue
from tally.runtime.config import Settings
from tally.runtime.db import Database

log = logging.getLogger("tally.budget.alerts")

CONFIG_CACHE_SECONDS = 1.0
_MAX_FIRED_CACHE = 100_000


@dataclass(frozen=True)
class ScopeSpend:
    scope: str
    key_id: str  # '' for the global scope
    period: Period
    spent: int
    limit: int


def usd(micros: int | float) -> str:
    return f"${micros / 1_000_000:,.2f}"


def percent(ratio: float) -> str:
    return f"{ratio * 100:g}%"


class Evaluator:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        repository: BudgetRepository,
        store: BudgetStore,
        events: EventStream,
        wake_delivery: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._db = db
        self._repository = repository
        self._store = store
        self._events = events
        self._wake = wake_delivery
        self._config: AlertConfig | None = None
        self._config_at = 0.0
        self._fired: set[tuple[str, int, str, float]] = set()

    async def config(self) -> AlertConfig:
        if self._config is None or time.monotonic() - self._config_at > CONFIG_CACHE_SECONDS:
            stored = await self._repository.alert_config()
            self._config = AlertConfig() if stored is None else AlertConfig.from_json(stored[0])
            self._config_at = time.monotonic()
        return self._config

    def use_config(self, config: AlertConfig) -> None:
        self._config = config
        self._config_at = time.monotonic()

    @staticmethod
    def _due(
        spend: ScopeSpend, config: AlertConfig
    ) -> list[tuple[str, float, Sequence[str], Sequence[str], Sequence[str], str, str]]:
        """The alerts the scope's settled spend has reached (fired or not)."""
        ratio = spend.spent / spend.limit
        due: list[tuple[str, float, Sequence[str], Sequence[str], Sequence[str], str, str]] = []
        if spend.scope == GLOBAL_SCOPE:
            if config.global_enabled:
                for t in config.global_thresholds:
                    if ratio >= t.percentage:
                        due.append(
                            ("threshold", t.percentage, t.actions, t.recipients, t.channels, t.urgency, t.message)
                        )
        elif config.key_enabled:
            for threshold in config.key_thresholds:
                if ratio >= threshold:
                    due.append(("threshold", threshold, config.key_actions_for(threshold), (), (), "", ""))
        if ratio >= 1:
            due.append(("exceeded", 1.0, (), (), (), "high", ""))
        return due

    def may_fire(self, spend: ScopeSpend) -> bool:
        """False when `on_spend(spend)` is known to do nothing now (the alert configuration is
        cached and every alert the spend has reached has fired), without awaiting anything; True
        when it may have work (or has to read the configuration first)."""
        if spend.limit <= 0:
            return False
        config = self._config
        if config is None or time.monotonic() - self._config_at > CONFIG_CACHE_SECONDS:
            return True
        start = spend.period.start_epoch
        return any(
            (spend.scope, start, kind, threshold) not in self._fired for kind, threshold, *_ in self._due(spend, config)
        )

    async def on_spend(self, spend: ScopeSpend) -> None:
        """Fires every threshold the scope's settled spend has reached and that has not fired yet."""
        if spend.limit <= 0:
            return
        config = await self.config()
        for kind, threshold, actions, recipients, channels, urgency, message in self._due(spend, config):
            mark = (spend.scope, spend.period.start_epoch, kind, threshold)
            if mark in self._fired:
                continue
            try:
                await self._fire(spend, kind, threshold, actions, recipients, channels, urgency, message)
            except Exception:  # the next settle tries it again; the other thresholds go on
                log.exception("budget alert not fired", extra={"scope": spend.scope, "kind": kind})
                continue
            if len(self._fired) > _MAX_FIRED_CACHE:
                self._fired.clear()
            self._fired.add(mark)

    async def _fire(
        self,
        spend: ScopeSpend,
        kind: str,
        threshold: float,
        actions: Sequence[str],
        recipients: Sequence[str],
        channels: Sequence[str],
        urgency: str,
        message: str,
    ) -> None:
        key_name = ""
        if spend.key_id:
            names = await self._repository.key_names([uuid.UUID(spend.key_id)])
            key_name = names.get(uuid.UUID(spend.key_id), spend.key_id)
        subject = f"Virtual key '{key_name}'" if spend.key_id else "Global budget"
        if kind == "exceeded":
            summary = f"{subject} has exceeded its budget ({usd(spend.spent)} of {usd(spend.limit)})"
        else:
            summary = message or f"{subject} has reached {percent(threshold)} of budget"
        data = {
            "scope": spend.scope,
            "keyId": spend.key_id,
            "keyName": key_name,
            "threshold": threshold,
            "spend": spend.spent / 1_000_000,
            "maxBudget": spend.limit / 1_000_000,
            "period": spend.period.kind.value,
            "periodStart": spend.period.start.isoformat().replace("+00:00", "Z"),
        }
        alert = Alert(
            event_type="budget.exceeded" if kind == "exceeded" else "budget.threshold_crossed",
            dedup=f"{spend.scope}:{spend.period.start_epoch}:{kind}:{threshold}",
            summary=summary,
            data=data,
            recipients=recipients,
            channels=channels,
            urgency=urgency,
        )
        disable = "disable_key" in actions and bool(spend.key_id)
        event_type = (
            budget_pb2.BUDGET_EVENT_TYPE_BUDGET_EXCEEDED
            if kind == "exceeded"
            else budget_pb2.BUDGET_EVENT_TYPE_THRESHOLD_CROSSED
        )
        async with self._db.transaction() as conn:
            first = await insert_fired(
                conn,
                scope=spend.scope,
                period_start=spend.period.start,
                kind=kind,
                threshold=threshold,
                spend_micros=spend.spent,
                limit_micros=spend.limit,
                actions=actions,
            )
            if not first:
                return
            notifications = notifications_for(alert, [a for a in actions if a != "disable_key"], self._settings)
            await enqueue(conn, notifications, max_attempts=self._settings.notify_max_attempts)
            events = [
                await record(
                    conn,
                    BudgetEvent(event_type, spend.scope, spend.key_id, threshold, spend.spent, spend.limit, summary),
                )
            ]
            if disable:
                reason = f"disable_key action: {percent(threshold)} of budget reached"
                disable = await set_key_enabled(conn, uuid.UUID(spend.key_id), False, reason)
            if disable:
                text = f"{subject} was disabled by the disable_key action at {percent(threshold)} of budget"
                disabled = BudgetEvent(
                    budget_pb2.BUDGET_EVENT_TYPE_KEY_DISABLED,
                    spend.scope,
                    spend.key_id,
                    threshold,
                    spend.spent,
                    spend.limit,
                    text,
                )
                events.append(await record(conn, disabled))
                # In Redis before the commit, while the key's row is locked (as an admin's
                # disable): an enable right after it is not overwritten, and a subscriber acting
                # on KEY_DISABLED finds the key disabled. If Redis fails, the alert still fires
                # (nothing would evaluate it again once the key is denied): the periodic sync of
                # disabled keys disables it in Redis.
                try:
                    await self._store.set_disabled(key_scope(spend.key_id), True)
                except (RedisError, OSError) as exc:
                    log.warning(
                        "key disabled in the database; Redis follows at the next sync",
                        extra={"scope": spend.scope, "error": repr(exc)},
                    )
        metrics.ALERTS_FIRED.labels(kind).inc()
        log.warning("budget alert fired", extra={"scope": spend.scope, "kind": kind, "threshold": threshold})
        if notifications:
            self._wake()
        await self._events.deliver(events)

    async def check_spikes(self, now: datetime | None = None) -> bool:
        """Spend in the current window above multiplier x the trailing windows' average fires COST_SPIKE."""
        config = await self.config()
        if not config.spike_enabled:
            return False
        now = now or datetime.now(UTC)
        hours = max(1, math.ceil(config.spike_window_seconds / 3600))
        width = timedelta(hours=hours)
        current_start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
        trailing = self._settings.budget_spike_trailing_windows
        spend = await self._repository.spike_windows(current_start - width * trailing, width, trailing + 1)
        average = sum(spend[:trailing]) / trailing
        current = spend[trailing]
        if average <= 0 or current <= config.spike_multiplier * average:
            return False
        summary = (
            f"Cost spike: {usd(current)} in the last {hours}h window, "
            f"{current / average:.1f}x the trailing average of {usd(average)}"
        )
        alert = Alert(
            event_type="budget.cost_spike",
            dedup=f"global:{int(current_start.timestamp())}:spike:{config.spike_multiplier}",
            summary=summary,
            data={
                "scope": GLOBAL_SCOPE,
                "windowStart": current_start.isoformat().replace("+00:00", "Z"),
                "windowSeconds": hours * 3600,
                "spend": current / 1_000_000,
                "trailingAverage": average / 1_000_000,
                "thresholdMultiplier": config.spike_multiplier,
            },
        )
        async with self._db.transaction() as conn:
            first = await insert_fired(
                conn,
                scope=GLOBAL_SCOPE,
                period_start=current_start,
                kind="spike",
                threshold=config.spike_multiplier,
                spend_micros=current,
                limit_micros=round(average),
                actions=config.spike_actions,
            )
            if not first:
                return False
            notifications = notifications_for(alert, config.spike_actions, self._settings)
            await enqueue(conn, notifications, max_attempts=self._settings.notify_max_attempts)
            spike = BudgetEvent(
                budget_pb2.BUDGET_EVENT_TYPE_COST_SPIKE,
                GLOBAL_SCOPE,
                "",
                config.spike_multiplier,
                current,
                round(average),
                summary,
            )
            event = await record(conn, spike)
        metrics.ALERTS_FIRED.labels("spike").inc()
        if notifications:
            self._wake()
        await self._events.deliver([event])
        return True
