-- Governance (issue 7): API keys with roles, and the audit log of admin API calls.

-- An API key. The token is `tally_<api_key_id as 32 hex>_<secret>`; only SHA-256(secret) is
-- stored, and the id in the token makes verification one primary-key read.
CREATE TABLE api_keys (
    api_key_id    uuid        PRIMARY KEY,
    name          text        NOT NULL,
    role          text        NOT NULL CHECK (role IN ('admin', 'analyst', 'billing', 'operator', 'gateway')),
    key_prefix    text        NOT NULL,
    secret_sha256 bytea       NOT NULL CHECK (length(secret_sha256) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz
);
CREATE INDEX api_keys_created_idx ON api_keys (created_at DESC, api_key_id DESC);

-- Every admin API call (request-path RPCs are not audited). Written in batches by each
-- service's audit writer (tally/runtime/audit.py). Never updated: the trigger below refuses.
CREATE TABLE audit_log (
    time           timestamptz      NOT NULL,
    entry_id       uuid             NOT NULL,
    operation      text             NOT NULL,
    principal      text             NOT NULL,
    role           text             NOT NULL,
    parameters     jsonb            NOT NULL,
    client_ip      text             NOT NULL,
    correlation_id text             NOT NULL,
    outcome        text             NOT NULL CHECK (outcome IN ('success', 'denied', 'error')),
    status_code    text             NOT NULL,
    duration_ms    double precision NOT NULL
);
SELECT create_hypertable('audit_log', 'time', chunk_time_interval => interval '7 days', create_default_indexes => false);
CREATE INDEX audit_log_time_entry_idx ON audit_log (time DESC, entry_id DESC);
CREATE INDEX audit_log_principal_idx ON audit_log (principal, time DESC);
CREATE INDEX audit_log_operation_idx ON audit_log (operation, time DESC);

CREATE FUNCTION audit_log_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit log entries cannot be changed';
END;
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_immutable();
