"""Routing: which replica (policies/), and which model (difficulty) serves a request.

`make_policy(name, fleet)` builds the policy called `name`; policies are discovered from the
modules of `switchyard.routing.policies`, so a new policy is one new file there.
"""

from __future__ import annotations

import importlib
import pkgutil

from switchyard.fleet.view import FleetView

from . import policies
from .policy import Inflight, NoReplicaError, RoutingPolicy, RoutingRequest

__all__ = ["Inflight", "NoReplicaError", "RoutingPolicy", "RoutingRequest", "make_policy", "policy_names"]


def _discover() -> dict[str, type[RoutingPolicy]]:
    found: dict[str, type[RoutingPolicy]] = {}
    for module_info in pkgutil.iter_modules(policies.__path__):
        module = importlib.import_module(f"{policies.__name__}.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, RoutingPolicy) and value is not RoutingPolicy \
                    and value.__module__ == module.__name__:
                if value.name in found:
                    raise RuntimeError(f"two routing policies are named {value.name!r}")
                found[value.name] = value
    return found


POLICIES: dict[str, type[RoutingPolicy]] = _discover()


def policy_names() -> list[str]:
    return sorted(POLICIES)


def make_policy(name: str, fleet: FleetView | None = None) -> RoutingPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {policy_names()}") from None
    return cls(fleet)
