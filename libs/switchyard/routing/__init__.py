"""Routing: which replica (policies/), and which model (difficulty) serves a request.

`make_policy(name, fleet)` builds the policy called `name`; policies are discovered from the
modules of `switchyard.routing.policies`, so a new policy is one new file there.
"""

from __future__ import annotations

from switchyard.discovery import discover
from switchyard.fleet.view import FleetView

from . import policies
from .policy import Inflight, NoReplicaError, RoutingPolicy, RoutingRequest

__all__ = ["Inflight", "NoReplicaError", "RoutingPolicy", "RoutingRequest", "make_policy", "policy_names"]


POLICIES: dict[str, type[RoutingPolicy]] = discover(policies, RoutingPolicy, "routing")


def policy_names() -> list[str]:
    return sorted(POLICIES)


def make_policy(name: str, fleet: FleetView | None = None) -> RoutingPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {policy_names()}") from None
    return cls(fleet)
