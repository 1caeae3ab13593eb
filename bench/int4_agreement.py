"""Greedy agreement of the int4 model folder with the fp32 one on a fixed set of chat prompts.

Both folders come from the same GGUF (see switchyard.model.convert). Every prompt is rendered
with the folder's chat template (as the router does), decoded greedily for up to 32 new tokens
(stopping at the manifest's eos ids) by services.worker.engine.Engine, in ragged batches. Reported
per compared folder, against the reference (fp32) folder:

* exact match   — prompts whose whole greedy continuation is identical
* first token   — prompts whose first generated token is identical
* common prefix — mean number of leading generated tokens that agree
* decode tok/s  — one sequence alone (batch 1), 64 tokens after the prompt (with --speed)

    .venv/bin/python bench/int4_agreement.py [--models-dir models] [--threads 2]
        [--compare OTHER_FOLDER ...] [--speed] [--show-diffs]
        [--llama [--reference-python .venv-bench/bin/python]]

With --llama, llama.cpp (llama-cpp-python in the bench venv, `make bench-deps`) decodes the same
prompts from the GGUF the folders were converted from (switchyard.model.gguf_source.ensure_gguf),
in a subprocess (bench/reference_engines.py --greedy): the same token ids (rendered and encoded
here, passed as ids), greedy (argmax: temperature 0 / top_k 1, no repetition penalty), the same
--max-new and eos ids, --threads threads, one prompt at a time. It is one more row against the
reference, and a second table compares every folder with llama.cpp (a folder with
int4_accuracy_level 4 quantizes activations to int8, as llama.cpp's Q4_1 × Q8_1 dot products do).

Folders missing from --models-dir are converted first (convert_gguf). A markdown snippet of the
results ends the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # services.* when run as a script

from services.worker.engine import Engine  # noqa: E402
from services.worker.sampling import SamplingParams  # noqa: E402
from switchyard.model.catalog import ModelCatalog  # noqa: E402
from switchyard.model.config import ModelManifest  # noqa: E402
from switchyard.model.convert import FP32_MODEL_NAME, INT4_MODEL_NAME, convert_gguf  # noqa: E402
from switchyard.model.gguf_source import ensure_gguf  # noqa: E402

from reference_process import run_events  # noqa: E402  (bench/, beside this script)

LLAMA = "llama.cpp"  # the label of llama.cpp's row

console = Console(width=None if sys.stdout.isatty() else 150)  # piped: don't squeeze the table
err = Console(stderr=True)

PROMPTS: list[str] = [
    # facts
    "What is the capital of France?",
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "What is the chemical symbol for gold?",
    "How many continents are there on Earth?",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water at sea level in Celsius?",
    "Which ocean is the largest?",
    "What language is spoken in Brazil?",
    "What is photosynthesis?",
    "Who was the first person to walk on the Moon?",
    "What is the speed of light?",
    "Name three primary colors.",
    # math
    "What is 7 times 8?",
    "What is 15 plus 27?",
    "What is the square root of 81?",
    "If I have 3 apples and eat one, how many apples do I have left?",
    "Solve for x: 2x + 4 = 10.",
    "What is 100 divided by 4?",
    "Is 17 a prime number?",
    "What is 12 squared?",
    "Convert 5 kilometers to meters.",
    "What is the sum of the angles in a triangle?",
    # code
    "Write a Python function that returns the sum of a list of numbers.",
    "How do I reverse a string in Python?",
    "What does the HTTP status code 404 mean?",
    "Write a SQL query that selects all rows from a table called users.",
    "What is the difference between a list and a tuple in Python?",
    "Write a JavaScript function that adds two numbers.",
    "Explain what a for loop is.",
    "How do I create a new git branch?",
    "What is recursion in programming?",
    "Write a bash command that counts the lines in a file named data.txt.",
    # instructions / writing
    "Give me three tips for better sleep.",
    "Write a haiku about the ocean.",
    "Summarize the plot of Cinderella in two sentences.",
    "Translate 'good morning' into Spanish.",
    "Write a short thank-you note to a teacher.",
    "List five fruits that are red.",
    "Suggest a name for a pet goldfish.",
    "Write a one-sentence story about a dragon.",
    "Explain how to make a cup of tea.",
    "Give me a synonym for 'happy'.",
    "Describe a sunset in one sentence.",
    "Write a tweet announcing a new coffee shop.",
    # short
    "Hi!",
    "Thanks!",
    "Tell me a joke.",
    "Who are you?",
    "Hello, how are you today?",
    # long
    "I am planning a trip to Italy next summer with my family of four, including two kids aged "
    "eight and eleven. We like history, good food and the beach. Which cities should we visit "
    "and how many days should we spend in each?",
    "My tomato plants have yellow leaves at the bottom and some brown spots on the fruit. I water "
    "them every evening and they get about six hours of sun. What could be wrong and how can I "
    "fix it?",
    "I have a job interview tomorrow for a junior software developer position at a small startup. "
    "What questions should I expect, and how should I prepare tonight?",
    "Explain to a ten-year-old why the sky is blue, using a simple comparison they would "
    "understand, and keep it short.",
    "Compare electric cars and gasoline cars in terms of cost, environmental impact and "
    "convenience for someone who drives about fifty kilometers a day.",
    "Write a short email to my landlord explaining that the heating in my apartment has been "
    "broken for three days and asking when it will be repaired.",
]


@dataclass
class Run:
    outputs: list[list[int]]
    seconds: float


def greedy_all(engine: Engine, prompts: list[list[int]], max_new: int, stop_ids: tuple[int, ...],
               batch: int, on_done: Callable[[], None]) -> list[list[int]]:
    """Greedy continuations of every prompt, ``batch`` sequences at a time in one ragged batch."""
    params = SamplingParams()
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(prompts), batch):
        sids = {f"p{i}": i for i in range(start, min(start + batch, len(prompts)))}
        for sid, i in sids.items():
            engine.add(sid, prompts[i], params, seed=0)
        result = engine.step([(sid, 0) for sid in sids], decode=False)
        live = set(sids)
        while True:
            finished = []
            for sid, token, _ in result.tokens:
                out = outputs[sids[sid]]
                out.append(token)
                if token in stop_ids or len(out) >= max_new:
                    finished.append(sid)
            if finished:
                engine.remove(finished)
                live -= set(finished)
                for _ in finished:
                    on_done()
            if not live:
                break
            result = engine.step([], decode=True)
    return outputs


def llama_greedy(python: str, gguf: Path, prompts: list[list[int]], max_new: int,
                 stop_ids: tuple[int, ...], threads: int, flash_attn: str, progress: Progress) -> tuple[Run, dict]:
    """Greedy continuations by llama.cpp (bench/reference_engines.py --greedy in the bench venv)."""
    with tempfile.TemporaryDirectory(prefix="agree-") as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps({"prompts": prompts}))
        cmd = [python, str(REPO / "bench" / "reference_engines.py"), "--engine", "llama",
               "--gguf", str(gguf), "--prompts", str(prompts_file), "--greedy",
               "--new-tokens", str(max_new), "--stop-ids", ",".join(map(str, stop_ids)),
               "--threads", str(threads), "--llama-flash-attn", flash_attn]
        task = progress.add_task(f"{LLAMA} greedy ({gguf.name})", total=len(prompts))
        result: dict | None = None
        error: str | None = None

        def on_event(ev: dict) -> None:
            nonlocal result, error
            kind = ev.get("event")
            if kind == "progress":
                progress.update(task, completed=ev["done"])
            elif kind == "result":
                result = ev
            elif kind == "error":
                error = f"{ev['error']}\n{ev.get('traceback', '')}"
        t0 = time.perf_counter()
        end = run_events(cmd, REPO, on_event)
        seconds = time.perf_counter() - t0
    if result is None or end.returncode != 0:
        raise SystemExit(f"llama.cpp failed: {error or end.failure() or 'no result'}")
    outputs = [[int(t) for t in o] for o in result["outputs"]]
    result["process_s"] = seconds  # with the subprocess's start and the GGUF's load
    # the decode loop alone, like our engine's greedy time (which excludes loading the folder)
    return Run(outputs, float(result["wall_s"])), result


def decode_rate(engine: Engine, prompt: list[int], n: int = 64) -> float:
    """Tokens/s of one sequence decoding alone (prefill excluded)."""
    sid = "speed"
    engine.add(sid, prompt, SamplingParams(), seed=0)
    try:
        engine.step([(sid, 0)], decode=False)
        for _ in range(4):  # warm-up
            engine.step([], decode=True)
        t0 = time.perf_counter()
        for _ in range(n):
            engine.step([], decode=True)
        return n / (time.perf_counter() - t0)
    finally:
        engine.remove([sid])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    ap.add_argument("--reference", default=FP32_MODEL_NAME, help="folder name (in --models-dir) or path")
    ap.add_argument("--compare", nargs="+", default=[INT4_MODEL_NAME],
                    help="folder names (in --models-dir) or paths compared with the reference")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="sequences per ragged decode batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    ap.add_argument("--speed", action="store_true", help="also measure batch-1 decode tokens/s")
    ap.add_argument("--show-diffs", action="store_true", help="print each differing continuation")
    ap.add_argument("--llama", action="store_true",
                    help="also run llama.cpp on the GGUF (bench venv), as one more compared row")
    ap.add_argument("--reference-python", default=str(REPO / ".venv-bench" / "bin" / "python"),
                    help="python of the bench venv, with llama-cpp-python (for --llama)")
    ap.add_argument("--llama-flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's flash attention (its default, auto, enables it on CPU)")
    args = ap.parse_args()

    def folder(name: str) -> Path:
        return Path(name) if os.sep in name else args.models_dir / name

    ref_dir = folder(args.reference)
    dirs = [ref_dir] + [folder(n) for n in args.compare]
    defaults = {FP32_MODEL_NAME: "fp32", INT4_MODEL_NAME: "int4"}
    wanted = [defaults[d.name] for d in dirs if d.parent == args.models_dir and d.name in defaults]
    if wanted:
        t0 = time.perf_counter()
        convert_gguf(args.models_dir, variants=wanted)
        err.print(f"model folders ready ({time.perf_counter() - t0:.1f} s)")

    prompts = PROMPTS[: args.limit] if args.limit else PROMPTS
    gguf: Path | None = None
    if args.llama:
        if not Path(args.reference_python).is_file():
            raise SystemExit(f"--llama: no python at {args.reference_python} (make bench-deps)")
        gguf = ensure_gguf()
        source = ModelManifest.load(ref_dir).source
        if source and Path(source).resolve() != gguf.resolve():
            err.print(f"[yellow]{ref_dir.name} was converted from {source}, llama.cpp runs {gguf}")

    runs: dict[str, Run] = {}
    rates: dict[str, float] = {}
    levels: dict[str, str] = {}
    prompt_ids: dict[str, list[list[int]]] = {}
    eos: dict[str, tuple[int, ...]] = {}
    llama_info: dict = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as progress:
        for d in dirs:
            catalog = ModelCatalog(d.parent)
            entry = catalog.get(d.name)
            if entry is None:
                raise SystemExit(f"no model folder at {d}")
            ids = [entry.encode(entry.render_chat([("user", p)])) for p in prompts]
            prompt_ids[d.name], eos[d.name] = ids, tuple(entry.manifest.eos_token_ids)
            levels[d.name] = str(entry.manifest.extra.get("int4_accuracy_level", "-"))
            engine = Engine(d, threads=args.threads, provider="cpu", max_sequences=args.batch + 1)
            task = progress.add_task(f"{d.name} greedy", total=len(prompts))
            t0 = time.perf_counter()
            outs = greedy_all(engine, ids, args.max_new, entry.manifest.eos_token_ids, args.batch,
                              lambda: progress.advance(task))
            runs[d.name] = Run(outs, time.perf_counter() - t0)
            if args.speed:
                rates[d.name] = decode_rate(engine, ids[0])
            del engine
        if gguf is not None:
            ids, stops = prompt_ids[ref_dir.name], eos[ref_dir.name]
            for name in prompt_ids:
                if prompt_ids[name] != ids or eos[name] != stops:
                    raise SystemExit(f"{name} renders/encodes the prompts differently from {ref_dir.name}")
            runs[LLAMA], llama_info = llama_greedy(args.reference_python, gguf, ids, args.max_new, stops,
                                                   args.threads, args.llama_flash_attn, progress)
            levels[LLAMA] = "Q8_1 act."

    ref = runs[ref_dir.name].outputs
    catalog = ModelCatalog(ref_dir.parent)
    entry = catalog.get(ref_dir.name)
    assert entry is not None
    names = list(runs)  # reference, --compare folders, llama.cpp
    table = Table(title=f"greedy agreement with {ref_dir.name} ({len(prompts)} chat prompts, "
                        f"≤{args.max_new} new tokens)")
    for col in ("model", "accuracy_level", "exact match", "first token", "mean common prefix",
                "greedy time") + (("decode tok/s (batch 1)",) if args.speed else ()):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = []
    for name in names:
        outs = runs[name].outputs
        row = [name, levels[name], *agreement(outs, ref), f"{runs[name].seconds:.1f} s"]
        if args.speed:
            row.append(f"{rates[name]:.1f}" if name in rates else "–")
        rows.append(row)
        table.add_row(*row)
        if args.show_diffs and name != ref_dir.name:
            for p, a, b in zip(prompts, outs, ref):
                if a != b:
                    k = common_prefix(a, b)
                    console.print(f"[bold]{p[:60]}[/] diverges at token {k}:\n"
                                  f"  ref: {entry.decode(b)!r}\n  {name}: {entry.decode(a)!r}")
    console.print(table)
    llama_rows: list[list[str]] = []
    llama_table: Table | None = None
    if LLAMA in runs:
        # llama.cpp as the reference: which of our folders decodes most like it?
        lref = runs[LLAMA].outputs
        llama_table = Table(title=f"greedy agreement with {LLAMA} (same prompts; int4_accuracy_level 4 = "
                                  f"int8 activations, like llama.cpp's Q4_1 × Q8_1)")
        for col in ("model", "accuracy_level", "exact match", "first token", "mean common prefix"):
            llama_table.add_column(col, justify="left" if col == "model" else "right")
        for name in names[:-1]:
            row = [f"{name} vs {LLAMA}", levels[name], *agreement(runs[name].outputs, lref)]
            llama_rows.append(row)
            llama_table.add_row(*row)
        console.print(llama_table)
        console.print(f"{LLAMA}: llama-cpp-python {llama_info.get('engine_version', '?')}, "
                      f"{Path(llama_info.get('gguf', '?')).name}, argmax (temperature 0 / top_k 1, no "
                      f"repetition penalty), threads={args.threads}, flash_attn={args.llama_flash_attn}, "
                      f"one prompt at a time; the same token ids and eos ids {list(eos[ref_dir.name])}; "
                      f"greedy time excludes the subprocess start and GGUF load "
                      f"({llama_info['process_s'] - runs[LLAMA].seconds:.1f} s)")
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, engine threads={args.threads}, "
                  f"batch={args.batch}")

    print()
    print(f"Greedy agreement with `{ref_dir.name}` over {len(prompts)} chat prompts "
          f"(≤{args.max_new} new tokens, Engine threads={args.threads}"
          + (f"; {LLAMA}: llama-cpp-python {llama_info.get('engine_version', '?')}, argmax, "
             f"{args.threads} threads, flash_attn={args.llama_flash_attn}" if LLAMA in runs else "") + "):")
    print()
    print(markdown(table, rows))
    if llama_table is not None:
        print()
        print(f"Agreement with {LLAMA} (mean common prefix: of {LLAMA}'s mean length):")
        print()
        print(markdown(llama_table, llama_rows))


def agreement(outs: list[list[int]], ref: list[list[int]]) -> list[str]:
    """exact match, first token, mean common prefix / mean reference length."""
    n = len(ref)
    exact = sum(a == b for a, b in zip(outs, ref)) / n
    first = sum(bool(a) and bool(b) and a[0] == b[0] for a, b in zip(outs, ref)) / n
    prefix = sum(common_prefix(a, b) for a, b in zip(outs, ref)) / n
    mean_len = sum(len(b) for b in ref) / n
    return [f"{exact:.0%}", f"{first:.0%}", f"{prefix:.1f} / {mean_len:.1f}"]


def markdown(table: Table, rows: list[list[str]]) -> str:
    header = "| " + " | ".join(str(c.header) for c in table.columns) + " |"
    lines = [header, "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
