"""The fleet simulator: determinism, conservation of requests, the calibration, cold starts and
scale to zero, the reactive/predictive ordering on spikes, and the `switchyard simulate` CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from switchyard.autoscaling import ScalingLimits, make_scaling_policy
from switchyard.autoscaling.simulator import (Arrival, FleetModel, FleetSimulator, Spike, TraceSpec, compare,
                                              generate_arrivals, load_trace, simulate)
from switchyard.cli import app

pytestmark = pytest.mark.unit

SHORT = TraceSpec(duration_s=600.0, base_rate=3.0, spikes=(Spike(200, 20, 60, 3.0),))


def _run(name: str, arrivals: list[Arrival], fleet: FleetModel = FleetModel(), limits: ScalingLimits = ScalingLimits(1, 16),
         **kw: float):  # type: ignore[no-untyped-def]
    return FleetSimulator(make_scaling_policy(name, limits), arrivals, fleet, **kw)  # type: ignore[arg-type]


def test_same_seed_same_result_other_seed_differs() -> None:
    a, b, c = (generate_arrivals(SHORT, seed=s) for s in (3, 3, 4))
    assert a == b and a != c
    fleet = FleetModel(cold_start_s=20.0)
    r1, r2 = (_run("predictive", x, fleet).run() for x in (a, b))
    assert (r1.replica_seconds, r1.within_slo, r1.dropped, r1.decisions, r1.series) == \
        (r2.replica_seconds, r2.within_slo, r2.dropped, r2.decisions, r2.series)
    assert _run("predictive", c, fleet).run().replica_seconds != r1.replica_seconds


def test_generator_follows_the_rate() -> None:
    arrivals = generate_arrivals(SHORT, seed=1)
    expected = sum(SHORT.rate(t + 0.5) for t in range(600))
    assert abs(len(arrivals) - expected) < 4 * math.sqrt(expected)
    during = sum(230 <= x.t < 280 for x in arrivals) / 50
    before = sum(100 <= x.t < 150 for x in arrivals) / 50
    assert during > 2.2 * before  # the spike is there (x3 at the hold)


def test_conservation_mid_run_and_at_the_end() -> None:
    arrivals = generate_arrivals(SHORT, seed=2)
    # one replica, no scaling: the spike overloads it, so requests queue, time out and drop
    sim = _run("reactive", arrivals, FleetModel(queue_timeout_s=10.0), ScalingLimits(1, 1))
    mid = sim.run(until=290.0)
    assert mid.in_flight > 0 and mid.dropped > 0
    assert mid.arrived == mid.completed + mid.dropped + mid.in_flight
    assert mid.arrived == sum(x.t <= 290.0 for x in arrivals)
    end = sim.run()
    assert end.in_flight == 0 and end.arrived == len(arrivals) == end.completed + end.dropped
    dropped = [q for q in sim.requests if q.dropped is not None]
    assert all(q.first_token is None and q.dropped - q.arrival == pytest.approx(10.0) for q in dropped)


def test_one_request_alone_matches_the_calibration() -> None:
    fleet = FleetModel()
    result = simulate(make_scaling_policy("reactive", ScalingLimits(1, 1)), [Arrival(1.0, 128, 100)], fleet)
    ttft = result.ttft_p50_s
    assert ttft == pytest.approx(0.149, rel=1e-6)  # measured int4 TTFT at N=1 for a 128-token prompt
    assert result.completed == 1 and result.within_slo == 1
    # a full replica completes slots / (work per request / per-stream rate at full batch) requests/s
    per_stream = 208.3 / 16
    assert fleet.service_rate_per_replica(128, 128) == pytest.approx(16 / ((0.149 * 46.5 + 128) / per_stream))


def test_batching_shares_the_replica() -> None:
    # 16 identical requests at once on one replica: each decodes at 208.3/16 tokens/s
    arrivals = [Arrival(1.0, 0, 130) for _ in range(16)]
    sim = _run("reactive", arrivals, FleetModel(), ScalingLimits(1, 1))
    sim.run()
    assert all(q.done - q.arrival == pytest.approx(130 / (208.3 / 16), rel=1e-6) for q in sim.requests)
    # the 17th waits for a slot
    sim = _run("reactive", arrivals + [Arrival(1.0, 0, 130)], FleetModel(), ScalingLimits(1, 1))
    sim.run()
    assert sim.requests[16].first_token == pytest.approx(sim.requests[0].done)


def test_scale_to_zero_then_one_request_waits_a_cold_start() -> None:
    fleet = FleetModel(cold_start_s=12.0, queue_timeout_s=60.0)
    limits = ScalingLimits(0, 2, scale_to_zero_after_s=30.0)
    sim = _run("reactive", [Arrival(1.0, 128, 20), Arrival(300.0, 128, 20)], fleet, limits, tick_s=5.0)
    result = sim.run()
    assert result.dropped == 0 and result.completed == 2
    assert [d[1] for d in result.decisions][:2] == [1, 0]
    first, second = sim.requests
    assert first.first_token - first.arrival < 1.0
    # woken at the next tick (≤ 5 s), then one cold start before the replica takes it
    assert 12.0 <= second.first_token - second.arrival <= 12.0 + 5.0 + 0.5
    assert result.replica_seconds < 100.0  # the fleet was at zero most of the 300 s


def test_predictive_rides_out_spikes_reactive_does_not() -> None:
    fleet = FleetModel(cold_start_s=60.0)
    arrivals = generate_arrivals(TraceSpec(), seed=1)
    reactive, predictive = compare({"reactive": {}, "predictive": {}}, arrivals, fleet, ScalingLimits(1, 16))
    assert reactive.arrived == predictive.arrived == len(arrivals)
    assert reactive.slo_attainment < 0.95  # capacity arrives one cold start late
    assert predictive.slo_attainment > reactive.slo_attainment + 0.04
    assert predictive.dropped <= reactive.dropped
    assert predictive.replica_seconds > 0.9 * reactive.replica_seconds  # pre-warming is not free


def test_trace_file(tmp_path: Path) -> None:
    with_header = tmp_path / "a.csv"
    with_header.write_text("t,output_tokens\n2.5,10\n0.5,20\n")
    assert load_trace(with_header) == [Arrival(0.5, 128, 20), Arrival(2.5, 128, 10)]
    bare = tmp_path / "b.csv"
    bare.write_text("1.0\n3.0\n")
    assert [a.t for a in load_trace(bare)] == [1.0, 3.0]
    bad = tmp_path / "c.csv"
    bad.write_text("t\n1.0\nsoon\n")
    with pytest.raises(ValueError, match=r"c.csv:3"):
        load_trace(bad)


def test_cli_compares_and_plots(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("t\n" + "".join(f"{x.t}\n" for x in generate_arrivals(SHORT, seed=5)))
    out = tmp_path / "plot.png"
    result = CliRunner().invoke(app, ["simulate", "--trace", str(trace), "--cold-start", "20", "--plot", str(out),
                                      "--option", "predictive.headroom=1.1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "reactive" in result.output and "predictive" in result.output and "within SLO" in result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    bad = CliRunner().invoke(app, ["simulate", "--policies", "nope", "--duration", "60"])
    assert bad.exit_code != 0 and "unknown scaling policy" in bad.output
