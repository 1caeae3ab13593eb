"""A tiny random llama model and byte-level tokenizer, for tests and local development.

``build_tiny_model(models_dir)`` writes a complete model folder (ONNX graph, tokenizer, configs,
manifest) in well under a second; the weights are seeded random, so its output is gibberish but
deterministic and prompt-dependent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from switchyard.model.config import MANIFEST_FILE, LlamaConfig, ModelManifest
from switchyard.model.folder import write_model_folder

TINY_CONFIG = LlamaConfig(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the tiny tokenizer's merges (any English text works; it only has to be
# long enough to yield vocab_size - 259 merges).
_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. The model reads the prompt, one token at a time, and writes the answer back to
the user as a stream of small pieces of text. When many people ask questions at the same
time, the server puts their requests in one batch, so that the hardware stays busy and
everyone gets an answer sooner. Each request has its own length, its own sampling settings
and its own stop words; the scheduler keeps track of all of them and removes a sequence from
the batch as soon as it is finished. The gateway speaks the same language as the popular
chat completion interfaces, which means existing clients work without changes.
There is a river that runs through the old town, under seven stone bridges. In the summer
the children swim near the mill, and in the winter the water freezes and the whole town comes
out to skate. The baker opens his shop before sunrise; the smell of fresh bread drifts along
the street and wakes the cats that sleep on the warm window sills. Hello, how are you today?
I am fine, thank you. What is the weather like where you live? It is sunny and warm here,
but they say it will rain tomorrow. Please tell me a story about a dragon who learned to
read, a robot that wanted to paint, and a small boat that sailed around the world.
Numbers like 1, 2, 3, 10, 42 and 2024 appear in text too, as do symbols such as +, -, =, %,
(parentheses), [brackets], {braces}, "quotes" and 'apostrophes'. Questions end with a
question mark; lists are separated by commas; and sentences end with a period.
"""


def random_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random float32 weights with HF names/shapes (see config.py).

    Embeddings use std 0.02 (HF's initializer_range); linears use std 1/sqrt(fan_in), so the
    layers' output dominates the residual stream. (With 0.02 linears, or with large embeddings,
    the tied lm_head mostly sees the last input token's own embedding and greedy decoding just
    repeats it.) Norm weights are 1 plus small noise.
    """
    rng = np.random.default_rng(seed)
    c = config
    hd = c.head_dim

    def linear(out_f: int, in_f: int) -> np.ndarray:
        return (rng.standard_normal((out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": (0.02 * rng.standard_normal((c.vocab_size, c.hidden_size))).astype(np.float32),
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(c.hidden_size)
        w[f"{p}.self_attn.q_proj.weight"] = linear(c.num_attention_heads * hd, c.hidden_size)
        w[f"{p}.self_attn.k_proj.weight"] = linear(c.num_key_value_heads * hd, c.hidden_size)
        w[f"{p}.self_attn.v_proj.weight"] = linear(c.num_key_value_heads * hd, c.hidden_size)
        w[f"{p}.self_attn.o_proj.weight"] = linear(c.hidden_size, c.num_attention_heads * hd)
        w[f"{p}.post_attention_layernorm.weight"] = norm(c.hidden_size)
        w[f"{p}.mlp.gate_proj.weight"] = linear(c.intermediate_size, c.hidden_size)
        w[f"{p}.mlp.up_proj.weight"] = linear(c.intermediate_size, c.hidden_size)
        w[f"{p}.mlp.down_proj.weight"] = linear(c.hidden_size, c.intermediate_size)
    w["model.norm.weight"] = norm(c.hidden_size)
    if not c.tie_word_embeddings:
        w["lm_head.weight"] = linear(c.vocab_size, c.hidden_size)
    return w


def byte_tokenizer(vocab_size: int = TINY_CONFIG.vocab_size) -> tokenizers.Tokenizer:
    """Byte-level BPE: ids 0-2 are the ChatML specials, then the 256 byte tokens, then merges
    trained on a built-in English text until the vocabulary has exactly ``vocab_size`` entries.
    Any UTF-8 text round-trips through encode/decode."""
    n_base = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_base:
        raise ValueError(f"vocab_size must be at least {n_base}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"tokenizer training gave {tok.get_vocab_size()} tokens, wanted {vocab_size} "
            "(the built-in corpus is too small for this vocab_size)"
        )
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i
    return tok


def tiny_manifest(name: str = "tiny-llama", seed: int = 0, variant: str = "fp32",
                  graph: str = "fused") -> ModelManifest:
    """The tiny model's manifest; ``graph`` as the served models are built (fused) unless asked."""
    return ModelManifest(
        name=name,
        config=TINY_CONFIG,
        variant=variant,
        context_length=TINY_CONFIG.max_position_embeddings,
        max_output_tokens=256,
        bos_token_id=SPECIAL_TOKENS.index("<|im_start|>"),
        eos_token_ids=(SPECIAL_TOKENS.index("<|im_end|>"), SPECIAL_TOKENS.index("<|endoftext|>")),
        chat_template=CHATML_TEMPLATE,
        source=f"random(seed={seed})",
        extra={"graph": graph},
    )


def build_tiny_model(
    models_dir: Path, name: str = "tiny-llama", seed: int = 0, *, variant: str = "fp32", graph: str = "fused"
) -> Path:
    """Write ``models_dir/name`` (a full model folder) unless it already has switchyard.json.

    The folder is built in a temporary sibling directory and renamed into place, so concurrent
    callers never see (or produce) a half-written folder.
    """
    models_dir = Path(models_dir)
    folder = models_dir / name
    if (folder / MANIFEST_FILE).exists():
        return folder
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir))
    try:
        write_model_folder(
            tmp, tiny_manifest(name, seed, variant, graph), random_weights(TINY_CONFIG, seed),
            byte_tokenizer(TINY_CONFIG.vocab_size),
        )
        os.chmod(tmp, 0o755)
        if (folder / MANIFEST_FILE).exists():
            return folder  # someone else finished first
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete leftover (no manifest)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / MANIFEST_FILE).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
