"""The request queue: a JetStream work-queue stream with one pull consumer per replica.

Why JetStream and not core NATS (figures in docs/decisions/request-queue.md): a batcher
pulls only when it has room, so requests wait in the server, not in an unbounded client
buffer; a request published while its batcher is busy or restarting is kept, not dropped;
and the router learns at publish time (PubAck) that the request was stored.
"""

from __future__ import annotations

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from .subjects import REQUEST_PREFIX, REQUEST_STREAM, request_subject, token


async def connect(url: str, name: str) -> Client:
    """A NATS connection that keeps reconnecting (the server may restart under us)."""
    return await nats.connect(url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5)


async def ensure_request_stream(js: JetStreamContext) -> None:
    """Create the request stream if missing (idempotent; several services race to do it)."""
    config = StreamConfig(name=REQUEST_STREAM, subjects=[f"{REQUEST_PREFIX}.>"],
                          retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.MEMORY,
                          max_age=600.0)
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


async def pull_subscription(js: JetStreamContext, replica_id: str, max_ack_pending: int) -> JetStreamContext.PullSubscription:
    """The replica's pull consumer on its own request subject."""
    durable = token(replica_id)
    config = ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=60.0,
                            max_ack_pending=max_ack_pending, filter_subject=request_subject(replica_id))
    return await js.pull_subscribe(request_subject(replica_id), durable=durable,
                                   stream=REQUEST_STREAM, config=config)


async def delete_consumer(js: JetStreamContext, replica_id: str) -> None:
    try:
        await js.delete_consumer(REQUEST_STREAM, token(replica_id))
    except Exception:  # already gone; nothing to clean
        pass
