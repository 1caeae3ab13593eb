"""Prefix cache: what a hit saves and what the cache costs, on the worker Engine alone.

For each model: time to first token of a prompt of ~1,000 shared tokens plus a short new
question, cold (cache off) vs with the shared part cached; the extra time the cold step pays
to copy its blocks into the cache, and what removal pays; then the bytes a LoadReport carries
for a full cache (the heartbeat snapshot of its block hashes).

    .venv/bin/python bench/prefix_cache.py [--models smollm2-135m-instruct-int4 ...] [--reps 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from services.worker.engine import Engine
from services.worker.sampling import SamplingParams
from switchyard.model.catalog import ModelCatalog
from switchyard.prefix.blocks import BLOCK_SIZE
from switchyard.v1 import bus_pb2

console = Console()
log = logging.getLogger("bench.prefix_cache")
MIB = 1 << 20
TEXT = ("Switchyard serves language models behind a router that batches requests, streams tokens "
        "and keeps the latency of every hop in view. ")


def first_token_s(engine: Engine, sid: str, prompt: list[int]) -> tuple[float, int]:
    """Seconds from add to first token (one whole-prompt step), and the cached prompt tokens."""
    t0 = time.perf_counter()
    engine.add(sid, prompt, SamplingParams(), 0)
    result = engine.step([(sid, 0)], decode=False)
    return time.perf_counter() - t0, result.cached_prompt_tokens.get(sid, 0)


def measure(models_dir: Path, name: str, reps: int, threads: int) -> dict[str, float]:
    entry = ModelCatalog(models_dir).get(name)
    assert entry is not None
    engine = Engine(models_dir / name, threads=threads, provider="cpu", prefix_cache_bytes=256 * MIB)
    cache = engine.prefix_cache
    assert cache is not None
    shared = entry.encode(TEXT * 40)[:1000]
    questions = [entry.encode(f" Question {i}: what does hop {i} cost?") for i in range(2 * reps + 2)]
    # Time inside the cache's insert (block copies), where the engine pays for caching: a
    # difference of two noisy multi-second prefills on shared cores would hide it.
    spent: list[float] = []
    plain_insert = cache.insert

    def timed_insert(hashes: list[int], kv: list[np.ndarray]) -> int:
        t = time.perf_counter()
        try:
            return plain_insert(hashes, kv)
        finally:
            spent.append(time.perf_counter() - t)
    cache.insert = timed_insert  # type: ignore[method-assign]
    cold, hit, insert_prefill, insert_removal = [], [], [], []
    for i in range(reps):
        prompt = shared + questions[i]
        saved, engine.prefix_cache = engine.prefix_cache, None
        cold.append(first_token_s(engine, "cold", prompt)[0])
        engine.remove(["cold"])
        engine.prefix_cache = saved
        cache.clear()
        spent.clear()
        assert first_token_s(engine, "fill", prompt)[1] == 0  # cold again, now copying its blocks in
        insert_prefill.append(sum(spent))
        spent.clear()
        engine.remove(["fill"])
        insert_removal.append(sum(spent))
        s, n = first_token_s(engine, "hit", shared + questions[reps + i])
        hit.append(s)
        assert n == len(shared) // BLOCK_SIZE * BLOCK_SIZE, n
        engine.remove(["hit"])
    c = engine.config
    block_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * BLOCK_SIZE * c.head_dim * 4
    return {"prompt": len(shared) + len(questions[0]), "cached": len(shared) // BLOCK_SIZE * BLOCK_SIZE,
            "cold": statistics.median(cold), "hit": statistics.median(hit),
            "insert": statistics.median(insert_prefill), "removal": statistics.median(insert_removal),
            "block_bytes": block_bytes}


def heartbeat_bytes(model: str, block_bytes: int, capacity: int = 256 * MIB) -> tuple[int, int, int]:
    """Serialized LoadReport size without a cache snapshot and with a full cache's."""
    base = bus_pb2.LoadReport(replica_id=f"{model}-0", model=model, context_length=2048, max_output_tokens=1024,
                              queue_depth=3, running=12, tokens_in_flight=4000, max_batch_size=32,
                              token_budget=16384, sent_unix_s=time.time(), steps=123456, max_decode_batch=12,
                              completed=999, interval_s=0.5)
    blocks = capacity // block_bytes
    full = bus_pb2.LoadReport()
    full.CopyFrom(base)
    full.cached_blocks.extend(np.random.default_rng(0).integers(0, 2**63, blocks, dtype=np.uint64).tolist())
    full.block_size, full.prefix_cache_bytes, full.prefix_cache_capacity_bytes = BLOCK_SIZE, blocks * block_bytes, capacity
    return blocks, base.ByteSize(), full.ByteSize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct-int4", "smollm2-135m-instruct"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = Table(title="prefix cache: ~1,000-token shared prefix, engine alone, CPU", width=140)
    for col in ("model", "prompt tokens", "cached", "TTFT cold", "TTFT hit", "speed-up", "insert cost (prefill end)",
                "insert cost (removal)", "KV per block"):
        table.add_column(col)
    beats = Table(title="LoadReport bytes per heartbeat (256 MiB prefix cache)", width=140)
    for col in ("model", "blocks when full", "report without snapshot", "with full snapshot", "at 2 Hz"):
        beats.add_column(col)
    for name in args.models:
        r = measure(args.models_dir, name, args.reps, args.threads)
        table.add_row(name, str(r["prompt"]), str(r["cached"]), f"{r['cold'] * 1e3:.0f} ms", f"{r['hit'] * 1e3:.0f} ms",
                      f"{r['cold'] / r['hit']:.1f}×", f"{r['insert'] * 1e3:.0f} ms", f"{r['removal'] * 1e3:.1f} ms",
                      f"{r['block_bytes'] / 1024:.0f} KiB")
        blocks, base, full = heartbeat_bytes(name, int(r["block_bytes"]))
        beats.add_row(name, str(blocks), f"{base} B", f"{full} B", f"{full * 2 / 1024:.1f} KiB/s")
    console.print(table)
    console.print(beats)


if __name__ == "__main__":
    main()
