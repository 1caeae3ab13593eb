"""Run reports: planted latency distributions, hand-computed costs, planted tail causes, PNGs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from switchyard.reporting.cli import report, report_command
from switchyard.reporting.cost import IDLE, ModelPrice, PriceTable, cost_report, load_prices
from switchyard.reporting.percentiles import LatencyStats
from switchyard.reporting.records import (ITL_CAP, RecordWriter, ReplicaUsage, RequestRecord, cap_samples,
                                          read_records, read_replicas, replica_seconds)
from switchyard.reporting.tail import (SPAN_BATCHER_SCHEDULE, SPAN_DECODE, SPAN_KEYS, SPAN_PREFILL, SPAN_QUEUE,
                                       SPAN_ROUTER_PREPARE, SPAN_ROUTER_REQUEST, Span, attribute_tail, read_spans)

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST, SLOW = 0.1, 10.0
T0 = 1_700_000_000.0


def planted_records() -> list[RequestRecord]:
    """95 requests at 100 ms and 5 at 10 s (TTFT, E2E, and two ITL gaps each)."""
    out = []
    for i in range(100):
        v = SLOW if i % 20 == 7 else FAST  # slow ones spread through the run, not at the end
        out.append(RequestRecord(
            request_id=f"r{i}", tenant="alpha" if i % 2 else "beta", model="tiny-llama", replica_id="rep-0",
            request_type="chat", started_unix_s=T0 + i, ttft_s=v, e2e_s=v, queue_wait_s=0.0,
            prompt_tokens=10, completion_tokens=3, finish_reason="stop", status="ok",
            inter_token_s=[v, v], trace_id=f"{i:032x}"))
    return out


def is_png(path: Path) -> bool:
    return path.exists() and path.stat().st_size > len(PNG_SIGNATURE) and path.read_bytes()[:8] == PNG_SIGNATURE


# ---------------------------------------------------------------- records + percentiles


def test_planted_distribution_through_the_whole_path(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RecordWriter(run) as writer:
        for r in planted_records():
            writer.write(r)
        writer.write(RequestRecord(request_id="bad", tenant="alpha", model="tiny-llama", e2e_s=0.001,
                                   status="RESOURCE_EXHAUSTED"))
        writer.write_replica(ReplicaUsage("rep-0", "tiny-llama", T0, T0 + 3600))

    assert len(read_records(run)) == 101
    result = report(run)

    pct = result.percentiles
    assert (pct.requests, pct.ok, pct.errors) == (101, 100, {"RESOURCE_EXHAUSTED": 1})
    for metric in ("ttft", "e2e", "itl"):
        s = pct.overall[metric]
        assert s.count == (200 if metric == "itl" else 100)
        assert s.mean == pytest.approx(0.595)
        assert s.p50 == pytest.approx(0.1)
        assert s.p95 == pytest.approx(0.595)  # index 94.05 between 100 ms and 10 s (ITL: 189.05 likewise)
        assert s.p99 == pytest.approx(10.0)
        assert s.max == 10.0
    assert set(pct.by_model) == {"tiny-llama"}
    assert pct.by_model["tiny-llama"]["e2e"].p99 == pytest.approx(10.0)
    assert set(pct.by_tenant) == {"alpha", "beta"}

    # one replica-hour of tiny-llama dwarfs 1,300 tokens; the 50/50 tenant split is not the driver
    assert result.cost.by["replica"]["rep-0"].replica_seconds == 3600
    assert result.cost.driver is not None
    assert result.cost.driver.describe().startswith("replica time of model tiny-llama")

    assert is_png(result.latency_png) and is_png(result.cost_png)
    assert result.latency_png.parent == run
    md = result.report_md.read_text()
    assert result.report_md == run / "report.md"
    assert "p99" in md and "10.000 s" in md and "595.0 ms" in md and "![latency](latency.png)" in md
    assert result.tail is None and "No spans.jsonl" in md


def test_latency_stats_edge_cases() -> None:
    empty = LatencyStats.of([])
    assert empty.count == 0 and empty.mean != empty.mean  # NaN
    one = LatencyStats.of([0.2, float("nan")])
    assert (one.count, one.p50, one.p99) == (1, 0.2, 0.2)


def test_writer_is_thread_safe_and_reader_skips_torn_lines(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path)

    def burst(k: int) -> None:
        for i in range(200):
            writer.write(RequestRecord(request_id=f"{k}-{i}", tenant="t", model="m", e2e_s=0.01,
                                       inter_token_s=[0.001] * 50))

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.write(RequestRecord(request_id="nan", tenant="t", model="m", ttft_s=float("nan")))
    writer.close()
    with open(tmp_path / "requests.jsonl", "a") as fh:
        fh.write('{"request_id": "odd", "tenant": "t", "model": "m", "e2e_s": null, "prompt_tokens": "7"}\n')
        fh.write('{"tenant": "t", "model": "m"}\n')  # no request_id: skipped
        fh.write('{"request_id": "torn", "tena')  # a run killed mid-write
    records = read_records(tmp_path)
    assert len(records) == 802
    assert len({r.request_id for r in records}) == 802
    assert records[-2].ttft_s is None
    assert (records[-1].e2e_s, records[-1].prompt_tokens) == (0.0, 7)


def test_report_of_an_empty_run(tmp_path: Path) -> None:
    (tmp_path / "requests.jsonl").write_text("")
    result = report(tmp_path)
    assert result.requests == 0 and result.cost.total == 0 and result.cost.driver is None
    assert result.percentiles.overall["e2e"].count == 0
    assert is_png(result.latency_png) and is_png(result.cost_png)
    assert "holds no requests" in result.report_md.read_text()
    with pytest.raises(FileNotFoundError):
        report(tmp_path / "nope")


def test_itl_samples_are_capped_evenly() -> None:
    gaps = [float(i) for i in range(5000)]
    capped = cap_samples(gaps)
    assert len(capped) == ITL_CAP and capped[0] == 0.0 and capped[-1] == 4999.0
    record = RequestRecord(request_id="x", tenant="t", model="m", inter_token_s=gaps)
    assert len(record.to_dict()["inter_token_s"]) == ITL_CAP
    assert RequestRecord.gaps([1.0, 1.5, 3.0]) == [0.5, 1.5]
    # unknown keys from a newer writer are ignored
    assert RequestRecord.from_dict({**record.to_dict(), "new_field": 1}).request_id == "x"


def test_replica_seconds_merge_duplicate_lines(tmp_path: Path) -> None:
    with RecordWriter(tmp_path) as w:
        w.write_replica(ReplicaUsage("a", "m", 0.0, 100.0))
        w.write_replica(ReplicaUsage("a", "m", 0.0, 100.0))  # left, and again at shutdown
        w.write_replica(ReplicaUsage("a", "m", 200.0, 250.0))  # rejoined
        w.write_replica(ReplicaUsage("b", "m", 10.0, 20.0))
    assert replica_seconds(read_replicas(tmp_path)) == {"a": ("m", 150.0), "b": ("m", 10.0)}


# ---------------------------------------------------------------- cost

PRICES = PriceTable(models={
    "A": ModelPrice(prompt_per_1m=1.0, completion_per_1m=2.0, replica_hour=3.6),  # 0.001 per replica-second
    "B": ModelPrice(prompt_per_1m=0.5, completion_per_1m=1.0, replica_hour=0.36),
}, source="test")


def cost_fixture() -> tuple[list[RequestRecord], list[ReplicaUsage]]:
    records = [
        # t1 on A/a1: 0.2 + 0.2 = 0.4
        RequestRecord(request_id="1", tenant="t1", model="A", replica_id="a1", request_type="chat",
                      prompt_tokens=200_000, completion_tokens=100_000),
        # t2 on A/a1: 0.1 + 0.1 = 0.2
        RequestRecord(request_id="2", tenant="t2", model="A", replica_id="a1", request_type="completion",
                      prompt_tokens=100_000, completion_tokens=50_000),
        # t2 on B/b1: 0.2 + 0.2 = 0.4
        RequestRecord(request_id="3", tenant="t2", model="B", replica_id="b1", request_type="grpc",
                      prompt_tokens=400_000, completion_tokens=200_000),
    ]
    replicas = [
        ReplicaUsage("a1", "A", T0, T0 + 1000),  # 1.0
        ReplicaUsage("b1", "B", T0, T0 + 1000),  # 0.1
        ReplicaUsage("a2", "A", T0, T0 + 500),  # 0.5, served nothing
    ]
    return records, replicas


def test_cost_known_answers() -> None:
    records, replicas = cost_fixture()
    c = cost_report(records, replicas, PRICES)
    assert c.total == pytest.approx(2.6)
    assert c.components == pytest.approx({"prompt": 0.5, "completion": 0.5, "replica": 1.6})

    model = {k: v.total for k, v in c.by["model"].items()}
    assert model == pytest.approx({"A": 2.1, "B": 0.5})
    assert list(c.by["model"]) == ["A", "B"]  # largest first
    assert c.by["model"]["A"].replica_seconds == pytest.approx(1500)
    assert {k: v.total for k, v in c.by["replica"].items()} == pytest.approx({"a1": 1.6, "b1": 0.5, "a2": 0.5})
    # a1's replica cost (1.0) split by tokens on a1: t1 300k, t2 150k; b1 all t2; a2 idle
    tenant = {k: v.total for k, v in c.by["tenant"].items()}
    assert tenant == pytest.approx({"t1": 0.4 + 2 / 3, "t2": 0.6 + 1 / 3 + 0.1, IDLE: 0.5})
    rtype = {k: v.total for k, v in c.by["request_type"].items()}
    assert rtype == pytest.approx({"chat": 0.4 + 2 / 3, "completion": 0.2 + 1 / 3, "grpc": 0.5, IDLE: 0.5})
    for dim in c.by:  # every breakdown sums to the total
        assert sum(line.total for line in c.by[dim].values()) == pytest.approx(2.6)

    d = c.driver
    assert d is not None
    assert (d.dimension, d.key, d.component) == ("model", "A", "replica")
    assert d.amount == pytest.approx(1.5) and d.share == pytest.approx(1.5 / 2.6)
    assert d.describe() == "replica time of model A (58%)"


def test_cost_cached_tokens_unpriced_models_and_price_file(tmp_path: Path) -> None:
    prices = PriceTable(models={"A": ModelPrice(1.0, 2.0, 0.0, cached_prompt_per_1m=0.25)})
    r = RequestRecord(request_id="1", tenant="t", model="A", prompt_tokens=1_000_000,
                      cached_prompt_tokens=400_000, completion_tokens=0)
    other = RequestRecord(request_id="2", tenant="t", model="Z", prompt_tokens=1_000_000)
    c = cost_report([r, other], [], prices)
    assert c.total == pytest.approx(0.6 + 0.1)
    assert c.unpriced_models == ["Z"]

    toml = tmp_path / "prices.toml"
    toml.write_text('currency = "EUR"\n[models.A]\nprompt_per_1m = 1\ncompletion_per_1m = 2\nreplica_hour = 3.6\n'
                    '[default]\nprompt_per_1m = 0\ncompletion_per_1m = 0\nreplica_hour = 0\n')
    table = load_prices(toml)
    assert table.currency == "EUR" and table.price("A") == ModelPrice(1.0, 2.0, 3.6)
    assert table.price("anything") == ModelPrice(0.0, 0.0, 0.0)
    toml.write_text("[models.A]\nprompt_per_1m = 1\ncompletion_per_1m = 2\n")
    with pytest.raises(ValueError, match="replica_hour"):
        load_prices(toml)
    example = Path(__file__).resolve().parents[1] / "libs/switchyard/reporting/prices.example.toml"
    builtin = load_prices(None)
    assert load_prices(example).models == builtin.models
    assert builtin.price("smollm2-135m-instruct").replica_hour > builtin.price("smollm2-135m-instruct-int4").replica_hour


def test_cost_through_report_and_cli(tmp_path: Path) -> None:
    records, replicas = cost_fixture()
    run = tmp_path / "run"
    with RecordWriter(run) as w:
        for r in records:
            w.write(r)
        for u in replicas:
            w.write_replica(u)
    prices = tmp_path / "prices.toml"
    prices.write_text("[models.A]\nprompt_per_1m = 1.0\ncompletion_per_1m = 2.0\nreplica_hour = 3.6\n"
                      "[models.B]\nprompt_per_1m = 0.5\ncompletion_per_1m = 1.0\nreplica_hour = 0.36\n")
    out = tmp_path / "out"
    result = report(run, prices=prices, out=out)
    assert result.cost.total == pytest.approx(2.6)
    assert result.cost.driver is not None and result.cost.driver.describe() == "replica time of model A (58%)"
    assert is_png(out / "cost.png") and is_png(out / "latency.png") and (out / "report.md").exists()
    assert "replica time of model A (58%)" in (out / "report.md").read_text()

    import typer
    app = typer.Typer()
    app.command("report")(report_command)
    app.command("noop")(lambda: None)  # two commands: `report` is a subcommand, as on the main CLI
    res = CliRunner().invoke(app, ["report", str(run), "--prices", str(prices), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    assert "Biggest cost driver: replica time of model A (58%)" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2


# ---------------------------------------------------------------- tail attribution

NORMAL = {"prepare": 0.001, "queue": 0.005, "prefill": 0.020, "decode": 0.200, "bus": 0.024}


def trace_spans(i: int, hops: dict[str, float], decode_steps: int = 1) -> list[dict]:
    """Spans of one request laid out back to back: prepare, bus, queue, prefill, decode."""
    tid, root_id = f"{i:032x}", f"{i:08x}00000000"
    t = T0 + i * 10
    total = sum(hops.values())
    spans = [dict(trace_id=tid, span_id=root_id, parent_span_id=None, name=SPAN_ROUTER_REQUEST, service="router",
                  start_unix_s=t, end_unix_s=t + total, attributes={"request_id": f"r{i}", "model": "tiny-llama"})]

    def add(name: str, service: str, start: float, dur: float, n: int) -> None:
        spans.append(dict(trace_id=tid, span_id=f"{i:08x}{n:08x}", parent_span_id=root_id, name=name,
                          service=service, start_unix_s=start, end_unix_s=start + dur, attributes={}))

    add(SPAN_ROUTER_PREPARE, "router", t, hops["prepare"], 1)
    t += hops["prepare"] + hops["bus"] / 2
    add(SPAN_QUEUE, "batcher", t, hops["queue"], 2)
    t += hops["queue"]
    add(SPAN_PREFILL, "worker", t, hops["prefill"], 3)
    t += hops["prefill"]
    step = hops["decode"] / decode_steps
    for k in range(decode_steps):
        add(SPAN_DECODE, "worker", t + k * step, step, 10 + k)
    return spans


def write_spans(run: Path, spans: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "spans.jsonl", "w") as fh:
        for s in spans:
            assert tuple(s) == SPAN_KEYS
            fh.write(json.dumps(s) + "\n")


def planted_traces(slow_hop: str, slow_value: float) -> list[dict]:
    spans = []
    for i in range(100):
        hops = dict(NORMAL)
        if i % 20 == 3:
            hops[slow_hop] = slow_value
        spans += trace_spans(i, hops, decode_steps=1 + i % 3)
    return spans


def test_tail_attribution_queue_wait(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_spans(run, planted_traces("queue", 3.0))
    with RecordWriter(run) as w:
        for r in planted_records():
            w.write(r)
    result = report(run)
    tail = result.tail
    assert tail is not None and tail.traces == 100 and tail.clamped == 0
    for q in (95.0, 99.0):
        s = tail.slices[q]
        assert s.count == 5
        assert s.dominant == "queue" and s.grew_most == "queue"
        assert s.mean_hops["queue"] == pytest.approx(3.0)
        assert s.shares["queue"] == pytest.approx(3.0 / (3.0 + 0.25 - 0.005))
    assert tail.mean_hops["queue"] == pytest.approx(0.95 * 0.005 + 0.05 * 3.0)
    assert tail.mean_hops["decode"] == pytest.approx(0.2)  # several decode spans per trace add up
    assert tail.mean_hops["bus_network"] == pytest.approx(0.024, abs=1e-6)  # unix-time floats: ~0.2 µs resolution
    assert tail.slowest[0].request_id in {f"r{i}" for i in range(3, 100, 20)}
    md = result.report_md.read_text()
    assert "queue wait dominates" in md and "Tail attribution" in md
    assert is_png(result.latency_png)


def test_tail_attribution_prefill_and_clamping() -> None:
    spans = [Span.from_dict(s) for s in planted_traces("prefill", 2.0)]
    tail = attribute_tail(spans)
    assert tail is not None
    assert tail.slices[99.0].dominant == "prefill" and tail.slices[95.0].dominant == "prefill"
    assert tail.slices[99.0].grew_most == "prefill"

    # Decode dominates every request; the tail comes from the bus: dominant share still says
    # decode, grew_most names the bus.
    spans = [Span.from_dict(s) for s in planted_traces("bus", 0.5)]
    tail = attribute_tail(spans)
    assert tail is not None and tail.slices[99.0].grew_most == "bus_network"

    # A worker span longer than the router's own (clock skew): bus + network clamped at 0.
    skewed = trace_spans(0, dict(NORMAL))
    skewed[3]["end_unix_s"] += 1.0  # the prefill span
    orphan = trace_spans(1, dict(NORMAL))[1:]  # no root span
    schedule = dict(skewed[2], span_id="sched", name=SPAN_BATCHER_SCHEDULE, service="batcher")
    schedule["end_unix_s"] += 0.002  # 2 ms past the queue span: 2 ms of scheduling of its own
    tail = attribute_tail([Span.from_dict(s) for s in skewed + orphan + [schedule]])
    assert tail is not None and tail.traces == 1 and tail.skipped_no_root == 1 and tail.clamped == 1
    b = tail.slowest[0]
    assert b.hops["bus_network"] == 0.0 and b.clamped
    assert b.hops["schedule"] == pytest.approx(0.0)  # the extra 2 ms lie inside the (skewed) prefill span
    assert read_spans(Path("/nonexistent")) == []

    # batcher.schedule counts only where no queue/prefill/decode span covers it.
    normal = trace_spans(5, dict(NORMAL))
    schedule = dict(normal[2], span_id="sched", name=SPAN_BATCHER_SCHEDULE, service="batcher")
    schedule["start_unix_s"] -= 0.002  # 2 ms before the queue span, then covering it
    tail = attribute_tail([Span.from_dict(s) for s in normal + [schedule]])
    assert tail is not None and not tail.slowest[0].clamped
    assert tail.slowest[0].hops["schedule"] == pytest.approx(0.002, abs=1e-6)
    assert tail.slowest[0].hops["bus_network"] == pytest.approx(0.022, abs=1e-6)
