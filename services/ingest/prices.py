"""The price table (`model_prices`): validation, CRUD, bulk import, seeding, and the in-memory book."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any

from google.protobuf import json_format
from psycopg.rows import dict_row

from services.ingest.events import NAME
from services.ingest.pricing import PRICE_FIELDS, Price, PriceBook, PriceFormatError, parse_amount
from tally.ingest.v1 import ingest_pb2
from tally.runtime.db import Database
from tally.runtime.errors import NotFound

log = logging.getLogger("tally.ingest.prices")

_CAMEL = {name: name.split("_")[0] + "".join(p.capitalize() for p in name.split("_")[1:]) for name in PRICE_FIELDS}
CSV_COLUMNS = ("provider", "model", "effectiveFrom", *(_CAMEL[f] for f in PRICE_FIELDS))
_RETURNED = "price_id, provider, model, effective_from, " + ", ".join(PRICE_FIELDS)
_SELECT = f"SELECT {_RETURNED} FROM model_prices"  # noqa: S608 (constants)


@dataclass(frozen=True)
class PriceInput:
    provider: str
    model: str
    effective_from: datetime
    amounts: dict[str, Decimal]


class PriceRowError(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def parse_price(message: ingest_pb2.ModelPrice, prefix: str = "price.") -> PriceInput:
    """Validates a price message; raises PriceRowError naming the camelCase field."""
    for field, value in (("provider", message.provider), ("model", message.model)):
        if not value:
            raise PriceRowError(prefix + field, "required")
        if len(value) > 120 or not NAME.match(value):
            raise PriceRowError(prefix + field, "letters, digits and ._:/@+- only, at most 120 characters")
    if not message.HasField("effective_from"):
        raise PriceRowError(prefix + "effectiveFrom", "required")
    if message.currency not in ("", "USD"):
        raise PriceRowError(prefix + "currency", "only USD is supported")
    amounts = {}
    for name in PRICE_FIELDS:
        try:
            amounts[name] = parse_amount(getattr(message, name))
        except PriceFormatError as exc:
            raise PriceRowError(prefix + _CAMEL[name], str(exc)) from None
    return PriceInput(message.provider, message.model, message.effective_from.ToDatetime(tzinfo=UTC), amounts)


def parse_csv(text: str) -> list[tuple[int, ingest_pb2.ModelPrice | PriceRowError]]:
    """Rows of a price CSV (header: provider, model, effectiveFrom, inputPerMillion, ...)."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in ("provider", "model", "effectiveFrom") if c not in header]
    if missing:
        return [(0, PriceRowError("csv", f"header lacks {', '.join(missing)}; columns are {', '.join(CSV_COLUMNS)}"))]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if unknown:
        return [(0, PriceRowError("csv", f"unknown columns {', '.join(unknown)}"))]
    rows: list[tuple[int, ingest_pb2.ModelPrice | PriceRowError]] = []
    for number, record in enumerate(reader, start=1):
        message = ingest_pb2.ModelPrice(provider=record["provider"] or "", model=record["model"] or "")
        try:
            message.effective_from.FromJsonString((record["effectiveFrom"] or "").strip())
        except ValueError:
            rows.append((number, PriceRowError("effectiveFrom", "must be an RFC 3339 time, e.g. 2024-01-01T00:00:00Z")))
            continue
        for name in PRICE_FIELDS:
            setattr(message, name, (record.get(_CAMEL[name]) or "").strip())
        rows.append((number, message))
    return rows


def to_message(row: dict[str, Any]) -> ingest_pb2.ModelPrice:
    message = ingest_pb2.ModelPrice(
        price_id=str(row["price_id"]), provider=row["provider"], model=row["model"], currency="USD"
    )
    message.effective_from.FromDatetime(row["effective_from"])
    for name in PRICE_FIELDS:
        setattr(message, name, format(row[name].normalize(), "f"))
    return message


def _to_price(row: dict[str, Any]) -> Price:
    return Price(
        price_id=row["price_id"],
        provider=row["provider"],
        model=row["model"],
        effective_from=row["effective_from"],
        amounts={name: row[name] for name in PRICE_FIELDS},
    )


class PriceRepository:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.book = PriceBook([])
        self._signature: tuple[Any, ...] | None = None

    async def reload(self) -> None:
        rows = await self._db.fetch_all(_SELECT)
        self.book = PriceBook([_to_price(r) for r in rows])
        self._signature = await self._current_signature()

    async def _current_signature(self) -> tuple[Any, ...]:
        row = await self._db.fetch_one("SELECT count(*) AS n, max(updated_at) AS t FROM model_prices")
        assert row is not None
        return row["n"], row["t"]

    async def refresh_forever(self, interval: float) -> None:
        """Picks up changes made through another replica."""
        while True:
            await asyncio.sleep(interval)
            try:
                if await self._current_signature() != self._signature:
                    await self.reload()
                    log.info("prices reloaded", extra={"prices": self.book.size})
            except Exception:
                log.exception("price refresh failed; keeping the prices in memory")

    async def seed_defaults(self) -> int:
        """Inserts the bundled default price list once (recorded in price_seeds)."""
        document = json.loads(resources.files("services.ingest").joinpath("default_prices.json").read_text())
        inputs = []
        for entry in document["prices"]:
            message = ingest_pb2.ModelPrice()
            json_format.ParseDict(entry, message)
            inputs.append(parse_price(message))
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO price_seeds (name, prices) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (document["name"], len(inputs)),
            )
            if cur.rowcount == 0:
                return 0
            for item in inputs:
                await self._upsert(conn, item, source="default", overwrite=False)
        await self.reload()
        return len(inputs)

    async def _upsert(
        self, conn: Any, item: PriceInput, *, source: str, overwrite: bool = True
    ) -> tuple[dict[str, Any], bool]:
        columns = ", ".join(PRICE_FIELDS)
        placeholders = ", ".join(["%s"] * len(PRICE_FIELDS))
        updates = ", ".join(f"{n} = EXCLUDED.{n}" for n in PRICE_FIELDS)
        action = f"DO UPDATE SET {updates}, updated_at = now(), source = EXCLUDED.source" if overwrite else "DO NOTHING"
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"""INSERT INTO model_prices (provider, model, effective_from, source, {columns})
                    VALUES (%s, %s, %s, %s, {placeholders})
                    ON CONFLICT (provider, model, effective_from) {action}
                    RETURNING price_id, provider, model, effective_from, {columns}, (xmax = 0) AS inserted""",  # noqa: S608
                (item.provider, item.model, item.effective_from, source, *(item.amounts[n] for n in PRICE_FIELDS)),
            )
            row = await cur.fetchone()
        if row is None:
            return {}, False
        return row, bool(row["inserted"])

    async def upsert(self, item: PriceInput) -> ingest_pb2.ModelPrice:
        async with self._db.transaction() as conn:
            row, _ = await self._upsert(conn, item, source="admin")
        await self.reload()
        return to_message(row)

    async def import_prices(self, items: list[tuple[int, PriceInput]]) -> tuple[int, int]:
        """Upserts valid rows in one transaction; returns (inserted, updated)."""
        inserted = updated = 0
        async with self._db.transaction() as conn:
            for _, item in items:
                _, was_inserted = await self._upsert(conn, item, source="import")
                inserted += was_inserted
                updated += not was_inserted
        await self.reload()
        return inserted, updated

    async def delete(self, price_id: int) -> ingest_pb2.ModelPrice:
        async with self._db.transaction() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"DELETE FROM model_prices WHERE price_id = %s RETURNING {_RETURNED}",  # noqa: S608 (constants)
                (price_id,),
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"price {price_id} does not exist", metadata={"priceId": str(price_id)})
        await self.reload()
        return to_message(row)

    async def page(
        self, provider: str, model: str, at: datetime | None, size: int, after_id: int
    ) -> list[ingest_pb2.ModelPrice]:
        conditions = ["price_id > %s"]
        params: list[Any] = [after_id]
        if provider:
            conditions.append("provider = %s")
            params.append(provider)
        if model:
            conditions.append("model = %s")
            params.append(model)
        if at is not None:
            # Only the price in force at `at` for each provider and model.
            conditions.append(
                """effective_from = (SELECT max(p2.effective_from) FROM model_prices p2
                   WHERE p2.provider = model_prices.provider AND p2.model = model_prices.model
                     AND p2.effective_from <= %s)"""
            )
            params.append(at)
        query = f"{_SELECT} WHERE {' AND '.join(conditions)} ORDER BY price_id LIMIT %s"
        rows = await self._db.fetch_all(query, (*params, size))
        return [to_message(r) for r in rows]
