"""The Redis side of budgets: reservations and counters, changed only by the Lua scripts in
`services.budget.lua`, so every decision is atomic across the key's and the global scope."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from redis.asyncio.cluster import RedisCluster

from services.budget import lua
from services.budget.periods import Period
from tally.runtime.redis import RedisClient

PREFIX = "{tally:budget}:"
LOADED_KEY = PREFIX + "loaded"
RESERVATION_PREFIX = PREFIX + "r:"
EXPIRY_KEY = PREFIX + "rexp"
EVENTS_KEY = PREFIX + "events"
GLOBAL_SCOPE = "global"
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
    key: Counts | None = None
    global_: Counts | None = None
    key_spent_before: int = 0
    global_spent_before: int = 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stale(reply: list[Any]) -> tuple[ScopeConfig, ScopeConfig]:
    return ScopeConfig(_text(reply[1]), _text(reply[2])), ScopeConfig(_text(reply[3]), _text(reply[4]))


class BudgetStore:
    """Thin adapter over the scripts; knows key names, not budget policy."""

    def __init__(self, redis: RedisClient, *, default: ScopeConfig) -> None:
        self.redis = redis
        self.default = default
        self._authorize = redis.register_script(lua.AUTHORIZE)
        self._settle = redis.register_script(lua.SETTLE)
        self._release = redis.register_script(lua.RELEASE)
        self._sweep = redis.register_script(lua.SWEEP)
        self._read_counters = redis.register_script(lua.READ_COUNTERS)
        self._read_configs = redis.register_script(lua.READ_CONFIGS)
        self._set_scope = redis.register_script(lua.SET_SCOPE)
        self._reconcile = redis.register_script(lua.RECONCILE)
        self._finish = redis.register_script(lua.FINISH_RECONCILE)

    @property
    def is_cluster(self) -> bool:
        return isinstance(self.redis, RedisCluster)

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
        reply: list[Any] = await self._authorize(
            keys=[
                LOADED_KEY,
                config_key(key_scope(key_id)),
                config_key(GLOBAL_SCOPE),
                key.counter,
                global_.counter,
                reservation_key(request_id),
                EXPIRY_KEY,
            ],
            args=[
                request_id,
                key_id,
                estimate,
                key.config.period,
                key.config.tz,
                global_.config.period,
                global_.config.tz,
                self.default.period,
                self.default.tz,
                ttl_ms,
                key.expire_at,
                global_.expire_at,
                record_ttl_ms,
                RESERVATION_PREFIX,
                SWEEP_LIMIT,
            ],
        )
        outcome = Outcome(int(reply[0]))
        if outcome is Outcome.NOT_LOADED:
            return AuthorizeResult(outcome)
        if outcome is Outcome.STALE:
            return AuthorizeResult(outcome, stale=_stale(reply))
        if outcome is Outcome.DENIED:
            return AuthorizeResult(
                outcome,
                reason=int(reply[1]),
                key_limit=int(reply[2]),
                key_committed=int(reply[3]),
                global_limit=int(reply[4]),
                global_committed=int(reply[5]),
            )
        return AuthorizeResult(
            outcome,
            expires_ms=int(reply[1]),
            key_limit=int(reply[2]),
            key_committed=int(reply[3]),
            global_limit=int(reply[4]),
            global_committed=int(reply[5]),
            replayed=bool(int(reply[6])),
        )

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
        reply: list[Any] = await self._settle(
            keys=[
                LOADED_KEY,
                config_key(key_scope(key_id)),
                config_key(GLOBAL_SCOPE),
                key.counter,
                global_.counter,
                reservation_key(request_id),
                EXPIRY_KEY,
                provider_hash,
            ],
            args=[
                request_id,
                key_id,
                actual,
                key.config.period,
                key.config.tz,
                global_.config.period,
                global_.config.tz,
                self.default.period,
                self.default.tz,
                settled_ttl_ms,
                key.expire_at,
                global_.expire_at,
                provider,
            ],
        )
        outcome = Outcome(int(reply[0]))
        if outcome is Outcome.NOT_LOADED:
            return SettleResult(outcome)
        if outcome is Outcome.STALE:
            return SettleResult(outcome, stale=_stale(reply))
        if outcome is Outcome.DENIED:
            numbers = [int(v) for v in reply[1:7]]
            return SettleResult(
                Outcome.DONE,
                already_settled=True,
                key=Counts(*numbers[0:3]),
                global_=Counts(*numbers[3:6]),
            )
        numbers = [int(v) for v in reply[1:10]]
        return SettleResult(
            outcome,
            overspend=numbers[0],
            key=Counts(*numbers[1:4]),
            global_=Counts(*numbers[4:7]),
            key_spent_before=numbers[7],
            global_spent_before=numbers[8],
        )

    async def reservation_key_id(self, request_id: str) -> str | None:
        value = await self.redis.hget(reservation_key(request_id), "k")
        return None if value is None else _text(value)

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
        if disabled:
            await self.redis.hset(config_key(scope), "dis", "1")
        else:
            await self.redis.hdel(config_key(scope), "dis")

    async def is_loaded(self) -> bool:
        return bool(await self.redis.exists(LOADED_KEY))

    async def reconcile_chunk(self, scopes: Sequence[tuple[str, int | None, ScopeCall, bool, int]]) -> int:
        """Rewrites (scope, limit, call, disabled, spend) entries; returns the drift in micro-units."""
        keys: list[str] = []
        args: list[str | int] = []
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
        if not keys:
            return 0
        reply: list[Any] = await self._reconcile(keys=keys, args=args)
        return int(reply[0])

    async def finish_reconcile(
        self, marker: str, provider_hash: str, expire_at: int, providers: dict[str, int]
    ) -> None:
        args: list[str | int] = [marker, expire_at]
        for name, spend in providers.items():
            args += [name, spend]
        await self._finish(keys=[LOADED_KEY, provider_hash], args=args)
