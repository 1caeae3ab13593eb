"""The scaling policy interface: one decision per model per tick, no I/O.

The same policy objects run in the live autoscaler service (fed from the fleet view and the
router's demand reports over NATS) and in the simulator (`switchyard simulate`, fed by a
discrete-event model of the fleet), so what the simulator shows is what the service does.
One file per policy under `policies/`; `make_scaling_policy(name, limits, **options)` builds one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Demand:
    """What a policy sees for one model at one instant."""

    now: float  # seconds: monotonic clock live, simulated clock in the simulator
    arrival_rate: float  # requests/s arriving for the model, averaged over the last few seconds
    in_flight: int  # requests admitted and not finished (running + waiting for a slot)
    queued: int  # of in_flight, those waiting for a slot (JetStream queue + batcher queue)
    ready_replicas: int  # live replicas taking traffic (not draining)
    starting_replicas: int  # replicas asked for that are not live yet (a cold start under way)
    slots_per_replica: int  # sequences one replica runs at once (its max batch)
    service_rate_per_replica: float  # requests/s one replica completes at full batch (measured)
    cold_start_s: float  # measured for this model: process start → first token possible


@dataclass(frozen=True)
class ScalingLimits:
    """Bounds every decision is clamped to (configured per model)."""

    min_replicas: int = 1
    max_replicas: int = 4
    scale_to_zero_after_s: float | None = None  # idle this long with min_replicas 0 → 0 replicas

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                             f"got min={self.min_replicas} max={self.max_replicas}")

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True)
class Decision:
    """Replicas wanted for a model now, and why (logged, exported as a metric label, shown
    in the simulator's report)."""

    replicas: int
    reason: str


class ScalingPolicy(ABC):
    """Decides one model's replica count. Stateful (stabilisation windows, forecasts), so one
    instance per model; `decide` is called on every tick with that tick's demand, in time order."""

    name: ClassVar[str]

    def __init__(self, limits: ScalingLimits) -> None:
        self.limits = limits

    @abstractmethod
    def decide(self, demand: Demand) -> Decision:
        """The replica count to converge to, already within `self.limits`."""
