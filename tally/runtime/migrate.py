"""Versioned SQL migrations: `tally/runtime/migrations/NNNN_name.sql`, applied in order, once.

Applied by `python -m tally.runtime.migrate` and by every service at start (under an advisory
lock, so concurrent starts apply each file exactly once). An applied file that has since been
edited is an error: migrations are append-only.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from tally.runtime.config import Settings, load_settings
from tally.runtime.db import connection_kwargs

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# pg_advisory_lock key: any constant unique to this purpose.
_LOCK_KEY = 0x7A11_0001


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover() -> list[Migration]:
    found = []
    for entry in resources.files("tally.runtime.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions in {versions}")
    return found


class MigrationError(RuntimeError):
    pass


async def apply_migrations(settings: Settings, until: int | None = None) -> list[int]:
    """Applies pending migrations (those up to version `until`, if given); returns the versions
    applied by this call."""
    applied_now: list[int] = []
    conn = await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True, **connection_kwargs(settings))
    async with conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            cur = await conn.execute("SELECT version, checksum FROM schema_migrations")
            done: dict[int, Any] = {row[0]: row[1] for row in await cur.fetchall()}
            for migration in discover():
                if until is not None and migration.version > until:
                    break
                if migration.version in done:
                    if done[migration.version] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} changed after it was applied"
                        )
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql.encode())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                applied_now.append(migration.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def main() -> None:
    settings = load_settings()
    applied = asyncio.run(apply_migrations(settings))
    print(f"applied migrations: {applied}" if applied else "database schema up to date", file=sys.stderr)


if __name__ == "__main__":
    main()
