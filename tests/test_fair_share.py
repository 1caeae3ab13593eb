"""Tenancy (issue 10 §2): per-tenant fair share of a model's admission capacity, and the rate
limit charged before rendering and tokenizing. Policy cores with hand-built inputs, then a
real stack where one tenant floods a model and another's requests are still admitted."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import pytest

from services.router.errors import ErrorKind, RequestError
from services.router.limits import AdmissionControl, RateLimiter
from services.router.tenants import Tenant, TenantDirectory, write_tenant
from switchyard.runtime.stack import LocalStack
from switchyard.v1 import generate_pb2, generate_pb2_grpc

from conftest import TINY, start_stack

M = "model"


def shed(admission: AdmissionControl, tenant: str, weight: float = 1.0, tokens: int = 10,
         capacity: int = 2, token_capacity: int = 0) -> bool:
    """Try to admit one request; True when it was shed."""
    try:
        admission.enter(M, capacity, tokens, token_capacity, tenant=tenant, weight=weight)
        return False
    except RequestError as exc:
        assert exc.kind is ErrorKind.RESOURCE_EXHAUSTED
        return True


# ---- AdmissionControl: fair share -----------------------------------------------------------

@pytest.mark.unit
def test_an_idle_model_lets_one_tenant_use_everything() -> None:
    admission = AdmissionControl(queue_limit=2)  # limit: 2 slots + 2 queued
    assert [shed(admission, "greedy") for _ in range(5)] == [False] * 4 + [True]
    assert admission.share(M, "greedy") == 1.0


@pytest.mark.unit
def test_a_second_tenant_gets_its_share_of_a_model_the_first_has_filled() -> None:
    admission = AdmissionControl(queue_limit=2)
    for _ in range(4):
        assert not shed(admission, "greedy")
    assert shed(admission, "greedy")  # at the limit
    # The newcomer's share is half of the 4: two requests admitted beyond the limit, not a third.
    assert admission.share(M, "polite") == 0.5
    assert [shed(admission, "polite") for _ in range(3)] == [False, False, True]
    assert admission.inflight[M] == 6
    # The flood stays shed while it holds more than its share, also once some of it finished.
    admission.leave(M, 10, tenant="greedy")
    admission.leave(M, 10, tenant="greedy")
    assert admission.inflight[M] == 4 and shed(admission, "greedy")
    admission.leave(M, 10, tenant="greedy")  # greedy holds 1 of its 2: within its share again
    assert not shed(admission, "greedy")


@pytest.mark.unit
def test_shares_follow_the_tenants_weights() -> None:
    admission = AdmissionControl(queue_limit=4)  # limit 4 + 4 = 8
    for _ in range(8):
        assert not shed(admission, "gold", weight=3.0, capacity=4)
    assert admission.share(M, "bronze", weight=1.0) == 0.25
    assert [shed(admission, "bronze", capacity=4) for _ in range(3)] == [False, False, True]  # 8 / 4 = 2
    equal = AdmissionControl(queue_limit=4)
    for _ in range(8):
        assert not shed(equal, "gold", weight=1.0, capacity=4)
    assert [shed(equal, "bronze", capacity=4) for _ in range(5)] == [False] * 4 + [True]  # 8 / 2 = 4


@pytest.mark.unit
def test_fair_share_also_bounds_reserved_tokens() -> None:
    admission = AdmissionControl(queue_limit=100, token_queue_factor=0.0)  # tokens bind, not slots
    for _ in range(4):
        assert not shed(admission, "greedy", tokens=250, capacity=100, token_capacity=1000)
    assert shed(admission, "greedy", tokens=250, capacity=100, token_capacity=1000)
    # polite: a first request always fits its share; a second would hold 600 > 500 of 1000.
    assert not shed(admission, "polite", tokens=300, capacity=100, token_capacity=1000)
    assert shed(admission, "polite", tokens=300, capacity=100, token_capacity=1000)
    assert not shed(admission, "polite", tokens=200, capacity=100, token_capacity=1000)  # 500: at its share


@pytest.mark.unit
def test_leaving_forgets_a_tenant_and_gives_its_share_back() -> None:
    admission = AdmissionControl(queue_limit=0)
    assert not shed(admission, "a") and not shed(admission, "b")
    assert admission.share(M, "a") == 0.5
    admission.leave(M, 10, tenant="b")
    assert admission.share(M, "a") == 1.0 and "b" not in admission.by_tenant[M]
    admission.leave(M, 10, tenant="a")
    assert admission.inflight[M] == 0 and admission.by_tenant[M] == {}


# ---- RateLimiter: charged before the expensive work ------------------------------------------

@pytest.mark.unit
def test_requests_are_charged_before_tokenizing_and_invalid_ones_keep_their_cost() -> None:
    limiter = RateLimiter()
    tenant = Tenant("slow", requests_per_minute=10, tokens_per_minute=1000)
    tickets = [limiter.take_request(tenant, min_tokens=5) for _ in range(10)]
    with pytest.raises(RequestError) as err:
        limiter.take_request(tenant)  # the 11th in the minute: refused before any tokenizing
    assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED and "requests-per-minute" in err.value.message
    limiter.refund(tickets[0])  # shed by admission: its place comes back
    ticket = limiter.take_request(tenant)
    limiter.reserve_tokens(ticket, 900)
    with pytest.raises(RequestError) as err:  # lower bound of the next request's size does not fit
        limiter.take_request(Tenant("slow", 10, 1000), min_tokens=200)
    assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    other = Tenant("other", requests_per_minute=10, tokens_per_minute=100)
    with pytest.raises(RequestError) as err:  # can never fit the budget: bad input, not a retry
        limiter.reserve_tokens(limiter.take_request(other), 101)
    assert err.value.kind is ErrorKind.INVALID_ARGUMENT


@pytest.mark.unit
def test_tenant_weight_is_read_from_the_tenants_file(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    write_tenant(path, "gold", "sy-gold", weight=3)
    write_tenant(path, "plain", "sy-plain")
    directory = TenantDirectory.load(path)
    assert directory.tenants["gold"].weight == 3.0 and directory.tenants["plain"].weight == 1.0
    path.write_text(path.read_text().replace("weight = 3", "weight = 0"))
    with pytest.raises(ValueError, match="weight"):
        TenantDirectory.load(path)


# ---- the real stack ---------------------------------------------------------------------------

GREEDY, POLITE, SLOW = "sy-test-greedy", "sy-test-polite", "sy-test-slow"


@pytest.fixture(scope="module")
def tenants_stack(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("fair-share")
    tenants = tmp / "tenants.toml"
    write_tenant(tenants, "greedy", GREEDY, requests_per_minute=100_000, tokens_per_minute=100_000_000)
    write_tenant(tenants, "polite", POLITE, requests_per_minute=100_000, tokens_per_minute=100_000_000)
    write_tenant(tenants, "slow", SLOW, requests_per_minute=10, tokens_per_minute=100_000_000)
    # One replica of 2 slots and 2 queued: the model's limit is 4 requests in flight.
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp, tenants_file=tenants, api_key=POLITE, max_batch_size=2,
                        router_args=("--queue-limit", "2", "--heartbeat-misses", "10"))
    yield stack
    stack.stop()


def generate(stack: LocalStack, key: str, max_tokens: int) -> generate_pb2.CompleteResponse:
    req = generate_pb2.GenerateRequest(model=TINY, text="tell me more", max_tokens=max_tokens,
                                       stop=generate_pb2.StopConditions(ignore_eos=True))
    with grpc.insecure_channel(stack.router_address) as ch:
        return generate_pb2_grpc.GenerationStub(ch).Complete(req, timeout=60,
                                                            metadata=(("authorization", f"Bearer {key}"),))


@pytest.mark.integration
def test_a_flooding_tenant_does_not_lock_out_another(tenants_stack: LocalStack) -> None:
    stop = threading.Event()
    greedy_shed = [0]

    def flood() -> None:
        while not stop.is_set():
            try:
                generate(tenants_stack, GREEDY, max_tokens=120)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                greedy_shed[0] += 1

    flooders = [threading.Thread(target=flood, daemon=True) for _ in range(8)]  # 8 > the limit of 4
    for t in flooders:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while greedy_shed[0] == 0 and time.monotonic() < deadline:  # the model is contended
            time.sleep(0.05)
        assert greedy_shed[0] > 0, "the flood never reached the model's limit"
        waits = []
        for _ in range(3):  # each admitted at once (no RESOURCE_EXHAUSTED), served behind the flood
            t0 = time.monotonic()
            reply = generate(tenants_stack, POLITE, max_tokens=4)
            waits.append(time.monotonic() - t0)
            assert reply.summary.usage.completion_tokens == 4
        assert max(waits) < 30, waits
    finally:
        stop.set()
        for t in flooders:
            t.join(timeout=60)


@pytest.mark.integration
def test_rate_limit_is_charged_before_tokenizing_over_context_prompts(tenants_stack: LocalStack) -> None:
    """30 over-context prompts from a 10-requests-per-minute tenant: 10 are tokenized and refused
    as too long (400), the other 20 are refused by the rate limit before any tokenizing (429)."""
    over_context = "hello " * 700  # > the tiny model's 512-token context, well under the size cap
    codes = []
    with httpx.Client(timeout=30) as client:
        for _ in range(30):
            resp = client.post(f"{tenants_stack.http_url}/v1/completions",
                               headers={"Authorization": f"Bearer {SLOW}"},
                               json={"model": TINY, "prompt": over_context, "max_tokens": 4})
            codes.append(resp.status_code)
    assert set(codes) <= {400, 429}, codes
    assert codes[:10] == [400] * 10, codes
    assert codes.count(429) >= 19, codes  # a bucket of 10 refills 1 per 6 s


# ---- the development key ----------------------------------------------------------------------

@pytest.mark.unit
def test_dev_key_is_stored_0600_and_reported_as_new_only_once(tmp_path: Path) -> None:
    import stat

    from switchyard.cli import dev_tenant
    tenants, key, created = dev_tenant(tmp_path)
    key_file = tmp_path / "dev-key"
    assert created and key.startswith("sy-") and key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key not in tenants.read_text()  # the tenants file holds its digest only
    key_file.chmod(0o644)  # a key file left readable by an older version
    again = dev_tenant(tmp_path)
    assert again == (tenants, key, False)  # the same key, not shown again
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
