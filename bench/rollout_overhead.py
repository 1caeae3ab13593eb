"""Rollout machinery on the request path, on the real stack (tiny model, this machine).

1. Overhead: TTFT p50/p99 of requests for `name` resolved by a 2-arm rollout (a 50% canary
   held at its step, samples recorded per arm) vs the same split done by the client pinning
   `name@v1` / `name@v2` itself (no rollout involved). Both conditions spread the load over the
   same two replicas the same way, in interleaved rounds in the same run, so the difference is
   the router's resolution + per-request sampling, not capacity.
2. Exposure: a bad canary (v3: half its sequences refused, +40 ms per token) started at a 5%
   first step under steady load — requests it served (ok or failed) and seconds until the
   router rolled it back, with the default thresholds (min_requests 20) and with the
   early error test on (Thresholds.early_fail_p).

    .venv/bin/python bench/rollout_overhead.py [--rounds 6] [--per-round 60] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))
sys.path.insert(0, str(ROOT))
from switchyard.model.tiny import build_tiny_model  # noqa: E402
from switchyard.rollouts.state import RolloutStore, new_rollout, versioned  # noqa: E402
from switchyard.runtime.stack import LocalStack, StackSpec  # noqa: E402

NAME = "tiny-llama"
V1, V2, BAD = versioned(NAME, "v1"), versioned(NAME, "v2"), versioned(NAME, "v3")
ADMIN_KEY = "bench-admin-key-0123456789"


def kv(stack: LocalStack, fn: Any) -> Any:
    async def go() -> Any:
        import nats
        assert stack.nats is not None
        creds: dict[str, str] = {}
        if stack.nats.users:
            user = stack.nats.user("router")
            creds = {"user": user.user, "password": user.password, "inbox_prefix": user.inbox_prefix}
        nc = await nats.connect(stack.nats.url, **creds)
        try:
            return await fn(await RolloutStore.open(nc.jetstream()))
        finally:
            await nc.close()
    return asyncio.run(go())


def set_rollout(stack: LocalStack, state: Any) -> None:
    async def put(store: RolloutStore) -> None:
        await store.replace(state, by="bench")
    kv(stack, put)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = admin(stack).get("started_at")
        if got == state.started_at:
            return
        time.sleep(0.05)
    raise RuntimeError("the router did not pick up the rollout")


def admin(stack: LocalStack) -> dict[str, Any]:
    r = httpx.get(f"{stack.http_url}/admin/rollouts/{NAME}", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    return r.json() if r.status_code == 200 else {}


def ttft(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float | None, str]:
    """Streamed request: (seconds to the first token chunk, served model or 'error')."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first: float | None = None
    try:
        with client.stream("POST", url, json=body, timeout=60) as r:
            if r.status_code != 200:
                return None, "error"
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return None, "error"
                if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - started
    except httpx.HTTPError:
        return None, "error"
    return first, model


def served(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> str:
    r = client.post(url, json={"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}, timeout=60)
    return r.json()["model"] if r.status_code == 200 else "error"


def overhead(stack: LocalStack, rounds: int, per_round: int, concurrency: int, max_tokens: int) -> dict[str, list[float]]:
    url = f"{stack.http_url}/v1/completions"
    out: dict[str, list[float]] = {"pinned split (no rollout)": [], "2-arm rollout split": []}
    with httpx.Client() as client, ThreadPoolExecutor(concurrency) as pool:
        for rnd in range(rounds):
            for label in (list(out) if rnd % 2 == 0 else list(reversed(out))):
                if label.startswith("2-arm"):
                    models = [NAME] * per_round
                else:
                    models = [V1 if i % 2 == 0 else V2 for i in range(per_round)]
                results = list(pool.map(lambda im: ttft(client, url, im[1], f"round {rnd} req {im[0]}", max_tokens),
                                        enumerate(models)))
                out[label] += [t for t, _ in results if t is not None]
    return out


def exposure(stack: LocalStack, thresholds: dict[str, float], concurrency: int, max_tokens: int,
             limit_s: float = 120.0) -> dict[str, Any]:
    state = new_rollout(NAME, "v1", "v3", "canary", steps=[0.05, 0.25, 0.5, 1.0], step_duration_s=60.0,
                        thresholds=thresholds)
    set_rollout(stack, state)
    url = f"{stack.http_url}/v1/completions"
    counts = {"total": 0, "candidate_ok": 0, "error": 0}
    began = time.monotonic()
    with httpx.Client() as client, ThreadPoolExecutor(concurrency) as pool:
        while time.monotonic() - began < limit_s:
            if admin(stack).get("status") != "running":
                break
            for model in pool.map(lambda i: served(client, url, f"exposure {counts['total'] + i}", max_tokens),
                                  range(concurrency * 2)):
                counts["total"] += 1
                counts["candidate_ok"] += model == BAD
                counts["error"] += model == "error"
    final = admin(stack)
    history = final.get("history", [])
    rollback = next((d for d in reversed(history) if d["kind"] == "rollback"), None)
    return {**counts, "status": final.get("status"), "seconds": (rollback["at"] - state.started_at) if rollback else None,
            "reason": rollback["reason"] if rollback else ""}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        models = Path(tmp) / "models"
        build_tiny_model(models, name=NAME, seed=0)
        spec = StackSpec(models_dir=models, replicas={V1: 1, V2: 1, BAD: 1}, heartbeat_s=0.5, log_dir=Path(tmp),
                         extra_env={"SWITCHYARD_ADMIN_KEY": ADMIN_KEY},
                         router_args=("--rollout-interval-s", "1.0", "--replica-wait-s", "5"),
                         worker_args={BAD: ("--fault-fail-fraction", "0.5", "--fault-delay-per-token-ms", "40")})
        with LocalStack(spec) as stack:
            # a 50% canary of v2 held at its step for the whole measurement (no decision can end it)
            set_rollout(stack, new_rollout(NAME, "v1", "v2", "canary", steps=[0.5, 1.0], step_duration_s=3600,
                                           thresholds={"min_requests": 10**9}))
            overhead(stack, 1, 20, args.concurrency, args.max_tokens)  # warm-up, not counted
            res = overhead(stack, args.rounds, args.per_round, args.concurrency, args.max_tokens)
            base = res["pinned split (no rollout)"]
            print(f"TTFT over {len(base)} + {len(res['2-arm rollout split'])} streamed requests, concurrency "
                  f"{args.concurrency}, max_tokens {args.max_tokens}, {args.rounds} interleaved rounds")
            print(f"{'condition':<28} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'p50 ratio':>10} {'p99 ratio':>10}")
            for label, xs in res.items():
                print(f"{label:<28} {len(xs):>5} {1e3 * pct(xs, 50):>8.2f} {1e3 * pct(xs, 99):>8.2f} "
                      f"{pct(xs, 50) / pct(base, 50):>10.3f} {pct(xs, 99) / pct(base, 99):>10.3f}")
            print()
            print("bad canary (v3: 50% refused, +40 ms/token), first step 5%, analysis every 1 s:")
            for label, th in (("default thresholds (min_requests 20)", {}),
                              ("early error test (early_fail_p 0.001)", {"early_fail_p": 0.001})):
                e = exposure(stack, th, args.concurrency, args.max_tokens)
                exposed = e["candidate_ok"] + e["error"]  # only the candidate fails here
                print(f"  {label}: {e['status']} after {e['seconds']:.1f} s; {e['total']} requests in all, "
                      f"{exposed} served by the candidate ({e['candidate_ok']} ok, {e['error']} failed)"
                      if e["seconds"] is not None else f"  {label}: {e['status']} (no rollback within the limit)")
                print(f"    reason: {e['reason'][:200]}")


if __name__ == "__main__":
    main()
