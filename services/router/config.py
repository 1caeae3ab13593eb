"""Router configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from switchyard.config import ConfigError

from .balancing import POLICIES


@dataclass(frozen=True)
class RouterConfig:
    """The public front end: gRPC (and HTTP) API over the replicas."""

    nats_url: str = field(default="nats://127.0.0.1:4222", metadata={"help": "NATS server URL"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    grpc_port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)"})
    models_dir: Path = field(default=Path("models"), metadata={"help": "folder of model folders (tokenizers, templates)"})
    balancing: str = field(default="least_loaded", metadata={"help": "replica choice: least_loaded or round_robin"})
    heartbeat_misses: float = field(default=3.0, metadata={"help": "drop a replica after this many missed heartbeats"})
    router_id: str = field(default="", metadata={"help": "router id on the bus (default: random)"})
    port_file: Path | None = field(default=None, metadata={"help": "write the bound gRPC port here"})
    grace_s: float = field(default=5.0, metadata={"help": "seconds to finish streams on SIGTERM"})

    def validate(self) -> None:
        if self.balancing not in POLICIES:
            raise ConfigError(f"balancing must be one of {sorted(POLICIES)}")
        if self.heartbeat_misses < 1:
            raise ConfigError("heartbeat_misses must be at least 1")
