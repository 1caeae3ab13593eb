#!/usr/bin/env python3
"""Container health probe for docker-compose.yml (installed in the image as switchyard-healthcheck).

    switchyard-healthcheck grpc 127.0.0.1:50061          # gRPC health of the server ("" service) is SERVING
    switchyard-healthcheck http http://127.0.0.1:9090/metrics   # the URL answers 2xx/3xx

Exit 0 when healthy, 1 otherwise (the reason goes to stderr, which `docker inspect` shows).
"""

from __future__ import annotations

import sys
import urllib.request

TIMEOUT_S = 3.0


def grpc_healthy(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
        return False
    return True


def http_healthy(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 (a local URL)
        return 200 <= response.status < 400


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("grpc", "http"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, target = argv
    try:
        ok = grpc_healthy(target) if kind == "grpc" else http_healthy(target)
    except Exception as exc:  # any failure to answer is "unhealthy"
        print(f"{target}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
