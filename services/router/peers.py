"""Routers behind one address share what they charged and what they hold, so tenant limits and
model admission hold for the fleet rather than per router.

    switchyard.peers.<router>   RouterUsage   core NATS, router → the other routers, every interval

Each router keeps its tenant buckets and admission counts for its own connections
(`limits.py`). Every `interval_s` it publishes the net charges of the interval (with the
previous few intervals' too, numbered, so one lost message loses nothing) and a snapshot of its
requests in flight per model. A router charges the others' net charges to its own buckets and
counts their in-flight requests in admission until they fall silent for `expiry_intervals`.

What that guarantees: over any stretch of time every router's buckets have been charged what
all routers admitted, so a tenant's long-run rate is its limit whatever the number of routers.
Within one interval the routers do not know of each other's admissions yet: a burst spread over
N routers at the same instant can take up to N× a bucket's capacity, and the buckets then stay
below zero until the refill repays the excess (the tenant is refused everywhere meanwhile).

`PeerUsage` is the pure core (reports built from, and applied to, a limiter and an admission
control), unit-tested with hand-built reports; `PeerSync` is the thin NATS loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator

from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from switchyard.bus.subjects import PEERS_ALL, peers_subject
from switchyard.v1 import bus_pb2

from .limits import AdmissionControl, PeerModelLoad, RateLimiter
from .tenants import Tenant

log = logging.getLogger(__name__)

FORGET_AFTER_S = 600.0  # a router silent this long is forgotten (its charges were counted long ago)
PEER_REPORTS = Counter("switchyard_router_peer_reports", "Usage reports applied from the other routers behind the same address")


class PeerUsage:
    """This router's usage report, and the other routers' reports applied here."""

    def __init__(self, router_id: str, limiter: RateLimiter, admission: AdmissionControl,
                 tenant: Callable[[str], Tenant | None], interval_s: float,
                 expiry_intervals: int = 5, history: int = 4) -> None:
        self.router_id = router_id
        self.epoch = secrets.randbits(63)
        self.limiter = limiter
        self.admission = admission
        self.tenant = tenant  # name → Tenant (the routers share one tenants file); None if unknown here
        self.interval_s = interval_s
        self.expiry_intervals = expiry_intervals
        self._sequence = 0
        self._recent: deque[bus_pb2.IntervalCharges] = deque(maxlen=history)
        self._applied: dict[str, tuple[int, int, float]] = {}  # router → (epoch, last sequence charged, heard at)

    # ---- this router's report -----------------------------------------------------------------
    def report(self, leaving: bool = False) -> bus_pb2.RouterUsage:
        """The interval's net charges (with the last few intervals') and the load now."""
        self._sequence += 1
        charges = [bus_pb2.TenantCharge(tenant=name, requests=r, tokens=t)
                   for name, (r, t) in sorted(self.limiter.drain_charges().items())]
        self._recent.append(bus_pb2.IntervalCharges(sequence=self._sequence, charges=charges))
        models = [] if leaving else [_model_load_to_proto(model, load) for model, load in self.admission.own_load().items()]
        return bus_pb2.RouterUsage(router_id=self.router_id, epoch=self.epoch, interval_s=self.interval_s,
                                   recent=list(self._recent), models=models, leaving=leaving)

    # ---- the others' reports --------------------------------------------------------------------
    def apply(self, usage: bus_pb2.RouterUsage, now: float | None = None) -> bool:
        """Charge another router's new intervals to the tenant buckets here, and count its load
        in admission. False for this router's own report (NATS delivers it back too)."""
        if usage.router_id == self.router_id:
            return False
        now = time.monotonic() if now is None else now
        epoch, last, _ = self._applied.get(usage.router_id, (usage.epoch, 0, now))
        if epoch != usage.epoch:  # restarted: its sequence numbers start again
            last = 0
        new = [interval for interval in usage.recent if interval.sequence > last]
        if last and new and new[0].sequence > last + 1:
            log.warning("router %s: %d usage reports lost; their charges are not counted here",
                        usage.router_id, new[0].sequence - last - 1)
        for interval in new:
            for charge in interval.charges:
                tenant = self.tenant(charge.tenant)
                if tenant is not None:
                    self.limiter.charge(tenant, charge.requests, charge.tokens)
            last = interval.sequence
        self._applied[usage.router_id] = (usage.epoch, last, now)
        for router_id in [r for r, (_, _, heard) in self._applied.items() if now - heard > FORGET_AFTER_S]:
            del self._applied[router_id]  # gone for good (a restarted router has a new id)
        if usage.leaving:
            self.admission.drop_peer(usage.router_id)
        else:  # silent for `expiry_intervals` of the slower of the two intervals (at least 1 s): not counted
            expiry_s = max(self.expiry_intervals * max(self.interval_s, usage.interval_s), 1.0)
            self.admission.set_peer(usage.router_id, {m.model: _model_load_from_proto(m) for m in usage.models},
                                    now + expiry_s)
        return True


def _model_load_to_proto(model: str, load: PeerModelLoad) -> bus_pb2.ModelLoad:
    return bus_pb2.ModelLoad(model=model, requests=load.requests, tokens=load.tokens,
                             tenants=[bus_pb2.TenantLoad(tenant=t, requests=n, tokens=held, weight=w)
                                      for t, (n, held, w) in sorted(load.tenants.items())],
                             completed_requests_per_s=load.completed_requests_per_s,
                             completed_tokens_per_s=load.completed_tokens_per_s)


def _model_load_from_proto(load: bus_pb2.ModelLoad) -> PeerModelLoad:
    return PeerModelLoad(load.requests, load.tokens,
                         {t.tenant: (t.requests, t.tokens, t.weight) for t in load.tenants},
                         load.completed_requests_per_s, load.completed_tokens_per_s)


class PeersCollector(Collector):
    """How many other routers' usage counts here now, read at scrape time (0 with one router,
    or when the others fell silent: then this router's limits are its own connections')."""

    def __init__(self, admission: AdmissionControl) -> None:
        self._admission = admission

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("switchyard_router_peers", "Other routers whose usage reports count here now",
                                value=self._admission.live_peers())


class PeerSync:
    """Publishes this router's usage every `interval_s` and applies the others'."""

    def __init__(self, nc: Client, usage: PeerUsage) -> None:
        self.nc = nc
        self.usage = usage
        self._task: asyncio.Task[None] | None = None
        self._subscription = None
        self._collector = PeersCollector(usage.admission)

    async def _on_report(self, msg: Msg) -> None:
        try:
            report = bus_pb2.RouterUsage.FromString(msg.data)
        except Exception as exc:  # a malformed report loses that report only
            log.warning("unreadable router usage report on %s: %s", msg.subject, exc)
            return
        if self.usage.apply(report):
            PEER_REPORTS.inc()

    async def _publish(self, leaving: bool = False) -> None:
        report = self.usage.report(leaving)
        await self.nc.publish(peers_subject(self.usage.router_id), report.SerializeToString())

    async def _loop(self) -> None:
        while True:
            try:
                await self._publish()
            except Exception as exc:  # the bus is reconnecting: the next report carries these charges too
                log.warning("router usage report not sent: %s", exc)
            await asyncio.sleep(self.usage.interval_s)

    async def start(self) -> None:
        self._subscription = await self.nc.subscribe(PEERS_ALL, cb=self._on_report)
        REGISTRY.register(self._collector)  # unregistered at stop: a process may run serve() again (tests)
        self._task = asyncio.create_task(self._loop(), name="peer-usage")

    async def stop(self) -> None:
        """After the servers stopped: the last charges, and word to forget this router's load."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            REGISTRY.unregister(self._collector)
        try:
            await self._publish(leaving=True)
        except Exception as exc:
            log.warning("last router usage report not sent: %s", exc)
