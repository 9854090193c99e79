-- Provider uptime per minute (issue 5): the share of minutes with traffic to a provider in which
-- it did not fail every request with a server-side (5xx) error. Per minute and provider: the
-- requests, and those answered with a 5xx. Append-only like the rollups (ingest appends one row
-- per minute and provider per batch, in the batch's transaction; readers sum; ingest's
-- compactor merges an hour of minutes at a time). Filled from the raw events still stored.
CREATE TABLE provider_minutes (
    bucket          timestamptz NOT NULL,
    provider        text        NOT NULL,
    requests        bigint      NOT NULL,
    server_failures bigint      NOT NULL
);
SELECT create_hypertable('provider_minutes', 'bucket', chunk_time_interval => interval '30 days');
INSERT INTO provider_minutes (bucket, provider, requests, server_failures)
SELECT time_bucket('1 minute', event_time), provider, count(*), count(*) FILTER (WHERE http_status >= 500)
FROM usage_events GROUP BY 1, 2;
