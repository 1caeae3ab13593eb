"""Model throughput: the worker Engine (fp32 and int4 SmolLM2-135M-Instruct) against llama.cpp
on the same GGUF and onnxruntime-genai on the same model folders, in one run.

    .venv/bin/python bench/model_throughput.py --reference-python .venv-bench/bin/python
    make bench-model                         # the same, after `make model bench-deps`

For a 128-token prompt (real text through the model's tokenizer; stream i starts i*8 tokens
further into the text, so the N prompts differ) and N = 1, 4, 16 concurrent streams that all
arrive at t=0, every engine generates --new-tokens tokens per stream, greedy, ignoring EOS.

Our engine runs in-process, scheduled like the batcher: each Step decodes every running stream
in one ORT call and advances prompts within a --prefill-chunk token budget (the batcher's
default, 512 → four 128-token prompts per step). The reference engines run in a subprocess of
the bench venv (bench/reference_engines.py) with the same thread count; llama.cpp runs the N
streams sequentially (one after another, as llama-cpp-python's Llama object serves them) and
batched (low-level llama_decode with n_seq_max=N, continuous batching like llama-server); genai
runs a static batch (search option batch_size=N).

Reported per run, from the raw per-stream timeline, with one definition for every engine:
    decode tok/s   aggregate over decode-only steps (steps that ran no prompt tokens)
    per stream     mean over streams of (tokens - 1) / (last token time - first token time)
    TTFT           time from t=0 (all N arrive) to each stream's first token: mean and max
    e2e tok/s      all generated tokens / (t=0 → last token), prefill included
    agree          common prefix of stream 0's first 32 tokens with our engine's N=1 output on
                   the same weights (llama.cpp is compared with our fp32 folder, which holds the
                   GGUF's Q4_1 weights dequantized)
Ratios are against llama.cpp's single-stream decode tok/s (sequential ×1, low-level loop).

Then, per variant, a worker process (`python -m services.worker`) is started to measure cold
start (spawn → port file → AddSequences + Step → first token) and memory (VmRSS from /proc after
a one-stream warm-up request, and VmHWM after a 16-stream request).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "libs"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import grpc  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from services.worker.engine import Engine  # noqa: E402
from services.worker.sampling import SamplingParams  # noqa: E402
from switchyard.model.convert import MODEL_NAMES, convert_gguf, is_complete  # noqa: E402

# Plain-op builds of the same variants (build_llama_onnx graph="plain"): our engine's baseline
# with --plain, and what onnxruntime-genai runs (it cannot feed the fused graph's inputs).
PLAIN_MODELS = REPO / ".cache" / "plain-models"
from switchyard.model.gguf_source import ensure_gguf  # noqa: E402

from reference_process import run_events  # noqa: E402  (bench/, beside this script)

console = Console(stderr=True)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)

# Real English prose (written for this benchmark); tokenized with the model's tokenizer.
PROMPT_TEXT = """\
The lighthouse on the northern cape had been automated for eleven years when the keeper's
granddaughter came back to repair it. She arrived on the morning ferry with a canvas bag of
tools, a notebook full of her grandfather's handwriting, and a thermos of coffee that had gone
cold somewhere between the mainland and the island. The village had changed less than she
expected. The bakery still opened at six, the harbour master still argued with the fishermen
about the price of diesel, and the wind still came off the sea with enough force to lean a
grown man sideways. What had changed was the light itself. For three weeks it had been
flashing in the wrong pattern, two short and one long instead of the three long flashes that
every sailor on that coast had learned as children, and the coast guard had finally admitted
that nobody in their office understood the old relay cabinet well enough to fix it. She
climbed the spiral stairs slowly, counting the steps the way her grandfather had taught her,
one hundred and twelve from the door to the lamp room. At the top she opened the cabinet and
found the problem almost at once: a timing capacitor had swollen and cracked, and someone had
replaced it with a part of the wrong value, probably years ago, probably in a hurry during a
storm. She smiled, because the notebook had a page about exactly this, written in pencil and
underlined twice, with a sketch of the circuit and a warning in capital letters not to trust
the labels on the spare parts drawer. By the afternoon the light was turning again in its
proper rhythm, and when the evening ferry came round the headland its captain sounded the horn
three times, long, the way sailors greet an old friend.
"""

PROMPT_STRIDE = 8


# ------------------------------------------------------------------------------------------
# model folders: a stable snapshot
# ------------------------------------------------------------------------------------------


def _signature(folder: Path) -> set[tuple[str, int, int, int]]:
    return {(f.name, st.st_ino, st.st_size, st.st_mtime_ns)
            for f in folder.iterdir() if f.is_file() for st in [f.stat()]}


def snapshot_folder(src: Path, dst_root: Path, timeout_s: float = 120.0) -> Path:
    """A private copy of a complete model folder, so that a rebuild of models/ during the run
    cannot hand different engines different weights (convert_gguf replaces folders while we
    read them). The big *.data files are hard-linked (the builder unlinks and rewrites them,
    never writes into them); the small files are copied. Retried until the folder is complete
    and did not change while it was being linked."""
    deadline = time.monotonic() + timeout_s
    dst = dst_root / src.name
    while True:
        try:
            if is_complete(src):
                before = _signature(src)
                shutil.rmtree(dst, ignore_errors=True)
                dst.mkdir(parents=True)
                for f in src.iterdir():
                    if not f.is_file():
                        continue
                    if f.name.endswith(".data"):
                        try:
                            os.link(f, dst / f.name)
                            continue
                        except OSError:
                            pass  # other filesystem: copy
                    shutil.copy2(f, dst / f.name)
                if _signature(src) == before and is_complete(dst):
                    return dst
        except FileNotFoundError:
            pass  # a file vanished mid-copy: the folder is being rebuilt
        if time.monotonic() > deadline:
            raise RuntimeError(f"{src} did not stay complete and unchanged for a snapshot in {timeout_s:.0f}s")
        time.sleep(1.0)


def fingerprint(folder: Path) -> str:
    """Short id of a model folder's graph + weights: sha256 of model.onnx and the data size."""
    graph = (folder / "model.onnx").read_bytes()
    data = folder / "model.onnx.data"
    size = data.stat().st_size if data.exists() else 0
    return f"{hashlib.sha256(graph).hexdigest()[:10]}/{size / 2**20:.0f}MiB"


# ------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------


@dataclass
class Run:
    engine: str          # "switchyard", "llama.cpp", "onnxruntime-genai"
    model: str           # "fp32", "int4", "Q4_1 GGUF"
    mode: str            # "batcher", "sequential", "batched", "highlevel", "batch"
    streams: int
    raw: dict[str, Any]
    decode_tok_s: float = 0.0
    median_step_tok_s: float = 0.0
    per_stream_tok_s: float = 0.0
    ttft_mean_s: float = 0.0
    ttft_max_s: float = 0.0
    e2e_tok_s: float = 0.0
    tokens0: list[int] = field(default_factory=list)
    agree: str = ""

    def summarize(self) -> "Run":
        r = self.raw
        secs = sum(s for s, _ in r["steps"])
        self.decode_tok_s = sum(k for _, k in r["steps"]) / secs if secs else 0.0
        # tokens/s of the median decode step: robust to the other tenants' bursts on a shared box
        step_rates = [k / s for s, k in r["steps"] if s > 0]
        self.median_step_tok_s = statistics.median(step_rates) if step_rates else 0.0
        rates = [(c - 1) / (last - first) for c, first, last in zip(r["count"], r["first_s"], r["last_s"])
                 if c > 1 and last > first]
        self.per_stream_tok_s = statistics.fmean(rates) if rates else 0.0
        self.ttft_mean_s = statistics.fmean(r["first_s"])
        self.ttft_max_s = max(r["first_s"])
        self.e2e_tok_s = sum(r["count"]) / r["wall_s"] if r["wall_s"] else 0.0
        self.tokens0 = list(r.get("tokens0", []))
        return self

    @property
    def label(self) -> str:
        return f"{self.engine} [{self.mode}]"

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "raw"}
        d["steps"] = len(self.raw["steps"])
        return d


def common_prefix(a: list[int], b: list[int]) -> str:
    n = min(len(a), len(b))
    k = next((i for i in range(n) if a[i] != b[i]), n)
    return f"{k}/{n}"


# ------------------------------------------------------------------------------------------
# our engine, scheduled like the batcher
# ------------------------------------------------------------------------------------------


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int, prefill_chunk: int,
               advance: Callable[[int], None]) -> dict[str, Any]:
    """All len(prompts) streams arrive at t=0; Steps as the batcher issues them: decode every
    running stream, then prompt chunks within the `prefill_chunk` token budget."""
    n = len(prompts)
    ids = [f"bench-{i}" for i in range(n)]
    index = {sid: i for i, sid in enumerate(ids)}
    first, last, count = [0.0] * n, [0.0] * n, [0] * n
    tokens0: list[int] = []
    steps: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for sid, prompt in zip(ids, prompts):
        engine.add(sid, prompt, SamplingParams(), 0)
    prefill_left = {sid: len(p) for sid, p in zip(ids, prompts)}
    running: set[str] = set()
    finished = 0
    try:
        while finished < n:
            chunks, budget = [], prefill_chunk
            for sid in ids:
                if prefill_left[sid] and budget > 0:
                    take = min(prefill_left[sid], budget)
                    chunks.append((sid, take))
                    budget -= take
            t_s = time.perf_counter()
            result = engine.step(chunks, decode=bool(running))
            t_e = time.perf_counter()
            if not chunks:
                steps.append((t_e - t_s, result.decode_batch_size))
            now = t_e - t0
            for sid, tok, is_first in result.tokens:
                i = index[sid]
                if count[i] == 0:
                    first[i] = now
                last[i] = now
                count[i] += 1
                if i == 0 and len(tokens0) < 32:
                    tokens0.append(tok)
                if is_first:
                    running.add(sid)
            for sid, _ in chunks:
                prefill_left[sid] = result.prefill_remaining.get(sid, 0)
            done = [sid for sid in running if count[index[sid]] >= new_tokens]
            if done:
                engine.remove(done)
                running.difference_update(done)
                finished += len(done)
            advance(len(result.tokens))
    finally:
        engine.remove(ids)
    return {"first_s": first, "last_s": last, "count": count, "steps": steps,
            "wall_s": max(last), "tokens0": tokens0}


def bench_ours(targets: list[tuple[str, Path]], prompts: list[list[int]], args, progress: Progress) -> list[Run]:
    """Our engine on each (label, model folder)."""
    runs = []
    for variant, folder in targets:
        task = progress.add_task(f"switchyard {variant}: load", total=None)
        engine = Engine(folder, threads=args.threads, max_sequences=max(args.concurrency), provider="cpu",
                        spin=args.spin)
        engine.generate(prompts[0][:32], 8)  # warm-up: thread pool, allocator arenas
        progress.remove_task(task)
        for n in args.concurrency:
            task = progress.add_task(f"switchyard {variant} ×{n}", total=n * args.new_tokens * args.repeat)
            best = None
            for _ in range(args.repeat):
                raw = run_engine(engine, prompts[:n], args.new_tokens, args.prefill_chunk,
                                 lambda k: progress.advance(task, k))
                run = Run("switchyard", variant, "batcher", n, raw).summarize()
                best = run if best is None or run.decode_tok_s > best.decode_tok_s else best
            runs.append(best)
        del engine
    return runs


# ------------------------------------------------------------------------------------------
# reference engines (subprocess in the bench venv)
# ------------------------------------------------------------------------------------------


@dataclass
class RefOutcome:
    name: str
    runs: list[Run]
    error: str | None = None
    peak_rss_mib: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


def bench_reference(python: str, engine: str, target: Path, model_label: str, prompts_file: Path,
                    args, progress: Progress) -> RefOutcome:
    name = f"{engine}:{model_label}"
    cmd = [python, str(REPO / "bench" / "reference_engines.py"), "--engine", engine,
           "--gguf" if engine == "llama" else "--model-dir", str(target),
           "--prompts", str(prompts_file), "--concurrency", ",".join(map(str, args.concurrency)),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
           "--prefill-chunk", str(args.prefill_chunk), "--repeat", str(args.repeat)]
    if engine == "llama":
        cmd += ["--llama-modes", args.llama_modes, "--llama-flash-attn", args.llama_flash_attn]
    tasks: dict[str, int] = {}
    outcome = RefOutcome(name, [])

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "progress":
            label = ev["label"]
            if label not in tasks:
                tasks[label] = progress.add_task(label, total=ev["total"] or None)
            progress.update(tasks[label], completed=ev["done"], total=ev["total"])
        elif kind == "result":
            model = "Q4_1 GGUF" if engine == "llama" else model_label
            outcome.runs.append(Run(ev["engine"], model, ev["mode"], ev["streams"], ev).summarize())
            outcome.info = {k: ev[k] for k in ("engine_version", "load_s", "threads") if k in ev}
        elif kind == "error":
            outcome.error = ev["error"]
            outcome.info["traceback"] = ev.get("traceback", "")
        elif kind == "done":
            outcome.peak_rss_mib = ev.get("peak_rss_mib")
    end = run_events(cmd, REPO, on_event)
    if outcome.error is None:
        outcome.error = end.failure()
    return outcome


# ------------------------------------------------------------------------------------------
# worker process: cold start and memory
# ------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS / VmHWM / RssAnon / RssFile of a process, in MiB, from /proc/<pid>/status."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) / 1024
    return values


@dataclass
class WorkerStats:
    variant: str
    ready_s: float = 0.0         # spawn → port file (imports + model load + server up)
    first_token_s: float = 0.0   # spawn → first token of the first request
    warm: dict[str, float] = field(default_factory=dict)    # after a one-stream request
    loaded: dict[str, float] = field(default_factory=dict)  # after a 16-stream request
    idle: dict[str, float] = field(default_factory=dict)    # right after the port file
    error: str | None = None


def _drive(stub, prompts: list[list[int]], new_tokens: int, tag: str) -> float:
    """AddSequences + Steps until every sequence has new_tokens tokens; returns the time of the
    first token (perf_counter) of the first sequence."""
    from switchyard.v1 import generate_pb2, worker_pb2

    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    stub.AddSequences(worker_pb2.AddSequencesRequest(sequences=[
        worker_pb2.SequenceSpec(sequence_id=sid, prompt_token_ids=p, sampling=generate_pb2.SamplingParams(), seed=0)
        for sid, p in zip(ids, prompts)]))
    pending = [worker_pb2.PrefillChunk(sequence_id=sid, max_tokens=0) for sid in ids]
    counts = dict.fromkeys(ids, 0)
    t_first = 0.0
    decode = False
    while min(counts.values()) < new_tokens:
        resp = stub.Step(worker_pb2.StepRequest(prefill=pending, decode=decode))
        pending = []
        for tok in resp.tokens:
            counts[tok.sequence_id] += 1
            if not t_first:
                t_first = time.perf_counter()
        decode = True
    stub.RemoveSequences(worker_pb2.RemoveSequencesRequest(sequence_ids=ids))
    return t_first


def read_port(port_file: Path) -> int:
    """The worker's gRPC port: the file holds either the bare port or {"grpc": port, ...}."""
    text = port_file.read_text().strip()
    value = json.loads(text)
    return int(value["grpc"] if isinstance(value, dict) else value)


def bench_worker(folder: Path, variant: str, prompts: list[list[int]], args) -> WorkerStats:
    from switchyard.v1 import worker_pb2_grpc

    stats = WorkerStats(variant)
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        port_file = Path(tmp) / "port"
        log_path = Path(tmp) / "worker.log"
        cmd = [sys.executable, "-m", "services.worker", "--model-dir", str(folder), "--port", "0",
               "--port-file", str(port_file), "--threads", str(args.threads), "--provider", "cpu",
               "--max-sequences", str(max(16, max(args.concurrency)))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "libs"),
                                                             os.environ.get("PYTHONPATH", "")])}
        with open(log_path, "wb") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            deadline = t0 + 180
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}: {log_path.read_text()[-1000:]}")
                if time.perf_counter() > deadline:
                    raise TimeoutError("worker did not write its port file in 180 s")
                time.sleep(0.005)
            stats.ready_s = time.perf_counter() - t0
            stats.idle = proc_status(proc.pid)
            with grpc.insecure_channel(f"127.0.0.1:{read_port(port_file)}") as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                t_first = _drive(stub, [prompts[0]], 1, "cold")
                stats.first_token_s = t_first - t0
                _drive(stub, [prompts[0]], 64, "warm")
                stats.warm = proc_status(proc.pid)
                n = max(args.concurrency)
                _drive(stub, prompts[:n], args.new_tokens, "load")
                stats.loaded = proc_status(proc.pid)
        except Exception as exc:  # reported in the table, the rest of the benchmark goes on
            stats.error = f"{type(exc).__name__}: {exc}"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return stats


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

COLUMNS = ["Engine", "Model", "Mode", "N", "Decode tok/s", "× llama.cpp 1", "Median-step tok/s", "Per-stream tok/s",
           "TTFT mean ms", "TTFT max ms", "E2E tok/s", "Agree"]


def rows(runs: list[Run], baseline: float | None) -> list[list[str]]:
    out_rows = []
    for r in runs:
        ratio = f"{r.decode_tok_s / baseline:.2f}×" if baseline else "–"
        out_rows.append([r.engine, r.model, r.mode, str(r.streams), f"{r.decode_tok_s:.1f}", ratio,
                         f"{r.median_step_tok_s:.1f}", f"{r.per_stream_tok_s:.1f}", f"{r.ttft_mean_s * 1e3:.0f}",
                         f"{r.ttft_max_s * 1e3:.0f}", f"{r.e2e_tok_s:.1f}", r.agree])
    return out_rows


def mib(d: dict[str, float], key: str) -> str:
    return f"{d[key]:.0f}" if key in d else "–"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--reference-python", help="python of the bench venv (.venv-bench/bin/python); "
                                               "omitted: reference engines are skipped")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--spin", action="store_true", help="let our engine's ORT threads spin, as llama.cpp's "
                    "and genai's do (a worker with its own cores; the stack default is off)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per stream")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per step (the batcher's default)")
    ap.add_argument("--variants", default="fp32,int4")
    ap.add_argument("--llama-modes", default="highlevel,sequential,batched")
    ap.add_argument("--llama-flash-attn", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="use the model folders in place (default: hard-link snapshot, see snapshot_folder)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest decode is kept")
    ap.add_argument("--skip-worker", action="store_true", help="skip the worker cold start / memory part")
    ap.add_argument("--skip-genai", action="store_true")
    ap.add_argument("--plain", action="store_true", help="also run our engine on the plain-op graph of each "
                    "variant (the fused graph's baseline, same weights)")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    ap.add_argument("--json", type=Path, help="write every number (and raw timelines) here")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2")

    # ---- model folders, GGUF, prompts -----------------------------------------------------
    models_dir = args.models_dir
    if not all(is_complete(models_dir / MODEL_NAMES[v]) for v in variants):
        console.print(f"[yellow]building model folders in {models_dir}…")
        convert_gguf(models_dir, variants=variants)
    gguf = ensure_gguf()
    plain_dir = PLAIN_MODELS
    if args.plain or (args.reference_python and not args.skip_genai):
        console.print(f"plain-op graphs of {variants} in {plain_dir} (our --plain baseline, onnxruntime-genai)")
        convert_gguf(plain_dir, variants=variants, graph="plain")
    snap_dir = tempfile.TemporaryDirectory(prefix="bench-models-")
    if not args.no_snapshot:
        for v in variants:
            snapshot_folder(models_dir / MODEL_NAMES[v], Path(snap_dir.name))
        models_dir = Path(snap_dir.name)
    fingerprints = {v: fingerprint(models_dir / MODEL_NAMES[v]) for v in variants}
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(models_dir / MODEL_NAMES[variants[0]] / "tokenizer.json"))
    text_ids = tokenizer.encode(" ".join(PROMPT_TEXT.split())).ids
    need = args.prompt_tokens + PROMPT_STRIDE * (max(args.concurrency) - 1)
    while len(text_ids) < need:
        text_ids = text_ids + text_ids
    prompts = [text_ids[i * PROMPT_STRIDE: i * PROMPT_STRIDE + args.prompt_tokens]
               for i in range(max(args.concurrency))]
    assert all(len(p) == args.prompt_tokens for p in prompts)

    load_start = os.getloadavg()
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    console.print(f"[bold]model throughput[/] — {cpu}, {os.cpu_count()} cores, threads={args.threads}, "
                  f"prompt={args.prompt_tokens} tokens, new={args.new_tokens}/stream, "
                  f"N={args.concurrency}, load avg {load_start[0]:.2f}")
    console.print("models: " + ", ".join(f"{v} {fp}" for v, fp in fingerprints.items())
                  + ("" if args.no_snapshot else f" (snapshot of {args.models_dir})") + f"; gguf {gguf}")

    runs: list[Run] = []
    refs: list[RefOutcome] = []
    workers: list[WorkerStats] = []
    columns = [TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp, \
            Progress(*columns, console=console, transient=False) as progress:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps({"prompts": prompts}))

        targets = [(v, models_dir / MODEL_NAMES[v]) for v in variants]
        if args.plain:
            targets += [(f"{v} plain", plain_dir / MODEL_NAMES[v]) for v in variants]
        runs += bench_ours(targets, prompts, args, progress)

        if args.reference_python:
            if not args.skip_llama:
                refs.append(bench_reference(args.reference_python, "llama", gguf, "gguf", prompts_file, args, progress))
            if not args.skip_genai:
                for v in variants:
                    refs.append(bench_reference(args.reference_python, "genai", plain_dir / MODEL_NAMES[v],
                                                v, prompts_file, args, progress))
        else:
            console.print("[yellow]--reference-python not given: llama.cpp and onnxruntime-genai skipped")
        for ref in refs:
            runs += ref.runs

        if not args.skip_worker:
            for v in variants:
                task = progress.add_task(f"worker {v}: cold start + memory", total=None)
                workers.append(bench_worker(models_dir / MODEL_NAMES[v], v, prompts, args))
                progress.update(task, total=1, completed=1)
    load_end = os.getloadavg()
    snap_dir.cleanup()

    # ---- agreement and baseline -----------------------------------------------------------
    ours_1 = {r.model: r.tokens0 for r in runs if r.engine == "switchyard" and r.streams == 1}
    for r in runs:
        ref_tokens = ours_1.get("fp32" if r.engine == "llama.cpp" else r.model)
        r.agree = common_prefix(r.tokens0, ref_tokens) if ref_tokens else "–"
    base_run = next((r for r in runs if r.engine == "llama.cpp" and r.mode == "sequential" and r.streams == 1), None)
    baseline = base_run.decode_tok_s if base_run else None

    # ---- tables ---------------------------------------------------------------------------
    order = {"switchyard": 0, "llama.cpp": 1, "onnxruntime-genai": 2}
    runs.sort(key=lambda r: (order.get(r.engine, 9), r.model, r.mode, r.streams))
    table = Table(title=f"Decode throughput and TTFT — prompt {args.prompt_tokens} tokens, "
                        f"{args.new_tokens} new tokens/stream, {args.threads} threads")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("Engine", "Model", "Mode") else "right")
    for row in rows(runs, baseline):
        table.add_row(*row)
    out.print(table)

    wtable = Table(title="Worker process per replica (python -m services.worker)")
    top = max(args.concurrency)
    wcols = ["Model", "Ready s", "Cold start → 1st token s", "RSS idle MiB", "RSS after warm-up MiB",
             "(anon / file)", f"RSS after {top} streams MiB", "Peak RSS (VmHWM) MiB"]
    for c in wcols:
        wtable.add_column(c, justify="left" if c == "Model" else "right")
    wrows = []
    for w in workers:
        if w.error:
            wrows.append([w.variant, "–", "–", "–", "–", "–", "–", f"error: {w.error[-300:]}"])
        else:
            wrows.append([w.variant, f"{w.ready_s:.2f}", f"{w.first_token_s:.2f}", mib(w.idle, "VmRSS"),
                          mib(w.warm, "VmRSS"), f"{mib(w.warm, 'RssAnon')} / {mib(w.warm, 'RssFile')}",
                          mib(w.loaded, "VmRSS"), mib(w.loaded, "VmHWM")])
    for row in wrows:
        wtable.add_row(*row)
    if workers:
        out.print(wtable)

    # ---- targets, reference status ----------------------------------------------------------
    notes: list[str] = []
    if baseline:
        notes.append(f"baseline: llama.cpp single stream (sequential ×1, low-level loop) = {baseline:.1f} tok/s")
        int4_1 = next((r for r in runs if r.engine == "switchyard" and r.model == "int4" and r.streams == 1), None)
        if int4_1:
            ok = int4_1.decode_tok_s >= baseline
            notes.append(f"target int4 single stream ≥ llama.cpp: {int4_1.decode_tok_s:.1f} vs {baseline:.1f} tok/s "
                         f"({int4_1.decode_tok_s / baseline:.2f}×) → {'MET' if ok else 'NOT MET'}"
                         f"  [median-step: {int4_1.median_step_tok_s:.1f} vs {base_run.median_step_tok_s:.1f}]")
        for v in variants:
            agg = next((r for r in runs if r.engine == "switchyard" and r.model == v and r.streams == top), None)
            if agg:
                ok = agg.decode_tok_s >= 5 * baseline
                notes.append(f"target {v} aggregate at {top} streams ≥ 5× llama.cpp single: {agg.decode_tok_s:.1f} "
                             f"vs {5 * baseline:.1f} tok/s ({agg.decode_tok_s / baseline:.2f}×) → {'MET' if ok else 'NOT MET'}"
                             f"  [median-step: {agg.median_step_tok_s:.1f} vs 5×{base_run.median_step_tok_s:.1f}]")
    for ref in refs:
        version = ref.info.get("engine_version", "?")
        rss = f", peak RSS of the bench process {ref.peak_rss_mib:.0f} MiB" if ref.peak_rss_mib else ""
        status = f"ERROR: {ref.error}" if ref.error else f"ok ({len(ref.runs)} runs)"
        notes.append(f"{ref.name} (version {version}): {status}{rss}")
    if any(r.name.startswith("llama") for r in refs):
        notes.append("llama.cpp: 'sequential' = the N streams one after another (TTFT includes waiting for the "
                     "streams before); 'batched' = low-level llama_decode with n_seq_max=N (continuous batching, "
                     "prompt chunks ≤ --prefill-chunk per step); 'highlevel' = Llama.generate, N=1. AMX weight "
                     "repacking is off (it crashes on this VM; see reference_engines.model_params).")
    if any(r.name.startswith("genai") for r in refs):
        notes.append("genai: static batch via search option batch_size=N; all prompts prefilled in one call; "
                     "ORT thread spinning left at genai's default (ours turns it off).")
    notes.append("models: " + ", ".join(f"{v} {fp}" for v, fp in fingerprints.items()))
    notes.append(f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end "
                 f"({os.cpu_count()} cores; numbers on a shared machine are provisional)")
    for n in notes:
        out.print(f"• {n}")

    if args.markdown:
        print()
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "|".join("---" if c in ("Engine", "Model", "Mode") else "---:" for c in COLUMNS) + "|")
        for row in rows(runs, baseline):
            print("| " + " | ".join(row) + " |")
        if workers:
            print()
            print("| " + " | ".join(wcols) + " |")
            print("|---|" + "|".join("---:" for _ in wcols[1:]) + "|")
            for row in wrows:
                print("| " + " | ".join(row) + " |")
        print()
        for n in notes:
            print(f"- {n}")

    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "cpu": cpu, "load_avg": [load_start, load_end], "baseline_tok_s": baseline,
            "fingerprints": fingerprints,
            "runs": [{**r.as_dict(), "raw": r.raw} for r in runs],
            "reference": [{"name": r.name, "error": r.error, "peak_rss_mib": r.peak_rss_mib, "info": r.info} for r in refs],
            "workers": [w.__dict__ for w in workers],
        }, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
