"""Reactive scaling: target utilisation, as Kubernetes' HorizontalPodAutoscaler does it.

Utilisation is what is in flight (running plus queued) over the slots of the replicas, and the
arrival rate over their measured service rate; the policy asks for the replicas that bring the
larger of the two to the target, ignores changes within the tolerance band, and stabilises
(short window up, long window down — see `switchyard.autoscaling.stabilise`). It only sees
demand that has already arrived, so new capacity lands one cold start after the load did.
"""

from __future__ import annotations

from ..policy import Demand, ScalingLimits
from ..stabilise import StabilisedPolicy


class ReactivePolicy(StabilisedPolicy):
    name = "reactive"

    def __init__(self, limits: ScalingLimits, *, target_utilisation: float = 0.7, tolerance: float = 0.1,
                 scale_up_window_s: float = 10.0, scale_down_window_s: float = 180.0) -> None:
        super().__init__(limits, target_utilisation=target_utilisation, tolerance=tolerance,
                         scale_up_window_s=scale_up_window_s, scale_down_window_s=scale_down_window_s)

    def recommend(self, demand: Demand, current: int) -> tuple[int, str]:
        return self.reactive_now(demand, current)
