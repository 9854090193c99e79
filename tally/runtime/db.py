"""The PostgreSQL pool (psycopg 3, async) and transactions bounded by the call's deadline."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from tally.runtime import context
from tally.runtime.config import Settings
from tally.runtime.errors import DeadlineExceeded

# Longest wait for a pooled connection (PostgreSQL down: fail within seconds, not at the deadline).
_POOL_WAIT_SECONDS = 5.0
# How long the pool's background reconnection tries before giving up (the next call tries anew).
_RECONNECT_SECONDS = 2.0
# Below this many milliseconds a statement cannot usefully start.
_MIN_STATEMENT_MS = 5


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"application_name": "tally"}
    if settings.database_password is not None:
        kwargs["password"] = settings.database_password.get_secret_value()
    return kwargs


class Database:
    """One pool per process. `transaction()` sets `statement_timeout` from the call's deadline."""

    def __init__(
        self,
        settings: Settings,
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        configure: Callable[[AsyncConnection[Any]], Awaitable[None]] | None = None,
    ) -> None:
        """`configure` runs once on each new connection (e.g. to create session temp tables)."""
        self._default_timeout_ms = settings.default_statement_timeout_ms
        self.pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            settings.database_url,
            kwargs=connection_kwargs(settings),
            min_size=min_size or settings.database_pool_min,
            max_size=max_size or settings.database_pool_max,
            open=False,
            name="tally",
            configure=configure,
            # A connection is checked (an empty query) when taken from the pool: after a
            # PostgreSQL restart every pooled connection is dead, and without the check the
            # next calls each failed once with "the database is unavailable" before the pool
            # replaced it.
            check=AsyncConnectionPool.check_connection,
            # Reconnection in the background gives up soon (its backoff doubles: after a 40 s
            # outage the next attempt came ~20 s after PostgreSQL was back); the next call then
            # starts a fresh attempt at once.
            reconnect_timeout=_RECONNECT_SECONDS,
        )

    async def open(self, wait_seconds: float = 30.0) -> None:
        await self.pool.open(wait=True, timeout=wait_seconds)

    async def close(self) -> None:
        await self.pool.close()

    def _timeout_ms(self) -> int:
        remaining = context.seconds_remaining()
        if remaining is None:
            return self._default_timeout_ms
        ms = int(remaining * 1000)
        if ms < _MIN_STATEMENT_MS:
            raise DeadlineExceeded("the call's deadline expired before its query could start")
        return min(ms, self._default_timeout_ms)

    @asynccontextmanager
    async def transaction(self, *, snapshot: bool = False) -> AsyncIterator[AsyncConnection[Any]]:
        """A connection inside a transaction whose statements stop at the call's deadline. With
        `snapshot`, a read-only REPEATABLE READ one: all its statements see one snapshot."""
        timeout_ms = self._timeout_ms()
        # Waiting for a connection is bounded apart from the statement: when PostgreSQL is down
        # a call fails within seconds instead of waiting out its whole deadline.
        wait = min(timeout_ms / 1000, _POOL_WAIT_SECONDS)
        async with self.pool.connection(timeout=wait) as conn, conn.transaction():
            if snapshot:  # before any query (the first query fixes the snapshot)
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            await conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(timeout_ms),))
            yield conn

    async def fetch_all(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        async with self.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params)
            return await cur.fetchall()

    async def fetch_one(self, query: str, params: Any = None) -> dict[str, Any] | None:
        async with self.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params)
            return await cur.fetchone()
