"""The fused graph (ONNX Runtime contrib operators, KV pool) against the plain-op graph built from
the same weights: same logits within float tolerance, the same greedy tokens, and a KV pool that
is appended to in place (no reallocation per step) and survives rows joining, leaving and the
pool growing. The tiny model runs always; the real SmolLM2 folders are `slow`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from services.worker.engine import Engine, EngineError
from services.worker.config import WorkerConfig
from services.worker.fused_batch import FusedBatch, decode_bucket
from services.worker.sampling import SamplingParams
from switchyard.config import ConfigError
from switchyard.model.catalog import ModelCatalog
from switchyard.model.config import FP16_MODEL_FILE, MODEL_FILE, ModelManifest
from switchyard.model.folder import write_model_folder
from switchyard.model.graph_io import prompt_feeds
from switchyard.model.tiny import TINY_CONFIG, byte_tokenizer, random_weights, tiny_manifest

from conftest import TINY

LOGIT_TOLERANCE = 1e-4  # float32 both ways; only the order of float additions differs


def _build(tmp: Path, variant: str, graph: str) -> Path:
    folder = tmp / f"{variant}-{graph}"
    manifest = tiny_manifest(variant=variant, graph=graph)
    write_model_folder(folder, manifest, random_weights(TINY_CONFIG, 0), byte_tokenizer())
    return folder


@pytest.fixture(scope="module", params=["fp32", "int4"])
def folders(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp(f"graphs-{request.param}")
    return _build(tmp, request.param, "plain"), _build(tmp, request.param, "fused")


def _plain_logits(session: ort.InferenceSession, prompt: np.ndarray) -> np.ndarray:
    c = TINY_CONFIG
    feeds = {"input_ids": prompt[None], "attention_mask": np.ones((1, len(prompt)), np.int64),
             "position_ids": np.arange(len(prompt))[None]}
    for i in range(c.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, c.num_key_value_heads, 0, c.head_dim), np.float32)
    return session.run(["logits"], feeds)[0][:, -1, :]


@pytest.mark.unit
def test_fused_graph_uses_the_contrib_operators(folders: tuple[Path, Path]) -> None:
    plain, fused = (onnx.load(str(f / MODEL_FILE), load_external_data=False) for f in folders)
    ops = {n.op_type for n in fused.graph.node}
    layers = TINY_CONFIG.num_hidden_layers
    assert sum(n.op_type == "GroupQueryAttention" for n in fused.graph.node) == layers
    assert sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in fused.graph.node) == 2 * layers - 1
    assert not ops & {"Softmax", "Transpose", "Pow", "Sqrt"}  # attention and norms are fused
    assert not ops & {"Shape", "Expand", "Range"}  # no shape arithmetic: nothing lands on the CPU beside CUDA
    kv_readers = {n.op_type for n in fused.graph.node if any(i.startswith("past_key_values.") for i in n.input)}
    assert kv_readers == {"GroupQueryAttention"}  # no Concat of the KV: appended in place
    assert len(fused.graph.node) * 3 < len(plain.graph.node)
    if "int4" in folders[0].name:
        assert "MatMulNBits" in ops


@pytest.mark.unit
def test_fused_logits_equal_plain_for_right_padded_rows(folders: tuple[Path, Path]) -> None:
    """Two prompts of different lengths in one right-padded call give each prompt's own logits."""
    plain = ort.InferenceSession(str(folders[0] / MODEL_FILE), providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(str(folders[1] / MODEL_FILE), providers=["CPUExecutionProvider"])
    c = TINY_CONFIG
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, c.vocab_size, n) for n in (9, 4, 1)]
    width, buffer = max(map(len, prompts)), 32
    ids = np.zeros((len(prompts), width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = p
    lengths = np.array([len(p) for p in prompts])
    feeds = {"input_ids": ids, "last_token_index": np.arange(len(prompts)) * width + lengths - 1, "seqlens_k": (lengths - 1).astype(np.int32),
             "total_sequence_length": np.array(width, np.int32)}
    for i in range(c.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(
                (len(prompts), c.num_key_value_heads, buffer, c.head_dim), np.float32)
    logits, best = fused.run(["logits", "next_token"], feeds)
    for row, p in enumerate(prompts):
        want = _plain_logits(plain, p)[0]
        assert np.abs(logits[row, 0] - want).max() < LOGIT_TOLERANCE
        assert best[row] == int(np.argmax(want))


@pytest.mark.unit
def test_fused_engine_generates_what_the_plain_engine_does(folders: tuple[Path, Path]) -> None:
    plain, fused = (Engine(f, max_sequences=8) for f in folders)
    assert (plain.graph, fused.graph) == ("plain", "fused")
    rng = np.random.default_rng(1)
    for n in (1, 7, 40):
        prompt = rng.integers(3, TINY_CONFIG.vocab_size, n).tolist()
        assert fused.generate(prompt, 24) == plain.generate(prompt, 24)
    sampled = SamplingParams(temperature=0.8, top_p=0.9)
    prompt = rng.integers(3, TINY_CONFIG.vocab_size, 12).tolist()
    assert fused.generate(prompt, 16, sampled, seed=3) == plain.generate(prompt, 16, sampled, seed=3)


FP16_RELATIVE_TOLERANCE = 5e-3  # |Δlogit| / max|logit|: float16 weights, activations and KV


@pytest.mark.unit
@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_float16_twin_stays_within_tolerance_and_decodes_the_same(tmp_path: Path, variant: str) -> None:
    """The CUDA twin (model-fp16.onnx) runs on the CPU provider too: its float32 logits are within
    the stated tolerance of model.onnx's and its greedy tokens the same on the tiny model."""
    manifest = tiny_manifest(variant=variant, graph="fused")
    manifest.extra["fp16_graph"] = True
    folder = write_model_folder(tmp_path / variant, manifest, random_weights(TINY_CONFIG, 0), byte_tokenizer())
    f32 = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    f16 = ort.InferenceSession(str(folder / FP16_MODEL_FILE), providers=["CPUExecutionProvider"])
    assert {i.type for i in f16.get_inputs() if i.name.startswith("past_")} == {"tensor(float16)"}
    rng = np.random.default_rng(2)
    for n in (3, 33):
        feeds = prompt_feeds(manifest, rng.integers(3, TINY_CONFIG.vocab_size, n).tolist())
        want = f32.run(["logits"], feeds)[0]
        got = f16.run(["logits"], {k: v.astype(np.float16) if v.dtype == np.float32 else v
                                   for k, v in feeds.items()})[0]
        assert got.dtype == np.float32
        assert np.abs(got - want).max() <= FP16_RELATIVE_TOLERANCE * np.abs(want).max()
    e32, e16 = (Engine(folder, max_sequences=4, precision=p) for p in ("float32", "float16"))
    assert (e32.model_file, e16.model_file) == (MODEL_FILE, FP16_MODEL_FILE)
    assert isinstance(e16.batch, FusedBatch) and e16.batch.dtype == np.float16
    for n in (4, 30):
        prompt = rng.integers(3, TINY_CONFIG.vocab_size, n).tolist()
        assert e16.generate(prompt, 20) == e32.generate(prompt, 20)
    with pytest.raises(EngineError, match="no float16 graph"):
        Engine(_build(tmp_path, variant, "fused"), precision="float16")


def _q4_1_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """ggml Q4_1 blocks [rows, cols / 32, 20]: f16 d, f16 m, 16 bytes of nibbles (w = d·q + m)."""
    kb = cols // 32
    d = rng.uniform(0.01, 0.05, (rows, kb)).astype(np.float16)
    m = rng.uniform(-0.3, 0.05, (rows, kb)).astype(np.float16)
    nibbles = rng.integers(0, 256, (rows, kb, 16), dtype=np.uint8)
    return np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), nibbles], axis=2)


@pytest.mark.unit
def test_float16_twin_folds_q4_1_offsets_into_float_zero_points(tmp_path: Path) -> None:
    """GGUF Q4_1 blocks carried into MatMulNBits: the float32 graph adds blocksum(x) @ offsets
    (integer zero points stay on the CPU's fast path), the float16 twin folds the offsets into
    float zero points (no offset nodes) — and both compute the same logits within tolerance."""
    from switchyard.model.quantize import from_ggml

    rng = np.random.default_rng(4)
    weights = random_weights(TINY_CONFIG, 0)
    prequantized = {}
    for name, w in weights.items():
        if ".layers." in name and w.ndim == 2:
            bq = from_ggml("Q4_1", _q4_1_blocks(*w.shape, rng))
            prequantized[name] = bq
            weights[name] = bq.dequantize().T  # the HF-layout float values the blocks hold
    manifest = tiny_manifest(variant="int4", graph="fused")
    manifest.extra["fp16_graph"] = True
    folder = write_model_folder(tmp_path / "q4_1", manifest, weights, byte_tokenizer(), prequantized=prequantized)
    inits = {f: {i.name for i in onnx.load(str(folder / f), load_external_data=False).graph.initializer}
             for f in (MODEL_FILE, FP16_MODEL_FILE)}
    assert any(n.endswith(".offsets") for n in inits[MODEL_FILE]) and not any(n.endswith(".fzeros") for n in inits[MODEL_FILE])
    assert any(n.endswith(".fzeros") for n in inits[FP16_MODEL_FILE]) and not any(n.endswith(".offsets") for n in inits[FP16_MODEL_FILE])
    f32 = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    f16 = ort.InferenceSession(str(folder / FP16_MODEL_FILE), providers=["CPUExecutionProvider"])
    for n in (2, 21):
        feeds = prompt_feeds(manifest, rng.integers(3, TINY_CONFIG.vocab_size, n).tolist())
        want = f32.run(["logits"], feeds)[0]
        got = f16.run(["logits"], {k: v.astype(np.float16) if v.dtype == np.float32 else v
                                   for k, v in feeds.items()})[0]
        assert np.abs(got - want).max() <= FP16_RELATIVE_TOLERANCE * np.abs(want).max()


@pytest.fixture(scope="module")
def fused_engine(tiny_models_dir: Path) -> Engine:
    return Engine(tiny_models_dir / TINY, max_sequences=16)


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, TINY_CONFIG.vocab_size, n).tolist()


@pytest.mark.unit
def test_decode_appends_in_place_without_reallocating(fused_engine: Engine) -> None:
    batch = fused_engine.batch
    assert isinstance(batch, FusedBatch)
    for i in range(3):
        fused_engine.add(f"p{i}", _prompt(i, 10 + i), SamplingParams(), 0)
    fused_engine.step([(f"p{i}", 0) for i in range(3)], decode=False)
    addresses = [b.data_ptr() for b in batch.pool.buffers]
    for _ in range(20):
        fused_engine.step([], decode=True)
    assert [b.data_ptr() for b in batch.pool.buffers] == addresses  # same buffers, appended in place
    assert sorted(batch.ids) == ["p0", "p1", "p2"]
    assert batch.lengths == [fused_engine.sequences[sid].cache_length for sid in batch.ids]
    assert batch.kv_device() == "cpu"
    fused_engine.remove([f"p{i}" for i in range(3)])
    assert batch.ids == [] and batch.lengths == []


@pytest.mark.unit
def test_rows_leaving_from_the_middle_leave_the_others_unchanged(fused_engine: Engine) -> None:
    prompts = [_prompt(10 + i, 5 + 3 * i) for i in range(4)]
    alone = [fused_engine.generate(p, 20) for p in prompts]
    for i, p in enumerate(prompts):
        fused_engine.add(f"m{i}", p, SamplingParams(), 0)
    outs: dict[str, list[int]] = {f"m{i}": [] for i in range(4)}
    for sid, token, _ in fused_engine.step([(f"m{i}", 0) for i in range(4)], decode=False).tokens:
        outs[sid].append(token)
    for step in range(19):
        if step == 6:
            fused_engine.remove(["m0", "m2"])  # row 0 takes the last row's KV; row 2 is then last
        for sid, token, _ in fused_engine.step([], decode=True).tokens:
            outs[sid].append(token)
    fused_engine.remove(["m1", "m3"])
    assert outs["m1"] == alone[1] and outs["m3"] == alone[3]
    assert outs["m0"] == alone[0][:7] and outs["m2"] == alone[2][:7]


@pytest.mark.unit
def test_pool_growth_keeps_every_row(tiny_models_dir: Path, tiny_plain_models_dir: Path) -> None:
    """Rows past the initial 4 and positions past the initial 256 reallocate the pool (copying the
    live rows); every sequence still gets exactly the plain engine's tokens."""
    fused = Engine(tiny_models_dir / TINY, max_sequences=8)
    plain = Engine(tiny_plain_models_dir / TINY, max_sequences=8)
    prompts = [_prompt(20 + i, 200 + i) for i in range(2)] + [_prompt(30 + i, 8) for i in range(5)]
    results = []
    for engine in (fused, plain):
        for i, p in enumerate(prompts):
            engine.add(f"g{i}", p, SamplingParams(), 0)
        outs: dict[str, list[int]] = {f"g{i}": [] for i in range(len(prompts))}
        for sid, token, _ in engine.step([("g0", 64), ("g1", 0)], decode=False).tokens:
            outs[sid].append(token)
        for _ in range(4):
            result = engine.step([("g0", 64)] + [(f"g{i}", 0) for i in range(2, len(prompts))], decode=True)
            for sid, token, _ in result.tokens:
                outs[sid].append(token)
        for _ in range(70):  # the 200-token prompts pass 256 positions
            for sid, token, _ in engine.step([], decode=True).tokens:
                outs[sid].append(token)
        if engine is fused:
            assert isinstance(fused.batch, FusedBatch)
            assert (fused.batch.pool.rows, fused.batch.pool.length) == (8, 512)
        engine.remove(list(outs))
        results.append(outs)
    assert results[0] == results[1]
    assert (fused.batch.pool.rows, fused.batch.pool.length) == (4, 256)  # emptied: back to the start size


@pytest.mark.unit
def test_pool_shrinks_after_a_burst_and_keeps_the_rows_that_stay(tiny_models_dir: Path) -> None:
    """A burst grows the pool (rows and positions); once it leaves, the pool halves back down,
    copying the rows that stay — whose tokens do not change."""
    engine = Engine(tiny_models_dir / TINY, max_sequences=16)
    keeper = _prompt(60, 6)
    alone = engine.generate(keeper, 12)
    burst = {f"b{i}": _prompt(61 + i, 5) for i in range(11)} | {"long": _prompt(80, 300)}
    for sid, p in {**burst, "keep": keeper}.items():
        engine.add(sid, p, SamplingParams(), 0)
    out = [t for s, t, _ in engine.step([(sid, 0) for sid in [*burst, "keep"]], decode=False).tokens if s == "keep"]
    for _ in range(3):
        out += [t for s, t, _ in engine.step([], decode=True).tokens if s == "keep"]
    pool = engine.batch.pool  # type: ignore[attr-defined]
    assert (pool.rows, pool.length) == (16, 512)
    engine.remove(list(burst))
    assert (pool.rows, pool.length) == (4, 256)  # the initial size: one short row stays
    while len(out) < 12:
        out += [t for s, t, _ in engine.step([], decode=True).tokens if s == "keep"]
    engine.remove(["keep"])
    assert out == alone


@pytest.mark.unit
def test_chunked_prompt_joins_with_a_cached_prefix(tiny_models_dir: Path) -> None:
    """A prompt seeded from the prefix cache, prefilled in chunks, then joined: same tokens as
    without the cache."""
    engine = Engine(tiny_models_dir / TINY, max_sequences=4, prefix_cache_bytes=16 << 20)
    prompt = _prompt(40, 70)
    first = engine.generate(prompt, 12)
    engine.add("again", prompt, SamplingParams(), 0)
    assert engine.sequences["again"].cached_tokens == 64
    out = [t for _, t, _ in engine.step([("again", 3)], decode=False).tokens]
    while len(out) < 12:
        out += [t for _, t, _ in engine.step([("again", 0)], decode=True).tokens]
    engine.remove(["again"])
    assert out[:12] == first


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["int4", "fp32"])
def test_real_model_fused_equals_plain(real_models_dir: Path, tmp_path: Path, variant: str) -> None:
    """SmolLM2 as both graphs from the same GGUF: the same greedy tokens on chat prompts."""
    from switchyard.model.convert import convert_gguf, model_name

    fused_dir = real_models_dir / model_name(variant)
    (plain_dir,) = convert_gguf(tmp_path, variants=[variant], graph="plain")
    entry = ModelCatalog(real_models_dir).get(model_name(variant))
    assert entry is not None
    fused, plain = (Engine(d, threads=2, provider="cpu") for d in (fused_dir, plain_dir))
    assert (fused.graph, plain.graph) == ("fused", "plain")
    for question in ("What is the capital of France?", "Write a haiku about trains.",
                     "List three prime numbers.", "Explain what a KV cache is in one sentence."):
        ids = entry.encode_chat([("user", question)])
        assert fused.generate(ids, 32) == plain.generate(ids, 32), question
    assert dataclasses.asdict(fused.config) == dataclasses.asdict(plain.config)


@pytest.mark.slow
def test_real_model_float16_twin_is_within_tolerance(tmp_path: Path) -> None:
    """SmolLM2 int4 with its float16 twin (what a CUDA worker runs; Q4_1 offsets folded into float
    zero points), here on the CPU provider: prompt logits within the stated tolerance of the
    float32 graph's, the same first token through the engine. (Longer greedy continuations may
    part where two candidates are closer than float16 rounding: 3 of 4 chat prompts kept all 32
    tokens when this was written.)"""
    from switchyard.model.convert import convert_gguf, model_name

    (folder,) = convert_gguf(tmp_path, variants=["int4"], fp16=True)
    manifest = ModelManifest.load(folder)
    entry = ModelCatalog(tmp_path).get(model_name("int4"))
    assert entry is not None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    f32, f16 = (ort.InferenceSession(str(folder / f), options, providers=["CPUExecutionProvider"])
                for f in (MODEL_FILE, FP16_MODEL_FILE))
    e32, e16 = (Engine(folder, threads=2, provider="cpu", precision=p) for p in ("float32", "float16"))
    for question in ("What is the capital of France?", "List three prime numbers.", "Write a haiku about trains."):
        ids = entry.encode_chat([("user", question)])
        feeds = prompt_feeds(manifest, ids)
        want = f32.run(["logits"], feeds)[0][0, 0]
        got = f16.run(["logits"], {k: v.astype(np.float16) if v.dtype == np.float32 else v
                                   for k, v in feeds.items()})[0][0, 0]
        assert np.abs(got - want).max() <= FP16_RELATIVE_TOLERANCE * np.abs(want).max(), question
        assert e16.generate(ids, 1) == e32.generate(ids, 1), question


@pytest.mark.unit
def test_decode_buckets_are_powers_of_two_up_to_the_pool() -> None:
    assert [decode_bucket(r, 64) for r in (1, 2, 3, 5, 16, 17, 64)] == [1, 2, 4, 8, 16, 32, 64]
    assert decode_bucket(20, 24) == 24  # capped at the pool's rows
    with pytest.raises(ValueError):
        decode_bucket(0, 8)


@pytest.mark.unit
def test_cuda_graphs_are_refused_without_cuda(tiny_models_dir: Path) -> None:
    with pytest.raises(EngineError, match="CUDA graphs need the CUDA provider"):
        Engine(tiny_models_dir / TINY, provider="cpu", cuda_graph=True)
    for setting in ("on", "true"):
        with pytest.raises(ConfigError, match="cuda_graph needs provider cuda"):
            WorkerConfig(model_dir=tiny_models_dir / TINY, cuda_graph=setting).validate()
    with pytest.raises(ConfigError, match="cuda_graph must be auto, on or off"):
        WorkerConfig(model_dir=tiny_models_dir / TINY, cuda_graph="yes").validate()


@pytest.mark.unit
@pytest.mark.parametrize("setting, provider, graph, expected", [
    ("auto", "cuda", "fused", True),  # the fast path wherever it can run
    ("auto", "cuda", "plain", False),
    ("auto", "cpu", "fused", False),
    ("on", "cuda", "fused", True), ("true", "cuda", "fused", True),
    ("off", "cuda", "fused", False), ("false", "cuda", "fused", False),
])
def test_cuda_graphs_by_setting_provider_and_graph(tiny_models_dir: Path, setting: str, provider: str, graph: str,
                                                   expected: bool) -> None:
    config = WorkerConfig(model_dir=tiny_models_dir / TINY, provider="cuda", cuda_graph=setting)
    config.validate()
    assert config.use_cuda_graph(provider, graph) is expected


@pytest.mark.unit
def test_cuda_sessions_load_the_float16_twin_when_there_is_one() -> None:
    from services.worker.engine import model_file

    with_twin = tiny_manifest(graph="fused")
    with_twin.extra["fp16_graph"] = True
    without = tiny_manifest(graph="fused")
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    assert model_file(with_twin, "auto", cuda) == FP16_MODEL_FILE
    assert model_file(with_twin, "auto", cpu) == MODEL_FILE  # float32 stays the CPU's graph
    assert model_file(without, "auto", cuda) == MODEL_FILE
    assert model_file(with_twin, "float32", cuda) == MODEL_FILE
    assert model_file(with_twin, "float16", cpu) == FP16_MODEL_FILE
    with pytest.raises(EngineError, match="precision must be"):
        model_file(with_twin, "bf16", cuda)


def eager_and_graphed(models: Path, rows: int) -> tuple[Engine, Engine]:
    """Two tiny engines, the second decoding through the CUDA-graph path on the CPU provider."""
    eager = Engine(models / TINY, max_sequences=rows)
    graphed = Engine(models / TINY, max_sequences=rows)
    c = graphed.config
    graphed.batch = FusedBatch(graphed.session, ["CPUExecutionProvider"], "cpu", c.num_hidden_layers,
                               c.num_key_value_heads, c.head_dim, max_rows=rows, max_length=graphed.context_length,
                               cuda_graph=True)
    return eager, graphed


@pytest.mark.unit
def test_cuda_graph_decoder_logic_on_the_cpu_provider(tiny_models_dir: Path) -> None:
    """Everything of the CUDA-graph decode path but the capture itself, run on the CPU provider
    (which ignores gpu_graph_id): batches padded to power-of-two buckets with dummy rows in free
    pool rows, fixed input/output buffers updated in place, total_sequence_length fixed at the
    pool length, a new graph per bucket and per pool reallocation (a long prompt doubling the
    length) — same tokens as eager decode, for greedy and sampled rows, while rows join and leave."""
    eager, graphed = eager_and_graphed(tiny_models_dir, rows=8)
    sampled = SamplingParams(temperature=0.9, top_k=20)
    outs = []
    for engine in (eager, graphed):
        got: dict[str, list[int]] = {}
        plan = {0: ["a", "b", "c"], 5: ["d", "e"], 9: ["f"]}  # 3 rows (bucket 4), 5 (8), then leaves
        for step in range(40):
            joining = plan.get(step, [])
            for sid in joining:  # "f" is longer than the pool's 256 positions
                engine.add(sid, _prompt(ord(sid), 300 if sid == "f" else 4 + len(got)),
                           sampled if sid in "be" else SamplingParams(), seed=7)
            result = engine.step([(sid, 0) for sid in joining], decode=bool(engine.batch.ids))
            for sid, token, _ in result.tokens:
                got.setdefault(sid, []).append(token)
            if step in (12, 20):
                engine.remove([sorted(engine.batch.ids)[0]])
        engine.remove(list(engine.sequences))
        outs.append(got)
    graphs = graphed.batch.graphs
    assert graphs is not None and graphs.enabled  # never fell back to eager
    assert {key[0] for key in graphs._graphs} >= {4, 8}  # buckets used
    assert outs[0] == outs[1]
    by_bucket: dict[int, list[dict]] = {}  # a bucket met again after the pool grew: a new graph...
    for (bucket, _, _), (_, values, _) in graphs._graphs.items():
        by_bucket.setdefault(bucket, []).append(values)
    assert any(len(values) > 1 for values in by_bucket.values())
    assert all(v is values[0] for values in by_bucket.values() for v in values)  # ...on the same buffers


@pytest.mark.unit
def test_cuda_graph_pool_stays_put_so_bursts_replay_the_graphs_they_captured(tiny_models_dir: Path) -> None:
    """With CUDA graphs the pool holds every row from the start and never halves: a burst that
    leaves and comes back decodes on the graphs the first one captured (a pool that shrank and
    grew again would sit at new addresses, needing new captures until the bound turned them off)."""
    _, graphed = eager_and_graphed(tiny_models_dir, rows=8)
    pool, graphs = graphed.batch.pool, graphed.batch.graphs  # type: ignore[attr-defined]
    assert graphs is not None and (pool.rows, pool.length) == (8, 256)
    captured = []
    for burst in range(3):
        sids = [f"{burst}-{i}" for i in range(6)]
        for i, sid in enumerate(sids):
            graphed.add(sid, _prompt(40 + i, 5), SamplingParams(), seed=0)
        graphed.step([(sid, 0) for sid in sids], decode=False)
        for left in range(6, 0, -1):  # decode at 6, 5, ... 1 rows (buckets 8, 4, 2, 1)
            graphed.step([], decode=True)
            graphed.remove([sids[left - 1]])
        captured.append(set(graphs._graphs))
        assert (pool.rows, pool.length) == (8, 256)
    assert captured[0] == captured[1] == captured[2]
    assert {key[0] for key in captured[0]} == {1, 2, 4, 8}


@pytest.mark.unit
@pytest.mark.parametrize("rows, buckets", [(8, [1, 2, 4, 8]), (6, [1, 2, 4, 6])])
def test_cuda_graphs_captured_before_serving_are_the_ones_decode_replays(tiny_models_dir: Path, rows: int,
                                                                          buckets: list[int]) -> None:
    """capture_all takes every bucket's graph at start (dummy tokens in free rows); decoding
    afterwards at any batch size captures nothing new and gives the eager engine's tokens."""
    eager, graphed = eager_and_graphed(tiny_models_dir, rows=rows)
    graphs = graphed.batch.graphs  # type: ignore[attr-defined]
    assert graphs is not None
    assert graphs.capture_all() == buckets
    captured = set(graphs._graphs)
    assert {key[0] for key in captured} == set(buckets)
    outs = []
    for engine in (eager, graphed):
        got: dict[str, list[int]] = {}
        sids = [f"s{i}" for i in range(rows)]
        for i, sid in enumerate(sids):
            engine.add(sid, _prompt(20 + i, 3 + i), SamplingParams(), seed=0)
        engine.step([(sid, 0) for sid in sids], decode=False)
        for left in range(rows, 0, -1):
            for sid, token, _ in engine.step([], decode=True).tokens:
                got.setdefault(sid, []).append(token)
            engine.remove([sids[left - 1]])
        outs.append(got)
    assert outs[0] == outs[1]
    assert set(graphs._graphs) == captured and graphs.enabled


@pytest.mark.unit
def test_cuda_graph_decoder_stops_capturing_at_its_bound_and_decodes_the_rest_eagerly(tiny_models_dir: Path) -> None:
    """ONNX Runtime keeps every captured graph, so the decoder captures at most max_graphs; a
    shape met after that decodes eagerly (same tokens)."""
    eager, graphed = eager_and_graphed(tiny_models_dir, rows=16)
    graphs = graphed.batch.graphs
    assert graphs is not None
    graphs.max_graphs = 3
    outs = []
    for engine in (eager, graphed):
        got: dict[str, list[int]] = {}
        # rows 1 → 2 → 5 → 9: buckets 1, 2, 8, 16
        plan = {0: ["a"], 3: ["b"], 6: ["c", "d", "e"], 9: list("fghi")}
        for step in range(16):
            joining = plan.get(step, [])
            for sid in joining:
                engine.add(sid, _prompt(ord(sid), 5), SamplingParams(), seed=3)
            result = engine.step([(sid, 0) for sid in joining], decode=bool(engine.batch.ids))
            for sid, token, _ in result.tokens:
                got.setdefault(sid, []).append(token)
        engine.remove(list(engine.sequences))
        outs.append(got)
    assert outs[0] == outs[1]
    assert len(graphs._graphs) == 3 and graphs.enabled and graphs.eager_steps > 0
