"""bench/gpu_bench.py run the way tests can run it here (--provider cpu --quick): one JSON file
whose every section is filled with figures that agree with each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from conftest import TINY
from services.worker import providers

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_bench.py"


@pytest.mark.slow
@pytest.mark.integration
def test_gpu_bench_quick_on_cpu_writes_a_complete_json(real_models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--provider", "cpu", "--quick", "--threads", "2",
                           "--profile", "--models-dir", str(real_models_dir), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    cfg = r["config"]
    prof = r["profile"]["int4"]  # ORT's node profile of decode steps: every node on the provider asked for
    assert prof["model_file"] == "model.onnx" and list(prof["wall_ms_per_step"]) == ["1", str(max(cfg["batches"]))]
    assert set(prof["nodes_per_run_by_provider"]) == {"CPUExecutionProvider"} and prof["memcpy_nodes_per_run"] == 0
    assert prof["top_ops_us_per_run"][0][0] == "CPUExecutionProvider:MatMulNBits"  # int4 decode: the weights
    assert "cuda_graph" not in r  # CUDA graphs are measured on CUDA only
    assert r["passed"] is True and r["errors"] == [] and r["quick"] is True
    assert r["provider"] == "cpu" and r["engine_provider"] == {"int4": "CPUExecutionProvider"}
    assert r["machine"]["onnxruntime"] == ort.__version__ and r["machine"]["cores"] >= 1
    assert r["machine"]["onnxruntime_packages"] == providers.ort_packages()

    ok = r["correctness"]["int4"]
    assert ok["equal"] is True and ok["prompts"] == 4
    assert ok["single_equal"] == [True] * 4 and ok["ragged_batch_equal"] == [True] * 4
    assert all(len(o) == cfg["correct_tokens"] for o in ok["outputs"])
    assert ok["outputs"] == ok["reference_outputs"]

    decode = r["decode"]["int4"]
    assert [row["batch"] for row in decode] == cfg["batches"]
    for row in decode:
        assert row["tokens"] == row["batch"] * row["steps"] == row["batch"] * cfg["decode_steps"]
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / (row["steps"] * row["step_ms_mean"] / 1000))
        assert 0 < row["step_ms_p50"] <= row["step_ms_p90"] and row["prefill_s"] > 0
        assert row["tokens_per_s_at_p50_step"] == pytest.approx(row["batch"] * 1000 / row["step_ms_p50"])

    ttft = r["ttft"]["int4"]
    assert [row["prompt_tokens"] for row in ttft] == cfg["ttft_prompts"]
    assert all(0 < row["ttft_ms_min"] <= row["ttft_ms_p50"] for row in ttft)

    stack = r["stack"]
    assert stack["model"] == "smollm2-135m-instruct-int4" and stack["provider"] == "cpu"
    assert [run["streams"] for run in stack["runs"]] == cfg["streams"]
    for run in stack["runs"]:
        assert run["errors"] == 0, run["error_samples"]
        assert run["tokens"] == run["expected_tokens"] == run["streams"] * cfg["stream_tokens"]
        assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["wall_s"])
        assert 0 < run["ttft_s_p50"] <= run["ttft_s_p99"] < run["wall_s"]
        engine_rate = {row["batch"]: row["tokens_per_s"] for row in decode}[run["streams"]]
        assert run["stack_over_engine"] == pytest.approx(run["tokens_per_s"] / engine_rate)
        # two client processes, each with two connections per router (the kernel spreads connections)
        assert run["client_processes"] == 2 and run["connections"] == 2 * 4
        cpu = run["cpu_us_per_token"]
        assert set(cpu) == {"router", "batcher", "worker", "nats-server"}
        assert cpu["worker"] > cpu["router"] > 0  # on the CPU provider the model is the cost

    assert (stack["pipeline_depth"], stack["decode_steps"], stack["routers"], stack["placement"]) == (2, 1, 2, "separate")
    # at the largest stream count: the engine in the batcher's process, one router, one step at
    # a time, 4 steps per call
    others = r["stack_other_configs"]
    assert [(o["pipeline_depth"], o["decode_steps"], o["routers"], o["placement"]) for o in others] == [
        (2, 1, 2, "colocated"), (2, 1, 1, "separate"), (1, 1, 2, "separate"), (2, 4, 2, "separate")]
    for other in others:
        assert [run["streams"] for run in other["runs"]] == [max(cfg["streams"])]
        assert other["runs"][0]["tokens"] == other["runs"][0]["expected_tokens"]
    colocated = others[0]["runs"][0]["cpu_us_per_token"]
    assert colocated["worker"] == 0 and colocated["batcher"] > colocated["router"] > 0  # no worker process: the batcher runs the model

    sampled = r["sampled_decode"]["int4"]
    batches = sorted({1, 2, max(cfg["batches"])})
    assert [(row["prompts"], row["batch"]) for row in sampled] == [("chat", b) for b in batches] + [
        ("random", b) for b in batches]
    for row in sampled:
        assert row["device_step_ms_p50"] > 0 and row["host_step_ms_p50"] > 0
        assert 0.0 <= row["device_full_vocab_runs_per_step"] <= 1.0
        assert row["device_over_host_tokens_per_s"] == pytest.approx(row["device_tokens_per_s"] / row["host_tokens_per_s"])
    # random prompts: flat distributions, a nucleus wider than the candidates far more often
    reruns = {kind: sum(row["device_full_vocab_runs_per_step"] for row in sampled if row["prompts"] == kind)
              for kind in ("chat", "random")}
    assert reruns["random"] > reruns["chat"], reruns

    hit = r["prefix_hit"]["int4"]
    for mode in ("host", "device"):  # all but the last 16-token block of the 64-token prompt cached
        assert hit[mode]["cached_prompt_tokens"] == 48 and hit[mode]["hit_ttft_ms_p50"] > 0
    assert hit["device_over_host_ttft"] == pytest.approx(hit["device"]["hit_ttft_ms_p50"] / hit["host"]["hit_ttft_ms_p50"])

    memory = r["gpu_memory"]
    assert set(memory) == {"int4_after_load", "int4_after_runs", "device_after_stack"}
    for m in memory.values():  # no GPU here: said so, not a made-up zero
        assert (m["method"] is None and "nvidia-smi" in m["reason"]) or m["device_total_mib"] > 0
    assert r["process_max_rss_mib"] > 0 and r["elapsed_s"] > 0


@pytest.mark.slow
@pytest.mark.integration
def test_gpu_bench_full_sizes_on_the_tiny_model(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The GPU run's sizes (batch 256, 256 streams through the stack) on the tiny model: every
    stream is admitted and complete, and a prompt over the context is reported, not failed."""
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--provider", "cpu", "--models-dir", str(tiny_models_dir),
                           "--variants", TINY, "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["passed"] is True and r["quick"] is False and r["correctness"][TINY]["equal"] is True
    assert [row["batch"] for row in r["decode"][TINY]] == [1, 16, 64, 256]
    assert all(row["tokens"] == row["batch"] * 32 for row in r["decode"][TINY])
    short, long = r["ttft"][TINY]
    assert short["prompt_tokens"] == 128 and short["ttft_ms_p50"] > 0
    assert long == {"prompt_tokens": 1024, "skipped": "context is 512 tokens"}
    runs = r["stack"]["runs"]
    # no CUDA here: the graph configurations are said to be skipped, the first other one is `stack`
    assert [s["config"] for s in r["stack_skipped_configs"]] == [
        [2, 1, 4, "colocated", True, 0, -1], [2, 1, 4, "separate", True, 0, -1], [2, 1, 1, "colocated", True, 0, -1]]
    assert (r["stack"]["routers"], r["stack"]["placement"], r["stack"]["cuda_graph"]) == (4, "colocated", False)
    # device memory sampled with the stack up, its processes named (no GPU here: no figure)
    assert set(r["stack"]["pids"]) == {"router", "batcher", "worker", "nats-server"}
    assert "method" in r["stack"]["gpu_memory_stack_up"]
    assert [run["streams"] for run in runs] == [64, 256]
    assert all(run["errors"] == 0 and run["tokens"] == run["streams"] * 128 for run in runs)
    assert all(run["client_processes"] == 4 and run["connections"] == 4 * 8 for run in runs)
    others = r["stack_other_configs"]
    assert [(o["routers"], o["pipeline_depth"], o["decode_steps"], o["placement"]) for o in others] == [
        (4, 2, 1, "separate"), (4, 2, 4, "colocated")]
    assert all(o["runs"][0]["errors"] == 0 and o["runs"][0]["tokens"] == 256 * 128 for o in others)


@pytest.mark.integration
@pytest.mark.skipif(providers.cuda_unavailable_reason() is None, reason="CUDA loads on this machine")
def test_gpu_bench_on_cuda_without_cuda_says_why(tmp_path: Path) -> None:
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--provider", "cuda", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["passed"] is False and r["decode"] == {} and r["stack"] is None
    assert r["errors"] == [{"section": "provider",
                            "error": f"--provider cuda cannot run: {providers.cuda_unavailable_reason()}"}]
    assert "cuda cannot run" in proc.stderr


@pytest.mark.unit
def test_stack_configs_name_depth_steps_routers_placement_and_graphs() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_bench import stack_config
    assert stack_config("2/1/4") == (2, 1, 4, "separate", False, 0, -1)
    assert stack_config("1/4/2/colocated") == (1, 4, 2, "colocated", False, 0, -1)
    assert stack_config("2/1/4/graph") == (2, 1, 4, "separate", True, 0, -1)
    assert stack_config("2/1/4/colocated/graph") == stack_config("2/1/4/graph/colocated") == (
        2, 1, 4, "colocated", True, 0, -1)
    assert stack_config("2/1/4/colocated/graph/p2048") == (2, 1, 4, "colocated", True, 2048, -1)
    assert stack_config("2/1/4/colocated/graph/w0") == (2, 1, 4, "colocated", True, 0, 0)
    for bad in ("2/1/4/colocated/separate", "2/1/4/graph/graph", "2/1/4/fast", "2/1/4/p0", "2/1/4/p512/p1024", "2/1/4/w1/w2"):
        with pytest.raises(SystemExit, match="after the third"):
            stack_config(bad)
