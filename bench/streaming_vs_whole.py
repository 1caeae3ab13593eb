"""Streaming vs not: time to the first visible token over SSE against the wait for the
whole non-streamed response, same prompts, same stack, measured in one run.

    .venv/bin/python bench/streaming_vs_whole.py [--model smollm2-135m-instruct-int4] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from services.router.tenants import new_key, write_tenant
from switchyard.runtime.stack import LocalStack, StackSpec

console = Console()
PROMPTS = [
    "Explain what a load balancer does in two sentences.",
    "Write a haiku about autumn.",
    "What is the capital of France?",
    "List three uses of Python.",
    "Why is the sky blue?",
    "Give me a tip for writing clean code.",
    "What does HTTP stand for?",
    "Describe a cat to someone who has never seen one.",
]


def streamed(client: httpx.Client, body: dict) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                if first is None and delta and delta[0]["delta"].get("content"):
                    first = time.perf_counter() - start
    return first if first is not None else float("nan"), time.perf_counter() - start


def whole(client: httpx.Client, body: dict) -> float:
    start = time.perf_counter()
    client.post("/v1/chat/completions", json=body).raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct-int4")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    key = new_key()
    write_tenant(tmp / "tenants.toml", "bench", key, requests_per_minute=100_000, tokens_per_minute=100_000_000)
    spec = StackSpec(models_dir=args.models_dir, replicas={args.model: 1}, tenants_file=tmp / "tenants.toml",
                     api_key=key, log_dir=tmp)
    first_visible, stream_total, whole_total = [], [], []
    with LocalStack(spec) as stack, httpx.Client(base_url=stack.http_url, timeout=300,
                                                  headers={"Authorization": f"Bearer {key}"}) as client:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("prompts", total=args.rounds * len(PROMPTS))
            for _ in range(args.rounds):
                for prompt in PROMPTS:
                    body = {"model": args.model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": args.max_tokens, "temperature": 0}
                    f, t = streamed(client, body)
                    first_visible.append(f)
                    stream_total.append(t)
                    whole_total.append(whole(client, body))
                    progress.advance(task)
    table = Table(title=f"{args.model}, {args.max_tokens} max tokens, {len(first_visible)} requests each "
                        f"({platform.node()}, {os.cpu_count()} cores)")
    for col in ("measure", "p50 ms", "p95 ms", "mean ms"):
        table.add_column(col, justify="right")
    for name, xs in (("SSE: first visible token", first_visible), ("SSE: whole stream", stream_total),
                     ("non-streamed: whole response", whole_total)):
        a = np.asarray(xs) * 1e3
        table.add_row(name, f"{np.nanpercentile(a, 50):.0f}", f"{np.nanpercentile(a, 95):.0f}", f"{np.nanmean(a):.0f}")
    console.print(table)
    console.print(f"the first words appear {np.nanmedian(whole_total) / np.nanmedian(first_visible):.1f}× sooner "
                  "streamed than the non-streamed answer arrives (p50 / p50)")


if __name__ == "__main__":
    main()
