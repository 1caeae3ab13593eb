"""One model's scaling bounds and policy, as configured (`name=min:max[:policy[:idle_s]]`)."""

from __future__ import annotations

from dataclasses import dataclass

from switchyard.autoscaling.policy import ScalingLimits
from switchyard.config import ConfigError

DEFAULT_POLICY = "reactive"


@dataclass(frozen=True)
class ModelScaling:
    """One model's bounds and policy, from `name=min:max[:policy[:scale_to_zero_after_s]]`."""

    model: str
    limits: ScalingLimits
    policy: str = DEFAULT_POLICY

    @classmethod
    def parse(cls, text: str) -> "ModelScaling":
        name, sep, rest = text.partition("=")
        parts = rest.split(":")
        if not sep or not name.strip() or not 2 <= len(parts) <= 4:
            raise ConfigError(f"models: {text!r} is not name=min:max[:policy[:scale_to_zero_after_s]]")
        try:
            lo, hi = int(parts[0]), int(parts[1])
            idle = float(parts[3]) if len(parts) == 4 and parts[3] else None
            limits = ScalingLimits(min_replicas=lo, max_replicas=hi, scale_to_zero_after_s=idle)
        except ValueError as exc:
            raise ConfigError(f"models: {text!r}: {exc}") from None
        if idle is not None and idle <= 0:
            raise ConfigError(f"models: {text!r}: scale_to_zero_after_s must be positive")
        return cls(name.strip(), limits, (parts[2] if len(parts) >= 3 and parts[2] else DEFAULT_POLICY))
