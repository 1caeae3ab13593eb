"""The request pipeline every front end (gRPC, HTTP) shares: validate, tokenize, pick a
replica, dispatch over NATS, relay the replica's events as text deltas, enforce stop
strings and deadlines, and cancel the replica's work when the client goes away."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncGenerator, Callable

from switchyard.fleet.view import FleetView, ReplicaState
from switchyard.model.catalog import CHAT_ROLES, IncrementalDetokenizer, ModelCatalog, ModelEntry
from switchyard.prefix.blocks import BLOCK_SIZE, block_hashes
from switchyard.resilience.outliers import OutlierDetector
from switchyard.resilience.retry import RetryBudget, backoff_s
from switchyard.routing.model_routes import ModelRoute, ModelRouter
from switchyard.routing.policy import RoutingPolicy, RoutingRequest
from switchyard.routing.table import RoutingTable
from switchyard.v1 import bus_pb2, generate_pb2

from .demand import DemandTracker
from .dispatch import POKE, Dispatcher
from .errors import ErrorKind, RequestError, invalid
from .limits import AdmissionControl, RateLimiter
from .observe import Observation, RequestObserver
from .rollouts import Resolution, RolloutManager
from .tenants import Tenant, TenantDirectory

REJOIN_GRACE_S = 0.5  # how long a request waits for an expired replica's late heartbeat

log = logging.getLogger(__name__)

MAX_TEMPERATURE = 2.0
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_STRINGS = 16
OFFLOAD_TOKENIZE_CHARS = 16_384  # longer inputs are tokenized in a thread (a few ms of work and up)
UNKNOWN_MODEL = "unknown"  # the metric label and record model of a request for no known model


@dataclass
class GenerationRequest:
    """A request as the pipeline sees it, whatever front end it came from."""

    model: str
    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[tuple[str, str]] | None = None
    max_tokens: int | None = 0  # None: as many as the context allows, up to the model's limit
    sampling: generate_pb2.SamplingParams = field(default_factory=generate_pb2.SamplingParams)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    request_id: str = ""
    timeout_s: float | None = None  # time left before the client's deadline
    tenant: Tenant | None = None  # set by the front end after authenticate()
    request_type: str = "grpc"  # front end and shape: grpc, chat, completion
    session_id: str = ""  # conversation or end-user key (OpenAI `user`), for routing
    field_names: dict[str, str] = field(default_factory=dict)  # pipeline field → the client's name for it


@dataclass
class TokenDelta:
    token_ids: list[int]
    text: str
    index: int


@dataclass
class Completion:
    """The end of a successful generation."""

    finish_reason: int
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    end_to_end_s: float
    queue_wait_s: float
    replica_id: str
    model: str
    max_batch_size: int = 0
    cached_prompt_tokens: int = 0


Event = TokenDelta | Completion


@dataclass(frozen=True)
class ResilienceConfig:
    """How hard the router tries before failing a request on a replica's account."""

    max_failovers: int = 3  # re-dispatches of one request (retries before the first token, continuations after)
    stall_timeout_s: float = 2.0  # silence from a replica that reports it cannot serve before moving on
    failover_wait_s: float = 10.0  # how long to wait for a live replica to continue on
    retry_budget_ratio: float = 0.2  # failovers may add at most this share of recent requests
    eject_after_failures: int = 3  # consecutive failures that eject a replica for a while
    replica_wait_s: float = 0.0  # a request for a model with no live replica waits this long for one (scale from zero)


@dataclass
class PreparedRequest:
    request: GenerationRequest
    entry: ModelEntry  # the model that serves it (a virtual model's choice)
    prompt_ids: list[int]
    max_tokens: int
    difficulty: float | None = None  # set when a virtual model chose `entry` by difficulty
    rollout: Resolution | None = None  # the version a rollout chose (services/router/rollouts.py)

    @property
    def model(self) -> str:
        return self.entry.name


@dataclass
class Route:
    """Where a request goes: the replica, the policy that chose it and what it was shown."""

    replica: ReplicaState
    policy: RoutingPolicy
    request: RoutingRequest


def _rename_field(error: RequestError, names: dict[str, str]) -> None:
    """Name the field as the client sent it (chat's `messages` for the prompt, and so on)."""
    wire = names.get(error.field or "")
    if wire and error.field:
        if error.message.startswith(error.field + ":"):
            error.message = wire + error.message[len(error.field):]
        error.field = wire


class StopStringMatcher:
    """Finds stop strings in streamed text and holds back a tail that may begin one, so a
    stop string never reaches the client, even split across chunks."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# Stream errors that are the replica's fault, not the request's: the request may go elsewhere.
REPLICA_FAULTS = frozenset({generate_pb2.ERROR_CODE_UNAVAILABLE, generate_pb2.ERROR_CODE_INTERNAL})


class ReplicaFailure(Exception):
    """The replica serving a dispatch failed it (error, gone, stalled)."""

    def __init__(self, replica_id: str, reason: str, departed: bool = False) -> None:
        super().__init__(f"replica {replica_id} {reason}")
        self.replica_id = replica_id
        self.reason = reason
        # The replica left the fleet or drains (scaled down, stopped): moving what it held is
        # not a retry of a failure, and a scale-down may move more than the retry budget allows.
        self.departed = departed


@dataclass
class StreamProgress:
    """What a request's stream has delivered so far, across failovers."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None


class RequestPipeline:
    """Auth → validation and tokenization → rate limits → admission → replica choice →
    dispatch → relay. Front ends only convert their wire format to and from it."""

    def __init__(self, catalog: ModelCatalog, fleet: FleetView, dispatcher: Dispatcher,
                 routing: RoutingTable, tenants: TenantDirectory | None = None,
                 limiter: RateLimiter | None = None, admission: AdmissionControl | None = None,
                 observer: RequestObserver | None = None, model_router: ModelRouter | None = None,
                 resilience: ResilienceConfig | None = None, rollouts: RolloutManager | None = None) -> None:
        self.catalog = catalog
        self.rollouts = rollouts or RolloutManager("", catalog)  # no rollout state: names resolve to themselves
        res = resilience or ResilienceConfig()
        self.max_failovers = res.max_failovers
        self.stall_timeout_s = res.stall_timeout_s
        self.failover_wait_s = res.failover_wait_s
        self.replica_wait_s = res.replica_wait_s
        self.demand = DemandTracker()  # published for the autoscaler (services/router/demand.py)
        self.demand_wake: Callable[[], None] = lambda: None  # publish demand now (set by the server)
        self.retry_budget = RetryBudget(res.retry_budget_ratio)
        self.outliers = OutlierDetector(res.eject_after_failures)
        # a replica back in the fleet (restarted) is a new incarnation: its old failures don't count
        fleet.on_join(lambda replica: self.outliers.forget(replica.replica_id))
        self.model_router = model_router or ModelRouter(())
        self.fleet = fleet
        self.dispatcher = dispatcher
        self.routing = routing
        self.tenants = tenants or TenantDirectory.disabled()
        self.limiter = limiter or RateLimiter()
        self.admission = admission or AdmissionControl(queue_limit=256)
        self.observer = observer or RequestObserver()

    def authenticate(self, key: str | None) -> Tenant:
        tenant = self.tenants.authenticate(key)
        if tenant is None:
            raise RequestError(ErrorKind.UNAUTHENTICATED,
                               "missing API key" if not key else "invalid API key",
                               field="authorization")
        return tenant

    # ---- validation ---------------------------------------------------------------------
    def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """Validate and tokenize; raises RequestError naming the field to fix."""
        if not req.model:
            raise invalid("model", "required; call ListModels for the served models")
        resolution = self.rollouts.resolve(req.model, req.session_id, req.request_id)  # name → name@version
        entry = self.rollouts.entry(resolution.served)
        model_route = self.model_router.get(req.model) if entry is None else None
        if model_route is not None:
            entry = self.catalog.get(model_route.large)  # the small model shares its tokenizer and template
        if entry is None:
            served = sorted(self.served_models())
            raise RequestError(ErrorKind.NOT_FOUND, f"model {req.model!r} not found; served models: {served}",
                               field="model")
        given = [x for x in (req.text, req.token_ids, req.messages) if x is not None]
        if len(given) != 1:
            raise invalid("input", "set exactly one of text, token_ids or chat messages")
        manifest = entry.manifest
        self._check_input_size(req, entry)
        if req.text is not None:
            if not req.text:
                raise invalid("prompt", "must not be empty")
            prompt_ids = entry.encode_text(req.text)  # special-token text stays text
        elif req.token_ids is not None:
            if not req.token_ids:
                raise invalid("token_ids", "must not be empty")
            bad = [t for t in req.token_ids if not 0 <= t < manifest.config.vocab_size]
            if bad:
                raise invalid("token_ids", f"ids must be in [0, {manifest.config.vocab_size}); got {bad[:5]}")
            prompt_ids = list(req.token_ids)
        else:
            assert req.messages is not None
            if not req.messages:
                raise invalid("messages", "must hold at least one message")
            for i, (role, _content) in enumerate(req.messages):
                if role not in CHAT_ROLES:
                    raise invalid(f"messages[{i}].role", f"must be one of {list(CHAT_ROLES)}, got {role!r}")
            if entry.template is None:
                raise invalid("messages", f"model {req.model} has no chat template; send a text prompt")
            prompt_ids = entry.encode_chat(req.messages)  # only the template adds control tokens
        if not prompt_ids:
            raise invalid("prompt", "tokenizes to no tokens")
        difficulty = None
        if model_route is not None:
            entry, difficulty = self._choose_model(model_route, req, prompt_ids)
        limit = manifest.max_output_tokens
        context = manifest.context_length
        if len(prompt_ids) >= context:
            raise invalid("prompt", f"has {len(prompt_ids)} tokens, longer than the context of {context}; shorten it")
        max_tokens = req.max_tokens if req.max_tokens is not None else min(limit, context - len(prompt_ids))
        if not 1 <= max_tokens <= limit:
            raise invalid("max_tokens", f"must be between 1 and {limit}, got {max_tokens}")
        if len(prompt_ids) + max_tokens > context:
            raise invalid("max_tokens", f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) "
                          f"exceeds the context of {context}; lower max_tokens to at most {context - len(prompt_ids)}")
        self._validate_sampling(req.sampling)
        if len(req.stop) > MAX_STOP_STRINGS:
            raise invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        bad = [t for t in req.stop_token_ids if not 0 <= t < manifest.config.vocab_size]
        if bad:
            raise invalid("stop_token_ids", f"ids must be in [0, {manifest.config.vocab_size})")
        if req.timeout_s is not None and req.timeout_s <= 0:
            raise RequestError(ErrorKind.DEADLINE_EXCEEDED, "deadline already expired")
        return PreparedRequest(req, entry, prompt_ids, max_tokens, difficulty, resolution)

    def model_label(self, model: str) -> str:
        """`model` as a metric label: an installed or virtual model's name, else "unknown" (labels
        from client input stay bounded, and a name that is not valid UTF-8 never reaches them)."""
        if self.catalog.get(model) is not None or self.model_router.get(model) is not None:
            return model
        if "@" in model and self.fleet.live(model):  # a served version, pinned (bounded by the fleet)
            return model
        return UNKNOWN_MODEL

    def _choose_model(self, route: ModelRoute, req: GenerationRequest, prompt_ids: list[int]) -> tuple[ModelEntry, float]:
        """A virtual model's pick by difficulty; the other model when the pick has no live replica."""
        if req.messages:
            text = next((c for r, c in reversed(req.messages) if r == "user"), req.messages[-1][1])
        else:
            text = req.text or ""
        choice = self.model_router.choose(route, text, prompt_ids)
        picked = choice.model
        if not self.fleet.live(picked):
            other = route.small if picked == route.large else route.large
            if self.fleet.live(other):
                log.info("model route %s: %s has no live replica, serving with %s", route.name, picked, other)
                picked = other
        entry = self.catalog.get(picked)
        if entry is None:
            raise RequestError(ErrorKind.NOT_FOUND, f"model {picked!r} (routed from {route.name!r}) is not installed",
                               field="model")
        return entry, choice.estimate.score

    @staticmethod
    def input_chars(req: GenerationRequest) -> int:
        if req.text is not None:
            return len(req.text)
        return sum(len(content) for _, content in req.messages or ())

    def _check_input_size(self, req: GenerationRequest, entry: ModelEntry) -> None:
        """Refuse, before tokenizing, a text too long to fit the context whatever it tokenizes
        to (each token covers at most `max_token_bytes` characters): tokenizing a 900 KB prompt
        only to reject it took ~0.5 s of the router's event loop."""
        chars = self.input_chars(req)
        limit = entry.manifest.context_length * entry.max_token_bytes
        if chars > limit:
            raise invalid("prompt",  # named as the client sent it by _rename_field (messages, chat.messages)
                          f"{chars} characters cannot fit the context of {entry.manifest.context_length} tokens "
                          f"(at most {limit} characters); shorten it")

    @staticmethod
    def _validate_sampling(s: generate_pb2.SamplingParams) -> None:
        if not 0.0 <= s.temperature <= MAX_TEMPERATURE or s.temperature != s.temperature:
            raise invalid("temperature", f"must be between 0 and {MAX_TEMPERATURE}, got {s.temperature}")
        if s.top_k < 0:
            raise invalid("top_k", f"must be 0 (off) or positive, got {s.top_k}")
        if not 0.0 <= s.top_p <= 1.0 or s.top_p != s.top_p:
            raise invalid("top_p", f"must be between 0 and 1, got {s.top_p}")
        if not 0.0 <= s.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise invalid("repetition_penalty", f"must be between 0 and {MAX_REPETITION_PENALTY}, "
                          f"got {s.repetition_penalty}")

    def served_models(self) -> dict[str, list[ReplicaState]]:
        """Model name → live replicas, virtual models included (the replicas of the models they
        route to, large first)."""
        models = self.fleet.models()
        for name, replicas in self.rollouts.aliases(models).items():  # `name` of a rollout of name@version
            models.setdefault(name, replicas)
        for name, route in self.model_router.routes.items():
            replicas = models.get(route.large, []) + models.get(route.small, [])
            if replicas:
                models[name] = replicas
        return models

    # ---- routing ------------------------------------------------------------------------
    @staticmethod
    def _routing_request(prepared: PreparedRequest, generated: list[int], tenant: str) -> RoutingRequest:
        """What the policy sees of a dispatch: the prompt plus the tokens already generated
        (a continuation after a failover), and what is left to generate."""
        tokens = prepared.prompt_ids + generated
        req = prepared.request
        return RoutingRequest(
            model=prepared.model, prompt_tokens=len(tokens), expected_output_tokens=prepared.max_tokens - len(generated),
            block_hashes=block_hashes(tokens, prepared.model), block_size=BLOCK_SIZE, tenant=tenant,
            session_id=req.session_id, request_id=req.request_id)

    def route(self, prepared: PreparedRequest, tenant: str) -> Route:
        """Ask the model's routing policy for a replica among the live ones."""
        model = prepared.entry.name
        candidates = self.fleet.live(model)
        if not candidates:
            raise RequestError(ErrorKind.UNAVAILABLE, f"no live replica serves {model!r}; retry shortly",
                               retry_after_s=1.0)
        routing_request = self._routing_request(prepared, [], tenant)
        policy = self.routing.policy_for(model)
        candidates = self.outliers.admit(candidates, key=lambda r: r.replica_id)
        return Route(policy.choose(routing_request, candidates), policy, routing_request)

    async def route_when_live(self, prepared: PreparedRequest, tenant: str, timeout_s: float | None,
                              started: float) -> Route:
        """route(), but a model with no live replica (scaled to zero, or its replicas still
        starting) makes the request wait for one — up to `replica_wait_s` and its deadline —
        and tells the autoscaler at once: the client sees a longer TTFT, not an error."""
        model = prepared.entry.name
        if self.fleet.live(model):
            return self.route(prepared, tenant)
        # Even without replica_wait_s, a short grace: a replica expired at read time may only be
        # one whose heartbeats wait unread behind this router's own busy loop (a first request's
        # work), and it rejoins as soon as they are read — failing at once would 503 a request
        # that a live replica can serve.
        wait_until = time.monotonic() + max(self.replica_wait_s, REJOIN_GRACE_S)
        if timeout_s is not None:
            wait_until = min(wait_until, started + timeout_s)
        self.demand.wait_begins(model)
        self.demand_wake()
        try:
            while not self.fleet.live(model) and time.monotonic() < wait_until:
                await asyncio.sleep(0.05)
        finally:
            self.demand.wait_ends(model)
        return self.route(prepared, tenant)

    # ---- the stream ---------------------------------------------------------------------
    async def generate(self, req: GenerationRequest) -> AsyncGenerator[Event, None]:
        """Yields TokenDeltas then one Completion; raises RequestError on failure."""
        tenant = req.tenant or self.authenticate(None)
        obs = self.observer.begin(self.model_label(req.model), tenant.name, req.request_type, req.request_id)
        code, message, done = "INTERNAL", "", None
        prepared: PreparedRequest | None = None
        try:
            prepare_span = self.observer.prepare_span(obs)
            try:
                # The requests-per-minute limit is charged before rendering and tokenizing: a
                # tenant's invalid or oversized requests spend its quota too (issue 10 §2).
                reservation = self.limiter.take_request(tenant, min_tokens=1 + max(req.max_tokens or 0, 0))
                # Long inputs are tokenized off the event loop, so other streams keep flowing.
                prepared = (await asyncio.to_thread(self.prepare, req)
                            if self.input_chars(req) > OFFLOAD_TOKENIZE_CHARS else self.prepare(req))
                obs.routed(prepared.model, prepared.difficulty)
                self.demand.arrived(prepared.model)
                try:
                    route = await self.route_when_live(prepared, tenant.name, req.timeout_s, obs.started)
                except RequestError:
                    self.limiter.refund(reservation)  # no live replica: not the tenant's doing
                    raise
                self.limiter.reserve_tokens(reservation, len(prepared.prompt_ids) + prepared.max_tokens)
                try:
                    self.admission.enter(prepared.model, self.fleet.capacity(prepared.model),
                                         len(prepared.prompt_ids) + prepared.max_tokens,
                                         self.fleet.token_capacity(prepared.model), req.timeout_s,
                                         tenant=tenant.name, weight=tenant.weight)
                except RequestError:
                    self.limiter.refund(reservation)
                    raise
            finally:
                if prepare_span is not None:
                    prepare_span.end()
            self.demand.started(prepared.model)
            tap = self.rollouts.begin(prepared.rollout, prepared, obs.span) if prepared.rollout else None
            try:
                # aclosing: the relay's cleanup (cancel on the replica) runs now, not whenever
                # the garbage collector finalizes it.
                async with aclosing(self._relay(req, prepared, route, obs)) as relay:
                    async for event in relay:
                        if isinstance(event, TokenDelta):
                            if event.token_ids:
                                obs.on_tokens(len(event.token_ids))
                                if tap is not None:
                                    tap.tokens(event.token_ids)
                        else:
                            done = event
                        yield event
                code = "OK" if done is not None else "CANCELLED"
            except RequestError as error:
                code = error.kind.name
                raise
            except (GeneratorExit, asyncio.CancelledError):
                code = "CANCELLED"
                raise
            finally:
                if tap is not None:
                    tap.finish("OK" if done is not None else code, done)
                self.demand.ended(prepared.model)
                self.admission.leave(prepared.model, len(prepared.prompt_ids) + prepared.max_tokens,
                                     completed=done is not None, tenant=tenant.name)
                self.limiter.settle(reservation, len(prepared.prompt_ids) + obs.completion_tokens)
        except RequestError as error:
            code, message = error.kind.name, error.message
            _rename_field(error, req.field_names)
            raise
        except (GeneratorExit, asyncio.CancelledError):
            # A consumer that has its Completion closes the generator at that last yield
            # (non-streamed HTTP, gRPC Complete): a success, not a cancel.
            code = "OK" if done is not None else "CANCELLED"
            raise
        finally:
            obs.finish(code=code, message=message, replica_id=done.replica_id if done else "",
                       prompt_tokens=len(prepared.prompt_ids) if prepared else 0,
                       finish_reason=done.finish_reason if done else 0,
                       queue_wait_s=done.queue_wait_s if done else 0.0,
                       batch_size=done.max_batch_size if done else 0,
                       cached_prompt_tokens=done.cached_prompt_tokens if done else 0)

    async def _relay(self, req: GenerationRequest, prepared: PreparedRequest, route: Route,
                     obs: Observation) -> AsyncGenerator[Event, None]:
        """The router owns the request until its final event: when its replica fails (error,
        leaves the fleet, stalls) the request goes to another replica — before the first token
        as a retry with backoff and jitter, after it as a continuation of the prompt plus the
        tokens already streamed, sampling resumed at that position — within a retry budget."""
        seed = req.sampling.seed if req.sampling.HasField("seed") else zlib.crc32(uuid.uuid4().bytes)
        progress = StreamProgress(IncrementalDetokenizer(prepared.entry), StopStringMatcher(req.stop))
        tried: set[str] = set()
        failovers = 0
        self.retry_budget.on_request()
        while True:
            try:
                async for event in self._serve_on(req, prepared, route, obs, progress, seed):
                    yield event
                self.outliers.success(route.replica.replica_id)
                return
            except ReplicaFailure as failure:
                self.outliers.failure(failure.replica_id)
                tried.add(failure.replica_id)
                log.warning("request %s: replica %s %s after %d tokens", req.request_id, failure.replica_id,
                            failure.reason, len(progress.generated))
                # Retries before the first token spend the budget (they are new attempts that
                # could pile onto a sick fleet); a continuation finishes a stream already owed to
                # its client and is bounded by max_failovers alone.
                before_first_token = not progress.generated
                spends_budget = before_first_token and not failure.departed
                if failovers >= self.max_failovers or (spends_budget and not self.retry_budget.try_retry()):
                    raise RequestError(ErrorKind.UNAVAILABLE, f"replica {failure.replica_id} {failure.reason}; "
                                       f"gave up after {failovers} failover(s)", retry_after_s=1.0) from None
                if before_first_token:
                    await asyncio.sleep(backoff_s(failovers))
                failovers += 1
                route = await self._reroute(prepared, route, progress, tried, obs.started, req.timeout_s)
                obs.on_failover(failure.replica_id, route.replica.replica_id, failure.reason, len(progress.generated))

    async def _reroute(self, prepared: PreparedRequest, failed: Route, progress: "StreamProgress",
                       tried: set[str], started: float, timeout_s: float | None) -> Route:
        """Another replica for a failed dispatch (one not tried yet when there is one); waits
        up to `failover_wait_s` for a replica to come (back) when none is live."""
        model = prepared.model
        request = self._routing_request(prepared, progress.generated, failed.request.tenant)
        wait_until = time.monotonic() + self.failover_wait_s
        if timeout_s is not None:
            wait_until = min(wait_until, started + timeout_s)
        while True:
            live = self.fleet.live(model)
            candidates = [r for r in live if r.replica_id not in tried] or live
            if candidates:
                candidates = self.outliers.admit(candidates, key=lambda r: r.replica_id)
                return Route(failed.policy.choose(request, candidates), failed.policy, request)
            if time.monotonic() >= wait_until:
                raise RequestError(ErrorKind.UNAVAILABLE, f"no live replica of {model!r} to continue on; retry shortly",
                                   retry_after_s=1.0)
            await asyncio.sleep(0.1)

    async def _serve_on(self, req: GenerationRequest, prepared: PreparedRequest, route: Route, obs: Observation,
                        progress: "StreamProgress", seed: int) -> AsyncGenerator[Event, None]:
        """One dispatch to one replica, continuing from `progress`; raises ReplicaFailure when
        the replica fails it."""
        started = obs.started
        replica = route.replica
        dispatch_id = uuid.uuid4().hex
        manifest = prepared.entry.manifest
        stop_ids = list(req.stop_token_ids) + ([] if req.ignore_eos else list(manifest.eos_token_ids))
        deadline = time.time() + req.timeout_s if req.timeout_s else 0.0
        offset = len(progress.generated)
        message = bus_pb2.DispatchRequest(
            request_id=dispatch_id, model=prepared.model, prompt_token_ids=prepared.prompt_ids + progress.generated,
            max_tokens=prepared.max_tokens - offset, sampling=req.sampling, seed=seed, stop_token_ids=stop_ids,
            reply_subject=self.dispatcher.reply_subject(dispatch_id),
            batch_reply_subject=self.dispatcher.batch_reply_subject, deadline_unix_s=deadline,
            dispatched_unix_s=time.time(), generated_offset=offset)
        queue = self.dispatcher.open(dispatch_id, started + req.timeout_s if req.timeout_s else None)
        route.policy.on_dispatch(route.request, replica)
        finished = ok = False
        try:
            await self.dispatcher.send(replica.replica_id, message, obs.context())
            held: bus_pb2.ReplicaEvent | None = None
            while True:
                event, held = await self._next_event(queue, replica, started, req.timeout_s, held), None
                kind = event.WhichOneof("event")
                if kind == "tokens":
                    progress.first_token_at = progress.first_token_at or time.monotonic()
                    ids = list(event.tokens.token_ids)
                    # Coalesce steps that queued up while the client was being written to: under
                    # load the router sends fewer, larger chunks instead of falling behind.
                    while not queue.empty():
                        held = queue.get_nowait()
                        if held is POKE or held.WhichOneof("event") != "tokens":
                            break  # handled by the next _next_event
                        ids += held.tokens.token_ids
                        held = None
                    index = len(progress.generated)
                    progress.generated += ids
                    text, stopped = progress.stops.feed(progress.detok.push(ids))
                    yield TokenDelta(ids, text, index)
                    if stopped:
                        ok = True
                        yield self._completion(generate_pb2.FINISH_REASON_STOP, prepared, len(progress.generated),
                                               started, progress.first_token_at, 0.0, replica)
                        return
                elif kind == "finished":
                    tail, stopped = progress.stops.feed(progress.detok.flush())
                    tail += "" if stopped else progress.stops.flush()
                    if tail:
                        yield TokenDelta([], tail, len(progress.generated))
                    finished = ok = True
                    reason = generate_pb2.FINISH_REASON_STOP if stopped else event.finished.finish_reason
                    yield self._completion(reason, prepared, offset + event.finished.completion_tokens, started,
                                           progress.first_token_at, event.finished.queue_wait_s, replica,
                                           event.finished.max_batch_size, event.finished.cached_prompt_tokens)
                    return
                else:
                    finished = True
                    if event.error.code in REPLICA_FAULTS:
                        raise ReplicaFailure(replica.replica_id, f"failed: {event.error.message}")
                    raise RequestError(ErrorKind.from_stream_code(event.error.code), event.error.message,
                                       retry_after_s=event.error.retry_after_s)
        finally:
            route.policy.on_complete(route.request, replica, ok)
            self.dispatcher.close(dispatch_id)
            if not finished:
                # Client gone, deadline hit, stop string or a failed replica: free the sequence.
                await asyncio.shield(self._cancel_quietly(replica.replica_id, dispatch_id))

    async def _cancel_quietly(self, replica_id: str, dispatch_id: str) -> None:
        try:
            await self.dispatcher.cancel(replica_id, dispatch_id)
        except Exception as exc:  # the bus may be down too; the worker's deadline still frees it
            log.warning("cancel of %s on %s not sent: %s", dispatch_id, replica_id, exc)

    async def _next_event(self, queue: asyncio.Queue[bus_pb2.ReplicaEvent], replica: ReplicaState,
                          started: float, timeout_s: float | None,
                          held: bus_pb2.ReplicaEvent | None = None) -> bus_pb2.ReplicaEvent:
        """The dispatch's next event (`held` first: one taken while coalescing); ReplicaFailure
        when its replica leaves the fleet, or says it cannot serve (worker down, draining) and
        has sent nothing for `stall_timeout_s`. The dispatcher's POKEs wake a waiting reader for
        these checks (every poke interval, and at the deadline): no timer per event."""
        last_event = time.monotonic()
        while True:
            if held is not None:
                event, held = held, None
            else:
                event = queue.get_nowait() if not queue.empty() else await queue.get()
            now = time.monotonic()
            if timeout_s is not None and now - started >= timeout_s:
                raise RequestError(ErrorKind.DEADLINE_EXCEEDED,
                                   f"deadline of {timeout_s:.3f}s exceeded before generation finished")
            if event is not POKE:
                return event
            if not self.fleet.is_live(replica.replica_id):
                raise ReplicaFailure(replica.replica_id, "left the fleet", departed=True)
            state = self.fleet.get(replica.replica_id)
            silent = now - last_event
            if state is not None and state.draining and silent >= self.stall_timeout_s:
                raise ReplicaFailure(replica.replica_id, f"stalled: no progress for {silent:.1f}s while "
                                     "it reports it cannot serve", departed=True)

    @staticmethod
    def _completion(reason: int, prepared: PreparedRequest, completion_tokens: int, started: float,
                    first_token_at: float | None, queue_wait_s: float, replica: ReplicaState,
                    max_batch_size: int = 0, cached_prompt_tokens: int = 0) -> Completion:
        now = time.monotonic()
        return Completion(max_batch_size=max_batch_size, cached_prompt_tokens=cached_prompt_tokens,
            finish_reason=reason, prompt_tokens=len(prepared.prompt_ids), completion_tokens=completion_tokens,
            time_to_first_token_s=(first_token_at or now) - started, end_to_end_s=now - started,
            queue_wait_s=queue_wait_s, replica_id=replica.replica_id, model=prepared.entry.name)
