-- Foundation: the TimescaleDB extension, the virtual-key registry and the raw usage hypertable.
CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE virtual_keys (
    key_id          uuid PRIMARY KEY,
    key_name        text        NOT NULL,
    enabled         boolean     NOT NULL DEFAULT true,
    is_test         boolean     NOT NULL DEFAULT false,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per LLM request. Money is integer micro-units (1 USD = 1,000,000); cost_micros is
-- NULL only for an unpriced event (cost_source = 'unpriced'), never a silent zero.
CREATE TABLE usage_events (
    event_time          timestamptz NOT NULL,
    request_id          text        NOT NULL,
    key_id              uuid        NOT NULL,
    provider            text        NOT NULL,
    model               text        NOT NULL,
    operation           text        NOT NULL,
    input_tokens        bigint      NOT NULL DEFAULT 0,
    output_tokens       bigint      NOT NULL DEFAULT 0,
    cached_read_tokens  bigint      NOT NULL DEFAULT 0,
    cache_write_tokens  bigint      NOT NULL DEFAULT 0,
    reasoning_tokens    bigint      NOT NULL DEFAULT 0,
    images              integer     NOT NULL DEFAULT 0,
    audio_seconds       numeric(14, 3) NOT NULL DEFAULT 0,
    latency_ms          integer     NOT NULL DEFAULT 0,
    ttft_ms             integer,
    http_status         smallint    NOT NULL DEFAULT 200,
    error_type          text,
    streaming           boolean     NOT NULL DEFAULT false,
    tools_used          boolean     NOT NULL DEFAULT false,
    end_user_hash       text,
    prompt_fingerprint  text,
    cost_micros         bigint,
    cost_source         text        NOT NULL CHECK (cost_source IN ('provider', 'computed', 'unpriced')),
    price_id            bigint,
    tags                jsonb,
    ingested_at         timestamptz NOT NULL DEFAULT now(),
    CHECK ((cost_source = 'unpriced') = (cost_micros IS NULL))
);

SELECT create_hypertable('usage_events', 'event_time', chunk_time_interval => interval '1 day');

-- Idempotency: a retried event carries the same request id and event time. A unique index on a
-- hypertable must include the time column.
CREATE UNIQUE INDEX usage_events_request_uq ON usage_events (request_id, event_time);
CREATE INDEX usage_events_key_time_idx ON usage_events (key_id, event_time DESC);
