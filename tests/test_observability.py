"""Observability: one trace per request across router, batcher and worker (in-memory
exporter, and over the wire to a real OTLP gRPC receiver), and Prometheus metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import urllib.request
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from services.batcher.config import BatcherConfig
from services.batcher.server import serve as serve_batcher
from services.router.config import RouterConfig
from services.router.server import serve as serve_router
from services.worker.config import WorkerConfig
from services.worker.server import serve as serve_worker
from switchyard.bus.server import NatsServer
from switchyard.runtime.stack import LocalStack, StackSpec
from switchyard.telemetry.tracing import current_traceparent, setup_tracing, tracer
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import TINY

pytestmark = pytest.mark.integration


def wait_for_file(path: Path, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.05)
    raise TimeoutError(path)


@pytest.fixture(scope="module")
def traced_services(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, InMemorySpanExporter]]:
    """Router, batcher and worker in this process, sharing one in-memory span exporter."""
    import json
    exporter = InMemorySpanExporter()
    setup_tracing("switchyard-test", extra_exporters=[exporter])
    tmp = tmp_path_factory.mktemp("traced")
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    with NatsServer() as nats_server:
        async def main() -> None:
            worker = asyncio.create_task(serve_worker(WorkerConfig(model_dir=tiny_models_dir / TINY,
                                                                   port_file=tmp / "w.port"), stop))
            while not (tmp / "w.port").exists():
                await asyncio.sleep(0.05)
            port = json.loads((tmp / "w.port").read_text())["grpc"]
            await asyncio.gather(worker, serve_batcher(BatcherConfig(worker=f"127.0.0.1:{port}", nats_url=nats_server.url,
                                                                     replica_id="r0", heartbeat_s=0.2), stop),
                                 serve_router(RouterConfig(nats_url=nats_server.url, grpc_port=0, http_port=-1,
                                                           models_dir=tiny_models_dir, port_file=tmp / "r.port"), stop))

        thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
        thread.start()
        address = f"127.0.0.1:{json.loads(wait_for_file(tmp / 'r.port'))['grpc']}"
        with grpc.insecure_channel(address) as ch:
            stub = generate_pb2_grpc.GenerationStub(ch)
            deadline = time.monotonic() + 30
            while not stub.ListModels(generate_pb2.ListModelsRequest(), timeout=5).models:
                assert time.monotonic() < deadline, "replica never registered"
                time.sleep(0.1)
        yield address, exporter
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        assert not thread.is_alive(), "in-process services did not stop"
        loop.close()


def test_one_request_is_one_trace_across_router_batcher_and_worker(traced_services: tuple[str, InMemorySpanExporter]) -> None:
    address, exporter = traced_services
    exporter.clear()
    with tracer().start_as_current_span("client") as client_span:
        metadata = (("traceparent", current_traceparent()),)
        with grpc.insecure_channel(address) as ch:
            events = list(generate_pb2_grpc.GenerationStub(ch).Generate(
                generate_pb2.GenerateRequest(model=TINY, text="trace me", max_tokens=6,
                                             stop=generate_pb2.StopConditions(ignore_eos=True)),
                metadata=metadata, timeout=30))
    assert events[-1].HasField("final")
    trace_id = client_span.get_span_context().trace_id
    wanted = {"router.request", "router.prepare", "batcher.queue", "batcher.request", "worker.prefill", "worker.decode"}
    deadline = time.monotonic() + 10
    while True:
        spans = {s.name: s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id}
        if wanted <= set(spans) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert wanted <= set(spans), f"missing spans: {wanted - set(spans)}"
    parent = {name: s.parent.span_id for name, s in spans.items() if s.parent is not None}
    ids = {name: s.context.span_id for name, s in spans.items()}
    assert parent["router.request"] == client_span.get_span_context().span_id
    assert parent["router.prepare"] == ids["router.request"]
    assert parent["batcher.queue"] == ids["router.request"]
    assert parent["batcher.request"] == ids["router.request"]
    assert parent["worker.prefill"] == ids["batcher.request"]
    assert parent["worker.decode"] == ids["batcher.request"]
    attrs = spans["router.request"].attributes
    assert attrs["switchyard.model"] == TINY and attrs["switchyard.replica"] == "r0"
    assert attrs["switchyard.output_tokens"] == 6 and attrs["switchyard.prompt_tokens"] > 0
    assert attrs["switchyard.ttft_s"] > 0 and attrs["switchyard.tenant"] == "anonymous"
    assert spans["worker.decode"].attributes["switchyard.output_tokens"] == 6
    # the hops sit inside the request's span
    root = spans["router.request"]
    for name in ("batcher.queue", "worker.prefill", "worker.decode"):
        assert root.start_time <= spans[name].start_time <= spans[name].end_time <= root.end_time + 50_000_000


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver: what Jaeger's collector speaks."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: object) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for rs in request.resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                for ss in rs.scope_spans:
                    self.spans += [(service, s) for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_a_real_otlp_receiver_from_every_service(tiny_models_dir: Path, tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    spec = StackSpec(models_dir=tiny_models_dir, replicas={TINY: 1}, heartbeat_s=0.2, log_dir=tmp_path, extra_env=env)
    try:
        with LocalStack(spec) as stack, grpc.insecure_channel(stack.router_address) as ch:
            events = list(generate_pb2_grpc.GenerationStub(ch).Generate(
                generate_pb2.GenerateRequest(model=TINY, text="over the wire", max_tokens=4), timeout=30))
            assert events[-1].HasField("final")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                with receiver.lock:
                    services = {svc for svc, _ in receiver.spans}
                if {"switchyard-router", "switchyard-batcher", "switchyard-worker"} <= services:
                    break
                time.sleep(0.1)
    finally:
        server.stop(0)
    with receiver.lock:
        spans = list(receiver.spans)
    by_service = {svc: [s for v, s in spans if v == svc] for svc in {v for v, _ in spans}}
    assert {"switchyard-router", "switchyard-batcher", "switchyard-worker"} <= set(by_service)
    root = next(s for s in by_service["switchyard-router"] if s.name == "router.request")
    worker_spans = [s for s in by_service["switchyard-worker"] if s.trace_id == root.trace_id]
    batcher_spans = {s.name: s for s in by_service["switchyard-batcher"] if s.trace_id == root.trace_id}
    assert {s.name for s in worker_spans} == {"worker.prefill", "worker.decode"}
    assert batcher_spans["batcher.request"].parent_span_id == root.span_id
    assert all(s.parent_span_id == batcher_spans["batcher.request"].span_id for s in worker_spans)


def scrape(port: int) -> dict[str, object]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict[str, object], metric: str, suffix: str, **labels: str) -> float:
    family = families[metric]
    return sum(s.value for s in family.samples  # type: ignore[attr-defined]
               if s.name == metric + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_parse_and_histograms_count_the_requests(tiny_stack: LocalStack, channel: grpc.Channel) -> None:
    router = tiny_stack.router
    assert router is not None and router.metrics_port
    before = scrape(router.metrics_port)
    n = 5
    for i in range(n):
        list(generate_pb2_grpc.GenerationStub(channel).Generate(
            generate_pb2.GenerateRequest(model=TINY, text=f"count me {i}", max_tokens=5,
                                         stop=generate_pb2.StopConditions(ignore_eos=True)), timeout=30))
    after = scrape(router.metrics_port)
    for metric in ("switchyard_time_to_first_token_seconds", "switchyard_request_duration_seconds"):
        assert sample(after, metric, "_count", model=TINY) - sample(before, metric, "_count", model=TINY) == n
    assert sample(after, "switchyard_inter_token_latency_seconds", "_count", model=TINY) - \
        sample(before, "switchyard_inter_token_latency_seconds", "_count", model=TINY) >= n * 3
    assert sample(after, "switchyard_completion_tokens", "_total", model=TINY) - \
        sample(before, "switchyard_completion_tokens", "_total", model=TINY) == n * 5
    assert sample(after, "switchyard_requests", "_total", model=TINY, code="OK") - \
        sample(before, "switchyard_requests", "_total", model=TINY, code="OK") == n
    # batcher and worker expose theirs too
    batcher = scrape(tiny_stack.batchers[0].metrics_port)  # type: ignore[arg-type]
    assert "switchyard_batch_size" in batcher and "switchyard_queue_wait_seconds" in batcher
    worker = scrape(tiny_stack.workers[0].metrics_port)  # type: ignore[arg-type]
    assert {"switchyard_kv_cache_tokens", "switchyard_worker_step_duration_seconds"} <= set(worker)


def test_errors_are_counted_by_code(tiny_stack: LocalStack, channel: grpc.Channel) -> None:
    router = tiny_stack.router
    assert router is not None and router.metrics_port
    before = sample(scrape(router.metrics_port), "switchyard_requests", "_total", code="INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError):
        list(generate_pb2_grpc.GenerationStub(channel).Generate(
            generate_pb2.GenerateRequest(model=TINY, text="", max_tokens=5), timeout=30))
    after = sample(scrape(router.metrics_port), "switchyard_requests", "_total", code="INVALID_ARGUMENT")
    assert after - before == 1


def test_report_reads_a_real_run_records_spans_and_replica_time(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The router's records, every service's spans and the replica lifetimes of a real run
    feed `switchyard report`: percentiles, cost and tail attribution come out of it."""
    from switchyard.reporting import report
    run = tmp_path / "run"
    spec = StackSpec(models_dir=tiny_models_dir, replicas={TINY: 2}, heartbeat_s=0.2, log_dir=tmp_path,
                     records_dir=run, extra_env={"SWITCHYARD_SPANS_FILE": str(run / "spans.jsonl"),
                                                 "OTEL_BSP_SCHEDULE_DELAY": "100"})
    n = 12
    with LocalStack(spec) as stack, grpc.insecure_channel(stack.router_address) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        for i in range(n):
            list(stub.Generate(generate_pb2.GenerateRequest(model=TINY, text=f"report {i}", max_tokens=8,
                                                            stop=generate_pb2.StopConditions(ignore_eos=True)),
                               timeout=30))
        time.sleep(0.5)  # let the batch span processors flush before the stack stops
    result = report(run)
    assert result.requests == n and result.percentiles.ok == n
    ttft = result.percentiles.overall["ttft"]
    assert ttft.count == n and 0 < ttft.p50 <= ttft.p99
    assert result.cost.total > 0 and set(result.cost.replica_seconds) == {f"{TINY}-0", f"{TINY}-1"}
    assert result.tail is not None and result.tail.traces == n
    assert result.latency_png.stat().st_size > 0 and result.report_md.exists()
