"""A replica's capacity measured from its heartbeats: completions per second while it is full.

Why: the policies size the fleet with `service_rate_per_replica` (requests/s one replica
completes at full batch). A configured figure is right for one machine, one model and one
request mix only; the heartbeats (`LoadReport`) already carry what measures it — `completed`
(requests finished since start), `running`, `max_batch_size` and `queue_depth`. Between two
reports of one replica that was saturated at both (its batch full, or requests queued for it),
Δcompleted / Δt is what it completes at capacity for the requests it is getting now. The
estimate is the sum of those completions over the sum of those intervals, over the last
`window_s`, across the model's replicas. Until `min_saturated_s` of saturated time is seen it
is None (the caller keeps its configured figure); once measured, a quiet spell keeps the last
estimate rather than forgetting it. Pure: no I/O, hand-driven clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class _Last:
    sent_at: float
    completed: int
    saturated: bool


@dataclass
class ServiceRateEstimator:
    """Completions/s per replica at capacity, for one model."""

    window_s: float = 60.0
    min_saturated_s: float = 5.0
    min_completions: int = 4
    _last: dict[str, _Last] = field(default_factory=dict)
    _spans: deque[tuple[float, int, float]] = field(default_factory=deque)  # (end, Δcompleted, Δt) saturated
    _estimate: float | None = None
    _latest: float = float("-inf")  # the newest report's time: the window ends there

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.min_saturated_s <= 0 or self.min_saturated_s > self.window_s:
            raise ValueError("need 0 < min_saturated_s <= window_s")

    @staticmethod
    def saturated(running: int, max_batch_size: int, queue_depth: int) -> bool:
        """Full: every slot taken, or requests waiting for this replica (some other limit,
        a token budget, binds first)."""
        return queue_depth > 0 or (max_batch_size > 0 and running >= max_batch_size)

    def observe(self, replica_id: str, sent_at: float, completed: int, saturated: bool) -> None:
        """One heartbeat of a replica (the same report seen twice is ignored; a restarted
        replica, whose counter went back, starts over)."""
        last = self._last.get(replica_id)
        if last is not None and sent_at <= last.sent_at:
            return
        if last is not None and completed >= last.completed and last.saturated and saturated:
            self._spans.append((sent_at, completed - last.completed, sent_at - last.sent_at))
        self._last[replica_id] = _Last(sent_at, completed, saturated)
        self._latest = max(self._latest, sent_at)

    def forget(self, live: set[str]) -> None:
        """Drop replicas that left the fleet."""
        for rid in [r for r in self._last if r not in live]:
            del self._last[rid]

    def rate(self) -> float | None:
        """Completions/s per replica at capacity over the `window_s` before the newest report
        (the heartbeats' own clock), or the last such estimate, or None before there is one."""
        while self._spans and self._spans[0][0] < self._latest - self.window_s:
            self._spans.popleft()
        seconds = sum(dt for _, _, dt in self._spans)
        done = sum(n for _, n, _ in self._spans)
        if seconds >= self.min_saturated_s and done >= self.min_completions:
            self._estimate = done / seconds
        return self._estimate


__all__ = ["ServiceRateEstimator"]
