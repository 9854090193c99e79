"""Validation of usage events and their conversion into `usage_events` rows.

Each event is judged on its own: a bad item is rejected with the field and the reason, and
never sinks the rest of its batch. Accepted events are priced here (see pricing.py) and their
end-user id is replaced by a keyed hash, so the raw id never reaches storage.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from psycopg.types.json import Jsonb

from services.ingest.pricing import PriceBook, cost_micros
from tally.ingest.v1 import ingest_pb2
from tally.usage.identity import hash_end_user

MAX_ID_LENGTH = 200
MAX_NAME_LENGTH = 120
MAX_TAGS = 32
MAX_TAG_KEY = 64
MAX_TAG_VALUE = 256
MAX_COUNT = 10**12
# An operation is dotted lower-case words: chat.completions, audio.speech, batch.embeddings.
OPERATION = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*){0,3}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


class Rejected(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(slots=True)
class ValidEvent:
    """An accepted event: its storage row plus what the after-commit steps need. Not changed
    after validation (not frozen only because a frozen dataclass is slow to build)."""

    row: tuple[Any, ...]
    request_id: str
    event_time: datetime
    epoch_seconds: int
    epoch_nanos: int
    key_id: uuid.UUID
    key_text: str
    provider: str
    model: str
    tokens: int
    cost_micros: int | None
    unpriced: bool
    late: bool

    @property
    def identity(self) -> tuple[str, datetime]:
        return self.request_id, self.event_time


@dataclass(frozen=True)
class IngestPolicy:
    late_window: timedelta
    future_skew: timedelta
    late_threshold: timedelta
    end_user_key: bytes


# Below MAX_COUNT: when the bitwise OR of non-negative counts is below it, so is each count.
_BELOW_MAX = 1 << (MAX_COUNT.bit_length() - 1)


def _check_counts(values: tuple[int, ...], fields: tuple[str, ...]) -> None:
    """Raises for the first of `values` that is negative or above MAX_COUNT. (The hot path checks
    the bitwise OR of the counts against _BELOW_MAX first, and calls this only when it is not in
    [0, _BELOW_MAX): the OR is negative if any count is, and at least as large as each.)"""
    for value, field in zip(values, fields, strict=True):
        if value < 0:
            raise Rejected(field, "must not be negative")
        if value > MAX_COUNT:
            raise Rejected(field, f"must be at most {MAX_COUNT}")


_TOKEN_FIELDS = ("inputTokens", "outputTokens", "cachedReadTokens", "cacheWriteTokens", "reasoningTokens", "images")
_TIME_FIELDS = ("latencyMs", "timeToFirstTokenMs")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ZERO_SECONDS = Decimal("0.000")
# Small bounded caches for values that repeat across events (names, key ids, end users).
_CACHE_LIMIT = 100_000
_good_names: set[str] = set()
_key_ids: dict[str, tuple[uuid.UUID, str]] = {}
_seconds: dict[int, datetime] = {}


def _name(value: str, field: str) -> str:
    if value in _good_names:
        return value
    if not value:
        raise Rejected(field, "required")
    if len(value) > MAX_NAME_LENGTH or not NAME.match(value):
        raise Rejected(field, f"must be 1-{MAX_NAME_LENGTH} characters of letters, digits and ._:/@+-")
    if len(_good_names) < _CACHE_LIMIT:
        _good_names.add(value)
    return value


def _key_id(value: str) -> tuple[uuid.UUID, str]:
    """The key as a UUID and in canonical text form."""
    known = _key_ids.get(value)
    if known is None:
        if not value:
            raise Rejected("virtualKeyId", "required")
        try:
            key_id = uuid.UUID(value)
        except ValueError:
            raise Rejected("virtualKeyId", "must be a UUID") from None
        if len(_key_ids) >= _CACHE_LIMIT:
            _key_ids.clear()
        known = _key_ids[value] = (key_id, str(key_id))
    return known


def _event_time(seconds: int, nanos: int) -> datetime:
    """The UTC datetime of a timestamp (cached by the second: a batch's events share few)."""
    base = _seconds.get(seconds)
    if base is None:
        base = _EPOCH + timedelta(seconds=seconds)
        if len(_seconds) >= _CACHE_LIMIT:
            _seconds.clear()
        _seconds[seconds] = base
    # timedelta(0, 0, us) positionally: half the cost of base.replace(microsecond=...).
    return base + timedelta(0, 0, nanos // 1000) if nanos >= 1000 else base


# The time bounds of the `now` and policy validated against last (a batch's events share them):
# (now, policy, latest event time accepted, earliest accepted, earliest not late).
_bounds: tuple[datetime, IngestPolicy | None, datetime, datetime, datetime] = (_EPOCH, None, _EPOCH, _EPOCH, _EPOCH)


def _bounds_at(
    now: datetime, policy: IngestPolicy
) -> tuple[datetime, IngestPolicy | None, datetime, datetime, datetime]:
    global _bounds
    _bounds = (now, policy, now + policy.future_skew, now - policy.late_window, now - policy.late_threshold)
    return _bounds


def validate(event: ingest_pb2.UsageEvent, now: datetime, policy: IngestPolicy, prices: PriceBook) -> ValidEvent:
    """Checks one event and builds its row; raises Rejected naming the (camelCase) field."""
    request_id = event.request_id
    if not request_id:
        raise Rejected("requestId", "required")
    if len(request_id) > MAX_ID_LENGTH:
        raise Rejected("requestId", f"must be at most {MAX_ID_LENGTH} characters")
    if not event.HasField("event_time"):
        raise Rejected("eventTime", "required (a retry must carry the original event time)")
    stamp = event.event_time
    epoch_seconds, epoch_nanos = stamp.seconds, stamp.nanos
    base = _seconds.get(epoch_seconds)
    if base is not None:  # _event_time's cache hit, inline
        event_time = base + timedelta(0, 0, epoch_nanos // 1000) if epoch_nanos >= 1000 else base
    else:
        event_time = _event_time(epoch_seconds, epoch_nanos)
    bounds = _bounds
    if bounds[0] is not now or bounds[1] is not policy:
        bounds = _bounds_at(now, policy)
    if event_time > bounds[2]:
        raise Rejected("eventTime", f"is in the future beyond the allowed skew of {policy.future_skew}")
    if event_time < bounds[3]:
        raise Rejected("eventTime", f"is older than the late window of {policy.late_window}")
    key_value = event.virtual_key_id
    known_key = _key_ids.get(key_value)
    key_id, key_text = known_key if known_key is not None else _key_id(key_value)
    provider = event.provider
    if provider not in _good_names:
        _name(provider, "provider")
    model = event.model
    if model not in _good_names:
        _name(model, "model")
    operation = event.operation
    if operation not in _good_names:
        if not operation:
            raise Rejected("operation", "required")
        if len(operation) > 64 or not OPERATION.match(operation):
            raise Rejected("operation", "must be dotted lower-case words, e.g. chat.completions")
        if len(_good_names) < _CACHE_LIMIT:
            _good_names.add(operation)
    input_tokens, output_tokens, cached_read, cache_write, reasoning, images = counts = (
        event.input_tokens,
        event.output_tokens,
        event.cached_read_tokens,
        event.cache_write_tokens,
        event.reasoning_tokens,
        event.images,
    )
    if not 0 <= input_tokens | output_tokens | cached_read | cache_write | reasoning | images < _BELOW_MAX:
        _check_counts(counts, _TOKEN_FIELDS)
    if images > 2**31 - 1:
        raise Rejected("images", "too large")
    audio_seconds = event.audio_seconds
    audio_ms = 0
    if audio_seconds:
        if not math.isfinite(audio_seconds) or audio_seconds < 0:
            raise Rejected("audioSeconds", "must be a finite non-negative number")
        audio_ms = round(audio_seconds * 1000)
        if audio_ms > 10**13:
            raise Rejected("audioSeconds", "too large")
    latency_ms, ttft_ms = times = event.latency_ms, event.time_to_first_token_ms
    if not 0 <= latency_ms | ttft_ms < _BELOW_MAX:
        _check_counts(times, _TIME_FIELDS)
    if latency_ms > 2**31 - 1 or ttft_ms > 2**31 - 1:
        raise Rejected("latencyMs", "too large")
    http_status = event.http_status or 200
    if not 100 <= http_status <= 599:
        raise Rejected("httpStatus", "must be an HTTP status code (100-599)")
    error_type = event.error_type or None
    if error_type is not None and len(error_type) > MAX_NAME_LENGTH:
        raise Rejected("errorType", f"must be at most {MAX_NAME_LENGTH} characters")
    end_user_id = event.end_user_id
    if len(end_user_id) > MAX_ID_LENGTH:
        raise Rejected("endUserId", f"must be at most {MAX_ID_LENGTH} characters")
    fingerprint = event.prompt_fingerprint
    if len(fingerprint) > 128:
        raise Rejected("promptFingerprint", "must be at most 128 characters")
    tags: dict[str, str] | None = None
    if event.tags:
        if len(event.tags) > MAX_TAGS:
            raise Rejected("tags", f"at most {MAX_TAGS} tags")
        for tag_key, tag_value in event.tags.items():
            if not tag_key or len(tag_key) > MAX_TAG_KEY or len(tag_value) > MAX_TAG_VALUE:
                raise Rejected(f"tags.{tag_key[:MAX_TAG_KEY]}", "keys are 1-64 and values at most 256 characters")
        tags = dict(event.tags)

    price_id: int | None = None
    if event.HasField("provider_cost_micros"):
        cost: int | None = event.provider_cost_micros
        _check_counts((event.provider_cost_micros,), ("providerCostMicros",))
        source = "provider"
    else:
        price = prices.lookup(provider, model, event_time)
        if price is None:
            cost, source = None, "unpriced"
        else:
            cost = cost_micros(
                price, input_tokens, output_tokens, cached_read, cache_write, reasoning, images, audio_ms
            )
            source, price_id = "computed", price.price_id
    end_user_hash = hash_end_user(policy.end_user_key, end_user_id) if end_user_id else None
    row = (
        event_time, request_id, key_id, provider, model, operation,
        input_tokens, output_tokens, cached_read, cache_write, reasoning,
        images, Decimal(audio_ms).scaleb(-3) if audio_ms else _ZERO_SECONDS,
        latency_ms, ttft_ms or None,
        http_status, error_type, event.streaming,
        event.tools_used, end_user_hash, fingerprint or None, cost, source, price_id,
        Jsonb(tags) if tags is not None else None,
    )  # fmt: skip
    return ValidEvent(
        row,
        request_id,
        event_time,
        epoch_seconds,
        epoch_nanos,
        key_id,
        key_text,
        provider,
        model,
        input_tokens + output_tokens + cached_read + cache_write + reasoning,
        cost,
        cost is None,
        event_time < bounds[4],  # now - event_time > late_threshold
    )
