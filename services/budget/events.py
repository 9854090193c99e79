"""The enforcement event stream on Redis Streams: XADD with an approximate MAXLEN, read with
XREAD BLOCK from the subscriber's last id, so a reconnecting subscriber misses nothing.

An event is first recorded in PostgreSQL (`budget_event_outbox`) in the transaction that decides
it (the alert that fired, the key disabled), so neither a Redis outage nor a crash right after
the commit loses it. It is added to the stream at once after the commit, and the relay (every
RELAY_SECONDS, in every replica) adds any recorded event not added yet, oldest first. Adding is
idempotent per recorded event: a Redis key next to the stream remembers the entry each one
became, so the immediate path, retries and several relays add it once."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from redis.exceptions import RedisError

from services.budget import metrics
from services.budget.store import EVENTS_KEY, PREFIX
from tally.budget.v1 import budget_pb2
from tally.runtime.db import Database
from tally.runtime.errors import InvalidArgument
from tally.runtime.redis import RedisClient

log = logging.getLogger("tally.budget.events")

_STREAM_ID = re.compile(r"^\d+(-\d+)?$")
BLOCK_MS = 1000
READ_COUNT = 500
RELAY_SECONDS = 1.0
RELAY_BATCH = 500
# How long Redis remembers the stream entry a recorded event became (any retry comes sooner).
ADDED_TTL_SECONDS = 7 * 86400
# Recorded events already in the stream are deleted after this many days.
OUTBOX_KEEP_DAYS = 7

# KEYS: the stream, the recorded event's marker (same hash tag: one slot on a cluster).
# ARGV: MAXLEN, the marker's TTL, then the entry's field/value pairs. Returns the entry id.
_ADD_ONCE = """
local known = redis.call('GET', KEYS[2])
if known then return known end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[2], id, 'EX', ARGV[2])
return id
"""
# Publishers of recorded events take this advisory lock (pg_advisory_xact_lock), one at a time.
PUBLISH_LOCK = 7_406_391_045
_COLUMNS = "id, created_at, type, scope, key_id, threshold, spend_micros, limit_micros, message"


@dataclass(frozen=True)
class BudgetEvent:
    type: int  # budget_pb2.BudgetEventType
    scope: str
    key_id: str = ""
    threshold: float = 0.0
    spend_micros: int = 0
    limit_micros: int = 0
    message: str = ""


async def record(conn: AsyncConnection[Any], event: BudgetEvent) -> int:
    """Records `event` in the caller's transaction; returns its id (for `EventStream.deliver`)."""
    cur = await conn.execute(
        """INSERT INTO budget_event_outbox (type, scope, key_id, threshold, spend_micros, limit_micros, message)
           VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id""",
        (
            event.type,
            event.scope,
            event.key_id,
            event.threshold,
            event.spend_micros,
            event.limit_micros,
            event.message,
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def _fields(row: dict[str, Any]) -> list[str | int]:
    """A recorded event's stream fields (its time is when it was recorded)."""
    return [
        "type", row["type"],
        "time", int(row["created_at"].timestamp() * 1000),
        "scope", row["scope"],
        "key", row["key_id"],
        "threshold", repr(float(row["threshold"])),
        "spend", row["spend_micros"],
        "limit", row["limit_micros"],
        "message", row["message"],
    ]  # fmt: skip


def _marker(row: dict[str, Any]) -> str:
    """The Redis key remembering a recorded event's entry: its id and recording time in
    microseconds (ids of another database never match both)."""
    created = row["created_at"]
    return f"{PREFIX}event-added:{row['id']}:{int(created.timestamp() * 1_000_000)}"


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
    def __init__(self, redis: RedisClient, reader: RedisClient, maxlen: int, db: Database) -> None:
        self._redis = redis
        self._reader = reader  # a client whose socket timeout outlasts BLOCK_MS
        self._maxlen = maxlen
        self._db = db
        self._relay_failing = False

    async def _add(self, row: dict[str, Any]) -> str:
        args = [self._maxlen, ADDED_TTL_SECONDS, *_fields(row)]
        entry = await self._redis.eval(_ADD_ONCE, 2, EVENTS_KEY, _marker(row), *args)
        return _text(entry)

    async def publish_recorded(self, upto: int | None = None) -> int:
        """Adds the recorded events not yet in the stream, oldest first: those up to id `upto`, or
        the oldest RELAY_BATCH. One publisher at a time (an advisory lock), so a key's events
        reach the stream in the order they were decided (its row lock orders them, and their
        ids with them). Returns how many were added; raises the first failure, after noting
        those added before it."""
        failure: BaseException | None = None
        added: list[tuple[int, str]] = []
        async with self._db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (PUBLISH_LOCK,))
            where = "published_at IS NULL" + (" AND id <= %(upto)s" if upto is not None else "")
            await cur.execute(
                f"SELECT {_COLUMNS} FROM budget_event_outbox WHERE {where} ORDER BY id LIMIT %(limit)s",  # noqa: S608 (constants)
                {"upto": upto, "limit": RELAY_BATCH},
            )
            for row in await cur.fetchall():
                try:
                    added.append((row["id"], await self._add(row)))
                except Exception as exc:
                    failure = exc
                    break
            if added:
                await cur.execute(
                    """UPDATE budget_event_outbox o SET stream_id = a.entry, published_at = now()
                       FROM unnest(%s::bigint[], %s::text[]) AS a (id, entry) WHERE o.id = a.id""",
                    ([i for i, _ in added], [e for _, e in added]),
                )
        if failure is not None:
            raise failure
        return len(added)

    async def deliver(self, ids: Sequence[int]) -> None:
        """Adds just-recorded events (and any older one not added yet) at once; a failure is
        logged, never raised (the relay adds them later)."""
        if not ids:
            return
        try:
            await self.publish_recorded(max(ids))
        except Exception as exc:
            log.warning("budget events not yet added to the stream: the relay will", extra={"error": repr(exc)})

    async def relay(self) -> int:
        """Adds every recorded event not yet in the stream; returns how many. While Redis is
        unreachable it logs once (not each pass) and the pending gauge shows the backlog."""
        total = 0
        try:
            while True:
                added = await self.publish_recorded()
                total += added
                if added < RELAY_BATCH:
                    break
        except (RedisError, OSError) as exc:
            if not self._relay_failing:
                log.warning("budget events wait for Redis: the relay retries each second", extra={"error": repr(exc)})
            self._relay_failing = True
        else:
            if self._relay_failing:
                log.info("budget events relayed again after Redis was unreachable", extra={"events": total})
            self._relay_failing = False
        row = await self._db.fetch_one("SELECT count(*) AS n FROM budget_event_outbox WHERE published_at IS NULL")
        metrics.EVENTS_PENDING.set(row["n"] if row else 0)
        return total

    async def prune(self) -> None:
        """Deletes recorded events added to the stream more than OUTBOX_KEEP_DAYS days ago."""
        async with self._db.transaction() as conn:
            await conn.execute(
                "DELETE FROM budget_event_outbox WHERE published_at < now() - make_interval(days => %s)",
                (OUTBOX_KEEP_DAYS,),
            )

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
