"""The worker's per-request spans and its Prometheus metrics.

Steps are shared by every running sequence, so per-request spans are written once, when a
sequence is removed, from the timestamps the engine kept: `worker.prefill` (first prompt
chunk → first token) and `worker.decode` (first token → removal, one summary span with the
number of steps and the largest batch). Both are children of the request's trace."""

from __future__ import annotations

import time
from typing import Iterable

from prometheus_client import Counter, Gauge, Histogram

from switchyard.telemetry.metrics import BATCH_BUCKETS, LATENCY_BUCKETS
from switchyard.telemetry.tracing import context_from_traceparent, tracer, tracing_enabled

from .engine import Sequence
from .prefix_cache import PrefixCache, PrefixCacheStats

STEP_SECONDS = Histogram("switchyard_worker_step_duration_seconds", "Time of one engine phase per step",
                         ["model", "phase"], buckets=LATENCY_BUCKETS)
DECODE_BATCH = Histogram("switchyard_worker_decode_batch_size", "Sequences per batched decode call",
                         ["model"], buckets=BATCH_BUCKETS)
ACTIVE = Gauge("switchyard_worker_active_sequences", "Sequences held by the worker", ["model"])
KV_TOKENS = Gauge("switchyard_kv_cache_tokens", "Tokens held in the KV cache", ["model"])
KV_USAGE = Gauge("switchyard_kv_cache_usage_ratio", "KV cache tokens over the worker's capacity "
                 "(max_sequences × context length)", ["model"])
# Prefix cache: hit rate = rate(hit_tokens) / rate(query_tokens).
PREFIX_QUERY_TOKENS = Counter("switchyard_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix "
                              "cache (full blocks)", ["model"])
PREFIX_HIT_TOKENS = Counter("switchyard_prefix_cache_hit_tokens", "Prompt tokens whose KV the prefix cache "
                            "supplied", ["model"])
PREFIX_STORED = Counter("switchyard_prefix_cache_blocks_stored", "Blocks stored in the prefix cache", ["model"])
PREFIX_EVICTED = Counter("switchyard_prefix_cache_blocks_evicted", "Blocks evicted from the prefix cache",
                         ["model"])
PREFIX_BYTES = Gauge("switchyard_prefix_cache_bytes", "Bytes of KV held by the prefix cache", ["model"])
PREFIX_CAPACITY = Gauge("switchyard_prefix_cache_capacity_bytes", "Prefix cache budget in bytes", ["model"])
_prefix_seen: dict[int, PrefixCacheStats] = {}  # last stats recorded, per cache: counters advance by the difference


def record_prefix_cache(model: str, cache: PrefixCache | None) -> None:
    if cache is None:
        return
    now = cache.stats()
    before = _prefix_seen.get(id(cache), PrefixCacheStats())
    _prefix_seen[id(cache)] = now
    for counter, delta in ((PREFIX_QUERY_TOKENS, now.query_tokens - before.query_tokens),
                           (PREFIX_HIT_TOKENS, now.hit_tokens - before.hit_tokens),
                           (PREFIX_STORED, now.stored_blocks - before.stored_blocks),
                           (PREFIX_EVICTED, now.evicted_blocks - before.evicted_blocks)):
        if delta > 0:
            counter.labels(model).inc(delta)
    PREFIX_BYTES.labels(model).set(now.bytes_used)
    PREFIX_CAPACITY.labels(model).set(now.capacity_bytes)


def record_step(model: str, prefill_s: float, decode_s: float, batch: int, kv_tokens: int, active: int,
                capacity_tokens: int) -> None:
    if prefill_s:
        STEP_SECONDS.labels(model, "prefill").observe(prefill_s)
    if batch:
        STEP_SECONDS.labels(model, "decode").observe(decode_s)
        DECODE_BATCH.labels(model).observe(batch)
    ACTIVE.labels(model).set(active)
    KV_TOKENS.labels(model).set(kv_tokens)
    KV_USAGE.labels(model).set(kv_tokens / max(capacity_tokens, 1))


def record_sequence_spans(sequences: Iterable[Sequence], model: str) -> None:
    if not tracing_enabled():
        return  # tracing off: nothing to build
    t = tracer()
    now = time.time_ns()
    for seq in sequences:
        if not seq.traceparent or not seq.prefill_started_ns:
            continue
        parent = context_from_traceparent(seq.traceparent)
        attrs = {"switchyard.model": model, "switchyard.sequence_id": seq.sequence_id,
                 "switchyard.prompt_tokens": int(len(seq.prompt))}
        end_prefill = seq.first_token_ns or now
        t.start_span("worker.prefill", context=parent, start_time=seq.prefill_started_ns,
                     attributes=attrs).end(end_time=end_prefill)
        if seq.first_token_ns:
            t.start_span("worker.decode", context=parent, start_time=seq.first_token_ns, attributes={
                **attrs, "switchyard.output_tokens": len(seq.generated), "switchyard.decode_steps": seq.decode_steps,
                "switchyard.batch_size": seq.max_batch}).end(end_time=now)
