"""Test-side helpers for usage data: a seeded event generator and an independent cost model.

The expected numbers are computed here from the generated events with Python's Decimal, not with
the service's integer arithmetic, so a pricing bug in the service cannot hide in both.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from tally.ingest.v1 import ingest_pb2

OPERATIONS = ("chat.completions", "embeddings", "completions", "audio.transcriptions", "images.generations")


@dataclass(frozen=True)
class TestPrice:
    __test__ = False  # not a pytest test class

    provider: str
    model: str
    effective_from: datetime
    input_per_million: str = "0"
    output_per_million: str = "0"
    cached_read_per_million: str = "0"
    cache_write_per_million: str = "0"
    reasoning_per_million: str = "0"
    per_image: str = "0"
    per_audio_second: str = "0"
    per_request: str = "0"

    def as_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "effectiveFrom": self.effective_from.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "inputPerMillion": self.input_per_million,
            "outputPerMillion": self.output_per_million,
            "cachedReadPerMillion": self.cached_read_per_million,
            "cacheWritePerMillion": self.cache_write_per_million,
            "reasoningPerMillion": self.reasoning_per_million,
            "perImage": self.per_image,
            "perAudioSecond": self.per_audio_second,
            "perRequest": self.per_request,
        }


def expected_cost_micros(event: ingest_pb2.UsageEvent, prices: Sequence[TestPrice]) -> int | None:
    """Cost of one event in micro-USD: provider cost if given, else the price in force, rounded once."""
    if event.HasField("provider_cost_micros"):
        return event.provider_cost_micros
    at = event.event_time.ToDatetime(tzinfo=UTC)
    candidates = [
        p for p in prices if (p.provider, p.model) == (event.provider, event.model) and p.effective_from <= at
    ]
    if not candidates:
        return None
    price = max(candidates, key=lambda p: p.effective_from)
    million = Decimal(1_000_000)
    usd = (
        Decimal(event.input_tokens) * Decimal(price.input_per_million) / million
        + Decimal(event.output_tokens) * Decimal(price.output_per_million) / million
        + Decimal(event.cached_read_tokens) * Decimal(price.cached_read_per_million) / million
        + Decimal(event.cache_write_tokens) * Decimal(price.cache_write_per_million) / million
        + Decimal(event.reasoning_tokens) * Decimal(price.reasoning_per_million) / million
        + Decimal(event.images) * Decimal(price.per_image)
        + Decimal(round(event.audio_seconds * 1000)) / 1000 * Decimal(price.per_audio_second)
        + Decimal(price.per_request)
    )
    return int((usd * million).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


@dataclass
class EventFactory:
    """Seeded random events for a fixed set of keys and models."""

    seed: int
    keys: list[str] = field(default_factory=list)
    models: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        if not self.keys:
            self.keys = [str(uuid.UUID(int=self.rng.getrandbits(128))) for _ in range(4)]

    def event(self, at: datetime, **overrides: Any) -> ingest_pb2.UsageEvent:
        rng = self.rng
        provider, model = rng.choice(self.models)
        status = rng.choices([200, 200, 200, 200, 429, 500], k=1)[0]
        event = ingest_pb2.UsageEvent(
            request_id=f"req-{uuid.UUID(int=rng.getrandbits(128))}",
            virtual_key_id=rng.choice(self.keys),
            provider=provider,
            model=model,
            operation=rng.choice(OPERATIONS),
            input_tokens=rng.randint(0, 5000),
            output_tokens=rng.randint(0, 2000),
            cached_read_tokens=rng.choice([0, 0, rng.randint(0, 3000)]),
            cache_write_tokens=rng.choice([0, 0, rng.randint(0, 500)]),
            reasoning_tokens=rng.choice([0, rng.randint(0, 800)]),
            images=rng.choice([0, 0, 0, 1, 2]),
            audio_seconds=rng.choice([0.0, round(rng.uniform(0, 120), 3)]),
            latency_ms=rng.randint(5, 90_000),
            time_to_first_token_ms=rng.choice([0, rng.randint(1, 5000)]),
            http_status=status,
            error_type="" if status == 200 else ("rate_limit" if status == 429 else "provider_error"),
            streaming=rng.random() < 0.5,
            tools_used=rng.random() < 0.2,
            end_user_id=rng.choice(["", f"user-{rng.randint(1, 50)}@example.com"]),
            prompt_fingerprint=rng.choice(["", f"fp-{rng.randint(1, 20)}"]),
            tags={"team": rng.choice(["search", "chat"])} if rng.random() < 0.3 else {},
        )
        event.event_time.FromDatetime(at)
        for name, value in overrides.items():
            if name == "event_time":
                event.event_time.FromDatetime(value)
            else:
                setattr(event, name, value)
        return event

    def events(self, count: int, start: datetime, span: timedelta) -> list[ingest_pb2.UsageEvent]:
        out = []
        for _ in range(count):
            at = start + timedelta(microseconds=self.rng.randrange(int(span.total_seconds() * 1_000_000)))
            out.append(self.event(at))
        return out


def recent(hours: float = 0) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(hours=hours)
