"""Autoscaler configuration: one dataclass from flags and SWITCHYARD_* env, validated at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from switchyard.config import ConfigError

from .scaling import ModelScaling

BACKENDS = ("local", "kubernetes", "observe")


@dataclass(frozen=True)
class AutoscalerConfig:
    """Decides a replica count per model from demand and the fleet, and converges to it."""

    nats_url: str = field(default="nats://127.0.0.1:4222", metadata={"help": "NATS server URL"})
    nats_user: str = field(default="", metadata={"help": "NATS user (empty: connect without credentials)"})
    nats_password: str = field(default="", repr=False, metadata={
        "help": "NATS password; set it in the environment, not as a flag (flags show in ps)"})
    tls_ca: Path | None = field(default=None, metadata={
        "help": "CA that signed nats-server's certificate (set: NATS over TLS)"})
    tls_client_cert: Path | None = field(default=None, metadata={
        "help": "client certificate presented to nats-server (mTLS; `switchyard certs` writes autoscaler.pem)"})
    tls_client_key: Path | None = field(default=None, metadata={"help": "private key of tls_client_cert"})
    models: tuple[str, ...] = field(default=(), metadata={
        "help": "models to scale: name=min:max[:policy[:scale_to_zero_after_s]],... (policy: reactive, predictive)"})
    policy_options: tuple[str, ...] = field(default=(), metadata={
        "help": "key=value options passed to every policy (numbers as floats), e.g. scale_down_window_s=30"})
    backend: str = field(default="observe", metadata={
        "help": "local (inside `switchyard up` only), kubernetes (Deployment scale), observe (decide and export "
                "metrics, change nothing)"})
    tick_s: float = field(default=1.0, metadata={"help": "seconds between decisions"})
    k8s_namespace: str = field(default="switchyard", metadata={"help": "Kubernetes namespace of the replica Deployments"})
    k8s_deployment: str = field(default="switchyard-replica-{model}", metadata={
        "help": "Deployment name per model ({model} is replaced by the model name)"})
    cold_start_file: Path | None = field(default=None, metadata={
        "help": "JSON file keeping the last measured cold start per model across restarts (unset: memory only)"})
    default_cold_start_s: float = field(default=10.0, metadata={
        "help": "cold start assumed for a model until one is measured"})
    service_rate_per_replica: float = field(default=2.0, metadata={
        "help": "requests/s one replica completes at full batch (the policies' capacity unit); with "
                "measure_service_rate, used only until it is measured"})
    measure_service_rate: bool = field(default=True, metadata={
        "help": "measure the service rate per replica from heartbeats (completions/s while a replica is full) "
                "and give that to the policy instead of service_rate_per_replica"})
    service_rate_window_s: float = field(default=60.0, metadata={
        "help": "seconds of heartbeats the measured service rate is taken over"})
    default_slots: int = field(default=32, metadata={"help": "slots per replica assumed before a replica reports its batch"})
    retry_base_s: float = field(default=1.0, metadata={"help": "first wait before retrying after a failed start (doubles)"})
    retry_max_s: float = field(default=60.0, metadata={"help": "longest wait between retries of failed starts"})
    heartbeat_misses: float = field(default=3.0, metadata={"help": "drop a replica after this many missed heartbeats"})
    host: str = field(default="127.0.0.1", metadata={"help": "address of the gRPC health endpoint"})
    grpc_port: int = field(default=50071, metadata={"help": "gRPC health port (0 picks a free one)"})
    metrics_port: int = field(default=-1, metadata={"help": "Prometheus /metrics port (0 picks a free one, -1 disables)"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address of the /metrics endpoint"})
    port_file: Path | None = field(default=None, metadata={"help": "write the bound ports here as JSON"})

    def scaling(self) -> list[ModelScaling]:
        return [ModelScaling.parse(text) for text in self.models]

    def options(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for item in self.policy_options:
            key, sep, value = item.partition("=")
            try:
                out[key.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"policy_options: {item!r} is not key=number") from None
            if not sep or not key.strip():
                raise ConfigError(f"policy_options: {item!r} is not key=number")
        return out

    def validate(self) -> None:
        from switchyard.tls import check_pair
        check_pair("autoscaler NATS client", self.tls_client_cert, self.tls_client_key, self.tls_ca)
        if self.tls_client_cert and not self.tls_ca:
            raise ConfigError("autoscaler: tls_client_cert needs tls_ca (the CA that signed nats-server's certificate)")
        if not self.models:
            raise ConfigError("models: name at least one model to scale (name=min:max[:policy])")
        names = [m.model for m in self.scaling()]
        if len(set(names)) != len(names):
            raise ConfigError(f"models: a model is named twice in {names}")
        self.options()
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}")
        if self.service_rate_window_s <= 0:
            raise ConfigError("service_rate_window_s must be positive")
        if self.tick_s <= 0 or self.default_cold_start_s <= 0 or self.service_rate_per_replica <= 0:
            raise ConfigError("tick_s, default_cold_start_s and service_rate_per_replica must be positive")
        if self.default_slots < 1 or self.retry_base_s <= 0 or self.retry_max_s < self.retry_base_s:
            raise ConfigError("default_slots ≥ 1 and 0 < retry_base_s ≤ retry_max_s are required")
        if "{model}" not in self.k8s_deployment:
            raise ConfigError("k8s_deployment must contain {model}")
