"""NATS credentials and subject permissions per service.

nats-server runs with an `authorization { users = [...] }` block: every connection names a
user and a password (generated at random by the local stack or a test fixture), and each user
may publish and subscribe only where its role needs. Anything not allowed is denied.

    role      publish                                        subscribe
    router    switchyard.req.>  switchyard.cancel.>          switchyard.reply.>  switchyard.load.>
              switchyard.peers.>                             switchyard.peers.>
              JetStream: create/update/info of the two streams
    batcher   switchyard.reply.>                             switchyard.cancel.<own replica>
              switchyard.load.<own model>.<own replica>
              JetStream: create (not update) of the two streams; info, create, next-message,
              delete of its own consumers only (request queue: durable <replica>, filter
              switchyard.req.<replica>; cancel stream: <replica>, filter switchyard.cancel.<replica>);
              acks of its own consumer
    observer  (nothing)                                      switchyard.load.>

Every user also subscribes to its own inbox, `_INBOX.<user>.>` (JetStream API replies, pulled
messages): the connection is told to use that prefix (`inbox_prefix`), so no service can read
another's pulled requests through a shared `_INBOX.>`.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .subjects import (CANCEL_PREFIX, CANCEL_STREAM, LOAD_ALL, LOAD_PREFIX, PEERS_ALL, REPLY_PREFIX,
                       REQUEST_PREFIX, REQUEST_STREAM, cancel_subject, load_subject, request_subject, token)

JS_API = "$JS.API"
INBOX = "_INBOX"


def new_secret() -> str:
    """A random credential (192 bits, URL-safe: fits a NATS config string and an HTTP header)."""
    return secrets.token_urlsafe(24)


def inbox_prefix(user: str) -> str:
    """The inbox prefix a user's connection must use (its only reply subjects)."""
    return f"{INBOX}.{token(user)}"


@dataclass(frozen=True)
class NatsUser:
    user: str
    password: str = field(repr=False)
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.user)

    def config_entry(self) -> dict[str, object]:
        # An empty allow list would allow everything: a user that publishes nothing is denied ">".
        publish = {"allow": list(self.publish)} if self.publish else {"deny": [">"]}
        return {"user": self.user, "password": self.password,
                "permissions": {"publish": publish,
                                "subscribe": {"allow": [*self.subscribe, f"{self.inbox_prefix}.>"]}}}


def _stream_admin(*verbs: str) -> tuple[str, ...]:
    return tuple(f"{JS_API}.STREAM.{verb}.{stream}" for verb in verbs for stream in (REQUEST_STREAM, CANCEL_STREAM))


DEMAND_ALL = "switchyard.demand.>"  # per-model demand, router → autoscaler (services/router/demand.py)
# JetStream key-value buckets the router reads and writes (rollout state, feedback, samples).
ROUTER_KV_BUCKETS = ("switchyard_rollouts", "switchyard_feedback", "switchyard_rollout_samples",
                     "switchyard_canary_samples")


def kv_access(bucket: str) -> tuple[str, ...]:
    """Publish permissions to open (create), read, write and watch one KV bucket — and no other
    stream: its stream, direct gets, ordered consumers on it (their flow control), its keys."""
    stream = f"KV_{bucket}"
    return (f"{JS_API}.STREAM.INFO.{stream}", f"{JS_API}.STREAM.CREATE.{stream}", f"{JS_API}.STREAM.UPDATE.{stream}",
            f"{JS_API}.STREAM.MSG.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}.>",
            f"{JS_API}.CONSUMER.CREATE.{stream}", f"{JS_API}.CONSUMER.CREATE.{stream}.>",
            f"{JS_API}.CONSUMER.INFO.{stream}.>", f"{JS_API}.CONSUMER.DELETE.{stream}.>",
            f"$JS.FC.{stream}.>", f"$JS.ACK.{stream}.>", f"$KV.{bucket}.>")


def router_user(password: str | None = None, user: str = "router") -> NatsUser:
    """Publishes requests, cancels and demand reports, reads replies and heartbeats, shares
    its usage with the other routers, uses its KV buckets."""
    return NatsUser(user, password or new_secret(),
                    publish=(f"{REQUEST_PREFIX}.>", f"{CANCEL_PREFIX}.>", DEMAND_ALL, PEERS_ALL,
                             *_stream_admin("CREATE", "UPDATE", "INFO"),
                             *(s for bucket in ROUTER_KV_BUCKETS for s in kv_access(bucket))),
                    subscribe=(f"{REPLY_PREFIX}.>", LOAD_ALL, PEERS_ALL))


def batcher_user(replica_id: str, model: str, password: str | None = None) -> NatsUser:
    """Consumes its own queue only, replies to any router, heartbeats as itself only."""
    r = token(replica_id)
    own_consumers = ((REQUEST_STREAM, request_subject(replica_id)), (CANCEL_STREAM, cancel_subject(replica_id)))
    js: list[str] = list(_stream_admin("CREATE", "INFO"))
    for stream, filter_subject in own_consumers:
        js += [f"{JS_API}.CONSUMER.CREATE.{stream}.{r}.{filter_subject}", f"{JS_API}.CONSUMER.INFO.{stream}.{r}",
               f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{r}", f"{JS_API}.CONSUMER.DELETE.{stream}.{r}"]
    return NatsUser(f"batcher-{r}", password or new_secret(),
                    publish=(f"{REPLY_PREFIX}.>", load_subject(model, replica_id), f"$JS.ACK.{REQUEST_STREAM}.{r}.>", *js),
                    subscribe=(cancel_subject(replica_id),))


def observer_user(password: str | None = None) -> NatsUser:
    """Reads heartbeats (tests, benchmarks, operators); publishes nothing."""
    return NatsUser("observer", password or new_secret(), subscribe=(f"{LOAD_PREFIX}.>",))


def autoscaler_user(password: str | None = None) -> NatsUser:
    """Reads heartbeats and the routers' demand reports; publishes nothing."""
    return NatsUser("autoscaler", password or new_secret(), subscribe=(LOAD_ALL, DEMAND_ALL))


def authorization_block(users: list[NatsUser]) -> str:
    """The nats-server configuration text for `users` (JSON values are valid NATS config)."""
    entries = ",\n    ".join(json.dumps(u.config_entry()) for u in users)
    return f"authorization {{\n  users = [\n    {entries}\n  ]\n}}\n"


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by this user only (0600 from creation, not after)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
