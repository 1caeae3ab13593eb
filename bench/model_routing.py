"""Model routing by difficulty, offline: what sending easy prompts to the small model saves, and
what it costs in agreement with large-only serving.

Both models answer every prompt of bench/data/routing_prompts.jsonl (chat template from the
model catalog, greedy, ≤ --max-new tokens, stopping at EOS) through services.worker.engine.Engine.
A prompt's small answer *agrees* when its token ids are identical to the large model's (same
tokens up to and including EOS, or the same first --max-new tokens). Then, per policy and
threshold, over the whole set:

* quality = share of prompts whose served answer equals the large-only answer (a prompt served
  by the large model agrees by definition)
* cost    = compute relative to large-only: (prompt tokens + generated tokens) × weights
  multiplied per token (``--cost flops``, the default: deterministic, the same on any machine),
  or replica-seconds from rates measured in this run at batch 1 (``--cost measured``: prompt
  tokens × prefill s/token + (generated − 1) / decode tokens/s; noisy on a shared machine)

Policies: ``difficulty`` (switchyard.routing.difficulty.estimate_difficulty < threshold → small);
``cascade`` (small answers first; when confidence() of its first --k tokens is below the
threshold, its tokens are discarded and the large model answers: cost small(k) + large);
``oracle`` (small exactly where it agrees: the upper bound of any router with this pair);
``random`` (a share of prompts to small, expected values). No parameter is fitted to the
labels or the outcomes, so there is no train/test split.

    .venv/bin/python bench/model_routing.py [--small smollm2-135m-instruct-int4-l12]
        [--large smollm2-135m-instruct-int4] [--threads 1] [--plot docs/images/model-routing.png]
"""

from __future__ import annotations

import argparse
import json
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

from int4_agreement import decode_rate, greedy_all  # noqa: E402
from small_model import params_per_token  # noqa: E402
from services.worker.engine import Engine  # noqa: E402
from switchyard.model.catalog import ModelCatalog  # noqa: E402
from switchyard.model.convert import INT4_MODEL_NAME, SMALL_MODEL_NAME, convert_gguf, variant_of  # noqa: E402
from switchyard.routing.difficulty import confidence, estimate_difficulty  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)
PROMPTS_FILE = REPO / "bench" / "data" / "routing_prompts.jsonl"
TARGET_AGREEMENT = 0.95
RATE_PROMPT = ("Summarize the following notes in three bullet points for a busy manager. " + " ".join(
    ["The quarterly review showed that support tickets fell by a fifth after the new help pages "
     "went live, while the time to first response stayed flat."] * 6))


class RecordingEngine(Engine):
    """Engine that keeps the top-token probability of every logits row it computes (batch 1
    only: then every call is the one sequence's prefill or decode step)."""

    top_probs: list[float]

    def _run(self, feeds: dict[str, np.ndarray], past: list[ort.OrtValue]
             ) -> tuple[np.ndarray, list[ort.OrtValue]]:
        logits, present = super()._run(feeds, past)
        z = logits[0, -1].astype(np.float64)
        self.top_probs.append(float(1.0 / np.exp(z - z.max()).sum()))
        return logits, present


@dataclass
class Rates:
    prefill_s_per_token: float
    decode_tps: float

    def cost(self, prompt: int, generated: int) -> float:
        return prompt * self.prefill_s_per_token + max(generated - 1, 0) / self.decode_tps


def measure_rates(engine: Engine, prompt: list[int], chat_prompt: list[int]) -> Rates:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.generate(prompt, 1)
        times.append(time.perf_counter() - t0)
    return Rates(statistics.median(times) / len(prompt), decode_rate(engine, chat_prompt))


def sweep(values: list[float], served_small: "callable", cost_of: "callable") -> list[tuple[float, float, float]]:
    """(threshold, relative cost, agreement) for every distinct threshold."""
    out = []
    for t in sorted(set(values)) + [float("inf")]:
        small = served_small(t)
        cost, agree = cost_of(small)
        out.append((t, cost, agree))
    return out


def cheapest(points: list[tuple[float, float, float]], target: float) -> tuple[float, float, float] | None:
    ok = [p for p in points if p[2] >= target - 1e-12]
    return min(ok, key=lambda p: p[1]) if ok else None


def auc(pos: list[float], neg: list[float]) -> float:
    if not pos or not neg:
        return float("nan")
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--small", default=SMALL_MODEL_NAME)
    ap.add_argument("--large", default=INT4_MODEL_NAME)
    ap.add_argument("--prompts", type=Path, default=PROMPTS_FILE)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads, both models")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--k", type=int, default=8, help="cascade: small tokens judged before escalating")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--cost", choices=("flops", "measured"), default="flops")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "images" / "model-routing.png")
    args = ap.parse_args()

    convert_gguf(args.models_dir, variants=[v for v in map(variant_of, (args.large, args.small)) if v])

    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows
    catalog = ModelCatalog(args.models_dir)
    large_entry, small_entry = catalog.get(args.large), catalog.get(args.small)
    assert large_entry is not None and small_entry is not None
    texts = [large_entry.render_chat([("user", r["prompt"])]) for r in rows]
    ids = [large_entry.encode(t) for t in texts]
    eos = large_entry.manifest.eos_token_ids
    rate_ids = large_entry.encode(large_entry.render_chat([("user", RATE_PROMPT)]))
    n = len(rows)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as progress:
        large = Engine(args.models_dir / args.large, threads=args.threads, provider="cpu", max_sequences=17)
        task = progress.add_task(f"{args.large}: greedy", total=n)
        large_out = greedy_all(large, ids, args.max_new, eos, 16, lambda: progress.advance(task))
        large_rates = measure_rates(large, rate_ids, ids[0])
        del large
        small = RecordingEngine(args.models_dir / args.small, threads=args.threads, provider="cpu")
        task = progress.add_task(f"{args.small}: greedy + top-token probs", total=n)
        small_out: list[list[int]] = []
        small_probs: list[list[float]] = []
        for p in ids:
            small.top_probs = []
            small_out.append(small.generate(p, args.max_new, stop_ids=eos))
            small_probs.append(small.top_probs[: len(small_out[-1])])
            progress.advance(task)
        small.top_probs = []
        small_rates = measure_rates(small, rate_ids, ids[0])

    agree = [a == b for a, b in zip(small_out, large_out)]
    first = [bool(a) and bool(b) and a[0] == b[0] for a, b in zip(small_out, large_out)]
    scores = [estimate_difficulty(t, p).score for t, p in zip(texts, ids)]
    confs = [confidence(pr, args.k) for pr in small_probs]
    if args.cost == "flops":  # relative units: weights multiplied per token, prefill or decode alike
        lp = float(sum(params_per_token(large_entry.manifest.config)))
        sp = float(sum(params_per_token(small_entry.manifest.config, "bridge" in small_entry.manifest.extra)))
        large_cost = [lp * (len(p) + len(o)) for p, o in zip(ids, large_out)]
        small_cost = [sp * (len(p) + len(o)) for p, o in zip(ids, small_out)]
        probe_cost = [sp * (len(p) + min(args.k, len(o))) for p, o in zip(ids, small_out)]
    large_cost = large_cost if args.cost == "flops" else [large_rates.cost(len(p), len(o)) for p, o in zip(ids, large_out)]
    if args.cost == "measured":
        small_cost = [small_rates.cost(len(p), len(o)) for p, o in zip(ids, small_out)]
        probe_cost = [small_rates.cost(len(p), min(args.k, len(o))) for p, o in zip(ids, small_out)]
    base = sum(large_cost)

    def routed(small_set: list[bool]) -> tuple[float, float]:
        cost = sum(s if m else lc for m, s, lc in zip(small_set, small_cost, large_cost))
        return cost / base, sum(a if m else True for m, a in zip(small_set, agree)) / n

    def cascaded(keep: list[bool]) -> tuple[float, float]:
        cost = sum(s if k else pc + lc for k, s, pc, lc in zip(keep, small_cost, probe_cost, large_cost))
        return cost / base, sum(a if k else True for k, a in zip(keep, agree)) / n

    diff_points = sweep(scores, lambda t: [s < t for s in scores], routed)
    casc_points = sweep([-c for c in confs], lambda t: [-c < t for c in confs], cascaded)
    casc_points = [(-t, c, a) for t, c, a in casc_points]  # threshold back to "confidence >= t"
    oracle = routed(agree)
    cost_ratio = sum(small_cost) / base

    # --- report -------------------------------------------------------------------------
    easy = [s for s, r in zip(scores, rows) if r["label"] == "easy"]
    hard = [s for s, r in zip(scores, rows) if r["label"] == "hard"]
    table = Table(title=f"{args.small} vs {args.large}: {n} prompts, ≤{args.max_new} new tokens, "
                        f"ORT threads={args.threads}, cost={args.cost}")
    table.add_column("measure", justify="left")
    table.add_column("value", justify="right")
    facts = [
        ("large: prefill ms/token · decode tok/s", f"{large_rates.prefill_s_per_token * 1e3:.2f} · {large_rates.decode_tps:.1f}"),
        ("small: prefill ms/token · decode tok/s", f"{small_rates.prefill_s_per_token * 1e3:.2f} · {small_rates.decode_tps:.1f}"),
        ("small-only cost vs large-only (this set)", f"{cost_ratio:.2f}"),
        ("small answer identical to large", f"{sum(agree)}/{n} ({sum(agree) / n:.0%})"),
        ("  of them easy / hard", f"{sum(a for a, r in zip(agree, rows) if r['label'] == 'easy')} / "
                                  f"{sum(a for a, r in zip(agree, rows) if r['label'] == 'hard')}"),
        ("small first token identical to large", f"{sum(first)}/{n} ({sum(first) / n:.0%})"),
        ("difficulty AUC: hard vs easy labels", f"{auc(hard, easy):.2f}"),
        ("difficulty AUC: disagreeing vs agreeing prompts",
         f"{auc([s for s, a in zip(scores, agree) if not a], [s for s, a in zip(scores, agree) if a]):.2f}"),
        ("confidence AUC: agreeing vs disagreeing prompts",
         f"{auc([c for c, a in zip(confs, agree) if a], [c for c, a in zip(confs, agree) if not a]):.2f}"),
        ("oracle router (small exactly where it agrees)", f"cost {oracle[0]:.2f}, saving {1 - oracle[0]:.0%}, agreement {oracle[1]:.0%}"),
    ]
    summary = []
    for policy, points in (("difficulty", diff_points), ("cascade", casc_points)):
        best = cheapest(points, TARGET_AGREEMENT)
        if best is None:
            line = f"no threshold reaches {TARGET_AGREEMENT:.0%}"
        else:
            t, c, a = best
            line = f"threshold {t:.3g}: cost {c:.2f}, saving {1 - c:.1%}, agreement {a:.1%}"
        facts.append((f"{policy}: cheapest point with ≥{TARGET_AGREEMENT:.0%} agreement", line))
        summary.append((policy, line))
    for k, v in facts:
        table.add_row(k, v)
    console.print(table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p[1] for p in diff_points], [p[2] for p in diff_points], "o-", ms=3, label="difficulty threshold")
    ax.plot([p[1] for p in casc_points], [p[2] for p in casc_points], "s-", ms=3, label=f"cascade (confidence of first {args.k} tokens)")
    share = np.linspace(0, 1, 11)
    ax.plot(1 - share * (1 - cost_ratio), 1 - share * (1 - sum(agree) / n), ":", label="random share to small")
    ax.plot([oracle[0]], [oracle[1]], "k*", ms=12, label="oracle router")
    ax.plot([1.0], [1.0], "kx", ms=9, label="large only")
    ax.axhline(TARGET_AGREEMENT, color="grey", lw=0.8, ls="--")
    ax.axvline(0.6, color="grey", lw=0.8, ls="--")
    ax.text(0.6, TARGET_AGREEMENT, " target: cost ≤ 0.60 at ≥ 95%", fontsize=8, va="bottom")
    ax.set_xlabel("cost per request, relative to large-only ("
                  + ("weights × tokens" if args.cost == "flops" else "measured replica-seconds") + ")")
    ax.set_ylabel("agreement with large-only")
    ax.set_title(f"{args.small} / {args.large}, {n} prompts", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    console.print(f"plot: {args.plot}")
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, ORT threads={args.threads}")

    print()
    print("| measure | value |\n|---|---|")
    for k, v in facts:
        print(f"| {k} | {v} |")
    print()
    print("difficulty sweep (threshold, cost, agreement):",
          ", ".join(f"({t:.2f}, {c:.2f}, {a:.2f})" for t, c, a in diff_points[:: max(1, len(diff_points) // 12)]))
    print("cascade sweep (min confidence, cost, agreement):",
          ", ".join(f"({t:.2f}, {c:.2f}, {a:.2f})" for t, c, a in casc_points[:: max(1, len(casc_points) // 12)]))


if __name__ == "__main__":
    main()
