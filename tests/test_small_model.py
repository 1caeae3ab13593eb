"""The truncated SmolLM2 variant (the small model of model routing): built by the converter with
the expected depth, holding the int4 folder's exact blocks, matching the numpy reference on the
same truncated weights, deterministic, and — honestly — not the full model's answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from services.worker.engine import Engine
from switchyard.model.catalog import ModelCatalog
from switchyard.model.config import MODEL_FILE, ModelManifest
from switchyard.model.graph_io import prompt_feeds
from switchyard.model.convert import (
    DEFAULT_VARIANTS,
    INT4_MODEL_NAME,
    SMALL_LAYERS,
    SMALL_MODEL_NAME,
    SMALL_VARIANT,
    model_name,
    truncate,
    truncated_layers,
)
from switchyard.model.gguf_source import GgufModel, ensure_gguf, read_gguf

try:
    from reference_llama import reference_logits
except ImportError:  # tests/ imported as a package
    from tests.reference_llama import reference_logits

PARIS = "What is the capital of France?"


def test_variant_names() -> None:
    assert truncated_layers("int4-l12") == 12
    assert truncated_layers("int4") is None and truncated_layers("int4-fast") is None
    assert model_name("int4-l8") == f"{INT4_MODEL_NAME}-l8"
    assert SMALL_MODEL_NAME == model_name(SMALL_VARIANT) == f"{INT4_MODEL_NAME}-l{SMALL_LAYERS}"
    assert SMALL_VARIANT in DEFAULT_VARIANTS
    with pytest.raises(ValueError):
        model_name("int4-l0")
    with pytest.raises(ValueError):
        model_name("int4-x12")


@pytest.fixture(scope="module")
def gguf() -> GgufModel:
    try:
        path = ensure_gguf()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")
    return read_gguf(path)


def test_truncate_keeps_first_layers_and_head(gguf: GgufModel) -> None:
    cfg, w = truncate(gguf.config, gguf.weights, 3)
    assert cfg.num_hidden_layers == 3 and cfg.hidden_size == gguf.config.hidden_size
    layers = {int(k.split(".")[2]) for k in w if k.startswith("model.layers.")}
    assert layers == {0, 1, 2}
    assert w["model.norm.weight"] is gguf.weights["model.norm.weight"]
    assert w["model.embed_tokens.weight"] is gguf.weights["model.embed_tokens.weight"]
    with pytest.raises(ValueError):
        truncate(gguf.config, gguf.weights, gguf.config.num_hidden_layers + 1)


def _inits(folder: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(folder / MODEL_FILE))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _last_logits(folder: Path, ids: list[int]) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(folder / MODEL_FILE), so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], prompt_feeds(ModelManifest.load(folder), ids))[0][0, 0]


@pytest.mark.slow
def test_small_folder_is_the_first_layers_of_int4(real_models_dir: Path) -> None:
    """Built by default (the real_models_dir fixture converts DEFAULT_VARIANTS): 12 of 30 layers,
    a manifest that says so, and bit-identical weights to the full int4 folder's first layers."""
    small, full = real_models_dir / SMALL_MODEL_NAME, real_models_dir / INT4_MODEL_NAME
    m = ModelManifest.load(small)
    assert m.name == SMALL_MODEL_NAME and m.variant == "int4"
    assert m.config.num_hidden_layers == SMALL_LAYERS
    assert m.extra["layers_kept"] == SMALL_LAYERS and m.extra["layers_total"] == 30
    assert m.extra["derived_from"] == INT4_MODEL_NAME
    inputs = [i.name for i in onnx.load(str(small / MODEL_FILE), load_external_data=False).graph.input]
    assert sum(n.startswith("past_key_values.") for n in inputs) == 2 * SMALL_LAYERS
    si, fi = _inits(small), _inits(full)
    assert set(si) < set(fi)
    assert not any(f"layers.{SMALL_LAYERS}." in n for n in si)
    assert any("layers.0." in n for n in si)
    for name, arr in si.items():
        np.testing.assert_array_equal(arr, fi[name], err_msg=name)


@pytest.mark.slow
def test_small_logits_match_reference_on_truncated_weights(real_models_dir: Path, gguf: GgufModel) -> None:
    cfg, w = truncate(gguf.config, gguf.weights, SMALL_LAYERS)
    entry = ModelCatalog(real_models_dir).get(SMALL_MODEL_NAME)
    assert entry is not None
    ids = entry.encode(entry.render_chat([("user", PARIS)]))
    ref = reference_logits(cfg, {k: v.astype(np.float64) for k, v in w.items()}, ids)[-1]
    got = _last_logits(real_models_dir / SMALL_MODEL_NAME, ids)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
    assert int(np.argmax(got)) == int(np.argmax(ref))


@pytest.mark.slow
def test_small_generates_deterministically_and_unlike_the_full_model(real_models_dir: Path) -> None:
    """Greedy output is reproducible; with 18 of 30 layers dropped (no retraining) it no longer
    answers like the full model — what docs/benchmarks.md reports as 0% agreement."""
    catalog = ModelCatalog(real_models_dir)
    entry = catalog.get(SMALL_MODEL_NAME)
    assert entry is not None
    ids = entry.encode(entry.render_chat([("user", PARIS)]))
    eos = entry.manifest.eos_token_ids
    small = Engine(real_models_dir / SMALL_MODEL_NAME, threads=1, provider="cpu")
    a = small.generate(ids, 16, stop_ids=eos)
    b = small.generate(ids, 16, stop_ids=eos)
    assert a == b and len(a) > 0
    assert all(0 <= t < entry.manifest.config.vocab_size for t in a)
    full = Engine(real_models_dir / INT4_MODEL_NAME, threads=1, provider="cpu")
    f = full.generate(ids, 16, stop_ids=eos)
    assert "Paris" in entry.decode(f)
    assert a != f and "Paris" not in entry.decode(a)
