"""Fleet view and routing policies on hand-built load reports (no I/O)."""

from __future__ import annotations

import time

import pytest

from switchyard.fleet import FleetView, PrefixIndex
from switchyard.prefix.blocks import BLOCK_SIZE, block_hashes, matched_blocks
from switchyard.routing import make_policy, policy_names
from switchyard.routing.policies.prefix_aware import PrefixAware
from switchyard.routing.policy import NoReplicaError, RoutingRequest
from switchyard.routing.table import RoutingTable, parse_overrides
from switchyard.v1 import bus_pb2

pytestmark = pytest.mark.unit


def report(rid: str, running: int = 0, queued: int = 0, model: str = "m", draining: bool = False,
           blocks: list[int] | None = None, batch: int = 8) -> bus_pb2.LoadReport:
    return bus_pb2.LoadReport(replica_id=rid, model=model, running=running, queue_depth=queued, max_batch_size=batch,
                              interval_s=0.5, draining=draining, cached_blocks=blocks or [], block_size=BLOCK_SIZE,
                              sent_unix_s=time.time())


def request(prompt: list[int], model: str = "m", out: int = 16) -> RoutingRequest:
    return RoutingRequest(model=model, prompt_tokens=len(prompt), expected_output_tokens=out,
                          block_hashes=block_hashes(prompt, model), block_size=BLOCK_SIZE)


def fleet_of(*reports: bus_pb2.LoadReport) -> FleetView:
    fleet = FleetView()
    for r in reports:
        fleet.observe(r)
    return fleet


# ---- block hashes -----------------------------------------------------------------------
def test_block_hashes_are_chained_full_blocks_and_namespaced() -> None:
    a = block_hashes(list(range(40)), "m")
    assert len(a) == 2  # 40 tokens = 2 full blocks of 16, the tail is not named
    b = block_hashes(list(range(32)) + [7] * 16, "m")
    assert b[:2] == a and len(b) == 3
    # changing one token of block 0 changes every later hash (they name the whole prefix)
    c = block_hashes([99] + list(range(1, 40)), "m")
    assert c[0] != a[0] and c[1] != a[1]
    assert block_hashes(list(range(40)), "other") != a
    assert matched_blocks(b, set(a)) == 2 and matched_blocks(c, set(a)) == 0
    assert all(0 <= h < 2 ** 64 for h in a)


# ---- fleet view --------------------------------------------------------------------------
def test_fleet_drops_silent_replicas_skips_draining_ones_and_tells_listeners() -> None:
    fleet = FleetView(misses=3)
    left: list[str] = []
    joined: list[str] = []
    fleet.on_leave(lambda r: left.append(r.replica_id))
    fleet.on_join(lambda r: joined.append(r.replica_id))
    t0 = time.monotonic()
    fleet.observe(report("a"), now=t0)
    fleet.observe(report("b", blocks=[1, 2]), now=t0)
    fleet.observe(report("c", draining=True), now=t0)
    assert [r.replica_id for r in fleet.live("m")] == ["a", "b"]
    assert fleet.prefix_index.holders(1) == {"b"}
    fleet.observe(report("a"), now=t0 + 1.4)
    assert fleet.expire(now=t0 + 1.6) == ["b", "c"]  # 1.6 s > 3 × 0.5 s without a report
    assert list(fleet.replicas) == ["a"] and left == ["b", "c"] and joined == ["a", "b", "c"]
    fleet.observe(report("b"), now=t0 + 2.0)
    assert joined == ["a", "b", "c", "b"]  # back after leaving: joins again
    assert fleet.prefix_index.holders(1) == frozenset()  # a replica leaving drops out of the cache index
    assert set(fleet.lifetimes) == {"a", "b", "c"}  # cost reports still see every replica


def test_fleet_answers_models_capacity_and_age() -> None:
    t0 = time.monotonic()
    fleet = FleetView()
    fleet.observe(report("a", model="m1", batch=4), now=t0)
    fleet.observe(report("b", model="m1", batch=6), now=t0)
    fleet.observe(report("c", model="m2"), now=t0)
    assert {m: [r.replica_id for r in rs] for m, rs in fleet.models().items()} == {"m1": ["a", "b"], "m2": ["c"]}
    assert fleet.capacity("m1") == 10 and fleet.capacity("nope") == 0
    assert fleet.get("a") is not None and fleet.get("a").age_s(now=t0 + 2.0) == pytest.approx(2.0)  # type: ignore[union-attr]


def test_prefix_index_tracks_snapshots_by_diff_and_walks_chains() -> None:
    index = PrefixIndex()
    index.update("a", [1, 2, 3])
    index.update("b", [1, 2])
    assert index.matched_blocks([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert index.matched_blocks([9, 1]) == {}
    index.update("a", [1])  # a evicted 2 and 3
    assert index.matched_blocks([1, 2, 3]) == {"a": 1, "b": 2}
    assert index.holders(3) == frozenset() and len(index) == 2
    index.remove("b")
    assert index.matched_blocks([1, 2]) == {"a": 1}


# ---- policies ----------------------------------------------------------------------------
def test_policies_are_discovered_from_their_modules() -> None:
    assert {"round_robin", "least_loaded", "power_of_two", "prefix_aware"} <= set(policy_names())
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")
    with pytest.raises(NoReplicaError):
        make_policy("least_loaded").choose(request([1] * 4), [])


def test_least_loaded_prefers_the_idle_replica_and_round_robin_ignores_load() -> None:
    fleet = fleet_of(report("a", running=6), report("b", running=1), report("c", running=4))
    replicas = fleet.live("m")
    req = request([1] * 4)
    least = make_policy("least_loaded", fleet)
    assert [least.choose(req, replicas).replica_id for _ in range(3)] == ["b", "b", "b"]
    rr = make_policy("round_robin", fleet)
    assert [rr.choose(req, replicas).replica_id for _ in range(4)] == ["a", "b", "c", "a"]
    # the router's own dispatches count before the next heartbeat arrives...
    b = fleet.get("b")
    assert b is not None
    for _ in range(7):
        least.on_dispatch(req, b)
    assert least.choose(req, replicas).replica_id == "c"
    assert least.inflight["b"].requests == 7 and least.inflight["b"].tokens == 7 * req.expected_tokens
    # ...and stop counting when they complete
    for _ in range(7):
        least.on_complete(req, b, ok=True)
    assert least.inflight["b"].requests == 0 and least.inflight["b"].tokens == 0
    assert least.choose(req, replicas).replica_id == "b"


def test_least_loaded_spreads_ties_and_power_of_two_avoids_the_busiest() -> None:
    fleet = fleet_of(report("a"), report("b"))
    least = make_policy("least_loaded", fleet)
    assert [least.choose(request([1]), fleet.live("m")).replica_id for _ in range(4)] == ["a", "b", "a", "b"]
    busy = fleet_of(report("a", running=8), report("b", running=8), report("c"))
    p2c = make_policy("power_of_two", busy)
    picks = [p2c.choose(request([1]), busy.live("m")).replica_id for _ in range(300)]
    # c is in 2 of every 3 random pairs and always wins them; a and b only win against each other
    assert 0.55 < picks.count("c") / len(picks) < 0.8
    assert set(picks) == {"a", "b", "c"}


def test_prefix_aware_follows_the_cached_prefix_unless_that_replica_is_overloaded() -> None:
    history = list(range(1000, 1000 + 40 * BLOCK_SIZE))  # a 640-token conversation so far
    follow_up = request(history + [5, 6, 7])
    held = block_hashes(history, "m")
    # b holds the conversation and is a little busier than a: the cache wins
    fleet = fleet_of(report("a", running=1), report("b", running=3, blocks=held), report("c", running=2))
    policy = make_policy("prefix_aware", fleet)
    assert isinstance(policy, PrefixAware)
    assert policy.cached_tokens(follow_up, fleet.get("b")) == len(history)  # type: ignore[arg-type]
    assert policy.choose(follow_up, fleet.live("m")).replica_id == "b"
    # b's batch is full (load ≥ 1): the request would queue there; a calm replica wins
    fleet.observe(report("b", running=8, queued=3, blocks=held))
    assert policy.choose(follow_up, fleet.live("m")).replica_id == "a"
    # every replica overloaded: the cost decides among all of them again
    fleet.observe(report("a", running=12))
    fleet.observe(report("c", running=12))
    assert policy.choose(follow_up, fleet.live("m")).replica_id == "b"


def test_prefix_aware_weighs_cached_tokens_against_load() -> None:
    short = list(range(2 * BLOCK_SIZE))  # only 32 tokens cached: not worth a much busier replica
    fleet = fleet_of(report("a", running=0), report("b", running=6, blocks=block_hashes(short, "m")))
    policy = make_policy("prefix_aware", fleet)
    assert policy.choose(request(short + [1] * 40), fleet.live("m")).replica_id == "a"
    # nothing cached anywhere: it is least-loaded
    assert policy.choose(request([3] * 100), fleet.live("m")).replica_id == "a"


def test_prefix_aware_remembers_its_own_dispatches_until_the_replica_reports() -> None:
    fleet = fleet_of(report("a"), report("b"), report("c"))
    policy = make_policy("prefix_aware", fleet)
    first = list(range(7, 7 + 20 * BLOCK_SIZE))
    turn1 = request(first)
    chosen = policy.choose(turn1, fleet.live("m"))
    policy.on_dispatch(turn1, chosen)
    policy.on_complete(turn1, chosen, ok=True)
    # no heartbeat has said so yet, but the follow-up goes where its first turn went
    for _ in range(3):
        assert policy.choose(request(first + [9] * 30), fleet.live("m")).replica_id == chosen.replica_id


def test_a_replica_leaving_the_fleet_drops_out_of_prefix_routing() -> None:
    history = list(range(30 * BLOCK_SIZE))
    t0 = time.monotonic()
    fleet = FleetView(misses=3)
    fleet.observe(report("a"), now=t0)
    fleet.observe(report("b", blocks=block_hashes(history, "m")), now=t0)
    policy = make_policy("prefix_aware", fleet)
    assert policy.choose(request(history + [1]), fleet.live("m")).replica_id == "b"
    fleet.observe(report("a"), now=t0 + 10)
    fleet.expire(now=t0 + 10)
    assert fleet.prefix_index.matched_blocks(block_hashes(history, "m")) == {}
    assert policy.choose(request(history + [1]), [fleet.replicas["a"]]).replica_id == "a"


def test_routing_table_gives_each_model_its_own_policy() -> None:
    fleet = FleetView()
    table = RoutingTable(fleet, "least_loaded", parse_overrides(["chat=prefix_aware"]))
    assert table.policy_for("chat").name == "prefix_aware" and table.policy_for("other").name == "least_loaded"
    assert table.policy_for("chat") is table.policy_for("chat")
    assert table.policy_for("a") is not table.policy_for("b")  # separate in-flight ledgers
    with pytest.raises(ValueError, match="model=policy"):
        parse_overrides(["chat"])
    with pytest.raises(ValueError, match="unknown"):
        parse_overrides(["chat=nope"])


# ---- model routing -------------------------------------------------------------------------
def test_model_routes_parse_and_pick_by_difficulty() -> None:
    from switchyard.routing.model_routes import ModelRoute, ModelRouter

    route = ModelRoute.parse("auto=small:large:0.4")
    assert route == ModelRoute("auto", "small", "large", 0.4)
    for bad, why in (("auto", "name=small:large"), ("auto=s:l", "name=small:large"), ("auto=s:l:x", "not a number"),
                     ("auto=s:l:1.5", "between 0 and 1"), ("s=s:l:0.5", "must differ")):
        with pytest.raises(ValueError, match=why):
            ModelRoute.parse(bad)

    class Fixed:
        def __init__(self, score: float) -> None:
            self.score, self.features = score, {"planted": score}

    scores = {"hi": 0.1, "prove it": 0.9, "edge": 0.4}
    router = ModelRouter([route], estimator=lambda text, ids: Fixed(scores[text]))  # type: ignore[arg-type,return-value]
    assert router.get("auto") is route and router.get("small") is None
    assert router.choose(route, "hi", [1]).model == "small"
    assert router.choose(route, "prove it", [1]).model == "large"
    assert router.choose(route, "edge", [1]).model == "large"  # at the threshold: the large model
    assert router.choose(route, "hi", [1]).estimate.score == 0.1


def test_load_discounts_reported_requests_this_router_saw_finish() -> None:
    """A report taken while our request ran says "busy" until the next heartbeat; requests we
    dispatched before the report and saw finish after it are taken off."""
    fleet = FleetView()
    policy = make_policy("least_loaded", fleet)
    req = request([1] * 4)
    fleet.observe(report("a"))
    a = fleet.live("m")[0]
    policy.on_dispatch(req, a)
    time.sleep(0.01)
    fleet.observe(report("a", running=1))  # the heartbeat counts our request
    assert policy.load(a) == pytest.approx(1 / 8)
    policy.on_complete(req, a, ok=True)
    assert policy.load(a) == 0.0  # finished after that report: no longer there
    fleet.observe(report("a", running=3))  # a newer report (other routers' requests) counts in full
    assert policy.load(a) == pytest.approx(3 / 8)


def test_least_work_keeps_long_generations_apart() -> None:
    fleet = fleet_of(report("a"), report("b"))
    policy = make_policy("least_work", fleet)
    long, short = request([1] * 20, out=550), request([1] * 20, out=8)
    a = policy.choose(long, fleet.live("m"))
    policy.on_dispatch(long, a)
    # by count the replicas are now 1 vs 0; two short ones go to the other...
    placed = []
    for _ in range(2):
        r = policy.choose(short, fleet.live("m"))
        policy.on_dispatch(short, r)
        placed.append(r.replica_id)
    assert a.replica_id not in placed
    # ...and so does the next long one, though by request count the other now holds more
    assert policy.choose(long, fleet.live("m")).replica_id != a.replica_id
    # a replica with no free slot is avoided while another has one, even holding fewer tokens
    full = fleet_of(bus_pb2.LoadReport(replica_id="a", model="m", running=8, max_batch_size=8, interval_s=0.5,
                                       tokens_in_flight=100, sent_unix_s=time.time()),
                    bus_pb2.LoadReport(replica_id="b", model="m", running=3, max_batch_size=8, interval_s=0.5,
                                       tokens_in_flight=3000, sent_unix_s=time.time()))
    assert make_policy("least_work", full).choose(short, full.live("m")).replica_id == "b"


@pytest.mark.integration
async def test_fleet_drops_load_reports_whose_subject_names_another_replica(nats_server) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import nats

    from switchyard.bus import subjects

    fleet = FleetView()
    nc = await nats.connect(nats_server.url)
    try:
        await fleet.subscribe(nc)
        await nc.publish(subjects.load_subject("m", "a"), report("a").SerializeToString())
        await nc.publish(subjects.load_subject("m", "a"), report("b").SerializeToString())  # forged: b on a's subject
        await nc.publish(subjects.load_subject("other", "c"), report("c").SerializeToString())  # model differs
        await nc.flush()
        for _ in range(50):
            if fleet.replicas:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert list(fleet.replicas) == ["a"]
    finally:
        await nc.close()
