"""Outlier ejection (circuit breaking per replica): a replica that fails `consecutive`
requests in a row — errors, vanishing, stalls — takes no new requests for a while, doubling
with each ejection in a row (capped), as Envoy's outlier detection does. A success resets it.
If every replica of a model is ejected, none is ("panic"): serving on a doubtful replica
beats refusing everything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass
class _Health:
    failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0


class OutlierDetector:
    def __init__(self, consecutive: int = 3, base_eject_s: float = 5.0, max_eject_s: float = 60.0) -> None:
        self.consecutive = consecutive
        self.base_eject_s = base_eject_s
        self.max_eject_s = max_eject_s
        self._health: dict[str, _Health] = {}

    def failure(self, replica_id: str, now: float | None = None) -> bool:
        """Count a failure; True when it ejects the replica."""
        now = time.monotonic() if now is None else now
        h = self._health.setdefault(replica_id, _Health())
        h.failures += 1
        if h.failures < self.consecutive or h.ejected_until > now:
            return False
        duration = min(self.base_eject_s * 2 ** h.ejections, self.max_eject_s)
        h.ejected_until, h.failures = now + duration, 0
        h.ejections += 1
        log.warning("replica %s ejected for %.0fs after %d failures in a row", replica_id, duration, self.consecutive)
        return True

    def success(self, replica_id: str) -> None:
        h = self._health.get(replica_id)
        if h is not None:
            h.failures = 0
            if h.ejected_until <= time.monotonic():
                h.ejections = 0

    def forget(self, replica_id: str) -> None:
        """The replica left the fleet: a later incarnation starts with a clean record."""
        self._health.pop(replica_id, None)

    def ejected(self, replica_id: str, now: float | None = None) -> bool:
        h = self._health.get(replica_id)
        return h is not None and h.ejected_until > (time.monotonic() if now is None else now)

    def admit(self, candidates: Sequence[R], key: Callable[[R], str], now: float | None = None) -> list[R]:
        """The candidates not ejected; all of them when every one is (panic)."""
        healthy = [c for c in candidates if not self.ejected(key(c), now)]
        return healthy or list(candidates)
