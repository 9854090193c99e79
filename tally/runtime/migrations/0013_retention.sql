-- Retention of raw usage events (issue 7): each pass of the retention job (services/reporting/
-- retention.py) archives the usage_events chunks older than RETENTION_RAW_DAYS as gzip CSV files
-- with a JSON manifest, then drops them with drop_chunks. Rollups are kept. One row per pass.
CREATE TABLE retention_runs (
    run_id          uuid        PRIMARY KEY,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    status          text        NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'skipped')),
    cutoff          timestamptz NOT NULL,
    chunks_archived integer     NOT NULL DEFAULT 0,
    rows_archived   bigint      NOT NULL DEFAULT 0,
    archives        jsonb       NOT NULL DEFAULT '[]',
    host            text        NOT NULL DEFAULT '',
    error           text
);
CREATE INDEX retention_runs_started_idx ON retention_runs (started_at DESC);
