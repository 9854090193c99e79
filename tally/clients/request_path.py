"""A gateway's client for the budget request path over one long-lived stream (StreamRequestPath).

Any number of coroutines call `authorize`, `settle` and `release` concurrently; the calls made
while the previous message is being written go out together in the next one, and answers are
matched to their callers by call id. At most `max_messages_in_flight` messages are unanswered at a
time: calls made while that many are gather in the next message, which leaves when an earlier one
is answered or after `max_hold_seconds`, whichever comes first (Nagle's rule, bounded). Every
message costs the client and the service tens of microseconds of CPU in gRPC, so under load fewer,
fuller messages mean lower latency; an idle client sends a call at once. A denial or any other
per-call error raises `RequestPathError` carrying the same `google.rpc.Status` (code, message,
QuotaFailure and ErrorInfo details) the unary RPC would have ended with. If the stream breaks, the
calls waiting on it fail with `RequestPathUnavailable`; calls then fail the same way at once for a
back-off (50 ms, doubling with each failed stream up to 5 s) before a call opens a new stream.
Every call is idempotent per request id, so a caller may simply retry (or apply its own failure
policy). Bound each call's wait with `asyncio.timeout` (a call given up on is forgotten; its
answer, if it comes, is dropped).

    async with grpc.aio.insecure_channel("budget:50053") as channel:
        client = RequestPathClient(channel, metadata=[("authorization", f"Bearer {key}")])
        try:
            await client.authorize(key_id, request_id, estimated_cost_micros=2_000)
        except RequestPathError as denied:
            ...  # denied.code is grpc.StatusCode.RESOURCE_EXHAUSTED for a budget denial
        ...
        await client.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from tally.budget.v1 import budget_pb2, budget_pb2_grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}
BACKOFF_FIRST_SECONDS = 0.05
BACKOFF_MAX_SECONDS = 5.0
MAX_MESSAGES_IN_FLIGHT = 3
MAX_HOLD_SECONDS = 0.002


class RequestPathError(Exception):
    """A call answered with an error status."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status
        self.code: grpc.StatusCode = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)

    def quota_failure(self) -> error_details_pb2.QuotaFailure | None:
        for detail in self.status.details:
            failure = error_details_pb2.QuotaFailure()
            if detail.Unpack(failure):
                return failure
        return None

    def metadata(self) -> dict[str, str]:
        for detail in self.status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return dict(info.metadata)
        return {}


def _wake_up(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


class RequestPathUnavailable(Exception):
    """The stream broke (or could not be opened) before the call was answered."""


class RequestPathClient:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: Sequence[tuple[str, str]] = (),
        max_messages_in_flight: int = MAX_MESSAGES_IN_FLIGHT,
        max_hold_seconds: float = MAX_HOLD_SECONDS,
    ) -> None:
        self._max_in_flight = max_messages_in_flight
        self._max_hold = max_hold_seconds
        self._message_of: dict[int, int] = {}  # call id -> number of the message that carried it
        self._message_left: dict[int, int] = {}  # message number -> its calls not yet answered
        self._messages = itertools.count(1)
        self._stub = budget_pb2_grpc.BudgetServiceStub(channel)
        self._metadata = tuple(metadata)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[budget_pb2.RequestPathAnswer]] = {}
        # The next message: calls are written into it in place as they are made.
        self._outgoing = budget_pb2.StreamRequestPathRequest()
        self._wake: asyncio.Future[None] | None = None  # the writer, waiting for calls
        self._released: asyncio.Future[None] | None = None  # the writer, holding a message
        self._stream: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._backoff = 0.0  # seconds; doubles with each stream that fails before answering
        self._retry_at = 0.0  # loop time before which no new stream is opened
        self.streams_opened = 0

    async def authorize(self, key_id: str, request_id: str, estimated_cost_micros: int) -> budget_pb2.AuthorizeResponse:
        call, future = self._new_call()
        try:
            request = call.authorize
            request.key_id = key_id
            request.request_id = request_id
            request.estimated_cost_micros = estimated_cost_micros
        except BaseException:
            self._withdraw(call)
            raise
        answer = await self._answer(call.call_id, future)
        return answer.authorize

    async def settle(self, request: budget_pb2.SettleRequest) -> budget_pb2.SettleResponse:
        call, future = self._new_call()
        try:
            call.settle.CopyFrom(request)
        except BaseException:
            self._withdraw(call)
            raise
        answer = await self._answer(call.call_id, future)
        return answer.settle

    async def release(self, request_id: str) -> budget_pb2.ReleaseResponse:
        call, future = self._new_call()
        try:
            call.release.request_id = request_id
        except BaseException:
            self._withdraw(call)
            raise
        answer = await self._answer(call.call_id, future)
        return answer.release

    async def close(self) -> None:
        """Ends the stream after the calls already sent are answered (or fail)."""
        if self._pending:
            await asyncio.gather(*self._pending.values(), return_exceptions=True)
        self._stop(RequestPathUnavailable("the client was closed"))

    def _new_call(
        self,
    ) -> tuple[budget_pb2.RequestPathCall, asyncio.Future[budget_pb2.RequestPathAnswer]]:
        """A new call in the next message (its request is filled in by the caller before it
        yields to the event loop), and the future of its answer."""
        loop = asyncio.get_running_loop()
        if self._stream is None:
            wait = self._retry_at - loop.time()
            if wait > 0:
                raise RequestPathUnavailable(f"the request-path stream failed; next attempt in {wait:.2f} s")
            self._open()
        call = self._outgoing.calls.add()
        call.call_id = call_id = next(self._ids)
        future: asyncio.Future[budget_pb2.RequestPathAnswer] = loop.create_future()
        self._pending[call_id] = future
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        return call, future

    def _withdraw(self, call: budget_pb2.RequestPathCall) -> None:
        """Takes back a call whose request could not be filled in (still the message's last)."""
        self._pending.pop(call.call_id, None)
        calls = self._outgoing.calls
        if len(calls) and calls[-1].call_id == call.call_id:
            del calls[-1]

    async def _answer(
        self, call_id: int, future: asyncio.Future[budget_pb2.RequestPathAnswer]
    ) -> budget_pb2.RequestPathAnswer:
        try:
            answer = await future
        finally:
            self._pending.pop(call_id, None)
        if answer.WhichOneof("result") == "error":
            raise RequestPathError(answer.error)
        return answer

    def _open(self) -> None:
        self.streams_opened += 1
        self._stream = self._stub.StreamRequestPath(metadata=self._metadata)
        self._tasks = [asyncio.create_task(self._write(self._stream)), asyncio.create_task(self._read(self._stream))]

    async def _write(self, stream: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            # The server sends its initial metadata once it has admitted the stream (or ends it
            # with its status): writing only after that keeps a refusal's status, which grpc aio
            # replaces with INTERNAL when a write races the end of the stream (grpc#36066).
            await stream.initial_metadata()
            while True:
                if not self._outgoing.calls:
                    self._wake = loop.create_future()
                    await self._wake
                    self._wake = None
                if len(self._message_left) >= self._max_in_flight:
                    # Enough messages unanswered: the calls gather in this one until an earlier
                    # one is answered, for at most max_hold.
                    self._released = released = loop.create_future()
                    timer = loop.call_later(self._max_hold, _wake_up, released)
                    await released
                    timer.cancel()
                    self._released = None
                await asyncio.sleep(0)  # calls made in the same turn of the loop join this message
                request, self._outgoing = self._outgoing, budget_pb2.StreamRequestPathRequest()
                if request.calls:
                    number = next(self._messages)
                    self._message_left[number] = len(request.calls)
                    message_of = self._message_of
                    for call in request.calls:
                        message_of[call.call_id] = number
                    await stream.write(request)
        except Exception as exc:  # any failure to write breaks the stream
            reason = str(exc)
            with contextlib.suppress(Exception):  # the status the stream ended with, when it did
                async with asyncio.timeout(1):
                    reason = f"{(await stream.code()).name} {await stream.details()}"
            self._fail(stream, RequestPathUnavailable(f"the request-path stream failed: {reason}"))

    async def _read(self, stream: Any) -> None:
        try:
            async for reply in stream:
                self._backoff = 0.0
                pending = self._pending
                message_of = self._message_of
                left = self._message_left
                for answer in reply.answers:
                    call_id = answer.call_id
                    future = pending.pop(call_id, None)
                    if future is not None and not future.done():
                        future.set_result(answer)
                    number = message_of.pop(call_id, None)
                    if number is not None:
                        if left[number] == 1:
                            del left[number]
                        else:
                            left[number] -= 1
                released = self._released
                if released is not None and not released.done() and len(left) < self._max_in_flight:
                    released.set_result(None)
        except grpc.aio.AioRpcError as exc:
            message = f"the request-path stream failed: {exc.code().name} {exc.details()}"
            self._fail(stream, RequestPathUnavailable(message))
            return
        if stream is self._stream:  # the server ended it (shutting down): the next call opens another
            self._stop(RequestPathUnavailable("the request-path stream ended"))

    def _fail(self, stream: Any, error: Exception) -> None:
        """A failed stream: after it, calls fail at once (no new stream) for a while: 50 ms,
        doubling with each failure in a row up to 5 s; the first answer on a stream resets it."""
        if stream is not self._stream:
            return  # already stopped (its reader and writer both see the failure)
        self._backoff = min(max(2 * self._backoff, BACKOFF_FIRST_SECONDS), BACKOFF_MAX_SECONDS)
        self._retry_at = asyncio.get_running_loop().time() + self._backoff
        self._stop(error)

    def _stop(self, error: Exception) -> None:
        """Fails the calls waiting on the current stream; the next call opens a new one."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._tasks = []
        self._outgoing = budget_pb2.StreamRequestPathRequest()
        self._wake = None
        self._released = None
        self._message_of.clear()
        self._message_left.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
