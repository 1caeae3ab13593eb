"""FinOps: what a run cost, by tenant, model, replica and request type, and its biggest driver.

Two kinds of cost:
- token cost, per request: prompt tokens × prompt price + completion tokens × completion
  price (per 1M tokens, per model). If a model has a `cached_prompt_per_1m` price, the
  request's cached prompt tokens are charged at that price instead of the prompt price.
  Every request is charged, failed ones included (their tokens were processed).
- replica cost, per replica: seconds in the registry × replica-hour price / 3600.

Attribution rules (each breakdown sums to the same grand total):
- by model: token cost of the model's requests + replica cost of the model's replicas;
- by replica: token cost of the requests it served + its own replica cost;
- by tenant and by request type: token cost of their requests + a share of each replica's
  cost in proportion to the tokens (prompt + completion) they had on that replica. A replica
  that served no tokens is not attributable: its cost is listed under "(idle replicas)".

Biggest driver: the largest single line item (one key of one breakdown, one component —
prompt tokens, completion tokens or replica time), e.g. "replica time of model
smollm2-135m-instruct (62%)". Tenant and request-type breakdowns with a single key (a
one-tenant run) and the "(idle replicas)" rows are skipped as candidates when any other
candidate exists (they say "everything" rather than "this"); ties go to model, then replica,
tenant, request type.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from switchyard.reporting.records import ReplicaUsage, RequestRecord, replica_seconds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DIMENSIONS = ("tenant", "model", "replica", "request_type")
DIMENSION_LABELS = {"tenant": "tenant", "model": "model", "replica": "replica", "request_type": "request type"}
COMPONENTS = ("prompt", "completion", "replica")
COMPONENT_LABELS = {"prompt": "prompt tokens", "completion": "completion tokens", "replica": "replica time"}
IDLE = "(idle replicas)"
UNKNOWN = "(unknown)"
_DRIVER_PRIORITY = {"model": 0, "replica": 1, "tenant": 2, "request_type": 3}


@dataclass(frozen=True)
class ModelPrice:
    prompt_per_1m: float
    completion_per_1m: float
    replica_hour: float
    cached_prompt_per_1m: float | None = None  # None: cached tokens cost the prompt price


@dataclass
class PriceTable:
    models: dict[str, ModelPrice]
    currency: str = "USD"
    default: ModelPrice | None = None  # price of models not listed; None: they are unpriced
    source: str = "built-in"

    def price(self, model: str) -> ModelPrice | None:
        return self.models.get(model, self.default)


#: Built-in prices (illustrative, USD) used when no price file is given. The fp32 model
#: needs ~4x the memory and more compute per token than int4, so it is priced higher.
BUILTIN_PRICES = PriceTable(
    models={
        "smollm2-135m-instruct": ModelPrice(prompt_per_1m=0.10, completion_per_1m=0.40, replica_hour=0.80),
        "smollm2-135m-instruct-int4": ModelPrice(prompt_per_1m=0.04, completion_per_1m=0.16, replica_hour=0.30),
        "tiny-llama": ModelPrice(prompt_per_1m=0.01, completion_per_1m=0.02, replica_hour=0.05),
    },
    currency="USD",
    source="built-in",
)

_PRICE_KEYS = {"prompt_per_1m", "completion_per_1m", "replica_hour", "cached_prompt_per_1m"}
_REQUIRED_PRICE_KEYS = {"prompt_per_1m", "completion_per_1m", "replica_hour"}


def _parse_price(where: str, data: Any) -> ModelPrice:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table of prices")
    unknown = set(data) - _PRICE_KEYS
    missing = _REQUIRED_PRICE_KEYS - set(data)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_PRICE_KEYS)}")
    if missing:
        raise ValueError(f"{where}: missing key(s) {sorted(missing)}")
    values: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}.{key}: expected a non-negative number, got {value!r}")
        values[key] = float(value)
    return ModelPrice(**values)


def load_prices(path: Path | None = None) -> PriceTable:
    """Prices from a TOML file (format: prices.example.toml next to this module), or the
    built-in table when `path` is None. Raises ValueError on a malformed file."""
    if path is None:
        return BUILTIN_PRICES
    path = Path(path)
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    unknown = set(data) - {"currency", "models", "default"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    models_raw = data.get("models", {})
    if not isinstance(models_raw, dict):
        raise ValueError(f"{path}: [models] must be a table")
    models = {name: _parse_price(f"{path}: models.{name}", raw) for name, raw in models_raw.items()}
    default = _parse_price(f"{path}: default", data["default"]) if "default" in data else None
    return PriceTable(models=models, currency=str(data.get("currency", "USD")), default=default, source=str(path))


@dataclass
class CostLine:
    """Cost of one key of one breakdown, by component, plus the usage behind it."""

    prompt: float = 0.0
    completion: float = 0.0
    replica: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replica_seconds: float = 0.0  # own replicas (model, replica) or attributed share (tenant, type)

    @property
    def total(self) -> float:
        return self.prompt + self.completion + self.replica

    def component(self, name: str) -> float:
        return float(getattr(self, name))


@dataclass(frozen=True)
class CostDriver:
    dimension: str
    key: str
    component: str
    amount: float
    share: float  # of the grand total, 0..1

    def describe(self) -> str:
        return (f"{COMPONENT_LABELS[self.component]} of {DIMENSION_LABELS[self.dimension]} "
                f"{self.key} ({self.share:.0%})")


@dataclass
class CostReport:
    currency: str
    prices_source: str
    total: float
    components: dict[str, float]  # prompt / completion / replica → amount
    by: dict[str, dict[str, CostLine]]  # dimension → key → line, keys sorted by cost, largest first
    driver: CostDriver | None
    replica_seconds: dict[str, tuple[str, float]]  # replica_id → (model, seconds)
    unpriced_models: list[str] = field(default_factory=list)

    def line_items(self) -> list[CostDriver]:
        """Every (dimension, key, component) with a positive amount, largest first."""
        items = []
        for dim in DIMENSIONS:
            for key, line in self.by.get(dim, {}).items():
                for comp in COMPONENTS:
                    amount = line.component(comp)
                    if amount > 0:
                        items.append(CostDriver(dim, key, comp, amount, amount / self.total if self.total else 0.0))
        items.sort(key=lambda d: (-round(d.amount, 12), _DRIVER_PRIORITY[d.dimension], COMPONENTS.index(d.component)))
        return items


def token_cost(record: RequestRecord, price: ModelPrice) -> tuple[float, float]:
    """(prompt cost, completion cost) of one request."""
    cached = min(max(record.cached_prompt_tokens, 0), max(record.prompt_tokens, 0))
    cached_price = price.prompt_per_1m if price.cached_prompt_per_1m is None else price.cached_prompt_per_1m
    prompt = ((record.prompt_tokens - cached) * price.prompt_per_1m + cached * cached_price) / 1e6
    completion = record.completion_tokens * price.completion_per_1m / 1e6
    return prompt, completion


def _keys(record: RequestRecord) -> dict[str, str]:
    return {"tenant": record.tenant or UNKNOWN, "model": record.model or UNKNOWN,
            "replica": record.replica_id or "(none)", "request_type": record.request_type or UNKNOWN}


def cost_report(records: Sequence[RequestRecord], replicas: Sequence[ReplicaUsage],
                prices: PriceTable | None = None) -> CostReport:
    prices = prices or BUILTIN_PRICES
    by: dict[str, dict[str, CostLine]] = {dim: {} for dim in DIMENSIONS}
    unpriced: set[str] = set()

    # Token cost, and each replica's token mix by tenant / request type for the split.
    tokens_on_replica: dict[str, dict[str, dict[str, int]]] = {}  # replica → dim → key → tokens
    for r in records:
        price = prices.price(r.model)
        if price is None:
            unpriced.add(r.model)
            prompt = completion = 0.0
        else:
            prompt, completion = token_cost(r, price)
        for dim, key in _keys(r).items():
            line = by[dim].setdefault(key, CostLine())
            line.prompt += prompt
            line.completion += completion
            line.requests += 1
            line.prompt_tokens += r.prompt_tokens
            line.completion_tokens += r.completion_tokens
        if r.replica_id:
            mix = tokens_on_replica.setdefault(r.replica_id, {"tenant": {}, "request_type": {}})
            keys = _keys(r)
            for dim in ("tenant", "request_type"):
                mix[dim][keys[dim]] = mix[dim].get(keys[dim], 0) + r.prompt_tokens + r.completion_tokens

    # Replica cost: to the replica and its model; split over tenants / request types by tokens.
    seconds = replica_seconds(replicas)
    for rid, (model, secs) in sorted(seconds.items()):
        price = prices.price(model)
        if price is None:
            unpriced.add(model)
        amount = secs * (price.replica_hour if price else 0.0) / 3600.0
        for dim, key in (("replica", rid), ("model", model)):
            line = by[dim].setdefault(key, CostLine())
            line.replica += amount
            line.replica_seconds += secs
        mix = tokens_on_replica.get(rid, {})
        for dim in ("tenant", "request_type"):
            weights = {k: w for k, w in mix.get(dim, {}).items() if w > 0}
            total_w = sum(weights.values())
            if total_w == 0:
                weights, total_w = {IDLE: 1}, 1
            for key, w in weights.items():
                line = by[dim].setdefault(key, CostLine())
                line.replica += amount * w / total_w
                line.replica_seconds += secs * w / total_w

    components = {c: sum(line.component(c) for line in by["model"].values()) for c in COMPONENTS}
    total = sum(components.values())
    by = {dim: dict(sorted(lines.items(), key=lambda kv: (-kv[1].total, kv[0]))) for dim, lines in by.items()}
    report = CostReport(currency=prices.currency, prices_source=prices.source, total=total,
                        components=components, by=by, driver=None, replica_seconds=seconds,
                        unpriced_models=sorted(unpriced))
    report.driver = biggest_driver(report)
    return report


def biggest_driver(report: CostReport) -> CostDriver | None:
    items = report.line_items()
    informative = [d for d in items if d.key != IDLE
                   and (d.dimension in ("model", "replica") or len(report.by[d.dimension]) > 1)]
    chosen = informative or items
    return chosen[0] if chosen else None


def fmt_money(amount: float, currency: str = "USD") -> str:
    symbol = "$" if currency == "USD" else ""
    suffix = "" if symbol else f" {currency}"
    if amount == 0:
        return f"{symbol}0{suffix}"
    if abs(amount) < 0.01:
        return f"{symbol}{amount:.6f}{suffix}"
    return f"{symbol}{amount:,.4f}{suffix}"
