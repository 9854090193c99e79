"""The enforcement event stream on Redis Streams: XADD with an approximate MAXLEN, read with
XREAD BLOCK from the subscriber's last id, so a reconnecting subscriber misses nothing."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from services.budget.store import EVENTS_KEY
from tally.budget.v1 import budget_pb2
from tally.runtime.errors import InvalidArgument
from tally.runtime.redis import RedisClient

_STREAM_ID = re.compile(r"^\d+(-\d+)?$")
BLOCK_MS = 1000
READ_COUNT = 500


@dataclass(frozen=True)
class BudgetEvent:
    type: int  # budget_pb2.BudgetEventType
    scope: str
    key_id: str = ""
    threshold: float = 0.0
    spend_micros: int = 0
    limit_micros: int = 0
    message: str = ""

    def fields(self) -> dict[str, str | int | float]:
        return {
            "type": self.type,
            "time": int(time.time() * 1000),
            "scope": self.scope,
            "key": self.key_id,
            "threshold": repr(self.threshold),
            "spend": self.spend_micros,
            "limit": self.limit_micros,
            "message": self.message,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def to_proto(event_id: str, fields: dict[Any, Any]) -> budget_pb2.WatchBudgetEventsResponse:
    data = {_text(k): _text(v) for k, v in fields.items()}
    message = budget_pb2.WatchBudgetEventsResponse(
        event_id=event_id,
        type=int(data.get("type", "0")),  # type: ignore[arg-type]
        scope=data.get("scope", ""),
        key_id=data.get("key", ""),
        threshold=float(data.get("threshold", "0") or 0),
        spend_micros=int(data.get("spend", "0") or 0),
        limit_micros=int(data.get("limit", "0") or 0),
        message=data.get("message", ""),
    )
    message.time.FromMilliseconds(int(data.get("time", "0") or 0))
    return message


class EventStream:
    def __init__(self, redis: RedisClient, reader: RedisClient, maxlen: int) -> None:
        self._redis = redis
        self._reader = reader  # a client whose socket timeout outlasts BLOCK_MS
        self._maxlen = maxlen

    async def publish(self, event: BudgetEvent) -> str:
        event_id = await self._redis.xadd(EVENTS_KEY, event.fields(), maxlen=self._maxlen, approximate=True)  # type: ignore[arg-type]
        return _text(event_id)

    async def start_id(self, after_id: str) -> str:
        """'' = only events after now; '0' = the whole retained history; else resume after that id."""
        if after_id == "":
            last = await self._reader.xrevrange(EVENTS_KEY, count=1)
            return _text(last[0][0]) if last else "0-0"
        if not _STREAM_ID.match(after_id):
            raise InvalidArgument.field("afterId", "must be a stream id like 1700000000000-0, '0' or empty")
        return after_id

    async def follow(self, after_id: str) -> AsyncIterator[budget_pb2.WatchBudgetEventsResponse]:
        """Events after `after_id`, in order, for as long as the caller keeps reading."""
        last = await self.start_id(after_id)
        while True:
            reply: Any = await self._reader.xread({EVENTS_KEY: last}, count=READ_COUNT, block=BLOCK_MS)
            for _stream, entries in reply or []:
                for raw_id, fields in entries:
                    last = _text(raw_id)
                    yield to_proto(last, fields)
