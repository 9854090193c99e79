"""What happens after a batch commits: live counters and stats in Redis, spend to the budget service.

None of it may slow or fail ingest. Committed batches are reduced to small records and queued;
one background task folds them into per-bucket counters and pending settlements, which are
flushed on a short timer (coalescing many batches into one Redis pipeline and one SettleBatch
call). If Redis or the budget service is down, that work is dropped, not retried: the database
already holds the truth. Spend that could not be handed over is remembered (oldest first) and the
budget service is asked to reconcile its counters from TimescaleDB as soon as it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from zoneinfo import ZoneInfo

import grpc
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge
from pydantic import SecretStr

from services.ingest.events import ValidEvent
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.runtime.clients import call_metadata
from tally.runtime.db import Database
from tally.runtime.redis import RedisClient
from tally.usage import live

log = logging.getLogger("tally.ingest.aftercommit")

DROPPED = PromCounter("tally_ingest_aftercommit_dropped_total", "After-commit work dropped.", ["stage", "reason"])
QUEUE_DEPTH = Gauge("tally_ingest_aftercommit_queue_depth", "Committed batches waiting for after-commit work.")
# Most requests per SettleBatch (budget takes up to INGEST_MAX_BATCH): a hand-off's spend groups
# (key, provider, quarter hour, transaction) are fewer per request the more requests it carries.
SETTLE_BATCH = 10_000
SETTLE_TIMEOUT_SECONDS = 5.0
FLUSH_SECONDS = 0.5
MAX_PENDING_SETTLEMENTS = 200_000
QUARTER_HOUR = 900
# Adds amounts to fields of one hash (ARGV: the hash's expiry in seconds, then field, amount
# pairs) and renews the expiry: one command per hash instead of one HINCRBY per field, which
# cost the ingest process more to encode than Redis to run. EVAL (not EVALSHA): Redis caches the
# compiled script, and it needs no NOSCRIPT handling, in a cluster pipeline neither.
_ADD_TO_FIELDS = """
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""


# Raises the instant from which the live counters are complete (see tally.usage.live), records
# this replica's heartbeat and detects replicas that died. Run first in every flush.
# KEYS: since, replicas, run, floor. ARGV: instance, now ms, future skew ms, floor ms (0 = none),
# stale ms. The floor key keeps the highest floor any replica asked for (counts it could not
# flush), so that tightening the instant later never goes below one.
# -> {1 when counts of unknown events may be lost (the instant became at least now + skew), the
#     instant after the script, how many replicas stopped heartbeating}
_LIVE_HEARTBEAT = """
local now, skew, want, stale = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if want > (tonumber(redis.call('GET', KEYS[4])) or 0) then redis.call('SET', KEYS[4], ARGV[4]) end
local unknown = 0
local since = redis.call('GET', KEYS[1])
if not since then unknown = 1 end
-- Another Redis process than at the last flush (a restart that reloaded its append-only file,
-- which may lack the last second of writes; a failover): the counters may lack counts.
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if redis.call('GET', KEYS[3]) ~= run then
  unknown = 1
  redis.call('SET', KEYS[3], run)
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - stale)
if #gone > 0 then
  unknown = 1
  redis.call('ZREM', KEYS[2], unpack(gone))
end
if unknown == 1 then want = math.max(want, now + skew) end
redis.call('ZADD', KEYS[2], now, ARGV[1])
if not since or tonumber(since) < want then
  since = string.format('%d', want)
  redis.call('SET', KEYS[1], since)
end
return {unknown, since, #gone}
"""
# Lowers the instant to ARGV[2], or the highest floor asked for if higher, if it is still ARGV[1]
# (nothing raised it meanwhile). KEYS: since, floor.
_TIGHTEN_SINCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local floor = tonumber(redis.call('GET', KEYS[2])) or 0
redis.call('SET', KEYS[1], string.format('%d', math.max(tonumber(ARGV[2]), floor)))
return 1
"""


_KEY_TEXT = attrgetter("key_text")
_MODEL = attrgetter("provider", "model")
_TOKENS = attrgetter("tokens")


@dataclass
class Outcome:
    """One committed batch: its accepted events (stored by database transaction
    `transaction_id`), and the other items' counts."""

    accepted: Sequence[ValidEvent]
    duplicate: int
    rejected: int
    unpriced: int
    late: int
    transaction_id: int = 0
    arrived: float = field(default_factory=time.time)

    @classmethod
    def of(cls, accepted: Sequence[ValidEvent], duplicate: int, rejected: int, transaction_id: int = 0) -> Outcome:
        unpriced = sum(1 for e in accepted if e.unpriced)
        late = sum(1 for e in accepted if e.late)
        return cls(accepted, duplicate, rejected, unpriced, late, transaction_id)


@dataclass
class _Handoff:
    """A SettleBatch being filled (compact form): its spend groups by (key, provider, quarter
    hour, transaction), and its oldest request (event time in ns, request id)."""

    request: budget_pb2.SettleBatchRequest
    groups: dict[tuple[str, str, int, int], int] = field(default_factory=dict)
    oldest: tuple[int, str] | None = None


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
        queue_size: int = 64,
        settle_batch: int = SETTLE_BATCH,
        future_skew_seconds: int = 300,
        db: Database | None = None,
    ) -> None:
        self._redis = redis
        self._db = db
        self._skew_ms = future_skew_seconds * 1000
        self._settle_batch = settle_batch
        self._budget = budget_pb2_grpc.BudgetServiceStub(budget)
        self._master_key = master_key
        self._zone = zone
        self._queue: asyncio.Queue[Outcome] = asyncio.Queue(queue_size)
        self._counters: dict[str, Counter[str]] = defaultdict(Counter)
        self._ttl: dict[str, int] = {}
        # The hour and day hash of each minute hash counted since the last flush.
        self._minute_parents: dict[str, tuple[str, str]] = {}
        # The end (epoch ms) of the last minute counted since the last flush, and how far the
        # next flush must raise the live counters' complete-since instant (counts were lost).
        self._unflushed_end_ms = 0
        self._live_floor_ms = 0
        self._stats: Counter[str] = Counter()
        self._rates: Counter[int] = Counter()
        self._last_ingest = 0.0
        # Spend of accepted events, already in the budget service's request form (compact: a
        # backlog may hold MAX_PENDING_SETTLEMENTS); the last request fills up to settle_batch.
        self._settlements: list[_Handoff] = []
        self._instance = uuid.uuid4().hex
        self._handoffs = 0
        self._pending_settlements = 0
        self.oldest_unreconciled: Unreconciled | None = None
        # Budget must rebuild for spend no replica knows of (a replica died with some unhanded).
        self._reconcile_requested = False
        self._reconcile_wake = asyncio.Event()
        self.redis_ok = True
        self._failures = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._fold_forever()),
            asyncio.create_task(self._flush_forever()),
            asyncio.create_task(self._reconcile_forever()),
        ]

    async def stop(self) -> None:
        """Folds and flushes what is queued (bounded in time), then stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), 5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), 5)
        for task in self._tasks:
            task.cancel()
        if self.redis_ok and not self._live_floor_ms and not self._counters:
            # Every count flushed: leave the replicas cleanly (not taken for dead).
            with contextlib.suppress(Exception):
                await self._redis.zrem(live.REPLICAS_KEY, self._instance)

    def submit(self, outcome: Outcome) -> None:
        try:
            self._queue.put_nowait(outcome)
        except asyncio.QueueFull:
            DROPPED.labels("queue", "full").inc()
            self._uncounted(outcome.accepted, "after-commit queue full")
        QUEUE_DEPTH.set(self._queue.qsize())

    def commit_unknown(self, events: Sequence[ValidEvent]) -> None:
        """Events whose transaction may or may not have committed (its connection failed): were
        they stored, nothing would count them, and a retry would only find them stored."""
        self._uncounted(events, "commit outcome unknown")

    def _uncounted(self, events: Sequence[ValidEvent], reason: str) -> None:
        """Events (maybe) stored that nothing will count: the live counters are taken as
        incomplete up to their last minute (readers compute those buckets from the database) and
        budget is asked to rebuild its counters from it."""
        if not events:
            return
        last = max(event.epoch_seconds for event in events)
        self._live_floor_ms = max(self._live_floor_ms, live.minute_end_ms(last))
        self._mark_unreconciled(events, reason)

    async def _fold_forever(self) -> None:
        while True:
            outcome = await self._queue.get()
            try:
                self._fold(outcome)
            except Exception:
                log.exception("after-commit folding failed")
            finally:
                self._queue.task_done()
                QUEUE_DEPTH.set(self._queue.qsize())

    def _fold(self, outcome: Outcome) -> None:
        now = outcome.arrived
        stats = self._stats
        stats["accepted"] += len(outcome.accepted)
        stats["duplicate"] += outcome.duplicate
        stats["rejected"] += outcome.rejected
        stats["unpriced"] += outcome.unpriced
        stats["late"] += outcome.late
        self._rates[int(now) // 60] += len(outcome.accepted)
        self._last_ingest = max(self._last_ingest, now)
        # Live counters answer "this minute / hour / today": a bucket is only worth counting
        # while its key lives; older late events are in the rollups only. Events are grouped by
        # minute first (a batch of live traffic spans a handful of minutes), then each group's
        # totals are added to its minute hash, and, once per flush, each minute's totals to its
        # hour and day hashes (see _roll_up_minutes); a minute too old for its own hash adds
        # them to its hour and day hashes at once.
        by_minute: dict[int, list[ValidEvent]] = defaultdict(list)
        for event in outcome.accepted:
            by_minute[event.epoch_seconds // 60].append(event)
        for minute, events in by_minute.items():
            age = now - minute * 60
            if age >= live.DAY_TTL_SECONDS:
                continue
            self._unflushed_end_ms = max(self._unflushed_end_ms, live.minute_end_ms(minute * 60))
            totals = self._minute_totals(events)
            at = events[0].event_time
            if age < live.MINUTE_TTL_SECONDS:  # then its hour's and day's hashes live too
                key = live.minute_key(at)
                self._merge(key, live.MINUTE_TTL_SECONDS, totals)
                if key not in self._minute_parents:
                    self._minute_parents[key] = (live.hour_key(at), live.day_key(at, self._zone))
                continue
            if age < live.HOUR_TTL_SECONDS:
                self._merge(live.hour_key(at), live.HOUR_TTL_SECONDS, totals)
            self._merge(live.day_key(at, self._zone), live.DAY_TTL_SECONDS, totals)
        if self._pending_settlements >= MAX_PENDING_SETTLEMENTS:
            DROPPED.labels("settle", "backlog").inc()
            self._mark_unreconciled(outcome.accepted, "settlement backlog full")
        else:
            self._add_settlements(outcome)

    @staticmethod
    def _minute_totals(events: list[ValidEvent]) -> Counter[str]:
        """The live hash fields of a minute's events: totals, and requests and cost by key, by
        model and by provider (counted by value first, so each field name is built once)."""
        # Counted by C code (Counter over an iterable, sum, attrgetter); only costs need a loop.
        key_requests: Counter[str] = Counter(map(_KEY_TEXT, events))
        model_requests: Counter[tuple[str, str]] = Counter(map(_MODEL, events))
        tokens = sum(map(_TOKENS, events))
        key_cost: Counter[str] = Counter()
        model_cost: Counter[tuple[str, str]] = Counter()
        for event in events:
            cost = event.cost_micros
            if cost:
                key_cost[event.key_text] += cost
                model_cost[event.provider, event.model] += cost
        provider_requests: Counter[str] = Counter()
        provider_cost: Counter[str] = Counter()
        for (provider, _), count in model_requests.items():
            provider_requests[provider] += count
        for (provider, _), micros in model_cost.items():
            provider_cost[provider] += micros
        totals: Counter[str] = Counter()
        totals.update({f"k|{key}|requests": n for key, n in key_requests.items()})
        totals.update({f"k|{key}|cost": n for key, n in key_cost.items()})
        totals.update({f"m|{p}|{m}|requests": n for (p, m), n in model_requests.items()})
        totals.update({f"m|{p}|{m}|cost": n for (p, m), n in model_cost.items()})
        totals.update({f"p|{provider}|requests": n for provider, n in provider_requests.items()})
        totals.update({f"p|{provider}|cost": n for provider, n in provider_cost.items()})
        totals["requests"] = len(events)
        totals["tokens"] = tokens
        totals["cost"] = sum(key_cost.values())
        return totals

    def _merge(self, key: str, ttl: int, totals: Counter[str]) -> None:
        self._counters[key].update(totals)
        self._ttl[key] = ttl

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception:
                log.exception("after-commit flush failed")

    async def flush(self) -> None:
        await self._flush_counters()
        await self._flush_settlements()

    def _roll_up_minutes(self) -> None:
        """Adds each minute's totals since the last flush to its hour's and day's (one merge per
        minute and flush instead of two per minute and batch)."""
        parents, self._minute_parents = self._minute_parents, {}
        for key, (hour, day) in parents.items():
            totals = self._counters[key]
            self._merge(hour, live.HOUR_TTL_SECONDS, totals)
            self._merge(day, live.DAY_TTL_SECONDS, totals)

    async def _flush_counters(self) -> None:
        self._roll_up_minutes()
        counters, ttl, stats, rates = self._counters, self._ttl, self._stats, self._rates
        self._counters, self._ttl, self._stats, self._rates = defaultdict(Counter), {}, Counter(), Counter()
        unflushed_end, self._unflushed_end_ms = self._unflushed_end_ms, 0
        floor = self._live_floor_ms
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.eval(
                _LIVE_HEARTBEAT, 4, live.SINCE_KEY, live.REPLICAS_KEY, live.RUN_KEY, live.FLOOR_KEY,
                self._instance, int(time.time() * 1000), self._skew_ms, floor, live.REPLICA_STALE_MS,
            )  # fmt: skip
            for key, fields in counters.items():
                args: list[str | int] = [ttl[key]]
                for name, amount in fields.items():
                    args += (name, amount)
                pipe.eval(_ADD_TO_FIELDS, 1, key, *args)
            stats_key = live.INGEST_STATS_KEY
            if counters or stats:
                pipe.hsetnx(stats_key, "since", int(self._last_ingest or time.time()))
            for name, amount in stats.items():
                if amount:
                    pipe.hincrby(stats_key, name, amount)
            if self._last_ingest and stats:
                pipe.hset(stats_key, "last_ingest", int(self._last_ingest * 1000))
            for minute, amount in rates.items():
                pipe.incrby(live.rate_key(minute), amount)
                pipe.expire(live.rate_key(minute), live.RATE_TTL_SECONDS)
            replies = await pipe.execute()
            self.redis_ok = True
            if self._live_floor_ms == floor:
                self._live_floor_ms = 0
            unknown, since, gone = replies[0]
            if gone:
                # A replica died, maybe with spend committed and not yet handed over.
                log.warning("an ingest replica stopped heartbeating: budget is asked to rebuild")
                self._reconcile_requested = True
                self._reconcile_wake.set()
            if unknown:
                await self._tighten_since(since, floor)
        except Exception as exc:
            self.redis_ok = False
            # Some of these counts may be lost: the buckets up to their last minute are not
            # complete any more.
            self._live_floor_ms = max(self._live_floor_ms, unflushed_end)
            DROPPED.labels("redis", type(exc).__name__).inc()
            log.warning("live counters not updated: redis unavailable", extra={"error": repr(exc)})

    async def _tighten_since(self, since: bytes, floor: int) -> None:
        """After counts of unknown events may have been lost, the live counters were taken as
        complete only from now + the future skew on. Every event stored before that loss has an
        event time at most the latest one in the database now: lowers the instant to the end of
        that event's minute (the whole window after a fresh start on an empty database), unless
        it moved meanwhile. Nothing lowers it below `floor` (this replica's unflushed counts)."""
        if self._db is None:
            return
        try:
            row = await self._db.fetch_one("SELECT max(event_time) AS t FROM usage_events")
            latest = row["t"] if row else None
            bound = 0 if latest is None else live.minute_end_ms(int(latest.timestamp()))
            bound = max(bound, floor)
            if bound < int(since):
                await self._redis.eval(_TIGHTEN_SINCE, 2, live.SINCE_KEY, live.FLOOR_KEY, since, bound)
        except Exception as exc:  # the instant stays where it is: later, never wrong
            log.warning("live counters' complete-since instant not tightened", extra={"error": repr(exc)})

    def _add_settlements(self, outcome: Outcome) -> None:
        """Adds the batch's spend to the pending hand-offs, in SettleBatch's compact form: three
        columns (request id, cost, spend group) and a spend group per key, provider, quarter hour
        and transaction (a quarter hour is inside one budget period in every time zone)."""
        xid = outcome.transaction_id
        pending = self._settlements
        limit = self._settle_batch
        handoff = pending[-1] if pending and len(pending[-1].request.request_ids) < limit else None
        request_ids: list[str] = []
        costs: list[int] = []
        group_index: list[int] = []
        for event in outcome.accepted:
            cost = event.cost_micros
            if not cost:
                continue
            if handoff is None or len(handoff.request.request_ids) + len(request_ids) >= limit:
                if handoff is not None:
                    self._extend(handoff, request_ids, costs, group_index)
                    request_ids, costs, group_index = [], [], []
                self._handoffs += 1
                handoff = _Handoff(budget_pb2.SettleBatchRequest(handoff_id=f"{self._instance}-{self._handoffs}"))
                pending.append(handoff)
            mark = (event.key_text, event.provider, event.epoch_seconds // QUARTER_HOUR, xid)
            number = handoff.groups.get(mark)
            if number is None:
                number = handoff.groups[mark] = len(handoff.request.groups)
                group = handoff.request.groups.add(
                    key_id=event.key_text, provider=event.provider, database_transaction_id=xid
                )
                group.event_time.seconds = event.epoch_seconds
            request_ids.append(event.request_id)
            costs.append(cost)
            group_index.append(number)
            at = event.epoch_seconds * 1_000_000_000 + event.epoch_nanos
            if handoff.oldest is None or at < handoff.oldest[0]:
                handoff.oldest = (at, event.request_id)
        if handoff is not None:
            self._extend(handoff, request_ids, costs, group_index)

    def _extend(self, handoff: _Handoff, request_ids: list[str], costs: list[int], group_index: list[int]) -> None:
        handoff.request.request_ids.extend(request_ids)
        handoff.request.actual_cost_micros.extend(costs)
        handoff.request.group_index.extend(group_index)
        self._pending_settlements += len(request_ids)

    async def _flush_settlements(self) -> None:
        pending, self._settlements, self._pending_settlements = self._settlements, [], 0
        for handoff in pending:
            if not handoff.request.request_ids:
                continue
            try:
                await self._budget.SettleBatch(
                    handoff.request, timeout=SETTLE_TIMEOUT_SECONDS, metadata=call_metadata(self._master_key)
                )
            except grpc.aio.AioRpcError as exc:
                DROPPED.labels("settle", exc.code().name).inc()
                if handoff.oldest is not None:
                    at, request_id = handoff.oldest
                    when = datetime.fromtimestamp(at // 1_000_000_000, UTC).replace(microsecond=at % 10**9 // 1000)
                    self._mark_oldest(request_id, when, f"budget service: {exc.code().name}")

    def _mark_unreconciled(self, spends: Sequence[ValidEvent], reason: str) -> None:
        if spends:
            first = min(spends, key=lambda s: s.event_time)
            self._mark_oldest(first.request_id, first.event_time, reason)

    def _mark_oldest(self, request_id: str, event_time: datetime, reason: str) -> None:
        self._failures += 1
        self._reconcile_wake.set()
        if self.oldest_unreconciled is None or event_time < self.oldest_unreconciled.event_time:
            self.oldest_unreconciled = Unreconciled(request_id, event_time, reason)

    async def _reconcile_forever(self, interval: float = 5.0) -> None:
        """When spend could not be handed over, ask budget to rebuild from the database: at once
        (the counters are short meanwhile), and every `interval` while budget cannot."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reconcile_wake.wait(), interval)
            self._reconcile_wake.clear()
            pending = self.oldest_unreconciled
            if pending is None and not self._reconcile_requested:
                continue
            failures_before = self._failures
            self._reconcile_requested = False
            try:
                await self._budget.ReconcileBudgets(
                    budget_pb2.ReconcileBudgetsRequest(), timeout=30, metadata=call_metadata(self._master_key)
                )
            except grpc.aio.AioRpcError as exc:
                self._reconcile_requested = True
                log.info("budget reconciliation still pending", extra={"code": exc.code().name})
                await asyncio.sleep(interval)
                continue
            if self._failures == failures_before:  # no hand-off failed while reconciling
                self.oldest_unreconciled = None
            since = pending.event_time.isoformat() if pending is not None else None
            log.info("budget reconciled after missed settlements", extra={"since": since})
