"""Where the stack's processes spend a loaded run (issue 13 §5): py-spy samples of the batcher
and worker (or the co-located batcher) while `--streams` gRPC streams run through the stack.

CPU µs per token (gpu_bench) says which process is busy; this says on what. py-spy (`pip
install py-spy`, a sampling profiler that attaches to a running process) records each process
for the run; the report lists, per process, the functions most often on the stack (inclusive)
and at the top of it (self), as a share of its samples, and keeps the raw collapsed stacks.

    .venv/bin/python bench/stack_profile.py --placement colocated --streams 64 --out /tmp/stackprof
    python3 bench/stack_profile.py --provider cuda --placement colocated separate --out $OUT/prof   # GPU kit
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "libs"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


OWN = ("services/", "switchyard/", "onnxruntime", "grpc/", "nats/")  # frames worth listing


def summarize(raw: Path, top: int = 20) -> dict[str, Any]:
    """py-spy's raw output (one 'thread;frame;...;frame count' line per distinct stack) → per
    thread, its share of the samples and the project / library functions most often on its
    stack (inclusive) and at the top of it (self), as shares of the process's samples."""
    threads: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = {}
    self_time: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        thread, *frames = stack.split(";")
        thread = re.sub(r"^thread \(\w+\): ", "", thread)
        total += n
        threads[thread] += n
        if frames:
            self_time[frames[-1]] += n
        for frame in {re.sub(r":\d+\)$", ")", f) for f in frames if any(k in f for k in OWN)}:  # per function
            inclusive.setdefault(thread, Counter())[frame] += n

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * k / total, 1)) for f, k in counter.most_common(top)]

    return {"samples": total, "threads_pct": pct(threads),
            "inclusive_pct": {t: pct(c) for t, c in inclusive.items()}, "self_pct": pct(self_time)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-instruct-int4")
    ap.add_argument("--provider", choices=("cpu", "cuda", "auto"), default="auto")
    ap.add_argument("--placement", nargs="+", choices=("separate", "colocated"), default=["colocated"])
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--worker-args", default="", help="extra worker flags, e.g. '--cuda-graph true'")
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import shlex

    from gpu_bench import drive_stack, drive_stack_processes
    from switchyard.model.config import ModelManifest
    from switchyard.runtime.stack import LocalStack, StackSpec
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = ModelManifest.load(args.model).config.vocab_size
    report: dict[str, Any] = {"model": args.model.name, "provider": args.provider, "streams": args.streams, "runs": []}
    for placement in args.placement:
        name = args.model.name
        spec = StackSpec(models_dir=args.model.parent, replicas={name: 1}, max_batch_size=args.streams,
                         worker_args={name: ("--provider", args.provider, *shlex.split(args.worker_args))},
                         log_dir=Path(tempfile.mkdtemp(prefix="stack-profile-")), routers=2,
                         colocate=placement == "colocated",
                         batcher_args=("--token-budget", str(max(16384, args.streams * (args.prompt_tokens + args.max_tokens)))))
        with LocalStack(spec) as stack:
            import asyncio
            asyncio.run(drive_stack(stack.router_address, stack.auth_metadata(), name, 4, args.prompt_tokens, 8, vocab))
            targets = {f"batcher-{i}": s.process.pid for i, s in enumerate(stack.batchers)}
            targets.update({f"worker-{i}": s.process.pid for i, s in enumerate(stack.workers)})
            spies = {}
            for label, pid in targets.items():
                raw = args.out / f"{placement}-{label}.txt"
                spies[label] = (raw, subprocess.Popen(
                    [pyspy, "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw", "--nonblocking",
                     "--threads", "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            time.sleep(1.0)  # attached before the load starts
            run = drive_stack_processes(stack.router_address, stack.auth_metadata(), name, args.streams,
                                        args.prompt_tokens, args.max_tokens, vocab, args.clients, connections=4)
            profiles = {}
            for label, (raw, proc) in spies.items():
                proc.send_signal(2)  # SIGINT: py-spy writes what it has and exits
                try:
                    _, err = proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    err = b"py-spy did not stop"
                profiles[label] = summarize(raw) if raw.exists() else {"error": err.decode(errors="replace")[-500:]}
        print(f"== {placement}: {run['tokens_per_s']:.0f} tok/s, TTFT p50 {run['ttft_s_p50']}, errors {run['errors']}",
              flush=True)
        for label, prof in profiles.items():
            print(f"   {label}: {prof.get('samples', 0)} samples, by thread {prof.get('threads_pct')}", flush=True)
            for thread, frames in prof.get("inclusive_pct", {}).items():
                print(f"     {thread}:", flush=True)
                for frame, share in frames[:12]:
                    print(f"      {share:5.1f}%  {frame}", flush=True)
            print("     self:", "; ".join(f"{f} {v}%" for f, v in prof.get("self_pct", [])[:8]), flush=True)
        report["runs"].append({"placement": placement, "run": run, "profiles": profiles})
    (args.out / "stack_profile.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
