"""Budget enforcement: the request path (authorize, settle, release), the failure policy,
reconciliation from the database and budget configuration. Knows nothing of gRPC."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

import redis.exceptions
from psycopg import AsyncConnection

from services.budget import metrics
from services.budget.batching import Coalescer
from services.budget.evaluator import Evaluator, ScopeSpend
from services.budget.events import BudgetEvent
from services.budget.periods import Period, PeriodKind, period_at, zone_named
from services.budget.repository import BudgetRepository, BudgetRow
from services.budget.store import (
    GLOBAL_SCOPE,
    AuthorizeEntry,
    AuthorizeResult,
    BudgetStore,
    GlobalGroup,
    KeyGroup,
    Outcome,
    ScopeCall,
    ScopeConfig,
    SettleEntry,
    SettleResult,
    SpendChunk,
    SpendItem,
    SpendResult,
    counter_key,
    key_scope,
    provider_key,
)
from tally.runtime import context
from tally.runtime.config import Settings
from tally.runtime.errors import Unavailable

log = logging.getLogger("tally.budget")

T = TypeVar("T")
DEFAULT_PERIOD = PeriodKind.MONTHLY
# Time kept back from the caller's deadline to answer with the failure policy.
_DEADLINE_MARGIN = 0.02
_MAX_CONFIG_CACHE = 200_000
_RECONCILE_CHUNK = 200
# A rebuild that has not finished after this long (it crashed) stops having settlements logged for it.
_REBUILD_LOG_MS = 120_000
# Most concurrent authorizations decided by one script run.
AUTHORIZE_BATCH = 256
# Most Authorize and Settle entries per request-path batch (one pipeline: AUTHORIZE_BATCH per
# AUTHORIZE run, SETTLE_CHUNK per SETTLE run).
REQUEST_BATCH = 1024
# Most settlements per script run: a script blocks every other Redis client while it runs
# (10-20 us per settlement measured on the 2-core machine), so a large SettleBatch runs as
# chunks of this size (1-2 ms each), all sent in one pipeline: one round trip.
SETTLE_CHUNK = 100
# Most settlements per script run of a SettleBatch (lua.SETTLE_SPEND: 2-3 us each).
SPEND_CHUNK = 500
# Most requests per script run of a hand-off (lua.SETTLE_HANDOFF: about 1 us each; the script
# passes all their record keys to one EXISTS, within Lua's stack limit of 8,000 values).
HANDOFF_CHUNK = 2000


def _report_overspend(unreserved: int, above_items: int, above_micros: int, first: str) -> None:
    """Spend with no open reservation (the gateway did not authorize, or the reservation expired)
    is all "above its reservation": counted, not logged per item, because a gateway that never
    authorizes would log every request. Actual costs above an open reservation's estimate are
    logged, one line per call."""
    if unreserved:
        metrics.OVERSPEND.labels("none").inc(unreserved)
    if above_items:
        metrics.OVERSPEND.labels("open").inc(above_micros)
        log.warning(
            "settled above the reservation",
            extra={"items": above_items, "overspendMicros": above_micros, "firstRequestId": first},
        )


class StoreUnavailable(Exception):
    """Redis did not answer in time (or at all)."""


_REDIS_FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, TimeoutError, OSError)


def _unavailable(exc: BaseException) -> BaseException:
    """What each caller of a failed batch sees."""
    if isinstance(exc, _REDIS_FAILURES):
        return StoreUnavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, asyncio.CancelledError):
        return StoreUnavailable("the batch was cancelled (shutting down)")
    return exc


@dataclass(frozen=True)
class SettleItem:
    request_id: str
    key_id: str
    actual: int
    event_time: datetime | None
    provider: str
    transaction_id: int = 0  # the database transaction that stored the usage (0: unknown)


@dataclass(frozen=True)
class HandoffGroup:
    """Requests of one key and provider, from one database transaction, within one quarter hour."""

    key_id: str
    provider: str
    event_time: datetime
    transaction_id: int = 0


@dataclass(frozen=True)
class Handoff:
    """Ingest's hand-off of newly stored usage (SettleBatch's compact form): one entry per request
    in the three columns, each request in one of `groups`. Each request is handed over once; a
    retry of the same hand-off carries the same `handoff_id`."""

    handoff_id: str
    groups: Sequence[HandoffGroup]
    request_ids: Sequence[str]
    costs: Sequence[int]
    group_index: Sequence[int]


@dataclass(frozen=True)
class SettleOutcome:
    already_settled: bool
    overspend: int
    key: tuple[ScopeCall, int, int, int]  # call, limit, spent, reserved
    global_: tuple[ScopeCall, int, int, int]


@dataclass(frozen=True)
class ScopeView:
    """A scope's budget and counters in its current period, for the admin API."""

    scope: str
    row: BudgetRow | None
    period: Period
    tz: str
    spent: int
    reserved: int


class AuthorizeWaiter(Protocol):
    """Hears one `BudgetEngine.authorize_soon` call's answer, exactly once."""

    def authorized(self, result: AuthorizeResult, key_call: ScopeCall, global_call: ScopeCall) -> None: ...

    def failed(self, error: BaseException) -> None: ...


class SettleWaiter(Protocol):
    """Hears one `BudgetEngine.settle_soon` call's answer, exactly once."""

    def settled(self, outcome: SettleOutcome) -> None: ...

    def failed(self, error: BaseException) -> None: ...


RequestEntry = AuthorizeEntry | SettleEntry
RequestResult = AuthorizeResult | SettleResult
_CHANGING = "the budget configuration kept changing during the call; retry"
_ATTEMPTS = 4


class _AuthorizeCall:
    """One `authorize_soon` call: the coalescer's sink for its entry, so its answer is decided in
    a plain call from the batch's Redis reply; the rare retries (counters not loaded, a changed
    budget period) resubmit it, as `authorize`'s loop does."""

    __slots__ = ("attempt", "engine", "estimate", "global_call", "key_call", "key_id", "now", "request_id", "waiter")

    def __init__(
        self, engine: BudgetEngine, key_id: str, request_id: str, estimate: int, waiter: AuthorizeWaiter, now: datetime
    ) -> None:
        self.engine = engine
        self.key_id = key_id
        self.request_id = request_id
        self.estimate = estimate
        self.waiter = waiter
        self.now = now
        self.attempt = 0

    def submit(self) -> None:
        engine = self.engine
        scope = key_scope(self.key_id)
        try:
            self.key_call = key_call = engine.call(scope, engine._cached(scope), self.now)
            self.global_call = global_call = engine.call(GLOBAL_SCOPE, engine._cached(GLOBAL_SCOPE), self.now)
            deadline = engine._deadline()
        except Exception as exc:
            self.waiter.failed(exc)
            return
        entry = AuthorizeEntry(self.request_id, self.key_id, self.estimate, key_call, global_call)
        engine._requests.submit_to(entry, self, deadline)

    def done(self) -> bool:
        return False

    def set_exception(self, exception: BaseException, /) -> None:
        self.waiter.failed(exception)

    def set_result(self, result: RequestResult, /) -> None:
        try:
            self._decided(result)
        except Exception as exc:  # the call is answered whatever happens
            self.waiter.failed(exc)

    def _decided(self, result: RequestResult) -> None:
        if type(result) is not AuthorizeResult:
            raise TypeError(f"an authorization was answered with {result!r}")
        if result.outcome is Outcome.NOT_LOADED or result.stale is not None:
            self.attempt += 1
            if self.attempt >= _ATTEMPTS:
                self.waiter.failed(Unavailable(_CHANGING))
            elif result.stale is not None:
                self.engine._remember(key_scope(self.key_id), result.stale[0])
                self.engine._remember(GLOBAL_SCOPE, result.stale[1])
                self.submit()
            else:
                self.engine._spawn(self.engine._reload_then(self.submit, self.waiter))
            return
        self.waiter.authorized(result, self.key_call, self.global_call)


class _SettleCall:
    """One `settle_soon` call (see `_AuthorizeCall`); thresholds are evaluated before it is
    answered, in a task only when one may fire."""

    __slots__ = ("attempt", "calls", "engine", "item", "now", "waiter")

    def __init__(self, engine: BudgetEngine, item: SettleItem, waiter: SettleWaiter, now: datetime) -> None:
        self.engine = engine
        self.item = item
        self.waiter = waiter
        self.now = now
        self.attempt = 0

    def submit(self) -> None:
        engine = self.engine
        try:
            entry, self.calls = engine._settle_entry(self.item, self.now)
            deadline = engine._deadline()
        except Exception as exc:
            self.waiter.failed(exc)
            return
        engine._requests.submit_to(entry, self, deadline)

    def done(self) -> bool:
        return False

    def set_exception(self, exception: BaseException, /) -> None:
        self.waiter.failed(exception)

    def set_result(self, result: RequestResult, /) -> None:
        try:
            self._decided(result)
        except Exception as exc:  # the call is answered whatever happens
            self.waiter.failed(exc)

    def _decided(self, result: RequestResult) -> None:
        if type(result) is not SettleResult:
            raise TypeError(f"a settlement was answered with {result!r}")
        engine = self.engine
        if result.outcome is Outcome.NOT_LOADED or result.stale is not None:
            self.attempt += 1
            if self.attempt >= _ATTEMPTS:
                self.waiter.failed(Unavailable(_CHANGING))
            elif result.stale is not None:
                engine._remember(key_scope(self.item.key_id), result.stale[0])
                engine._remember(GLOBAL_SCOPE, result.stale[1])
                self.submit()
            else:
                engine._spawn(engine._reload_then(self.submit, self.waiter))
            return
        outcome = engine._settled(self.item, self.calls, result)
        if result.overspend:
            if result.reserved:
                _report_overspend(0, 1, result.overspend, self.item.request_id)
            else:
                _report_overspend(result.overspend, 0, 0, "")
        spends = engine._spends((self.item,), (outcome,))
        if any(engine.evaluator.may_fire(spend) for spend in spends):
            engine._spawn(self._evaluate_then_answer(spends, outcome))
        else:
            self.waiter.settled(outcome)

    async def _evaluate_then_answer(self, spends: Iterable[ScopeSpend], outcome: SettleOutcome) -> None:
        try:
            await self.engine._evaluate(spends)
        except BaseException as exc:
            self.waiter.failed(exc)
            raise
        self.waiter.settled(outcome)


class BudgetEngine:
    def __init__(
        self,
        settings: Settings,
        store: BudgetStore,
        repository: BudgetRepository,
        evaluator: Evaluator,
    ) -> None:
        self.settings = settings
        self.store = store
        self.repository = repository
        self.evaluator = evaluator
        self.default = ScopeConfig(DEFAULT_PERIOD.value, settings.timezone)
        self._configs: dict[str, ScopeConfig] = {}
        self._zones: dict[str, ZoneInfo] = {}
        self._periods: dict[tuple[str, str], Period] = {}
        # scope -> (config, period, call): the counter key and expiry change only with the period.
        self._calls: dict[str, tuple[ScopeConfig, Period, ScopeCall]] = {}
        self._redis_timeout = settings.budget_redis_timeout_ms / 1000
        self._ttl_ms = int(settings.budget_reservation_ttl_seconds * 1000)
        self._settled_ttl_ms = settings.budget_settled_ttl_seconds * 1000
        self._handoff_ttl_ms = settings.budget_handoff_settled_ttl_seconds * 1000
        self._retention = settings.budget_counter_retention_seconds
        self._reconcile_lock = asyncio.Lock()
        self._reconcile_task: asyncio.Task[tuple[int, int]] | None = None
        self._background: set[asyncio.Task[None]] = set()  # the rare slow steps of *_soon calls
        # Authorize and Settle calls made while a batch is out go together in the next one: one
        # Redis round trip for both kinds.
        self._requests: Coalescer[RequestEntry, RequestResult] = Coalescer(
            self._request_batch, max_batch=REQUEST_BATCH, failure=_unavailable
        )
        self._observe_authorize = metrics.BATCH_ITEMS.labels("authorize").observe
        self._observe_settle = metrics.BATCH_ITEMS.labels("settle").observe

    # ------------------------------------------------------------------ periods and keys
    def zone(self, name: str) -> ZoneInfo:
        zone = self._zones.get(name)
        if zone is None:
            zone = self._zones[name] = zone_named(name, self.settings.zone)
        return zone

    def period(self, config: ScopeConfig, at: datetime) -> Period:
        cached = self._periods.get((config.period, config.tz))
        if cached is not None and cached.start <= at and (cached.end is None or at < cached.end):
            return cached
        period = period_at(PeriodKind(config.period), self.zone(config.tz), at)
        self._periods[(config.period, config.tz)] = period
        return period

    def call(self, scope: str, config: ScopeConfig, at: datetime) -> ScopeCall:
        hit = self._calls.get(scope)
        if hit is not None:
            known, period, call = hit
            if (known is config or known == config) and period.start <= at and (period.end is None or at < period.end):
                return call
        period = self.period(config, at)
        expire_at = 0 if period.end is None else int(period.end.timestamp()) + self._retention
        call = ScopeCall(config, counter_key(scope, period, config.tz), expire_at)
        if len(self._calls) > _MAX_CONFIG_CACHE:
            self._calls.clear()
        self._calls[scope] = (config, period, call)
        return call

    def config_of(self, row: BudgetRow | None) -> ScopeConfig:
        if row is None:
            return self.default
        return ScopeConfig(row.period, row.timezone or self.settings.timezone)

    def _cached(self, scope: str) -> ScopeConfig:
        return self._configs.get(scope, self.default)

    def _remember(self, scope: str, config: ScopeConfig) -> None:
        if len(self._configs) > _MAX_CONFIG_CACHE:
            self._configs.clear()
        self._configs[scope] = config

    # ------------------------------------------------------------------ deadline-bound Redis calls
    def _timeout(self, chunks: int = 1) -> float:
        remaining = context.seconds_remaining()
        if remaining is None:
            return self._redis_timeout * chunks
        return min(self._redis_timeout * chunks, remaining - _DEADLINE_MARGIN)

    async def _bounded(self, call: Awaitable[T]) -> T:
        timeout = self._timeout()
        if timeout <= 0:
            if asyncio.iscoroutine(call):
                call.close()
            raise StoreUnavailable("no time left before the caller's deadline")
        try:
            async with asyncio.timeout(timeout):
                return await call
        except _REDIS_FAILURES as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ request path
    def _deadline(self, chunks: int = 1) -> float:
        """The loop-clock time by which this call's Redis work must be answered."""
        timeout = self._timeout(chunks)
        if timeout <= 0:
            raise StoreUnavailable("no time left before the caller's deadline")
        return asyncio.get_running_loop().time() + timeout

    async def _request_batch(self, entries: Sequence[RequestEntry]) -> list[RequestResult]:
        """Decides a batch of concurrent Authorize and Settle entries in one round trip."""
        authorize = [entry for entry in entries if type(entry) is AuthorizeEntry]
        settle = [entry for entry in entries if type(entry) is SettleEntry]
        if authorize:
            self._observe_authorize(len(authorize))
        if settle:
            self._observe_settle(len(settle))
        authorized, settled = await self.store.request_path_many(
            authorize,
            settle,
            ttl_ms=self._ttl_ms,
            record_ttl_ms=self._ttl_ms + self._handoff_ttl_ms,
            settled_ttl_ms=self._settled_ttl_ms,
            authorize_chunk=AUTHORIZE_BATCH,
            settle_chunk=SETTLE_CHUNK,
        )
        if not settle:
            return list(authorized)
        if not authorize:
            return list(settled)
        authorize_results, settle_results = iter(authorized), iter(settled)
        return [next(authorize_results) if type(entry) is AuthorizeEntry else next(settle_results) for entry in entries]

    async def authorize(
        self, key_id: str, request_id: str, estimate: int
    ) -> tuple[AuthorizeResult, ScopeCall, ScopeCall]:
        """Reserves `estimate` in the key's and the global scope, atomically; concurrent calls
        share one script run (see `batching`), each still decided on its own."""
        scope = key_scope(key_id)
        now = datetime.now(UTC)
        for _ in range(4):
            key_call = self.call(scope, self._cached(scope), now)
            global_call = self.call(GLOBAL_SCOPE, self._cached(GLOBAL_SCOPE), now)
            deadline = self._deadline()
            (future,) = self._requests.submit(
                [AuthorizeEntry(request_id, key_id, estimate, key_call, global_call)], deadline
            )
            try:
                async with asyncio.timeout_at(deadline):
                    result = await future
            except TimeoutError as exc:
                raise StoreUnavailable("redis did not answer before the deadline") from exc
            assert isinstance(result, AuthorizeResult)
            if result.outcome is Outcome.NOT_LOADED:
                await self.ensure_loaded()
                continue
            if result.stale is not None:
                self._remember(scope, result.stale[0])
                self._remember(GLOBAL_SCOPE, result.stale[1])
                continue
            return result, key_call, global_call
        raise Unavailable("the budget configuration kept changing during the call; retry")

    def authorize_soon(
        self, key_id: str, request_id: str, estimate: int, waiter: AuthorizeWaiter, now: datetime | None = None
    ) -> None:
        """`authorize` for the request-path stream: the same decision (and retries), told to
        `waiter` straight from the batch's Redis answer instead of to an awaiting coroutine (no
        task, future or timer per call). Never raises: every failure goes to `waiter.failed`."""
        _AuthorizeCall(self, key_id, request_id, estimate, waiter, now or datetime.now(UTC)).submit()

    def settle_soon(self, item: SettleItem, waiter: SettleWaiter, now: datetime | None = None) -> None:
        """`settle` of one item that names its key (see `authorize_soon`)."""
        if not item.key_id:
            waiter.failed(ValueError("settle_soon needs the item's key id"))
            return
        _SettleCall(self, item, waiter, now or datetime.now(UTC)).submit()

    def _spawn(self, step: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(step)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_then(self, submit: Callable[[], None], waiter: AuthorizeWaiter | SettleWaiter) -> None:
        """Waits for the counters to be rebuilt (after a FLUSHALL), then submits the call again."""
        try:
            await self.ensure_loaded()
        except Exception as exc:
            waiter.failed(exc)
            return
        submit()

    def _spends(self, items: Iterable[SettleItem], outcomes: Iterable[SettleOutcome]) -> list[ScopeSpend]:
        """The settled spend of each budgeted counter the settlements moved (the highest seen)."""
        spends: dict[tuple[str, str], ScopeSpend] = {}
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome.already_settled:
                continue
            for scope, (call, limit, spent, _reserved) in (
                (key_scope(item.key_id), outcome.key),
                (GLOBAL_SCOPE, outcome.global_),
            ):
                if limit < 0:
                    continue
                mark = (scope, call.counter)
                current = spends.get(mark)
                if current is None or spent > current.spent:
                    spends[mark] = ScopeSpend(
                        scope=scope,
                        key_id=item.key_id if scope != GLOBAL_SCOPE else "",
                        period=self.period(call.config, item.event_time or datetime.now(UTC)),
                        spent=spent,
                        limit=limit,
                    )
        return list(spends.values())

    async def settle(self, items: Sequence[SettleItem]) -> list[SettleOutcome]:
        """Settles every item (idempotent per request id) with a constant number of Redis round
        trips, then evaluates the thresholds of the scopes whose settled spend moved."""
        items = await self._with_key_ids(items)
        outcomes = await self._settle_items(items)
        await self._evaluate(self._spends(items, outcomes))
        return outcomes

    async def settle_batch(self, items: Sequence[SettleItem]) -> SpendResult:
        """Settles a batch of usage items: the same decisions as `settle`, item by item, but each
        counter is touched once per script run and the answer is the batch's totals (`keys` and
        `globals` are left empty). Thresholds are evaluated once per scope."""
        items = await self._with_key_ids(items)
        parts = [items[start : start + SPEND_CHUNK] for start in range(0, len(items), SPEND_CHUNK)]

        async def run(todo: Sequence[int], now: datetime) -> list[tuple[SpendChunk, SpendResult]]:
            chunks = [self._spend_chunk(parts[number], now) for number in todo]
            results = await self.store.settle_spend(
                chunks, settled_ttl_ms=self._settled_ttl_ms, unreserved_ttl_ms=self._handoff_ttl_ms
            )
            return list(zip(chunks, results, strict=True))

        return await self._settle_rounds(len(parts), run)

    async def settle_handoff(self, handoff: Handoff) -> SpendResult:
        """Settles ingest's hand-off (see Handoff): as `settle_batch`, but the spend is booked per
        spend group, and a request never authorized leaves no record of its own."""
        count = len(handoff.request_ids)
        parts = [
            (
                handoff.request_ids[start : start + HANDOFF_CHUNK],
                handoff.costs[start : start + HANDOFF_CHUNK],
                handoff.group_index[start : start + HANDOFF_CHUNK],
            )
            for start in range(0, count, HANDOFF_CHUNK)
        ]
        groups = [SettleItem("", g.key_id, 0, g.event_time, g.provider, g.transaction_id) for g in handoff.groups]

        async def run(todo: Sequence[int], now: datetime) -> list[tuple[SpendChunk, SpendResult]]:
            chunk = self._spend_chunk(groups, now)
            results = await self.store.settle_handoff(
                chunk,
                [(number, parts[number]) for number in todo],
                handoff_id=handoff.handoff_id,
                remember_ms=self._handoff_ttl_ms,
            )
            return [
                (chunk, dataclasses.replace(result, already_settled=len(parts[n][0])) if result.replayed else result)
                for n, result in zip(todo, results, strict=True)
            ]

        return await self._settle_rounds(len(parts), run)

    async def _settle_rounds(
        self, count: int, run: Callable[[Sequence[int], datetime], Awaitable[list[tuple[SpendChunk, SpendResult]]]]
    ) -> SpendResult:
        """Runs the `count` chunks of a batch settle (`run` settles those it is given, in one
        pipeline) until each is done: chunks refused because the counters are not loaded run
        again after loading them, and those whose scope configuration changed run again with it.
        Returns the batch's totals, after reporting its overspend and evaluating thresholds."""
        todo: Sequence[int] = range(count)
        done: list[SpendResult] = []
        spends: dict[tuple[str, str], ScopeSpend] = {}
        for _ in range(4):
            timeout = self._timeout(chunks=len(todo))
            if timeout <= 0:
                raise StoreUnavailable("no time left before the caller's deadline")
            try:
                async with asyncio.timeout(timeout):
                    settled = await run(todo, datetime.now(UTC))
            except _REDIS_FAILURES as exc:
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
            retry: list[int] = []
            loaded = True
            for number, (chunk, result) in zip(todo, settled, strict=True):
                if result.outcome is Outcome.NOT_LOADED:
                    loaded = False
                    retry.append(number)
                elif result.outcome is Outcome.STALE:
                    for scope, config in result.stale:
                        self._remember(scope, config)
                    retry.append(number)
                else:
                    done.append(result)
                    if not result.replayed:
                        self._spent(chunk, result, spends)
            if not retry:
                break
            if not loaded:
                await self.ensure_loaded()
            todo = retry
        else:
            raise Unavailable("the budget configuration kept changing during the call; retry")
        total = SpendResult(
            Outcome.DONE,
            already_settled=sum(r.already_settled for r in done),
            settled=sum(r.settled for r in done),
            overspend_unreserved=sum(r.overspend_unreserved for r in done),
            overspend_open=sum(r.overspend_open for r in done),
            open_items=sum(r.open_items for r in done),
            first_open=next((r.first_open for r in done if r.first_open), ""),
        )
        _report_overspend(total.overspend_unreserved, total.open_items, total.overspend_open, total.first_open)
        await self._evaluate(spends.values())
        return total

    async def _evaluate(self, spends: Iterable[ScopeSpend]) -> None:
        """Evaluates the thresholds of scopes whose settled spend moved."""
        for spend in spends:
            try:
                await self.evaluator.on_spend(spend)
            except Exception:
                # The spend is settled; the next settle (or the maintenance pass) evaluates again.
                log.exception("threshold evaluation failed", extra={"scope": spend.scope})

    def _spend_chunk(self, items: Sequence[SettleItem], now: datetime) -> SpendChunk:
        """The items with their counter groups (one per distinct counter)."""
        key_index: dict[str, int] = {}
        global_index: dict[str, int] = {}
        key_groups: list[KeyGroup] = []
        global_groups: list[GlobalGroup] = []
        global_config = self._cached(GLOBAL_SCOPE)
        spend: list[SpendItem] = []
        for item in items:
            at = item.event_time or now
            scope = key_scope(item.key_id)
            key_call = self.call(scope, self._cached(scope), at)
            key_number = key_index.get(key_call.counter)
            if key_number is None:
                key_number = key_index[key_call.counter] = len(key_groups)
                key_groups.append(KeyGroup(item.key_id, key_call, self.period(key_call.config, at)))
            global_call = self.call(GLOBAL_SCOPE, global_config, at)
            global_number = global_index.get(global_call.counter)
            if global_number is None:
                global_number = global_index[global_call.counter] = len(global_groups)
                period = self.period(global_call.config, at)
                global_groups.append(GlobalGroup(global_call, period, provider_key(period, global_call.config.tz)))
            spend.append(
                SpendItem(
                    item.request_id,
                    item.actual,
                    key_number,
                    global_number,
                    item.provider or "unknown",
                    item.transaction_id,
                )
            )
        return SpendChunk(key_groups, global_groups, spend)

    @staticmethod
    def _spent(chunk: SpendChunk, result: SpendResult, spends: dict[tuple[str, str], ScopeSpend]) -> None:
        """Notes the settled spend of each budgeted counter of the chunk (the highest seen)."""
        moved: list[tuple[str, str, ScopeCall, Period, int, int]] = [
            (key_scope(g.key_id), g.key_id, g.call, g.period, counts.limit, counts.spent)
            for g, counts in zip(chunk.key_groups, result.keys, strict=True)
        ]
        moved += [
            (GLOBAL_SCOPE, "", g.call, g.period, counts.limit, counts.spent)
            for g, counts in zip(chunk.global_groups, result.globals, strict=True)
        ]
        for scope, key_id, call, period, limit, spent in moved:
            if limit < 0:
                continue
            mark = (scope, call.counter)
            current = spends.get(mark)
            if current is None or spent > current.spent:
                spends[mark] = ScopeSpend(scope=scope, key_id=key_id, period=period, spent=spent, limit=limit)

    async def _with_key_ids(self, items: Sequence[SettleItem]) -> Sequence[SettleItem]:
        """Fills in the key id of items that name none from their reservations (one round trip)."""
        missing = [index for index, item in enumerate(items) if not item.key_id]
        if not missing:
            return items
        found = await self._bounded(self.store.reservation_key_ids([items[i].request_id for i in missing]))
        filled = list(items)
        for index, key_id in zip(missing, found, strict=True):
            if key_id is None:
                from tally.runtime.errors import InvalidArgument

                field = "keyId" if len(items) == 1 else f"items[{index}].keyId"
                raise InvalidArgument.field(field, "required when the request id has no reservation")
            item = items[index]
            filled[index] = SettleItem(
                item.request_id, key_id, item.actual, item.event_time, item.provider, item.transaction_id
            )
        return filled

    def _settle_entry(self, item: SettleItem, now: datetime) -> tuple[SettleEntry, tuple[ScopeCall, ScopeCall]]:
        """An item's script entry, and its key and global scope calls."""
        at = item.event_time or now
        scope = key_scope(item.key_id)
        key_call = self.call(scope, self._cached(scope), at)
        global_call = self.call(GLOBAL_SCOPE, self._cached(GLOBAL_SCOPE), at)
        global_period = self.period(global_call.config, at)
        entry = SettleEntry(
            item.request_id,
            item.key_id,
            item.actual,
            key_call,
            global_call,
            provider_key(global_period, global_call.config.tz),
            item.provider or "unknown",
            item.transaction_id,
        )
        return entry, (key_call, global_call)

    @staticmethod
    def _settled(item: SettleItem, calls: tuple[ScopeCall, ScopeCall], result: SettleResult) -> SettleOutcome:
        """The outcome of an item the script settled (or found settled before)."""
        assert result.key is not None and result.global_ is not None
        key_call, global_call = calls
        return SettleOutcome(
            already_settled=result.already_settled,
            overspend=result.overspend,
            key=(key_call, result.key.limit, result.key.spent, result.key.reserved),
            global_=(global_call, result.global_.limit, result.global_.spent, result.global_.reserved),
        )

    async def _settle_items(self, items: Sequence[SettleItem]) -> list[SettleOutcome]:
        outcomes: list[SettleOutcome | None] = [None] * len(items)
        todo = list(range(len(items)))
        now = datetime.now(UTC)
        for _ in range(4):
            calls: list[tuple[ScopeCall, ScopeCall]] = []
            entries: list[SettleEntry] = []
            for index in todo:
                entry, scope_calls = self._settle_entry(items[index], now)
                calls.append(scope_calls)
                entries.append(entry)
            # Each chunk is one Redis call: the Redis wait allowed grows with them (still bounded
            # by the caller's deadline).
            deadline = self._deadline(chunks=-(-len(entries) // SETTLE_CHUNK))
            futures = self._requests.submit(entries, deadline)
            try:
                async with asyncio.timeout_at(deadline):
                    answers = [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
            except TimeoutError as exc:
                raise StoreUnavailable("redis did not answer before the deadline") from exc
            results = [result for result in answers if isinstance(result, SettleResult)]
            retry: list[int] = []
            loaded = True
            # Settled above an open reservation: items, micro-units, the first request id.
            above_items, above_micros, above_first = 0, 0, ""
            unreserved = 0
            for index, (key_call, global_call), result in zip(todo, calls, results, strict=True):
                if result.outcome is Outcome.NOT_LOADED:
                    loaded = False
                    retry.append(index)
                    continue
                if result.stale is not None:
                    self._remember(key_scope(items[index].key_id), result.stale[0])
                    self._remember(GLOBAL_SCOPE, result.stale[1])
                    retry.append(index)
                    continue
                if result.overspend:
                    if result.reserved:
                        above_items += 1
                        above_micros += result.overspend
                        above_first = above_first or items[index].request_id
                    else:
                        unreserved += result.overspend
                outcomes[index] = self._settled(items[index], (key_call, global_call), result)
            _report_overspend(unreserved, above_items, above_micros, above_first)
            if not retry:
                return [outcome for outcome in outcomes if outcome is not None]
            if not loaded:
                await self.ensure_loaded()
            todo = retry
        raise Unavailable("the budget configuration kept changing during the call; retry")

    async def open_reservations(self) -> tuple[int, int]:
        """(open reservations, micro-units they hold against the global budget's current period)."""
        now = datetime.now(UTC)
        call = self.call(GLOBAL_SCOPE, self._cached(GLOBAL_SCOPE), now)
        return await self._bounded(self.store.open_reservations(call.counter, int(now.timestamp() * 1000)))

    async def release(self, request_id: str) -> bool:
        return await self._bounded(self.store.release(request_id))

    # ------------------------------------------------------------------ reconciliation
    async def ensure_loaded(self) -> None:
        """After a FLUSHALL (or on a fresh Redis) rebuilds counters once, shared by concurrent calls;
        the caller waits at most until its deadline."""
        task = self._reconcile_task
        if task is None or task.done():
            # A fresh context: the rebuild must not inherit (and die at) one caller's deadline.
            task = asyncio.get_running_loop().create_task(
                self.reconcile(trigger="not_loaded"), context=contextvars.Context()
            )
            self._reconcile_task = task
        remaining = context.seconds_remaining()
        try:
            await asyncio.wait_for(asyncio.shield(task), None if remaining is None else max(0.0, remaining - 0.05))
        except TimeoutError as exc:
            raise StoreUnavailable("counters are being rebuilt") from exc

    async def reconcile(self, trigger: str = "manual") -> tuple[int, int]:
        """Rebuilds every budget scope's configuration and settled spend from the database.
        Returns (scopes rebuilt, drift in micro-units found before the rebuild)."""
        async with self._reconcile_lock:
            started = time.monotonic()
            now = datetime.now(UTC)
            rows = await self.repository.budgets()
            by_scope = {row.scope: row for row in rows}
            global_row = by_scope.get(GLOBAL_SCOPE)
            global_config = self.config_of(global_row)
            global_period = self.period(global_config, now)
            scopes: list[tuple[str, BudgetRow | None, ScopeConfig]] = [(GLOBAL_SCOPE, global_row, global_config)]
            for row in rows:
                if row.key_id is not None:
                    scopes.append((row.scope, row, self.config_of(row)))
            budgeted_keys = [row.key_id for row in rows if row.key_id is not None]

            # Spend per scope (one query per distinct period) and per provider, all read in one
            # database snapshot. Settlements from the rebuild's start on are logged (ingest hands
            # spend over after its commit, so spend can arrive before or after the snapshot holds
            # it): the rewrite adds what the snapshot misses, and no counter gets anything twice.
            await self.store.begin_rebuild(int(time.time() * 1000) + _REBUILD_LOG_MS)
            async with self.repository.snapshot() as (conn, snapshot):
                disabled_before = await self.repository.disabled_key_ids(conn)
                scopes += self._unlisted(scopes, disabled_before)
                spend = await self._spend_in(conn, scopes, now)
                providers = await self.repository.spend(global_period.start, None, group_by="provider", conn=conn)
                # The key rows rewritten stay locked while Redis is rewritten (only then: the
                # spend is read above): an enable or disable meanwhile (written to Redis before
                # its commit) waits and is written after it, never overwritten by a state read
                # before it.
                also = [*budgeted_keys, *disabled_before]
                async with self.repository.disabled_keys_locked(also=also) as disabled_ids:
                    disabled = {str(k) for k in disabled_ids}
                    later = self._unlisted(scopes, disabled_ids)
                    if later:  # disabled since the snapshot's read of the disabled keys
                        spend.update(await self._spend_in(conn, later, now))
                        scopes += later
                    entries = [
                        (
                            scope,
                            None if row is None else row.limit_micros,
                            self.call(scope, config, now),
                            scope.removeprefix("key:") in disabled,
                            spend.get(scope, 0),
                        )
                        for scope, row, config in scopes
                    ]
                    drift_global = 0
                    drift_keys = 0
                    for index in range(0, len(entries), _RECONCILE_CHUNK):
                        chunk = entries[index : index + _RECONCILE_CHUNK]
                        if index == 0:
                            drift_global = await self.store.reconcile_chunk(chunk[:1], snapshot)
                            drift_keys += await self.store.reconcile_chunk(chunk[1:], snapshot)
                        else:
                            drift_keys += await self.store.reconcile_chunk(chunk, snapshot)
                    global_call = self.call(GLOBAL_SCOPE, global_config, now)
                    await self.store.finish_reconcile(
                        now.isoformat(),
                        provider_key(global_period, global_config.tz),
                        global_call.expire_at,
                        {str(name): value for name, value in providers.items() if value},
                        snapshot,
                    )
            self._configs.clear()
            for scope, _row, config in scopes:
                self._remember(scope, config)
            metrics.DRIFT.labels("global").set(drift_global)
            metrics.DRIFT.labels("keys").set(drift_keys)
            metrics.RECONCILES.labels(trigger).inc()
            log.info(
                "budget counters rebuilt from the database",
                extra={
                    "trigger": trigger,
                    "scopes": len(entries),
                    "driftMicros": drift_global + drift_keys,
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
            return len(entries), drift_global + drift_keys

    def _unlisted(
        self, scopes: Sequence[tuple[str, BudgetRow | None, ScopeConfig]], key_ids: Iterable[uuid.UUID]
    ) -> list[tuple[str, BudgetRow | None, ScopeConfig]]:
        """The scopes (with no budget: the default period) of the keys not among `scopes`."""
        listed = {scope for scope, _, _ in scopes}
        return [(key_scope(str(k)), None, self.default) for k in key_ids if key_scope(str(k)) not in listed]

    async def _spend_in(
        self, conn: AsyncConnection[Any], scopes: Sequence[tuple[str, BudgetRow | None, ScopeConfig]], now: datetime
    ) -> dict[str, int]:
        """Settled spend of each scope's current period, read on `conn` (one query per period)."""
        spend: dict[str, int] = {}
        groups: dict[tuple[str, str], list[str]] = {}
        for scope, _row, config in scopes:
            groups.setdefault((config.period, config.tz), []).append(scope)
        for (kind, tz), members in groups.items():
            period = self.period(ScopeConfig(kind, tz), now)
            key_ids = [uuid.UUID(s.removeprefix("key:")) for s in members if s != GLOBAL_SCOPE]
            if GLOBAL_SCOPE in members:
                totals = await self.repository.spend(period.start, None, conn=conn)
                spend[GLOBAL_SCOPE] = totals.get(None, 0)
            if key_ids:
                sums = await self.repository.spend(period.start, None, group_by="key_id", key_ids=key_ids, conn=conn)
                for key_uuid in key_ids:
                    spend[key_scope(str(key_uuid))] = sums.get(key_uuid, 0)
        return spend

    async def measure_drift(self) -> int:
        """Compares Redis with the database for every budget scope (changes nothing); sets the gauge."""
        now = datetime.now(UTC)
        views = await self.views(now)
        drift = {"global": 0, "keys": 0}
        for view in views:
            if view.row is None and view.scope != GLOBAL_SCOPE:
                continue
            key_ids = None if view.scope == GLOBAL_SCOPE else [uuid.UUID(view.scope.removeprefix("key:"))]
            sums = await self.repository.spend(view.period.start, None, group_by=None, key_ids=key_ids)
            drift["global" if view.scope == GLOBAL_SCOPE else "keys"] += abs(view.spent - sums.get(None, 0))
        for kind, value in drift.items():
            metrics.DRIFT.labels(kind).set(value)
        return drift["global"] + drift["keys"]

    # ------------------------------------------------------------------ configuration and views
    async def views(self, now: datetime, rows: Sequence[BudgetRow] | None = None) -> list[ScopeView]:
        """Global first (budget or not), then every key with a budget, with live counters."""
        if rows is None:
            rows = await self.repository.budgets()
        global_row = next((r for r in rows if r.scope == GLOBAL_SCOPE), None)
        scopes: list[tuple[str, BudgetRow | None]] = [(GLOBAL_SCOPE, global_row)]
        scopes += [(r.scope, r) for r in rows if r.scope != GLOBAL_SCOPE]
        calls = [self.call(scope, self.config_of(row), now) for scope, row in scopes]
        try:
            counts = await self._bounded(self.store.read_counters([c.counter for c in calls]))
        except StoreUnavailable:
            log.warning("budget views from the database: redis unavailable")
            counts = await self._counts_from_database(scopes, [self.period(c.config, now) for c in calls])
        return [
            ScopeView(scope, row, self.period(call.config, now), call.config.tz, spent, reserved)
            for (scope, row), call, (spent, reserved) in zip(scopes, calls, counts, strict=True)
        ]

    async def _counts_from_database(
        self, scopes: Sequence[tuple[str, BudgetRow | None]], periods: Sequence[Period]
    ) -> list[tuple[int, int]]:
        """(settled spend, reserved) per scope when Redis cannot be read: the spend in each scope's
        current period from the database (exact, as a rebuild computes it); reservations, which
        only Redis holds, as 0."""
        out = [(0, 0)] * len(scopes)
        keys_by_start: dict[datetime, list[int]] = {}
        for index, ((scope, _row), period) in enumerate(zip(scopes, periods, strict=True)):
            if scope == GLOBAL_SCOPE:
                out[index] = ((await self.repository.spend(period.start, None)).get(None, 0), 0)
            else:
                keys_by_start.setdefault(period.start, []).append(index)
        for start, indexes in keys_by_start.items():
            key_ids = [uuid.UUID(scopes[i][0].removeprefix("key:")) for i in indexes]
            sums = await self.repository.spend(start, None, group_by="key_id", key_ids=key_ids)
            for index, key_id in zip(indexes, key_ids, strict=True):
                out[index] = (sums.get(key_id, 0), 0)
        return out

    async def provider_spend(self, period: Period, tz: str) -> dict[str, int]:
        """Settled spend per provider in the global period: Redis' counters, or the database's
        sums when Redis cannot be read."""
        try:
            return await self._bounded(self.store.read_providers(provider_key(period, tz)))
        except StoreUnavailable:
            sums = await self.repository.spend(period.start, None, group_by="provider")
            return {str(name): amount for name, amount in sums.items()}

    async def put_budget(
        self, scope: str, key_id: uuid.UUID | None, limit: int, period: str, timezone: str
    ) -> BudgetRow:
        row, previous = await self.repository.put_budget(scope, key_id, limit, period, timezone)
        now = datetime.now(UTC)
        config = self.config_of(row)
        call = self.call(scope, config, now)
        spend: int | None = None
        if previous is None or self.config_of(previous) != config:
            # A new period definition: its counter starts from the database's truth.
            current = self.period(config, now)
            key_ids = None if key_id is None else [key_id]
            spend = (await self.repository.spend(current.start, None, key_ids=key_ids)).get(None, 0)
        await self.store.set_scope(scope, limit, call, spend)
        self._remember(scope, config)
        return row

    async def set_enabled(self, key_id: uuid.UUID, enabled: bool, reason: str | None, event: BudgetEvent) -> int | None:
        """Enables or disables the key, recording `event` (KEY_ENABLED or KEY_DISABLED) with it,
        in the database and Redis together (a Redis failure changes neither); returns the event's
        id for the stream, or None when the key is unknown."""
        scope = key_scope(str(key_id))
        return await self.repository.set_key_enabled(
            key_id, enabled, reason, event, lambda: self.store.set_disabled(scope, not enabled)
        )
