"""Wires the budget service: its servicer (which only translates between protos and the
engine) and the resources and background tasks it uses."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.budget import alerts, metrics
from services.budget.engine import (
    DEFAULT_PERIOD,
    BudgetEngine,
    Handoff,
    HandoffGroup,
    ScopeView,
    SettleItem,
    SettleOutcome,
    StoreUnavailable,
)
from services.budget.evaluator import Evaluator, percent
from services.budget.events import BLOCK_MS, BudgetEvent, EventStream
from services.budget.keys import VirtualKeyRecord, VirtualKeyRepository, validate_key_name
from services.budget.periods import PeriodKind, days_in_month, is_known_zone
from services.budget.repository import BudgetRepository
from services.budget.store import (
    GLOBAL_SCOPE,
    AuthorizeResult,
    BudgetStore,
    ScopeCall,
    ScopeConfig,
    key_scope,
)
from services.budget.tasks import BackgroundTasks
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.notify import DeliveryWorker
from tally.runtime.errors import InvalidArgument, NotFound, QuotaExceeded, Unavailable
from tally.runtime.interceptor import caller_error
from tally.runtime.redis import create_redis
from tally.runtime.server import Registration, Resources
from tally.runtime.validation import Violations, decode_page_token, encode_page_token, page_size, require_uuid

log = logging.getLogger("tally.budget")
T = TypeVar("T")

MICROS = 1_000_000
MAX_BUDGET_USD = 1_000_000_000.0  # keeps every sum of micro-units exact in Lua's doubles (< 2^53)
MAX_REQUEST_ID = 200
MAX_REASON = 500
_REQUEST_PATH = frozenset({"Authorize", "Settle", "SettleBatch", "Release"})
_DENIALS = {
    1: (budget_pb2.DENIAL_REASON_KEY_DISABLED, "the virtual key is disabled"),
    2: (budget_pb2.DENIAL_REASON_KEY_BUDGET_EXHAUSTED, "the virtual key's budget cannot cover the estimate"),
    3: (budget_pb2.DENIAL_REASON_GLOBAL_BUDGET_EXHAUSTED, "the global budget cannot cover the estimate"),
}


# Calls of one request-path stream read and not yet answered (StreamRequestPath).
STREAM_MAX_IN_FLIGHT = 1024
STREAM_MAX_ANSWERS_PER_MESSAGE = 256


def _usd(micros: int) -> float:
    return micros / MICROS


def _timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _key_message(record: VirtualKeyRecord) -> budget_pb2.VirtualKey:
    message = budget_pb2.VirtualKey(
        key_id=str(record.key_id),
        key_name=record.key_name,
        enabled=record.enabled,
        is_test=record.is_test,
        disabled_reason=record.disabled_reason or "",
    )
    message.created_at.FromDatetime(record.created_at)
    return message


def _budget_message(view: ScopeView) -> budget_pb2.Budget:
    limit = view.row.limit_micros if view.row else 0
    message = budget_pb2.Budget(
        max_budget=_usd(limit),
        period=view.row.period if view.row else view.period.kind.value,
        timezone=view.row.timezone if view.row else "",
        current_spend=_usd(view.spent),
        reserved=_usd(view.reserved),
        remaining_budget=_usd(limit - view.spent - view.reserved) if view.row else 0.0,
    )
    message.period_start.FromDatetime(view.period.start)
    if view.period.end is not None:
        message.period_end.FromDatetime(view.period.end)
    return message


_STAMPS: dict[datetime, timestamp_pb2.Timestamp] = {}
_DECISIONS: dict[str, Any] = {}
_KEY_IDS: dict[str, str] = {}  # key id as sent -> canonical UUID text (request-path cache)
_MAX_CACHED = 100_000


def _stamp(at: datetime) -> timestamp_pb2.Timestamp:
    """Period starts as Timestamps, built once per period."""
    stamp = _STAMPS.get(at)
    if stamp is None:
        if len(_STAMPS) > 1000:
            _STAMPS.clear()
        stamp = _STAMPS[at] = _timestamp(at)
    return stamp


def _decided(outcome: str) -> None:
    counter = _DECISIONS.get(outcome)
    if counter is None:
        counter = _DECISIONS[outcome] = metrics.DECISIONS.labels(outcome)
    counter.inc()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utc(stamp: timestamp_pb2.Timestamp) -> datetime:
    """`stamp.ToDatetime(UTC)` without protobuf's pure-Python conversion (a few microseconds per
    call; ingest's hand-off has a timestamp per spend group)."""
    return _EPOCH + timedelta(0, stamp.seconds, stamp.nanos // 1000)


def _key_id(value: str) -> str:
    """The canonical text of a request's key id (`require_uuid`, cached for the request path)."""
    known = _KEY_IDS.get(value)
    if known is None:
        known = str(require_uuid(value, "keyId"))
        if len(_KEY_IDS) > _MAX_CACHED:
            _KEY_IDS.clear()
        _KEY_IDS[value] = known
    return known


def _remaining(
    scope: str, call: ScopeCall, limit: int, committed: int, engine: BudgetEngine, now: datetime | None = None
) -> budget_pb2.ScopeRemaining:
    unlimited = limit < 0
    return budget_pb2.ScopeRemaining(
        scope=scope,
        limit_micros=0 if unlimited else limit,
        committed_micros=committed,
        remaining_micros=0 if unlimited else limit - committed,
        unlimited=unlimited,
        period_start=_stamp(engine.period(call.config, now or datetime.now(UTC)).start),
    )


def _validate_budget(max_budget: float, period: str, timezone: str) -> tuple[int, str, str]:
    violations = Violations()
    if not math.isfinite(max_budget) or max_budget <= 0:
        violations.add("maxBudget", "must be a positive amount in USD")
    elif max_budget > MAX_BUDGET_USD:
        violations.add("maxBudget", f"must be at most {MAX_BUDGET_USD:.0f} USD")
    if period not in {p.value for p in PeriodKind}:
        violations.add("period", f"must be one of daily, weekly, monthly, total; got {period[:40]!r}")
    if timezone and not is_known_zone(timezone):
        violations.add("timezone", f"unknown IANA timezone {timezone[:64]!r}")
    violations.raise_if_any()
    return round(max_budget * MICROS), period, timezone


def _request_id(value: str, field: str, violations: Violations) -> None:
    if not value:
        violations.add(field, "required")
    elif len(value) > MAX_REQUEST_ID:
        violations.add(field, f"must be at most {MAX_REQUEST_ID} characters")


def _handoff(request: budget_pb2.SettleBatchRequest) -> Handoff:
    """The compact form of a SettleBatch, checked as columns (thousands of requests: no per-item
    Python work beyond what C does for us)."""
    violations = Violations()
    count = len(request.request_ids)
    if not request.handoff_id:
        violations.add("handoffId", "required with requestIds")
    elif len(request.handoff_id) > MAX_REQUEST_ID:
        violations.add("handoffId", f"must be at most {MAX_REQUEST_ID} characters")
    if len(request.actual_cost_micros) != count:
        violations.add("actualCostMicros", "must have one entry per request id")
    elif count and min(request.actual_cost_micros) < 0:
        violations.add("actualCostMicros", "must not be negative")
    if len(request.group_index) != count:
        violations.add("groupIndex", "must have one entry per request id")
    elif count and max(request.group_index) >= len(request.groups):
        violations.add("groupIndex", f"must index groups (there are {len(request.groups)})")
    if count and (min(map(len, request.request_ids)) == 0 or max(map(len, request.request_ids)) > MAX_REQUEST_ID):
        violations.add("requestIds", f"each must be 1-{MAX_REQUEST_ID} characters")
    groups = []
    for index, group in enumerate(request.groups):
        key_id = ""
        try:
            key_id = _key_id(group.key_id)
        except InvalidArgument:
            violations.add(f"groups[{index}].keyId", f"must be a UUID, got {group.key_id[:64]!r}")
        if not group.HasField("event_time"):
            violations.add(f"groups[{index}].eventTime", "required")
        groups.append(
            HandoffGroup(key_id, group.provider or "unknown", _utc(group.event_time), group.database_transaction_id)
        )
    violations.raise_if_any()
    return Handoff(request.handoff_id, groups, request.request_ids, request.actual_cost_micros, request.group_index)


class BudgetServicer(budget_pb2_grpc.BudgetServiceServicer):
    def __init__(self, resources: Resources, engine: BudgetEngine, events: EventStream) -> None:
        self._resources = resources
        self._settings = resources.settings
        self._keys = VirtualKeyRepository(resources.db)
        self._engine = engine
        self._events = events

    # ------------------------------------------------------------------ request path
    async def Authorize(
        self, request: budget_pb2.AuthorizeRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.AuthorizeResponse:
        key_id, request_id, estimate = _authorize_arguments(request)
        try:
            result, key_call, global_call = await self._engine.authorize(key_id, request_id, estimate)
        except StoreUnavailable as exc:
            return self._failure_policy(key_id, request_id, exc)
        if result.reason:
            raise self._denial(key_id, result)
        now = datetime.now(UTC)
        remaining = [
            _remaining(key_scope(key_id), key_call, result.key_limit, result.key_committed, self._engine, now),
            _remaining(GLOBAL_SCOPE, global_call, result.global_limit, result.global_committed, self._engine, now),
        ]
        _decided("replayed" if result.replayed else "allowed")
        response = budget_pb2.AuthorizeResponse(allowed=True, remaining=remaining, replayed=result.replayed)
        if result.expires_ms:
            response.expires_at.FromMilliseconds(result.expires_ms)
        return response

    def _denial(self, key_id: str, result: AuthorizeResult) -> QuotaExceeded:
        reason, text = _DENIALS[result.reason]
        scope = GLOBAL_SCOPE if result.reason == 3 else key_scope(key_id)
        limit, committed = (
            (result.global_limit, result.global_committed)
            if result.reason == 3
            else (result.key_limit, result.key_committed)
        )
        _decided(budget_pb2.DenialReason.Name(reason).removeprefix("DENIAL_REASON_").lower())
        if result.reason == 1:
            description = "virtual key is disabled"
        else:
            description = f"budget {_usd(limit):.6f} USD, committed {_usd(committed):.6f} USD in the current period"
        error = QuotaExceeded(f"authorization denied: {text}", [(scope, description)])
        error.metadata = {
            "denialReason": budget_pb2.DenialReason.Name(reason),
            "keyId": key_id,
            "scope": scope,
            "limitMicros": str(max(limit, 0)),
            "committedMicros": str(committed),
        }
        return error

    def _failure_policy(self, key_id: str, request_id: str, exc: Exception) -> budget_pb2.AuthorizeResponse:
        policy = self._settings.budget_failure_policy
        metrics.FAILURE_POLICY.labels("authorize", policy).inc()
        log.warning(
            "redis unreachable: answering with the failure policy",
            extra={"policy": policy, "keyId": key_id, "requestId": request_id, "cause": str(exc)},
        )
        if policy == "open":
            metrics.DECISIONS.labels("failure_policy_open").inc()
            return budget_pb2.AuthorizeResponse(allowed=True, failure_policy_applied=True)
        metrics.DECISIONS.labels("failure_policy_closed").inc()
        error = QuotaExceeded(
            "authorization denied: the budget store is unreachable and the failure policy is closed",
            [("budget-store", "redis unreachable; failure policy closed")],
        )
        error.metadata = {
            "denialReason": budget_pb2.DenialReason.Name(budget_pb2.DENIAL_REASON_BUDGET_STORE_UNAVAILABLE),
            "keyId": key_id,
            "failurePolicy": policy,
        }
        raise error

    def _settle_items(self, requests: Sequence[budget_pb2.SettleRequest], prefix: str) -> list[SettleItem]:
        violations = Violations()
        items = []
        for index, request in enumerate(requests):
            path = f"{prefix}[{index}]." if prefix else ""
            _request_id(request.request_id, f"{path}requestId", violations)
            key_id = ""
            if request.key_id:
                key_id = _KEY_IDS.get(request.key_id, "")
                if not key_id:
                    try:
                        key_id = str(uuid.UUID(request.key_id))
                    except ValueError:
                        violations.add(f"{path}keyId", f"must be a UUID, got {request.key_id[:64]!r}")
            if request.actual_cost_micros < 0:
                violations.add(f"{path}actualCostMicros", "must not be negative")
            event_time = _utc(request.event_time) if request.HasField("event_time") else None
            items.append(
                SettleItem(
                    request.request_id,
                    key_id,
                    request.actual_cost_micros,
                    event_time,
                    request.provider,
                    request.database_transaction_id,
                )
            )
        violations.raise_if_any()
        return items

    async def _settle(self, items: list[SettleItem], operation: str) -> list[SettleOutcome]:
        try:
            return await self._engine.settle(items)
        except StoreUnavailable as exc:
            raise self._settle_unavailable(operation, exc) from exc

    @staticmethod
    def _settle_unavailable(operation: str, exc: StoreUnavailable) -> Unavailable:
        metrics.FAILURE_POLICY.labels(operation, "unavailable").inc()
        log.warning("redis unreachable: settle not recorded (reconcile rebuilds it)", extra={"cause": str(exc)})
        return Unavailable("the budget store is unreachable", metadata={"dependency": "redis"})

    async def Settle(
        self, request: budget_pb2.SettleRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.SettleResponse:
        (item,) = self._settle_items([request], "")
        (outcome,) = await self._settle([item], "settle")
        key_call, key_limit, key_spent, key_reserved = outcome.key
        global_call, global_limit, global_spent, global_reserved = outcome.global_
        now = datetime.now(UTC)
        key_committed, global_committed = key_spent + key_reserved, global_spent + global_reserved
        return budget_pb2.SettleResponse(
            already_settled=outcome.already_settled,
            overspend_micros=outcome.overspend,
            remaining=[
                _remaining(key_scope(item.key_id or "?"), key_call, key_limit, key_committed, self._engine, now),
                _remaining(GLOBAL_SCOPE, global_call, global_limit, global_committed, self._engine, now),
            ],
        )

    async def SettleBatch(
        self, request: budget_pb2.SettleBatchRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.SettleBatchResponse:
        if len(request.items) + len(request.request_ids) > self._settings.ingest_max_batch:
            raise InvalidArgument.field("items", f"at most {self._settings.ingest_max_batch} items per call")
        items = self._settle_items(request.items, "items")
        handoff = _handoff(request) if request.request_ids or request.groups else None
        response = budget_pb2.SettleBatchResponse()
        try:
            totals = [await self._engine.settle_batch(items)] if items else []
            if handoff is not None:
                totals.append(await self._engine.settle_handoff(handoff))
        except StoreUnavailable as exc:
            raise self._settle_unavailable("settle_batch", exc) from exc
        for total in totals:
            response.settled += total.settled
            response.already_settled += total.already_settled
            response.overspend_micros += total.overspend_unreserved + total.overspend_open
        return response

    async def Release(
        self, request: budget_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.ReleaseResponse:
        violations = Violations()
        _request_id(request.request_id, "requestId", violations)
        violations.raise_if_any()
        try:
            released = await self._engine.release(request.request_id)
        except StoreUnavailable as exc:
            metrics.FAILURE_POLICY.labels("release", "unavailable").inc()
            raise Unavailable("the budget store is unreachable", metadata={"dependency": "redis"}) from exc
        return budget_pb2.ReleaseResponse(released=released)

    async def StreamRequestPath(
        self, request_iterator: AsyncIterator[budget_pb2.StreamRequestPathRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[budget_pb2.StreamRequestPathResponse]:
        """Answers each call as soon as it is decided (see `_RequestPathStream`): calls in flight on
        many streams are batched into the same Redis round trips, as unary calls are, the answers
        ready together go out in one message, and a call's error is sent as its answer instead of
        ending the stream.

        Initial metadata goes out at once, once the caller is admitted: a client waits for it
        before its first write, so a refused stream reports its status (grpc aio overwrites the
        status with INTERNAL when a write races the server's end of the stream: grpc#36066)."""
        await context.send_initial_metadata(())
        stream = _RequestPathStream(self, context)
        reader = asyncio.create_task(stream.read(request_iterator))
        try:
            async for reply in stream.replies():
                yield reply
            await reader  # re-raises a failure to read the stream
        finally:
            reader.cancel()
            stream.cancel()

    async def _stream_call(
        self, call: budget_pb2.RequestPathCall, context: grpc.aio.ServicerContext
    ) -> budget_pb2.RequestPathAnswer:
        reply = budget_pb2.RequestPathAnswer(call_id=call.call_id)
        kind = call.WhichOneof("call")
        try:
            if kind == "authorize":
                reply.authorize.CopyFrom(await self.Authorize(call.authorize, context))
            elif kind == "settle":
                reply.settle.CopyFrom(await self.Settle(call.settle, context))
            elif kind == "release":
                reply.release.CopyFrom(await self.Release(call.release, context))
            else:
                raise InvalidArgument.field("call", "one of authorize, settle or release is required")
        except Exception as exc:
            reply.error.CopyFrom(caller_error(exc, "/tally.budget.v1.BudgetService/StreamRequestPath").to_status())
        return reply

    async def GetOpenReservations(
        self, request: budget_pb2.GetOpenReservationsRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.GetOpenReservationsResponse:
        count, reserved = await self._store_call(self._engine.open_reservations())
        return budget_pb2.GetOpenReservationsResponse(open=count, reserved_micros=reserved)

    async def WatchBudgetEvents(
        self, request: budget_pb2.WatchBudgetEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[budget_pb2.WatchBudgetEventsResponse]:
        async for event in self._events.follow(request.after_id):
            yield event

    # ------------------------------------------------------------------ admin API
    async def GetBudgetStatus(
        self, request: budget_pb2.GetBudgetStatusRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.GetBudgetStatusResponse:
        now = datetime.now(UTC)
        views = await self._admin_views(now)
        global_view, key_views = views[0], views[1:]
        status = budget_pb2.BudgetStatus(global_budget=self._global_status(global_view, now))

        key_ids = [uuid.UUID(v.scope.removeprefix("key:")) for v in key_views]
        names = await self._engine.repository.key_names(key_ids)
        usage = []
        for view, key_uuid in zip(key_views, key_ids, strict=True):
            limit = view.row.limit_micros if view.row else 0
            usage.append(
                budget_pb2.VirtualKeyBudgetUsage(
                    key_id=str(key_uuid),
                    key_name=names.get(key_uuid, str(key_uuid)),
                    max_budget=_usd(limit),
                    current_spend=_usd(view.spent),
                    utilization_percentage=view.spent / limit if limit else 0.0,
                )
            )
        usage.sort(key=lambda u: (-u.utilization_percentage, u.key_name))
        status.budget_breakdown.by_virtual_key.extend(usage)

        providers = await self._engine.provider_spend(global_view.period, global_view.tz)
        total = sum(providers.values())
        for name, spend in sorted(providers.items()):
            status.budget_breakdown.by_provider[name].spend = _usd(spend)
            status.budget_breakdown.by_provider[name].percentage = spend / total if total else 0.0

        by_scope = {v.scope: v for v in views}
        fired = await self._engine.repository.fired_thresholds([(v.scope, v.period.start) for v in views if v.row])
        for row in sorted(fired, key=lambda r: (-r["threshold"], r["scope"])):
            view = by_scope[row["scope"]]
            limit = view.row.limit_micros if view.row else 0
            threshold = float(row["threshold"])
            is_key = view.scope != GLOBAL_SCOPE
            key_id = view.scope.removeprefix("key:") if is_key else ""
            subject = f"Virtual key '{names.get(uuid.UUID(key_id), key_id)}'" if is_key else "Global budget"
            exceeded = row["kind"] == "exceeded"
            status.budget_alerts.append(
                budget_pb2.BudgetAlert(
                    level="critical" if exceeded or threshold >= 0.9 else "warning" if threshold >= 0.75 else "info",
                    message=f"{subject} has exceeded its budget"
                    if exceeded
                    else f"{subject} has reached {percent(threshold)} of budget",
                    key_id=key_id,
                    percentage=threshold,
                    remaining_budget=_usd(limit - view.spent),
                )
            )
        return budget_pb2.GetBudgetStatusResponse(success=True, data=status)

    def _global_status(self, view: ScopeView, now: datetime) -> budget_pb2.GlobalBudgetStatus:
        limit = view.row.limit_micros if view.row else 0
        zone = self._engine.zone(view.tz)
        today = now.astimezone(zone).date()
        start = view.period.start
        if view.period.end is None and view.row is not None:
            start = view.row.created_at  # a 'total' budget averages over its own lifetime
        elapsed_days = max(1, (today - start.astimezone(zone).date()).days + 1)
        average = view.spent / elapsed_days
        if view.period.end is not None:
            last_day = (view.period.end - timedelta(microseconds=1)).astimezone(zone).date()
            days_remaining = max(0, (last_day - today).days)
            projected_period = average * (elapsed_days + days_remaining)
        else:
            days_remaining = 0
            projected_period = float(view.spent)
        return budget_pb2.GlobalBudgetStatus(
            max_budget=_usd(limit),
            current_spend=_usd(view.spent),
            remaining_budget=_usd(limit - view.spent) if limit else 0.0,
            utilization_percentage=view.spent / limit if limit else 0.0,
            projected_monthly_spend=round(average * days_in_month(now, zone)) / MICROS,
            on_track=not limit or projected_period <= limit,
            days_remaining=days_remaining,
            average_daily_spend=round(average) / MICROS,
        )

    async def _store_call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except StoreUnavailable as exc:
            raise Unavailable("the budget store is unreachable", metadata={"dependency": "redis"}) from exc

    async def _admin_views(self, now: datetime) -> list[ScopeView]:
        return await self._store_call(self._engine.views(now))

    async def GetBudgetAlerts(
        self, request: budget_pb2.GetBudgetAlertsRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.GetBudgetAlertsResponse:
        stored = await self._engine.repository.alert_config()
        config = alerts.AlertConfig() if stored is None else alerts.AlertConfig.from_json(stored[0])
        data = alerts.to_proto(config)
        if stored is not None:
            data.updated_at.FromDatetime(stored[1])
        return budget_pb2.GetBudgetAlertsResponse(success=True, data=data)

    async def UpdateBudgetAlerts(
        self, request: budget_pb2.UpdateBudgetAlertsRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.UpdateBudgetAlertsResponse:
        config = alerts.parse_request(request)
        updated_at = await self._engine.repository.put_alert_config(config.to_json())
        self._engine.evaluator.use_config(config)
        data = alerts.to_proto(config)
        data.updated_at.FromDatetime(updated_at)
        return budget_pb2.UpdateBudgetAlertsResponse(success=True, data=data)

    async def GetGlobalBudget(
        self, request: budget_pb2.GetGlobalBudgetRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.GetGlobalBudgetResponse:
        views = await self._admin_views(datetime.now(UTC))
        return budget_pb2.GetGlobalBudgetResponse(success=True, data=_budget_message(views[0]))

    async def UpdateGlobalBudget(
        self, request: budget_pb2.UpdateGlobalBudgetRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.UpdateGlobalBudgetResponse:
        limit, period, timezone = _validate_budget(request.max_budget, request.period, request.timezone)
        await self._store_call(self._engine.put_budget(GLOBAL_SCOPE, None, limit, period, timezone))
        views = await self._admin_views(datetime.now(UTC))
        return budget_pb2.UpdateGlobalBudgetResponse(success=True, data=_budget_message(views[0]))

    async def _key_view(self, key_id: uuid.UUID) -> ScopeView:
        views = await self._admin_views(datetime.now(UTC))
        for view in views:
            if view.scope == key_scope(str(key_id)):
                return view
        if await self._keys.get(key_id) is None:
            raise NotFound(f"virtual key {key_id} is unknown", metadata={"keyId": str(key_id)})
        raise NotFound(f"virtual key {key_id} has no budget", metadata={"keyId": str(key_id)})

    async def GetVirtualKeyBudget(
        self, request: budget_pb2.GetVirtualKeyBudgetRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.GetVirtualKeyBudgetResponse:
        key_id = require_uuid(request.key_id, "keyId")
        return budget_pb2.GetVirtualKeyBudgetResponse(success=True, data=_budget_message(await self._key_view(key_id)))

    async def UpdateVirtualKeyBudget(
        self, request: budget_pb2.UpdateVirtualKeyBudgetRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.UpdateVirtualKeyBudgetResponse:
        key_id = require_uuid(request.key_id, "keyId")
        limit, period, timezone = _validate_budget(request.max_budget, request.period, request.timezone)
        await self._store_call(self._engine.put_budget(key_scope(str(key_id)), key_id, limit, period, timezone))
        return budget_pb2.UpdateVirtualKeyBudgetResponse(
            success=True, data=_budget_message(await self._key_view(key_id))
        )

    async def ReconcileBudgets(
        self, request: budget_pb2.ReconcileBudgetsRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.ReconcileBudgetsResponse:
        scopes, drift = await self._store_call(self._engine.reconcile(trigger="manual"))
        result = budget_pb2.ReconcileResult(scopes=scopes, drift=_usd(drift))
        result.reconciled_at.FromDatetime(datetime.now(UTC))
        return budget_pb2.ReconcileBudgetsResponse(success=True, data=result)

    # ------------------------------------------------------------------ virtual keys
    async def _key_with_budget(self, record: VirtualKeyRecord) -> budget_pb2.VirtualKey:
        message = _key_message(record)
        row = await self._engine.repository.budget(key_scope(str(record.key_id)))
        if row is not None:
            views = await self._admin_views(datetime.now(UTC))
            for view in views:
                if view.scope == row.scope:
                    message.budget.CopyFrom(_budget_message(view))
        return message

    async def GetVirtualKey(
        self, request: budget_pb2.GetVirtualKeyRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.GetVirtualKeyResponse:
        key_id = require_uuid(request.key_id, "keyId")
        record = await self._keys.get(key_id)
        if record is None:
            raise NotFound(f"virtual key {key_id} is unknown", metadata={"keyId": str(key_id)})
        return budget_pb2.GetVirtualKeyResponse(success=True, data=await self._key_with_budget(record))

    async def UpdateVirtualKey(
        self, request: budget_pb2.UpdateVirtualKeyRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.UpdateVirtualKeyResponse:
        violations = Violations()
        key_id = require_uuid(request.key_id, "keyId")
        name = validate_key_name(request.key_name, violations)
        violations.raise_if_any()
        record = await self._keys.upsert(key_id, name, request.is_test)
        return budget_pb2.UpdateVirtualKeyResponse(success=True, data=_key_message(record))

    async def ListVirtualKeys(
        self, request: budget_pb2.ListVirtualKeysRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.ListVirtualKeysResponse:
        size = page_size(request.page_size)
        position = decode_page_token(request.page_token)
        after = (str(position[0]), str(position[1])) if position and len(position) == 2 else None
        records = await self._keys.page(size + 1, after)
        page = budget_pb2.VirtualKeyPage(keys=[_key_message(r) for r in records[:size]])
        if len(records) > size:
            last = records[size - 1]
            page.next_page_token = encode_page_token([last.key_name, str(last.key_id)])
        return budget_pb2.ListVirtualKeysResponse(success=True, data=page)

    async def _set_enabled(self, key_id: uuid.UUID, enabled: bool, reason: str) -> budget_pb2.VirtualKey:
        event_type = budget_pb2.BUDGET_EVENT_TYPE_KEY_ENABLED if enabled else budget_pb2.BUDGET_EVENT_TYPE_KEY_DISABLED
        text = "enabled by an admin" if enabled else f"disabled by an admin: {reason}"
        event = BudgetEvent(event_type, key_scope(str(key_id)), str(key_id), 0.0, 0, 0, text)
        recorded = await self._store_call(self._engine.set_enabled(key_id, enabled, reason, event))
        if recorded is None:
            raise NotFound(f"virtual key {key_id} is unknown", metadata={"keyId": str(key_id)})
        await self._events.deliver([recorded])
        record = await self._keys.get(key_id)
        assert record is not None
        return await self._key_with_budget(record)

    async def EnableVirtualKey(
        self, request: budget_pb2.EnableVirtualKeyRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.EnableVirtualKeyResponse:
        key_id = require_uuid(request.key_id, "keyId")
        return budget_pb2.EnableVirtualKeyResponse(success=True, data=await self._set_enabled(key_id, True, ""))

    async def DisableVirtualKey(
        self, request: budget_pb2.DisableVirtualKeyRequest, context: grpc.aio.ServicerContext
    ) -> budget_pb2.DisableVirtualKeyResponse:
        key_id = require_uuid(request.key_id, "keyId")
        if len(request.reason) > MAX_REASON:
            raise InvalidArgument.field("reason", f"must be at most {MAX_REASON} characters")
        reason = request.reason.strip() or "disabled by an admin"
        return budget_pb2.DisableVirtualKeyResponse(success=True, data=await self._set_enabled(key_id, False, reason))


def _authorize_arguments(request: budget_pb2.AuthorizeRequest) -> tuple[str, str, int]:
    """(canonical key id, request id, estimate) of an Authorize, or InvalidArgument naming the fields."""
    key_id = _key_id(request.key_id)
    request_id = request.request_id
    estimate = request.estimated_cost_micros
    if not request_id or len(request_id) > MAX_REQUEST_ID or estimate < 0:
        violations = Violations()
        _request_id(request_id, "requestId", violations)
        if estimate < 0:
            violations.add("estimatedCostMicros", "must not be negative")
        violations.raise_if_any()
    return key_id, request_id, estimate


_STREAM_METHOD = "/tally.budget.v1.BudgetService/StreamRequestPath"


def _fill_remaining(
    message: budget_pb2.ScopeRemaining,
    scope: str,
    call: ScopeCall,
    limit: int,
    committed: int,
    engine: BudgetEngine,
    now: datetime,
) -> None:
    """`_remaining`, written in place (into a message of the answer being built)."""
    message.scope = scope
    if limit < 0:
        message.unlimited = True
    else:
        message.limit_micros = limit
        message.remaining_micros = limit - committed
    message.committed_micros = committed
    message.period_start.CopyFrom(_stamp(engine.period(call.config, now).start))


class _RequestPathStream:
    """One StreamRequestPath stream, with no task or future per call: an Authorize or a Settle
    (naming its key) goes to the engine's callback form and is answered from the Redis batch's
    reply, written in place into the next outgoing message. A Release, a Settle naming no key and
    an invalid call run through the unary handlers in a task of their own.

    Flow control: at most STREAM_MAX_IN_FLIGHT calls read and not yet answered to the client;
    reading stops at the bound (the transport pushes back on a client that sends without reading
    its answers). The answers ready while a message is being written go out in the next one (at
    most STREAM_MAX_ANSWERS_PER_MESSAGE each)."""

    def __init__(self, servicer: BudgetServicer, grpc_context: grpc.aio.ServicerContext) -> None:
        self._servicer = servicer
        self._engine = servicer._engine
        self._grpc_context = grpc_context
        # The stream's context (correlation id): failures decided in a batch's callback log in it.
        self._context = contextvars.copy_context()
        self._loop = asyncio.get_running_loop()
        self._ready: deque[budget_pb2.StreamRequestPathResponse] = deque()
        self._unanswered = 0  # calls read whose answer is not built yet
        self._unsent = 0  # calls read whose answer has not been written yet (the window)
        self._reading = True
        self._read_failed = False
        self._writer: asyncio.Future[None] | None = None
        self._window: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ reading and dispatch
    async def read(self, request_iterator: AsyncIterator[budget_pb2.StreamRequestPathRequest]) -> None:
        try:
            async for message in request_iterator:
                now = datetime.now(UTC)
                for call in message.calls:
                    while self._unsent >= STREAM_MAX_IN_FLIGHT:
                        self._window = self._loop.create_future()
                        await self._window
                        now = datetime.now(UTC)
                    self._unsent += 1
                    self._unanswered += 1
                    self._dispatch(call, now)
        except BaseException:
            self._read_failed = True
            raise
        finally:
            self._reading = False
            self._wake_writer()

    def _dispatch(self, call: budget_pb2.RequestPathCall, now: datetime) -> None:
        kind = call.WhichOneof("call")
        call_id = call.call_id
        if kind == "authorize":
            try:
                key_id, request_id, estimate = _authorize_arguments(call.authorize)
            except Exception as exc:
                self._error(call_id, exc)
                return
            waiter = _AuthorizeAnswer(self, call_id, key_id, request_id)
            self._engine.authorize_soon(key_id, request_id, estimate, waiter, now)
            return
        if kind == "settle":
            try:
                (item,) = self._servicer._settle_items([call.settle], "")
            except Exception as exc:
                self._error(call_id, exc)
                return
            if item.key_id:
                self._engine.settle_soon(item, _SettleAnswer(self, call_id, item), now)
                return
        # A Release, a Settle that needs its reservation's key id, or no call at all.
        task = asyncio.create_task(self._unary(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unary(self, call: budget_pb2.RequestPathCall) -> None:
        answer = await self._servicer._stream_call(call, self._grpc_context)
        self.answer(call.call_id).MergeFrom(answer)

    # ------------------------------------------------------------------ answers
    def answer(self, call_id: int) -> budget_pb2.RequestPathAnswer:
        """A new answer to `call_id` in the next outgoing message: fill it in before yielding to
        the event loop."""
        ready = self._ready
        if not ready or len(ready[-1].answers) >= STREAM_MAX_ANSWERS_PER_MESSAGE:
            ready.append(budget_pb2.StreamRequestPathResponse())
        answer = ready[-1].answers.add()
        answer.call_id = call_id
        self._unanswered -= 1
        self._wake_writer()
        return answer

    def _error(self, call_id: int, exc: BaseException) -> None:
        self.answer(call_id).error.CopyFrom(caller_error(exc, _STREAM_METHOD).to_status())

    def replace_with_error(self, answer: budget_pb2.RequestPathAnswer, exc: BaseException) -> None:
        """An answer that could not be built becomes the error (logged, as any unexpected one)."""
        call_id = answer.call_id
        answer.Clear()
        answer.call_id = call_id
        self.in_context(lambda: answer.error.CopyFrom(caller_error(exc, _STREAM_METHOD).to_status()))

    def in_context(self, step: Callable[[], None]) -> None:
        """Runs `step` (a failure's answer, which may log) in the stream's context."""
        self._context.run(step)

    def _wake_writer(self) -> None:
        writer = self._writer
        if writer is not None and not writer.done():
            writer.set_result(None)

    async def replies(self) -> AsyncIterator[budget_pb2.StreamRequestPathResponse]:
        """The messages to write, until the client is done writing and every call is answered
        (or reading failed)."""
        ready = self._ready
        while True:
            if ready:
                reply = ready.popleft()
                yield reply
                self._unsent -= len(reply.answers)
                window = self._window
                if window is not None and not window.done() and self._unsent < STREAM_MAX_IN_FLIGHT:
                    window.set_result(None)
                continue
            if not self._reading and (self._unanswered <= 0 or self._read_failed):
                return
            self._writer = self._loop.create_future()
            await self._writer
            self._writer = None

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


class _AuthorizeAnswer:
    """Answers one Authorize of a request-path stream from the engine's decision."""

    __slots__ = ("call_id", "key_id", "request_id", "stream")

    def __init__(self, stream: _RequestPathStream, call_id: int, key_id: str, request_id: str) -> None:
        self.stream = stream
        self.call_id = call_id
        self.key_id = key_id
        self.request_id = request_id

    def authorized(self, result: AuthorizeResult, key_call: ScopeCall, global_call: ScopeCall) -> None:
        stream = self.stream
        if result.reason:
            self.failed(stream._servicer._denial(self.key_id, result))
            return
        _decided("replayed" if result.replayed else "allowed")
        answer = stream.answer(self.call_id)
        try:
            engine = stream._engine
            now = datetime.now(UTC)
            response = answer.authorize
            response.allowed = True
            if result.replayed:
                response.replayed = True
            key = response.remaining.add()
            _fill_remaining(key, key_scope(self.key_id), key_call, result.key_limit, result.key_committed, engine, now)
            glob = response.remaining.add()
            _fill_remaining(glob, GLOBAL_SCOPE, global_call, result.global_limit, result.global_committed, engine, now)
            if result.expires_ms:
                response.expires_at.FromMilliseconds(result.expires_ms)
        except Exception as exc:
            stream.replace_with_error(answer, exc)

    def failed(self, error: BaseException) -> None:
        self.stream.in_context(lambda: self._failed(error))

    def _failed(self, error: BaseException) -> None:
        stream = self.stream
        if isinstance(error, StoreUnavailable):
            try:
                response = stream._servicer._failure_policy(self.key_id, self.request_id, error)
            except Exception as denial:
                stream._error(self.call_id, denial)
            else:
                stream.answer(self.call_id).authorize.CopyFrom(response)
            return
        stream._error(self.call_id, error)


class _SettleAnswer:
    """Answers one Settle of a request-path stream from the engine's outcome."""

    __slots__ = ("call_id", "item", "stream")

    def __init__(self, stream: _RequestPathStream, call_id: int, item: SettleItem) -> None:
        self.stream = stream
        self.call_id = call_id
        self.item = item

    def settled(self, outcome: SettleOutcome) -> None:
        stream = self.stream
        answer = stream.answer(self.call_id)
        try:
            engine = stream._engine
            now = datetime.now(UTC)
            key_call, key_limit, key_spent, key_reserved = outcome.key
            global_call, global_limit, global_spent, global_reserved = outcome.global_
            response = answer.settle
            if outcome.already_settled:
                response.already_settled = True
            if outcome.overspend:
                response.overspend_micros = outcome.overspend
            key = response.remaining.add()
            _fill_remaining(
                key, key_scope(self.item.key_id), key_call, key_limit, key_spent + key_reserved, engine, now
            )
            glob = response.remaining.add()
            global_committed = global_spent + global_reserved
            _fill_remaining(glob, GLOBAL_SCOPE, global_call, global_limit, global_committed, engine, now)
        except Exception as exc:
            stream.replace_with_error(answer, exc)

    def failed(self, error: BaseException) -> None:
        self.stream.in_context(lambda: self._failed(error))

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, StoreUnavailable):
            error = BudgetServicer._settle_unavailable("settle", error)
        self.stream._error(self.call_id, error)


async def build(resources: Resources) -> Sequence[Registration]:
    settings = resources.settings
    timeout = settings.budget_redis_timeout_ms / 1000
    # The request path gets its own client: short socket timeouts and one immediate retry (a
    # pooled connection broken by a Redis restart reconnects), so an unreachable Redis turns into
    # the failure policy within the caller's deadline.
    fast_options: dict[str, object] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if not settings.redis_cluster:
        fast_options["retry"] = Retry(NoBackoff(), 1)
    fast = create_redis(settings, **fast_options)
    reader = create_redis(settings, socket_timeout=BLOCK_MS / 1000 + 5)

    repository = BudgetRepository(resources.db)
    events = EventStream(resources.redis, reader, settings.budget_event_stream_maxlen, resources.db)
    worker = DeliveryWorker(resources.db, settings)
    store = BudgetStore(fast, default=ScopeConfig(DEFAULT_PERIOD.value, settings.timezone))
    evaluator = Evaluator(settings, resources.db, repository, store, events, worker.wake)
    engine = BudgetEngine(settings, store, repository, evaluator)
    if settings.budget_reconcile_on_start:
        try:
            await engine.reconcile(trigger="start")
        except Exception:
            # Redis may be down at start: the request path rebuilds once it is back (NOT_LOADED).
            log.exception("reconcile at start failed")
    tasks = BackgroundTasks(settings, engine, worker, events)
    tasks.start()

    async def close() -> None:
        await tasks.stop()
        await worker.close()
        await fast.aclose()
        await reader.aclose()

    resources.closers.append(close)
    return [
        Registration(
            BudgetServicer(resources, engine, events),
            budget_pb2_grpc.add_BudgetServiceServicer_to_server,
            budget_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name,
            quiet_methods=_REQUEST_PATH,
        )
    ]
