"""Router parts in isolation: rate limits, admission, stop strings and UTF-8-safe
detokenization (fleet view and routing policies: tests/test_routing.py)."""

from __future__ import annotations

import random
import time
from collections import deque
from pathlib import Path

import pytest

from services.router.errors import ErrorKind, RequestError
from services.router.limits import AdmissionControl, RateLimiter, TokenBucket
from services.router.pipeline import StopStringMatcher
from services.router.tenants import Tenant, TenantDirectory, hash_key, write_tenant
from switchyard.model.catalog import IncrementalDetokenizer, ModelCatalog, ModelEntry

from conftest import TINY

pytestmark = pytest.mark.unit


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(capacity=60, refill_per_s=1.0, updated=0.0)
    assert bucket.wait_for(60, now=0.0) == 0
    bucket.take(60)
    assert bucket.wait_for(10, now=0.0) == pytest.approx(10.0)
    assert bucket.wait_for(10, now=4.0) == pytest.approx(6.0)
    assert bucket.wait_for(10, now=10.0) == 0


def test_rate_limiter_reserves_up_front_settles_to_use_and_isolates_tenants() -> None:
    limiter = RateLimiter()
    small, big = Tenant("small", 1000, 300), Tenant("big", 1000, 10_000)
    first = limiter.reserve(small, 200)
    with pytest.raises(RequestError) as err:
        limiter.reserve(small, 200)
    assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED and err.value.retry_after_s > 0
    limiter.reserve(big, 5000)  # another tenant is unaffected
    limiter.settle(first, 50)  # used 50 of 200: 150 flow back
    limiter.reserve(small, 200)
    with pytest.raises(RequestError, match="lower max_tokens"):
        limiter.reserve(small, 301)


def test_admission_sheds_beyond_capacity_plus_queue() -> None:
    admission = AdmissionControl(queue_limit=2)
    for _ in range(5):
        admission.enter("m", capacity=3)
    with pytest.raises(RequestError) as err:
        admission.enter("m", capacity=3)
    assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED and err.value.retry_after_s > 0
    admission.leave("m")
    admission.enter("m", capacity=3)


def test_admission_counts_tokens_and_measures_its_retry_delay() -> None:
    admission = AdmissionControl(queue_limit=100, token_queue_factor=0.5, window_s=30.0)
    # budgets hold 1,000 tokens (+50% queue = 1,500): five 300-token requests fit, a sixth does not
    for _ in range(5):
        admission.enter("m", capacity=64, tokens=300, token_capacity=1000)
    with pytest.raises(RequestError) as err:
        admission.enter("m", capacity=64, tokens=300, token_capacity=1000)
    assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED and "tokens" in err.value.message
    assert err.value.retry_after_s == 1.0  # nothing completed yet: no rate to measure
    # a lone request is admitted whatever its size
    admission.enter("other", capacity=64, tokens=5000, token_capacity=1000)
    # completions measured: 3 × 300 tokens finished within a few seconds
    t = time.monotonic()
    admission._done["m"] = deque([(t - 9.0, 300), (t - 6.0, 300), (t - 3.0, 300)])
    wait = admission.retry_after_s("m", 0, 900, now=t)
    assert wait == pytest.approx(900 / (900 / 9.0))  # 900 excess tokens at 100 tokens/s
    admission.leave("m", tokens=300)
    admission.enter("m", capacity=64, tokens=300, token_capacity=1000)  # room again


def test_admission_sheds_a_request_whose_deadline_ends_before_the_queue_drains() -> None:
    admission = AdmissionControl(queue_limit=100, token_queue_factor=1.0)
    t = time.monotonic()
    admission._done["m"] = deque([(t - 10.0, 500), (t - 5.0, 500)])  # 100 tokens/s measured
    for _ in range(4):
        admission.enter("m", capacity=64, tokens=300, token_capacity=1000)  # 1,200 held: 200 queued
    # 500 more tokens queue behind 700 over capacity: ~7 s before it could start
    with pytest.raises(RequestError, match="before its deadline") as err:
        admission.enter("m", capacity=64, tokens=500, token_capacity=1000, timeout_s=2.0)
    assert 6.0 < err.value.retry_after_s < 8.0
    admission.enter("m", capacity=64, tokens=500, token_capacity=1000, timeout_s=30.0)  # it can wait
    # the same by batch slots: 2 slots, 10 requests/s completing, 6 in flight → the 7th waits ~0.5 s
    slots = AdmissionControl(queue_limit=10)
    slots._done["s"] = deque([(t - 10.0 + i * 0.1, 0) for i in range(100)])
    for _ in range(6):
        slots.enter("s", capacity=2, timeout_s=5.0)
    with pytest.raises(RequestError, match="before its deadline"):
        slots.enter("s", capacity=2, timeout_s=0.3)
    slots.enter("s", capacity=2, timeout_s=1.0)


def test_tenant_keys_are_stored_hashed(tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    write_tenant(path, "acme", "sy-secret-key", requests_per_minute=5, tokens_per_minute=50)
    assert "sy-secret-key" not in path.read_text() and hash_key("sy-secret-key") in path.read_text()
    directory = TenantDirectory.load(path)
    tenant = directory.authenticate("sy-secret-key")
    assert tenant == Tenant("acme", 5, 50)
    assert directory.authenticate("sy-other") is None and directory.authenticate(None) is None


@pytest.mark.parametrize("chunks, stops, expected", [
    (["Hello wor", "ld. STOP here"], ["STOP"], ("Hello world. ", True)),
    (["ab", "cS", "TO", "P tail"], ["STOP"], ("abc", True)),
    (["no stop ", "at all"], ["STOP"], ("no stop at all", False)),
    (["ST", "ay"], ["STOP"], ("STay", False)),
])
def test_stop_strings_never_reach_the_client(chunks: list[str], stops: list[str], expected: tuple[str, bool]) -> None:
    matcher = StopStringMatcher(stops)
    out, stopped = "", False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out += text
        if stopped:
            break
    if not stopped:
        out += matcher.flush()
    assert (out, stopped) == expected


def test_detokenizer_emits_only_complete_utf8_characters(tiny_models_dir: Path) -> None:
    entry = ModelCatalog(tiny_models_dir).get(TINY)
    assert entry is not None
    text = "naïve café 日本語 🙂 done"
    ids = entry.encode(text)
    detok = IncrementalDetokenizer(entry)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(text.encode()) / 2  # byte-level tokens: multi-byte characters span tokens


def _detokenize(entry: ModelEntry, ids: list[int], chunks: list[int], table: bool) -> list[str]:
    detok = IncrementalDetokenizer(entry)
    if not table:  # the general path: windows of tokenizer.decode
        detok._table = None
    pieces, at = [], 0
    for size in chunks:
        pieces.append(detok.push(ids[at:at + size]))
        at += size
    return pieces + [detok.flush()]


def _equal_to_decoding_windows(entry: ModelEntry, seed: int, streams: int) -> None:
    """Byte-level table lookups make the same text as the tokenizer's own decode, never later
    than the decoding windows did: on random ids (special tokens, characters split across tokens, invalid bytes among
    them) and on real text."""
    assert entry.token_bytes is not None
    rng = random.Random(seed)
    vocab = entry.tokenizer.get_vocab_size(with_added_tokens=True)
    text_ids = entry.encode("naïve café 日本語 🙂 <|im_start|> done\n\tx" * 3)
    cases = [text_ids] + [[rng.randrange(vocab) for _ in range(rng.randrange(1, 40))] for _ in range(streams)]
    for ids in cases:
        chunks, left = [], len(ids)
        while left:
            chunks.append(min(left, rng.choice([1, 1, 1, 2, 3])))
            left -= chunks[-1]
        fast, general = _detokenize(entry, ids, chunks, True), _detokenize(entry, ids, chunks, False)
        assert "".join(fast) == entry.decode(ids), ids
        assert "".join(general) == entry.decode(ids), ids
        if "\ufffd" not in "".join(general):  # valid UTF-8: each character as soon as the general path, or sooner
            for k in range(1, len(fast) + 1):
                assert len("".join(fast[:k])) >= len("".join(general[:k])), (ids, k)


def test_byte_level_detokenizer_matches_the_tokenizer(tiny_models_dir: Path) -> None:
    entry = ModelCatalog(tiny_models_dir).get(TINY)
    assert entry is not None
    _equal_to_decoding_windows(entry, seed=1, streams=300)


def test_byte_level_detokenizer_matches_the_tokenizer_on_added_tokens(tiny_models_dir: Path) -> None:
    """Added tokens whose text is not all in the byte alphabet (a space, U+00A0, accents, CJK)
    are their own UTF-8, whole — as the ByteLevel decoder has them."""
    from tokenizers import AddedToken, Tokenizer
    entry = ModelCatalog(tiny_models_dir).get(TINY)
    assert entry is not None
    tokenizer = Tokenizer.from_str(entry.tokenizer.to_str())
    pieces = ["Ġfoo bar", "x\xa0y", "a\xady", "naïve 世", "<think>", "Ġplain"]
    tokenizer.add_tokens([AddedToken(p, special=False) for p in pieces])
    added = ModelEntry(entry.manifest, tokenizer, None)
    ids = [tokenizer.token_to_id(p) for p in pieces]
    assert None not in ids
    for i in ids:
        assert _detokenize(added, [i], [1], True) and "".join(_detokenize(added, [i], [1], True)) == added.decode([i])
    _equal_to_decoding_windows(added, seed=3, streams=300)


@pytest.mark.slow
def test_byte_level_detokenizer_matches_the_real_tokenizer(real_models_dir: Path) -> None:
    entry = ModelCatalog(real_models_dir).get("smollm2-135m-instruct-int4")
    assert entry is not None
    _equal_to_decoding_windows(entry, seed=2, streams=300)


def test_a_request_shed_by_admission_costs_the_tenant_nothing() -> None:
    limiter = RateLimiter()
    tenant = Tenant("small", requests_per_minute=2, tokens_per_minute=1000)
    for _ in range(5):  # five shed requests in a row: none spends the 2-rpm or 1,000-tpm limit
        limiter.refund(limiter.reserve(tenant, 400))
    first = limiter.reserve(tenant, 400)
    limiter.reserve(tenant, 400)
    with pytest.raises(RequestError) as err:
        limiter.reserve(tenant, 100)
    assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    limiter.settle(first, 400)  # used in full: nothing comes back
    with pytest.raises(RequestError):
        limiter.reserve(tenant, 100)


def test_tenants_file_is_hot_reloaded_so_a_revoked_key_stops_working(tmp_path: Path) -> None:
    import os

    path = tmp_path / "tenants.toml"
    write_tenant(path, "acme", "sy-old-key", requests_per_minute=5, tokens_per_minute=50)
    directory = TenantDirectory.load(path)
    directory.reload_every_s = 0.0
    assert directory.authenticate("sy-old-key") is not None
    path.write_text("")  # revoke every key...
    write_tenant(path, "acme", "sy-new-key", requests_per_minute=7, tokens_per_minute=50)  # ...issue a new one
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a new mtime even on coarse clocks
    assert directory.authenticate("sy-old-key") is None
    tenant = directory.authenticate("sy-new-key")
    assert tenant is not None and tenant.requests_per_minute == 7
    path.write_text("[tenants.acme\n")  # a broken edit keeps the last good tenants
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert directory.authenticate("sy-new-key") is not None
