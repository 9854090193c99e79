-- Budget events (THRESHOLD_CROSSED, BUDGET_EXCEEDED, KEY_DISABLED, KEY_ENABLED, COST_SPIKE) are
-- recorded here in the transaction that decides them, then added to the Redis stream: at once
-- after the commit, and by a relay for any not yet added (Redis down, a crash in between).
-- `stream_id` is the stream entry's id once added; adding is idempotent per row (a Redis key
-- remembers each row's entry), so the immediate path and the relays of several replicas never
-- add a row twice.
CREATE TABLE budget_event_outbox (
    id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    type smallint NOT NULL,
    scope text NOT NULL,
    key_id text NOT NULL DEFAULT '',
    threshold double precision NOT NULL DEFAULT 0,
    spend_micros bigint NOT NULL DEFAULT 0,
    limit_micros bigint NOT NULL DEFAULT 0,
    message text NOT NULL DEFAULT '',
    stream_id text,
    published_at timestamptz
);
CREATE INDEX budget_event_outbox_unpublished ON budget_event_outbox (id) WHERE published_at IS NULL;
CREATE INDEX budget_event_outbox_published ON budget_event_outbox (published_at) WHERE published_at IS NOT NULL;
