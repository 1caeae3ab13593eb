"""The fleet view: the one reader of replica heartbeats (router, autoscaler and rollouts share it)."""

from .prefix_index import PrefixIndex
from .view import FleetView, ReplicaState

__all__ = ["FleetView", "PrefixIndex", "ReplicaState"]
