-- Reporting: webhook configuration and event queue, custom and scheduled reports with their runs,
-- billing entities with tax rates, and two additive columns on the shared notification outbox.

-- Notification outbox (tally/notify) additions, both optional: `credentials_ref` names a row of
-- notification_credentials whose signing secret and bearer token a webhook delivery uses instead
-- of the process settings (per-endpoint secrets stay out of the outbox rows); `retry_base_seconds`
-- overrides NOTIFY_BACKOFF_BASE_SECONDS for that row (a webhook endpoint's retryPolicy).
ALTER TABLE notification_outbox ADD COLUMN credentials_ref text;
ALTER TABLE notification_outbox ADD COLUMN retry_base_seconds double precision
    CHECK (retry_base_seconds IS NULL OR retry_base_seconds > 0);
CREATE INDEX notification_outbox_source_idx ON notification_outbox (source, id DESC);

CREATE TABLE notification_credentials (
    ref            text        PRIMARY KEY,
    signing_secret text,
    bearer_token   text,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The webhook configuration (PUT /analytics/webhooks): one settings row and its endpoints.
CREATE TABLE webhook_settings (
    id             smallint    PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    enabled        boolean     NOT NULL,
    batch_enabled  boolean     NOT NULL,
    batch_size     integer     NOT NULL CHECK (batch_size BETWEEN 1 AND 1000),
    flush_interval integer     NOT NULL CHECK (flush_interval >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- An endpoint's signing secret and bearer token live in notification_credentials under
-- ref 'webhook_endpoint:<endpoint_id>'. Removed endpoints are kept (removed_at) for the
-- delivery history.
CREATE TABLE webhook_endpoints (
    endpoint_id    uuid        PRIMARY KEY,
    position       integer     NOT NULL,
    url            text        NOT NULL,
    events         text[]      NOT NULL,
    auth_type      text        NOT NULL CHECK (auth_type IN ('none', 'bearer')),
    max_retries    integer     NOT NULL CHECK (max_retries BETWEEN 0 AND 20),
    retry_delay_ms integer     NOT NULL CHECK (retry_delay_ms > 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    removed_at     timestamptz
);

-- Events waiting to be sent to an endpoint, one row per (endpoint, event). A flush pass moves
-- them, batchSize at a time, into one outbox row (a delivery) and deletes them, in one transaction.
CREATE TABLE webhook_events (
    id          bigserial   PRIMARY KEY,
    endpoint_id uuid        NOT NULL REFERENCES webhook_endpoints (endpoint_id) ON DELETE CASCADE,
    event_id    text        NOT NULL,
    event_type  text        NOT NULL,
    body        jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_events_endpoint_idx ON webhook_events (endpoint_id, id);

-- One delivery (an outbox row, message_id = delivery_id) to one endpoint.
CREATE TABLE webhook_deliveries (
    delivery_id text        PRIMARY KEY,
    endpoint_id uuid        NOT NULL REFERENCES webhook_endpoints (endpoint_id) ON DELETE CASCADE,
    url         text        NOT NULL,
    event_types text[]      NOT NULL,
    event_count integer     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_created_idx ON webhook_deliveries (created_at DESC, delivery_id DESC);

-- Positions of the webhook event producers: 'usage_events' (ingested_at watermark, RFC 3339)
-- and 'budget_events' (the budget service's event stream id).
CREATE TABLE webhook_cursors (
    name       text        PRIMARY KEY,
    position   text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- usage.recorded / cost.calculated are produced by scanning usage_events by ingested_at. A BRIN
-- index costs ingest next to nothing (new pages are unsummarized, so inserts do no index work)
-- and lets the scan skip every summarized range: what remains is the recent tail of each chunk.
CREATE INDEX usage_events_ingested_brin ON usage_events USING brin (ingested_at) WITH (pages_per_range = 16);

-- Custom reports (kind 'custom', POST /analytics/reports) and scheduled reports (kind
-- 'scheduled', PUT /analytics/scheduled-reports). `definition` holds the sections and filters;
-- `schedule` is {frequency, time, timezone, dayOfWeek, dayOfMonth} or NULL. Fires before
-- `schedule_since` (when the current schedule was set) are never caught up.
CREATE TABLE reports (
    report_id      uuid        PRIMARY KEY,
    kind           text        NOT NULL CHECK (kind IN ('custom', 'scheduled')),
    name           text        NOT NULL,
    position       integer     NOT NULL DEFAULT 0,
    period         text        NOT NULL,
    format         text        NOT NULL CHECK (format IN ('pdf', 'excel', 'csv', 'json')),
    definition     jsonb       NOT NULL,
    schedule       jsonb,
    recipients     text[]      NOT NULL DEFAULT '{}',
    schedule_since timestamptz NOT NULL DEFAULT now(),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz
);
CREATE UNIQUE INDEX reports_scheduled_name_uq ON reports (name) WHERE kind = 'scheduled' AND deleted_at IS NULL;
CREATE INDEX reports_created_idx ON reports (kind, created_at DESC, report_id DESC);

-- Every run. A scheduled fire is claimed by inserting its row: the unique index on
-- (report_id, scheduled_for) is the lock that makes each fire run once across replicas and
-- restarts. The output file is kept in the row.
CREATE TABLE report_runs (
    run_id           uuid        PRIMARY KEY,
    report_id        uuid        NOT NULL REFERENCES reports (report_id) ON DELETE CASCADE,
    status           text        NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    trigger          text        NOT NULL CHECK (trigger IN ('on_demand', 'schedule', 'catch_up')),
    scheduled_for    timestamptz,
    window_start     timestamptz NOT NULL,
    window_end       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    duration_seconds double precision NOT NULL DEFAULT 0,
    format           text        NOT NULL,
    content_type     text        NOT NULL DEFAULT '',
    filename         text        NOT NULL DEFAULT '',
    output           bytea,
    error            text        NOT NULL DEFAULT '',
    recipients       text[]      NOT NULL DEFAULT '{}',
    email_message_id text,
    worker           text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX report_runs_fire_uq ON report_runs (report_id, scheduled_for) WHERE scheduled_for IS NOT NULL;
CREATE INDEX report_runs_report_idx ON report_runs (report_id, created_at DESC, run_id DESC);

-- Billing entities and their tax rate. A virtual key belongs to the entity named in
-- billing_entity_keys, else to the entity 'default' when it exists, else to none (no tax).
-- tax_inclusive: costs already include the tax (tax = gross * rate / (1 + rate)); otherwise the
-- tax is added on top (tax = net * rate).
CREATE TABLE billing_entities (
    entity_id     text          PRIMARY KEY,
    name          text          NOT NULL,
    tax_name      text          NOT NULL DEFAULT 'Tax',
    tax_rate      numeric(9, 6) NOT NULL CHECK (tax_rate >= 0 AND tax_rate < 10),
    tax_inclusive boolean       NOT NULL DEFAULT false,
    updated_at    timestamptz   NOT NULL DEFAULT now()
);

CREATE TABLE billing_entity_keys (
    key_id    uuid PRIMARY KEY,
    entity_id text NOT NULL REFERENCES billing_entities (entity_id) ON DELETE CASCADE
);
