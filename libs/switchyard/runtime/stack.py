"""The local stack: nats-server, N worker+batcher replicas per model, and the router, as
child processes of one parent. `switchyard up` and the integration tests both use it, so the
tests exercise exactly what users run. Children die with the parent (PR_SET_PDEATHSIG), and
stop() terminates every one of them, so Ctrl-C leaves no orphans."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchyard.bus.auth import NatsUser, autoscaler_user, batcher_user, new_secret, observer_user, router_user
from switchyard.bus.server import NatsServer
from switchyard.runtime.children import orphan_proof
from switchyard.tls import TlsDir, client_context, grpc_channel_credentials

log = logging.getLogger(__name__)


def model_folder(served: str) -> str:
    """The model folder of a served name: `name@version` is a version of folder `name`."""
    return served.partition("@")[0]


def log_tail(path: Path, lines: int = 15, max_bytes: int = 8192) -> str:
    """The last `lines` lines of a log file ('' when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    port_file: Path | None = None
    port: int = 0
    http_port: int | None = None
    metrics_port: int | None = None
    log_path: Path | None = None
    module: str = ""
    args: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    crashes_in_a_row: int = 0
    restart_at: float | None = None  # set while a crashed service waits out its backoff

    def restart_args(self) -> list[str]:
        """The arguments it started with, its bound ports pinned (a worker's batcher and the
        clients keep the same address across restarts)."""
        pinned = {"--port": self.port, "--grpc-port": self.port, "--http-port": self.http_port or 0}
        args = list(self.args)
        for i, arg in enumerate(args[:-1]):
            if arg in pinned and args[i + 1] == "0" and pinned[arg]:
                args[i + 1] = str(pinned[arg])
        return args

    def exited_error(self) -> RuntimeError:
        """Why start-up failed, with the end of the service's log: the log may be gone by the time
        someone reads the error (a CI run's temporary folder)."""
        tail = log_tail(self.log_path) if self.log_path else ""
        return RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}"
                            + (f"; it ended with:\n{tail}" if tail else ""))

    def wait_port(self, timeout_s: float) -> int:
        assert self.port_file is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.exited_error()
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            if text:
                ports = json.loads(text)
                self.port, self.http_port, self.metrics_port = ports.get("grpc") or 0, ports.get("http"), ports.get("metrics")
                return self.port
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not start in {timeout_s}s; see {self.log_path}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class StackSpec:
    """What to run: models with their replica counts, and where."""

    models_dir: Path
    replicas: dict[str, int]
    host: str = "127.0.0.1"  # the router's public API (gRPC, HTTP) listens here
    internal_host: str = "127.0.0.1"  # NATS, workers and every /metrics: not for clients
    grpc_port: int = 0
    http_port: int = 0  # -1 disables the HTTP API
    nats_port: int = 0
    tenants_file: Path | None = None
    api_key: str | None = None  # a key of tenants_file, used to check readiness
    router_args: tuple[str, ...] = ()
    batcher_args: tuple[str, ...] = ()
    metrics: bool = True
    records_dir: Path | None = None  # router writes requests.jsonl here (for `switchyard report`)
    worker_threads: int = 0  # 0: share the cores evenly between workers
    max_batch_size: int = 32
    balancing: str = "prefix_aware"
    # Router processes sharing the public ports (SO_REUSEPORT: the kernel spreads client
    # connections across them). One Python router forwards every token of its streams; more
    # of them carry more tokens/s on a machine with the cores (docs/benchmarks.md). They share
    # tenant limits and admission over NATS (services/router/peers.py).
    routers: int = 1
    heartbeat_s: float = 0.5
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # Internal traffic authenticated (docs/security.md): per-service NATS users with subject
    # permissions (switchyard.bus.auth) and a token per worker, generated at start. On by
    # default; tests and tools that call workers or NATS directly pass `worker_metadata()` /
    # `nats_observer`. docker-compose.yml is the documented opt-out (docs/security.md).
    internal_auth: bool = True
    # A `switchyard certs` folder: TLS on every hop (gateway HTTP and gRPC, NATS with client
    # certificates, worker gRPC with the batcher's client certificate). None: plaintext.
    tls: Path | None = None
    # Each replica's engine inside its batcher's process (`--worker local`): no worker process,
    # no worker gRPC hop (services/batcher/local_worker.py, docs/decisions/colocated-replica.md).
    colocate: bool = False
    # Extra worker flags per `replicas` key (rollout tests plant faults in one version this way).
    # A key `name@version` serves the folder `name` under that versioned name (docs/rollouts.md).
    worker_args: dict[str, tuple[str, ...]] = field(default_factory=dict)


class LocalStack:
    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        self.nats: NatsServer | None = None
        self.workers: list[Service] = []
        self.batchers: list[Service] = []
        self.routers: list[Service] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="switchyard-stack-")
        self._stopping = False
        self._supervisor: threading.Thread | None = None
        self._nats_restarts = 0
        self.run_dir = Path(self._tmp.name)
        self.log_dir = spec.log_dir or self.run_dir
        # Secrets per service, handed over in its environment (never on the command line: ps
        # shows that to every local user), kept across restarts.
        self._secret_env: dict[str, dict[str, str]] = {}
        self.on_stop: list[Callable[[], None]] = []  # run first by stop()

    @property
    def router(self) -> Service | None:
        """The first router (the one that picked the ports); all of them: `routers`."""
        return self.routers[0] if self.routers else None

    @property
    def router_address(self) -> str:
        assert self.router is not None
        return f"{self.spec.host}:{self.router.port}"

    @property
    def http_url(self) -> str:
        assert self.router is not None and self.router.http_port
        return f"{'https' if self.spec.tls else 'http'}://{self.spec.host}:{self.router.http_port}"

    @property
    def tls(self) -> TlsDir | None:
        return TlsDir(self.spec.tls.resolve()) if self.spec.tls else None

    def ssl_context(self, role: str | None = None) -> ssl.SSLContext | None:
        """A client context trusting the stack's CA (presenting `role`'s certificate), None
        without TLS: for httpx (`verify=`), urllib and nats-py (`tls=`)."""
        tls = self.tls
        if tls is None:
            return None
        return client_context(tls.ca, tls.client_cert(role) if role else None, tls.client_key(role) if role else None)

    def grpc_channel(self) -> grpc.Channel:
        """A channel to the router's gRPC API (TLS, trusting the stack's CA, when it is on)."""
        tls = self.tls
        if tls is None:
            return grpc.insecure_channel(self.router_address)
        return grpc.secure_channel(self.router_address, grpc_channel_credentials(tls.ca))

    def _tls_args(self, module: str) -> list[str]:
        """TLS flags per service (file paths, not secrets: fine on the command line)."""
        tls = self.tls
        if tls is None:
            return []
        if module == "services.worker":
            return ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key), "--tls-ca", str(tls.ca)]
        if module == "services.batcher":
            return ["--tls-ca", str(tls.ca), "--tls-client-cert", str(tls.client_cert("batcher")),
                    "--tls-client-key", str(tls.client_key("batcher"))]
        if module == "services.router":
            return ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key), "--tls-ca", str(tls.ca),
                    "--tls-client-cert", str(tls.client_cert("router")),
                    "--tls-client-key", str(tls.client_key("router"))]
        if module == "services.autoscaler":
            return ["--tls-ca", str(tls.ca), "--tls-client-cert", str(tls.client_cert("autoscaler")),
                    "--tls-client-key", str(tls.client_key("autoscaler"))]
        return []

    def auth_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.spec.api_key}"),) if self.spec.api_key else ()

    def _metrics_args(self) -> list[str]:
        """Every service serves /metrics on a free port (listed in its port file)."""
        return ["--metrics-port", "0", "--metrics-host", self.spec.internal_host] if self.spec.metrics else []

    def _spawn(self, name: str, module: str, args: list[str], port_file: bool = True) -> Service:
        pf = self.run_dir / f"{name}.port" if port_file else None
        log_path = self.log_dir / f"{name}.log"
        argv = [sys.executable, "-m", module, *args, *self._tls_args(module)] + (["--port-file", str(pf)] if pf else [])
        if module == "services.worker":
            self._provision_replica(name.removeprefix("worker-"), args)
        role = "router" if module == "services.router" else name  # every router is the one NATS user
        env = {**os.environ, **self.spec.extra_env, **self._secret_env.get(role, {})}
        argv, orphan_kwargs = orphan_proof(argv)
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, **orphan_kwargs)
        return Service(name, process, pf, log_path=log_path, module=module, args=list(args))

    # ---- supervision ----------------------------------------------------------------------
    @property
    def restarts(self) -> dict[str, int]:
        """Service name → times the supervisor restarted it (restarted ones only)."""
        out = {svc.name: svc.restarts for svc in self.services() if svc.restarts}
        if self._nats_restarts:
            out["nats-server"] = self._nats_restarts
        return out

    def supervise(self, now: float | None = None) -> list[str]:
        """Restart crashed processes with exponential backoff (0.5 s doubling to 30 s; reset
        after a minute up), keeping the others serving. Returns the services restarted now.
        Call it periodically (`switchyard up` does; `start_supervisor()` runs it in a thread)."""
        now = time.monotonic() if now is None else now
        restarted: list[str] = []
        if self._stopping:
            return restarted
        if self.nats is not None and self.nats.process is not None and self.nats.process.poll() is not None:
            log.warning("nats-server exited with %s; restarting it on port %d", self.nats.process.returncode,
                        self.nats.port)
            self.nats.start()  # same port and store: clients reconnect to the address they know
            self._nats_restarts += 1
            restarted.append("nats-server")
        for svc in self.services():
            if svc.process.poll() is None:
                if svc.crashes_in_a_row and now - svc.started_at > 60.0:
                    svc.crashes_in_a_row = 0
                continue
            if svc.restart_at is None:
                delay = min(0.5 * 2 ** svc.crashes_in_a_row, 30.0)
                svc.restart_at = now + delay
                log.warning("%s exited with %s; restarting in %.1fs", svc.name, svc.process.returncode, delay)
                continue
            if now < svc.restart_at:
                continue
            self._respawn(svc, now)
            restarted.append(svc.name)
        return restarted

    def _respawn(self, svc: Service, now: float) -> None:
        if svc.port_file is not None:
            svc.port_file.unlink(missing_ok=True)
        fresh = self._spawn(svc.name, svc.module, svc.restart_args(), port_file=svc.port_file is not None)
        svc.process, svc.started_at, svc.restart_at = fresh.process, now, None
        svc.restarts += 1
        svc.crashes_in_a_row += 1
        log.warning("%s restarted (restart %d)", svc.name, svc.restarts)

    def start_supervisor(self, interval_s: float = 0.2) -> None:
        """Supervise from a background thread until stop()."""
        def loop() -> None:
            while not self._stopping:
                try:
                    self.supervise()
                except Exception:
                    log.exception("supervision failed")
                time.sleep(interval_s)
        self._supervisor = threading.Thread(target=loop, name="stack-supervisor", daemon=True)
        self._supervisor.start()

    def start(self, timeout_s: float = 180.0) -> "LocalStack":
        if self.nats is not None:  # `with LocalStack(spec).start()` would run a second stack
            raise RuntimeError("this LocalStack is already started; use `with LocalStack(spec)` or start() once")
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _nats_users(self) -> list[NatsUser]:
        """A NATS user per service (switchyard.bus.auth), its credentials in its environment;
        plus an observer (reads heartbeats) for tests and tools: `nats_observer`."""
        router = router_user()
        users = [router, observer_user(), autoscaler_user()]
        self._secret_env["router"] = {"SWITCHYARD_NATS_USER": router.user, "SWITCHYARD_NATS_PASSWORD": router.password}
        for model, count in self.spec.replicas.items():
            manifest = self.spec.models_dir / model_folder(model) / "switchyard.json"
            try:  # heartbeats are published under the model's own name (name@version as given)
                served_as = model if "@" in model else str(json.loads(manifest.read_text()).get("name") or model)
            except (OSError, ValueError):
                served_as = model
            for i in range(count):
                replica = f"{model}-{i}"
                user = batcher_user(replica, served_as)
                users.append(user)
                self._secret_env.setdefault(f"batcher-{replica}", {}).update(
                    SWITCHYARD_NATS_USER=user.user, SWITCHYARD_NATS_PASSWORD=user.password)
        return users

    def _provision_replica(self, replica: str, worker_args: list[str]) -> None:
        """Credentials for a replica added while the stack runs (the lifecycle backend, the
        autoscaler): a token shared by its worker and batcher, and a NATS user for the batcher,
        added to the running nats-server by a configuration reload. Made when its worker is
        spawned, so the reload is done long before the batcher (spawned once the worker
        listens) connects. Replicas known at start, and restarts, already have theirs."""
        if not self.spec.internal_auth or self.nats is None or not self.nats.users:
            return
        worker_env = self._secret_env.setdefault(f"worker-{replica}", {})
        batcher_env = self._secret_env.setdefault(f"batcher-{replica}", {})
        if "SWITCHYARD_AUTH_TOKEN" not in worker_env:
            token = new_secret()
            worker_env["SWITCHYARD_AUTH_TOKEN"] = batcher_env["SWITCHYARD_WORKER_TOKEN"] = token
        if "SWITCHYARD_NATS_USER" in batcher_env:
            return
        flags = dict(zip(worker_args[::2], worker_args[1::2]))
        served_as = flags.get("--served-name", "")
        if not served_as:
            try:
                manifest = Path(flags.get("--model-dir", "")) / "switchyard.json"
                served_as = str(json.loads(manifest.read_text()).get("name") or "")
            except (OSError, ValueError):
                served_as = ""
        user = batcher_user(replica, served_as or replica.rsplit("-", 1)[0])
        batcher_env.update(SWITCHYARD_NATS_USER=user.user, SWITCHYARD_NATS_PASSWORD=user.password)
        self.nats.add_users([user])

    def nats_credentials(self, user: str) -> dict[str, object]:
        """`nats.connect(stack.nats.url, **stack.nats_credentials("autoscaler"))`: that user's
        credentials and inbox prefix, and a TLS context when TLS is on ({} without either),
        presenting that role's client certificate when `switchyard certs` issues one."""
        from switchyard.tls import CLIENT_ROLES
        assert self.nats is not None
        tls = {"tls": self.ssl_context(user if user in CLIENT_ROLES else "observer")} if self.spec.tls else {}
        if not self.nats.users:
            return tls
        u = self.nats.user(user)
        return {"user": u.user, "password": u.password, "inbox_prefix": u.inbox_prefix, **tls}

    @property
    def nats_observer(self) -> dict[str, str]:
        """`nats.connect(stack.nats.url, **stack.nats_observer)`: may read heartbeats, nothing
        else ({} when the stack runs NATS without users)."""
        assert self.nats is not None
        tls = {"tls": self.ssl_context("observer")} if self.spec.tls else {}
        if not self.nats.users:
            return tls  # type: ignore[return-value]
        observer = self.nats.user("observer")
        return {"user": observer.user, "password": observer.password, "inbox_prefix": observer.inbox_prefix, **tls}

    def worker_metadata(self, worker: Service) -> tuple[tuple[str, str], ...]:
        """gRPC metadata that lets a test or tool call `worker` directly (its token, if any)."""
        token = self._secret_env.get(worker.name, {}).get("SWITCHYARD_AUTH_TOKEN")
        return (("authorization", f"Bearer {token}"),) if token else ()

    def _start(self, timeout_s: float) -> None:
        spec = self.spec
        tls = self.tls.check() if self.tls else None  # a missing file stops us here, not in a child
        self.log_dir.mkdir(parents=True, exist_ok=True)  # a log folder that does not exist yet is made
        self.nats = NatsServer(port=spec.nats_port, host=spec.internal_host, log_path=self.log_dir / "nats.log",
                               users=self._nats_users() if spec.internal_auth else None, tls=tls).start()
        total = sum(spec.replicas.values())
        threads = spec.worker_threads or max(1, (os.cpu_count() or 1) // max(total, 1))
        replica_args = []  # (replica, the worker's flags)
        for model, count in spec.replicas.items():
            for i in range(count):
                versioned = ["--served-name", model] if "@" in model else []
                replica_args.append((f"{model}-{i}", [
                    "--model-dir", str(spec.models_dir / model_folder(model)), "--threads", str(threads),
                    "--max-sequences", str(spec.max_batch_size), *versioned, *spec.worker_args.get(model, ())]))
        batcher_args = ["--nats-url", self.nats.url, "--max-batch-size", str(spec.max_batch_size),
                        "--heartbeat-s", str(spec.heartbeat_s), *self._metrics_args(), *spec.batcher_args]
        if spec.colocate:
            for replica, worker_args in replica_args:  # NATS users: made with the server (_nats_users)
                self.batchers.append(self._spawn(f"batcher-{replica}", "services.batcher", [
                    "--worker", "local", "--worker-flags", shlex.join(worker_args), "--replica-id", replica,
                    *batcher_args]))
        else:
            for replica, worker_args in replica_args:
                if spec.internal_auth:  # a token per replica: only its batcher may call the worker
                    token = new_secret()
                    self._secret_env.setdefault(f"worker-{replica}", {})["SWITCHYARD_AUTH_TOKEN"] = token
                    self._secret_env.setdefault(f"batcher-{replica}", {})["SWITCHYARD_WORKER_TOKEN"] = token
                self.workers.append(self._spawn(f"worker-{replica}", "services.worker", [
                    *worker_args, "--host", spec.internal_host, "--port", "0", *self._metrics_args()]))
            for worker in self.workers:
                worker.wait_port(timeout_s)
            for worker in self.workers:
                replica = worker.name.replace("worker-", "", 1)
                self.batchers.append(self._spawn(f"batcher-{replica}", "services.batcher", [
                    "--worker", f"{spec.internal_host}:{worker.port}", "--replica-id", replica, *batcher_args]))
        router_args = ["--nats-url", self.nats.url, "--host", spec.host, "--grpc-port", str(spec.grpc_port),
                       "--http-port", str(spec.http_port), "--models-dir", str(spec.models_dir),
                       "--balancing", spec.balancing, "--heartbeat-misses", "3", *self._metrics_args(),
                       *spec.router_args]
        if spec.tenants_file:
            router_args += ["--tenants-file", str(spec.tenants_file)]
        if spec.records_dir:
            router_args += ["--records-dir", str(spec.records_dir)]
        if spec.routers > 1:
            router_args += ["--share-port", "true"]
        first = self._spawn("router", "services.router", router_args)
        self.routers = [first]
        for svc in [*self.batchers, first]:
            svc.wait_port(timeout_s)
        if spec.routers > 1:  # the others join the ports the first one bound (port 0 picks them)
            pinned = {"--grpc-port": str(first.port), "--http-port": str(first.http_port or -1)}
            joined = list(router_args)
            for i, arg in enumerate(joined[:-1]):
                if arg in pinned:
                    joined[i + 1] = pinned[arg]
            self.routers += [self._spawn(f"router-{i}", "services.router", joined) for i in range(2, spec.routers + 1)]
            for svc in self.routers[1:]:
                svc.wait_port(timeout_s)
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """Until the router is SERVING and every replica shows up in ListModels."""
        from switchyard.v1 import generate_pb2, generate_pb2_grpc
        expected = dict(self.spec.replicas)
        deadline = time.monotonic() + timeout_s
        with self.grpc_channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = generate_pb2_grpc.GenerationStub(channel)
            while time.monotonic() < deadline:
                for svc in self.workers + self.batchers:
                    if svc.process.poll() is not None:
                        raise svc.exited_error()
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        served = self._served(stub, generate_pb2.ListModelsRequest())  # virtual models too
                        if ((served is None or all(served.get(name, 0) == n for name, n in expected.items()))
                                and all(self._router_sees(svc, expected) for svc in self.routers[1:])):
                            return
                except (grpc.RpcError, OSError, ValueError):
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"stack not ready in {timeout_s}s; logs in {self.log_dir}")

    def _router_sees(self, router: Service, expected: dict[str, int]) -> bool:
        """Whether one of several routers (the shared port reaches any of them) sees every
        replica: its `switchyard_router_live_replicas` gauge. True without metrics."""
        if router.process.poll() is not None:
            raise router.exited_error()
        if not router.metrics_port:
            return True
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen(f"http://{self.spec.internal_host}:{router.metrics_port}/metrics", timeout=1) as resp:
            text = resp.read().decode()
        live = {sample.labels["model"]: sample.value for family in text_string_to_metric_families(text)
                if family.name == "switchyard_router_live_replicas" for sample in family.samples}
        return all(live.get(name, 0) == n for name, n in expected.items())

    def _served(self, stub: object, request: object) -> dict[str, int] | None:
        """Model → live replicas, as the router lists them. ListModels needs a key when a
        tenants file is set; without one (`switchyard up --tenants-file F` knows no key of F)
        the open HTTP /health answers the same; with neither, None (router SERVING is all)."""
        try:
            models = stub.ListModels(request, timeout=1, metadata=self.auth_metadata()).models  # type: ignore[attr-defined]
            return {m.name: m.replicas for m in models}
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED or self.spec.api_key:
                raise
        if self.spec.http_port < 0 or self.router is None or not self.router.http_port:
            log.warning("no API key for the tenants file and no HTTP API: readiness is the router's health only")
            return None
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(f"{self.http_url}/health", timeout=1, context=self.ssl_context()) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:  # 503 while no replica is live
            body = exc.read()
        return {name: int(n) for name, n in json.loads(body).get("models", {}).items()}

    def services(self) -> list[Service]:
        return [*self.routers, *self.batchers, *self.workers]

    def stop(self) -> None:
        """Router first (stop taking requests), then batchers (drain), workers, NATS."""
        self._stopping = True
        for hook in self.on_stop:  # the lifecycle backend's replicas (switchyard.runtime.lifecycle)
            hook()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        for svc in self.services():
            if svc.process.poll() is None:
                svc.process.send_signal(signal.SIGTERM)
        for svc in self.services():
            svc.stop()
        if self.nats is not None:
            self.nats.stop()
        if self.spec.log_dir:  # logs went elsewhere; the run folder holds only port files
            self._tmp.cleanup()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
