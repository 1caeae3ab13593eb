"""The request queue: a JetStream work-queue stream with one pull consumer per replica.

Why JetStream and not core NATS (figures in docs/decisions/request-queue.md): a batcher
pulls only when it has room, so requests wait in the server, not in an unbounded client
buffer; a request published while its batcher is busy or restarting is kept, not dropped;
and the router learns at publish time (PubAck) that the request was stored.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Awaitable, Callable, TypeVar

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from .auth import inbox_prefix
from .subjects import CANCEL_PREFIX, CANCEL_STREAM, REQUEST_PREFIX, REQUEST_STREAM, cancel_subject, request_subject, token

CANCEL_KEEP_S = 120.0  # how long a cancel is remembered for a batcher that missed it
M = TypeVar("M")  # a protobuf message type
log = logging.getLogger(__name__)


class RateLimitedLog:
    """Logs a repeated condition once per `every_s` with a count of what it held back, so an
    outage that fails an operation five times a second does not flood the logs."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        self.logger.warning(message + (f" (and {held} more like it)" if held else ""), *args)


async def connect(url: str, name: str,
                  on_reconnect: Callable[[], Awaitable[None]] | None = None,
                  user: str = "", password: str = "", tls: ssl.SSLContext | None = None) -> Client:
    """A NATS connection that keeps reconnecting (the server may restart under us).
    `on_reconnect` re-creates what a restarted server lost (memory streams, consumers);
    core subscriptions are restored by the client itself. With `user`, it authenticates and
    uses the user's own inbox prefix (the only reply subjects its permissions allow). With
    `tls`, the connection is encrypted and presents the context's client certificate."""
    limited = RateLimitedLog(log)

    async def disconnected() -> None:
        limited.warning("disconnected", "%s: NATS connection lost; reconnecting", name)

    async def reconnected() -> None:
        log.info("%s: NATS reconnected", name)
        if on_reconnect is not None:
            try:
                await on_reconnect()
            except Exception as exc:
                log.warning("%s: restoring NATS state after reconnect failed: %s", name, exc)

    async def error(exc: Exception) -> None:
        limited.warning(type(exc).__name__, "%s: NATS error: %s", name, exc)

    credentials: dict[str, object] = {"tls": tls} if tls is not None else {}
    if user:
        credentials |= {"user": user, "password": password, "inbox_prefix": inbox_prefix(user)}
    return await nats.connect(url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                              disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error,
                              **credentials)  # type: ignore[arg-type]


def decoded(msg: object, message_type: type[M], what: str) -> M | None:
    """``message_type`` parsed from a NATS message's payload, or None (logged, naming ``what``
    and the subject) when it does not parse: a bad message is dropped, the subscriber goes on."""
    try:
        return message_type.FromString(msg.data)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 — protobuf raises DecodeError and others on garbage
        log.warning("dropping an undecodable %s on %s", what, getattr(msg, "subject", "?"))
        return None


async def flushed(nc: Client, timeout_s: int = 5) -> None:
    """Return once the server has processed everything sent on `nc` so far.

    `Client.flush()` alone does not promise it (nats-py 2.16): it writes its PING straight to
    the socket, ahead of commands still in the client's buffer, so the PONG can come back
    before the server has seen a SUB made just before — and a message published from another
    connection right after it is missed. The first flush has the client's flusher write its
    buffer; the second PING goes out behind what that wrote."""
    await nc.flush(timeout_s)
    await nc.flush(timeout_s)


async def ensure_request_stream(js: JetStreamContext) -> None:
    """Create the request stream and the cancel stream if missing (idempotent; several
    services race to do it)."""
    requests = StreamConfig(name=REQUEST_STREAM, subjects=[f"{REQUEST_PREFIX}.>"],
                            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.MEMORY,
                            max_age=600.0)
    # Cancels are sent on core NATS; this stream also keeps them for a while, so a batcher that
    # was down (killed, restarting) when its requests were cancelled — moved elsewhere by the
    # router — does not run them when it comes back and pulls them.
    cancels = StreamConfig(name=CANCEL_STREAM, subjects=[f"{CANCEL_PREFIX}.>"],
                           retention=RetentionPolicy.LIMITS, storage=StorageType.MEMORY,
                           max_age=CANCEL_KEEP_S, max_msgs=100_000)
    for config in (requests, cancels):
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)


async def recent_cancels(js: JetStreamContext, replica_id: str, timeout_s: float = 0.3) -> list[bytes]:
    """Cancels sent to `replica_id` in the last CANCEL_KEEP_S seconds (raw CancelRequests).
    Read through a consumer named after the replica (the one its NATS permissions allow),
    deleted before (a predecessor's may be left, part-read) and after."""
    name = token(replica_id)
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                            filter_subject=cancel_subject(replica_id), inactive_threshold=10.0)
    await _delete_quietly(js, CANCEL_STREAM, name)
    psub = await js.pull_subscribe(cancel_subject(replica_id), durable=name, stream=CANCEL_STREAM, config=config)
    out: list[bytes] = []
    try:
        while True:
            try:
                msgs = await psub.fetch(batch=512, timeout=timeout_s)
            except NatsTimeoutError:
                return out
            out += [m.data for m in msgs]
    finally:
        await psub.unsubscribe()
        await _delete_quietly(js, CANCEL_STREAM, name)


async def _delete_quietly(js: JetStreamContext, stream: str, consumer: str) -> None:
    try:
        await js.delete_consumer(stream, consumer)
    except Exception:  # not there: nothing to delete
        pass


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
