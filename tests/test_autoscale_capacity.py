"""The service rate per replica measured from heartbeats (issue 11: capacity measured, not
configured): the pure estimator with hand-built heartbeats, and the autoscaler giving the
measured figure to the policy in place of the configured one."""

from __future__ import annotations

import pytest

from services.autoscaler.core import Autoscaler, ColdStartStore
from services.autoscaler.scaling import ModelScaling
from switchyard.autoscaling.capacity import ServiceRateEstimator
from switchyard.autoscaling.policy import Decision, Demand, ScalingLimits, ScalingPolicy
from switchyard.fleet.view import FleetView
from switchyard.v1 import bus_pb2

pytestmark = [pytest.mark.unit]


def feed(est: ServiceRateEstimator, rid: str, t0: float, seconds: int, per_s: float, saturated: bool,
         completed0: int = 0, step: float = 0.5) -> int:
    """Heartbeats every `step` s for `seconds`, completing `per_s` requests/s; returns the counter."""
    n = int(seconds / step)
    for i in range(n + 1):
        est.observe(rid, t0 + i * step, completed0 + int(per_s * i * step), saturated)
    return completed0 + int(per_s * n * step)


def test_completions_while_full_give_the_rate_and_light_load_does_not_count() -> None:
    est = ServiceRateEstimator(window_s=60, min_saturated_s=5)
    done = feed(est, "a", 0.0, 20, per_s=0.5, saturated=False)  # light load: 0.5 req/s, not capacity
    assert est.rate() is None
    feed(est, "a", 20.5, 4, per_s=2.0, saturated=True, completed0=done)  # full, but only 4 s of it
    assert est.rate() is None
    done = feed(est, "a", 30.0, 10, per_s=2.0, saturated=True, completed0=done + 20)
    assert est.rate() == pytest.approx(2.0, rel=0.05)


def test_per_replica_across_replicas_and_kept_through_a_quiet_spell() -> None:
    est = ServiceRateEstimator(window_s=30, min_saturated_s=5)
    feed(est, "a", 0.0, 10, per_s=3.0, saturated=True)
    feed(est, "b", 0.0, 10, per_s=1.0, saturated=True)
    assert est.rate() == pytest.approx(2.0, rel=0.05)  # mean of the two replicas' rates at capacity
    feed(est, "a", 100.0, 60, per_s=0.2, saturated=False, completed0=30)  # quiet: the window empties
    assert est.rate() == pytest.approx(2.0, rel=0.05)  # the last estimate stays
    feed(est, "a", 200.0, 10, per_s=4.0, saturated=True, completed0=100)
    assert est.rate() == pytest.approx(4.0, rel=0.05)  # newer saturated spans replace it


def test_a_restarted_replica_and_repeated_reports_are_not_counted() -> None:
    est = ServiceRateEstimator(window_s=60, min_saturated_s=2, min_completions=1)
    est.observe("a", 0.0, 100, True)
    est.observe("a", 1.0, 0, True)  # counter went back: a restart, no span
    est.observe("a", 1.0, 50, True)  # the same report time again: ignored
    assert est.rate() is None
    est.observe("a", 3.0, 6, True)
    assert est.rate() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        ServiceRateEstimator(window_s=1, min_saturated_s=5)
    assert ServiceRateEstimator.saturated(running=4, max_batch_size=4, queue_depth=0)
    assert ServiceRateEstimator.saturated(running=2, max_batch_size=4, queue_depth=1)
    assert not ServiceRateEstimator.saturated(running=3, max_batch_size=4, queue_depth=0)


class Recorder(ScalingPolicy):
    name = "recorder"

    def __init__(self, limits: ScalingLimits) -> None:
        super().__init__(limits)
        self.seen: list[Demand] = []

    def decide(self, demand: Demand) -> Decision:
        self.seen.append(demand)
        return Decision(1, "hold")


class NoBackend:
    def replicas(self, model: str) -> list:  # type: ignore[type-arg]
        return []

    def add_replica(self, model: str) -> str:
        return ""

    def remove_replica(self, model: str, replica_id: str) -> None:
        pass

    def forget(self, model: str, replica_id: str) -> None:
        pass


@pytest.mark.parametrize("measure", [True, False])
def test_the_policy_gets_the_measured_rate_instead_of_the_configured_one(measure: bool) -> None:
    fleet = FleetView()
    policies: list[Recorder] = []

    def factory(name: str, limits: ScalingLimits) -> ScalingPolicy:
        policies.append(Recorder(limits))
        return policies[-1]
    scaler = Autoscaler([ModelScaling.parse("m=1:4")], NoBackend(), fleet, ColdStartStore(None, 5.0), factory,  # type: ignore[arg-type]
                        service_rate_per_replica=2.0, measure_service_rate=measure, service_rate_window_s=30.0)
    scaler.tick(now=0.0)
    assert policies[0].seen[-1].service_rate_per_replica == 2.0  # configured until measured
    for i in range(21):  # 10 s of heartbeats of a full replica completing 3.5 req/s
        fleet.observe(bus_pb2.LoadReport(replica_id="m-0", model="m", running=8, max_batch_size=8,
                                         completed=int(3.5 * i * 0.5), sent_unix_s=1000.0 + 0.5 * i,
                                         interval_s=1000.0))
        scaler.tick(now=1.0 + i)
    expected = pytest.approx(3.5, rel=0.05) if measure else 2.0
    assert policies[0].seen[-1].service_rate_per_replica == expected


def test_the_simulator_slows_replicas_that_share_a_machine_by_the_measured_scaling() -> None:
    from switchyard.autoscaling import make_scaling_policy
    from switchyard.autoscaling.simulator import Arrival, FleetModel, FleetSimulator
    both = [Arrival(1.0, 0, 100), Arrival(1.0, 0, 100)]  # two requests at once, one per replica (1 slot each)
    alone = [Arrival(1.0, 0, 100)]

    def durations(arrivals: list[Arrival], scaling: tuple[float, ...]) -> list[float]:
        fleet = FleetModel(slots_per_replica=1, batch_points=((1, 50.0),), prefill_cost=0.0, replica_scaling=scaling)
        sim = FleetSimulator(make_scaling_policy("reactive", ScalingLimits(2, 2)), arrivals, fleet, tick_s=1.0,
                             initial_replicas=2)
        sim.run()
        return [q.done - q.arrival for q in sim.requests]  # type: ignore[operator]

    assert durations(both, ()) == pytest.approx([2.0, 2.0])  # independent machines: 100 tokens at 50/s each
    assert durations(both, (1.0, 1.5)) == pytest.approx([2.0 / 0.75, 2.0 / 0.75])  # two together: 1.5× one
    assert durations(alone, (1.0, 1.5)) == pytest.approx([2.0])  # one busy replica runs at full speed
    with pytest.raises(ValueError):
        FleetModel(replica_scaling=(0.9, 1.5))
