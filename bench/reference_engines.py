"""Reference engines for bench/model_throughput.py: llama.cpp (llama-cpp-python) and
onnxruntime-genai, run inside the bench virtualenv (`make bench-deps` → .venv-bench).

Needs only numpy and the engine under test (no switchyard imports), because it runs with the
bench venv's Python:

    .venv-bench/bin/python bench/reference_engines.py --engine llama --gguf X.gguf \\
        --prompts prompts.json --concurrency 1,4,16 --new-tokens 128 --threads 2
    .venv-bench/bin/python bench/reference_engines.py --engine genai --model-dir models/... ...

`prompts.json` is {"prompts": [[token ids], ...]} (one prompt per stream, built by the caller
with the model's tokenizer, so every engine sees identical token ids). Decoding is greedy and
ignores end-of-sequence (every stream produces exactly --new-tokens tokens).

Output: JSON lines on stdout. {"event": "progress", ...} while running, one
{"event": "result", ...} per measured run, {"event": "done", "peak_rss_mib": ...} at the end;
{"event": "error", ...} (exit 1) when the engine cannot load or run. A result carries the raw
timeline (per-stream first/last token times, decode-only step durations); the caller turns it
into tokens/s and TTFT with one shared definition for every engine.

Modes:
  llama.cpp  "sequential"   N streams one after another in one context (llama-cpp-python's
                             high-level Llama object serves one sequence at a time); stream i's
                             TTFT includes the streams before it.
             "batched"      the low-level llama_decode API with n_seq_max=N: one llama_batch per
                             step holds one token of every running stream plus prompt chunks
                             (up to --prefill-chunk tokens), like llama-server's continuous batching.
             "highlevel"    N=1 only: Llama.generate() (the usual Python entry point), to show
                             the wrapper's own per-token overhead next to the low-level loop.
  genai      "batch"        og.Generator with search option batch_size=N (static batch: the N
                             prompts are appended together, then every generate_next_token
                             decodes all N).

Greedy agreement (bench/int4_agreement.py --llama):

    .venv-bench/bin/python bench/reference_engines.py --engine llama --gguf X.gguf \\
        --prompts prompts.json --greedy --new-tokens 32 --stop-ids 2,0 --threads 2

decodes every prompt alone, one after another (the low-level loop of "sequential": the argmax of
the logits, i.e. temperature 0 / top_k 1 with no repetition penalty), up to --new-tokens tokens,
stopping after the first token in --stop-ids (kept in the output, as our engine keeps it), and
emits one {"event": "result", "mode": "greedy", "outputs": [[ids], ...], ...}; no throughput
runs, no warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def progress(label: str, done: int, total: int) -> None:
    emit({"event": "progress", "label": label, "done": done, "total": total})


class Timeline:
    """Raw timings of one run (seconds since the run's start)."""

    def __init__(self, n: int) -> None:
        self.t0 = time.perf_counter()
        self.first = [0.0] * n
        self.last = [0.0] * n
        self.count = [0] * n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.steps: list[tuple[float, int]] = []  # decode-only steps: (seconds, tokens produced)
        self.prefill_s = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def token(self, i: int, tok: int, t: float) -> None:
        if self.count[i] == 0:
            self.first[i] = t
        self.last[i] = t
        self.count[i] += 1
        if len(self.tokens[i]) < 32:
            self.tokens[i].append(int(tok))

    def result(self, **extra) -> dict:
        return {"event": "result", "first_s": self.first, "last_s": self.last, "count": self.count,
                "steps": self.steps, "wall_s": max(self.last), "tokens0": self.tokens[0], **extra}


# ------------------------------------------------------------------------------------------
# llama.cpp
# ------------------------------------------------------------------------------------------


def model_params(p):
    """llama.cpp model params with the "extra buffer types" (weight repacking) turned off.

    On a CPU that reports AMX (Sapphire Rapids and later) ggml repacks Q4_1 weights for its AMX
    kernels. Where the kernel/hypervisor has not enabled the AMX tile state (this project's
    Firecracker VMs), the first `ldtilecfg` in ggml_backend_amx_mul_mat raises a general
    protection fault and the process dies with SIGSEGV in llama_decode. Without the extra
    buffer types llama.cpp uses its regular AVX-512/AVX2 kernels. Set
    SWITCHYARD_LLAMA_REPACK=1 to keep llama.cpp's default (on a machine where AMX works).
    """
    p.n_gpu_layers = 0
    if os.environ.get("SWITCHYARD_LLAMA_REPACK", "0") != "1":
        p.use_extra_bufts = False
    return p


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int, flash_attn: str = "auto") -> None:
        import llama_cpp as lc

        self.lc = lc
        self.flash_attn = flash_attn
        self.threads = threads
        self.gguf = gguf
        lc.llama_backend_init()
        # Silence llama.cpp's logging (it goes to stderr otherwise); keep the callback alive.
        self._log_cb = lc.llama_log_callback(lambda level, text, user: None)
        lc.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        mparams = model_params(lc.llama_model_default_params())
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.version = getattr(lc, "__version__", "?")

    def context(self, n_seq: int, n_ctx: int, n_batch: int):
        lc = self.lc
        p = lc.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = min(512, n_batch)
        p.n_seq_max = n_seq
        p.n_threads = self.threads
        p.n_threads_batch = self.threads
        p.no_perf = True
        p.flash_attn_type = {"auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                             "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED}[self.flash_attn]
        # Separate per-sequence KV buffers: llama.cpp's advice when sequences share no prefix.
        p.kv_unified = False
        ctx = lc.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError(f"llama_init_from_model failed (n_seq_max={n_seq}, n_ctx={n_ctx})")
        return ctx

    def _argmax(self, ctx, i: int) -> int:
        ptr = self.lc.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _decode(self, ctx, batch) -> None:
        rc = self.lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    @staticmethod
    def _fill(batch, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, pos, seq_id, want_logits)."""
        batch.n_tokens = len(entries)
        for j, (tok, pos, sid, want) in enumerate(entries):
            batch.token[j] = tok
            batch.pos[j] = pos
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = sid
            batch.logits[j] = 1 if want else 0

    @contextmanager
    def _one_at_a_time(self, prompts: list[list[int]], new_tokens: int) -> Iterator[tuple[Any, Any]]:
        """A one-sequence context for the longest prompt plus `new_tokens`, and its batch."""
        lc = self.lc
        plen = max(len(p) for p in prompts)
        ctx = self.context(1, plen + new_tokens + 16, max(512, plen))
        batch = lc.llama_batch_init(max(512, plen), 0, 1)
        try:
            yield ctx, batch
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)

    def _prefill_alone(self, ctx: Any, batch: Any, prompt: list[int]) -> int:
        """Clear the context's memory, prefill `prompt`, return its argmax next token."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)
        self._fill(batch, [(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        self._decode(ctx, batch)
        return self._argmax(ctx, len(prompt) - 1)

    def sequential(self, prompts: list[list[int]], new_tokens: int, label: str) -> dict:
        """N streams one after another (the high-level API's model: one sequence at a time),
        through the same low-level decode loop as `batched` so that only scheduling differs."""
        n = len(prompts)
        with self._one_at_a_time(prompts, new_tokens) as (ctx, batch):
            tl = Timeline(n)
            for i, prompt in enumerate(prompts):
                t_s = tl.now()
                tok = self._prefill_alone(ctx, batch, prompt)
                tl.prefill_s += tl.now() - t_s
                tl.token(i, tok, tl.now())
                pos = len(prompt)
                for _ in range(new_tokens - 1):
                    t_s = tl.now()
                    self._fill(batch, [(tok, pos, 0, True)])
                    self._decode(ctx, batch)
                    tok = self._argmax(ctx, 0)
                    t_e = tl.now()
                    tl.steps.append((t_e - t_s, 1))
                    tl.token(i, tok, t_e)
                    pos += 1
                progress(label, i + 1, n)
            return tl.result(engine="llama.cpp", mode="sequential", streams=n)

    def batched(self, prompts: list[list[int]], new_tokens: int, prefill_chunk: int, label: str) -> dict:
        """Continuous batching with llama_decode: each step decodes one token of every running
        stream plus prompt chunks up to `prefill_chunk` tokens, in one llama_batch."""
        lc = self.lc
        n = len(prompts)
        plen = max(len(p) for p in prompts)
        per_seq = plen + new_tokens + 16
        cap = prefill_chunk + n
        ctx = self.context(n, per_seq * n, cap)
        batch = lc.llama_batch_init(cap, 0, 1)
        try:
            tl = Timeline(n)
            fed = [0] * n            # prompt tokens fed
            last_tok = [0] * n
            pos = [0] * n
            running: list[int] = []
            done = 0
            while done < n:
                t_s = tl.now()
                entries: list[tuple[int, int, int, bool]] = []
                out_rows: list[tuple[int, int]] = []  # (batch row, stream)
                for i in running:
                    out_rows.append((len(entries), i))
                    entries.append((last_tok[i], pos[i], i, True))
                budget = prefill_chunk
                joining: list[int] = []
                for i in range(n):
                    if budget <= 0:
                        break
                    left = len(prompts[i]) - fed[i]
                    if left <= 0:
                        continue
                    take = min(left, budget)
                    for p in range(fed[i], fed[i] + take):
                        last = p == len(prompts[i]) - 1
                        if last:
                            out_rows.append((len(entries), i))
                            joining.append(i)
                        entries.append((prompts[i][p], p, i, last))
                    fed[i] += take
                    budget -= take
                self._fill(batch, entries)
                self._decode(ctx, batch)
                picked = [(i, self._argmax(ctx, row)) for row, i in out_rows]
                t_e = tl.now()
                if not joining and budget == prefill_chunk:
                    tl.steps.append((t_e - t_s, len(running)))
                for i, tok in picked:
                    tl.token(i, tok, t_e)
                    last_tok[i] = tok
                    pos[i] = len(prompts[i]) + tl.count[i] - 1
                finished = [i for i in running if tl.count[i] >= new_tokens]
                running = [i for i in running if tl.count[i] < new_tokens] + joining
                for i in finished:
                    lc.llama_memory_seq_rm(lc.llama_get_memory(ctx), i, -1, -1)
                done += len(finished)
                progress(label, done, n)
            return tl.result(engine="llama.cpp", mode="batched", streams=n)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)

    def greedy(self, prompts: list[list[int]], max_new: int, stop_ids: set[int], label: str) -> dict:
        """Greedy continuation of every prompt, alone in a fresh context state, up to `max_new`
        tokens or through the first stop id; the argmax of the logits (no sampler chain)."""
        n = len(prompts)
        with self._one_at_a_time(prompts, max_new) as (ctx, batch):
            outputs: list[list[int]] = []
            t0 = time.perf_counter()
            for i, prompt in enumerate(prompts):
                tok = self._prefill_alone(ctx, batch, prompt)
                out = [tok]
                pos = len(prompt)
                while tok not in stop_ids and len(out) < max_new:
                    self._fill(batch, [(tok, pos, 0, True)])
                    self._decode(ctx, batch)
                    tok = self._argmax(ctx, 0)
                    out.append(tok)
                    pos += 1
                outputs.append(out)
                progress(label, i + 1, n)
            return {"event": "result", "engine": "llama.cpp", "mode": "greedy", "streams": n,
                    "outputs": outputs, "wall_s": time.perf_counter() - t0}

    def highlevel(self, prompt: list[int], new_tokens: int, label: str) -> dict:
        """One stream through llama_cpp.Llama.generate (greedy: top_k=1, temp=0)."""
        import llama_cpp.llama as hl
        from llama_cpp import Llama

        # Llama() builds its model params from llama_model_default_params(); route it through
        # model_params() so the high-level path runs the same kernels as the low-level one.
        original = hl.llama_cpp.llama_model_default_params
        hl.llama_cpp.llama_model_default_params = lambda: model_params(original())
        try:
            # flash_attn: Llama's own default (False) unless --llama-flash-attn on
            llm = Llama(str(self.gguf), n_ctx=len(prompt) + new_tokens + 16, n_batch=512,
                        n_threads=self.threads, n_threads_batch=self.threads, verbose=False,
                        flash_attn=self.flash_attn == "on")
        finally:
            hl.llama_cpp.llama_model_default_params = original
        try:
            tl = Timeline(1)
            t_prev = None
            for k, tok in enumerate(llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                                 repeat_penalty=1.0, reset=True)):
                t = tl.now()
                if t_prev is not None:
                    tl.steps.append((t - t_prev, 1))
                t_prev = t
                tl.token(0, tok, t)
                if k + 1 >= new_tokens:
                    break
            progress(label, 1, 1)
            return tl.result(engine="llama.cpp", mode="highlevel", streams=1)
        finally:
            llm.close() if hasattr(llm, "close") else None

    def close(self) -> None:
        self.lc.llama_model_free(self.model)


def run_llama(args, prompts: list[list[int]]) -> None:
    eng = LlamaCpp(Path(args.gguf), args.threads, args.llama_flash_attn)
    info = {"engine_version": eng.version, "gguf": str(args.gguf), "threads": args.threads,
            "flash_attn": args.llama_flash_attn}
    if args.greedy:
        label = f"llama.cpp greedy ({Path(args.gguf).name})"
        progress(label, 0, len(prompts))
        emit({**eng.greedy(prompts, args.new_tokens, set(args.stop_ids), label), **info})
        eng.close()
        return
    # warm-up (not measured): weights paged in, thread pools started
    eng.sequential([prompts[0][:32]], 8, "llama.cpp warm-up")
    modes = args.llama_modes.split(",")
    for n in args.concurrency:
        for mode in modes:
            if mode == "highlevel" and n != 1:
                continue
            label = f"llama.cpp {mode} ×{n}"
            progress(label, 0, n)
            best = None
            for _ in range(args.repeat):
                if mode == "sequential":
                    r = eng.sequential(prompts[:n], args.new_tokens, label)
                elif mode == "batched":
                    r = eng.batched(prompts[:n], args.new_tokens, args.prefill_chunk, label)
                elif mode == "highlevel":
                    r = eng.highlevel(prompts[0], args.new_tokens, label)
                else:
                    raise ValueError(f"unknown llama mode {mode!r}")
                best = r if best is None or _rate(r) > _rate(best) else best
            emit({**best, **info})
    eng.close()


# ------------------------------------------------------------------------------------------
# onnxruntime-genai
# ------------------------------------------------------------------------------------------


def run_genai(args, prompts: list[list[int]]) -> None:
    import onnxruntime_genai as og

    folder = Path(args.model_dir)
    config = og.Config(str(folder))
    # Same intra-op thread count as our engine. (genai's session_options have no way to turn
    # ORT's thread spinning off, which our engine does; genai runs with ORT's default.)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    config.clear_providers()
    t_load = time.perf_counter()
    model = og.Model(config)
    load_s = time.perf_counter() - t_load
    info = {"engine_version": getattr(og, "__version__", "?"), "model_dir": str(folder),
            "threads": args.threads, "load_s": load_s}

    def run(batch_prompts: list[list[int]], new_tokens: int, label: str) -> dict:
        n = len(batch_prompts)
        plen = len(batch_prompts[0])
        if any(len(p) != plen for p in batch_prompts):
            raise ValueError("genai static batch: prompts must have equal length here")
        params = og.GeneratorParams(model)
        total = plen + new_tokens
        # min_length = max_length: EOS is never picked, every stream yields new_tokens tokens
        params.set_search_options(max_length=total, min_length=total, batch_size=n,
                                  do_sample=False)
        tl = Timeline(n)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(batch_prompts, dtype=np.int32))
        gen.generate_next_token()  # samples from the prompt logits computed by append_tokens
        toks = gen.get_next_tokens()
        t = tl.now()
        tl.prefill_s = t
        for i in range(n):
            tl.token(i, int(toks[i]), t)
        for k in range(new_tokens - 1):
            t_s = tl.now()
            gen.generate_next_token()  # runs the model on the previous tokens, then samples
            toks = gen.get_next_tokens()
            t_e = tl.now()
            tl.steps.append((t_e - t_s, n))
            for i in range(n):
                tl.token(i, int(toks[i]), t_e)
            if (k + 2) % 16 == 0:
                progress(label, k + 2, new_tokens)
        progress(label, new_tokens, new_tokens)
        del gen
        return tl.result(engine="onnxruntime-genai", mode="batch", streams=n)

    run([prompts[0][:32]], 8, "genai warm-up")
    for n in args.concurrency:
        label = f"genai {folder.name} ×{n}"
        progress(label, 0, args.new_tokens)
        best = None
        for _ in range(args.repeat):
            r = run(prompts[:n], args.new_tokens, label)
            best = r if best is None or _rate(r) > _rate(best) else best
        emit({**best, **info})


def _rate(r: dict) -> float:
    secs = sum(s for s, _ in r["steps"])
    return sum(k for _, k in r["steps"]) / secs if secs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("llama", "genai"), required=True)
    ap.add_argument("--gguf", help="GGUF file (llama)")
    ap.add_argument("--model-dir", help="model folder (genai)")
    ap.add_argument("--prompts", required=True, help="JSON file {'prompts': [[ids], ...]}")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is kept")
    ap.add_argument("--llama-modes", default="highlevel,sequential,batched")
    ap.add_argument("--llama-flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="flash attention of the low-level llama.cpp contexts (llama.cpp's default: auto, "
                         "which enables it on CPU); the high-level Llama keeps its own default (off)")
    ap.add_argument("--greedy", action="store_true",
                    help="llama only: greedy continuation of every prompt up to --new-tokens, stopping at "
                         "--stop-ids, emitted as one result with every output (no throughput runs)")
    ap.add_argument("--stop-ids", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="with --greedy: end-of-sequence token ids, comma-separated")
    args = ap.parse_args()
    prompts = json.loads(Path(args.prompts).read_text())["prompts"]
    if args.greedy and args.engine != "llama":
        raise SystemExit("--greedy: llama only")
    if not args.greedy and max(args.concurrency) > len(prompts):
        raise SystemExit(f"{len(prompts)} prompts for concurrency up to {max(args.concurrency)}")
    try:
        if args.engine == "llama":
            run_llama(args, prompts)
        else:
            run_genai(args, prompts)
    except Exception as exc:  # reported to the caller as data, with the exact message
        emit({"event": "error", "engine": args.engine, "error": f"{type(exc).__name__}: {exc}",
              "traceback": traceback.format_exc()})
        sys.exit(1)
    # VmHWM, not ru_maxrss: the latter survives fork+exec and would report the parent's peak.
    hwm = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines()
               if l.startswith("VmHWM:"))
    emit({"event": "done", "peak_rss_mib": hwm / 1024, "pid": os.getpid()})


if __name__ == "__main__":
    main()
