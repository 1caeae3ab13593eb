"""Rollout state (one per model name clients ask for) as JSON in a NATS KV bucket.

Every router watches the bucket and applies a change within a moment (hot reload); the bucket
lives in JetStream's file store, so the state survives a router restart. Changes go through
`RolloutStore.update` — a compare-and-set on the key's last revision — so when several
routers run the canary loop, exactly one decision per step wins and the others re-read.

    bucket  switchyard_rollouts    key <model>   RolloutState JSON
    bucket  switchyard_feedback    key <request> {"score": float, "tenant": str, "at": unix s}
    bucket  switchyard_canary_samples  key <model>.<router>  that router's samples of the canary step
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

ROLLOUT_BUCKET = "switchyard_rollouts"
FEEDBACK_BUCKET = "switchyard_feedback"
SAMPLES_BUCKET = "switchyard_rollout_samples"  # per router and model: the arms' recent samples
CANARY_SAMPLES_BUCKET = "switchyard_canary_samples"  # key <model>.<router>: its samples of the current canary step
CANARY_SAMPLES_TTL_S = 86_400.0
MODES = ("canary", "bluegreen", "shadow", "ab")
STATUSES = ("running", "promoted", "rolled_back", "aborted")
DECISION_KINDS = ("start", "advance", "promote", "rollback", "abort", "switch", "verdict")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_=-]")
MAX_HISTORY = 50


def kv_key(name: str) -> str:
    """A KV key from a model name or request id (keys allow [-_=A-Za-z0-9] and '.', '/' as
    separators; names keep their letters, anything else becomes '_')."""
    return _KEY_UNSAFE.sub("_", name) or "_"


def versioned(model: str, version: str) -> str:
    """`tiny` + `v2` → `tiny@v2`, the name a version's replicas are served under."""
    return f"{model}@{version}"


@dataclass
class Decision:
    """One decision of a rollout: an event in the logs, a metric, a span attribute, and here."""

    kind: str  # one of DECISION_KINDS
    weight: float  # candidate share of new traffic after it
    reason: str
    at: float = field(default_factory=time.time)  # unix seconds
    by: str = ""  # router id or "cli"/"admin-api"


@dataclass
class RolloutState:
    """A rollout of `candidate` over `baseline` for the model clients call `model`.

    `weight` is the candidate's share of new requests: the canary's current step, 0/1 for
    blue-green (1 = switched), the B arm for A/B; a shadow sends all traffic to the baseline and
    copies `shadow_fraction` of it to the candidate. When the rollout is over (promoted, rolled
    back, aborted) `active()` says which version serves everything."""

    model: str
    baseline: str
    candidate: str
    mode: str = "canary"
    status: str = "running"
    weight: float = 0.0
    # canary plan and progress (libs/switchyard/rollouts/canary.py)
    steps: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.25, 0.5, 1.0])
    step_duration_s: float = 60.0
    step: int = 0
    step_started_at: float = 0.0
    thresholds: dict[str, float] = field(default_factory=dict)  # Thresholds fields; {} = defaults
    shadow_fraction: float = 0.0
    salt: str = ""  # A/B assignment salt (a new experiment reshuffles users)
    reason: str = ""  # why the last decision was taken
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    history: list[Decision] = field(default_factory=list)

    def validate(self) -> None:
        """Bad input → ValueError naming the field (the CLI and the admin API show it)."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}, got {self.status!r}")
        for name in ("baseline", "candidate"):
            value = getattr(self, name)
            if not value or "@" in value or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
                raise ValueError(f"{name} must be a version name like v2 (letters, digits, . _ -), got {value!r}")
        if self.baseline == self.candidate:
            raise ValueError("baseline and candidate must differ")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {self.weight}")
        if not self.steps or any(not 0.0 < s <= 1.0 for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError(f"steps must be increasing shares in (0, 1], got {self.steps}")
        if self.step_duration_s <= 0:
            raise ValueError("step_duration_s must be positive")
        if not 0.0 <= self.shadow_fraction <= 1.0:
            raise ValueError(f"shadow_fraction must be in [0, 1], got {self.shadow_fraction}")

    @property
    def running(self) -> bool:
        return self.status == "running"

    def active(self) -> str:
        """The version serving every request once the rollout is over (or blue-green's side)."""
        if self.status == "promoted":
            return self.candidate
        if self.status == "running" and self.mode == "bluegreen":
            return self.candidate if self.weight >= 1.0 else self.baseline
        return self.baseline

    def record(self, kind: str, reason: str, by: str, now: float | None = None) -> Decision:
        decision = Decision(kind, self.weight, reason, now if now is not None else time.time(), by)
        self.history = [*self.history, decision][-MAX_HISTORY:]
        self.reason, self.updated_at = reason, decision.at
        return decision

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "RolloutState":
        raw = json.loads(data)
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}  # a newer writer's extra fields are ignored
        raw["history"] = [Decision(**d) for d in raw.get("history", [])]
        state = cls(**raw)
        state.validate()
        return state


class StaleRevision(Exception):
    """Another writer changed the rollout since it was read (compare-and-set lost)."""


class RolloutStore:
    """The rollout bucket: read, compare-and-set, watch. Thin over nats-py's KeyValue."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: Any) -> "RolloutStore":
        return cls(await open_bucket(js, ROLLOUT_BUCKET, history=8))

    async def get(self, model: str) -> tuple[RolloutState, int] | None:
        """The state and its revision, or None when the model has no rollout."""
        from nats.js.errors import KeyNotFoundError
        try:
            entry = await self.kv.get(kv_key(model))
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.operation in ("DEL", "PURGE"):
            return None
        return RolloutState.from_json(entry.value), entry.revision

    async def put_new(self, state: RolloutState, replace_finished: bool = True) -> int:
        """Start a rollout: refused while another one of the same model is running."""
        state.validate()
        current = await self.get(state.model)
        if current is None:
            from nats.js.errors import KeyWrongLastSequenceError
            try:
                return await self.kv.create(kv_key(state.model), state.to_json())
            except KeyWrongLastSequenceError:
                raise StaleRevision(f"a rollout of {state.model} was just started elsewhere") from None
        old, revision = current
        if old.running or not replace_finished:
            raise ValueError(f"a {old.mode} rollout of {state.model} ({old.baseline} → {old.candidate}) is "
                             f"{old.status}; promote, roll back or abort it first")
        return await self.update(state, revision)

    async def replace(self, state: RolloutState, by: str) -> int:
        """Start `state`, aborting a rollout of the same model that is still running (recorded
        as aborted by `by`) — what a benchmark or test that runs rollouts one after another wants."""
        current = await self.get(state.model)
        if current is not None and current[0].running:
            await self.change(state.model, lambda s: operate(s, "abort", by))
        return await self.put_new(state)

    async def update(self, state: RolloutState, revision: int) -> int:
        """Write `state` if the key is still at `revision`; StaleRevision otherwise."""
        from nats.js.errors import APIError, KeyWrongLastSequenceError
        state.validate()
        try:
            return await self.kv.update(kv_key(state.model), state.to_json(), last=revision)
        except KeyWrongLastSequenceError:
            raise StaleRevision(f"rollout of {state.model} changed since revision {revision}") from None
        except APIError as exc:  # older servers answer a wrong last sequence as a plain API error
            if getattr(exc, "err_code", None) == 10071:
                raise StaleRevision(f"rollout of {state.model} changed since revision {revision}") from None
            raise

    async def change(self, model: str, fn: Callable[[RolloutState], Decision | None],
                     attempts: int = 5) -> tuple[RolloutState, Decision | None]:
        """Read, apply `fn`, compare-and-set; re-read and re-apply when another writer won."""
        for _ in range(attempts):
            current = await self.get(model)
            if current is None:
                raise KeyError(f"no rollout of {model}")
            state, revision = current
            decision = fn(state)
            if decision is None:
                return state, None
            try:
                await self.update(state, revision)
                return state, decision
            except StaleRevision:
                continue
        raise StaleRevision(f"rollout of {model} kept changing; try again")

    async def all(self) -> list[tuple[RolloutState, int]]:
        from nats.js.errors import NoKeysError
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return []
        out = []
        for key in keys:
            got = await self.get(key)
            if got is not None:
                out.append(got)
        return out

    async def watch(self, on_change: Callable[[str, RolloutState | None], Awaitable[None] | None]) -> Any:
        """Call `on_change(key, state or None)` for every current key, then for every change;
        returns the task running the watch (cancel it to stop)."""
        import asyncio
        watcher = await self.kv.watchall()

        async def loop() -> None:
            try:
                async for entry in watcher:
                    if entry is None:  # end of the initial values
                        continue
                    state = None
                    if entry.value and entry.operation not in ("DEL", "PURGE"):
                        try:
                            state = RolloutState.from_json(entry.value)
                        except (ValueError, TypeError) as exc:
                            log.error("rollout %s: unreadable state ignored: %s", entry.key, exc)
                            continue
                    try:
                        result = on_change(entry.key, state)
                        if result is not None:
                            await result
                    except Exception:  # one bad change must not end the watch
                        log.exception("rollout %s: applying a change failed", entry.key)
            finally:
                try:
                    await watcher.stop()
                except Exception:  # the connection may be closing
                    pass
        return asyncio.create_task(loop(), name="rollout-watch")


async def open_bucket(js: Any, bucket: str, history: int = 1, ttl: float | None = None) -> Any:
    """The bucket, created when missing (file storage: it outlives every router)."""
    from nats.js.errors import BucketNotFoundError
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=bucket, history=history, ttl=ttl)


def describe(state: RolloutState) -> dict[str, Any]:
    """A flat summary for status tables and the admin API."""
    return {"model": state.model, "mode": state.mode, "status": state.status, "baseline": state.baseline,
            "candidate": state.candidate, "weight": state.weight, "step": state.step,
            "steps": list(state.steps), "active": state.active(), "shadow_fraction": state.shadow_fraction,
            "reason": state.reason, "started_at": state.started_at, "updated_at": state.updated_at}


ACTIONS = ("promote", "rollback", "abort")


def operate(state: RolloutState, action: str, by: str, reason: str = "") -> Decision:
    """An operator's action on a rollout (CLI or admin API), applied to `state` in place.

    promote: the candidate takes all new traffic (blue-green's switch; a canary skips its
    remaining steps). rollback: the baseline takes all new traffic again — also after a
    promotion (blue-green's switch back). abort: stop the rollout on the baseline, no verdict.
    Streams in flight finish on the version they started on: a version is chosen per request."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {list(ACTIONS)}, got {action!r}")
    if action == "promote":
        if not state.running:
            raise ValueError(f"the rollout of {state.model} is {state.status}; only a running one can be promoted")
        state.status, state.weight = "promoted", 1.0
        kind = "switch" if state.mode == "bluegreen" else "promote"
        why = reason or f"operator: all new traffic to {state.candidate}"
    elif action == "rollback":
        if state.status not in ("running", "promoted"):
            raise ValueError(f"the rollout of {state.model} is {state.status} already")
        state.status, state.weight = "rolled_back", 0.0
        kind = "rollback"
        why = reason or f"operator: all new traffic back to {state.baseline}"
    else:
        if not state.running:
            raise ValueError(f"the rollout of {state.model} is {state.status}; nothing to abort")
        state.status, state.weight = "aborted", 0.0
        kind = "abort"
        why = reason or f"operator: rollout aborted, {state.baseline} serves"
    return state.record(kind, why, by)


def new_rollout(model: str, baseline: str, candidate: str, mode: str = "canary", *,
                steps: list[float] | None = None, step_duration_s: float = 60.0,
                thresholds: dict[str, float] | None = None, shadow_fraction: float = 0.0,
                weight: float | None = None, salt: str = "", by: str = "cli") -> RolloutState:
    """A validated new rollout; the canary starts at its first step, A/B at `weight` (0.5),
    blue-green with all traffic on the baseline, shadow copying `shadow_fraction` (0.1)."""
    if mode == "canary":
        from .analysis import Thresholds
        from .canary import CanaryPlan
        plan = CanaryPlan(steps=tuple(steps or (0.01, 0.05, 0.25, 0.5, 1.0)), step_duration_s=step_duration_s,
                          thresholds=Thresholds(**(thresholds or {})))
        start_weight = plan.judged_steps[0]
    else:
        start_weight = {"ab": 0.5, "bluegreen": 0.0, "shadow": 0.0}.get(mode, 0.0)
    if weight is not None and mode == "ab":
        start_weight = weight
    if mode == "shadow" and not shadow_fraction:
        shadow_fraction = 0.1
    now = time.time()
    state = RolloutState(model=model, baseline=baseline, candidate=candidate, mode=mode, weight=start_weight,
                         steps=list(steps or [0.01, 0.05, 0.25, 0.5, 1.0]), step_duration_s=step_duration_s,
                         step_started_at=now, thresholds=dict(thresholds or {}), shadow_fraction=shadow_fraction,
                         salt=salt or f"{model}:{candidate}:{int(now)}", started_at=now)
    state.validate()
    state.record("start", f"{mode} of {candidate} over {baseline} started at {start_weight:.0%}", by, now)
    return state
