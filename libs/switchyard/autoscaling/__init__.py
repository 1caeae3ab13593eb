"""Autoscaling: how many replicas of a model to run (policies/), and a fleet simulator.

`make_scaling_policy(name, limits, **options)` builds the policy called `name`; policies are
discovered from the modules of `switchyard.autoscaling.policies`, so a new policy is one new
file there. The same objects run in the autoscaler service and in `switchyard simulate`.
"""

from __future__ import annotations

import inspect

from switchyard.discovery import discover

from . import policies
from .policy import Decision, Demand, ScalingLimits, ScalingPolicy

__all__ = ["Decision", "Demand", "ScalingLimits", "ScalingPolicy", "make_scaling_policy",
           "scaling_policy_names"]


POLICIES: dict[str, type[ScalingPolicy]] = discover(policies, ScalingPolicy, "scaling")


def scaling_policy_names() -> list[str]:
    return sorted(POLICIES)


def make_scaling_policy(name: str, limits: ScalingLimits, **options: object) -> ScalingPolicy:
    """The policy called `name`, bounded by `limits`; `options` are its keyword parameters
    (an unknown option is an error naming the ones it takes)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown scaling policy {name!r}; choose one of {scaling_policy_names()}") from None
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "limits")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"scaling policy {name!r} takes no option(s) {unknown}; it takes {accepted}")
    return cls(limits, **options)  # type: ignore[arg-type]
