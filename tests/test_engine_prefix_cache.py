"""KV reuse through the worker Engine: a sequence whose prefix is cached prefills only the rest
and produces the same tokens, token for token, as the same engine with its cache switched off —
alone, batched with others, after a chat turn, and under a budget so small that blocks are
evicted all the time. The tiny model runs always; the real SmolLM2 folders (fp32, int4) are
`slow`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from services.worker.engine import Engine
from services.worker.sampling import SamplingParams
from switchyard.model.catalog import ModelCatalog
from switchyard.model.convert import FP32_MODEL_NAME, INT4_MODEL_NAME
from switchyard.prefix.blocks import BLOCK_SIZE

from conftest import TINY

MIB = 1 << 20
Job = tuple[list[int], int]  # (prompt, step at which it joins)


@contextmanager
def cache_off(engine: Engine) -> Iterator[Engine]:
    """The same engine (same session, same numerics) with no prefix cache: the reference."""
    saved, engine.prefix_cache = engine.prefix_cache, None
    try:
        yield engine
    finally:
        engine.prefix_cache = saved


def run_jobs(engine: Engine, jobs: dict[str, Job], n_tokens: int,
             chunk: int = 0) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Greedy-decode several sequences in one ragged batch, each joining at its step (prompt
    in `chunk`-token pieces when given); returns their tokens and cached prompt tokens."""
    out: dict[str, list[int]] = {sid: [] for sid in jobs}
    cached: dict[str, int] = {}
    step = 0
    try:
        while any(len(v) < n_tokens for v in out.values()):
            for sid, (prompt, at) in jobs.items():
                if at == step:
                    engine.add(sid, prompt, SamplingParams(), 0)
            prefilling = [sid for sid in jobs if sid in engine.sequences and engine.sequences[sid].prefill_remaining]
            result = engine.step([(sid, chunk) for sid in prefilling], decode=True)
            cached.update(result.cached_prompt_tokens)
            for sid, token, _ in result.tokens:
                out[sid].append(token)
            engine.remove([sid for sid, v in out.items() if len(v) >= n_tokens and sid in engine.sequences])
            step += 1
    finally:
        engine.remove(list(jobs))
    return {sid: v[:n_tokens] for sid, v in out.items()}, cached


def check_reuse(engine: Engine, system: list[int], questions: list[list[int]], n: int,
                roomy: bool = True) -> None:
    """The scenarios of the module on one engine: cold prompt, longer prompt sharing its
    prefix, a follow-up that contains a previous prompt and its answer, a batch mixing hits
    and misses; every output equal to the cache-off engine's. With a cache too small for
    everything (`roomy` false) only how much is reused changes, never the tokens."""
    assert engine.prefix_cache is not None
    engine.prefix_cache.clear()
    first = system + questions[0]
    with cache_off(engine):
        cold_ref = engine.generate(first, n)
    # cold: nothing cached yet
    out, cached = run_jobs(engine, {"cold": (first, 0)}, n)
    assert out["cold"] == cold_ref and cached["cold"] == 0
    # a longer prompt sharing the first one's full blocks
    longer = first + questions[1]
    with cache_off(engine):
        longer_ref = engine.generate(longer, n)
    out, cached = run_jobs(engine, {"longer": (longer, 0)}, n)
    assert cached["longer"] >= len(first) // BLOCK_SIZE * BLOCK_SIZE > 0 or not roomy
    assert out["longer"] == longer_ref
    # a follow-up turn: the previous prompt, its answer, a new question
    follow = first + cold_ref + questions[2]
    with cache_off(engine):
        follow_ref = engine.generate(follow, n)
    out, cached = run_jobs(engine, {"follow": (follow, 0)}, n)
    assert cached["follow"] == (len(first) + n - 1) // BLOCK_SIZE * BLOCK_SIZE or not roomy  # answer's KV too
    assert out["follow"] == follow_ref
    # batched: hits and a miss join a running batch at different steps, one chunked
    other = questions[3] * 3
    jobs = {"miss": (other, 0), "hit": (system + questions[3], 2), "hit2": (longer + questions[0], 4)}
    with cache_off(engine):
        refs = {sid: engine.generate(p, n) for sid, (p, _) in jobs.items()}
    out, cached = run_jobs(engine, jobs, n, chunk=7)
    assert out == refs
    assert cached["miss"] == 0
    assert (cached["hit"] > 0 and cached["hit2"] > len(longer) - BLOCK_SIZE) or not roomy


# --------------------------------------------------------------------------------------------
# tiny model
# --------------------------------------------------------------------------------------------


# (graph, where the cache's blocks live): numpy blocks on the host, or device tensors cut from
# and placed into the fused graph's KV pool (the default on CUDA; here on the CPU provider, the
# same graphs). The plain graph keeps its KV on the host, so it has host blocks only.
KINDS = [("fused", "host"), ("fused", "device"), ("plain", "host")]


def models_dir_of(request: pytest.FixtureRequest, graph: str) -> Path:
    return request.getfixturevalue("tiny_models_dir" if graph == "fused" else "tiny_plain_models_dir")


@pytest.fixture(scope="module", params=KINDS, ids=["-".join(k) for k in KINDS])
def tiny(request: pytest.FixtureRequest) -> Engine:
    graph, blocks = request.param
    engine = Engine(models_dir_of(request, graph) / TINY, max_sequences=16, prefix_cache_bytes=64 * MIB,
                    device_prefix_cache="on" if blocks == "device" else "off")
    assert engine.graph == graph and (engine._device_blocks is not None) == (blocks == "device")
    return engine


def tiny_tokens(seed: int, n: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


@pytest.mark.unit
def test_tiny_cache_hits_give_identical_tokens(tiny: Engine) -> None:
    v = tiny.config.vocab_size
    check_reuse(tiny, tiny_tokens(0, 45, v), [tiny_tokens(i, 11 + i, v) for i in range(1, 5)], 12)
    s = tiny.prefix_cache.stats()  # type: ignore[union-attr]
    assert s.hit_blocks > 0 and s.stored_blocks > s.hit_blocks // 10 and s.evicted_blocks == 0


@pytest.mark.unit
def test_tiny_prefill_computes_only_the_uncached_rest(tiny: Engine) -> None:
    assert tiny.prefix_cache is not None
    tiny.prefix_cache.clear()
    prompt = tiny_tokens(7, 50, tiny.config.vocab_size)
    tiny.generate(prompt[:40], 1)  # caches blocks 0 and 1 (its answer's KV is one token short of block 2)
    tiny.add("s", prompt, SamplingParams(), 0)
    assert tiny.sequences["s"].processed == 32
    result = tiny.step([("s", 0)], decode=False)
    assert result.prefill_tokens == 18 and result.cached_prompt_tokens == {"s": 32}
    tiny.remove(["s"])
    # a whole-block prompt still prefills its last block's last token, for the logits
    tiny.add("w", prompt[:32], SamplingParams(), 0)
    assert tiny.sequences["w"].processed == 16
    tiny.remove(["w"])


@pytest.mark.unit
@pytest.mark.parametrize("graph, blocks", KINDS, ids=["-".join(k) for k in KINDS])
def test_tiny_eviction_under_a_small_budget_keeps_results_correct(request: pytest.FixtureRequest, graph: str,
                                                                  blocks: str) -> None:
    models = models_dir_of(request, graph)
    c = Engine(models / TINY, max_sequences=1).config
    block_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * BLOCK_SIZE * c.head_dim * 4
    engine = Engine(models / TINY, max_sequences=16, prefix_cache_bytes=3 * block_bytes,  # three blocks
                    device_prefix_cache="on" if blocks == "device" else "off")
    v = engine.config.vocab_size
    check_reuse(engine, tiny_tokens(10, 40, v), [tiny_tokens(i, 9 + i, v) for i in range(11, 15)], 10,
                roomy=False)
    s = engine.prefix_cache.stats()
    assert s.evicted_blocks > 0 and s.bytes_used <= 3 * block_bytes and s.hit_blocks > 0


@pytest.mark.unit
def test_tiny_prompts_prefilled_together_each_cache_their_own_blocks(tiny: Engine) -> None:
    """Three prompts prefilled in one step sit in consecutive rows (on the device: one cut for
    the group); each later prompt extending one of them hits its blocks, not a neighbour's, and
    decodes what the cache-off engine decodes."""
    assert tiny.prefix_cache is not None
    tiny.prefix_cache.clear()
    v = tiny.config.vocab_size
    prompts = [tiny_tokens(20 + i, 40 + i, v) for i in range(3)]  # 2 full blocks each, lengths close
    run_jobs(tiny, {f"group{i}": (p, 0) for i, p in enumerate(prompts)}, 2)
    for i, p in enumerate(prompts):
        extended = p + tiny_tokens(30 + i, 5, v)
        with cache_off(tiny):
            ref = tiny.generate(extended, 6)
        out, cached = run_jobs(tiny, {"ext": (extended, 0)}, 6)
        assert cached["ext"] >= 32 and out["ext"] == ref, i


@pytest.mark.unit
def test_tiny_leavers_of_one_step_cache_their_answers_and_the_rest_decode_on(tiny: Engine) -> None:
    """Rows leaving together from the middle of the batch (one remove: on the device one cut
    for all their blocks, one run moving the rows that stay): each leaver's next turn hits its
    own prompt and answer, the rows that stayed decode what they would have alone."""
    assert tiny.prefix_cache is not None
    tiny.prefix_cache.clear()
    v = tiny.config.vocab_size
    prompts = {f"r{i}": tiny_tokens(50 + i, 30 + 2 * i, v) for i in range(6)}
    with cache_off(tiny):
        refs = {sid: tiny.generate(p, 14) for sid, p in prompts.items()}
    for sid, p in prompts.items():
        tiny.add(sid, p, SamplingParams(), 0)
    out: dict[str, list[int]] = {sid: [] for sid in prompts}
    leavers = ["r1", "r3", "r4"]
    for step in range(14):
        result = tiny.step([(sid, 0) for sid in prompts] if step == 0 else [], decode=step > 0)
        for sid, token, _ in result.tokens:
            out[sid].append(token)
        if step == 7:
            tiny.remove(leavers)
    tiny.remove(list(prompts))
    for sid in prompts:
        want = refs[sid][:8] if sid in leavers else refs[sid]
        assert out[sid] == want, sid
    for sid in leavers:
        follow = prompts[sid] + out[sid] + tiny_tokens(70, 4, v)
        with cache_off(tiny):
            ref = tiny.generate(follow, 5)
        got, cached = run_jobs(tiny, {"follow": (follow, 0)}, 5)
        assert cached["follow"] == (len(prompts[sid]) + 8 - 1) // BLOCK_SIZE * BLOCK_SIZE, sid
        assert got["follow"] == ref, sid


@pytest.mark.unit
def test_tiny_disabled_cache_is_absent(tiny_models_dir: Path) -> None:
    engine = Engine(tiny_models_dir / TINY, max_sequences=4)
    assert engine.prefix_cache is None
    prompt = tiny_tokens(3, 40, engine.config.vocab_size)
    engine.generate(prompt, 4)
    engine.add("x", prompt, SamplingParams(), 0)
    assert engine.sequences["x"].processed == 0
    engine.remove(["x"])


# --------------------------------------------------------------------------------------------
# the real SmolLM2 folders
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name, blocks", [(FP32_MODEL_NAME, "host"), (INT4_MODEL_NAME, "host"),
                                          (INT4_MODEL_NAME, "device")])
def test_real_model_cache_hits_give_identical_tokens(real_models_dir: Path, name: str, blocks: str) -> None:
    engine = Engine(real_models_dir / name, threads=2, provider="cpu", prefix_cache_bytes=256 * MIB,
                    device_prefix_cache="on" if blocks == "device" else "off")
    assert (engine._device_blocks is not None) == (blocks == "device")
    entry = ModelCatalog(real_models_dir).get(name)
    assert entry is not None
    system = entry.encode(entry.render_chat([("system", "You are a careful assistant for a railway company. "
                                              "Answer briefly, politely and only about trains, "
                                              "timetables and tickets."), ("user", "")]))[:-8]
    questions = [entry.encode(q) for q in (
        " When does the first train to Lyon leave?", " And is there a dining car on it?",
        " Can I bring my bicycle?", " How much does a child ticket cost?")]
    check_reuse(engine, system, questions, 16)
