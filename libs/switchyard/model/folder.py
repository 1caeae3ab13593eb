"""Write a complete model folder (see the layout in :mod:`switchyard.model.config`).

``switchyard.json`` is written last: a folder that has it is complete, which is what callers
test to skip a rebuild.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from switchyard.model.config import FP16_MODEL_FILE, MANIFEST_FILE, MODEL_FILE, ModelManifest
from switchyard.model.onnx_builder import Progress, build_llama_onnx
from switchyard.model.quantize import BlockQuantized

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENAI_CONFIG_FILE = "genai_config.json"


def _token(tokenizer: tokenizers.Tokenizer, token_id: int | None) -> str | None:
    return None if token_id is None else tokenizer.id_to_token(token_id)


def genai_config(manifest: ModelManifest) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for a graph built by build_llama_onnx."""
    c = manifest.config
    eos = list(manifest.eos_token_ids)
    pad = eos[0] if eos else (manifest.bos_token_id if manifest.bos_token_id is not None else 0)
    model: dict[str, Any] = {
        "type": "llama",
        "context_length": manifest.context_length,
        "vocab_size": c.vocab_size,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": MODEL_FILE,
            "head_size": c.head_dim,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "num_hidden_layers": c.num_hidden_layers,
            "num_key_value_heads": c.num_key_value_heads,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
        },
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": pad,
    }
    if manifest.bos_token_id is not None:
        model["bos_token_id"] = manifest.bos_token_id
    search = {
        "max_length": manifest.context_length,
        "min_length": 0,
        "do_sample": False,
        "num_beams": 1,
        "num_return_sequences": 1,
        "temperature": 1.0,
        "top_k": 1,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
        "diversity_penalty": 0.0,
        "no_repeat_ngram_size": 0,
        "early_stopping": True,
        # The graph concatenates past and new keys (no GroupQueryAttention), so the past and
        # present buffers cannot be shared.
        "past_present_share_buffer": False,
    }
    return {"model": model, "search": search}


def tokenizer_config(manifest: ModelManifest, tokenizer: tokenizers.Tokenizer) -> dict[str, Any]:
    """HF-style tokenizer_config.json: chat template and special tokens as strings."""
    eos = manifest.eos_token_ids
    eos_tok = _token(tokenizer, eos[0]) if eos else None
    added = {}
    for tid, tok in sorted(tokenizer.get_added_tokens_decoder().items()):
        added[str(tid)] = {
            "content": tok.content, "lstrip": tok.lstrip, "rstrip": tok.rstrip,
            "normalized": tok.normalized, "single_word": tok.single_word, "special": tok.special,
        }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": manifest.context_length,
        "bos_token": _token(tokenizer, manifest.bos_token_id),
        "eos_token": eos_tok,
        "pad_token": eos_tok,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [t["content"] for t in added.values() if t["special"]],
        "added_tokens_decoder": added,
        "chat_template": manifest.chat_template,
    }


def write_model_folder(
    out_dir: Path,
    manifest: ModelManifest,
    weights: Mapping[str, np.ndarray],
    tokenizer: tokenizers.Tokenizer,
    *,
    block_size: int = 32,
    progress: Progress | None = None,
    prequantized: Mapping[str, BlockQuantized] | None = None,
    bridge: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Build model.onnx (variant from the manifest) and write every file of the folder.

    Returns ``out_dir``. For int4 models ``manifest.extra["int4_accuracy_level"]`` (default 0)
    is passed to MatMulNBits, ``manifest.extra["int4_lm_head_bits"]`` (default: chosen from the
    accuracy level) sets the lm_head's precision, and ``prequantized`` weights are carried over
    exactly (see build_llama_onnx); ``bridge`` is the fitted affine map before the final norm of
    a bridged truncated variant (build_llama_onnx's ``bridge``). The manifest (switchyard.json) is written last, after
    everything else is on disk; an existing manifest is removed first so an interrupted rebuild
    never looks complete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    lm_head_bits = manifest.extra.get("int4_lm_head_bits")
    build = dict(
        variant=manifest.variant, block_size=block_size, progress=progress,
        accuracy_level=int(manifest.extra.get("int4_accuracy_level", 0)),
        prequantized=prequantized if manifest.variant == "int4" else None,
        lm_head_bits=None if lm_head_bits is None else int(lm_head_bits),
        lm_head_accuracy_level=manifest.extra.get("int4_lm_head_accuracy_level"),
        bridge=bridge, graph=graph_kind(manifest),
    )
    build_llama_onnx(manifest.config, weights, out_dir, **build)  # type: ignore[arg-type]
    if manifest.extra.get("fp16_graph"):  # the CUDA twin: same graph in float16
        if graph_kind(manifest) != "fused":
            raise ValueError("extra['fp16_graph'] needs the fused graph")
        build_llama_onnx(manifest.config, weights, out_dir, **build,  # type: ignore[arg-type]
                         dtype="float16", file_name=FP16_MODEL_FILE)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps(tokenizer_config(manifest, tokenizer), indent=2, ensure_ascii=False)
    )
    if graph_kind(manifest) == "plain":  # genai cannot feed the fused graph's inputs: no file that says it can
        (out_dir / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(manifest), indent=2))
    else:
        (out_dir / GENAI_CONFIG_FILE).unlink(missing_ok=True)
    manifest.save(out_dir)
    return out_dir


def graph_kind(manifest: ModelManifest) -> str:
    """"plain" or "fused" (manifest.extra["graph"]; folders written before it are plain)."""
    return str(manifest.extra.get("graph", "plain"))


def load_manifest(folder: Path) -> ModelManifest:
    """Read ``folder/switchyard.json``."""
    return ModelManifest.load(Path(folder))
