"""Realistic demo traffic, sent through the real ingest gRPC API.

`python -m tally.demo --address 127.0.0.1:50051 --events 200000 --days 90` (the master key comes
from ADMIN_MASTER_KEY). Used by `make run DEMO=1` and by the analytics benchmark. The traffic has:

- daily seasonality (business hours peak, nights quiet) and weekly seasonality (weekends ~35%),
  with 40% growth over the period;
- power-law virtual key sizes (Zipf weights over 60 keys) and a model and provider mix using the
  bundled price list, including Claude on AWS Bedrock (a provider-routing candidate);
- errors: 2% rate limited (429), 1% provider errors (500), 0.5% timeouts (504), 0.5% invalid
  requests (400);
- a cost spike: one hour three days ago with ~8x the usual gpt-4 traffic from one key;
- repeated prompts: 40% of chat requests carry a fingerprint drawn from a Zipf-weighted pool.

The ingest service must accept events as old as the period: start it with
INGEST_LATE_WINDOW_SECONDS larger than `--days` (devstack does this when DEMO=1).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import math
import os
import random
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc

from tally.ingest.v1 import ingest_pb2, ingest_pb2_grpc

BATCH = 5000
# (provider, model, operation, weight, median latency ms, input tokens median, output median)
MODELS: list[tuple[str, str, str, float, int, int, int]] = [
    ("openai", "gpt-4o", "chat.completions", 24, 1400, 900, 350),
    ("openai", "gpt-4o-mini", "chat.completions", 22, 700, 700, 250),
    ("openai", "gpt-4", "chat.completions", 8, 2600, 800, 300),
    ("openai", "gpt-3.5-turbo", "chat.completions", 6, 600, 600, 200),
    ("anthropic", "claude-3-5-sonnet", "chat.completions", 12, 1600, 1500, 400),
    ("anthropic", "claude-3-haiku", "chat.completions", 5, 500, 800, 200),
    ("aws-bedrock", "claude-3-sonnet", "chat.completions", 4, 1900, 1200, 350),
    ("google", "gemini-1.5-flash", "chat.completions", 5, 650, 1000, 250),
    ("openai", "text-embedding-3-small", "embeddings", 10, 120, 400, 0),
    ("openai", "whisper-1", "audio.transcriptions", 2, 3500, 0, 0),
    ("openai", "dall-e-3", "images.generations", 1, 9000, 60, 0),
]
KEYS = 60
PROMPTS = 2000
ERRORS = [
    (429, "rate_limited", 0.02),
    (500, "provider_error", 0.01),
    (504, "timeout", 0.005),
    (400, "invalid_request", 0.005),
]


def _hour_weight(at: datetime, start: datetime, end: datetime) -> float:
    hour = at.hour + at.minute / 60
    daily = 0.15 + math.exp(-(((hour - 14.0) / 4.0) ** 2))  # busiest around 14:00 UTC
    weekly = 0.35 if at.weekday() >= 5 else 1.0
    growth = 1.0 + 0.4 * (at - start) / max(end - start, timedelta(hours=1))
    return daily * weekly * growth


def _cumulative(weights: list[float]) -> list[float]:
    return list(itertools.accumulate(weights))


def generate(total: int, days: int, seed: int = 2024, now: datetime | None = None) -> Iterator[ingest_pb2.UsageEvent]:
    """`total` events (about) over the last `days`, in event-time order."""
    rng = random.Random(seed)
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    end = now - timedelta(seconds=5)
    start = end - timedelta(days=days)
    keys = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(KEYS)]
    key_weights = _cumulative([1 / (rank + 1) ** 1.2 for rank in range(KEYS)])
    model_weights = _cumulative([m[3] for m in MODELS])
    prompt_weights = _cumulative([1 / (rank + 1) ** 1.1 for rank in range(PROMPTS)])
    hours = [start.replace(minute=0, second=0) + timedelta(hours=i) for i in range(days * 24 + 2)]
    weights = [_hour_weight(h, start, end) for h in hours]
    scale = total / sum(weights)
    spike_hour = (now - timedelta(days=3)).replace(minute=0, second=0)
    gpt4 = next(i for i, m in enumerate(MODELS) if m[1] == "gpt-4")
    counter = 0
    for hour, weight in zip(hours, weights, strict=True):
        expected = weight * scale
        count = int(expected) + (rng.random() < expected - int(expected))
        extra = int(8 * scale * weight * MODELS[gpt4][3] / sum(m[3] for m in MODELS)) if hour == spike_hour else 0
        offsets = sorted(rng.uniform(0, 3600) for _ in range(count + extra))
        for n, offset in enumerate(offsets):
            at = hour + timedelta(seconds=offset)
            if not start <= at < end:
                continue
            spike = n >= count or False
            index = (
                gpt4 if spike and rng.random() < 0.9 else bisect.bisect(model_weights, rng.random() * model_weights[-1])
            )
            key = keys[2] if spike else keys[bisect.bisect(key_weights, rng.random() * key_weights[-1])]
            counter += 1
            yield _event(rng, at, key, MODELS[min(index, len(MODELS) - 1)], prompt_weights, f"demo-{seed}-{counter}")


def _event(
    rng: random.Random,
    at: datetime,
    key: str,
    spec: tuple[str, str, str, float, int, int, int],
    prompt_weights: list[float],
    request_id: str,
) -> ingest_pb2.UsageEvent:
    provider, model, operation, _weight, latency, input_median, output_median = spec
    status, error = 200, ""
    roll = rng.random()
    for code, name, share in ERRORS:
        if roll < share:
            status, error = code, name
            break
        roll -= share
    chat = operation == "chat.completions"
    streaming = chat and rng.random() < 0.6
    input_tokens = int(rng.lognormvariate(math.log(input_median), 0.9)) if input_median else 0
    output_tokens = int(rng.lognormvariate(math.log(output_median), 0.7)) if output_median and status == 200 else 0
    event = ingest_pb2.UsageEvent(
        request_id=request_id,
        virtual_key_id=key,
        provider=provider,
        model=model,
        operation=operation,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_read_tokens=int(input_tokens * 0.5) if chat and rng.random() < 0.2 else 0,
        images=1 if operation == "images.generations" else 0,
        audio_seconds=round(rng.uniform(5, 300), 3) if operation == "audio.transcriptions" else 0.0,
        latency_ms=max(5, int(rng.lognormvariate(math.log(latency), 0.5))),
        time_to_first_token_ms=max(1, int(rng.lognormvariate(math.log(latency / 4), 0.5))) if streaming else 0,
        http_status=status,
        error_type=error,
        streaming=streaming,
        tools_used=chat and rng.random() < 0.15,
        end_user_id=f"user-{rng.randint(1, 3000)}",
        prompt_fingerprint=(
            f"prompt-{bisect.bisect(prompt_weights, rng.random() * prompt_weights[-1])}"
            if chat and rng.random() < 0.4
            else ""
        ),
    )
    event.event_time.FromDatetime(at.replace(tzinfo=None))
    return event


def batches(total: int, days: int, seed: int = 2024, now: datetime | None = None) -> Iterator[bytes]:
    """Serialized RecordUsageBatchRequests of BATCH events each."""
    request = ingest_pb2.RecordUsageBatchRequest()
    for event in generate(total, days, seed, now):
        request.events.append(event)
        if len(request.events) == BATCH:
            yield request.SerializeToString()
            request = ingest_pb2.RecordUsageBatchRequest()
    if request.events:
        yield request.SerializeToString()


async def load(address: str, master_key: str, total: int, days: int, *, seed: int = 2024, streams: int = 2) -> int:
    """Sends the traffic with `streams` concurrent unary batch calls; returns the events accepted."""
    metadata = [("authorization", f"Bearer {master_key}")]
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    accepted = 0
    source = batches(total, days, seed)
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)

        async def worker() -> None:
            nonlocal accepted
            for payload in source:
                request = ingest_pb2.RecordUsageBatchRequest.FromString(payload)
                reply = await stub.RecordUsageBatch(request, timeout=120, metadata=metadata)
                accepted += reply.data.accepted

        await asyncio.gather(*(worker() for _ in range(streams)))
    return accepted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tally.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="ingest service host:port")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args(argv)
    key = os.environ.get("ADMIN_MASTER_KEY", "")
    if not key:
        print("ADMIN_MASTER_KEY must be set", file=sys.stderr)
        return 2
    accepted = asyncio.run(load(args.address, key, args.events, args.days, seed=args.seed))
    print(f"demo traffic: {accepted:,} events accepted over {args.days} days", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
