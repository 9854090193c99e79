-- An audit batch is retried until the database takes it; a retry after a commit whose outcome
-- was lost must not store its entries twice: each entry is unique by (time, entry_id) (the
-- hypertable's partitioning column is part of every unique index), and the writer inserts with
-- ON CONFLICT DO NOTHING. The unique index replaces the plain one on the same columns.
CREATE UNIQUE INDEX audit_log_time_entry_key ON audit_log (time DESC, entry_id DESC);
DROP INDEX audit_log_time_entry_idx;
