"""Typed settings read once from the environment (twelve-factor).

Every process builds one `Settings` at start-up and passes it down; nothing else reads
`os.environ`. Secrets are `SecretStr`, so they never print in logs or reprs.
"""

from __future__ import annotations

from enum import StrEnum
from functools import cached_property
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceName(StrEnum):
    INGEST = "ingest"
    ANALYTICS = "analytics"
    BUDGET = "budget"
    REPORTING = "reporting"


DEFAULT_GRPC_PORTS: dict[ServiceName, int] = {
    ServiceName.INGEST: 50051,
    ServiceName.ANALYTICS: 50052,
    ServiceName.BUDGET: 50053,
    ServiceName.REPORTING: 50054,
}
DEFAULT_METRICS_PORTS: dict[ServiceName, int] = {
    ServiceName.INGEST: 9151,
    ServiceName.ANALYTICS: 9152,
    ServiceName.BUDGET: 9153,
    ServiceName.REPORTING: 9154,
}


class Settings(BaseSettings):
    """All configuration of the suite. Field `x_y` is read from the variable `X_Y`."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- security
    admin_master_key: SecretStr = Field(description="Bootstrap admin key; clients send `Authorization: Bearer <key>`.")

    # --- storage
    database_url: str = Field(
        "postgresql://tally@127.0.0.1:55432/tally",
        description="PostgreSQL (with TimescaleDB) connection URL, without the password.",
    )
    database_password: SecretStr | None = Field(None, description="PostgreSQL password, kept out of the URL.")
    database_pool_min: int = Field(2, ge=1, description="Minimum connections per service process.")
    database_pool_max: int = Field(16, ge=1, description="Maximum connections per service process.")
    migrate_on_start: bool = Field(True, description="Apply pending SQL migrations when a service starts.")
    redis_url: str = Field(
        "redis://127.0.0.1:56379/0", description="Redis URL (a seed node when REDIS_CLUSTER is set)."
    )
    redis_cluster: bool = Field(False, description="Talk to a Redis Cluster instead of a single Redis.")

    # --- network: where each service listens and where the others find it
    grpc_bind_host: str = Field("127.0.0.1", description="Interface the gRPC servers bind.")
    metrics_bind_host: str = Field("127.0.0.1", description="Interface the Prometheus endpoints bind.")
    ingest_address: str = Field("127.0.0.1:50051", description="host:port of the ingest service.")
    analytics_address: str = Field("127.0.0.1:50052", description="host:port of the analytics service.")
    budget_address: str = Field("127.0.0.1:50053", description="host:port of the budget service.")
    reporting_address: str = Field("127.0.0.1:50054", description="host:port of the reporting service.")
    ingest_metrics_port: int = Field(9151, description="Prometheus port of the ingest service.")
    analytics_metrics_port: int = Field(9152, description="Prometheus port of the analytics service.")
    budget_metrics_port: int = Field(9153, description="Prometheus port of the budget service.")
    reporting_metrics_port: int = Field(9154, description="Prometheus port of the reporting service.")
    gateway_host: str = Field("127.0.0.1", description="Interface Envoy listens on.")
    gateway_port: int = Field(5002, description="Port of the REST admin API (Envoy).")
    gateway_probe_address: str | None = Field(
        None, description="host:port where pipeline health probes Envoy's REST listener (default: local GATEWAY_PORT)."
    )
    gateway_admin_port: int = Field(9901, description="Envoy admin port (always bound to loopback).")

    # --- behaviour
    shutdown_grace_seconds: float = Field(10.0, gt=0, description="How long in-flight RPCs may run after SIGTERM.")
    default_statement_timeout_ms: int = Field(
        30_000, gt=0, description="SQL statement timeout for calls that carry no deadline."
    )
    timezone: str = Field("UTC", description="IANA timezone for budget periods, reports and time-of-day buckets.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    # --- ingest
    end_user_hash_key: SecretStr | None = Field(
        None, description="Secret for the keyed hash (HMAC-SHA256) that replaces end-user ids at ingest; required."
    )
    ingest_late_window_seconds: int = Field(
        7 * 86400, gt=0, description="Events older than this are rejected; younger late events are accepted."
    )
    ingest_future_skew_seconds: int = Field(
        300, ge=0, description="Events up to this far in the future (clock skew) are accepted."
    )
    ingest_late_threshold_seconds: int = Field(
        300, ge=0, description="An event arriving this long after its event time counts as late."
    )
    ingest_max_batch: int = Field(10_000, gt=0, description="Largest batch accepted by one call.")
    ingest_writers: int = Field(
        2,
        gt=0,
        description="Most transactions one ingest process runs at once; "
        "batches waiting meanwhile are committed together.",
    )
    ingest_group_events: int = Field(
        10_000,
        gt=0,
        description="Most events committed together in one transaction (group commit of waiting batches).",
    )
    ingest_gc_threshold: int = Field(
        50_000,
        ge=700,
        description="Allocations between the ingest process's young garbage collections (Python's default is 700).",
    )
    ingest_compact_seconds: float = Field(
        10.0, gt=0, description="How often ingest merges the rollup rows appended since the last pass."
    )
    ingest_price_refresh_seconds: float = Field(
        5.0, gt=0, description="How often an ingest process reloads prices changed by another replica."
    )

    # --- budget
    budget_failure_policy: Literal["open", "closed"] = Field(
        "closed", description="Authorize answer when Redis is unreachable: `open` admits, `closed` denies."
    )
    budget_redis_timeout_ms: int = Field(
        250, gt=0, description="Longest wait for Redis on the request path (also bounded by the caller's deadline)."
    )
    budget_reservation_ttl_seconds: float = Field(
        300.0, gt=0, description="A reservation not settled or released within this time lapses and is given back."
    )
    budget_settled_ttl_seconds: int = Field(
        8 * 86400,
        gt=0,
        description=(
            "How long a request settled directly is remembered while its usage has not reached ingest"
            " (Settle idempotency against ingest's hand-off of it)."
        ),
    )
    budget_handoff_settled_ttl_seconds: int = Field(
        3600,
        gt=0,
        description=(
            "How long ingest's hand-off remembers a request it settled or found settled (and a lapsed or"
            " released reservation's record is kept): long enough to recognise a late direct Settle of it."
        ),
    )
    budget_counter_retention_seconds: int = Field(
        40 * 86400, gt=0, description="How long Redis keeps a closed period's counters after the period ends."
    )
    budget_event_stream_maxlen: int = Field(
        100_000, gt=0, description="Approximate number of enforcement events the Redis stream retains."
    )
    budget_reconcile_on_start: bool = Field(
        True, description="Rebuild the Redis budget counters from TimescaleDB when the budget service starts."
    )
    budget_drift_check_seconds: float = Field(
        60.0, gt=0, description="How often the Redis-vs-database drift gauge is refreshed."
    )
    budget_spike_check_seconds: float = Field(60.0, gt=0, description="How often cost-spike detection runs.")
    budget_spike_trailing_windows: int = Field(
        24, gt=0, description="Windows before the current one whose average spend is the spike baseline."
    )
    budget_maintenance_seconds: float = Field(
        30.0, gt=0, description="How often lapsed reservations are swept and closed periods are recorded."
    )
    notify_webhook_url: str = Field("", description="Webhook URL for budget alert actions (empty: not sent).")
    notify_webhook_secret: SecretStr | None = Field(
        None, description="Standard Webhooks signing secret (`whsec_<base64>` or raw text)."
    )
    notify_webhook_bearer_token: SecretStr | None = Field(
        None, description="Optional bearer token sent with webhook deliveries."
    )
    notify_slack_webhook_url: str = Field("", description="Slack incoming-webhook URL (empty: not sent).")
    notify_pagerduty_events_url: str = Field("", description="PagerDuty Events API v2 URL (empty: not sent).")
    notify_pagerduty_routing_key: SecretStr | None = Field(None, description="PagerDuty integration routing key.")
    notify_email_recipients: str = Field(
        "", description="Comma-separated recipients of email actions that name none (key alerts, cost spikes)."
    )
    notify_max_attempts: int = Field(8, gt=0, description="Delivery attempts before a notification is dead-lettered.")
    notify_backoff_base_seconds: float = Field(
        2.0, gt=0, description="First retry delay; doubles per attempt (with jitter)."
    )
    notify_backoff_max_seconds: float = Field(600.0, gt=0, description="Longest delay between two attempts.")
    notify_poll_seconds: float = Field(
        1.0, gt=0, description="How often a delivery worker looks for due notifications."
    )
    notify_timeout_seconds: float = Field(10.0, gt=0, description="Timeout of one delivery attempt (HTTP or SMTP).")
    notify_lease_seconds: float = Field(
        120.0, gt=0, description="A claimed notification whose worker died is retried after this long."
    )
    smtp_host: str = Field("127.0.0.1", description="SMTP server for email notifications.")
    smtp_port: int = Field(1025, gt=0, description="SMTP port.")
    smtp_username: str = Field("", description="SMTP user (empty: no login).")
    smtp_password: SecretStr | None = Field(None, description="SMTP password.")
    smtp_starttls: bool = Field(False, description="Upgrade the SMTP connection with STARTTLS.")
    smtp_from: str = Field("tally@localhost", description="Sender address of notification emails.")

    # --- analytics
    analytics_max_data_points: int = Field(
        2500, gt=0, description="Most buckets one analytics timeline may have (e.g. minute over 90d is refused)."
    )
    analytics_max_period_days: int = Field(
        400, gt=0, description="Longest analytics period or forecast horizon, in days."
    )
    analytics_budget_timeout_seconds: float = Field(
        1.0, gt=0, description="Longest wait for the budget service when analytics reads budgets."
    )
    analytics_consistency_check_seconds: float = Field(
        300.0,
        gt=0,
        description="How often pipeline health re-checks that the last complete hour's rollups equal its raw events.",
    )

    # --- reporting
    reporting_export_chunk_bytes: int = Field(
        262_144, ge=4096, description="Size of the HttpBody chunks that exports and report downloads stream."
    )
    reporting_export_max_days: int = Field(
        400, gt=0, description="Longest window of a usage or billing export, in days."
    )
    reporting_webhook_poll_seconds: float = Field(
        1.0, gt=0, description="How often new usage events become webhook events and pending events are batched."
    )
    reporting_webhook_scan_limit: int = Field(
        10_000, gt=0, description="Most usage events turned into webhook events per pass."
    )
    reporting_schedule_grace_seconds: int = Field(
        3600,
        ge=0,
        description="A report fire missed while the service was down runs once at start if at most this old.",
    )
    reporting_schedule_refresh_seconds: float = Field(
        5.0, gt=0, description="How often a reporting replica reloads schedules changed through another replica."
    )

    # --- retention
    retention_raw_days: int = Field(
        400,
        ge=0,
        description="Raw usage events older than this many days are archived, then dropped (0: kept forever).",
    )
    retention_archive_dir: str = Field(
        ".data/archive", description="Folder of the raw-event archives (gzip CSV + JSON manifest per chunk)."
    )
    retention_check_seconds: float = Field(
        3600.0, gt=0, description="How often the reporting service runs the retention job."
    )

    # --- governance
    audit_queue_size: int = Field(
        10000, ge=1, description="Audit entries a service holds in memory before dropping (counted in a metric)."
    )
    audit_batch_size: int = Field(500, ge=1, description="Most audit entries written in one INSERT.")
    audit_flush_seconds: float = Field(0.2, gt=0, description="How often queued audit entries are written.")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r}") from exc
        return value

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def address_of(self, service: ServiceName) -> str:
        return str(getattr(self, f"{service.value}_address"))

    def grpc_port_of(self, service: ServiceName) -> int:
        return int(self.address_of(service).rsplit(":", 1)[1])

    def metrics_port_of(self, service: ServiceName) -> int:
        return int(getattr(self, f"{service.value}_metrics_port"))


def load_settings() -> Settings:
    """Builds the process's settings from the environment (call once, at start-up)."""
    return Settings()  # admin_master_key (required) comes from the environment
