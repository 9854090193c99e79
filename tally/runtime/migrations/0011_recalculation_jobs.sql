-- Cost re-rating jobs (POST /api/admin/analytics/recalculate-costs). A job re-prices the events of
-- a date range with the prices now in force, one day per transaction, and records its progress.
CREATE TABLE recalculation_jobs (
    job_id          uuid        PRIMARY KEY,
    status          text        NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    start_date      date        NOT NULL,
    end_date        date        NOT NULL,
    virtual_keys    uuid[]      NOT NULL DEFAULT '{}',
    days_total      integer     NOT NULL,
    days_done       integer     NOT NULL DEFAULT 0,
    events_scanned  bigint      NOT NULL DEFAULT 0,
    events_changed  bigint      NOT NULL DEFAULT 0,
    cost_before     bigint      NOT NULL DEFAULT 0,
    cost_after      bigint      NOT NULL DEFAULT 0,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    heartbeat_at    timestamptz
);
-- At most one unfinished job per range and key set: a repeated request joins it.
CREATE UNIQUE INDEX recalculation_jobs_active_uq ON recalculation_jobs (start_date, end_date, virtual_keys)
    WHERE status IN ('queued', 'running');
