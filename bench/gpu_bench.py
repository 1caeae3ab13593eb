"""GPU benchmark (issue 13 §6, `make gpu-bench`): one run, one JSON file.

What it measures, all with the Engine's public API (`Engine(model_dir, provider=...,
max_sequences=...)`, `add`, `step`, `remove`, `generate`) so that it keeps working while the
engine's internals change:

- correctness: greedy tokens of a few chat prompts on the requested provider equal the CPU
  engine's, token for token, per model variant (int4 and fp32 by default);
- decode: aggregate tokens/s and step time at batch 1/16/64/256 (same-length prompts, all
  prefilled first, then timed decode steps);
- sampled decode: top-p 0.9 / temperature 0.8 at batch 1/16/256, sampled by the sampler graph
  where the logits are (the worker's default on CUDA) vs numpy on the host, on chat prompts and
  on random-token prompts (flat distributions: the whole vocabulary sorted every step);
- TTFT: one prompt of 128 and of 1,024 tokens, from `add` to its first token (prefill);
- prefix cache hit: TTFT of the 1,024-token prompt when all but its last block is cached, the
  cache's blocks on the host vs on the device (the worker's default on CUDA);
- the whole stack (LocalStack: router → NATS → batcher → worker on `--provider`) at 64 and 256
  concurrent gRPC streams from 4 client processes: tokens/s, TTFT p50/p99, errors, CPU µs per
  token of each kind of process — next to the engine's own rate at that batch size (eager, or
  from CUDA graphs when the stack's worker uses them) — with 4 routers sharing the port and the
  batcher's steps pipelined (depth 2, the default): first the engine inside the batcher's process
  (co-located replica, `--worker local`) replaying decode from CUDA graphs, then at 256 streams
  the same without graphs, a separate worker process with and without them, one router, and
  four decode steps per call (graph configurations only on CUDA);
- GPU memory (nvidia-smi: the device and this process), process RSS, machine and versions.

On the GPU machine (through ../shared/gpu's kit, a few minutes; `--profile` adds ORT's node
profile of decode steps — nodes per run by provider, Memcpy nodes, top operators — and on
CUDA decode replayed from CUDA graphs is measured too unless `--no-cuda-graph`):

    python3 bench/gpu_bench.py --provider cuda --profile --out $OUT/gpu_bench.json

Here, as a check of the script itself (tests/test_gpu_bench.py runs it this way):

    .venv/bin/python bench/gpu_bench.py --provider cpu --quick --out /tmp/gpu_bench.json

`--only` runs some sections (a rerun when device time is short), e.g. the prefix-cache hit on
the real int4 model here: `--provider cpu --variants int4 --only prefix_hit --out /tmp/hit.json`.

A section that fails is recorded in the JSON under "errors" and the run goes on; the exit code
is 1 when any section failed, the outputs differ from the CPU engine's or a stream of the stack
failed or came back short, 2 when the provider
cannot run at all (the reason is in the JSON's "errors").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "libs"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

from gpu_check import PROMPTS as CHAT_PROMPTS  # noqa: E402  (the prompts gpu_check compares on)
from stack_overhead import separate_channels  # noqa: E402
FULL = {"batches": [1, 16, 64, 256], "ttft_prompts": [128, 1024], "streams": [64, 256],
        "decode_steps": 32, "prompt_tokens": 32, "stream_tokens": 128, "correct_tokens": 32,
        "stack_configs": "2/1/4/colocated/graph,2/1/4/colocated,2/1/4/graph,2/1/4,2/1/1/colocated/graph,2/4/4/colocated",
        "stack_clients": 4}
QUICK = {"batches": [1, 2, 4], "ttft_prompts": [16, 64], "streams": [2, 4],
         "decode_steps": 8, "prompt_tokens": 16, "stream_tokens": 16, "correct_tokens": 8,
         "stack_configs": "2/1/2,2/1/2/colocated,2/1/1,1/1/2,2/4/2", "stack_clients": 2}


def model_folder(models_dir: Path, variant: str) -> Path:
    """int4 / fp32 (the converted SmolLM2 folders) or any folder name under models_dir."""
    from switchyard.model.convert import MODEL_NAMES
    return models_dir / MODEL_NAMES.get(variant, variant)


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _run(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None


def gpu_memory() -> dict[str, Any]:
    """Device memory now: the whole device and this process's share (nvidia-smi)."""
    out: dict[str, Any] = {"method": "nvidia-smi"}
    dev = _run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"])
    if dev is None:
        return {"method": None, "reason": "no nvidia-smi on this machine"}
    used, total = (float(x) for x in dev.splitlines()[0].split(","))
    out.update(device_used_mib=used, device_total_mib=total)
    apps = _run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]) or ""
    procs = {int(pid): float(mib) for pid, mib in (line.split(",") for line in apps.splitlines() if line.strip())}
    out["processes_mib"] = procs  # by pid: this process's engines, or the stack's workers
    out["this_process_mib"] = procs.get(os.getpid())
    return out


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    from services.worker import providers
    info: dict[str, Any] = {
        "hostname": socket.gethostname(), "platform": platform.platform(), "python": sys.version.split()[0],
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "onnxruntime": ort.__version__, "onnxruntime_packages": providers.ort_packages(),
        "onnxruntime_cuda_version": getattr(ort, "cuda_version", "") or None,
        "available_providers": ort.get_available_providers(), "numpy": np.__version__,
        "git_commit": _run(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
    }
    gpus = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"])
    info["gpus"] = gpus.splitlines() if gpus else []
    return info


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def section(report: dict[str, Any], name: str) -> Iterator[None]:
    """Run one part; a failure is recorded and the run goes on to the next part."""
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        yield
    except Exception as exc:  # recorded, not fatal: the other figures still come back
        report["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc(limit=8)})
        print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
    report["section_s"][name] = round(time.perf_counter() - t0, 2)


def chat_prompts(folder: Path) -> list[list[int]]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return [tok.encode(p).ids for p in CHAT_PROMPTS]


def random_prompt(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    return rng.integers(10, vocab - 1, n).tolist()


def node_profile(folder: Path, provider: str, batches: list[int], threads: int, prefix: str) -> dict[str, Any]:
    """Where a decode step's time goes: ONNX Runtime's profiler over 20 steps per batch size —
    nodes per run and their time by provider, Memcpy nodes (a host round trip inside the graph),
    the top operators, and the wall time per step."""
    from services.worker.engine import Engine
    from services.worker.sampling import SamplingParams

    engine = Engine(folder, provider=provider, max_sequences=max(batches), threads=threads, profile_prefix=prefix)
    out: dict[str, Any] = {"model_file": engine.model_file, "wall_ms_per_step": {}}
    for b in batches:
        ids = [f"prof{b}-{i}" for i in range(b)]
        for i, sid in enumerate(ids):
            engine.add(sid, list(range(100 + i, 132 + i)), SamplingParams(), i)
        engine.step([(sid, 0) for sid in ids], decode=False)
        for _ in range(3):
            engine.step([], decode=True)
        t0 = time.perf_counter()
        for _ in range(20):
            engine.step([], decode=True)
        out["wall_ms_per_step"][b] = round((time.perf_counter() - t0) / 20 * 1e3, 3)
        engine.remove(ids)
    events = json.loads(Path(engine.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    runs = max(sum(1 for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), 1)
    time_by: dict[str, float] = {}
    count_by: dict[str, int] = {}
    ops: dict[str, float] = {}
    memcpy = 0
    for e in nodes:
        a = e.get("args", {})
        prov, op = a.get("provider", "?"), a.get("op_name", "?")
        time_by[prov] = time_by.get(prov, 0.0) + e["dur"]
        count_by[prov] = count_by.get(prov, 0) + 1
        ops[f"{prov}:{op}"] = ops.get(f"{prov}:{op}", 0.0) + e["dur"]
        memcpy += "Memcpy" in op
    out.update({
        "model_runs": runs, "nodes_per_run": round(len(nodes) / runs, 1),
        "nodes_per_run_by_provider": {p: round(n / runs, 1) for p, n in count_by.items()},
        "node_us_per_run_by_provider": {p: round(t / runs, 1) for p, t in time_by.items()},
        "memcpy_nodes_per_run": round(memcpy / runs, 2),
        "top_ops_us_per_run": sorted(((k, round(v / runs, 1)) for k, v in ops.items()), key=lambda kv: -kv[1])[:12],
    })
    return out


def correctness(engine: Any, reference: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Greedy outputs one prompt at a time, then all together (a ragged batch), against the CPU engine."""
    from services.worker.sampling import SamplingParams

    def batch(e: Any) -> list[list[int]]:
        ids = [f"bench-ok-{i}" for i in range(len(prompts))]
        for sid, p in zip(ids, prompts):
            e.add(sid, p, SamplingParams(), 0)
        outs: dict[str, list[int]] = {sid: [] for sid in ids}
        try:
            result = e.step([(sid, 0) for sid in ids], decode=False)
            while True:
                for sid, token, _ in result.tokens:
                    outs[sid].append(token)
                if min(len(o) for o in outs.values()) >= max_tokens:
                    return [outs[sid][:max_tokens] for sid in ids]
                result = e.step([], decode=True)
        finally:
            e.remove(ids)

    single = [(engine.generate(p, max_tokens), reference.generate(p, max_tokens)) for p in prompts]
    ragged = list(zip(batch(engine), batch(reference)))
    return {
        "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "max_tokens": max_tokens,
        "single_equal": [a == b for a, b in single], "ragged_batch_equal": [a == b for a, b in ragged],
        "equal": all(a == b for a, b in single + ragged),
        "outputs": [a for a, _ in single], "reference_outputs": [b for _, b in single],
    }


def decode_rate(engine: Any, batch: int, prompt_tokens: int, steps: int, rng: np.random.Generator,
                params: Any = None, prompts: list[list[int]] | None = None) -> dict[str, Any]:
    """`batch` sequences prefilled, then `steps` timed decode steps (warm-up steps excluded);
    greedy unless `params` (SamplingParams) says otherwise; random `prompt_tokens`-token prompts
    unless `prompts` (used in turn)."""
    from services.worker.sampling import SamplingParams
    ids = [f"bench-dec-{i}" for i in range(batch)]
    for i, sid in enumerate(ids):
        prompt = prompts[i % len(prompts)] if prompts else random_prompt(rng, engine.config.vocab_size, prompt_tokens)
        engine.add(sid, prompt, params or SamplingParams(), i)
    try:
        t0 = time.perf_counter()
        first = engine.step([(sid, 0) for sid in ids], decode=False)
        prefill_s = time.perf_counter() - t0
        assert len(first.tokens) == batch, f"{len(first.tokens)} first tokens for {batch} sequences"
        for _ in range(2):  # warm-up: shapes seen for the first time
            engine.step([], decode=True)
        times, tokens = [], 0
        for _ in range(steps):
            t = time.perf_counter()
            tokens += len(engine.step([], decode=True).tokens)
            times.append(time.perf_counter() - t)
    finally:
        engine.remove(ids)
    total = sum(times)
    return {"batch": batch, "prompt_tokens": prompt_tokens, "steps": steps, "tokens": tokens,
            "tokens_per_s": tokens / total, "step_ms_mean": 1000 * total / steps,
            "tokens_per_s_at_p50_step": batch / pct(times, 50),  # steadier on a shared machine
            "step_ms_p50": 1000 * pct(times, 50), "step_ms_p90": 1000 * pct(times, 90),
            "prefill_s": prefill_s}


def sampled_decode(engine: Any, batches: list[int], prompt_tokens: int, steps: int,
                   rng: np.random.Generator, chat: list[list[int]]) -> list[dict[str, Any]]:
    """Decode with top-p 0.9 / temperature 0.8 sampling: the sampler graph where the logits are
    (the worker's default on CUDA) vs numpy on the host (logits copied back every step), on chat
    prompts and on random-token prompts. Random prompts make flat next-token distributions whose
    top-p nucleus is wider than the sampler's candidates, so both samplers sort the whole
    vocabulary (`device_full_vocab_runs_per_step`: the sampler graph's second run)."""
    from services.worker.device_sampler import DeviceSampler
    from services.worker.providers import choose_providers
    from services.worker.sampling import SamplingParams
    params = SamplingParams(temperature=0.8, top_p=0.9)
    chosen = engine.sampler  # as the engine chose it ("auto"): put back afterwards
    device = chosen or DeviceSampler(choose_providers("cuda" if engine.device == "cuda" else "cpu"))
    rows = []
    try:
        for prompts in ("chat", "random"):
            for batch in batches:
                row: dict[str, Any] = {"prompts": prompts, "batch": batch}
                for mode, sampler in (("device", device), ("host", None)):
                    engine.sampler = sampler
                    reruns = device.full_vocab_runs
                    r = decode_rate(engine, batch, prompt_tokens, steps, rng, params,
                                    chat if prompts == "chat" else None)
                    row[f"{mode}_step_ms_p50"], row[f"{mode}_tokens_per_s"] = r["step_ms_p50"], r["tokens_per_s"]
                    if mode == "device":  # decode_rate's 2 warm-up and its timed steps (first tokens: host)
                        row["device_full_vocab_runs_per_step"] = (device.full_vocab_runs - reruns) / (steps + 2)
                row["device_over_host_tokens_per_s"] = row["device_tokens_per_s"] / row["host_tokens_per_s"]
                rows.append(row)
    finally:
        engine.sampler = chosen
    return rows


def prefix_hit(folder: Path, provider: str, threads: int, prompt_tokens: int,
               rng: np.random.Generator, repeats: int = 3) -> dict[str, Any]:
    """TTFT of a prompt whose leading blocks the prefix cache holds (all but its last block),
    with the cache's blocks on the host (numpy) vs on the device (cut from and placed into the
    KV pool there, the worker's default on CUDA), next to the same prompt uncached."""
    from services.worker.engine import Engine
    from services.worker.sampling import SamplingParams
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens}
    prompt: list[int] | None = None
    for mode in ("host", "device"):
        engine = Engine(folder, provider=provider, threads=threads, max_sequences=4, prefix_cache_bytes=1 << 30,
                        device_prefix_cache="on" if mode == "device" else "off")
        prompt = prompt or random_prompt(rng, engine.config.vocab_size, min(prompt_tokens, engine.context_length - 8))
        t0 = time.perf_counter()
        first = engine.generate(prompt, 2)  # stores the prompt's blocks
        cold_s = time.perf_counter() - t0
        times, cached = [], 0
        for r in range(repeats):
            sid = f"bench-hit-{r}"
            t = time.perf_counter()
            engine.add(sid, prompt, SamplingParams(), 0)
            result = engine.step([(sid, 0)], decode=False)
            times.append(time.perf_counter() - t)
            cached = result.cached_prompt_tokens.get(sid, 0)
            assert [tok for _, tok, _ in result.tokens] == first[:1], "a cache hit changed the first token"
            engine.remove([sid])
        out[mode] = {"uncached_prefill_and_store_ms": 1000 * cold_s, "hit_ttft_ms_p50": 1000 * pct(times, 50),
                     "hit_ttft_ms_min": 1000 * min(times), "cached_prompt_tokens": cached}
        del engine
    out["device_over_host_ttft"] = out["device"]["hit_ttft_ms_p50"] / out["host"]["hit_ttft_ms_p50"]
    return out


def ttft(engine: Any, prompt_tokens: int, rng: np.random.Generator, repeats: int = 3) -> dict[str, Any]:
    """From add to the first token of one prompt (whole-prompt prefill), best and median of `repeats`."""
    from services.worker.sampling import SamplingParams
    samples = []
    for r in range(repeats + 1):  # the first is a warm-up for this shape
        sid = f"bench-ttft-{prompt_tokens}-{r}"
        prompt = random_prompt(rng, engine.config.vocab_size, prompt_tokens)
        t0 = time.perf_counter()
        engine.add(sid, prompt, SamplingParams(), 0)
        result = engine.step([(sid, 0)], decode=False)
        while not result.tokens:  # an engine that prefills in chunks
            result = engine.step([(sid, 0)], decode=False)
        elapsed = time.perf_counter() - t0
        engine.remove([sid])
        if r:
            samples.append(elapsed)
    return {"prompt_tokens": prompt_tokens, "repeats": repeats, "ttft_ms_min": 1000 * min(samples),
            "ttft_ms_p50": 1000 * pct(samples, 50)}


async def drive_stack(address: str, metadata: tuple, model: str, streams: int, prompt_tokens: int,
                      max_tokens: int, vocab: int, connections: int = 1, start_at: float | None = None,
                      seed: int | None = None) -> dict[str, Any]:
    """`streams` concurrent gRPC Generate streams, one request each, EOS ignored, spread over
    `connections` connections (several routers sharing the port each take some: the kernel
    spreads connections, not streams). Starts at wall-clock `start_at` when given."""
    import grpc

    from switchyard.v1 import generate_pb2, generate_pb2_grpc
    rng = np.random.default_rng(streams if seed is None else seed)
    ttfts: list[float] = []
    tokens = 0
    errors: list[str] = []
    channels = separate_channels(address, connections)
    stubs = [generate_pb2_grpc.GenerationStub(channel) for channel in channels]

    async def one(i: int) -> None:
        nonlocal tokens
        req = generate_pb2.GenerateRequest(
            model=model, max_tokens=max_tokens, stop=generate_pb2.StopConditions(ignore_eos=True),
            token_ids=generate_pb2.TokenIds(ids=random_prompt(rng, vocab, prompt_tokens)))
        start, first, got = time.perf_counter(), None, 0
        try:
            async for event in stubs[i % len(stubs)].Generate(req, metadata=metadata):
                if event.HasField("tokens"):
                    first = first or time.perf_counter()
                    got += len(event.tokens.token_ids)
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{exc.code().name}: {exc.details()}")
        tokens += got
        if first is not None:
            ttfts.append(first - start)

    try:
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        t0, wall0 = time.perf_counter(), time.time()
        await asyncio.gather(*(one(i) for i in range(streams)))
        wall = time.perf_counter() - t0
    finally:
        for channel in channels:
            await channel.close()
    return {"streams": streams, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "tokens": tokens,
            "expected_tokens": streams * max_tokens, "wall_s": wall, "started_unix_s": wall0,
            "tokens_per_s": tokens / wall, "ttfts_s": ttfts, "errors": len(errors), "error_samples": errors[:5]}


def _drive_share(*args: Any) -> dict[str, Any]:
    """One client process's share of the streams (ProcessPoolExecutor target)."""
    return asyncio.run(drive_stack(*args))


def drive_stack_processes(address: str, metadata: tuple, model: str, streams: int, prompt_tokens: int,
                          max_tokens: int, vocab: int, processes: int, connections: int) -> dict[str, Any]:
    """The streams split over `processes` client processes (one Python client touches every
    token it receives: one process alone tops out below what a GPU stack can carry), each
    with `connections` connections, starting together; tokens/s over the whole span."""
    if processes <= 1:
        run = asyncio.run(drive_stack(address, metadata, model, streams, prompt_tokens, max_tokens, vocab, connections))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        shares = [streams // processes + (1 if i < streams % processes else 0) for i in range(processes)]
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(time.sleep, [0.3] * processes))  # every process spawned before the clock starts
            start_at = time.time() + 5.0  # every client imported and connected by then
            parts = [f.result() for f in [
                pool.submit(_drive_share, address, metadata, model, n, prompt_tokens, max_tokens, vocab,
                            connections, start_at, streams * 1000 + i) for i, n in enumerate(shares) if n]]
        ends = [p["started_unix_s"] + p["wall_s"] for p in parts]
        wall = max(ends) - min(p["started_unix_s"] for p in parts)
        tokens = sum(p["tokens"] for p in parts)
        run = {"streams": streams, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "tokens": tokens,
               "expected_tokens": streams * max_tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
               "ttfts_s": [t for p in parts for t in p["ttfts_s"]], "errors": sum(p["errors"] for p in parts),
               "error_samples": [e for p in parts for e in p["error_samples"]][:5]}
    ttfts = run.pop("ttfts_s")
    run.pop("started_unix_s", None)
    run.update(ttft_s_p50=pct(ttfts, 50), ttft_s_p99=pct(ttfts, 99), client_processes=max(1, processes),
               connections=max(1, processes) * max(1, connections))
    return run


def bench_stack(folder: Path, provider: str, streams: list[int], prompt_tokens: int, max_tokens: int,
                replicas: int, vocab: int, pipeline_depth: int = 2, decode_steps: int = 1, routers: int = 1,
                placement: str = "separate", cuda_graph: bool = False, prefill_chunk: int = 0,
                prefill_wait: int = -1, client_processes: int = 1) -> dict[str, Any]:
    """The whole stack (router → NATS → batcher → worker on `provider`), one model folder, the
    batcher keeping `pipeline_depth` worker steps in flight, `decode_steps` per call, `routers`
    routers sharing the port, the engine in a worker process or (`placement` "colocated") in the
    batcher's; the CPU each kind of process spent per token, from /proc."""
    from switchyard.runtime.children import cpu_seconds
    from switchyard.runtime.stack import LocalStack, StackSpec
    log_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-logs-"))
    name = folder.name
    # Every stream in one batch: the batch limit and the batcher's KV token budget (prompt +
    # max_tokens per stream; its default 16,384 admits ~100 such streams, the router sheds the rest).
    budget = max(streams) * (prompt_tokens + max_tokens)
    spec = StackSpec(models_dir=folder.parent, replicas={name: replicas}, max_batch_size=max(streams),
                     worker_args={name: ("--provider", provider, "--cuda-graph", "on" if cuda_graph else "off")},
                     log_dir=log_dir, routers=routers,
                     colocate=placement == "colocated",
                     batcher_args=("--token-budget", str(max(budget, 16384)),
                                   "--pipeline-depth", str(pipeline_depth), "--decode-steps", str(decode_steps),
                                   *(("--prefill-chunk", str(prefill_chunk), "--prefill-chunk-decoding", str(prefill_chunk))
                                     if prefill_chunk else ()),
                                   *(("--prefill-wait-steps", str(prefill_wait)) if prefill_wait >= 0 else ())))
    out: dict[str, Any] = {"model": name, "replicas": replicas, "provider": provider, "log_dir": str(log_dir),
                           "pipeline_depth": pipeline_depth, "decode_steps": decode_steps, "routers": routers,
                           "placement": placement, "cuda_graph": cuda_graph, "prefill_chunk": prefill_chunk or None,
                           "prefill_wait_steps": None if prefill_wait < 0 else prefill_wait, "runs": []}
    with LocalStack(spec) as stack:
        assert stack.nats is not None and stack.nats.process is not None
        kinds = {"router": stack.routers, "batcher": stack.batchers, "worker": stack.workers}
        pids = {kind: [svc.process.pid for svc in services] for kind, services in kinds.items()}
        pids["nats-server"] = [stack.nats.process.pid]
        # Warm-up at the largest concurrency measured: a replica's first burst pays one-time costs
        # (ONNX Runtime's arena growing, first shapes) that a serving replica pays once; on the
        # H200 a fresh stack's 256-stream run carried ~25% less than the same stack's after a 64-stream run.
        asyncio.run(drive_stack(stack.router_address, stack.auth_metadata(), name, max(streams), prompt_tokens, 8,
                                vocab))
        for n in streams:
            before = {kind: sum(cpu_seconds(pid) for pid in ps) for kind, ps in pids.items()}
            run = drive_stack_processes(stack.router_address, stack.auth_metadata(), name, n, prompt_tokens,
                                        max_tokens, vocab, client_processes, connections=max(2, 2 * routers))
            after = {kind: sum(cpu_seconds(pid) for pid in ps) for kind, ps in pids.items()}
            run["cpu_us_per_token"] = {kind: round(1e6 * (after[kind] - before[kind]) / max(run["tokens"], 1), 1)
                                       for kind in pids}
            print(f"   stack ({placement}{', CUDA graphs' if cuda_graph else ''}"
                  f"{f', {prefill_chunk} prompt tokens/step' if prefill_chunk else ''}"
                  f"{f', prompts wait ≤ {prefill_wait} steps' if prefill_wait >= 0 else ''}, {routers} routers, "
                  f"depth {pipeline_depth}, "
                  f"{decode_steps} steps/call) {n} streams: "
                  f"{run['tokens_per_s']:.0f} tok/s, TTFT p50 {run['ttft_s_p50']}, errors {run['errors']}, "
                  f"CPU µs/token {run['cpu_us_per_token']}", flush=True)
            out["runs"].append(run)
        # The replicas' device memory while they are up (KV pool, captured CUDA graphs, prefix
        # cache): nvidia-smi's per-process figures, with the stack's processes named.
        out["gpu_memory_stack_up"] = gpu_memory()
        out["pids"] = pids
    return out


def stack_config(text: str) -> tuple[int, int, int, str, bool, int, int]:
    """"2/1/4", "2/1/4/colocated", "2/1/4/colocated/graph/p2048/w0": pipeline depth, decode steps
    per call, routers, then the placement (separate unless colocated), CUDA-graph decode ("graph"),
    the batcher's prompt tokens per step ("p" and a number: --prefill-chunk and
    --prefill-chunk-decoding; 0, the batcher's own default, without one) and how many steps new
    prompts may wait for each other ("w" and a number: --prefill-wait-steps; -1, auto, without)."""
    depth, steps, routers, *rest = text.split("/")
    chunks = [r for r in rest if r[:1] == "p" and r[1:].isdigit() and int(r[1:]) > 0]
    waits = [r for r in rest if r[:1] == "w" and r[1:].isdigit()]
    words = [r for r in rest if r not in chunks and r not in waits]
    if not set(words) <= {"separate", "colocated", "graph"} or len(set(words)) != len(words) or \
            {"separate", "colocated"} <= set(words) or len(chunks) > 1 or len(waits) > 1:
        raise SystemExit(f"--stack-configs: {text!r}: after the third '/' come separate or colocated, graph, "
                         "p<prompt tokens per step> and w<steps a prompt may wait>")
    return (int(depth), int(steps), int(routers), "colocated" if "colocated" in words else "separate",
            "graph" in words, int(chunks[0][1:]) if chunks else 0, int(waits[0][1:]) if waits else -1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    ap.add_argument("--provider", choices=("cuda", "cpu", "auto"), default="cuda")
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--variants", default=None, help="int4,fp32 (default) or folder names under --models-dir")
    ap.add_argument("--stack-variant", default=None, help="the model the stack serves (default: the first variant)")
    ap.add_argument("--replicas", type=int, default=1, help="replicas of the stack's model")
    ap.add_argument("--quick", action="store_true", help="small batches, short prompts (a CPU check of the script)")
    ap.add_argument("--skip-stack", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads of the in-process engines")
    ap.add_argument("--profile", action="store_true", help="also profile decode steps with ORT's profiler "
                    "(nodes per run by provider, Memcpy nodes, top operators) at batch 1 and the largest batch")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all): correctness, "
                    "decode, sampled, cuda_graph, ttft, prefix_hit, profile, stack")
    ap.add_argument("--stack-configs", default=None, help="stack settings to run, as pipeline-depth/decode-steps/"
                    "routers[/colocated][/graph] (default " + FULL["stack_configs"] + "; --quick "
                    + QUICK["stack_configs"] + "; graph: the worker replays decode from CUDA graphs, CUDA only, "
                    "skipped otherwise): the first is reported as `stack` (every stream count), the rest under "
                    "`stack_other_configs` (the largest stream count only)")
    ap.add_argument("--stack-clients", type=int, default=None, help="client processes driving the stack "
                    "(default 4; --quick 2)")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                    help="on CUDA, also measure decode replayed from captured CUDA graphs (Engine cuda_graph=True)")
    args = ap.parse_args()

    import onnxruntime as ort  # noqa: F401  (imported before the engine: preload order)

    from services.worker.engine import Engine
    from services.worker.providers import ProviderError, resolve_provider

    only = {o for o in args.only.split(",") if o}

    def want(name: str) -> bool:
        return not only or name in only

    cfg = dict(QUICK if args.quick else FULL)
    variants = [v for v in (args.variants or ("int4" if args.quick else "int4,fp32")).split(",") if v]
    report: dict[str, Any] = {
        "schema": 1, "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick, "config": cfg,
        "requested_provider": args.provider, "variants": variants, "machine": machine(), "errors": [],
        "section_s": {}, "correctness": {}, "decode": {}, "sampled_decode": {}, "ttft": {}, "stack": None,
        "stack_other_configs": [], "gpu_memory": {},
    }
    t_all = time.perf_counter()
    try:
        provider = resolve_provider(args.provider)
    except ProviderError as exc:  # CUDA asked for and not loadable: say why, in the JSON too
        report["errors"].append({"section": "provider", "error": str(exc)})
        report["passed"] = False
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"{exc}\nwrote {args.out}", file=sys.stderr)
        return 2
    report["provider"] = provider
    rng = np.random.default_rng(0)
    for variant in variants:
        folder = model_folder(args.models_dir, variant)
        engine = reference = None
        with section(report, f"{variant}: load"):
            max_seq = max(max(cfg["batches"]), len(CHAT_PROMPTS))
            engine = Engine(folder, provider=provider, max_sequences=max_seq, threads=args.threads)
            report.setdefault("engine_provider", {})[variant] = engine.provider
            report.setdefault("engine_graph", {})[variant] = {"graph": engine.graph, "file": engine.model_file}
            report["gpu_memory"][f"{variant}_after_load"] = gpu_memory()
        if engine is None:
            continue
        if want("correctness"):
            with section(report, f"{variant}: correctness"):
                reference = Engine(folder, provider="cpu", max_sequences=len(CHAT_PROMPTS), threads=args.threads)
                res = correctness(engine, reference, chat_prompts(folder), cfg["correct_tokens"])
                report["correctness"][variant] = res
                print(f"   equal to the CPU engine: {res['equal']}", flush=True)
                del reference
        if want("decode"):
            with section(report, f"{variant}: decode"):
                rows = report["decode"].setdefault(variant, [])
                for batch in cfg["batches"]:
                    row = decode_rate(engine, batch, cfg["prompt_tokens"], cfg["decode_steps"], rng)
                    rows.append(row)
                    print(f"   batch {batch:4d}: {row['tokens_per_s']:9.1f} tok/s, {row['step_ms_p50']:.2f} ms/step",
                          flush=True)
        if want("sampled"):
            with section(report, f"{variant}: sampled decode"):
                batches = sorted({1, 16 if not args.quick else 2, max(cfg["batches"])})
                rows = sampled_decode(engine, batches, cfg["prompt_tokens"], cfg["decode_steps"], rng,
                                      chat_prompts(folder))
                report["sampled_decode"][variant] = rows
                for row in rows:
                    print(f"   top-p, {row['prompts']} prompts, batch {row['batch']:4d}: device "
                          f"{row['device_step_ms_p50']:.2f} ms/step ({row['device_full_vocab_runs_per_step']:.2f} "
                          f"full-vocabulary reruns per step), host {row['host_step_ms_p50']:.2f} ms/step", flush=True)
        if provider == "cuda" and args.cuda_graph and want("cuda_graph"):
            with section(report, f"{variant}: decode with CUDA graphs"):
                graphed = Engine(folder, provider=provider, max_sequences=max_seq, threads=args.threads,
                                 cuda_graph=True)
                res = correctness(graphed, engine, chat_prompts(folder), cfg["correct_tokens"])
                rows = [decode_rate(graphed, batch, cfg["prompt_tokens"], cfg["decode_steps"], rng)
                        for batch in cfg["batches"]]
                graphs = getattr(graphed.batch, "graphs", None)
                report.setdefault("cuda_graph", {})[variant] = {
                    "equal_to_eager": res, "decode": rows,
                    "still_enabled": bool(graphs is not None and graphs.enabled)}
                for row in rows:
                    print(f"   graphs, batch {row['batch']:4d}: {row['tokens_per_s']:9.1f} tok/s, "
                          f"{row['step_ms_p50']:.2f} ms/step", flush=True)
                del graphed
        if want("ttft"):
            with section(report, f"{variant}: ttft"):
                rows = report["ttft"].setdefault(variant, [])
                for n in cfg["ttft_prompts"]:
                    if n >= engine.context_length:  # a small model's context: said, not failed
                        rows.append({"prompt_tokens": n, "skipped": f"context is {engine.context_length} tokens"})
                        continue
                    row = ttft(engine, n, rng)
                    rows.append(row)
                    print(f"   {n:5d}-token prompt: TTFT {row['ttft_ms_p50']:.1f} ms", flush=True)
        if variant == variants[0] and want("prefix_hit"):
            with section(report, f"{variant}: prefix cache hit"):
                hit = prefix_hit(folder, provider, args.threads, max(cfg["ttft_prompts"]), rng)
                report["prefix_hit"] = {variant: hit}
                print(f"   cached {hit['device']['cached_prompt_tokens']}-token prefix: TTFT host blocks "
                      f"{hit['host']['hit_ttft_ms_p50']:.1f} ms, device blocks {hit['device']['hit_ttft_ms_p50']:.1f} ms",
                      flush=True)
        if args.profile and want("profile"):
            with section(report, f"{variant}: profile"):
                batches = sorted({1, max(cfg["batches"])})
                args.out.parent.mkdir(parents=True, exist_ok=True)
                prefix = str(args.out.parent / f"ortprof-{variant}")
                report.setdefault("profile", {})[variant] = node_profile(folder, provider, batches, args.threads, prefix)
        report["gpu_memory"][f"{variant}_after_runs"] = gpu_memory()
        del engine
    report["process_max_rss_mib"] = rss_mib()
    if not args.skip_stack and want("stack"):
        stack_variant = args.stack_variant or variants[0]
        with section(report, f"stack ({stack_variant})"):
            folder = model_folder(args.models_dir, stack_variant)
            from switchyard.model.config import ModelManifest
            vocab = ModelManifest.load(folder).config.vocab_size
            configs = [stack_config(c) for c in (args.stack_configs or cfg["stack_configs"]).split(",") if c]
            if provider != "cuda":  # CUDA graphs need the CUDA provider: said, not run
                report["stack_skipped_configs"] = [
                    {"config": list(c), "reason": "CUDA graphs need the CUDA provider"} for c in configs if c[4]]
                configs = [c for c in configs if not c[4]]
            if not configs:
                raise RuntimeError("no stack configuration runs on this provider")
            clients = args.stack_clients or cfg["stack_clients"]
            report["stack"] = bench_stack(folder, provider, cfg["streams"], cfg["prompt_tokens"],
                                          cfg["stream_tokens"], args.replicas, vocab, *configs[0],
                                          client_processes=clients)
            for config in configs[1:]:
                report["stack_other_configs"].append(bench_stack(
                    folder, provider, [max(cfg["streams"])], cfg["prompt_tokens"], cfg["stream_tokens"],
                    args.replicas, vocab, *config, client_processes=clients))
            engine_rates = {r["batch"]: r["tokens_per_s"] for r in report["decode"].get(stack_variant, [])}
            graph_rates = {r["batch"]: r["tokens_per_s"]  # a graph stack next to the graph engine
                           for r in report.get("cuda_graph", {}).get(stack_variant, {}).get("decode", [])}
            for stack_run in [report["stack"], *report["stack_other_configs"]]:
                for run in stack_run["runs"]:
                    base = (graph_rates if stack_run["cuda_graph"] else engine_rates).get(run["streams"])
                    run["engine_tokens_per_s_same_batch"] = base
                    run["stack_over_engine"] = run["tokens_per_s"] / base if base else None
            report["gpu_memory"]["device_after_stack"] = gpu_memory()
    report["elapsed_s"] = round(time.perf_counter() - t_all, 1)
    stack_ok = args.skip_stack or not want("stack") or (report["stack"] is not None and all(
        run["errors"] == 0 and run["tokens"] == run["expected_tokens"]
        for stack_run in [report["stack"], *report["stack_other_configs"]] for run in stack_run["runs"]))
    report["passed"] = not report["errors"] and all(c["equal"] for c in report["correctness"].values()) \
        and (not want("correctness") or len(report["correctness"]) == len(variants)) and stack_ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}: passed={report['passed']}, {report['elapsed_s']} s", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
