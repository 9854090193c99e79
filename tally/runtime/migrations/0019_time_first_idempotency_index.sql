-- The idempotency index leads with the event time: unique (event_time, request_id) instead of
-- (request_id, event_time) plus create_hypertable's default (event_time DESC) index. One B-tree per
-- inserted event instead of two, and new events land near its right edge (recent times) instead
-- of at random places throughout a chunk's index, so the ON CONFLICT probe and the insert touch
-- pages that are already cached. The same index serves every reader of the time index: ranges of
-- event_time, max(event_time) and exports ordered by (event_time, request_id). Nothing reads raw
-- events by request id alone. Building it blocks writers for the migration's duration.
CREATE UNIQUE INDEX usage_events_time_request_uq ON usage_events (event_time, request_id);
DROP INDEX usage_events_request_uq;
DROP INDEX IF EXISTS usage_events_event_time_idx;
