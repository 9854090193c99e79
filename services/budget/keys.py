"""The virtual-key registry (table `virtual_keys`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from psycopg.rows import class_row

from tally.runtime.db import Database
from tally.runtime.validation import Violations

MAX_NAME_LENGTH = 200


@dataclass(frozen=True)
class VirtualKeyRecord:
    key_id: uuid.UUID
    key_name: str
    enabled: bool
    is_test: bool
    disabled_reason: str | None
    created_at: datetime


_COLUMNS = "key_id, key_name, enabled, is_test, disabled_reason, created_at"


def validate_key_name(name: str, violations: Violations, field: str = "keyName") -> str:
    name = name.strip()
    if not name:
        violations.add(field, "required")
    elif len(name) > MAX_NAME_LENGTH:
        violations.add(field, f"must be at most {MAX_NAME_LENGTH} characters")
    return name


class VirtualKeyRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, key_id: uuid.UUID) -> VirtualKeyRecord | None:
        async with self._db.transaction() as conn, conn.cursor(row_factory=class_row(VirtualKeyRecord)) as cur:
            await cur.execute(f"SELECT {_COLUMNS} FROM virtual_keys WHERE key_id = %s", (key_id,))  # noqa: S608
            return await cur.fetchone()

    async def upsert(self, key_id: uuid.UUID, key_name: str, is_test: bool) -> VirtualKeyRecord:
        async with self._db.transaction() as conn, conn.cursor(row_factory=class_row(VirtualKeyRecord)) as cur:
            await cur.execute(
                f"""INSERT INTO virtual_keys (key_id, key_name, is_test) VALUES (%s, %s, %s)
                    ON CONFLICT (key_id) DO UPDATE
                    SET key_name = EXCLUDED.key_name, is_test = EXCLUDED.is_test, updated_at = now()
                    RETURNING {_COLUMNS}""",  # noqa: S608
                (key_id, key_name, is_test),
            )
            record = await cur.fetchone()
            assert record is not None
            return record

    async def page(self, size: int, after: tuple[str, str] | None) -> list[VirtualKeyRecord]:
        """Keys ordered by (name, id); `after` is the last (name, id) of the previous page."""
        async with self._db.transaction() as conn, conn.cursor(row_factory=class_row(VirtualKeyRecord)) as cur:
            if after is None:
                await cur.execute(
                    f"SELECT {_COLUMNS} FROM virtual_keys ORDER BY key_name, key_id LIMIT %s",  # noqa: S608
                    (size,),
                )
            else:
                await cur.execute(
                    f"""SELECT {_COLUMNS} FROM virtual_keys WHERE (key_name, key_id) > (%s, %s::uuid)
                        ORDER BY key_name, key_id LIMIT %s""",  # noqa: S608
                    (after[0], after[1], size),
                )
            return await cur.fetchall()
