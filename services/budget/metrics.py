"""Prometheus metrics of the budget service (served with the shared RPC metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter("tally_budget_decisions_total", "Authorize decisions, by outcome.", ["outcome"])
FAILURE_POLICY = Counter(
    "tally_budget_failure_policy_total",
    "Calls answered by the failure policy because Redis was unreachable.",
    ["operation", "policy"],
)
OVERSPEND = Counter(
    "tally_budget_overspend_micros_total",
    "Settled spend above its reservation (micro-units), by whether a reservation was open.",
    ["reservation"],
)
DRIFT = Gauge(
    "tally_budget_drift_micros",
    "Absolute difference between Redis settled counters and the database for current periods (micro-units).",
    ["scope_kind"],
)
RECONCILES = Counter("tally_budget_reconciles_total", "Counter rebuilds from the database, by trigger.", ["trigger"])
ALERTS_FIRED = Counter("tally_budget_alerts_fired_total", "Alerts fired (once per threshold per period).", ["kind"])
BATCH_ITEMS = Histogram(
    "tally_budget_batch_items",
    "Items decided by one Redis script run (concurrent calls coalesced per event-loop tick).",
    ["operation"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096),
)
EVENTS_PENDING = Gauge(
    "tally_budget_events_pending",
    "Budget events recorded and not yet added to the Redis stream (the relay adds them each second).",
)
