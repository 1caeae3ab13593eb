"""Router policies in isolation: replica registry, balancing, rate limits, admission,
stop strings and UTF-8-safe detokenization."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.router.balancing import LeastLoaded, RoundRobin, make_policy
from services.router.errors import ErrorKind, RequestError
from services.router.limits import AdmissionControl, RateLimiter, TokenBucket
from services.router.pipeline import StopStringMatcher
from services.router.registry import ReplicaRegistry
from services.router.tenants import Tenant, TenantDirectory, hash_key, write_tenant
from switchyard.model.catalog import IncrementalDetokenizer, ModelCatalog
from switchyard.v1 import bus_pb2

from conftest import TINY

pytestmark = pytest.mark.unit


def report(rid: str, running: int = 0, queued: int = 0, model: str = "m", draining: bool = False) -> bus_pb2.LoadReport:
    return bus_pb2.LoadReport(replica_id=rid, model=model, running=running, queue_depth=queued, max_batch_size=8,
                              interval_s=0.5, draining=draining)


def test_registry_drops_replicas_whose_heartbeats_stop_and_skips_draining_ones() -> None:
    reg = ReplicaRegistry(misses=3)
    t0 = time.monotonic()
    reg.observe(report("a"), now=t0)
    reg.observe(report("b"), now=t0)
    reg.observe(report("c", draining=True), now=t0)
    assert sorted(r.replica_id for r in reg.live("m")) == ["a", "b"]
    reg.observe(report("a"), now=t0 + 1.4)
    assert reg.expire(now=t0 + 1.6) == ["b", "c"]  # 1.6 s > 3 × 0.5 s without a report
    assert list(reg.replicas) == ["a"]


def test_least_loaded_prefers_the_idle_replica_and_round_robin_ignores_load() -> None:
    reg = ReplicaRegistry()
    for rid, running in (("a", 6), ("b", 1), ("c", 4)):
        reg.observe(report(rid, running=running))
    replicas = reg.live("m")
    assert [LeastLoaded().choose(replicas).replica_id for _ in range(3)] == ["b", "b", "b"]
    rr = RoundRobin()
    assert [rr.choose(replicas).replica_id for _ in range(4)] == ["a", "b", "c", "a"]
    # the router's own in-flight count matters before the next heartbeat arrives
    reg.replicas["b"].inflight = 7
    assert LeastLoaded().choose(replicas).replica_id == "c"


def test_least_loaded_spreads_ties() -> None:
    reg = ReplicaRegistry()
    for rid in "ab":
        reg.observe(report(rid))
    policy = make_policy("least_loaded")
    assert {policy.choose(reg.live("m")).replica_id for _ in range(4)} == {"a", "b"}
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(capacity=60, refill_per_s=1.0, updated=0.0)
    assert bucket.wait_for(60, now=0.0) == 0
    bucket.take(60)
    assert bucket.wait_for(10, now=0.0) == pytest.approx(10.0)
    assert bucket.wait_for(10, now=4.0) == pytest.approx(6.0)
    assert bucket.wait_for(10, now=10.0) == 0


def test_rate_limiter_reserves_up_front_settles_to_use_and_isolates_tenants() -> None:
    limiter = RateLimiter()
    small, big = Tenant("small", 1000, 300), Tenant("big", 1000, 10_000)
    first = limiter.reserve(small, 200)
    with pytest.raises(RequestError) as err:
        limiter.reserve(small, 200)
    assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED and err.value.retry_after_s > 0
    limiter.reserve(big, 5000)  # another tenant is unaffected
    limiter.settle(first, 50)  # used 50 of 200: 150 flow back
    limiter.reserve(small, 200)
    with pytest.raises(RequestError, match="lower max_tokens"):
        limiter.reserve(small, 301)


def test_admission_sheds_beyond_capacity_plus_queue() -> None:
    admission = AdmissionControl(queue_limit=2)
    for _ in range(5):
        admission.enter("m", capacity=3)
    with pytest.raises(RequestError) as err:
        admission.enter("m", capacity=3)
    assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED and err.value.retry_after_s > 0
    admission.leave("m")
    admission.enter("m", capacity=3)


def test_tenant_keys_are_stored_hashed(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    write_tenant(path, "acme", "sy-secret-key", requests_per_minute=5, tokens_per_minute=50)
    assert "sy-secret-key" not in path.read_text() and hash_key("sy-secret-key") in path.read_text()
    directory = TenantDirectory.load(path)
    tenant = directory.authenticate("sy-secret-key")
    assert tenant == Tenant("acme", 5, 50)
    assert directory.authenticate("sy-other") is None and directory.authenticate(None) is None


@pytest.mark.parametrize("chunks, stops, expected", [
    (["Hello wor", "ld. STOP here"], ["STOP"], ("Hello world. ", True)),
    (["ab", "cS", "TO", "P tail"], ["STOP"], ("abc", True)),
    (["no stop ", "at all"], ["STOP"], ("no stop at all", False)),
    (["ST", "ay"], ["STOP"], ("STay", False)),
])
def test_stop_strings_never_reach_the_client(chunks: list[str], stops: list[str], expected: tuple[str, bool]) -> None:
    matcher = StopStringMatcher(stops)
    out, stopped = "", False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out += text
        if stopped:
            break
    if not stopped:
        out += matcher.flush()
    assert (out, stopped) == expected


def test_detokenizer_emits_only_complete_utf8_characters(tiny_models_dir: Path) -> None:
    entry = ModelCatalog(tiny_models_dir).get(TINY)
    assert entry is not None
    text = "naïve café 日本語 🙂 done"
    ids = entry.encode(text)
    detok = IncrementalDetokenizer(entry)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(text.encode()) / 2  # byte-level tokens: multi-byte characters span tokens
