"""Predictive scaling: provision now for the demand one cold start (plus one decision
interval) ahead.

Forecast: Holt's linear method (double exponential smoothing) over the arrival-rate samples
the policy sees on each tick — a smoothed level and a smoothed trend, forecast = level +
trend × horizon, horizon = the model's *measured* cold start (`Demand.cold_start_s`) plus the
interval between decisions, because capacity asked for now takes traffic only that much later.

Why Holt (trend) and no seasonal term: the thing that hurts is a ramp the fleet cannot follow
within one cold start, and a trend term is exactly what sees a ramp coming. A Holt-Winters
seasonal term needs two or more whole seasons of history before it forecasts anything and a
stable period; the traces we scale on (docs/autoscaling.md) have a slow diurnal-ish swing that
the level and trend already track tick by tick, and spikes that are not periodic at all, so a
seasonal term would add state and warm-up time without forecasting the spikes. The trend is
estimated per second (samples may come at uneven intervals) and the forecast is never below 0.

Replicas = ceil(forecast × headroom / (service_rate_per_replica × target_utilisation)) — the
reactive rule applied to the forecast rate, with `headroom` on top — and the decision is the
larger of that and the reactive recommendation for demand already here (a forecast that lags a sudden
step never leaves the queue unserved). The same HPA stabilisation applies, so scale-down waits
the same window as the reactive policy; the price of pre-warming is paid in replica-seconds.
"""

from __future__ import annotations

import math

from ..policy import Demand, ScalingLimits
from ..stabilise import StabilisedPolicy


class PredictivePolicy(StabilisedPolicy):
    name = "predictive"

    def __init__(self, limits: ScalingLimits, *, target_utilisation: float = 0.7, tolerance: float = 0.1,
                 scale_up_window_s: float = 10.0, scale_down_window_s: float = 180.0,
                 alpha: float = 0.5, beta: float = 0.2, headroom: float = 1.1,
                 decision_interval_s: float | None = None) -> None:
        super().__init__(limits, target_utilisation=target_utilisation, tolerance=tolerance,
                         scale_up_window_s=scale_up_window_s, scale_down_window_s=scale_down_window_s)
        if not (0.0 < alpha <= 1.0 and 0.0 <= beta <= 1.0):
            raise ValueError(f"need 0 < alpha <= 1 and 0 <= beta <= 1, got alpha={alpha} beta={beta}")
        if headroom < 1.0:
            raise ValueError(f"headroom must be >= 1, got {headroom}")
        self.alpha, self.beta, self.headroom = alpha, beta, headroom
        self.decision_interval_s = decision_interval_s  # None: the measured gap between decide calls
        self.level: float | None = None
        self.trend = 0.0  # requests/s per second
        self._sample_at: float | None = None
        self._interval = 0.0

    def observe(self, now: float, rate: float) -> None:
        """Fold one arrival-rate sample into the level and trend (Holt's update, per-second trend)."""
        if self.level is None or self._sample_at is None:
            self.level, self._sample_at = rate, now
            return
        dt = now - self._sample_at
        if dt <= 0:
            return
        previous = self.level
        self.level = self.alpha * rate + (1 - self.alpha) * (previous + self.trend * dt)
        self.trend = self.beta * (self.level - previous) / dt + (1 - self.beta) * self.trend
        self._interval, self._sample_at = dt, now

    def forecast(self, horizon_s: float) -> float:
        """Arrival rate expected `horizon_s` from the last sample (>= 0)."""
        if self.level is None:
            return 0.0
        return max(0.0, self.level + self.trend * horizon_s)

    def recommend(self, demand: Demand, current: int) -> tuple[int, str]:
        self.observe(demand.now, demand.arrival_rate)
        now_replicas, now_why = self.reactive_now(demand, current)
        interval = self.decision_interval_s if self.decision_interval_s is not None else self._interval
        horizon = demand.cold_start_s + interval
        expected = self.forecast(horizon)
        per_replica = demand.service_rate_per_replica * self.target_utilisation
        ahead = math.ceil(expected * self.headroom / per_replica - 1e-9) if per_replica > 0 else 0
        why = (f"forecast {expected:.2f} req/s in {horizon:.0f} s (level {self.level or 0.0:.2f}, "
               f"trend {self.trend:+.3f}/s) → {ahead} with headroom {self.headroom:.2f}; now → {now_replicas}: {now_why}")
        return max(now_replicas, ahead), why
