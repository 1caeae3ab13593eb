"""CPU decode speed of the same Engine under two ONNX Runtime installs, side by side in one run.

Answers "is onnxruntime-gpu (whose wheel also carries the CPU provider) a CPU regression next to
plain onnxruntime?": each interpreter runs the same Engine workload (provider cpu, greedy, the
same prompts) in its own process, the two alternating round by round so that load on the
shared machine hits both alike; the best round per interpreter and configuration is kept.

    .venv/bin/python bench/ort_package_compare.py --python /tmp/ortgpu/bin/python \
        [--variants int4,fp32] [--batches 1,8] [--rounds 3]

The first interpreter (this one) is the baseline; ratios are other / baseline. A throwaway
interpreter with onnxruntime-gpu and this project's other packages:

    python3 -m venv /tmp/ortgpu && /tmp/ortgpu/bin/pip install onnxruntime-gpu
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > /tmp/ortgpu/lib/python3.11/site-packages/zz_main.pth
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "libs"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

VARIANTS = {"int4": "smollm2-135m-instruct-int4", "fp32": "smollm2-135m-instruct"}


def child(folder: Path, batch: int, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """One measurement in this interpreter: decode tokens/s of `batch` sequences."""
    import numpy as np
    import onnxruntime as ort
    from services.worker.engine import Engine
    from services.worker.sampling import SamplingParams

    engine = Engine(folder, provider="cpu", max_sequences=batch, threads=threads)
    vocab = engine.config.vocab_size
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(batch)]
    for sid in ids:
        engine.add(sid, rng.integers(10, vocab - 1, prompt_tokens).tolist(), SamplingParams(), 0)
    t0 = time.perf_counter()
    engine.step([(sid, 0) for sid in ids], decode=False)
    prefill_s = time.perf_counter() - t0
    steps, tokens, t0 = 0, 0, time.perf_counter()
    while steps < new_tokens - 1:
        tokens += len(engine.step([], decode=True).tokens)
        steps += 1
    decode_s = time.perf_counter() - t0
    engine.remove(ids)
    return {"ort": ort.__version__, "ort_file": ort.__file__, "provider": engine.provider,
            "decode_tok_s": tokens / decode_s, "step_ms": 1000 * decode_s / steps, "prefill_s": prefill_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", required=True, help="the other interpreter (e.g. with onnxruntime-gpu)")
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--variants", default="int4,fp32")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write every round here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, batch = args.child.rsplit(":", 1)
        print(json.dumps(child(Path(folder), int(batch), args.prompt_tokens, args.new_tokens, args.threads)))
        return 0

    pythons = {"baseline": sys.executable, "other": args.python}
    configs = [(v, int(b)) for v in args.variants.split(",") for b in args.batches.split(",")]
    runs: list[dict] = []
    for rnd in range(args.rounds):
        for variant, batch in configs:
            order = list(pythons.items()) if rnd % 2 == 0 else list(reversed(pythons.items()))
            for label, python in order:
                out = subprocess.run(
                    [python, __file__, "--python", args.python, "--child", f"{args.models_dir / VARIANTS[variant]}:{batch}",
                     "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                     "--threads", str(args.threads)], capture_output=True, text=True, check=True, cwd=REPO)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r.update(label=label, python=python, variant=variant, batch=batch, round=rnd)
                runs.append(r)
                print(f"round {rnd} {variant} b={batch} {label:8s} ort {r['ort']:8s} {r['provider']}: "
                      f"{r['decode_tok_s']:.1f} tok/s ({r['step_ms']:.1f} ms/step)", flush=True)
    print(f"\nbest of {args.rounds} rounds; {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, "
          f"{args.threads} threads")
    print(f"{'model':6s} {'batch':>5s} {'baseline tok/s':>15s} {'other tok/s':>12s} {'other/baseline':>15s}"
          f" {'median ratio':>13s}")
    for variant, batch in configs:
        rates = {label: [r["decode_tok_s"] for r in runs if r["label"] == label and r["variant"] == variant
                         and r["batch"] == batch] for label in pythons}
        best = {label: max(v) for label, v in rates.items()}
        median = {label: statistics.median(v) for label, v in rates.items()}
        print(f"{variant:6s} {batch:5d} {best['baseline']:15.1f} {best['other']:12.1f} "
              f"{best['other'] / best['baseline']:14.2f}× {median['other'] / median['baseline']:12.2f}×")
    versions = {label: next(r["ort"] for r in runs if r["label"] == label) for label in pythons}
    print("versions:", ", ".join(f"{k}: onnxruntime {v} ({pythons[k]})" for k, v in versions.items()))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
