"""Per-tenant rate limits (token buckets) and per-model admission control.

Rate limits: a requests-per-minute bucket and a tokens-per-minute bucket per tenant. A
request reserves prompt + max_tokens up front and is settled to its actual use at the end,
so a tenant cannot overrun its budget mid-stream, and unused reservation flows back. Each
tenant has its own buckets: one at its limit never slows another.

Admission: a model takes at most (its replicas' batch capacity + a bounded queue) requests
at once; past that, requests are shed immediately with a retry delay instead of queueing
without bound and letting latency grow.
"""

from __future__ import annotations

import time
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


@dataclass
class Reservation:
    tenant: Tenant
    tokens: int


class RateLimiter:
    def __init__(self) -> None:
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

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
        wait = max(requests.wait_for(1), budget.wait_for(tokens))
        if wait > 0:
            which = "requests" if requests.wait_for(1) > 0 else "tokens"
            raise RequestError(ErrorKind.RESOURCE_EXHAUSTED,
                               f"tenant {tenant.name} is over its {which}-per-minute limit; retry in {wait:.1f}s",
                               retry_after_s=wait)
        requests.take(1)
        budget.take(tokens)
        return Reservation(tenant, tokens)

    def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Give back what the request reserved but did not use."""
        if reservation.tokens and used_tokens < reservation.tokens:
            self._buckets(reservation.tenant)[1].give_back(reservation.tokens - used_tokens)


class AdmissionControl:
    def __init__(self, queue_limit: int) -> None:
        self.queue_limit = queue_limit
        self.inflight: dict[str, int] = {}

    def enter(self, model: str, capacity: int) -> None:
        """Admit one request for `model`, or shed it when capacity + queue are taken."""
        current = self.inflight.get(model, 0)
        limit = capacity + self.queue_limit
        if current >= limit:
            raise RequestError(ErrorKind.RESOURCE_EXHAUSTED,
                               f"model {model} is at capacity ({current} requests in flight, limit {limit}); "
                               "retry shortly", retry_after_s=1.0)
        self.inflight[model] = current + 1

    def leave(self, model: str) -> None:
        self.inflight[model] = max(self.inflight.get(model, 1) - 1, 0)
