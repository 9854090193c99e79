"""Counter rebuilds from the database while spend is being settled, on the budget store's
scripts against a real Redis: no spend counted twice, none lost. Ingest hands spend to budget
after its commit, so a settlement can arrive after a rebuild whose snapshot already held it, or
between a rebuild's snapshot and its rewrite of a counter. (The same through the service:
tests/test_budget.py, test_spend_settled_after_a_rebuild_that_counted_it_is_not_doubled.)"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.budget.periods import Period, PeriodKind
from services.budget.store import (
    PREFIX,
    REBUILD_LOG_KEY,
    BudgetStore,
    GlobalGroup,
    KeyGroup,
    Outcome,
    ScopeCall,
    ScopeConfig,
    SettleEntry,
    SpendChunk,
    SpendItem,
    key_scope,
)
from tally.devstack import Postgres, Redis, free_port

USD = 1_000_000
GLOBAL = "global"
MONTHLY = ScopeConfig("monthly", "UTC")
PROVIDERS = PREFIX + "p:monthly:UTC:0"


@pytest.fixture
async def store(infra: tuple[Postgres, Redis, Path]) -> AsyncIterator[BudgetStore]:
    server = Redis(infra[2] / f"rebuild-{secrets.token_hex(3)}", free_port())
    server.start()
    client = aioredis.Redis.from_url(server.url)
    try:
        yield BudgetStore(client, default=MONTHLY)
    finally:
        await client.aclose()
        server.stop()


def _call(scope: str) -> ScopeCall:
    return ScopeCall(MONTHLY, f"{PREFIX}c:{scope}:monthly:UTC:0", 0)


async def _rebuild(
    store: BudgetStore, snapshot: str, key_id: str, key_spend: int, global_spend: int, providers: dict[str, int]
) -> None:
    await store.begin_rebuild(int(time.time() * 1000) + 60_000)
    await store.reconcile_chunk([(GLOBAL, None, _call(GLOBAL), False, global_spend)], snapshot)
    await store.reconcile_chunk([(key_scope(key_id), 100 * USD, _call(key_scope(key_id)), False, key_spend)], snapshot)
    await store.finish_reconcile("now", PROVIDERS, 0, providers, snapshot)


async def _settle(
    store: BudgetStore, script: str, key_id: str, *settlements: tuple[int, int], provider: str = "p"
) -> None:
    """Settles (amount, transaction id) pairs of one key in one call: per item (lua.SETTLE, as
    Settle does), as a batch (lua.SETTLE_SPEND, as SettleBatch's items), or as ingest's hand-off
    (lua.SETTLE_HANDOFF, SettleBatch's compact form: a spend group per transaction)."""
    key, global_ = _call(key_scope(key_id)), _call(GLOBAL)
    if script == "SETTLE":
        entries = [
            SettleEntry(uuid.uuid4().hex, key_id, amount, key, global_, PROVIDERS, provider, transaction_id)
            for amount, transaction_id in settlements
        ]
        results = await store.settle_many(entries, settled_ttl_ms=60_000)
        assert all(result.key is not None for result in results)
        return
    period = Period(PeriodKind.MONTHLY, datetime.fromtimestamp(0, UTC), None)
    items = [
        SpendItem(uuid.uuid4().hex, amount, 0, 0, provider, transaction_id) for amount, transaction_id in settlements
    ]
    groups = (KeyGroup(key_id, key, period),), (GlobalGroup(global_, period, PROVIDERS),)
    if script == "SETTLE_SPEND":
        (result,) = await store.settle_spend(
            [SpendChunk(*groups, items)], settled_ttl_ms=60_000, unreserved_ttl_ms=60_000
        )
    else:
        transactions = sorted({transaction_id for _, transaction_id in settlements})
        spend_groups = [SpendItem("", 0, 0, 0, provider, transaction_id) for transaction_id in transactions]
        handed = (
            [i.request_id for i in items],
            [i.actual for i in items],
            [transactions.index(i.transaction_id) for i in items],
        )
        (result,) = await store.settle_handoff(
            SpendChunk(*groups, spend_groups),
            [(0, handed)],
            handoff_id=uuid.uuid4().hex,
            remember_ms=60_000,
        )
    assert (result.outcome, result.settled) == (Outcome.DONE, len(items))


async def _spent(store: BudgetStore, scope: str) -> int:
    return int(await store.redis.hget(_call(scope).counter, "s") or 0)


@pytest.mark.parametrize("script", ["SETTLE", "SETTLE_SPEND", "SETTLE_HANDOFF"])
async def test_settlements_around_a_rebuild_count_exactly_once(store: BudgetStore, script: str) -> None:
    budgeted, unbudgeted = str(uuid.uuid4()), str(uuid.uuid4())
    # The first rebuild: the database (snapshot 100:100:, every transaction below 100 committed) has nothing.
    await _rebuild(store, "100:100:", budgeted, 0, 0, {})

    # Transaction 90 committed before that snapshot: the rebuild counted it already.
    await _settle(store, script, budgeted, (7, 90))
    assert (await _spent(store, key_scope(budgeted)), await _spent(store, GLOBAL)) == (0, 0)
    # ... except in counters the rebuild did not rewrite (a key with no budget).
    await _settle(store, script, unbudgeted, (5, 90))
    assert await _spent(store, key_scope(unbudgeted)) == 5
    # Transaction 150 is newer than the snapshot: counted.
    await _settle(store, script, budgeted, (11, 150))
    assert (await _spent(store, key_scope(budgeted)), await _spent(store, GLOBAL)) == (11, 11)

    # A second rebuild, its snapshot 210:220:212 (below 210 committed, 212 still running, 220 on not begun).
    snapshot = "210:220:212"
    await store.begin_rebuild(int(time.time() * 1000) + 60_000)
    # In one call: in the snapshot; running at the snapshot (not in it); a direct settle (no
    # transaction: not in the database).
    await _settle(store, script, budgeted, (100, 205), (1_000, 212), (10_000, 0))
    # The database in the snapshot: the key's 11 + 7 + 100 (transactions 150, 90 and 205), and
    # globally also the other key's 5 (transaction 90).
    key_db = 11 + 7 + 100
    global_db = key_db + 5
    await store.reconcile_chunk([(GLOBAL, None, _call(GLOBAL), False, global_db)], snapshot)
    await store.reconcile_chunk([(key_scope(budgeted), 100 * USD, _call(key_scope(budgeted)), False, key_db)], snapshot)
    assert await _spent(store, key_scope(budgeted)) == key_db + 1_000 + 10_000
    await _settle(store, script, budgeted, (100_000, 208))  # in the snapshot, settled after the rewrite
    await _settle(store, script, budgeted, (1_000_000, 230))  # after the snapshot
    await store.finish_reconcile("now", PROVIDERS, 0, {"p": key_db}, snapshot)

    expected = key_db + 1_000 + 10_000 + 1_000_000
    assert (await _spent(store, key_scope(budgeted)), await _spent(store, GLOBAL)) == (expected, expected + 5)
    assert int(await store.redis.hget(PROVIDERS, "p") or 0) == expected
    assert await store.redis.llen(REBUILD_LOG_KEY) == 0  # the rebuild is over: nothing logged any more
    await _settle(store, script, budgeted, (3, 231))
    assert await store.redis.llen(REBUILD_LOG_KEY) == 0
    assert await _spent(store, key_scope(budgeted)) == expected + 3


async def test_a_batch_for_a_changed_period_writes_nothing_and_names_the_scope(store: BudgetStore) -> None:
    """SETTLE_SPEND checks every group's period first: a key whose budget became daily since the
    caller cached it gets its new configuration back, and no item of the chunk is settled."""
    key_id = str(uuid.uuid4())
    await _rebuild(store, "100:100:", key_id, 0, 0, {})
    daily = ScopeConfig("daily", "UTC")
    await store.set_scope(key_scope(key_id), 10 * USD, ScopeCall(daily, f"{PREFIX}c:{key_scope(key_id)}:d", 0), None)
    period = Period(PeriodKind.MONTHLY, datetime.fromtimestamp(0, UTC), None)
    chunk = SpendChunk(
        [KeyGroup(key_id, _call(key_scope(key_id)), period)],
        [GlobalGroup(_call(GLOBAL), period, PROVIDERS)],
        [SpendItem(uuid.uuid4().hex, 5, 0, 0, "p", 150)],
    )
    (result,) = await store.settle_spend([chunk], settled_ttl_ms=60_000, unreserved_ttl_ms=60_000)
    assert result.outcome == Outcome.STALE
    assert list(result.stale) == [(key_scope(key_id), daily)]
    assert (await _spent(store, key_scope(key_id)), await _spent(store, GLOBAL)) == (0, 0)
    assert await store.redis.keys(f"{PREFIX}r:*") == []
