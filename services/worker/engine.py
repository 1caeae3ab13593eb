"""The inference engine of one replica: ONNX Runtime session, sequences, sampling.

Ragged batching without a per-sequence loop: every running sequence is a row of one decode
batch, and a decode step is one ONNX Runtime call for the whole batch. Where the rows' KV lives
and how a step extends it depends on the graph (decode_batch.py): `FusedBatch` for graphs on
ONNX Runtime's fused operators (KV in a preallocated device pool, appended in place),
`PlainBatch` for plain-op graphs (left-padded rows, KV concatenated per step).

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
from onnx import TensorProto

from switchyard.model.config import FP16_MODEL_FILE, MODEL_FILE, ModelManifest
from switchyard.model.folder import graph_kind
from switchyard.prefix.blocks import BLOCK_SIZE, block_hashes

from .decode_batch import DecodeBatch
from .device_sampler import DeviceSampler
from .fused_batch import FusedBatch
from .kv_blocks import DeviceBlocks
from .plain_batch import PlainBatch
from .prefix_cache import PrefixCache
from .providers import assert_provider, choose_providers
from .sampling import SamplingParams, sample_token

log = logging.getLogger(__name__)
_NO_RNG = np.random.default_rng(0)  # greedy sampling never draws
GREEDY = SamplingParams()


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
    private_kv: Any = None  # the decode batch's own KV of this sequence while its prompt is prefilled in chunks
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


class Engine:
    """Owns the ONNX Runtime session and every sequence's KV cache. Not thread-safe: the
    worker server calls it from one thread."""

    def __init__(self, model_dir: Path, *, max_sequences: int = 32, threads: int = 0,
                 provider: str = "auto", spin: bool = False, prefix_cache_bytes: int = 0,
                 precision: str = "auto", cuda_graph: bool = False, profile_prefix: str = "",
                 device_sampling: str = "auto", device_prefix_cache: str = "auto") -> None:
        """``precision``: "auto" runs a fused graph's float16 twin (manifest extra["fp16_graph"])
        on CUDA and model.onnx otherwise; "float16" / "float32" pick one (float16 must exist).
        ``cuda_graph``: replay decode steps from captured CUDA graphs (fused graph on CUDA only).
        ``profile_prefix``: ONNX Runtime's profiler on for the model session, its JSON written at
        ``end_profiling()`` under this prefix (benchmarks: where a step's time goes).
        ``device_sampling``: sample decode steps (temperature, top-k, top-p) with the sampler
        graph where the logits are, not in numpy on the host: "auto" on CUDA (no [batch, vocab]
        copy per step), "on", "off" (bench/sampling_bench.py: on the CPU numpy is faster for
        temperature-only and top-k rows, the graph for top-p).
        ``device_prefix_cache``: keep prefix-cache blocks as device tensors cut from and placed
        into the KV pool there (fused graph): "auto" on CUDA (no KV through the host), "on", "off"."""
        self.model_dir = Path(model_dir)
        self.manifest = ModelManifest.load(self.model_dir)
        self.config = self.manifest.config
        self.max_sequences = max_sequences
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        # Spinning ORT threads burn the cores that the batcher, router and NATS share with us
        # between steps (on 2 shared cores it doubled the stack's p90 step latency); a worker
        # with cores of its own decodes ~25% faster with spinning on (`spin`).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        providers = choose_providers(provider)
        self.model_file = model_file(self.manifest, precision, providers[0])
        if cuda_graph and (providers[0] != "CUDAExecutionProvider" or graph_kind(self.manifest) != "fused"):
            raise EngineError("CUDA graphs need the CUDA provider and a fused graph "
                              f"(have {providers[0]}, {graph_kind(self.manifest)} graph)")
        session_providers: list = ([("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), *providers[1:]]
                                   if cuda_graph else providers)
        self.session = ort.InferenceSession(str(self.model_dir / self.model_file), sess_options=options,
                                            providers=session_providers)
        assert_provider(self.session, providers)  # ORT falls back to the CPU silently
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        n = self.config.num_hidden_layers
        self.graph = graph_kind(self.manifest)
        self.sequences: dict[str, Sequence] = {}
        kv_heads, head_dim = self.config.num_key_value_heads, self.config.head_dim
        if device_prefix_cache not in ("auto", "on", "off"):
            raise EngineError(f"device_prefix_cache must be auto, on or off, got {device_prefix_cache!r}")
        device_blocks = prefix_cache_bytes > 0 and self.graph == "fused" and (
            device_prefix_cache == "on" or (device_prefix_cache == "auto" and self.device == "cuda"))
        self.batch: DecodeBatch = (
            FusedBatch(self.session, providers, self.device, n, kv_heads, head_dim,
                       max_rows=max_sequences, max_length=self.context_length, cuda_graph=cuda_graph,
                       block_size=BLOCK_SIZE if device_blocks else 0)
            if self.graph == "fused" else PlainBatch(self.session, self.device, n, kv_heads, head_dim))
        # The fused batch whose prefix-cache blocks live on its device (None: numpy blocks).
        self._block_batch: FusedBatch | None = self.batch if device_blocks else None  # type: ignore[assignment]
        if device_sampling not in ("auto", "on", "off"):
            raise EngineError(f"device_sampling must be auto, on or off, got {device_sampling!r}")
        use_sampler = device_sampling == "on" or (device_sampling == "auto" and self.device == "cuda")
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == "logits")
        self.sampler = DeviceSampler(providers, TensorProto.FLOAT16 if "float16" in logits_type else TensorProto.FLOAT,
                                     threads=threads) if use_sampler else None
        # KV of finished and prefilled prefixes, named by chained block hashes in the model's
        # namespace (the router computes the same hashes to find the replica holding a prefix).
        self.prefix_cache = PrefixCache(prefix_cache_bytes, BLOCK_SIZE) if prefix_cache_bytes > 0 else None
        graphs = self.batch.graphs if isinstance(self.batch, FusedBatch) else None
        captured = graphs.capture_all() if graphs is not None else []
        log.info("engine ready: model=%s graph=%s provider=%s layers=%d cuda_graphs=%s", self.manifest.name,
                 self.graph, self.provider, n, f"on, buckets {captured} captured" if captured else "off")

    def end_profiling(self) -> str:
        """Stop ONNX Runtime's profiler (``profile_prefix``) and return its JSON file's path."""
        return self.session.end_profiling()

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
        if self._block_batch is not None:
            self._block_batch.seed_blocks(seq, self.prefix_cache.blocks(wanted[:n]))
        else:
            self.batch.seed(seq, self.prefix_cache.assemble(wanted[:n]))
        seq.processed = seq.cached_tokens = n * BLOCK_SIZE

    @property
    def _device_blocks(self) -> DeviceBlocks | None:
        return self._block_batch.blocks if self._block_batch is not None else None

    def _keep_prefix(self, hashes: list[int], kv: list[np.ndarray]) -> None:
        """Offer a prefix's blocks to the cache (`kv` per past name [kv_heads, T, head_dim],
        starting at token 0); blocks already held cost nothing."""
        if self.prefix_cache is not None and hashes:
            self.prefix_cache.insert(hashes, kv)

    def _keep_device_chains(self, sources: list[tuple[int, list[int]]], chains: list[tuple[list[int], int]]) -> None:
        """Cache blocks cut on the device from rows of KV at (address, shape) per past name:
        each chain is (hashes of a row's first blocks, row). Every block not held yet, of all
        the chains, is cut in one run (on CUDA a run costs its launches, and a step's leavers
        or a prefilled group come together); the cache then takes what its budget allows."""
        blocks, cache = self._device_blocks, self.prefix_cache
        if blocks is None or cache is None or not chains:
            return
        wanted: dict[int, tuple[int, int]] = {}  # block hash → (row, block index), first chain naming it
        for hashes, row in chains:
            for i, h in enumerate(hashes):
                if h not in cache and h not in wanted:
                    wanted[h] = (row, i)
        cut = dict(zip(wanted, blocks.cut(sources, list(wanted.values())), strict=True))

        def make(hashes: list[int], row: int, positions: list[int]) -> list[ort.OrtValue]:
            # a block evicted by an earlier chain of this call was not cut above: cut it now
            return [cut[hashes[i]] if hashes[i] in cut else blocks.cut(sources, [(row, i)])[0] for i in positions]

        for hashes, row in chains:
            cache.insert_blocks(hashes, lambda positions, hashes=hashes, row=row: make(hashes, row, positions),
                                blocks.block_bytes)

    def _keep_private(self, seq: Sequence, hashes: list[int]) -> None:
        """Cache the blocks of a prompt prefilled in its own buffer (chunks or a cached start)."""
        if self._block_batch is not None:
            self._keep_device_chains(self._block_batch.private_sources(seq), [(hashes, 0)])
        else:
            self._keep_prefix(hashes, self.batch.private_kv(seq))

    def _keep_rows(self, rows: list[tuple[str, int, list[int]]]) -> None:
        """Cache the blocks of decode-batch rows, each (sequence id, the KV positions its row
        holds, hashes of its first blocks); on the device all in one cut."""
        batch = self._block_batch
        chains: list[tuple[list[int], int]] = []
        for sequence_id, n, hashes in rows:
            row = batch.row_holding(sequence_id, n) if batch is not None else None
            kv = self.batch.row_kv(sequence_id, n) if batch is None else None
            if row is None and kv is None:  # never expected; a wrong block would corrupt later outputs
                log.warning("not caching %s: its row does not hold %d KV positions", sequence_id, n)
            elif kv is not None:
                self._keep_prefix(hashes, kv)
            else:
                chains.append((hashes, row))
        if batch is not None:
            self._keep_device_chains(batch.pool_sources(), chains)

    def remove(self, sequence_ids: list[str]) -> list[Sequence]:
        """Free sequences (unknown ids are ignored); returns the removed ones. Their KV (prompt
        and generated tokens but the last) goes to the prefix cache first: a chat's next turn
        repeats this prompt and answer."""
        gone = [seq for sid in sequence_ids if (seq := self.sequences.pop(sid, None)) is not None]
        in_batch = set(self.batch.ids)
        if self.prefix_cache is not None:
            rows: list[tuple[str, int, list[int]]] = []
            for seq in gone:
                if seq.private_kv is not None and seq.processed >= BLOCK_SIZE:  # left mid-prefill
                    self._keep_private(seq, self._hashes(seq.prompt[:seq.processed]))
                elif seq.sequence_id in in_batch and (n := seq.cache_length) >= BLOCK_SIZE:
                    tokens = np.concatenate([seq.prompt, np.asarray(seq.generated, dtype=np.int64)])[:n]
                    rows.append((seq.sequence_id, n, self._hashes(tokens)))
            self._keep_rows(rows)
        self.batch.drop({seq.sequence_id for seq in gone})
        return gone

    # ---- one iteration -----------------------------------------------------------------
    def step(self, prefill: list[tuple[str, int]], decode: bool, decode_steps: int = 1) -> StepResult:
        """Run `decode_steps` decode steps of the batch back to back (one token per sequence
        each), then prompt chunks (sequence id, max tokens or 0 for all remaining); a sequence
        whose prompt completes here joins the batch and decodes from the next step on."""
        result = StepResult(tokens=[], prefill_remaining={})
        if decode and self.batch.ids:
            # Several steps stop where the longest row would pass the context (one step always
            # runs: the batcher never asks one of a row at its end).
            room = 1 if decode_steps <= 1 else min(
                self.context_length - 1 - self.sequences[sid].cache_length for sid in self.batch.ids)
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
            logits = self.batch.prefill_chunk(seq, n)
            seq.processed += n
            if seq.prefill_remaining == 0:
                self._first_token(seq, logits, result)
                if self.prefix_cache is not None and seq.prompt_hashes:
                    self._keep_private(seq, seq.prompt_hashes)
                self.batch.join(seq)
            else:
                result.prefill_remaining[seq.sequence_id] = seq.prefill_remaining
        for group in _prefill_groups(whole):
            self._prefill_together(group, result)
        result.prefill_s = time.perf_counter() - t0
        return result

    def _first_token(self, seq: Sequence, logits: np.ndarray, result: StepResult, best: int | None = None) -> None:
        """Sample (or take the graph's argmax ``best`` for plain greedy) the prompt's first token."""
        t_s = time.perf_counter()
        if best is not None and seq.params.plain_greedy:
            token = best
            seq.generated.append(token)
            seq.seen.add(token)
        else:
            token = self._sample(seq, logits)
        seq.first_token_ns = time.time_ns()
        result.sample_s += time.perf_counter() - t_s
        result.tokens.append((seq.sequence_id, token, True))
        result.cached_prompt_tokens[seq.sequence_id] = seq.cached_tokens

    def _prefill_together(self, seqs: list[Sequence], result: StepResult) -> None:
        """Whole prompts in one ONNX Runtime call; their rows join the decode batch."""
        logits, best = self.batch.prefill_whole(seqs)
        for row, seq in enumerate(seqs):
            seq.processed = len(seq.prompt)
            self._first_token(seq, logits[row], result, None if best is None else int(best[row]))
        if self.prefix_cache is not None:
            self._keep_group_prefix(seqs)

    def _keep_group_prefix(self, seqs: list[Sequence]) -> None:
        """Cache the prompt blocks of sequences just prefilled together (one cut on the device;
        a shared system prompt's blocks are usually held already and not cut again)."""
        self._keep_rows([(seq.sequence_id, len(seq.prompt), seq.prompt_hashes) for seq in seqs if seq.prompt_hashes])

    def _decode(self, result: StepResult) -> None:
        """One batched ONNX Runtime call over every sequence in the batch."""
        t0 = time.perf_counter()
        seqs = [self.sequences[sid] for sid in self.batch.ids]
        plain = [s.params.plain_greedy for s in seqs]
        greedy_rows = [row for row, is_plain in enumerate(plain) if is_plain]
        sampled = [row for row, is_plain in enumerate(plain) if not is_plain]
        # Sampling where the logits are needs no row's history (repetition penalty: host).
        on_device = bool(sampled) and self.sampler is not None and all(
            s.params.repetition_penalty == 1.0 for s in seqs)
        logits, best = self.batch.decode(seqs, logits_on_host=bool(sampled) and not on_device)
        result.decode_s += time.perf_counter() - t0
        result.decode_batch_size = len(seqs)
        result.decode_steps += 1
        t_s = time.perf_counter()
        if best is not None:
            tokens: list[int | None] = best.tolist() if not sampled else [None] * len(seqs)
            for row in greedy_rows if sampled else ():
                tokens[row] = int(best[row])
        else:
            assert logits is not None
            tokens = [None] * len(seqs)
            if greedy_rows:
                for row, token in zip(greedy_rows, np.argmax(logits[greedy_rows], axis=-1).tolist()):
                    tokens[row] = token
        if on_device:
            for row, token in self._sample_on_device(seqs, sampled).items():
                tokens[row] = token
        n = len(seqs)
        for row, seq in enumerate(seqs):
            token = tokens[row]
            if token is None:
                token = sample_token(logits[row], seq.params, seq.seen, seq.token_rng())
            seq.generated.append(token)
            seq.seen.add(token)
            seq.decode_steps += 1
            if n > seq.max_batch:
                seq.max_batch = n
            result.tokens.append((seq.sequence_id, token, False))
        result.sample_s += time.perf_counter() - t_s

    def _sample_on_device(self, seqs: list[Sequence], rows: list[int]) -> dict[int, int]:
        """The sampled rows' tokens from the sampler graph; each row takes the one uniform
        draw numpy's choice would (`token_rng().random()`), so it samples what the host would."""
        assert self.sampler is not None
        logits = self.batch.device_logits()
        assert logits is not None
        padded = int(logits.shape[0] if isinstance(logits, np.ndarray) else logits.shape()[0])
        params = [s.params for s in seqs] + [GREEDY] * (padded - len(seqs))
        uniforms = [0.0] * padded
        for row in rows:
            uniforms[row] = seqs[row].token_rng().random()
        tokens = self.sampler.sample(logits, params, uniforms)
        return {row: int(tokens[row]) for row in rows}

    def _sample(self, seq: Sequence, logits: np.ndarray) -> int:
        token = sample_token(logits, seq.params, seq.seen, seq.token_rng())
        seq.generated.append(token)
        seq.seen.add(token)
        return token

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


def model_file(manifest: ModelManifest, precision: str, provider: str) -> str:
    """The graph file a session loads: the fused graph's float16 twin on CUDA when the folder has
    one ("auto"), or the one ``precision`` names."""
    has_fp16 = bool(manifest.extra.get("fp16_graph"))
    if precision not in ("auto", "float16", "float32"):
        raise EngineError(f"precision must be auto, float16 or float32, not {precision!r}")
    if precision == "float16" and not has_fp16:
        raise EngineError(f"{manifest.name} has no float16 graph (convert it with --fp16)")
    fp16 = precision == "float16" or (precision == "auto" and has_fp16 and provider == "CUDAExecutionProvider")
    return FP16_MODEL_FILE if fp16 else MODEL_FILE


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
