-- Provider uptime, summarised per hour so a 30-day read does not group every minute row:
-- per hour and provider, the minutes with traffic and the minutes in which every request failed
-- with a 5xx. The compactor writes an hour's summary in the statement that merges its minutes.
-- An hour whose minute rows changed since (ingest, data-subject deletes) has a row in
-- provider_minutes_dirty, added in the same transaction as the minute rows; readers use the
-- summary of clean hours and the minute rows of dirty ones, so every answer is exact.
CREATE TABLE provider_uptime_hourly (
    bucket       timestamptz NOT NULL,
    provider     text        NOT NULL,
    minutes      bigint      NOT NULL,
    down_minutes bigint      NOT NULL
);
CREATE INDEX provider_uptime_hourly_bucket_idx ON provider_uptime_hourly (bucket);
CREATE TABLE provider_minutes_dirty (
    bucket timestamptz NOT NULL
);
CREATE INDEX provider_minutes_dirty_bucket_idx ON provider_minutes_dirty (bucket);
INSERT INTO provider_uptime_hourly (bucket, provider, minutes, down_minutes)
SELECT time_bucket('1 hour', bucket), provider, count(*), count(*) FILTER (WHERE failures = requests)
FROM (SELECT bucket, provider, sum(requests) AS requests, sum(server_failures) AS failures
      FROM provider_minutes GROUP BY 1, 2) m
WHERE requests > 0 GROUP BY 1, 2;
