"""Cold start per model variant: process start → first token, broken down.

Two measurements per model, repeated `--runs` times (medians printed):

1. Live, on a real LocalStack: the model's replica is removed (scaled to zero), then at t0 the
   lifecycle API starts a new one (switchyard.runtime.lifecycle.LocalFleetBackend) and a
   request is sent at once; the router holds it (--replica-wait-s) until the replica joins.
   Phases: worker process start → worker serving (imports + weights + session build), batcher
   process start → batcher consuming and heartbeating (registration), then → first token at
   the client (the router seeing the heartbeat, dispatch, and the first step with ONNX
   Runtime's first-run cost).
2. Probe, in a fresh process doing what the worker does at start: imports (process start →
   imports done), `Engine(...)` (weights load + session build), then the first prefill+decode
   step against the second identical one (warm-up: first-run cost).

Baseline in the same invocation: a warm request to the live replica right after (TTFT when no
cold start is paid), so the ratio cold/warm is printed.

    .venv/bin/python bench/cold_start.py                 # tiny model + real models under models/
    .venv/bin/python bench/cold_start.py --models tiny-llama --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from switchyard.model.tiny import build_tiny_model  # noqa: E402
from switchyard.runtime.lifecycle import READY, LocalFleetBackend  # noqa: E402
from switchyard.runtime.stack import LocalStack, StackSpec  # noqa: E402
from switchyard.v1 import generate_pb2, generate_pb2_grpc  # noqa: E402

TINY = "tiny-llama"
REAL = ("smollm2-135m-instruct-int4", "smollm2-135m-instruct")

PROBE = r"""
import json, sys, time
from pathlib import Path
t_start = float(sys.argv[2])
import services.worker.server  # noqa: F401  everything the worker imports
from services.worker.engine import Engine
from services.worker.sampling import SamplingParams
t_imported = time.time()
engine = Engine(Path(sys.argv[1]), max_sequences=4, threads=int(sys.argv[3]))
t_loaded = time.time()
def one(sid):
    engine.add(sid, list(range(3, 35)), SamplingParams(), seed=0)
    t = time.perf_counter()
    engine.step(prefill=[(sid, 0)], decode=False)
    engine.step(prefill=[], decode=True)
    dt = time.perf_counter() - t
    engine.remove([sid])
    return dt
first, second = one("a"), one("b")
print(json.dumps({"imports_s": t_imported - t_start, "load_s": t_loaded - t_imported,
                  "first_step_s": first, "warm_step_s": second}))
"""


def probe(model_dir: Path, threads: int) -> dict[str, float]:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), repr(t0), str(threads)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def complete(address: str, model: str, timeout_s: float = 300.0) -> generate_pb2.CompleteResponse:
    with grpc.insecure_channel(address) as ch:
        return generate_pb2_grpc.GenerationStub(ch).Complete(
            generate_pb2.GenerateRequest(model=model, text="Hello there", max_tokens=4), timeout=timeout_s)


def live_runs(models_dir: Path, model: str, runs: int, threads: int, parallel: bool) -> list[dict[str, float]]:
    spec = StackSpec(models_dir=models_dir, replicas={model: 1}, heartbeat_s=0.2, worker_threads=threads,
                     router_args=("--replica-wait-s", "300"), metrics=False)
    out = []
    with LocalStack(spec) as stack:
        backend = LocalFleetBackend(stack, start_timeout_s=300, parallel_start=parallel)
        for _ in range(runs):
            for r in backend.replicas(model):
                backend.remove_replica(model, r.replica_id)
            while backend.replicas(model):
                time.sleep(0.05)
            time.sleep(1.5)  # the router drops the old replica (3 missed heartbeats)
            t0 = time.monotonic()
            rid = backend.add_replica(model)
            sent = time.monotonic()
            reply = complete(stack.router_address, model)
            first_token = sent + reply.summary.timings.time_to_first_token_s  # the router's clock starts on receipt
            rec = backend._replicas[rid]
            deadline = time.monotonic() + 30  # its start thread notices the port file a moment later
            while rec.info.state != READY and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rec.info.state == READY and rec.batcher is not None
            worker_ready = _port_file_time(rec.worker)
            batcher_ready = _port_file_time(rec.batcher)
            warm = complete(stack.router_address, model).summary.timings.time_to_first_token_s
            out.append({
                "worker_s": worker_ready - rec.worker.started_at,
                "registration_s": batcher_ready - worker_ready,  # after the worker serves
                "to_first_token_s": first_token - batcher_ready,
                "total_s": first_token - t0,
                "warm_ttft_s": warm,
            })
    return out


def _port_file_time(svc: object) -> float:
    """Monotonic time the service wrote its port file (it writes it once it serves)."""
    path = svc.port_file  # type: ignore[attr-defined]
    wall = path.stat().st_mtime
    return time.monotonic() - (time.time() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="", help="comma-separated; default: the tiny model + real ones under models/")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per worker")
    args = parser.parse_args()
    tiny_dir = Path(tempfile.mkdtemp(prefix="cold-start-"))
    build_tiny_model(tiny_dir, name=TINY, seed=0)
    wanted = [m for m in args.models.split(",") if m] or [TINY] + [m for m in REAL if (args.models_dir / m / "switchyard.json").exists()]
    print(f"cold start, median of {args.runs} runs, {args.threads} ORT thread(s) per worker")
    header = ("model", "start", "probe: imports", "weights+session", "first step", "warm step",
              "live: worker up", "batcher after worker", "→ first token", "total", "warm TTFT", "cold/warm",
              "total vs sequential")
    print(" | ".join(header))
    for model in wanted:
        models_dir = tiny_dir if model == TINY else args.models_dir
        probes = [probe(models_dir / model, args.threads) for _ in range(args.runs)]
        p = {k: statistics.median(r[k] for r in probes) for k in probes[0]}
        baseline = None
        for parallel in (False, True):  # baseline first: the batcher started once the worker serves
            lives = live_runs(models_dir, model, args.runs, args.threads, parallel)
            v = {k: statistics.median(r[k] for r in lives) for k in lives[0]}
            baseline = baseline or v["total_s"]
            print(" | ".join([model, "parallel" if parallel else "sequential", f"{p['imports_s']:.2f} s",
                              f"{p['load_s']:.2f} s", f"{p['first_step_s'] * 1e3:.0f} ms",
                              f"{p['warm_step_s'] * 1e3:.0f} ms", f"{v['worker_s']:.2f} s", f"{v['registration_s']:.2f} s",
                              f"{v['to_first_token_s']:.2f} s", f"{v['total_s']:.2f} s", f"{v['warm_ttft_s'] * 1e3:.0f} ms",
                              f"{v['total_s'] / v['warm_ttft_s']:.0f}×", f"{v['total_s'] / baseline:.2f}×"]))


if __name__ == "__main__":
    main()
