"""Sampling cost per decode step: numpy on the host vs the sampler graph (issue 13 §4).

Real logits: the model's own next-token logits for a batch of chat prompts (SmolLM2 when
`make model` built it, else the tiny model), so top-p nuclei have the sizes a real model gives.
For each batch size and sampling setting it times the host sampler (`sampling.sample_token`
per row, what a CPU worker runs) and the graph (`DeviceSampler` on the CPU provider; on CUDA
the same graph also saves the [batch, vocab] copy to the host), and checks they draw the same
tokens. Ratios are against the host sampler measured in the same run.

    .venv/bin/python bench/sampling_bench.py [--model models/smollm2-135m-instruct-int4] [--batch 1 16 64]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.worker.device_sampler import DeviceSampler  # noqa: E402
from services.worker.engine import Engine  # noqa: E402
from services.worker.sampling import SamplingParams, nucleus, sample_token  # noqa: E402

console = Console(stderr=True)
SETTINGS = {
    "temperature 1.0": SamplingParams(temperature=1.0),
    "top-k 50, t 0.8": SamplingParams(temperature=0.8, top_k=50),
    "top-p 0.9, t 0.8": SamplingParams(temperature=0.8, top_p=0.9),
    "top-p 0.95, t 1.0": SamplingParams(temperature=1.0, top_p=0.95),
}
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion to a child.",
           "List three uses of copper.", "Who wrote Hamlet?", "Translate 'good morning' into Spanish.",
           "Why is the sky blue?", "Give me a name for a cat."]


def real_logits(model_dir: Path, rows: int, threads: int) -> np.ndarray:
    """[rows, vocab] next-token logits after each prompt (prompts repeat past eight)."""
    from tokenizers import Tokenizer
    engine = Engine(model_dir, max_sequences=rows, threads=threads, device_sampling="off")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for i in range(rows):
        engine.add(f"r{i}", tok.encode(PROMPTS[i % len(PROMPTS)]).ids, SamplingParams(), 0)
    engine.step([(f"r{i}", 0) for i in range(rows)], decode=False)
    seqs = [engine.sequences[sid] for sid in engine.batch.ids]
    logits, _ = engine.batch.decode(seqs, logits_on_host=True)
    assert logits is not None
    return np.asarray(logits, dtype=np.float32)


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = REPO / "models" / "smollm2-135m-instruct-int4"
    parser.add_argument("--model", type=Path, default=default if (default / "switchyard.json").exists() else None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = args.model
    if model is None:
        import tempfile

        from switchyard.model.tiny import build_tiny_model
        model = Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "tiny"
        build_tiny_model(model.parent, name="tiny")
    sampler = DeviceSampler(["CPUExecutionProvider"], threads=args.threads)
    rows_out = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("sampling", total=len(args.batch) * len(SETTINGS))
        for batch in args.batch:
            logits = real_logits(model, batch, args.threads)
            for name, params in SETTINGS.items():
                scaled = logits / params.temperature
                probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
                probs /= probs.sum(axis=-1, keepdims=True)
                sizes = [len(nucleus(p, params.top_p)) if params.top_p < 1 else 0 for p in probs]
                seeds = [np.random.default_rng((9, r)) for r in range(batch)]
                uniforms = [np.random.default_rng((9, r)).random() for r in range(batch)]
                host_tokens = [sample_token(logits[r], params, (), seeds[r]) for r in range(batch)]
                graph_tokens = sampler.sample(logits, [params] * batch, uniforms).tolist()
                host = timed(lambda: [sample_token(logits[r], params, (), np.random.default_rng(r))
                                      for r in range(batch)], args.repeat)
                graph = timed(lambda: sampler.sample(logits, [params] * batch, uniforms), args.repeat)
                rows_out.append(dict(batch=batch, setting=name, host_ms=host * 1e3, graph_ms=graph * 1e3,
                                     same_tokens=sum(a == b for a, b in zip(host_tokens, graph_tokens)),
                                     nucleus_median=int(statistics.median(sizes)) if params.top_p < 1 else None))
                progress.advance(task)
    table = Table(title=f"Sampling per decode step, {model.name}, vocab {logits.shape[-1]:,} "
                        f"({platform.node()}, {args.threads} threads)")
    for col in ("batch", "setting", "top-p nucleus (median tokens)", "host numpy ms", "graph ms",
                "graph / host", "same tokens"):
        table.add_column(col, justify="right")
    for r in rows_out:
        table.add_row(str(r["batch"]), r["setting"], "–" if r["nucleus_median"] is None else str(r["nucleus_median"]),
                      f"{r['host_ms']:.2f}", f"{r['graph_ms']:.2f}", f"{r['graph_ms'] / r['host_ms']:.2f}×",
                      f"{r['same_tokens']}/{r['batch']}")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows_out, indent=2))


if __name__ == "__main__":
    main()
