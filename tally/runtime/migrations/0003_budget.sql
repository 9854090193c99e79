-- Budgets, alert configuration, fired-alert dedup, closed-period totals, and the notification
-- outbox shared by budget and reporting (tally/notify). Money is integer micro-units.

-- One row per budget scope: 'global' or 'key:<uuid>'. timezone '' means the configured default.
CREATE TABLE budgets (
    scope        text        PRIMARY KEY CHECK (scope = 'global' OR scope LIKE 'key:%'),
    key_id       uuid        REFERENCES virtual_keys (key_id) ON DELETE CASCADE,
    limit_micros bigint      NOT NULL CHECK (limit_micros > 0),
    period       text        NOT NULL CHECK (period IN ('daily', 'weekly', 'monthly', 'total')),
    timezone     text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((scope = 'global') = (key_id IS NULL))
);

-- The alert configuration (PUT /budgets/alerts), one row.
CREATE TABLE budget_alert_config (
    id         smallint    PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    config     jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Each alert fires once per (scope, period, kind, threshold): the primary key is the dedup that
-- makes replicas and restarts safe; the outbox rows of its actions commit in the same transaction.
-- kind: 'threshold' | 'exceeded' | 'spike' (for spikes, period_start is the window start).
CREATE TABLE budget_alerts_fired (
    scope        text           NOT NULL,
    period_start timestamptz    NOT NULL,
    kind         text           NOT NULL CHECK (kind IN ('threshold', 'exceeded', 'spike')),
    threshold    numeric(12, 6) NOT NULL,
    spend_micros bigint         NOT NULL,
    limit_micros bigint         NOT NULL,
    actions      text[]         NOT NULL DEFAULT '{}',
    fired_at     timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, period_start, kind, threshold)
);

-- Totals of closed budget periods, recorded once each period ends.
CREATE TABLE budget_period_totals (
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    scope        text        NOT NULL,
    period       text        NOT NULL,
    timezone     text        NOT NULL,
    spend_micros bigint      NOT NULL,
    limit_micros bigint      NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
SELECT create_hypertable('budget_period_totals', 'period_start', chunk_time_interval => interval '365 days');
CREATE UNIQUE INDEX budget_period_totals_uq ON budget_period_totals (scope, period, timezone, period_start);

-- Notification outbox: rows are written in the transaction that decides to notify and delivered
-- by workers that claim them with FOR UPDATE SKIP LOCKED. status: pending -> delivered | dead.
-- A claimed row carries a lease (locked_until); a worker that dies leaves it to be reclaimed.
CREATE TABLE notification_outbox (
    id              bigserial   PRIMARY KEY,
    message_id      text        NOT NULL UNIQUE,
    source          text        NOT NULL,
    channel         text        NOT NULL CHECK (channel IN ('webhook', 'email', 'slack', 'pagerduty')),
    destination     text        NOT NULL,
    subject         text        NOT NULL DEFAULT '',
    payload         jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0,
    max_attempts    integer     NOT NULL,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX notification_outbox_due_idx ON notification_outbox (next_attempt_at) WHERE status = 'pending';

-- Every delivery attempt, successful or not.
CREATE TABLE notification_attempts (
    id          bigserial   PRIMARY KEY,
    outbox_id   bigint      NOT NULL REFERENCES notification_outbox (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    succeeded   boolean     NOT NULL,
    status_code integer,
    error       text,
    worker      text        NOT NULL
);
CREATE INDEX notification_attempts_outbox_idx ON notification_attempts (outbox_id, attempt);
