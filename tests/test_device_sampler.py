"""The sampler graph draws what numpy's sampler draws for the same uniform number (issue 13
§4, sampling on the device), and an engine sampling with it generates the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from services.worker.device_sampler import DeviceSampler, build_sampler_graph
from services.worker.engine import Engine
from services.worker.sampling import NUCLEUS_CANDIDATES, SamplingParams, nucleus, sample_token

from conftest import TINY

VOCAB = 49152  # SmolLM2's


def numpy_cdf_and_nucleus_margin(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, float]:
    """The cumulative distribution `sample_token` draws from (float64, token-id order) and how
    close its top-p cut came to top_p (inf without top-p): where two float32 roundings of the
    same probabilities may legitimately disagree."""
    scaled = logits.astype(np.float32) / p.temperature
    if 0 < p.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -p.top_k)[-p.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    margin = np.inf
    if 0 < p.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order], dtype=np.float64)
        n = int(np.searchsorted(cumulative, p.top_p)) + 1
        margin = float(np.min(np.abs(cumulative[max(n - 2, 0):n + 1] - p.top_p)))
        kept = np.zeros_like(probs)
        kept[order[:n]] = probs[order[:n]]
        probs = kept
    cdf = np.cumsum(probs.astype(np.float64))
    return cdf / cdf[-1], margin


def random_params(rng: np.random.Generator) -> SamplingParams:
    return SamplingParams(temperature=float(rng.choice([0.0, 0.5, 1.0, 1.5])),
                          top_k=int(rng.choice([0, 1, 5, 50, 1000])),
                          top_p=float(rng.choice([1.0, 0.95, 0.9, 0.5, 0.1])))


@pytest.mark.unit
@pytest.mark.parametrize("candidates", [64, 1024])
def test_sampler_graph_draws_what_numpy_draws(candidates: int) -> None:
    sampler = DeviceSampler(["CPUExecutionProvider"], candidates=candidates)
    rng = np.random.default_rng(7)
    rows = agreed = 0
    for trial in range(24):
        logits = (rng.standard_normal((8, VOCAB)) * float(rng.choice([0.5, 3.0, 8.0]))).astype(np.float32)
        params = [random_params(rng) for _ in range(8)]
        seeds = [(trial, row) for row in range(8)]
        got = sampler.sample(logits, params, [np.random.default_rng(s).random() for s in seeds])
        for row in range(8):
            want = sample_token(logits[row], params[row], (), np.random.default_rng(seeds[row]))
            rows += 1
            if got[row] == want:
                agreed += 1
                continue
            # Only a draw on a float32 rounding boundary may differ.
            cdf, margin = numpy_cdf_and_nucleus_margin(logits[row], params[row])
            u = np.random.default_rng(seeds[row]).random()
            assert margin < 1e-4 or np.min(np.abs(cdf - u)) < 1e-6, \
                f"row {row} of trial {trial} ({params[row]}): graph {got[row]}, numpy {want}"
    assert rows == 192 and agreed >= 188, agreed
    if candidates == 64:
        assert sampler.full_vocab_runs > 0  # wide nuclei at scale 0.5 went round again, exactly


@pytest.mark.unit
def test_sampler_graph_takes_float16_logits_and_greedy_rows_take_the_argmax() -> None:
    sampler = DeviceSampler(["CPUExecutionProvider"], logits_type=TensorProto.FLOAT16)
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((4, 1, 512)) * 4).astype(np.float16)
    greedy = sampler.sample(logits, [SamplingParams()] * 4, [0.5] * 4)
    assert greedy.tolist() == np.argmax(logits[:, 0, :].astype(np.float32), axis=-1).tolist()
    p = SamplingParams(temperature=0.7, top_p=0.8)
    got = sampler.sample(logits, [p] * 4, [np.random.default_rng(i).random() for i in range(4)])
    want = [sample_token(logits[i, 0].astype(np.float32), p, (), np.random.default_rng(i)) for i in range(4)]
    assert got.tolist() == want


@pytest.mark.unit
def test_engine_sampling_on_the_device_generates_what_the_host_does(tiny_graph_models_dir: Path) -> None:
    on = Engine(tiny_graph_models_dir / TINY, max_sequences=8, device_sampling="on")
    off = Engine(tiny_graph_models_dir / TINY, max_sequences=8, device_sampling="off")
    assert on.sampler is not None and off.sampler is None
    cases = [(SamplingParams(temperature=0.9), 11), (SamplingParams(temperature=1.2, top_k=20), 12),
             (SamplingParams(temperature=0.8, top_p=0.9), 13), (SamplingParams(), 14),
             (SamplingParams(temperature=1.0, top_k=40, top_p=0.7), 15)]
    prompts = [[5 + i, 17, 42, 9 + 2 * i] for i in range(len(cases))]

    def batched(engine: Engine) -> dict[str, list[int]]:
        for i, ((params, seed), prompt) in enumerate(zip(cases, prompts)):
            engine.add(f"s{i}", prompt, params, seed)
        out: dict[str, list[int]] = {f"s{i}": [] for i in range(len(cases))}
        result = engine.step([(f"s{i}", 0) for i in range(len(cases))], decode=False)
        for _ in range(24):
            for sid, tok, _first in result.tokens:
                out[sid].append(tok)
            result = engine.step([], decode=True)
        engine.remove(list(out))
        return out

    device, host = batched(on), batched(off)
    assert device == host
    assert len({tuple(v) for v in device.values()}) == len(cases)  # seeds and params differ
    # a penalty needs each row's history: that batch samples on the host, same tokens
    penalized = (SamplingParams(temperature=0.9, repetition_penalty=1.3), 3)
    assert on.generate(prompts[0], 16, *penalized) == off.generate(prompts[0], 16, *penalized)


@pytest.mark.unit
def test_host_nucleus_from_candidates_equals_the_full_sort() -> None:
    """sampling.nucleus sorts the 1,024 most likely tokens when the nucleus ends among them and
    the whole vocabulary otherwise: the same ids, in the same order, either way."""
    rng = np.random.default_rng(5)
    wide = narrow = 0
    for scale in (0.3, 1.0, 3.0, 5.0, 8.0):
        for top_p in (0.1, 0.5, 0.9, 0.99):
            x = rng.standard_normal(VOCAB) * scale
            probs = np.exp(x - x.max()).astype(np.float32)
            probs /= probs.sum()
            order = np.argsort(-probs, kind="stable")
            want = order[:int(np.searchsorted(np.cumsum(probs[order], dtype=np.float64), top_p)) + 1]
            got = nucleus(probs, top_p)
            assert np.array_equal(got, want), (scale, top_p)
            wide += len(want) >= NUCLEUS_CANDIDATES
            narrow += len(want) < NUCLEUS_CANDIDATES
    assert wide and narrow  # both paths ran


@pytest.mark.unit
@pytest.mark.parametrize("vocab", [63, 64, 65, 1000, VOCAB])
def test_sampler_prefix_sums_in_blocks_equal_a_running_sum(vocab: int) -> None:
    """The graph's prefix sums run in blocks (ONNX Runtime's CUDA CumSum is quadratic in the row):
    equal to numpy's running sum whether or not the row fills its last block."""
    model = build_sampler_graph()
    model.graph.output.extend([onnx.helper.make_tensor_value_info(name, TensorProto.DOUBLE, None)
                               for name in ("kept_f64", "cumulative")])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = 3
    logits = np.random.default_rng(vocab).standard_normal((rows, 1, vocab)).astype(np.float32) * 4
    kept, cumulative = session.run(["kept_f64", "cumulative"], dict(
        logits=logits, temperature=np.ones(rows, np.float32), top_k=np.full(rows, vocab), top_p=np.ones(rows),
        uniform=np.full(rows, 0.5), k=np.array([vocab])))
    assert cumulative.shape == (rows, vocab)
    np.testing.assert_allclose(cumulative, np.cumsum(kept, axis=1), rtol=1e-12, atol=0)
