"""The canary state machine: a stepped weight schedule, judged by `analysis.compare` each tick.

Pure and I/O-free; the rollout service calls `tick` every few seconds with the samples each arm
produced since the current step began (`step_started_at`), stores `to_dict()` in the rollout
KV bucket, and applies the returned action's weight. Rules:

- a breach at any moment of any step → "rollback" at once (weight 0.0), without waiting for
  the step's interval to end: a plainly bad candidate is rolled back at the first tick after it
  has `min_requests` (a marginal one once its breach is conclusive, see analysis.py);
- the step's `step_duration_s` elapsed, healthy with >= `min_requests` per arm → "advance"
  to the next weight (the caller starts a fresh window: `step_started_at` is now `now`);
- the last step below 100% healthy → "promote" (weight 1.0). A plan's final 1.0 step is
  therefore the promotion itself: at 100% the baseline gets no traffic to compare against;
- interval over but too few requests, or a figure over its limit that is not conclusive yet
  (`Verdict.inconclusive`) → "hold" at the same weight, saying so: more data settles it either
  way, and a suspect candidate never gets more traffic; otherwise "hold" while the interval runs.
After a rollback or a promotion the controller is finished and every later tick repeats that
action. Times are wall-clock seconds (time.time()), so a state saved by one router process is
meaningful to the next.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from switchyard.rollouts.analysis import ArmSamples, Thresholds, Verdict, compare


@dataclass(frozen=True)
class CanaryPlan:
    """Weights the candidate goes through, and how long each is watched."""

    steps: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 1.0)  # candidate weight per step
    step_duration_s: float = 60.0  # analysis interval
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self) -> None:
        steps = tuple(float(s) for s in self.steps)
        object.__setattr__(self, "steps", steps)
        if not steps:
            raise ValueError("a canary plan needs at least one step")
        if any(not (0.0 < s <= 1.0) for s in steps):
            raise ValueError(f"canary step weights must be in (0, 1], got {list(steps)}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"canary step weights must increase strictly, got {list(steps)}")
        if steps[0] >= 1.0:
            raise ValueError("a canary plan needs a step below 1.0 (switching all traffic at once is blue-green)")
        if not (math.isfinite(self.step_duration_s) and self.step_duration_s > 0):
            raise ValueError(f"step_duration_s must be > 0, got {self.step_duration_s}")

    @property
    def judged_steps(self) -> tuple[float, ...]:
        """The steps that are analysed (those below 1.0); passing the last one promotes."""
        return tuple(s for s in self.steps if s < 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "step_duration_s": self.step_duration_s,
                "thresholds": asdict(self.thresholds)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CanaryPlan":
        return cls(steps=tuple(d["steps"]), step_duration_s=float(d["step_duration_s"]),
                   thresholds=Thresholds(**d.get("thresholds", {})))


@dataclass(frozen=True)
class CanaryAction:
    """What to do now: the weight to apply and why (logged, a metric label, a span attribute)."""

    kind: Literal["hold", "advance", "promote", "rollback"]
    weight: float  # candidate weight after the action (0.0 after rollback, 1.0 on promote)
    reason: str
    verdict: Verdict | None = None  # the analysis behind it (None when the controller had finished)


Outcome = Literal["running", "promoted", "rolled_back"]


class CanaryController:
    """One per rollout. State is plain data (`to_dict`) so it can live in NATS KV."""

    def __init__(self, plan: CanaryPlan, step: int = 0, step_started_at: float = 0.0,
                 outcome: Outcome = "running", final_reason: str = "") -> None:
        n = len(plan.judged_steps)
        if not 0 <= step < n:
            raise ValueError(f"step must be in [0, {n}) for this plan, got {step}")
        if outcome not in ("running", "promoted", "rolled_back"):
            raise ValueError(f"unknown canary outcome {outcome!r}")
        self.plan = plan
        self.step = step
        self.step_started_at = float(step_started_at)
        self.outcome: Outcome = outcome
        self.final_reason = final_reason

    @property
    def weight(self) -> float:
        """The candidate's traffic share right now."""
        if self.outcome == "promoted":
            return 1.0
        if self.outcome == "rolled_back":
            return 0.0
        return self.plan.judged_steps[self.step]

    @property
    def finished(self) -> bool:
        return self.outcome != "running"

    def _where(self) -> str:
        return f"step {self.step + 1}/{len(self.plan.judged_steps)} ({self.weight:.0%})"

    def tick(self, now: float, baseline: ArmSamples, candidate: ArmSamples) -> CanaryAction:
        """Judge the current step's window and move the state machine (see module doc)."""
        if self.outcome == "promoted":
            return CanaryAction("promote", 1.0, self.final_reason)
        if self.outcome == "rolled_back":
            return CanaryAction("rollback", 0.0, self.final_reason)
        verdict = compare(baseline, candidate, self.plan.thresholds)
        elapsed = max(0.0, now - self.step_started_at)
        where = self._where()
        if verdict.outcome == "fail":
            reason = f"rolled back at {where} after {elapsed:.0f} s: " + "; ".join(verdict.reasons)
            self.outcome, self.final_reason = "rolled_back", reason
            return CanaryAction("rollback", 0.0, reason, verdict)
        duration = self.plan.step_duration_s
        if elapsed < duration:
            state = ("watching: " + "; ".join(verdict.inconclusive) if verdict.inconclusive
                     else "healthy so far" if verdict.outcome == "pass" else verdict.reasons[0])
            return CanaryAction("hold", self.weight,
                                f"{where}: {elapsed:.0f} s of {duration:g} s, {state}", verdict)
        if verdict.outcome == "wait":
            return CanaryAction("hold", self.weight,
                                f"{where}: interval over after {elapsed:.0f} s but {verdict.reasons[0]}; "
                                f"holding until there is enough", verdict)
        if verdict.inconclusive:
            return CanaryAction("hold", self.weight,
                                f"{where}: interval over after {elapsed:.0f} s but "
                                + "; ".join(verdict.inconclusive) + "; holding for more data", verdict)
        if self.step + 1 >= len(self.plan.judged_steps):
            reason = f"promoted after {where} was healthy for {elapsed:.0f} s: " + "; ".join(verdict.reasons)
            self.outcome, self.final_reason = "promoted", reason
            return CanaryAction("promote", 1.0, reason, verdict)
        self.step += 1
        self.step_started_at = float(now)
        reason = (f"advanced to {self._where()} after step {self.step}/{len(self.plan.judged_steps)} "
                  f"was healthy for {elapsed:.0f} s: " + "; ".join(verdict.reasons))
        return CanaryAction("advance", self.weight, reason, verdict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state (plan included) for the rollout KV bucket."""
        return {"plan": self.plan.to_dict(), "step": self.step, "step_started_at": self.step_started_at,
                "outcome": self.outcome, "final_reason": self.final_reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CanaryController":
        return cls(CanaryPlan.from_dict(d["plan"]), step=int(d["step"]),
                   step_started_at=float(d["step_started_at"]), outcome=d.get("outcome", "running"),
                   final_reason=d.get("final_reason", ""))
