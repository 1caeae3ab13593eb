"""The affine bridge of truncated variants (switchyard.model.bridge): the builder puts it in the
graph as a MatMul + Add before the final norm with the logits of the numpy reference, hidden
outputs expose the residual stream it is fitted on, ridge fits are exact and deterministic, and
the real bridged folder is what its manifest says (slow tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from switchyard.model.bridge import FIT_VERSION, collect_hidden, fit_prompts, fit_ridge, normalized, text_openings
from switchyard.model.config import MODEL_FILE, ModelManifest
from switchyard.model.convert import (
    INT4_MODEL_NAME,
    fit_bridges,
    is_bridged,
    model_name,
    prequantized_weights,
    truncate,
    truncated_layers,
    variant_of,
)
from switchyard.model.graph_io import prompt_feeds
from switchyard.model.onnx_builder import build_llama_onnx
from switchyard.model.tiny import TINY_CONFIG, random_weights

try:
    from reference_llama import reference_logits
except ImportError:  # tests/ imported as a package
    from tests.reference_llama import reference_logits

REPO = Path(__file__).resolve().parents[1]
CFG = TINY_CONFIG
IDS = [1, 64, 65, 66, 200, 201, 383, 0, 2, 99]


def _run(path: Path, ids: list[int], outputs: list[str]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
    for i in range(CFG.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, CFG.num_key_value_heads, 0, CFG.head_dim), np.float32)
    return sess.run(outputs, feeds)


def _bridge(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = CFG.hidden_size
    return (np.eye(h, dtype=np.float32) + 0.2 * rng.standard_normal((h, h)).astype(np.float32),
            0.1 * rng.standard_normal(h).astype(np.float32))


@pytest.mark.unit
def test_variant_names() -> None:
    assert model_name("int4-l12b") == f"{INT4_MODEL_NAME}-l12-bridged"
    assert truncated_layers("int4-l12b") == 12 and is_bridged("int4-l12b") and not is_bridged("int4-l12")
    for v in ("int4-l12b", "int4-l12", "int4", "fp32", "int4-fast"):
        assert variant_of(model_name(v)) == v
    assert variant_of("something-else") is None


@pytest.mark.unit
def test_bridge_in_graph_matches_reference(tmp_path: Path) -> None:
    w = random_weights(CFG, seed=0)
    bw, bb = _bridge()
    path = build_llama_onnx(CFG, w, tmp_path, bridge=(bw, bb))
    proto = onnx.load(str(path))
    nodes = {n.name.rsplit("_", 1)[0]: n for n in proto.graph.node}  # the builder appends _<n>
    matmul, add = nodes["bridge.matmul"], nodes["bridge"]
    assert matmul.op_type == "MatMul" and add.op_type == "Add" and add.input[0] == matmul.output[0]
    assert nodes["model.norm.pow"].input[0] == add.output[0]  # the final norm reads the bridge
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(inits["bridge.weight"], bw)
    np.testing.assert_array_equal(inits["bridge.bias"], bb)
    (got,) = _run(path, IDS, ["logits"])
    ref = reference_logits(CFG, {k: v.astype(np.float64) for k, v in w.items()}, IDS, bridge=(bw, bb))[-1]
    plain = reference_logits(CFG, {k: v.astype(np.float64) for k, v in w.items()}, IDS)[-1]
    np.testing.assert_allclose(got[0, 0], ref, rtol=0, atol=1e-4)
    assert np.abs(ref - plain).max() > 0.1  # the bridge changes the logits
    with pytest.raises(ValueError):
        build_llama_onnx(CFG, w, tmp_path / "bad", bridge=(bw[:-1], bb))


@pytest.mark.unit
def test_hidden_outputs_are_the_residual_stream(tmp_path: Path) -> None:
    """hidden.L, normed and multiplied by the lm_head, gives the reference logits at every
    position; hidden.0 is the embedding."""
    w = random_weights(CFG, seed=0)
    n = CFG.num_hidden_layers
    path = build_llama_onnx(CFG, w, tmp_path, hidden_outputs=[0, n])
    h0, hl = _run(path, IDS, ["hidden.0", f"hidden.{n}"])
    assert hl.shape == (1, len(IDS), CFG.hidden_size)
    np.testing.assert_array_equal(h0[0], w["model.embed_tokens.weight"][IDS])
    wd = {k: v.astype(np.float64) for k, v in w.items()}
    ref = reference_logits(CFG, wd, IDS)
    x = hl[0].astype(np.float64)
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + CFG.rms_norm_eps) * wd["model.norm.weight"]
    head = wd.get("lm_head.weight", wd["model.embed_tokens.weight"])
    np.testing.assert_allclose(x @ head.T, ref, rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        build_llama_onnx(CFG, w, tmp_path / "bad", hidden_outputs=[n + 1])


@pytest.mark.unit
def test_fit_ridge_recovers_an_affine_map_deterministically() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16)) * np.linspace(0.5, 20, 16)
    w_true, b_true = rng.standard_normal((16, 8)), rng.standard_normal(8)
    y = x @ w_true + b_true + 0.01 * rng.standard_normal((2000, 8))
    w, b = fit_ridge(x, y, ridge=1e-8)
    np.testing.assert_allclose(w, w_true, atol=5e-3)
    np.testing.assert_allclose(b, b_true, atol=5e-3)
    w2, b2 = fit_ridge(x, y, ridge=1e-8)
    assert w.tobytes() == w2.tobytes() and b.tobytes() == b2.tobytes()
    # a strong ridge shrinks W towards 0 (and b towards the mean target)
    ws, _ = fit_ridge(x, y, ridge=1e3)
    assert np.abs(ws).max() < 0.1 * np.abs(w).max()
    np.testing.assert_allclose(np.sqrt(np.mean(normalized(y) ** 2, axis=-1)), 1.0, rtol=1e-12)


@pytest.mark.unit
def test_fit_text_is_not_the_evaluation_sets() -> None:
    """The bridge never sees the prompts or text it is evaluated on."""
    import json
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from int4_agreement import PROMPTS

    routing = {json.loads(line)["prompt"] for line in
               (REPO / "bench/data/routing_prompts.jsonl").read_text().splitlines() if line.strip()}
    heldout = (REPO / "bench/data/heldout.txt").read_text()
    prompts = fit_prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    assert not set(prompts) & (routing | set(PROMPTS))
    assert not any(o.strip() in heldout for o in text_openings())


@pytest.fixture(scope="module")
def gguf():
    from switchyard.model.gguf_source import ensure_gguf, read_gguf

    try:
        path = ensure_gguf()
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")
    return path, read_gguf(path)


@pytest.mark.slow
def test_collect_and_fit_are_deterministic(gguf) -> None:
    """Two collections over the same (small) slice of the fit text give identical hidden states,
    hence identical bridges."""
    _, m = gguf
    pre = prequantized_weights(m)
    runs = [collect_hidden(m.config, m.weights, m.tokenizer, m.chat_template, [12], m.eos_token_ids,
                           prequantized=pre, limit=3) for _ in range(2)]
    a, b = runs
    assert len(a.target) > 100 and a.inputs[12].shape == a.target.shape
    assert a.target.tobytes() == b.target.tobytes() and a.inputs[12].tobytes() == b.inputs[12].tobytes()
    wa, ba = fit_ridge(a.inputs[12], a.target)
    wb, bb = fit_ridge(b.inputs[12], b.target)
    assert wa.tobytes() == wb.tobytes() and ba.tobytes() == bb.tobytes()


@pytest.mark.slow
def test_bridged_folder_matches_reference(gguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The converter's int4-l12b folder: 12 layers, the fitted bridge in its graph and cache,
    recorded in the manifest, and logits equal to the numpy reference of the truncated weights +
    bridge. Fitted on a slice of the fit text into tmp folders (the full fit takes minutes)."""
    from switchyard.model import bridge as bridge_mod
    from switchyard.model.catalog import ModelCatalog
    from switchyard.model.convert import convert_gguf

    prompts, openings = bridge_mod.fit_prompts()[:6], bridge_mod.text_openings()[:2]
    monkeypatch.setattr(bridge_mod, "fit_prompts", lambda: prompts)
    monkeypatch.setattr(bridge_mod, "text_openings", lambda: openings)
    src, m = gguf
    models, cache = tmp_path / "models", tmp_path / "bridges"
    (folder,) = convert_gguf(models, variants=["int4-l12b"], gguf_path=src, bridge_cache=cache)
    man = ModelManifest.load(folder)
    assert folder.name == f"{INT4_MODEL_NAME}-l12-bridged"
    assert man.config.num_hidden_layers == 12 and man.extra["layers_kept"] == 12
    info = man.extra["bridge"]
    assert info["fit_version"] == FIT_VERSION and info["tokens"] > 200
    assert "6 chat prompts" in info["fitted_on"] and "no hub data" in info["fitted_on"]
    assert len(list(cache.glob("l12-*.npz"))) == 1
    bridge = fit_bridges(m, src, [12], cache_dir=cache)[12]  # read back from the cache
    assert bridge.info == info
    proto = onnx.load(str(folder / MODEL_FILE))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
             if t.name.startswith("bridge.")}
    np.testing.assert_array_equal(inits["bridge.weight"], bridge.weight)
    np.testing.assert_array_equal(inits["bridge.bias"], bridge.bias)
    cfg, w = truncate(m.config, m.weights, 12)
    entry = ModelCatalog(models).get(folder.name)
    ids = entry.encode(entry.render_chat([("user", "What is the capital of France?")]))
    ref = reference_logits(cfg, {k: v.astype(np.float64) for k, v in w.items()}, ids,
                           bridge=(bridge.weight, bridge.bias))[-1]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(folder / MODEL_FILE), so, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], prompt_feeds(man, ids))[0][0, 0]  # the folder's graph kind (fused)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3)
    assert int(np.argmax(got)) == int(np.argmax(ref))
