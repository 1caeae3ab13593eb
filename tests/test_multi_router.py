"""Several routers behind one address: they share the gRPC and HTTP ports (SO_REUSEPORT), the
kernel spreads client connections across them, each sees the whole fleet, a killed one is
restarted on the shared port while the other keeps serving — and a router that was not asked
to share a port refuses one that is taken instead of silently splitting its connections."""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from switchyard.runtime.stack import LocalStack, Service, StackSpec
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import TINY, start_stack
from test_supervision import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
CONNECTIONS = 16  # all on one router of two by chance: 2 × 2^-16


@pytest.fixture
def two_routers(tiny_models_dir: Path, tmp_path: Path) -> Iterator[LocalStack]:
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path, routers=2)
    yield stack
    stack.stop()


def ok_requests(router: Service) -> float:
    """Requests this router finished with OK (its own /metrics)."""
    text = httpx.get(f"http://127.0.0.1:{router.metrics_port}/metrics", timeout=5).text
    return sum(sample.value for family in text_string_to_metric_families(text) if family.name == "switchyard_requests"
               for sample in family.samples if sample.name == "switchyard_requests_total" and sample.labels["code"] == "OK")


async def one_per_connection(address: str, n: int, max_tokens: int = 6) -> list[str]:
    """n Generate streams, each on a connection of its own; the error of each ('' = complete)."""
    async def one() -> str:
        # A local subchannel pool: channels to one address would otherwise share a connection.
        async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = generate_pb2_grpc.GenerationStub(ch)
            req = generate_pb2.GenerateRequest(model=TINY, token_ids=generate_pb2.TokenIds(ids=[5, 6, 7]),
                                               max_tokens=max_tokens, stop=generate_pb2.StopConditions(ignore_eos=True))
            tokens, final = 0, None
            try:
                async for event in stub.Generate(req, timeout=30):
                    tokens += len(event.tokens.token_ids) if event.HasField("tokens") else 0
                    final = event.final if event.HasField("final") else final
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
            return "" if final is not None and tokens == max_tokens else f"{tokens} tokens, final {final is not None}"
    return await asyncio.gather(*(one() for _ in range(n)))


def test_two_routers_share_the_port_and_both_serve(two_routers: LocalStack) -> None:
    stack = two_routers
    assert len(stack.routers) == 2 and {r.port for r in stack.routers} == {stack.routers[0].port}
    assert stack.routers[0].http_port == stack.routers[1].http_port
    errors = asyncio.run(one_per_connection(stack.router_address, CONNECTIONS))
    assert errors == [""] * CONNECTIONS
    served = [ok_requests(r) for r in stack.routers]
    assert sum(served) == CONNECTIONS and min(served) >= 1, served  # the kernel spread the connections


def test_a_killed_router_is_restarted_on_the_shared_port_and_the_other_keeps_serving(two_routers: LocalStack) -> None:
    stack = two_routers
    stack.start_supervisor()
    killed = stack.routers[1]
    os.kill(killed.process.pid, signal.SIGKILL)
    killed.process.wait(timeout=10)
    # While it is down (the supervisor waits 0.5 s first) the kernel sends every new
    # connection to the router still listening: nothing is refused.
    assert asyncio.run(one_per_connection(stack.router_address, 4)) == [""] * 4
    wait_until(lambda: killed.restarts == 1 and killed.process.poll() is None, 20, "the router restarted")
    killed.wait_port(20)
    assert killed.port == stack.routers[0].port  # back on the shared port
    wait_until(lambda: stack._router_sees(killed, {TINY: 1}), 20, "the restarted router to see the replica")
    errors = asyncio.run(one_per_connection(stack.router_address, CONNECTIONS))
    assert errors == [""] * CONNECTIONS
    assert ok_requests(killed) >= 1  # the restarted one takes connections again


def test_a_router_not_sharing_refuses_a_port_held_by_another_grpc_server(tiny_models_dir: Path, tmp_path: Path) -> None:
    """gRPC turns SO_REUSEPORT on by default: before, a router started on the port of a
    running one (a second stack, a stale process) bound it and took half its connections. The
    stack's error carries the router's own words (a CI run's log folder is gone when read)."""
    holder = grpc.server(futures.ThreadPoolExecutor(1))  # default options: SO_REUSEPORT on
    port = holder.add_insecure_port("127.0.0.1:0")
    holder.start()
    try:
        stack = LocalStack(StackSpec(models_dir=tiny_models_dir, replicas={TINY: 1}, grpc_port=port, http_port=-1,
                                     log_dir=tmp_path))
        with pytest.raises(RuntimeError) as failed:
            stack.start(timeout_s=60)
    finally:
        holder.stop(None)
    message = str(failed.value)
    assert message.startswith("router exited with 1; see ")
    assert f"router: cannot listen for gRPC on 127.0.0.1:{port}" in message and "choose another --grpc-port" in message
    # start() stopped what it had started
    assert stack.nats is not None and stack.nats.process is not None and stack.nats.process.poll() is not None
    assert stack.services() and all(svc.process.poll() is not None for svc in stack.services())
