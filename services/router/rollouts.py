"""Rollouts in the router: which version of a model serves each request, the canary loop
that feeds the decision core with the router's own request outcomes, shadow mirroring, A/B
samples, and the feedback and admin endpoints.

The decisions themselves are pure functions in switchyard.rollouts (analysis, canary,
experiments); this module only does the I/O around them:

- state: every router watches the rollout KV bucket (switchyard.rollouts.state) and keeps the
  latest state per model in memory, so resolving a version costs a dict lookup and a hash.
- canary: every `interval_s` each router shares its samples of the current step (KV bucket
  switchyard_canary_samples) and ticks `CanaryController` on every router's samples of that
  step; an action is written with compare-and-set on the revision it read, so with several
  routers one decision wins per step (the losers re-read it from the watch).
- shadow: a copy of the request goes to the candidate in a task nobody awaits, bounded by a
  semaphore; it bypasses the tenant's rate limits and admission (the platform's cost, not the
  tenant's) and is dropped when the bound is hit or the candidate's replicas are full.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from switchyard.model.catalog import ModelCatalog, ModelEntry
# Imported here, not on a request's path: the first import (scipy) takes ~0.5 s, and on a
# request it blocked the router's event loop long enough for replicas to expire.
from switchyard.rollouts.analysis import ArmSamples, Thresholds, compare
from switchyard.rollouts.canary import CanaryController, CanaryPlan
from switchyard.rollouts.experiments import assign_arm
from switchyard.rollouts.state import (ACTIONS, CANARY_SAMPLES_BUCKET, CANARY_SAMPLES_TTL_S, FEEDBACK_BUCKET,
                                       SAMPLES_BUCKET, Decision, RolloutState, RolloutStore, StaleRevision, describe,
                                       kv_key, new_rollout, open_bucket, operate, versioned)

from .errors import ErrorKind, RequestError, invalid

if TYPE_CHECKING:
    from .pipeline import Completion, PreparedRequest, RequestPipeline

log = logging.getLogger(__name__)
tracer = trace.get_tracer("switchyard.router.rollouts")

DECISIONS = Counter("switchyard_rollout_decisions", "Rollout decisions by kind and reason category",
                    ["model", "kind", "reason"])
WEIGHT = Gauge("switchyard_rollout_weight", "Candidate share of new requests", ["model"])
ARM_REQUESTS = Counter("switchyard_rollout_requests", "Requests served by a rollout arm, by outcome",
                       ["model", "arm", "outcome"])
SHADOW = Counter("switchyard_shadow_requests", "Shadow copies by outcome (mirrored, dropped, error, match, mismatch)",
                 ["model", "outcome"])
REASON_LABELS = ("error_rate", "ttft_p99", "itl_p99", "healthy", "operator", "significant", "not_significant", "other")
RESYNC_S = 5.0  # re-read every rollout this often besides the watch
MAX_SAMPLES = 2000  # per arm, for the experiment report (newest kept)
MAX_SHARED_LATENCIES = 5000  # per list and router when shared (newest kept): enough for a p99


def reason_label(reason: str, kind: str = "") -> str:
    """A bounded label value for a decision's free-text reason."""
    text = reason.lower()
    if kind == "verdict":  # an experiment's verdict: did any metric differ significantly
        return "significant" if ", significant" in text else "not_significant"
    for label, words in (("error_rate", ("error",)), ("ttft_p99", ("ttft",)), ("itl_p99", ("itl", "inter-token")),
                         ("operator", ("operator", "admin", "cli")), ("healthy", ("pass", "healthy", "advance", "promot"))):
        if any(w in text for w in words):
            return label
    return "other"


@dataclass
class Resolution:
    served: str  # name@version (or the name itself: no rollout, or pinned)
    arm: str = ""  # "baseline" | "candidate" when a rollout chose it; "" otherwise
    rollout: RolloutState | None = None


@dataclass
class ArmWindow:
    """Samples of the current canary step (reset when the step changes)."""

    key: tuple[int, float, str]
    baseline: Any
    candidate: Any


def _window_key(state: RolloutState) -> tuple[int, float, str]:
    """A canary step's identity: its number, when it started, and the candidate."""
    return (state.step, state.step_started_at, state.candidate)


def pool_windows(own: ArmWindow, others: list[ArmWindow]) -> ArmWindow:
    """Own samples plus the other routers' of the same step (same step number, start and
    candidate); another step's are left out."""
    pooled = ArmWindow(own.key, ArmSamples(), ArmSamples())
    for window in [own, *others]:
        if tuple(window.key) == tuple(own.key):
            pooled.baseline.merge(window.baseline)
            pooled.candidate.merge(window.candidate)
    return pooled


def samples_to_json(samples: ArmSamples) -> dict[str, Any]:
    return {"requests": samples.requests, "errors": samples.errors, "ttft_s": samples.ttft_s[-MAX_SHARED_LATENCIES:],
            "itl_s": samples.itl_s[-MAX_SHARED_LATENCIES:], "e2e_s": samples.e2e_s[-MAX_SHARED_LATENCIES:]}


def samples_from_json(data: dict[str, Any]) -> ArmSamples:
    return ArmSamples(requests=int(data["requests"]), errors=int(data["errors"]),
                      ttft_s=[float(x) for x in data["ttft_s"]], itl_s=[float(x) for x in data["itl_s"]],
                      e2e_s=[float(x) for x in data["e2e_s"]])


@dataclass
class ShadowStats:
    mirrored: int = 0
    dropped: int = 0
    errors: int = 0
    compared: int = 0
    matched: int = 0
    primary_ttft_s: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES))
    shadow_ttft_s: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES))
    primary_e2e_s: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES))
    shadow_e2e_s: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=MAX_SAMPLES))

    def to_dict(self) -> dict[str, Any]:
        def pct(xs: Any, q: float) -> float | None:
            s = sorted(xs)
            return s[min(len(s) - 1, int(math.ceil(q * len(s))) - 1)] if s else None
        out: dict[str, Any] = {"mirrored": self.mirrored, "dropped": self.dropped, "errors": self.errors,
                               "compared": self.compared, "matched": self.matched,
                               "agreement": self.matched / self.compared if self.compared else None}
        for name in ("primary_ttft_s", "shadow_ttft_s", "primary_e2e_s", "shadow_e2e_s"):
            xs = getattr(self, name)
            out[name] = {"n": len(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99)}
        return out


class RequestTap:
    """What the pipeline reports about one request a rollout touched."""

    def __init__(self, manager: "RolloutManager", resolution: Resolution, prepared: "PreparedRequest") -> None:
        self.manager, self.resolution, self.prepared = manager, resolution, prepared
        self.token_ids: list[int] = []
        self.itl_s: list[float] = []  # per token, from the arrival times of the stream's chunks
        self._last_chunk: float | None = None
        self.primary_done: asyncio.Future[tuple[list[int], "Completion | None"]] | None = None

    def tokens(self, ids: list[int]) -> None:
        now = time.monotonic()
        if self._last_chunk is not None and len(self.itl_s) < 512:
            self.itl_s += [(now - self._last_chunk) / len(ids)] * len(ids)
        self._last_chunk = now
        if self.primary_done is not None:
            self.token_ids += ids

    def finish(self, code: str, done: "Completion | None") -> None:
        if self.primary_done is not None and not self.primary_done.done():
            self.primary_done.set_result((self.token_ids, done))
        self.manager.on_finish(self, code, done)


class RolloutManager:
    """Resolves versions, runs the canary loop, mirrors shadow traffic, keeps A/B samples."""

    def __init__(self, router_id: str, catalog: ModelCatalog, interval_s: float = 1.0,
                 shadow_max_inflight: int = 4, records_dir: Path | None = None) -> None:
        self.router_id = router_id
        self.catalog = catalog
        self.interval_s = interval_s
        self.states: dict[str, RolloutState] = {}
        self.revisions: dict[str, int] = {}
        self.windows: dict[str, ArmWindow] = {}
        self.ab_samples: dict[tuple[str, str], collections.deque[list[Any]]] = {}
        self.shadow: dict[str, ShadowStats] = {}
        self.shadow_max_inflight = shadow_max_inflight
        self.shadow_inflight = 0  # taken when a copy is decided, so the bound is never exceeded
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._entries: dict[str, ModelEntry] = {}
        self.store: RolloutStore | None = None
        self.feedback_kv: Any = None
        self.samples_kv: Any = None
        self.pipeline: RequestPipeline | None = None
        self.records_path = records_dir / "rollouts.jsonl" if records_dir else None
        self._tasks: list[asyncio.Task[Any]] = []
        self._samples_dirty: set[str] = set()
        self.canary_kv: Any = None
        self._canary_dirty: set[str] = set()
        self.pooled: dict[str, ArmWindow] = {}  # model → the last analysis' window, every router's samples
        self.started_unix = time.time()

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self, js: Any, pipeline: "RequestPipeline") -> None:
        self.pipeline = pipeline
        self.store = await RolloutStore.open(js)
        self.feedback_kv = await open_bucket(js, FEEDBACK_BUCKET, ttl=7 * 86400)
        self.samples_kv = await open_bucket(js, SAMPLES_BUCKET)
        self.canary_kv = await open_bucket(js, CANARY_SAMPLES_BUCKET, ttl=CANARY_SAMPLES_TTL_S)
        for state, revision in await self.store.all():  # before serving: the first request already sees them
            self._apply(state, revision)
        self._tasks.append(await self.store.watch(self._on_change))
        self._tasks.append(asyncio.create_task(self._loop(), name="rollout-loop"))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._shadow_tasks]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._shadow_tasks, return_exceptions=True)
        self._tasks.clear()

    async def _on_change(self, key: str, state: RolloutState | None) -> None:
        if state is None:
            for model in [m for m in self.states if kv_key(m) == key]:
                del self.states[model]
            return
        revision = (await self.store.get(state.model) or (state, 0))[1] if self.store else 0
        self._apply(state, revision)

    def _apply(self, state: RolloutState, revision: int) -> None:
        old = self.states.get(state.model)
        if old is not None and self.revisions.get(state.model, 0) > revision:
            return  # an older watch delivery than what we already read
        self.states[state.model], self.revisions[state.model] = state, revision
        # Decisions taken elsewhere (CLI, admin API, another router) are logged here too: those
        # this router had not seen, and on a first read only those since it started.
        seen = {(d.at, d.kind) for d in old.history} if old is not None else set()
        for decision in state.history:
            if ((decision.at, decision.kind) not in seen and decision.by != self.router_id
                    and (old is not None or decision.at >= self.started_unix)):
                emit_decision(state, decision, self.records_path)
        WEIGHT.labels(state.model).set(state.weight if state.running else float(state.active() == state.candidate))
        if old is None or (old.status, old.weight, old.step) != (state.status, state.weight, state.step):
            log.info("rollout %s: %s %s, %s → %s at %.0f%% (%s)", state.model, state.mode, state.status,
                     state.baseline, state.candidate, 100 * state.weight, state.reason)

    # ---- resolution ---------------------------------------------------------------------
    def resolve(self, model: str, key: str, request_id: str) -> Resolution:
        """The version serving this request: pinned (`name@version`) as asked; else the
        rollout's choice — canary by the request (a fresh draw per request), A/B by the
        user/session key (sticky), blue-green and shadow all to the active side."""
        if "@" in model:
            return Resolution(model)
        state = self.states.get(model)
        if state is None:
            return Resolution(model)
        if not state.running or state.mode in ("bluegreen", "shadow"):
            return Resolution(versioned(model, state.active()), "", state)
        w = state.weight
        if state.mode == "ab":
            arm = assign_arm(key or request_id, ["baseline", "candidate"], [1.0 - w, w], salt=state.salt)
        else:
            arm = "candidate" if w >= 1.0 else ("baseline" if w <= 0.0 else
                                                 assign_arm(request_id, ["baseline", "candidate"], [1.0 - w, w]))
        return Resolution(versioned(model, state.candidate if arm == "candidate" else state.baseline), arm, state)

    def aliases(self, models: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Model name → live replicas of the versions its rollout sends traffic to (so
        ListModels and /v1/models show the name clients call)."""
        out: dict[str, list[Any]] = {}
        for name, state in self.states.items():
            if state.running and state.mode in ("canary", "ab"):
                versions = [state.baseline, state.candidate]
            else:
                versions = [state.active()]
            replicas = [r for v in versions for r in models.get(versioned(name, v), [])]
            if replicas:
                out[name] = replicas
        return out

    def entry(self, served: str) -> ModelEntry | None:
        """The catalog entry for a served name: `name@version` is folder `name` renamed (versions
        share the tokenizer and template of their folder; the replicas load their own weights)."""
        if "@" not in served:
            return self.catalog.get(served)
        cached = self._entries.get(served)
        if cached is not None:
            return cached
        base = self.catalog.get(served.partition("@")[0])
        if base is None:
            return None
        renamed = dataclasses.replace(base, manifest=dataclasses.replace(base.manifest, name=served))
        if len(self._entries) < 256:  # bounded: names come from clients
            self._entries[served] = renamed
        return renamed

    def begin(self, resolution: Resolution, prepared: "PreparedRequest", span: Any = None) -> RequestTap | None:
        """Called once the request is routed; None when no rollout is involved."""
        state = resolution.rollout
        if state is None:
            return None
        if span is not None:
            span.set_attributes({"switchyard.rollout.mode": state.mode, "switchyard.rollout.status": state.status,
                                 "switchyard.rollout.arm": resolution.arm or "active"})
        tap = RequestTap(self, resolution, prepared)
        if state.running and state.mode == "shadow" and state.shadow_fraction > 0:
            self._maybe_mirror(tap, state)
        return tap

    def on_finish(self, tap: RequestTap, code: str, done: "Completion | None") -> None:
        state, arm = tap.resolution.rollout, tap.resolution.arm
        if state is None or not arm or code == "CANCELLED":
            return
        error = code != "OK"
        ARM_REQUESTS.labels(state.model, arm, "ok" if not error else "error").inc()
        ttft = done.time_to_first_token_s if done else 0.0
        e2e = done.end_to_end_s if done else 0.0
        if state.mode == "canary" and state.running:
            current = self.states.get(state.model, state)
            if _window_key(current) != _window_key(state):
                return  # began in a step that has ended: its sample belongs to no window now
            window = self._window(state)
            samples = window.candidate if arm == "candidate" else window.baseline
            samples.add(error=error, ttft_s=ttft if done else None, itl_s=tap.itl_s, e2e_s=e2e if done else None)
            self._canary_dirty.add(state.model)
        elif state.mode == "ab":
            version = state.candidate if arm == "candidate" else state.baseline
            dq = self.ab_samples.setdefault((state.model, version), collections.deque(maxlen=MAX_SAMPLES))
            dq.append([tap.prepared.request.request_id, error, ttft, e2e, None])
            self._samples_dirty.add(state.model)

    def _window(self, state: RolloutState) -> ArmWindow:
        key = _window_key(state)
        window = self.windows.get(state.model)
        if window is None or window.key != key:
            window = self.windows[state.model] = ArmWindow(key, ArmSamples(), ArmSamples())
        return window

    def analysis(self, model: str) -> dict[str, Any] | None:
        """The running canary step's verdict so far, on every router's samples as of the last
        analysis (this router's alone before the first one)."""
        state, window = self.states.get(model), self.windows.get(model)
        if state is None or window is None or not state.running or state.mode != "canary":
            return None
        pooled = self.pooled.get(model)
        if pooled is not None and pooled.key == window.key:
            window = pooled
        verdict = compare(window.baseline, window.candidate, Thresholds(**state.thresholds))
        return {"outcome": verdict.outcome, "reasons": verdict.reasons,
                "figures": {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None)
                            for k, v in verdict.figures.items()}}

    # ---- the canary loop ----------------------------------------------------------------
    async def _loop(self) -> None:
        last_sync = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            if time.monotonic() - last_sync >= RESYNC_S and self.store is not None:
                # The watch is the fast path; a periodic read is the safety net (a watch lost in a
                # NATS outage or restart would otherwise leave this router on a stale rollout).
                last_sync = time.monotonic()
                try:
                    await self.resync()
                except Exception as exc:
                    log.warning("rollout state not re-read: %s", exc)
            for model, state in list(self.states.items()):
                try:
                    if state.running and state.mode == "canary":
                        await self.tick(model, time.time())
                except Exception:
                    log.exception("rollout %s: canary tick failed", model)
            for publish in (self.publish_canary_samples, self._publish_samples):
                try:
                    await publish()
                except Exception as exc:  # the bus may be down; the samples stay in memory
                    log.warning("rollout samples not published (%s): %s", publish.__name__, exc)

    async def resync(self) -> None:
        """Apply every rollout newer than what this router holds (read from the bucket)."""
        assert self.store is not None
        for state, revision in await self.store.all():
            if revision > self.revisions.get(state.model, 0):
                self._apply(state, revision)

    async def tick(self, model: str, now: float) -> Decision | None:
        """One analysis of `model`'s canary; applies the action with compare-and-set."""
        state, revision = self.states[model], self.revisions.get(model, 0)
        try:  # bounded: nats-py's kv.keys() has no timeout of its own, and the loop must keep ticking
            others = await asyncio.wait_for(self._other_routers_windows(model), timeout=max(self.interval_s, 1.0))
        except TimeoutError:
            log.warning("rollout %s: other routers' canary samples not read in time; judging on this router's", model)
            others = []
        window = self.pooled[model] = pool_windows(self._window(state), others)
        plan = CanaryPlan(steps=tuple(state.steps), step_duration_s=state.step_duration_s,
                          thresholds=Thresholds(**state.thresholds))
        controller = CanaryController(plan, step=state.step, step_started_at=state.step_started_at or now)
        action = controller.tick(now, window.baseline, window.candidate)
        if action.kind == "hold":
            return None
        new = RolloutState.from_json(state.to_json())
        if action.kind == "advance":
            new.step, new.step_started_at, new.weight = controller.step, controller.step_started_at, action.weight
        elif action.kind == "promote":
            new.status, new.weight = "promoted", 1.0
        elif action.kind == "rollback":
            new.status, new.weight = "rolled_back", 0.0
        decision = new.record(action.kind, action.reason, self.router_id, now)
        assert self.store is not None
        try:
            revision = await self.store.update(new, revision)
        except StaleRevision:
            log.info("rollout %s: another router decided this step first", model)
            return None
        self._apply(new, revision)
        self.emit(new, decision, window)
        return decision

    def emit(self, state: RolloutState, decision: Decision, window: ArmWindow | None = None) -> None:
        """A decision as a log event, a metric, a span and a record for `switchyard report`."""
        emit_decision(state, decision, self.records_path,
                      figures={"baseline_requests": window.baseline.requests, "candidate_requests": window.candidate.requests,
                               "baseline_errors": window.baseline.errors, "candidate_errors": window.candidate.errors}
                      if window else None)

    # ---- canary samples shared between routers -------------------------------------------
    async def publish_canary_samples(self) -> None:
        """This router's samples of each running canary step, for the other routers' analyses:
        with N routers each sees 1/N of the traffic, and alone would need N× as long to judge."""
        if self.canary_kv is None:
            return
        for model in list(self._canary_dirty):
            window = self.windows.get(model)
            if window is not None:
                payload = {"router": self.router_id, "key": list(window.key), "at": time.time(),
                           "baseline": samples_to_json(window.baseline), "candidate": samples_to_json(window.candidate)}
                await self.canary_kv.put(f"{kv_key(model)}.{kv_key(self.router_id)}", json.dumps(payload).encode())
            self._canary_dirty.discard(model)  # only once sent: a failed put is retried next interval

    async def _other_routers_windows(self, model: str) -> list[ArmWindow]:
        """The other routers' samples of `model`'s canary (any step: pool_windows keeps the
        current one's). Unreadable ones are skipped: the analysis then judges on fewer."""
        if self.canary_kv is None:
            return []
        from nats.js.errors import KeyNotFoundError, NoKeysError
        prefix, own = f"{kv_key(model)}.", f"{kv_key(model)}.{kv_key(self.router_id)}"
        try:
            keys = [k for k in await self.canary_kv.keys() if k.startswith(prefix) and k != own]
        except NoKeysError:
            return []
        except Exception as exc:  # the bus is down: judge on this router's samples until it is back
            log.warning("rollout %s: other routers' canary samples not read: %s", model, exc)
            return []
        windows = []
        for key in keys:
            try:
                payload = json.loads((await self.canary_kv.get(key)).value)
                windows.append(ArmWindow(tuple(payload["key"]), samples_from_json(payload["baseline"]),
                                         samples_from_json(payload["candidate"])))
            except Exception as exc:  # deleted since listed, malformed, or the bus went down
                if not isinstance(exc, KeyNotFoundError):
                    log.warning("rollout %s: canary samples %s not read: %s", model, key, exc)
        return windows

    # ---- shadow -------------------------------------------------------------------------
    def _maybe_mirror(self, tap: RequestTap, state: RolloutState) -> None:
        rid = tap.prepared.request.request_id
        if assign_arm(rid, ["skip", "mirror"], [1 - state.shadow_fraction, state.shadow_fraction], salt="shadow") != "mirror":
            return
        stats = self.shadow.setdefault(state.model, ShadowStats())
        pipeline = self.pipeline
        target = versioned(state.model, state.candidate)
        replicas = pipeline.fleet.live(target) if pipeline else []
        full = sum(r.reported_requests for r in replicas) >= sum(r.max_batch_size for r in replicas)
        if not replicas or full or self.shadow_inflight >= self.shadow_max_inflight:
            stats.dropped += 1
            SHADOW.labels(state.model, "dropped").inc()
            return
        self.shadow_inflight += 1
        tap.primary_done = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._mirror(tap, state, target, stats), name=f"shadow-{rid}")
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _mirror(self, tap: RequestTap, state: RolloutState, target: str, stats: ShadowStats) -> None:
        """The candidate's answer to the same request, compared with the primary's and dropped."""
        try:
            await self._mirror_one(tap, state, target, stats)
        finally:
            self.shadow_inflight -= 1

    async def _mirror_one(self, tap: RequestTap, state: RolloutState, target: str, stats: ShadowStats) -> None:
        from .pipeline import TokenDelta
        assert self.pipeline is not None and tap.primary_done is not None
        stats.mirrored += 1
        SHADOW.labels(state.model, "mirrored").inc()
        entry = self.entry(target)
        prepared = dataclasses.replace(tap.prepared, entry=entry)
        req = dataclasses.replace(prepared.request, request_id=prepared.request.request_id + "-shadow")
        prepared = dataclasses.replace(prepared, request=req)
        tokens: list[int] = []
        done: Completion | None = None
        try:
            route = self.pipeline.route(prepared, "shadow")
            async for event in self.pipeline._relay(req, prepared, route, _ShadowObservation()):
                if isinstance(event, TokenDelta):
                    tokens += event.token_ids
                else:
                    done = event
        except Exception as exc:  # the candidate's failure is a finding, never the client's
            stats.errors += 1
            SHADOW.labels(state.model, "error").inc()
            log.info("shadow of %s on %s failed: %s", tap.prepared.request.request_id, target, exc)
            return
        try:
            primary_tokens, primary = await asyncio.wait_for(asyncio.shield(tap.primary_done), 600)
        except TimeoutError:
            return
        if primary is None:
            return
        stats.compared += 1
        same = primary_tokens == tokens
        stats.matched += same
        SHADOW.labels(state.model, "match" if same else "mismatch").inc()
        stats.primary_ttft_s.append(primary.time_to_first_token_s)
        stats.primary_e2e_s.append(primary.end_to_end_s)
        if done is not None:
            stats.shadow_ttft_s.append(done.time_to_first_token_s)
            stats.shadow_e2e_s.append(done.end_to_end_s)

    def shadow_report(self, model: str) -> dict[str, Any]:
        return self.shadow.get(model, ShadowStats()).to_dict()

    # ---- A/B samples and feedback -------------------------------------------------------
    async def _publish_samples(self) -> None:
        """Each router's A/B samples under <model>.<router> for `switchyard experiment report`."""
        if self.samples_kv is None:
            return
        for model in list(self._samples_dirty):
            self._samples_dirty.discard(model)
            state = self.states.get(model)
            arms = {version: list(dq) for (m, version), dq in self.ab_samples.items() if m == model}
            payload = {"model": model, "router": self.router_id, "salt": state.salt if state else "",
                       "arms": arms, "at": time.time()}
            await self.samples_kv.put(f"{kv_key(model)}.{kv_key(self.router_id)}", json.dumps(payload).encode())

    async def feedback(self, request_id: str, score: float, tenant: str) -> None:
        """A client's score for a request it was served (kept a week)."""
        for prefix in ("chatcmpl-", "cmpl-"):
            if request_id.startswith(prefix):
                request_id = request_id[len(prefix):]
        for dq in self.ab_samples.values():  # served here: the score joins its sample at once
            for sample in dq:
                if sample[0] == request_id:
                    sample[4] = score
        assert self.feedback_kv is not None
        await self.feedback_kv.put(kv_key(request_id), json.dumps(
            {"score": score, "tenant": tenant, "at": time.time()}).encode())


class _ShadowObservation:
    """The little a dispatch needs of an Observation, for a shadow copy: it is not a client
    request (no request metric, no record, not billed)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def context(self) -> None:
        return None

    def on_failover(self, *args: Any) -> None:
        pass


def emit_decision(state: RolloutState, decision: Decision, records_path: Path | None = None,
                  figures: dict[str, Any] | None = None) -> None:
    """Log event + Prometheus counter + span + a line in the run's rollouts.jsonl."""
    label = reason_label(decision.reason, decision.kind)
    DECISIONS.labels(state.model, decision.kind, label).inc()
    WEIGHT.labels(state.model).set(decision.weight)
    log.warning("rollout %s: %s (%s → %s, weight %.0f%%): %s", state.model, decision.kind.upper(), state.baseline,
                state.candidate, 100 * decision.weight, decision.reason)
    with tracer.start_as_current_span("rollout.decision") as span:
        span.set_attributes({"switchyard.rollout.model": state.model, "switchyard.rollout.kind": decision.kind,
                             "switchyard.rollout.reason": decision.reason, "switchyard.rollout.weight": decision.weight,
                             "switchyard.rollout.mode": state.mode, "switchyard.rollout.candidate": state.candidate})
    if records_path is not None:
        line = {**dataclasses.asdict(decision), "model": state.model, "mode": state.mode, "baseline": state.baseline,
                "candidate": state.candidate, "status": state.status, **({"figures": figures} if figures else {})}
        try:  # the run folder may not exist before the first request record
            records_path.parent.mkdir(parents=True, exist_ok=True)
            with open(records_path, "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as exc:
            log.error("rollout decision not recorded in %s: %s", records_path, exc)


def add_rollout_routes(app: Any, manager: RolloutManager, pipeline: "RequestPipeline", admin_key: str) -> None:
    """POST /v1/feedback (tenant key) and the admin API under /admin/rollouts (admin key)."""

    def bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else None

    def check_admin(request: Request) -> None:
        if not admin_key:
            raise RequestError(ErrorKind.NOT_FOUND, "the admin API is off; start the router with --admin-key")
        given = bearer(request) or ""
        if not hmac.compare_digest(given.encode(), admin_key.encode()):
            raise RequestError(ErrorKind.UNAUTHENTICATED, "missing or wrong admin key", field="authorization")

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError:
            raise invalid("body", "must be a JSON object") from None
        if not isinstance(data, dict):
            raise invalid("body", "must be a JSON object")
        return data

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        tenant = pipeline.authenticate(bearer(request))
        data = await body_of(request)
        rid, score = data.get("request_id"), data.get("score")
        if not isinstance(rid, str) or not 0 < len(rid) <= 128:
            raise invalid("request_id", "required: the id of a response you were served")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise invalid("score", "required: a finite number")
        await manager.feedback(rid, float(score), tenant.name)
        return JSONResponse({"request_id": rid, "score": float(score), "stored": True})

    @app.get("/admin/rollouts")
    async def list_rollouts(request: Request) -> JSONResponse:
        check_admin(request)
        return JSONResponse({"rollouts": [{**describe(s), "shadow": manager.shadow_report(m)}
                                          for m, s in sorted(manager.states.items())]})

    @app.get("/admin/rollouts/{model}")
    async def get_rollout(request: Request, model: str) -> JSONResponse:
        check_admin(request)
        state = manager.states.get(model)
        if state is None:
            raise RequestError(ErrorKind.NOT_FOUND, f"no rollout of {model!r}", field="model")
        return JSONResponse({**describe(state), "shadow": manager.shadow_report(model),
                             "analysis": manager.analysis(model),
                             "history": [dataclasses.asdict(d) for d in state.history]})

    @app.post("/admin/rollouts")
    async def start_rollout(request: Request) -> JSONResponse:
        check_admin(request)
        data = await body_of(request)
        try:
            state = new_rollout(str(data.get("model", "")), str(data.get("baseline", "")),
                                str(data.get("candidate", "")), str(data.get("mode", "canary")),
                                steps=data.get("steps"), step_duration_s=float(data.get("step_duration_s", 60.0)),
                                thresholds=data.get("thresholds"), shadow_fraction=float(data.get("shadow_fraction", 0.0)),
                                weight=data.get("weight"), by="admin-api")
            if pipeline.catalog.get(state.model) is None:
                raise ValueError(f"model {state.model!r} is not installed")
            assert manager.store is not None
            await manager.store.put_new(state)
        except (ValueError, TypeError) as exc:
            raise invalid("body", str(exc)) from None
        return JSONResponse(describe(state), status_code=201)

    @app.post("/admin/rollouts/{model}/{action}")
    async def act(request: Request, model: str, action: str) -> JSONResponse:
        check_admin(request)
        if action not in ACTIONS:
            raise RequestError(ErrorKind.NOT_FOUND, f"unknown action {action!r}; one of {list(ACTIONS)}")
        current = manager.states.get(model)
        if action == "promote" and current is not None and not pipeline.fleet.live(versioned(model, current.candidate)):
            raise RequestError(ErrorKind.UNAVAILABLE, f"{versioned(model, current.candidate)} has no live replica; "
                               "promoting it would fail every new request", retry_after_s=1.0)
        reason = str((await body_of(request)).get("reason", ""))
        assert manager.store is not None
        try:
            state, _ = await manager.store.change(model, lambda s: operate(s, action, "admin-api", reason))
        except KeyError:
            raise RequestError(ErrorKind.NOT_FOUND, f"no rollout of {model!r}", field="model") from None
        except ValueError as exc:
            raise invalid("action", str(exc)) from None
        return JSONResponse(describe(state))


__all__ = ["RolloutManager", "Resolution", "RequestTap", "emit_decision", "describe", "reason_label"]
