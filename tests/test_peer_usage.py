"""Routers behind one address share their usage (services/router/peers.py): tenant rate limits
and model admission count every router's requests. The pure core with hand-built reports —
two routers' limiters and admission controls side by side — then two real routers sharing a
port, where a tenant's requests-per-minute limit holds across both."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.router.errors import ErrorKind, RequestError
from services.router.limits import AdmissionControl, RateLimiter
from services.router.peers import PeerUsage
from services.router.tenants import Tenant, write_tenant
from switchyard.runtime.stack import LocalStack, Service
from switchyard.v1 import bus_pb2, generate_pb2, generate_pb2_grpc

from conftest import TINY, start_stack
from test_fair_share import M, shed
from test_supervision import wait_until

LIMITED = Tenant("acme", requests_per_minute=10, tokens_per_minute=1_000)
TENANTS = {t.name: t for t in (LIMITED, Tenant("other", 10, 1_000))}


class Router:
    """One router's limits and its usage core, wired like services/router/server.py."""

    def __init__(self, name: str, interval_s: float = 0.1) -> None:
        self.limiter = RateLimiter()
        self.admission = AdmissionControl(queue_limit=0)
        self.usage = PeerUsage(name, self.limiter, self.admission, TENANTS.get, interval_s)

    def admits(self, tenant: Tenant = LIMITED, tokens: int = 10) -> bool:
        try:
            self.limiter.reserve(tenant, tokens)
            return True
        except RequestError as exc:
            assert exc.kind is ErrorKind.RESOURCE_EXHAUSTED
            return False

    def enters(self, tenant: str, capacity: int = 4, tokens: int = 10) -> bool:
        return not shed(self.admission, tenant, tokens=tokens, capacity=capacity)


# ---- tenant rate limits ------------------------------------------------------------------------

@pytest.mark.unit
def test_a_tenants_limit_holds_across_routers() -> None:
    a, b = Router("a"), Router("b")
    assert all(a.admits() for _ in range(6))
    assert b.usage.apply(a.usage.report())
    # 10 per minute in all: b has 4 left (the refill adds ~0 within the test).
    assert [b.admits() for _ in range(5)] == [True] * 4 + [False]
    a.usage.apply(b.usage.report())
    assert not a.admits()


@pytest.mark.unit
def test_without_reports_each_router_admits_the_whole_limit() -> None:
    """The baseline the sharing fixes: two routers that never hear each other admit 2×."""
    a, b = Router("a"), Router("b")
    assert sum(a.admits() for _ in range(12)) + sum(b.admits() for _ in range(12)) == 20


@pytest.mark.unit
def test_a_lost_report_is_counted_by_the_next_and_a_repeated_one_once() -> None:
    a, b = Router("a"), Router("b")
    for _ in range(3):  # three intervals, 2 requests each; b hears only the third report
        assert a.admits() and a.admits()
        report = a.usage.report()
    b.usage.apply(report)
    b.usage.apply(report)  # delivered twice: charged once
    assert [b.admits() for _ in range(5)] == [True] * 4 + [False]


@pytest.mark.unit
def test_settled_and_refunded_reservations_reach_the_other_router_as_net_charges() -> None:
    a, b = Router("a"), Router("b")
    kept = a.limiter.reserve(LIMITED, 600)
    a.limiter.settle(kept, 200)  # used 200 of 600
    refunded = a.limiter.reserve(LIMITED, 300)
    a.limiter.refund(refunded)  # shed before any work: costs nothing
    report = a.usage.report()
    assert [(c.tenant, c.requests, c.tokens) for c in report.recent[-1].charges] == [("acme", 1.0, 200.0)]
    b.usage.apply(report)
    assert b.admits(tokens=790)  # 1,000 − 200 (and 1 + 1 of 10 requests)
    assert not b.admits(tokens=20)


@pytest.mark.unit
def test_a_restarted_router_is_counted_again_and_its_own_report_never() -> None:
    a, b = Router("a"), Router("b")
    for _ in range(3):
        a.admits()
        b.usage.apply(a.usage.report())
    restarted = Router("a")  # same id, new epoch: its sequence numbers start again at 1
    assert all(restarted.admits() for _ in range(2))
    b.usage.apply(restarted.usage.report())
    assert [b.admits() for _ in range(6)] == [True] * 5 + [False]  # 10 − 3 − 2
    assert not b.usage.apply(b.usage.report())  # NATS delivers a router's own report to it too


@pytest.mark.unit
def test_routers_gone_for_good_are_forgotten() -> None:
    """Each restart brings a new router id: the ones silent for 10 minutes are dropped."""
    b = Router("b")
    long_ago = time.monotonic() - 700
    for i in range(20):
        b.usage.apply(Router(f"old-{i}").usage.report(), now=long_ago)
    b.usage.apply(Router("live").usage.report())
    assert sorted(b.usage._applied) == ["live"]
    assert b.admission.peers() == ["live"]


@pytest.mark.unit
def test_unknown_and_unlimited_tenants_in_a_report_change_nothing() -> None:
    b = Router("b")
    report = bus_pb2.RouterUsage(router_id="a", epoch=1, interval_s=0.1, recent=[bus_pb2.IntervalCharges(
        sequence=1, charges=[bus_pb2.TenantCharge(tenant="nobody-here", requests=50, tokens=5_000)])])
    assert b.usage.apply(report)
    assert all(b.admits() for _ in range(10))


# ---- admission --------------------------------------------------------------------------------

@pytest.mark.unit
def test_admission_counts_the_other_routers_requests_in_flight_until_they_leave() -> None:
    a, b = Router("a"), Router("b")
    assert all(a.enters("x") for _ in range(3))  # capacity 4, no queue
    b.usage.apply(a.usage.report())
    assert b.admission.peers() == ["a"]
    assert b.enters("x")
    assert not b.enters("x")  # 3 + 1 in flight: full
    a.admission.leave(M, 10, tenant="x")
    b.usage.apply(a.usage.report())
    assert b.enters("x")
    b.usage.apply(a.usage.report(leaving=True))  # a stopped: its load is forgotten at once
    assert b.admission.peers() == []
    assert b.enters("x") and b.enters("x")  # 2 + 2 of 4


@pytest.mark.unit
def test_a_silent_routers_load_expires() -> None:
    a, b = Router("a", interval_s=0.1), Router("b")
    assert all(a.enters("x") for _ in range(4))
    b.usage.apply(a.usage.report(), now=time.monotonic() - 2.0)  # heard 2 s ago; expiry max(5 × 0.1, 1) s
    assert b.admission.peers() == []
    assert all(b.enters("x") for _ in range(4))


@pytest.mark.unit
def test_fair_share_counts_a_flooding_tenant_on_another_router() -> None:
    """x fills the model through router a; y arriving at router b is below its share and is
    admitted, x's next request at b is above its share and is shed."""
    a, b = Router("a"), Router("b")
    assert all(a.enters("x") for _ in range(4))
    b.usage.apply(a.usage.report())
    assert b.enters("y")
    assert not b.enters("x")


@pytest.mark.unit
def test_retry_delay_counts_the_other_routers_completions() -> None:
    a, b = Router("a"), Router("b")
    for _ in range(20):  # a completes 20 requests of 100 tokens; b completes none
        a.admission.enter(M, 100, 100, tenant="x")
        a.admission.leave(M, 100, tenant="x")
    alone = b.admission.retry_after_s(M, excess_requests=0, excess_tokens=10_000)
    b.usage.apply(a.usage.report())
    shared = b.admission.retry_after_s(M, excess_requests=0, excess_tokens=10_000)
    assert alone == 1.0  # nothing measured here: the floor
    assert 1.0 < shared < 60.0  # 10,000 tokens at a's measured rate


# ---- two real routers on one port ---------------------------------------------------------------

def router_metric(router: Service, family_name: str, sample_name: str) -> float:
    """The sum of one metric's samples on this router's own /metrics."""
    text = httpx.get(f"http://127.0.0.1:{router.metrics_port}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == family_name
               for s in f.samples if s.name == sample_name)


def peer_reports(router: Service) -> float:
    return router_metric(router, "switchyard_router_peer_reports", "switchyard_router_peer_reports_total")


def peers(router: Service) -> float:
    """Other routers counted by this one (-1 while it is not answering: restarting)."""
    try:
        return router_metric(router, "switchyard_router_peers", "switchyard_router_peers")
    except (httpx.HTTPError, OSError, ValueError):
        return -1


def handled(router: Service) -> float:
    return router_metric(router, "switchyard_requests", "switchyard_requests_total")


LIMIT_PER_MINUTE = 4  # one request refilled every 15 s


@pytest.fixture
def two_routers_with_a_limited_tenant(tiny_models_dir: Path, tmp_path: Path) -> Iterator[tuple[LocalStack, str]]:
    tenants_file, key = tmp_path / "tenants.toml", "sy-peer-test-key"
    write_tenant(tenants_file, "acme", key, requests_per_minute=LIMIT_PER_MINUTE, tokens_per_minute=100_000)
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path, routers=2, tenants_file=tenants_file, api_key=key)
    yield stack, key
    stack.stop()


async def one_request(address: str, key: str) -> str:
    """One Generate on a connection of its own: '' when it completed, else its status code."""
    async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = generate_pb2_grpc.GenerationStub(ch)
        req = generate_pb2.GenerateRequest(model=TINY, token_ids=generate_pb2.TokenIds(ids=[5, 6, 7]), max_tokens=2)
        try:
            async for _ in stub.Generate(req, timeout=30, metadata=(("authorization", f"Bearer {key}"),)):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return ""


@pytest.mark.integration
def test_two_routers_on_one_port_enforce_one_limit(two_routers_with_a_limited_tenant: tuple[LocalStack, str]) -> None:
    """Without shared usage each router would admit the tenant's whole limit: with 12
    connections spread over two routers, up to 2 × 4 requests."""
    stack, key = two_routers_with_a_limited_tenant
    started = time.monotonic()
    handled_before = [handled(r) for r in stack.routers]
    outcomes = []
    for _ in range(12):  # each on a new connection: the kernel spreads them over both routers
        reports_before = [peer_reports(r) for r in stack.routers]
        outcomes.append(asyncio.run(one_request(stack.router_address, key)))
        # Both routers have applied a report sent after this request was charged (the second
        # one from now on was sent entirely later), so the next request meets the shared count.
        wait_until(lambda: all(peer_reports(r) >= n + 2 for r, n in zip(stack.routers, reports_before)),
                   10, "both routers to hear the other's usage")
    refilled = (time.monotonic() - started) * LIMIT_PER_MINUTE / 60
    per_router = [handled(r) - n for r, n in zip(stack.routers, handled_before)]
    assert min(per_router) >= 1, per_router  # both routers took requests (all on one: 2^-11)
    assert set(outcomes) <= {"", "RESOURCE_EXHAUSTED"}, outcomes
    # The tenant's 4 (readiness lists models, which charges nothing), plus what refilled.
    assert LIMIT_PER_MINUTE <= outcomes.count("") <= LIMIT_PER_MINUTE + int(refilled), (outcomes, per_router)


@pytest.mark.integration
@pytest.mark.chaos
def test_peers_fall_silent_and_return_through_sigstop_nats_restart_and_kill(tiny_models_dir: Path, tmp_path: Path) -> None:
    """A router whose peer is stopped, killed or cut off by a NATS restart stops counting the
    peer's load after the expiry (≥ 1 s) — it never holds a dead router's requests against the
    fleet — and counts it again once its reports return."""
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path, routers=2)
    try:
        first, second = stack.routers
        wait_until(lambda: peers(first) == 1 and peers(second) == 1, 10, "each router to hear the other")

        os.kill(second.process.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: peers(first) == 0, 10, "the stopped router to expire")
        finally:
            os.kill(second.process.pid, signal.SIGCONT)
        wait_until(lambda: peers(first) == 1 and peers(second) == 1, 10, "the continued router to count again")

        os.kill(second.process.pid, signal.SIGKILL)  # no supervisor yet: it stays dead until we look
        wait_until(lambda: peers(first) == 0, 10, "the killed router to expire")
        stack.start_supervisor()
        wait_until(lambda: second.restarts >= 1, 10, "the supervisor to restart the killed router")
        second.wait_port(20)  # its new metrics port
        wait_until(lambda: peers(second) == 1 and peers(first) == 1, 10, "the restarted router to hear and be heard")

        assert stack.nats is not None and stack.nats.process is not None
        reports = peer_reports(first)
        stack.nats.process.kill()  # the supervisor restarts it on the same port; clients reconnect
        wait_until(lambda: peer_reports(first) > reports + 5, 30, "reports to flow again after the NATS restart")
        assert peers(first) == 1 and peers(second) == 1
        assert asyncio.run(one_request(stack.router_address, "")) == ""  # the stack still serves
    finally:
        stack.stop()
