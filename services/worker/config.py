"""Worker configuration."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from switchyard.config import ConfigError

# --cuda-graph values and what they mean (true/false: the flag's earlier boolean spelling).
CUDA_GRAPH_SETTINGS = {"auto": "auto", "on": "on", "true": "on", "off": "off", "false": "off"}


@dataclass(frozen=True)
class WorkerConfig:
    """Serves one model folder over gRPC for its batcher."""

    model_dir: Path = field(default=Path("models/tiny-llama"), metadata={"help": "model folder"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=0, metadata={"help": "gRPC port (0 picks a free one)"})
    auth_token: str = field(default="", repr=False, metadata={
        "help": "require 'authorization: Bearer <token>' on every call but health checks (its batcher "
                "holds it); set it in the environment, not as a flag (flags show in ps). Empty: no check"})
    tls_cert: Path | None = field(default=None, metadata={"help": "TLS certificate of the worker's gRPC port"})
    tls_key: Path | None = field(default=None, metadata={"help": "private key of tls_cert"})
    tls_ca: Path | None = field(default=None, metadata={
        "help": "with tls_cert: require a client certificate signed by this CA (mTLS; the batcher's)"})
    max_sequences: int = field(default=64, metadata={"help": "most sequences held at once"})
    threads: int = field(default=0, metadata={"help": "ONNX Runtime intra-op threads (0 = all cores)"})
    provider: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    spin: bool = field(default=False, metadata={"help": "let ONNX Runtime threads spin between steps "
                                                "(faster when the worker has cores to itself)"})
    cuda_graph: str = field(default="auto", metadata={
        "help": "replay decode steps from captured CUDA graphs: auto (on with CUDA and a fused graph), on "
                "(true), off (false). H200, int4: 1.4 ms per step at batch 1 and 2.6 ms at 256 vs 5.4 and "
                "6.6 ms eager; the whole stack 2.4x the tokens/s"})
    device_sampling: str = field(default="auto", metadata={
        "help": "sample (temperature, top-k, top-p) with a graph where the logits are instead of numpy on "
                "the host: auto (on with CUDA), on, off"})
    device_prefix_cache: str = field(default="auto", metadata={
        "help": "keep prefix-cache blocks as tensors on the KV pool's device, cut and placed there (fused "
                "graph): auto (on with CUDA), on, off (numpy blocks on the host)"})
    prefix_cache_mib: int = field(default=256, metadata={"help": "MiB of KV the prefix cache may keep for reuse "
                                                          "by later prompts with the same prefix (0 disables)"})
    port_file: Path | None = field(default=None, metadata={"help": "write the bound port here"})
    metrics_port: int = field(default=-1, metadata={"help": "Prometheus /metrics port (0 picks a free one, -1 disables)"})
    metrics_host: str = field(default="127.0.0.1", metadata={"help": "address of the /metrics endpoint"})
    grace_s: float = field(default=5.0, metadata={"help": "seconds to finish calls on SIGTERM"})
    lease_s: float = field(default=30.0, metadata={"help": "free held sequences after this long without a call "
                                                   "from the batcher (it is gone)"})
    served_name: str = field(default="", metadata={
        "help": "serve the model under this name, e.g. name@version for a rollout (default: the manifest's name)"})
    # Test-only fault injection (docs/rollouts.md): off by default; never set them in production.
    fault_delay_per_token_ms: float = field(default=0.0, metadata={
        "help": "TEST ONLY: sleep this long per generated token (a planted slow version)"})
    fault_fail_fraction: float = field(default=0.0, metadata={
        "help": "TEST ONLY: refuse this fraction of sequences (chosen by a hash of the sequence id)"})
    fault_start_delay_s: float = field(default=0.0, metadata={
        "help": "TEST ONLY: wait this long after loading the model before serving (a longer cold start, "
                "as a production-size model's weights load would take; bench/autoscaling_live.py)"})

    def use_cuda_graph(self, provider: str, graph: str) -> bool:
        """Whether the engine replays decode from CUDA graphs, given the provider it resolved to
        ("cuda" or "cpu") and the model's graph kind: with "auto", wherever they can run (CUDA,
        the fused graph) — measured on an H200, they are the fast path (docs/model.md, "GPU")."""
        setting = CUDA_GRAPH_SETTINGS[self.cuda_graph]
        if setting == "auto":
            return provider == "cuda" and graph == "fused"
        return setting == "on"

    def validate(self) -> None:
        from switchyard.tls import check_pair
        check_pair("worker", self.tls_cert, self.tls_key, self.tls_ca)
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("worker: tls_ca (client verification) needs tls_cert and tls_key")
        if not (self.model_dir / "switchyard.json").exists():
            raise ConfigError(f"model_dir {self.model_dir} is not a model folder (no switchyard.json); "
                              "build one with `switchyard model convert` or `switchyard model tiny`")
        if self.cuda_graph not in CUDA_GRAPH_SETTINGS:
            raise ConfigError(f"cuda_graph must be auto, on or off (true/false), not {self.cuda_graph!r}")
        if CUDA_GRAPH_SETTINGS[self.cuda_graph] == "on" and self.provider != "cuda":
            raise ConfigError("cuda_graph needs provider cuda (CUDA graphs are captured by ONNX Runtime's "
                              f"CUDA provider), not {self.provider!r}")
        if self.max_sequences < 1:
            raise ConfigError("max_sequences must be at least 1")
        if self.prefix_cache_mib < 0:
            raise ConfigError("prefix_cache_mib must be non-negative")
        if self.lease_s <= 0:
            raise ConfigError("lease_s must be positive")
        if self.fault_delay_per_token_ms < 0 or not 0.0 <= self.fault_fail_fraction <= 1.0:
            raise ConfigError("fault_delay_per_token_ms must be ≥ 0 and fault_fail_fraction in [0, 1]")
        if self.fault_start_delay_s < 0:
            raise ConfigError("fault_start_delay_s must be ≥ 0")
        if self.served_name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9._-]{1,64})?",
                                                 self.served_name):
            raise ConfigError(f"served_name {self.served_name!r} must be a model name, optionally @version")
        if self.device_sampling not in ("auto", "on", "off") or self.device_prefix_cache not in ("auto", "on", "off"):
            raise ConfigError("device_sampling and device_prefix_cache must be auto, on or off")
        if self.provider not in ("auto", "cpu", "cuda"):
            raise ConfigError("provider must be auto, cpu or cuda")
