"""Router process: gRPC API over the request pipeline; registry fed from NATS."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from switchyard.bus.queue import connect, ensure_request_stream
from switchyard.config import load_config
from switchyard.model.catalog import ModelCatalog
from switchyard.runtime.lifecycle import setup_logging, stop_event
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from .balancing import make_policy
from .config import RouterConfig
from .dispatch import Dispatcher
from .grpc_api import GenerationServicer
from .pipeline import RequestPipeline
from .registry import ReplicaRegistry

log = logging.getLogger(__name__)
GENERATION_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


async def serve(config: RouterConfig) -> None:
    stop = stop_event()
    router_id = config.router_id or f"router-{uuid.uuid4().hex[:8]}"
    nc = await connect(config.nats_url, name=router_id)
    js = nc.jetstream()
    await ensure_request_stream(js)
    registry = ReplicaRegistry(misses=config.heartbeat_misses)
    dispatcher = Dispatcher(nc, js, router_id, registry)
    await dispatcher.start()
    pipeline = RequestPipeline(ModelCatalog(config.models_dir), registry, dispatcher, make_policy(config.balancing))

    server = grpc.aio.server()
    generate_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(pipeline), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.grpc_port}")
    await server.start()
    for name in ("", GENERATION_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.port_file:
        config.port_file.write_text(str(port))
    log.info("router %s: gRPC on %s:%d, balancing %s", router_id, config.host, port, config.balancing)
    await stop.wait()
    log.info("router stopping")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    await nc.drain()


def main(argv: list[str] | None = None) -> None:
    setup_logging("router")
    asyncio.run(serve(load_config(RouterConfig, sys.argv[1:] if argv is None else argv)))
