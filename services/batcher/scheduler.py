"""Continuous batching at iteration level.

Each loop iteration: admit pulled requests that fit the batch-size cap and token budget,
then one worker step that decodes every running sequence and advances prompt chunks
(chunked prefill within `prefill_chunk` tokens), then publish each request's new tokens as
one message and retire finished requests at once. Steps go over one StepStream with the next
one already in flight (`pipeline_depth`), so the worker computes while this loop publishes. Requests are pulled from the replica's
JetStream consumer only while there is room, so the queue lives in the server (bounded
memory here, backpressure for the router).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from opentelemetry.trace import Span

from switchyard.bus import subjects
from switchyard.bus.queue import RateLimitedLog, decoded, ensure_request_stream, pull_subscription, recent_cancels
from switchyard.v1 import bus_pb2, generate_pb2, worker_pb2, worker_pb2_grpc

from . import telemetry as tm
from .config import BatcherConfig
from .step_answer import StepAnswer, StepToken, answer_from_proto

log = logging.getLogger(__name__)
CANCEL_MEMORY_S = 120.0


@dataclass
class Active:
    """A request admitted to this replica."""

    request: bus_pb2.DispatchRequest
    admitted_at: float
    prefill_left: int
    generated: int = 0
    max_batch: int = 1
    cached_prompt_tokens: int = 0  # prompt tokens the worker's prefix cache supplied
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    span: Span | None = None  # batcher.request, when tracing
    traceparent: str = ""  # context the worker parents its spans on
    chunk_in_flight: int = 0  # prompt tokens of a sent, unanswered prefill chunk
    tokens_in_flight: int = 0  # decode tokens asked of sent, unanswered steps
    retiring: bool = False  # sure to finish within the steps in flight: freed by the next one
    held_steps: int = 0  # steps its prompt waited for others to prefill with (prefill coalescing)

    @cached_property
    def prompt_length(self) -> int:
        """Its prompt's tokens (read from the request once: a protobuf field costs per read,
        and every step reads it for every sequence)."""
        return len(self.request.prompt_token_ids)

    @cached_property
    def max_tokens(self) -> int:
        return self.request.max_tokens

    def tokens_left(self, context_length: int) -> int:
        """Tokens still to come, the one that ends it by length (max_tokens or context) included."""
        return min(self.max_tokens - self.generated, context_length - self.prompt_length - self.generated)

    @property
    def reserved_tokens(self) -> int:
        return self.prompt_length + self.max_tokens


@dataclass
class SentStep:
    """A StepStream request awaiting its response, with what it carried."""

    chunks: list[worker_pb2.PrefillChunk]
    removing: list[str]
    decoding: list[Active]  # the sequences it asked `steps` tokens of
    steps: int
    firsts: list[Active]  # the sequences whose prompt it completes (a first token each)


class StepRefused(Exception):
    """The worker refused a whole step (not one sequence of it)."""


@dataclass
class Stats:
    steps: int = 0
    completed: int = 0
    max_decode_batch: int = 0  # since the last load report


class Scheduler:
    """Owns the replica's batch; drives the worker; talks NATS."""

    def __init__(self, config: BatcherConfig, replica_id: str, info: worker_pb2.InfoResponse,
                 nc: Client, js: JetStreamContext, worker: worker_pb2_grpc.WorkerStub,
                 worker_health: health_pb2_grpc.HealthStub | None = None,
                 step_metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        self.config = config
        self.worker_health = worker_health
        self.worker_ok = True  # from the worker's gRPC health, checked every heartbeat
        self.replica_id = replica_id
        self.info = info
        self.nc = nc
        self.js = js
        self.worker = worker
        self._step_metadata = step_metadata  # the worker's token on the StepStream (unary calls: the channel's)
        self.max_batch = min(config.max_batch_size, info.max_sequences)
        self._context_length = info.context_length
        self.decoding_prefill_chunk = config.decoding_prefill_chunk(info.execution_provider)
        self.coalescing = config.prefill_coalescing()
        self.pending: list[bus_pb2.DispatchRequest] = []  # pulled, not yet admitted (≤ room)
        self.active: dict[str, Active] = {}
        # A step's events per router that takes them batched (DispatchRequest.batch_reply_subject),
        # published together at the end of the step: one NATS message per router per step.
        self._outbox: dict[str, bus_pb2.ReplicaEventBatch] = {}
        self.to_add: list[Active] = []  # admitted, registered on the worker with the next Step
        self.to_remove: list[str] = []  # finished, freed on the worker by the next Step (or a flush)
        self.headers: dict[str, dict[str, str]] = {}  # NATS headers (trace context) of pulled requests
        self._labels = (replica_id, info.model)
        self._generated_tokens = tm.GENERATED.labels(*self._labels)  # counted once per step, not per request
        # Cancels by request id, with arrival time: a cancel may overtake its request (still
        # queued in JetStream), so unknown ids are kept for CANCEL_MEMORY_S.
        self.cancelled: dict[str, float] = {}
        self.stats = Stats()
        self.draining = False
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._psub: JetStreamContext.PullSubscription | None = None
        self._bus_log = RateLimitedLog(log)
        self._snapshot: tuple[list[int], int, int, int] | None = None  # prefix cache, from the last probe
        self._stream_pending = 0  # requests waiting in this replica's JetStream consumer
        self._health_failures = 0
        self._last_step_done = time.monotonic()
        self._in_flight: collections.deque[SentStep] = collections.deque()  # oldest first

    # ---- accounting ---------------------------------------------------------------------
    @property
    def reserved_tokens(self) -> int:
        return sum(a.reserved_tokens for a in self.active.values())

    @property
    def room(self) -> int:
        return max(self.max_batch - len(self.active) - len(self.pending), 0)

    def tokens_in_flight(self) -> int:
        return sum(a.prompt_length + a.generated for a in self.active.values())

    def _update_room(self) -> None:
        if self.draining:
            return
        if self.room > 0 and self.worker_ok:
            self._room.set()
        else:
            self._room.clear()

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await self.nc.subscribe(subjects.cancel_subject(self.replica_id), cb=self._on_cancel)
        # Requests cancelled while this replica was down (a predecessor crashed, the router moved
        # them elsewhere) may still wait in its queue: remember those cancels before pulling.
        try:
            for data in await recent_cancels(self.js, self.replica_id):
                self.cancelled[bus_pb2.CancelRequest.FromString(data).request_id] = time.monotonic()
        except Exception as exc:  # an older server without the stream: only live cancels count
            log.warning("recent cancels not read: %s", exc)
        if self.cancelled:
            log.info("%d requests were cancelled while this replica was down", len(self.cancelled))
        self._psub = await pull_subscription(self.js, self.replica_id, max_ack_pending=self.max_batch)
        self._tasks = [asyncio.create_task(self._pull_loop(), name="pull"),
                       asyncio.create_task(self._step_loop(), name="step"),
                       asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
                       asyncio.create_task(self._probe_loop(), name="probe")]

    async def resubscribe(self) -> None:
        """(Re-)create this replica's pull consumer: a restarted server has none."""
        await ensure_request_stream(self.js)
        old, self._psub = self._psub, await pull_subscription(self.js, self.replica_id, max_ack_pending=self.max_batch)
        if old is not None:
            try:
                await old.unsubscribe()
            except Exception:  # it died with the old connection state
                pass

    async def drain(self, grace_s: float) -> None:
        """Stop pulling, announce draining, finish running requests within grace_s."""
        self.draining = True
        self._room.set()  # wakes the pull loop so it sees `draining` and exits
        await self._publish_load()
        deadline = time.monotonic() + grace_s
        while (self.active or self.pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        # nats-py's fetch may swallow a cancel; the loops also exit on `draining`.
        await asyncio.wait(self._tasks, timeout=2.0)
        if self._psub is not None:
            await self._psub.unsubscribe()  # an open pull request would hold nc.drain()
        for rid in list(self.active) + [p.request_id for p in self.pending]:
            await self._send_error(rid, generate_pb2.ERROR_CODE_UNAVAILABLE, "replica stopped")
        try:
            await self._flush_removals()  # else the worker frees them when its lease runs out
        except grpc.aio.AioRpcError as exc:
            log.warning("could not free %d finished sequences on the worker: %s", len(self.to_remove), exc.details())

    # ---- NATS inputs --------------------------------------------------------------------
    async def _on_cancel(self, msg: object) -> None:
        cancel = bus_pb2.CancelRequest.FromString(msg.data)  # type: ignore[attr-defined]
        self.cancelled[cancel.request_id] = time.monotonic()
        self._wake.set()

    async def _pull_loop(self) -> None:
        assert self._psub is not None
        while not self.draining:
            await self._room.wait()
            if self.draining:
                return
            try:
                # batch=1: nats-py holds a multi-message fetch open until the batch fills or
                # the request expires, which would delay the first request by up to `timeout`.
                msgs = await self._psub.fetch(batch=1, timeout=1.0)
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            except Exception as exc:  # the server is restarting, or lost our consumer with it
                self._bus_log.warning("fetch", "pulling requests failed (%s: %s); retrying",
                                      type(exc).__name__, exc)
                await asyncio.sleep(0.5)
                if self.nc.is_connected:
                    try:
                        await self.resubscribe()
                    except Exception as again:
                        self._bus_log.warning("resubscribe", "re-creating the request consumer failed: %s", again)
                continue
            for msg in msgs:
                await msg.ack()
                request = decoded(msg, bus_pb2.DispatchRequest, "request message")
                if request is None:
                    continue
                self.pending.append(request)
                if msg.headers:
                    self.headers[request.request_id] = msg.headers
            self._update_room()
            self._wake.set()

    # ---- the iteration loop -------------------------------------------------------------
    async def _step_loop(self) -> None:
        while True:
            try:
                await self._run_steps()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.error("worker call failed: %s", exc.details())
                self._lost_in_flight()
                await self._fail_all(generate_pb2.ERROR_CODE_UNAVAILABLE, f"worker failed: {exc.details()}")
                await asyncio.sleep(0.2)
            except Exception:
                log.exception("scheduler iteration failed")
                self._lost_in_flight()
                await self._fail_all(generate_pb2.ERROR_CODE_INTERNAL, "batcher failure")
                await asyncio.sleep(0.2)

    async def _run_steps(self) -> None:
        """Iterations over one StepStream, up to `pipeline_depth` requests in flight: while the
        worker runs step k+1, this loop publishes step k's tokens (and admits newcomers), so
        the worker never waits for the batcher's round trip."""
        call: grpc.aio.StreamStreamCall | None = None
        try:
            while True:
                await self._retire_cancelled_and_expired()
                await self._admit()
                if not self._in_flight and (call is None or call.done()):
                    # (Re)open the stream between steps: one that ended while idle (the worker
                    # restarted) would fail the next batch's first step.
                    if call is not None:
                        call.cancel()
                    call = self.worker.StepStream(metadata=self._step_metadata)
                while len(self._in_flight) < self.config.pipeline_depth:
                    request = self._next_request()
                    if request is None:
                        break
                    await call.write(request)
                if not self._in_flight:
                    await self._flush_removals()  # no step will carry them: free the worker's rows now
                    self._wake.clear()
                    if not self.pending:
                        await self._wake.wait()
                    continue
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise RuntimeError("the worker ended the step stream")
                # a worker over gRPC answers on the wire; the co-located one with a StepAnswer
                answer = response if isinstance(response, StepAnswer) else answer_from_proto(response)
                await self._apply(self._in_flight.popleft(), answer)
        finally:
            if call is not None:
                call.cancel()

    def _next_request(self) -> worker_pb2.StepRequest | None:
        """The next step for the batch as this batcher knows it, or None when there is nothing
        to run until a step in flight answers. A sequence with a prompt chunk in flight gets
        no other chunk until that one answers (its tokens left come back with it); it joins
        the decode batch on the worker as soon as its prompt is done."""
        decoding: list[Active] = []
        single_steps = self.config.decode_steps == 1
        for a in self.active.values():
            if a.retiring or (a.prefill_left and a.chunk_in_flight < a.prefill_left):
                continue  # still prefilling after the chunks in flight
            # It decodes in this step: its prompt is done, or completes in a step before it.
            if single_steps and a.tokens_in_flight and a.tokens_in_flight >= a.tokens_left(self.info.context_length):
                # Its last token is already asked for: free it before the next step, so the
                # worker does not decode it past its end (EOS cannot be foreseen this way).
                # Only with one decode step per call: a multi-step call may stop short for the
                # whole batch (a row near the context end), and then the tokens asked differ.
                a.retiring = True
                self.to_remove.append(a.request.request_id)
            else:
                decoding.append(a)
        chunks = []
        # Fairness between waiting and running: while sequences decode, a newcomer's prompt is
        # fed in smaller chunks so it never stalls their next token for a whole long prefill.
        budget = self.decoding_prefill_chunk if decoding else self.config.prefill_chunk
        # Prompts not started yet may wait a few steps for more, to prefill in one run (when
        # asked for: off, the scan over every sequence stays off the per-step path).
        fresh = [a for a in self.active.values() if a.prefill_left == a.prompt_length and not a.chunk_in_flight] \
            if self.coalescing.max_wait_steps and decoding else []
        held: set[str] = set()
        if fresh and self.coalescing.hold(len(decoding), len(fresh), sum(a.prefill_left for a in fresh), budget,
                                          max(a.held_steps for a in fresh)):
            for a in fresh:
                a.held_steps += 1
                held.add(a.request.request_id)
        firsts: list[Active] = []
        for rid, a in self.active.items():
            if a.prefill_left and not a.chunk_in_flight and budget > 0 and rid not in held:
                n = min(a.prefill_left, budget)
                chunks.append(worker_pb2.PrefillChunk(sequence_id=rid, max_tokens=n))
                a.chunk_in_flight = n
                budget -= n
                if n == a.prefill_left:  # its last chunk: the step also samples its first token
                    a.tokens_in_flight += 1
                    firsts.append(a)
        if not (decoding or chunks or self.to_add):
            return None
        adds, self.to_add = self.to_add, []
        removing, self.to_remove = self.to_remove, []
        steps = self._decode_steps(decoding)
        for a in decoding:
            a.tokens_in_flight += steps
        self._in_flight.append(SentStep(chunks, removing, decoding, steps, firsts))
        return worker_pb2.StepRequest(prefill=chunks, decode=bool(decoding), add=[_spec(a) for a in adds],
                                      decode_steps=steps, remove=removing)

    def _lost_in_flight(self) -> None:
        """The stream broke: its unanswered steps are lost; their removals go with the next."""
        for sent in self._in_flight:
            self.to_remove.extend(sent.removing)
        self._in_flight.clear()

    async def _apply(self, sent: SentStep, response: StepAnswer) -> None:
        """A step's answer: chunk progress, then each request's new tokens as one message,
        then finished requests retire."""
        for a in sent.decoding:
            a.tokens_in_flight = max(a.tokens_in_flight - sent.steps, 0)
        for a in sent.firsts:
            a.tokens_in_flight = max(a.tokens_in_flight - 1, 0)
        for chunk in sent.chunks:
            chunked = self.active.get(chunk.sequence_id)
            if chunked is not None:
                chunked.chunk_in_flight = 0
                if not response.refused:
                    chunked.prefill_left = response.prefill_remaining.get(chunk.sequence_id, 0)
        if response.refused:  # nothing of it ran: the batch's tokens in flight will not come
            raise StepRefused(response.refused)
        for rid, why in response.refused_sequences.items():  # a bad newcomer fails alone
            if rid in self.active:
                await self._send_error(rid, generate_pb2.ERROR_CODE_INVALID_ARGUMENT, why)
                await self._remove([rid], defer=True)
        self.stats.steps += 1
        self._last_step_done = time.monotonic()
        batch = response.decode_batch_size
        self.stats.max_decode_batch = max(self.stats.max_decode_batch, batch)
        if batch:
            tm.BATCH_SIZE.labels(*self._labels).observe(batch)
        # One message per request per worker call, with its tokens in order; tokens after a
        # finishing one (multi-step decode, or a step already in flight, runs a little past
        # EOS or max_tokens) are dropped, as are tokens of requests already gone.
        per_request: dict[str, list[StepToken]] = {}
        for tok in response.tokens:
            per_request.setdefault(tok.sequence_id, []).append(tok)
        finished: list[tuple[str, int]] = []
        generated = 0
        for rid, toks in per_request.items():
            a = self.active.get(rid)
            if a is None:
                continue
            ids: list[int] = []
            start = a.generated
            reason = generate_pb2.FINISH_REASON_UNSPECIFIED
            for tok in toks:
                if tok.first:
                    a.cached_prompt_tokens = tok.cached_prompt_tokens
                elif batch > a.max_batch:
                    a.max_batch = batch
                reason = self._finish_reason(a, tok.token_id)
                if reason != generate_pb2.FINISH_REASON_EOS:
                    ids.append(tok.token_id)
                    a.generated += 1
                if reason:
                    finished.append((rid, reason))
                    break
            if ids:
                generated += len(ids)
                batch_size = 1 if toks[0].first else batch
                held = self._hold(a.request)  # the hot path: fields set in place, no message copied
                if held is not None:
                    step = held.tokens
                    step.token_ids.extend(ids)
                    step.index, step.batch_size = start, batch_size
                else:
                    await self._publish(a.request, tokens=bus_pb2.TokenStep(token_ids=ids, index=start,
                                                                            batch_size=batch_size))
        if generated:
            self._generated_tokens.inc(generated)
        for rid, reason in finished:
            a = self.active[rid]
            await self._publish(a.request, batched=True, finished=bus_pb2.Finished(
                finish_reason=reason, prompt_tokens=len(a.request.prompt_token_ids),
                completion_tokens=a.generated, max_batch_size=a.max_batch,
                cached_prompt_tokens=a.cached_prompt_tokens,
                queue_wait_s=max(a.admitted_at - a.request.dispatched_unix_s, 0.0)))
            self.stats.completed += 1
            tm.FINISHED.labels(*self._labels, generate_pb2.FinishReason.Name(reason)).inc()
            if a.span is not None:
                a.span.set_attribute("switchyard.cached_prompt_tokens", a.cached_prompt_tokens)
                a.span.set_attribute("switchyard.output_tokens", a.generated)
                a.span.set_attribute("switchyard.batch_size", a.max_batch)
        await self._flush_events()
        if finished:
            await self._remove([rid for rid, _ in finished], defer=True)
        # A retiring request is already freed on the worker: if its last token did not come
        # (the worker stopped short), it would wait forever. It ends with an error instead.
        short = [a.request.request_id for a in [*sent.decoding, *sent.firsts]
                 if a.retiring and not a.tokens_in_flight and a.request.request_id in self.active]
        for rid in short:
            log.error("request %s: the worker returned fewer tokens than asked before its end", rid)
            await self._send_error(rid, generate_pb2.ERROR_CODE_INTERNAL, "the worker ended the sequence early")
        if short:
            await self._remove(short, defer=True)

    def _decode_steps(self, decoding: list[Active]) -> int:
        """Decode steps for the next worker call: several when the batch is large enough that
        throughput matters more than per-token latency, never past every request's budget."""
        if not decoding or self.config.decode_steps <= 1 or len(decoding) < self.config.multi_step_min_batch:
            return 1
        ctx = self.info.context_length
        return max(1, min(self.config.decode_steps, max(a.tokens_left(ctx) - a.tokens_in_flight for a in decoding)))

    def _finish_reason(self, a: Active, token_id: int) -> int:
        if token_id in a.stop_ids:
            return generate_pb2.FINISH_REASON_EOS
        if a.generated + 1 >= a.max_tokens or a.prompt_length + a.generated + 1 >= self._context_length:
            return generate_pb2.FINISH_REASON_LENGTH
        return generate_pb2.FINISH_REASON_UNSPECIFIED

    async def _admit(self) -> None:
        """Move pulled requests into the batch while the cap and token budget allow."""
        admitted: list[Active] = []
        now = time.time()
        while self.pending and len(self.active) + len(admitted) < self.max_batch:
            request = self.pending[0]
            need = len(request.prompt_token_ids) + request.max_tokens
            held = self.reserved_tokens + sum(a.reserved_tokens for a in admitted)
            if held and held + need > self.config.token_budget:
                break  # waits for running requests to finish (a lone request is always admitted)
            self.pending.pop(0)
            headers = self.headers.pop(request.request_id, None)
            if self.cancelled.pop(request.request_id, None) is not None:
                continue
            active = Active(request, now, prefill_left=len(request.prompt_token_ids),
                            stop_ids=frozenset(request.stop_token_ids))
            wait = max(now - request.dispatched_unix_s, 0.0)
            tm.QUEUE_WAIT.labels(*self._labels).observe(wait)
            active.span, active.traceparent = tm.start_request_spans(
                headers, int(request.dispatched_unix_s * 1e9), int(now * 1e9),
                {"switchyard.replica": self.replica_id, "switchyard.model": self.info.model,
                 "switchyard.prompt_tokens": len(request.prompt_token_ids), "switchyard.queue_wait_s": wait})
            admitted.append(active)
        for a in admitted:
            self.active[a.request.request_id] = a
            self.to_add.append(a)
        self._update_room()

    async def _retire_cancelled_and_expired(self) -> None:
        now = time.time()
        gone: list[str] = []
        for rid, a in self.active.items():
            if rid in self.cancelled:
                gone.append(rid)
            elif a.request.deadline_unix_s and now > a.request.deadline_unix_s:
                await self._send_error(rid, generate_pb2.ERROR_CODE_DEADLINE_EXCEEDED, "deadline exceeded")
                gone.append(rid)
        expired = [p for p in self.pending if p.deadline_unix_s and now > p.deadline_unix_s]
        for p in expired:
            self.pending.remove(p)
            await self._send_error(p.request_id, generate_pb2.ERROR_CODE_DEADLINE_EXCEEDED,
                                   "deadline exceeded while queued")
        for rid in gone:
            self.cancelled.pop(rid, None)
        if gone:
            await self._remove(gone)
        stale = time.monotonic() - CANCEL_MEMORY_S
        for rid in [rid for rid, at in self.cancelled.items() if at < stale]:
            del self.cancelled[rid]

    async def _remove(self, request_ids: list[str], defer: bool = False) -> None:
        """Forget requests here and free them on the worker: at once, or (``defer``, requests
        that just finished) with the next Step, which frees them before it runs."""
        for rid in request_ids:
            a = self.active.pop(rid, None)
            if a is not None and a.span is not None:
                a.span.end()
        self.to_add = [a for a in self.to_add if a.request.request_id in self.active]
        self.to_remove.extend(request_ids)
        if not defer and not self._in_flight:  # else the next step carries them, in order
            await self._flush_removals()
        self._update_room()

    async def _flush_removals(self) -> None:
        if self.to_remove:
            ids, self.to_remove = self.to_remove, []
            await self.worker.RemoveSequences(worker_pb2.RemoveSequencesRequest(sequence_ids=ids))

    async def _fail_all(self, code: int, message: str) -> None:
        for rid in list(self.active):
            await self._send_error(rid, code, message)
            span = self.active[rid].span
            if span is not None:
                span.end()
        self.active.clear()
        self.to_add.clear()
        self._update_room()

    # ---- NATS outputs -------------------------------------------------------------------
    async def _publish(self, request: bus_pb2.DispatchRequest, batched: bool = False, **event: object) -> None:
        """One event of a request's stream. `batched` (a step's tokens and ends): held for the
        step's one message to the request's router when the router takes batches; anything
        else goes out at once, after what is held, so every request's events keep their order."""
        if batched and (held := self._hold(request)) is not None:
            for name, value in event.items():
                getattr(held, name).CopyFrom(value)
            return
        await self._flush_events()
        msg = bus_pb2.ReplicaEvent(request_id=request.request_id, replica_id=self.replica_id, **event)  # type: ignore[arg-type]
        await self.nc.publish(request.reply_subject, msg.SerializeToString())

    def _hold(self, request: bus_pb2.DispatchRequest) -> bus_pb2.ReplicaEvent | None:
        """A new event of the request, held for the step's one message to its router (the
        caller fills it in); None when its router takes events one at a time."""
        subject = request.batch_reply_subject
        if not subject:
            return None
        outbox = self._outbox.get(subject)
        if outbox is None:
            outbox = self._outbox[subject] = bus_pb2.ReplicaEventBatch()
        held = outbox.events.add()
        held.request_id = request.request_id
        held.replica_id = self.replica_id
        return held

    async def _flush_events(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for subject, batch in outbox.items():
            await self.nc.publish(subject, batch.SerializeToString())

    async def _send_error(self, request_id: str, code: int, message: str) -> None:
        a = self.active.get(request_id)
        request = a.request if a else next((p for p in self.pending if p.request_id == request_id), None)
        if request is None:
            return
        await self._publish(request, error=generate_pb2.Error(code=code, message=message))

    def load_report(self) -> bus_pb2.LoadReport:
        report = bus_pb2.LoadReport(
            replica_id=self.replica_id, model=self.info.model, context_length=self.info.context_length,
            max_output_tokens=self.info.max_output_tokens, queue_depth=len(self.pending),
            running=len(self.active), tokens_in_flight=self.tokens_in_flight(),
            # A replica whose worker is down says so, so routers stop sending it requests.
            max_batch_size=self.max_batch, token_budget=self.config.token_budget,
            draining=self.draining or not self.worker_ok,
            sent_unix_s=time.time(), steps=self.stats.steps, max_decode_batch=self.stats.max_decode_batch,
            completed=self.stats.completed, interval_s=self.config.heartbeat_s)
        self.stats.max_decode_batch = 0
        return report

    # ---- probes (slow: never on the heartbeat's path) --------------------------------------
    async def _refresh_prefix_cache_snapshot(self) -> None:
        """The worker's prefix-cache contents for the next reports: a full snapshot each probe
        (see docs/decisions/prefix-cache.md for why not store/evict events)."""
        if not self.worker_ok:
            self._snapshot = None  # report no cache rather than a stale one
            return
        try:
            info = await self.worker.Info(worker_pb2.InfoRequest(), timeout=max(self.config.heartbeat_s, 1.0))
        except grpc.aio.AioRpcError:
            self._snapshot = None
            return
        self._snapshot = (list(info.cached_blocks), info.block_size, info.prefix_cache.bytes_used,
                          info.prefix_cache.capacity_bytes)

    async def _refresh_queue_depth(self) -> None:
        if self._psub is None:
            return
        try:
            info = await self._psub.consumer_info(timeout=max(self.config.heartbeat_s, 1.0))
            self._stream_pending = info.num_pending or 0
        except Exception:  # server busy or reconnecting: keep what we know
            pass

    async def _check_worker(self) -> None:
        """Down = two failed health checks in a row and no Step finished lately. A worker busy
        with a long prefill on a starved machine answers health late, but its Steps still
        complete: that is progress, not death (one slow check used to flag it down, and the
        router then moved every stream off a healthy replica)."""
        if self.worker_health is None:
            return
        try:
            reply = await self.worker_health.Check(health_pb2.HealthCheckRequest(),
                                                   timeout=max(self.config.heartbeat_s, 1.0))
            healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            healthy = False
        self._health_failures = 0 if healthy else self._health_failures + 1
        progressing = bool(self.active) and time.monotonic() - self._last_step_done < 2.0
        ok = healthy or self._health_failures < 2 or progressing
        if ok != self.worker_ok:
            log.warning("worker %s is %s", self.config.worker, "back" if ok else "down: taking no requests")
            self.worker_ok = ok
            self._update_room()
            if not ok:
                self._room.clear()

    async def _probe_loop(self) -> None:
        while True:
            await self._check_worker()
            await self._refresh_prefix_cache_snapshot()
            await self._refresh_queue_depth()
            await asyncio.sleep(self.config.heartbeat_s)

    # ---- heartbeats ------------------------------------------------------------------------
    async def _publish_load(self) -> None:
        report = self.load_report()
        if self._snapshot is not None and self.worker_ok:
            blocks, report.block_size, report.prefix_cache_bytes, report.prefix_cache_capacity_bytes = self._snapshot
            report.cached_blocks.extend(blocks)
        report.queue_depth += self._stream_pending
        tm.RUNNING.labels(*self._labels).set(report.running)
        tm.TOKENS_IN_FLIGHT.labels(*self._labels).set(report.tokens_in_flight)
        tm.QUEUE_DEPTH.labels(*self._labels).set(report.queue_depth)
        await self.nc.publish(subjects.load_subject(self.info.model, self.replica_id), report.SerializeToString())

    async def _heartbeat_loop(self) -> None:
        """On a fixed cadence from what the probes last learned: a slow probe never delays a
        heartbeat (late heartbeats made routers drop live replicas on a busy machine)."""
        while True:
            try:
                await self._publish_load()
            except Exception as exc:  # the bus is reconnecting: the next beat will go
                self._bus_log.warning("heartbeat", "heartbeat not sent: %s", exc)
            await asyncio.sleep(self.config.heartbeat_s)


def _spec(a: Active) -> worker_pb2.SequenceSpec:
    r = a.request
    return worker_pb2.SequenceSpec(sequence_id=r.request_id, prompt_token_ids=r.prompt_token_ids,
                                   sampling=r.sampling, seed=r.seed, traceparent=a.traceparent,
                                   generated_offset=r.generated_offset)
