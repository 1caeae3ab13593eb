"""Retries that never amplify an overload: exponential backoff with full jitter, capped by a
retry budget.

- `backoff_s(attempt)`: "full jitter" (uniform in [0, min(cap, base × 2^attempt)]), which
  spreads a crowd of clients that failed together instead of synchronising their retries.
- `RetryBudget`: retries may add at most `ratio` of recent requests (plus a small floor so a
  quiet router can still retry), as Envoy's and Finagle's retry budgets do. When a replica
  struggles, clients retrying on every failure multiply its load (a retry storm); a budget
  turns that into a bounded surplus.
"""

from __future__ import annotations

import random
import time
from collections import deque


def backoff_s(attempt: int, base_s: float = 0.05, cap_s: float = 2.0, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (0-based), full jitter."""
    ceiling = min(cap_s, base_s * (2 ** max(attempt, 0)))
    return (rng or random).uniform(0.0, ceiling)


class RetryBudget:
    """At most `ratio` × requests in the last `window_s` seconds, plus `min_per_window`."""

    def __init__(self, ratio: float = 0.2, window_s: float = 10.0, min_per_window: int = 10) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError("retry budget ratio must be between 0 and 1")
        self.ratio = ratio
        self.window_s = window_s
        self.min_per_window = min_per_window
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for q in (self._requests, self._retries):
            while q and now - q[0] > self.window_s:
                q.popleft()

    def on_request(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._requests.append(now)
        self._trim(now)

    def try_retry(self, now: float | None = None) -> bool:
        """Spend one retry if the budget allows; False means: fail instead of retrying."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        if len(self._retries) >= self.min_per_window + self.ratio * len(self._requests):
            return False
        self._retries.append(now)
        return True
