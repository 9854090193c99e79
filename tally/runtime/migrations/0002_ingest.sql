-- Ingest: prices, the rollups kept equal to the raw events, and the fingerprint rollup.

-- Effective-dated prices. Amounts are exact decimals in USD: per million tokens of each kind,
-- per image, per audio second, per request. The price in force at an event's time is the row
-- with the latest effective_from <= event_time for its provider and model.
CREATE TABLE model_prices (
    price_id                bigserial   PRIMARY KEY,
    provider                text        NOT NULL,
    model                   text        NOT NULL,
    effective_from          timestamptz NOT NULL,
    input_per_million       numeric(24, 9) NOT NULL DEFAULT 0,
    output_per_million      numeric(24, 9) NOT NULL DEFAULT 0,
    cached_read_per_million numeric(24, 9) NOT NULL DEFAULT 0,
    cache_write_per_million numeric(24, 9) NOT NULL DEFAULT 0,
    reasoning_per_million   numeric(24, 9) NOT NULL DEFAULT 0,
    per_image               numeric(24, 9) NOT NULL DEFAULT 0,
    per_audio_second        numeric(24, 9) NOT NULL DEFAULT 0,
    per_request             numeric(24, 9) NOT NULL DEFAULT 0,
    currency                text        NOT NULL DEFAULT 'USD' CHECK (currency = 'USD'),
    source                  text        NOT NULL DEFAULT 'admin',
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, model, effective_from)
);

-- Hourly and daily (UTC) rollups of usage_events, maintained in the same transaction as the
-- insert of the raw rows they summarize, so they always equal the raw events exactly.
-- status_class: '1xx'..'5xx'; successes are http_status < 400. small_input_*: requests with
-- fewer than 1,000 input tokens and no tool use (candidates for a cheaper model).
-- lat_NN / ttft_NN: fixed-bucket histograms, bounds in tally/usage/histogram.py.
CREATE TABLE usage_rollup_hourly (
    bucket              timestamptz NOT NULL,
    key_id              uuid        NOT NULL,
    provider            text        NOT NULL,
    model               text        NOT NULL,
    operation           text        NOT NULL,
    status_class        text        NOT NULL,
    error_type          text        NOT NULL,
    requests            bigint      NOT NULL,
    successes           bigint      NOT NULL,
    failures            bigint      NOT NULL,
    input_tokens        bigint      NOT NULL,
    output_tokens       bigint      NOT NULL,
    cached_read_tokens  bigint      NOT NULL,
    cache_write_tokens  bigint      NOT NULL,
    reasoning_tokens    bigint      NOT NULL,
    images              bigint      NOT NULL,
    audio_seconds       numeric(20, 3) NOT NULL,
    cost_micros         bigint      NOT NULL,
    provider_cost_requests bigint   NOT NULL,
    unpriced_requests   bigint      NOT NULL,
    late_requests       bigint      NOT NULL,
    streaming_requests  bigint      NOT NULL,
    tool_requests       bigint      NOT NULL,
    small_input_requests bigint     NOT NULL,
    small_input_input_tokens bigint NOT NULL,
    small_input_output_tokens bigint NOT NULL,
    small_input_cost_micros bigint  NOT NULL,
    latency_ms_sum      bigint      NOT NULL,
    ttft_ms_sum         bigint      NOT NULL,
    ttft_count          bigint      NOT NULL,
    lat_00 bigint NOT NULL DEFAULT 0,
    lat_01 bigint NOT NULL DEFAULT 0,
    lat_02 bigint NOT NULL DEFAULT 0,
    lat_03 bigint NOT NULL DEFAULT 0,
    lat_04 bigint NOT NULL DEFAULT 0,
    lat_05 bigint NOT NULL DEFAULT 0,
    lat_06 bigint NOT NULL DEFAULT 0,
    lat_07 bigint NOT NULL DEFAULT 0,
    lat_08 bigint NOT NULL DEFAULT 0,
    lat_09 bigint NOT NULL DEFAULT 0,
    lat_10 bigint NOT NULL DEFAULT 0,
    lat_11 bigint NOT NULL DEFAULT 0,
    lat_12 bigint NOT NULL DEFAULT 0,
    lat_13 bigint NOT NULL DEFAULT 0,
    lat_14 bigint NOT NULL DEFAULT 0,
    lat_15 bigint NOT NULL DEFAULT 0,
    lat_16 bigint NOT NULL DEFAULT 0,
    lat_17 bigint NOT NULL DEFAULT 0,
    lat_18 bigint NOT NULL DEFAULT 0,
    lat_19 bigint NOT NULL DEFAULT 0,
    lat_20 bigint NOT NULL DEFAULT 0,
    lat_21 bigint NOT NULL DEFAULT 0,
    lat_22 bigint NOT NULL DEFAULT 0,
    lat_23 bigint NOT NULL DEFAULT 0,
    ttft_00 bigint NOT NULL DEFAULT 0,
    ttft_01 bigint NOT NULL DEFAULT 0,
    ttft_02 bigint NOT NULL DEFAULT 0,
    ttft_03 bigint NOT NULL DEFAULT 0,
    ttft_04 bigint NOT NULL DEFAULT 0,
    ttft_05 bigint NOT NULL DEFAULT 0,
    ttft_06 bigint NOT NULL DEFAULT 0,
    ttft_07 bigint NOT NULL DEFAULT 0,
    ttft_08 bigint NOT NULL DEFAULT 0,
    ttft_09 bigint NOT NULL DEFAULT 0,
    ttft_10 bigint NOT NULL DEFAULT 0,
    ttft_11 bigint NOT NULL DEFAULT 0,
    ttft_12 bigint NOT NULL DEFAULT 0,
    ttft_13 bigint NOT NULL DEFAULT 0,
    ttft_14 bigint NOT NULL DEFAULT 0,
    ttft_15 bigint NOT NULL DEFAULT 0,
    ttft_16 bigint NOT NULL DEFAULT 0,
    ttft_17 bigint NOT NULL DEFAULT 0,
    ttft_18 bigint NOT NULL DEFAULT 0,
    ttft_19 bigint NOT NULL DEFAULT 0,
    ttft_20 bigint NOT NULL DEFAULT 0,
    ttft_21 bigint NOT NULL DEFAULT 0,
    ttft_22 bigint NOT NULL DEFAULT 0,
    ttft_23 bigint NOT NULL DEFAULT 0
);
SELECT create_hypertable('usage_rollup_hourly', 'bucket', chunk_time_interval => interval '14 days');
CREATE UNIQUE INDEX usage_rollup_hourly_uq
    ON usage_rollup_hourly (key_id, provider, model, operation, status_class, error_type, bucket);

CREATE TABLE usage_rollup_daily (LIKE usage_rollup_hourly INCLUDING DEFAULTS);
SELECT create_hypertable('usage_rollup_daily', 'bucket', chunk_time_interval => interval '180 days');
CREATE UNIQUE INDEX usage_rollup_daily_uq
    ON usage_rollup_daily (key_id, provider, model, operation, status_class, error_type, bucket);

-- Repeated prompts (for caching analysis): daily requests and cost per prompt fingerprint.
CREATE TABLE prompt_fingerprint_daily (
    bucket             timestamptz NOT NULL,
    prompt_fingerprint text        NOT NULL,
    provider           text        NOT NULL,
    model              text        NOT NULL,
    requests           bigint      NOT NULL,
    input_tokens       bigint      NOT NULL,
    cost_micros        bigint      NOT NULL
);
SELECT create_hypertable('prompt_fingerprint_daily', 'bucket', chunk_time_interval => interval '180 days');
CREATE UNIQUE INDEX prompt_fingerprint_daily_uq
    ON prompt_fingerprint_daily (prompt_fingerprint, provider, model, bucket);
