"""The diagnosis scripts behind the GPU stack figures (docs/benchmarks.md, "GPU on the H200"):
engine_replay's pattern produces every token it promises, splits its wall time into phases
that add up and finds the leavers' blocks in the prefix cache; stack_profile's summary of py-spy's raw stacks counts per thread and per function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from engine_replay import engine_kwargs  # noqa: E402
from stack_profile import summarize  # noqa: E402


@pytest.mark.integration
def test_engine_replay_produces_every_token_and_phases_add_up(tiny_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "engine_replay.py"), "--model",
                           str(tiny_models_dir / TINY), "--provider", "cpu", "--sequences", "24", "--arrivals", "5",
                           "--max-tokens", "9", "--configs", "plain,prefix-device,graph+plain", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "graph+plain: skipped (CUDA graphs need the CUDA provider)" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["plain", "prefix-device"]
    for r in rows:
        assert r["tokens"] == 24 * 9
        # arrivals over 5 steps, the last one's 9 tokens after it: the pattern's own step count
        assert r["steps"] == 4 + 9
        assert 0 < sum(r["phase_s"].values()) <= r["wall_s"] + 5 * 0.5e-4  # phases rounded to 0.1 ms
        assert r["replay_over_steady"] == pytest.approx(r["tokens_per_s"] / r["steady_tokens_per_s"])
    # the last 8 leavers' next turns find the blocks they left and decode as without the cache
    assert "hit_check" not in rows[0]
    assert rows[1]["hit_check"] == {"checked": 8, "cached_as_expected": 8, "first_token_equal": 8}


@pytest.mark.unit
def test_engine_replay_configs_name_engine_settings() -> None:
    assert engine_kwargs("plain") == {"cuda_graph": False}
    assert engine_kwargs("graph+prefix-device") == {"cuda_graph": True, "prefix_cache_bytes": 256 << 20,
                                                    "device_prefix_cache": "on"}
    assert engine_kwargs("prefix-host")["device_prefix_cache"] == "off"
    with pytest.raises(SystemExit, match="plain, prefix-host or prefix-device"):
        engine_kwargs("prefix-gpu")


@pytest.mark.unit
def test_stack_profile_summary_counts_threads_and_functions(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "thread (0x1): engine_0;run (threading.py:10);Engine.step (services/worker/engine.py:318);"
        "FusedBatch.decode (services/worker/fused_batch.py:325) 30\n"
        "thread (0x1): engine_0;run (threading.py:10);Engine.step (services/worker/engine.py:343);"
        "DeviceBlocks.cut (services/worker/kv_blocks.py:80) 10\n"
        "thread (0x2): MainThread;Scheduler._apply (services/batcher/scheduler.py:395) 10\n"
        "not a sample line\n")
    s = summarize(raw)
    assert s["samples"] == 50
    assert s["threads_pct"] == [("engine_0", 80.0), ("MainThread", 20.0)]
    engine = dict(s["inclusive_pct"]["engine_0"])
    assert engine["Engine.step (services/worker/engine.py)"] == 80.0  # both lines of one function
    assert engine["DeviceBlocks.cut (services/worker/kv_blocks.py)"] == 20.0
    assert "run (threading.py)" not in engine  # the standard library is not listed
    assert s["self_pct"][0] == ("FusedBatch.decode (services/worker/fused_batch.py:325)", 60.0)


@pytest.mark.integration
def test_step_cost_benches_time_every_part(tiny_models_dir: Path) -> None:
    """bench/batcher_step_cost.py and bench/engine_host_cost.py run and report each part they time."""
    batcher = subprocess.run([sys.executable, str(REPO / "bench" / "batcher_step_cost.py"), "--sequences", "16",
                              "--steps", "20"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "COLUMNS": "200"})
    assert batcher.returncode == 0, batcher.stdout + batcher.stderr
    for part in ("next step request", "answer, co-located", "apply the answer", "answer over gRPC", "co-located, all"):
        assert part in batcher.stdout, part
    engine = subprocess.run([sys.executable, str(REPO / "bench" / "engine_host_cost.py"), "--model",
                             str(tiny_models_dir / TINY), "--rows", "8", "--steps", "5"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert engine.returncode == 0, engine.stdout + engine.stderr
    assert "eager" in engine.stdout and "CUDA-graph path" in engine.stdout
