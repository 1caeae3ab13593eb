"""Batcher configuration."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from switchyard.config import ConfigError

from .prefill_coalescing import DECODING_PER_NEWCOMER, PrefillCoalescing

if TYPE_CHECKING:  # the worker's packages (ONNX Runtime) load only for `--worker local`
    from services.worker.config import WorkerConfig

LOCAL_WORKER = "local"
# Prompt tokens per step while others decode, on a CPU worker (prefill_chunk_decoding 0): a
# CPU step's time grows with its tokens, and this bounds a newcomer's stall on the others.
CPU_PREFILL_CHUNK_DECODING = 128

# Worker flags that describe its own gRPC server or process: with the engine inside the
# batcher there is no worker port, token, certificate or lease, and the batcher's own
# metrics endpoint, port file and grace period serve the one process.
_SERVER_ONLY_WORKER_FIELDS = ("host", "port", "auth_token", "tls_cert", "tls_key", "tls_ca", "port_file",
                              "metrics_port", "metrics_host", "grace_s", "lease_s")


@dataclass(frozen=True)
class BatcherConfig:
    """One batcher per worker: its queue and continuous-batching scheduler."""

    worker: str = field(default="127.0.0.1:50061", metadata={
        "help": "worker gRPC address, or 'local': run the worker's engine in this process (co-located: "
                "a step is a function call, not a gRPC round trip; its flags in worker_flags)"})
    worker_flags: str = field(default="", metadata={
        "help": "with worker 'local': the worker's engine flags as one string, e.g. "
                "'--model-dir models/smollm2-135m-instruct-int4 --max-sequences 64' (see `switchyard worker --help`)"})
    worker_token: str = field(default="", repr=False, metadata={
        "help": "bearer token the worker requires (its auth_token); set it in the environment"})
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata={"help": "NATS server URL"})
    nats_user: str = field(default="", metadata={"help": "NATS user (empty: connect without credentials)"})
    nats_password: str = field(default="", repr=False, metadata={
        "help": "NATS password; set it in the environment, not as a flag (flags show in ps)"})
    tls_ca: Path | None = field(default=None, metadata={
        "help": "CA that signed the worker's and nats-server's certificates (set: both hops over TLS)"})
    tls_client_cert: Path | None = field(default=None, metadata={
        "help": "client certificate presented to the worker and nats-server (mTLS)"})
    tls_client_key: Path | None = field(default=None, metadata={"help": "private key of tls_client_cert"})
    replica_id: str = field(default="", metadata={"help": "replica id (default: model-host-pid)"})
    max_batch_size: int = field(default=32, metadata={"help": "most sequences in the batch"})
    token_budget: int = field(default=16384, metadata={"help": "most KV tokens reserved (prompt + max tokens) across the batch"})
    prefill_chunk: int = field(default=512, metadata={"help": "most prompt tokens processed per step (chunked prefill)"})
    prefill_chunk_decoding: int = field(default=0, metadata={
        "help": "most prompt tokens per step while other sequences are decoding: bounds the stall a "
                "newcomer's prefill puts on everyone's next token (inter-token latency); 0 (auto): "
                f"{CPU_PREFILL_CHUNK_DECODING} on a CPU worker, prefill_chunk on a GPU, where a step "
                "costs its kernel launches more than its tokens"})
    prefill_wait_steps: int = field(default=0, metadata={
        "help": "most decode steps a new prompt waits for others to prefill with it while sequences "
                "decode (one prefill run for a group: on a GPU a run costs its launches, and the whole "
                "batch waits for it); the group asked for grows with the batch (1 per "
                f"{DECODING_PER_NEWCOMER} decoding). 0: never wait (the default: no gain measured at "
                "256 streams on an H200, docs/benchmarks.md)"})
    port_file: Path | None = field(default=None, metadata={"help": "write the bound ports here as JSON"})
    decode_steps: int = field(default=1, metadata={"help": "decode steps per worker call once the batch holds "
                                                   "multi_step_min_batch sequences (amortizes the round trip)"})
    pipeline_depth: int = field(default=2, metadata={
        "help": "worker steps in flight: 2 lets the worker run the next step while this batcher "
                "publishes the last one's tokens (a finished request costs the worker one extra "
                "step); 1 waits for each step's answer before sending the next"})
    multi_step_min_batch: int = field(default=8, metadata={"help": "batch size from which decode_steps applies"})
    heartbeat_s: float = field(default=0.5, metadata={"help": "seconds between load reports"})
    metrics_port: int = field(default=-1, metadata={"help": "Prometheus /metrics port (0 picks a free one, -1 disables)"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address of the /metrics endpoint"})
    grace_s: float = field(default=10.0, metadata={"help": "seconds to finish running requests on SIGTERM"})

    def prefill_coalescing(self) -> PrefillCoalescing:
        """How long new prompts wait for each other while others decode (prefill_coalescing.py)."""
        return PrefillCoalescing(self.prefill_wait_steps)

    def decoding_prefill_chunk(self, execution_provider: str) -> int:
        """Prompt tokens per step while others decode, for a worker on `execution_provider`:
        the setting, or with 0 (auto) prefill_chunk on a GPU — there a step costs its kernel
        launches, not its tokens (H200: a 1,024-token prefill ~6 ms, a decode step ~4 ms), so
        small chunks only stretch admission of a burst over many steps — and
        CPU_PREFILL_CHUNK_DECODING on the CPU."""
        if self.prefill_chunk_decoding > 0:
            return self.prefill_chunk_decoding
        on_cpu = execution_provider in ("", "CPUExecutionProvider")
        return min(CPU_PREFILL_CHUNK_DECODING, self.prefill_chunk) if on_cpu else self.prefill_chunk

    @property
    def local_worker(self) -> bool:
        return self.worker == LOCAL_WORKER

    def local_worker_config(self) -> "WorkerConfig":
        """The co-located engine's settings, read from worker_flags alone (not from the
        environment, whose SWITCHYARD_* names this batcher's own settings share)."""
        from services.worker.config import WorkerConfig
        from switchyard.config import load_config
        try:
            config = load_config(WorkerConfig, shlex.split(self.worker_flags), environ={})
        except SystemExit as exc:  # argparse: an unknown or malformed flag (its message went to stderr)
            raise ConfigError(f"worker_flags: cannot read {self.worker_flags!r} as worker flags "
                              "(see `switchyard worker --help`)") from exc
        defaults = WorkerConfig()
        given = [f for f in _SERVER_ONLY_WORKER_FIELDS if getattr(config, f) != getattr(defaults, f)]
        if given:
            raise ConfigError(f"worker_flags: {', '.join('--' + f.replace('_', '-') for f in given)} "
                              "describe a worker's own server; with --worker local there is none (the "
                              "batcher's --metrics-port, --port-file and --grace-s serve the process)")
        return config

    def validate(self) -> None:
        from switchyard.tls import check_pair
        check_pair("batcher client", self.tls_client_cert, self.tls_client_key, self.tls_ca)
        if self.local_worker:
            self.local_worker_config()
        elif self.worker_flags:
            raise ConfigError("worker_flags apply only with --worker local (this batcher drives a worker "
                              f"at {self.worker})")
        if self.max_batch_size < 1:
            raise ConfigError("max_batch_size must be at least 1")
        if self.token_budget < 2:
            raise ConfigError("token_budget must be at least 2")
        if self.prefill_chunk < 1 or self.prefill_chunk_decoding < 0:
            raise ConfigError("prefill_chunk must be at least 1 and prefill_chunk_decoding at least 0 (0: auto)")
        if self.prefill_wait_steps < 0:
            raise ConfigError("prefill_wait_steps must be 0 (never wait) or more")
        if self.decode_steps < 1 or self.multi_step_min_batch < 1:
            raise ConfigError("decode_steps and multi_step_min_batch must be at least 1")
        if not 1 <= self.pipeline_depth <= 4:
            raise ConfigError("pipeline_depth must be between 1 and 4")
        if self.heartbeat_s <= 0:
            raise ConfigError("heartbeat_s must be positive")
