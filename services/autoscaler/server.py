"""Autoscaler process: reads heartbeats (fleet view) and the routers' demand reports from NATS,
decides a replica count per model every tick and converges the backend to it; gRPC health and
Prometheus metrics like the other services.

Backends: `kubernetes` (its own process, scaling Deployments), `observe` (its own process,
deciding and exporting metrics only: docker compose cannot add containers), and `local` — the
local backend drives child processes of a LocalStack, so it runs inside `switchyard up`
(`AutoscalerThread`), the same loop in a thread of the process that owns the stack."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nats.aio.msg import Msg

from switchyard.bus.queue import connect, decoded
from switchyard.config import ConfigError, load_config
from switchyard.fleet.view import FleetView
from switchyard.runtime.lifecycle import FleetBackend, Replica, setup_logging, stop_event
from switchyard.runtime.listen import grpc_server_options
from switchyard.runtime.loop import run as run_loop
from switchyard.telemetry.metrics import serve_metrics
from switchyard.tls import client_context
from switchyard.v1 import bus_pb2

from services.router.demand import DEMAND_ALL

from .config import AutoscalerConfig
from .core import Autoscaler, ColdStartStore, PolicyFactory, default_policy_factory

log = logging.getLogger(__name__)


class ObserveBackend(FleetBackend):
    """Changes nothing: the decisions show in logs (the autoscaler logs each change of the
    count it wants) and metrics only (compose, dry runs). Having started nothing, it is asked
    again every tick, so these calls log at debug level."""

    def replicas(self, model: str) -> list[Replica]:
        return []

    def add_replica(self, model: str) -> str:
        log.debug("observe: would add a replica of %s", model)
        return ""

    def remove_replica(self, model: str, replica_id: str) -> None:
        log.debug("observe: would remove replica %s of %s", replica_id, model)


def make_backend(config: AutoscalerConfig) -> FleetBackend:
    if config.backend == "kubernetes":
        from .kubernetes import KubernetesBackend
        return KubernetesBackend.from_environment(config.k8s_namespace, config.k8s_deployment)
    if config.backend == "observe":
        return ObserveBackend()
    raise ConfigError("the local backend drives a LocalStack's processes: it runs inside `switchyard up "
                      "--autoscale`, not as a separate process")


def build(config: AutoscalerConfig, backend: FleetBackend, fleet: FleetView,
          policy_factory: PolicyFactory | None = None) -> Autoscaler:
    return Autoscaler(config.scaling(), backend, fleet, ColdStartStore(config.cold_start_file, config.default_cold_start_s),
                      policy_factory or default_policy_factory(config.options()),
                      service_rate_per_replica=config.service_rate_per_replica, default_slots=config.default_slots,
                      retry_base_s=config.retry_base_s, retry_max_s=config.retry_max_s,
                      measure_service_rate=config.measure_service_rate,
                      service_rate_window_s=config.service_rate_window_s)


async def serve(config: AutoscalerConfig, backend: FleetBackend | None = None, stop: asyncio.Event | None = None,
                policy_factory: PolicyFactory | None = None,
                ready: "threading.Event | None" = None, holder: list[Autoscaler] | None = None) -> None:
    """Run until SIGINT/SIGTERM (or `stop`). `holder` receives the Autoscaler (tests read it)."""
    stop = stop or stop_event()
    backend = backend or make_backend(config)
    metrics_port = serve_metrics(config.metrics_host, config.metrics_port)
    fleet = FleetView(misses=config.heartbeat_misses)
    scaler = build(config, backend, fleet, policy_factory)
    if holder is not None:
        holder.append(scaler)
    wake = asyncio.Event()

    async def on_demand(msg: Msg) -> None:
        report = decoded(msg, bus_pb2.DemandReport, "demand report")
        if report is None:
            return
        if report.model in scaler.models:
            scaler.observe_demand(report)
            if report.waiting and not fleet.live(report.model):
                wake.set()  # scale from zero now, not at the next tick

    tls = client_context(config.tls_ca, config.tls_client_cert, config.tls_client_key) if config.tls_ca else None
    nc = await connect(config.nats_url, name="autoscaler", user=config.nats_user, password=config.nats_password,
                       tls=tls)
    await fleet.subscribe(nc)
    await nc.subscribe(DEMAND_ALL, cb=on_demand)
    server = grpc.aio.server(options=grpc_server_options())
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    grpc_port = server.add_insecure_port(f"{config.host}:{config.grpc_port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if config.port_file:
        config.port_file.write_text(json.dumps({"grpc": grpc_port, "metrics": metrics_port}))
    log.info("autoscaler: %s via %s backend, tick %.1fs, health %s:%d, NATS %s",
             ", ".join(f"{s.model}={s.limits.min_replicas}..{s.limits.max_replicas} {s.policy}"
                       for s in config.scaling()), config.backend, config.tick_s, config.host, grpc_port,
             "over TLS" if tls else "plaintext")
    if ready is not None:
        ready.set()
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            scaler.tick(time.monotonic())
            waker = asyncio.ensure_future(wake.wait())
            await asyncio.wait({stopper, waker}, timeout=config.tick_s, return_when=asyncio.FIRST_COMPLETED)
            waker.cancel()
            wake.clear()
    finally:
        stopper.cancel()
        log.info("autoscaler stopping")
        await health_servicer.enter_graceful_shutdown()
        await server.stop(1.0)
        try:
            await nc.drain()
        except Exception as exc:  # the bus is already going (the stack stops around us)
            log.info("NATS drain skipped: %s", exc)
            await nc.close()


class AutoscalerThread:
    """The autoscaler loop in a thread of the process that owns the backend's processes
    (`switchyard up --autoscale`, tests). stop() ends it and waits."""

    def __init__(self, config: AutoscalerConfig, backend: FleetBackend, policy_factory: PolicyFactory | None = None) -> None:
        self.config = config
        self.backend = backend
        self.policy_factory = policy_factory
        self._holder: list[Autoscaler] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="autoscaler", daemon=True)

    @property
    def autoscaler(self) -> Autoscaler:
        return self._holder[0]

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await serve(self.config, self.backend, self._stop, self.policy_factory, self._ready, self._holder)
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by start() / stop()
            self._error = exc
            self._ready.set()
            log.exception("autoscaler failed")

    def start(self, timeout_s: float = 30.0) -> "AutoscalerThread":
        if self._thread.ident is not None:  # started already (`with AutoscalerThread(...).start()`)
            return self
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            raise RuntimeError(f"autoscaler did not start: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # loop already closed
                pass
        self._thread.join(timeout=15)

    def __enter__(self) -> "AutoscalerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    setup_logging("autoscaler")
    run_loop(serve(load_config(AutoscalerConfig, sys.argv[1:] if argv is None else argv)))
