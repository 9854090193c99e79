"""The request-path stream's callback path (Authorize and Settle decided straight from the Redis
batch's reply, both kinds sharing one round trip) keeps every semantic of the unary RPCs: the
rare paths (counters not loaded after a FLUSHALL, thresholds that fire, a settle naming no key,
Redis unreachable) and concurrency; plus unit tests of the pieces it is built from."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import pytest

from services.budget.alerts import AlertConfig
from services.budget.batching import Coalescer
from services.budget.engine import SettleItem, SettleOutcome, _AuthorizeCall, _SettleCall
from services.budget.evaluator import Evaluator, ScopeSpend
from services.budget.periods import PeriodKind, period_at
from services.budget.store import AuthorizeResult, Outcome, ScopeCall, SettleResult
from tally.budget.v1 import budget_pb2, budget_pb2_grpc
from tally.clients.request_path import RequestPathClient, RequestPathError
from tally.devstack import Redis, free_port
from tests import test_budget
from tests.test_budget import USD, BudgetStack, new_key, record_usage, settle_request

budget_stack = test_budget.budget_stack  # the budget service's stack, a module of its own here

# ------------------------------------------------------------------------------------------- unit tests


class _Sink:
    """A callback sink as the stream uses them; `explode` makes its set_result raise."""

    def __init__(self, explode: bool = False) -> None:
        self.explode = explode
        self.results: list[Any] = []
        self.errors: list[BaseException] = []

    def done(self) -> bool:
        return False

    def set_result(self, result: int, /) -> None:
        if self.explode:
            raise RuntimeError("boom")
        self.results.append(result)

    def set_exception(self, exception: BaseException, /) -> None:
        self.errors.append(exception)


async def test_coalescer_answers_callback_sinks_and_futures_in_one_batch() -> None:
    batches: list[list[int]] = []

    async def run(entries: Sequence[int]) -> list[int]:
        batches.append(list(entries))
        return [entry * 10 for entry in entries]

    coalescer: Coalescer[int, int] = Coalescer(run, max_batch=100, failure=lambda exc: exc)
    deadline = asyncio.get_running_loop().time() + 5
    sinks = [_Sink(), _Sink(explode=True), _Sink()]
    for number, sink in enumerate(sinks, start=1):
        coalescer.submit_to(number, sink, deadline)
    (future,) = coalescer.submit([4], deadline)
    assert await future == 40
    assert batches == [[1, 2, 3, 4]]  # one batch: callbacks and futures made in the same tick
    # a sink that raises does not keep the others from their answers
    assert (sinks[0].results, sinks[1].results, sinks[2].results) == ([10], [], [30])


async def test_coalescer_fails_every_callback_sink_of_a_failed_batch() -> None:
    async def run(entries: Sequence[int]) -> list[int]:
        raise ConnectionError("redis went away")

    coalescer: Coalescer[int, int] = Coalescer(run, max_batch=100, failure=lambda exc: TimeoutError(str(exc)))
    sinks = [_Sink(), _Sink()]
    deadline = asyncio.get_running_loop().time() + 5
    for number, sink in enumerate(sinks):
        coalescer.submit_to(number, sink, deadline)
    for _ in range(5):
        await asyncio.sleep(0)
    assert [type(error) for sink in sinks for error in sink.errors] == [TimeoutError, TimeoutError]


def test_evaluator_may_fire_only_when_an_unfired_alert_is_reached() -> None:
    evaluator = Evaluator.__new__(Evaluator)  # only its in-memory state is used here
    evaluator._config = None
    evaluator._config_at = 0.0
    evaluator._fired = set()
    period = period_at(PeriodKind.MONTHLY, ZoneInfo("UTC"), datetime.now(UTC))
    spend = ScopeSpend(scope="key:k", key_id="k", period=period, spent=96, limit=100)
    assert evaluator.may_fire(spend)  # no configuration read yet: the slow path reads it
    assert not evaluator.may_fire(ScopeSpend("key:k", "k", period, 96, -1))  # no budget
    config = AlertConfig(key_enabled=True, key_thresholds=(0.5, 0.8, 0.95))
    evaluator.use_config(config)
    due = Evaluator._due(spend, config)
    assert [threshold for _kind, threshold, *_ in due] == [0.5, 0.8, 0.95]
    assert evaluator.may_fire(spend)
    for kind, threshold, *_ in due:
        evaluator._fired.add(("key:k", period.start_epoch, kind, threshold))
    assert not evaluator.may_fire(spend)
    assert evaluator.may_fire(ScopeSpend("key:k", "k", period, 101, 100))  # exceeded has not fired
    assert not evaluator.may_fire(ScopeSpend("key:k", "k", period, 40, 100))  # nothing reached


class _Waiter:
    def __init__(self) -> None:
        self.errors: list[BaseException] = []

    def authorized(self, result: AuthorizeResult, key_call: ScopeCall, global_call: ScopeCall) -> None:
        raise AssertionError("not expected")

    def settled(self, outcome: SettleOutcome) -> None:
        raise AssertionError("not expected")

    def failed(self, error: BaseException) -> None:
        self.errors.append(error)


def test_a_callback_call_answered_with_the_wrong_kind_of_result_still_hears_of_it() -> None:
    """Every call is answered: a result the engine's callback sink cannot use becomes the call's
    failure instead of an exception lost in the batch."""
    waiter = _Waiter()
    now = datetime.now(UTC)
    engine: Any = None  # not reached before the result is refused
    _AuthorizeCall(engine, "k", "r", 1, waiter, now).set_result(SettleResult(Outcome.DONE))
    item = SettleItem("r", "k", 1, None, "p")
    _SettleCall(engine, item, waiter, now).set_result(AuthorizeResult(Outcome.DONE))
    assert [type(error) for error in waiter.errors] == [TypeError, TypeError]


# ------------------------------------------------------------------------------------- against the service


async def test_stream_authorize_and_settle_together_keep_exact_budgets(budget_stack: BudgetStack) -> None:
    """400 callers each authorize 5 cents and settle it at 5 cents on one stream ($10 key):
    Authorize and Settle calls share batches, and exactly 200 are admitted whatever the
    interleaving; every admitted one is settled once, nothing stays reserved."""
    key_id = new_key(budget_stack, 10.00)
    async with grpc.aio.insecure_channel(budget_stack.address) as channel:
        client = RequestPathClient(channel, metadata=budget_stack.auth())

        denials: list[grpc.StatusCode] = []

        async def one(n: int) -> bool:
            request_id = f"mixed-{key_id}-{n}"
            try:
                await client.authorize(key_id, request_id, 50_000)
            except RequestPathError as exc:
                denials.append(exc.code)
                return False
            settled = await client.settle(settle_request(key_id, 50_000, request_id))
            assert not settled.already_settled and settled.overspend_micros == 0
            assert settled.remaining[0].scope == f"key:{key_id}"
            assert settled.remaining[0].committed_micros <= 10 * USD
            return True

        admitted = sum(await asyncio.gather(*(one(n) for n in range(400))))
        await client.close()
    assert admitted == 200
    assert set(denials) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    with budget_stack.http() as http:
        budget = http.get(f"/api/admin/virtual-keys/{key_id}/budget").json()["data"]
    assert (budget["currentSpend"], budget["reserved"]) == (10.0, 0)


async def test_stream_settle_without_key_id_and_threshold_actions_before_the_answer(
    budget_stack: BudgetStack,
) -> None:
    """A settle naming no key finds it from its reservation; a settle that crosses the key's 95%
    threshold (disable_key) has disabled the key by the time it is answered, so the next
    authorization on the stream is denied as disabled."""
    key_id = new_key(budget_stack, 1.00)
    async with grpc.aio.insecure_channel(budget_stack.address) as channel:
        client = RequestPathClient(channel, metadata=budget_stack.auth())
        with budget_stack.db() as conn:
            request_id = record_usage(conn, key_id, 960_000)
        await client.authorize(key_id, request_id, 10_000)
        request = settle_request(key_id, 960_000, request_id)
        request.key_id = ""
        settled = await client.settle(request)  # as the unary Settle: the key found, scope named "key:?"
        assert settled.remaining[0].committed_micros == 960_000
        assert settled.overspend_micros == 950_000
        with pytest.raises(RequestPathError) as denied:
            await client.authorize(key_id, uuid.uuid4().hex, 1)
        assert denied.value.metadata()["denialReason"] == "DENIAL_REASON_KEY_DISABLED"
        again = await client.settle(settle_request(key_id, 960_000, request_id))
        assert again.already_settled
        await client.close()


async def test_stream_answers_after_a_flushall_with_rebuilt_counters(budget_stack: BudgetStack) -> None:
    """After a FLUSHALL the stream's calls wait for the rebuild and are answered with the totals
    rebuilt from the database (the retry of the callback path)."""
    key_id = new_key(budget_stack, 5.00)
    with budget_stack.db() as conn:
        request_id = record_usage(conn, key_id, 1_000_000)
    async with grpc.aio.insecure_channel(budget_stack.address) as channel:
        client = RequestPathClient(channel, metadata=budget_stack.auth())
        await client.authorize(key_id, request_id, 1_000_000)
        await client.settle(settle_request(key_id, 1_000_000, request_id))
        with budget_stack.redis_client() as redis_client:
            redis_client.flushall()
        answers = await asyncio.gather(*(client.authorize(key_id, f"after-{key_id}-{n}", 100_000) for n in range(5)))
        committed = sorted(answer.remaining[0].committed_micros for answer in answers)
        assert committed == [1_000_000 + 100_000 * n for n in range(1, 6)]
        assert {answer.remaining[0].limit_micros for answer in answers} == {5 * USD}
        await client.close()


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_stream_applies_the_failure_policy_when_redis_is_unreachable(
    budget_stack: BudgetStack, policy: str
) -> None:
    """Redis silent: the stream answers each Authorize with the failure policy, each Settle with
    UNAVAILABLE, and goes on (a later call is answered as well)."""
    paused = Redis(budget_stack.root / f"stream-paused-{policy}", free_port())
    paused.start()
    suite, address = budget_stack.start_replica(
        f"stream-policy-{policy}",
        REDIS_URL=paused.url,
        BUDGET_FAILURE_POLICY=policy,
        BUDGET_RECONCILE_ON_START="false",
    )
    assert paused.process is not None
    paused.process.send_signal(signal.SIGSTOP)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            client = RequestPathClient(channel, metadata=budget_stack.auth())
            key_id = str(uuid.uuid4())
            for attempt in range(2):
                async with asyncio.timeout(5):
                    if policy == "open":
                        reply = await client.authorize(key_id, f"x-{attempt}", 5)
                        assert reply.allowed and reply.failure_policy_applied
                    else:
                        with pytest.raises(RequestPathError) as denied:
                            await client.authorize(key_id, f"x-{attempt}", 5)
                        assert denied.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                        reason = denied.value.metadata()["denialReason"]
                        assert reason == "DENIAL_REASON_BUDGET_STORE_UNAVAILABLE"
                    with pytest.raises(RequestPathError) as unavailable:
                        await client.settle(settle_request(key_id, 5, f"x-{attempt}"))
                    assert unavailable.value.code == grpc.StatusCode.UNAVAILABLE
            assert client.streams_opened == 1
            await client.close()
    finally:
        paused.process.send_signal(signal.SIGCONT)
        suite.stop_all()
        paused.stop()
    log = (budget_stack.root / "logs" / f"stream-policy-{policy}" / "budget.log").read_text()
    assert "redis unreachable" in log


async def test_raw_stream_answers_each_call_once_in_many_small_messages(budget_stack: BudgetStack) -> None:
    """Authorize, Settle and Release calls spread over many messages of one stream, read while
    written: every call answered exactly once, with the kind it asked for."""
    key_id = new_key(budget_stack, 1000.00)
    async with grpc.aio.insecure_channel(budget_stack.address) as channel:
        call = budget_pb2_grpc.BudgetServiceStub(channel).StreamRequestPath(metadata=budget_stack.auth(), timeout=60)
        kinds: dict[int, str] = {}

        async def write() -> None:
            number = 0
            for n in range(300):
                request_id = f"raw-{key_id}-{n}"
                calls = [budget_pb2.RequestPathCall(call_id=number, authorize=_authorize(key_id, request_id))]
                kinds[number] = "authorize"
                number += 1
                if n % 3 == 0:
                    calls.append(
                        budget_pb2.RequestPathCall(call_id=number, settle=settle_request(key_id, 500, request_id))
                    )
                    kinds[number] = "settle"
                elif n % 3 == 1:
                    release = budget_pb2.ReleaseRequest(request_id=request_id)
                    calls.append(budget_pb2.RequestPathCall(call_id=number, release=release))
                    kinds[number] = "release"
                number += 1 if n % 3 != 2 else 0
                await call.write(budget_pb2.StreamRequestPathRequest(calls=calls))
            await call.done_writing()

        writer = asyncio.create_task(write())
        answered: dict[int, str | None] = {}
        async for reply in call:
            for answer in reply.answers:
                assert answer.call_id not in answered
                answered[answer.call_id] = answer.WhichOneof("result")
        await writer
    assert answered == kinds


def _authorize(key_id: str, request_id: str) -> budget_pb2.AuthorizeRequest:
    return budget_pb2.AuthorizeRequest(key_id=key_id, request_id=request_id, estimated_cost_micros=1_000)


class _HeldAnswers:
    """A request-path server that records the calls of each message and answers a message only
    when the test releases it."""

    def __init__(self) -> None:
        self.messages: list[list[int]] = []
        self.arrived = asyncio.Event()
        self.release: asyncio.Queue[int] = asyncio.Queue()  # index of the message to answer

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "tally.budget.v1.BudgetService",
            {
                "StreamRequestPath": grpc.stream_stream_rpc_method_handler(
                    self.stream,
                    request_deserializer=budget_pb2.StreamRequestPathRequest.FromString,
                    response_serializer=budget_pb2.StreamRequestPathResponse.SerializeToString,
                )
            },
        )

    async def stream(self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.send_initial_metadata(())

        async def read() -> None:
            async for message in request_iterator:
                self.messages.append([call.call_id for call in message.calls])
                self.arrived.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                index = await self.release.get()
                reply = budget_pb2.StreamRequestPathResponse()
                for call_id in self.messages[index]:
                    reply.answers.add(call_id=call_id).authorize.allowed = True
                await context.write(reply)
        finally:
            reader.cancel()


async def _messages(server: _HeldAnswers, count: int) -> list[list[int]]:
    async with asyncio.timeout(5):
        while len(server.messages) < count:
            server.arrived.clear()
            await server.arrived.wait()
    return server.messages


async def test_client_gathers_calls_while_enough_messages_are_unanswered() -> None:
    """With 2 messages unanswered, later calls wait and leave together when one is answered (or
    when the hold runs out): under load a gateway sends fewer, fuller messages."""
    servicer = _HeldAnswers()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((servicer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = RequestPathClient(channel, max_messages_in_flight=2, max_hold_seconds=0.5)
            key = str(uuid.uuid4())

            def authorize(n: int) -> asyncio.Task[Any]:
                return asyncio.create_task(client.authorize(key, f"r{n}", 1))

            first = authorize(1)
            assert await _messages(servicer, 1) == [[1]]
            second = authorize(2)
            assert await _messages(servicer, 2) == [[1], [2]]
            held = [authorize(n) for n in (3, 4, 5)]
            await asyncio.sleep(0.1)
            assert servicer.messages == [[1], [2]], "calls were sent while two messages were unanswered"
            servicer.release.put_nowait(0)
            assert (await first).allowed
            assert await _messages(servicer, 3) == [[1], [2], [3, 4, 5]]
            # Two unanswered again (2 and 3-5): the next call is held until the hold runs out.
            loop = asyncio.get_running_loop()
            began = loop.time()
            sixth = authorize(6)
            assert await _messages(servicer, 4) == [[1], [2], [3, 4, 5], [6]]
            assert loop.time() - began >= 0.45
            for index in (1, 2, 3):
                servicer.release.put_nowait(index)
            for task in (second, *held, sixth):
                assert (await task).allowed
            await client.close()
    finally:
        await server.stop(None)
