"""A tenant's rate limit with several routers behind one address: how much it is admitted when
the routers share their usage (`--peer-sync-interval-s 0.1`, the default) against each router
enforcing the limit alone (`--peer-sync-interval-s 0`), in one run.

Two routers share the gRPC port (the kernel spreads connections). `--clients` clients over
`--connections` connections send short requests for one tenant as fast as they are admitted
(a refused client waits `--backoff-ms`) for `--seconds`. A bucket starts full, so a limit of R
requests per minute admits at most R + R × seconds / 60 over the run; the table gives what was
admitted against that bound.

    .venv/bin/python bench/shared_limits.py [--routers 2] [--limit 120] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from stack_overhead import MODEL, separate_channels  # noqa: E402

from services.router.tenants import write_tenant  # noqa: E402
from switchyard.model.tiny import build_tiny_model  # noqa: E402
from switchyard.runtime.stack import LocalStack, Service, StackSpec  # noqa: E402
from switchyard.v1 import generate_pb2, generate_pb2_grpc  # noqa: E402

console = Console()
KEY = "sy-bench-shared-limits-key"


def requests_by_code(router: Service) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{router.metrics_port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "switchyard_requests":
            for sample in family.samples:
                if sample.name == "switchyard_requests_total":
                    out[sample.labels["code"]] = out.get(sample.labels["code"], 0) + sample.value
    return out


async def drive(address: str, args: argparse.Namespace) -> dict[str, int]:
    """Clients sending for `args.seconds`; outcome → count."""
    channels = separate_channels(address, args.connections)
    outcomes: dict[str, int] = {}
    request = generate_pb2.GenerateRequest(model=MODEL, token_ids=generate_pb2.TokenIds(ids=[5, 6, 7]), max_tokens=2)
    metadata = (("authorization", f"Bearer {KEY}"),)
    end = time.monotonic() + args.seconds

    async def client(i: int) -> None:
        stub = generate_pb2_grpc.GenerationStub(channels[i % len(channels)])
        while time.monotonic() < end:
            try:
                async for _ in stub.Generate(request, metadata=metadata, timeout=30):
                    pass
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            outcomes[code] = outcomes.get(code, 0) + 1
            if code != "OK":
                await asyncio.sleep(args.backoff_ms / 1000)
    try:
        await asyncio.gather(*(client(i) for i in range(args.clients)))
    finally:
        for channel in channels:
            await channel.close()
    return outcomes


def run_one(models: Path, sync_s: float, args: argparse.Namespace) -> tuple[dict[str, int], list[float], float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-shared-limits-"))
    tenants = tmp / "tenants.toml"
    write_tenant(tenants, "acme", KEY, requests_per_minute=args.limit, tokens_per_minute=10_000_000)
    spec = StackSpec(models_dir=models, replicas={MODEL: 1}, routers=args.routers, tenants_file=tenants, api_key=KEY,
                     log_dir=tmp, router_args=("--peer-sync-interval-s", str(sync_s)))
    with LocalStack(spec) as stack:
        before = [requests_by_code(r).get("OK", 0) for r in stack.routers]
        start = time.monotonic()
        outcomes = asyncio.run(drive(stack.router_address, args))
        seconds = time.monotonic() - start
        per_router = [requests_by_code(r).get("OK", 0) - n for r, n in zip(stack.routers, before)]
    return outcomes, per_router, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=120, help="the tenant's requests per minute")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--backoff-ms", type=float, default=20.0)
    args = parser.parse_args()
    models = Path(tempfile.mkdtemp(prefix="bench-models-"))
    build_tiny_model(models, name=MODEL)
    table = Table(title=f"A {args.limit}/min tenant limit over {args.routers} routers on one port, "
                        f"{args.clients} clients, {args.connections} connections")
    for column in ("routers share usage", "seconds", "admitted", "bound R + R·t/60", "admitted / bound",
                   "admitted per router", "refused"):
        table.add_column(column, justify="right")
    for label, sync_s in (("every 0.1 s", 0.1), ("no (each alone)", 0.0)):
        console.log(f"stack with peer sync {label} …")
        outcomes, per_router, seconds = run_one(models, sync_s, args)
        admitted = outcomes.get("OK", 0)
        bound = args.limit + args.limit * seconds / 60
        table.add_row(label, f"{seconds:.1f}", f"{admitted}", f"{bound:.0f}", f"{admitted / bound:.2f}×",
                      " / ".join(f"{n:.0f}" for n in per_router),
                      ", ".join(f"{n} {code}" for code, n in sorted(outcomes.items()) if code != "OK") or "0")
    console.print(table)


if __name__ == "__main__":
    main()
