"""Router configuration."""

from __future__ import annotations


from dataclasses import dataclass, field
from pathlib import Path

from switchyard.config import ConfigError

from switchyard.routing import policy_names
from switchyard.routing.model_routes import ModelRouter
from switchyard.routing.table import parse_overrides


def httptools_importable() -> bool:
    """Whether uvicorn's httptools protocol can run here (installed and loadable)."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class RouterConfig:
    """The public front end: gRPC (and HTTP) API over the replicas."""

    nats_url: str = field(default="nats://127.0.0.1:4222", metadata={"help": "NATS server URL"})
    nats_user: str = field(default="", metadata={"help": "NATS user (empty: connect without credentials)"})
    nats_password: str = field(default="", repr=False, metadata={
        "help": "NATS password; set it in the environment, not as a flag (flags show in ps)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    tls_cert: Path | None = field(default=None, metadata={"help": "TLS certificate of the public API (HTTP and gRPC); unset: plaintext"})
    tls_key: Path | None = field(default=None, metadata={"help": "private key of tls_cert"})
    tls_ca: Path | None = field(default=None, metadata={"help": "CA that signed nats-server's certificate (set: NATS over TLS)"})
    tls_client_cert: Path | None = field(default=None, metadata={"help": "client certificate presented to nats-server (mTLS)"})
    tls_client_key: Path | None = field(default=None, metadata={"help": "private key of tls_client_cert"})
    grpc_port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)"})
    models_dir: Path = field(default=Path("models"), metadata={"help": "folder of model folders (tokenizers, templates)"})
    balancing: str = field(default="prefix_aware", metadata={
        "help": "routing policy choosing a model's replica: " + ", ".join(policy_names())})
    routing_policies: tuple[str, ...] = field(default=(), metadata={
        "help": "per-model routing policy overrides, model=policy,... (others use --balancing)"})
    model_routes: tuple[str, ...] = field(default=(), metadata={
        "help": "virtual models resolved per request by difficulty: name=small:large:threshold,..."})
    heartbeat_misses: float = field(default=3.0, metadata={"help": "drop a replica after this many missed heartbeats"})
    router_id: str = field(default="", metadata={"help": "router id on the bus (default: random)"})
    share_port: bool = field(default=False, metadata={
        "help": "let several routers listen on the same gRPC and HTTP ports (SO_REUSEPORT): the kernel spreads "
                "client connections across them; they share tenant limits and admission over NATS "
                "(--peer-sync-interval-s)"})
    http_port: int = field(default=8000, metadata={"help": "OpenAI-compatible HTTP port (0 picks a free one, -1 disables)"})
    http_impl: str = field(default="auto", metadata={
        "help": "HTTP/1.1 protocol of the HTTP API: httptools (C parser, ~19% less router CPU per streamed chunk), "
                "h11 (pure Python), or auto (httptools when installed, else h11)"})
    tenants_file: Path | None = field(default=None, metadata={"help": "TOML file of tenants and hashed API keys (unset: no auth)"})
    queue_limit: int = field(default=64, metadata={"help": "requests a model may queue beyond its replicas' batch capacity"})
    token_queue_factor: float = field(default=0.5, metadata={
        "help": "tokens (prompt + max_tokens) a model may queue beyond its replicas' KV token budgets, as a share of them"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest HTTP request body"})
    request_timeout_s: float = field(default=600.0, metadata={"help": "HTTP request timeout (a lower x-request-timeout header wins)"})
    write_timeout_s: float = field(default=30.0, metadata={"help": "cut off a client that has not read its stream for this long"})
    max_buffered_events: int = field(default=256, metadata={"help": "events buffered per stream before a non-reading client is cut off"})
    records_dir: Path | None = field(default=None, metadata={"help": "run folder for per-request records (requests.jsonl) read by `switchyard report`"})
    port_file: Path | None = field(default=None, metadata={"help": "write the bound ports here as JSON {grpc, http}"})
    metrics_port: int = field(default=-1, metadata={"help": "Prometheus /metrics port (0 picks a free one, -1 disables)"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address of the /metrics endpoint"})
    grace_s: float = field(default=5.0, metadata={"help": "seconds to finish streams on SIGTERM"})
    max_failovers: int = field(default=3, metadata={"help": "re-dispatches of one request when its replica fails"})
    stall_timeout_s: float = field(default=2.0, metadata={
        "help": "move a request on after this much silence from a replica that reports it cannot serve"})
    retry_budget_ratio: float = field(default=0.2, metadata={"help": "failovers may add at most this share of recent requests"})
    replica_wait_s: float = field(default=0.0, metadata={
        "help": "a request for a model with no live replica waits up to this long (and its deadline) for one to "
                "join instead of failing at once: scale from zero (0: fail at once)"})
    demand_interval_s: float = field(default=1.0, metadata={"help": "seconds between per-model demand reports for the autoscaler"})
    peer_sync_interval_s: float = field(default=0.1, metadata={
        "help": "seconds between usage reports to the other routers behind the same address, which count them "
                "against tenant limits and admission (0: this router counts only its own; services/router/peers.py)"})
    rollout_interval_s: float = field(default=1.0, metadata={
        "help": "seconds between canary analyses (a breach rolls back within one); docs/rollouts.md"})
    shadow_max_inflight: int = field(default=4, metadata={
        "help": "shadow copies in flight at most; more are dropped (never queued behind the primary)"})
    admin_key: str = field(default="", repr=False, metadata={
        "help": "bearer key of the admin API (/admin/rollouts); set it in the environment "
                "(SWITCHYARD_ADMIN_KEY), not as a flag. Empty: admin API off"})

    def validate(self) -> None:
        if self.rollout_interval_s <= 0 or self.shadow_max_inflight < 0:
            raise ConfigError("rollout_interval_s must be positive and shadow_max_inflight non-negative")
        from switchyard.tls import check_pair
        check_pair("router public API", self.tls_cert, self.tls_key)
        check_pair("router NATS client", self.tls_client_cert, self.tls_client_key, self.tls_ca)
        if self.balancing not in policy_names():
            raise ConfigError(f"balancing must be one of {policy_names()}")
        try:
            parse_overrides(self.routing_policies)
            ModelRouter.from_config(self.model_routes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.heartbeat_misses < 1:
            raise ConfigError("heartbeat_misses must be at least 1")
        if self.tenants_file is not None and not self.tenants_file.exists():
            raise ConfigError(f"tenants_file {self.tenants_file} does not exist")
        if self.token_queue_factor < 0:
            raise ConfigError("token_queue_factor must be non-negative")
        if self.queue_limit < 0 or self.max_buffered_events < 1 or self.max_body_bytes < 1024:
            raise ConfigError("queue_limit ≥ 0, max_buffered_events ≥ 1 and max_body_bytes ≥ 1024 are required")
        if self.max_failovers < 0 or self.stall_timeout_s <= 0 or not 0 <= self.retry_budget_ratio <= 1:
            raise ConfigError("max_failovers ≥ 0, stall_timeout_s > 0 and retry_budget_ratio in [0, 1] are required")
        if self.replica_wait_s < 0 or self.demand_interval_s <= 0:
            raise ConfigError("replica_wait_s ≥ 0 and demand_interval_s > 0 are required")
        if self.http_impl not in ("auto", "httptools", "h11"):
            raise ConfigError(f"http_impl must be auto, httptools or h11, not {self.http_impl!r}")
        if self.http_impl == "httptools" and not httptools_importable():
            raise ConfigError("http_impl httptools: the httptools package is not installed; "
                              "install it (a project dependency) or pass --http-impl h11")
        if self.peer_sync_interval_s < 0:
            raise ConfigError("peer_sync_interval_s must be ≥ 0 (0 turns sharing usage between routers off)")
        if self.request_timeout_s <= 0 or self.write_timeout_s <= 0:
            raise ConfigError("timeouts must be positive")
