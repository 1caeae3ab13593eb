"""Service lifecycle: logging set-up and signal → asyncio.Event → graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal


def setup_logging(service: str) -> None:
    level = os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level,
                        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so a service can drain instead of dying mid-request."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


# ---- the replica lifecycle API ---------------------------------------------------------------
# How the autoscaler (services/autoscaler) changes the size of the fleet while it serves. A
# backend adds and removes replicas of a model; the fleet view (heartbeats) stays the truth
# about which replicas take traffic. Two backends: local processes over a LocalStack (below)
# and Kubernetes Deployments (services/autoscaler/kubernetes.py).

import threading  # noqa: E402  (the API below is separate from the service helpers above)
import time  # noqa: E402
from abc import ABC, abstractmethod  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    from switchyard.runtime.stack import LocalStack, Service

log = logging.getLogger(__name__)

STARTING, READY, DRAINING, FAILED = "starting", "ready", "draining", "failed"


@dataclass
class Replica:
    """One replica as a backend knows it (not whether it takes traffic: the fleet view says)."""

    replica_id: str
    model: str
    state: str  # starting | ready | draining | failed
    started_at: float  # monotonic: when its processes (or pod) were asked for
    ready_at: float | None = None
    error: str = ""  # why it failed to start

    @property
    def cold_start_s(self) -> float | None:
        """Process start → serving (its batcher consuming and heartbeating)."""
        return None if self.ready_at is None else self.ready_at - self.started_at


class FleetBackend(ABC):
    """Adds and removes replicas of a model while the fleet serves. Calls return at once; the
    work (start, drain, stop) goes on in the background and shows in `replicas()`."""

    @abstractmethod
    def replicas(self, model: str) -> list[Replica]:
        """The model's replicas: starting, ready, draining, and failed starts not yet forgotten."""

    @abstractmethod
    def add_replica(self, model: str) -> str:
        """Start one more replica of `model`; returns its id."""

    @abstractmethod
    def remove_replica(self, model: str, replica_id: str) -> None:
        """Drain `replica_id` (it stops taking requests and finishes what it runs), then stop it."""

    def forget(self, model: str, replica_id: str) -> None:
        """Drop the record of a failed start once it has been reported."""

    def close(self) -> None:
        """Stop what this backend started and still tracks."""


@dataclass
class _LocalReplica:
    info: Replica
    worker: "Service"
    batcher: "Service | None" = None


class LocalFleetBackend(FleetBackend):
    """Worker+batcher process pairs added to and removed from a running LocalStack.

    Start: the worker is spawned; once it serves (port file) its batcher is spawned; once the
    batcher consumes its queue and heartbeats (its port file) the replica is ready and joins
    the stack's supervision. A process that exits or times out while starting is a failed start
    (reported with its log's tail, not restarted by the supervisor: the autoscaler decides).
    Removal: SIGTERM to the batcher, which stops pulling, announces `draining` and finishes its
    running requests (services/batcher/scheduler.drain); requests still queued in its JetStream
    subject are re-dispatched by the router (it moves a dispatch off a draining or departed
    replica, services/router/pipeline._next_event); then the worker is stopped. Replica ids
    are never reused, so a leftover queued message can never reach a later replica.

    With internal auth, each added replica gets its worker token and batcher NATS user from the
    stack when its worker is spawned (LocalStack._provision_replica reloads nats-server)."""

    def __init__(self, stack: "LocalStack", start_timeout_s: float = 120.0, drain_timeout_s: float = 30.0,
                 parallel_start: bool = True) -> None:
        self.stack = stack
        # Start the batcher with its worker instead of after it: the batcher's own interpreter
        # start, imports and NATS set-up (~0.5 s, half a tiny model's cold start) then overlap
        # the worker's weights load; it waits for the worker to serve anyway. The worker's port
        # is picked up front for that (a port taken in between fails the start, which is retried).
        self.parallel_start = parallel_start
        self.start_timeout_s = start_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self._lock = threading.Lock()
        self._replicas: dict[str, _LocalReplica] = {}
        self._counter = 0
        self._threads: list[threading.Thread] = []
        # Every child is forked from this one long-lived thread: its parent-death signal
        # (setpriv --pdeathsig, runtime/children.py) fires when the *thread* that forked it
        # exits, so a replica spawned from a short-lived start thread was killed at once.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replica-spawner")
        now = time.monotonic()
        for batcher in stack.batchers:  # the replicas the stack started with
            rid = batcher.name.replace("batcher-", "", 1)
            worker = next(w for w in stack.workers if w.name == f"worker-{rid}")
            model = rid.rsplit("-", 1)[0]  # LocalStack names its replicas <model>-<i>
            self._replicas[rid] = _LocalReplica(Replica(rid, model, READY, now, now), worker, batcher)
        stack.on_stop.append(self.close)

    def replicas(self, model: str) -> list[Replica]:
        with self._lock:
            return sorted((r.info for r in self._replicas.values() if r.info.model == model),
                          key=lambda r: r.started_at)

    def add_replica(self, model: str) -> str:
        from switchyard.runtime.stack import model_folder
        if not (self.stack.spec.models_dir / model_folder(model)).is_dir():
            raise ValueError(f"no model folder {model!r} under {self.stack.spec.models_dir}")
        with self._lock:
            self._counter += 1
            rid = f"{model}-s{self._counter}"  # s: started by the lifecycle API; never reused
            started = time.monotonic()
            port = _free_port(self.stack.spec.internal_host) if self.parallel_start else 0
            worker = self._spawner.submit(self._spawn_worker, model, rid, port).result()
            rec = _LocalReplica(Replica(rid, model, STARTING, started), worker)
            if port:
                worker.port = port
                rec.batcher = self._spawner.submit(self._spawn_batcher, worker, rid).result()
            self._replicas[rid] = rec
        self._background(self._bring_up, rec, name=f"start-{rid}")
        log.info("replica %s of %s starting", rid, model)
        return rid

    def remove_replica(self, model: str, replica_id: str) -> None:
        with self._lock:
            rec = self._replicas.get(replica_id)
            if rec is None or rec.info.model != model:
                raise KeyError(f"no replica {replica_id!r} of {model!r}")
            if rec.info.state == DRAINING:
                return
            rec.info.state = DRAINING
            # Out of supervision first: a draining batcher's exit is not a crash to restart.
            self.stack.batchers[:] = [b for b in self.stack.batchers if b is not rec.batcher]
            self.stack.workers[:] = [w for w in self.stack.workers if w is not rec.worker]
        log.info("replica %s of %s draining", replica_id, model)
        self._background(self._drain_and_stop, rec, name=f"stop-{replica_id}")

    def forget(self, model: str, replica_id: str) -> None:
        with self._lock:
            rec = self._replicas.get(replica_id)
            if rec is not None and rec.info.state == FAILED:
                del self._replicas[replica_id]

    def close(self) -> None:
        with self._lock:
            pending = [r for r in self._replicas.values() if r.info.state in (STARTING, DRAINING)]
        for rec in pending:
            for svc in (rec.batcher, rec.worker):
                if svc is not None:
                    svc.stop(timeout_s=5.0)
        for thread in list(self._threads):
            thread.join(timeout=10.0)
        self._spawner.shutdown(wait=False)

    # ---- background work ------------------------------------------------------------------
    def _background(self, target: object, rec: _LocalReplica, name: str) -> None:
        thread = threading.Thread(target=target, args=(rec,), name=name, daemon=True)  # type: ignore[arg-type]
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _spawn_worker(self, model: str, rid: str, port: int = 0) -> "Service":
        from switchyard.runtime.stack import model_folder
        spec, stack = self.stack.spec, self.stack
        total = max(sum(spec.replicas.values()), 1)
        threads = spec.worker_threads or max(1, (os.cpu_count() or 1) // total)
        versioned = ["--served-name", model] if "@" in model else []  # as LocalStack starts its own
        return stack._spawn(f"worker-{rid}", "services.worker", [
            "--model-dir", str(spec.models_dir / model_folder(model)), "--host", spec.internal_host, "--port", str(port),
            "--threads", str(threads), "--max-sequences", str(spec.max_batch_size), *stack._metrics_args(),
            *versioned, *spec.worker_args.get(model, ())])

    def _spawn_batcher(self, worker: "Service", rid: str) -> "Service":
        spec, stack = self.stack.spec, self.stack
        assert stack.nats is not None
        return stack._spawn(f"batcher-{rid}", "services.batcher", [
            "--worker", f"{spec.internal_host}:{worker.port}", "--nats-url", stack.nats.url,
            "--replica-id", rid, "--max-batch-size", str(spec.max_batch_size),
            "--heartbeat-s", str(spec.heartbeat_s), *stack._metrics_args(), *spec.batcher_args])

    def _bring_up(self, rec: _LocalReplica) -> None:
        rid = rec.info.replica_id
        deadline = rec.info.started_at + self.start_timeout_s
        try:
            rec.worker.wait_port(max(deadline - time.monotonic(), 0.1))
            with self._lock:
                if rec.info.state != STARTING:  # removed while starting
                    return
                if rec.batcher is None:  # sequential start: the worker's port is known now
                    rec.batcher = self._spawner.submit(self._spawn_batcher, rec.worker, rid).result()
            rec.batcher.wait_port(max(deadline - time.monotonic(), 0.1))
        except (RuntimeError, TimeoutError) as exc:
            with self._lock:
                if rec.info.state != STARTING:
                    return
                rec.info.state, rec.info.error = FAILED, f"{exc}{_log_tail(rec)}"
            log.warning("replica %s failed to start: %s", rid, rec.info.error)
            for svc in (rec.batcher, rec.worker):
                if svc is not None:
                    svc.stop(timeout_s=5.0)
            return
        with self._lock:
            if rec.info.state != STARTING:
                return
            rec.info.state, rec.info.ready_at = READY, _written_at(rec.batcher.port_file, rec.info.started_at)
            assert rec.batcher is not None
            self.stack.workers.append(rec.worker)  # now supervised like the stack's own replicas
            self.stack.batchers.append(rec.batcher)
        log.info("replica %s ready after %.2fs", rid, rec.info.cold_start_s or 0.0)

    def _drain_and_stop(self, rec: _LocalReplica) -> None:
        if rec.info.ready_at is None:  # removed while starting: nothing to drain
            for svc in (rec.worker, rec.batcher):
                if svc is not None:
                    svc.stop(timeout_s=5.0)
        else:
            if rec.batcher is not None:
                rec.batcher.stop(timeout_s=self.drain_timeout_s)  # SIGTERM: drain, then exit
            rec.worker.stop(timeout_s=10.0)
        with self._lock:
            self._replicas.pop(rec.info.replica_id, None)
        log.info("replica %s stopped", rec.info.replica_id)


def _free_port(host: str) -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _log_tail(rec: _LocalReplica, lines: int = 3) -> str:
    for svc in (rec.batcher, rec.worker):
        if svc is not None and svc.log_path is not None and svc.process.poll() is not None:
            try:
                tail = svc.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
            except OSError:
                return ""
            return " — " + " | ".join(tail)
    return ""


def _written_at(port_file: Path | None, not_before: float) -> float:
    """When the batcher wrote its port file (it serves from then on), on the monotonic clock:
    noticing it takes up to a poll interval, and a tiny model answers a first request faster."""
    now = time.monotonic()
    try:
        age = max(time.time() - port_file.stat().st_mtime, 0.0) if port_file is not None else 0.0
    except OSError:
        age = 0.0
    return max(now - age, not_before)
