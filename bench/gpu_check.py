"""GPU check (`make gpu-check`): the worker Engine on CUDA against the same Engine on CPU.

For the int4 and fp32 model folders: greedy outputs of a few prompts, one at a time and then
all together in one ragged batch (different prompt lengths → left padding on the device), must
match the CPU engine token for token; prints tokens/s of both and confirms that the KV cache
stays on the device (engine.device, and the device of the batch's KV OrtValues).

Exit codes: 0 all match, or SKIPPED (CUDA cannot load here — services/worker/providers.py says
why: the check is informative on CPU machines); 1 a mismatch or a KV tensor off the device.

    .venv/bin/python bench/gpu_check.py [--models-dir models] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "libs"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import onnxruntime as ort  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind that blows across it at night:",
    "List three prime numbers greater than one hundred, then explain how you checked that each "
    "of them is prime, step by step, without using a calculator.",
    "def fibonacci(n):",
]


def run_batch(engine, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float, str]:
    """All prompts in one decode batch; returns outputs, decode tokens/s, device of the batch KV."""
    from services.worker.sampling import SamplingParams

    ids = [f"gpu-check-{i}" for i in range(len(prompts))]
    for sid, p in zip(ids, prompts):
        engine.add(sid, p, SamplingParams(), 0)
    outs: dict[str, list[int]] = {sid: [] for sid in ids}
    kv_device = "?"
    try:
        result = engine.step([(sid, 0) for sid in ids], decode=False)
        decode_s, decode_tokens = 0.0, 0
        while True:
            for sid, tok, _ in result.tokens:
                outs[sid].append(tok)
            if min(len(o) for o in outs.values()) >= max_tokens:
                break
            t0 = time.perf_counter()
            result = engine.step([], decode=True)
            decode_s += time.perf_counter() - t0
            decode_tokens += len(result.tokens)
            kv_device = engine.batch.kv_device() or kv_device
    finally:
        engine.remove(ids)
    return [outs[sid][:max_tokens] for sid in ids], decode_tokens / decode_s if decode_s else 0.0, kv_device


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--variants", default="int4,fp32")
    args = ap.parse_args()

    from services.worker.providers import cuda_unavailable_reason

    available = ort.get_available_providers()
    # onnxruntime-gpu lists CUDAExecutionProvider even where CUDA cannot load (and a session
    # then falls back to the CPU silently): skip on what the provider library can really do.
    reason = cuda_unavailable_reason()
    if reason:
        bar = "=" * 78
        print(f"{bar}\nSKIPPED: CUDA cannot run here: GPU check not run.\n{reason}\n{bar}")
        return 0

    from tokenizers import Tokenizer

    from services.worker.engine import Engine
    from switchyard.model.convert import MODEL_NAMES

    failures: list[str] = []
    print(f"onnxruntime {ort.__version__}, providers {available}")
    for variant in [v for v in args.variants.split(",") if v]:
        folder = args.models_dir / MODEL_NAMES[variant]
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        prompts = [tok.encode(p).ids for p in PROMPTS]
        cpu = Engine(folder, provider="cpu")
        gpu = Engine(folder, provider="cuda")
        print(f"\n[{variant}] {folder}: cpu engine provider={cpu.provider} device={cpu.device}; "
              f"gpu engine provider={gpu.provider} device={gpu.device}")
        if gpu.device != "cuda":
            failures.append(f"{variant}: gpu engine device is {gpu.device!r}, expected 'cuda'")
        gpu.generate(prompts[0], 4)  # warm-up (CUDA context, kernels)
        cpu.generate(prompts[0], 4)
        for i, p in enumerate(prompts):
            rates = {}
            outs = {}
            for name, engine in (("cpu", cpu), ("cuda", gpu)):
                t0 = time.perf_counter()
                outs[name] = engine.generate(p, args.max_tokens)
                rates[name] = len(outs[name]) / (time.perf_counter() - t0)
            d = first_diff(outs["cpu"], outs["cuda"])
            status = "match" if d is None else f"MISMATCH at token {d}"
            print(f"  prompt {i} ({len(p):3d} tokens): {status}; tok/s cpu {rates['cpu']:.1f}, "
                  f"cuda {rates['cuda']:.1f}")
            if d is not None:
                failures.append(f"{variant} prompt {i}: cpu {outs['cpu']} vs cuda {outs['cuda']}")
        cpu_b, cpu_rate, cpu_kv = run_batch(cpu, prompts, args.max_tokens)
        gpu_b, gpu_rate, gpu_kv = run_batch(gpu, prompts, args.max_tokens)
        bad = [i for i, (a, b) in enumerate(zip(cpu_b, gpu_b)) if a != b]
        print(f"  ragged batch of {len(prompts)}: {'match' if not bad else f'MISMATCH in streams {bad}'}; "
              f"decode tok/s cpu {cpu_rate:.1f}, cuda {gpu_rate:.1f}; KV on {cpu_kv} / {gpu_kv}")
        if bad:
            failures.append(f"{variant} ragged batch: streams {bad} differ between cpu and cuda")
        if gpu_kv != "cuda":
            failures.append(f"{variant}: batch KV lives on {gpu_kv!r}, expected 'cuda'")
        del cpu, gpu

    if failures:
        print("\nGPU CHECK FAILED:")
        for f in failures:
            print(f"  - {f}")
        return 1
    print("\nGPU CHECK PASSED: CUDA and CPU greedy outputs match token for token; KV stays on the device.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
