"""The live autoscaling benchmark's pieces (bench/autoscaling_live.py): the worker's TEST-ONLY
start delay gives a longer cold start that the lifecycle backend measures; the simulator fleet
calibrated from live figures reproduces them; the live run is scored with the simulator's
definitions (SLO attainment over arrived requests, errors as misses, replica-seconds of replicas
asked for until stopped)."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, start_stack
from switchyard.autoscaling import ScalingLimits, make_scaling_policy
from switchyard.autoscaling.simulator import Arrival, simulate
from switchyard.runtime.lifecycle import READY, STARTING, LocalFleetBackend
from switchyard.v1 import generate_pb2, generate_pb2_grpc


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("autoscaling_live", REPO / "bench" / "autoscaling_live.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["autoscaling_live"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_the_calibrated_fleet_reproduces_the_measured_figures() -> None:
    live = _bench()
    calib = live.Calibration(slots=8, prompt_tokens=32, output_tokens=32, ttft_1_s=0.125, decode_1_tok_s=25.0,
                             service_rate_1=2.2, service_rate_2=3.6, cold_start_s=10.0)
    fleet = calib.fleet(cold_start_s=9.5, slo_s=1.5, timeout_s=30.0)
    assert fleet.service_rate_per_replica(32, 32) == pytest.approx(2.2)  # the measured completions/s
    assert fleet.cold_start_s == 9.5 and fleet.slots_per_replica == 8 and fleet.ttft_slo_s == 1.5
    # One request alone: the simulator's TTFT is the measured single-stream TTFT.
    alone = simulate(make_scaling_policy("reactive", ScalingLimits(1, 1)), [Arrival(1.0, 32, 32)], fleet,
                     tick_s=1.0, initial_replicas=1)
    assert alone.ttft_p50_s == pytest.approx(0.125, rel=1e-6)


@pytest.mark.unit
def test_a_live_run_is_scored_like_a_simulated_one() -> None:
    live = _bench()
    ok = [live.Outcome(arrival=float(i), prompt_tokens=32, output_tokens=32, first_token=i + 0.2, done=i + 1.0,
                       tokens=32) for i in range(8)]
    slow = live.Outcome(arrival=8.5, prompt_tokens=32, output_tokens=32, first_token=11.0, done=12.0, tokens=32)
    failed = live.Outcome(arrival=9.0, prompt_tokens=32, output_tokens=32, error="UNAVAILABLE: no replica")
    # One replica all along, a second asked for at 4 s (starting), ready at 6 s, draining from 8 s.
    samples = [(t / 4, 1 if 4 <= t / 4 < 6 else 0, 2 if 6 <= t / 4 < 8 else 1, 1 if t / 4 >= 8 else 0)
               for t in range(0, 41)]
    run = live.LiveRun("reactive", ok + [slow, failed], samples, [(4.0, "2: scale up 1 → 2: ...")], [2.0], 10.0)
    res = live.live_result(run, slo_s=1.5, window_s=5.0)
    assert res.arrived == 10 and res.dropped == 1 and res.completed == 9
    assert res.within_slo == 8 and res.slo_attainment == pytest.approx(0.8)  # the slow and the failed one miss
    assert res.replica_seconds == pytest.approx(10.0 + 6.0)  # one for 10 s, the second from 4 s to the end
    assert res.series["t"] == [0.0, 5.0]
    assert res.series["arrival_rate"] == [1.0, 1.0]
    assert res.series["dropped"] == [0, 1]
    assert math.isinf(res.series["ttft_p99_s"][1]) and res.series["ttft_p99_s"][0] == pytest.approx(0.2)
    assert res.max_replicas == 2 and res.decisions[0][1] == 2


@pytest.mark.integration
def test_the_worker_start_delay_lengthens_the_measured_cold_start(tiny_models_dir: Path, tmp_path: Path) -> None:
    stack = start_stack(tiny_models_dir, {TINY: 1}, tmp_path, balancing="round_robin")
    try:
        backend = LocalFleetBackend(stack, start_timeout_s=60)
        _bench().delay_added_replicas(stack, TINY, 2.5)
        rid = backend.add_replica(TINY)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rep = next(r for r in backend.replicas(TINY) if r.replica_id == rid)
            if rep.state != STARTING:
                break
            time.sleep(0.05)
        assert rep.state == READY, rep.error
        assert rep.cold_start_s is not None and rep.cold_start_s >= 2.5  # measured, delay included
        assert "TEST-ONLY start delay" in (tmp_path / f"worker-{rid}.log").read_text()
        time.sleep(1.0)
        with stack.grpc_channel() as ch:  # the delayed replica then serves like any other
            stub = generate_pb2_grpc.GenerationStub(ch)
            served = set()
            for i in range(8):
                reply = stub.Complete(generate_pb2.GenerateRequest(model=TINY, text=f"hi {i}", max_tokens=4), timeout=30)
                served.add(reply.summary.replica_id)
        assert rid in served
    finally:
        stack.stop()


@pytest.mark.unit
def test_the_recorded_live_run_reproduces_the_documented_figures(tmp_path: Path) -> None:
    """docs/benchmarks.md quotes this run; --from-json redoes the scoring and the simulation."""
    import subprocess
    out = subprocess.run([sys.executable, str(REPO / "bench" / "autoscaling_live.py"), "--from-json",
                          str(REPO / "bench" / "data" / "autoscaling_live_2026-12-03.json"), "--markdown",
                          "--plot", str(tmp_path / "p.png")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert "| reactive | live | 73.4% | 0 | 202 | 1.00 |" in "\n".join(rows)
    assert "| predictive | live | 94.8% | 0 | 224 | 1.11 |" in "\n".join(rows)
    assert "| predictive | simulator, 2 replicas = 1.18× one (measured) | 100.0% | 0 | 208 | 1.13 |" in "\n".join(rows)
    assert (tmp_path / "p.png").stat().st_size > 10_000
