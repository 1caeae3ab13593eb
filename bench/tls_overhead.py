"""What TLS on every hop costs: the same tiny-model stack run plaintext and with `--tls` (dev CA,
gateway TLS, NATS with client certificates, worker mTLS), internal auth on in both. Measures, per
request, gRPC Complete latency on a reused channel (steady state: every hop's records are
encrypted) and on a fresh channel per request (adds the client's TLS handshake), and prints the
TLS / plaintext ratios. Short by design (a shared 2-core machine).

    .venv/bin/python bench/tls_overhead.py --requests 200
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


from switchyard.model.tiny import build_tiny_model
from switchyard.runtime.stack import LocalStack, StackSpec
from switchyard.tls import make_dev_ca
from switchyard.v1 import generate_pb2, generate_pb2_grpc

MODEL = "tiny-llama"


def request(max_tokens: int) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(model=MODEL, text="hello there", max_tokens=max_tokens,
                                        stop=generate_pb2.StopConditions(ignore_eos=True))


def measure(stack: LocalStack, n: int, max_tokens: int) -> dict[str, float]:
    """p50/p90 seconds: reused channel, then a fresh channel (new connection) per request."""
    reused: list[float] = []
    with stack.grpc_channel() as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        for _ in range(5):  # warm-up
            stub.Complete(request(max_tokens), timeout=30)
        for _ in range(n):
            t0 = time.perf_counter()
            stub.Complete(request(max_tokens), timeout=30)
            reused.append(time.perf_counter() - t0)
    fresh: list[float] = []
    for _ in range(max(n // 4, 10)):
        t0 = time.perf_counter()
        with stack.grpc_channel() as channel:
            generate_pb2_grpc.GenerationStub(channel).Complete(request(max_tokens), timeout=30)
        fresh.append(time.perf_counter() - t0)
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1]  # noqa: E731
    return {"reused_p50": q(reused, 50), "reused_p90": q(reused, 90), "fresh_p50": q(fresh, 50), "fresh_p90": q(fresh, 90)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tls-bench-") as tmp:
        root = Path(tmp)
        build_tiny_model(root / "models", name=MODEL, seed=0)
        make_dev_ca(root / "certs")
        results = {}
        for name, tls in (("plaintext", None), ("tls", root / "certs")):
            spec = StackSpec(models_dir=root / "models", replicas={MODEL: 1}, log_dir=root, tls=tls,
                             router_args=("--heartbeat-misses", "10"))
            with LocalStack(spec) as stack:
                results[name] = measure(stack, args.requests, args.max_tokens)
        print(f"gRPC Complete, tiny model, {args.max_tokens} tokens, {args.requests} requests "
              f"(fresh channel: {max(args.requests // 4, 10)})")
        print(f"{'':22}{'plaintext':>12}{'tls':>12}{'tls/plain':>11}")
        for key in ("reused_p50", "reused_p90", "fresh_p50", "fresh_p90"):
            p, t = results["plaintext"][key], results["tls"][key]
            print(f"{key:22}{p * 1000:>10.2f}ms{t * 1000:>10.2f}ms{t / p:>10.2f}x")


if __name__ == "__main__":
    main()
