"""The alert configuration (PUT/GET /budgets/alerts): model, validation, JSON and proto forms."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from tally.budget.v1 import budget_pb2
from tally.runtime.validation import Violations

NOTIFY_ACTIONS = ("webhook", "email", "slack", "pagerduty")
KEY_ACTIONS = (*NOTIFY_ACTIONS, "disable_key")
URGENCIES = ("", "low", "high")
MAX_THRESHOLDS = 20
MAX_MESSAGE = 2000
MAX_RECIPIENTS = 50
MIN_SPIKE_WINDOW = 60
MAX_SPIKE_WINDOW = 7 * 86400
_EMAIL = re.compile(r"^[^@\s,<>]+@[^@\s,<>]+\.[^@\s,<>]+$")


@dataclass(frozen=True)
class GlobalThreshold:
    percentage: float
    actions: tuple[str, ...]
    recipients: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    urgency: str = ""
    message: str = ""


@dataclass(frozen=True)
class AlertConfig:
    global_enabled: bool = False
    global_thresholds: tuple[GlobalThreshold, ...] = ()
    key_enabled: bool = False
    key_thresholds: tuple[float, ...] = ()
    # Keyed by the threshold as written ("0.95").
    key_actions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    spike_enabled: bool = False
    spike_multiplier: float = 3.0
    spike_window_seconds: int = 3600
    spike_actions: tuple[str, ...] = ()

    def key_actions_for(self, threshold: float) -> tuple[str, ...]:
        for written, actions in self.key_actions.items():
            if float(written) == threshold:
                return actions
        return ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["key_actions"] = {k: list(v) for k, v in self.key_actions.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlertConfig:
        return cls(
            global_enabled=bool(data.get("global_enabled", False)),
            global_thresholds=tuple(
                GlobalThreshold(
                    percentage=float(t["percentage"]),
                    actions=tuple(t.get("actions", ())),
                    recipients=tuple(t.get("recipients", ())),
                    channels=tuple(t.get("channels", ())),
                    urgency=str(t.get("urgency", "")),
                    message=str(t.get("message", "")),
                )
                for t in data.get("global_thresholds", ())
            ),
            key_enabled=bool(data.get("key_enabled", False)),
            key_thresholds=tuple(float(t) for t in data.get("key_thresholds", ())),
            key_actions={str(k): tuple(v) for k, v in data.get("key_actions", {}).items()},
            spike_enabled=bool(data.get("spike_enabled", False)),
            spike_multiplier=float(data.get("spike_multiplier", 3.0)),
            spike_window_seconds=int(data.get("spike_window_seconds", 3600)),
            spike_actions=tuple(data.get("spike_actions", ())),
        )


def _ratio(value: float, field_name: str, violations: Violations) -> None:
    if not math.isfinite(value) or not 0 < value <= 1:
        violations.add(field_name, f"must be a ratio greater than 0 and at most 1 (0.8 = 80%), got {value}")


def _actions(values: list[str], allowed: tuple[str, ...], field_name: str, violations: Violations) -> None:
    if not values:
        violations.add(field_name, "at least one action is required")
    for index, action in enumerate(values):
        if action not in allowed:
            violations.add(f"{field_name}[{index}]", f"must be one of {', '.join(allowed)}; got {action!r}")
    if len(set(values)) != len(values):
        violations.add(field_name, "must not repeat an action")


def parse_request(request: budget_pb2.UpdateBudgetAlertsRequest) -> AlertConfig:
    """Validates the whole configuration; every problem is reported, each naming its camelCase field."""
    violations = Violations()
    base = AlertConfig()

    g = request.global_budget_alerts
    thresholds: list[GlobalThreshold] = []
    if len(g.thresholds) > MAX_THRESHOLDS:
        violations.add("globalBudgetAlerts.thresholds", f"at most {MAX_THRESHOLDS} thresholds")
    seen: set[float] = set()
    for index, t in enumerate(g.thresholds):
        path = f"globalBudgetAlerts.thresholds[{index}]"
        _ratio(t.percentage, f"{path}.percentage", violations)
        if t.percentage in seen:
            violations.add(f"{path}.percentage", f"repeats the threshold {t.percentage}")
        seen.add(t.percentage)
        _actions(list(t.actions), NOTIFY_ACTIONS, f"{path}.actions", violations)
        if len(t.recipients) > MAX_RECIPIENTS:
            violations.add(f"{path}.recipients", f"at most {MAX_RECIPIENTS} recipients")
        for r_index, recipient in enumerate(t.recipients):
            if not _EMAIL.match(recipient):
                violations.add(f"{path}.recipients[{r_index}]", f"not an email address: {recipient[:100]!r}")
        if "email" in t.actions and not t.recipients:
            violations.add(f"{path}.recipients", "required when actions include email")
        for c_index, channel in enumerate(t.channels):
            if not channel.strip() or len(channel) > 80:
                violations.add(f"{path}.channels[{c_index}]", "must be a Slack channel name of 1 to 80 characters")
        if t.urgency not in URGENCIES:
            violations.add(f"{path}.urgency", f"must be 'low' or 'high', got {t.urgency!r}")
        if len(t.message) > MAX_MESSAGE:
            violations.add(f"{path}.message", f"at most {MAX_MESSAGE} characters")
        thresholds.append(
            GlobalThreshold(
                percentage=t.percentage,
                actions=tuple(t.actions),
                recipients=tuple(t.recipients),
                channels=tuple(t.channels),
                urgency=t.urgency,
                message=t.message,
            )
        )

    k = request.virtual_key_budget_alerts
    if len(k.default_thresholds) > MAX_THRESHOLDS:
        violations.add("virtualKeyBudgetAlerts.defaultThresholds", f"at most {MAX_THRESHOLDS} thresholds")
    for index, value in enumerate(k.default_thresholds):
        _ratio(value, f"virtualKeyBudgetAlerts.defaultThresholds[{index}]", violations)
    if len(set(k.default_thresholds)) != len(k.default_thresholds):
        violations.add("virtualKeyBudgetAlerts.defaultThresholds", "must not repeat a threshold")
    key_actions: dict[str, tuple[str, ...]] = {}
    for written in sorted(k.actions):
        path = f'virtualKeyBudgetAlerts.actions["{written}"]'
        try:
            value = float(written)
        except ValueError:
            violations.add(path, 'keys must be thresholds written as numbers, e.g. "0.8"')
            continue
        if value not in k.default_thresholds:
            violations.add(path, "names a threshold that is not in defaultThresholds")
        names: list[str] = []
        for a_index, item in enumerate(k.actions[written].values):
            if item.WhichOneof("kind") != "string_value":
                violations.add(f"{path}[{a_index}]", "must be a string")
                continue
            names.append(item.string_value)
        _actions(names, KEY_ACTIONS, path, violations)
        key_actions[written] = tuple(names)

    s = request.cost_spikes_detection
    multiplier = s.threshold_multiplier or base.spike_multiplier
    window = s.time_window or base.spike_window_seconds
    if (s.enabled or s.threshold_multiplier) and (
        not math.isfinite(s.threshold_multiplier) or not 1 < s.threshold_multiplier <= 1000
    ):
        violations.add("costSpikesDetection.thresholdMultiplier", "must be greater than 1 and at most 1000")
    if (s.enabled or s.time_window) and not MIN_SPIKE_WINDOW <= s.time_window <= MAX_SPIKE_WINDOW:
        violations.add(
            "costSpikesDetection.timeWindow", f"must be between {MIN_SPIKE_WINDOW} and {MAX_SPIKE_WINDOW} seconds"
        )
    if s.enabled or s.actions:
        _actions(list(s.actions), NOTIFY_ACTIONS, "costSpikesDetection.actions", violations)
    violations.raise_if_any()
    return AlertConfig(
        global_enabled=g.enabled,
        global_thresholds=tuple(sorted(thresholds, key=lambda t: t.percentage)),
        key_enabled=k.enabled,
        key_thresholds=tuple(sorted(k.default_thresholds)),
        key_actions=key_actions,
        spike_enabled=s.enabled,
        spike_multiplier=multiplier,
        spike_window_seconds=window,
        spike_actions=tuple(s.actions),
    )


def to_proto(config: AlertConfig) -> budget_pb2.BudgetAlertsConfig:
    message = budget_pb2.BudgetAlertsConfig(
        global_budget_alerts=budget_pb2.GlobalBudgetAlerts(
            enabled=config.global_enabled,
            thresholds=[
                budget_pb2.AlertThreshold(
                    percentage=t.percentage,
                    actions=t.actions,
                    recipients=t.recipients,
                    channels=t.channels,
                    urgency=t.urgency,
                    message=t.message,
                )
                for t in config.global_thresholds
            ],
        ),
        virtual_key_budget_alerts=budget_pb2.VirtualKeyBudgetAlerts(
            enabled=config.key_enabled, default_thresholds=config.key_thresholds
        ),
        cost_spikes_detection=budget_pb2.CostSpikesDetection(
            enabled=config.spike_enabled,
            threshold_multiplier=config.spike_multiplier,
            time_window=config.spike_window_seconds,
            actions=config.spike_actions,
        ),
    )
    for written, actions in config.key_actions.items():
        values = struct_pb2.ListValue()
        values.extend(list(actions))
        message.virtual_key_budget_alerts.actions[written].CopyFrom(values)
    return message
