"""Per-model demand as this router sees it, published for the autoscaler.

    switchyard.demand.<model>   DemandReport   core NATS, router → autoscaler, about every second

`DemandTracker` is pure (counts arrivals, requests waiting for a replica, requests in flight)
and unit-tested with a hand-driven clock; `publish_loop` is the thin NATS loop. A request that
finds no live replica of its model publishes at once (`wake`), so a fleet scaled to zero starts
a replica without waiting for the next tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from nats.aio.client import Client

from switchyard.bus.subjects import token
from switchyard.v1 import bus_pb2

log = logging.getLogger(__name__)

DEMAND_PREFIX = "switchyard.demand"
DEMAND_ALL = f"{DEMAND_PREFIX}.>"


def demand_subject(model: str) -> str:
    return f"{DEMAND_PREFIX}.{token(model)}"


@dataclass
class DemandTracker:
    """Arrivals over a sliding window, and live counts, per model."""

    window_s: float = 10.0
    idle_report_s: float = 60.0  # keep reporting a model this long after its last request (its zeros matter too)
    arrivals: dict[str, deque[float]] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)

    def arrived(self, model: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.arrivals.setdefault(model, deque()).append(now)
        self.last_seen[model] = now

    def started(self, model: str) -> None:
        self.in_flight[model] = self.in_flight.get(model, 0) + 1

    def ended(self, model: str) -> None:
        self.in_flight[model] = max(self.in_flight.get(model, 1) - 1, 0)

    def wait_begins(self, model: str) -> None:
        self.waiting[model] = self.waiting.get(model, 0) + 1

    def wait_ends(self, model: str) -> None:
        self.waiting[model] = max(self.waiting.get(model, 1) - 1, 0)

    def rate(self, model: str, now: float | None = None) -> float:
        """Requests/s over the last `window_s` seconds."""
        now = time.monotonic() if now is None else now
        times = self.arrivals.get(model)
        if not times:
            return 0.0
        while times and now - times[0] > self.window_s:
            times.popleft()
        return len(times) / self.window_s

    def reports(self, router_id: str, interval_s: float, now: float | None = None) -> list[bus_pb2.DemandReport]:
        """One report per model with recent or current demand."""
        now = time.monotonic() if now is None else now
        out = []
        for model in sorted(set(self.last_seen) | set(self.waiting) | set(self.in_flight)):
            active = self.waiting.get(model, 0) or self.in_flight.get(model, 0)
            if not active and now - self.last_seen.get(model, -1e18) > self.idle_report_s:
                continue
            out.append(bus_pb2.DemandReport(
                model=model, router_id=router_id, arrival_rate=self.rate(model, now),
                waiting=self.waiting.get(model, 0),
                in_flight=self.in_flight.get(model, 0) + self.waiting.get(model, 0),
                sent_unix_s=time.time(), interval_s=interval_s, window_s=self.window_s))
        return out


class DemandPublisher:
    """Publishes the tracker's reports every `interval_s`, and at once when woken."""

    def __init__(self, nc: Client, tracker: DemandTracker, router_id: str, interval_s: float = 1.0) -> None:
        self.nc = nc
        self.tracker = tracker
        self.router_id = router_id
        self.interval_s = interval_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def publish_once(self) -> None:
        for report in self.tracker.reports(self.router_id, self.interval_s):
            await self.nc.publish(demand_subject(report.model), report.SerializeToString())

    async def _loop(self) -> None:
        while True:
            try:
                await self.publish_once()
            except Exception as exc:  # the bus is reconnecting; the next tick will go
                log.warning("demand report not sent: %s", exc)
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="demand")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
