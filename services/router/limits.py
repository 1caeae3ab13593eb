"""Per-tenant rate limits (token buckets) and per-model admission control.

Rate limits: a requests-per-minute bucket and a tokens-per-minute bucket per tenant. A
request reserves prompt + max_tokens up front and is settled to its actual use at the end,
so a tenant cannot overrun its budget mid-stream, and unused reservation flows back. Each
tenant has its own buckets: one at its limit never slows another.

Admission: a model takes at most what its replicas can hold soon — batch slots plus a bounded
queue, and KV tokens (prompt + max_tokens) plus a bounded share as queue; past that, requests
are shed immediately with a retry delay measured from the completion rate, instead of queueing
without bound and letting latency grow.

Fair share: when a model is contended, no tenant holds more than its share of that capacity
(max-min fair, weighted by the tenant's `weight`). A tenant below its share is admitted even
when others have filled the model (its requests queue, they are not shed), while a tenant above
it is shed at the limit; an idle system still lets one tenant use everything. So a tenant
flooding a model cannot lock out a second one; the price is that in-flight work may exceed the
limit by the newcomers' shares until the flood's requests finish.

Several routers: each keeps these counts for its own connections, and `services/router/peers.py`
shares them. A router's tenant buckets are also charged what the other routers charged
(`charge`, from the net charges each drains with `drain_charges`), and its admission counts the
other routers' requests in flight (`AdmissionControl.set_peer`) — so the limits hold for the
fleet, not per router.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .errors import ErrorKind, RequestError
from .tenants import Tenant


@dataclass
class TokenBucket:
    capacity: float
    refill_per_s: float
    level: float = -1.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.capacity

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.refill_per_s)
        self.updated = now

    def wait_for(self, amount: float, now: float | None = None) -> float:
        """Seconds until `amount` is available (0 = available now)."""
        self._refill(time.monotonic() if now is None else now)
        if amount <= self.level:
            return 0.0
        if self.refill_per_s <= 0:
            return float("inf")
        return (amount - self.level) / self.refill_per_s

    def take(self, amount: float) -> None:
        self.level -= amount

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


def _refuse_if_over(tenant: Tenant, requests: TokenBucket, budget: TokenBucket, tokens: float) -> None:
    """RESOURCE_EXHAUSTED with the wait until one request and `tokens` fit, if they do not now."""
    wait = max(requests.wait_for(1), budget.wait_for(tokens))
    if wait > 0:
        which = "requests" if requests.wait_for(1) > 0 else "tokens"
        raise RequestError(ErrorKind.RESOURCE_EXHAUSTED,
                           f"tenant {tenant.name} is over its {which}-per-minute limit; retry in {wait:.1f}s",
                           retry_after_s=wait)


@dataclass
class Reservation:
    tenant: Tenant
    tokens: int
    request_taken: bool = False  # by take_request, before the tokens were known


class RateLimiter:
    def __init__(self) -> None:
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._charged: dict[str, list[float]] = {}  # tenant → net [requests, tokens] since drain_charges

    def _note(self, tenant: Tenant, requests: float, tokens: float) -> None:
        charged = self._charged.setdefault(tenant.name, [0.0, 0.0])
        charged[0] += requests
        charged[1] += tokens

    def drain_charges(self) -> dict[str, tuple[float, float]]:
        """Net (requests, tokens) charged to each tenant's buckets here since the last call:
        what the other routers must charge too."""
        charged, self._charged = self._charged, {}
        return {name: (r, t) for name, (r, t) in charged.items() if r or t}

    def charge(self, tenant: Tenant, requests: float, tokens: float) -> None:
        """Apply what another router charged `tenant` (negative: gave back). Unconditional —
        the other router admitted it already — so the buckets may go below zero, and this
        router then refuses the tenant until the refill repays it."""
        if tenant.requests_per_minute == float("inf") and tenant.tokens_per_minute == float("inf"):
            return
        bucket_requests, bucket_tokens = self._buckets(tenant)
        for bucket, amount in ((bucket_requests, requests), (bucket_tokens, tokens)):
            bucket.wait_for(0)  # refill up to now first, so the charge lands on the current level
            if amount > 0:
                bucket.take(amount)
            elif amount < 0:
                bucket.give_back(-amount)

    def _buckets(self, tenant: Tenant) -> tuple[TokenBucket, TokenBucket]:
        if tenant.name not in self._requests:
            self._requests[tenant.name] = TokenBucket(tenant.requests_per_minute, tenant.requests_per_minute / 60)
            self._tokens[tenant.name] = TokenBucket(tenant.tokens_per_minute, tenant.tokens_per_minute / 60)
        return self._requests[tenant.name], self._tokens[tenant.name]

    def reserve(self, tenant: Tenant, tokens: int) -> Reservation:
        if tenant.requests_per_minute == float("inf") and tenant.tokens_per_minute == float("inf"):
            return Reservation(tenant, 0)
        requests, budget = self._buckets(tenant)
        if tokens > budget.capacity:
            # Never fits, however long the client waits: bad input, not a retryable 429.
            raise RequestError(ErrorKind.INVALID_ARGUMENT,
                               f"max_tokens: request needs {tokens} tokens (prompt + max_tokens) but tenant "
                               f"{tenant.name} may use {budget.capacity:.0f} per minute; lower max_tokens",
                               field="max_tokens")
        _refuse_if_over(tenant, requests, budget, tokens)
        requests.take(1)
        budget.take(tokens)
        self._note(tenant, 1, tokens)
        return Reservation(tenant, tokens)

    def take_request(self, tenant: Tenant, min_tokens: int = 0) -> Reservation:
        """Charge one request before any expensive work (rendering, tokenizing): a tenant over its
        requests-per-minute limit — or whose token budget cannot cover even `min_tokens`, a lower
        bound of the request's size — is refused before it costs the router anything, also when
        its request would turn out invalid. `reserve_tokens` then charges the exact size."""
        if tenant.requests_per_minute == float("inf") and tenant.tokens_per_minute == float("inf"):
            return Reservation(tenant, 0)
        requests, budget = self._buckets(tenant)
        _refuse_if_over(tenant, requests, budget, min(min_tokens, budget.capacity))
        requests.take(1)
        self._note(tenant, 1, 0)
        return Reservation(tenant, 0, request_taken=True)

    def reserve_tokens(self, reservation: Reservation, tokens: int) -> None:
        """The request's exact size (prompt + max_tokens), once known, on a `take_request`
        reservation; refused when the budget cannot hold it. The request place stays spent:
        the request was rendered and tokenized, which is what the requests limit bounds."""
        tenant = reservation.tenant
        if tenant.requests_per_minute == float("inf") and tenant.tokens_per_minute == float("inf"):
            return
        budget = self._buckets(tenant)[1]
        if tokens > budget.capacity:
            raise RequestError(ErrorKind.INVALID_ARGUMENT,
                               f"max_tokens: request needs {tokens} tokens (prompt + max_tokens) but tenant "
                               f"{tenant.name} may use {budget.capacity:.0f} per minute; lower max_tokens",
                               field="max_tokens")
        wait = budget.wait_for(tokens)
        if wait > 0:
            raise RequestError(ErrorKind.RESOURCE_EXHAUSTED,
                               f"tenant {tenant.name} is over its tokens-per-minute limit; retry in {wait:.1f}s",
                               retry_after_s=wait)
        budget.take(tokens)
        self._note(tenant, 0, tokens)
        reservation.tokens = tokens

    def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Give back what the request reserved but did not use."""
        if reservation.tokens and used_tokens < reservation.tokens:
            self._buckets(reservation.tenant)[1].give_back(reservation.tokens - used_tokens)
            self._note(reservation.tenant, 0, used_tokens - reservation.tokens)

    def refund(self, reservation: Reservation) -> None:
        """The request was shed before any work (the model is full): it costs the tenant
        nothing, neither its tokens nor its place in the requests-per-minute limit."""
        if not reservation.tokens and not reservation.request_taken:
            return
        requests, budget = self._buckets(reservation.tenant)
        requests.give_back(1)
        budget.give_back(reservation.tokens)
        self._note(reservation.tenant, -1, -reservation.tokens)
        reservation.tokens, reservation.request_taken = 0, False


@dataclass
class PeerModelLoad:
    """Another router's requests in flight for one model, from its last usage report."""

    requests: int = 0
    tokens: int = 0
    tenants: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # tenant → (requests, tokens, weight)
    completed_requests_per_s: float = 0.0
    completed_tokens_per_s: float = 0.0


class AdmissionControl:
    """Per model: admit a request only while the replicas can hold it soon — in batch slots
    (capacity + `queue_limit` requests) and in tokens (prompt + max_tokens reserved against
    the replicas' KV token budgets, plus a `token_queue_factor` share of them as queue).
    Counting slots alone admitted requests that then waited a minute for KV room behind long
    generations; counting tokens bounds an admitted request's wait to a fraction of one
    generation. A shed request's retry delay is the time the model needs, at the completion
    rate measured over the last `window_s`, to free what is in excess — not a constant."""

    def __init__(self, queue_limit: int, token_queue_factor: float = 0.5, window_s: float = 30.0) -> None:
        self.queue_limit = queue_limit
        self.token_queue_factor = token_queue_factor
        self.window_s = window_s
        self.inflight: dict[str, int] = {}
        self.inflight_tokens: dict[str, int] = {}
        # model → tenant → [requests, tokens, weight] in flight (fair share between tenants)
        self.by_tenant: dict[str, dict[str, list[float]]] = {}
        self._done: dict[str, deque[tuple[float, int]]] = {}  # model → (finish time, tokens) of recent completions
        self._peers: dict[str, tuple[float, dict[str, PeerModelLoad]]] = {}  # router → (expires at, model → load)

    # ---- other routers ------------------------------------------------------------------
    def set_peer(self, router_id: str, models: dict[str, PeerModelLoad], expires_at: float) -> None:
        """Another router's load, counted until `expires_at` (monotonic) unless it reports again."""
        self._peers[router_id] = (expires_at, models)

    def drop_peer(self, router_id: str) -> None:
        self._peers.pop(router_id, None)

    def peers(self, now: float | None = None) -> list[str]:
        """Routers whose load counts now (expired ones are forgotten). Event loop only."""
        now = time.monotonic() if now is None else now
        for router_id in [r for r, (expires, _) in list(self._peers.items()) if expires < now]:
            del self._peers[router_id]
        return sorted(self._peers)

    def live_peers(self) -> int:
        """How many routers' load counts now, changing nothing: the metrics thread calls it."""
        now = time.monotonic()
        return sum(1 for expires, _ in list(self._peers.values()) if expires >= now)

    def _peer_loads(self, model: str) -> list[PeerModelLoad]:
        if not self._peers:
            return []
        now = time.monotonic()
        return [models[model] for expires, models in list(self._peers.values()) if expires >= now and model in models]

    def own_load(self) -> dict[str, PeerModelLoad]:
        """This router's own requests in flight per model (what it reports to the others)."""
        now = time.monotonic()
        out = {}
        for model in sorted(set(self.inflight) | set(self._done)):
            requests_per_s, tokens_per_s = self._own_rates(model, now)
            if not self.inflight.get(model) and not requests_per_s:
                continue
            out[model] = PeerModelLoad(self.inflight.get(model, 0), self.inflight_tokens.get(model, 0),
                                       {t: (int(n), int(held), w) for t, (n, held, w) in self.by_tenant.get(model, {}).items()},
                                       requests_per_s, tokens_per_s)
        return out

    def _rates(self, model: str, now: float) -> tuple[float, float]:
        """(requests/s, tokens/s) completed over the window, by this router and the others."""
        requests_per_s, tokens_per_s = self._own_rates(model, now)
        for peer in self._peer_loads(model):
            requests_per_s += peer.completed_requests_per_s
            tokens_per_s += peer.completed_tokens_per_s
        return requests_per_s, tokens_per_s

    def _own_rates(self, model: str, now: float) -> tuple[float, float]:
        """(requests/s, tokens/s) completed here over the window (0 when nothing finished yet)."""
        done = self._done.get(model)
        if not done:
            return 0.0, 0.0
        while done and now - done[0][0] > self.window_s:
            done.popleft()
        if not done:
            return 0.0, 0.0
        span = max(now - done[0][0], 1.0)
        return len(done) / span, sum(t for _, t in done) / span

    def retry_after_s(self, model: str, excess_requests: float, excess_tokens: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        req_rate, tok_rate = self._rates(model, now)
        waits = [1.0]
        if excess_requests > 0 and req_rate > 0:
            waits.append(excess_requests / req_rate)
        if excess_tokens > 0 and tok_rate > 0:
            waits.append(excess_tokens / tok_rate)
        return min(max(waits), 60.0)

    def share(self, model: str, tenant: str, weight: float = 1.0) -> float:
        """`tenant`'s fraction of `model`'s capacity: its weight over the weights of every tenant
        with requests in flight there, itself included (1.0 when it is alone)."""
        active = {t: w for t, (n, _, w) in self.by_tenant.get(model, {}).items() if n > 0}
        for peer in self._peer_loads(model):
            active.update((t, w) for t, (n, _, w) in peer.tenants.items() if n > 0 and t not in active)
        active[tenant] = weight
        return weight / sum(active.values())

    def within_share(self, model: str, tenant: str, tokens: int, limit: int, token_limit: int,
                     weight: float = 1.0) -> bool:
        """Whether one more request of `tokens` keeps `tenant` within its fair share of the
        model's request and token limits (always room for one request of its own)."""
        n, held, _ = self.by_tenant.get(model, {}).get(tenant, (0, 0, weight))
        for peer in self._peer_loads(model):
            peer_n, peer_held, _ = peer.tenants.get(tenant, (0, 0, weight))
            n, held = n + peer_n, held + peer_held
        share = self.share(model, tenant, weight)
        if n + 1 > max(1, int(share * limit)):
            return False
        return token_limit <= 0 or n == 0 or held + tokens <= share * token_limit

    def enter(self, model: str, capacity: int, tokens: int = 0, token_capacity: int = 0,
              timeout_s: float | None = None, tenant: str = "", weight: float = 1.0) -> None:
        """Admit one request of `tokens` (prompt + max_tokens) for `model`, or shed it — also
        when its deadline (`timeout_s`) ends before the queue ahead of it would drain: admitting
        it would only spend capacity on work that times out (bench/retry_storm.py). A tenant
        within its fair share passes the model's limits (see the module docstring)."""
        current = self.inflight.get(model, 0)
        held = self.inflight_tokens.get(model, 0)
        for peer in self._peer_loads(model):  # the other routers' requests use the same replicas
            current, held = current + peer.requests, held + peer.tokens
        limit = capacity + self.queue_limit
        token_limit = int(token_capacity * (1 + self.token_queue_factor))
        fair = current > 0 and self.within_share(model, tenant, tokens, limit, token_limit, weight)
        if current >= limit and not fair:
            wait = self.retry_after_s(model, current + 1 - limit, 0)
            raise RequestError(ErrorKind.RESOURCE_EXHAUSTED,
                               f"model {model} is at capacity ({current} requests in flight, limit {limit}); "
                               f"retry in {wait:.1f}s", retry_after_s=wait)
        # A request alone is always admitted (the batcher runs a lone request whatever its size).
        if token_capacity > 0 and current > 0 and held + tokens > token_limit and not fair:
            wait = self.retry_after_s(model, 0, held + tokens - token_limit)
            raise RequestError(ErrorKind.RESOURCE_EXHAUSTED,
                               f"model {model} is at capacity ({held} tokens reserved in flight, room for "
                               f"{token_limit}); retry in {wait:.1f}s", retry_after_s=wait)
        if timeout_s is not None and (current >= capacity or (token_capacity > 0 and held + tokens > token_capacity)):
            req_rate, tok_rate = self._rates(model, time.monotonic())
            waits = [0.0]
            if current >= capacity and req_rate > 0:  # queued behind (current + 1 - capacity) requests
                waits.append((current + 1 - capacity) / req_rate)
            if token_capacity > 0 and held + tokens > token_capacity and tok_rate > 0:
                waits.append((held + tokens - token_capacity) / tok_rate)
            wait = max(waits)
            if wait > timeout_s:
                raise RequestError(ErrorKind.RESOURCE_EXHAUSTED,
                                   f"model {model} would not start this request before its deadline "
                                   f"(queue drains in ~{wait:.1f}s, deadline {timeout_s:.1f}s); retry in {wait:.1f}s",
                                   retry_after_s=min(wait, 60.0))
        self.inflight[model] = self.inflight.get(model, 0) + 1
        self.inflight_tokens[model] = self.inflight_tokens.get(model, 0) + tokens
        mine = self.by_tenant.setdefault(model, {}).setdefault(tenant, [0, 0, weight])
        mine[0], mine[1], mine[2] = mine[0] + 1, mine[1] + tokens, weight

    def leave(self, model: str, tokens: int = 0, completed: bool = True, tenant: str = "") -> None:
        """The request ended; `completed` ones feed the measured completion rate."""
        self.inflight[model] = max(self.inflight.get(model, 1) - 1, 0)
        self.inflight_tokens[model] = max(self.inflight_tokens.get(model, tokens) - tokens, 0)
        tenants = self.by_tenant.get(model, {})
        mine = tenants.get(tenant)
        if mine is not None:
            mine[0], mine[1] = max(mine[0] - 1, 0), max(mine[1] - tokens, 0)
            if mine[0] == 0:
                del tenants[tenant]
        if completed:
            self._done.setdefault(model, deque(maxlen=10_000)).append((time.monotonic(), tokens))
