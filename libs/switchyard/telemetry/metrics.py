"""Prometheus metrics endpoint for a service (prometheus-client's own HTTP server)."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

log = logging.getLogger(__name__)

# Latency buckets (seconds) that resolve both a tiny model's sub-millisecond steps and a
# real model's multi-second generations.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def serve_metrics(host: str, port: int) -> int | None:
    """Start /metrics on port (0 = a free one, negative = off); returns the bound port."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return int(bound)
