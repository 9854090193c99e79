"""Coalesces concurrent request-path calls into few Redis script runs (group commit).

A call is queued and a flush is scheduled with `call_soon`, so every call made in the same
event-loop tick joins it. While `max_inflight` batches are already waiting for Redis, further
calls wait in the queue and leave together as the next batch as soon as one returns. A lone
call therefore goes out at once (one extra loop iteration), while a busy service sends one
Redis command per batch instead of per call: fewer round trips, syscalls and per-command work
in the client and in Redis.

Each call keeps its own deadline: the caller waits for its own result with its own timeout; the
batch's Redis call is bounded by the latest deadline in it, so a stuck Redis fails every caller
at its deadline and the batch itself never outlives them.

A call is answered through its sink: an asyncio future (`submit`: the caller awaits it), or any
object with the same three methods (`submit_to`: the request-path stream decides its calls in
plain callbacks run straight from the batch's answer, with no task or future per call). A sink
that is `done()` before its batch leaves is not sent.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

E = TypeVar("E")
R = TypeVar("R")
R_contra = TypeVar("R_contra", contravariant=True)

log = logging.getLogger("tally.budget")


class Sink(Protocol[R_contra]):
    """Where one entry's answer goes (an asyncio.Future is one)."""

    def done(self) -> bool: ...

    def set_result(self, result: R_contra, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class Coalescer(Generic[E, R]):
    def __init__(
        self,
        run: Callable[[Sequence[E]], Awaitable[list[R]]],
        *,
        max_batch: int,
        max_inflight: int = 1,
        failure: Callable[[BaseException], BaseException],
        observe: Callable[[float], None] | None = None,
    ) -> None:
        """`run` answers a batch in order; `failure` maps its exception to what each caller sees
        (one fresh exception per caller)."""
        self._run = run
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._inflight = 0
        self._failure = failure
        self._observe = observe
        self._entries: list[E] = []
        self._futures: list[Sink[R]] = []
        self._deadline = 0.0
        self._scheduled = False
        # Batches run outside any one caller's context (correlation id, deadline).
        self._context = contextvars.Context()
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.entries = 0

    def submit(self, entries: Sequence[E], deadline: float) -> list[asyncio.Future[R]]:
        """Queues `entries` (answered by `deadline`, on the loop's clock) for the next flush."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = [loop.create_future() for _ in entries]
        self._entries.extend(entries)
        self._futures.extend(futures)
        if deadline > self._deadline:
            self._deadline = deadline
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush, context=self._context)
        return futures

    def submit_to(self, entry: E, sink: Sink[R], deadline: float) -> None:
        """Queues one entry whose answer (or failure) goes to `sink`, from the batch's own task."""
        self._entries.append(entry)
        self._futures.append(sink)
        if deadline > self._deadline:
            self._deadline = deadline
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, context=self._context)

    def _flush(self) -> None:
        self._scheduled = False
        while self._entries and self._inflight < self._max_inflight:
            entries, futures, deadline = self._entries, self._futures, self._deadline
            self._entries, self._futures, self._deadline = [], [], 0.0
            if len(entries) > self._max_batch:
                # Oversized: the rest goes out as the next batch.
                step = self._max_batch
                self._entries, self._futures, self._deadline = entries[step:], futures[step:], deadline
                entries, futures = entries[:step], futures[:step]
            if any(future.done() for future in futures):
                # Callers that gave up (deadline, cancellation) while queued are not sent.
                kept = [(e, f) for e, f in zip(entries, futures, strict=True) if not f.done()]
                entries, futures = [e for e, _ in kept], [f for _, f in kept]
                if not entries:
                    continue
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._send(entries, futures, deadline), context=self._context)
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        if self._entries and not self._scheduled:
            self._flush()

    async def _send(self, entries: Sequence[E], futures: list[Sink[R]], deadline: float) -> None:
        self.batches += 1
        self.entries += len(entries)
        if self._observe is not None:
            self._observe(len(entries))
        try:
            async with asyncio.timeout_at(deadline):
                results = await self._run(entries)
            if len(results) != len(entries):
                raise RuntimeError(f"a batch of {len(entries)} got {len(results)} answers")
        except BaseException as exc:  # every caller must hear of any failure
            for future in futures:
                if not future.done():
                    try:
                        future.set_exception(self._failure(exc))
                    except Exception:  # a sink's own failure must not keep the others unanswered
                        log.exception("a batch's failure could not be delivered to one of its callers")
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            return
        for future, result in zip(futures, results, strict=False):
            if not future.done():
                try:
                    future.set_result(result)
                except Exception:
                    log.exception("a batch's answer could not be delivered to one of its callers")
