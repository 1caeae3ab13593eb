"""Rollouts on the real stack (docs/rollouts.md): one tiny model folder served as three
versions — v1 and v2 healthy, v3 with planted faults (slow tokens, refused sequences) — behind
one router whose rollout state lives in the stack's NATS KV. Plus unit tests of the state,
resolution and compare-and-set with hand-built inputs and a real nats-server."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from typer.testing import CliRunner

from conftest import TINY
from services.router.rollouts import reason_label
from switchyard.bus.server import NatsServer
from switchyard.rollouts.state import (RolloutState, RolloutStore, StaleRevision, new_rollout, operate,
                                       versioned)
from switchyard.runtime.stack import LocalStack, StackSpec

ADMIN_KEY = "test-admin-key-0123456789"
V1, V2, BAD = versioned(TINY, "v1"), versioned(TINY, "v2"), versioned(TINY, "v3")


# ---- unit: state, operations, resolution -------------------------------------------------
@pytest.mark.unit
def test_state_round_trips_and_validates() -> None:
    state = new_rollout("m", "v1", "v2", "canary", steps=[0.1, 0.5, 1.0], step_duration_s=5,
                        thresholds={"min_requests": 3})
    assert state.weight == 0.1 and state.history[-1].kind == "start"
    assert RolloutState.from_json(state.to_json()) == state
    with pytest.raises(ValueError, match="mode"):
        new_rollout("m", "v1", "v2", "nope")
    with pytest.raises(ValueError, match="differ"):
        new_rollout("m", "v1", "v1")
    with pytest.raises(ValueError, match="candidate"):
        new_rollout("m", "v1", "v2@x")


@pytest.mark.unit
def test_operator_actions() -> None:
    bg = new_rollout("m", "blue", "green", "bluegreen")
    assert bg.active() == "blue"
    assert operate(bg, "promote", "t").kind == "switch" and bg.active() == "green"
    assert operate(bg, "rollback", "t").kind == "rollback" and bg.active() == "blue"  # switch back
    with pytest.raises(ValueError):
        operate(bg, "promote", "t")  # finished: start a new rollout instead
    canary = new_rollout("m", "v1", "v2")
    operate(canary, "abort", "t")
    assert canary.status == "aborted" and canary.active() == "v1"


@pytest.mark.unit
def test_resolution(tiny_models_dir: Path) -> None:
    from services.router.rollouts import RolloutManager
    from switchyard.model.catalog import ModelCatalog
    manager = RolloutManager("r", ModelCatalog(tiny_models_dir))
    assert manager.resolve(TINY, "", "req").served == TINY  # no rollout: the name itself
    assert manager.resolve(V2, "", "req").served == V2  # pinned
    manager.states[TINY] = new_rollout(TINY, "v1", "v2", "canary", steps=[0.25, 1.0])
    picks = collections.Counter(manager.resolve(TINY, "", f"r{i}").served for i in range(4000))
    assert 0.21 < picks[V2] / 4000 < 0.29
    manager.states[TINY] = new_rollout(TINY, "v1", "v2", "ab", weight=0.5)
    users = {f"user{i}": manager.resolve(TINY, f"user{i}", f"a{i}").served for i in range(200)}
    assert all(manager.resolve(TINY, u, "other").served == v for u, v in users.items())  # sticky
    assert 70 < sum(v == V2 for v in users.values()) < 130
    entry = manager.entry(V2)
    assert entry is not None and entry.name == V2 and manager.entry(TINY).name == TINY  # type: ignore[union-attr]


@pytest.mark.unit
def test_worker_fault_options_are_validated_and_off_by_default(tiny_models_dir: Path) -> None:
    from services.worker.config import WorkerConfig
    from services.worker.server import WorkerServicer
    from switchyard.config import ConfigError
    off = WorkerConfig(model_dir=tiny_models_dir / TINY)
    off.validate()
    assert off.fault_fail_fraction == 0 and off.fault_delay_per_token_ms == 0
    for bad in ({"fault_fail_fraction": 1.5}, {"fault_delay_per_token_ms": -1.0}, {"served_name": "a@b@c"}):
        with pytest.raises(ConfigError):
            WorkerConfig(model_dir=tiny_models_dir / TINY, **bad).validate()  # type: ignore[arg-type]
    servicer = WorkerServicer(None, fault_fail_fraction=0.3)  # type: ignore[arg-type]
    refused = [servicer._planted_failure(f"seq-{i}") for i in range(5000)]
    assert 0.27 < sum(refused) / 5000 < 0.33
    assert refused == [servicer._planted_failure(f"seq-{i}") for i in range(5000)]  # the same answer on retry
    assert not any(WorkerServicer(None)._planted_failure(f"seq-{i}") for i in range(100))  # type: ignore[arg-type]


@pytest.mark.integration
def test_compare_and_set_one_writer_wins() -> None:
    async def run(url: str) -> tuple[int, int]:
        import nats
        nc = await nats.connect(url)
        try:
            store = await RolloutStore.open(nc.jetstream())
            await store.put_new(new_rollout("m", "v1", "v2"))
            state, revision = await store.get("m")  # type: ignore[misc]
            results = []
            for by in ("router-a", "router-b"):  # both decided on the same revision
                s = RolloutState.from_json(state.to_json())
                s.weight = 0.05
                s.record("advance", f"by {by}", by)
                try:
                    await store.update(s, revision)
                    results.append(1)
                except StaleRevision:
                    results.append(0)
            with pytest.raises(ValueError, match="running"):
                await store.put_new(new_rollout("m", "v1", "v3"))
            return sum(results), len(results)
        finally:
            await nc.close()
    with NatsServer() as server:
        assert asyncio.run(run(server.url)) == (1, 2)


@pytest.mark.integration
def test_resync_applies_changes_without_the_watch(tiny_models_dir: Path) -> None:
    """The periodic re-read is the safety net for a watch lost in a NATS outage."""
    from services.router.rollouts import RolloutManager
    from switchyard.model.catalog import ModelCatalog

    async def run(url: str) -> tuple[str, str]:
        import nats
        nc = await nats.connect(url)
        try:
            manager = RolloutManager("r", ModelCatalog(tiny_models_dir))
            manager.store = store = await RolloutStore.open(nc.jetstream())  # no watch started
            await store.put_new(new_rollout(TINY, "v1", "v2", "bluegreen"))
            await manager.resync()
            before = manager.resolve(TINY, "", "a").served
            await store.change(TINY, lambda s: operate(s, "promote", "cli"))
            await manager.resync()
            return before, manager.resolve(TINY, "", "b").served
        finally:
            await nc.close()
    with NatsServer() as server:
        assert asyncio.run(run(server.url)) == (V1, V2)


@pytest.mark.unit
def test_a_request_from_an_ended_step_leaves_the_current_window_alone(tiny_models_dir: Path) -> None:
    """A request that began before the canary advanced finishes after it: its sample is
    dropped, and the new step's samples (shared with the other routers) stay."""
    from types import SimpleNamespace

    from services.router.rollouts import RequestTap, Resolution, RolloutManager
    from switchyard.model.catalog import ModelCatalog
    manager = RolloutManager("r", ModelCatalog(tiny_models_dir))
    old = new_rollout(TINY, "v1", "v2", "canary", steps=[0.25, 1.0])
    new = RolloutState.from_json(old.to_json())
    new.step, new.step_started_at = 1, old.step_started_at + 60

    def finish(state: RolloutState) -> None:
        tap = RequestTap(manager, Resolution(V2, "candidate", state), SimpleNamespace())  # type: ignore[arg-type]
        tap.finish("OK", SimpleNamespace(time_to_first_token_s=0.01, end_to_end_s=0.1))  # type: ignore[arg-type]
    manager.states[TINY] = new  # the canary advanced after a request had been resolved against `old`
    finish(new)
    finish(new)
    finish(old)  # began in step 0, finished in step 1
    window = manager.windows[TINY]
    assert window.key == (1, new.step_started_at, "v2") and window.candidate.requests == 2


@pytest.mark.unit
def test_pooled_canary_windows_keep_only_the_current_steps_samples() -> None:
    from services.router.rollouts import ArmWindow, pool_windows, samples_from_json, samples_to_json
    from switchyard.rollouts.analysis import ArmSamples

    def window(key: tuple[int, float, str], errors: int, ok: int) -> ArmWindow:
        candidate = ArmSamples()
        for i in range(errors + ok):
            candidate.add(error=i < errors, ttft_s=0.01 * i, itl_s=[0.001, 0.002], e2e_s=0.1)
        return ArmWindow(key, ArmSamples(), candidate)
    step1, step0 = (1, 100.0, "v2"), (0, 50.0, "v2")
    other = window(step1, errors=2, ok=1)
    shared = ArmWindow(step1, samples_from_json(json.loads(json.dumps(samples_to_json(other.baseline)))),
                       samples_from_json(json.loads(json.dumps(samples_to_json(other.candidate)))))
    pooled = pool_windows(window(step1, errors=1, ok=3), [shared, window(step0, errors=9, ok=0)])
    assert (pooled.key, pooled.candidate.requests, pooled.candidate.errors) == (step1, 7, 3)
    assert len(pooled.candidate.itl_s) == 2 * (3 + 1)  # only successful requests' latencies


@pytest.mark.integration
def test_routers_judge_a_canary_on_every_routers_samples(tiny_models_dir: Path) -> None:
    """Two routers each saw 5 requests per arm, fewer than min_requests (8): alone neither can
    judge; with the samples shared through NATS KV, either one rolls the bad canary back."""
    from services.router.rollouts import RolloutManager
    from switchyard.model.catalog import ModelCatalog
    from switchyard.rollouts.state import CANARY_SAMPLES_BUCKET, open_bucket

    async def run(url: str) -> tuple[Any, Any, int]:
        import nats
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            routers = [RolloutManager(name, ModelCatalog(tiny_models_dir)) for name in ("router-a", "router-b")]
            for router in routers:  # what start() opens, without its loop: the test drives the ticks
                router.store = await RolloutStore.open(js)
                router.canary_kv = await open_bucket(js, CANARY_SAMPLES_BUCKET)
            await routers[0].store.put_new(new_rollout(TINY, "v1", "v2", "canary", steps=[0.5, 1.0],  # type: ignore[union-attr]
                                                       step_duration_s=600, thresholds={"min_requests": 8}))
            for router in routers:
                await router.resync()
                window = router._window(router.states[TINY])
                for _ in range(5):
                    window.baseline.add(error=False, ttft_s=0.01, itl_s=[0.001], e2e_s=0.05)
                    window.candidate.add(error=True, ttft_s=None)
                router._canary_dirty.add(TINY)
            alone = await routers[1].tick(TINY, time.time())
            for router in routers:
                await router.publish_canary_samples()
            shared = await routers[1].tick(TINY, time.time())
            return alone, shared, routers[1].pooled[TINY].candidate.requests
        finally:
            await nc.close()
    with NatsServer() as server:
        alone, shared, pooled_requests = asyncio.run(run(server.url))
    assert alone is None  # 5 < 8 requests per arm: hold
    assert shared is not None and shared.kind == "rollback" and "error rate" in shared.reason, shared
    assert pooled_requests == 10


@pytest.mark.integration
@pytest.mark.chaos
def test_a_canary_tick_with_nats_down_judges_on_its_own_samples_in_bounded_time(tiny_models_dir: Path) -> None:
    """nats-server stopped: reading the other routers' samples would wait out nats-py's own
    timeouts (5 s here; kv.keys() has none of its own). The tick returns within its bound, on
    this router's own samples, so the canary loop goes on."""
    from services.router.rollouts import RolloutManager
    from switchyard.model.catalog import ModelCatalog
    from switchyard.rollouts.state import CANARY_SAMPLES_BUCKET, open_bucket

    async def run(server: NatsServer) -> tuple[Any, float, int]:
        import nats
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        try:
            js = nc.jetstream()
            router = RolloutManager("router-a", ModelCatalog(tiny_models_dir), interval_s=0.25)
            router.store = await RolloutStore.open(js)
            router.canary_kv = await open_bucket(js, CANARY_SAMPLES_BUCKET)
            await router.store.put_new(new_rollout(TINY, "v1", "v2", "canary", steps=[0.5, 1.0],
                                                   step_duration_s=600, thresholds={"min_requests": 8}))
            await router.resync()
            window = router._window(router.states[TINY])
            for _ in range(3):
                window.candidate.add(error=True, ttft_s=None)
            server.stop()  # the bus goes away
            began = time.monotonic()
            decision = await router.tick(TINY, time.time())
            return decision, time.monotonic() - began, router.pooled[TINY].candidate.requests
        finally:
            await nc.close()
    server = NatsServer().start()
    try:
        decision, took_s, pooled = asyncio.run(run(server))
    finally:
        server.stop()
    assert decision is None and pooled == 3  # 3 < 8: hold, on its own samples
    # bounded by max(interval, 1 s); unbounded, nats-py's own request timeout takes 5 s
    assert took_s < 3.0, took_s


# ---- the real stack ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp = tmp_path_factory.mktemp("rollouts")
    # heartbeats every 0.5 s and requests that wait up to 5 s for a replica: a busy 2-core
    # machine must not drop a replica from the fleet between two requests of a test
    spec = StackSpec(models_dir=tiny_models_dir, replicas={V1: 1, V2: 1, BAD: 1}, heartbeat_s=0.5, log_dir=tmp,
                     records_dir=tmp / "run", extra_env={"SWITCHYARD_ADMIN_KEY": ADMIN_KEY},
                     router_args=("--rollout-interval-s", "0.25", "--replica-wait-s", "5"),
                     worker_args={BAD: ("--fault-fail-fraction", "0.5", "--fault-delay-per-token-ms", "40")})
    s = LocalStack(spec).start()
    yield s
    s.stop()


def kv(stack: LocalStack, fn: Callable[[RolloutStore], Any]) -> Any:
    """Run `fn(store)` against the stack's rollout bucket (what the CLI does)."""
    async def go() -> Any:
        import nats
        assert stack.nats is not None
        nc = await nats.connect(stack.nats.url, **nats_credentials(stack))
        try:
            store = await RolloutStore.open(nc.jetstream())
            return await fn(store)
        finally:
            await nc.close()
    return asyncio.run(go())


def nats_credentials(stack: LocalStack) -> dict[str, str]:
    """With internal auth on, an operator uses credentials allowed the rollout buckets (the
    router's here; docs/rollouts.md)."""
    assert stack.nats is not None
    if not stack.nats.users:
        return {}
    user = stack.nats.user("router")
    return {"user": user.user, "password": user.password, "inbox_prefix": user.inbox_prefix}


def start(stack: LocalStack, state: RolloutState) -> None:
    async def put(store: RolloutStore) -> None:
        await store.replace(state, by="test")
    kv(stack, put)
    wait_until(lambda: state_of(stack)["started_at"] == state.started_at, 5)  # the router has it


def state_of(stack: LocalStack) -> dict[str, Any]:
    return admin(stack, "GET", f"/admin/rollouts/{TINY}").json()


def admin(stack: LocalStack, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, stack.http_url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=10, **kw)


def wait_until(cond: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (httpx.HTTPError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s}s")


def complete(stack: LocalStack, prompt: str = "hello there", max_tokens: int = 12,
             headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": TINY, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(stack.http_url + "/v1/completions", json=body, headers=headers, timeout=60)


@pytest.mark.integration
def test_versions_are_served_and_pinnable(stack: LocalStack) -> None:
    for version in (V1, V2):
        r = httpx.post(stack.http_url + "/v1/completions", json={"model": version, "prompt": "hi", "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == version
    assert httpx.get(stack.http_url + "/admin/rollouts", timeout=5).status_code == 401  # admin key required
    assert admin(stack, "GET", "/admin/rollouts").status_code == 200


@pytest.mark.integration
def test_bad_canary_is_rolled_back_automatically(stack: LocalStack) -> None:
    start(stack, new_rollout(TINY, "v1", "v3", "canary", steps=[0.5, 1.0], step_duration_s=60,
                             thresholds={"min_requests": 8}))
    served: collections.Counter[str] = collections.Counter()
    began = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        while time.monotonic() - began < 60 and state_of(stack)["status"] == "running":
            for r in pool.map(lambda i: complete(stack, f"canary {i}"), range(8)):
                served[r.json()["model"] if r.status_code == 200 else "error"] += 1
    state = state_of(stack)
    assert state["status"] == "rolled_back", state
    assert state["weight"] == 0.0 and state["active"] == "v1"
    last = state["history"][-1]
    assert last["kind"] == "rollback" and ("error" in last["reason"].lower() or "p99" in last["reason"].lower())
    assert served["error"] > 0 and served[BAD] + served["error"] < 120  # exposure bounded by the analysis
    after = [complete(stack, f"after {i}").json()["model"] for i in range(6)]
    assert after == [V1] * 6  # every new request back on the baseline
    assert stack.router is not None and stack.router.metrics_port
    metrics = httpx.get(f"http://127.0.0.1:{stack.router.metrics_port}/metrics", timeout=5).text
    # counted under the category of the reason it gave (error rate or p99: either can trip first)
    label = reason_label(last["reason"], "rollback")
    assert label in ("error_rate", "ttft_p99", "itl_p99"), last["reason"]
    assert f'switchyard_rollout_decisions_total{{kind="rollback",model="tiny-llama",reason="{label}"}}' in metrics
    from switchyard.reporting.cli import report  # `switchyard report` shows the decision
    run_dir = Path(stack.spec.records_dir)  # type: ignore[arg-type]
    result = report(run_dir, out=run_dir / "report")
    assert any(d["kind"] == "rollback" and d["candidate"] == "v3" for d in result.rollouts)
    assert "## Rollouts" in result.report_md.read_text() and "rollback" in result.report_md.read_text()


@pytest.mark.integration
def test_healthy_canary_reaches_full_traffic(stack: LocalStack) -> None:
    start(stack, new_rollout(TINY, "v1", "v2", "canary", steps=[0.3, 0.6, 1.0], step_duration_s=1.5,
                             thresholds={"min_requests": 5, "max_ttft_p99_ratio": 20, "max_itl_p99_ratio": 20,
                                         "max_error_rate_increase": 0.2}))
    began = time.monotonic()
    seen: list[dict[str, Any] | None] = []
    with ThreadPoolExecutor(4) as pool:
        while time.monotonic() - began < 60 and state_of(stack)["status"] == "running":
            assert all(r.status_code == 200 for r in pool.map(lambda i: complete(stack, f"ok {i}", 6), range(8)))
            seen.append(state_of(stack)["analysis"])  # the router's live view of the step
    assert any(a is not None and a["outcome"] in ("wait", "pass") and a["figures"] for a in seen), seen
    assert all(a is None or a["outcome"] != "fail" for a in seen)
    state = state_of(stack)
    assert state["status"] == "promoted", state
    assert [d["kind"] for d in state["history"]][-3:] == ["start", "advance", "promote"]
    assert {complete(stack, f"now {i}").json()["model"] for i in range(4)} == {V2}
    listed = {m["id"] for m in httpx.get(stack.http_url + "/v1/models", timeout=5).json()["data"]}
    assert {TINY, V1, V2, BAD} <= listed  # the name clients call is listed with the versions


def served_by(stack: LocalStack, response_id: str) -> str:
    """The version that served a request, from the router's request records."""
    rid = response_id.split("-", 1)[1]
    path = Path(stack.spec.records_dir) / "requests.jsonl"  # type: ignore[arg-type]
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["request_id"] == rid:
            return str(record["model"])
    raise KeyError(rid)


def stream(stack: LocalStack, i: int, started: Any) -> tuple[str, int, str | None]:
    """One streamed completion: (id, tokens received, finish reason)."""
    body = {"model": TINY, "prompt": f"stream {i}", "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    model, tokens, finish = "", 0, None
    with httpx.stream("POST", stack.http_url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not model:
                started.release()  # its first chunk
            model = chunk.get("id") or model
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return model, tokens, finish


@pytest.mark.integration
def test_blue_green_switch_keeps_streams_in_flight(stack: LocalStack) -> None:
    import threading
    start(stack, new_rollout(TINY, "v1", "v2", "bluegreen"))
    started = threading.Semaphore(0)
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(stream, stack, i, started) for i in range(20)]
        for _ in range(20):  # every stream has its first chunk before the switch
            assert started.acquire(timeout=60)
        kv(stack, lambda store: store.change(TINY, lambda s: operate(s, "promote", "test")))
        wait_until(lambda: state_of(stack)["active"] == "v2", 5)
        new = [complete(stack, f"new {i}").json()["model"] for i in range(4)]
        results = [f.result(timeout=120) for f in futures]
    assert new == [V2] * 4
    assert [r for r in results if r[1:] != (40, "length")] == []  # none lost or cut
    assert {served_by(stack, r[0]) for r in results} == {V1}  # each finished on the version it started on
    kv(stack, lambda store: store.change(TINY, lambda s: operate(s, "rollback", "test")))  # the switch back
    wait_until(lambda: state_of(stack)["active"] == "v1", 5)
    assert complete(stack, "back").json()["model"] == V1


@pytest.mark.integration
def test_shadow_never_changes_answers_and_is_reported(stack: LocalStack) -> None:
    start(stack, new_rollout(TINY, "v1", "v2", "bluegreen"))  # shadow off, v1 serving
    prompts = [f"shadow prompt {i}" for i in range(10)]
    plain = [complete(stack, p).json()["choices"][0]["text"] for p in prompts]
    start(stack, new_rollout(TINY, "v1", "v2", "shadow", shadow_fraction=1.0))
    mirrored = [complete(stack, p).json() for p in prompts]
    assert [m["choices"][0]["text"] for m in mirrored] == plain
    assert {m["model"] for m in mirrored} == {V1}
    wait_until(lambda: state_of(stack)["shadow"]["compared"] == 10, 20)
    report = state_of(stack)["shadow"]
    assert report["mirrored"] + report["dropped"] == 10 and report["mirrored"] == 10
    assert report["agreement"] == 1.0  # same weights, greedy: the candidate agrees token for token
    assert report["shadow_ttft_s"]["n"] == 10 and report["errors"] == 0


@pytest.mark.integration
def test_ab_sticky_feedback_and_report(stack: LocalStack) -> None:
    from switchyard.rollouts.cli import rollout_app
    start(stack, new_rollout(TINY, "v1", "v2", "ab", weight=0.5))
    arm_of: dict[str, str] = {}
    for user in range(24):
        for turn in range(2):
            key = f"user-{user}"  # the OpenAI `user` field, or an x-session-id header
            r = (complete(stack, f"user {user} turn {turn}", 4, user=key) if user % 2
                 else complete(stack, f"user {user} turn {turn}", 4, headers={"x-session-id": key}))
            model = r.json()["model"]
            assert arm_of.setdefault(key, model) == model  # sticky across requests
            score = (4.0 if model == V2 else 2.0) + (0.5 if turn else -0.5)  # planted: B scores higher
            f = httpx.post(stack.http_url + "/v1/feedback", json={"request_id": r.json()["id"], "score": score},
                           timeout=10)
            assert f.status_code == 200, f.text
    assert set(arm_of.values()) == {V1, V2}
    bad = httpx.post(stack.http_url + "/v1/feedback", json={"request_id": "x", "score": "great"}, timeout=10)
    assert bad.status_code == 400 and "score" in bad.text
    from switchyard.cli import app
    assert stack.nats is not None
    creds = nats_credentials(stack)
    env = {"SWITCHYARD_NATS_URL": stack.nats.url, "SWITCHYARD_NATS_USER": creds.get("user", ""),
           "SWITCHYARD_NATS_PASSWORD": creds.get("password", "")}
    time.sleep(0.6)  # the router publishes its samples every interval
    printed = CliRunner().invoke(app, ["experiment", "report", TINY, "--json"], env=env)
    assert printed.exit_code == 0, printed.output
    rows = {r["metric"]: r for r in json.loads(printed.output)}
    assert rows["score"]["significant"] and rows["score"]["difference"] == pytest.approx(2.0)
    assert rows["score"]["n_a"] + rows["score"]["n_b"] == 48
    assert rows["ttft_s"]["n_a"] + rows["ttft_s"]["n_b"] == 48
    verdict = state_of(stack)["history"][-1]  # recorded: logs, metrics, spans, `switchyard report`
    parts = {part.split(":")[0].strip(): part for part in verdict["reason"].split(";")}
    assert verdict["kind"] == "verdict" and parts["score"].strip().startswith("score: v2 - v1 = +2 (95% CI")
    assert ", significant at alpha 0.05" in parts["score"]
    assert stack.router is not None and stack.router.metrics_port
    wait_until(lambda: 'kind="verdict",model="tiny-llama",reason="significant"' in httpx.get(
        f"http://127.0.0.1:{stack.router.metrics_port}/metrics", timeout=5).text, 5)
    result = CliRunner().invoke(rollout_app, ["status", TINY], env=env)
    assert result.exit_code == 0 and "ab" in result.output


@pytest.mark.integration
def test_admin_api_and_cli_drive_a_rollout(stack: LocalStack) -> None:
    from switchyard.rollouts.cli import rollout_app
    start(stack, new_rollout(TINY, "v1", "v2", "bluegreen"))
    kv(stack, lambda store: store.change(TINY, lambda s: operate(s, "abort", "test")))
    bad = admin(stack, "POST", "/admin/rollouts", json={"model": TINY, "baseline": "v1", "candidate": "v1"})
    assert bad.status_code == 400 and "differ" in bad.text
    unknown = admin(stack, "POST", "/admin/rollouts", json={"model": "nope", "baseline": "v1", "candidate": "v2"})
    assert unknown.status_code == 400 and "not installed" in unknown.text
    body = {"model": TINY, "baseline": "v1", "candidate": "v9", "mode": "bluegreen"}
    assert admin(stack, "POST", "/admin/rollouts", json=body).status_code == 201
    wait_until(lambda: state_of(stack)["candidate"] == "v9", 5)
    refused = admin(stack, "POST", f"/admin/rollouts/{TINY}/promote")
    assert refused.status_code == 503 and "no live replica" in refused.text  # v9 is not served
    wrong_key = httpx.post(f"{stack.http_url}/admin/rollouts/{TINY}/abort", headers={"authorization": "Bearer x"},
                           timeout=5)
    assert wrong_key.status_code == 401
    assert admin(stack, "POST", f"/admin/rollouts/{TINY}/abort").json()["status"] == "aborted"
    assert stack.nats is not None
    creds = nats_credentials(stack)
    env = {"SWITCHYARD_NATS_URL": stack.nats.url, "SWITCHYARD_NATS_USER": creds.get("user", ""),
           "SWITCHYARD_NATS_PASSWORD": creds.get("password", "")}
    runner = CliRunner()
    started = runner.invoke(rollout_app, ["start", TINY, "--candidate", "v2", "--mode", "bluegreen"], env=env)
    assert started.exit_code == 0, started.output  # baseline: the active version of the last rollout (v1)
    assert runner.invoke(rollout_app, ["start", TINY, "--candidate", "v2"], env=env).exit_code == 2  # one at a time
    switched = runner.invoke(rollout_app, ["promote", TINY, "--reason", "ship it"], env=env)
    assert switched.exit_code == 0 and "promoted" in switched.output
    wait_until(lambda: state_of(stack)["active"] == "v2", 5)
    assert complete(stack, "after the switch").json()["model"] == V2
    assert state_of(stack)["history"][-1]["reason"] == "ship it"


@pytest.mark.integration
def test_rollout_state_survives_a_router_restart(stack: LocalStack) -> None:
    start(stack, new_rollout(TINY, "v1", "v2", "bluegreen"))
    kv(stack, lambda store: store.change(TINY, lambda s: operate(s, "promote", "test")))
    wait_until(lambda: state_of(stack)["active"] == "v2", 5)
    router = stack.router
    assert router is not None
    router.process.kill()
    router.process.wait()
    stack._respawn(router, time.monotonic())
    router.wait_port(60)
    stack.wait_ready(60)
    assert [complete(stack, f"restarted {i}").json()["model"] for i in range(4)] == [V2] * 4
