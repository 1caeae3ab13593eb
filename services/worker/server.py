"""Worker gRPC server: a thin servicer over the Engine, which runs on one dedicated thread so
health checks and cancellations are answered while a step computes."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator
from typing import Any, Callable, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from switchyard.model.config import ModelManifest
from switchyard.model.folder import graph_kind
from switchyard.runtime.lifecycle import setup_logging, stop_event
from switchyard.runtime.listen import grpc_server_options
from switchyard.runtime.loop import run as run_loop
from switchyard.telemetry.metrics import serve_metrics
from switchyard.telemetry.tracing import setup_tracing, shutdown_tracing
from switchyard.tls import grpc_server_credentials
from switchyard.v1 import generate_pb2, worker_pb2, worker_pb2_grpc

from .config import WorkerConfig
from .engine import Engine, EngineError, StepResult
from .providers import ProviderError, assert_provider, resolve_provider
from .sampling import SamplingParams
from .telemetry import record_prefix_cache, record_sequence_spans, record_step

log = logging.getLogger(__name__)
T = TypeVar("T")


def sampling_from_proto(p: generate_pb2.SamplingParams) -> SamplingParams:
    """Proto → domain, applying defaults for unset (zero) fields."""
    return SamplingParams(
        temperature=max(p.temperature, 0.0),
        top_k=max(p.top_k, 0),
        top_p=p.top_p if 0.0 < p.top_p <= 1.0 else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty > 0 else 1.0,
    )


def step_response_to_proto(result: Any) -> worker_pb2.StepResponse:
    """The engine's StepResult as the wire message."""
    cached = result.cached_prompt_tokens
    return worker_pb2.StepResponse(
        tokens=[worker_pb2.SequenceToken(sequence_id=s, token_id=t, first=f,
                                         cached_prompt_tokens=cached.get(s, 0) if f else 0)
                for s, t, f in result.tokens],
        prefill_remaining=result.prefill_remaining,
        stats=worker_pb2.StepStats(decode_batch_size=result.decode_batch_size, decode_steps=result.decode_steps,
                                   prefill_tokens=result.prefill_tokens, prefill_s=result.prefill_s,
                                   decode_s=result.decode_s, sample_s=result.sample_s))


class EngineUnavailable(Exception):
    """The model is still loading or failed to load."""


def _needs_engine(method: Callable[..., Any]) -> Callable[..., Any]:
    """Maps EngineUnavailable to gRPC UNAVAILABLE."""
    async def wrapper(self: "WorkerServicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except EngineUnavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is not loaded")
    wrapper.__name__ = method.__name__
    return wrapper


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Registered before the model loads (so health answers during a slow load); calls get
    UNAVAILABLE until `engine` is set."""

    def __init__(self, executor: ThreadPoolExecutor, engine: Engine | None = None,
                 fault_delay_per_token_s: float = 0.0, fault_fail_fraction: float = 0.0) -> None:
        self.engine = engine
        self.fault_delay_per_token_s = fault_delay_per_token_s  # test-only faults (WorkerConfig)
        self.fault_fail_fraction = fault_fail_fraction
        self._executor = executor
        self.last_call = time.monotonic()  # of the batcher's last engine call (the lease)

    @property
    def _engine(self) -> Engine:
        if self.engine is None:
            raise EngineUnavailable
        return self.engine

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        self.last_call = time.monotonic()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def info(self) -> worker_pb2.InfoResponse:
        """What the batcher learns of its worker: limits, tokens, load and the prefix cache."""
        e = self._engine
        info = worker_pb2.InfoResponse(
            model=e.manifest.name, context_length=e.context_length, max_sequences=e.max_sequences,
            vocab_size=e.config.vocab_size, eos_token_ids=list(e.manifest.eos_token_ids),
            max_output_tokens=e.manifest.max_output_tokens,
            execution_provider=e.provider, active_sequences=len(e.sequences), kv_tokens=e.kv_tokens)
        if e.prefix_cache is not None:  # read from the event loop's thread: the cache locks its table
            s = e.prefix_cache.stats()
            info.cached_blocks.extend(e.prefix_cache.held())
            info.block_size = s.block_size
            info.prefix_cache.CopyFrom(worker_pb2.PrefixCacheStats(
                bytes_used=s.bytes_used, capacity_bytes=s.capacity_bytes, blocks=s.blocks,
                query_tokens=s.query_tokens, hit_tokens=s.hit_tokens,
                blocks_stored=s.stored_blocks, blocks_evicted=s.evicted_blocks))
        return info

    @_needs_engine
    async def Info(self, request: worker_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> worker_pb2.InfoResponse:
        return self.info()

    def _planted_failure(self, sequence_id: str) -> bool:
        """Test-only: the same sequence always fails (the batcher's one-by-one retry of a refused
        batch sees the same answer), a `fault_fail_fraction` share of them."""
        return (self.fault_fail_fraction > 0
                and zlib.crc32(sequence_id.encode()) / 2**32 < self.fault_fail_fraction)

    def _add(self, specs: Any) -> int:
        """All or none: a refused request leaves no sequence of it behind."""
        for spec in specs:
            if self._planted_failure(spec.sequence_id):
                raise EngineError(f"planted fault: sequence {spec.sequence_id} refused (--fault-fail-fraction)")
        self._engine.add_many([dict(sequence_id=spec.sequence_id, prompt=list(spec.prompt_token_ids),
                                    params=sampling_from_proto(spec.sampling), seed=spec.seed,
                                    traceparent=spec.traceparent, generated_offset=spec.generated_offset)
                               for spec in specs])
        return len(self._engine.sequences)

    @_needs_engine
    async def AddSequences(self, request: worker_pb2.AddSequencesRequest, context: grpc.aio.ServicerContext) -> worker_pb2.AddSequencesResponse:
        try:
            active = await self._call(self._add, request.sequences)
        except EngineError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return worker_pb2.AddSequencesResponse(active_sequences=active)

    async def run_step(self, request: worker_pb2.StepRequest, singly: bool = False) -> worker_pb2.StepResponse:
        """One iteration, answered on the wire (see `step`)."""
        result, refused = await self.step(request, singly)
        response = step_response_to_proto(result)
        response.refused_sequences.update(refused)
        return response

    async def step(self, request: worker_pb2.StepRequest, singly: bool = False) -> tuple[StepResult, dict[str, str]]:
        """One iteration: the engine's StepResult and the newcomers refused alone (sequence id →
        why). Unary Step (``singly`` False): all or none, EngineError when an add or chunk is
        refused. StepStream (``singly``): refused adds and chunks are answered per sequence and
        the rest of the step runs, so a bad newcomer never costs the batch a step (nor the
        batcher a round trip per newcomer)."""
        chunks = [(c.sequence_id, c.max_tokens) for c in request.prefill]
        e = self._engine
        removed: list[Any] = []
        refused: dict[str, str] = {}

        def run() -> StepResult:
            # Finished sequences leave first: their rows are free before anything joins.
            removed.extend(e.remove(list(request.remove)) if request.remove else ())
            # Atomic for its adds: refused adds leave none behind, and prefill chunks are checked
            # before anything runs (else the adds are undone), so the batcher's one-by-one retry
            # never finds a sequence "already exists".
            try:
                self._add(request.add)
            except EngineError:
                if not singly:
                    raise
                for spec in request.add:
                    try:
                        self._add([spec])
                    except EngineError as one:
                        refused[spec.sequence_id] = str(one)
            unknown = [sid for sid, _ in chunks if sid not in e.sequences and sid not in refused]
            if unknown and not singly:
                for spec in request.add:
                    e.sequences.pop(spec.sequence_id, None)
                raise EngineError(f"unknown sequence {unknown[0]!r} in prefill")
            refused.update((sid, f"unknown sequence {sid!r} in prefill") for sid in unknown)
            return e.step([c for c in chunks if c[0] not in refused], request.decode, max(request.decode_steps, 1))
        try:
            result = await self._call(run)
        finally:
            record_sequence_spans(removed, e.manifest.name)
        if self.fault_delay_per_token_s and result.tokens:  # test-only: a planted slow version
            await asyncio.sleep(self.fault_delay_per_token_s * max(request.decode_steps, 1))
        record_step(e.manifest.name, result.prefill_s, result.decode_s, result.decode_batch_size, e.kv_tokens,
                    len(e.sequences), e.max_sequences * e.context_length)
        record_prefix_cache(e.manifest.name, e.prefix_cache)
        return result, refused

    @_needs_engine
    async def Step(self, request: worker_pb2.StepRequest, context: grpc.aio.ServicerContext) -> worker_pb2.StepResponse:
        try:
            return await self.run_step(request)
        except EngineError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort raises; this keeps type checkers honest

    async def StepStream(self, requests: AsyncIterator[worker_pb2.StepRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.StepResponse]:
        """Requests run strictly in arrival order, each answered in turn; a refused newcomer is
        refused alone (``refused_sequences``) and the stream goes on."""
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is not loaded")
        async for request in requests:
            try:
                yield await self.run_step(request, singly=True)
            except EngineError as exc:
                yield worker_pb2.StepResponse(refused=str(exc))

    async def remove(self, request: worker_pb2.RemoveSequencesRequest) -> worker_pb2.RemoveSequencesResponse:
        """Frees the given sequences (or all: what a previous batcher left)."""
        ids = list(self._engine.sequences) if request.all else list(request.sequence_ids)
        removed = await self._call(self._engine.remove, ids)
        if request.all and removed:
            log.warning("freed %d sequences left by a previous batcher", len(removed))
        record_sequence_spans(removed, self._engine.manifest.name)
        record_prefix_cache(self._engine.manifest.name, self._engine.prefix_cache)
        return worker_pb2.RemoveSequencesResponse(active_sequences=len(self._engine.sequences))

    @_needs_engine
    async def RemoveSequences(self, request: worker_pb2.RemoveSequencesRequest, context: grpc.aio.ServicerContext) -> worker_pb2.RemoveSequencesResponse:
        return await self.remove(request)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health checks must carry `authorization: Bearer <token>`: only the
    batcher given the replica's token may drive this worker (UNAUTHENTICATED otherwise)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong worker token")
        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        return self._deny_stream if handler is not None and handler.request_streaming else self._deny


async def load_engine(config: WorkerConfig, executor: ThreadPoolExecutor) -> Engine:
    """The model on its provider, built on the engine's thread ("auto" resolved and logged).
    Raises ProviderError when CUDA is asked for and cannot serve (not loadable, no session, or
    a session that fell back to the CPU): the process must refuse to start rather than run
    silently on the CPU. The worker's server and a batcher hosting its engine share this."""
    provider = config.provider
    try:
        provider = resolve_provider(config.provider)
        cuda_graph = config.use_cuda_graph(provider, graph_kind(ModelManifest.load(config.model_dir)))
        engine = await asyncio.get_running_loop().run_in_executor(
            executor, lambda: Engine(config.model_dir, max_sequences=config.max_sequences,
                                     threads=config.threads, provider=provider, spin=config.spin,
                                     cuda_graph=cuda_graph, device_sampling=config.device_sampling,
                                     device_prefix_cache=config.device_prefix_cache,
                                     prefix_cache_bytes=config.prefix_cache_mib << 20))
        assert_provider([engine.provider], provider)
    except ProviderError:
        raise
    except Exception as exc:
        if provider == "cuda":
            raise ProviderError(f"the engine could not start on CUDA: {type(exc).__name__}: {exc}") from exc
        raise
    if config.served_name:  # heartbeats, metrics and prefix-cache hashes under name@version
        engine.manifest = dataclasses.replace(engine.manifest, name=config.served_name)
    return engine


async def serve(config: WorkerConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or until `stop` is set, when given — tests run services
    in-process that way), then drain."""
    stop = stop or stop_event()
    setup_tracing("switchyard-worker")
    metrics_port = serve_metrics(config.metrics_host, config.metrics_port)
    server = grpc.aio.server(interceptors=[BearerTokenInterceptor(config.auth_token)] if config.auth_token else [],
                             options=grpc_server_options())  # one worker per port: a stale one is refused
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    port = (server.add_secure_port(address, grpc_server_credentials(config.tls_cert, config.tls_key, config.tls_ca))
            if config.tls_cert and config.tls_key else server.add_insecure_port(address))
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    servicer = WorkerServicer(executor, fault_delay_per_token_s=config.fault_delay_per_token_ms / 1000,
                              fault_fail_fraction=config.fault_fail_fraction)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    await server.start()
    try:
        engine = await load_engine(config, executor)
    except ProviderError as refusal:
        log.error("worker refuses to start: %s", refusal)
        await server.stop(0)
        executor.shutdown(wait=False)
        raise
    except Exception:
        log.exception("model %s cannot run; health stays NOT_SERVING", config.model_dir)
        await stop.wait()
        await server.stop(config.grace_s)
        return
    if config.fault_delay_per_token_ms or config.fault_fail_fraction:
        log.warning("TEST-ONLY faults on: %.1f ms per token, %.0f%% of sequences refused",
                    config.fault_delay_per_token_ms, 100 * config.fault_fail_fraction)
    if config.fault_start_delay_s:  # test-only: a longer cold start (health stays NOT_SERVING meanwhile)
        log.warning("TEST-ONLY start delay: serving in %.1fs", config.fault_start_delay_s)
        try:
            await asyncio.wait_for(stop.wait(), timeout=config.fault_start_delay_s)
        except TimeoutError:
            pass
    servicer.engine = engine
    for name in ("", worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.port_file:
        config.port_file.write_text(json.dumps({"grpc": port, "metrics": metrics_port}))
    log.info("worker serving %s on %s:%d (%s), token %s", engine.manifest.name, config.host, port, engine.provider,
             "required" if config.auth_token else "not required")
    lease = asyncio.create_task(expire_abandoned_sequences(servicer, engine, config.lease_s))
    await stop.wait()
    lease.cancel()
    log.info("worker stopping")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    executor.shutdown(wait=True)  # no call is left: let the engine thread finish cleanly
    shutdown_tracing()


async def expire_abandoned_sequences(servicer: WorkerServicer, engine: Engine, lease_s: float) -> None:
    """A batcher steps its worker continuously while it holds sequences; held sequences with
    no call for `lease_s` belong to a batcher that is gone, and are freed."""
    while True:
        await asyncio.sleep(lease_s / 4)
        idle = time.monotonic() - servicer.last_call
        if engine.sequences and idle > lease_s:
            removed = await servicer._call(engine.remove, list(engine.sequences))
            log.warning("freed %d sequences: no call from their batcher for %.0fs", len(removed), idle)


def main(argv: list[str] | None = None) -> None:
    from switchyard.config import load_config
    import sys
    setup_logging("worker")
    try:
        run_loop(serve(load_config(WorkerConfig, sys.argv[1:] if argv is None else argv)))
    except ProviderError:  # already logged with its reason; health never said SERVING
        sys.exit(3)
