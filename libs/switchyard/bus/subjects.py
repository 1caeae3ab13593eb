"""Every NATS subject Switchyard uses, in one place.

    switchyard.req.<replica>          DispatchRequest  JetStream work queue (one consumer per replica)
    switchyard.reply.<router>.<req>   ReplicaEvent     core NATS, batcher → router
    switchyard.reply.<router>._batch  ReplicaEventBatch core NATS, batcher → router (a step's events, one message)
    switchyard.cancel.<replica>       CancelRequest    core NATS, router → batcher (also kept 2 min in a stream)
    switchyard.load.<model>.<replica> LoadReport       core NATS heartbeats
    switchyard.peers.<router>         RouterUsage      core NATS, router → the other routers
"""

from __future__ import annotations

import re

REQUEST_STREAM = "SWITCHYARD_REQUESTS"
CANCEL_STREAM = "SWITCHYARD_CANCELS"  # keeps recent cancels for a batcher that was down when they were sent
REQUEST_PREFIX = "switchyard.req"
REPLY_PREFIX = "switchyard.reply"
CANCEL_PREFIX = "switchyard.cancel"
LOAD_PREFIX = "switchyard.load"
LOAD_ALL = f"{LOAD_PREFIX}.>"
PEERS_PREFIX = "switchyard.peers"
PEERS_ALL = f"{PEERS_PREFIX}.>"
BATCH_TOKEN = "_batch"

_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def token(name: str) -> str:
    """A subject token from any name (subject tokens cannot hold '.', '*', '>' or spaces)."""
    return _TOKEN_UNSAFE.sub("_", name)


def request_subject(replica_id: str) -> str:
    return f"{REQUEST_PREFIX}.{token(replica_id)}"


def reply_inbox(router_id: str) -> str:
    return f"{REPLY_PREFIX}.{token(router_id)}"


def reply_subject(router_id: str, request_id: str) -> str:
    return f"{reply_inbox(router_id)}.{token(request_id)}"


def reply_batch_subject(router_id: str) -> str:
    """Where batchers send a step's events for this router's requests in one message (the
    token cannot be a request's: those are hex ids)."""
    return f"{reply_inbox(router_id)}.{BATCH_TOKEN}"


def cancel_subject(replica_id: str) -> str:
    return f"{CANCEL_PREFIX}.{token(replica_id)}"


def load_subject(model: str, replica_id: str) -> str:
    return f"{LOAD_PREFIX}.{token(model)}.{token(replica_id)}"


def peers_subject(router_id: str) -> str:
    return f"{PEERS_PREFIX}.{token(router_id)}"
