"""Cost and quality of the truncated SmolLM2 variants (first N of 30 decoder layers) vs the full int4.

Model routing needs a cheap model next to the large one; the only weights here are
SmolLM2-135M's, so the cheap model is the int4 model cut to its first N decoder layers (plus the
final norm and lm_head, no retraining; ``switchyard model convert --variant int4-l{N}``). This
measures, for each N and for the full model, in one run, with one ORT thread count throughout:

* params / FLOPs per token — analytic (2 FLOPs per multiply-add of every projection and the
  lm_head; attention over the context excluded, it is small at these lengths), relative to full
* decode tok/s — one sequence alone, 64 greedy steps after a warm-up (batch 1)
* prefill ms — one ~200-token prompt, median of 3
* greedy agreement with the full int4 model over the 57 chat prompts of bench/int4_agreement.py
  (≤ 32 new tokens, stopping at EOS): identical continuation, identical first token, mean common
  prefix
* held-out text: mean per-token log-likelihood and perplexity of bench/data/heldout.txt
  (written for this benchmark), teacher-forced in rows of 128 tokens

    .venv/bin/python bench/small_model.py [--layers 8 12 16 20 24 28] [--bridged 8 12 16 20 24]
        [--threads 1] [--limit N]

``--bridged`` adds the variants int4-l<N>b: the same truncation with a fitted affine bridge
(W·h + b, switchyard.model.bridge) before the final norm; its 576 × 576 MatMul counts in the
params column.

Missing folders are converted first (convert_gguf). A markdown table ends the output.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from int4_agreement import PROMPTS, common_prefix, decode_rate, greedy_all  # noqa: E402
from services.worker.engine import Engine  # noqa: E402
from switchyard.model.catalog import ModelCatalog  # noqa: E402
from switchyard.model.config import LlamaConfig, ModelManifest  # noqa: E402
from switchyard.model.graph_io import empty_past, present_names, step_feeds  # noqa: E402
from switchyard.model.convert import INT4_MODEL_NAME, convert_gguf  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)
HELDOUT = REPO / "bench" / "data" / "heldout.txt"
PREFILL_PROMPT = (
    "Summarize the following notes in three bullet points for a busy manager. " + " ".join(
        ["The quarterly review showed that support tickets fell by a fifth after the new help "
         "pages went live, while the time to first response stayed flat."] * 6))


def params_per_token(c: LlamaConfig, bridged: bool = False) -> tuple[int, int]:
    """(decoder-layer weights + bridge, lm_head weights) multiplied per generated token."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    bridge = c.hidden_size * c.hidden_size if bridged else 0
    return per_layer * c.num_hidden_layers + bridge, c.vocab_size * c.hidden_size


def heldout_loglik(session: ort.InferenceSession, manifest: ModelManifest, ids: list[int], row: int = 128
                   ) -> tuple[float, int]:
    """Mean log p(token | preceding tokens of its row), teacher-forced one position per call
    (the graph returns last-position logits only); the text is cut into rows of ``row`` tokens
    decoded together as one batch."""
    rows = len(ids) // row
    batch = np.array(ids[: rows * row], dtype=np.int64).reshape(rows, row)
    past = empty_past(manifest, rows, row)
    out_names = ["logits"] + present_names(manifest.config.num_hidden_layers)
    total, n = 0.0, 0
    for t in range(row - 1):
        logits, *present = session.run(out_names, step_feeds(manifest, batch[:, t:t + 1], t, past))
        z = logits[:, -1, :].astype(np.float64)
        m = z.max(axis=-1, keepdims=True)
        logp = z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))
        total += float(logp[np.arange(rows), batch[:, t + 1]].sum())
        n += rows
        past = dict(zip(past, present))
    return total / n, n


@dataclass
class Result:
    name: str
    layers: int
    params_rel: float
    decode_tps: float
    prefill_ms: float
    exact: float
    first: float
    prefix: float
    mean_len: float
    loglik: float
    greedy_s: float


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 12, 16, 20, 24, 28])
    ap.add_argument("--bridged", type=int, nargs="*", default=[8, 12, 16, 20, 24],
                    help="N of the bridged variants int4-l<N>b (fitted affine map before the norm)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads, every model")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    args = ap.parse_args()

    variants = ["int4"] + [f"int4-l{n}" for n in args.layers] + [f"int4-l{n}b" for n in args.bridged]
    t0 = time.perf_counter()
    dirs = convert_gguf(args.models_dir, variants=variants)
    err.print(f"model folders ready ({time.perf_counter() - t0:.1f} s)")
    catalog = ModelCatalog(args.models_dir)
    prompts = PROMPTS[: args.limit] if args.limit else PROMPTS
    full_entry = catalog.get(INT4_MODEL_NAME)
    assert full_entry is not None
    chat_ids = [full_entry.encode(full_entry.render_chat([("user", p)])) for p in prompts]
    prefill_ids = full_entry.encode(full_entry.render_chat([("user", PREFILL_PROMPT)]))
    text_ids = full_entry.encode(HELDOUT.read_text())
    eos = full_entry.manifest.eos_token_ids

    results: list[Result] = []
    outputs: dict[str, list[list[int]]] = {}
    full_params = sum(params_per_token(full_entry.manifest.config))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as progress:
        for d in dirs:
            entry = catalog.get(d.name)
            assert entry is not None
            c = entry.manifest.config
            engine = Engine(d, threads=args.threads, provider="cpu", max_sequences=args.batch + 1)
            task = progress.add_task(f"{d.name}: greedy", total=len(prompts) + 2)
            start = time.perf_counter()
            outs = greedy_all(engine, chat_ids, args.max_new, eos, args.batch, lambda: progress.advance(task))
            greedy_s = time.perf_counter() - start
            outputs[d.name] = outs
            progress.update(task, description=f"{d.name}: speed")
            tps = decode_rate(engine, chat_ids[0])
            times = []
            for _ in range(3):
                s = time.perf_counter()
                engine.generate(prefill_ids, 1)
                times.append(time.perf_counter() - s)
            progress.advance(task)
            progress.update(task, description=f"{d.name}: held-out text")
            loglik, _ = heldout_loglik(engine.session, engine.manifest, text_ids)
            progress.advance(task)
            ref = outputs[INT4_MODEL_NAME]
            n = len(prompts)
            results.append(Result(
                d.name, c.num_hidden_layers,
                sum(params_per_token(c, "bridge" in entry.manifest.extra)) / full_params, tps,
                statistics.median(times) * 1000,
                sum(a == b for a, b in zip(outs, ref)) / n,
                sum(bool(a) and bool(b) and a[0] == b[0] for a, b in zip(outs, ref)) / n,
                sum(common_prefix(a, b) for a, b in zip(outs, ref)) / n,
                sum(len(b) for b in ref) / n, loglik, greedy_s))
            del engine

    full = results[0]
    table = Table(title=f"truncated int4 vs {INT4_MODEL_NAME} ({len(prompts)} chat prompts, ≤{args.max_new} "
                        f"new tokens; ORT threads={args.threads})")
    cols = ("model", "layers", "params/FLOPs per token", "decode tok/s (b=1)", "decode cost",
            f"prefill {len(prefill_ids)} tok ms", "prefill cost", "identical continuation",
            "same first token", "mean common prefix", "held-out log-lik/token", "perplexity")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = []
    for r in results:
        row = [r.name, f"{r.layers}/{full.layers}", f"{r.params_rel:.2f}", f"{r.decode_tps:.1f}",
               f"{full.decode_tps / r.decode_tps:.2f}", f"{r.prefill_ms:.0f}", f"{r.prefill_ms / full.prefill_ms:.2f}",
               f"{r.exact:.0%}", f"{r.first:.0%}", f"{r.prefix:.1f} / {r.mean_len:.1f}",
               f"{r.loglik:.2f}", f"{math.exp(-r.loglik):.3g}"]
        rows.append(row)
        table.add_row(*row)
    console.print(table)
    entry = full_entry
    for r in results[1:]:
        console.print(f"[bold]{r.name}[/] on {prompts[0]!r}: {entry.decode(outputs[r.name][0])!r}")
    console.print(f"[bold]{full.name}[/] on {prompts[0]!r}: {entry.decode(outputs[full.name][0])!r}")
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, ORT threads={args.threads}")
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
