"""Router process: gRPC and OpenAI-compatible HTTP front ends over one request pipeline;
the fleet view is fed from NATS heartbeats and routing policies choose among its replicas."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from switchyard.bus.queue import connect, ensure_request_stream
from switchyard.config import load_config
from switchyard.fleet.view import FleetView
from switchyard.model.catalog import ModelCatalog
from switchyard.reporting.records import RecordWriter
from switchyard.routing.model_routes import ModelRouter
from switchyard.routing.table import RoutingTable, parse_overrides
from switchyard.runtime.lifecycle import setup_logging, stop_event
from switchyard.runtime.listen import grpc_server_options, listening_socket
from switchyard.runtime.loop import run as run_loop
from switchyard.telemetry.grpc_context import TraceContextInterceptor
from switchyard.telemetry.metrics import serve_metrics
from switchyard.telemetry.tracing import setup_tracing, shutdown_tracing
from switchyard.tls import client_context, grpc_server_credentials
from switchyard.v1 import generate_pb2

from .config import RouterConfig, httptools_importable
from .demand import DemandPublisher
from .dispatch import Dispatcher
from .grpc_api import GenerationServicer, add_generation_servicer, enable_reflection
from .http_api import create_http_app
from .limits import AdmissionControl, RateLimiter
from .peers import PeerSync, PeerUsage
from .pipeline import RequestPipeline, ResilienceConfig
from .rollouts import RolloutManager, add_rollout_routes
from .observe import RequestObserver, ServedModelsCollector
from .tenants import TenantDirectory

log = logging.getLogger(__name__)
GENERATION_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


class HttpFrontEnd:
    """uvicorn serving the HTTP app inside the router's event loop (signals stay ours)."""

    def __init__(self, app: Callable[..., Any], host: str, port: int, grace_s: float = 5.0,
                 tls: tuple[Path, Path] | None = None, share_port: bool = False, http_impl: str = "auto") -> None:
        self.sock = listening_socket(host, port, share_port)
        self.port = self.sock.getsockname()[1]
        if http_impl == "auto":  # httptools (C) is a dependency; a machine without it still serves
            http_impl = "httptools" if httptools_importable() else "h11"
        self.http_impl = http_impl
        # A hard limit on the drain: streams still open `grace_s` after SIGTERM are cut, so a
        # router stop never waits on a slow or endless stream.
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                                    http=http_impl,
                                                    timeout_graceful_shutdown=grace_s,
                                                    ssl_certfile=tls[0] if tls else None,
                                                    ssl_keyfile=tls[1] if tls else None))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Server.serve() would install its own signal handlers over ours; _serve() is the
        # same without them (stable across uvicorn releases).
        self._task = asyncio.create_task(self.server._serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task


async def serve(config: RouterConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or until `stop` is set, when given — tests run services
    in-process that way), then drain."""
    stop = stop or stop_event()
    setup_tracing("switchyard-router")
    metrics_port = serve_metrics(config.metrics_host, config.metrics_port)
    writer = RecordWriter(config.records_dir) if config.records_dir else None
    router_id = config.router_id or f"router-{uuid.uuid4().hex[:8]}"
    async def restore() -> None:  # a restarted server lost the memory streams
        await ensure_request_stream(js)

    nats_tls = (client_context(config.tls_ca, config.tls_client_cert, config.tls_client_key)
                if config.tls_ca else None)
    nc = await connect(config.nats_url, name=router_id, on_reconnect=restore,
                       user=config.nats_user, password=config.nats_password, tls=nats_tls)
    js = nc.jetstream()
    await ensure_request_stream(js)
    fleet = FleetView(misses=config.heartbeat_misses)
    await fleet.subscribe(nc)
    # A waiting stream checks its replica's health at least this often (and at half the stall timeout).
    dispatcher = Dispatcher(nc, js, router_id, max_buffered_events=config.max_buffered_events,
                            poke_interval_s=min(1.0, config.stall_timeout_s / 2))
    await dispatcher.start()
    routing = RoutingTable(fleet, config.balancing, parse_overrides(config.routing_policies))
    tenants = TenantDirectory.load(config.tenants_file) if config.tenants_file else TenantDirectory.disabled()
    catalog = ModelCatalog(config.models_dir)
    rollouts = RolloutManager(router_id, catalog, config.rollout_interval_s, config.shadow_max_inflight,
                              config.records_dir)
    limiter, admission = RateLimiter(), AdmissionControl(config.queue_limit, config.token_queue_factor)
    pipeline = RequestPipeline(catalog, fleet, dispatcher, routing, rollouts=rollouts,
                               tenants=tenants, limiter=limiter, admission=admission,
                               observer=RequestObserver(writer),
                               model_router=ModelRouter.from_config(config.model_routes),
                               resilience=ResilienceConfig(max_failovers=config.max_failovers,
                                                           stall_timeout_s=config.stall_timeout_s,
                                                           retry_budget_ratio=config.retry_budget_ratio,
                                                           replica_wait_s=config.replica_wait_s))
    served_models = ServedModelsCollector(pipeline.served_models)
    REGISTRY.register(served_models)  # unregistered at stop: a process may run serve() again (tests)
    demand = DemandPublisher(nc, pipeline.demand, router_id, config.demand_interval_s)
    pipeline.demand_wake = demand.wake
    demand.start()
    peers = None
    if config.peer_sync_interval_s > 0:  # the other routers behind this address count this one's usage
        peers = PeerSync(nc, PeerUsage(router_id, limiter, admission, tenants.find, config.peer_sync_interval_s))
        await peers.start()
    await rollouts.start(js, pipeline)  # rollout state read before serving, then watched

    server = grpc.aio.server(interceptors=[TraceContextInterceptor()], options=grpc_server_options(config.share_port))
    add_generation_servicer(GenerationServicer(pipeline, config.write_timeout_s), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, (GENERATION_SERVICE, health.SERVICE_NAME))
    grpc_address = f"{config.host}:{config.grpc_port}"
    gateway_tls = (config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
    try:
        grpc_port = (server.add_secure_port(grpc_address, grpc_server_credentials(*gateway_tls)) if gateway_tls
                     else server.add_insecure_port(grpc_address))
    except RuntimeError as exc:  # grpc says only "Failed to bind"
        raise SystemExit(f"router: cannot listen for gRPC on {grpc_address} ({exc}): the port is in use or the "
                         "address is not this host's; choose another --grpc-port or --host") from exc
    await server.start()
    http = None
    if config.http_port >= 0:
        app = create_http_app(pipeline, max_body_bytes=config.max_body_bytes,
                              request_timeout_s=config.request_timeout_s, write_timeout_s=config.write_timeout_s)
        add_rollout_routes(app, rollouts, pipeline, config.admin_key)
        try:
            http = HttpFrontEnd(app, config.host, config.http_port, grace_s=config.grace_s, tls=gateway_tls,
                                share_port=config.share_port, http_impl=config.http_impl)
        except OSError as exc:
            raise SystemExit(f"router: cannot listen for HTTP on {config.host}:{config.http_port} ({exc}); "
                             "choose another --http-port (-1 turns the HTTP API off)") from exc
        await http.start()
    for name in ("", GENERATION_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.port_file:
        config.port_file.write_text(json.dumps({"grpc": grpc_port, "http": http.port if http else None,
                                                "metrics": metrics_port}))
    log.info("router %s: gRPC %s:%d, HTTP %s, routing %s%s, auth %s", router_id, config.host, grpc_port,
             f"{config.host}:{http.port} ({http.http_impl})" if http else "off", config.balancing,
             "".join(f", {m}={p}" for m, p in routing.overrides.items()),
             "on" if tenants.required else "off")
    await stop.wait()
    log.info("router stopping")
    await health_servicer.enter_graceful_shutdown()
    if http is not None:
        await http.stop()
    await server.stop(config.grace_s)
    await demand.stop()
    if peers is not None:
        await peers.stop()
    await rollouts.stop()
    await dispatcher.stop()
    REGISTRY.unregister(served_models)
    await nc.drain()
    if writer is not None:
        for usage in fleet.usage():
            writer.write_replica(usage)
        writer.close()
    shutdown_tracing()


def main(argv: list[str] | None = None) -> None:
    setup_logging("router")
    run_loop(serve(load_config(RouterConfig, sys.argv[1:] if argv is None else argv)))
