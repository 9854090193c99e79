"""Wires the ingest service: validation, pricing, the store and the after-commit work."""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psycopg
from prometheus_client import Counter, Histogram
from psycopg_pool import PoolTimeout

from services.ingest.aftercommit import SETTLE_BATCH, AfterCommit, Outcome
from services.ingest.compaction import Compactor
from services.ingest.events import IngestPolicy, Rejected, ValidEvent, validate
from services.ingest.prices import PriceRepository, PriceRowError, parse_csv, parse_price
from services.ingest.recalc import Recalculator, parse_request
from services.ingest.status import ingestion_status
from services.ingest.store import UsageStore, prepare_connection
from tally.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from tally.runtime.clients import service_channel
from tally.runtime.config import ServiceName
from tally.runtime.db import Database
from tally.runtime.errors import FailedPrecondition, InvalidArgument
from tally.runtime.server import Registration, Resources
from tally.runtime.validation import Violations, decode_page_token, encode_page_token, page_size, require_uuid

EVENTS = Counter("tally_ingest_events_total", "Usage events received, by outcome.", ["outcome"])
LAG = Histogram(
    "tally_ingest_lag_seconds",
    "Ingest lag: commit time minus event time, observed for the newest event of each batch.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400, 604800),
)


_YIELD_EVERY = 200
_DUPLICATE = "an event with this requestId and eventTime is already recorded"


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Marks a shielded task's exception as retrieved (its caller may have gone)."""
    if not task.cancelled():
        task.exception()


class Ingestor:
    """Validates, prices and stores batches; the one path shared by every ingest RPC."""

    def __init__(
        self,
        store: UsageStore,
        prices: PriceRepository,
        policy: IngestPolicy,
        after: AfterCommit,
        compactor: Compactor,
        max_batch: int,
    ) -> None:
        self._store = store
        self._compactor = compactor
        self._prices = prices
        self._policy = policy
        self._after = after
        self._max_batch = max_batch

    async def record(self, events: Sequence[ingest_pb2.UsageEvent]) -> ingest_pb2.RecordUsageBatchResult:
        if len(events) > self._max_batch:
            raise InvalidArgument.field("events", f"at most {self._max_batch} events per batch, got {len(events)}")
        now = datetime.now(UTC)
        book = self._prices.book
        checked: list[ValidEvent | Rejected] = []
        candidates: list[ValidEvent] = []
        for number, event in enumerate(events):
            if number and number % _YIELD_EVERY == 0:
                # A batch's validation is tens of milliseconds of CPU: let the transactions and
                # streams waiting on I/O go on in between (a COPY in progress waits for the loop).
                await asyncio.sleep(0)
            try:
                valid = validate(event, now, self._policy, book)
            except Rejected as exc:
                checked.append(exc)
                continue
            checked.append(valid)
            candidates.append(valid)
        # Once handed to the store, a batch is written and counted even if its caller goes away
        # (a deadline): its write goes on, and uncounted stored events would be missing from the
        # live counters and budget for good (a retry only finds them stored).
        task = asyncio.ensure_future(self._store_and_count(events, checked, candidates))
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _store_and_count(
        self,
        events: Sequence[ingest_pb2.UsageEvent],
        checked: list[ValidEvent | Rejected],
        candidates: list[ValidEvent],
    ) -> ingest_pb2.RecordUsageBatchResult:
        try:
            written = await self._store.write(candidates)
        except PoolTimeout:
            raise  # no connection was had: nothing was written
        except psycopg.OperationalError:
            # The connection failed, maybe while committing: the events may be stored without
            # being counted (a retry finds them stored and reports them as duplicates).
            self._after.commit_unknown(candidates)
            raise
        not_new = written.not_new
        accepted: list[ValidEvent] = []
        # An identity is (request id, event time). The batch's first event time per request id is
        # kept by id (a string's hash is cached; an aware datetime's is computed every time), and
        # further times of the same id, rare, as identities.
        first_time: dict[str, datetime] = {}
        more: set[tuple[str, datetime]] = set()
        batch = ingest_pb2.RecordUsageBatchResult()
        add = batch.results.add
        for index, (event, outcome) in enumerate(zip(events, checked, strict=True)):
            if isinstance(outcome, Rejected):
                reason, field = outcome.reason, outcome.field
                add(index=index, request_id=event.request_id, status="rejected", reason=reason, field=field)
                continue
            request_id, at = outcome.request_id, outcome.event_time
            new = not not_new or (request_id, at) not in not_new
            if new:
                first = first_time.get(request_id)
                if first is None:
                    first_time[request_id] = at
                elif first == at or (request_id, at) in more:
                    new = False
                else:
                    more.add((request_id, at))
            if new:
                accepted.append(outcome)
                add(index=index, request_id=request_id, status="accepted")
            else:
                add(index=index, request_id=request_id, status="duplicate", reason=_DUPLICATE)
        rejected = len(events) - len(candidates)
        duplicate = len(candidates) - len(accepted)
        EVENTS.labels("accepted").inc(len(accepted))
        EVENTS.labels("duplicate").inc(duplicate)
        EVENTS.labels("rejected").inc(rejected)
        if accepted:
            LAG.observe(max(0.0, time.time() - max(v.epoch_seconds for v in accepted)))
        self._compactor.mark(v.epoch_seconds for v in accepted)
        self._after.submit(Outcome.of(accepted, duplicate, rejected, written.transaction_id))
        batch.accepted, batch.duplicate, batch.rejected = len(accepted), duplicate, rejected
        return batch


# Batches of one StreamUsage stream stored at once (read ahead of their acknowledgements).
STREAM_READ_AHEAD = 8


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """RPCs not overridden here answer UNIMPLEMENTED until their issue lands."""

    def __init__(
        self,
        resources: Resources,
        ingestor: Ingestor,
        prices: PriceRepository,
        after: AfterCommit,
        recalculator: Recalculator,
    ) -> None:
        self._resources = resources
        self._recalculator = recalculator
        self._ingestor = ingestor
        self._prices = prices
        self._after = after

    async def RecordUsage(
        self, request: ingest_pb2.RecordUsageRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.RecordUsageResponse:
        if not request.HasField("event"):
            raise InvalidArgument.field("event", "required")
        outcome = await self._ingestor.record([request.event])
        result = outcome.results[0]
        if result.status == "rejected":
            raise InvalidArgument.field(f"event.{result.field}", result.reason)
        return ingest_pb2.RecordUsageResponse(result=result)

    async def RecordUsageBatch(
        self, request: ingest_pb2.RecordUsageBatchRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.RecordUsageBatchResponse:
        return ingest_pb2.RecordUsageBatchResponse(success=True, data=await self._ingestor.record(request.events))

    async def StreamUsage(
        self, request_iterator: AsyncIterator[ingest_pb2.StreamUsageRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ingest_pb2.StreamUsageResponse]:
        """Stores up to STREAM_READ_AHEAD batches of the stream at once (a caller may keep that
        many unacknowledged) and acknowledges each as soon as it is committed, so acknowledgements
        may come in another order than the batches. An invalid batch or a failed one ends the
        stream after the batches already taken in are acknowledged."""
        window = asyncio.Semaphore(STREAM_READ_AHEAD)
        finished: asyncio.Queue[tuple[str, asyncio.Task[ingest_pb2.RecordUsageBatchResult]] | None] = asyncio.Queue()
        in_flight: set[asyncio.Task[ingest_pb2.RecordUsageBatchResult]] = set()

        def acknowledge(batch_id: str, task: asyncio.Task[ingest_pb2.RecordUsageBatchResult]) -> None:
            finished.put_nowait((batch_id, task))

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    if not batch.batch_id:
                        raise InvalidArgument.field("batchId", "required (acknowledgements are matched by it)")
                    await window.acquire()
                    task = asyncio.create_task(self._ingestor.record(batch.events))
                    in_flight.add(task)
                    task.add_done_callback(functools.partial(acknowledge, batch.batch_id))
            finally:
                finished.put_nowait(None)

        reader = asyncio.create_task(read())
        failure: BaseException | None = None
        reading = True
        try:
            while reading or in_flight:
                item = await finished.get()
                if item is None:  # the reader has stopped (its finally block), or is stopping
                    reading = False
                    await asyncio.wait({reader})
                    if not reader.cancelled() and reader.exception() is not None:
                        failure = failure or reader.exception()
                    continue
                batch_id, task = item
                in_flight.discard(task)
                window.release()
                if task.cancelled() or task.exception() is not None:
                    failure = failure or task.exception() or asyncio.CancelledError()
                    reader.cancel()
                    continue
                yield ingest_pb2.StreamUsageResponse(batch_id=batch_id, result=task.result())
            if failure is not None:
                raise failure
        finally:
            reader.cancel()
            for task in in_flight:
                task.cancel()

    async def GetIngestionStatus(
        self, request: ingest_pb2.GetIngestionStatusRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.GetIngestionStatusResponse:
        status = await ingestion_status(self._resources.db, self._resources.redis, self._after, time.time())
        return ingest_pb2.GetIngestionStatusResponse(success=True, data=status)

    async def RecalculateCosts(
        self, request: ingest_pb2.RecalculateCostsRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.RecalculateCostsResponse:
        job = await self._recalculator.submit(parse_request(request))
        return ingest_pb2.RecalculateCostsResponse(success=True, data=job)

    async def GetRecalculationJob(
        self, request: ingest_pb2.GetRecalculationJobRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.GetRecalculationJobResponse:
        job = await self._recalculator.get(require_uuid(request.job_id, "jobId"))
        return ingest_pb2.GetRecalculationJobResponse(success=True, data=job)

    async def ListModelPrices(
        self, request: ingest_pb2.ListModelPricesRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ListModelPricesResponse:
        size = page_size(request.page_size)
        position = decode_page_token(request.page_token)
        after_id = int(position[0]) if position else 0
        at = request.at.ToDatetime(tzinfo=UTC) if request.HasField("at") else None
        prices = await self._prices.page(request.provider, request.model, at, size + 1, after_id)
        page = ingest_pb2.ModelPricePage(prices=prices[:size])
        if len(prices) > size:
            page.next_page_token = encode_page_token([int(prices[size - 1].price_id)])
        return ingest_pb2.ListModelPricesResponse(success=True, data=page)

    async def UpsertModelPrice(
        self, request: ingest_pb2.UpsertModelPriceRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.UpsertModelPriceResponse:
        if not request.HasField("price"):
            raise InvalidArgument.field("price", "required")
        try:
            item = parse_price(request.price)
        except PriceRowError as exc:
            raise InvalidArgument.field(exc.field, exc.reason) from None
        return ingest_pb2.UpsertModelPriceResponse(success=True, data=await self._prices.upsert(item))

    async def DeleteModelPrice(
        self, request: ingest_pb2.DeleteModelPriceRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.DeleteModelPriceResponse:
        if not request.price_id.isdigit():
            raise InvalidArgument.field("priceId", "must be the numeric id of a price")
        return ingest_pb2.DeleteModelPriceResponse(success=True, data=await self._prices.delete(int(request.price_id)))

    async def ImportModelPrices(
        self, request: ingest_pb2.ImportModelPricesRequest, context: grpc.aio.ServicerContext
    ) -> ingest_pb2.ImportModelPricesResponse:
        violations = Violations()
        if request.format == "csv":
            if request.prices:
                violations.add("prices", "must be empty when format is csv")
            if not request.csv.strip():
                violations.add("csv", "required when format is csv")
        elif request.format == "json":
            if request.csv:
                violations.add("csv", "must be empty when format is json")
            if not request.prices:
                violations.add("prices", "required when format is json")
        else:
            violations.add("format", "must be 'json' or 'csv'")
        violations.raise_if_any()
        rows: list[tuple[int, ingest_pb2.ModelPrice | PriceRowError]] = (
            parse_csv(request.csv) if request.format == "csv" else list(enumerate(request.prices, start=1))
        )
        result = ingest_pb2.ImportModelPricesResult()
        valid = []
        for number, row in rows:
            if isinstance(row, PriceRowError):
                result.errors.add(row=number, field=row.field, reason=row.reason)
                continue
            try:
                valid.append((number, parse_price(row, prefix="")))
            except PriceRowError as exc:
                result.errors.add(row=number, field=exc.field, reason=exc.reason)
        result.rejected = len(result.errors)
        if valid:
            result.imported, result.updated = await self._prices.import_prices(valid)
        return ingest_pb2.ImportModelPricesResponse(success=True, data=result)


async def build(resources: Resources) -> Sequence[Registration]:
    settings = resources.settings
    if settings.end_user_hash_key is None:
        raise FailedPrecondition("END_USER_HASH_KEY must be set: end-user ids are hashed with it at ingest")
    # The store needs session temp tables on every connection, so ingest uses its own pool.
    await resources.db.close()
    resources.db = Database(settings, configure=prepare_connection)
    await resources.db.open()
    prices = PriceRepository(resources.db)
    await prices.seed_defaults()
    await prices.reload()
    refresher = asyncio.create_task(prices.refresh_forever(settings.ingest_price_refresh_seconds))
    late_window = timedelta(seconds=settings.ingest_late_window_seconds)
    compactor = Compactor(resources.db, settings.ingest_compact_seconds, late_window)
    await compactor.sweep(datetime.now(UTC))
    compacting = asyncio.create_task(compactor.run_forever())
    budget_channel = service_channel(settings.address_of(ServiceName.BUDGET))
    after = AfterCommit(
        resources.redis,
        budget_channel,
        settings.admin_master_key,
        settings.zone,
        settle_batch=min(SETTLE_BATCH, settings.ingest_max_batch),
        future_skew_seconds=settings.ingest_future_skew_seconds,
        db=resources.db,
    )
    after.start()

    recalculator = Recalculator(
        resources.db, prices, compactor, budget_channel, settings.admin_master_key, resources.redis
    )
    recalculating = asyncio.create_task(recalculator.run_forever())

    async def close() -> None:
        refresher.cancel()
        compacting.cancel()
        recalculating.cancel()
        await after.stop()
        await budget_channel.close()

    resources.closers.append(close)
    policy = IngestPolicy(
        late_window=late_window,
        future_skew=timedelta(seconds=settings.ingest_future_skew_seconds),
        late_threshold=timedelta(seconds=settings.ingest_late_threshold_seconds),
        end_user_key=settings.end_user_hash_key.get_secret_value().encode(),
    )
    store = UsageStore(
        resources.db,
        settings.ingest_late_threshold_seconds,
        writers=settings.ingest_writers,
        group_events=settings.ingest_group_events,
    )
    ingestor = Ingestor(store, prices, policy, after, compactor, settings.ingest_max_batch)
    # The write path allocates about ten collectable objects per event (rows, datetimes, results),
    # so with Python's default threshold (700) the cycle collector ran every few dozen events and
    # its older-generation passes walked every event in flight: a quarter of validation's CPU.
    # Startup objects are frozen out of its passes, and young passes run every ~5,000 events.
    gc.freeze()
    gc.set_threshold(settings.ingest_gc_threshold, 20, 20)
    return [
        Registration(
            IngestServicer(resources, ingestor, prices, after, recalculator),
            ingest_pb2_grpc.add_IngestServiceServicer_to_server,
            ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
            quiet_methods=frozenset({"RecordUsage", "RecordUsageBatch", "StreamUsage"}),
        )
    ]
