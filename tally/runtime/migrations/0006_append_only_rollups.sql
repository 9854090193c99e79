-- Rollups become append-only: each committed batch adds one row per group it touched, and a
-- compactor later merges a bucket's rows into one per group. Every reader aggregates with sum(),
-- so the totals equal the raw events at every moment, before and after compaction, and
-- concurrent batches never wait on each other's rollup rows.
DROP INDEX usage_rollup_hourly_uq;
DROP INDEX usage_rollup_daily_uq;
DROP INDEX prompt_fingerprint_daily_uq;
CREATE INDEX usage_rollup_hourly_key_idx ON usage_rollup_hourly (key_id, bucket DESC);
CREATE INDEX usage_rollup_daily_key_idx ON usage_rollup_daily (key_id, bucket DESC);
