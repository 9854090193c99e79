"""The analytics' derived metrics, as pure functions (no SQL, no gRPC), each defined here.

- growth(current, previous) = (current - previous) / previous; 0 when previous is 0 (undefined).
- efficiency improvement = relative decrease of cost per token:
  (cpt_previous - cpt_current) / cpt_previous, cpt = cost / total tokens; 0 when undefined.
- ranks: competition ranking ("1224"): equal values share a rank.
- key segments by cost share: keys sorted by cost (highest first). Power users are the fewest
  top keys whose cost reaches POWER_SHARE (60%) of the total; medium users the next keys up to
  MEDIUM_SHARE (95%); light users the rest (including keys with traffic but no cost).
- seasonality: the autocorrelation of the hourly request series at lags 24 h and 168 h;
  strength = the larger one clipped to 0..1; detected when strength >= SEASONALITY_MIN (0.3).
- anomalies: robust z-scores of an hourly series against its seasonal baseline (the median of
  the same hour of day; of weekend days apart from weekdays once the window holds two weeks, so
  a quiet weekend is not a drop; the current, unfinished hour is not judged), scaled by
  1.4826 x the median absolute deviation of the residuals; |z| >= ANOMALY_Z (4) is an anomaly;
  severity by |z|: >= 10 critical, >= 7 high, >= 5 medium, else low.
- forecast: ordinary least squares on daily spend y_t = a + b t + s_dow(t) (a linear trend
  plus additive day-of-week effects that sum to zero), trained on up to the last 90 whole UTC
  days. The horizon's spend is the sum of the daily predictions (floored at 0); its prediction
  interval adds the parameters' covariance to h independent residual variances and uses a
  normal quantile.
"""

from __future__ import annotations

import functools
import math
import operator
import statistics
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

POWER_SHARE = 0.60
MEDIUM_SHARE = 0.95
SEASONALITY_MIN = 0.3
ANOMALY_Z = 4.0
MAD_SCALE = 1.4826


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def growth(current: float, previous: float) -> float:
    return (current - previous) / previous if previous else 0.0


def efficiency_improvement(cost: float, tokens: float, previous_cost: float, previous_tokens: float) -> float:
    current_cpt = ratio(cost, tokens)
    previous_cpt = ratio(previous_cost, previous_tokens)
    if not previous_cpt or not tokens:
        return 0.0
    return (previous_cpt - current_cpt) / previous_cpt


def competition_ranks(values: Sequence[float], *, highest_first: bool) -> list[int]:
    """1-based ranks; equal values share the better rank."""
    ordered = sorted(values, reverse=highest_first)
    first_position: dict[float, int] = {}
    for position, value in enumerate(ordered, start=1):
        first_position.setdefault(value, position)
    return [first_position[v] for v in values]


@dataclass(frozen=True)
class Segments:
    """Key ids per segment, in descending cost order."""

    power: list[str]
    medium: list[str]
    light: list[str]


def segment_keys(costs: dict[str, int]) -> Segments:
    """Splits keys by cumulative cost share (see the module docs); costs are micro-units."""
    ordered = sorted(costs.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(costs.values())
    power: list[str] = []
    medium: list[str] = []
    light: list[str] = []
    cumulative = 0
    for key, cost in ordered:
        if total and cost > 0 and cumulative < POWER_SHARE * total:
            power.append(key)
        elif total and cost > 0 and cumulative < MEDIUM_SHARE * total:
            medium.append(key)
        else:
            light.append(key)
        cumulative += cost
    return Segments(power, medium, light)


def autocorrelation(series: Sequence[float], lag: int) -> float:
    """Sample autocorrelation at `lag`; 0 when the series is too short or constant."""
    n = len(series)
    if n < 2 * lag or lag <= 0:
        return 0.0
    mean = sum(series) / n
    centered = [v - mean for v in series]
    denominator = sum(c * c for c in centered)
    if denominator == 0:
        return 0.0
    return sum(centered[i] * centered[i + lag] for i in range(n - lag)) / denominator


@dataclass(frozen=True)
class SeasonalityResult:
    detected: bool
    pattern: str  # business_hours | daily | weekly | none
    strength: float


def seasonality(hourly: Sequence[float], peak_hours: Sequence[int], weekday_ratio: float) -> SeasonalityResult:
    daily = autocorrelation(hourly, 24)
    weekly = autocorrelation(hourly, 168)
    strength = max(0.0, min(1.0, max(daily, weekly)))
    if strength < SEASONALITY_MIN:
        return SeasonalityResult(False, "none", round(strength, 4))
    if weekly > daily + 0.1 or (weekday_ratio >= 1.5 and weekly >= SEASONALITY_MIN and daily < SEASONALITY_MIN):
        pattern = "weekly"
    elif peak_hours and all(8 <= h <= 19 for h in peak_hours):
        pattern = "business_hours"
    else:
        pattern = "daily"
    return SeasonalityResult(True, pattern, round(strength, 4))


@dataclass(frozen=True)
class Outlier:
    index: int
    value: float
    baseline: float
    z: float


def severity(z: float) -> str:
    size = abs(z)
    if size >= 10:
        return "critical"
    if size >= 7:
        return "high"
    if size >= 5:
        return "medium"
    return "low"


def seasonal_outliers(
    series: Sequence[float], seasons: Sequence[Hashable], *, min_baseline: float = 1.0
) -> list[Outlier]:
    """Points whose robust z-score against the median of their season (e.g. their hour of day)
    is >= ANOMALY_Z."""
    if len(series) < 48:
        return []
    by_season: dict[Hashable, list[float]] = {}
    for value, season in zip(series, seasons, strict=True):
        by_season.setdefault(season, []).append(value)
    baseline = {season: statistics.median(values) for season, values in by_season.items()}
    residuals = [value - baseline[season] for value, season in zip(series, seasons, strict=True)]
    mad = statistics.median(abs(r - statistics.median(residuals)) for r in residuals)
    # A floor on the spread keeps a near-constant series from turning noise into anomalies.
    typical = statistics.median(abs(v) for v in series) or 1.0
    scale = max(MAD_SCALE * mad, 0.05 * typical, 1e-9)
    found = []
    for index, (value, season) in enumerate(zip(series, seasons, strict=True)):
        base = baseline[season]
        z = (value - base) / scale
        if abs(z) >= ANOMALY_Z and max(base, value) >= min_baseline:
            found.append(Outlier(index, value, base, z))
    return found


@dataclass(frozen=True)
class Forecast:
    projected: float
    lower: float
    upper: float
    sd: float
    daily: list[float]  # point forecast for each horizon day
    daily_sd: list[float]
    slope_per_day: float
    mean_daily: float


def normal_quantile(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


@dataclass(frozen=True)
class _Design:
    """The parts of a forecast fit that depend only on the days, not on the values (shared by
    every series with the same first day, length and horizon, e.g. the per-key forecasts)."""

    x: list[list[float]]
    columns: list[list[float]]
    xtx_inv: list[list[float]]
    future: list[list[float]]
    future_quads: list[float]
    total_quad: float


@functools.lru_cache(maxsize=256)
def _design(n: int, first_day: date, horizon_days: int) -> _Design:
    use_season = n >= 21
    use_trend = n >= 7

    def design(index: int, day: date) -> list[float]:
        row = [1.0]
        if use_trend:
            row.append(float(index))
        if use_season:
            # effect coding: six columns, Sunday is minus the sum of the others
            weekday = day.weekday()
            row.extend(-1.0 if weekday == 6 else float(weekday == j) for j in range(6))
        return row

    target_days = [first_day + timedelta(days=n + i) for i in range(horizon_days)]
    x = [design(i, first_day + timedelta(days=i)) for i in range(n)]
    xtx_inv = _inverse([[sum(r[i] * r[j] for r in x) for j in range(len(x[0]))] for i in range(len(x[0]))])
    future = [design(n + i, d) for i, d in enumerate(target_days)]
    total_row = [sum(row[j] for row in future) for j in range(len(x[0]))]
    columns = [[r[i] for r in x] for i in range(len(x[0]))]
    return _Design(x, columns, xtx_inv, future, [_quad(xtx_inv, row) for row in future], _quad(xtx_inv, total_row))


def forecast_daily(history: Sequence[float], first_day: date, horizon_days: int, confidence: float) -> Forecast:
    """Trend plus day-of-week seasonality on daily values (see the module docs)."""
    n = len(history)
    if n == 0:
        zeros = [0.0] * horizon_days
        return Forecast(0.0, 0.0, 0.0, 0.0, zeros, zeros, 0.0, 0.0)
    design = _design(n, first_day, horizon_days)
    x, xtx_inv, future = design.x, design.xtx_inv, design.future
    xty = [_dot(column, history) for column in design.columns]
    beta = _matvec(xtx_inv, xty)
    residuals = [v - _dot(r, beta) for r, v in zip(x, history, strict=True)]
    dof = max(1, n - len(beta))
    sigma2 = sum(r * r for r in residuals) / dof
    daily = [max(0.0, _dot(row, beta)) for row in future]
    daily_sd = [math.sqrt(sigma2 * (1 + q)) for q in design.future_quads]
    variance = horizon_days * sigma2 + design.total_quad * sigma2
    sd = math.sqrt(max(variance, 0.0))
    use_trend = n >= 7
    projected = sum(daily)
    z = normal_quantile(0.5 + confidence / 2)
    slope = beta[1] if use_trend else 0.0
    return Forecast(
        projected=projected,
        lower=max(0.0, projected - z * sd),
        upper=projected + z * sd,
        sd=sd,
        daily=daily,
        daily_sd=daily_sd,
        slope_per_day=slope,
        mean_daily=sum(history) / n,
    )


def probability_above(limit: float, mean: float, sd: float) -> float:
    """P(spend > limit) for a normal forecast."""
    if sd <= 0:
        return 1.0 if mean > limit else 0.0
    return 1.0 - statistics.NormalDist(mean, sd).cdf(limit)


def trend_direction(slope_per_day: float, mean_daily: float, *, threshold: float = 0.05) -> str:
    """`increasing` / `decreasing` when the trend changes spend by more than 5% over 30 days."""
    if mean_daily <= 0:
        return "stable"
    change = slope_per_day * 30 / mean_daily
    if change > threshold:
        return "increasing"
    if change < -threshold:
        return "decreasing"
    return "stable"


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return float(sum(map(operator.mul, a, b)))  # the products summed in order, as a plain loop would


def _matvec(m: Sequence[Sequence[float]], v: Sequence[float]) -> list[float]:
    return [_dot(row, v) for row in m]


def _quad(m: Sequence[Sequence[float]], v: Sequence[float]) -> float:
    return _dot(v, _matvec(m, v))


def _inverse(matrix: Sequence[Sequence[float]]) -> list[list[float]]:
    """Gauss-Jordan inverse of a small symmetric matrix; singular directions are dropped (0)."""
    size = len(matrix)
    a = [list(map(float, row)) + [float(i == j) for j in range(size)] for i, row in enumerate(matrix)]
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            for row in a:
                row[col] = 0.0
            continue
        a[col], a[pivot] = a[pivot], a[col]
        factor = a[col][col]
        a[col] = [v / factor for v in a[col]]
        for r in range(size):
            if r != col and a[r][col]:
                f = a[r][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col], strict=True)]
    return [row[size:] for row in a]
