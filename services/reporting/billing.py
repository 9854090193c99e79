"""Billing export (POST /analytics/billing-export): one JSON document per cycle.

Sums come from the rollups exactly as analytics reads them (whole UTC days from the daily rollup,
the hours at either edge from the hourly one, always `sum() GROUP BY` because the rollups are
append-only), so the totals reconcile to the micro-unit. All money is integer micro-units until
it is printed as an exact decimal string with six places. Taxes are computed per line item and
billing entity, each rounded once to the micro-unit (half-even), and every total is the sum of
its lines, so the document adds up exactly. Nothing in it depends on when it was produced: the
same request gives the same bytes (and `checksum`) until costs are recalculated.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from services.reporting.windows import iso, month_window
from tally.reporting.v1 import reporting_pb2
from tally.runtime.config import Settings
from tally.runtime.db import Database
from tally.runtime.errors import InvalidArgument
from tally.runtime.validation import Violations
from tally.runtime.windows import DAY, HOUR, Window, ceil_to, floor_to, parse_period

GROUPS = ("virtual_key", "provider", "model")
SUMS = (
    "requests", "successes", "failures", "input_tokens", "output_tokens", "cached_read_tokens",
    "cache_write_tokens", "reasoning_tokens", "images", "cost_micros", "unpriced_requests", "provider_cost_requests",
)  # fmt: skip
MICRO = Decimal(1_000_000)


def money(micros: int) -> str:
    """Micro-units as an exact USD decimal string with six places ("12.345678")."""
    return str((Decimal(micros) / MICRO).quantize(Decimal("0.000001")))


def rate_text(rate: Decimal) -> str:
    return str(rate.quantize(Decimal("0.000001")))


@dataclass(frozen=True)
class BillingPlan:
    window: Window
    group_by: str
    billing_cycle: str
    period: str
    include_metadata: bool
    include_tax: bool


def plan_billing(
    request: reporting_pb2.ExportBillingRequest, settings: Settings, now: datetime | None = None
) -> BillingPlan:
    violations = Violations()
    fmt = request.format.strip().lower() or "json"
    if fmt != "json":
        violations.add("format", f"must be json, got {request.format[:32]!r}")
    group_by = request.group_by.strip().lower() or "virtual_key"
    if group_by not in GROUPS:
        violations.add("groupBy", f"must be virtual_key, provider or model, got {request.group_by[:32]!r}")
    period = request.period.strip().lower()
    cycle = request.billing_cycle.strip()
    now = now or datetime.now(UTC)
    window = Window(now, now)
    try:
        if cycle:
            if period not in ("", "monthly"):
                violations.add("period", 'must be "monthly" (or empty) with billingCycle')
            window = month_window(cycle, "billingCycle", settings.zone)
            period = "monthly"
        elif period == "monthly":
            # Without a cycle: the last complete month in the configured timezone.
            local = now.astimezone(settings.zone)
            previous = (local.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
            window = month_window(previous, "billingCycle", settings.zone)
            cycle = previous
        elif period:
            _, span = parse_period(period, "period", max_days=settings.reporting_export_max_days)
            end = floor_to(now, HOUR)  # complete hours only, so the window is exact and repeatable
            window = Window(end - span, end)
        else:
            violations.add("billingCycle", 'required: a month "YYYY-MM" (or a period such as "30d")')
    except InvalidArgument as exc:
        for violation in exc.violations:
            violations.add(violation.field, violation.description)
    violations.raise_if_any()
    return BillingPlan(
        window=window,
        group_by=group_by,
        billing_cycle=cycle,
        period=period,
        include_metadata=request.include_metadata,
        include_tax=request.include_tax_calculations,
    )


def rollup_union(window: Window) -> tuple[str, dict[str, Any]]:
    """FROM item `r`: the rollup rows of exactly `[start, end)` (hour-aligned edges)."""
    d0, d1 = ceil_to(window.start, DAY), floor_to(window.end, DAY)
    if d0 >= d1:
        d0 = d1 = window.end
    source = """(
        SELECT * FROM usage_rollup_daily WHERE bucket >= %(d0)s AND bucket < %(d1)s
        UNION ALL
        SELECT * FROM usage_rollup_hourly WHERE bucket >= %(ws)s AND bucket < %(d0)s
        UNION ALL
        SELECT * FROM usage_rollup_hourly WHERE bucket >= %(d1)s AND bucket < %(we)s
    ) AS r"""
    return source, {"ws": floor_to(window.start, HOUR), "we": ceil_to(window.end, HOUR), "d0": d0, "d1": d1}


@dataclass(frozen=True)
class Entity:
    entity_id: str
    name: str
    tax_name: str
    rate: Decimal
    inclusive: bool


@dataclass
class Line:
    key: tuple[str, ...]
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SUMS, 0))
    audio_seconds: Decimal = Decimal(0)
    # entity id ("" = none) -> cost micros
    cost_by_entity: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def tax_parts(cost_micros: int, entity: Entity) -> tuple[int, int, int]:
    """(net, tax, gross) micro-units of `cost_micros` under the entity's rate."""
    cost = Decimal(cost_micros)
    if entity.inclusive:
        tax = int((cost * entity.rate / (1 + entity.rate)).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
        return cost_micros - tax, tax, cost_micros
    tax = int((cost * entity.rate).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    return cost_micros, tax, cost_micros + tax


class BillingExporter:
    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings

    async def document(self, plan: BillingPlan) -> dict[str, Any]:
        source, params = rollup_union(plan.window)
        sums = ", ".join(f"sum(r.{c})::bigint AS {c}" for c in SUMS)
        rows = await self._db.fetch_all(
            f"""SELECT r.key_id, r.provider, r.model, {sums}, sum(r.audio_seconds) AS audio_seconds
                FROM {source} GROUP BY r.key_id, r.provider, r.model
                ORDER BY r.key_id, r.provider, r.model""",  # noqa: S608
            params,
        )
        key_ids = sorted({row["key_id"] for row in rows})
        keys = {
            row["key_id"]: row
            for row in await self._db.fetch_all(
                """SELECT v.key_id, v.key_name, v.is_test, m.entity_id
                   FROM virtual_keys v LEFT JOIN billing_entity_keys m ON m.key_id = v.key_id
                   WHERE v.key_id = ANY(%s)""",
                (key_ids,),
            )
        }
        entities = {
            row["entity_id"]: Entity(
                row["entity_id"], row["name"], row["tax_name"], Decimal(row["tax_rate"]), row["tax_inclusive"]
            )
            for row in await self._db.fetch_all("SELECT * FROM billing_entities ORDER BY entity_id")
        }
        prices: dict[tuple[str, str], dict[str, Any]] = {}
        if plan.include_metadata and plan.group_by == "model":
            for row in await self._db.fetch_all(
                """SELECT DISTINCT ON (provider, model) provider, model, effective_from, input_per_million,
                          output_per_million, cached_read_per_million, cache_write_per_million,
                          reasoning_per_million, per_image, per_audio_second, per_request
                   FROM model_prices WHERE effective_from < %s
                   ORDER BY provider, model, effective_from DESC""",
                (plan.window.end,),
            ):
                prices[(row["provider"], row["model"])] = {
                    "effectiveFrom": iso(row["effective_from"]),
                    **{
                        _camel(name): str(Decimal(row[name]).normalize())
                        for name in row
                        if name.endswith(("_million", "per_image", "per_audio_second", "per_request"))
                    },
                }
        default_entity = "default" if "default" in entities else ""
        lines: dict[tuple[str, ...], Line] = {}
        for row in rows:
            key_id: uuid.UUID = row["key_id"]
            if plan.group_by == "virtual_key":
                group: tuple[str, ...] = (str(key_id),)
            elif plan.group_by == "provider":
                group = (row["provider"],)
            else:
                group = (row["provider"], row["model"])
            line = lines.setdefault(group, Line(group))
            for column in SUMS:
                line.sums[column] += int(row[column])
            line.audio_seconds += Decimal(row["audio_seconds"])
            key = keys.get(key_id)
            entity_id = (key["entity_id"] if key else None) or default_entity
            line.cost_by_entity[entity_id] += int(row["cost_micros"])
        items = []
        totals = dict.fromkeys(SUMS, 0)
        total_audio = Decimal(0)
        total_net = total_tax = total_gross = 0
        summary: dict[str, dict[str, int]] = defaultdict(lambda: {"taxable": 0, "tax": 0})
        ordered = sorted(lines.values(), key=lambda line: (-line.sums["cost_micros"], line.key))
        for line in ordered:
            item = self._item(plan, line, keys, prices)
            for column in SUMS:
                totals[column] += line.sums[column]
            total_audio += line.audio_seconds
            if plan.include_tax:
                net = tax = gross = 0
                tax_lines = []
                for entity_id in sorted(line.cost_by_entity):
                    cost = line.cost_by_entity[entity_id]
                    entity = entities.get(entity_id)
                    if entity is None:
                        net, gross = net + cost, gross + cost
                        continue
                    part_net, part_tax, part_gross = tax_parts(cost, entity)
                    net, tax, gross = net + part_net, tax + part_tax, gross + part_gross
                    summary[entity_id]["taxable"] += cost
                    summary[entity_id]["tax"] += part_tax
                    tax_lines.append(
                        {
                            "entityId": entity.entity_id,
                            "entityName": entity.name,
                            "taxName": entity.tax_name,
                            "rate": rate_text(entity.rate),
                            "inclusive": entity.inclusive,
                            "taxableAmount": money(cost),
                            "tax": money(part_tax),
                        }
                    )
                item["tax"] = {"net": money(net), "tax": money(tax), "gross": money(gross), "lines": tax_lines}
                total_net, total_tax, total_gross = total_net + net, total_tax + tax, total_gross + gross
            items.append(item)
        document: dict[str, Any] = {
            "billingCycle": plan.billing_cycle,
            "period": plan.period,
            "periodStart": iso(plan.window.start),
            "periodEnd": iso(plan.window.end),
            "timezone": self._settings.timezone,
            "currency": "USD",
            "groupBy": plan.group_by,
            "lineItems": items,
            "totals": {
                **self._counts(totals),
                "audioSeconds": str(total_audio),
                "cost": money(totals["cost_micros"]),
                "lineItems": len(items),
            },
        }
        if plan.include_tax:
            document["totals"].update({"net": money(total_net), "tax": money(total_tax), "gross": money(total_gross)})
            document["taxSummary"] = [
                {
                    "entityId": entity_id,
                    "entityName": entities[entity_id].name,
                    "taxName": entities[entity_id].tax_name,
                    "rate": rate_text(entities[entity_id].rate),
                    "inclusive": entities[entity_id].inclusive,
                    "taxableAmount": money(part["taxable"]),
                    "tax": money(part["tax"]),
                }
                for entity_id, part in sorted(summary.items())
            ]
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        document["checksum"] = "sha256:" + hashlib.sha256(canonical).hexdigest()
        return document

    @staticmethod
    def _counts(sums: dict[str, int]) -> dict[str, Any]:
        return {
            "requests": sums["requests"],
            "successfulRequests": sums["successes"],
            "failedRequests": sums["failures"],
            "inputTokens": sums["input_tokens"],
            "outputTokens": sums["output_tokens"],
            "cachedReadTokens": sums["cached_read_tokens"],
            "cacheWriteTokens": sums["cache_write_tokens"],
            "reasoningTokens": sums["reasoning_tokens"],
            "totalTokens": sum(
                sums[c]
                for c in (
                    "input_tokens",
                    "output_tokens",
                    "cached_read_tokens",
                    "cache_write_tokens",
                    "reasoning_tokens",
                )
            ),
            "images": sums["images"],
            "unpricedRequests": sums["unpriced_requests"],
            "providerCostRequests": sums["provider_cost_requests"],
        }

    def _item(
        self,
        plan: BillingPlan,
        line: Line,
        keys: dict[uuid.UUID, dict[str, Any]],
        prices: dict[tuple[str, str], dict[str, Any]],
    ) -> dict[str, Any]:
        item: dict[str, Any] = {}
        if plan.group_by == "virtual_key":
            item["virtualKeyId"] = line.key[0]
        elif plan.group_by == "provider":
            item["provider"] = line.key[0]
        else:
            item["provider"], item["model"] = line.key
        item.update(self._counts(line.sums))
        item["audioSeconds"] = str(line.audio_seconds)
        item["cost"] = money(line.sums["cost_micros"])
        if plan.include_metadata:
            if plan.group_by == "virtual_key":
                key = keys.get(uuid.UUID(line.key[0]))
                item["metadata"] = {
                    "virtualKeyName": key["key_name"] if key else "",
                    "isTestKey": bool(key["is_test"]) if key else False,
                    "billingEntity": (key["entity_id"] if key else None) or "",
                }
            elif plan.group_by == "model":
                item["metadata"] = {"priceAtPeriodEnd": prices.get((line.key[0], line.key[1]))}
            else:
                item["metadata"] = {}
        return item


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode() + b"\n"
