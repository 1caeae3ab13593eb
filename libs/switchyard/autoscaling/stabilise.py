"""What every scaling policy shares: HPA-style stabilisation windows, the tolerance band, the
target-utilisation recommendation and scale to zero.

A policy only says what it would run *now* (`recommend`); this base turns that stream of raw
recommendations into decisions the way Kubernetes' HorizontalPodAutoscaler does (its
`behavior.scaleUp/scaleDown.stabilizationWindowSeconds`): scale up to the *lowest*
recommendation of the short scale-up window (a one-tick blip does not start a replica), scale
down only to the *highest* recommendation of the long scale-down window (capacity is kept
until demand has stayed low for the whole window, so noise around the target never flaps).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import deque

from .policy import Decision, Demand, ScalingLimits, ScalingPolicy


class StabilisedPolicy(ScalingPolicy):
    """Base of the shipped policies; subclasses implement `recommend`."""

    def __init__(self, limits: ScalingLimits, *, target_utilisation: float = 0.7, tolerance: float = 0.1,
                 scale_up_window_s: float = 10.0, scale_down_window_s: float = 180.0) -> None:
        super().__init__(limits)
        if not 0.0 < target_utilisation <= 1.0:
            raise ValueError(f"target_utilisation must be in (0, 1], got {target_utilisation}")
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
        if scale_up_window_s < 0 or scale_down_window_s < 0:
            raise ValueError("stabilisation windows must be >= 0 s")
        self.target_utilisation = target_utilisation
        self.tolerance = tolerance
        self.scale_up_window_s = scale_up_window_s
        self.scale_down_window_s = scale_down_window_s
        self._history: deque[tuple[float, int, bool]] = deque()  # (now, raw recommendation, seeded)
        self._current: int | None = None  # the last decision (what the fleet converges to)
        self._last_busy: float | None = None
        self._last_now: float | None = None

    @abstractmethod
    def recommend(self, demand: Demand, current: int) -> tuple[int, str]:
        """Replicas this policy would run right now (before stabilisation and limits), and why."""

    # -- shared pieces ----------------------------------------------------------------------

    def reactive_now(self, demand: Demand, current: int) -> tuple[int, str]:
        """Target utilisation, as the HPA computes it: the replicas that would bring both the
        concurrency (in flight, queue included, over slots) and the arrival rate (over the
        measured service rate) to `target_utilisation`; within the tolerance band of the
        current count, keep it."""
        by_conc = demand.in_flight / (max(1, demand.slots_per_replica) * self.target_utilisation)
        by_rate = (demand.arrival_rate / (demand.service_rate_per_replica * self.target_utilisation)
                   if demand.service_rate_per_replica > 0 else 0.0)
        desired = max(by_conc, by_rate)
        util = desired * self.target_utilisation / current if current > 0 else math.inf
        why = (f"utilisation {util:.2f} of target {self.target_utilisation:.2f} "
               f"(in flight {demand.in_flight}, queued {demand.queued}, {demand.arrival_rate:.2f} req/s)")
        if current > 0 and abs(desired / current - 1.0) <= self.tolerance:
            return current, why + f", within tolerance {self.tolerance:.2f}"
        return math.ceil(desired - 1e-9), why

    def decide(self, demand: Demand) -> Decision:
        if self._last_now is not None and demand.now < self._last_now:
            raise ValueError(f"demand went back in time: {demand.now} after {self._last_now}")
        self._last_now = demand.now
        if self._current is None:
            # The size found at the first call counts as a recommendation, so a fresh policy
            # (a restarted autoscaler) waits a whole scale-down window before shrinking the fleet.
            self._current = demand.ready_replicas + demand.starting_replicas
            self._history.append((demand.now, self._current, True))  # holds scale-down only
        current = self._current
        busy = demand.in_flight > 0 or demand.queued > 0 or demand.arrival_rate > 0
        if busy or self._last_busy is None:
            self._last_busy = demand.now

        raw, why = self.recommend(demand, current)
        floor = max(1, self.limits.min_replicas)  # 0 only through the idle timer below
        raw = self.limits.clamp(max(raw, floor))
        self._history.append((demand.now, raw, False))
        horizon = max(self.scale_up_window_s, self.scale_down_window_s)
        while self._history and self._history[0][0] < demand.now - horizon:
            self._history.popleft()

        after = self.limits.scale_to_zero_after_s
        if self.limits.min_replicas == 0 and after is not None and not busy \
                and demand.now - self._last_busy >= after:
            self._history.clear()
            return self._set(0, f"idle {demand.now - self._last_busy:.0f} s >= {after:.0f} s: scale to zero")
        if current == 0:
            # Waking from zero: the first request waits in the queue, so no stabilisation delay.
            if busy:
                return self._set(raw, f"wake from zero to {raw}: {why}")
            return self._set(0, "at zero, idle")

        up = min(r for t, r, seeded in self._history if t >= demand.now - self.scale_up_window_s and not seeded)
        down = max(r for t, r, _ in self._history if t >= demand.now - self.scale_down_window_s)
        if current < up:
            return self._set(up, f"scale up {current} → {up}: {why}")
        if current > down:
            return self._set(down, f"scale down {current} → {down} (highest recommendation in the last "
                                   f"{self.scale_down_window_s:.0f} s): {why}")
        if raw < current:
            return self._set(current, f"hold {current}: scale-down stabilisation (highest recommendation in the "
                                      f"last {self.scale_down_window_s:.0f} s is {down}); now {raw}: {why}")
        if raw > current:
            return self._set(current, f"hold {current}: scale-up stabilisation (lowest recommendation in the "
                                      f"last {self.scale_up_window_s:.0f} s is {up}); now {raw}: {why}")
        return self._set(current, f"hold {current}: {why}")

    def _set(self, replicas: int, reason: str) -> Decision:
        if replicas != 0:
            replicas = self.limits.clamp(replicas)
        self._current = replicas
        return Decision(replicas, reason)
