"""The rollout decision cores (issue 12), with hand-built inputs: canary analysis, the canary
state machine, sticky A/B assignment, Welch comparison, and the status/report tables."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from rich.console import Console
from scipy import stats

from switchyard.rollouts.analysis import ArmSamples, Thresholds, compare
from switchyard.rollouts.canary import CanaryController, CanaryPlan
from switchyard.rollouts.experiments import assign_arm, needed_per_arm, welch_compare
from switchyard.rollouts.report import experiment_table, rollout_table

pytestmark = pytest.mark.unit


def arm(n: int, *, errors: int = 0, ttft: float = 0.2, itl: float = 0.02, e2e: float = 1.0,
        spread: float = 0.1, seed: int = 0) -> ArmSamples:
    """n requests, the first `errors` failed; latencies jittered by ±spread (relative) around the given values."""
    rng = np.random.default_rng(seed)
    s = ArmSamples()
    for i in range(n):
        j = 1 + spread * (2 * rng.random() - 1)
        s.add(error=i < errors, ttft_s=ttft * j, itl_s=[itl * j] * 8, e2e_s=e2e * j)
    return s


# ---------------------------------------------------------------- analysis.compare

def test_compare_passes_a_healthy_candidate():
    v = compare(arm(100, errors=1, seed=1), arm(100, errors=2, seed=2), Thresholds())
    assert v.outcome == "pass", v.reasons
    assert any(r.startswith("error rate") for r in v.reasons)
    assert v.figures["baseline_requests"] == 100 and v.figures["candidate_requests"] == 100
    assert 0.8 < v.figures["ttft_p99_ratio"] < 1.25


@pytest.mark.parametrize("bad, needle", [
    (dict(errors=10), "error rate 10.0% vs 0.0% baseline (+10.0 pts > +2 pts; 10/100 failed, binomial p = 3.4e-05)"),
    (dict(ttft=0.9), "TTFT p99"),
    (dict(itl=0.05), "ITL p99"),
])
def test_compare_flags_each_breach_with_its_reason(bad, needle):
    v = compare(arm(100, seed=1), arm(100, seed=2, **bad), Thresholds())
    assert v.outcome == "fail"
    assert len(v.reasons) == 1, v.reasons  # only the breached threshold is named
    assert needle in v.reasons[0]
    if "ttft" in bad:
        assert "baseline (x4.5 > x1.5; 100/100 samples above 0.33 s" in v.reasons[0]


def test_compare_names_every_breach_at_once():
    v = compare(arm(50), arm(50, errors=25, ttft=1.0, itl=0.2), Thresholds())
    assert v.outcome == "fail"
    assert [r.split()[0] for r in v.reasons] == ["error", "TTFT", "ITL"]


def test_compare_thresholds_are_configurable_and_inclusive():
    plain = Thresholds(breach_alpha=None)  # the observed figures alone decide
    base, cand = arm(100), arm(100, errors=2)  # exactly +2 points
    assert compare(base, cand, plain).outcome == "pass"
    assert compare(base, arm(100, errors=3), plain).outcome == "fail"
    assert compare(base, cand, Thresholds(max_error_rate_increase=0.01, breach_alpha=None)).outcome == "fail"
    slow = arm(100, ttft=0.3, spread=0.0)  # x1.5 exactly against a constant 0.2
    assert compare(arm(100, spread=0.0), slow, Thresholds()).outcome == "pass"
    assert compare(arm(100, spread=0.0), slow, Thresholds(max_ttft_p99_ratio=1.4)).outcome == "fail"


def test_compare_needs_a_conclusive_breach_by_default():
    """One failure in 20 requests is +5 pts but no evidence; 5 in 20 is. One slow outlier in 20
    makes the p99 x2 but is what a 1% tail looks like; 5 slow ones are not."""
    base = arm(2000, errors=10)  # 0.5% base error rate
    one_err, five_err = arm(20, errors=1, seed=3), arm(20, errors=5, seed=3)
    assert compare(base, one_err, Thresholds(breach_alpha=None)).outcome == "fail"
    v = compare(base, one_err, Thresholds())
    assert v.outcome == "pass" and any("not conclusive: 1/20 failed" in r for r in v.reasons), v.reasons
    assert v.figures["error_breach_p"] > 0.05
    v = compare(base, five_err, Thresholds())
    assert v.outcome == "fail" and "5/20 failed, binomial p = " in v.reasons[0]
    assert v.figures["error_breach_p"] < 1e-3

    def with_slow(k: int) -> ArmSamples:
        s = arm(20, spread=0.0, seed=4)
        s.ttft_s[:k] = [0.6] * k  # x3 the baseline's 0.2 s
        return s
    base = arm(2000, spread=0.0)
    assert compare(base, with_slow(1), Thresholds(breach_alpha=None)).outcome == "fail"
    v = compare(base, with_slow(1), Thresholds())
    assert v.outcome == "pass" and any("1/20 samples above 0.30 s" in r for r in v.reasons), v.reasons
    v = compare(base, with_slow(5), Thresholds())
    assert v.outcome == "fail" and "5/20 samples above 0.30 s" in v.reasons[0]


def test_default_analysis_rarely_fails_a_healthy_candidate_across_looks():
    """A healthy candidate (same 0.5% errors, same heavy-tailed latency as the baseline) judged
    every 5 requests from 20 to 120, as the canary loop looks each tick: the default analysis
    fails few runs; the plain observed-figure rule fails many of them."""
    rng = np.random.default_rng(21)

    def draw(s: ArmSamples, n: int) -> None:
        for _ in range(n):
            s.add(error=bool(rng.random() < 0.005), ttft_s=float(0.2 * rng.lognormal(0, 0.5)),
                  itl_s=list(0.02 * rng.lognormal(0, 0.5, 4)))
    runs = 100
    failed = {"default": 0, "plain": 0}
    for _ in range(runs):
        base, cand = ArmSamples(), ArmSamples()
        draw(base, 1000)
        draw(cand, 15)
        hit = dict.fromkeys(failed, False)
        for _ in range(20):
            draw(cand, 5)
            for name, t in (("default", Thresholds()), ("plain", Thresholds(breach_alpha=None))):
                hit[name] = hit[name] or compare(base, cand, t).outcome == "fail"
        for name in failed:
            failed[name] += hit[name]
    assert failed["default"] / runs <= 0.05, failed
    assert failed["plain"] / runs >= 0.1, failed  # the noise the default guards against is real


def test_compare_waits_below_min_requests_even_for_a_bad_candidate():
    t = Thresholds(min_requests=20)
    v = compare(arm(100), arm(19, errors=19), t)
    assert v.outcome == "wait"
    assert "candidate has 19 requests (need 20)" in v.reasons[0]
    v = compare(arm(5), arm(100), t)
    assert v.outcome == "wait" and "baseline has 5 requests" in v.reasons[0]
    assert compare(arm(100), arm(20, errors=20), t).outcome == "fail"  # at min_requests it judges


def test_failed_requests_do_not_count_toward_latency():
    s = ArmSamples()
    s.add(error=True, ttft_s=0.001, itl_s=[0.001], e2e_s=0.001)
    s.add(error=False, ttft_s=0.5, itl_s=[0.01, float("nan")], e2e_s=1.0)
    assert (s.requests, s.errors, s.ttft_s, s.itl_s, s.e2e_s) == (2, 1, [0.5], [0.01], [1.0])
    assert s.error_rate == 0.5 and math.isnan(ArmSamples().error_rate)


def test_min_latency_increase_keeps_tiny_latencies_from_flapping():
    base, cand = arm(100, itl=0.001, spread=0.0), arm(100, itl=0.002, spread=0.0)  # x2 but +1 ms
    assert compare(base, cand, Thresholds()).outcome == "fail"
    v = compare(base, cand, Thresholds(min_latency_increase_s=0.005))
    assert v.outcome == "pass" and any("only +1.0 ms" in r for r in v.reasons)


def test_compare_without_itl_samples_does_not_judge_itl():
    base, cand = ArmSamples(), ArmSamples()
    for _ in range(30):
        base.add(error=False, ttft_s=0.2)  # one-token answers: no inter-token gaps
        cand.add(error=False, ttft_s=0.2)
    v = compare(base, cand, Thresholds())
    assert v.outcome == "pass" and any("ITL p99 not compared" in r for r in v.reasons)


@pytest.mark.parametrize("kwargs", [dict(max_error_rate_increase=-0.1), dict(max_ttft_p99_ratio=0.9),
                                    dict(max_itl_p99_ratio=float("nan")), dict(min_requests=0),
                                    dict(min_latency_increase_s=-1.0)])
def test_thresholds_reject_bad_values(kwargs):
    with pytest.raises(ValueError):
        Thresholds(**kwargs)


# ---------------------------------------------------------------- canary state machine

def test_canary_walks_every_step_to_promotion_on_healthy_data():
    plan = CanaryPlan(step_duration_s=60.0)
    ctl = CanaryController(plan, step_started_at=1000.0)
    assert ctl.weight == 0.01
    healthy = (arm(50, seed=1), arm(50, seed=2))
    kinds, weights = [], []
    now = 1000.0
    for _ in range(4):
        a = ctl.tick(now + 30, *healthy)  # mid-interval: hold
        assert a.kind == "hold" and "healthy so far" in a.reason and a.weight == ctl.weight
        now += 60
        a = ctl.tick(now, *healthy)
        kinds.append(a.kind)
        weights.append(a.weight)
    assert kinds == ["advance", "advance", "advance", "promote"]
    assert weights == [0.05, 0.25, 0.5, 1.0]
    assert ctl.finished and ctl.outcome == "promoted" and ctl.weight == 1.0
    assert ctl.tick(now + 500, arm(50), arm(50, errors=50)).kind == "promote"  # finished stays finished


def test_canary_plan_ending_below_full_promotes_after_its_last_step():
    ctl = CanaryController(CanaryPlan(steps=(0.1, 0.5), step_duration_s=10), step_started_at=0)
    assert ctl.tick(10, arm(30), arm(30)).kind == "advance"
    a = ctl.tick(20, arm(30), arm(30))
    assert (a.kind, a.weight) == ("promote", 1.0)


@pytest.mark.parametrize("step", [0, 1, 2, 3])
def test_canary_rolls_back_at_once_on_a_breach_at_any_step(step):
    ctl = CanaryController(CanaryPlan(step_duration_s=60.0), step=step, step_started_at=1000.0)
    a = ctl.tick(1005.0, arm(40), arm(40, ttft=1.0))  # 5 s into a 60 s interval
    assert (a.kind, a.weight) == ("rollback", 0.0)
    assert f"step {step + 1}/4" in a.reason and "after 5 s" in a.reason and "TTFT p99" in a.reason
    assert ctl.outcome == "rolled_back" and ctl.weight == 0.0
    again = ctl.tick(1100.0, arm(40), arm(40))
    assert (again.kind, again.weight, again.reason) == ("rollback", 0.0, a.reason)


def test_canary_holds_on_thin_data_and_says_so():
    ctl = CanaryController(CanaryPlan(step_duration_s=60.0), step_started_at=0.0)
    a = ctl.tick(120.0, arm(500), arm(5))  # interval long over, 5 candidate requests
    assert (a.kind, a.weight) == ("hold", 0.01)
    assert "interval over" in a.reason and "candidate has 5 requests (need 20)" in a.reason
    assert ctl.tick(130.0, arm(500), arm(25)).kind == "advance"


def test_canary_state_round_trips_through_json():
    plan = CanaryPlan(steps=(0.02, 0.2, 1.0), step_duration_s=30.0,
                      thresholds=Thresholds(max_ttft_p99_ratio=2.0, min_requests=10))
    ctl = CanaryController(plan, step_started_at=50.0)
    ctl.tick(80.0, arm(10), arm(10))
    assert ctl.step == 1
    d = json.loads(json.dumps(ctl.to_dict()))
    back = CanaryController.from_dict(d)
    assert back.to_dict() == ctl.to_dict()
    assert back.plan == plan and back.step == 1 and back.step_started_at == 80.0
    # the restored controller decides exactly as the original would (x1.9 TTFT is within x2.0)
    slow = arm(10, ttft=0.38, spread=0.0)
    a1, a2 = ctl.tick(110.0, arm(10, spread=0.0), slow), back.tick(110.0, arm(10, spread=0.0), slow)
    assert (a1.kind, a1.weight) == (a2.kind, a2.weight) == ("promote", 1.0) and a1.reason == a2.reason
    done = CanaryController.from_dict(json.loads(json.dumps(back.to_dict())))
    assert done.outcome == "promoted" and done.tick(0.0, ArmSamples(), ArmSamples()).kind == "promote"


@pytest.mark.parametrize("steps", [(), (0.5, 0.2), (0.1, 0.1), (0.0, 0.5), (1.0,), (0.5, 1.5)])
def test_canary_plan_rejects_bad_schedules(steps):
    with pytest.raises(ValueError):
        CanaryPlan(steps=steps)


def test_canary_controller_rejects_a_step_outside_the_plan():
    with pytest.raises(ValueError):
        CanaryController(CanaryPlan(), step=4)  # step 4 is the 100% promotion, not a judged step


# ---------------------------------------------------------------- sticky A/B assignment

def test_assign_arm_is_sticky_within_and_across_processes():
    keys = [f"user-{i}" for i in range(50)]
    here = [assign_arm(k, ["a", "b", "c"], salt="exp1") for k in keys]
    assert here == [assign_arm(k, ["a", "b", "c"], salt="exp1") for k in keys]
    code = ("from switchyard.rollouts.experiments import assign_arm;"
            "print(','.join(assign_arm(f'user-{i}', ['a','b','c'], salt='exp1') for i in range(50)))")
    for seed in ("1", "2"):  # Python's hash() would differ between these; hashlib does not
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        assert out.split(",") == here


@pytest.mark.parametrize("weights", [None, (0.1, 0.3, 0.6), (0.5, 0.0, 0.5)])
def test_assign_arm_splits_close_to_the_weights(weights):
    n = 10_000
    arms = ["a", "b", "c"]
    counts = Counter(assign_arm(f"session-{i}", arms, weights) for i in range(n))
    w = np.ones(3) / 3 if weights is None else np.asarray(weights) / sum(weights)
    for name, p in zip(arms, w):
        band = 4 * math.sqrt(n * p * (1 - p))  # 4 binomial standard deviations
        assert abs(counts[name] - n * p) <= band, (name, counts, p)
    if weights is not None and 0.0 in weights:
        assert counts["b"] == 0


def test_assign_arm_salt_splits_experiments_independently():
    n = 4000
    pairs = Counter((assign_arm(f"u{i}", ["a", "b"], salt="e1"), assign_arm(f"u{i}", ["a", "b"], salt="e2"))
                    for i in range(n))
    for cell in (("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")):
        assert abs(pairs[cell] - n / 4) <= 4 * math.sqrt(n * 0.25 * 0.75), pairs


@pytest.mark.parametrize("arms, weights", [([], None), (["a", "a"], None), (["a", "b"], [1.0]),
                                           (["a", "b"], [0.0, 0.0]), (["a", "b"], [1.0, -1.0])])
def test_assign_arm_rejects_bad_input(arms, weights):
    with pytest.raises(ValueError):
        assign_arm("k", arms, weights)


# ---------------------------------------------------------------- Welch comparison

def test_welch_detects_a_planted_difference():
    rng = np.random.default_rng(12)
    a, b = rng.normal(0.10, 0.1, 500), rng.normal(0.13, 0.1, 500)
    c = welch_compare(a, b, "ttft_s", "A", "B")
    assert c.significant and c.p_value < 0.05
    assert c.ci_low < 0.03 < c.ci_high and c.ci_low > 0  # CI holds the true difference and excludes 0
    assert c.difference == pytest.approx(b.mean() - a.mean())
    assert (c.n_a, c.n_b, c.arm_a, c.arm_b) == (500, 500, "A", "B")
    assert c.needed_per_arm is not None and c.needed_per_arm < 500


def test_welch_matches_scipy_for_p_value_and_interval():
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 40), rng.normal(1.3, 3.0, 90)  # unequal n and variance
    c = welch_compare(a, b, "score", "A", "B", alpha=0.1)
    ref = stats.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(confidence_level=0.9)
    assert c.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert (c.ci_low, c.ci_high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))


def test_welch_aa_split_false_positive_rate_is_alpha():
    """A/A: both arms from one skewed (latency-like) distribution; over 1000 seeded runs the test
    must call ~alpha of them significant, and `significant` must be exactly `p < alpha`."""
    rng = np.random.default_rng(2026)
    runs, hits = 1000, 0
    for _ in range(runs):
        a, b = rng.lognormal(-2.0, 0.5, 200), rng.lognormal(-2.0, 0.5, 200)
        c = welch_compare(a, b, "e2e_s", "A", "A'")
        assert c.significant == (c.p_value < 0.05)
        hits += c.significant
    rate = hits / runs
    assert 0.03 <= rate <= 0.07, rate  # 0.05 ± 0.02 (about ±3 binomial SDs at n=1000)


def test_welch_interval_covers_the_true_difference_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    runs, covered = 1000, 0
    for _ in range(runs):  # unequal variances and sizes: where Welch's df matters
        a, b = rng.normal(0.0, 1.0, 30), rng.normal(0.5, 3.0, 80)
        c = welch_compare(a, b, "score", "A", "B")
        covered += c.ci_low <= 0.5 <= c.ci_high
    assert 0.93 <= covered / runs <= 0.97, covered / runs


def test_needed_per_arm_matches_textbook_values():
    # Cohen (1988) table 2.4.1, two-sided alpha 0.05, power 0.8: d=0.2 → 393, 0.5 → 64, 0.8 → 26
    for d, textbook in ((0.2, 393), (0.5, 64), (0.8, 26)):
        n = needed_per_arm(d, 1.0, 1.0)
        assert abs(n - textbook) / textbook <= 0.03, (d, n)
    assert needed_per_arm(-0.5, 1.0, 1.0) == needed_per_arm(0.5, 1.0, 1.0)
    assert needed_per_arm(0.0, 1.0, 1.0) is None


def test_needed_per_arm_gives_the_promised_power():
    """At the n it asks for, the planted effect is detected in ~80% of seeded runs."""
    n = needed_per_arm(0.03, 0.1, 0.1)
    rng = np.random.default_rng(11)
    runs = 1000
    hits = sum(welch_compare(rng.normal(0.10, 0.1, n), rng.normal(0.13, 0.1, n), "ttft_s", "A", "B").significant
               for _ in range(runs))
    assert 0.76 <= hits / runs <= 0.84, (n, hits)


def test_welch_rejects_bad_input_and_handles_constant_arms():
    with pytest.raises(ValueError, match="at least 2"):
        welch_compare([1.0], [1.0, 2.0], "m", "A", "B")
    with pytest.raises(ValueError, match="NaN"):
        welch_compare([1.0, float("nan")], [1.0, 2.0], "m", "A", "B")
    with pytest.raises(ValueError):
        welch_compare([1.0, 2.0], [1.0, 2.0], "m", "A", "B", alpha=1.5)
    same = welch_compare([1.0, 1.0], [1.0, 1.0], "m", "A", "B")
    assert not same.significant and same.p_value == 1.0 and same.needed_per_arm is None
    apart = welch_compare([1.0, 1.0], [2.0, 2.0], "m", "A", "B")
    assert apart.significant and apart.ci_low == apart.ci_high == 1.0


# ---------------------------------------------------------------- tables

def _render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_rollout_table_shows_versions_schedule_figures_and_reason():
    ctl = CanaryController(CanaryPlan(), step=1, step_started_at=100.0)
    v = compare(arm(40), arm(40, ttft=0.9), ctl.plan.thresholds)
    text = _render(rollout_table(model="tiny", baseline="v1", candidate="v2", mode="canary",
                                 weight=ctl.weight, state="running", reason="advanced to step 2/4 (5%)",
                                 controller=ctl, verdict=v, now=130.0))
    for needle in ("rollout of tiny", "v1", "v2", "95.0%", "5.0%", "1% → [5%] → 25% → 50% → 100%",
                   "30 s", "TTFT p99", "x4.50 (p 1e-80)", "<= x1.5", "fail", "advanced to step 2/4 (5%)"):
        assert needle in text, needle


def test_experiment_table_says_significant_only_when_it_is():
    rng = np.random.default_rng(5)
    sig = welch_compare(rng.normal(0.10, 0.05, 300), rng.normal(0.13, 0.05, 300), "ttft_s", "A", "B")
    same = welch_compare([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 2.0, 3.5], "score", "A", "B")
    assert sig.significant and not same.significant
    text = _render(experiment_table([sig, same]))
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "significant (p < 0.05)" in rows["ttft_s"] and "not significant" not in rows["ttft_s"]
    assert "not significant (p >= 0.05)" in rows["score"]
    assert str(sig.needed_per_arm) in rows["ttft_s"]


# ---------------------------------------------------------------- early rollback on errors (opt-in)

def test_early_fail_rolls_back_a_failing_candidate_before_min_requests():
    t = Thresholds(min_requests=20, early_fail_p=1e-3)
    assert compare(arm(500), arm(1, errors=1), t).outcome == "wait"  # one failure proves nothing
    v = compare(arm(500), arm(3, errors=3), t)  # 0.02**3 = 8e-6
    assert v.outcome == "fail" and "3/3 (100%)" in v.reasons[0] and "binomial p = 8e-06" in v.reasons[0]
    assert v.figures["early_fail_p"] == pytest.approx(0.02 ** 3)
    assert compare(arm(500), arm(3, errors=3), Thresholds(min_requests=20)).outcome == "wait"  # opt-in
    ctl = CanaryController(CanaryPlan(thresholds=t), step_started_at=0.0)
    a = ctl.tick(2.0, arm(500), arm(3, errors=3))
    assert (a.kind, a.weight) == ("rollback", 0.0) and "before 20 requests" in a.reason


def test_early_fail_rarely_fails_a_candidate_as_good_as_the_baseline():
    """Both arms fail 2% of requests; the candidate is judged after each of its first 19 requests
    (every look the canary loop would take). Early failures must stay under the union bound."""
    t = Thresholds(min_requests=20, early_fail_p=1e-3)
    rng = np.random.default_rng(4)
    runs, failed = 2000, 0
    for _ in range(runs):
        base = ArmSamples(requests=1000, errors=int(rng.binomial(1000, 0.02)))
        cand = ArmSamples()
        for _ in range(19):
            cand.add(error=bool(rng.random() < 0.02), ttft_s=0.2)
            if compare(base, cand, t).outcome == "fail":
                failed += 1
                break
    assert failed / runs <= 19 * 1e-3, failed


def test_compare_metrics_tests_shared_metrics_and_names_the_untestable():
    from switchyard.rollouts.experiments import compare_metrics
    rng = np.random.default_rng(8)
    a = {"ttft_s": list(rng.normal(0.10, 0.02, 200)), "score": [1.0, None, float("nan")]}
    b = {"ttft_s": list(rng.normal(0.13, 0.02, 200)), "score": [0.5, 0.7, 0.9], "e2e_s": [1.0, 2.0]}
    done, skipped = compare_metrics(a, b, "v1", "v2")
    assert [c.metric for c in done] == ["ttft_s"] and done[0].significant
    assert skipped == {"score": "too few samples (1 in v1, 3 in v2; need 2 each)",
                       "e2e_s": "too few samples (0 in v1, 2 in v2; need 2 each)"}
    text = _render(experiment_table(done, skipped=skipped))
    assert "not tested: too few samples (1 in v1" in text
    assert "v1: 100." in text and " ms" in text  # both arms of a row in one unit


def test_canary_holds_instead_of_advancing_on_an_inconclusive_figure():
    base = arm(2000, errors=10)
    ctl = CanaryController(CanaryPlan(step_duration_s=60.0), step_started_at=0.0)
    suspect = arm(20, errors=1, seed=3)  # +4.5 pts, not conclusive
    a = ctl.tick(30.0, base, suspect)
    assert a.kind == "hold" and "watching: error rate 5.0%" in a.reason
    a = ctl.tick(61.0, base, suspect)
    assert (a.kind, a.weight) == ("hold", 0.01)
    assert "interval over after 61 s but error rate 5.0%" in a.reason and "holding for more data" in a.reason
    diluted = arm(60, errors=1, seed=3)  # 1.7%: within 0.5% + 2 pts
    assert ctl.tick(70.0, base, diluted).kind == "advance"
