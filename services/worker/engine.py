"""The inference engine of one replica: ONNX Runtime session, per-sequence KV cache, sampling.

Ragged batching without a per-sequence loop: every running sequence lives in one decode
batch whose KV tensors are [batch, kv_heads, T, head_dim]. A sequence shorter than T is
left-padded and its padding masked by `attention_mask`; its rotary positions come from its
own length, so padding never changes its results. A decode step is one ONNX Runtime call for
the whole batch, and its `present.*` outputs become the next step's `past_key_values.*`
inputs as OrtValues (I/O binding), so on CUDA the cache stays on the device and per step
only token ids go in and only logits come out. Joins and leaves (rare next to steps) rebuild
the batch tensors on the host.

Prefix cache (`prefix_cache.py`): a new sequence whose leading 16-token blocks are cached
starts with their KV and prefills only the rest. Blocks are copied into the cache only when a
prompt completes and when a sequence is removed (never per decode step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from switchyard.model.config import MODEL_FILE, ModelManifest
from switchyard.prefix.blocks import BLOCK_SIZE, block_hashes

from .prefix_cache import PrefixCache
from .sampling import SamplingParams, sample_token

log = logging.getLogger(__name__)
_NO_RNG = np.random.default_rng(0)  # greedy sampling never draws


class EngineError(Exception):
    """A request to the engine cannot be carried out (bad id, over capacity, too long)."""


@dataclass
class Sequence:
    """One generation's state on the worker."""

    sequence_id: str
    prompt: np.ndarray
    params: SamplingParams
    seed: int
    processed: int = 0  # prompt tokens whose KV is cached
    private_kv: list[ort.OrtValue] | None = None  # KV while prefilling (before joining the batch)
    generated: list[int] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    traceparent: str = ""
    generated_offset: int = 0  # tokens generated before this sequence was added (failover)
    prompt_hashes: list[int] = field(default_factory=list)  # chained hashes of the prompt's full blocks
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # Timings for the worker's per-request spans (time.time_ns()).
    prefill_started_ns: int = 0
    first_token_ns: int = 0
    decode_steps: int = 0
    max_batch: int = 0

    def token_rng(self) -> np.random.Generator:
        """The random stream of the next token, addressed by (seed, output position): a
        generation continued on another replica (prompt + the tokens so far, same seed,
        `generated_offset`) samples exactly what it would have here, whatever the batch."""
        if self.params.greedy:
            return _NO_RNG
        return np.random.default_rng((self.seed, self.generated_offset + len(self.generated)))

    @property
    def prefill_remaining(self) -> int:
        return len(self.prompt) - self.processed

    @property
    def cache_length(self) -> int:
        """Tokens in the KV cache: the prompt plus every generated token but the last."""
        return self.processed + max(len(self.generated) - 1, 0)


@dataclass
class StepResult:
    """What one engine step produced."""

    tokens: list[tuple[str, int, bool]]  # (sequence id, token id, is first token), in step order
    prefill_remaining: dict[str, int]
    decode_batch_size: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0
    cached_prompt_tokens: dict[str, int] = field(default_factory=dict)  # per sequence whose first token is here
    prefill_s: float = 0.0
    decode_s: float = 0.0
    sample_s: float = 0.0


def choose_providers(preference: str = "auto") -> list[str]:
    """CUDA when available (or asked for), CPU otherwise."""
    available = ort.get_available_providers()
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preference == "cuda":
        raise EngineError(f"CUDAExecutionProvider is not available (have {available})")
    return ["CPUExecutionProvider"]


class Engine:
    """Owns the ONNX Runtime session and every sequence's KV cache. Not thread-safe: the
    worker server calls it from one thread."""

    def __init__(self, model_dir: Path, *, max_sequences: int = 32, threads: int = 0,
                 provider: str = "auto", spin: bool = False, prefix_cache_bytes: int = 0) -> None:
        self.model_dir = Path(model_dir)
        self.manifest = ModelManifest.load(self.model_dir)
        self.config = self.manifest.config
        self.max_sequences = max_sequences
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning ORT threads burn the cores that the batcher, router and NATS share with us
        # between steps (on 2 shared cores it doubled the stack's p90 step latency); a worker
        # with cores of its own decodes ~25% faster with spinning on (`spin`).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(str(self.model_dir / MODEL_FILE), sess_options=options,
                                            providers=choose_providers(provider))
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        n = self.config.num_hidden_layers
        self._past_names = [f"past_key_values.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
        self._present_names = [f"present.{i}.{kind}" for i in range(n) for kind in ("key", "value")]
        self._kv_shape = (self.config.num_key_value_heads, self.config.head_dim)
        self.sequences: dict[str, Sequence] = {}
        # The decode batch: ids in row order, KV per past name, attention mask [B, T].
        self._batch_ids: list[str] = []
        self._batch_kv: list[ort.OrtValue] = []
        self._batch_mask = np.zeros((0, 0), dtype=np.int64)
        # KV of finished and prefilled prefixes, named by chained block hashes in the model's
        # namespace (the router computes the same hashes to find the replica holding a prefix).
        self.prefix_cache = PrefixCache(prefix_cache_bytes, BLOCK_SIZE) if prefix_cache_bytes > 0 else None
        log.info("engine ready: model=%s provider=%s layers=%d", self.manifest.name, self.provider, n)

    # ---- bookkeeping -------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.manifest.context_length

    @property
    def kv_tokens(self) -> int:
        return sum(s.cache_length for s in self.sequences.values())

    def add_many(self, specs: list[dict[str, Any]]) -> None:
        """Add several sequences (add()'s keyword arguments each), all or none: when one is
        refused, those added before it are taken out again, so the caller can retry the good
        ones without "already exists"."""
        added: list[str] = []
        try:
            for spec in specs:
                self.add(**spec)
                added.append(spec["sequence_id"])
        except BaseException:
            for sequence_id in added:  # not prefilled yet: the entry is all there is to undo
                self.sequences.pop(sequence_id, None)
            raise

    def add(self, sequence_id: str, prompt: list[int] | np.ndarray, params: SamplingParams,
            seed: int, traceparent: str = "", generated_offset: int = 0) -> None:
        """Register a sequence. `generated_offset` > 0 continues a generation begun elsewhere
        (failover): the prompt ends with those tokens and sampling resumes at that position."""
        if sequence_id in self.sequences:
            raise EngineError(f"sequence {sequence_id!r} already exists")
        if len(self.sequences) >= self.max_sequences:
            raise EngineError(f"worker holds {self.max_sequences} sequences already")
        prompt_arr = np.asarray(prompt, dtype=np.int64)
        if prompt_arr.size == 0:
            raise EngineError("prompt must have at least one token")
        if prompt_arr.size >= self.context_length:
            raise EngineError(f"prompt of {prompt_arr.size} tokens does not fit the context of "
                              f"{self.context_length}")
        if prompt_arr.min() < 0 or prompt_arr.max() >= self.config.vocab_size:
            raise EngineError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        if generated_offset < 0:
            raise EngineError("generated_offset must not be negative")
        seq = Sequence(sequence_id, prompt_arr, params, seed, seen=set(prompt_arr.tolist()),
                       traceparent=traceparent, generated_offset=generated_offset)
        if self.prefix_cache is not None:
            self._reuse_prefix(seq)
        self.sequences[sequence_id] = seq

    def _hashes(self, tokens: np.ndarray) -> list[int]:
        return block_hashes(tokens, self.manifest.name)

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Seed a new sequence's KV with its longest cached prefix, so prefill computes only the
        rest. At most (len-1)//B blocks: one prompt token is always prefilled, for its logits."""
        assert self.prefix_cache is not None
        seq.prompt_hashes = self._hashes(seq.prompt)
        wanted = seq.prompt_hashes[:(len(seq.prompt) - 1) // BLOCK_SIZE]
        n = self.prefix_cache.lookup(wanted)
        if n == 0:
            return
        kv = self.prefix_cache.assemble(wanted[:n])
        seq.private_kv = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(kv[i][None]), self.device, 0)
                          for i in range(len(self._past_names))]
        seq.processed = seq.cached_tokens = n * BLOCK_SIZE

    def _keep_prefix(self, hashes: list[int], kv: list[np.ndarray]) -> None:
        """Offer a prefix's blocks to the cache (`kv` per past name [kv_heads, T, head_dim],
        starting at token 0); blocks already held cost nothing."""
        if self.prefix_cache is not None and hashes:
            self.prefix_cache.insert(hashes, kv)

    def remove(self, sequence_ids: list[str]) -> list[Sequence]:
        """Free sequences (unknown ids are ignored); returns the removed ones. Their KV (prompt
        and generated tokens) goes to the prefix cache first: a chat's next turn repeats this
        prompt and answer."""
        gone = [seq for sid in sequence_ids if (seq := self.sequences.pop(sid, None)) is not None]
        ids = {seq.sequence_id for seq in gone}
        rows = [i for i, sid in enumerate(self._batch_ids) if sid in ids]
        # The batch's KV on the host, once: for the cache and for the rows that stay.
        needed = rows and (self.prefix_cache is not None or len(rows) < len(self._batch_ids))
        host = self._host_kv() if needed else None
        if self.prefix_cache is not None:
            for seq in gone:
                if seq.private_kv is not None and seq.processed >= BLOCK_SIZE:  # left mid-prefill
                    self._keep_prefix(self._hashes(seq.prompt[:seq.processed]),
                                      [v.numpy()[0] for v in seq.private_kv])
            by_id = {seq.sequence_id: seq for seq in gone}
            for row in rows:
                self._keep_row(by_id[self._batch_ids[row]], row, host)  # type: ignore[arg-type]
        if rows:
            self._drop_rows(rows, host)
        return gone

    def _keep_row(self, seq: Sequence, row: int, host: list[np.ndarray]) -> None:
        """Cache the blocks of a decode-batch row: its last cache_length columns (rows are
        left-padded, the mask is 1 on them) hold the KV of its prompt and generated tokens but
        the last."""
        n = int(self._batch_mask[row].sum())
        if n != seq.cache_length:  # never expected; a wrong block would corrupt later outputs
            log.warning("not caching %s: %d KV columns for %d tokens", seq.sequence_id, n, seq.cache_length)
            return
        if n < BLOCK_SIZE:
            return
        tokens = np.concatenate([seq.prompt, np.asarray(seq.generated, dtype=np.int64)])[:n]
        width = host[0].shape[2]
        self._keep_prefix(self._hashes(tokens), [a[row, :, width - n:, :] for a in host])

    # ---- one iteration -----------------------------------------------------------------
    def step(self, prefill: list[tuple[str, int]], decode: bool, decode_steps: int = 1) -> StepResult:
        """Run `decode_steps` decode steps of the batch back to back (one token per sequence
        each), then prompt chunks (sequence id, max tokens or 0 for all remaining); a sequence
        whose prompt completes here joins the batch and decodes from the next step on."""
        result = StepResult(tokens=[], prefill_remaining={})
        if decode and self._batch_ids:
            room = min(self.context_length - 1 - self.sequences[sid].cache_length for sid in self._batch_ids)
            for _ in range(max(1, min(decode_steps, room))):
                self._decode(result)
        t0 = time.perf_counter()
        whole: list[Sequence] = []  # prompts that run start to end now: prefilled together
        for sequence_id, max_tokens in prefill:
            seq = self.sequences.get(sequence_id)
            if seq is None:
                raise EngineError(f"unknown sequence {sequence_id!r}")
            if seq.prefill_remaining == 0:
                continue
            n = seq.prefill_remaining if max_tokens <= 0 else min(max_tokens, seq.prefill_remaining)
            seq.prefill_started_ns = seq.prefill_started_ns or time.time_ns()
            result.prefill_tokens += n
            if seq.processed == 0 and n == len(seq.prompt):
                whole.append(seq)
                continue
            logits = self._prefill_chunk(seq, n)
            if seq.prefill_remaining == 0:
                self._first_token(seq, logits[0, -1], result)
                own = [v.numpy() for v in seq.private_kv or []]
                seq.private_kv = None
                self._keep_prefix(seq.prompt_hashes, [a[0] for a in own])
                self._join_rows([seq.sequence_id], own, np.ones((1, own[0].shape[2]), dtype=np.int64))
            else:
                result.prefill_remaining[seq.sequence_id] = seq.prefill_remaining
        for group in _prefill_groups(whole):
            self._prefill_together(group, result)
        result.prefill_s = time.perf_counter() - t0
        return result

    def _first_token(self, seq: Sequence, logits: np.ndarray, result: StepResult) -> None:
        t_s = time.perf_counter()
        token = self._sample(seq, logits)
        seq.first_token_ns = time.time_ns()
        result.sample_s += time.perf_counter() - t_s
        result.tokens.append((seq.sequence_id, token, True))
        result.cached_prompt_tokens[seq.sequence_id] = seq.cached_tokens

    def _prefill_together(self, seqs: list[Sequence], result: StepResult) -> None:
        """Whole prompts in one ONNX Runtime call: left-padded to the longest, padding masked,
        positions counted per row. The rows come out laid out as the decode batch wants them
        (padding on the left), so they join it as they are."""
        lengths = [len(s.prompt) for s in seqs]
        width = max(lengths)
        ids = np.zeros((len(seqs), width), dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        positions = np.zeros((len(seqs), width), dtype=np.int64)
        for row, (seq, length) in enumerate(zip(seqs, lengths)):
            ids[row, width - length:] = seq.prompt
            mask[row, width - length:] = 1
            positions[row, width - length:] = np.arange(length)
        logits, present = self._run({"input_ids": ids, "attention_mask": mask, "position_ids": positions},
                                    self._empty_kv(len(seqs), 0))
        kv = [p.numpy() for p in present]
        for row, (seq, length) in enumerate(zip(seqs, lengths)):
            seq.processed = length
            self._first_token(seq, logits[row, -1], result)
            self._keep_prefix(seq.prompt_hashes, [a[row, :, width - length:, :] for a in kv])
        self._join_rows([s.sequence_id for s in seqs], kv, mask)

    def _run(self, feeds: dict[str, np.ndarray], past: list[ort.OrtValue]) -> tuple[np.ndarray, list[ort.OrtValue]]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self._past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])

    def _empty_kv(self, batch: int, length: int) -> list[ort.OrtValue]:
        zeros = np.zeros((batch, *self._kv_shape[:1], length, self._kv_shape[1]), dtype=np.float32)
        return [ort.OrtValue.ortvalue_from_numpy(zeros, self.device, 0) for _ in self._past_names]

    def _prefill_chunk(self, seq: Sequence, n: int) -> np.ndarray:
        start = seq.processed
        ids = seq.prompt[start:start + n][None, :]
        past = seq.private_kv if seq.private_kv is not None else self._empty_kv(1, 0)
        feeds = {
            "input_ids": np.ascontiguousarray(ids),
            "attention_mask": np.ones((1, start + n), dtype=np.int64),
            "position_ids": np.arange(start, start + n, dtype=np.int64)[None, :],
        }
        logits, seq.private_kv = self._run(feeds, past)
        seq.processed += n
        return logits

    def _decode(self, result: StepResult) -> None:
        """One batched ONNX Runtime call over every sequence in the batch."""
        t0 = time.perf_counter()
        seqs = [self.sequences[sid] for sid in self._batch_ids]
        ids = np.array([[s.generated[-1]] for s in seqs], dtype=np.int64)
        positions = np.array([[s.cache_length] for s in seqs], dtype=np.int64)
        mask = np.concatenate([self._batch_mask, np.ones((len(seqs), 1), dtype=np.int64)], axis=1)
        logits, present = self._run(
            {"input_ids": ids, "attention_mask": mask, "position_ids": positions}, self._batch_kv)
        self._batch_kv, self._batch_mask = present, mask
        result.decode_s += time.perf_counter() - t0
        result.decode_batch_size = len(seqs)
        result.decode_steps += 1
        t_s = time.perf_counter()
        last = logits[:, -1, :]
        greedy_rows = [i for i, s in enumerate(seqs) if s.params.plain_greedy]
        picked = dict(zip(greedy_rows, np.argmax(last[greedy_rows], axis=-1).tolist())) if greedy_rows else {}
        for row, seq in enumerate(seqs):
            token = picked[row] if row in picked else sample_token(
                last[row], seq.params, seq.seen, seq.token_rng())
            seq.generated.append(token)
            seq.seen.add(token)
            seq.decode_steps += 1
            seq.max_batch = max(seq.max_batch, len(seqs))
            result.tokens.append((seq.sequence_id, token, False))
        result.sample_s += time.perf_counter() - t_s

    def _sample(self, seq: Sequence, logits: np.ndarray) -> int:
        token = sample_token(logits, seq.params, seq.seen, seq.token_rng())
        seq.generated.append(token)
        seq.seen.add(token)
        return token

    # ---- batch membership ----------------------------------------------------------------
    def _host_kv(self) -> list[np.ndarray]:
        return [v.numpy() for v in self._batch_kv]

    def _set_batch(self, ids: list[str], kv: list[np.ndarray], mask: np.ndarray) -> None:
        self._batch_ids = ids
        self._batch_mask = np.ascontiguousarray(mask)
        self._batch_kv = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0) for a in kv]

    def _join_rows(self, ids: list[str], kv: list[np.ndarray], mask: np.ndarray) -> None:
        """Append rows (KV per past name [rows, kv_heads, T, head_dim] and their mask) to the
        decode batch, left-padding whichever side is shorter."""
        if not self._batch_ids:
            self._set_batch(list(ids), kv, mask)
            return
        batch_kv = self._host_kv()
        target = max(batch_kv[0].shape[2], kv[0].shape[2])
        self._set_batch(self._batch_ids + list(ids),
                        [np.concatenate([_left_pad(a, target), _left_pad(b, target)], axis=0)
                         for a, b in zip(batch_kv, kv)],
                        np.concatenate([_left_pad_mask(self._batch_mask, target), _left_pad_mask(mask, target)], axis=0))

    def _drop_rows(self, rows: list[int], host: list[np.ndarray] | None = None) -> None:
        dropped = set(rows)
        keep = [i for i in range(len(self._batch_ids)) if i not in dropped]
        if not keep:
            self._batch_ids, self._batch_kv = [], []
            self._batch_mask = np.zeros((0, 0), dtype=np.int64)
            return
        mask = self._batch_mask[keep]
        # Columns that are padding in every remaining row are dropped (compaction).
        first = int(np.argmax(mask.any(axis=0)))
        self._set_batch([self._batch_ids[i] for i in keep],
                        [a[keep][:, :, first:, :] for a in (host if host is not None else self._host_kv())],
                        mask[:, first:])

    # ---- convenience ---------------------------------------------------------------------
    def generate(self, prompt: list[int], max_tokens: int, params: SamplingParams | None = None,
                 seed: int = 0, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Run one sequence alone to the end (reference path for tests and benchmarks)."""
        sid = f"direct-{time.monotonic_ns()}"
        self.add(sid, prompt, params or SamplingParams(), seed)
        out: list[int] = []
        try:
            result = self.step([(sid, 0)], decode=False)
            while True:
                out += [tok for s, tok, _ in result.tokens if s == sid]
                if len(out) >= max_tokens or (out and out[-1] in stop_ids) or \
                        self.sequences[sid].cache_length + 1 >= self.context_length:
                    return out[:max_tokens]
                result = self.step([], decode=True)
        finally:
            self.remove([sid])


def _prefill_groups(seqs: list[Sequence], max_padding: float = 0.5) -> list[list[Sequence]]:
    """Group whole prompts for batched prefill, longest first; a prompt joins a group only
    if padding it to the group's width wastes at most `max_padding` of its row (a 10-token
    prompt does not ride with a 500-token one)."""
    groups: list[list[Sequence]] = []
    for seq in sorted(seqs, key=lambda s: len(s.prompt), reverse=True):
        if groups and len(seq.prompt) >= (1 - max_padding) * len(groups[-1][0].prompt):
            groups[-1].append(seq)
        else:
            groups.append([seq])
    return groups


def _left_pad(a: np.ndarray, width: int) -> np.ndarray:
    pad = width - a.shape[2]
    if pad == 0:
        return a
    return np.pad(a, ((0, 0), (0, 0), (pad, 0), (0, 0)))


def _left_pad_mask(mask: np.ndarray, width: int) -> np.ndarray:
    pad = width - mask.shape[1]
    return mask if pad == 0 else np.pad(mask, ((0, 0), (pad, 0)))
