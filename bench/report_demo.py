"""A short mixed run through the real stack, then `switchyard report` on it: the
percentiles, cost and tail-attribution tables and the latency plot shown in
docs/observability.md.

    .venv/bin/python bench/report_demo.py [--requests 60] [--out runs/report-demo]

Two tenants send chat requests of mixed length to the int4 (2 replicas) and fp32 (1 replica)
models; a burst of concurrent requests makes some of them queue, so the tail has a cause.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from rich.console import Console
from rich.progress import Progress

from services.router.tenants import new_key, write_tenant
from switchyard.model.convert import FP32_MODEL_NAME, INT4_MODEL_NAME
from switchyard.reporting.cli import print_report, report
from switchyard.runtime.stack import LocalStack, StackSpec

console = Console()
QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain recursion simply.",
             "List five fruits.", "How do airplanes fly? Answer in a paragraph.", "Say hello in three languages."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("runs/report-demo"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    tmp = Path(tempfile.mkdtemp(prefix="report-demo-"))
    keys = {"acme": new_key(), "globex": new_key()}
    for tenant, key in keys.items():
        write_tenant(tmp / "tenants.toml", tenant, key, requests_per_minute=10_000, tokens_per_minute=10_000_000)
    spec = StackSpec(models_dir=args.models_dir, replicas={INT4_MODEL_NAME: 2, FP32_MODEL_NAME: 1},
                     tenants_file=tmp / "tenants.toml", api_key=keys["acme"], log_dir=tmp, records_dir=args.out,
                     extra_env={"SWITCHYARD_SPANS_FILE": str(args.out.resolve() / "spans.jsonl"),
                                "OTEL_BSP_SCHEDULE_DELAY": "200"})
    rng = random.Random(7)
    with LocalStack(spec) as stack:
        clients = {t: openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key=k, max_retries=0) for t, k in keys.items()}

        def one(i: int) -> None:
            tenant = "acme" if i % 3 else "globex"
            model = FP32_MODEL_NAME if i % 4 == 0 else INT4_MODEL_NAME
            stream = clients[tenant].chat.completions.create(
                model=model, messages=[{"role": "user", "content": rng.choice(QUESTIONS)}],
                max_tokens=rng.choice([16, 48, 96]), temperature=0, stream=True)
            for _ in stream:
                pass

        with Progress(console=console, transient=True) as progress, ThreadPoolExecutor(12) as pool:
            task = progress.add_task("requests", total=args.requests)
            for i in range(args.requests):
                if i % 20 == 0:
                    time.sleep(0.5)  # bursts separated by short lulls
                pool.submit(one, i).add_done_callback(lambda _: progress.advance(task))
        time.sleep(1.0)  # let span processors flush
    result = report(args.out)
    print_report(result)


if __name__ == "__main__":
    main()
