"""A/B experiments: sticky arm assignment and the significance test behind a report.

Pure and I/O-free. `assign_arm` maps a user/session key to an arm with a stable hash, so every
router (and every restart) puts the same key in the same arm. `welch_compare` compares one
metric between two arms with Welch's t-test (unequal variances: a slower version usually has a
wider spread too) and says "significant" only when p < alpha.

Sample size (`needed_per_arm`): the per-arm n at which a two-sided Welch test at `alpha` has
power 0.8 to detect the OBSERVED difference, given the observed standard deviations. Computed
exactly from the noncentral t distribution (scipy.stats.nct) with the Welch–Satterthwaite df
at equal n, starting from the normal approximation n = (z_{1-a/2} + z_{power})^2 (s_a^2 + s_b^2) / d^2
(which undershoots by a sample or two). For equal SDs and Cohen's d = 0.5 this gives the
textbook 64 per group.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats


def assign_arm(key: str, arms: Sequence[str], weights: Sequence[float] | None = None,
               salt: str = "") -> str:
    """The arm for `key`: sha256(salt, key) → a uniform number in [0, 1) → the arm whose
    cumulative weight band holds it. Stable across processes and Python versions (hashlib, not
    hash()). Use the experiment's name as `salt` so two experiments split users independently."""
    if not arms:
        raise ValueError("assign_arm needs at least one arm")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arm names must be unique, got {list(arms)}")
    if weights is None:
        weights = [1.0] * len(arms)
    if len(weights) != len(arms):
        raise ValueError(f"{len(weights)} weights for {len(arms)} arms")
    if any(not (math.isfinite(w) and w >= 0) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    digest = hashlib.sha256(f"{salt}\x1f{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    total = float(sum(weights))
    cum = 0.0
    for arm, w in zip(arms, weights):
        cum += w / total
        if u < cum:
            return arm
    # float rounding left u just above the last band edge: the last arm with any weight
    return next(a for a, w in zip(reversed(arms), reversed(weights)) if w > 0)


@dataclass(frozen=True)
class ArmComparison:
    """One metric, arm B against arm A. `difference` = mean_b - mean_a, with its CI."""

    metric: str
    arm_a: str
    arm_b: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    alpha: float
    significant: bool  # p < alpha, and only then
    needed_per_arm: int | None  # per-arm n to detect the observed effect at power 0.8

    @property
    def confidence(self) -> float:
        """The CI's level, 1 - alpha."""
        return 1.0 - self.alpha

    def summary(self) -> str:
        """One line for logs and the report."""
        verdict = "significant" if self.significant else "not significant"
        need = f", ~{self.needed_per_arm}/arm needed for this effect" if self.needed_per_arm else ""
        return (f"{self.metric}: {self.arm_b} - {self.arm_a} = {self.difference:+.4g} "
                f"({self.confidence:.0%} CI {self.ci_low:+.4g} .. {self.ci_high:+.4g}), "
                f"p = {self.p_value:.3g}, {verdict} at alpha {self.alpha:g} "
                f"(n = {self.n_a} vs {self.n_b}{need})")


def _welch_df(va: float, na: int, vb: float, nb: int) -> float:
    qa, qb = va / na, vb / nb
    return (qa + qb) ** 2 / (qa * qa / (na - 1) + qb * qb / (nb - 1))


def needed_per_arm(difference: float, sd_a: float, sd_b: float, alpha: float = 0.05,
                   power: float = 0.8, max_n: int = 10**9) -> int | None:
    """Smallest equal per-arm n at which a two-sided Welch test detects `difference` with
    `power` (see module doc). None when there is no effect to detect or it needs > max_n."""
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    var_sum = sd_a * sd_a + sd_b * sd_b
    if not (math.isfinite(difference) and math.isfinite(var_sum)) or difference == 0 or var_sum <= 0:
        return None
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    n = max(2, math.ceil(z * z * var_sum / (difference * difference)))
    if n > max_n:
        return None
    va, vb = sd_a * sd_a, sd_b * sd_b

    def power_at(m: int) -> float:
        df = _welch_df(va, m, vb, m)
        nc = abs(difference) / math.sqrt(var_sum / m)
        crit = stats.t.ppf(1 - alpha / 2, df)
        return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))

    # the t test needs a little more than the normal approximation; step up (a few steps at most)
    while power_at(n) < power:
        n += 1 if n < 1000 else max(1, n // 1000)
        if n > max_n:
            return None
    return n


def welch_compare(a: Sequence[float], b: Sequence[float], metric: str, arm_a: str, arm_b: str,
                  alpha: float = 0.05) -> ArmComparison:
    """Welch's t-test of mean(b) - mean(a) (scipy.stats.ttest_ind, equal_var=False), its
    (1 - alpha) CI with the Welch–Satterthwaite df, and the per-arm n the observed effect needs."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if xa.ndim != 1 or xb.ndim != 1:
        raise ValueError("samples must be flat sequences of numbers")
    if not (np.isfinite(xa).all() and np.isfinite(xb).all()):
        raise ValueError(f"{metric}: samples contain NaN or inf")
    if xa.size < 2 or xb.size < 2:
        raise ValueError(f"{metric}: need at least 2 samples per arm, got {xa.size} ({arm_a}) "
                         f"and {xb.size} ({arm_b})")
    na, nb = int(xa.size), int(xb.size)
    mean_a, mean_b = float(xa.mean()), float(xb.mean())
    va, vb = float(xa.var(ddof=1)), float(xb.var(ddof=1))
    diff = mean_b - mean_a
    se = math.sqrt(va / na + vb / nb)
    if se == 0.0:
        # both arms constant: no spread to test against. Equal means → nothing to see; different
        # constants → the difference is certain.
        p = 1.0 if diff == 0 else 0.0
        lo = hi = diff
    else:
        p = float(stats.ttest_ind(xb, xa, equal_var=False).pvalue)
        half = float(stats.t.ppf(1 - alpha / 2, _welch_df(va, na, vb, nb))) * se
        lo, hi = diff - half, diff + half
    return ArmComparison(
        metric=metric, arm_a=arm_a, arm_b=arm_b, n_a=na, n_b=nb, mean_a=mean_a, mean_b=mean_b,
        difference=diff, ci_low=lo, ci_high=hi, p_value=p, alpha=alpha, significant=bool(p < alpha),
        needed_per_arm=needed_per_arm(diff, math.sqrt(va), math.sqrt(vb), alpha) if se > 0 else None,
    )


def compare_metrics(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], arm_a: str,
                    arm_b: str, alpha: float = 0.05) -> tuple[list[ArmComparison], dict[str, str]]:
    """`welch_compare` for every metric both arms have (e.g. "ttft_s", "e2e_s", "score"), in
    `a`'s order. Metrics that cannot be tested yet come back in the second value with the reason
    (the report shows them rather than dropping them silently). Each metric is tested at `alpha`
    on its own: with k metrics, expect about k * alpha false positives under A/A."""
    done: list[ArmComparison] = []
    skipped: dict[str, str] = {}
    for metric in [*a, *(m for m in b if m not in a)]:
        xa = [float(x) for x in a.get(metric, ()) if x is not None and math.isfinite(x)]
        xb = [float(x) for x in b.get(metric, ()) if x is not None and math.isfinite(x)]
        if len(xa) < 2 or len(xb) < 2:
            skipped[metric] = f"too few samples ({len(xa)} in {arm_a}, {len(xb)} in {arm_b}; need 2 each)"
            continue
        done.append(welch_compare(xa, xb, metric, arm_a, arm_b, alpha))
    return done, skipped
