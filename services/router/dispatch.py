"""The router's side of the bus: send a request to a replica's queue, receive its events on
this router's reply inbox (one subscription, demultiplexed by request), send cancels, and
the fleet view reads heartbeats itself (switchyard.fleet)."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from opentelemetry.context import Context

from switchyard.bus import subjects
from switchyard.bus.queue import ensure_request_stream
from switchyard.telemetry.tracing import inject_context
from switchyard.v1 import bus_pb2, generate_pb2

from .errors import ErrorKind, RequestError

log = logging.getLogger(__name__)

# Put in a dispatch's queue to wake its reader without an event: by the periodic sweep (a
# waiting reader re-checks its replica's health) and at the dispatch's deadline. One sweep
# for all streams and one timer per dispatch, instead of a timer armed and cancelled per token.
POKE = bus_pb2.ReplicaEvent()


class Dispatcher:
    def __init__(self, nc: Client, js: JetStreamContext, router_id: str, max_buffered_events: int = 256,
                 poke_interval_s: float = 1.0) -> None:
        self.nc = nc
        self.max_buffered_events = max_buffered_events
        self.js = js
        self.router_id = router_id
        self.poke_interval_s = poke_interval_s
        self._streams: dict[str, asyncio.Queue[bus_pb2.ReplicaEvent]] = {}
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.nc.subscribe(f"{subjects.reply_inbox(self.router_id)}.*", cb=self._on_reply)
        self._sweeper = asyncio.create_task(self._sweep(), name="dispatch-sweep")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    async def _sweep(self) -> None:
        """Every poke interval, wake each reader that is waiting (its queue is empty) so it can
        check that its replica is still live and making progress."""
        while True:
            await asyncio.sleep(self.poke_interval_s)
            for queue in self._streams.values():
                if queue.empty():
                    queue.put_nowait(POKE)

    async def _on_reply(self, msg: Msg) -> None:
        key = msg.subject.rsplit(".", 1)[-1]
        if key == subjects.BATCH_TOKEN:  # one step's events for several of our requests
            for event in bus_pb2.ReplicaEventBatch.FromString(msg.data).events:
                key = event.request_id  # our dispatch ids are hex: already subject tokens
                if key not in self._streams:
                    key = subjects.token(key)
                queue = self._streams.get(key)
                if queue is not None:  # else ended already: dropped like a late single event
                    await self._deliver(key, queue, event)
            return
        queue = self._streams.get(key)
        if queue is None:
            return  # request already ended (cancelled, timed out): drop late events
        await self._deliver(key, queue, bus_pb2.ReplicaEvent.FromString(msg.data))

    async def _deliver(self, key: str, queue: asyncio.Queue[bus_pb2.ReplicaEvent], event: bus_pb2.ReplicaEvent) -> None:
        if queue.qsize() < self.max_buffered_events:
            queue.put_nowait(event)
            return
        # The client is not reading: stop buffering (memory stays bounded), free the
        # sequence on the replica now, and end the stream with an error.
        del self._streams[key]
        log.warning("request %s: client stopped reading; cut off after %d buffered events",
                    event.request_id, self.max_buffered_events)
        await self.cancel(event.replica_id, event.request_id)
        queue.put_nowait(bus_pb2.ReplicaEvent(request_id=event.request_id, replica_id=event.replica_id,
                                              error=generate_pb2.Error(
                                                  code=generate_pb2.ERROR_CODE_RESOURCE_EXHAUSTED,
                                                  message="client stopped reading the stream; cut off")))

    def open(self, dispatch_id: str, deadline: float | None = None) -> asyncio.Queue[bus_pb2.ReplicaEvent]:
        """The dispatch's event queue; POKE lands in it at `deadline` (time.monotonic(), when given)."""
        key = subjects.token(dispatch_id)
        queue: asyncio.Queue[bus_pb2.ReplicaEvent] = asyncio.Queue()
        self._streams[key] = queue
        if deadline is not None:
            self._arm_deadline(key, queue, deadline)
        return queue

    def _arm_deadline(self, key: str, queue: asyncio.Queue[bus_pb2.ReplicaEvent], deadline: float) -> None:
        self._deadlines[key] = asyncio.get_running_loop().call_later(
            max(deadline - time.monotonic(), 0.0), self._deadline_due, key, queue, deadline)

    def _deadline_due(self, key: str, queue: asyncio.Queue[bus_pb2.ReplicaEvent], deadline: float) -> None:
        # The loop's timers may fire a little early (millisecond clock, cached at the start of
        # an iteration): a reader woken before its deadline would not see it pass until the
        # next sweep, so wait out the rest.
        if time.monotonic() < deadline:
            self._arm_deadline(key, queue, deadline)
        else:
            self._deadlines.pop(key, None)
            queue.put_nowait(POKE)

    def close(self, dispatch_id: str) -> None:
        key = subjects.token(dispatch_id)
        self._streams.pop(key, None)
        timer = self._deadlines.pop(key, None)
        if timer is not None:
            timer.cancel()

    def reply_subject(self, dispatch_id: str) -> str:
        return subjects.reply_subject(self.router_id, dispatch_id)

    @property
    def batch_reply_subject(self) -> str:
        return subjects.reply_batch_subject(self.router_id)

    async def send(self, replica_id: str, request: bus_pb2.DispatchRequest, ctx: Context | None = None) -> None:
        """Publish to the replica's queue; the trace context rides in the NATS headers. A
        request stream lost with a restarted server is re-created once; a bus that is down
        is UNAVAILABLE with a retry delay, not an unknown error."""
        headers = inject_context({}, ctx) if ctx is not None else None
        subject, data = subjects.request_subject(replica_id), request.SerializeToString()
        try:
            try:
                await self.js.publish(subject, data, headers=headers or None, timeout=2.0)
            except NoStreamResponseError:
                await ensure_request_stream(self.js)
                await self.js.publish(subject, data, headers=headers or None, timeout=2.0)
        except (NatsError, asyncio.TimeoutError) as exc:
            raise RequestError(ErrorKind.UNAVAILABLE, f"message bus unavailable ({type(exc).__name__}); retry shortly",
                               retry_after_s=1.0) from None

    async def cancel(self, replica_id: str, dispatch_id: str) -> None:
        await self.nc.publish(subjects.cancel_subject(replica_id),
                              bus_pb2.CancelRequest(request_id=dispatch_id).SerializeToString())
