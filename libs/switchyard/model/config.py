"""Architecture config of a llama-shaped decoder and the on-disk model folder contract.

A model folder follows the layout that onnxruntime-genai reads, plus one file of our own:

    <models_dir>/<name>/
        model.onnx            graph (weights in model.onnx.data, external data)
        model.onnx.data
        genai_config.json     onnxruntime-genai's description of the graph's inputs/outputs
                              (plain graphs only: genai cannot feed the fused graph)
        tokenizer.json        `tokenizers` fast tokenizer
        tokenizer_config.json chat template, special tokens
        switchyard.json       ModelManifest: LlamaConfig, variant, limits (what our services read)

Graph I/O contract (names as onnxruntime-genai expects them):
    inputs   input_ids                 int64   [batch, seq]
             attention_mask            int64   [batch, past + seq]   1 = real token, 0 = padding
             position_ids              int64   [batch, seq]          rotary position of each new token
             past_key_values.{i}.key   float32 [batch, kv_heads, past, head_dim]
             past_key_values.{i}.value float32 [batch, kv_heads, past, head_dim]
    outputs  logits                    float32 [batch, 1, vocab]      last position only
             present.{i}.key           float32 [batch, kv_heads, past + seq, head_dim]
             present.{i}.value         float32 [batch, kv_heads, past + seq, head_dim]

The new tokens always occupy the last `seq` key positions; padding may sit anywhere before
them (the worker keeps ragged sequences in one batch by masking). Query s may attend to key t
when attention_mask[b, t] == 1 and t <= past + s.

FUSED_CONTRACT — the fused graph (manifest extra["graph"] == "fused"; ONNX Runtime contrib
operators, GroupQueryAttention), rows right-padded, KV appended in place:
    inputs   input_ids                 int64   [batch, seq]   row b's new tokens first, then padding
             last_token_index          int64   [batch]        the token whose logits row b returns, as an
                                                              index into the flattened [batch * seq] tokens
             seqlens_k                 int32   [batch]        row b's tokens after this call, minus 1
             total_sequence_length     int32   []             max over rows of seqlens_k + 1
             past_key_values.{i}.key   T       [batch, kv_heads, max_len, head_dim]  a buffer: row b's
             past_key_values.{i}.value T       [batch, kv_heads, max_len, head_dim]  first positions hold its KV
    outputs  logits                    float32 [batch, 1, vocab]
             next_token                int64   [batch]        argmax of logits (greedy, on the device)
             present.{i}.key/value     T       [batch, kv_heads, max_len, head_dim]  the same buffer when
                                                              bound to the same memory as past (ORT then
                                                              writes the new tokens' KV in place)
Row b's rotary positions are its KV positions: the new tokens sit at positions
seqlens_k[b] + 1 - (its new tokens) onward. T is float32 (model.onnx) or float16 (FP16_MODEL_FILE,
the CUDA twin, when manifest extra["fp16_graph"] is set).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "switchyard.json"
MODEL_FILE = "model.onnx"
FP16_MODEL_FILE = "model-fp16.onnx"  # the fused graph in float16, for CUDA (extra["fp16_graph"])


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a llama-shaped decoder (HF naming)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    head_dim: int = 0  # 0 → hidden_size // num_attention_heads

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlamaConfig":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


# Weight names and shapes (HF convention, numpy float32, Linear weights are [out, in]):
#   model.embed_tokens.weight                      [vocab, hidden]
#   model.layers.{i}.input_layernorm.weight        [hidden]
#   model.layers.{i}.self_attn.q_proj.weight       [heads * head_dim, hidden]
#   model.layers.{i}.self_attn.k_proj.weight       [kv_heads * head_dim, hidden]
#   model.layers.{i}.self_attn.v_proj.weight       [kv_heads * head_dim, hidden]
#   model.layers.{i}.self_attn.o_proj.weight       [hidden, heads * head_dim]
#   model.layers.{i}.post_attention_layernorm.weight [hidden]
#   model.layers.{i}.mlp.gate_proj.weight          [intermediate, hidden]
#   model.layers.{i}.mlp.up_proj.weight            [intermediate, hidden]
#   model.layers.{i}.mlp.down_proj.weight          [hidden, intermediate]
#   model.norm.weight                              [hidden]
#   lm_head.weight                                 [vocab, hidden]  (absent when tied)
# Rotary embedding uses HF's rotate_half convention (first half / second half of head_dim).


@dataclass(frozen=True)
class ModelManifest:
    """What the services need to know about a model folder (written as switchyard.json)."""

    name: str
    config: LlamaConfig
    variant: str = "fp32"  # "fp32" or "int4"
    context_length: int = 2048
    max_output_tokens: int = 1024
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    source: str = ""  # where the weights came from, e.g. the GGUF path or "random(seed=0)"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelManifest":
        data = json.loads(text)
        data["config"] = LlamaConfig.from_dict(data["config"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        return cls(**data)

    def save(self, folder: Path) -> None:
        (folder / MANIFEST_FILE).write_text(self.to_json())

    @classmethod
    def load(cls, folder: Path) -> "ModelManifest":
        return cls.from_json((Path(folder) / MANIFEST_FILE).read_text())
