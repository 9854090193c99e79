-- Readers answer per-key questions from the rollups (which have their own key index); the raw
-- per-key index only cost every insert.
DROP INDEX usage_events_key_time_idx;
