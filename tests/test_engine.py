"""The worker engine on its own: whatever way sequences are prefilled and batched, each
gets exactly the tokens it gets alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.engine import Engine, EngineError, _prefill_groups
from services.worker.sampling import SamplingParams
from switchyard.model.catalog import ModelCatalog

from conftest import TINY

pytestmark = pytest.mark.unit
TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a", "serving many models at scale today",
         "naïve café 日本"]


@pytest.fixture(scope="module")
def engine(tiny_graph_models_dir: Path) -> Engine:
    return Engine(tiny_graph_models_dir / TINY, max_sequences=16)


@pytest.fixture(scope="module")
def prompts(tiny_models_dir: Path) -> list[list[int]]:
    entry = ModelCatalog(tiny_models_dir).get(TINY)
    assert entry is not None
    return [entry.encode(t) for t in TEXTS]


def run_until(engine: Engine, outs: dict[str, list[int]], n: int) -> None:
    while min(len(v) for v in outs.values()) < n:
        for sid, token, _ in engine.step([], decode=True).tokens:
            outs[sid].append(token)


def test_prompts_prefilled_together_match_their_solo_runs(engine: Engine, prompts: list[list[int]]) -> None:
    alone = [engine.generate(p, 16) for p in prompts]
    for i, p in enumerate(prompts):
        engine.add(f"s{i}", p, SamplingParams(), 0)
    result = engine.step([(f"s{i}", 0) for i in range(len(prompts))], decode=False)
    assert result.prefill_tokens == sum(map(len, prompts))
    outs = {sid: [token] for sid, token, first in result.tokens if first}
    run_until(engine, outs, 16)
    engine.remove(list(outs))
    assert [outs[f"s{i}"][:16] for i in range(len(prompts))] == alone
    assert not engine.sequences


def test_chunked_prefill_and_late_joins_match_solo_runs(engine: Engine, prompts: list[list[int]]) -> None:
    alone = [engine.generate(p, 12) for p in prompts[:3]]
    engine.add("long", prompts[1], SamplingParams(), 0)
    result = engine.step([("long", 3)], decode=False)  # a 3-token chunk: not done yet
    assert result.tokens == [] and result.prefill_remaining == {"long": len(prompts[1]) - 3}
    result = engine.step([("long", 0)], decode=False)
    outs = {"long": [t for _, t, _ in result.tokens]}
    for _ in range(4):
        for sid, token, _ in engine.step([], decode=True).tokens:
            outs[sid].append(token)
    engine.add("a", prompts[0], SamplingParams(), 0)
    engine.add("b", prompts[2], SamplingParams(), 0)
    result = engine.step([("a", 0), ("b", 0)], decode=True)
    for sid, token, _ in result.tokens:
        outs.setdefault(sid, []).append(token)
    run_until(engine, outs, 12)
    engine.remove(["long"])  # leaving mid-batch compacts the padding; the others carry on
    run_until(engine, {k: v for k, v in outs.items() if k != "long"}, 12)
    engine.remove(["a", "b"])
    assert outs["long"][:12] == alone[1]
    assert outs["a"][:12] == alone[0]
    assert outs["b"][:12] == alone[2]


def test_prefill_groups_keep_padding_bounded() -> None:
    class Seq:
        def __init__(self, n: int) -> None:
            self.prompt = [0] * n
    groups = _prefill_groups([Seq(n) for n in (500, 10, 480, 12, 450)])  # type: ignore[misc]
    assert [[len(s.prompt) for s in g] for g in groups] == [[500, 480, 450], [12, 10]]


def test_bad_sequences_are_refused_with_a_reason(engine: Engine) -> None:
    with pytest.raises(EngineError, match="at least one token"):
        engine.add("empty", [], SamplingParams(), 0)
    with pytest.raises(EngineError, match="context"):
        engine.add("huge", [1] * engine.context_length, SamplingParams(), 0)
    with pytest.raises(EngineError, match=r"\[0, "):
        engine.add("bad-id", [10**6], SamplingParams(), 0)
    engine.add("dup", [1, 2], SamplingParams(), 0)
    with pytest.raises(EngineError, match="already exists"):
        engine.add("dup", [1, 2], SamplingParams(), 0)
    engine.remove(["dup"])


def test_several_decode_steps_stop_where_the_longest_row_meets_the_context(engine: Engine) -> None:
    """A call asking 4 steps of a batch whose longest row has room for 3 more runs 3; a single
    step always runs (the batcher never asks one of a row at its end)."""
    near_end = [5] * (engine.context_length - 4)  # cache_length after its first token: context - 4
    engine.add("near-end", near_end, SamplingParams(), 0)
    engine.add("short", [7] * 6, SamplingParams(), 0)
    try:
        engine.step([("near-end", 0), ("short", 0)], decode=False)
        result = engine.step([], decode=True, decode_steps=4)
        assert result.decode_steps == 3 and len(result.tokens) == 2 * 3
        assert engine.step([], decode=True, decode_steps=1).decode_steps == 1
    finally:
        engine.remove(["near-end", "short"])
