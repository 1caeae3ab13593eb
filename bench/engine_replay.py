"""The engine under the stack's traffic pattern, without the stack (issue 13 §5): where a
worker's time goes when sequences arrive, join and leave, not only in steady decode.

`gpu_bench` times decode with a fixed batch already prefilled; the stack's worker also prefills
arrivals a few per step, grows the batch row by row, caches each prompt's and each finished
sequence's KV blocks (the prefix cache) and drops finished rows. This replays that pattern on
the engine in-process — `--sequences` prompts, `--arrivals` new ones per step, each removed
once it has `--max-tokens` tokens, as the batcher does — and splits the wall time into add
(prefix lookup), prefill, decode, remove (row drop + prefix-cache store) and the rest, per engine
configuration, next to the steady decode rate at the same batch size measured in the same run.

    .venv/bin/python bench/engine_replay.py --model models/smollm2-135m-instruct-int4 \\
        --sequences 64 --max-tokens 32 --configs plain,prefix-host,prefix-device
    python3 bench/engine_replay.py --provider cuda --out $OUT/replay.json        # GPU kit

Configurations: plain (no prefix cache), prefix-host / prefix-device (the worker's 256 MiB prefix
cache, blocks in numpy / cut on the device — the worker's default on CUDA), and with
`graph+` in front, decode replayed from CUDA graphs (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "libs"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

PREFIX_CACHE_BYTES = 256 << 20  # the worker's --prefix-cache-mib default


def engine_kwargs(config: str) -> dict[str, Any]:
    """"graph+prefix-device" → Engine keyword arguments."""
    parts = config.split("+")
    kwargs: dict[str, Any] = {"cuda_graph": "graph" in parts}
    prefix = [p for p in parts if p != "graph"]
    if prefix in ([], ["plain"]):
        return kwargs
    if prefix == ["prefix-host"]:
        return {**kwargs, "prefix_cache_bytes": PREFIX_CACHE_BYTES, "device_prefix_cache": "off"}
    if prefix == ["prefix-device"]:
        return {**kwargs, "prefix_cache_bytes": PREFIX_CACHE_BYTES, "device_prefix_cache": "on"}
    raise SystemExit(f"--configs: {config!r}: plain, prefix-host or prefix-device, optionally after 'graph+'")


def replay(engine: Any, sequences: int, arrivals: int, prompt_tokens: int, max_tokens: int,
           rng: np.random.Generator, tag: str) -> dict[str, Any]:
    """One pass of the pattern; wall seconds by phase and the tokens generated."""
    from services.worker.sampling import SamplingParams
    vocab = engine.config.vocab_size
    waiting = [f"{tag}-{i}" for i in range(sequences)]
    produced: dict[str, int] = {}
    prompts: dict[str, list[int]] = {}
    generated: dict[str, list[int]] = {}
    left: list[str] = []  # in the order they left
    phases = dict.fromkeys(("add", "prefill", "decode", "remove", "other"), 0.0)
    steps, batch_sum, tokens = 0, 0, 0
    t_all = time.perf_counter()
    while waiting or produced:
        now, waiting = waiting[:arrivals], waiting[arrivals:]
        t0 = time.perf_counter()
        for sid in now:
            prompts[sid] = rng.integers(10, vocab - 1, prompt_tokens).tolist()
            engine.add(sid, prompts[sid], SamplingParams(), steps)
        t1 = time.perf_counter()
        result = engine.step([(sid, 0) for sid in now], decode=bool(produced))
        t2 = time.perf_counter()
        for sid, token, _ in result.tokens:
            produced[sid] = produced.get(sid, 0) + 1
            generated.setdefault(sid, []).append(token)
        tokens += len(result.tokens)
        done = [sid for sid, n in produced.items() if n >= max_tokens]
        t3 = time.perf_counter()
        engine.remove(done)
        t4 = time.perf_counter()
        for sid in done:
            del produced[sid]
        left += done
        phases["add"] += t1 - t0
        phases["prefill"] += result.prefill_s
        phases["decode"] += result.decode_s
        phases["remove"] += t4 - t3
        phases["other"] += (t2 - t1) - result.prefill_s - result.decode_s + (t3 - t2)
        steps += 1
        batch_sum += result.decode_batch_size
    wall = time.perf_counter() - t_all
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "steps": steps,
            "mean_decode_batch": batch_sum / steps, "phase_s": {k: round(v, 4) for k, v in phases.items()},
            "_finished": [(prompts[sid], generated[sid]) for sid in left]}


def check_hits(engine: Any, finished: list[tuple[list[int], list[int]]], rng: np.random.Generator) -> dict[str, Any]:
    """Next turns of sequences that left (prompt + answer + 4 new tokens): each must find the
    blocks its sequence left behind in the prefix cache (all full blocks of its prompt and answer
    but the last token) and take the first token the same engine takes without the cache. The
    last leavers are checked: a full cache has evicted the first ones. Shows that the blocks a
    step's leavers stored (cut together from their rows) are theirs."""
    from services.worker.engine import BLOCK_SIZE
    from services.worker.sampling import SamplingParams
    out = {"checked": 0, "cached_as_expected": 0, "first_token_equal": 0}
    for i, (prompt, answer) in enumerate(finished):
        follow = prompt + answer + rng.integers(10, engine.config.vocab_size - 1, 4).tolist()
        firsts, cached = [], 0
        for cache_on in (True, False):
            saved = engine.prefix_cache
            engine.prefix_cache = saved if cache_on else None
            try:
                sid = f"check-{i}-{cache_on}"
                engine.add(sid, follow, SamplingParams(), 0)
                result = engine.step([(sid, 0)], decode=False)
                firsts.append(result.tokens[0][1])
                if cache_on:
                    cached = result.cached_prompt_tokens.get(sid, 0)
                engine.remove([sid])
            finally:
                engine.prefix_cache = saved
        out["checked"] += 1
        out["cached_as_expected"] += cached == (len(prompt) + len(answer) - 1) // BLOCK_SIZE * BLOCK_SIZE
        out["first_token_equal"] += firsts[0] == firsts[1]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-instruct-int4")
    ap.add_argument("--provider", choices=("cpu", "cuda", "auto"), default="auto")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--arrivals", type=int, default=16, help="new sequences prefilled per step")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--configs", default="plain,prefix-host,prefix-device",
                    help="comma-separated: plain, prefix-host, prefix-device, each optionally as graph+...")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check-hits", type=int, default=8,
                    help="with a prefix cache: next turns of this many of the last sequences to leave, checked "
                         "against the cache's blocks and the cache-off engine (0: none)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()

    import onnxruntime as ort  # noqa: F401  (before the engine: preload order)

    from gpu_bench import decode_rate  # the steady rate, measured the way gpu_bench measures it
    from services.worker.engine import Engine
    from services.worker.providers import resolve_provider

    provider = resolve_provider(args.provider)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for config in [c for c in args.configs.split(",") if c]:
        kwargs = engine_kwargs(config)
        if kwargs["cuda_graph"] and provider != "cuda":
            print(f"{config}: skipped (CUDA graphs need the CUDA provider)", flush=True)
            continue
        engine = Engine(args.model, provider=provider, max_sequences=args.sequences, threads=args.threads, **kwargs)
        replay(engine, min(args.sequences, 2 * args.arrivals), args.arrivals, args.prompt_tokens, 4, rng, "warm")
        row = replay(engine, args.sequences, args.arrivals, args.prompt_tokens, args.max_tokens, rng, "run")
        finished = row.pop("_finished")
        if args.check_hits and engine.prefix_cache is not None:
            row["hit_check"] = check_hits(engine, finished[-args.check_hits:], rng)
            print(f"{config}: next turns of the last {row['hit_check']['checked']} leavers: "
                  f"{row['hit_check']['cached_as_expected']} found their blocks, "
                  f"{row['hit_check']['first_token_equal']} took the cache-off first token", flush=True)
        steady = decode_rate(engine, args.sequences, args.prompt_tokens, 16, rng)
        row.update(config=config, steady_tokens_per_s=steady["tokens_per_s"], steady_step_ms=steady["step_ms_p50"],
                   replay_over_steady=row["tokens_per_s"] / steady["tokens_per_s"])
        rows.append(row)
        ph = row["phase_s"]
        print(f"{config:24s} {row['tokens_per_s']:9.0f} tok/s ({row['replay_over_steady']:.2f}x steady "
              f"{steady['tokens_per_s']:.0f}) wall {row['wall_s']:.2f} s: add {ph['add']:.2f}, prefill "
              f"{ph['prefill']:.2f}, decode {ph['decode']:.2f}, remove {ph['remove']:.2f}, other {ph['other']:.2f}; "
              f"{row['steps']} steps, mean batch {row['mean_decode_batch']:.0f}", flush=True)
        del engine
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"provider": provider, "model": args.model.name, "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
