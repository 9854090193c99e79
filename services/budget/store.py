"""The Redis side of budgets: reservations and counters, changed only by the Lua scripts in
`services.budget.lua`, so every decision is atomic across the key's and the global scope."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from services.budget import lua
from services.budget.periods import Period
from tally.runtime.redis import RedisClient

PREFIX = "{tally:budget}:"
LOADED_KEY = PREFIX + "loaded"
# A counter rebuild from the database in progress: hash of `until` (ms; a crashed rebuild stops
# counting as one then) and `snap` (the snapshot of the last rebuild); and the settlements made
# while one runs (see lua.SETTLE and lua.RECONCILE).
REBUILD_KEY = PREFIX + "rebuild"
REBUILD_LOG_KEY = PREFIX + "rebuild:log"
RESERVATION_PREFIX = PREFIX + "r:"
EXPIRY_KEY = PREFIX + "rexp"
# The scopes disabled in Redis (their cfg has dis): the periodic sync finds one the database has
# enabled (left behind by a write whose reply was lost) and enables it.
DISABLED_KEY = PREFIX + "disabled"
# Request ids ingest handed over with no record, a set per hour; and hand-off chunks applied.
HANDOFF_PREFIX = PREFIX + "h:"
HANDOFF_DONE_PREFIX = PREFIX + "hd:"
EVENTS_KEY = PREFIX + "events"
GLOBAL_SCOPE = "global"
GLOBAL_CONFIG_KEY = PREFIX + "cfg:" + GLOBAL_SCOPE
SWEEP_LIMIT = 64


def key_scope(key_id: str) -> str:
    return f"key:{key_id}"


def config_key(scope: str) -> str:
    return f"{PREFIX}cfg:{scope}"


def counter_key(scope: str, period: Period, tz: str) -> str:
    return f"{PREFIX}c:{scope}:{period.kind.value}:{tz}:{period.start_epoch}"


def provider_key(period: Period, tz: str) -> str:
    return f"{PREFIX}p:{period.kind.value}:{tz}:{period.start_epoch}"


def reservation_key(request_id: str) -> str:
    return RESERVATION_PREFIX + request_id


class Outcome(IntEnum):
    NOT_LOADED = 0
    STALE = 1
    DENIED = 2  # for Settle: already settled
    DONE = 3


@dataclass(frozen=True)
class ScopeConfig:
    """A scope's period as Redis knows it (the limit is read by the scripts themselves)."""

    period: str
    tz: str


@dataclass(frozen=True)
class ScopeCall:
    """What a script needs about one scope: the period it expects and the counter key."""

    config: ScopeConfig
    counter: str
    expire_at: int  # unix seconds, 0 = never

    @property
    def expire_text(self) -> str:
        return str(self.expire_at)


@dataclass(frozen=True, slots=True)
class AuthorizeEntry:
    """One authorization of a batch."""

    request_id: str
    key_id: str
    estimate: int
    key: ScopeCall
    global_: ScopeCall


@dataclass(frozen=True, slots=True)
class SettleEntry:
    """One settlement of a batch."""

    request_id: str
    key_id: str
    actual: int
    key: ScopeCall
    global_: ScopeCall
    provider_hash: str
    provider: str
    transaction_id: int = 0


@dataclass(frozen=True)
class Counts:
    limit: int  # -1 = unlimited
    spent: int
    reserved: int


@dataclass(frozen=True)
class AuthorizeResult:
    outcome: Outcome
    stale: tuple[ScopeConfig, ScopeConfig] | None = None
    reason: int = 0
    expires_ms: int = 0
    key_limit: int = -1
    key_committed: int = 0
    global_limit: int = -1
    global_committed: int = 0
    replayed: bool = False


@dataclass(frozen=True)
class SettleResult:
    outcome: Outcome
    stale: tuple[ScopeConfig, ScopeConfig] | None = None
    already_settled: bool = False
    overspend: int = 0
    reserved: bool = False  # a reservation was open when this settled
    key: Counts | None = None
    global_: Counts | None = None
    key_spent_before: int = 0
    global_spent_before: int = 0


@dataclass(frozen=True, slots=True)
class SpendItem:
    """One settlement of a SpendChunk; its counters are those of its groups (0-based indexes)."""

    request_id: str
    actual: int
    key_group: int
    global_group: int
    provider: str
    transaction_id: int = 0


@dataclass(frozen=True)
class KeyGroup:
    key_id: str
    call: ScopeCall
    period: Period


@dataclass(frozen=True)
class GlobalGroup:
    call: ScopeCall
    period: Period
    provider_hash: str


@dataclass(frozen=True)
class SpendChunk:
    """Settlements sharing a few counter groups, settled by one script run (lua.SETTLE_SPEND)."""

    key_groups: Sequence[KeyGroup]
    global_groups: Sequence[GlobalGroup]
    items: Sequence[SpendItem]


@dataclass(frozen=True)
class SpendResult:
    outcome: Outcome  # NOT_LOADED, STALE (see `stale`) or DONE
    stale: Sequence[tuple[str, ScopeConfig]] = ()  # scope, its configuration now
    already_settled: int = 0
    settled: int = 0
    overspend_unreserved: int = 0  # actual cost of items with no open reservation
    overspend_open: int = 0  # actual cost above open reservations
    open_items: int = 0  # items settled above their open reservation
    first_open: str = ""  # the first of their request ids
    keys: Sequence[Counts] = ()  # per key group, after the chunk
    globals: Sequence[Counts] = ()  # per global group, after the chunk
    replayed: bool = False  # a hand-off chunk applied before: nothing changed


NOT_LOADED_AUTHORIZE = AuthorizeResult(Outcome.NOT_LOADED)
NOT_LOADED_SETTLE = SettleResult(Outcome.NOT_LOADED)


_json = json.JSONEncoder(separators=(",", ":")).encode
# A hand-off chunk's items as three columns: request ids, actual costs, spend group indexes.
HandoffColumns = tuple[Sequence[str], Sequence[int], Sequence[int]]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _counts(reply: list[Any]) -> Counts:
    return Counts(int(reply[0]), int(reply[1]), int(reply[2]))


def _spend_result(reply: list[Any]) -> SpendResult:
    outcome = int(reply[0])
    if outcome == 0:
        return SpendResult(Outcome.NOT_LOADED)
    if outcome == 1:
        prefix = config_key("")
        stale = [(_text(key)[len(prefix) :], ScopeConfig(_text(per), _text(tz))) for key, per, tz in reply[1:]]
        return SpendResult(Outcome.STALE, stale=stale)
    if outcome == 3:
        return SpendResult(Outcome.DONE, replayed=True)
    return SpendResult(
        Outcome.DONE,
        already_settled=int(reply[1]),
        settled=int(reply[2]),
        overspend_unreserved=int(reply[3]),
        overspend_open=int(reply[4]),
        open_items=int(reply[5]),
        first_open=_text(reply[6]),
        keys=[_counts(item) for item in reply[7]],
        globals=[_counts(item) for item in reply[8]],
    )


def _stale(reply: list[Any]) -> tuple[ScopeConfig, ScopeConfig]:
    return ScopeConfig(_text(reply[1]), _text(reply[2])), ScopeConfig(_text(reply[3]), _text(reply[4]))


class _KeyTable:
    """KEYS of a batch script: the fixed keys, then each distinct key once; items refer to
    keys by their (1-based, Lua) index."""

    __slots__ = ("index", "keys")

    def __init__(self, fixed: tuple[str, ...] = (LOADED_KEY, EXPIRY_KEY)) -> None:
        self.keys: list[str] = list(fixed)
        self.index: dict[str, int] = {}

    def __call__(self, key: str) -> int:
        found = self.index.get(key)
        if found is None:
            self.keys.append(key)
            found = self.index[key] = len(self.keys)
        return found


def _authorize_result(reply: list[Any]) -> AuthorizeResult:
    outcome = reply[0]
    if outcome == 3:
        return AuthorizeResult(
            Outcome.DONE,
            expires_ms=int(reply[1]),
            key_limit=int(reply[2]),
            key_committed=int(reply[3]),
            global_limit=int(reply[4]),
            global_committed=int(reply[5]),
            replayed=bool(int(reply[6])),
        )
    if outcome == 2:
        return AuthorizeResult(
            Outcome.DENIED,
            reason=int(reply[1]),
            key_limit=int(reply[2]),
            key_committed=int(reply[3]),
            global_limit=int(reply[4]),
            global_committed=int(reply[5]),
        )
    return AuthorizeResult(Outcome.STALE, stale=_stale(reply))


def _authorize_results(reply: list[Any], count: int) -> list[AuthorizeResult]:
    """The results of an AUTHORIZE run of `count` items."""
    if not int(reply[0]):
        return [NOT_LOADED_AUTHORIZE] * count
    return [_authorize_result(item) for item in reply[1:]]


def _settle_result(reply: list[Any]) -> SettleResult:
    outcome = reply[0]
    if outcome == 3:
        return SettleResult(
            Outcome.DONE,
            overspend=int(reply[1]),
            key=Counts(int(reply[2]), int(reply[3]), int(reply[4])),
            global_=Counts(int(reply[5]), int(reply[6]), int(reply[7])),
            key_spent_before=int(reply[8]),
            global_spent_before=int(reply[9]),
            reserved=reply[10] == 1,
        )
    if outcome == 2:
        return SettleResult(
            Outcome.DONE,
            already_settled=True,
            key=Counts(int(reply[1]), int(reply[2]), int(reply[3])),
            global_=Counts(int(reply[4]), int(reply[5]), int(reply[6])),
        )
    return SettleResult(Outcome.STALE, stale=_stale(reply))


class BudgetStore:
    """Thin adapter over the scripts; knows key names, not budget policy."""

    def __init__(self, redis: RedisClient, *, default: ScopeConfig) -> None:
        self.redis = redis
        self.default = default
        self._authorize = redis.register_script(lua.AUTHORIZE)
        self._key_ids = redis.register_script(lua.RESERVATION_KEY_IDS)
        self._settle = redis.register_script(lua.SETTLE)
        self._settle_spend = redis.register_script(lua.SETTLE_SPEND)
        self._settle_handoff = redis.register_script(lua.SETTLE_HANDOFF)
        self._release = redis.register_script(lua.RELEASE)
        self._sweep = redis.register_script(lua.SWEEP)
        self._read_counters = redis.register_script(lua.READ_COUNTERS)
        self._read_configs = redis.register_script(lua.READ_CONFIGS)
        self._set_scope = redis.register_script(lua.SET_SCOPE)
        self._reconcile = redis.register_script(lua.RECONCILE)
        self._finish = redis.register_script(lua.FINISH_RECONCILE)
        self._loaded_elsewhere = redis.register_script(lua.LOADED_ELSEWHERE)
        self._begin_rebuild = redis.register_script(lua.BEGIN_REBUILD)
        self._set_disabled = redis.register_script(lua.SET_DISABLED)

    @property
    def is_cluster(self) -> bool:
        return isinstance(self.redis, RedisCluster)

    async def authorize_many(
        self, entries: Sequence[AuthorizeEntry], *, ttl_ms: int, record_ttl_ms: int
    ) -> list[AuthorizeResult]:
        """Decides every entry in one script run (each atomically, in order); all NOT_LOADED
        after a FLUSHALL."""
        keys, args = self._authorize_call(entries, ttl_ms, record_ttl_ms)
        reply: list[Any] = await self._authorize(keys=keys, args=args)
        return _authorize_results(reply, len(entries))

    def _authorize_call(
        self, entries: Sequence[AuthorizeEntry], ttl_ms: int, record_ttl_ms: int
    ) -> tuple[list[str], list[Any]]:
        table = _KeyTable()
        items = [
            (
                entry.request_id,
                entry.key_id,
                str(entry.estimate),
                table(config_key(key_scope(entry.key_id))),
                table(GLOBAL_CONFIG_KEY),
                table(entry.key.counter),
                table(entry.global_.counter),
                table(RESERVATION_PREFIX + entry.request_id),
                entry.key.config.period,
                entry.key.config.tz,
                entry.global_.config.period,
                entry.global_.config.tz,
                entry.key.expire_text,
                entry.global_.expire_text,
            )
            for entry in entries
        ]
        args = [
            self.default.period,
            self.default.tz,
            RESERVATION_PREFIX,
            SWEEP_LIMIT,
            ttl_ms,
            record_ttl_ms,
            _json(items),
        ]
        return table.keys, args

    async def request_path_many(
        self,
        authorize: Sequence[AuthorizeEntry],
        settle: Sequence[SettleEntry],
        *,
        ttl_ms: int,
        record_ttl_ms: int,
        settled_ttl_ms: int,
        authorize_chunk: int,
        settle_chunk: int,
    ) -> tuple[list[AuthorizeResult], list[SettleResult]]:
        """Authorizes and settles concurrent request-path calls in one round trip: one AUTHORIZE
        run per `authorize_chunk` entries and one SETTLE run per `settle_chunk`, all in one
        pipeline (a lone run is sent as itself). Each entry is decided atomically, as
        `authorize_many` and `settle_many` decide it."""
        calls: list[tuple[AsyncScript, list[str], list[Any]]] = []
        for start in range(0, len(authorize), authorize_chunk):
            keys, args = self._authorize_call(authorize[start : start + authorize_chunk], ttl_ms, record_ttl_ms)
            calls.append((self._authorize, keys, args))
        for start in range(0, len(settle), settle_chunk):
            keys, args = self._settle_call(settle[start : start + settle_chunk], settled_ttl_ms)
            calls.append((self._settle, keys, args))
        if len(calls) == 1:
            script, keys, args = calls[0]
            replies: list[Any] = [await script(keys=keys, args=args)]
        else:
            replies = await self._pipelined_scripts(calls)
        authorized: list[AuthorizeResult] = []
        settled: list[SettleResult] = []
        runs = iter(replies)
        for start, reply in zip(range(0, len(authorize), authorize_chunk), runs, strict=False):
            authorized += _authorize_results(reply, len(authorize[start : start + authorize_chunk]))
        for start, reply in zip(range(0, len(settle), settle_chunk), runs, strict=False):
            if not int(reply[0]):
                settled += [NOT_LOADED_SETTLE] * len(settle[start : start + settle_chunk])
            else:
                settled += [_settle_result(item) for item in reply[1:]]
        return authorized, settled

    async def _pipelined_scripts(self, calls: Sequence[tuple[AsyncScript, list[str], list[Any]]]) -> list[Any]:
        """Runs each (script, keys, args) in one pipeline (one round trip), in order; loads the
        scripts a Redis without them refused (NOSCRIPT: those runs did not happen) and runs those
        again."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for index in todo:
                    script, keys, args = calls[index]
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                answers = await pipe.execute(raise_on_error=False)
            missing = []
            for index, answer in zip(todo, answers, strict=True):
                if isinstance(answer, NoScriptError) and attempt == 0:
                    missing.append(index)
                elif isinstance(answer, Exception):
                    raise answer
                else:
                    replies[index] = answer
            if not missing:
                break
            for script in {id(calls[index][0]): calls[index][0] for index in missing}.values():
                script.sha = await self.redis.script_load(script.script)
            todo = missing
        return replies

    async def authorize(
        self,
        *,
        request_id: str,
        key_id: str,
        estimate: int,
        key: ScopeCall,
        global_: ScopeCall,
        ttl_ms: int,
        record_ttl_ms: int,
    ) -> AuthorizeResult:
        entry = AuthorizeEntry(request_id, key_id, estimate, key, global_)
        (result,) = await self.authorize_many([entry], ttl_ms=ttl_ms, record_ttl_ms=record_ttl_ms)
        return result

    async def settle_many(
        self, entries: Sequence[SettleEntry], *, settled_ttl_ms: int, chunk: int = 100
    ) -> list[SettleResult]:
        """Settles every entry (each atomically, in order): one script run per `chunk` entries,
        all chunks in one pipeline, so one round trip whatever the size (a script blocks Redis
        while it runs, hence the chunks). NOT_LOADED for a chunk run after a FLUSHALL. Builds and
        reads chunk by chunk, letting other calls run in between (a batch may have thousands)."""
        calls = []
        for start in range(0, len(entries), chunk):
            if start:
                await asyncio.sleep(0)
            calls.append(self._settle_call(entries[start : start + chunk], settled_ttl_ms))
        if len(calls) == 1:
            keys, args = calls[0]
            replies: list[Any] = [await self._settle(keys=keys, args=args)]
        else:
            replies = await self._pipelined(self._settle, calls)
        results: list[SettleResult] = []
        for start, reply in zip(range(0, len(entries), chunk), replies, strict=True):
            if start:
                await asyncio.sleep(0)
            if not int(reply[0]):
                results += [NOT_LOADED_SETTLE] * len(entries[start : start + chunk])
            else:
                results += [_settle_result(item) for item in reply[1:]]
        return results

    def _settle_call(self, entries: Sequence[SettleEntry], settled_ttl_ms: int) -> tuple[list[str], list[Any]]:
        table = _KeyTable((LOADED_KEY, EXPIRY_KEY, REBUILD_KEY, REBUILD_LOG_KEY))
        items = [
            (
                entry.request_id,
                entry.key_id,
                str(entry.actual),
                table(config_key(key_scope(entry.key_id))),
                table(GLOBAL_CONFIG_KEY),
                table(entry.key.counter),
                table(entry.global_.counter),
                table(RESERVATION_PREFIX + entry.request_id),
                table(entry.provider_hash),
                entry.key.config.period,
                entry.key.config.tz,
                entry.global_.config.period,
                entry.global_.config.tz,
                entry.key.expire_text,
                entry.global_.expire_text,
                entry.provider,
                str(entry.transaction_id),
            )
            for entry in entries
        ]
        return table.keys, [self.default.period, self.default.tz, settled_ttl_ms, _json(items), HANDOFF_PREFIX]

    async def settle_spend(
        self, chunks: Sequence[SpendChunk], *, settled_ttl_ms: int, unreserved_ttl_ms: int
    ) -> list[SpendResult]:
        """Settles every chunk (each in one script run, its items atomically and in order), all
        chunks in one pipeline (one round trip). A request id settled with no reservation record
        is remembered for `unreserved_ttl_ms`, the others for `settled_ttl_ms`."""
        calls = []
        for number, chunk in enumerate(chunks):
            if number:
                await asyncio.sleep(0)
            calls.append(self._spend_call(chunk, settled_ttl_ms, unreserved_ttl_ms))
        replies = await self._pipelined(self._settle_spend, calls)
        return [_spend_result(reply) for reply in replies]

    def _spend_call(
        self, chunk: SpendChunk, settled_ttl_ms: int, unreserved_ttl_ms: int
    ) -> tuple[list[str], list[Any]]:
        table = _KeyTable((LOADED_KEY, EXPIRY_KEY, REBUILD_KEY, REBUILD_LOG_KEY))
        groups = self._group_tables(chunk, table)
        items = [
            (i.request_id, str(i.actual), i.key_group + 1, i.global_group + 1, i.provider, str(i.transaction_id))
            for i in chunk.items
        ]
        args = [self.default.period, self.default.tz, settled_ttl_ms, RESERVATION_PREFIX, unreserved_ttl_ms]
        return table.keys, [*args, *groups, _json(items), HANDOFF_PREFIX]

    @staticmethod
    def _group_tables(chunk: SpendChunk, table: _KeyTable) -> tuple[str, str]:
        """The key and global groups of a chunk as the spend scripts take them (JSON)."""
        key_groups = [
            (
                group.key_id,
                table(config_key(key_scope(group.key_id))),
                table(group.call.counter),
                group.call.config.period,
                group.call.config.tz,
                group.call.expire_text,
            )
            for group in chunk.key_groups
        ]
        global_groups = [
            (
                table(GLOBAL_CONFIG_KEY),
                table(group.call.counter),
                table(group.provider_hash),
                group.call.config.period,
                group.call.config.tz,
                group.call.expire_text,
            )
            for group in chunk.global_groups
        ]
        return _json(key_groups), _json(global_groups)

    async def settle_handoff(
        self,
        groups: SpendChunk,
        item_chunks: Sequence[tuple[int, HandoffColumns]],
        *,
        handoff_id: str,
        remember_ms: int,
    ) -> list[SpendResult]:
        """Settles ingest's hand-off (lua.SETTLE_HANDOFF): `groups` holds the spend groups (one
        SpendItem each, with no request id) and their counter groups; each item chunk (its
        number in the hand-off, and its items as three columns: request ids, actuals, spend group
        indexes) is one script run, all in one pipeline. A chunk applied before (same
        `handoff_id` and number) changes nothing. The chunk, and each request it settles or finds
        settled, is remembered for `remember_ms` from now (a request's record no longer)."""
        table = _KeyTable((LOADED_KEY, EXPIRY_KEY, REBUILD_KEY, REBUILD_LOG_KEY))
        key_groups, global_groups = self._group_tables(groups, table)
        spend_groups = _json(
            [(i.key_group + 1, i.global_group + 1, i.provider, str(i.transaction_id)) for i in groups.items]
        )
        head = [self.default.period, self.default.tz, remember_ms, RESERVATION_PREFIX, HANDOFF_PREFIX]
        calls = [
            (
                table.keys,
                [*head, f"{HANDOFF_DONE_PREFIX}{handoff_id}:{number}", key_groups, global_groups, spend_groups,
                 _json(columns)],
            )
            for number, columns in item_chunks
        ]  # fmt: skip
        replies = await self._pipelined(self._settle_handoff, calls)
        return [_spend_result(reply) for reply in replies]

    async def _pipelined(self, script: AsyncScript, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """Runs `script` once per (keys, args) in one pipeline (see `_pipelined_scripts`)."""
        return await self._pipelined_scripts([(script, keys, args) for keys, args in calls])

    async def settle(
        self,
        *,
        request_id: str,
        key_id: str,
        actual: int,
        key: ScopeCall,
        global_: ScopeCall,
        provider_hash: str,
        provider: str,
        settled_ttl_ms: int,
    ) -> SettleResult:
        entry = SettleEntry(request_id, key_id, actual, key, global_, provider_hash, provider)
        (result,) = await self.settle_many([entry], settled_ttl_ms=settled_ttl_ms)
        return result

    async def reservation_key_id(self, request_id: str) -> str | None:
        value = await self.redis.hget(reservation_key(request_id), "k")
        return None if value is None else _text(value)

    async def reservation_key_ids(self, request_ids: Sequence[str]) -> list[str | None]:
        """The key id of each request id's reservation (None without one), in one round trip."""
        if not request_ids:
            return []
        found: list[Any] = await self._key_ids(keys=[reservation_key(r) for r in request_ids], args=[])
        return [_text(value) or None for value in found]

    async def release(self, request_id: str) -> bool:
        released = await self._release(keys=[reservation_key(request_id), EXPIRY_KEY], args=[request_id])
        return bool(int(released))

    async def sweep(self, limit: int = 1000) -> int:
        return int(await self._sweep(keys=[EXPIRY_KEY], args=[RESERVATION_PREFIX, limit]))

    async def read_counters(self, counter_keys: Sequence[str]) -> list[tuple[int, int]]:
        """(settled, reserved) per counter key."""
        if not counter_keys:
            return []
        flat: list[Any] = await self._read_counters(keys=list(counter_keys), args=[])
        return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def read_configs(self, scopes: Sequence[str]) -> list[tuple[ScopeConfig | None, int, bool]]:
        """(period config or None when unset, limit (-1 unlimited), disabled) per scope."""
        if not scopes:
            return []
        flat: list[Any] = await self._read_configs(keys=[config_key(s) for s in scopes], args=[])
        out: list[tuple[ScopeConfig | None, int, bool]] = []
        for i in range(0, len(flat), 4):
            per, tz, lim, dis = (_text(v) for v in flat[i : i + 4])
            out.append((ScopeConfig(per, tz) if per else None, int(lim) if lim else -1, dis == "1"))
        return out

    async def read_providers(self, provider_hash: str) -> dict[str, int]:
        raw: dict[Any, Any] = await self.redis.hgetall(provider_hash)
        return {_text(k): int(v) for k, v in raw.items()}

    async def set_scope(self, scope: str, limit: int | None, call: ScopeCall, spend: int | None) -> int:
        """Writes a scope's config; with `spend`, also its current settled spend. Returns the old spend."""
        before = await self._set_scope(
            keys=[config_key(scope), call.counter],
            args=[
                "" if limit is None else limit,
                call.config.period,
                call.config.tz,
                -1 if spend is None else spend,
                call.expire_at,
            ],
        )
        return int(before)

    async def set_disabled(self, scope: str, disabled: bool) -> None:
        await self._set_disabled(keys=[config_key(scope), DISABLED_KEY], args=["1" if disabled else "0", scope])

    async def disabled_scopes(self) -> set[str]:
        """The scopes disabled in Redis."""
        return {_text(member) for member in await self.redis.smembers(DISABLED_KEY)}

    async def open_reservations(self, global_counter: str, now_ms: int) -> tuple[int, int]:
        """Reservations not yet settled, released or expired (by their expiry time, so ones a
        sweep has not reached yet do not count), and what the global counter holds reserved."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(EXPIRY_KEY, f"({now_ms}", "+inf")
            pipe.hget(global_counter, "r")
            count, reserved = await pipe.execute()
        return int(count), int(reserved or 0)

    async def is_loaded(self) -> bool:
        return bool(await self.redis.exists(LOADED_KEY))

    async def begin_rebuild(self, until_ms: int) -> None:
        """Marks a counter rebuild as running (until it finishes, or `until_ms` at the latest):
        settlements from now on are logged for it."""
        await self._begin_rebuild(keys=[REBUILD_KEY, REBUILD_LOG_KEY], args=[until_ms])

    async def reconcile_chunk(
        self, scopes: Sequence[tuple[str, int | None, ScopeCall, bool, int]], snapshot: str
    ) -> int:
        """Rewrites (scope, limit, call, disabled, spend) entries, the spend read in the database
        `snapshot`; returns the drift in micro-units."""
        keys: list[str] = [REBUILD_KEY, REBUILD_LOG_KEY, DISABLED_KEY]
        args: list[str | int] = [snapshot]
        for scope, limit, call, disabled, spend in scopes:
            keys += [config_key(scope), call.counter]
            args += [
                "" if limit is None else limit,
                call.config.period,
                call.config.tz,
                "1" if disabled else "0",
                spend,
                call.expire_at,
            ]
        if len(keys) == 3:
            return 0
        reply: list[Any] = await self._reconcile(keys=keys, args=args)
        return int(reply[0])

    async def loaded_elsewhere(self) -> bool:
        """Whether the counters were loaded into another Redis process than the one answering now
        (a restart, maybe from an append-only file lacking the last writes; a failover)."""
        return bool(await self._loaded_elsewhere(keys=[LOADED_KEY]))

    async def finish_reconcile(
        self, marker: str, provider_hash: str, expire_at: int, providers: dict[str, int], snapshot: str
    ) -> None:
        args: list[str | int] = [marker, expire_at, snapshot]
        for name, spend in providers.items():
            args += [name, spend]
        await self._finish(keys=[LOADED_KEY, provider_hash, REBUILD_KEY, REBUILD_LOG_KEY], args=args)
