"""Canary analysis: is the candidate version worse than the baseline on the same window?

Pure and I/O-free: the router (or whoever watches the traffic) fills one `ArmSamples` per arm
for the current analysis window and calls `compare`. The same function decides every canary
step, so its verdict and reasons are what the logs, metrics and `switchyard rollout status` show.

What is compared (all thresholds in `Thresholds`, defaults below):
- error rate: errors / requests, as an ABSOLUTE increase candidate - baseline
  (0.02 = two percentage points); a relative rule would fire on 0.1% → 0.3% noise;
- TTFT p99 and inter-token-latency p99 as a RATIO candidate / baseline (1.5 = 50% worse);
  latency samples come from successful requests only (a fast rejection must not flatter the
  candidate's latency), ITL samples are pooled per token like `switchyard.reporting.percentiles`;
- E2E p99 is reported in `figures` but not judged (it scales with output length, which the
  two arms do not control).
Percentiles are numpy's default (linear interpolation), as in the reporting package.

A figure over its limit is not yet a breach: the analysis runs every tick on small windows
(20 requests at a 1% step), where one failure is "+5 pts" and a p99 is the maximum, so a
healthy candidate would be rolled back by noise (measured: 4 of 6 simulated healthy canaries
at a 0.5% base error rate, bench/canary_exposure.py). With `breach_alpha` set (default 1e-3)
a breach also needs a one-sided binomial test to say the candidate is really over the line:
- errors: k failures in n candidate requests against a rate of baseline + max increase;
- p99 latency: if the candidate's p99 were within `limit x baseline p99`, at most 1% of its
  samples would lie above that line; k samples above it in n is tested against 1%.
  (ITL samples of one request are correlated, so for ITL this test is optimistic.)
A plainly bad candidate (half its requests failing, every token slower) is conclusive within a
handful of requests; a marginal one needs more, which is the price of not flapping.

Below `min_requests` on either arm the verdict is "wait": a p99 of a handful of samples is
their maximum, and one slow request would fail a good candidate. Errors are the exception when
`Thresholds.early_fail_p` is set: a count of failures can be conclusive long before a p99 is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from scipy import stats


@dataclass
class ArmSamples:
    """What one arm (baseline or candidate) did in one analysis window."""

    requests: int = 0
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)  # inter-token latencies, pooled
    e2e_s: list[float] = field(default_factory=list)

    def add(self, *, error: bool, ttft_s: float | None, itl_s: Sequence[float] = (),
            e2e_s: float | None = None) -> None:
        """Record one finished request. Latencies of a failed request are not kept (see module doc)."""
        self.requests += 1
        if error:
            self.errors += 1
            return
        if ttft_s is not None and math.isfinite(ttft_s):
            self.ttft_s.append(float(ttft_s))
        self.itl_s.extend(float(x) for x in itl_s if math.isfinite(x))
        if e2e_s is not None and math.isfinite(e2e_s):
            self.e2e_s.append(float(e2e_s))

    def merge(self, other: "ArmSamples") -> None:
        """Fold another window's samples into this one (e.g. samples gathered by several routers)."""
        self.requests += other.requests
        self.errors += other.errors
        self.ttft_s.extend(other.ttft_s)
        self.itl_s.extend(other.itl_s)
        self.e2e_s.extend(other.e2e_s)

    @property
    def error_rate(self) -> float:
        """errors / requests; NaN with no requests."""
        return self.errors / self.requests if self.requests else math.nan


@dataclass(frozen=True)
class Thresholds:
    """When a candidate counts as worse than its baseline. Defaults suit an interactive service."""

    max_error_rate_increase: float = 0.02  # absolute, candidate - baseline (0.02 = +2 points)
    max_ttft_p99_ratio: float = 1.5  # candidate p99 / baseline p99
    max_itl_p99_ratio: float = 1.5
    min_requests: int = 20  # per arm before a verdict other than "wait"
    # A latency ratio breach also needs candidate p99 - baseline p99 above this many seconds:
    # at sub-millisecond ITLs a x1.5 ratio is scheduler noise. 0.0 = ratio alone decides.
    min_latency_increase_s: float = 0.0
    # Opt-in early rollback on errors before min_requests: when the candidate's errors so far make
    # "its error rate is within max_error_rate_increase of the baseline's" implausible (one-sided
    # binomial test, p below this), fail at once. E.g. 4 failures out of 4 against a 0% baseline
    # gives p = 0.02**4 = 1.6e-7. Cuts the requests a broken canary serves at a 1% weight from
    # min_requests to a handful. None = always wait for min_requests.
    early_fail_p: float | None = None
    # A figure over its limit is a breach only when the candidate's samples make it conclusive at
    # this level (one-sided binomial tests, see the module doc); the analysis looks again at every
    # tick, so keep it small. None = the observed figures alone decide (noisy at small windows:
    # one failure in 20 requests is "+5 pts").
    breach_alpha: float | None = 0.001

    def __post_init__(self) -> None:
        if not (0.0 <= self.max_error_rate_increase <= 1.0):
            raise ValueError(f"max_error_rate_increase must be in [0, 1], got {self.max_error_rate_increase}")
        for name in ("max_ttft_p99_ratio", "max_itl_p99_ratio"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 1.0):
                raise ValueError(f"{name} must be a finite ratio >= 1.0, got {v}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests}")
        if not (math.isfinite(self.min_latency_increase_s) and self.min_latency_increase_s >= 0):
            raise ValueError(f"min_latency_increase_s must be >= 0, got {self.min_latency_increase_s}")
        if self.early_fail_p is not None and not (0.0 < self.early_fail_p < 0.5):
            raise ValueError(f"early_fail_p must be in (0, 0.5) or None, got {self.early_fail_p}")
        if self.breach_alpha is not None and not (0.0 < self.breach_alpha < 0.5):
            raise ValueError(f"breach_alpha must be in (0, 0.5) or None, got {self.breach_alpha}")


@dataclass(frozen=True)
class Verdict:
    """The outcome of one analysis, with the reasons a human reads and the numbers behind them."""

    outcome: Literal["pass", "fail", "wait"]
    reasons: list[str]  # e.g. "TTFT p99 0.91 s vs 0.20 s baseline (x4.6 > x1.5)"
    figures: dict[str, float]
    # on "pass": figures over their limit whose breach is not conclusive yet (see breach_alpha);
    # the canary holds rather than advancing on them
    inconclusive: tuple[str, ...] = ()


def _p99(samples: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(samples, dtype=float), 99.0)) if len(samples) else math.nan


def _fmt_s(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x * 1000:.1f} ms" if x < 0.1 else f"{x:.2f} s"


def _ratio(cand: float, base: float) -> float:
    if math.isnan(cand) or math.isnan(base):
        return math.nan
    if base > 0:
        return cand / base
    return 1.0 if cand <= 0 else math.inf


def _binom_p(k: int, n: int, p0: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p0): how surprising k events in n are if the rate is p0."""
    if k <= 0 or n <= 0:
        return 1.0
    if p0 <= 0.0:
        return 0.0
    if p0 >= 1.0:
        return 1.0
    return float(stats.binom.sf(k - 1, n, p0))


def _judge_latency(label: str, key: str, base: float, cand: float, cand_samples: Sequence[float],
                   limit: float, thresholds: Thresholds, figures: dict[str, float],
                   breaches: list[str], notes: list[str]) -> None:
    ratio = _ratio(cand, base)
    floor_s = thresholds.min_latency_increase_s
    head = f"{label} p99 {_fmt_s(cand)} vs {_fmt_s(base)} baseline"
    if math.isnan(ratio):
        notes.append(f"{label} p99 not compared (baseline {_fmt_s(base)}, candidate {_fmt_s(cand)})")
        return
    if ratio <= limit:
        notes.append(f"{head} (x{ratio:.2f} <= x{limit:g})")
        return
    if cand - base <= floor_s:
        notes.append(f"{head} (x{ratio:.2f}, but only +{_fmt_s(cand - base)} <= {_fmt_s(floor_s)})")
        return
    if thresholds.breach_alpha is None:
        breaches.append(f"{head} (x{ratio:.1f} > x{limit:g})")
        return
    # If the candidate's true p99 were <= limit x baseline p99, at most 1% of its samples would
    # lie above that line; count them and ask how surprising the count is.
    line = limit * base
    over = int(np.count_nonzero(np.asarray(cand_samples, dtype=float) > line))
    p = _binom_p(over, len(cand_samples), 0.01)
    figures[f"{key}_p99_breach_p"] = p
    if p < thresholds.breach_alpha:
        breaches.append(f"{head} (x{ratio:.1f} > x{limit:g}; {over}/{len(cand_samples)} samples above "
                        f"{_fmt_s(line)}, binomial p = {p:.2g})")
    else:
        notes.append(f"{head} (x{ratio:.2f} > x{limit:g} but not conclusive: {over}/{len(cand_samples)} "
                     f"samples above {_fmt_s(line)}, binomial p = {p:.2g} >= {thresholds.breach_alpha:g})")


def _judge_errors(baseline: ArmSamples, candidate: ArmSamples, thresholds: Thresholds,
                  figures: dict[str, float], breaches: list[str], notes: list[str]) -> None:
    b_err, c_err = baseline.error_rate, candidate.error_rate
    delta = thresholds.max_error_rate_increase
    increase = c_err - b_err
    figures["error_rate_increase"] = increase
    text = (f"error rate {c_err:.1%} vs {b_err:.1%} baseline "
            f"({increase * 100:+.1f} pts {'>' if increase > delta else '<='} +{delta * 100:g} pts")
    if increase <= delta:
        notes.append(text + ")")
        return
    if thresholds.breach_alpha is None:
        breaches.append(text + ")")
        return
    p = _binom_p(candidate.errors, candidate.requests, b_err + delta)
    figures["error_breach_p"] = p
    if p < thresholds.breach_alpha:
        breaches.append(f"{text}; {candidate.errors}/{candidate.requests} failed, binomial p = {p:.2g})")
    else:
        notes.append(f"{text} but not conclusive: {candidate.errors}/{candidate.requests} failed, "
                     f"binomial p = {p:.2g} >= {thresholds.breach_alpha:g})")


def _early_error_breach(baseline: ArmSamples, candidate: ArmSamples,
                        thresholds: Thresholds) -> tuple[str, float] | None:
    """(reason, p) when the candidate's errors already prove a breach (see Thresholds.early_fail_p)."""
    if thresholds.early_fail_p is None or candidate.errors == 0:
        return None
    # The test is repeated at every tick as requests accrue (several looks), so keep early_fail_p
    # small (1e-3): by a union bound over the <= min_requests looks, a candidate as good as the
    # baseline is failed early with probability <= min_requests * early_fail_p (2% at the defaults).
    base_rate = baseline.error_rate if baseline.requests else 0.0
    bound = base_rate + thresholds.max_error_rate_increase
    p = _binom_p(candidate.errors, candidate.requests, bound)
    if p >= thresholds.early_fail_p:
        return None
    return (f"error rate {candidate.errors}/{candidate.requests} ({candidate.error_rate:.0%}) already above "
            f"{base_rate:.1%} baseline +{thresholds.max_error_rate_increase * 100:g} pts before "
            f"{thresholds.min_requests} requests (binomial p = {p:.2g} < {thresholds.early_fail_p:g})", p)


def compare(baseline: ArmSamples, candidate: ArmSamples, thresholds: Thresholds) -> Verdict:
    """Compare the candidate against the baseline on one window.

    "fail" lists every breached threshold (one reason each); "pass" lists the figures that were
    checked; "wait" says which arm is short of `min_requests`.
    """
    b_ttft, c_ttft = _p99(baseline.ttft_s), _p99(candidate.ttft_s)
    b_itl, c_itl = _p99(baseline.itl_s), _p99(candidate.itl_s)
    figures: dict[str, float] = {
        "baseline_requests": float(baseline.requests),
        "candidate_requests": float(candidate.requests),
        "baseline_error_rate": baseline.error_rate,
        "candidate_error_rate": candidate.error_rate,
        "baseline_ttft_p99_s": b_ttft,
        "candidate_ttft_p99_s": c_ttft,
        "ttft_p99_ratio": _ratio(c_ttft, b_ttft),
        "baseline_itl_p99_s": b_itl,
        "candidate_itl_p99_s": c_itl,
        "itl_p99_ratio": _ratio(c_itl, b_itl),
        "baseline_e2e_p99_s": _p99(baseline.e2e_s),
        "candidate_e2e_p99_s": _p99(candidate.e2e_s),
    }
    short = [f"{name} has {arm.requests} requests (need {thresholds.min_requests})"
             for name, arm in (("baseline", baseline), ("candidate", candidate))
             if arm.requests < thresholds.min_requests]
    if short:
        early = _early_error_breach(baseline, candidate, thresholds)
        if early is not None:
            figures["early_fail_p"] = early[1]
            return Verdict("fail", [early[0]], figures)
        return Verdict("wait", ["not enough data: " + "; ".join(short)], figures)

    breaches: list[str] = []
    notes: list[str] = []
    _judge_errors(baseline, candidate, thresholds, figures, breaches, notes)
    _judge_latency("TTFT", "ttft", b_ttft, c_ttft, candidate.ttft_s, thresholds.max_ttft_p99_ratio,
                   thresholds, figures, breaches, notes)
    _judge_latency("ITL", "itl", b_itl, c_itl, candidate.itl_s, thresholds.max_itl_p99_ratio,
                   thresholds, figures, breaches, notes)
    if breaches:
        return Verdict("fail", breaches, figures)
    return Verdict("pass", notes, figures, tuple(n for n in notes if "not conclusive" in n))
