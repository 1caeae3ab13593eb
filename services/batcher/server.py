"""Batcher process: connects NATS and its worker, runs the scheduler, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchyard.bus.queue import connect, delete_consumer, ensure_request_stream
from switchyard.config import load_config
from switchyard.runtime.lifecycle import setup_logging, stop_event
from switchyard.runtime.loop import run as run_loop
from switchyard.telemetry.metrics import serve_metrics
from switchyard.telemetry.tracing import setup_tracing, shutdown_tracing
from switchyard.tls import client_context, grpc_channel_credentials
from switchyard.v1 import worker_pb2, worker_pb2_grpc

from .config import BatcherConfig
from .scheduler import Scheduler

log = logging.getLogger(__name__)


# Reconnect to the worker within 0.1-1 s, not gRPC's default 1 s doubling to 2 min: a batcher
# started beside its worker (the lifecycle API's parallel start) or outliving a worker restart
# would otherwise wait out a backoff long after the worker listens.
WORKER_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                          ("grpc.max_reconnect_backoff_ms", 1000)]


async def wait_for_serving(channel: grpc.aio.Channel, timeout_s: float = 300.0) -> None:
    """Block until the worker's health says SERVING (a model load can take a while)."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("worker did not become SERVING")
        await asyncio.sleep(0.1)


def _with_token(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), header))


class BearerToken(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the `authorization: Bearer <token>` header to every unary call on the channel."""

    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(_with_token(details, self._header), request)


async def serve(config: BatcherConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or until `stop` is set, when given — tests run services
    in-process that way), then drain."""
    stop = stop or stop_event()
    setup_tracing("switchyard-batcher")
    metrics_port = serve_metrics(config.metrics_host, config.metrics_port)
    channel: grpc.aio.Channel | None = None
    engine_thread: ThreadPoolExecutor | None = None
    worker_health: health_pb2_grpc.HealthStub | None = None
    worker_auth: tuple[tuple[str, str], ...] | None = None
    if config.local_worker:  # co-located: the engine in this process (services/batcher/local_worker.py)
        from services.worker.server import WorkerServicer, load_engine
        from .local_worker import LocalWorker
        worker_config = config.local_worker_config()
        engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        try:  # ProviderError (CUDA asked for, cannot serve) ends the process before it takes requests
            engine = await load_engine(worker_config, engine_thread)
        except BaseException:
            engine_thread.shutdown(wait=False)
            raise
        worker: Any = LocalWorker(WorkerServicer(
            engine_thread, engine, fault_delay_per_token_s=worker_config.fault_delay_per_token_ms / 1000,
            fault_fail_fraction=worker_config.fault_fail_fraction))
        log.info("engine %s in this process on %s", engine.manifest.name, engine.provider)
    else:
        # The worker's token rides on every unary call (health checks need none); the StepStream
        # carries the same header as call metadata (Scheduler): an intercepted stream call would
        # put every step through an extra queue and task.
        worker_auth = (("authorization", f"Bearer {config.worker_token}"),) if config.worker_token else None
        interceptors = [BearerToken(worker_auth[0])] if worker_auth else None
        if config.tls_ca:  # mTLS: the worker checks our certificate, we check its
            channel = grpc.aio.secure_channel(config.worker, grpc_channel_credentials(
                config.tls_ca, config.tls_client_cert, config.tls_client_key), interceptors=interceptors,
                options=WORKER_CHANNEL_OPTIONS)
        else:
            channel = grpc.aio.insecure_channel(config.worker, interceptors=interceptors,
                                                options=WORKER_CHANNEL_OPTIONS)
        await wait_for_serving(channel)
        worker = worker_pb2_grpc.WorkerStub(channel)
        worker_health = health_pb2_grpc.HealthStub(channel)
    info = await worker.Info(worker_pb2.InfoRequest())
    # A batcher owns its worker alone: what a predecessor (crashed, killed) left there is abandoned.
    await worker.RemoveSequences(worker_pb2.RemoveSequencesRequest(all=True))
    replica_id = config.replica_id or f"{info.model}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    scheduler: Scheduler | None = None

    async def restore() -> None:  # a restarted server lost the memory streams and our consumer
        await ensure_request_stream(js)
        if scheduler is not None:
            await scheduler.resubscribe()

    nc = await connect(config.nats_url, name=f"batcher-{replica_id}", on_reconnect=restore,
                       user=config.nats_user, password=config.nats_password,
                       tls=client_context(config.tls_ca, config.tls_client_cert, config.tls_client_key)
                       if config.tls_ca else None)
    js = nc.jetstream()
    await ensure_request_stream(js)
    scheduler = Scheduler(config, replica_id, info, nc, js, worker, worker_health, step_metadata=worker_auth)
    await scheduler.start()
    if config.port_file:
        config.port_file.write_text(json.dumps({"metrics": metrics_port}))
    log.info("batcher %s serving %s via worker %s", replica_id, info.model, config.worker)
    await stop.wait()
    log.info("batcher %s draining", replica_id)
    await scheduler.drain(config.grace_s)
    await delete_consumer(js, replica_id)
    await nc.drain()
    shutdown_tracing()
    log.info("batcher %s stopped", replica_id)
    if channel is not None:
        await channel.close()
    if engine_thread is not None:
        engine_thread.shutdown(wait=True)  # no step is left: let the engine's thread end cleanly


def main(argv: list[str] | None = None) -> None:
    setup_logging("batcher")
    try:
        run_loop(serve(load_config(BatcherConfig, sys.argv[1:] if argv is None else argv)))
    except Exception as exc:
        from services.worker.providers import ProviderError  # only a co-located engine raises it
        if isinstance(exc, ProviderError):  # logged with its reason; exit as a refusing worker does
            log.error("batcher refuses to start: %s", exc)
            sys.exit(3)
        raise
