"""Prices and exact costs.

A price is a set of USD amounts (per million tokens of each kind, per image, per audio second,
per request) in force from `effective_from` until the next price of the same provider and model.
Cost is computed in integers: every amount is scaled so that `units x scaled amount` is in
units of 1e-9 micro-USD (1e-15 USD); the sum over an event's components is rounded once,
half to even, to whole micro-units. Amounts may have at most 9 decimal places.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000
MAX_DECIMALS = 9
_SCALE = 10**9  # sub-micro units per micro-unit in the integer sums

# Name of each amount, and the multiplier from USD to the integer scale for its unit:
# tokens are priced per million (USD/1e6 per token -> 1e-15 USD * 1e9 per token), images and
# requests per unit (1e15), audio per second with the quantity in milliseconds (1e12).
PRICE_FIELDS: tuple[str, ...] = (
    "input_per_million",
    "output_per_million",
    "cached_read_per_million",
    "cache_write_per_million",
    "reasoning_per_million",
    "per_image",
    "per_audio_second",
    "per_request",
)
_MULTIPLIER = {
    "input_per_million": 10**9,
    "output_per_million": 10**9,
    "cached_read_per_million": 10**9,
    "cache_write_per_million": 10**9,
    "reasoning_per_million": 10**9,
    "per_image": 10**15,
    "per_audio_second": 10**12,
    "per_request": 10**15,
}


class PriceFormatError(ValueError):
    pass


def parse_amount(text: str) -> Decimal:
    """A non-negative USD amount with at most 9 decimals ('' means 0: not charged)."""
    if text.strip() == "":
        return Decimal(0)
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise PriceFormatError(f"not a decimal number: {text[:40]!r}") from None
    if not value.is_finite():
        raise PriceFormatError("must be a finite number")
    if value < 0:
        raise PriceFormatError("must not be negative")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_DECIMALS:
        raise PriceFormatError(f"at most {MAX_DECIMALS} decimal places")
    if value >= Decimal(10) ** 15:
        raise PriceFormatError("too large")
    return value


@dataclass(frozen=True)
class Price:
    price_id: int
    provider: str
    model: str
    effective_from: datetime
    amounts: dict[str, Decimal]
    scaled: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "scaled", tuple(int(self.amounts.get(name, Decimal(0)) * _MULTIPLIER[name]) for name in PRICE_FIELDS)
        )


def cost_micros(
    price: Price,
    input_tokens: int,
    output_tokens: int,
    cached_read_tokens: int,
    cache_write_tokens: int,
    reasoning_tokens: int,
    images: int,
    audio_ms: int,
) -> int:
    """The event's cost in micro-units, exact up to the single final rounding (half to even).
    Ingest's hot path passes the counts positionally: keyword arguments cost it more than the
    arithmetic."""
    s = price.scaled
    total = (
        input_tokens * s[0]
        + output_tokens * s[1]
        + cached_read_tokens * s[2]
        + cache_write_tokens * s[3]
        + reasoning_tokens * s[4]
        + images * s[5]
        + audio_ms * s[6]
        + s[7]
    )
    quotient, remainder = divmod(total, _SCALE)
    twice = 2 * remainder
    if twice > _SCALE or (twice == _SCALE and quotient % 2 == 1):
        quotient += 1
    return quotient


class PriceBook:
    """All prices in memory, looked up by provider, model and event time."""

    def __init__(self, prices: list[Price]) -> None:
        self._by_model: dict[tuple[str, str], tuple[list[datetime], list[Price]]] = {}
        grouped: dict[tuple[str, str], list[Price]] = {}
        for price in prices:
            grouped.setdefault((price.provider, price.model), []).append(price)
        for key, items in grouped.items():
            items.sort(key=lambda p: p.effective_from)
            self._by_model[key] = ([p.effective_from for p in items], items)
        self.size = len(prices)

    def lookup(self, provider: str, model: str, at: datetime) -> Price | None:
        entry = self._by_model.get((provider, model))
        if entry is None:
            return None
        times, prices = entry
        if at >= times[-1]:  # the latest price: nearly every event
            return prices[-1]
        index = bisect.bisect_right(times, at) - 1
        return prices[index] if index >= 0 else None

    def models(self) -> list[tuple[str, str]]:
        return list(self._by_model)
