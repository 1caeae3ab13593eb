"""Which routing policy serves each model: a default plus per-model overrides (config
`--balancing` and `--routing-policies model=policy,...`), one policy object per model so
each keeps its own in-flight accounting and cache knowledge."""

from __future__ import annotations

from typing import Iterable

from switchyard.fleet.view import FleetView

from . import make_policy, policy_names
from .policy import RoutingPolicy


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """`["model=policy", ...]` → {model: policy}; raises ValueError naming what to fix."""
    out: dict[str, str] = {}
    for item in items:
        model, sep, policy = item.partition("=")
        if not sep or not model.strip() or not policy.strip():
            raise ValueError(f"routing policy override {item!r} must look like model=policy")
        if policy.strip() not in policy_names():
            raise ValueError(f"routing policy {policy.strip()!r} for {model.strip()!r} is unknown; "
                             f"choose one of {policy_names()}")
        out[model.strip()] = policy.strip()
    return out


class RoutingTable:
    def __init__(self, fleet: FleetView, default: str = "least_loaded",
                 overrides: dict[str, str] | None = None) -> None:
        if default not in policy_names():
            raise ValueError(f"unknown routing policy {default!r}; choose one of {policy_names()}")
        self.fleet = fleet
        self.default = default
        self.overrides = dict(overrides or {})
        self._policies: dict[str, RoutingPolicy] = {}

    def policy_name(self, model: str) -> str:
        return self.overrides.get(model, self.default)

    def policy_for(self, model: str) -> RoutingPolicy:
        policy = self._policies.get(model)
        if policy is None:
            policy = self._policies[model] = make_policy(self.policy_name(model), self.fleet)
        return policy
